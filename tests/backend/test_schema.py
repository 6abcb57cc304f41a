"""Schema migrations on a fresh database."""

from __future__ import annotations

import logging
import threading

import psycopg2
import pytest

from cnc_backend.schema import MIGRATIONS, current_version, migrate
from tests.backend.conftest import query


def test_migrate_twice_is_noop(pg_dsn, caplog):
    caplog.set_level(logging.INFO, logger="cnc_backend.schema")
    conn = psycopg2.connect(pg_dsn)
    try:
        first = migrate(conn)
        second = migrate(conn)
        version = current_version(conn)
    finally:
        conn.close()

    assert first == [m.version for m in MIGRATIONS]
    assert second == []
    assert version == MIGRATIONS[-1].version
    tables = {
        row[0]
        for row in query(
            pg_dsn,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        )
    }
    assert {"readings", "dead_letters", "schema_migrations"} <= tables
    recorded = query(pg_dsn, "SELECT version FROM schema_migrations")
    assert recorded == [(m.version,) for m in MIGRATIONS]
    # TimescaleDB is not installed where these tests run.
    assert "readings created as a plain table" in caplog.text


def test_migrate_readings_primary_key(pg_dsn):
    conn = psycopg2.connect(pg_dsn)
    try:
        migrate(conn)
    finally:
        conn.close()
    key = query(
        pg_dsn,
        "SELECT a.attname FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = 'readings'::regclass AND i.indisprimary",
    )
    assert sorted(row[0] for row in key) == ["id", "ts"]
    indexes = query(
        pg_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'readings'"
    )
    assert any("(machine_id, ts DESC)" in row[0] for row in indexes)


@pytest.mark.timeout(60)
def test_migrate_concurrently_applies_once(pg_dsn):
    start = threading.Barrier(4)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        conn = psycopg2.connect(pg_dsn)
        try:
            start.wait()
            results.append(migrate(conn))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert sorted(len(applied) for applied in results) == [0, 0, 0, len(MIGRATIONS)]
    assert query(pg_dsn, "SELECT count(*) FROM schema_migrations") == [
        (len(MIGRATIONS),)
    ]


def test_ledger_migration_covers_readings_stored_before_it(pg_dsn):
    from cnc_backend.schema import _apply_one

    conn = psycopg2.connect(pg_dsn)
    try:
        _apply_one(conn, MIGRATIONS[0])
        with conn, conn.cursor() as cur:
            for seq in [0, 1, 2, 3, 4, 5, 8, 9]:
                errors = '{"serial": "link_down"}' if seq in (3, 4) else "{}"
                cur.execute(
                    "INSERT INTO readings (id, machine_id, boot_id, seq, ts, status, "
                    "fields, errors) VALUES (%s, 'm1', %s, %s, "
                    "'2026-12-04T08:00:00Z'::timestamptz + %s * interval '1 s', "
                    "'ok', '{}', %s)",
                    (f"{'b' * 32}-{seq}", "b" * 32, seq, seq, errors),
                )
        assert migrate(conn) == [m.version for m in MIGRATIONS[1:]]
    finally:
        conn.close()

    spans = query(
        pg_dsn,
        "SELECT seq_start, seq_end, kind, reason FROM coverage_spans ORDER BY seq_start",
    )
    assert spans == [
        (0, 2, "LIVE", ""),
        (3, 4, "LOST", "link_down"),
        (5, 5, "LIVE", ""),
        (8, 9, "LIVE", ""),
    ]
    assert query(pg_dsn, "SELECT count(*) FROM readings WHERE event_ts = ts") == [(8,)]
    kinds = query(pg_dsn, "SELECT kind FROM coverage ORDER BY ts_start, seq_start")
    assert [k for (k,) in kinds] == ["LIVE", "LOST", "LIVE", "GAP", "LIVE"]
