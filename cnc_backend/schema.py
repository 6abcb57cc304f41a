"""Versioned schema migrations, recorded in ``schema_migrations``.

Each migration runs in its own transaction together with the row that records
it, so a migration is either applied and recorded or not applied at all.
Every transaction first takes a transaction-level advisory lock, so two
backends starting at once apply each migration exactly once: the second
waits for the lock, then sees the version recorded and skips it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from cnc_backend.errors import MigrationError

log = logging.getLogger(__name__)

#: Advisory lock key that serializes migrations ("cncb" in ASCII).
MIGRATION_LOCK_KEY = 0x636E6362

#: Upper bound of ``dead_letters.raw``; longer payloads are stored truncated.
DEAD_LETTER_RAW_LIMIT = 65536


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Cursor], None]


def _create_readings(cur: Cursor) -> None:
    timescale = _try_create_timescaledb(cur)
    cur.execute(
        """
        CREATE TABLE readings (
            id text NOT NULL,
            machine_id text NOT NULL,
            boot_id text NOT NULL,
            seq bigint NOT NULL,
            ts timestamptz NOT NULL,
            status text NOT NULL,
            fields jsonb NOT NULL,
            errors jsonb NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (ts, id)
        )
        """
    )
    cur.execute("CREATE INDEX readings_machine_ts ON readings (machine_id, ts DESC)")
    if timescale:
        cur.execute("SELECT create_hypertable('readings', 'ts', if_not_exists => TRUE)")
        log.info("migrate: readings created as a TimescaleDB hypertable on ts")
    cur.execute(
        f"""
        CREATE TABLE dead_letters (
            id bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL DEFAULT now(),
            subject text NOT NULL,
            reason text NOT NULL,
            detail text NOT NULL,
            raw bytea NOT NULL CHECK (octet_length(raw) <= {DEAD_LETTER_RAW_LIMIT}),
            stream_seq bigint,
            deliveries int
        )
        """
    )
    cur.execute("CREATE INDEX dead_letters_received_at ON dead_letters (received_at)")


def _try_create_timescaledb(cur: Cursor) -> bool:
    """Create the timescaledb extension if possible; return whether it exists.

    The attempt runs in a savepoint, because a failed CREATE EXTENSION (not
    installed, not preloaded, no privilege) aborts the whole transaction.
    """
    cur.execute("SAVEPOINT timescaledb")
    try:
        cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg2.Error as exc:
        if cur.connection.closed:
            raise
        cur.execute("ROLLBACK TO SAVEPOINT timescaledb")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.pgcode
        log.info(
            "migrate: readings created as a plain table (timescaledb unavailable: %s)",
            reason,
        )
        return False
    cur.execute("RELEASE SAVEPOINT timescaledb")
    return True


#: Rows of the coverage view: stored spans, sequence gaps that no span or
#: report explains (GAP), and time between two boots of an agent that no
#: span covers (UNSEEN, because the agent was not running). ``seconds`` is
#: the time a row accounts for. It runs up to the start of the machine's
#: next row, so the rows of a machine tile its timeline without overlap.
_COVERAGE_VIEW = """
CREATE VIEW coverage AS
WITH spans AS (
    SELECT machine_id, boot_id, seq_start, seq_end, kind, reason, ts_start, ts_end,
           lag(seq_end) OVER by_seq AS prev_seq_end,
           lag(ts_end) OVER by_seq AS prev_ts_end
    FROM coverage_spans
    WINDOW by_seq AS (PARTITION BY machine_id, boot_id ORDER BY seq_start)
), seq_rows AS (
    SELECT machine_id, boot_id, seq_start, seq_end, kind, reason, ts_start, ts_end
    FROM spans
    UNION ALL
    SELECT machine_id, boot_id, prev_seq_end + 1, seq_start - 1, 'GAP',
           'unreported', prev_ts_end, ts_start
    FROM spans
    WHERE seq_start > prev_seq_end + 1
), ordered AS (
    SELECT *,
           lead(ts_start) OVER by_time AS next_ts,
           lead(boot_id) OVER by_time AS next_boot
    FROM seq_rows
    WINDOW by_time AS (PARTITION BY machine_id ORDER BY ts_start, seq_start)
), tiled AS (
    SELECT machine_id, boot_id, seq_start, seq_end, kind, reason, ts_start, ts_end,
           CASE
               WHEN next_ts IS NULL THEN ts_end
               WHEN next_boot <> boot_id THEN least(ts_end, next_ts)
               ELSE greatest(next_ts, ts_start)
           END AS until
    FROM ordered
    UNION ALL
    SELECT machine_id, boot_id, NULL::bigint, NULL::bigint, 'UNSEEN',
           'agent_not_running', ts_end, next_ts, next_ts
    FROM ordered
    WHERE next_boot <> boot_id AND next_ts > ts_end
)
SELECT machine_id, boot_id, seq_start, seq_end, kind, reason, ts_start, ts_end,
       until,
       coalesce(greatest(extract(epoch FROM until - ts_start), 0), 0)::double precision
           AS seconds
FROM tiled
"""


#: Spans for readings stored before the ledger existed. Whether they came
#: live or from a journal was not recorded, so they count as LIVE; a cycle
#: with the serial link down (errors.serial = link_down) counts as LOST.
_LEDGER_FROM_EXISTING_READINGS = """
INSERT INTO coverage_spans
    (machine_id, boot_id, seq_start, seq_end, kind, reason, ts_start, ts_end)
SELECT machine_id, boot_id, min(seq), max(seq), kind, reason, min(ts), max(ts)
FROM (
    SELECT machine_id, boot_id, seq, ts, kind, reason,
           seq - row_number() OVER (
               PARTITION BY machine_id, boot_id, kind, reason ORDER BY seq
           ) AS island
    FROM (
        SELECT machine_id, boot_id, seq, ts,
               CASE WHEN errors->>'serial' = 'link_down' THEN 'LOST'
                    ELSE 'LIVE' END AS kind,
               CASE WHEN errors->>'serial' = 'link_down' THEN 'link_down'
                    ELSE '' END AS reason
        FROM readings
    ) classified
) numbered
GROUP BY machine_id, boot_id, kind, reason, island
"""


def _add_coverage_ledger(cur: Cursor) -> None:
    cur.execute(
        """
        ALTER TABLE readings
            ADD COLUMN delivery text NOT NULL DEFAULT 'live',
            ADD COLUMN condition text NOT NULL DEFAULT 'ok',
            ADD COLUMN host_boot text NOT NULL DEFAULT '',
            ADD COLUMN mono double precision,
            ADD COLUMN clock_synced boolean NOT NULL DEFAULT true,
            ADD COLUMN ctrl_ts timestamptz,
            ADD COLUMN event_ts timestamptz,
            ADD COLUMN reanchored boolean NOT NULL DEFAULT false
        """
    )
    cur.execute("UPDATE readings SET event_ts = ts")
    cur.execute(
        "CREATE INDEX readings_unanchored ON readings (machine_id, host_boot) "
        "WHERE NOT clock_synced AND NOT reanchored"
    )
    cur.execute(
        """
        CREATE TABLE readings_reduced (
            machine_id text NOT NULL,
            boot_id text NOT NULL,
            seq_start bigint NOT NULL,
            seq_end bigint NOT NULL,
            count int NOT NULL,
            ts_start timestamptz NOT NULL,
            ts_end timestamptz NOT NULL,
            stats jsonb NOT NULL,
            last jsonb NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (machine_id, boot_id, seq_start)
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE coverage_spans (
            machine_id text NOT NULL,
            boot_id text NOT NULL,
            seq_start bigint NOT NULL,
            seq_end bigint NOT NULL CHECK (seq_end >= seq_start),
            kind text NOT NULL CHECK (kind IN
                ('LIVE', 'BACKFILLED', 'BACKFILLED_REDUCED', 'LOST')),
            reason text NOT NULL DEFAULT '',
            ts_start timestamptz,
            ts_end timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (machine_id, boot_id, seq_start)
        )
        """
    )
    cur.execute(
        "CREATE INDEX coverage_spans_machine_ts ON coverage_spans (machine_id, ts_start)"
    )
    cur.execute(
        """
        CREATE TABLE loss_reports (
            id bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL DEFAULT now(),
            machine_id text NOT NULL,
            boot_id text NOT NULL,
            seq_start bigint NOT NULL,
            seq_end bigint NOT NULL,
            reason text NOT NULL,
            ts_start timestamptz,
            ts_end timestamptz,
            detail text NOT NULL,
            UNIQUE (machine_id, boot_id, seq_start, seq_end, reason)
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE clock_anchors (
            machine_id text NOT NULL,
            host_boot text NOT NULL,
            offset_s double precision NOT NULL,
            anchored_at timestamptz NOT NULL,
            PRIMARY KEY (machine_id, host_boot)
        )
        """
    )
    cur.execute(
        """
        CREATE TABLE clock_reanchors (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            machine_id text NOT NULL,
            host_boot text NOT NULL,
            offset_s double precision NOT NULL,
            readings bigint NOT NULL
        )
        """
    )
    cur.execute(_COVERAGE_VIEW)
    cur.execute(_LEDGER_FROM_EXISTING_READINGS)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create readings and dead_letters", _create_readings),
    Migration(2, "add the coverage ledger", _add_coverage_ledger),
)


def migrate(conn: Connection) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied.

    The connection must not be in autocommit mode. psycopg2.OperationalError
    and InterfaceError pass through unchanged so that the caller can
    reconnect; any other database error becomes MigrationError.
    """
    # PostgreSQL checks the CREATE privilege even for CREATE TABLE IF NOT
    # EXISTS on an existing table, so a role allowed only to write rows (see
    # config/postgres/roles.sql) must not reach that statement.
    try:
        current = current_version(conn)
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as exc:
        # For example no SELECT on schema_migrations (grants.sql not run).
        raise MigrationError(0, "read the schema version", exc) from exc
    if current >= MIGRATIONS[-1].version:
        return []
    applied = []
    for migration in MIGRATIONS:
        if _apply_one(conn, migration):
            applied.append(migration.version)
    return applied


def _apply_one(conn: Connection, migration: Migration) -> bool:
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            cur.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version int PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            cur.execute(
                "SELECT 1 FROM schema_migrations WHERE version = %s",
                (migration.version,),
            )
            if cur.fetchone() is not None:
                return False
            migration.apply(cur)
            cur.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as exc:
        raise MigrationError(migration.version, migration.name, exc) from exc
    log.info("migrate: applied version %d (%s)", migration.version, migration.name)
    return True


def current_version(conn: Connection) -> int:
    """Return the highest recorded migration version, 0 for an empty database."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = cur.fetchone()
        if not row or not row[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = cur.fetchone()
        return int(row[0]) if row else 0
