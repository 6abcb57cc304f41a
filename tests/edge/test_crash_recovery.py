"""SIGKILL of the buffer or publisher at exact moments, then a restart.

Each test lets the agent journal readings while the broker is down, makes
one child process die with SIGKILL at a named crash point once the broker
is back, takes a snapshot of every reading id on disk after the crash,
restarts the agent normally and checks that every one of them ends up in
the database exactly once.
"""

from __future__ import annotations

import collections
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from cnc_common.embedded import NatsServer
from tests.helpers import (
    journal_is_empty,
    start_program,
    stop_program,
    stored_ids,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(240)]


def ids_on_disk(data: Path) -> set[str]:
    ids: set[str] = set()
    for path in [data / "current.jsonl", *sorted((data / "sync").glob("*.jsonl"))]:
        if not path.exists():
            continue
        for raw in path.read_bytes().splitlines():
            try:
                ids.add(orjson.loads(raw)["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
    return ids


@pytest.mark.parametrize(
    "crash_at",
    [
        "journal_append:5",
        "rotate_before_rename",
        "rotate_after_rename",
        "replay_after_chunk:2",
        "sync_before_remove",
        "publisher_replay:2",
    ],
)
def test_kill_during_sync_loses_nothing_on_disk(
    tmp_path: Path, sim_pty, pg_dsn: str, crash_at: str
) -> None:
    nats = NatsServer(tmp_path / "nats")
    env = {"CNC_BACKEND_POSTGRES_DSN": pg_dsn}
    backend = start_program(
        "cnc_backend.cli",
        [
            "run",
            "--config",
            str(write_backend_config(tmp_path / "b", nats_url=nats.url)),
        ],
        tmp_path / "backend.log",
        env,
    )
    edge_dir = tmp_path / "edge"
    config = write_edge_config(edge_dir, serial_url=sim_pty.url, nats_url=nats.url)
    # Small replay chunks, so that a crash can land between two of them.
    text = config.read_text().replace(
        f'data_dir = "{edge_dir / "data"}"',
        f'data_dir = "{edge_dir / "data"}"\nreplay_chunk = 5',
    )
    config.write_text(text)
    data = edge_dir / "data"
    crashing = start_program(
        "cnc_edge.cli",
        ["run", "--config", str(config)],
        tmp_path / "edge-1.log",
        {"CNC_TEST_CRASH_AT": crash_at},
    )
    try:
        wait_for(
            lambda: crashing.poll() is not None or len(ids_on_disk(data)) >= 30,
            60,
            "30 readings journaled or the crash",
        )
        # journal_append crashes while still offline; the others need the
        # broker back, which starts the sync.
        nats.start()
        crashing.wait(60)
        assert crashing.returncode == 1, "the agent must exit 1 when a child dies"
        on_disk = ids_on_disk(data)
        assert on_disk, "the crash left nothing on disk to check"
        agent = start_program(
            "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge-2.log"
        )
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        wait_for(
            lambda: on_disk <= set(stored_ids(pg_dsn)),
            60,
            "every reading on disk at the crash stored",
            interval=0.5,
        )
        assert stop_program(agent) == 0
    finally:
        if crashing.poll() is None:
            crashing.kill()
        stop_program(backend)
        nats.close()
    counts = collections.Counter(stored_ids(pg_dsn))
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert journal_is_empty(data)
    log = (tmp_path / "edge-1.log").read_text()
    assert "child died" in log
    if crash_at.startswith("replay_after_chunk"):
        # The restart resumed the file where the acknowledged chunks ended.
        assert "replay resumed" in (tmp_path / "edge-2.log").read_text()


def test_publisher_kill_while_online_loses_nothing(
    tmp_path: Path, sim_pty, pg_dsn: str
) -> None:
    """A publisher killed while ONLINE: the buffer journals what was in flight."""
    nats = NatsServer(tmp_path / "nats").start()
    env = {"CNC_BACKEND_POSTGRES_DSN": pg_dsn}
    backend = start_program(
        "cnc_backend.cli",
        [
            "run",
            "--config",
            str(write_backend_config(tmp_path / "b", nats_url=nats.url)),
        ],
        tmp_path / "backend.log",
        env,
    )
    edge_dir = tmp_path / "edge"
    config = write_edge_config(edge_dir, serial_url=sim_pty.url, nats_url=nats.url)
    data = edge_dir / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "e1.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=60)
        wait_for(lambda: len(stored_ids(pg_dsn)) >= 20, 60, "20 readings stored")
        children = orjson.loads((data / "agent.json").read_bytes())["children"]
        subprocess.run(["kill", "-9", str(children["publisher"])], check=True)
        agent.wait(60)
        assert agent.returncode == 1
        agent = start_program(
            "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "e2.log"
        )
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        polled = (edge_dir / "polled.txt").read_text().split()
        stored = set(stored_ids(pg_dsn))
        # What the poller produced before the kill and what the buffer held
        # is on disk or acknowledged; only readings inside the dead
        # publisher's own memory could be lost, and they were also in the
        # buffer's inflight map, which went back to the journal.
        wait_for(
            lambda: set(polled) <= set(stored_ids(pg_dsn)), 60, "all polled stored"
        )
        assert stored
    finally:
        stop_program(agent)
        stop_program(backend)
        nats.close()
    counts = collections.Counter(stored_ids(pg_dsn))
    assert [rid for rid, n in counts.items() if n > 1] == []


@pytest.mark.parametrize("child", ["poller", "buffer", "publisher"])
def test_agent_exits_promptly_when_any_child_is_killed(
    tmp_path: Path, sim_pty, child: str
) -> None:
    """SIGKILL of any child ends the agent with status 1 within seconds.

    A child killed while waiting on a lock-based multiprocessing primitive
    used to leave the parent blocked for ever when it signalled the stop.
    """
    nats = NatsServer(tmp_path / "nats").start()
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "e.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        time.sleep(1.0)
        children = orjson.loads((data / "agent.json").read_bytes())["children"]
        subprocess.run(["kill", "-9", str(children[child])], check=True)
        agent.wait(30)
        assert agent.returncode == 1
        for pid in children.values():
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), (
                "a child outlived the agent"
            )
    finally:
        if agent.poll() is None:
            agent.kill()
        nats.close()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (FileNotFoundError, IndexError):
        return True
