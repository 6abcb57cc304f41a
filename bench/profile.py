"""Profile one cnc-backend draining a backlog, with py-spy.

Usage::

    python -m bench.profile --size 100000 [--out DIR]

Starts private servers, fills the stream with ``--size`` readings, runs one
``cnc-backend run`` under ``py-spy record --threads --idle -f raw`` until the
consumer is drained, and prints, per thread, the share of its samples spent
idle and in the functions that take the most time (inclusive). The raw
profile is kept in ``DIR`` (default: a new directory under bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.backend import _consumer_drained, fill_stream, write_backend_config
from bench.common import Servers, wait_until

#: Frames in which a thread waits rather than works.
IDLE_FRAMES = ("select (selectors.py", "_worker (concurrent/futures/thread.py")

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(raw: Path, top: int = 15) -> str:
    """Per thread: samples, idle share and the top functions by inclusive share."""
    totals: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    functions: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        totals[thread] += count
        leaf = frames[-1]
        if any(leaf.startswith(prefix) for prefix in IDLE_FRAMES):
            idle[thread] += count
            continue
        for name in {frame.split(" (")[0] for frame in frames[1:]}:
            functions[thread][name] += count
    lines = []
    for thread, total in totals.most_common():
        lines.append(
            f"{thread}: {total} samples, idle {100 * idle[thread] / total:.0f}%"
        )
        for name, count in functions[thread].most_common(top):
            lines.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--size", type=int, default=100_000, help="backlog size")
    parser.add_argument("--out", type=Path, help="directory for the raw profile")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = args.out or RESULTS / time.strftime("profile-%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "backend.txt"
    with tempfile.TemporaryDirectory(prefix="cnc-profile-") as tmp:
        work = Path(tmp)
        servers = Servers(work / "servers").start()
        try:
            fill_stream(servers.nats.url, args.size)
            config = write_backend_config(
                work, servers.nats.url, servers.new_database()
            )
            command = [py_spy, "record", "-r", "200", "--threads", "--idle"]
            command += ["-f", "raw", "-o", str(raw), "--"]
            command += [sys.executable, "-m", "cnc_backend.cli", "run"]
            command += ["--config", str(config)]
            with open(out / "py-spy.log", "wb") as log:
                spy = subprocess.Popen(command, stdout=log, stderr=log)
            started = time.monotonic()
            wait_until(
                lambda: asyncio.run(_consumer_drained(servers.nats.url, args.size)),
                900,
                f"backend ingest of {args.size} messages",
            )
            seconds = time.monotonic() - started
            # SIGINT makes py-spy stop its child and write the profile.
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        finally:
            servers.close()
    print(f"drained {args.size} messages in {seconds:.1f} s; raw profile: {raw}")
    print(summarize(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
