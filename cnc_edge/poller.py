"""The poller process: one reading per poll cycle from the controller.

Every cycle produces exactly one reading, also when the serial link is
down: a reading whose status is ``error`` records the gap, so that time
without data is never mistaken for a machine reporting zeros.
"""

from __future__ import annotations

import logging
import termios
import time
from typing import Any

import serial

from cnc_common.backoff import Backoff, RateLimitedCounter, not_logged
from cnc_common.reading import encode, make_reading, new_boot_id, utc_now_iso
from cnc_edge.config import EdgeConfig
from cnc_edge.haas import HaasClient, SerialLinkError, validate_command
from cnc_edge.metrics import PollerMetrics

log = logging.getLogger(__name__)


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
        ts = utc_now_iso()
        mono = time.monotonic()
        fields: dict[str, Any] = {}
        errors: dict[str, str] = {}
        if not self._ensure_open():
            errors["serial"] = "link_down"
        else:
            assert self.client is not None
            try:
                result = self.client.poll(self.commands, self.stop_event.is_set)
                fields, errors = result.fields, result.errors
            except SerialLinkError as exc:
                self._drop_port(exc)
                errors["serial"] = "link_down"
            except Exception as exc:  # noqa: BLE001 - one bad cycle must not stop polling
                log.error(
                    "poll failed: %s (%r)", self.config.serial.url, exc, exc_info=True
                )
                self._drop_port(exc)
                errors["serial"] = "internal"
        reading = make_reading(
            machine=self.config.machine.id,
            boot=self.boot,
            seq=self.seq,
            ts=ts,
            mono=mono,
            fields=fields,
            errors=errors,
        )
        self.seq += 1
        return reading

    def run(self, parent_pid: int) -> None:
        from cnc_edge.process import parent_alive

        interval = self.config.poll.interval
        log.info(
            "poller started: %s (boot %s, every %.3g s)",
            self.config.serial.url,
            self.boot,
            interval,
        )
        next_start = time.monotonic()
        while not self.stop_event.is_set() and parent_alive(parent_pid):
            started = time.monotonic()
            reading = self.poll_once()
            self.metrics.record_poll(reading, time.monotonic() - started)
            payload = encode(reading)
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
        log.info(
            "poller stopped: %s (last seq %d)", self.config.machine.id, self.seq - 1
        )


def run_poller(
    config: EdgeConfig, out_queue: Any, stop_event: Any, parent_pid: int
) -> None:
    """Entry point of the poller process."""
    from cnc_edge.process import child_setup

    child_setup(config, "poller")
    Poller(config, out_queue, stop_event).run(parent_pid)
