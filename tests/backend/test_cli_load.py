"""cnc-backend processes under load: SIGTERM mid-backlog, two processes on one consumer."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

from tests.backend.conftest import (
    consumer_info,
    create_stream,
    make_readings,
    publish_many,
    query,
    stored_ids,
    wait_for,
)
from tests.backend.test_cli import start, wait_for_log

DRAIN_TIMEOUT = 5.0

STOPPED_LINE = re.compile(
    r"stopped: cnc-backend \((\d+) inserted, (\d+) duplicates, (\d+) dead-lettered\)"
)


def write_config(directory: Path, nats_url: str, batch_size: int) -> Path:
    # ack_wait is long so that no message is redelivered while a test runs:
    # a duplicate then means two processes or two runs got the same message.
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "backend.toml"
    path.write_text(
        f"""[nats]
url = "{nats_url}"
batch_size = {batch_size}
ack_wait = 60.0
fetch_timeout = 0.5
connect_timeout = 1.0

[postgres]
statement_timeout = 10.0

[service]
drain_timeout = {DRAIN_TIMEOUT}
reconnect_initial = 0.05
reconnect_cap = 0.5

[metrics]
listen = "127.0.0.1:0"
"""
    )
    return path


def stored_count(dsn: str) -> int:
    try:
        return query(dsn, "SELECT count(*) FROM readings")[0][0]
    except psycopg2.errors.UndefinedTable:  # before the first migration
        return 0


def sigterm(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Send SIGTERM; return the exit status and the seconds until exit."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(DRAIN_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("cnc-backend did not exit after SIGTERM") from None
    return status, time.monotonic() - started


def totals(log_path: Path) -> tuple[int, int, int]:
    """Return (inserted, duplicates, dead-lettered) from a run's exit line."""
    found = STOPPED_LINE.findall(log_path.read_text())
    assert len(found) == 1, log_path.read_text()[-3000:]
    inserted, duplicates, dead = (int(n) for n in found[0])
    return inserted, duplicates, dead


def assert_stored_once(dsn: str, readings: list[dict]) -> None:
    ids = stored_ids(dsn)
    repeated = [rid for rid, n in collections.Counter(ids).items() if n > 1]
    assert repeated == []
    assert len(ids) == len(readings)
    assert set(ids) == {r["id"] for r in readings}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_mid_backlog_acks_only_stored(tmp_path, nats_server, pg_dsn):
    readings = make_readings(20_000)
    create_stream(nats_server.url)
    publish_many(nats_server.url, readings)
    config = write_config(tmp_path, nats_server.url, batch_size=500)
    first_log = tmp_path / "first.log"
    process = start(["run", "--config", str(config)], pg_dsn, first_log)
    try:
        wait_for(lambda: stored_count(pg_dsn) >= 2000, 60, "2000 readings stored")
        status, took = sigterm(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert status == 0, first_log.read_text()[-3000:]
    assert took < DRAIN_TIMEOUT
    # Stream sequence n contains readings[n - 1], because the stream was
    # empty and publish_many sends in list order on one connection.
    info = consumer_info(nats_server.url)
    acked = info.ack_floor.stream_seq
    assert info.num_ack_pending == 0
    assert 0 < acked < len(readings), "SIGTERM did not arrive mid-backlog"
    assert info.num_pending == len(readings) - acked
    # Every acknowledged message has its row, and no row lacks its ack.
    assert sorted(stored_ids(pg_dsn)) == sorted(r["id"] for r in readings[:acked])
    assert totals(first_log) == (acked, 0, 0)

    # The next run gets the rest, and nothing twice.
    second_log = tmp_path / "second.log"
    process = start(["run", "--config", str(config)], pg_dsn, second_log)
    try:
        wait_for(
            lambda: stored_count(pg_dsn) >= len(readings), 90, "all readings stored"
        )
        status, _ = sigterm(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert status == 0, second_log.read_text()[-3000:]
    assert_stored_once(pg_dsn, readings)
    assert totals(second_log) == (len(readings) - acked, 0, 0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_share_consumer(tmp_path, nats_server, pg_dsn):
    create_stream(nats_server.url)
    config = write_config(tmp_path, nats_server.url, batch_size=100)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [start(["run", "--config", str(config)], pg_dsn, p) for p in logs]
    try:
        for process, log_path in zip(processes, logs, strict=True):
            wait_for_log(process, log_path, "-> CONNECTED", 30)
        readings = make_readings(10_000)
        publish_many(nats_server.url, readings)
        wait_for(
            lambda: stored_count(pg_dsn) >= len(readings), 90, "all readings stored"
        )
        results = [sigterm(p) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    for (status, _), log_path in zip(results, logs, strict=True):
        assert status == 0, log_path.read_text()[-3000:]
    assert_stored_once(pg_dsn, readings)
    first, second = (totals(p) for p in logs)
    # Both did part of the work, and no message reached both.
    assert first[0] > 0
    assert second[0] > 0
    assert first[0] + second[0] == len(readings)
    assert first[1] + second[1] == 0
