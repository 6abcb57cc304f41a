"""The offline journal: JSON Lines files in the data directory.

Layout of ``<data_dir>``:

- ``current.jsonl``: readings appended while OFFLINE or SYNCING.
- ``sync/<ns>.jsonl``: rotated journals waiting for replay; the names sort
  by rotation time, so replay goes oldest first.
- ``quarantine.jsonl``: lines that could not be replayed, each with its
  source file, line number and the raw bytes.

Each line is one reading exactly as published (its ``v`` key is the format
version). Invariant: a reading handed to the journal stays in
``current.jsonl`` or ``sync/`` until the broker acknowledged it; a sync
file is deleted only after every line in it was acknowledged.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import orjson

log = logging.getLogger(__name__)

CURRENT = "current.jsonl"
SYNC_DIR = "sync"
QUARANTINE = "quarantine.jsonl"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_append(path: Path) -> BinaryIO:
    """Open a journal file for appending, readable by its owner only.

    O_NOFOLLOW refuses a symlink planted in place of the journal.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "ab")


class Journal:
    """Append-only writer of ``current.jsonl`` plus rotation and cleanup.

    Not thread-safe: the buffer process serialises calls with its lock.
    """

    def __init__(
        self, data_dir: Path, fsync: str = "interval", fsync_interval: float = 1.0
    ) -> None:
        self.data_dir = data_dir
        self.sync_dir = data_dir / SYNC_DIR
        self.current_path = data_dir / CURRENT
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sync_dir.mkdir(exist_ok=True, mode=0o700)
        self._file = None
        self._dirty = False
        self._last_fsync = time.monotonic()
        self._open()

    def _open(self) -> None:
        self._file = _open_append(self.current_path)
        self._terminate_torn_line()

    def _terminate_torn_line(self) -> None:
        """End a half-written last line left by a crash, so it stays one bad line.

        Without the newline the next record would be glued to the fragment
        and both would be lost at replay.
        """
        size = self.current_path.stat().st_size
        if size == 0:
            return
        with open(self.current_path, "rb") as handle:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                log.warning(
                    "torn line: %s ends without a newline, closing it",
                    self.current_path,
                )
                self._file.write(b"\n")
                self._file.flush()

    def append(self, payloads: list[bytes]) -> None:
        """Append readings; durable per the fsync policy when this returns."""
        if not payloads:
            return
        self._file.write(b"\n".join(payloads) + b"\n")
        self._file.flush()
        self._dirty = True
        if self.fsync_policy == "always":
            self.sync()
        else:
            self.maybe_sync()

    def maybe_sync(self) -> None:
        """fsync if the interval policy says it is due; called on every tick."""
        if not self._dirty or self.fsync_policy != "interval":
            return
        if time.monotonic() - self._last_fsync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        if self._file is not None and self._dirty and self.fsync_policy != "never":
            os.fsync(self._file.fileno())
        self._dirty = False
        self._last_fsync = time.monotonic()

    def current_size(self) -> int:
        if self._file is not None:
            return self._file.tell()
        try:
            return self.current_path.stat().st_size
        except FileNotFoundError:
            return 0

    def rotate(self) -> Path | None:
        """Move ``current.jsonl`` into ``sync/`` and start a new one.

        Returns the new sync file, or None when there was nothing to rotate.
        The rename is atomic, and both directories are fsynced, so after a
        crash the readings are in exactly one of the two places.
        """
        if self.current_size() == 0:
            return None
        if self.fsync_policy != "never":
            os.fsync(self._file.fileno())
        target = self.sync_dir / f"{time.time_ns():020d}.jsonl"
        os.rename(self.current_path, target)
        self._file.close()
        self._file = None
        fsync_dir(self.sync_dir)
        fsync_dir(self.data_dir)
        self._file = _open_append(self.current_path)
        self._dirty = False
        log.info("journal rotated: %s (%d bytes)", target.name, target.stat().st_size)
        return target

    def sync_files(self) -> list[Path]:
        return sorted(self.sync_dir.glob("*.jsonl"))

    def remove(self, path: Path) -> None:
        """Delete a sync file whose every reading was acknowledged."""
        path.unlink()
        fsync_dir(self.sync_dir)

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def read_journal(
    path: Path, quarantine: Path, on_quarantine: Callable[[], None] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(reading id, line)`` for every valid line of a journal file.

    A line that is not UTF-8 JSON with a string ``id`` (a torn write, a bad
    sector) is copied to ``quarantine`` with its file and line number and
    logged; it never stops the lines after it from being replayed.
    """
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip(b"\n")
            if not line:
                continue
            reading_id = _line_id(line)
            if reading_id is None:
                quarantine_line(quarantine, path, number, line)
                if on_quarantine is not None:
                    on_quarantine()
                continue
            yield reading_id, line


def _line_id(line: bytes) -> str | None:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return data["id"]
    return None


def quarantine_line(quarantine: Path, source: Path, number: int, line: bytes) -> None:
    record = {
        "source": source.name,
        "line": number,
        "quarantined_at": time.time(),
        "raw_b64": base64.b64encode(line).decode(),
    }
    with open(quarantine, "ab") as handle:
        handle.write(orjson.dumps(record) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.warning(
        "journal line quarantined: %s line %d (%d bytes)",
        source.name,
        number,
        len(line),
    )
