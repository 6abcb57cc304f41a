"""Store batch writes against a real PostgreSQL database."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest

from cnc_backend.consumer import classify
from cnc_backend.errors import StoreUnavailable
from cnc_backend.store import DeadLetter, Origin, ReadingRow, Store
from cnc_common.reading import encode, subject_for
from tests.backend.conftest import make_config, make_readings, query


def to_row(reading: dict) -> ReadingRow:
    origin = Origin(subject_for(reading["machine"]), encode(reading), 1, 1)
    row = classify(origin, "cnc.readings", 65536)
    assert isinstance(row, ReadingRow)
    return row


@pytest.fixture
def store(pg_dsn):
    store = Store(make_config("nats://127.0.0.1:1", pg_dsn).postgres)
    yield store
    store.close()


def test_store_batch_twice_stores_once(store, pg_dsn):
    rows = [to_row(r) for r in make_readings(40)]

    first = store.write_batch(rows, [])
    second = store.write_batch(rows, [])

    assert (first.inserted, first.duplicates) == (40, 0)
    assert (second.inserted, second.duplicates) == (0, 40)
    assert query(pg_dsn, "SELECT count(*), count(DISTINCT id) FROM readings") == [
        (40, 40)
    ]


def test_store_duplicate_within_batch(store, pg_dsn):
    rows = [to_row(r) for r in make_readings(3)]

    result = store.write_batch(rows + rows[:1], [])

    assert (result.inserted, result.duplicates) == (3, 1)


def test_store_keeps_values(store, pg_dsn):
    reading = make_readings(1)[0]
    reading["fields"] = {"program": "O1234\ttab\\slash\nline", "feed": 12.5}
    reading["errors"] = {"Q600": "timeout"}

    store.write_batch([to_row(reading)], [])

    rows = query(
        pg_dsn, "SELECT id, machine_id, seq, ts, status, fields, errors FROM readings"
    )
    assert rows == [
        (
            reading["id"],
            "m1",
            0,
            datetime.fromisoformat(reading["ts"]),
            "ok",
            reading["fields"],
            {"Q600": "timeout"},
        )
    ]


def test_store_dead_letters_with_rows(store, pg_dsn):
    rows = [to_row(r) for r in make_readings(2)]
    raw = b"\x00" + b"x" * 70000
    letter = DeadLetter(Origin("cnc.readings.m1", raw, 7, 3), "oversize", "too big")

    result = store.write_batch(rows, [letter])

    assert result.dead_lettered == 1
    stored = query(
        pg_dsn,
        "SELECT reason, detail, length(raw), stream_seq, deliveries FROM dead_letters",
    )
    assert stored == [("oversize", "too big", 65536, 7, 3)]
    assert query(pg_dsn, "SELECT count(*) FROM readings") == [(2,)]


def test_store_rejects_unstorable_row(store, pg_dsn):
    good = make_readings(3)
    bad = make_readings(1, start=50)[0]
    # Valid JSON and a valid reading, but jsonb cannot store U+0000.
    bad["fields"] = {"program": "O1\u0000"}
    rows = [to_row(good[0]), to_row(bad), to_row(good[1]), to_row(good[2])]

    result = store.write_batch(rows, [])

    assert result.rejected == (1,)
    assert (result.inserted, result.duplicates, result.dead_lettered) == (3, 0, 1)
    letters = query(pg_dsn, "SELECT reason, raw FROM dead_letters")
    assert [(r[0], orjson.loads(bytes(r[1]))["id"]) for r in letters] == [
        ("rejected_by_database", bad["id"])
    ]


def test_store_reconnects_after_terminated_backend(store, pg_dsn, pg_admin_dsn):
    store.write_batch([to_row(r) for r in make_readings(1)], [])
    # The server ends the session; the client notices only on its next query.
    dbname = pg_dsn.rpartition("/")[2]
    query(
        pg_admin_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'cnc-backend' AND datname = %s",
        (dbname,),
    )
    later = [to_row(r) for r in make_readings(2, start=10)]

    with pytest.raises(StoreUnavailable):
        store.write_batch(later, [])
    result = store.write_batch(later, [])

    assert result.inserted == 2
    assert query(pg_dsn, "SELECT count(*) FROM readings") == [(3,)]


def test_store_connect_failure_hides_password():
    config = make_config(
        "nats://127.0.0.1:1",
        "postgresql://backend:s3cret-pw@127.0.0.1:1/none",
        postgres={"connect_timeout": 2},
    )
    store = Store(config.postgres)

    with pytest.raises(StoreUnavailable) as caught:
        store.connect()

    assert "s3cret-pw" not in str(caught.value)
    assert "backend@127.0.0.1:1/none" in str(caught.value)
