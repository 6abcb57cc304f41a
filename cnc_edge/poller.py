"""The poller process: one reading per poll cycle from the controller.

Every cycle produces exactly one reading, also when the serial link is
down: a reading whose status is ``error`` records the gap, so that time
without data is never mistaken for a machine reporting zeros. Each reading
also records the host's clocks, the controller's clock and the cycle's
``condition`` (see ``decide_condition``).

Before a reading is handed to the buffer, its ``boot``, ``seq``, ``ts`` and
``mono`` are written to ``poller.last`` in the data directory, so that the
next boot can tell which readings this boot polled but may never have
journaled.
"""

from __future__ import annotations

import logging
import os
import termios
import time
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import serial

from cnc_common.backoff import Backoff, RateLimitedCounter, not_logged
from cnc_common.reading import Condition, encode, make_reading, new_boot_id
from cnc_edge.config import EdgeConfig
from cnc_edge.haas import (
    MACRO_COMMAND,
    AnswerError,
    HaasClient,
    PollResult,
    SerialLinkError,
    validate_command,
)
from cnc_edge.hostclock import HostClock, read_host_boot_id
from cnc_edge.metrics import PollerMetrics

log = logging.getLogger(__name__)

#: Haas macro variables of the controller's clock: the date as YYYYMMDD and
#: the time of day as HHMMSS, both in the controller's local time.
DATE_VARIABLE = 3011
TIME_VARIABLE = 3012
DATE_COMMAND = f"{MACRO_COMMAND} {DATE_VARIABLE}"
TIME_COMMAND = f"{MACRO_COMMAND} {TIME_VARIABLE}"

#: Error kinds that mean a command was answered late or not at all.
_LATE_KINDS = frozenset({"timeout", "partial", "stale_echo"})

LAST_POLL_FILE = "poller.last"
#: ``poller.last`` of the previous boot, moved aside when a poller starts.
PREVIOUS_POLL_FILE = "poller.last.previous"
#: Every write of ``poller.last`` is one line of this many bytes, newline
#: included, so that a rewrite in place leaves no tail of a longer line.
LAST_POLL_LINE_BYTES = 256
_LAST_POLL_KEYS = {"boot": str, "seq": int, "ts": str, "mono": float}


def open_port(config: EdgeConfig) -> serial.SerialBase:
    """Open the controller's port from its pyserial URL or device path."""
    s = config.serial
    return serial.serial_for_url(
        s.url,
        baudrate=s.baudrate,
        bytesize=s.bytesize,
        parity=s.parity,
        stopbits=s.stopbits,
        xonxoff=s.xonxoff,
        rtscts=s.rtscts,
        timeout=0.05,
        write_timeout=s.query_timeout,
    )


def decide_condition(result: PollResult) -> Condition | None:
    """Return the condition of a cycle whose port stayed open.

    ``controller_off`` when not one byte came back to any command sent,
    ``controller_busy`` when some did but at least one command timed out or
    was answered late, ``ok`` otherwise. Returns None when no command was
    sent (a stop cut the cycle short), because nothing was observed.
    """
    if not result.sent:
        return None
    if len(result.silent) == len(result.sent):
        return Condition.CONTROLLER_OFF
    if any(kind in _LATE_KINDS for kind in result.errors.values()):
        return Condition.CONTROLLER_BUSY
    return Condition.OK


def controller_timestamp(date: float, clock: float, zone: tzinfo | None) -> str | None:
    """Return ISO 8601 for the values of #3011 (YYYYMMDD) and #3012 (HHMMSS).

    ``zone`` None means the host's local zone. Returns None for values that
    are not a valid date and time.
    """
    if not (date.is_integer() and clock.is_integer()) or date < 0 or clock < 0:
        return None
    day, time_of_day = int(date), int(clock)
    try:
        naive = datetime(
            day // 10000,
            day // 100 % 100,
            day % 100,
            time_of_day // 10000,
            time_of_day // 100 % 100,
            time_of_day % 100,
        )
    except ValueError:
        return None
    aware = naive.astimezone() if zone is None else naive.replace(tzinfo=zone)
    return aware.isoformat()


class LastPollFile:
    """``poller.last``: the last polled reading's ids, rewritten in place.

    The descriptor stays open and each cycle writes one fixed-length line at
    offset 0 without fsync, so a cycle costs one ``pwrite``. After a crash
    of the agent the page cache still contains the line; after a power loss it
    may hold an older one, or none.
    """

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / LAST_POLL_FILE
        # The previous boot's line is moved aside first, because this poller
        # overwrites poller.last before the buffer may have read it.
        # os.replace renames a symlink itself and never follows it.
        # An empty or torn line (a boot that died early) is not moved, so it
        # does not replace the last valid record.
        if read_last_poll(data_dir) is not None:
            os.replace(path, data_dir / PREVIOUS_POLL_FILE)
        # O_NOFOLLOW rejects a symlink planted in place of the file.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self.path = path
        self._fd = os.open(path, flags, 0o600)

    def write(self, reading: dict[str, Any]) -> None:
        """Rewrite the line with the reading's boot, seq, ts, mono and condition."""
        record = {key: reading[key] for key in _LAST_POLL_KEYS}
        record["condition"] = reading.get("condition", Condition.OK)
        line = orjson.dumps(record)
        width = LAST_POLL_LINE_BYTES - 1
        os.pwrite(self._fd, line.ljust(width) + b"\n", 0)
        if len(line) > width:
            # NOTE: unreachable with the keys above (about 150 bytes); kept
            # so that a longer record is never followed by an old tail.
            os.ftruncate(self._fd, len(line) + 1)

    def close(self) -> None:
        os.close(self._fd)


def read_last_poll(data_dir: Path | str, name: str = LAST_POLL_FILE) -> dict | None:
    """Return the record in ``poller.last``, or None if missing or invalid.

    The record has ``boot``, ``seq``, ``ts``, ``mono`` and ``condition``.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(Path(data_dir) / name, flags)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4 * LAST_POLL_LINE_BYTES)
    finally:
        os.close(fd)
    try:
        record = orjson.loads(raw.strip())
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    for key, kind in _LAST_POLL_KEYS.items():
        value = record.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
    return record


def read_previous_boot_poll(data_dir: Path | str, boot: str) -> dict | None:
    """Return the last poll record of a boot other than ``boot``, or None.

    A starting poller moves ``poller.last`` to ``poller.last.previous``
    before its first write, so the previous boot's record is in one of the
    two files, whichever process of the new boot reads first.
    """
    for name in (LAST_POLL_FILE, PREVIOUS_POLL_FILE):
        record = read_last_poll(data_dir, name)
        if record is not None and record["boot"] != boot:
            return record
    return None


class Poller:
    def __init__(
        self,
        config: EdgeConfig,
        out_queue: Any,
        stop_event: Any,
        metrics: PollerMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or PollerMetrics(config.machine.id)
        self.out_queue = out_queue
        self.stop_event = stop_event
        self.boot = new_boot_id()
        self.seq = 0
        # Normalised ("q600  0042" -> "Q600 42") so that error keys are stable.
        queries = [*config.poll.commands, *(f"Q600 {n}" for n in config.poll.macros)]
        self.commands = [validate_command(query) for query in queries]
        self.clock_commands = (
            [DATE_COMMAND, TIME_COMMAND] if config.poll.controller_clock else []
        )
        zone = config.machine.time_zone
        self.controller_zone: tzinfo | None = ZoneInfo(zone) if zone else None
        self.host_clock = HostClock()
        self.host_boot = read_host_boot_id()
        #: Condition of the last cycle that observed the controller.
        self.condition = Condition.OK
        self.bad_clock_values = RateLimitedCounter(interval=60.0)
        self.last_poll_file: LastPollFile | None = None
        self.last_poll_failures = RateLimitedCounter(interval=60.0)
        self.port: serial.SerialBase | None = None
        self.client: HaasClient | None = None
        self.backoff = Backoff(
            initial=config.serial.reopen_backoff_initial,
            cap=config.serial.reopen_backoff_cap,
        )
        self.next_open = 0.0
        self.open_failures = RateLimitedCounter(interval=60.0)
        self.overruns = RateLimitedCounter(interval=60.0)
        self.audit = (
            open(config.poll.audit_file, "a", buffering=1)
            if config.poll.audit_file
            else None
        )

    def _ensure_open(self) -> bool:
        if self.client is not None:
            return True
        if time.monotonic() < self.next_open:
            return False
        try:
            self.port = open_port(self.config)
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            # termios.error is not an OSError: tcsetattr raises it for settings
            # the device rejects (a pty refuses 7 data bits with parity).
            self.next_open = time.monotonic() + self.backoff.next_delay()
            suppressed = self.open_failures.hit()
            if suppressed is not None:
                log.warning(
                    "serial open failed: %s (%s%s)",
                    self.config.serial.url,
                    exc,
                    not_logged(suppressed),
                )
            return False
        self.client = HaasClient(
            self.port, query_timeout=self.config.serial.query_timeout
        )
        try:
            self.client.prime()
        except SerialLinkError as exc:
            self._drop_port(exc)
            return False
        self.backoff.reset()
        log.info("serial opened: %s", self.config.serial.url)
        return True

    def _drop_port(self, exc: Exception) -> None:
        detail = getattr(exc, "detail", exc)
        log.warning("serial link lost: %s (%s)", self.config.serial.url, detail)
        if self.port is not None:
            try:
                self.port.close()
            except Exception:  # noqa: BLE001 - the port is gone either way
                pass
        self.port = None
        self.client = None
        self.next_open = time.monotonic() + self.backoff.next_delay()

    def poll_once(self) -> dict[str, Any]:
        """Run one poll cycle and return its reading."""
        host = self.host_clock.sample()
        fields: dict[str, Any] = {}
        errors: dict[str, str] = {}
        ctrl_ts: str | None = None
        condition: Condition | None = Condition.LINK_DOWN
        if not self._ensure_open():
            errors["serial"] = "link_down"
        else:
            try:
                result, ctrl_ts = self._poll_controller()
                fields, errors = result.fields, result.errors
                condition = decide_condition(result)
            except SerialLinkError as exc:
                self._drop_port(exc)
                errors["serial"] = "link_down"
            except Exception as exc:  # noqa: BLE001 - one bad cycle must not stop polling
                log.error(
                    "poll failed: %s (%r)", self.config.serial.url, exc, exc_info=True
                )
                # The port is dropped and reopened, so the cycle saw no more
                # of the controller than a failed link would.
                self._drop_port(exc)
                errors["serial"] = "internal"
        self._set_condition(condition or self.condition)
        reading = make_reading(
            machine=self.config.machine.id,
            boot=self.boot,
            seq=self.seq,
            ts=host.ts,
            mono=host.mono,
            fields=fields,
            errors=errors,
            host_boot=self.host_boot,
            clock_synced=host.synced,
            ctrl_ts=ctrl_ts,
            condition=self.condition,
        )
        self.seq += 1
        return reading

    def _poll_controller(self) -> tuple[PollResult, str | None]:
        """Read the controller's clock, then the configured commands.

        The clock goes first, so that ``ctrl_ts`` is taken as close as
        possible to the host time sampled at the start of the cycle.

        Raises:
            SerialLinkError: the port failed.
        """
        assert self.client is not None
        should_stop = self.stop_event.is_set
        result = self.client.poll(self.clock_commands, should_stop)
        # The clock's values become ctrl_ts and no field of the reading.
        ctrl_ts = self._controller_time(result)
        rest = self.client.poll(self.commands, should_stop)
        result.fields = rest.fields
        result.errors.update(rest.errors)
        result.sent += rest.sent
        result.silent += rest.silent
        return result, ctrl_ts

    def _controller_time(self, result: PollResult) -> str | None:
        """Remove the answers to #3011 and #3012 from ``result`` and return
        the controller's clock they give, or None."""
        macros = result.fields.pop("macros", {})
        date = macros.get(str(DATE_VARIABLE))
        clock = macros.get(str(TIME_VARIABLE))
        if date is None or clock is None:
            return None
        if clock < 100:
            # In the first minute of the day the date read before the time
            # may still be yesterday's, so it is read again after the time.
            assert self.client is not None
            try:
                date = self.client.query(DATE_COMMAND)["macros"][str(DATE_VARIABLE)]
            except AnswerError:
                return None
        ctrl_ts = controller_timestamp(date, clock, self.controller_zone)
        if ctrl_ts is None:
            suppressed = self.bad_clock_values.hit()
            if suppressed is not None:
                log.warning(
                    "controller clock invalid: %s (#3011 %r, #3012 %r%s)",
                    self.config.machine.id,
                    date,
                    clock,
                    not_logged(suppressed),
                )
        return ctrl_ts

    def _set_condition(self, condition: Condition) -> None:
        if condition is not self.condition:
            log.info(
                "controller condition: %s %s -> %s (seq %d)",
                self.config.machine.id,
                self.condition.value,
                condition.value,
                self.seq,
            )
        self.condition = condition

    def run(self, parent_pid: int) -> None:
        from cnc_edge.process import parent_alive

        interval = self.config.poll.interval
        log.info(
            "poller started: %s (boot %s, every %.3g s)",
            self.config.serial.url,
            self.boot,
            interval,
        )
        self.last_poll_file = LastPollFile(self.config.data_dir)
        next_start = time.monotonic()
        while not self.stop_event.is_set() and parent_alive(parent_pid):
            started = time.monotonic()
            reading = self.poll_once()
            self.metrics.record_poll(reading, time.monotonic() - started)
            payload = encode(reading)
            self._write_last_poll(reading)
            self.out_queue.put((reading["id"], payload))
            if self.audit is not None:
                self.audit.write(reading["id"] + "\n")
            next_start += interval
            delay = next_start - time.monotonic()
            if delay < 0:
                suppressed = self.overruns.hit()
                if suppressed is not None:
                    log.warning(
                        "poll overrun: cycle took %.2f s, interval is %.2f s "
                        "(slow or missing answers%s)",
                        interval - delay,
                        interval,
                        not_logged(suppressed),
                    )
                # A cycle overran the interval (slow responses, timeouts): start
                # the next one now and do not try to catch up with a burst.
                next_start = time.monotonic()
                delay = 0
            self.stop_event.wait(delay)
        if self.port is not None:
            self.port.close()
        if self.audit is not None:
            self.audit.close()
        self.last_poll_file.close()
        log.info(
            "poller stopped: %s (last seq %d)", self.config.machine.id, self.seq - 1
        )

    def _write_last_poll(self, reading: dict[str, Any]) -> None:
        assert self.last_poll_file is not None
        try:
            self.last_poll_file.write(reading)
        except OSError as exc:
            # Polling goes on: a stale poller.last only makes the next boot's
            # agent_down report cover fewer readings.
            suppressed = self.last_poll_failures.hit()
            if suppressed is not None:
                log.warning(
                    "poller.last write failed: %s (%s%s)",
                    self.last_poll_file.path,
                    exc,
                    not_logged(suppressed),
                )


def run_poller(
    config: EdgeConfig, out_queue: Any, stop_event: Any, parent_pid: int
) -> None:
    """Entry point of the poller process."""
    from cnc_edge.process import child_setup

    child_setup(config, "poller")
    Poller(config, out_queue, stop_event).run(parent_pid)
