"""BackendService while NATS and PostgreSQL fail under it, with readings flowing.

Every test runs its own servers, breaks one or both while a publisher keeps
going, and ends with each published reading stored exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import nats
import psycopg2
import pytest

from cnc_backend.consumer import State
from cnc_common.embedded import NatsServer, PostgresServer
from tests.backend.conftest import (
    FlowingPublisher,
    make_config,
    make_readings,
    publish_readings,
    query,
    stored_ids,
    wait_for,
)
from tests.backend.test_service import assert_stored_once

pytestmark = pytest.mark.fault


def wait_until_stored(dsn: str, readings: list[dict], timeout: float = 30.0) -> None:
    expected = {r["id"] for r in readings}
    wait_for(
        lambda: expected <= set(stored_ids(dsn)),
        timeout,
        f"all {len(expected)} published readings stored",
        interval=0.2,
    )


def state_changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cnc_backend.consumer" and r.getMessage().startswith("state: ")
    ]


@pytest.mark.timeout(90)
def test_nats_kill_while_publishing(nats_server, pg_dsn, run_service):
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    publisher = FlowingPublisher(nats_server.url).start()
    try:
        publisher.wait_for_count(100)
        nats_server.kill()
        runner.wait_for_state(State.RECONNECTING, timeout=10)
        time.sleep(1.0)
        nats_server.start()
        runner.wait_for_state(State.CONNECTED, timeout=20)
        # Readings keep flowing after the restart, not only the backlog.
        count = len(publisher.published)
        publisher.wait_for_count(count + 100)
    finally:
        published = publisher.stop()

    wait_until_stored(pg_dsn, published)
    runner.stop()
    assert_stored_once(pg_dsn, published)
    # The file store survived, so nothing had to be recreated.
    assert runner.service.counters.stream_recreated == 0
    assert runner.service.counters.consumer_recreated == 0


@pytest.mark.timeout(90)
def test_pg_terminate_backend_mid_batch(
    nats_server, pg_dsn, pg_admin_dsn, caplog, run_service
):
    caplog.set_level(logging.INFO, logger="cnc_backend")
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(20)
    publish_readings(nats_server.url, first)
    wait_until_stored(pg_dsn, first)

    # A lock held by another session stops the batch inside its transaction,
    # after COPY into the staging table and before the merge commits.
    locker = psycopg2.connect(pg_dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        second = make_readings(30, start=100)
        publish_readings(nats_server.url, second)
        wait_for(
            lambda: backend_waiting_on_lock(pg_admin_dsn, pg_dsn),
            10,
            "backend blocked mid-batch",
        )
        terminated = query(
            pg_admin_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'cnc-backend' AND datname = %s",
            (database_name(pg_dsn),),
        )
        assert terminated == [(True,)]
    finally:
        locker.rollback()
        locker.close()

    # The reconnect is quick enough to miss by polling the state.
    wait_for(lambda: runner.service.counters.reconnects >= 1, 10, "a reconnect")
    third = make_readings(30, start=200)
    publish_readings(nats_server.url, third)
    # The terminated batch was neither committed nor acknowledged; JetStream
    # redelivers it after ack_wait.
    wait_until_stored(pg_dsn, first + second + third)
    runner.stop()
    assert_stored_once(pg_dsn, first + second + third)
    lost = [line for line in state_changes(caplog) if "-> RECONNECTING" in line]
    assert len(lost) == 1
    assert ": batch write failed (" in lost[0]
    assert "connection already closed" not in lost[0]
    assert lost[0].endswith("; waiting for postgres)")


def database_name(dsn: str) -> str:
    return dsn.rpartition("/")[2]


def backend_waiting_on_lock(admin_dsn: str, dsn: str) -> bool:
    rows = query(
        admin_dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
        "'cnc-backend' AND datname = %s AND wait_event_type = 'Lock'",
        (database_name(dsn),),
    )
    return rows[0][0] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_postgres_down_10s_while_publishing(nats_server, private_postgres, run_service):
    dsn = private_postgres.dsn
    runner = run_service(make_config(nats_server.url, dsn))
    runner.wait_for_state(State.CONNECTED)
    publisher = FlowingPublisher(nats_server.url).start()
    try:
        publisher.wait_for_count(100)
        private_postgres.stop()
        runner.wait_for_state(State.RECONNECTING, timeout=10)
        assert "postgres" in runner.service.failure
        time.sleep(10.0)
        assert runner.state is State.RECONNECTING
        private_postgres.start()
        runner.wait_for_state(State.CONNECTED, timeout=20)
        count = len(publisher.published)
        publisher.wait_for_count(count + 100)
    finally:
        published = publisher.stop()

    wait_until_stored(dsn, published)
    runner.stop()
    assert_stored_once(dsn, published)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_frozen_postgres_detected(nats_server, private_postgres, run_service):
    dsn = private_postgres.dsn
    config = make_config(nats_server.url, dsn)
    runner = run_service(config)
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(20)
    publish_readings(nats_server.url, first)
    wait_until_stored(dsn, first)

    # The server's processes stop, but the kernel keeps their sockets open
    # and acknowledges what the backend sends. Neither statement_timeout nor
    # TCP keepalives end the wait, so only the backend's own deadline does.
    private_postgres.freeze()
    try:
        frozen_at = time.monotonic()
        second = make_readings(20, start=100)
        publish_readings(nats_server.url, second)
        runner.wait_for_state(State.RECONNECTING, timeout=20)
        detected_after = time.monotonic() - frozen_at
        failure = runner.service.failure
        time.sleep(1.0)
    finally:
        private_postgres.thaw()

    assert "no response after" in failure
    assert detected_after < config.postgres.statement_timeout + 5.0 + 5.0
    runner.wait_for_state(State.CONNECTED, timeout=30)
    wait_until_stored(dsn, first + second)
    runner.stop()
    assert_stored_once(dsn, first + second)


@pytest.mark.timeout(90)
def test_query_past_statement_timeout(nats_server, pg_dsn, run_service):
    config = make_config(nats_server.url, pg_dsn)
    runner = run_service(config)
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(10)
    publish_readings(nats_server.url, first)
    wait_until_stored(pg_dsn, first)

    locker = psycopg2.connect(pg_dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        second = make_readings(10, start=100)
        publish_readings(nats_server.url, second)
        runner.wait_for_state(State.RECONNECTING, timeout=10)
        failure = runner.service.failure
        # The redelivered batch hits the same lock and times out again.
        wait_for(lambda: runner.service.counters.reconnects >= 2, 15, "a retry")
    finally:
        locker.rollback()
        locker.close()

    assert "statement timeout" in failure
    wait_until_stored(pg_dsn, first + second)
    runner.stop()
    assert_stored_once(pg_dsn, first + second)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_both_down_at_start(tmp_path, caplog, run_service):
    caplog.set_level(logging.INFO, logger="cnc_backend")
    nats_server = NatsServer(tmp_path / "nats")
    # Not under tmp_path, for the reason given at private_postgres.
    postgres = PostgresServer()
    config = make_config(nats_server.url, postgres.dsn)
    try:
        # Neither server runs yet: the service waits instead of exiting.
        runner = run_service(config)
        runner.wait_for_state(State.RECONNECTING, timeout=10)
        time.sleep(2.0)
        assert runner.state is State.RECONNECTING

        postgres.start()
        time.sleep(2.0)
        assert runner.state is State.RECONNECTING
        nats_server.start()
        runner.wait_for_state(State.CONNECTED, timeout=20)
        readings = make_readings(50)
        publish_readings(nats_server.url, readings)
        wait_until_stored(postgres.dsn, readings)
        runner.stop()
        assert_stored_once(postgres.dsn, readings)
    finally:
        nats_server.close()
        postgres.close()

    changes = state_changes(caplog)
    assert changes[0].startswith("state: STARTING -> RECONNECTING (postgres ")
    assert changes[0].endswith("; waiting for postgres)")
    assert changes[1].startswith("state: RECONNECTING -> CONNECTED")
    assert len(changes) == 4  # then DRAINING and STOPPED


@pytest.mark.timeout(90)
def test_frozen_nats_detected(nats_server, pg_dsn, run_service):
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    publisher = FlowingPublisher(nats_server.url).start()
    try:
        publisher.wait_for_count(50)
        nats_server.freeze()
        try:
            runner.wait_for_state(State.RECONNECTING, timeout=15)
            assert "nats" in runner.service.failure
        finally:
            nats_server.thaw()
        runner.wait_for_state(State.CONNECTED, timeout=20)
        count = len(publisher.published)
        publisher.wait_for_count(count + 50)
    finally:
        published = publisher.stop()

    wait_until_stored(pg_dsn, published)
    runner.stop()
    assert_stored_once(pg_dsn, published)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stop_while_postgres_frozen(nats_server, private_postgres, run_service):
    dsn = private_postgres.dsn
    config = make_config(nats_server.url, dsn)
    runner = run_service(config)
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(10)
    publish_readings(nats_server.url, first)
    wait_until_stored(dsn, first)

    private_postgres.freeze()
    try:
        second = make_readings(10, start=100)
        publish_readings(nats_server.url, second)
        counters = runner.service.counters
        wait_for(lambda: counters.fetched > counters.inserted, 10, "a stalled write")
        took = runner.stop()
        # The drain gives up on the write, and the database thread is freed
        # at once rather than when the server comes back.
        wait_for(
            lambda: (
                not any(
                    t.name.startswith("cnc-backend-db") for t in threading.enumerate()
                )
            ),
            2,
            "the database thread to end",
        )
    finally:
        private_postgres.thaw()

    assert took < config.service.drain_timeout + 1.0
    assert runner.drained is False
    assert sorted(stored_ids(dsn)) == sorted(r["id"] for r in first)
    # Nothing of the stalled batch was acknowledged: a new run stores it.
    second_runner = run_service(config)
    wait_until_stored(dsn, first + second)
    second_runner.stop()
    assert_stored_once(dsn, first + second)


def delete_consumer(url: str) -> None:
    async def delete() -> None:
        nc = await nats.connect(url, connect_timeout=2)
        try:
            await nc.jetstream().delete_consumer("CNC_READINGS", "cnc-backend")
        finally:
            await nc.close()

    asyncio.run(delete())


@pytest.mark.timeout(60)
def test_deleted_consumer_is_recreated(nats_server, pg_dsn, run_service):
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    first = make_readings(10)
    publish_readings(nats_server.url, first)
    wait_until_stored(pg_dsn, first)

    # The server stays up and keeps the stream; only the consumer goes.
    delete_consumer(nats_server.url)
    second = make_readings(10, start=100)
    publish_readings(nats_server.url, second)

    wait_until_stored(pg_dsn, first + second)
    runner.stop()
    assert_stored_once(pg_dsn, first + second)
    counters = runner.service.counters
    assert counters.consumer_recreated == 1
    assert counters.stream_recreated == 0
    # The new consumer starts at the beginning of the stream, and the
    # insert skips what was stored before.
    assert counters.duplicates == len(first)
