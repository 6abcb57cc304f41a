"""The shared config loader: types, unknown keys and environment overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cnc_common import config as cfg
from cnc_common.errors import ConfigError


@dataclass(frozen=True)
class Poll:
    interval: float = field(default=1.0, metadata={cfg.CHECK: cfg.positive})
    retries: int = 3
    password: str | None = field(default=None, metadata={cfg.SECRET: True})


@dataclass(frozen=True)
class Settings:
    poll: Poll = field(default_factory=Poll)


def load(data: dict, environ: dict[str, str]) -> Settings:
    return cfg.load(
        Settings, data, source="x.toml", env_prefix="CNC_T", environ=environ
    )


def test_environment_overrides_file() -> None:
    settings = load({"poll": {"interval": 2.0}}, {"CNC_T_POLL_INTERVAL": "0.5"})
    assert settings.poll.interval == 0.5


def test_invalid_override_names_variable_not_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"poll": {"interval": 2.0}}, {"CNC_T_POLL_INTERVAL": "-1"})
    message = str(caught.value)
    assert message.startswith("environment variable CNC_T_POLL_INTERVAL")
    assert "poll.interval" in message
    assert "x.toml" not in message


def test_unparsable_override_says_what_is_expected() -> None:
    with pytest.raises(ConfigError) as caught:
        load({}, {"CNC_T_POLL_RETRIES": "abc"})
    assert "expected an integer" in str(caught.value)
    assert "invalid literal" not in str(caught.value)


def test_misspelt_override_is_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        load({}, {"CNC_T_POLL_INTERVALL": "1"})
    assert "CNC_T_POLL_INTERVALL" in str(caught.value)
    assert "unknown setting" in str(caught.value)


def test_secret_override_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        cfg.load(
            Settings,
            {"poll": {"password": 12345}},
            source="x.toml",
            env_prefix="CNC_T",
            environ={},
        )
    assert "12345" not in str(caught.value)
    assert "poll.password" in str(caught.value)


def test_nats_url_check() -> None:
    assert cfg.nats_url("nats://a:4222,tls://b:4443") is None
    assert cfg.nats_url("nats://a:99999") is not None
    assert cfg.nats_url("http://a:4222") is not None
    assert cfg.nats_url("nats://:4222") is not None
