"""Reduction of readings near the journal cap: discrete events exact, the rest folded.

When the journal nears its cap, the buffer journals every reading whose
discrete values changed and folds the readings in between into reduced
records with per-window min, max and mean of the continuous fields (see
"Reduced records" in docs/COVERAGE.md). This module holds the logic only: it
does no I/O and reads no clock, so the buffer decides when to use it.

API::

    threshold = reduce_threshold(max_bytes, reduce_at)  # bytes, or None: off
    reducer = Reducer(continuous_fields, window_seconds)
    for item in reducer.feed(reading):  # kept readings and closed records
        journal(item)
    for item in reducer.flush():  # when reduction stops, and at shutdown
        journal(item)

``feed`` and ``flush`` return what to journal now, in sequence order. An
item is a reading (the dict fed in, unchanged) or a reduced record, which
has ``"type": "reduced"`` and passes ``cnc_common.coverage.validate_reduced``.

Continuous fields are the names in ``continuous_fields``. A name ending in
``.*`` matches every key of a nested dict field, so ``macros.*`` matches
``macros.5041`` in ``{"macros": {"5041": 1.2}}``. A continuous field whose
value is not a finite int or float (a string, a bool, null) counts as
discrete in that reading, so its value is never lost.

The discrete values of a reading are its other fields (nested dicts
flattened to ``name.key``), its ``status`` and ``condition`` and the sorted
keys of its ``errors``. ``feed`` keeps a reading in full when it is the first
reading of its boot fed to this reducer, or when its discrete values differ
from those of the reading fed before it (a field that appears or disappears
is a change). Every other reading goes into the open window.

A window is closed into a reduced record when a kept reading arrives, when
``window_seconds`` of host monotonic time have passed since its first
reading, when the sequence number skips (so a record never claims a number
it did not see), and when ``machine``, ``boot``, ``host_boot`` or
``clock_synced`` changes. So every reading in one record has the same
discrete values, and the record's ``last`` holds them. The record covers
exactly ``seq_start..seq_end`` and its ``count`` equals the size of that
range.

Readings in the open window exist only in memory until it is closed. If the
agent is killed, they are among the readings the next boot reports as lost
with reason ``agent_down``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cnc_common.reading import SCHEMA_VERSION

#: Continuous fields when the config names none: the Haas timers (Q300,
#: Q301, Q303) and every macro variable read with Q600.
DEFAULT_CONTINUOUS_FIELDS = [
    "power_on_seconds",
    "motion_seconds",
    "last_cycle_seconds",
    "macros.*",
]

#: Keys of ``last`` taken from the reading itself, not from its fields.
READING_KEYS = ("status", "condition")
ERRORS_KEY = "errors"

#: A field name, or ``name.key`` for a key of a nested dict, or ``name.*``.
_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.([A-Za-z0-9_]+|\*))?$")

#: Reading keys that must stay the same within one reduced record.
_WINDOW_KEYS = ("machine", "boot", "host_boot", "clock_synced")


def reduce_threshold(max_bytes: int, reduce_at: float) -> int | None:
    """Return the journal size in bytes at which reduction starts.

    Returns None when the journal has no cap (``max_bytes`` 0), because
    then reduction is off.
    """
    if max_bytes <= 0:
        return None
    return int(max_bytes * reduce_at)


def check_continuous_fields(patterns: Iterable[str]) -> None:
    """Raise ValueError naming the first invalid field name or pattern."""
    for pattern in patterns:
        if not _PATTERN.match(pattern):
            raise ValueError(
                f"invalid field name {pattern!r}: expected a field such as "
                "motion_seconds, macros.5041 or macros.* (every key of macros)"
            )


def flatten_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Return the fields with nested dicts flattened to ``name.key``."""
    flat: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                flat[f"{name}.{key}"] = inner
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


@dataclass
class _FieldStats:
    minimum: float
    maximum: float
    total: float
    count: int = 1

    def add(self, value: float) -> None:
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        self.total += value
        self.count += 1

    def as_dict(self) -> dict[str, float]:
        return {
            "min": self.minimum,
            "max": self.maximum,
            "mean": self.total / self.count,
        }


@dataclass
class _Window:
    """Aggregates of the readings folded so far into the next reduced record."""

    first: dict[str, Any]
    last_reading: dict[str, Any]
    discrete: dict[str, Any]
    count: int = 1
    stats: dict[str, _FieldStats] = field(default_factory=dict)

    def add_values(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if name in self.stats:
                self.stats[name].add(value)
            else:
                self.stats[name] = _FieldStats(value, value, value)

    def to_record(self) -> dict[str, Any]:
        first, last = self.first, self.last_reading
        record: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "type": "reduced",
            "machine": first["machine"],
            "boot": first["boot"],
            "seq_start": first["seq"],
            "seq_end": last["seq"],
            "count": self.count,
            "ts_start": first["ts"],
            "ts_end": last["ts"],
            "mono_start": first["mono"],
            "mono_end": last["mono"],
        }
        for key in ("host_boot", "clock_synced"):
            if key in first:
                record[key] = first[key]
        record["stats"] = {name: stats.as_dict() for name, stats in self.stats.items()}
        record["last"] = self.discrete
        return record


class Reducer:
    """Fold the readings of one machine into kept readings and reduced records.

    Args:
        continuous_fields: names and ``name.*`` patterns of the fields to
            reduce to min, max and mean; raises ValueError for an invalid one.
        window_seconds: maximum span of host monotonic time (the readings'
            ``mono``) that one reduced record covers; must be positive.
    """

    def __init__(self, continuous_fields: Iterable[str], window_seconds: float):
        patterns = list(continuous_fields)
        check_continuous_fields(patterns)
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        self.window_seconds = window_seconds
        self._names = {p for p in patterns if not p.endswith(".*")}
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))
        self._window: _Window | None = None
        # The reading fed last and the JSON of its discrete values, which
        # compares 1 and 1.0 (or 1 and true) as different values.
        self._previous: dict[str, Any] | None = None
        self._previous_key = b""

    @property
    def pending(self) -> int:
        """Number of readings in the open window, which is only in memory."""
        return self._window.count if self._window is not None else 0

    def is_continuous(self, name: str) -> bool:
        """Return whether a flattened field name is a continuous field."""
        return name in self._names or name.startswith(self._prefixes)

    def split(self, reading: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Split a reading into its discrete values and its continuous numbers."""
        discrete: dict[str, Any] = {}
        continuous: dict[str, float] = {}
        for name, value in flatten_fields(reading.get("fields", {})).items():
            if self.is_continuous(name) and _is_number(value):
                continuous[name] = value
            else:
                discrete[name] = value
        for key in READING_KEYS:
            if key in reading:
                discrete[key] = reading[key]
        discrete[ERRORS_KEY] = sorted(reading.get("errors", {}))
        return discrete, continuous

    def feed(self, reading: dict[str, Any]) -> list[dict[str, Any]]:
        """Take the next polled reading and return what to journal now.

        Raises ValueError when ``seq`` does not increase within a boot,
        because a reading fed twice or out of order would break the
        sequence ranges.
        """
        previous = self._previous
        same_boot = previous is not None and previous["boot"] == reading["boot"]
        if same_boot and reading["seq"] <= previous["seq"]:
            raise ValueError(
                f"reading {reading['boot']}-{reading['seq']} fed after "
                f"seq {previous['seq']} of the same boot"
            )
        discrete, continuous = self.split(reading)
        key = orjson.dumps(discrete, option=orjson.OPT_SORT_KEYS)
        changed = not same_boot or key != self._previous_key
        self._previous, self._previous_key = reading, key

        output: list[dict[str, Any]] = []
        if changed or not self._fits_window(reading):
            output.extend(self._close())
        if changed:
            output.append(reading)
            return output
        if self._window is None:
            self._window = _Window(reading, reading, discrete)
        else:
            self._window.last_reading = reading
            self._window.count += 1
        self._window.add_values(continuous)
        return output

    def flush(self) -> list[dict[str, Any]]:
        """Close the open window and return its reduced record, if any.

        It also clears the reading fed last, so the next reading fed is kept
        in full, because the buffer may journal readings in full between a
        flush and the next feed without feeding them here.
        """
        self._previous, self._previous_key = None, b""
        return self._close()

    def _fits_window(self, reading: dict[str, Any]) -> bool:
        window = self._window
        if window is None:
            return True
        first = window.first
        return (
            reading["seq"] == window.last_reading["seq"] + 1
            and reading["mono"] - first["mono"] < self.window_seconds
            and all(reading.get(key) == first.get(key) for key in _WINDOW_KEYS)
        )

    def _close(self) -> list[dict[str, Any]]:
        window, self._window = self._window, None
        return [] if window is None else [window.to_record()]
