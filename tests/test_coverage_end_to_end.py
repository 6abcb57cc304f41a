"""The coverage ledger end to end: simulator, edge agent, NATS, backend, PostgreSQL.

Each test runs the real programs against servers it starts, makes the
pipeline lose or delay readings in one way, and compares the ledger the
backend built with the readings the poller produced (its audit file) and
the readings stored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg2
import pytest

from cnc_common.embedded import NatsServer
from tests.helpers import (
    journal_is_empty,
    polled_ids,
    start_program,
    stop_program,
    stored_ids,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(300)]


def query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def spans(dsn: str, boot: str | None = None) -> list[tuple]:
    sql = "SELECT boot_id, seq_start, seq_end, kind, reason FROM coverage_spans"
    sql += " WHERE machine_id = 'm1'"
    params: tuple = ()
    if boot is not None:
        sql += " AND boot_id = %s"
        params = (boot,)
    return query(
        dsn,
        sql + " ORDER BY min(ts_start) OVER (PARTITION BY boot_id), boot_id, seq_start",
        params,
    )


def seqs(ids: list[str], boot: str) -> set[int]:
    return {int(rid.rsplit("-", 1)[1]) for rid in ids if rid.startswith(boot + "-")}


def expand(rows: list[tuple], kind: str, reason: str | None = None) -> set[int]:
    found: set[int] = set()
    for _, start, end, row_kind, row_reason in rows:
        if row_kind == kind and (reason is None or row_reason == reason):
            found.update(range(start, end + 1))
    return found


@dataclass
class Pipeline:
    tmp: Path
    nats: NatsServer
    dsn: str
    edge_cfg: Path
    backend: subprocess.Popen[bytes]
    edge: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    @property
    def data(self) -> Path:
        return self.tmp / "edge" / "data"

    def start_edge(self) -> subprocess.Popen[bytes]:
        self.edge = start_program(
            "cnc_edge.cli",
            ["run", "--config", str(self.edge_cfg)],
            self.tmp / "edge.log",
            self.env,
        )
        return self.edge

    def polled(self) -> list[str]:
        return polled_ids(self.tmp / "edge")

    def wait_all_stored(self, timeout: float = 60) -> None:
        wait_for(
            lambda: set(self.polled()) <= set(stored_ids(self.dsn)),
            timeout,
            "every polled reading stored",
            interval=0.5,
        )


@pytest.fixture
def pipeline(tmp_path: Path, sim_pty, pg_dsn: str) -> Iterator[Pipeline]:
    nats = NatsServer(tmp_path / "nats").start()
    backend_cfg = write_backend_config(tmp_path / "backend", nats_url=nats.url)
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(backend_cfg)],
        tmp_path / "backend.log",
        {"CNC_BACKEND_POSTGRES_DSN": pg_dsn},
    )
    edge_cfg = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url
    )
    pipe = Pipeline(tmp_path, nats, pg_dsn, edge_cfg, backend)
    try:
        yield pipe
    finally:
        if pipe.edge is not None:
            stop_program(pipe.edge)
        stop_program(backend)
        nats.close()


def test_outage_backfilled_completely_is_live_backfilled_live(
    pipeline: Pipeline,
) -> None:
    pipeline.start_edge()
    wait_for_state(pipeline.data, "ONLINE", timeout=30)
    time.sleep(1.5)
    pipeline.nats.kill()
    wait_for_state(pipeline.data, "OFFLINE", timeout=15)
    time.sleep(2.0)
    pipeline.nats.start()
    wait_for_state(pipeline.data, "ONLINE", timeout=30)
    time.sleep(1.5)
    assert pipeline.edge is not None and stop_program(pipeline.edge) == 0
    pipeline.wait_all_stored()

    rows = spans(pipeline.dsn)
    kinds = [row[3] for row in rows]
    assert "LOST" not in kinds, rows
    # The agent starts OFFLINE, so its first readings may be backfilled too;
    # after that: live, the outage backfilled, live again.
    while kinds and kinds[0] == "BACKFILLED":
        kinds.pop(0)
    assert kinds == ["LIVE", "BACKFILLED", "LIVE"], rows
    boot = rows[0][0]
    assert expand(rows, "LIVE") | expand(rows, "BACKFILLED") == seqs(
        pipeline.polled(), boot
    )
    view = query(
        pipeline.dsn,
        "SELECT kind FROM coverage WHERE machine_id = 'm1' AND kind IN "
        "('GAP', 'LOST', 'UNSEEN')",
    )
    assert view == []
    assert journal_is_empty(pipeline.data)


def test_killed_agent_lost_span_matches_what_reached_disk(pipeline: Pipeline) -> None:
    first = pipeline.start_edge()
    wait_for_state(pipeline.data, "ONLINE", timeout=30)
    time.sleep(1.0)
    # Stop the buffer so that readings pile up in the queue from the
    # poller, then kill the whole agent at once: those readings were polled
    # but never journaled nor acknowledged.
    agent = orjson.loads((pipeline.data / "agent.json").read_bytes())
    os.kill(agent["children"]["buffer"], signal.SIGSTOP)
    time.sleep(1.0)
    for pid in [agent["pid"], *agent["children"].values()]:
        os.kill(pid, signal.SIGKILL)
    first.wait(10)
    polled_first = pipeline.polled()
    old_boot = polled_first[-1].rsplit("-", 1)[0]

    pipeline.start_edge()
    wait_for_state(pipeline.data, "ONLINE", timeout=30, agent=pipeline.edge)
    # The agent_down report goes out after the first sync; the readings of
    # the old boot that reached the disk arrive before it.
    wait_for(
        lambda: (
            spans(pipeline.dsn, old_boot)
            and max(row[2] for row in spans(pipeline.dsn, old_boot))
            >= max(seqs(polled_first, old_boot))
        ),
        60,
        "the old boot's ledger reaches its last polled reading",
        interval=0.5,
    )
    assert pipeline.edge is not None and stop_program(pipeline.edge) == 0

    rows = spans(pipeline.dsn, old_boot)
    polled = seqs(polled_first, old_boot)
    stored = seqs(stored_ids(pipeline.dsn), old_boot)
    lost = expand(rows, "LOST", "agent_down")
    assert len(polled - stored) >= 3, "the stopped buffer should have lost readings"
    # Every polled reading is either stored or LOST, never both, never neither.
    assert lost == polled - stored, (rows, sorted(polled - stored))
    assert expand(rows, "LIVE") | expand(rows, "BACKFILLED") == stored
    assert [row for row in rows if row[3] == "LOST" and row[4] != "agent_down"] == []


def test_clock_jump_backwards_during_outage_keeps_order(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    clock = tmp_path / "clock.json"
    clock.write_text('{"offset_s": 0, "synced": true}')
    pipeline.env = {"CNC_TEST_CLOCK_FILE": str(clock)}
    pipeline.start_edge()
    wait_for_state(pipeline.data, "ONLINE", timeout=30)
    time.sleep(1.0)
    pipeline.nats.kill()
    wait_for_state(pipeline.data, "OFFLINE", timeout=15)
    # During the outage the host clock loses synchronisation and steps back
    # one hour; later it is synchronised again, still during the outage.
    clock.write_text('{"offset_s": -3600, "synced": false}')
    time.sleep(1.5)
    clock.write_text('{"offset_s": 0, "synced": true}')
    time.sleep(0.5)
    pipeline.nats.start()
    wait_for_state(pipeline.data, "ONLINE", timeout=30)
    time.sleep(1.0)
    assert pipeline.edge is not None and stop_program(pipeline.edge) == 0
    pipeline.wait_all_stored()

    rows = query(
        pipeline.dsn,
        "SELECT seq, ts, event_ts, clock_synced, reanchored FROM readings "
        "WHERE machine_id = 'm1' ORDER BY event_ts, seq",
    )
    by_seq = sorted(rows)
    unsynced = [row for row in rows if not row[3]]
    assert len(unsynced) >= 5, "the clock seam produced no unsynchronised readings"
    # Recorded times jump back an hour; re-anchored times keep poll order.
    assert [row[1] for row in by_seq] != sorted(row[1] for row in by_seq)
    assert [row[0] for row in rows] == [row[0] for row in by_seq]
    assert all(row[4] for row in unsynced)
    for seq, ts, event_ts, _, _ in unsynced:
        assert 3590 < (event_ts - ts).total_seconds() < 3610, (seq, ts, event_ts)
    assert query(
        pipeline.dsn,
        "SELECT sum(readings) FROM clock_reanchors WHERE machine_id = 'm1'",
    ) == [(len(unsynced),)]


def test_ledger_controller_off_and_busy(pipeline: Pipeline, sim_pty) -> None:
    # A powered-off controller costs a query timeout per command and cycle;
    # a short timeout gives several whole cycles with the power off.
    config = pipeline.edge_cfg.read_text()
    pipeline.edge_cfg.write_text(
        config.replace("query_timeout = 0.5", "query_timeout = 0.1")
    )
    pipeline.start_edge()
    wait_for_state(pipeline.data, "ONLINE", timeout=30)
    time.sleep(1.0)
    sim_pty.protocol.power_off()
    time.sleep(4.0)
    sim_pty.protocol.power_on()
    time.sleep(1.0)
    # Busy: the controller replies to every command but Q500.
    sim_pty.inject("ignore", count=100_000, command="Q500")
    time.sleep(2.5)
    sim_pty.protocol.clear_faults()
    time.sleep(1.0)
    assert pipeline.edge is not None and stop_program(pipeline.edge) == 0
    pipeline.wait_all_stored()

    rows = spans(pipeline.dsn)
    classes = [(row[3], row[4]) for row in rows]
    off = classes.index(("LOST", "controller_off"))
    busy = classes.index(("LIVE", "controller_busy"))
    assert off < busy, rows
    assert ("LIVE", "") in classes[:off], rows
    assert ("LIVE", "") in classes[busy:], rows
    # Every polled reading is in exactly one span.
    boot = rows[0][0]
    covered = [s for row in rows for s in range(row[1], row[2] + 1)]
    assert sorted(covered) == sorted(seqs(pipeline.polled(), boot))
    lost = query(
        pipeline.dsn,
        "SELECT sum(seconds) FROM coverage WHERE machine_id = 'm1' AND kind = 'LOST'",
    )[0][0]
    assert 1.5 < lost < 6.0, lost


def outage_until(pipeline: Pipeline, predicate, message: str) -> None:
    """Start the agent with its broker down, wait for ``predicate``, then sync."""
    pipeline.nats.kill()
    pipeline.start_edge()
    wait_for(predicate, 90, message, interval=0.5)
    pipeline.nats.start()
    wait_for_state(pipeline.data, "ONLINE", timeout=60, agent=pipeline.edge)
    wait_for(
        lambda: not (pipeline.data / "losses.jsonl").exists(),
        30,
        "loss reports acknowledged",
    )
    time.sleep(0.5)
    assert pipeline.edge is not None and stop_program(pipeline.edge) == 0


def dropped_count(pipeline: Pipeline) -> int:
    try:
        status = orjson.loads((pipeline.data / "state.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return 0
    return sum(status.get("dropped", {}).values())


def test_journal_cap_gives_lost_span_with_exact_bounds(pipeline: Pipeline) -> None:
    config = pipeline.edge_cfg.read_text().replace(
        "[journal]\n",
        "[journal]\nmax_buffer_bytes = 20000\nsegment_bytes = 4000\nreduce_at = 1.0\n",
    )
    pipeline.edge_cfg.write_text(config)
    outage_until(pipeline, lambda: dropped_count(pipeline) >= 15, "15 readings dropped")
    polled = pipeline.polled()
    boot = polled[0].rsplit("-", 1)[0]
    wait_for(
        lambda: (
            expand(spans(pipeline.dsn, boot), "LIVE")
            | expand(spans(pipeline.dsn, boot), "BACKFILLED")
            | expand(spans(pipeline.dsn, boot), "LOST")
            >= seqs(polled, boot)
        ),
        60,
        "every polled reading stored or LOST",
        interval=0.5,
    )
    rows = spans(pipeline.dsn, boot)
    stored = seqs(stored_ids(pipeline.dsn), boot)
    dropped = seqs(polled, boot) - stored
    assert len(dropped) == dropped_count(pipeline)
    assert expand(rows, "LOST", "journal_cap") == dropped
    assert expand(rows, "LOST") == dropped
    lost_rows = [row for row in rows if row[3] == "LOST"]
    # drop_newest drops the readings after the cap, one contiguous run.
    assert [(row[1], row[2]) for row in lost_rows] == [(min(dropped), max(dropped))]


@pytest.fixture
def slow_sim():
    """A simulated control in real time with 10-minute cycles: its discrete
    values change rarely, so reduction windows fill up."""
    from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer

    server = PtyServer(
        HaasProtocol(MachineModel(seed=3, pace=1, cycle_seconds=600), seed=3)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_ledger_near_cap_reduction(pipeline: Pipeline, slow_sim) -> None:
    from cnc_edge.reduce import DEFAULT_CONTINUOUS_FIELDS, Reducer

    config = pipeline.edge_cfg.read_text()
    config = config.replace(
        "[journal]\n",
        "[journal]\nmax_buffer_bytes = 400000\nreduce_at = 0.01\nreduce_window = 1.0\n",
    )
    serial_url = config.split('url = "', 1)[1].split('"', 1)[0]
    pipeline.edge_cfg.write_text(config.replace(serial_url, slow_sim.url))

    def reduced() -> int:
        try:
            status = orjson.loads((pipeline.data / "state.json").read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return 0
        return status.get("counters", {}).get("reduced", 0)

    outage_until(pipeline, lambda: reduced() >= 40, "40 readings reduced")
    polled = pipeline.polled()
    boot = polled[0].rsplit("-", 1)[0]
    wait_for(
        lambda: (
            {s for row in spans(pipeline.dsn, boot) for s in range(row[1], row[2] + 1)}
            >= seqs(polled, boot)
        ),
        60,
        "every polled reading in the ledger",
        interval=0.5,
    )
    rows = spans(pipeline.dsn, boot)
    assert expand(rows, "LOST") == set(), rows
    assert expand(rows, "BACKFILLED_REDUCED"), rows

    # Every discrete change survives: walking the sequence, a reduced
    # record's discrete values are those of the reading or record before
    # it (nothing discrete changed inside a window), and every polled
    # reading is in a full reading or a record.
    reducer = Reducer(DEFAULT_CONTINUOUS_FIELDS, 1.0)
    full = {
        seq: {"fields": f, "errors": e, "status": st, "condition": c}
        for seq, f, e, st, c in query(
            pipeline.dsn,
            "SELECT seq, fields, errors, status, condition FROM readings "
            "WHERE boot_id = %s",
            (boot,),
        )
    }
    records = {
        start: (end, count, last, stats)
        for start, end, count, last, stats in query(
            pipeline.dsn,
            "SELECT seq_start, seq_end, count, last, stats FROM readings_reduced "
            "WHERE boot_id = %s",
            (boot,),
        )
    }
    assert records
    in_records: set[int] = set()
    state = None
    seq = 0
    last_seq = max(seqs(polled, boot))
    while seq <= last_seq:
        if seq in full:
            discrete, _ = reducer.split(full[seq])
            state = orjson.loads(orjson.dumps(discrete))
            seq += 1
            continue
        assert seq in records, f"reading {seq} is neither stored nor reduced"
        end, count, last, stats = records[seq]
        assert count == end - seq + 1
        assert state is not None and last == state, (seq, last, state)
        for name, values in stats.items():
            assert values["min"] <= values["mean"] <= values["max"], (name, values)
        in_records.update(range(seq, end + 1))
        seq = end + 1
    assert not in_records & set(full)
    assert in_records | set(full) == seqs(polled, boot)
