"""Haas Machine Data Collection: Q-command queries over a serial line.

The host sends ``?Q500`` followed by CR LF (``?Q600 5041`` for a macro
variable). The control answers ``STX <CSV text> ETB CR LF >``, the CSV text
being a label followed by values, for example ``\\x02MODE, (MEM)\\x17\\r\\n>``,
or ``UNKNOWN`` for a query it does not support. With DC-code synchronisation
it also sends DC2 before and DC4 after the data, and XON/XOFF bytes may
appear anywhere. The protocol has no checksum, so a corrupted byte that is
still printable ASCII cannot be detected here unless the field parser
rejects the value.

The frame and field parsers are pure functions. ``HaasClient`` adds the I/O
on a pyserial port object (a device, a pty path, ``socket://`` or ``loop://``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import serial

from cnc_edge.errors import (
    AnswerError,
    AnswerTimeout,
    GarbledAnswer,
    PartialAnswer,
    SerialLinkError,
    StaleAnswer,
    UnknownCommandAnswer,
)

try:
    import termios

    _TERMIOS_ERRORS: tuple[type[BaseException], ...] = (termios.error,)
except ImportError:  # Windows has no termios; pyserial wraps its errors there.
    _TERMIOS_ERRORS = ()

logger = logging.getLogger(__name__)

STX = 0x02
ETB = 0x17
XON = 0x11
DC2 = 0x12
XOFF = 0x13
DC4 = 0x14
PROMPT = ord(">")

#: Flow-control and DC-code synchronisation bytes, removed wherever they occur.
FLOW_CONTROL_BYTES = bytes([XON, DC2, XOFF, DC4])

#: Longest accepted frame text in bytes. Real answers are under 60 bytes, so a
#: longer frame means a lost ETB, and the buffer is resynchronised.
MAX_FRAME_LENGTH = 256

#: Bytes that may follow a frame (CR LF and the prompt) and are not answer data.
_TRAILER_BYTES = frozenset(b"\r\n>") | frozenset(FLOW_CONTROL_BYTES)

#: How long to wait for the prompt after a complete frame, so that it is not
#: left in the input and read as noise by the next query. 0.1 s covers the
#: three bytes CR LF ``>`` at 1200 baud.
PROMPT_GRACE_SECONDS = 0.1

#: Largest read per call, to keep the buffer bounded when a port floods.
_READ_CHUNK = 4096

_SIMPLE_COMMANDS = frozenset(
    ["Q100", "Q101", "Q102", "Q104", "Q200", "Q201", "Q300", "Q301", "Q303"]
    + ["Q402", "Q500"]
)
MACRO_COMMAND = "Q600"

#: Commands that ``validate_command`` accepts; Q600 also needs a variable number.
SUPPORTED_COMMANDS = tuple(sorted(_SIMPLE_COMMANDS | {MACRO_COMMAND}))

#: A poll set covering identity, mode, counters, timers and execution state.
DEFAULT_COMMANDS = (
    "Q100",
    "Q104",
    "Q200",
    "Q201",
    "Q300",
    "Q301",
    "Q303",
    "Q402",
    "Q500",
)

# NOTE: 99999 is a guessed upper bound; Haas macro variables documented for the
# classic control stop below 14000, and newer controls may use higher numbers.
MAX_MACRO_VARIABLE = 99999

_COMMAND_PATTERN = re.compile(r"^(Q\d{3})(?: +(\d+))?$")
_INT_PATTERN = re.compile(r"^\d+$")
_FLOAT_PATTERN = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_DURATION_PATTERN = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")


def validate_command(command: str) -> str:
    """Check a query such as ``Q500`` or ``Q600 5041`` and return it normalised.

    Surrounding blanks are removed and the letter is upper-cased.

    Raises:
        ValueError: the command is not a supported query.
    """
    normalised = " ".join(command.split()).upper()
    supported = ", ".join(SUPPORTED_COMMANDS)
    match = _COMMAND_PATTERN.match(normalised)
    if match is None:
        raise ValueError(
            f"invalid Haas query {command!r}: expected one of {supported}, "
            "written without the leading '?', with a variable number after "
            "Q600 (for example 'Q600 5041')"
        )
    name, variable = match.groups()
    if name == MACRO_COMMAND:
        if variable is None:
            raise ValueError(
                f"invalid Haas query {command!r}: Q600 needs a macro variable "
                "number, for example 'Q600 5041'"
            )
        if not 1 <= int(variable) <= MAX_MACRO_VARIABLE:
            raise ValueError(
                f"invalid Haas query {command!r}: the macro variable must be "
                f"between 1 and {MAX_MACRO_VARIABLE}"
            )
        return f"{name} {int(variable)}"
    if name not in _SIMPLE_COMMANDS:
        raise ValueError(
            f"unsupported Haas query {command!r}: expected one of {supported}"
        )
    if variable is not None:
        raise ValueError(f"invalid Haas query {command!r}: {name} takes no argument")
    return name


def encode_query(command: str) -> bytes:
    """Return the bytes sent for a validated command: ``?`` + command + CR LF."""
    return b"?" + command.encode("ascii") + b"\r\n"


# ---------------------------------------------------------------------------
# Frames


def strip_flow_control(data: bytes | bytearray) -> bytes:
    """Remove DC2, DC4, XON and XOFF bytes."""
    return bytes(data).translate(None, FLOW_CONTROL_BYTES)


def extract_frame(buffer: bytearray, max_length: int = MAX_FRAME_LENGTH) -> str | None:
    """Remove the first complete frame from ``buffer`` and return its text.

    Flow-control bytes are stripped from the whole buffer and bytes before the
    first STX are discarded. When no complete frame is present yet, the buffer
    keeps only the started frame and the function returns None, so the buffer
    never grows beyond ``max_length`` + 1 bytes plus the last chunk appended.
    An unfinished frame followed by a new STX is dropped without error: it is
    the cut-off rest of an earlier answer.

    Raises:
        GarbledAnswer: the frame contains a byte other than printable ASCII,
            or exceeds ``max_length``. The bad part is removed from the buffer,
            so the next call continues with the bytes after it.
    """
    buffer[:] = strip_flow_control(buffer)
    while True:
        start = buffer.find(STX)
        if start < 0:
            buffer.clear()
            return None
        del buffer[:start]

        end = buffer.find(ETB)
        restart = buffer.find(STX, 1)
        if restart >= 0 and (end < 0 or restart < end):
            logger.debug(
                "frame dropped: %r (cut off by a new STX)", bytes(buffer[:restart])
            )
            del buffer[:restart]
            continue

        text_end = end if end >= 0 else len(buffer)
        _check_frame_text(buffer, text_end, max_length)
        if end < 0:
            return None
        text = buffer[1:end].decode("ascii")
        del buffer[: end + 1]
        return text


def _check_frame_text(buffer: bytearray, text_end: int, max_length: int) -> None:
    """Raise GarbledAnswer for an invalid byte or an overlong frame text.

    ``buffer`` starts with STX; on error the frame is removed up to and
    including the offending byte, or entirely when it is too long.
    """
    for index in range(1, text_end):
        byte = buffer[index]
        if not 0x20 <= byte <= 0x7E:
            del buffer[: index + 1]
            raise GarbledAnswer(
                "", f"invalid byte 0x{byte:02x} at offset {index - 1} of a frame"
            )
    if text_end - 1 > max_length:
        # The ETB was lost; whatever follows up to the next STX is noise.
        del buffer[:text_end]
        raise GarbledAnswer("", f"frame longer than {max_length} bytes")


# ---------------------------------------------------------------------------
# Answers

#: Expected label of each answer, upper case with single spaces. Q101 is absent
#: because its label differs between software versions.
ANSWER_LABELS = {
    "Q100": "SERIAL NUMBER",
    "Q102": "MODEL",
    "Q104": "MODE",
    "Q200": "TOOL CHANGES",
    "Q201": "USING TOOL",
    "Q300": "P.O. TIME",
    "Q301": "C.S. TIME",
    "Q303": "LAST CYCLE",
    "Q402": "M30 #1",
    "Q600": "MACRO",
}
_Q500_LABELS = ("PROGRAM", "STATUS")


def _label_key(label: str) -> str:
    """Compare labels by letters, digits and '#' only: "C.S.TIME" is "C.S. TIME"."""
    return re.sub(r"[^A-Z0-9#]", "", label.upper())


_KNOWN_LABELS = frozenset(
    _label_key(label) for label in (*ANSWER_LABELS.values(), *_Q500_LABELS)
)


def parse_duration(text: str) -> int:
    """Parse ``HHHHH:MM:SS`` (any number of hour digits) into seconds.

    Raises:
        ValueError: the text is not such a duration.
    """
    match = _DURATION_PATTERN.match(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: expected hours:MM:SS")
    hours, minutes, seconds = (int(part) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _parse_int(text: str) -> int:
    if not _INT_PATTERN.match(text):
        raise ValueError(f"invalid count {text!r}: expected digits only")
    return int(text)


def _parse_float(text: str) -> float:
    if not _FLOAT_PATTERN.match(text):
        raise ValueError(f"invalid number {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"invalid number {text!r}: not finite")
    return value


def _parse_text(text: str) -> str:
    if not text:
        raise ValueError("empty value")
    return text


def _parse_mode(text: str) -> str:
    mode = text.removeprefix("(").removesuffix(")").strip()
    if not mode:
        raise ValueError(f"empty mode {text!r}")
    return mode


#: Field name under which each single-value command stores its value, and its
#: parser. Q500 and Q600 have their own functions.
_VALUE_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Q100": ("serial_number", _parse_text),
    "Q101": ("software_version", _parse_text),
    "Q102": ("model", _parse_text),
    "Q104": ("mode", _parse_mode),
    "Q200": ("tool_changes", _parse_int),
    "Q201": ("tool_in_use", _parse_int),
    "Q300": ("power_on_seconds", parse_duration),
    "Q301": ("motion_seconds", parse_duration),
    "Q303": ("last_cycle_seconds", parse_duration),
    "Q402": ("m30_parts", _parse_int),
}


def parse_answer(command: str, text: str) -> dict[str, Any]:
    """Parse the text of a frame answering ``command`` into typed fields.

    ``command`` must be validated (see ``validate_command``). Q600 returns
    ``{"macros": {"<variable>": value}}``.

    Raises:
        UnknownCommandAnswer: the controller answered ``UNKNOWN``.
        StaleAnswer: the label or the echoed variable belongs to another query.
        GarbledAnswer: the text does not have the expected form.
    """
    values = [value.strip() for value in text.split(",")]
    label = " ".join(values[0].split()).upper()
    if label == "UNKNOWN" and len(values) == 1:
        raise UnknownCommandAnswer(command, "the controller does not support it")

    name = command.split()[0]
    try:
        if name == "Q500":
            return _parse_q500(command, label, values)
        _check_label(command, label, ANSWER_LABELS.get(name))
        if name == MACRO_COMMAND:
            return _parse_q600(command, values)
        return _parse_single_value(command, values)
    except AnswerError:
        raise
    except ValueError as exc:
        raise GarbledAnswer(command, f"{exc} in answer {text!r}") from None


def _check_label(command: str, label: str, expected: str | None) -> None:
    if expected is None or _label_key(label) == _label_key(expected):
        return
    if _label_key(label) in _KNOWN_LABELS:
        raise StaleAnswer(command, f"answer labelled {label!r}, expected {expected!r}")
    # Label text varies between software versions; a label that belongs to no
    # other command is taken as this command's, and the value is still checked.
    logger.debug("unfamiliar label: %r for %s (expected %r)", label, command, expected)


def _check_count(values: list[str], expected: int) -> None:
    if len(values) != expected:
        raise ValueError(
            f"expected {expected} comma-separated values, got {len(values)}"
        )


def _parse_single_value(command: str, values: list[str]) -> dict[str, Any]:
    _check_count(values, 2)
    field_name, parse = _VALUE_FIELDS[command]
    return {field_name: parse(values[1])}


def _parse_q500(command: str, label: str, values: list[str]) -> dict[str, Any]:
    # Two forms: "PROGRAM, O00110, IDLE, PARTS, 4404" and, while the control
    # runs a program, "STATUS, BUSY".
    if label == "STATUS":
        _check_count(values, 2)
        return {"execution": _parse_text(values[1]).upper()}
    if label != "PROGRAM":
        if _label_key(label) in _KNOWN_LABELS:
            raise StaleAnswer(command, f"answer labelled {label!r}, expected PROGRAM")
        raise ValueError(f"unexpected label {label!r}, expected PROGRAM or STATUS")
    _check_count(values, 5)
    if values[3].upper() != "PARTS":
        raise ValueError(f"expected PARTS as fourth value, got {values[3]!r}")
    return {
        "program": _parse_text(values[1]),
        "execution": " ".join(_parse_text(values[2]).split()).upper(),
        "parts": _parse_int(values[4]),
    }


def _parse_q600(command: str, values: list[str]) -> dict[str, Any]:
    # "MACRO, 5041, 234.5670": the echoed variable number tells a late answer
    # to an earlier Q600 from the answer to this one.
    _check_count(values, 3)
    requested = command.split()[1]
    echoed = values[1].removeprefix("#")
    if not _INT_PATTERN.match(echoed):
        raise ValueError(f"invalid variable number {values[1]!r}")
    if int(echoed) != int(requested):
        raise StaleAnswer(
            command, f"answer echoes variable {int(echoed)}, expected {requested}"
        )
    return {"macros": {requested: _parse_float(values[2])}}


# ---------------------------------------------------------------------------
# Client


#: Error kind of the commands of a cycle cut short by a stop request.
STOPPED = "stopped"


@dataclass
class PollResult:
    """Outcome of one poll: typed fields and, per failed command, an error kind.

    ``sent`` lists the commands sent, and ``silent`` those of them to which
    not a single byte came back before the deadline. Flow-control bytes and
    the CR LF ``>`` of an earlier answer count as bytes here, because any
    byte shows that the controller is powered.
    """

    fields: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)


class HaasClient:
    """Query a Haas control through an open pyserial port object.

    The client never opens or closes the port. When the port fails it raises
    SerialLinkError, and the caller reopens the port and builds a new client.
    """

    def __init__(
        self,
        port: serial.SerialBase,
        *,
        query_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if query_timeout <= 0:
            raise ValueError(f"query_timeout must be positive, got {query_timeout!r}")
        self._port = port
        self._query_timeout = query_timeout
        self._clock = clock
        self._name = str(getattr(port, "port", None) or port)
        #: Bytes read from the port since the last query was sent.
        self.received_bytes = 0

    def prime(self) -> bool:
        """Send ``?Q100`` once and return whether the control answered.

        Some controls ignore the first query after the port opens, so the
        caller runs this once after opening the port. A missing or bad answer
        is not an error here.

        Raises:
            SerialLinkError: the port failed.
        """
        try:
            self.query("Q100")
        except AnswerError as exc:
            logger.debug("prime: %s (no usable answer: %s)", self._name, exc)
            return False
        return True

    def poll(
        self,
        commands: list[str] | tuple[str, ...],
        should_stop: Callable[[], bool] | None = None,
    ) -> PollResult:
        """Run each command in turn and merge the fields of those that succeeded.

        A failed command adds no field, only its error kind in ``errors``.
        When ``should_stop`` returns true before a command, that command and
        the rest are recorded as ``stopped`` and not sent, so that a stop
        waits for at most one query deadline.

        Raises:
            SerialLinkError: the port failed; the poll is abandoned.
        """
        result = PollResult()
        for position, command in enumerate(commands):
            if should_stop is not None and should_stop():
                for skipped in commands[position:]:
                    result.errors[skipped] = STOPPED
                break
            result.sent.append(command)
            try:
                fields = self.query(command)
            except AnswerError as exc:
                result.errors[command] = exc.kind
                if self.received_bytes == 0:
                    result.silent.append(command)
                continue
            macros = fields.pop("macros", None)
            if macros is not None:
                result.fields.setdefault("macros", {}).update(macros)
            result.fields.update(fields)
        return result

    def query(self, command: str) -> dict[str, Any]:
        """Send one command and return the typed fields of its answer.

        The whole read, however slowly the bytes arrive, ends at one deadline
        ``query_timeout`` seconds after sending. An answer that belongs to
        another query is skipped and the read goes on until the deadline.

        Raises:
            ValueError: the command is not supported (see ``validate_command``).
            AnswerError: a subclass naming what was wrong with the answer.
            SerialLinkError: the port failed.
        """
        command = validate_command(command)
        original_timeout = self._port.timeout
        try:
            return self._exchange(command)
        except AnswerError as exc:
            logger.debug("query failed: %s %s (%s)", self._name, command, exc)
            raise
        finally:
            self._restore_timeout(original_timeout)

    def _exchange(self, command: str) -> dict[str, Any]:
        # Input still waiting is a late answer to an earlier query. Bytes that
        # arrive after this reset are handled by the label and echo checks.
        self._link_call(self._port.reset_input_buffer)
        self.received_bytes = 0
        query = encode_query(command)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("send: %s %r", self._name, query)
        self._link_call(self._port.write, query)
        self._link_call(self._port.flush)

        deadline = self._clock() + self._query_timeout
        reader = _FrameReader(self, command, deadline)
        while True:
            text = reader.next_frame()
            try:
                fields = parse_answer(command, text)
            except StaleAnswer as exc:
                logger.debug("answer skipped: %s (%s)", self._name, exc)
                reader.stale = exc
                continue
            reader.drain_prompt()
            return fields

    def _read(self, timeout: float) -> bytes:
        """Read what is available, waiting at most ``timeout`` seconds."""
        self._link_call(setattr, self._port, "timeout", max(timeout, 0.0))
        waiting = self._link_call(lambda: self._port.in_waiting)
        size = min(max(1, waiting), _READ_CHUNK)
        data = self._link_call(self._port.read, size)
        self.received_bytes += len(data)
        if data and logger.isEnabledFor(logging.DEBUG):
            logger.debug("receive: %s %r", self._name, data)
        return data

    def _restore_timeout(self, timeout: float | None) -> None:
        try:
            self._port.timeout = timeout
        except (serial.SerialException, OSError, *_TERMIOS_ERRORS):
            # The port is already failing and the error of the query itself
            # is the one that reaches the caller.
            pass

    def _link_call(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except (serial.SerialException, OSError, *_TERMIOS_ERRORS) as exc:
            raise SerialLinkError(self._name, str(exc) or type(exc).__name__) from exc


class _FrameReader:
    """Collects bytes for one query until a frame is complete or the deadline."""

    def __init__(self, client: HaasClient, command: str, deadline: float) -> None:
        self._client = client
        self._command = command
        self._deadline = deadline
        self._buffer = bytearray()
        self._received_data = False
        self.stale: StaleAnswer | None = None

    def next_frame(self) -> str:
        """Return the text of the next complete frame.

        Raises:
            GarbledAnswer: the frame was invalid.
            StaleAnswer: only frames of other queries arrived before the deadline.
            PartialAnswer: some answer bytes but no complete frame arrived.
            AnswerTimeout: no answer byte arrived at all.
        """
        while True:
            try:
                text = extract_frame(self._buffer)
            except GarbledAnswer as exc:
                raise GarbledAnswer(self._command, exc.detail) from None
            if text is not None:
                return text

            remaining = self._deadline - self._client._clock()
            if remaining <= 0:
                raise self._deadline_error()
            chunk = self._client._read(remaining)
            # CR, LF and the prompt left over from an earlier answer, and
            # flow-control bytes, do not make a timeout "partial".
            if not self._received_data and any(b not in _TRAILER_BYTES for b in chunk):
                self._received_data = True
            self._buffer += chunk

    def drain_prompt(self) -> None:
        """Read the CR LF ``>`` after a frame, briefly, so no query sees it as noise."""
        grace_end = min(self._deadline, self._client._clock() + PROMPT_GRACE_SECONDS)
        while PROMPT not in self._buffer:
            remaining = grace_end - self._client._clock()
            if remaining <= 0:
                return
            self._buffer += self._client._read(remaining)

    def _deadline_error(self) -> AnswerError:
        timeout = self._client._query_timeout
        if self.stale is not None:
            return self.stale
        if self._received_data:
            return PartialAnswer(
                self._command, f"no complete frame within {timeout:g} s"
            )
        return AnswerTimeout(self._command, f"no answer within {timeout:g} s")
