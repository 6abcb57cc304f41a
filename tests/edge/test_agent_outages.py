"""The edge agent against a real nats-server that goes away and comes back."""

from __future__ import annotations

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
    stream_ids,
    wait_for,
    wait_for_state,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]


def test_agent_starts_offline_and_syncs_when_broker_appears(
    tmp_path: Path, sim_pty
) -> None:
    nats = NatsServer(tmp_path / "nats")  # not started yet
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "OFFLINE", timeout=30)
        wait_for(
            lambda: len(polled_ids(tmp_path / "edge")) >= 10,
            30,
            "10 polls while offline",
        )
        # Longer than nats-py's default budget of 60 attempts at the test
        # config's 0.1 s reconnect wait.
        time.sleep(8)
        assert (data / "current.jsonl").stat().st_size > 0
        nats.start()
        wait_for_state(data, "ONLINE", timeout=30)
        assert edge_status(data)["counters"]["syncs"] == 1
    finally:
        assert stop_program(agent) == 0
        nats.close()


def test_every_polled_reading_reaches_stream_across_restarts(
    tmp_path: Path, sim_pty
) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=30)
        for _ in range(2):
            time.sleep(1.0)
            nats.kill()
            wait_for_state(data, "OFFLINE", timeout=15)
            time.sleep(1.5)
            nats.start()
            wait_for_state(data, "ONLINE", timeout=30)
        time.sleep(0.5)
    finally:
        assert stop_program(agent) == 0
    polled = polled_ids(tmp_path / "edge")
    in_stream = stream_ids(nats.url)
    nats.close()
    assert len(polled) > 30
    missing = set(polled) - set(in_stream)
    assert not missing, f"{len(missing)} polled readings never reached the stream"
    assert journal_is_empty(data)
    status = edge_status(data)
    assert status["counters"]["syncs"] >= 3
    assert status["counters"]["journaled"] > 0


def test_keepalive_detects_dead_link_without_traffic(tmp_path: Path, sim_pty) -> None:
    """No readings to publish: only pings can notice a frozen broker."""
    nats = NatsServer(tmp_path / "nats").start()
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url, interval=60.0
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=30, agent=agent)
        time.sleep(1.0)
        nats.freeze()
        frozen_at = time.monotonic()
        # ping_interval 1 s and max_outstanding_pings 2 in the test config:
        # the client drops the server after about 3 s; allow for a busy machine.
        wait_for_state(data, "OFFLINE", timeout=15, agent=agent)
        assert time.monotonic() - frozen_at < 15
        assert len(polled_ids(tmp_path / "edge")) == 1, "a poll created traffic"
        nats.thaw()
        wait_for_state(data, "ONLINE", timeout=30, agent=agent)
    finally:
        nats.thaw()
        assert stop_program(agent) == 0
        nats.close()
