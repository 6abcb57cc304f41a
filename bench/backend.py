"""Backend benchmarks: draining a JetStream backlog into PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from pathlib import Path

import nats
import nats.js.errors
import psycopg2
from psycopg2.extras import execute_values

from bench.common import (
    Figure,
    RssSampler,
    Servers,
    sample_payloads,
    start_module,
    stop_process,
    wait_until,
)
from bench.edge import MACHINE, STREAM, bare_publish, reset_stream
from cnc_backend.consumer import classify
from cnc_backend.schema import migrate
from cnc_backend.store import _COLUMNS, Origin, ReadingRow

DURABLE = "cnc-backend"
#: Rows per transaction in the ceilings, the backend's default batch_size.
BATCH = 500


def write_backend_config(directory: Path, nats_url: str, dsn: str) -> Path:
    path = directory / "backend.toml"
    path.write_text(
        f"""[nats]
url = "{nats_url}"
stream = "{STREAM}"
durable = "{DURABLE}"
batch_size = {BATCH}

[postgres]
dsn = "{dsn}"

[metrics]
listen = "127.0.0.1:0"

[log]
level = "WARNING"
"""
    )
    return path


async def _consumer_drained(nats_url: str, expected: int) -> bool:
    """Return True once the consumer delivered every message and got its ack."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.consumer_info(STREAM, DURABLE)
        except nats.js.errors.NotFoundError:
            return False
        return (
            info.num_pending == 0
            and info.num_ack_pending == 0
            and info.delivered.stream_seq >= expected
        )
    finally:
        await nc.close()


async def _delete_consumer(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        try:
            await nc.jetstream().delete_consumer(STREAM, DURABLE)
        except nats.js.errors.NotFoundError:
            pass
    finally:
        await nc.close()


def _stored_rate(dsn: str) -> tuple[int, float]:
    """Return (rows stored, rows/s between the first and the last commit).

    ``received_at`` defaults to now(), the start of the inserting
    transaction, so the rows of the first transaction mark the start.
    """
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), min(received_at), max(received_at) FROM readings")
        count, first, last = cur.fetchone()
        cur.execute("SELECT count(*) FROM readings WHERE received_at = %s", (first,))
        first_rows = cur.fetchone()[0]
    conn.close()
    seconds = (last - first).total_seconds()
    return count, (count - first_rows) / seconds if seconds > 0 else 0.0


def fill_stream(nats_url: str, count: int) -> None:
    asyncio.run(_delete_consumer(nats_url))
    asyncio.run(reset_stream(nats_url))
    asyncio.run(bare_publish(nats_url, list(sample_payloads(count, MACHINE))))


def run_backends(
    servers: Servers, work_dir: Path, count: int, processes: int
) -> dict[str, float]:
    """Drain a backlog of ``count`` messages with ``processes`` cnc-backend runs."""
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    url = servers.nats.url
    fill_stream(url, count)
    dsn = servers.new_database()
    config = write_backend_config(work_dir, url, dsn)
    backends = [
        start_module(
            "cnc_backend.cli",
            ["run", "--config", str(config)],
            work_dir / f"backend-{index}.log",
        )
        for index in range(processes)
    ]
    try:
        pids = {f"backend-{i}": p.pid for i, p in enumerate(backends)}
        with RssSampler(pids) as busy:

            def drained() -> bool:
                for process in backends:
                    if process.poll() is not None:
                        raise RuntimeError(f"backend exited; see {work_dir}")
                return asyncio.run(_consumer_drained(url, count))

            wait_until(drained, 900, f"backend ingest of {count} messages")
        with RssSampler(pids) as rest:
            time.sleep(1.0)
    finally:
        for process in backends:
            stop_process(process)
    stored, rate = _stored_rate(dsn)
    servers.drop_database(dsn)
    if stored != count:
        raise RuntimeError(f"backend stored {stored} rows, expected {count}")
    return {
        "rate": rate,
        "rss_busy": max(busy.peak.values()) / 2**20,
        "rss_rest": max(rest.peak.values()) / 2**20,
    }


def _sample_rows(count: int) -> list[ReadingRow]:
    subject = f"cnc.readings.{MACHINE}"
    rows = []
    for _, payload in sample_payloads(count, MACHINE):
        row = classify(Origin(subject, payload), "cnc.readings", 65536)
        assert isinstance(row, ReadingRow)
        rows.append(row)
    return rows


def _fresh_table(servers: Servers) -> str:
    dsn = servers.new_database()
    conn = psycopg2.connect(dsn)
    migrate(conn)
    conn.close()
    return dsn


def bare_copy(servers: Servers, rows: list[ReadingRow]) -> float:
    """COPY the rows straight into ``readings``, BATCH rows per transaction."""
    dsn = _fresh_table(servers)
    lines = [row.copy_line() for row in rows]
    conn = psycopg2.connect(dsn)
    started = time.perf_counter()
    for start in range(0, len(lines), BATCH):
        with conn, conn.cursor() as cur:
            data = io.StringIO("".join(lines[start : start + BATCH]))
            cur.copy_expert(f"COPY readings ({_COLUMNS}) FROM STDIN", data)
    rate = len(rows) / (time.perf_counter() - started)
    conn.close()
    servers.drop_database(dsn)
    return rate


def bare_insert(servers: Servers, rows: list[ReadingRow]) -> float:
    """Multi-row INSERT ... ON CONFLICT DO NOTHING, BATCH rows per transaction."""
    dsn = _fresh_table(servers)
    values = [row.values() for row in rows]
    conn = psycopg2.connect(dsn)
    query = f"INSERT INTO readings ({_COLUMNS}) VALUES %s ON CONFLICT DO NOTHING"
    template = "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb" + ", %s" * 8 + ")"
    started = time.perf_counter()
    for start in range(0, len(values), BATCH):
        with conn, conn.cursor() as cur:
            chunk = values[start : start + BATCH]
            execute_values(cur, query, chunk, template=template, page_size=BATCH)
    rate = len(rows) / (time.perf_counter() - started)
    conn.close()
    servers.drop_database(dsn)
    return rate


def bench_ingest(
    servers: Servers, work_dir: Path, count: int, repeats: int
) -> tuple[list[Figure], list[dict[str, float]]]:
    """Drain a backlog with one cnc-backend, against two bare-SQL ceilings."""
    against_insert = Figure(
        benchmark="ingest",
        name=f"{count:,}-message backlog to PostgreSQL (cnc-backend run)",
        unit="rows/s",
        runs=[],
        ceiling_name="bare idempotent INSERT",
        target=(">=", 0.6, "ratio"),
    )
    against_copy = Figure(
        benchmark="ingest",
        name="same, against bare COPY",
        unit="rows/s",
        runs=[],
        ceiling_name="bare COPY",
    )
    samples = []
    rows = _sample_rows(count)
    for _ in range(repeats):
        result = run_backends(servers, work_dir / "ingest", count, 1)
        samples.append(result)
        against_insert.runs.append(result["rate"])
        against_copy.runs.append(result["rate"])
        against_insert.ceiling_runs.append(bare_insert(servers, rows))
        against_copy.ceiling_runs.append(bare_copy(servers, rows))
    asyncio.run(_delete_consumer(servers.nats.url))
    asyncio.run(reset_stream(servers.nats.url))
    return [against_insert, against_copy], samples


def bench_backend_scale(
    servers: Servers, work_dir: Path, count: int, repeats: int, counts: list[int]
) -> list[Figure]:
    """Drain the same backlog with 1, 2 and 4 backends on one durable consumer."""
    figures = []
    for processes in counts:
        figure = Figure(
            benchmark="scale",
            name=f"{processes} backend process(es), {count:,}-message backlog",
            unit="rows/s",
            runs=[],
        )
        for _ in range(repeats):
            result = run_backends(servers, work_dir / "scale", count, processes)
            figure.runs.append(result["rate"])
        figures.append(figure)
    asyncio.run(_delete_consumer(servers.nats.url))
    asyncio.run(reset_stream(servers.nats.url))
    return figures
