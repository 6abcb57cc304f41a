"""The whole pipeline on a locked-down broker: mutual TLS, NKeys, per-program permissions.

``cnc-edge run`` and ``cnc-backend run`` run as an operator would start
them, against the example ``config/nats/server.conf`` with its keys
replaced and mutual TLS added, and every polled reading reaches
PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import (
    polled_ids,
    start_program,
    stop_program,
    stored_ids,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)
from tests.security import (
    make_certificates,
    new_nkey,
    start_nats,
    tls_block,
    write_secret,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "nats" / "server.conf"


def _add_nats_keys(config: Path, keys: dict[str, object]) -> None:
    """Insert ``keys`` at the top of the ``[nats]`` table of a TOML file."""
    lines = []
    for key, value in keys.items():
        shown = str(value).lower() if isinstance(value, bool) else f'"{value}"'
        lines.append(f"{key} = {shown}\n")
    text = config.read_text().replace("[nats]\n", "[nats]\n" + "".join(lines), 1)
    config.write_text(text)


def test_pipeline_over_mutual_tls_with_permissions(
    tmp_path: Path, sim_pty, pg_dsn: str
) -> None:
    certs = make_certificates(tmp_path / "certs")
    text = EXAMPLE.read_text()
    seeds = {}
    for user, example in zip(
        ("haas-vf2-01", "haas-st10-01", "backend"),
        re.findall(r"nkey: (U[A-Z2-7]{55})", text),
        strict=True,
    ):
        key = new_nkey()
        text = text.replace(example, key.public)
        seeds[user] = write_secret(tmp_path / f"{user}.nk", key.seed)
    server = start_nats(tmp_path / "nats", text + tls_block(certs, verify=True))
    tls = {
        "tls_ca_file": certs.ca,
        "tls_cert_file": certs.client_cert,
        "tls_key_file": certs.client_key,
    }
    url = server.url.replace("nats://", "tls://")
    backend_config = write_backend_config(tmp_path / "backend", nats_url=url)
    _add_nats_keys(
        backend_config,
        {"nkey_seed_file": seeds["backend"], "inbox_prefix": "_INBOX.backend", **tls},
    )
    edge_config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=url, machine="haas-vf2-01"
    )
    _add_nats_keys(
        edge_config,
        {
            "nkey_seed_file": seeds["haas-vf2-01"],
            "inbox_prefix": "_INBOX.edge-haas-vf2-01",
            "create_stream": False,
            **tls,
        },
    )
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(backend_config)],
        tmp_path / "backend.log",
        {"CNC_BACKEND_POSTGRES_DSN": pg_dsn},
    )
    edge = start_program(
        "cnc_edge.cli", ["run", "--config", str(edge_config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(tmp_path / "edge" / "data", "ONLINE", timeout=60, agent=edge)
        wait_for(lambda: len(polled_ids(tmp_path / "edge")) >= 10, 30, "10 polls")
        assert stop_program(edge) == 0
        polled = polled_ids(tmp_path / "edge")
        wait_for(
            lambda: set(polled) <= set(stored_ids(pg_dsn)),
            60,
            "every polled reading stored",
            interval=0.5,
        )
    finally:
        stop_program(edge)
        backend_code = stop_program(backend)
        server.close()
    logs = (tmp_path / "edge.log").read_text() + (tmp_path / "backend.log").read_text()

    assert backend_code == 0
    assert set(stored_ids(pg_dsn, machine="haas-vf2-01")) == set(polled)
    assert "rejected by nats" not in logs
    assert "Violation" not in server.log_file.read_text()
