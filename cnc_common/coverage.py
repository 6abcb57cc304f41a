"""Messages and span arithmetic of the coverage ledger (docs/COVERAGE.md).

The edge builds loss reports and reduced records with the functions here.
The backend validates them with the same module, then merges the spans of
sequence numbers they describe into its ledger.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from cnc_common.errors import InvalidReading
from cnc_common.reading import MACHINE_ID_PATTERN, SCHEMA_VERSION

_BOOT_PATTERN = re.compile(r"^[0-9a-f]{32}$")

#: Suffix of the subject for control messages: ``<prefix>.<machine>.control``.
CONTROL_TOKEN = "control"

#: NATS header naming how a message reached the broker.
DELIVERY_HEADER = "Cnc-Delivery"
LIVE = "live"
BACKFILL = "backfill"
BACKFILL_REDUCED = "backfill-reduced"
DELIVERIES = (LIVE, BACKFILL, BACKFILL_REDUCED)

#: Highest sequence number a report or record may name: a boot polling
#: 1000 times a second reaches 2**40 after about 35 years.
MAX_SEQ = 2**40

#: Reasons a loss report may give.
LOSS_REASONS = ("journal_cap", "disk_full", "agent_down", "corrupt_journal_line")

#: Reading conditions (see cnc_edge.poller) and the ones that mean no data.
CONDITIONS = ("ok", "controller_busy", "controller_off", "link_down")
BLIND_CONDITIONS = ("controller_off", "link_down")

#: Span kinds in the ledger.
KIND_LIVE = "LIVE"
KIND_BACKFILLED = "BACKFILLED"
KIND_REDUCED = "BACKFILLED_REDUCED"
KIND_LOST = "LOST"
KINDS = (KIND_LIVE, KIND_BACKFILLED, KIND_REDUCED, KIND_LOST)


def control_subject(prefix: str, machine: str) -> str:
    return f"{prefix}.{machine}.{CONTROL_TOKEN}"


def loss_report(
    *,
    machine: str,
    boot: str,
    seq_start: int,
    seq_end: int,
    reason: str,
    ts_start: str | None = None,
    ts_end: str | None = None,
    detail: str = "",
) -> dict[str, Any]:
    """Build a loss report; raise ValueError for an unknown reason or range."""
    if reason not in LOSS_REASONS:
        raise ValueError(f"unknown loss reason {reason!r}")
    if not 0 <= seq_start <= seq_end:
        raise ValueError(f"invalid range {seq_start}..{seq_end}")
    return {
        "v": SCHEMA_VERSION,
        "type": "loss",
        "machine": machine,
        "boot": boot,
        "seq_start": seq_start,
        "seq_end": seq_end,
        "reason": reason,
        "ts_start": ts_start,
        "ts_end": ts_end,
        "detail": detail,
    }


def loss_msg_id(report: dict[str, Any]) -> str:
    return (
        f"loss-{report['boot']}-{report['seq_start']}-{report['seq_end']}"
        f"-{report['reason']}"
    )


def reduced_msg_id(record: dict[str, Any]) -> str:
    return f"reduced-{record['boot']}-{record['seq_start']}-{record['seq_end']}"


def validate_loss(data: dict[str, Any]) -> dict[str, Any]:
    """Check a decoded loss report and return it; raise InvalidReading."""
    _check_common(data)
    if data.get("reason") not in LOSS_REASONS:
        raise InvalidReading("schema", f"unknown loss reason {data.get('reason')!r}")
    for key in ("ts_start", "ts_end"):
        if data.get(key) is not None:
            _check_ts(data, key)
    _check_order(data)
    if not isinstance(data.get("detail", ""), str):
        raise InvalidReading("schema", "detail must be str")
    return data


def validate_reduced(data: dict[str, Any]) -> dict[str, Any]:
    """Check a decoded reduced record and return it; raise InvalidReading."""
    _check_common(data)
    count = data.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidReading("schema", f"count must be a positive int, got {count!r}")
    if count > data["seq_end"] - data["seq_start"] + 1:
        raise InvalidReading("schema", f"count {count} exceeds the sequence range")
    _check_ts(data, "ts_start")
    _check_ts(data, "ts_end")
    _check_order(data)
    for key in ("stats", "last"):
        if not isinstance(data.get(key, {}), dict):
            raise InvalidReading("schema", f"{key} must be an object")
    return data


def _check_common(data: dict[str, Any]) -> None:
    if data.get("v") != SCHEMA_VERSION:
        raise InvalidReading("schema", f"unsupported version {data.get('v')!r}")
    machine = data.get("machine")
    if not isinstance(machine, str) or not MACHINE_ID_PATTERN.match(machine):
        raise InvalidReading("schema", f"invalid machine id {machine!r}")
    boot = data.get("boot")
    if not isinstance(boot, str) or not _BOOT_PATTERN.match(boot):
        raise InvalidReading("schema", f"boot must be 32 hex digits, got {boot!r}")
    start, end = data.get("seq_start"), data.get("seq_end")
    for value in (start, end):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidReading(
                "schema", f"seq bounds must be ints >= 0, got {value!r}"
            )
    assert isinstance(start, int) and isinstance(end, int)
    if start > end:
        raise InvalidReading("schema", f"seq_start {start} is after seq_end {end}")
    if end > MAX_SEQ:
        raise InvalidReading("schema", f"seq_end {end} is above {MAX_SEQ}")


def _check_order(data: dict[str, Any]) -> None:
    start, end = data.get("ts_start"), data.get("ts_end")
    if start and end and datetime.fromisoformat(end) < datetime.fromisoformat(start):
        raise InvalidReading("schema", f"ts_end {end} is before ts_start {start}")


def _check_ts(data: dict[str, Any], key: str) -> None:
    value = data.get(key)
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidReading("schema", f"{key} must be an ISO 8601 time with a zone")


# ---------------------------------------------------------------------------
# Spans


@dataclass(frozen=True)
class Span:
    """A contiguous run ``start..end`` of one boot's sequence numbers."""

    start: int
    end: int
    kind: str
    reason: str = ""
    ts_start: datetime | None = None
    ts_end: datetime | None = None

    @property
    def readings(self) -> int:
        return self.end - self.start + 1

    def same_class(self, other: Span) -> bool:
        return self.kind == other.kind and self.reason == other.reason


def runs(items: Iterable[tuple[int, str, str, datetime | None]]) -> list[Span]:
    """Group ``(seq, kind, reason, ts)`` items into maximal spans.

    Consecutive sequence numbers of the same kind and reason form one span.
    """
    spans: list[Span] = []
    for seq, kind, reason, ts in sorted(items, key=lambda item: item[0]):
        last = spans[-1] if spans else None
        if (
            last is not None
            and seq == last.end + 1
            and last.kind == kind
            and last.reason == reason
        ):
            spans[-1] = replace(last, end=seq, ts_end=_later(last.ts_end, ts))
        elif last is not None and seq <= last.end:
            continue  # the same sequence number twice: keep the first
        else:
            spans.append(Span(seq, seq, kind, reason, ts, ts))
    return spans


def is_report(span: Span) -> bool:
    """Return whether ``span`` comes from a loss report, not from readings."""
    return span.kind == KIND_LOST and span.reason in LOSS_REASONS


def merge(existing: list[Span], new: Span) -> list[Span]:
    """Return ``existing`` with ``new`` merged in, sorted and non-overlapping.

    Data beats a loss report: a span of stored readings (any kind, also LOST
    for readings taken with the link down or the controller off) replaces
    the part of a reported LOST span it overlaps. A reported span only fills
    sequence numbers that no span covers yet. Neighbours of the same kind and
    reason that touch are joined into one span.
    """
    if is_report(new):
        pieces = _subtract(new, existing)
        result = list(existing)
    else:
        pieces = [new]
        result = []
        for span in existing:
            if span.end < new.start or span.start > new.end:
                result.append(span)
            elif is_report(span):
                result.extend(_subtract(span, [new]))
            else:
                # Two data spans never overlap: each reading is stored once.
                # Keep the stored one for the sequence numbers they share.
                result.append(span)
                pieces = [p for piece in pieces for p in _subtract(piece, [span])]
    result.extend(pieces)
    return _join(sorted(result, key=lambda span: span.start))


def _subtract(span: Span, others: list[Span]) -> list[Span]:
    """Return the parts of ``span`` that none of ``others`` covers."""
    pieces = [span]
    for other in others:
        next_pieces = []
        for piece in pieces:
            if other.end < piece.start or other.start > piece.end:
                next_pieces.append(piece)
                continue
            if piece.start < other.start:
                next_pieces.append(replace(piece, end=other.start - 1))
            if piece.end > other.end:
                next_pieces.append(replace(piece, start=other.end + 1))
        pieces = next_pieces
    return pieces


def _join(spans: list[Span]) -> list[Span]:
    joined: list[Span] = []
    for span in spans:
        last = joined[-1] if joined else None
        if last is not None and last.end + 1 == span.start and last.same_class(span):
            joined[-1] = replace(
                last,
                end=span.end,
                ts_start=_earlier(last.ts_start, span.ts_start),
                ts_end=_later(last.ts_end, span.ts_end),
            )
        else:
            joined.append(span)
    return joined


def _earlier(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)
