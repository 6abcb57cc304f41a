"""Exceptions of the edge agent."""

from __future__ import annotations

from cnc_common.errors import CncError


class EdgeError(CncError):
    """Base class of edge agent errors."""


class SerialLinkError(EdgeError, ConnectionError):
    """The serial device failed or is gone, so the caller must reopen the port.

    Raised for a pyserial ``SerialException``, an ``OSError`` or a termios error
    on the port, which includes a pseudo-terminal whose other side was closed
    and a ``socket://`` connection closed by the peer.
    """

    def __init__(self, port: str, detail: str) -> None:
        self.port = port
        self.detail = detail
        super().__init__(f"serial link lost: {port} ({detail})")


class AnswerError(EdgeError):
    """A controller answer is missing or unusable; no value is taken from it.

    ``kind`` is a short stable label (used as a metric label value),
    ``command`` the query such as ``Q600 5041`` (empty when the frame parser
    raised before a command was known) and ``detail`` a readable explanation.
    """

    kind = "garbled"

    def __init__(self, command: str, detail: str) -> None:
        self.command = command
        self.detail = detail
        prefix = f"{command}: " if command else ""
        super().__init__(f"{prefix}{self.kind}: {detail}")


class AnswerTimeout(AnswerError, TimeoutError):
    """No byte of an answer arrived before the query deadline."""

    kind = "timeout"


class PartialAnswer(AnswerError, TimeoutError):
    """Some bytes arrived, but no complete frame before the query deadline."""

    kind = "partial"


class GarbledAnswer(AnswerError, ValueError):
    """A frame contains invalid bytes, is too long, or its text cannot be parsed."""

    kind = "garbled"


class UnknownCommandAnswer(AnswerError):
    """The controller answered ``UNKNOWN`` because it does not support the query."""

    kind = "unknown_command"


class StaleAnswer(AnswerError):
    """The answer belongs to another query, such as a late answer to an earlier one.

    The controller echoes the query in the answer: the label (``TOOL CHANGES``
    for Q200) and, for Q600, the macro variable number.
    """

    kind = "stale_echo"
