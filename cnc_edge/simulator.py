"""Simulated Haas control for demos and tests (console script ``cnc-sim``).

Three layers, each usable alone:

- ``MachineModel``: a mill that runs a program in cycles, changes tools,
  counts parts at M30, idles, is held and raises alarms now and then. Its
  time is the real clock scaled by ``pace``, and a ``seed`` makes it
  deterministic for a given sequence of clock readings.
- ``HaasProtocol``: bytes in, replies out. It answers each query line in the
  framing of a real control (``STX text ETB CR LF >``, optionally with DC2/DC4
  and XON/XOFF) and applies injected faults.
- ``PtyServer`` and ``TcpServer``: run the protocol on a pseudo-terminal or on
  a loopback TCP port (``socket://127.0.0.1:PORT`` for pyserial) in a thread.

A test runs a simulator in a thread of its own process and injects faults::

    with PtyServer(HaasProtocol(MachineModel(seed=1))) as sim:
        port = serial.serial_for_url(sim.url, timeout=1)
        sim.protocol.inject("trickle", count=1, seconds=3.0)
"""

from __future__ import annotations

import argparse
import collections
import enum
import errno
import heapq
import logging
import math
import os
import queue
import random
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import tty
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from cnc_edge.haas import (
    DC2,
    DC4,
    ETB,
    MACRO_COMMAND,
    STX,
    XOFF,
    XON,
    validate_command,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Machine model


class MachineState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    FEED_HOLD = "feed hold"
    ALARM = "alarm"


#: Tools used in turn by the simulated program.
TOOLS = (1, 4, 7, 12, 15)

#: Macro variables with a simulated value. Any other variable from 1 to 99999
#: has the value 0.
MACRO_VARIABLES = {
    3011: "date of the control's clock (YYYYMMDD)",
    3012: "time of day of the control's clock (HHMMSS)",
    3027: "spindle speed (rpm)",
    3901: "M30 count #1",
    5021: "machine position X",
    5022: "machine position Y",
    5023: "machine position Z",
    5041: "work position X",
    5042: "work position Y",
    5043: "work position Z",
}

# Work offset G54 (mm) between machine and work coordinates.
_WORK_OFFSET = (-420.0, -210.0, -350.0)


class MachineModel:
    """A simulated Haas mill whose state follows a paced clock.

    Durations are in simulated seconds: ``pace`` 60 runs an hour in a minute.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        cycle_seconds: float = 60.0,
        pace: float = 1.0,
        alarm_probability: float = 0.05,
        feed_hold_probability: float = 0.1,
        unsupported_commands: Iterable[str] = (),
        name: str = "sim",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        clock_skew: float = 0.0,
        time_zone: tzinfo | None = None,
    ) -> None:
        """``wall_clock`` plus ``clock_skew`` seconds is the control's own
        clock (#3011 and #3012), shown in ``time_zone`` (None: the host's
        local zone). ``clock`` paces the machine's state."""
        if cycle_seconds <= 0:
            raise ValueError(f"cycle_seconds must be positive, got {cycle_seconds!r}")
        if pace <= 0:
            raise ValueError(f"pace must be positive, got {pace!r}")
        self.name = name
        self.cycle_seconds = cycle_seconds
        self.pace = pace
        self.alarm_probability = alarm_probability
        self.feed_hold_probability = feed_hold_probability
        self.unsupported_commands = frozenset(unsupported_commands)
        self._rng = random.Random(seed)
        self._clock = clock
        self._wall_clock = wall_clock
        self.clock_skew = clock_skew
        self.time_zone = time_zone
        self._lock = threading.Lock()

        self.serial_number = str(self._rng.randint(1_000_000, 1_999_999))
        self.model = self._rng.choice(["VF2D", "VF-2SS", "VF-4", "UMC-750"])
        self.software_version = "100.20.000.1110"
        self.program = "O00110"
        self.state = MachineState.IDLE
        self.tool = TOOLS[0]
        self.tool_changes = self._rng.randint(100, 20_000)
        self.parts = self._rng.randint(0, 5_000)
        self.m30_count = self.parts
        self.last_cycle_seconds = 0
        self._power_on_base = self._rng.randint(1_000, 30_000) * 3600.0
        self._motion_base = self._power_on_base * 0.3
        self._motion_seconds = 0.0  # running time since the simulation started

        self._sim_time = 0.0
        self._last_clock = clock()
        self._events: list[tuple[float, int, str]] = []
        self._event_count = 0
        self._cycle_started = 0.0
        self._schedule(self._idle_seconds(), "start")

    # -- time -------------------------------------------------------------

    def advance(self) -> None:
        """Bring the state up to the current clock reading."""
        with self._lock:
            now = self._clock()
            target = self._sim_time + max(0.0, now - self._last_clock) * self.pace
            self._last_clock = now
            while self._events and self._events[0][0] <= target:
                when, _, event = heapq.heappop(self._events)
                self._elapse(when - self._sim_time)
                self._handle(event)
            self._elapse(target - self._sim_time)

    def _elapse(self, seconds: float) -> None:
        self._sim_time += seconds
        if self.state is MachineState.RUNNING:
            self._motion_seconds += seconds

    def _schedule(self, delay: float, event: str) -> None:
        self._event_count += 1
        heapq.heappush(self._events, (self._sim_time + delay, self._event_count, event))

    def _idle_seconds(self) -> float:
        return self.cycle_seconds * self._rng.uniform(0.2, 0.5)

    # -- events -----------------------------------------------------------

    def _handle(self, event: str) -> None:
        if event == "start":
            self._start_cycle()
        elif event == "tool":
            self.tool = TOOLS[(TOOLS.index(self.tool) + 1) % len(TOOLS)]
            self.tool_changes += 1
        elif event == "hold":
            self._set_state(MachineState.FEED_HOLD)
        elif event == "resume":
            self._set_state(MachineState.RUNNING)
        elif event == "alarm":
            self._events.clear()
            self._set_state(MachineState.ALARM)
            self._schedule(max(10.0, self.cycle_seconds * 0.5), "reset")
        elif event == "reset":
            self._set_state(MachineState.IDLE)
            self._schedule(self._idle_seconds(), "start")
        elif event == "m30":
            self.parts += 1
            self.m30_count += 1
            self.last_cycle_seconds = round(self._sim_time - self._cycle_started)
            self._set_state(MachineState.IDLE)
            self._schedule(self._idle_seconds(), "start")

    def _start_cycle(self) -> None:
        """Plan one cycle: tool changes, maybe a feed hold or an alarm, then M30."""
        self._cycle_started = self._sim_time
        self._set_state(MachineState.RUNNING)
        cycle = self.cycle_seconds
        if self._rng.random() < self.alarm_probability:
            # The alarm aborts the cycle: no M30, so no part is counted.
            self._schedule(cycle * self._rng.uniform(0.1, 0.9), "alarm")
        hold_at, hold_length = cycle, 0.0
        if self._rng.random() < self.feed_hold_probability:
            hold_at = cycle * self._rng.uniform(0.2, 0.8)
            hold_length = cycle * self._rng.uniform(0.05, 0.2)
            self._schedule(hold_at, "hold")
            self._schedule(hold_at + hold_length, "resume")
        for step in (1, 2, 3):
            offset = cycle * step / 4
            self._schedule(offset + (hold_length if offset > hold_at else 0.0), "tool")
        self._schedule(cycle + hold_length, "m30")

    def _set_state(self, state: MachineState) -> None:
        if state is not self.state:
            logger.info(
                "machine state: %s %s -> %s (parts %d, tool %d)",
                self.name,
                self.state.value,
                state.value,
                self.parts,
                self.tool,
            )
        self.state = state

    # -- answers ----------------------------------------------------------

    def answer(self, command: str) -> str:
        """Return the CSV text a Haas control sends for a validated command."""
        self.advance()
        name = command.split()[0]
        if name in self.unsupported_commands:
            return "UNKNOWN"
        with self._lock:
            if name == MACRO_COMMAND:
                variable = int(command.split()[1])
                return f"MACRO, {variable}, {self.macro_value(variable):.4f}"
            return self._answer_simple(name)

    def _answer_simple(self, name: str) -> str:
        power_on = self._power_on_base + self._sim_time
        motion = self._motion_base + self._motion_seconds
        answers = {
            "Q100": f"SERIAL NUMBER, {self.serial_number}",
            "Q101": f"SOFTWARE VERSION, {self.software_version}",
            "Q102": f"MODEL, {self.model}",
            "Q104": f"MODE, ({self.mode})",
            "Q200": f"TOOL CHANGES, {self.tool_changes}",
            "Q201": f"USING TOOL, {self.tool}",
            "Q300": f"P.O. TIME, {format_duration(power_on)}",
            "Q301": f"C.S. TIME, {format_duration(motion)}",
            "Q303": f"LAST CYCLE, {format_duration(self.last_cycle_seconds)}",
            "Q402": f"M30 #1, {self.m30_count}",
            "Q500": self._answer_q500(),
        }
        return answers.get(name, "UNKNOWN")

    @property
    def mode(self) -> str:
        return "MDI" if self.state is MachineState.ALARM else "MEM"

    def _answer_q500(self) -> str:
        if self.state is MachineState.RUNNING:
            return "STATUS, BUSY"
        status = {
            MachineState.IDLE: "IDLE",
            MachineState.FEED_HOLD: "FEED HOLD",
            MachineState.ALARM: "ALARM ON",
        }[self.state]
        program = "MDI" if self.mode == "MDI" else self.program
        return f"PROGRAM, {program}, {status}, PARTS, {self.parts}"

    def macro_value(self, variable: int) -> float:
        """Return the value of a macro variable (positions in mm)."""
        if variable in (3011, 3012):
            now = datetime.fromtimestamp(
                self._wall_clock() + self.clock_skew, self.time_zone
            )
            if variable == 3011:
                return float(now.year * 10000 + now.month * 100 + now.day)
            return float(now.hour * 10000 + now.minute * 100 + now.second)
        if variable == 3027:
            running = self.state is MachineState.RUNNING
            return float(2000 + 400 * self.tool) if running else 0.0
        if variable == 3901:
            return float(self.m30_count)
        position = self._work_position()
        if 5041 <= variable <= 5043:
            return position[variable - 5041]
        if 5021 <= variable <= 5023:
            axis = variable - 5021
            return position[axis] - _WORK_OFFSET[axis]
        return 0.0

    def _work_position(self) -> tuple[float, float, float]:
        # The tool path is a function of running time, so axes stand still
        # while the machine is idle, held or in alarm.
        t = self._motion_seconds
        return (
            round(150.0 * math.sin(2 * math.pi * t / 17), 4),
            round(80.0 * math.cos(2 * math.pi * t / 11), 4),
            round(-20.0 + 10.0 * math.sin(2 * math.pi * t / 5), 4),
        )


def format_duration(seconds: float) -> str:
    """Format seconds as the Haas ``HHHHH:MM:SS`` (five hour digits or more)."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:05d}:{minutes:02d}:{secs:02d}"


# ---------------------------------------------------------------------------
# Protocol engine


class Fault(enum.Enum):
    """Faults that ``HaasProtocol.inject`` applies to the next answers."""

    GARBLE = "garble"  # bytes of the text replaced by non-ASCII bytes
    TRUNCATE = "truncate"  # text cut short, ETB missing, then CR LF and prompt
    HALF_THEN_SILENCE = "half_then_silence"  # first half of the reply only
    TRICKLE = "trickle"  # one byte at a time, spread over `seconds`
    IGNORE = "ignore"  # no reply at all
    STALE_ECHO = "stale_echo"  # the answer to an earlier, different query
    DISCONNECT = "disconnect"  # the connection or pty is closed
    NOISE = "noise"  # DC2, DC4, XON and XOFF inserted anywhere
    # No byte at all to any query until clear_faults() or power_on(), or for
    # `seconds` when given: a powered-off control or a cable cut at its end.
    POWER_OFF = "power_off"


#: Faults drawn by ``fault_rate``. DISCONNECT is left out because a pty does
#: not come back by itself unless the server reopens it.
RANDOM_FAULTS = (
    Fault.GARBLE,
    Fault.TRUNCATE,
    Fault.HALF_THEN_SILENCE,
    Fault.TRICKLE,
    Fault.IGNORE,
    Fault.STALE_ECHO,
    Fault.NOISE,
)

DEFAULT_TRICKLE_SECONDS = 1.0

#: A query line longer than this without CR or LF is discarded.
MAX_QUERY_LENGTH = 64


@dataclass
class Reply:
    """Bytes to send for one query, each chunk after a delay in seconds."""

    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    disconnect: bool = False


@dataclass
class _InjectedFault:
    fault: Fault
    remaining: int
    seconds: float
    #: Only answers to this command get the fault; None means every command.
    command: str | None = None


class HaasProtocol:
    """Answer query bytes in Haas framing and apply faults; no I/O."""

    def __init__(
        self,
        machine: MachineModel,
        *,
        dc_codes: bool = False,
        xon_xoff: bool = False,
        fault_rate: float = 0.0,
        ignore_first_query: bool = False,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {fault_rate!r}")
        self.machine = machine
        self.dc_codes = dc_codes
        self.xon_xoff = xon_xoff
        self.fault_rate = fault_rate
        self.ignore_first_query = ignore_first_query
        self._rng = random.Random(None if seed is None else f"protocol-{seed}")
        self._lock = threading.Lock()
        self._faults: collections.deque[_InjectedFault] = collections.deque()
        self._line = bytearray()
        self._discarding = False  # skipping the rest of an overlong line
        self._first_query = True
        self._previous: tuple[str, str] | None = None  # (command, answer text)
        #: Monotonic time at which a power_off fault ends (inf: until cleared).
        self._powered_off_until: float | None = None

    def inject(self, fault: Fault | str, count: int = 1, **options: Any) -> None:
        """Apply ``fault`` to the next ``count`` answers, after earlier injections.

        ``trickle`` takes ``seconds``, the time over which one reply is spread.
        ``command`` (such as ``Q500``) limits the fault to answers to that
        command, so that a control can answer some commands and not others:
        ``inject("ignore", 1000, command="Q500")`` models a busy control.
        ``power_off`` ignores ``count`` and ``command``: the control sends
        nothing until ``clear_faults()`` or ``power_on()``, or for ``seconds``
        when that is given.

        Raises:
            ValueError: unknown fault, count below 1, an invalid command or an
                unknown option.
        """
        kind = Fault(fault)
        if count < 1:
            raise ValueError(f"fault count must be at least 1, got {count!r}")
        seconds_option = options.pop("seconds", None)
        seconds = float(
            DEFAULT_TRICKLE_SECONDS if seconds_option is None else seconds_option
        )
        command = options.pop("command", None)
        if options:
            raise ValueError(f"unknown fault options: {', '.join(sorted(options))}")
        if seconds < 0:
            raise ValueError(f"fault seconds must not be negative, got {seconds!r}")
        if kind is Fault.POWER_OFF:
            self.power_off(None if seconds_option is None else seconds)
            return
        if command is not None:
            command = validate_command(str(command))
        with self._lock:
            self._faults.append(_InjectedFault(kind, count, seconds, command))
        logger.info("fault injected: %s x%d (%s)", kind.value, count, command or "any")

    def power_off(self, seconds: float | None = None) -> None:
        """Send no byte to any query, for ``seconds`` or until ``power_on()``."""
        with self._lock:
            until = math.inf if seconds is None else time.monotonic() + seconds
            self._powered_off_until = until
        logger.info(
            "power off: %s (%s)",
            self.machine.name,
            "until power on" if seconds is None else f"for {seconds:g} s",
        )

    def power_on(self) -> None:
        """End a ``power_off`` fault."""
        with self._lock:
            was_off = self._powered_off_until is not None
            self._powered_off_until = None
        if was_off:
            logger.info("power on: %s", self.machine.name)

    @property
    def powered_off(self) -> bool:
        with self._lock:
            until = self._powered_off_until
            if until is not None and time.monotonic() >= until:
                self._powered_off_until = until = None
        return until is not None

    def clear_faults(self) -> None:
        """Drop every injected fault, a power_off included."""
        with self._lock:
            self._faults.clear()
        self.power_on()

    def connection_made(self) -> None:
        """Start a new connection: drop a partial query, arm the ignored first one."""
        self._line.clear()
        self._discarding = False
        self._first_query = True

    def receive(self, data: bytes) -> list[Reply]:
        """Return one reply per complete query line in ``data``."""
        replies = []
        for byte in data:
            if byte in (0x0D, 0x0A):
                if self._line and not self._discarding:
                    line = self._line.decode("ascii", errors="replace")
                    replies.append(self.reply_to(line))
                self._line.clear()
                self._discarding = False
            elif self._discarding:
                continue
            elif len(self._line) < MAX_QUERY_LENGTH:
                self._line.append(byte)
            else:
                logger.warning("query discarded: %r... (too long)", bytes(self._line))
                self._discarding = True
        return replies

    def reply_to(self, line: str) -> Reply:
        """Build the reply to one query line such as ``?Q500``."""
        logger.debug("query: %s %r", self.machine.name, line)
        if self.powered_off:
            logger.debug("query unanswered: %s %r (power off)", self.machine.name, line)
            return Reply()
        if self.ignore_first_query and self._first_query:
            self._first_query = False
            logger.info("query ignored: %s %r (first query)", self.machine.name, line)
            return Reply()
        self._first_query = False

        command, text = self._answer(line)
        fault = self._next_fault(command)
        if fault is not None and fault.fault is Fault.STALE_ECHO:
            text = self._stale_text(command)
        elif command is not None:
            self._previous = (command, text)
        return self._build_reply(text, fault)

    def _answer(self, line: str) -> tuple[str | None, str]:
        if not line.startswith("?"):
            return None, "UNKNOWN"
        try:
            command = validate_command(line[1:])
        except ValueError:
            return None, "UNKNOWN"
        return command, self.machine.answer(command)

    def _next_fault(self, command: str | None) -> _InjectedFault | None:
        with self._lock:
            for fault in self._faults:
                if fault.command is not None and fault.command != command:
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return _InjectedFault(self._rng.choice(RANDOM_FAULTS), 1, 1.0)
        return None

    def _stale_text(self, command: str | None) -> str:
        """Return an answer to an earlier query that differs from ``command``."""
        if command is not None and command.startswith(MACRO_COMMAND):
            variable = int(command.split()[1])
            previous = self._previous
            if previous and previous[0].startswith(MACRO_COMMAND):
                if int(previous[0].split()[1]) != variable:
                    return previous[1]
            other = next(v for v in sorted(MACRO_VARIABLES) if v != variable)
            return self.machine.answer(f"{MACRO_COMMAND} {other}")
        if self._previous and self._previous[0] != command:
            return self._previous[1]
        return self.machine.answer("Q102" if command == "Q100" else "Q100")

    def _build_reply(self, text: str, fault: _InjectedFault | None) -> Reply:
        kind = fault.fault if fault else None
        if kind is Fault.IGNORE:
            return Reply()
        if kind is Fault.DISCONNECT:
            return Reply(disconnect=True)
        if kind is Fault.GARBLE:
            text_bytes = self._garble(text.encode("ascii"))
        else:
            text_bytes = text.encode("ascii")

        frame = self._frame(text_bytes)
        if kind is Fault.TRUNCATE:
            cut = self._rng.randint(0, max(0, len(text_bytes) - 1))
            frame = self._frame(text_bytes[:cut]).split(bytes([ETB]))[0] + b"\r\n>"
        if kind is Fault.HALF_THEN_SILENCE:
            frame = frame[: max(1, len(frame) // 2)]
        if kind is Fault.NOISE or self.xon_xoff:
            frame = self._sprinkle(frame, noise=kind is Fault.NOISE)
        if kind is Fault.TRICKLE:
            delay = fault.seconds / max(1, len(frame))
            return Reply([(delay, frame[i : i + 1]) for i in range(len(frame))])
        return Reply([(0.0, frame)])

    def _frame(self, text: bytes) -> bytes:
        frame = bytes([STX]) + text + bytes([ETB]) + b"\r\n>"
        if self.dc_codes:
            frame = bytes([DC2]) + frame[:-1] + bytes([DC4]) + b">"
        return frame

    def _garble(self, text: bytes) -> bytes:
        # Every replacement byte is NUL or above 0x7F, so a client can always
        # detect the damage. The protocol has no checksum, so a printable
        # replacement would pass unnoticed, on a real line as here.
        data = bytearray(text)
        start = self._rng.randrange(len(data))
        for index in range(start, min(len(data), start + self._rng.randint(1, 3))):
            data[index] = self._rng.choice([0x00, *range(0x80, 0x100)])
        return bytes(data)

    def _sprinkle(self, frame: bytes, *, noise: bool) -> bytes:
        codes = [XON, XOFF, DC2, DC4] if noise else [XON, XOFF]
        data = bytearray(frame)
        for _ in range(self._rng.randint(1, 4)):
            position = self._rng.randint(0, len(data))
            data[position:position] = bytes([self._rng.choice(codes)])
        return bytes(data)


# ---------------------------------------------------------------------------
# Transports


class _Request:
    """A function to run in the server thread, with its outcome."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.function()
        except BaseException as exc:  # handed to the waiting thread
            self.error = exc
        finally:
            self.done.set()


class _Server:
    """Run a HaasProtocol on one connection at a time in a background thread.

    Replies are written when due. A new query drops the unsent part of the
    previous reply, as if the control abandoned it to answer the new one.
    """

    def __init__(self, protocol: HaasProtocol) -> None:
        self.protocol = protocol
        self.url = ""
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        self._requests: queue.Queue[_Request] = queue.Queue()
        self._pending: collections.deque[tuple[float, bytes | None]] = (
            collections.deque()
        )

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def inject(self, fault: Fault | str, count: int = 1, **options: Any) -> None:
        """Apply a fault to the next answers (see ``HaasProtocol.inject``)."""
        self.protocol.inject(fault, count, **options)

    def start(self) -> str:
        """Open the transport, start the server thread and return its URL."""
        self._open()
        self._thread = threading.Thread(
            target=self._run, name=f"cnc-sim-{self.protocol.machine.name}", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop the thread and close every descriptor; safe to call twice."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_read = self._wake_write = -1

    def _call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` in the server thread, or here if none runs."""
        if self._thread is None or not self._thread.is_alive():
            return function()
        request = _Request(function)
        self._requests.put(request)
        self._wake()
        if not request.done.wait(timeout=5):
            raise TimeoutError("simulator thread did not answer within 5 s")
        if request.error is not None:
            raise request.error
        return request.result

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"w")
        except OSError:
            pass

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._step()
        except Exception:
            logger.exception("simulator failed: %s", self.url)

    def _step(self) -> None:
        """Wait for input or the next due chunk, then handle both."""
        due = self._next_due()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        readable, _, _ = select.select(
            [self._wake_read, *self._descriptors()], [], [], timeout
        )
        if self._wake_read in readable:
            os.read(self._wake_read, 4096)
            while not self._requests.empty():
                self._requests.get_nowait().run()
        for fd in readable:
            if fd != self._wake_read:
                self._readable(fd)
        self._send_due()

    def _next_due(self) -> float | None:
        """Return the monotonic time of the next timed action, if any."""
        return self._pending[0][0] if self._pending else None

    def _handle_input(self, data: bytes) -> None:
        replies = self.protocol.receive(data)
        if not replies:
            return
        if self._pending:
            logger.debug("reply abandoned: %d unsent chunks", len(self._pending))
            self._pending.clear()
        due = time.monotonic()
        for reply in replies:
            for delay, chunk in reply.chunks:
                due += delay
                self._pending.append((due, chunk))
            if reply.disconnect:
                self._pending.append((due, None))

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._pending and self._pending[0][0] <= now:
            _, chunk = self._pending.popleft()
            if chunk is None:
                logger.info("fault disconnect: %s", self.url)
                self._pending.clear()
                self._disconnect()
                return
            logger.debug("reply: %s %r", self.url, chunk)
            self._send(chunk)

    # Transport specifics, overridden by subclasses.
    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _descriptors(self) -> list[int]:
        raise NotImplementedError

    def _readable(self, fd: int) -> None:
        raise NotImplementedError

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _disconnect(self) -> None:
        raise NotImplementedError


class PtyServer(_Server):
    """Serve on a pseudo-terminal; ``url`` is the device path to open.

    ``link``, when given, is a symbolic link kept pointing at the current
    device, so a client configuration survives ``reconnect()``. After a
    ``disconnect`` fault the device is gone until ``reconnect()``, or until
    ``reopen_seconds`` have passed when that is set.
    """

    def __init__(
        self,
        protocol: HaasProtocol,
        *,
        link: str | None = None,
        reopen_seconds: float | None = None,
    ) -> None:
        super().__init__(protocol)
        self.link = link
        self.reopen_seconds = reopen_seconds
        self._master = -1
        self._slave = -1
        self._reopen_at: float | None = None

    def stop(self) -> None:
        """Stop the server and remove the link, if any."""
        super().stop()
        if self.link and os.path.islink(self.link):
            os.unlink(self.link)

    def reconnect(self) -> str:
        """Replace the pty by a new one and return the new device path."""
        return self._call(self._reopen)

    def _reopen(self) -> str:
        self._close()
        self._open()
        return self.url

    def _open(self) -> None:
        master, slave = os.openpty()
        # Raw mode: no echo, no CR/LF translation, no line buffering, so the
        # bytes on the line are exactly those of a serial port.
        tty.setraw(slave)
        os.set_blocking(master, False)
        # The simulator keeps the slave open: with no slave descriptor open,
        # reading the master fails with EIO between two client connections.
        self._master, self._slave = master, slave
        self._reopen_at = None
        self.url = os.ttyname(slave)
        if self.link:
            temporary = f"{self.link}.tmp{os.getpid()}"
            os.symlink(self.url, temporary)
            os.replace(temporary, self.link)
        self.protocol.connection_made()
        logger.info("pty opened: %s (link %s)", self.url, self.link or "none")

    def _close(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        if self._master >= 0:
            logger.info("pty closed: %s", self.url)
        self._master = self._slave = -1

    def _descriptors(self) -> list[int]:
        if self._master < 0 and self._reopen_at is not None:
            if time.monotonic() >= self._reopen_at:
                self._open()
        return [self._master] if self._master >= 0 else []

    def _next_due(self) -> float | None:
        due = super()._next_due()
        if self._reopen_at is None:
            return due
        return self._reopen_at if due is None else min(due, self._reopen_at)

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return
        self._handle_input(data)

    def _send(self, data: bytes) -> None:
        if self._master < 0 or not data:
            return
        try:
            os.write(self._master, data)
        except BlockingIOError:
            logger.warning("reply dropped: %s (pty output buffer full)", self.url)

    def _disconnect(self) -> None:
        self._close()
        if self.reopen_seconds is not None:
            self._reopen_at = time.monotonic() + self.reopen_seconds


class TcpServer(_Server):
    """Serve one TCP client at a time; ``url`` is ``socket://HOST:PORT``.

    After the client disconnects, or a ``disconnect`` fault closes the
    connection, the next client is accepted.
    """

    def __init__(
        self, protocol: HaasProtocol, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(protocol)
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None

    def _open(self) -> None:
        listener = socket.create_server((self.host, self.port), backlog=4)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.url = f"socket://{self.host}:{self.port}"
        logger.info("listening: %s", self.url)

    def _close(self) -> None:
        self._disconnect()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _descriptors(self) -> list[int]:
        if self._client is not None:
            return [self._client.fileno()]
        if self._listener is not None:
            return [self._listener.fileno()]
        return []

    def _readable(self, fd: int) -> None:
        if self._client is None:
            assert self._listener is not None
            client, address = self._listener.accept()
            client.settimeout(1.0)
            self._client = client
            self.protocol.connection_made()
            logger.info("client connected: %s (from %s:%d)", self.url, *address[:2])
            return
        try:
            data = self._client.recv(4096)
        except OSError as exc:
            logger.info("client lost: %s (%s)", self.url, exc)
            data = b""
        if not data:
            self._disconnect()
            return
        self._handle_input(data)

    def _send(self, data: bytes) -> None:
        if self._client is None:
            return
        try:
            self._client.sendall(data)
        except OSError as exc:
            logger.info("client lost: %s (%s)", self.url, exc)
            self._disconnect()

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._pending.clear()
            logger.info("client disconnected: %s", self.url)


# ---------------------------------------------------------------------------
# Control port


class _ControlHandler(socketserver.StreamRequestHandler):
    """One control connection: a command per line, one reply line each."""

    server: _ControlServer

    def handle(self) -> None:
        for raw in self.rfile:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                reply = self.server.execute(line)
            except (ValueError, TypeError) as exc:
                reply = f"error: {exc}"
            self.wfile.write(reply.encode() + b"\n")
            self.wfile.flush()


class _ControlServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sim: _Server) -> None:
        super().__init__(address, _ControlHandler)
        self.sim = sim

    def execute(self, line: str) -> str:
        """Run one control command and return the reply line."""
        words = line.split()
        verb = words[0].lower()
        if verb == "fault" and len(words) >= 2:
            count = int(words[2]) if len(words) >= 3 else 1
            options = dict(word.split("=", 1) for word in words[3:])
            self.sim.inject(words[1], count, **options)
            return "ok"
        if verb == "clear":
            self.sim.protocol.clear_faults()
            return "ok"
        if verb == "url":
            return f"ok {self.sim.url}"
        if verb == "reconnect" and isinstance(self.sim, PtyServer):
            return f"ok {self.sim.reconnect()}"
        faults = " ".join(fault.value for fault in Fault)
        return (
            f"error: unknown command {line!r}; expected 'fault KIND [COUNT] "
            f"[seconds=S] [command=Q500]' (KIND: {faults}), 'clear', 'url' or "
            "'reconnect' (pty)"
        )


def start_control_server(sim: _Server, port: int) -> _ControlServer:
    """Serve control commands for ``sim`` on 127.0.0.1:``port`` in a thread."""
    server = _ControlServer(("127.0.0.1", port), sim)
    thread = threading.Thread(
        target=server.serve_forever, name="cnc-sim-control", daemon=True
    )
    thread.start()
    logger.info("control port listening: 127.0.0.1:%d", server.server_address[1])
    return server


# ---------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cnc-sim",
        description="Simulated Haas control answering Q-commands on a pty or TCP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    transport = parser.add_mutually_exclusive_group(required=True)
    transport.add_argument(
        "--pty",
        action="store_true",
        help="serve on a pseudo-terminal; prints its device path (or --link)",
    )
    transport.add_argument(
        "--tcp",
        type=int,
        metavar="PORT",
        help=(
            "serve on a TCP port (0 picks a free one) for one client at a time, "
            "as a serial-to-Ethernet converter does; prints the socket:// URL"
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="TCP address to bind")
    parser.add_argument(
        "--link", help="with --pty: symlink kept pointing at the current device"
    )
    parser.add_argument(
        "--reopen-seconds",
        type=float,
        default=2.0,
        help="with --pty: seconds before a new pty replaces a disconnected one",
    )
    parser.add_argument(
        "--pace", type=float, default=1.0, help="simulated seconds per real second"
    )
    parser.add_argument("--seed", type=int, help="random seed for a repeatable run")
    parser.add_argument(
        "--clock-skew",
        type=float,
        default=0.0,
        help="seconds the control's clock (#3011, #3012) runs ahead of the host's",
    )
    parser.add_argument(
        "--cycle-seconds",
        type=float,
        default=60.0,
        help="simulated length of one program cycle in seconds",
    )
    parser.add_argument(
        "--dc-codes", action="store_true", help="frame answers with DC2 ... DC4"
    )
    parser.add_argument(
        "--xon-xoff", action="store_true", help="sprinkle XON/XOFF bytes into answers"
    )
    parser.add_argument(
        "--ignore-first-query",
        action="store_true",
        help="leave the first query of each connection unanswered",
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="probability (0 to 1) that an answer gets a random fault",
    )
    parser.add_argument(
        "--control-port",
        type=int,
        help="TCP port on 127.0.0.1 accepting lines such as 'fault trickle 3'",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG shows raw traffic")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGTERM or SIGINT."""
    from cnc_common import logs

    args = _parse_args(argv)
    logs.configure(args.log_level, "text", role="cnc-sim")
    try:
        machine = MachineModel(
            seed=args.seed,
            cycle_seconds=args.cycle_seconds,
            pace=args.pace,
            clock_skew=args.clock_skew,
        )
        protocol = HaasProtocol(
            machine,
            dc_codes=args.dc_codes,
            xon_xoff=args.xon_xoff,
            fault_rate=args.fault_rate,
            ignore_first_query=args.ignore_first_query,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"cnc-sim: error: {exc}", file=sys.stderr)
        return 2
    if args.pty:
        sim: _Server = PtyServer(
            protocol, link=args.link, reopen_seconds=args.reopen_seconds
        )
    else:
        sim = TcpServer(protocol, host=args.host, port=args.tcp)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop.set())
    url = sim.start()
    control = (
        start_control_server(sim, args.control_port) if args.control_port else None
    )
    print(args.link if args.pty and args.link else url, flush=True)
    try:
        stop.wait()
    finally:
        logger.info("stopping: %s", url)
        if control is not None:
            control.shutdown()
            control.server_close()
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
