"""The coverage ledger: spans of each boot's sequence numbers, by kind.

Every batch updates the ledger in the transaction that stores its rows, so
the ledger and the tables it describes never disagree. Only rows that the
batch actually inserted add spans: a redelivered reading is already in the
ledger. Spans of one boot are changed under a transaction-level advisory
lock on that boot, so that several backends merge spans one at a time.

Time is re-anchored here too. A reading recorded while the host clock was
not synchronised gets ``event_ts`` = its monotonic time plus the offset
between wall and monotonic clock taken from a synchronised reading of the
same host boot, so that a clock that jumped during an outage does not
reorder the readings. Each re-anchoring is recorded in ``clock_reanchors``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import execute_values

from cnc_common.coverage import (
    BACKFILL,
    BLIND_CONDITIONS,
    KIND_BACKFILLED,
    KIND_LIVE,
    KIND_LOST,
    Span,
    merge,
    runs,
)

log = logging.getLogger(__name__)

#: Namespace of the advisory locks on one boot's spans ("cncl" in ASCII).
LEDGER_LOCK_NAMESPACE = 0x636E636C

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Summary key for time in a requested window that no row accounts for.
NO_DATA = "NO_DATA"

#: Seconds by which the wall-minus-monotonic offset of a host boot must move
#: before the stored anchor is updated. Slewing by NTP moves it slowly; a
#: step of the clock moves it at once.
ANCHOR_TOLERANCE = 0.05


@dataclass(frozen=True)
class Inserted:
    """A reading the batch inserted, as the ledger needs it."""

    machine_id: str
    boot_id: str
    seq: int
    event_ts: datetime
    delivery: str
    condition: str
    host_boot: str = ""
    reanchored: bool = False


def span_class(delivery: str, condition: str) -> tuple[str, str]:
    """Return the (kind, reason) of a stored reading."""
    if condition in BLIND_CONDITIONS:
        return KIND_LOST, condition
    kind = KIND_BACKFILLED if delivery.startswith(BACKFILL) else KIND_LIVE
    return kind, "controller_busy" if condition == "controller_busy" else ""


def update(
    cur: Cursor,
    readings: Iterable[Inserted],
    reduced: Iterable[tuple[str, str, Span]] = (),
    losses: Iterable[tuple[str, str, Span]] = (),
) -> set[str]:
    """Merge new spans into ``coverage_spans``.

    Return the machines whose LOST spans changed.
    """
    by_boot: dict[tuple[str, str], list[Span]] = defaultdict(list)
    items: dict[tuple[str, str], list[tuple[int, str, str, datetime | None]]] = (
        defaultdict(list)
    )
    for row in readings:
        kind, reason = span_class(row.delivery, row.condition)
        items[(row.machine_id, row.boot_id)].append(
            (row.seq, kind, reason, row.event_ts)
        )
    for key, group in items.items():
        by_boot[key].extend(runs(group))
    for machine, boot, span in reduced:
        by_boot[(machine, boot)].append(span)
    for machine, boot, span in losses:
        by_boot[(machine, boot)].append(span)
    # Lock in a fixed order, so that two backends cannot deadlock.
    changed = set()
    for machine, boot in sorted(by_boot):
        if _merge_boot(cur, machine, boot, by_boot[(machine, boot)]):
            changed.add(machine)
    return changed


def _merge_boot(cur: Cursor, machine: str, boot: str, new: list[Span]) -> bool:
    """Merge ``new`` into one boot's spans; return whether LOST spans changed."""
    cur.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
        (LEDGER_LOCK_NAMESPACE, f"{machine}/{boot}"),
    )
    low = min(span.start for span in new) - 1
    high = max(span.end for span in new) + 1
    cur.execute(
        """
        SELECT seq_start, seq_end, kind, reason, ts_start, ts_end
        FROM coverage_spans
        WHERE machine_id = %s AND boot_id = %s AND seq_end >= %s AND seq_start <= %s
        ORDER BY seq_start
        """,
        (machine, boot, low, high),
    )
    old = [Span(*row) for row in cur.fetchall()]

    spans = list(old)
    # Data first: a loss report in the same batch fills only what is left.
    for span in sorted(new, key=lambda span: span.kind == KIND_LOST):
        spans = merge(spans, span)
    spans = _time_lost_spans(spans)
    if spans == old:
        return False

    if old:
        cur.execute(
            "DELETE FROM coverage_spans WHERE machine_id = %s AND boot_id = %s "
            "AND seq_start = ANY(%s)",
            (machine, boot, [span.start for span in old]),
        )
    execute_values(
        cur,
        "INSERT INTO coverage_spans (machine_id, boot_id, seq_start, seq_end, "
        "kind, reason, ts_start, ts_end) VALUES %s",
        [
            (machine, boot, s.start, s.end, s.kind, s.reason, s.ts_start, s.ts_end)
            for s in spans
        ],
    )
    lost_before = [span for span in old if span.kind == KIND_LOST]
    lost_after = [span for span in spans if span.kind == KIND_LOST]
    for span in lost_after:
        if span not in old:
            log.info(
                "ledger: %s boot %s readings %d..%d LOST (%s)",
                machine,
                boot,
                span.start,
                span.end,
                span.reason,
            )
    return lost_before != lost_after


def _time_lost_spans(spans: list[Span]) -> list[Span]:
    """Give a LOST span the time from the reading before it to the one after.

    A loss report may not contain the times of the readings it covers. A
    LOST span trimmed by late readings still has the report's times, so the
    stored readings next to it give the better bounds.
    """
    result = list(spans)
    for index, span in enumerate(result):
        if span.kind != KIND_LOST:
            continue
        ts_start, ts_end = span.ts_start, span.ts_end
        if index > 0 and result[index - 1].end + 1 == span.start:
            ts_start = result[index - 1].ts_end or ts_start
        if index + 1 < len(result) and span.end + 1 == result[index + 1].start:
            ts_end = result[index + 1].ts_start or ts_end
        if ts_start is None:
            ts_start = ts_end
        if ts_end is None:
            ts_end = ts_start
        if (ts_start, ts_end) != (span.ts_start, span.ts_end):
            result[index] = Span(
                span.start, span.end, span.kind, span.reason, ts_start, ts_end
            )
    return result


# ---------------------------------------------------------------------------
# Time


class Anchors:
    """Offsets between wall clock and monotonic clock, per machine and host boot.

    The offsets live in ``clock_anchors``; this object caches them for the
    worker thread that writes batches. A host boot without an anchor is
    cached as such for NO_ANCHOR_TTL seconds. So a host whose clock is never
    synchronised costs no query per batch, and an anchor that another
    backend process stores is still found soon after.
    """

    NO_ANCHOR_TTL = 30.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cache: dict[tuple[str, str], float] = {}
        self._absent: dict[tuple[str, str], float] = {}
        self._clock = clock

    def forget(self) -> None:
        """Drop the cache, for example after a reconnect."""
        self._cache.clear()
        self._absent.clear()

    def lookup(self, cur: Cursor, keys: set[tuple[str, str]]) -> dict[Any, float]:
        now = self._clock()
        missing = [
            key
            for key in keys
            if key not in self._cache and self._absent.get(key, -1e18) < now
        ]
        if missing:
            cur.execute(
                "SELECT machine_id, host_boot, offset_s FROM clock_anchors "
                "WHERE (machine_id, host_boot) IN %s",
                (tuple(missing),),
            )
            for machine, host_boot, offset in cur.fetchall():
                self._cache[(machine, host_boot)] = offset
            for key in missing:
                if key not in self._cache:
                    self._absent[key] = now + self.NO_ANCHOR_TTL
        return {key: self._cache[key] for key in keys if key in self._cache}

    def store(
        self, cur: Cursor, fresh: dict[tuple[str, str], tuple[float, datetime]]
    ) -> None:
        """Record the newest offsets seen in a batch.

        An offset within ANCHOR_TOLERANCE of the cached one is not written
        again, so that a synchronised host costs no statement per batch.
        """
        fresh = {
            key: value
            for key, value in fresh.items()
            if key not in self._cache
            or abs(self._cache[key] - value[0]) > ANCHOR_TOLERANCE
        }
        if not fresh:
            return
        execute_values(
            cur,
            """
            INSERT INTO clock_anchors (machine_id, host_boot, offset_s, anchored_at)
            VALUES %s
            ON CONFLICT (machine_id, host_boot) DO UPDATE
            SET offset_s = EXCLUDED.offset_s, anchored_at = EXCLUDED.anchored_at
            WHERE clock_anchors.anchored_at <= EXCLUDED.anchored_at
            """,
            [(m, h, offset, at) for (m, h), (offset, at) in fresh.items()],
        )
        for key, (offset, _) in fresh.items():
            self._cache[key] = offset
            self._absent.pop(key, None)


def offset_of(ts: datetime, mono: float) -> float:
    """Seconds to add to a monotonic time to get the wall time."""
    return (ts - _EPOCH).total_seconds() - mono


def anchored(mono: float, offset: float) -> datetime:
    return _EPOCH + timedelta(seconds=mono + offset)


def reanchor_stored(
    cur: Cursor, keys: Iterable[tuple[str, str]]
) -> list[tuple[tuple[str, str], int]]:
    """Re-anchor stored readings that waited for an anchor.

    Return how many readings of each (machine, host boot) were re-anchored.
    """
    done = []
    for machine, host_boot in keys:
        cur.execute(
            """
            WITH anchor AS (
                SELECT offset_s FROM clock_anchors
                WHERE machine_id = %(m)s AND host_boot = %(h)s
            )
            UPDATE readings
            SET event_ts = to_timestamp(mono + (SELECT offset_s FROM anchor)),
                reanchored = true
            WHERE machine_id = %(m)s AND host_boot = %(h)s
              AND NOT clock_synced AND NOT reanchored AND mono IS NOT NULL
              AND EXISTS (SELECT 1 FROM anchor)
            """,
            {"m": machine, "h": host_boot},
        )
        count = cur.rowcount
        if count > 0:
            record_reanchor(cur, machine, host_boot, count)
            done.append(((machine, host_boot), count))
    return done


def record_reanchor(cur: Cursor, machine: str, host_boot: str, readings: int) -> None:
    cur.execute(
        """
        INSERT INTO clock_reanchors (machine_id, host_boot, offset_s, readings)
        SELECT machine_id, host_boot, offset_s, %s FROM clock_anchors
        WHERE machine_id = %s AND host_boot = %s
        """,
        (readings, machine, host_boot),
    )
    log.info(
        "time: re-anchored %d readings of %s (host boot %s) recorded while the "
        "host clock was not synchronised",
        readings,
        machine,
        host_boot,
    )


# ---------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class CoverageRow:
    boot_id: str
    seq_start: int | None
    seq_end: int | None
    kind: str
    reason: str
    ts_start: datetime | None
    until: datetime | None
    seconds: float


def coverage(
    cur: Cursor, machine: str, since: datetime, until: datetime | None = None
) -> list[CoverageRow]:
    """Rows of the coverage view for one machine, clipped to [since, until)."""
    cur.execute(
        """
        SELECT boot_id, seq_start, seq_end, kind, reason,
               greatest(ts_start, %(since)s), least(until, %(until)s)
        FROM coverage
        WHERE machine_id = %(machine)s AND until > %(since)s
          AND ts_start < %(until)s
        ORDER BY ts_start, seq_start
        """,
        {
            "machine": machine,
            "since": since,
            "until": until or datetime(9999, 1, 1, tzinfo=UTC),
        },
    )
    rows = []
    for boot, start, end, kind, reason, ts_start, ts_until in cur.fetchall():
        seconds = max(0.0, (ts_until - ts_start).total_seconds())
        rows.append(
            CoverageRow(boot, start, end, kind, reason, ts_start, ts_until, seconds)
        )
    return rows


def summary(rows: list[CoverageRow], window: float | None = None) -> dict[str, float]:
    """Return the percentage of time per kind (LOST split by reason).

    With ``window`` (seconds), the percentages are of the window, and the
    time no row accounts for is NO_DATA: before the machine's first
    reading, or after its last one. Without it, they are of the time the
    rows account for.
    """
    seconds: dict[str, float] = defaultdict(float)
    for row in rows:
        key = f"{row.kind}:{row.reason}" if row.kind == KIND_LOST else row.kind
        seconds[key] += row.seconds
    covered = sum(seconds.values())
    if window is not None and window - covered > 0.0005:
        seconds[NO_DATA] = window - covered
    total = sum(seconds.values())
    if total <= 0:
        return {}
    return {key: 100.0 * value / total for key, value in sorted(seconds.items())}


def machines(cur: Cursor) -> list[str]:
    """Return the machines that have spans in the ledger."""
    cur.execute("SELECT DISTINCT machine_id FROM coverage_spans ORDER BY 1")
    return [row[0] for row in cur.fetchall()]


def report(
    machine: str, rows: list[CoverageRow], shares: dict[str, float]
) -> dict[str, Any]:
    """Return the coverage of one machine as a JSON-ready dict."""
    return {
        "machine": machine,
        "percent": {key: round(value, 3) for key, value in shares.items()},
        "spans": [
            {
                "boot": row.boot_id,
                "seq_start": row.seq_start,
                "seq_end": row.seq_end,
                "kind": row.kind,
                "reason": row.reason,
                "from": row.ts_start.isoformat() if row.ts_start else None,
                "until": row.until.isoformat() if row.until else None,
                "seconds": round(row.seconds, 3),
            }
            for row in rows
        ],
    }


def format_table(
    machine: str, rows: list[CoverageRow], shares: dict[str, float]
) -> str:
    """Return the coverage of one machine as a text table and a summary line."""
    if not rows:
        return f"{machine}: no coverage recorded in this period"
    lines = [
        f"{'from':<27} {'until':<27} {'kind':<18} {'reason':<22} "
        f"{'boot':<8} {'readings':>15}"
    ]
    for row in rows:
        readings = "" if row.seq_start is None else f"{row.seq_start}..{row.seq_end}"
        lines.append(
            f"{_iso(row.ts_start):<27} {_iso(row.until):<27} {row.kind:<18} "
            f"{row.reason or '-':<22} {row.boot_id[:8]:<8} {readings:>15}"
        )
    lines.append(
        f"{machine}: "
        + ", ".join(f"{key} {value:.2f}%" for key, value in shares.items())
    )
    return "\n".join(lines)


def _iso(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def lost_seconds(cur: Cursor, machines: list[str] | None = None) -> dict[str, float]:
    """Seconds of LOST coverage recorded per machine (all, or ``machines``)."""
    if machines is None:
        cur.execute(
            "SELECT machine_id, coalesce(sum(seconds), 0) FROM coverage "
            "WHERE kind = 'LOST' GROUP BY machine_id"
        )
        return {machine: float(value) for machine, value in cur.fetchall()}
    cur.execute(
        "SELECT machine_id, coalesce(sum(seconds) FILTER (WHERE kind = 'LOST'), 0) "
        "FROM coverage WHERE machine_id = ANY(%s) GROUP BY machine_id",
        (machines,),
    )
    found = {machine: float(value) for machine, value in cur.fetchall()}
    return {machine: found.get(machine, 0.0) for machine in machines}
