"""Edge benchmarks: offline journaling and replay of a journal to JetStream."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import nats
import orjson
from nats.js.api import StorageType, StreamConfig

from bench.common import (
    Figure,
    RssSampler,
    Servers,
    sample_payloads,
    start_module,
    stop_process,
    wait_until,
)
from cnc_edge.journal import SYNC_DIR, Journal

STREAM = "CNC_READINGS"
SUBJECT_PREFIX = "cnc.readings"
MACHINE = "bench-01"

#: Outstanding PubAcks allowed by the bare publisher (nats-py's default bound).
CEILING_WINDOW = 4000

POLICIES = ("always", "interval", "never")


# Offline journaling ---------------------------------------------------------


def _journal_rate(
    directory: Path, policy: str, payloads: list[bytes], seconds: float
) -> float:
    """Append one reading per call through Journal.append for ``seconds``."""
    shutil.rmtree(directory, ignore_errors=True)
    journal = Journal(directory, fsync=policy)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline and count < len(payloads):
        # The intake thread appends whatever the poller queued; at polling
        # rates that is one reading per call.
        journal.append([payloads[count]])
        count += 1
    elapsed = time.perf_counter() - started
    journal.close()
    return count / elapsed


def _bare_write_rate(
    directory: Path, policy: str, payloads: list[bytes], seconds: float
) -> float:
    """Write the same lines with os.write and the same fsync pattern, no Journal."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    fd = os.open(directory / "bare.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    last_fsync = time.monotonic()
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline and count < len(payloads):
        os.write(fd, payloads[count] + b"\n")
        count += 1
        if policy == "always":
            os.fsync(fd)
        elif policy == "interval" and time.monotonic() - last_fsync >= 1.0:
            os.fsync(fd)
            last_fsync = time.monotonic()
    elapsed = time.perf_counter() - started
    os.fsync(fd)
    os.close(fd)
    return count / elapsed


def bench_journal(work_dir: Path, repeats: int, seconds: float) -> list[Figure]:
    """Readings per second through Journal.append under each fsync policy."""
    # Enough payloads that no policy runs out within ``seconds``.
    payloads = [payload for _, payload in sample_payloads(400_000)]
    figures = []
    for policy in POLICIES:
        figure = Figure(
            benchmark="journal",
            name=f"append, fsync={policy}",
            unit="readings/s",
            runs=[],
            ceiling_name="bare os.write loop",
            target=(">=", 0.5, "ratio") if policy == "interval" else None,
        )
        for _ in range(repeats):
            directory = work_dir / "journal"
            figure.runs.append(_journal_rate(directory, policy, payloads, seconds))
            figure.ceiling_runs.append(
                _bare_write_rate(directory, policy, payloads, seconds)
            )
        shutil.rmtree(work_dir / "journal", ignore_errors=True)
        figures.append(figure)
    return figures


# Replay ---------------------------------------------------------------------


def write_sync_files(
    data_dir: Path, count: int, segment_bytes: int = 8 << 20
) -> tuple[int, int]:
    """Fill ``data_dir/sync/`` with ``count`` readings in rotated-size files.

    Returns (number of files, total bytes). The files look as the journal
    leaves them after rotations: ``<ns>.jsonl``, oldest name first.
    """
    sync_dir = data_dir / SYNC_DIR
    sync_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = 0
    total = 0
    lines: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal files, total, lines, size
        path = sync_dir / f"{time.time_ns():020d}.jsonl"
        path.write_bytes(b"".join(lines))
        files += 1
        total += size
        lines, size = [], 0

    for _, payload in sample_payloads(count, MACHINE):
        lines.append(payload + b"\n")
        size += len(payload) + 1
        if size >= segment_bytes:
            flush()
    if lines:
        flush()
    return files, total


def write_edge_config(directory: Path, nats_url: str, extra: str = "") -> Path:
    """Write an edge config for a benchmark agent and return its path.

    The serial port is pyserial's ``loop://``, which echoes the queries, and
    the poll interval is an hour, so the poller adds one reading at most. One
    command and a short query timeout keep that poll from delaying the stop.
    """
    path = directory / "edge.toml"
    path.write_text(
        f"""[machine]
id = "{MACHINE}"

[serial]
url = "loop://"
query_timeout = 0.1

[poll]
interval = 3600.0
commands = ["Q100"]

[nats]
url = "{nats_url}"
stream = "{STREAM}"

[journal]
data_dir = "{directory / "data"}"

[metrics]
listen = "127.0.0.1:0"

[log]
level = "WARNING"
{extra}
"""
    )
    return path


async def reset_stream(nats_url: str) -> None:
    """Create the readings stream, or purge it when it exists."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(STREAM)
            await js.purge_stream(STREAM)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=STREAM,
                    subjects=[f"{SUBJECT_PREFIX}.>"],
                    storage=StorageType.FILE,
                    duplicate_window=120.0,
                )
            )
    finally:
        await nc.close()


async def stream_messages(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return info.state.messages
    finally:
        await nc.close()


async def bare_publish(
    nats_url: str, payloads: list[tuple[str, bytes]], window: int = CEILING_WINDOW
) -> float:
    """Publish with pipelined PubAcks and no project code; return messages/s."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30.0, publish_async_max_pending=window)
        subject = f"{SUBJECT_PREFIX}.{MACHINE}"
        started = time.perf_counter()
        for rid, payload in payloads:
            await js.publish_async(
                subject, payload, wait_stall=30.0, headers={"Nats-Msg-Id": rid}
            )
        await asyncio.wait_for(js.publish_async_completed(), timeout=120.0)
        return len(payloads) / (time.perf_counter() - started)
    finally:
        await nc.close()


def _read_state(data_dir: Path) -> dict:
    try:
        return orjson.loads((data_dir / "state.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def run_agent_replay(
    work_dir: Path, nats_url: str, count: int, timeout: float
) -> dict[str, float]:
    """Replay ``count`` journaled readings through a real ``cnc-edge run``.

    Returns the replay rate from the buffer's own sync timing and the peak
    RSS of the agent's process tree while replaying and at rest.
    """
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    config = write_edge_config(work_dir, nats_url)
    data_dir = work_dir / "data"
    write_sync_files(data_dir, count)
    agent = start_module(
        "cnc_edge.cli", ["run", "--config", str(config)], work_dir / "agent.log"
    )
    try:
        with RssSampler({"agent": agent.pid}) as busy:

            def synced() -> bool:
                if agent.poll() is not None:
                    raise RuntimeError(f"agent exited; see {work_dir / 'agent.log'}")
                last = _read_state(data_dir).get("last_sync")
                return bool(last) and last["readings"] >= count

            wait_until(synced, timeout, f"replay of {count} readings")
        with RssSampler({"agent": agent.pid}) as rest:
            time.sleep(1.0)
        last_sync = _read_state(data_dir)["last_sync"]
    finally:
        stop_process(agent)
    return {
        "rate": last_sync["readings"] / last_sync["seconds"],
        "rss_busy": busy.peak["agent"] / 2**20,
        "rss_rest": rest.peak["agent"] / 2**20,
    }


def bench_replay(
    servers: Servers, work_dir: Path, count: int, repeats: int
) -> tuple[list[Figure], list[dict[str, float]]]:
    """Replay through the real agent against a bare pipelined publisher."""
    url = servers.nats.url
    figure = Figure(
        benchmark="replay",
        name=f"{count:,} journaled readings to JetStream (cnc-edge run)",
        unit="readings/s",
        runs=[],
        ceiling_name="bare publish_async",
        target=(">=", 0.7, "ratio"),
    )
    samples = []
    for _ in range(repeats):
        asyncio.run(reset_stream(url))
        result = run_agent_replay(work_dir / "replay", url, count, timeout=600)
        figure.runs.append(result["rate"])
        samples.append(result)
        asyncio.run(reset_stream(url))
        payloads = list(sample_payloads(count, MACHINE))
        figure.ceiling_runs.append(asyncio.run(bare_publish(url, payloads)))
        del payloads
    asyncio.run(reset_stream(url))
    shutil.rmtree(work_dir / "replay", ignore_errors=True)
    return [figure], samples
