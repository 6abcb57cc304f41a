"""Exceptions raised by the backend."""

from __future__ import annotations

from cnc_common.errors import CncError


class BackendError(CncError):
    """Base class of every error the backend raises on purpose."""


class StoreUnavailable(BackendError, ConnectionError):
    """PostgreSQL is unreachable, the connection dropped or a query timed out.

    The caller drops the connection and reconnects; nothing of the batch in
    hand was committed.
    """

    def __init__(self, target: str, problem: str, cause: BaseException) -> None:
        self.target = target
        self.problem = problem
        self.cause = cause
        super().__init__(f"postgres {target}: {problem} ({_describe(cause)})")


class MigrationError(BackendError):
    """A schema migration failed for a reason other than a lost connection."""

    def __init__(self, version: int, name: str, cause: BaseException) -> None:
        self.version = version
        self.name = name
        self.cause = cause
        super().__init__(f"migration {version} failed: {name} ({_describe(cause)})")


class NatsUnavailable(BackendError, ConnectionError):
    """NATS is unreachable, or the stream or consumer could not be set up."""

    def __init__(
        self, target: str, problem: str, cause: BaseException | None = None
    ) -> None:
        self.target = target
        self.problem = problem
        self.cause = cause
        detail = f" ({_describe(cause)})" if cause is not None else ""
        super().__init__(f"nats {target}: {problem}{detail}")


def _describe(cause: BaseException) -> str:
    """Return the error text on one line, or its class name if it has none."""
    return " ".join(str(cause).split()) or type(cause).__name__
