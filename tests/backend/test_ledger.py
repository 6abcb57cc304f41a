"""The coverage ledger and time re-anchoring, written by the real Store.

Batches go through the same classification as fetched messages, so the
Cnc-Delivery header, loss reports and reduced records take the path they
take in production.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from cnc_backend.consumer import classify
from cnc_backend.store import DeadLetter, LossRow, Origin, ReadingRow, ReducedRow, Store
from cnc_common.coverage import (
    BACKFILL,
    LIVE,
    control_subject,
    loss_report,
)
from cnc_common.reading import make_reading, subject_for
from tests.backend.conftest import make_config, query

BOOT = "ab" * 16
HOST_BOOT = "5f0c5a4e-0b7e-4f59-9d63-2f2e7c4b9a01"
T0 = datetime(2026, 12, 4, 8, 0, tzinfo=UTC)


def reading(seq: int, boot: str = BOOT, machine: str = "m1", **extra) -> dict:
    ts = extra.pop("ts", T0 + timedelta(seconds=seq))
    return (
        make_reading(
            machine=machine,
            boot=boot,
            seq=seq,
            ts=ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            mono=extra.pop("mono", 1000.0 + seq),
            fields={"execution": "RUNNING", "motion_seconds": seq},
            errors={},
        )
        | extra
    )


def message(data: dict, delivery: str = LIVE, subject: str | None = None):
    origin = Origin(subject or subject_for(data["machine"]), orjson.dumps(data), 1, 1)
    outcome = classify(origin, "cnc.readings", 65536, delivery)
    assert not isinstance(outcome, DeadLetter), outcome
    return outcome


def write(store: Store, *messages) -> None:
    rows = [m for m in messages if isinstance(m, ReadingRow)]
    reduced = [m for m in messages if isinstance(m, ReducedRow)]
    losses = [m for m in messages if isinstance(m, LossRow)]
    store.write_batch(rows, [], reduced, losses)


def spans(dsn: str, machine: str = "m1") -> list[tuple]:
    return query(
        dsn,
        "SELECT seq_start, seq_end, kind, reason FROM coverage_spans "
        "WHERE machine_id = %s ORDER BY boot_id, seq_start",
        (machine,),
    )


def view(dsn: str, machine: str = "m1") -> list[tuple]:
    return query(
        dsn,
        "SELECT kind, reason, seq_start, seq_end FROM coverage "
        "WHERE machine_id = %s ORDER BY ts_start, seq_start",
        (machine,),
    )


@pytest.fixture
def store(pg_dsn):
    store = Store(make_config("nats://127.0.0.1:1", pg_dsn).postgres)
    yield store
    store.close()


def test_outage_backfilled_late_gives_live_backfilled_live(store, pg_dsn):
    write(store, *(message(reading(s)) for s in range(0, 10)))
    write(store, *(message(reading(s)) for s in range(20, 30)))
    assert [row[0] for row in view(pg_dsn)] == ["LIVE", "GAP", "LIVE"]

    write(store, *(message(reading(s), BACKFILL) for s in range(10, 20)))

    assert spans(pg_dsn) == [
        (0, 9, "LIVE", ""),
        (10, 19, "BACKFILLED", ""),
        (20, 29, "LIVE", ""),
    ]
    assert [row[0] for row in view(pg_dsn)] == ["LIVE", "BACKFILLED", "LIVE"]


def test_redelivered_batch_leaves_the_ledger_alone(store, pg_dsn):
    batch = [message(reading(s)) for s in range(5)]
    write(store, *batch)
    write(store, *(message(reading(s), BACKFILL) for s in range(5)))
    assert spans(pg_dsn) == [(0, 4, "LIVE", "")]


def test_loss_report_gives_exact_bounds_and_reason(store, pg_dsn):
    write(store, *(message(reading(s)) for s in range(0, 10)))
    write(store, *(message(reading(s), BACKFILL) for s in range(25, 30)))
    report = loss_report(
        machine="m1",
        boot=BOOT,
        seq_start=10,
        seq_end=24,
        reason="journal_cap",
        detail="journal at its cap",
    )
    loss = message(report, subject=control_subject("cnc.readings", "m1"))
    write(store, loss)
    write(store, loss)

    assert spans(pg_dsn) == [
        (0, 9, "LIVE", ""),
        (10, 24, "LOST", "journal_cap"),
        (25, 29, "BACKFILLED", ""),
    ]
    # The LOST span runs from the last reading before it to the first after.
    assert query(
        pg_dsn,
        "SELECT ts_start, ts_end FROM coverage_spans WHERE kind = 'LOST'",
    ) == [(T0 + timedelta(seconds=9), T0 + timedelta(seconds=25))]
    assert query(pg_dsn, "SELECT count(*) FROM loss_reports") == [(1,)]
    assert store.lost_seconds == {"m1": 16.0}


def test_agent_down_report_marks_only_what_never_arrived(store, pg_dsn):
    write(store, *(message(reading(s)) for s in range(0, 8)))
    report = loss_report(
        machine="m1", boot=BOOT, seq_start=0, seq_end=11, reason="agent_down"
    )
    write(store, message(report, subject=control_subject("cnc.readings", "m1")))
    assert spans(pg_dsn) == [(0, 7, "LIVE", ""), (8, 11, "LOST", "agent_down")]

    # A reading the report counted as lost turns up after all: data wins.
    write(store, message(reading(9), BACKFILL))
    assert spans(pg_dsn) == [
        (0, 7, "LIVE", ""),
        (8, 8, "LOST", "agent_down"),
        (9, 9, "BACKFILLED", ""),
        (10, 11, "LOST", "agent_down"),
    ]


def test_conditions_are_distinct_in_the_ledger(store, pg_dsn):
    conditions = ["ok"] * 3 + ["link_down"] * 2 + ["controller_off"] * 2
    conditions += ["controller_busy"] * 2 + ["ok"]
    write(
        store,
        *(message(reading(s, condition=c)) for s, c in enumerate(conditions)),
    )
    assert spans(pg_dsn) == [
        (0, 2, "LIVE", ""),
        (3, 4, "LOST", "link_down"),
        (5, 6, "LOST", "controller_off"),
        (7, 8, "LIVE", "controller_busy"),
        (9, 9, "LIVE", ""),
    ]


def test_reduced_record_is_backfilled_reduced(store, pg_dsn):
    record = {
        "v": 1,
        "type": "reduced",
        "machine": "m1",
        "boot": BOOT,
        "seq_start": 3,
        "seq_end": 7,
        "count": 5,
        "ts_start": "2026-12-04T08:00:03Z",
        "ts_end": "2026-12-04T08:00:07Z",
        "stats": {"motion_seconds": {"min": 3, "max": 7, "mean": 5.0}},
        "last": {"execution": "RUNNING"},
    }
    write(store, *(message(reading(s)) for s in range(3)))
    write(store, message(record, "backfill-reduced"))
    write(store, message(record, "backfill-reduced"))
    write(store, message(reading(8), BACKFILL))

    assert spans(pg_dsn) == [
        (0, 2, "LIVE", ""),
        (3, 7, "BACKFILLED_REDUCED", ""),
        (8, 8, "BACKFILLED", ""),
    ]
    assert query(pg_dsn, "SELECT count, stats FROM readings_reduced") == [
        (5, {"motion_seconds": {"min": 3, "max": 7, "mean": 5.0}})
    ]


def test_clock_jump_backwards_while_unsynchronised_is_reanchored(store, pg_dsn):
    # Live and synchronised, then an outage in which the host clock loses
    # its synchronisation and jumps back one hour, then synchronised again.
    def timed(seq: int, synced: bool, shift: float = 0.0) -> dict:
        ts = T0 + timedelta(seconds=seq + shift)
        return reading(seq, ts=ts, host_boot=HOST_BOOT, clock_synced=synced)

    write(store, *(message(timed(s, True)) for s in range(0, 5)))
    write(
        store,
        *(message(timed(s, False, -3600.0), BACKFILL) for s in range(5, 10)),
    )
    write(store, *(message(timed(s, True)) for s in range(10, 12)))

    rows = query(
        pg_dsn, "SELECT seq, ts, event_ts, reanchored FROM readings ORDER BY event_ts"
    )
    assert [row[0] for row in rows] == list(range(12))
    for seq, ts, event_ts, reanchored in rows:
        assert event_ts == T0 + timedelta(seconds=seq)
        assert reanchored == (5 <= seq < 10)
        if reanchored:
            assert ts == T0 + timedelta(seconds=seq - 3600)
    assert query(
        pg_dsn, "SELECT machine_id, host_boot, readings FROM clock_reanchors"
    ) == [("m1", HOST_BOOT, 5)]


def test_unsynchronised_readings_wait_for_an_anchor(store, pg_dsn):
    # The host booted without a synchronised clock: nothing to anchor on yet.
    write(
        store,
        *(
            message(
                reading(
                    s,
                    ts=T0 - timedelta(days=30) + timedelta(seconds=s),
                    host_boot=HOST_BOOT,
                    clock_synced=False,
                )
            )
            for s in range(3)
        ),
    )
    assert query(pg_dsn, "SELECT count(*) FROM readings WHERE reanchored") == [(0,)]

    write(store, message(reading(3, host_boot=HOST_BOOT, clock_synced=True)))

    rows = query(pg_dsn, "SELECT seq, event_ts FROM readings ORDER BY seq")
    assert rows == [(s, T0 + timedelta(seconds=s)) for s in range(4)]
    assert query(pg_dsn, "SELECT readings FROM clock_reanchors") == [(3,)]


def test_coverage_command_prints_spans_and_shares(store, pg_dsn, tmp_path: Path):
    write(store, *(message(reading(s)) for s in range(0, 11)))
    report = loss_report(
        machine="m1", boot=BOOT, seq_start=11, seq_end=20, reason="disk_full"
    )
    write(store, message(report, subject=control_subject("cnc.readings", "m1")))
    write(store, *(message(reading(s), BACKFILL) for s in range(21, 31)))
    config = tmp_path / "backend.toml"
    config.write_text(
        f'[nats]\nurl = "nats://127.0.0.1:1"\n[postgres]\ndsn = "{pg_dsn}"\n'
    )
    command = [sys.executable, "-m", "cnc_backend.cli", "coverage", "--config"]
    command += [str(config), "--machine", "m1", "--since", "2026-12-04T08:00:00Z"]
    command += ["--until", "2026-12-04T08:00:30Z"]

    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    data = orjson.loads(
        subprocess.run(
            [*command, "--json"], capture_output=True, text=True, check=True
        ).stdout
    )

    assert [s["kind"] for s in data["spans"]] == ["LIVE", "LOST", "BACKFILLED"]
    # 0..10 s LIVE, 10..21 s LOST (last reading before to first after),
    # 21..30 s BACKFILLED.
    assert data["percent"] == {
        "BACKFILLED": pytest.approx(30.0, abs=0.01),
        "LIVE": pytest.approx(100 / 3, abs=0.01),
        "LOST:disk_full": pytest.approx(110 / 3, abs=0.01),
    }
    assert "LOST:disk_full 36.67%" in text
    assert "11..20" in text

    # A window wider than the data: the rest is NO_DATA, not LIVE.
    wide = [*command[:-4], "--since", "2026-12-04T07:59:00Z"]
    wide += ["--until", "2026-12-04T08:01:30Z"]
    data = orjson.loads(
        subprocess.run(
            [*wide, "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert data["percent"]["NO_DATA"] == pytest.approx(100 * 120 / 150, abs=0.01)
    assert data["percent"]["LIVE"] == pytest.approx(100 * 10 / 150, abs=0.01)

    # A machine the ledger does not know is an error, not an empty period.
    result = subprocess.run(
        [*command[:6], "--machine", "m2"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "no machine 'm2' in the ledger" in result.stderr
    assert "(machines: m1)" in result.stderr


def test_coverage_command_names_a_bad_time(pg_dsn, tmp_path: Path):
    config = tmp_path / "backend.toml"
    config.write_text(
        f'[nats]\nurl = "nats://127.0.0.1:1"\n[postgres]\ndsn = "{pg_dsn}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "cnc_backend.cli", "coverage", "--config", str(config)]
        + ["--machine", "m1", "--since", "yesterday"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "invalid time 'yesterday'" in result.stderr
    assert "24h" in result.stderr

    for args, expected in [
        (["--since", "99999999999d"], "invalid time '99999999999d'"),
        (
            ["--since", "2026-12-04T10:00Z", "--until", "2026-12-04T09:00Z"],
            "is not before",
        ),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "cnc_backend.cli", "coverage", "--config"]
            + [str(config), "--machine", "m1", *args],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr


def test_downtime_after_a_crash_is_unseen_not_lost(store, pg_dsn):
    # Boot A stored 0..9, polled up to 14, then died; boot B starts 60 s in.
    write(store, *(message(reading(s)) for s in range(10)))
    report = loss_report(
        machine="m1",
        boot=BOOT,
        seq_start=0,
        seq_end=14,
        reason="agent_down",
        ts_end="2026-12-04T08:00:14.000000Z",
    )
    write(store, message(report, subject=control_subject("cnc.readings", "m1")))
    other = "cd" * 16
    later = [
        reading(s, boot=other, ts=T0 + timedelta(seconds=60 + s)) for s in range(5)
    ]
    write(store, *(message(r) for r in later))

    rows = query(
        pg_dsn,
        "SELECT kind, reason, seconds FROM coverage WHERE machine_id = 'm1' "
        "ORDER BY ts_start, seq_start NULLS LAST",
    )
    assert rows == [
        ("LIVE", "", 9.0),
        ("LOST", "agent_down", 5.0),
        ("UNSEEN", "agent_not_running", 46.0),
        ("LIVE", "", 4.0),
    ]


def test_loss_report_wrong_subject():
    report = loss_report(
        machine="m1", boot=BOOT, seq_start=0, seq_end=3, reason="agent_down"
    )
    origin = Origin("cnc.readings.m1", orjson.dumps(report), 1, 1)
    letter = classify(origin, "cnc.readings", 65536)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "subject_mismatch"
    assert letter.detail == (
        "loss report published on 'cnc.readings.m1', expected 'cnc.readings.m1.control'"
    )
