"""BackendService against real nats-server and PostgreSQL instances."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import pytest

from cnc_backend.consumer import BackendService, State
from cnc_common.embedded import NatsServer
from cnc_common.reading import encode, subject_for
from tests.backend.conftest import (
    consumer_counts,
    make_config,
    make_readings,
    publish,
    publish_readings,
    query,
    stored_ids,
    wait_for,
)


def assert_stored_once(dsn: str, expected: list[dict]) -> None:
    ids = stored_ids(dsn)
    repeated = [rid for rid, n in collections.Counter(ids).items() if n > 1]
    assert repeated == []
    assert sorted(ids) == sorted(r["id"] for r in expected)


@pytest.mark.timeout(60)
def test_service_stores_published_readings(nats_server, pg_dsn, run_service):
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    readings = make_readings(120, machine="m1") + make_readings(30, machine="m2")

    publish_readings(nats_server.url, readings)
    wait_for(lambda: len(stored_ids(pg_dsn)) >= 150, 15, "150 stored readings")
    runner.stop()

    assert_stored_once(pg_dsn, readings)
    counters = runner.service.counters
    assert counters.inserted == 150
    assert counters.dead_lettered == 0
    assert counters.batches >= 3  # batch_size is 50
    assert counters.last_batch_at is not None
    assert runner.state is State.STOPPED
    assert runner.drained is True
    row = query(
        pg_dsn,
        "SELECT machine_id, boot_id, seq, status, fields FROM readings WHERE id = %s",
        (readings[5]["id"],),
    )
    assert row == [("m1", readings[5]["boot"], 5, "ok", readings[5]["fields"])]


@pytest.mark.timeout(60)
def test_service_dead_letters_poison_messages(nats_server, pg_dsn, run_service):
    config = make_config(nats_server.url, pg_dsn, nats={"max_payload_bytes": 2048})
    runner = run_service(config)
    runner.wait_for_state(State.CONNECTED)
    good = make_readings(5, machine="m1")
    wrong_machine = make_readings(1, machine="m2")[0]
    bad_schema = dict(make_readings(1, machine="m1", start=100)[0], status="broken")
    oversize = dict(make_readings(1, machine="m1", start=200)[0])
    oversize["fields"] = {"blob": "x" * 4096}
    poison = [
        (subject_for("m1"), b"{not json", "poison-json"),
        (subject_for("m1"), encode(bad_schema), bad_schema["id"]),
        (subject_for("m1"), encode(wrong_machine), wrong_machine["id"]),
        (subject_for("m1"), encode(oversize), oversize["id"]),
    ]
    messages = [(subject_for("m1"), encode(r), r["id"]) for r in good[:3]]
    messages += poison
    messages += [(subject_for("m1"), encode(r), r["id"]) for r in good[3:]]

    publish(nats_server.url, messages)
    wait_for(lambda: runner.service.counters.dead_lettered >= 4, 15, "4 dead letters")
    # Terminated messages are not redelivered, even well past ack_wait.
    time.sleep(config.nats.ack_wait + 1.0)
    runner.stop()

    assert_stored_once(pg_dsn, good)
    letters = query(
        pg_dsn,
        "SELECT reason, subject, raw, stream_seq, deliveries FROM dead_letters "
        "ORDER BY stream_seq",
    )
    assert [row[0] for row in letters] == [
        "invalid_json",
        "schema",
        "subject_mismatch",
        "oversize",
    ]
    assert {row[1] for row in letters} == {"cnc.readings.m1"}
    assert [bytes(row[2]) for row in letters] == [m[1] for m in poison]
    assert [row[3] for row in letters] == [4, 5, 6, 7]
    assert {row[4] for row in letters} == {1}
    assert runner.service.counters.dead_lettered == 4


@pytest.mark.fault
@pytest.mark.timeout(90)
def test_postgres_restart_loses_nothing(nats_server, private_postgres, run_service):
    dsn = private_postgres.dsn
    runner = run_service(make_config(nats_server.url, dsn))
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(60, machine="m1")
    publish_readings(nats_server.url, first)
    wait_for(lambda: len(stored_ids(dsn)) == 60, 15, "first 60 readings stored")

    private_postgres.stop()
    # These are fetched while PostgreSQL is down. Acking them before the
    # commit would lose them; unacked, they come back after ack_wait.
    second = make_readings(60, machine="m1", start=60)
    publish_readings(nats_server.url, second)
    runner.wait_for_state(State.RECONNECTING, timeout=10)
    assert "postgres" in runner.service.failure
    time.sleep(0.5)
    private_postgres.start()

    runner.wait_for_state(State.CONNECTED, timeout=20)
    wait_for(lambda: len(stored_ids(dsn)) >= 120, 20, "all 120 readings stored")
    runner.stop()
    assert_stored_once(dsn, first + second)
    assert runner.service.counters.reconnects >= 1


@pytest.mark.fault
@pytest.mark.timeout(90)
def test_nats_kill_and_restart_loses_nothing(nats_server, pg_dsn, run_service):
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(100, machine="m1")
    publish_readings(nats_server.url, first)
    wait_for(lambda: len(stored_ids(pg_dsn)) >= 20, 15, "first readings stored")

    nats_server.kill()
    runner.wait_for_state(State.RECONNECTING, timeout=10)
    assert "nats" in runner.service.failure
    time.sleep(1.0)
    nats_server.start()

    runner.wait_for_state(State.CONNECTED, timeout=20)
    second = make_readings(100, machine="m2")
    publish_readings(nats_server.url, second, retry_for=10)
    wait_for(lambda: len(stored_ids(pg_dsn)) >= 200, 20, "all 200 readings stored")
    runner.stop()
    assert_stored_once(pg_dsn, first + second)


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_nats_store_loss_recreates_stream(nats_server, pg_dsn, caplog, run_service):
    caplog.set_level(logging.INFO, logger="cnc_backend")
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(10, machine="m1")
    publish_readings(nats_server.url, first)
    wait_for(lambda: len(stored_ids(pg_dsn)) == 10, 15, "first readings stored")

    nats_server.kill()
    nats_server.wipe_store()
    nats_server.start()

    # The service recreates the stream; the publisher retries until it exists.
    second = make_readings(10, machine="m1", start=10)
    publish_readings(nats_server.url, second, retry_for=15)
    wait_for(lambda: len(stored_ids(pg_dsn)) == 20, 20, "second readings stored")
    runner.stop()
    assert_stored_once(pg_dsn, first + second)
    # Operators get a counter to alert on and one WARNING line per recreation.
    assert runner.service.counters.stream_recreated == 1
    assert runner.service.counters.consumer_recreated == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    recreated = [m for m in warnings if m.startswith("recreated: ")]
    assert len(recreated) == 2
    assert recreated[0].startswith("recreated: stream CNC_READINGS on nats ")
    assert recreated[1].startswith("recreated: consumer cnc-backend on nats ")


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_service_waits_for_nats_at_start(nats_server, pg_dsn, run_service):
    nats_server.stop()
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.RECONNECTING, timeout=10)
    # Several backoff steps pass without a crash or a state change.
    time.sleep(2.0)
    assert runner.state is State.RECONNECTING
    assert runner.service.nats.target in runner.service.failure

    nats_server.start()
    runner.wait_for_state(State.CONNECTED, timeout=15)
    readings = make_readings(10)
    publish_readings(nats_server.url, readings)
    wait_for(lambda: len(stored_ids(pg_dsn)) == 10, 15, "readings stored")
    runner.stop()
    assert_stored_once(pg_dsn, readings)


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_stop_while_reconnecting_is_prompt(tmp_path, pg_dsn, run_service):
    absent = NatsServer(tmp_path / "never-started")
    config = make_config(absent.url, pg_dsn, service={"drain_timeout": 3.0})
    runner = run_service(config)
    runner.wait_for_state(State.RECONNECTING, timeout=10)

    took = runner.stop()
    assert took < config.service.drain_timeout
    assert runner.state is State.STOPPED
    assert runner.drained is True


@pytest.mark.timeout(60)
def test_stop_finishes_batch_in_hand(nats_server, pg_dsn, run_service):
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    readings = make_readings(300)
    publish_readings(nats_server.url, readings)
    wait_for(lambda: runner.service.counters.fetched > 0, 10, "first fetch")

    runner.stop()
    # Every reading fetched was committed and acknowledged before the exit.
    counters = runner.service.counters
    assert counters.fetched == counters.inserted
    assert len(stored_ids(pg_dsn)) == counters.inserted
    _, ack_pending = consumer_counts(nats_server.url)
    assert ack_pending == 0


@pytest.mark.timeout(30)
def test_run_when_loop_ends_with_stop(tmp_path):
    # The serving loop may see the stop and return before run() resumes from
    # its wait; run() must then drain once, not close twice.
    absent = NatsServer(tmp_path / "never-started")
    config = make_config(absent.url, "postgresql://postgres@127.0.0.1:1/none")
    service = None

    async def main() -> bool:
        nonlocal service
        service = BackendService(config)

        async def serve_until_stop() -> None:
            await service._stop.wait()

        service._serve = serve_until_stop
        asyncio.get_running_loop().call_later(0.1, service.request_stop)
        return await service.run()

    drained = asyncio.run(main())

    assert drained is True
    assert service.state is State.STOPPED
