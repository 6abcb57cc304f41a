"""The reading: one poll cycle of one machine tool, as published and stored.

A reading is a flat JSON object. Its ``id`` is ``<boot>-<seq>``: ``boot`` is a
random identifier the edge agent draws each time it starts and ``seq`` counts
polls from 0 within that boot, so an id is unique without coordination and
stays the same however often the reading is journaled or replayed. The id is
also the JetStream ``Nats-Msg-Id`` and the backend's idempotency key.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import orjson

from cnc_common.errors import InvalidReading

#: Version of the record layout, stored in every reading and journal line.
SCHEMA_VERSION = 1

#: Readings are published on ``<SUBJECT_PREFIX>.<machine id>``.
SUBJECT_PREFIX = "cnc.readings"

#: Allowed machine ids: they become one NATS subject token and a SQL value.
MACHINE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BOOT_PATTERN = re.compile(r"^[0-9a-f]{32}$")

Status = Literal["ok", "partial", "error"]
_STATUSES = ("ok", "partial", "error")


class Condition(StrEnum):
    """The state of the controller as one poll cycle observed it."""

    #: Every command got a reply in time (garbled or UNKNOWN replies included).
    OK = "ok"
    #: Some commands got a reply, and at least one other timed out or came late.
    CONTROLLER_BUSY = "controller_busy"
    #: The port is open, but no command got a single byte back.
    CONTROLLER_OFF = "controller_off"
    #: The port could not be opened or failed during the cycle.
    LINK_DOWN = "link_down"


#: The values of a reading's ``condition``.
CONDITIONS = tuple(condition.value for condition in Condition)


def new_boot_id() -> str:
    """Return a fresh boot id (128 random bits as 32 hex digits)."""
    return uuid.uuid4().hex


def reading_id(boot: str, seq: int) -> str:
    return f"{boot}-{seq}"


def utc_now_iso() -> str:
    """Return the current UTC time as ISO 8601 with microseconds and ``Z``."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_iso(timestamp: float) -> str:
    """Format a Unix time as ``utc_now_iso`` does."""
    when = datetime.fromtimestamp(timestamp, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_reading(
    *,
    machine: str,
    boot: str,
    seq: int,
    ts: str,
    mono: float,
    fields: dict[str, Any],
    errors: dict[str, str],
    host_boot: str = "",
    clock_synced: bool = True,
    ctrl_ts: str | None = None,
    condition: Condition | str = Condition.OK,
) -> dict[str, Any]:
    """Build a reading; ``status`` follows from which commands failed.

    ``host_boot`` is the host's boot id (the epoch of ``mono``),
    ``clock_synced`` whether the host clock was synchronised at ``ts``,
    ``ctrl_ts`` the controller's own clock and ``condition`` what the poller
    could see of the controller. The defaults are the values the backend
    assumes for a reading that lacks these keys.
    """
    if not errors:
        status: Status = "ok"
    elif fields:
        status = "partial"
    else:
        status = "error"
    return {
        "v": SCHEMA_VERSION,
        "id": reading_id(boot, seq),
        "machine": machine,
        "boot": boot,
        "seq": seq,
        "ts": ts,
        "mono": mono,
        "status": status,
        "fields": fields,
        "errors": errors,
        "host_boot": host_boot,
        "clock_synced": clock_synced,
        "ctrl_ts": ctrl_ts,
        "condition": str(Condition(condition)),
    }


def subject_for(machine: str, prefix: str = SUBJECT_PREFIX) -> str:
    return f"{prefix}.{machine}"


def encode(reading: dict[str, Any]) -> bytes:
    return orjson.dumps(reading)


def decode(payload: bytes) -> dict[str, Any]:
    """Parse and validate one payload; raise InvalidReading with a reason label."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidReading("invalid_json", str(exc)) from None
    return validate(data)


def validate(data: Any) -> dict[str, Any]:
    """Check the layout and types of a decoded reading and return it.

    ``host_boot``, ``clock_synced``, ``ctrl_ts`` and ``condition`` are checked
    only when present, because readings journaled by earlier versions lack
    them.
    """
    if not isinstance(data, dict):
        raise InvalidReading(
            "schema", f"expected a JSON object, got {type(data).__name__}"
        )
    _check_type(data, "v", int)
    if data["v"] != SCHEMA_VERSION:
        raise InvalidReading("schema", f"unsupported version {data['v']!r}")
    for key in ("id", "machine", "boot", "ts", "status"):
        _check_type(data, key, str)
    _check_type(data, "seq", int)
    _check_type(data, "fields", dict)
    _check_type(data, "errors", dict)
    if not isinstance(data.get("mono"), (int, float)) or isinstance(data["mono"], bool):
        raise InvalidReading("schema", "mono must be a number")
    if not MACHINE_ID_PATTERN.match(data["machine"]):
        raise InvalidReading("schema", f"invalid machine id {data['machine']!r}")
    if not _BOOT_PATTERN.match(data["boot"]) or data["seq"] < 0:
        raise InvalidReading("schema", "boot must be 32 hex digits and seq >= 0")
    if data["id"] != reading_id(data["boot"], data["seq"]):
        raise InvalidReading("schema", f"id {data['id']!r} does not match boot and seq")
    if data["status"] not in _STATUSES:
        raise InvalidReading("schema", f"invalid status {data['status']!r}")
    _check_timestamp("timestamp", data["ts"])
    _check_optional_keys(data)
    return data


def _check_optional_keys(data: dict[str, Any]) -> None:
    if "host_boot" in data:
        _check_type(data, "host_boot", str)
    if "clock_synced" in data and not isinstance(data["clock_synced"], bool):
        raise InvalidReading(
            "schema", f"clock_synced must be bool, got {data['clock_synced']!r}"
        )
    if "ctrl_ts" in data and data["ctrl_ts"] is not None:
        _check_type(data, "ctrl_ts", str)
        _check_timestamp("ctrl_ts", data["ctrl_ts"])
    if "condition" in data:
        _check_type(data, "condition", str)
        if data["condition"] not in CONDITIONS:
            raise InvalidReading("schema", f"invalid condition {data['condition']!r}")


def _check_timestamp(name: str, value: str) -> None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidReading("schema", f"invalid {name} {value!r}") from None
    if parsed.tzinfo is None:
        raise InvalidReading("schema", f"{name} {value!r} has no time zone")


def _check_type(data: dict[str, Any], key: str, kind: type) -> None:
    value = data.get(key)
    # bool is a subclass of int, and a bool is never a valid version or seq.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidReading("schema", f"{key} must be {kind.__name__}, got {value!r}")
