"""Exceptions shared by the edge agent and the backend."""

from __future__ import annotations

from typing import Any


class CncError(Exception):
    """Base class of every error raised on purpose by cnc-monitor."""


class ConfigError(CncError, ValueError):
    """A configuration file or environment override is invalid.

    The message names the file, the key, the offending value and what is
    expected, so that an operator can fix the file without reading code.
    """

    def __init__(
        self,
        source: str,
        key: str,
        reason: str,
        value: Any = None,
        *,
        show_value: bool = True,
    ) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        self.value = value
        shown = f" (got {value!r})" if show_value and value is not None else ""
        super().__init__(f"{source}: invalid {key}{shown}: {reason}")


class InvalidReading(CncError, ValueError):
    """A payload is not a valid reading; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"invalid reading ({reason}): {detail}")


class DiagramUnavailable(CncError, RuntimeError):
    """A state diagram cannot be drawn in the requested format.

    ``reason`` says what is missing or failed, such as the Graphviz ``dot``
    program; Mermaid output needs nothing beyond transitions and is the
    fallback.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"diagram unavailable: {reason}")
