"""Log lines of the real programs: one per event, text or JSON, with context.

Operators grep supervisord's log files, so every line must stand alone: a
timestamp, the level, the machine id and role where they apply, and one
event. State changes are INFO; a failure that repeats while a server is down
is logged once and then counted, not logged on every retry.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import orjson
import pytest

from cnc_common.embedded import NatsServer, free_port
from tests.helpers import (
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EDGE_ROLES = {"agent", "poller", "buffer", "publisher"}
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)


def json_lines(path: Path) -> list[dict]:
    """Parse every line of a log file; fail on the first that is not JSON."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            entries.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"{path.name} line {number} is not JSON: {line!r}")
    return entries


def state_changes(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["msg"].startswith("state: ")]


def run_edge(
    tmp_path: Path, nats_url: str, serial_url: str, args: list[str], seconds: float
) -> Path:
    """Run an edge agent for ``seconds``, stop it and return its log file."""
    config = write_edge_config(
        tmp_path / "edge", serial_url=serial_url, nats_url=nats_url
    )
    log = tmp_path / "edge.log"
    agent = start_program("cnc_edge.cli", ["run", "--config", str(config), *args], log)
    try:
        time.sleep(seconds)
    finally:
        assert stop_program(agent) == 0, log.read_text()[-3000:]
    return log


def test_edge_json_lines_carry_machine_role_and_state(
    tmp_path: Path, nats_server: NatsServer, sim_pty
) -> None:
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats_server.url
    )
    log = tmp_path / "edge.log"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config), "--log-format", "json"], log
    )
    try:
        wait_for_state(tmp_path / "edge" / "data", "ONLINE", timeout=40, agent=agent)
    finally:
        assert stop_program(agent) == 0
    entries = json_lines(log)

    for entry in entries:
        assert entry["machine"] == "m1", entry
        assert entry["role"] in EDGE_ROLES, entry
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    assert {e["role"] for e in entries} == EDGE_ROLES
    changes = state_changes(entries)
    assert [c["msg"].split(" (")[0] for c in changes[:2]] == [
        "state: OFFLINE -> SYNCING",
        "state: SYNCING -> ONLINE",
    ]
    for change in changes:
        assert change["level"] == "INFO"
        assert change["role"] == "buffer"
        assert "machine m1" in change["msg"]


def test_backend_json_lines_carry_role_and_state(
    tmp_path: Path, nats_server: NatsServer, pg_dsn: str
) -> None:
    config = write_backend_config(tmp_path / "backend", nats_url=nats_server.url)
    log = tmp_path / "backend.log"
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(config), "--log-format", "json"],
        log,
        {"CNC_BACKEND_POSTGRES_DSN": pg_dsn},
    )
    try:
        wait_for(
            lambda: "STARTING -> CONNECTED" in log.read_text(), 40, "backend CONNECTED"
        )
    finally:
        assert stop_program(backend) == 0
    entries = json_lines(log)

    for entry in entries:
        assert entry["role"] == "backend", entry
    changes = [c["msg"].split(" (")[0] for c in state_changes(entries)]
    assert changes == [
        "state: STARTING -> CONNECTED",
        "state: CONNECTED -> DRAINING",
        "state: DRAINING -> STOPPED",
    ]
    assert {c["level"] for c in state_changes(entries)} == {"INFO"}


def test_edge_text_retries_logged_once(tmp_path: Path, sim_pty) -> None:
    # Nothing listens on this port, so the publisher's connect fails every
    # backoff step (at most 1 s with the test config).
    unreachable = f"nats://127.0.0.1:{free_port()}"
    log = run_edge(tmp_path, unreachable, sim_pty.url, [], seconds=8)
    lines = log.read_text().splitlines()

    for line in lines:
        assert TEXT_LINE.match(line), f"not one event per line: {line!r}"
    agent_lines = [line for line in lines if " INFO m1 agent " in line]
    assert agent_lines, "text lines carry the machine id and the role"
    failures = [line for line in lines if "connect failed: " in line]
    assert len(failures) == 1, "\n".join(failures)
    assert " WARNING m1 publisher " in failures[0]


def test_backend_text_retries_logged_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = write_backend_config(tmp_path / "backend", nats_url=nats_server.url)
    log = tmp_path / "backend.log"
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(config)],
        log,
        {"CNC_BACKEND_POSTGRES_DSN": unreachable},
    )
    try:
        # With reconnect_cap = 1 s this is several failed attempts.
        time.sleep(8)
    finally:
        assert stop_program(backend) == 0
    lines = log.read_text().splitlines()

    for line in lines:
        assert TEXT_LINE.match(line), f"not one event per line: {line!r}"
    entered = [line for line in lines if "STARTING -> RECONNECTING" in line]
    assert len(entered) == 1
    assert " INFO backend " in entered[0]
    repeats = [line for line in lines if "reconnect failed: " in line]
    assert len(repeats) == 1, "\n".join(repeats)
    assert " WARNING backend " in repeats[0]
