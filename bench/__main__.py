"""Command line: ``python -m bench [--quick] [--only NAME] [--size N]``."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.backend import bench_backend_scale, bench_ingest, run_backends
from bench.common import Figure, Servers, format_table, machine_info, write_results
from bench.edge import bench_journal, bench_replay, run_agent_replay
from bench.live import bench_live

BENCHMARKS = ("journal", "replay", "ingest", "latency", "memory", "scale")

#: Sizes of a full run and of ``--quick`` (the CI smoke test).
FULL = {
    "size": 1_000_000,
    "scale_size": 100_000,
    "repeats": 3,
    "journal_seconds": 2.0,
    "live_rates": [10.0, 100.0, 1000.0],
    "live_seconds": 10.0,
    "backend_counts": [1, 2, 4],
    "agent_counts": [1, 10],
}
QUICK = {
    "size": 2_000,
    "scale_size": 2_000,
    "repeats": 1,
    "journal_seconds": 0.2,
    "live_rates": [100.0],
    "live_seconds": 2.0,
    "backend_counts": [2],
    "agent_counts": [1],
}

#: Memory targets in MiB: the whole edge agent and one backend process.
EDGE_RSS_LIMIT = 150.0
BACKEND_RSS_LIMIT = 100.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the cnc-monitor benchmarks on private local servers.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, for the CI smoke test"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="readings in the replay journal and the ingest backlog "
        "(default 1000000, 2000 with --quick)",
    )
    parser.add_argument(
        "--scale-size",
        type=int,
        help="messages in the backlog of the 1, 2 and 4 backend runs "
        "(default 100000, 2000 with --quick)",
    )
    parser.add_argument(
        "--repeats", type=int, help="runs per figure (default 3, 1 with --quick)"
    )
    return parser.parse_args(argv)


def memory_figures(
    edge: dict[int, list[dict[str, float]]], backend: dict[int, list[dict[str, float]]]
) -> list[Figure]:
    """Peak RSS figures of the agent and the backend, per size, busy and at rest."""
    figures = []
    for who, samples, limit in (
        ("edge agent (4 processes)", edge, EDGE_RSS_LIMIT),
        ("backend", backend, BACKEND_RSS_LIMIT),
    ):
        work = "replay of" if who.startswith("edge") else "ingest of"
        for size in sorted(samples):
            for key, when in (("rss_busy", "during"), ("rss_rest", "at rest after")):
                figures.append(
                    Figure(
                        benchmark="memory",
                        name=f"{who} peak RSS {when} {work} {size:,}",
                        unit="MB",
                        runs=[sample[key] for sample in samples[size]],
                        target=("<=", limit, "value"),
                    )
                )
    return figures


def run_all(
    servers: Servers, work_dir: Path, wanted: set[str], sizes: dict[str, Any]
) -> list[Figure]:
    size, repeats = sizes["size"], sizes["repeats"]
    figures: list[Figure] = []
    edge_memory: dict[int, list[dict[str, float]]] = {}
    backend_memory: dict[int, list[dict[str, float]]] = {}
    if "journal" in wanted:
        figures += bench_journal(work_dir, repeats, sizes["journal_seconds"])
    if wanted & {"replay", "memory"}:
        replay, samples = bench_replay(servers, work_dir, size, repeats)
        edge_memory[size] = samples
        if "replay" in wanted:
            figures += replay
    if wanted & {"ingest", "memory"}:
        ingest, samples = bench_ingest(servers, work_dir, size, repeats)
        backend_memory[size] = samples
        if "ingest" in wanted:
            figures += ingest
    if "memory" in wanted:
        small = max(size // 10, 1)
        edge_memory[small] = [
            run_agent_replay(work_dir / "replay", servers.nats.url, small, 600)
        ]
        backend_memory[small] = [run_backends(servers, work_dir / "ingest", small, 1)]
        figures += memory_figures(edge_memory, backend_memory)
    if "latency" in wanted or "scale" in wanted:
        rates = sizes["live_rates"] if "latency" in wanted else []
        agents = sizes["agent_counts"] if "scale" in wanted else []
        figures += bench_live(
            servers, work_dir, rates, agents, repeats, sizes["live_seconds"]
        )
    if "scale" in wanted:
        # Each run fills the stream again; at the full size the three backend
        # counts alone would take most of an hour on 2 CPUs.
        figures += bench_backend_scale(
            servers, work_dir, sizes["scale_size"], repeats, sizes["backend_counts"]
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sizes = dict(QUICK if args.quick else FULL)
    if args.size is not None:
        sizes["size"] = args.size
    if args.scale_size is not None:
        sizes["scale_size"] = args.scale_size
    if args.repeats is not None:
        sizes["repeats"] = args.repeats
    wanted = set(args.only or BENCHMARKS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cnc-bench-") as tmp:
        servers = Servers(Path(tmp)).start()
        try:
            info = machine_info(servers)
            figures = run_all(servers, Path(tmp) / "work", wanted, sizes)
        finally:
            servers.close()
    options = {
        "quick": args.quick,
        "only": sorted(wanted),
        **sizes,
        "seconds": round(time.monotonic() - started, 1),
    }
    path = write_results(figures, info, options)
    print(format_table(figures))
    print(f"\nresults: {path} ({options['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
