"""Helpers for the backend tests: short timeouts, a service thread, publishing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import nats
import psycopg2
import pytest
from nats.js.api import ConsumerInfo, StorageType, StreamConfig

from cnc_backend.config import BackendConfig, check_consistency
from cnc_backend.consumer import BackendService, State
from cnc_common.config import load
from cnc_common.embedded import PostgresServer
from cnc_common.reading import (
    SUBJECT_PREFIX,
    encode,
    make_reading,
    new_boot_id,
    subject_for,
)

#: Timeouts short enough for tests; ack_wait bounds how long a redelivery takes.
FAST = {
    "nats": {
        "ack_wait": 2.0,
        "fetch_timeout": 0.2,
        "batch_size": 50,
        "connect_timeout": 1.0,
        "ping_interval": 1.0,
        "max_outstanding_pings": 2,
    },
    "postgres": {"connect_timeout": 2, "statement_timeout": 1.5},
    "service": {"drain_timeout": 5.0, "reconnect_initial": 0.05, "reconnect_cap": 0.5},
}


def make_config(nats_url: str, dsn: str, **sections: dict[str, Any]) -> BackendConfig:
    """Build a validated config with FAST timeouts, updated by ``sections``."""
    data: dict[str, dict[str, Any]] = {name: dict(keys) for name, keys in FAST.items()}
    data["nats"]["url"] = nats_url
    data["postgres"]["dsn"] = dsn
    for name, keys in sections.items():
        data.setdefault(name, {}).update(keys)
    config = load(BackendConfig, data, source="test")
    check_consistency(config, "test")
    return config


def make_readings(n: int, machine: str = "m1", start: int = 0) -> list[dict[str, Any]]:
    boot = new_boot_id()
    return [
        make_reading(
            machine=machine,
            boot=boot,
            seq=seq,
            ts=f"2024-05-01T12:{seq // 60 % 60:02d}:{seq % 60:02d}.{seq:06d}Z",
            mono=float(seq),
            fields={"spindle_rpm": 1000 + seq, "mode": "AUTO"},
            errors={},
        )
        for seq in range(start, start + n)
    ]


def publish(
    url: str, messages: list[tuple[str, bytes, str | None]], retry_for: float = 0.0
) -> None:
    """Publish (subject, payload, msg id) to JetStream, retrying each for ``retry_for`` s.

    Retries reuse the Nats-Msg-Id, as the edge agent does, so the stream
    stores a message once even if an acknowledgement was lost.
    """

    async def send() -> None:
        nc = await nats.connect(
            url,
            connect_timeout=1,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,
        )
        js = nc.jetstream(timeout=2.0)
        try:
            for subject, payload, msg_id in messages:
                headers = {"Nats-Msg-Id": msg_id} if msg_id else None
                deadline = time.monotonic() + retry_for
                while True:
                    try:
                        await js.publish(subject, payload, headers=headers)
                        break
                    except (nats.errors.Error, OSError, TimeoutError):
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
        finally:
            await nc.close()

    asyncio.run(send())


def publish_readings(
    url: str, readings: list[dict[str, Any]], retry_for: float = 0.0
) -> None:
    publish(
        url,
        [(subject_for(r["machine"]), encode(r), r["id"]) for r in readings],
        retry_for,
    )


def publish_many(url: str, readings: list[dict[str, Any]], window: int = 500) -> None:
    """Publish readings to JetStream with up to ``window`` PubAcks outstanding."""

    async def send() -> None:
        nc = await nats.connect(url, connect_timeout=2)
        js = nc.jetstream(timeout=10.0)
        try:
            for start in range(0, len(readings), window):
                chunk = readings[start : start + window]
                await asyncio.gather(
                    *(
                        js.publish(
                            subject_for(r["machine"]),
                            encode(r),
                            headers={"Nats-Msg-Id": r["id"]},
                        )
                        for r in chunk
                    )
                )
        finally:
            await nc.close()

    asyncio.run(send())


class FlowingPublisher:
    """Publish readings on a background thread until stopped, like an edge agent.

    Each reading is retried with its Nats-Msg-Id until the stream acknowledges
    it, so a broker outage delays publishing but loses nothing, and
    ``published`` lists exactly the readings the stream accepted.
    """

    def __init__(
        self, url: str, machine: str = "m1", chunk: int = 10, pause: float = 0.05
    ) -> None:
        self.url = url
        self.machine = machine
        self.chunk = chunk
        self.pause = pause
        self.published: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="publisher")

    def start(self) -> FlowingPublisher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Stop after the reading in flight is acknowledged; return all published."""
        self._stopping.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"publisher still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.published

    def wait_for_count(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: len(self.published) >= count, timeout, f"{count} published")

    def _main(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def _publish(self) -> None:
        nc = await nats.connect(
            self.url,
            connect_timeout=1,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,
        )
        js = nc.jetstream(timeout=1.0)
        start = 0
        try:
            while not self._stopping.is_set():
                for reading in make_readings(self.chunk, self.machine, start):
                    await self._publish_one(js, reading)
                start += self.chunk
                await asyncio.sleep(self.pause)
        finally:
            await nc.close()

    async def _publish_one(self, js: Any, reading: dict[str, Any]) -> None:
        headers = {"Nats-Msg-Id": reading["id"]}
        deadline = time.monotonic() + 60.0
        while True:
            try:
                await js.publish(
                    subject_for(self.machine), encode(reading), headers=headers
                )
                self.published.append(reading)
                return
            except (nats.errors.Error, OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def create_stream(url: str, replicas: int = 1, timeout: float = 30.0) -> None:
    """Create the readings stream as the backend would, retrying for ``timeout`` s.

    ``url`` may list several servers separated by commas.

    A JetStream cluster rejects stream creation until it has elected its
    meta leader, which takes a few seconds after the servers start.
    """

    async def create() -> None:
        nc = await nats.connect(url.split(","), connect_timeout=2)
        js = nc.jetstream(timeout=5.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    await js.add_stream(
                        StreamConfig(
                            name="CNC_READINGS",
                            subjects=[f"{SUBJECT_PREFIX}.>"],
                            storage=StorageType.FILE,
                            num_replicas=replicas,
                        )
                    )
                    return
                except (nats.errors.Error, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    asyncio.run(create())


def consumer_info(
    url: str, stream: str = "CNC_READINGS", durable: str = "cnc-backend"
) -> ConsumerInfo:
    async def read() -> ConsumerInfo:
        nc = await nats.connect(url, connect_timeout=2)
        try:
            return await nc.jetstream().consumer_info(stream, durable)
        finally:
            await nc.close()

    return asyncio.run(read())


def consumer_counts(
    url: str, stream: str = "CNC_READINGS", durable: str = "cnc-backend"
) -> tuple[int, int]:
    """Return the consumer's (messages not yet delivered, delivered but unacked)."""

    async def read() -> tuple[int, int]:
        nc = await nats.connect(url, connect_timeout=2)
        try:
            info = await nc.jetstream().consumer_info(stream, durable)
            return info.num_pending or 0, info.num_ack_pending or 0
        finally:
            await nc.close()

    return asyncio.run(read())


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def stored_ids(dsn: str) -> list[str]:
    """Every id in readings, duplicates kept; [] while the table is missing."""
    try:
        return [row[0] for row in query(dsn, "SELECT id FROM readings")]
    except psycopg2.errors.UndefinedTable:
        return []


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ServiceThread:
    """A BackendService running in its own event loop on a background thread.

    Test code blocks (stopping servers, polling PostgreSQL); with the service
    on its own loop that never stalls the service's NATS client.
    """

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.service: BackendService | None = None
        self.drained: bool | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="backend", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self.service = BackendService(self.config)
            self._ready.set()
            self.drained = await self.service.run()

        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()

    def start(self) -> ServiceThread:
        self._thread.start()
        assert self._ready.wait(5), "service did not start"
        return self

    @property
    def state(self) -> State:
        assert self.service is not None
        return self.service.state

    def wait_for_state(self, state: State, timeout: float = 15.0) -> None:
        wait_for(lambda: self.state is state, timeout, f"state {state.name}")

    def stop(self, timeout: float = 15.0) -> float:
        """Request a stop, wait for run() to return; return the seconds it took."""
        started = time.monotonic()
        if self._loop is not None and self.service is not None:
            self._loop.call_soon_threadsafe(self.service.request_stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"service still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return time.monotonic() - started


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster owned by this test, in a new directory under /tmp.

    This replaces the fixture of the same name in tests/conftest.py, whose
    cluster lives under tmp_path. As root, the cluster runs as an
    unprivileged account that must traverse every parent of its data
    directory, and each pytest session that starts meanwhile, such as a
    second run on the same machine, resets /tmp/pytest-of-<user> to mode
    0700, so initdb or a restart there fails with "Permission denied".
    """
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def run_service() -> Iterator[Callable[[BackendConfig], ServiceThread]]:
    """Start BackendService threads; any still running are stopped afterwards."""
    started: list[ServiceThread] = []

    def start(config: BackendConfig) -> ServiceThread:
        runner = ServiceThread(config).start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        if runner._thread.is_alive():
            runner.stop()
