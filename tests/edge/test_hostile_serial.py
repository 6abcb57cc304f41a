"""Hostile serial input: floods, endless streams, NUL and non-ASCII bytes.

A TCP server on loopback plays the controller (pyserial's ``socket://``
URL), so a flood runs as fast as loopback allows, far faster than any
serial line. Each query must end by its deadline with the error kind the
client reports, and the client's memory must stay bounded however much
arrives.
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import serial

from cnc_common.embedded import NatsServer
from cnc_edge.errors import AnswerError, GarbledAnswer, PartialAnswer, StaleAnswer
from cnc_edge.haas import ETB, MAX_FRAME_LENGTH, STX, HaasClient
from tests.helpers import (
    polled_ids,
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_edge_config,
)

pytestmark = pytest.mark.timeout(120)

QUERY_TIMEOUT = 0.5
#: Peak allocation allowed for one query, far below what a flood delivers.
MEMORY_LIMIT = 256 * 1024


def frame(text: bytes) -> bytes:
    return bytes([STX]) + text + bytes([ETB]) + b"\r\n>"


Behaviour = Callable[[socket.socket, bytes, threading.Event], None]


class HostileController:
    """A loopback TCP server that responds to every query line with ``behaviour``."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.sent = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self) -> HostileController:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)

    def _serve(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        pending = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            pending += data
            while b"\r" in pending:
                line, _, pending = pending.partition(b"\r")
                try:
                    self.behaviour(conn, line.strip(b"\n"), self._stop)
                except OSError:
                    return


def flood(payload: bytes, seconds: float, first: bytes = b"") -> Behaviour:
    """Send ``first``, then ``payload`` over and over for ``seconds``, at loopback speed."""

    def behave(conn: socket.socket, query: bytes, stop: threading.Event) -> None:
        end = time.monotonic() + seconds
        block = payload * max(1, 65536 // len(payload))
        conn.settimeout(1.0)
        conn.sendall(first)
        while time.monotonic() < end and not stop.is_set():
            conn.sendall(block)

    return behave


def answer(data: bytes) -> Behaviour:
    def behave(conn: socket.socket, query: bytes, stop: threading.Event) -> None:
        conn.sendall(data)

    return behave


@pytest.fixture
def hostile() -> Iterator[Callable[[Behaviour], HostileController]]:
    servers: list[HostileController] = []

    def start(behaviour: Behaviour) -> HostileController:
        servers.append(HostileController(behaviour).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def timed_query(url: str, command: str = "Q100") -> tuple[BaseException, float, int]:
    """Run one query; return the error it raised, its duration and peak memory."""
    port = serial.serial_for_url(url, timeout=0.1)
    client = HaasClient(port, query_timeout=QUERY_TIMEOUT)
    tracemalloc.start()
    started = time.monotonic()
    try:
        client.query(command)
    except AnswerError as exc:
        error: BaseException = exc
    else:
        error = AssertionError("the query succeeded")
    finally:
        duration = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        port.close()
    return error, duration, peak


def test_noise_flood_ends_at_deadline(hostile) -> None:
    server = hostile(flood(b"NOISE 0123456789 ", seconds=3.0))

    error, duration, peak = timed_query(server.url)

    assert isinstance(error, PartialAnswer)
    assert duration < QUERY_TIMEOUT + 0.5
    assert peak < MEMORY_LIMIT


def test_endless_frame_is_garbled_quickly(hostile) -> None:
    # One STX, then text that never ends.
    server = hostile(flood(b"A" * 100, seconds=3.0, first=bytes([STX])))

    error, duration, peak = timed_query(server.url)

    assert isinstance(error, GarbledAnswer)
    assert f"longer than {MAX_FRAME_LENGTH}" in str(error)
    assert duration < QUERY_TIMEOUT + 0.5
    assert peak < MEMORY_LIMIT


@pytest.mark.parametrize(
    "text",
    [b"SERIAL NUMBER,\x00\x00123", b"SERIAL NUMBER, \xff\xfe\xc3\x28", b"\x1b[2J"],
    ids=["nul", "non-utf8", "escape-sequence"],
)
def test_invalid_bytes_in_frame_are_garbled(hostile, text: bytes) -> None:
    server = hostile(answer(frame(text)))

    error, duration, _ = timed_query(server.url)

    assert isinstance(error, GarbledAnswer)
    assert "invalid byte" in str(error)
    assert duration < QUERY_TIMEOUT + 0.5


def test_stale_frame_flood_ends_at_deadline(hostile) -> None:
    server = hostile(flood(frame(b"MODE, ZERO"), seconds=3.0))

    error, duration, peak = timed_query(server.url)

    assert isinstance(error, StaleAnswer)
    assert duration < QUERY_TIMEOUT + 0.5
    assert peak < MEMORY_LIMIT


def test_flood_after_valid_answer_stays_bounded(hostile) -> None:
    good = frame(b"SERIAL NUMBER, 1234567")[:-1]  # no prompt after the frame

    def behave(conn: socket.socket, query: bytes, stop: threading.Event) -> None:
        conn.sendall(good)
        flood(b"x" * 64, seconds=1.0)(conn, query, stop)

    server = hostile(behave)
    port = serial.serial_for_url(server.url, timeout=0.1)
    client = HaasClient(port, query_timeout=QUERY_TIMEOUT)
    tracemalloc.start()
    try:
        fields = client.query("Q100")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        port.close()

    assert fields == {"serial_number": "1234567"}
    assert peak < MEMORY_LIMIT


@pytest.mark.slow
@pytest.mark.fault
def test_agent_keeps_polling_and_counts_each_kind(tmp_path: Path, hostile) -> None:
    kinds = [
        answer(frame(b"SERIAL NUMBER,\x00123")),
        flood(b"B" * 100, seconds=QUERY_TIMEOUT, first=bytes([STX])),
        flood(b"noise ", seconds=QUERY_TIMEOUT + 0.2),
        answer(b""),
    ]
    turn = {"next": 0}

    def rotate(conn: socket.socket, query: bytes, stop: threading.Event) -> None:
        behaviour = kinds[turn["next"] % len(kinds)]
        turn["next"] += 1
        behaviour(conn, query, stop)

    server = hostile(rotate)
    nats = NatsServer(tmp_path / "nats").start()
    edge_dir = tmp_path / "edge"
    config = write_edge_config(
        edge_dir,
        serial_url=server.url,
        nats_url=nats.url,
        interval=0.2,
        commands=["Q100"],
    )
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(edge_dir / "data", "ONLINE", timeout=60, agent=agent)
        wait_for(lambda: len(polled_ids(edge_dir)) >= 12, 60, "12 polls")
        info = orjson.loads((edge_dir / "data" / "agent.json").read_bytes())
        with urllib.request.urlopen(info["metrics_url"] + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        assert stop_program(agent) == 0
        nats.close()

    counts = {
        kind: sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("cnc_edge_serial_errors_total{")
            and f'kind="{kind}"' in line
        )
        for kind in ("garbled", "partial", "timeout")
    }
    assert counts["garbled"] >= 2, counts
    assert counts["partial"] >= 1, counts
    assert counts["timeout"] >= 1, counts
    assert "Traceback" not in (tmp_path / "edge.log").read_text()
