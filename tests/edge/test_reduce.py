"""Reduction near the journal cap: discrete events exact, continuous fields folded."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnc_common import config as cfg
from cnc_common.coverage import reduced_msg_id, validate_reduced
from cnc_common.errors import ConfigError
from cnc_common.reading import make_reading
from cnc_edge.config import EdgeConfig, JournalSection
from cnc_edge.reduce import DEFAULT_CONTINUOUS_FIELDS, Reducer, reduce_threshold

MACHINE = "haas-vf2-01"
BOOT_A = "a" * 32
BOOT_B = "b" * 32
EPOCH = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
CONTINUOUS = ["power_on_seconds", "motion_seconds", "macros.*"]


def reading(
    seq: int,
    mono: float | None = None,
    *,
    boot: str = BOOT_A,
    execution: str = "RUNNING",
    errors: dict[str, str] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Build a reading polled once a second, RUNNING in MEM mode by default."""
    mono = float(seq) if mono is None else mono
    values: dict[str, Any] = {
        "mode": "MEM",
        "program": "O00110",
        "execution": execution,
        "parts": 4,
        "power_on_seconds": 1000 + seq,
        "motion_seconds": 500 + seq,
    }
    values.update(fields)
    values = {name: value for name, value in values.items() if value is not None}
    ts = (EPOCH + timedelta(seconds=mono)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_reading(
        machine=MACHINE,
        boot=boot,
        seq=seq,
        ts=ts,
        mono=mono,
        fields=values,
        errors=errors or {},
    )


def is_record(item: dict[str, Any]) -> bool:
    return item.get("type") == "reduced"


def feed_all(reducer: Reducer, readings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = []
    for item in readings:
        output.extend(reducer.feed(item))
    output.extend(reducer.flush())
    return output


def ranges(output: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Return (kind, seq_start, seq_end) per output item, for readable asserts."""
    result = []
    for item in output:
        if is_record(item):
            result.append(("reduced", item["seq_start"], item["seq_end"]))
        else:
            result.append(("kept", item["seq"], item["seq"]))
    return result


# ---------------------------------------------------------------------------
# Kept readings and windows


def test_first_reading_of_boot_kept() -> None:
    reducer = Reducer(CONTINUOUS, 60)
    first = reading(0)
    assert reducer.feed(first) == [first]
    assert reducer.feed(reading(1)) == []
    assert reducer.pending == 1


def test_steady_run_folds_into_one_record() -> None:
    readings = [reading(seq) for seq in range(5)]
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    assert ranges(output) == [("kept", 0, 0), ("reduced", 1, 4)]
    record = output[1]
    assert validate_reduced(record) is record
    assert record["v"] == 1
    assert record["machine"] == MACHINE
    assert record["boot"] == BOOT_A
    assert record["count"] == 4
    assert record["ts_start"] == readings[1]["ts"]
    assert record["ts_end"] == readings[4]["ts"]
    assert record["mono_start"] == 1.0
    assert record["mono_end"] == 4.0
    assert record["stats"] == {
        "power_on_seconds": {"min": 1001, "max": 1004, "mean": 1002.5},
        "motion_seconds": {"min": 501, "max": 504, "mean": 502.5},
    }
    assert record["last"] == {
        "mode": "MEM",
        "program": "O00110",
        "execution": "RUNNING",
        "parts": 4,
        "status": "ok",
        "condition": "ok",
        "errors": [],
    }
    assert reduced_msg_id(record) == f"reduced-{BOOT_A}-1-4"


def test_window_closes_after_window_seconds() -> None:
    readings = [reading(seq) for seq in range(131)]
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    # Window [1, 61) contains monos 1..60, the next [61, 121) and the rest flushed.
    assert ranges(output) == [
        ("kept", 0, 0),
        ("reduced", 1, 60),
        ("reduced", 61, 120),
        ("reduced", 121, 130),
    ]
    assert [item.get("count") for item in output[1:]] == [60, 60, 10]


def test_window_closed_by_late_reading() -> None:
    reducer = Reducer(CONTINUOUS, 10)
    for seq in range(10):
        reducer.feed(reading(seq))

    output = reducer.feed(reading(10, mono=11.0))

    assert ranges(output) == [("reduced", 1, 9)]
    assert reducer.pending == 1


def test_kept_reading_interrupts_window() -> None:
    readings = [reading(seq) for seq in range(4)]
    readings.append(reading(4, execution="IDLE"))
    readings += [reading(seq, execution="IDLE") for seq in range(5, 8)]
    reducer = Reducer(CONTINUOUS, 60)
    for item in readings[:4]:
        reducer.feed(item)

    interrupted = reducer.feed(readings[4])
    assert ranges(interrupted) == [("reduced", 1, 3), ("kept", 4, 4)]
    assert interrupted[1] is readings[4]
    for item in readings[5:]:
        assert reducer.feed(item) == []
    closed = reducer.flush()
    assert ranges(closed) == [("reduced", 5, 7)]
    assert closed[0]["last"]["execution"] == "IDLE"


def test_boot_change_closes_window_and_keeps_first() -> None:
    readings = [reading(seq) for seq in range(4)]
    readings += [reading(seq, boot=BOOT_B) for seq in range(3)]
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    assert ranges(output) == [
        ("kept", 0, 0),
        ("reduced", 1, 3),
        ("kept", 0, 0),
        ("reduced", 1, 2),
    ]
    assert [item["boot"] for item in output] == [BOOT_A, BOOT_A, BOOT_B, BOOT_B]


def test_seq_gap_closes_window() -> None:
    readings = [reading(seq) for seq in (0, 1, 2, 5, 6)]
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    assert ranges(output) == [("kept", 0, 0), ("reduced", 1, 2), ("reduced", 5, 6)]
    assert [item["count"] for item in output[1:]] == [2, 2]


def test_clock_synced_change_closes_window() -> None:
    readings = [reading(seq) for seq in range(6)]
    for item in readings:
        item["host_boot"] = "5e0b"
        item["clock_synced"] = item["seq"] >= 3
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    assert ranges(output) == [("kept", 0, 0), ("reduced", 1, 2), ("reduced", 3, 5)]
    assert [item["clock_synced"] for item in output[1:]] == [False, True]
    assert [item["host_boot"] for item in output[1:]] == ["5e0b", "5e0b"]


def test_record_without_host_keys_omits_them() -> None:
    readings = [reading(0), reading(1)]
    for item in readings:
        # Readings journaled by a version without these keys.
        del item["host_boot"], item["clock_synced"]
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    assert "host_boot" not in output[1]
    assert "clock_synced" not in output[1]


def test_flush_forgets_previous_reading() -> None:
    reducer = Reducer(CONTINUOUS, 60)
    reducer.feed(reading(0))
    reducer.feed(reading(1))

    assert ranges(reducer.flush()) == [("reduced", 1, 1)]
    assert reducer.flush() == []
    assert reducer.pending == 0
    later = reading(9)
    assert reducer.feed(later) == [later]


def test_seq_not_increasing_rejected() -> None:
    reducer = Reducer(CONTINUOUS, 60)
    reducer.feed(reading(3))

    with pytest.raises(ValueError, match="fed after seq 3"):
        reducer.feed(reading(3))
    with pytest.raises(ValueError, match="fed after seq 3"):
        reducer.feed(reading(2))


# ---------------------------------------------------------------------------
# What counts as discrete


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        pytest.param({"execution": "FEED HOLD"}, True, id="execution"),
        pytest.param({"mode": "MDI"}, True, id="mode"),
        pytest.param({"program": "O00111"}, True, id="program"),
        pytest.param({"tool_in_use": 7}, True, id="tool-appears"),
        pytest.param({"parts": 5}, True, id="parts"),
        pytest.param({"parts": 4.0}, True, id="int-becomes-float"),
        pytest.param({"program": None}, True, id="field-disappears"),
        pytest.param({"errors": {"Q300": "timed out"}}, True, id="error-key"),
        pytest.param({"motion_seconds": "n/a"}, True, id="continuous-not-a-number"),
        pytest.param({"motion_seconds": 9999}, False, id="continuous-number"),
    ],
)
def test_discrete_change_keeps_reading(change: dict[str, Any], kept: bool) -> None:
    reducer = Reducer(CONTINUOUS, 60)
    reducer.feed(reading(0))
    reducer.feed(reading(1))

    changed = reading(2, **change)
    output = reducer.feed(changed)

    assert (changed in output) is kept


def test_error_message_change_alone_folds() -> None:
    reducer = Reducer(CONTINUOUS, 60)
    reducer.feed(reading(0, errors={"Q300": "timed out"}))

    assert reducer.feed(reading(1, errors={"Q300": "garbled answer"})) == []


def test_condition_change_keeps_reading() -> None:
    reducer = Reducer(CONTINUOUS, 60)
    first = reading(0)
    first["condition"] = "ok"
    reducer.feed(first)
    busy = reading(1)
    busy["condition"] = "controller_busy"

    assert reducer.feed(busy) == [busy]
    again = reading(2)
    again["condition"] = "controller_busy"
    assert reducer.feed(again) == []
    assert reducer.flush()[0]["last"]["condition"] == "controller_busy"


def test_macros_named_with_variable_number() -> None:
    readings = [
        reading(seq, macros={"5041": 1.5 * seq, "5042": -float(seq)})
        for seq in range(4)
    ]
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    stats = output[1]["stats"]
    assert stats["macros.5041"] == {"min": 1.5, "max": 4.5, "mean": 3.0}
    assert stats["macros.5042"] == {"min": -3.0, "max": -1.0, "mean": -2.0}


def test_unlisted_macro_is_discrete() -> None:
    reducer = Reducer(["power_on_seconds", "motion_seconds", "macros.5041"], 60)
    reducer.feed(reading(0, macros={"5041": 1.0, "5042": 7.0}))

    assert reducer.feed(reading(1, macros={"5041": 2.0, "5042": 7.0})) == []
    moved = reading(2, macros={"5041": 3.0, "5042": 8.0})
    output = reducer.feed(moved)
    assert ranges(output) == [("reduced", 1, 1), ("kept", 2, 2)]
    assert output[0]["last"]["macros.5042"] == 7.0
    assert output[0]["stats"]["macros.5041"] == {"min": 2.0, "max": 2.0, "mean": 2.0}
    assert "macros.5042" not in output[0]["stats"]


def test_stats_skip_readings_without_field() -> None:
    readings = [reading(0), reading(1), reading(2, motion_seconds=None), reading(3)]
    # motion_seconds vanishes without a discrete change: it is continuous.
    output = feed_all(Reducer(CONTINUOUS, 60), readings)

    assert ranges(output) == [("kept", 0, 0), ("reduced", 1, 3)]
    assert output[1]["stats"]["motion_seconds"] == {
        "min": 501,
        "max": 503,
        "mean": 502.0,
    }


# ---------------------------------------------------------------------------
# Property: discrete values survive exactly, sequence numbers are partitioned

DISCRETE_CHOICES = {
    "execution": ["IDLE", "RUNNING", "FEED HOLD"],
    "mode": ["MEM", "MDI"],
    "program": ["O00110", "O00111"],
    "tool_in_use": [1, 2],
    "parts": [4, 5],
}


@st.composite
def reading_streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Draw readings of one or two boots with random discrete changes."""
    count = draw(st.integers(min_value=1, max_value=120))
    boots = [BOOT_A, BOOT_B]
    boot_index, seq, mono = 0, 0, 0.0
    discrete = {name: choices[0] for name, choices in DISCRETE_CHOICES.items()}
    errors: dict[str, str] = {}
    readings = []
    for _ in range(count):
        if draw(st.integers(0, 39)) == 0 and boot_index == 0:
            boot_index, seq = 1, 0
        elif draw(st.integers(0, 19)) == 0:
            seq += draw(st.integers(1, 3))  # readings dropped before the reducer
        if draw(st.integers(0, 4)) == 0:
            name = draw(st.sampled_from(sorted(DISCRETE_CHOICES)))
            discrete[name] = draw(st.sampled_from(DISCRETE_CHOICES[name]))
        if draw(st.integers(0, 9)) == 0:
            errors = draw(st.sampled_from([{}, {"Q303": "timed out"}]))
        mono += draw(st.sampled_from([0.5, 1.0, 1.0, 7.0, 25.0]))
        fields: dict[str, Any] = dict(discrete)
        fields["power_on_seconds"] = draw(st.integers(0, 10**7))
        # A timer that cannot be parsed as a number is a discrete value.
        not_a_number = draw(st.integers(0, 9)) == 0
        fields["motion_seconds"] = (
            "n/a" if not_a_number else draw(st.integers(0, 10**6))
        )
        fields["macros"] = {"5041": draw(st.floats(-1e4, 1e4, allow_nan=False))}
        item = reading(seq, mono, boot=boots[boot_index], errors=dict(errors), **fields)
        readings.append(item)
        seq += 1
    return readings


def discrete_values(item: dict[str, Any]) -> dict[str, Any]:
    """Return the discrete values of a generated reading, as the contract defines."""
    values: dict[str, Any] = {}
    for name, value in item["fields"].items():
        if name == "macros":
            continue  # every macro is continuous and always a number here
        if name in ("power_on_seconds", "motion_seconds") and value != "n/a":
            continue
        values[name] = value
    values["status"] = item["status"]
    values["condition"] = item["condition"]
    values["errors"] = sorted(item["errors"])
    return values


def expand(output: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """Return (boot, seq, discrete values) for each sequence number covered."""
    covered = []
    for item in output:
        if is_record(item):
            for seq in range(item["seq_start"], item["seq_end"] + 1):
                covered.append((item["boot"], seq, item["last"]))
        else:
            covered.append((item["boot"], item["seq"], discrete_values(item)))
    return covered


@settings(max_examples=150, deadline=None)
@given(readings=reading_streams(), window=st.sampled_from([1.0, 10.0, 60.0]))
def test_discrete_values_survive_exactly(
    readings: list[dict[str, Any]], window: float
) -> None:
    output = feed_all(Reducer(CONTINUOUS, window), readings)

    expected = [(r["boot"], r["seq"], discrete_values(r)) for r in readings]
    assert expand(output) == expected


@settings(max_examples=150, deadline=None)
@given(readings=reading_streams(), window=st.sampled_from([1.0, 10.0, 60.0]))
def test_records_match_their_readings(
    readings: list[dict[str, Any]], window: float
) -> None:
    output = feed_all(Reducer(CONTINUOUS, window), readings)
    by_id = {(r["boot"], r["seq"]): r for r in readings}
    kept = [item for item in output if not is_record(item)]

    assert all(item in readings for item in kept)
    for record in (item for item in output if is_record(item)):
        validate_reduced(record)
        seqs = range(record["seq_start"], record["seq_end"] + 1)
        covered = [by_id[(record["boot"], seq)] for seq in seqs]
        assert record["count"] == len(covered)
        assert record["mono_end"] - record["mono_start"] < window
        assert record["ts_start"] == covered[0]["ts"]
        assert record["ts_end"] == covered[-1]["ts"]
        assert all(discrete_values(r) == record["last"] for r in covered)
        check_stats(record["stats"], covered)


def check_stats(stats: dict[str, Any], covered: list[dict[str, Any]]) -> None:
    columns: dict[str, list[float]] = {}
    for item in covered:
        fields = item["fields"]
        columns.setdefault("macros.5041", []).append(fields["macros"]["5041"])
        columns.setdefault("power_on_seconds", []).append(fields["power_on_seconds"])
        if fields["motion_seconds"] != "n/a":
            columns.setdefault("motion_seconds", []).append(fields["motion_seconds"])

    assert sorted(stats) == sorted(columns)
    for name, values in columns.items():
        assert stats[name]["min"] == min(values), name
        assert stats[name]["max"] == max(values), name
        assert stats[name]["mean"] == pytest.approx(statistics.fmean(values)), name


# ---------------------------------------------------------------------------
# Arguments and config


def test_reduce_threshold_off_without_cap() -> None:
    assert reduce_threshold(0, 0.8) is None
    assert reduce_threshold(1000, 0.8) == 800
    assert reduce_threshold(1000, 1.0) == 1000


@pytest.mark.parametrize("pattern", ["", "macros.*.x", "*", "motion seconds", "a.b.c"])
def test_reducer_rejects_invalid_field(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid field name"):
        Reducer([pattern], 60)


@pytest.mark.parametrize("window", [0, -1.0])
def test_reducer_rejects_window(window: float) -> None:
    with pytest.raises(ValueError, match="window_seconds must be positive"):
        Reducer(CONTINUOUS, window)


def load_journal(**keys: Any) -> JournalSection:
    data = {
        "machine": {"id": MACHINE},
        "serial": {"url": "loop://"},
        "journal": {"data_dir": "/var/lib/cnc-edge/test", **keys},
    }
    return cfg.load(EdgeConfig, data, source="edge.toml", environ={}).journal


def test_config_reduce_defaults() -> None:
    journal = load_journal()

    assert journal.reduce_at == 0.8
    assert journal.reduce_window == 60.0
    assert journal.continuous_fields == DEFAULT_CONTINUOUS_FIELDS
    assert "macros.*" in journal.continuous_fields


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("reduce_at", 0, "greater than 0 and at most 1"),
        ("reduce_at", 1.5, "greater than 0 and at most 1"),
        ("reduce_at", -0.2, "greater than 0 and at most 1"),
        ("reduce_window", 0, "greater than 0"),
        ("continuous_fields", ["macros.*.x"], "invalid field name 'macros.*.x'"),
        ("continuous_fields", "motion_seconds", "expected a list of str"),
    ],
)
def test_config_rejects_bad_reduce_key(key: str, value: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_journal(**{key: value})

    assert caught.value.key == f"journal.{key}"
    assert reason in caught.value.reason


def test_config_reduce_at_one_accepted() -> None:
    assert load_journal(reduce_at=1).reduce_at == 1.0


def test_config_continuous_fields_from_environment() -> None:
    data = {
        "machine": {"id": MACHINE},
        "serial": {"url": "loop://"},
        "journal": {"data_dir": "/var/lib/cnc-edge/test"},
    }
    environ = {"CNC_EDGE_JOURNAL_CONTINUOUS_FIELDS": "motion_seconds, macros.5041"}

    config = cfg.load(
        EdgeConfig, data, source="t", env_prefix="CNC_EDGE", environ=environ
    )

    assert config.journal.continuous_fields == ["motion_seconds", "macros.5041"]
