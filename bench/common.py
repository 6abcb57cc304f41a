"""Shared pieces: servers, sample readings, statistics, RSS sampling, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg2
from psycopg2 import sql

from cnc_common.embedded import NatsServer, PostgresServer, find_nats_server
from cnc_common.reading import encode, make_reading, new_boot_id, utc_now_iso

RESULTS_DIR = Path(__file__).parent / "results"

#: Seconds any single wait of a benchmark may take before it is abandoned.
WAIT_LIMIT = 600.0


@dataclass
class Figure:
    """One measured quantity over several runs, with its ceiling if it has one."""

    benchmark: str
    name: str
    unit: str
    runs: list[float]
    ceiling_name: str | None = None
    ceiling_runs: list[float] = field(default_factory=list)
    #: Target as (comparison, value, what it applies to), e.g. (">=", 0.7, "ratio").
    target: tuple[str, float, str] | None = None
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        """Per-run ratios: run i against the ceiling run measured next to it."""
        pairs = zip(self.runs, self.ceiling_runs, strict=False)
        return [value / ceiling for value, ceiling in pairs if ceiling > 0]

    def target_met(self) -> bool | None:
        if self.target is None:
            return None
        comparison, limit, subject = self.target
        values = self.ratios if subject == "ratio" else self.runs
        if not values:
            return None
        value = statistics.median(values)
        return value >= limit if comparison == ">=" else value <= limit

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = summarize(self.runs)
        if self.ceiling_runs:
            data["ceiling_summary"] = summarize(self.ceiling_runs)
            data["ratio_summary"] = summarize(self.ratios)
        data["target_met"] = self.target_met()
        return data


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (fraction from 0 to 1)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[index]


# Readings -------------------------------------------------------------------

#: Fields of a sample reading; with the header keys the payload is about 200 bytes.
SAMPLE_FIELDS = {
    "mode": "MEM",
    "program": "O01234",
    "parts": 1234,
    "spindle": 8000,
    "coolant": 82,
}


def sample_payloads(
    count: int, machine: str = "bench-01", boot: str | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(reading id, payload)`` for ``count`` readings of one boot."""
    boot = boot or new_boot_id()
    ts = utc_now_iso()
    for seq in range(count):
        reading = make_reading(
            machine=machine,
            boot=boot,
            seq=seq,
            ts=ts,
            mono=1000.0 + seq,
            fields=SAMPLE_FIELDS,
            errors={},
        )
        yield reading["id"], encode(reading)


# Servers --------------------------------------------------------------------


class Servers:
    """A private nats-server and PostgreSQL cluster for one benchmark run."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.nats = NatsServer(work_dir / "nats")
        self.postgres = PostgresServer(work_dir / "pg")

    def start(self) -> Servers:
        self.nats.start()
        self.postgres.start()
        return self

    def close(self) -> None:
        self.nats.close()
        self.postgres.close()

    def new_database(self) -> str:
        """Create an empty database and return its DSN."""
        name = f"bench_{uuid.uuid4().hex[:10]}"
        with admin_connection(self.postgres.dsn) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.postgres.dsn.rpartition("/")[0] + "/" + name

    def drop_database(self, dsn: str) -> None:
        name = dsn.rpartition("/")[2]
        with admin_connection(self.postgres.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


@contextmanager
def admin_connection(dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


# Processes and memory -------------------------------------------------------


def start_module(
    module: str, args: list[str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``python -m module args`` with its output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tree_rss(pid: int) -> int:
    """Resident set size in bytes of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # Exited between listing and reading.
    return total


class RssSampler:
    """Sample the RSS of process trees every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self.last = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                rss = tree_rss(pid)
                self.last[name] = rss
                self.peak[name] = max(self.peak[name], rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + min(timeout, WAIT_LIMIT)
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(0.05)


# Machine description and output --------------------------------------------


def machine_info(servers: Servers) -> dict[str, Any]:
    """Describe the host and server versions the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nats_version = subprocess.run(
        [find_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    with admin_connection(servers.postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        pg_version = cur.fetchone()[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": nats_version,
        "postgresql": pg_version,
        "load_avg_at_start": os.getloadavg(),
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MB" or unit == "ms":
        return f"{value:.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def format_table(figures: list[Figure]) -> str:
    """Render the figures as a Markdown table."""
    lines = [
        "| benchmark | figure | unit | min | median | max | ceiling (median) "
        "| ratio min/median/max | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fig in figures:
        s = summarize(fig.runs) or {}
        ceiling = summarize(fig.ceiling_runs)
        ratio = summarize(fig.ratios)
        ceiling_text = (
            f"{_fmt(ceiling['median'], fig.unit)} ({fig.ceiling_name})"
            if ceiling
            else "-"
        )
        ratio_text = (
            f"{ratio['min']:.2f} / {ratio['median']:.2f} / {ratio['max']:.2f}"
            if ratio
            else "-"
        )
        target_text = "-"
        if fig.target:
            comparison, limit, subject = fig.target
            target_text = f"{subject} {comparison} {limit:g}"
        met = {True: "yes", False: "NO", None: "-"}[fig.target_met()]
        lines.append(
            f"| {fig.benchmark} | {fig.name} | {fig.unit} "
            f"| {_fmt(s.get('min'), fig.unit)} | {_fmt(s.get('median'), fig.unit)} "
            f"| {_fmt(s.get('max'), fig.unit)} | {ceiling_text} | {ratio_text} "
            f"| {target_text} | {met} |"
        )
    return "\n".join(lines)


def write_results(
    figures: list[Figure], info: dict[str, Any], options: dict[str, Any]
) -> Path:
    """Write the figures as JSON under bench/results/ and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.json"
    document = {
        "created": stamp,
        "machine": info,
        "options": options,
        "figures": [fig.as_dict() for fig in figures],
    }
    path.write_text(json.dumps(document, indent=2, default=str))
    return path
