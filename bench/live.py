"""Live-path latency: poll of a simulated control to a committed row."""

from __future__ import annotations

import asyncio
import select
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg2

from bench.backend import _consumer_drained, _delete_consumer, write_backend_config
from bench.common import (
    Figure,
    Servers,
    percentile,
    start_module,
    stop_process,
    wait_until,
)
from bench.edge import STREAM, reset_stream


def start_simulator(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start cnc-sim on a free TCP port; return it and its socket:// URL."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnc_edge.simulator", "--tcp", "0", "--seed", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30.0)
    if not ready:
        stop_process(process)
        raise TimeoutError("cnc-sim printed no URL within 30 s")
    url = process.stdout.readline().decode().strip()
    return process, url


def write_live_config(
    directory: Path, machine: str, serial_url: str, nats_url: str, rate: float
) -> Path:
    """An agent polling one command at ``rate`` readings per second."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "edge.toml"
    path.write_text(
        f"""[machine]
id = "{machine}"

[serial]
url = "{serial_url}"
query_timeout = 0.5

[poll]
interval = {1.0 / rate}
commands = ["Q500"]

[nats]
url = "{nats_url}"
stream = "{STREAM}"

[journal]
data_dir = "{directory / "data"}"

[metrics]
listen = "127.0.0.1:0"

[log]
level = "WARNING"
"""
    )
    return path


def _online(data_dir: Path) -> bool:
    try:
        return orjson.loads((data_dir / "state.json").read_bytes())["state"] == "ONLINE"
    except (FileNotFoundError, orjson.JSONDecodeError, KeyError):
        return False


def _latencies(dsn: str, since: datetime, until: datetime) -> list[float]:
    """Milliseconds from each reading's ``ts`` to its row's ``received_at``."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT extract(epoch FROM received_at - ts) * 1000 FROM readings "
            "WHERE ts >= %s AND ts < %s",
            (since, until),
        )
        values = [float(row[0]) for row in cur.fetchall()]
    conn.close()
    return values


def run_live(
    servers: Servers, work_dir: Path, rate: float, agents: int, seconds: float
) -> dict[str, float]:
    """Run agents at ``rate`` readings/s each for ``seconds``; return latencies."""
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    url = servers.nats.url
    asyncio.run(_delete_consumer(url))
    asyncio.run(reset_stream(url))
    dsn = servers.new_database()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        backend_config = write_backend_config(work_dir, url, dsn)
        backend = start_module(
            "cnc_backend.cli",
            ["run", "--config", str(backend_config)],
            work_dir / "backend.log",
        )
        processes.append(backend)
        agent_procs = []
        for index in range(agents):
            directory = work_dir / f"agent-{index}"
            directory.mkdir()
            sim, serial_url = start_simulator(directory / "sim.log")
            processes.append(sim)
            config = write_live_config(
                directory, f"bench-{index:02d}", serial_url, url, rate
            )
            agent = start_module(
                "cnc_edge.cli", ["run", "--config", str(config)], directory / "log"
            )
            processes.append(agent)
            agent_procs.append(agent)
        for index in range(agents):
            data_dir = work_dir / f"agent-{index}" / "data"
            wait_until(lambda d=data_dir: _online(d), 60, f"agent {index} ONLINE")
        # Skip the first second: connections and the consumer warm up.
        time.sleep(1.0)
        since = datetime.now(UTC)
        time.sleep(seconds)
        until = datetime.now(UTC)
        for agent in agent_procs:
            stop_process(agent)
        wait_until(
            lambda: asyncio.run(_consumer_drained(url, 1)), 60, "backend caught up"
        )
        latencies = _latencies(dsn, since, until)
    finally:
        for process in reversed(processes):
            stop_process(process)
        servers.drop_database(dsn)
    if not latencies:
        raise RuntimeError(f"no readings stored; see the logs in {work_dir}")
    return {
        "achieved": len(latencies) / seconds,
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
    }


def bench_live(
    servers: Servers,
    work_dir: Path,
    rates: list[float],
    agent_counts: list[int],
    repeats: int,
    seconds: float,
) -> list[Figure]:
    """Latency percentiles per rate with one agent, and per agent count at 100/s."""
    figures = []
    cases = [(rate, 1) for rate in rates]
    cases += [(100.0, count) for count in agent_counts if (100.0, count) not in cases]
    for rate, agents in cases:
        label = f"{agents} agent(s) x {rate:g} readings/s"
        bench_name = "latency" if agents == 1 else "scale"
        results = [
            run_live(servers, work_dir / "live", rate, agents, seconds)
            for _ in range(repeats)
        ]
        for key in ("p50", "p95", "p99"):
            target = None
            if key == "p99" and rate == 100.0 and agents == 1:
                target = ("<=", 50.0, "value")
            figures.append(
                Figure(
                    benchmark=bench_name,
                    name=f"{label}: poll to row, {key}",
                    unit="ms",
                    runs=[result[key] for result in results],
                    target=target,
                )
            )
        figures.append(
            Figure(
                benchmark=bench_name,
                name=f"{label}: readings stored",
                unit="readings/s",
                runs=[result["achieved"] for result in results],
            )
        )
    return figures
