"""The whole pipeline: simulated control on a pty, edge agent, NATS, backend, PostgreSQL."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from cnc_common.embedded import NatsServer
from tests.helpers import (
    edge_status,
    journal_is_empty,
    polled_ids,
    start_program,
    stop_program,
    stored_ids,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(300)]


def test_every_reading_stored_once_across_two_broker_kills(
    tmp_path: Path, sim_pty, pg_dsn: str
) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    env = {"CNC_BACKEND_POSTGRES_DSN": pg_dsn}
    backend_cfg = write_backend_config(tmp_path / "backend", nats_url=nats.url)
    edge_cfg = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url
    )
    data = tmp_path / "edge" / "data"
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(backend_cfg)],
        tmp_path / "backend.log",
        env,
    )
    edge = start_program(
        "cnc_edge.cli", ["run", "--config", str(edge_cfg)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=30)
        for _ in range(2):
            time.sleep(1.5)
            nats.kill()
            wait_for_state(data, "OFFLINE", timeout=15)
            time.sleep(2.0)
            nats.start()
            wait_for_state(data, "ONLINE", timeout=30)
        time.sleep(1.0)
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
        assert stop_program(backend) == 0
        nats.close()
    stored = stored_ids(pg_dsn)
    counts = collections.Counter(stored)
    assert len(polled) > 40
    assert set(stored) == set(polled)
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert journal_is_empty(data)
    assert edge_status(data)["counters"]["syncs"] >= 3
