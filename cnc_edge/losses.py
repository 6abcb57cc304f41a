"""Loss reports waiting for a PubAck, kept in ``losses.jsonl``.

The edge reports the readings it will never send as loss reports (the
builder is ``cnc_common.coverage.loss_report``). A report is appended to
``losses.jsonl`` in the data directory when the loss happens and removed
only after the broker acknowledged it, so neither a crash nor an outage
loses the report itself. When the file cannot be written (a full disk),
the report stays in memory and the whole file is rewritten at the next
change.

A new report of the same boot and reason whose range touches or overlaps
a waiting one is merged into it, so a journal at its cap produces one
growing report and not one per dropped batch. The file is append-only
between rewrites, and loading it merges its lines the same way, so the
last line of a merged report wins.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from cnc_common.backoff import RateLimitedCounter, not_logged
from cnc_common.coverage import loss_msg_id, validate_loss
from cnc_common.errors import InvalidReading
from cnc_edge.journal import fsync_dir, open_append, write_new_private_file

log = logging.getLogger(__name__)

LOSSES = "losses.jsonl"


class LossLog:
    """The loss reports of one data directory that the broker has not acknowledged.

    Not thread-safe: the buffer process serialises calls with its lock.
    """

    def __init__(
        self, data_dir: Path, fsync: str = "interval", fsync_interval: float = 1.0
    ) -> None:
        self.path = data_dir / LOSSES
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        #: Reports not acknowledged yet, oldest first.
        self.pending: list[dict[str, Any]] = []
        self._fd: int | None = None
        self._lines = 0
        # True while the file does not contain every pending report (a write
        # failed) or still contains acknowledged ones (a rewrite failed).
        self._stale = False
        self._dirty = False
        self._last_fsync = time.monotonic()
        self._write_failures = RateLimitedCounter(interval=60.0)
        self._load()

    def _load(self) -> None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            handle = os.fdopen(os.open(self.path, flags), "rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            # A symlink planted in place of the file (ELOOP) is not followed.
            log.warning("loss reports not loaded: %s (%s)", self.path, exc)
            self._stale = True
            return
        with handle:
            for number, raw in enumerate(handle, start=1):
                self._lines += 1
                try:
                    data = orjson.loads(raw)
                    if not isinstance(data, dict):
                        raise InvalidReading("schema", "expected a JSON object")
                    report = validate_loss(data)
                except (orjson.JSONDecodeError, InvalidReading) as exc:
                    log.warning(
                        "loss report skipped: %s line %d is invalid (%s)",
                        self.path.name,
                        number,
                        exc,
                    )
                    continue
                self._merge(report)
        if self.pending:
            log.info(
                "loss reports loaded: %d waiting in %s", len(self.pending), self.path
            )

    # Adding and acknowledging -----------------------------------------

    def add(self, report: dict[str, Any]) -> bool:
        """Store a report; return False when it was merged into a waiting one."""
        entry, merged = self._merge(report)
        self._persist(entry)
        return not merged

    def _merge(self, report: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        for index, entry in enumerate(self.pending):
            if _touches(entry, report):
                # A new dict, never a change in place: the buffer matches
                # PubAcks by message id, and a report that grew while its
                # smaller version was in flight must stay pending.
                merged = _union(entry, report)
                self.pending[index] = merged
                return merged, True
        self.pending.append(report)
        return report, False

    def acknowledge(self, msg_ids: set[str]) -> list[dict[str, Any]]:
        """Forget the reports the broker acknowledged and return them."""
        done = [entry for entry in self.pending if loss_msg_id(entry) in msg_ids]
        if not done:
            return []
        self.pending = [e for e in self.pending if loss_msg_id(e) not in msg_ids]
        self._rewrite()
        return done

    # Files --------------------------------------------------------------

    def _persist(self, entry: dict[str, Any]) -> None:
        # Merged reports leave their older lines behind; rewrite before the
        # file grows far beyond the reports it contains.
        if self._stale or self._lines > 2 * len(self.pending) + 32:
            self._rewrite()
            return
        try:
            if self._fd is None:
                self._fd = open_append(self.path)
            os.write(self._fd, orjson.dumps(entry) + b"\n")
        except OSError as exc:
            self._write_failed(exc)
            return
        self._lines += 1
        self._dirty = True
        if self.fsync_policy == "always":
            self.sync()

    def _rewrite(self) -> None:
        """Replace the file with the pending reports, atomically."""
        self._close_fd()
        try:
            if not self.pending:
                self.path.unlink(missing_ok=True)
            else:
                tmp = self.path.with_suffix(".tmp")
                data = b"".join(orjson.dumps(entry) + b"\n" for entry in self.pending)
                write_new_private_file(tmp, data)
                if self.fsync_policy != "never":
                    _fsync_path(tmp)
                os.replace(tmp, self.path)
            if self.fsync_policy != "never":
                fsync_dir(self.path.parent)
        except OSError as exc:
            self._write_failed(exc)
            return
        self._lines = len(self.pending)
        self._stale = False
        self._dirty = False

    def _write_failed(self, exc: OSError) -> None:
        self._stale = True
        suppressed = self._write_failures.hit()
        if suppressed is None:
            return
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        log.warning(
            "loss report not written: %s (%s; %d reports kept in memory%s%s)",
            self.path,
            exc.strerror or exc,
            len(self.pending),
            ", the disk is full" if full else "",
            not_logged(suppressed),
        )

    def maybe_sync(self) -> None:
        """fsync when the interval policy makes it due; called on every tick."""
        if not self._dirty or self.fsync_policy != "interval":
            return
        if time.monotonic() - self._last_fsync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self._dirty and self.fsync_policy != "never":
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._write_failed(exc)
        self._dirty = False
        self._last_fsync = time.monotonic()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        if self._stale and self.pending:
            self._rewrite()
        self.sync()
        self._close_fd()


def _touches(entry: dict[str, Any], report: dict[str, Any]) -> bool:
    """True when both describe one boot and reason and their ranges meet."""
    return (
        entry["boot"] == report["boot"]
        and entry["reason"] == report["reason"]
        and report["seq_start"] <= entry["seq_end"] + 1
        and report["seq_end"] >= entry["seq_start"] - 1
    )


def _union(entry: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    merged = dict(entry)
    if report["seq_start"] < entry["seq_start"]:
        merged["seq_start"] = report["seq_start"]
        merged["ts_start"] = report["ts_start"]
    if report["seq_end"] > entry["seq_end"]:
        merged["seq_end"] = report["seq_end"]
        merged["ts_end"] = report["ts_end"]
    return merged


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
