"""Span arithmetic and message checks of the coverage ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnc_common.coverage import (
    KIND_BACKFILLED,
    KIND_LIVE,
    KIND_LOST,
    Span,
    loss_report,
    merge,
    runs,
    validate_loss,
    validate_reduced,
)
from cnc_common.errors import InvalidReading

T0 = datetime(2026, 12, 4, tzinfo=UTC)
BOOT = "0" * 32


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def shape(spans: list[Span]) -> list[tuple[int, int, str, str]]:
    return [(s.start, s.end, s.kind, s.reason) for s in spans]


def test_runs_split_on_gaps_and_kind_changes() -> None:
    items = [(seq, KIND_LIVE, "", at(seq)) for seq in (0, 1, 2, 5, 6)]
    items += [(3, KIND_BACKFILLED, "", at(3))]
    assert shape(runs(items)) == [
        (0, 2, KIND_LIVE, ""),
        (3, 3, KIND_BACKFILLED, ""),
        (5, 6, KIND_LIVE, ""),
    ]
    assert runs(items)[0].ts_end == at(2)


def test_late_backfill_fills_a_gap_and_joins_neighbours() -> None:
    spans = [Span(0, 9, KIND_LIVE), Span(20, 29, KIND_LIVE)]
    spans = merge(spans, Span(10, 14, KIND_BACKFILLED))
    spans = merge(spans, Span(15, 19, KIND_BACKFILLED))
    assert shape(spans) == [
        (0, 9, KIND_LIVE, ""),
        (10, 19, KIND_BACKFILLED, ""),
        (20, 29, KIND_LIVE, ""),
    ]


def test_loss_fills_only_what_nobody_covers() -> None:
    spans = [Span(0, 9, KIND_LIVE), Span(20, 29, KIND_LIVE)]
    spans = merge(spans, Span(0, 40, KIND_LOST, "agent_down"))
    assert shape(spans) == [
        (0, 9, KIND_LIVE, ""),
        (10, 19, KIND_LOST, "agent_down"),
        (20, 29, KIND_LIVE, ""),
        (30, 40, KIND_LOST, "agent_down"),
    ]
    # Applying the same report again changes nothing.
    assert merge(spans, Span(0, 40, KIND_LOST, "agent_down")) == spans


def test_readings_arriving_after_a_loss_report_win() -> None:
    spans = merge([], Span(10, 19, KIND_LOST, "agent_down"))
    spans = merge(spans, Span(12, 13, KIND_BACKFILLED))
    assert shape(spans) == [
        (10, 11, KIND_LOST, "agent_down"),
        (12, 13, KIND_BACKFILLED, ""),
        (14, 19, KIND_LOST, "agent_down"),
    ]


def test_blind_readings_beat_a_loss_report() -> None:
    spans = merge([], Span(0, 10, KIND_LOST, "agent_down"))
    spans = merge(spans, Span(8, 8, KIND_LOST, "controller_off"))
    spans = merge(spans, Span(9, 9, KIND_LOST, "link_down"))
    assert shape(spans) == [
        (0, 7, KIND_LOST, "agent_down"),
        (8, 8, KIND_LOST, "controller_off"),
        (9, 9, KIND_LOST, "link_down"),
        (10, 10, KIND_LOST, "agent_down"),
    ]


CLASSES = [
    (KIND_LIVE, ""),
    (KIND_BACKFILLED, ""),
    (KIND_LOST, "link_down"),
    (KIND_LOST, "journal_cap"),
]


@given(
    st.lists(
        st.tuples(st.integers(0, 60), st.integers(0, 8), st.sampled_from(CLASSES)),
        max_size=25,
    )
)
def test_merge_keeps_spans_disjoint_and_data_over_loss(ops) -> None:
    spans: list[Span] = []
    data: set[int] = set()
    lost: set[int] = set()
    for start, length, (kind, reason) in ops:
        span = Span(start, start + length, kind, reason)
        seqs = set(range(span.start, span.end + 1))
        if reason == "journal_cap":
            lost |= seqs
        else:
            data |= seqs
        spans = merge(spans, span)
    covered: list[int] = []
    for span in spans:
        covered.extend(range(span.start, span.end + 1))
    assert len(covered) == len(set(covered)), "spans overlap"
    assert sorted(covered) == covered
    assert set(covered) == data | lost
    reported = {
        seq
        for s in spans
        if s.reason == "journal_cap"
        for seq in range(s.start, s.end + 1)
    }
    assert reported == lost - data
    for left, right in zip(spans, spans[1:], strict=False):
        touching = left.end + 1 == right.start
        assert not (touching and left.same_class(right)), (left, right)


def test_loss_report_round_trip_and_errors() -> None:
    report = loss_report(
        machine="m1", boot=BOOT, seq_start=3, seq_end=7, reason="journal_cap"
    )
    assert validate_loss(report) is report
    with pytest.raises(ValueError, match="unknown loss reason 'meteor'"):
        loss_report(machine="m1", boot=BOOT, seq_start=3, seq_end=7, reason="meteor")
    with pytest.raises(InvalidReading, match="seq_start 7 is after seq_end 3"):
        validate_loss({**report, "seq_start": 7, "seq_end": 3})
    with pytest.raises(InvalidReading, match="boot must be 32 hex digits"):
        validate_loss({**report, "boot": "z" * 32})
    with pytest.raises(InvalidReading, match="ts_end .* is before ts_start"):
        validate_loss(
            {
                **report,
                "ts_start": "2026-12-04T12:00:00Z",
                "ts_end": "2026-12-04T11:00:00Z",
            }
        )
    with pytest.raises(InvalidReading, match="seq_end 1000000000000000 is above"):
        validate_loss({**report, "seq_end": 10**15})


def test_reduced_record_checks_count_against_range() -> None:
    record = {
        "v": 1,
        "type": "reduced",
        "machine": "m1",
        "boot": BOOT,
        "seq_start": 10,
        "seq_end": 12,
        "count": 3,
        "ts_start": "2026-12-04T00:00:00Z",
        "ts_end": "2026-12-04T00:00:02Z",
        "stats": {},
        "last": {},
    }
    assert validate_reduced(record) is record
    with pytest.raises(InvalidReading, match="count 4 exceeds"):
        validate_reduced({**record, "count": 4})
