"""Helpers for tests that run the real programs as subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def write_edge_config(
    directory: Path,
    *,
    serial_url: str,
    nats_url: str,
    machine: str = "m1",
    interval: float = 0.1,
    ack_timeout: float = 1.0,
    extra: str = "",
    commands: list[str] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    command_line = ""
    if commands is not None:
        command_line = "commands = [" + ", ".join(f'"{c}"' for c in commands) + "]"
    path = directory / "edge.toml"
    path.write_text(
        f"""[machine]
id = "{machine}"

[serial]
url = "{serial_url}"
query_timeout = 0.5
reopen_backoff_initial = 0.1
reopen_backoff_cap = 1.0

[poll]
interval = {interval}
audit_file = "{directory / "polled.txt"}"
{command_line}

[nats]
url = "{nats_url}"
ack_timeout = {ack_timeout}
ping_interval = 1.0
max_outstanding_pings = 2
reconnect_backoff_initial = 0.1
reconnect_backoff_cap = 1.0

[journal]
data_dir = "{directory / "data"}"

[metrics]
listen = "127.0.0.1:0"
{extra}
"""
    )
    return path


def start_program(
    module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
    finally:
        log.close()


def stop_program(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"process {process.args} did not stop within {timeout} s"
            ) from None
    return process.returncode


def edge_status(data_dir: Path) -> dict[str, Any]:
    try:
        return orjson.loads((data_dir / "state.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {"state": "STARTING"}


def wait_for(
    predicate: Any, timeout: float, message: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def wait_for_state(
    data_dir: Path,
    state: str,
    timeout: float = 30,
    agent: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait for the edge state; with ``agent``, only a state that process wrote counts."""

    def reached() -> bool:
        status = edge_status(data_dir)
        if status.get("state") != state:
            return False
        if agent is None:
            return True
        try:
            info = orjson.loads((data_dir / "agent.json").read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return False
        return info["pid"] == agent.pid and info["children"]["buffer"] == status["pid"]

    wait_for(
        reached,
        timeout,
        f"edge state {state} (last: {edge_status(data_dir).get('state')})",
    )


def polled_ids(directory: Path) -> list[str]:
    path = directory / "polled.txt"
    return path.read_text().split() if path.exists() else []


def journal_is_empty(data_dir: Path) -> bool:
    current = data_dir / "current.jsonl"
    return (not current.exists() or current.stat().st_size == 0) and not list(
        (data_dir / "sync").glob("*")
    )


def stream_ids(nats_url: str, stream: str = "CNC_READINGS") -> list[str]:
    """Every reading id stored in the stream, in stream order, duplicates kept.

    Control messages (loss reports on ``<prefix>.<machine>.control``) and
    reduced records carry no reading id and are skipped.
    """

    async def read() -> list[str]:
        nc = await nats.connect(nats_url, connect_timeout=5)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            total = info.state.messages
            sub = await js.pull_subscribe(
                "",
                stream=stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL
                ),
            )
            ids: list[str] = []
            fetched = 0
            while fetched < total:
                for msg in await sub.fetch(min(500, total - fetched), timeout=5):
                    fetched += 1
                    data = orjson.loads(msg.data)
                    if "id" in data:
                        ids.append(data["id"])
            await sub.unsubscribe()
            return ids
        finally:
            await nc.close()

    return asyncio.run(read())


def write_backend_config(directory: Path, *, nats_url: str, extra: str = "") -> Path:
    """A backend config for tests; pass the DSN as CNC_BACKEND_POSTGRES_DSN."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "backend.toml"
    path.write_text(
        f"""[nats]
url = "{nats_url}"
ack_wait = 5.0
fetch_timeout = 0.5
connect_timeout = 2.0
ping_interval = 1.0

[service]
reconnect_initial = 0.1
reconnect_cap = 1.0

[metrics]
listen = "127.0.0.1:0"
{extra}
"""
    )
    return path


def stored_ids(dsn: str, machine: str | None = None) -> list[str]:
    """Every reading id in the readings table, duplicates kept."""
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            if machine is None:
                cur.execute("SELECT id FROM readings")
            else:
                cur.execute("SELECT id FROM readings WHERE machine_id = %s", (machine,))
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
