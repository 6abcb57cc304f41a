"""The host's clocks as a reading records them: wall time, sync state, boot id.

Test seam: set ``CNC_TEST_CLOCK_FILE=<path>`` in the agent's environment to
a JSON file such as ``{"offset_s": -3600, "synced": false}``. The file is
read again at every sample, so a test can change it while the agent runs:
``offset_s`` seconds are added to the host's wall time (not to the monotonic
clock), and ``synced``, when present, replaces the kernel's sync state. A
missing or invalid file counts as no offset and the kernel's sync state.
Production runs never set the variable; the check is one dictionary lookup.
See ``crashpoints`` for the other test seam.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from cnc_common.reading import utc_iso

log = logging.getLogger(__name__)

TEST_CLOCK_ENV = "CNC_TEST_CLOCK_FILE"

#: The kernel's boot id, a random UUID drawn at each boot of the host.
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

#: adjtimex return value and status bit meaning "not synchronised"
#: (linux/timex.h).
TIME_ERROR = 5
STA_UNSYNC = 0x0040


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """``struct timex`` of linux/timex.h, with its trailing padding."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


def read_host_boot_id(path: str = BOOT_ID_PATH) -> str:
    """Return the host's boot id, or ``""`` when it cannot be read."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("host boot id unknown: %s (%s)", path, exc)
        return ""


def _load_adjtimex() -> Callable[[Any], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.POINTER(_Timex)]
    function.restype = ctypes.c_int
    return function


def kernel_clock_synced(
    adjtimex: Callable[[Any], int] | None = None,
) -> bool | None:
    """Return whether the kernel reports its clock synchronised, None if unknown.

    ``adjtimex`` with ``modes`` 0 only reads the kernel's state, so no
    privilege is needed and the clock is never changed.
    """
    adjtimex = adjtimex or _load_adjtimex()
    if adjtimex is None:
        return None
    timex = _Timex(modes=0)
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    return state != TIME_ERROR and not timex.status & STA_UNSYNC


@dataclass(frozen=True)
class HostTime:
    """One sample of the host's clocks, taken at the start of a poll cycle."""

    ts: str
    mono: float
    synced: bool


class HostClock:
    """Sample wall time, monotonic time and sync state, with the test seam."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._test_file = environ.get(TEST_CLOCK_ENV) or None
        self._adjtimex = _load_adjtimex()
        self._unknown_logged = False
        if self._test_file:
            log.warning("test clock: %s (host time may be shifted)", self._test_file)

    def sample(self) -> HostTime:
        offset, synced_override = self._test_settings()
        wall = time.time() + offset
        mono = time.monotonic()
        synced = self._synced() if synced_override is None else synced_override
        return HostTime(ts=utc_iso(wall), mono=mono, synced=synced)

    def _synced(self) -> bool:
        synced = kernel_clock_synced(self._adjtimex) if self._adjtimex else None
        if synced is not None:
            return synced
        if not self._unknown_logged:
            self._unknown_logged = True
            log.warning(
                "clock sync state unknown: adjtimex unavailable "
                "(readings are marked clock_synced false)"
            )
        return False

    def _test_settings(self) -> tuple[float, bool | None]:
        if self._test_file is None:
            return 0.0, None
        try:
            with open(self._test_file, "rb") as handle:
                settings = orjson.loads(handle.read())
            offset = float(settings.get("offset_s", 0.0))
            synced = settings.get("synced")
        except (OSError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return 0.0, None
        return offset, synced if isinstance(synced, bool) else None
