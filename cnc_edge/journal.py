"""The offline journal: JSON Lines files in the data directory.

Layout of ``<data_dir>``:

- ``current.jsonl``: readings appended while OFFLINE or SYNCING.
- ``sync/<ns>.jsonl``: rotated journals waiting for replay; the names sort
  by rotation time, so replay goes oldest first. ``<ns>.progress`` next to
  one contains the byte offset up to which its readings were acknowledged, so
  a restart does not resend the whole file.
- ``quarantine.jsonl``: lines that could not be replayed, each with its
  source file, line number and the raw bytes.
- ``reducing.jsonl``: the readings in the reducer's open window (see
  ``WindowFile``), until the window closes into a reduced record.

Each line is one reading exactly as published (its ``v`` key is the format
version), or a reduced record (``"type": "reduced"``) that stands for a run
of readings. Invariant: a reading handed to the journal stays in
``current.jsonl`` or ``sync/`` until the broker acknowledged it, unless it
is dropped and counted because the journal reached ``max_bytes`` or the
disk is full. A sync file is deleted only after every line in it was
acknowledged. Each drop is described in ``AppendResult.losses`` by the
sequence ranges it cost, so that the buffer can report it.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from cnc_common.coverage import reduced_msg_id, validate_reduced
from cnc_common.errors import InvalidReading
from cnc_edge.crashpoints import crash_point

log = logging.getLogger(__name__)

CURRENT = "current.jsonl"
WINDOW = "reducing.jsonl"
SYNC_DIR = "sync"
QUARANTINE = "quarantine.jsonl"

DROP_OLDEST = "drop_oldest"
DROP_NEWEST = "drop_newest"

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: Path) -> int:
    """Open a journal file for appending, readable by its owner only.

    O_NOFOLLOW refuses a symlink planted in place of the journal.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


def write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` anew, readable by its owner only, and write ``data``.

    Whatever is at ``path`` is unlinked first. O_EXCL with O_NOFOLLOW then
    fails instead of writing through a symlink planted in its place, and
    the mode does not depend on the umask. Callers rename the file over
    its final name.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or take group and other access away."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o700)
        log.warning("permissions tightened: %s (was %o, now 700)", path, mode)


#: Loss report reason (cnc_common.coverage) for each drop reason of AppendResult.
LOSS_REASONS = {"journal_full": "journal_cap", "disk_full": "disk_full"}


@dataclass(frozen=True)
class Loss:
    """Readings of one boot that the journal dropped: ``seq_start..seq_end``.

    The range runs from the lowest to the highest dropped sequence number,
    so it may include readings that were published live in between.
    """

    boot: str
    seq_start: int
    seq_end: int
    ts_start: str | None
    ts_end: str | None
    reason: str
    detail: str


class SeqRanges:
    """Collect the lowest and highest sequence number per boot of journal lines."""

    def __init__(self) -> None:
        #: boot -> [seq_start, ts_start, seq_end, ts_end]
        self._bounds: dict[str, list[Any]] = {}
        #: Readings beyond one per line: a reduced record of ``count``
        #: readings adds ``count - 1``.
        self.extra_readings = 0

    def add(self, boot: str, seq: int, ts: str | None) -> None:
        bounds = self._bounds.get(boot)
        if bounds is None:
            self._bounds[boot] = [seq, ts, seq, ts]
            return
        if seq < bounds[0]:
            bounds[0], bounds[1] = seq, ts
        if seq > bounds[2]:
            bounds[2], bounds[3] = seq, ts

    def add_line(self, line: bytes) -> None:
        """Add a reading or a reduced record; ignore a line that is neither."""
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(data, dict) or not isinstance(data.get("boot"), str):
            return
        boot = data["boot"]
        if data.get("type") == "reduced":
            start, end = data.get("seq_start"), data.get("seq_end")
            if _is_seq(start) and _is_seq(end):
                self.add(boot, start, iso_ts_or_none(data.get("ts_start")))
                self.add(boot, end, iso_ts_or_none(data.get("ts_end")))
            count = data.get("count")
            if isinstance(count, int) and count > 1:
                self.extra_readings += count - 1
        elif _is_seq(data.get("seq")):
            self.add(boot, data["seq"], iso_ts_or_none(data.get("ts")))

    def add_lines(self, lines: Iterable[bytes]) -> SeqRanges:
        for line in lines:
            self.add_line(line)
        return self

    def losses(self, reason: str, detail: str) -> list[Loss]:
        return [
            Loss(boot, start, end, ts_start, ts_end, LOSS_REASONS[reason], detail)
            for boot, (start, ts_start, end, ts_end) in self._bounds.items()
        ]


def _is_seq(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def iso_ts_or_none(value: Any) -> str | None:
    """Return ``value`` if it is an ISO 8601 time with a zone, else None.

    A loss report with any other time would fail validation when the buffer
    loads losses.jsonl again, and at the backend.
    """
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return value if parsed.tzinfo is not None else None


@dataclass
class AppendResult:
    """Outcome of one ``Journal.append`` call: readings written and dropped."""

    written: int = 0
    #: Readings dropped: new ones (drop_newest, disk full) or old ones
    #: deleted to make room (drop_oldest). A reduced record counts as the
    #: readings it stands for.
    dropped: int = 0
    #: ``journal_full`` or ``disk_full`` when anything was dropped.
    reason: str | None = None
    #: The sequence ranges of the dropped readings, per boot and drop.
    losses: list[Loss] = field(default_factory=list)

    def drop(self, count: int, reason: str, ranges: SeqRanges, detail: str) -> None:
        self.dropped += count
        self.reason = reason
        self.losses.extend(ranges.losses(reason, detail))


class Journal:
    """Append-only writer of ``current.jsonl`` plus rotation, caps and cleanup.

    Not thread-safe: the buffer process serialises calls with its lock.
    """

    def __init__(
        self,
        data_dir: Path,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_bytes: int = 0,
        full_policy: str = DROP_NEWEST,
        segment_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.data_dir = data_dir
        self.sync_dir = data_dir / SYNC_DIR
        self.current_path = data_dir / CURRENT
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.segment_bytes = segment_bytes
        #: The sync file being replayed; drop_oldest never deletes it.
        self.replaying: Path | None = None
        make_private_dir(self.data_dir)
        make_private_dir(self.sync_dir)
        self._sync_sizes = {path: path.stat().st_size for path in self.sync_files()}
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._last_fsync = time.monotonic()
        self._open()

    def _open(self) -> None:
        self._fd = open_append(self.current_path)
        self._size = os.fstat(self._fd).st_size
        self._terminate_torn_line()

    def _terminate_torn_line(self) -> None:
        """End a half-written last line left by a crash, so it stays one bad line.

        Without the newline the next record would be glued to the fragment
        and both would be lost at replay.
        """
        if self._size == 0:
            return
        with open(self.current_path, "rb") as handle:
            handle.seek(self._size - 1)
            if handle.read(1) == b"\n":
                return
        log.warning(
            "torn line: %s ends without a newline, closing it", self.current_path
        )
        self._write(b"\n")

    # Appending ----------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Bytes waiting for replay: ``current.jsonl`` plus every sync file."""
        return self._size + sum(self._sync_sizes.values())

    def append(self, payloads: list[bytes]) -> AppendResult:
        """Append readings; durable per the fsync policy when this returns."""
        result = AppendResult()
        if not payloads:
            return result
        if self.max_bytes:
            payloads = self._fit_cap(payloads, result)
        if payloads:
            self._append_or_drop(payloads, result)
        if self._size >= self.segment_bytes:
            self.rotate()
        return result

    def _fit_cap(self, payloads: list[bytes], result: AppendResult) -> list[bytes]:
        needed = sum(len(p) + 1 for p in payloads)
        cap_detail = (
            f"journal at its cap of {self.max_bytes} bytes, "
            f"full_policy {self.full_policy}"
        )
        if self.full_policy == DROP_OLDEST:
            while self.buffered_bytes() + needed > self.max_bytes:
                if not self._drop_oldest_file(result, "journal_full", cap_detail):
                    break
        room = self.max_bytes - self.buffered_bytes()
        kept: list[bytes] = []
        for payload in payloads:
            if len(payload) + 1 > room:
                break
            kept.append(payload)
            room -= len(payload) + 1
        if len(kept) < len(payloads):
            dropped = payloads[len(kept) :]
            ranges = SeqRanges().add_lines(dropped)
            count = len(dropped) + ranges.extra_readings
            result.drop(count, "journal_full", ranges, cap_detail)
        return kept

    def _append_or_drop(self, payloads: list[bytes], result: AppendResult) -> None:
        data = b"\n".join(payloads) + b"\n"
        try:
            self._write(data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            detail = f"write to {CURRENT} failed: {exc.strerror}"
            written = False
            if self.full_policy == DROP_OLDEST and self._drop_oldest_file(
                result, "disk_full", detail
            ):
                try:
                    self._write(data)
                    written = True
                except OSError as retry_exc:
                    if retry_exc.errno not in _DISK_FULL:
                        raise
            if not written:
                ranges = SeqRanges().add_lines(payloads)
                count = len(payloads) + ranges.extra_readings
                result.drop(count, "disk_full", ranges, detail)
                return
        result.written += len(payloads)
        crash_point("journal_append")
        self._dirty = True
        if self.fsync_policy == "always":
            self.sync()
        else:
            self.maybe_sync()

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` or nothing: a failed write is truncated away."""
        assert self._fd is not None
        before = self._size
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            # A partial record would become a torn line; cut it off.
            os.ftruncate(self._fd, before)
            raise
        self._size = before + len(data)

    def _drop_oldest_file(self, result: AppendResult, reason: str, detail: str) -> bool:
        """Delete the oldest sync file not being replayed and record its readings.

        ``current.jsonl`` is rotated first when it is the only data, so that
        its readings can be dropped too. Returns False when nothing can go.
        """
        candidates = [p for p in self.sync_files() if p != self.replaying]
        if not candidates and self._size > 0:
            self.rotate()
            candidates = [p for p in self.sync_files() if p != self.replaying]
        if not candidates:
            return False
        oldest = candidates[0]
        start = self.load_progress(oldest)
        ranges = SeqRanges().add_lines(_lines_from(oldest, start))
        count = count_lines(oldest, start) + ranges.extra_readings
        self.remove(oldest)
        log.warning("journal full: dropped %s (%d readings)", oldest.name, count)
        result.drop(count, reason, ranges, f"{detail}, deleted {oldest.name}")
        return True

    def maybe_sync(self) -> None:
        """fsync when the interval policy makes it due; called on every tick."""
        if not self._dirty or self.fsync_policy != "interval":
            return
        if time.monotonic() - self._last_fsync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self._dirty and self.fsync_policy != "never":
            os.fsync(self._fd)
        self._dirty = False
        self._last_fsync = time.monotonic()

    def current_size(self) -> int:
        return self._size

    # Rotation, progress and cleanup ---------------------------------------

    def rotate(self) -> Path | None:
        """Move ``current.jsonl`` into ``sync/`` and start a new one.

        Returns the new sync file, or None when there was nothing to rotate.
        The rename is atomic and both directories are fsynced, so after a
        crash the readings are in exactly one of the two places.
        """
        if self._size == 0:
            return None
        assert self._fd is not None
        if self.fsync_policy != "never":
            os.fsync(self._fd)
        target = self.sync_dir / f"{time.time_ns():020d}.jsonl"
        crash_point("rotate_before_rename")
        os.rename(self.current_path, target)
        crash_point("rotate_after_rename")
        os.close(self._fd)
        self._fd = None
        self._sync_sizes[target] = self._size
        fsync_dir(self.sync_dir)
        fsync_dir(self.data_dir)
        self._fd = open_append(self.current_path)
        self._size = 0
        self._dirty = False
        log.info(
            "journal rotated: %s (%d bytes)", target.name, self._sync_sizes[target]
        )
        return target

    def sync_files(self) -> list[Path]:
        # A symlink is skipped: one planted here must not make the agent
        # publish the file it points to.
        files = self.sync_dir.glob("*.jsonl")
        return sorted(path for path in files if not path.is_symlink())

    @staticmethod
    def progress_path(path: Path) -> Path:
        return path.with_suffix(".progress")

    def load_progress(self, path: Path) -> int:
        """Byte offset of ``path`` up to which every reading was acknowledged."""
        try:
            return int(self.progress_path(path).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def save_progress(self, path: Path, offset: int) -> None:
        """Record replay progress; losing it only means resending, so no fsync."""
        target = self.progress_path(path)
        tmp = target.with_suffix(".progress-tmp")
        try:
            write_new_private_file(tmp, str(offset).encode())
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("progress not saved: %s (%s)", target.name, exc)

    def remove(self, path: Path) -> None:
        """Delete a sync file (every reading acknowledged, or dropped)."""
        self._sync_sizes.pop(path, None)
        path.unlink(missing_ok=True)
        self.progress_path(path).unlink(missing_ok=True)
        fsync_dir(self.sync_dir)

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None


class WindowFile:
    """The readings in the reducer's open window, kept on disk until it closes.

    The reducer folds readings in memory until its window closes. This file
    keeps a copy of them, so that they are on disk meanwhile like any other
    reading, and a new buffer journals the ones it finds here in full. It
    stays as small as one window.
    """

    def __init__(
        self, data_dir: Path, fsync: str = "interval", fsync_interval: float = 1.0
    ) -> None:
        self.path = data_dir / WINDOW
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self._fd = open_append(self.path)
        self._size = os.fstat(self._fd).st_size
        self._dirty = False
        self._last_fsync = time.monotonic()

    def readings(self) -> list[bytes]:
        """Return the complete reading lines in the file (a torn one is left out)."""
        if self._size == 0:
            return []
        return [line for line in _lines_from(self.path, 0) if _line_id(line)]

    def append(self, lines: list[bytes]) -> None:
        """Add readings that went into the open window; raise OSError on failure."""
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        before = self._size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            os.ftruncate(self._fd, before)
            raise
        self._size = before + len(data)
        self._dirty = True
        if self.fsync_policy == "always":
            self.sync()

    def clear(self) -> None:
        """Empty the file once its readings are in the journal."""
        if self._size == 0:
            return
        os.ftruncate(self._fd, 0)
        self._size = 0
        self._dirty = True
        if self.fsync_policy == "always":
            self.sync()

    def maybe_sync(self) -> None:
        """fsync when the interval policy makes it due; called on every tick."""
        if not self._dirty or self.fsync_policy != "interval":
            return
        if time.monotonic() - self._last_fsync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        if self._dirty and self.fsync_policy != "never":
            os.fsync(self._fd)
        self._dirty = False
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        self.sync()
        os.close(self._fd)


def count_lines(path: Path, start: int = 0) -> int:
    """Count the lines of ``path`` after byte ``start`` (a torn tail counts)."""
    count = 0
    last = b"\n"
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except FileNotFoundError:
        return 0
    return count + (last != b"\n")


def _lines_from(path: Path, start: int) -> Iterator[bytes]:
    """Yield the lines of ``path`` after byte ``start``, without newlines."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        handle = os.fdopen(os.open(path, flags), "rb")
    except FileNotFoundError:
        return
    with handle:
        handle.seek(start)
        for raw in handle:
            yield raw.rstrip(b"\n")


def read_journal(
    path: Path,
    quarantine: Path,
    on_quarantine: Callable[[], None] | None = None,
    start: int = 0,
) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(reading id, line, end offset)`` for every valid line of a file.

    Reading starts at byte ``start`` (saved replay progress). A line that is
    not UTF-8 JSON with a string ``id`` (a torn write, a bad sector) is
    copied to ``quarantine`` with its file and line number and logged; it
    never stops the lines after it from being replayed.
    """
    offset = start
    first_line = 1 if start == 0 else _lines_before(path, start) + 1
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags), "rb") as handle:
        handle.seek(start)
        for number, raw in enumerate(handle, start=first_line):
            offset += len(raw)
            line = raw.rstrip(b"\n")
            if not line:
                continue
            reading_id = _line_id(line)
            if reading_id is None:
                quarantine_line(quarantine, path, number, line)
                if on_quarantine is not None:
                    on_quarantine()
                continue
            yield reading_id, line, offset


def _lines_before(path: Path, offset: int) -> int:
    count = 0
    with open(path, "rb") as handle:
        remaining = offset
        while remaining > 0 and (chunk := handle.read(min(remaining, 1 << 20))):
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


def _line_id(line: bytes) -> str | None:
    """Return the message id of a reading or a reduced record, else None."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if data.get("type") == "reduced":
        try:
            return reduced_msg_id(validate_reduced(data))
        except InvalidReading:
            return None
    if isinstance(data.get("id"), str):
        return data["id"]
    return None


def quarantine_line(quarantine: Path, source: Path, number: int, line: bytes) -> None:
    record = {
        "source": source.name,
        "line": number,
        "quarantined_at": time.time(),
        "raw_b64": base64.b64encode(line).decode(),
    }
    fd = open_append(quarantine)
    try:
        os.write(fd, orjson.dumps(record) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning(
        "journal line quarantined: %s line %d (%d bytes)",
        source.name,
        number,
        len(line),
    )


def oldest_buffered_ts(data_dir: Path) -> str | None:
    """Timestamp of the oldest reading waiting on disk, or None when none waits."""
    sync_dir = data_dir / SYNC_DIR
    candidates = sorted(sync_dir.glob("*.jsonl")) + [data_dir / CURRENT]
    for path in candidates:
        start = 0
        if path.parent == sync_dir:
            try:
                start = int(path.with_suffix(".progress").read_text())
            except (FileNotFoundError, ValueError):
                start = 0
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                for raw in handle:
                    try:
                        data = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(data, dict):
                        continue
                    # A reduced record starts at ts_start.
                    ts = data.get("ts", data.get("ts_start"))
                    if isinstance(ts, str):
                        return ts
        except FileNotFoundError:
            continue
    return None
