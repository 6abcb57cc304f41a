"""Backend configuration loading and checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnc_backend.config import (
    BackendConfig,
    config_warnings,
    describe_dsn,
    describe_nats_url,
    load_config,
)
from cnc_common.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "backend.toml"


def test_config_example_lists_defaults(monkeypatch):
    for name in [n for n in os.environ if n.startswith("CNC_BACKEND_")]:
        monkeypatch.delenv(name)

    assert load_config(EXAMPLE) == BackendConfig()
    assert config_warnings(BackendConfig()) == []


def test_config_env_overrides_dsn(tmp_path, monkeypatch):
    path = tmp_path / "backend.toml"
    path.write_text("[nats]\nbatch_size = 10\n")
    monkeypatch.setenv("CNC_BACKEND_POSTGRES_DSN", "postgresql://u:pw@db:5433/cnc")

    config = load_config(path)

    assert config.nats.batch_size == 10
    assert config.postgres.dsn == "postgresql://u:pw@db:5433/cnc"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[nats]\nbatch_size = 0\n", "nats.batch_size"),
        ("[nats]\nmax_deliver = 0\n", "nats.max_deliver"),
        ("[nats]\nstream_replicas = 6\n", "nats.stream_replicas"),
        ("[nats]\nstream_replicas = 0\n", "nats.stream_replicas"),
        ("[nats]\nurl = 'http://x'\n", "nats.url"),
        ("[nats]\nsubject_prefix = 'cnc.>'\n", "nats.subject_prefix"),
        ("[nats]\nfetch_timeout = 20.0\n", "nats.fetch_timeout"),
        ("[service]\nreconnect_initial = 20.0\n", "service.reconnect_initial"),
        ("[metrics]\nlisten = 'nowhere'\n", "metrics.listen"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[postgres]\nbogus = 1\n", "postgres.bogus"),
    ],
    ids=lambda value: value if "." in value and "\n" not in value else None,
)
def test_config_rejects_invalid(tmp_path, text, key):
    path = tmp_path / "backend.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.key == key
    assert str(path) in str(caught.value)


def test_config_error_hides_secret(tmp_path):
    path = tmp_path / "backend.toml"
    path.write_text("[postgres]\ndsn = 'host=db password=s3cret ==='\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.key == "postgres.dsn"
    assert "s3cret" not in str(caught.value)


def test_config_warns_slow_statements():
    config = BackendConfig()
    slow = type(config.postgres)(statement_timeout=config.nats.ack_wait)

    warnings = config_warnings(BackendConfig(postgres=slow))

    assert len(warnings) == 1
    assert "ack_wait" in warnings[0]


def test_describe_hides_passwords():
    assert describe_dsn("postgresql://u:pw@db:5433/cnc") == "u@db:5433/cnc"
    assert describe_dsn("host=db user=u password=pw dbname=x") == "u@db:5432/x"
    assert describe_nats_url("nats://u:pw@a:4222, nats://b:4222") == (
        "nats://a:4222,nats://b:4222"
    )
