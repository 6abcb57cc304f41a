"""Logging set-up for the entry points: text or JSON, one line per event."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_CONTEXT: dict[str, Any] = {}


class _ContextFilter(logging.Filter):
    """Attach the process-wide context (machine id, role) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT:
            entry[key] = getattr(record, key, None)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def set_context(**values: Any) -> None:
    """Set fields shown on every log line of this process, e.g. role and machine."""
    _CONTEXT.update(values)


def configure(level: str = "INFO", fmt: str = "text", **context: Any) -> None:
    """Configure the root logger once per process: stderr, text or JSON."""
    set_context(**context)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = " ".join(f"%({key})s" for key in _CONTEXT)
        pattern = f"%(asctime)s %(levelname)s {prefix} %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(pattern.replace("  ", " ")))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at ERROR through its own callbacks;
    # ours count and rate-limit them instead.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # transitions logs every callback at INFO; our machines log one line per
    # state change themselves.
    logging.getLogger("transitions").setLevel(logging.WARNING)
