"""The journal: append, rotation, torn lines and quarantine."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import orjson
import pytest

from cnc_edge.journal import QUARANTINE, Journal, read_journal


def line(n: int) -> bytes:
    return orjson.dumps({"v": 1, "id": f"r-{n}", "seq": n})


def test_rotate_moves_current_into_sync(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync="always")
    journal.append([line(1), line(2)])
    rotated = journal.rotate()
    assert rotated is not None
    assert rotated.parent == tmp_path / "sync"
    assert journal.current_size() == 0
    ids = [rid for rid, _, _ in read_journal(rotated, tmp_path / QUARANTINE)]
    assert ids == ["r-1", "r-2"]


def test_rotate_of_empty_journal_is_noop(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.rotate() is None
    assert journal.sync_files() == []


def test_sync_files_sorted_oldest_first(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync="never")
    created = []
    for n in range(3):
        journal.append([line(n)])
        created.append(journal.rotate())
    assert journal.sync_files() == created


def test_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    journal = Journal(data)
    journal.append([line(1)])
    assert stat.S_IMODE((data / "current.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_symlink_in_place_of_journal_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, data / "current.jsonl")
    with pytest.raises(OSError):
        Journal(data)


def test_torn_last_line_is_closed_and_quarantined(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # A crash in the middle of a write left half a record without a newline.
    (data / "current.jsonl").write_bytes(line(1) + b"\n" + line(2)[:9])
    journal = Journal(data)
    journal.append([line(3)])
    rotated = journal.rotate()
    assert rotated is not None
    quarantined: list[int] = []
    ids = [
        rid
        for rid, _, _ in read_journal(
            rotated, data / QUARANTINE, lambda: quarantined.append(1)
        )
    ]
    assert ids == ["r-1", "r-3"]
    assert len(quarantined) == 1
    record = orjson.loads((data / QUARANTINE).read_bytes().splitlines()[0])
    assert record["source"] == rotated.name
    assert record["line"] == 2
    assert base64.b64decode(record["raw_b64"]) == line(2)[:9]


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe not utf-8", b"{not json", b"[1, 2, 3]", b'{"id": 42}', b"\x00\x00\x00"],
    ids=["bad-utf8", "bad-json", "not-object", "id-not-string", "nul-bytes"],
)
def test_garbage_line_in_middle_is_quarantined(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "sync.jsonl"
    path.write_bytes(line(1) + b"\n" + garbage + b"\n" + line(3) + b"\n")
    ids = [rid for rid, _, _ in read_journal(path, tmp_path / QUARANTINE)]
    assert ids == ["r-1", "r-3"]
    records = (tmp_path / QUARANTINE).read_bytes().splitlines()
    assert len(records) == 1
    assert orjson.loads(records[0])["line"] == 2


def test_append_survives_reopen(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync="interval", fsync_interval=0.0)
    journal.append([line(1)])
    journal.close()
    journal = Journal(tmp_path)
    journal.append([line(2)])
    rotated = journal.rotate()
    assert rotated is not None
    assert [rid for rid, _, _ in read_journal(rotated, tmp_path / QUARANTINE)] == [
        "r-1",
        "r-2",
    ]


def ids_in(path: Path, quarantine: Path, start: int = 0) -> list[str]:
    return [rid for rid, _, _ in read_journal(path, quarantine, start=start)]


def test_replay_resumes_from_saved_progress(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append([line(n) for n in range(5)])
    rotated = journal.rotate()
    assert rotated is not None
    offsets = [end for _, _, end in read_journal(rotated, tmp_path / QUARANTINE)]
    journal.save_progress(rotated, offsets[1])
    assert journal.load_progress(rotated) == offsets[1]
    assert ids_in(rotated, tmp_path / QUARANTINE, journal.load_progress(rotated)) == [
        "r-2",
        "r-3",
        "r-4",
    ]
    journal.remove(rotated)
    assert not rotated.exists()
    assert not journal.progress_path(rotated).exists()


def test_quarantine_line_numbers_are_absolute_after_resume(tmp_path: Path) -> None:
    path = tmp_path / "sync.jsonl"
    first = line(1) + b"\n"
    path.write_bytes(first + line(2) + b"\n" + b"garbage\n" + line(4) + b"\n")
    assert ids_in(path, tmp_path / QUARANTINE, start=len(first)) == ["r-2", "r-4"]
    record = orjson.loads((tmp_path / QUARANTINE).read_bytes())
    assert record["line"] == 3


def test_cap_drop_newest_keeps_what_is_on_disk(tmp_path: Path) -> None:
    size = len(line(10)) + 1
    journal = Journal(tmp_path, max_bytes=size * 5, full_policy="drop_newest")
    first = journal.append([line(n) for n in range(10, 14)])
    assert (first.written, first.dropped) == (4, 0)
    second = journal.append([line(n) for n in range(14, 17)])
    assert second.written == 1
    assert second.dropped == 2
    assert second.reason == "journal_full"
    assert journal.buffered_bytes() <= size * 5
    rotated = journal.rotate()
    assert rotated is not None
    assert ids_in(rotated, tmp_path / QUARANTINE) == [f"r-{n}" for n in range(10, 15)]


def test_cap_drop_oldest_deletes_oldest_segment(tmp_path: Path) -> None:
    size = len(line(10)) + 1
    journal = Journal(
        tmp_path, max_bytes=size * 4, full_policy="drop_oldest", segment_bytes=size * 2
    )
    for n in range(10, 14):
        assert journal.append([line(n)]).dropped == 0
    result = journal.append([line(14), line(15)])
    assert result.written == 2
    assert result.dropped == 2
    assert result.reason == "journal_full"
    remaining = [
        rid
        for path in journal.sync_files()
        for rid in ids_in(path, tmp_path / QUARANTINE)
    ]
    journal.rotate()
    remaining += ids_in(journal.sync_files()[-1], tmp_path / QUARANTINE)
    assert sorted(set(remaining)) == ["r-12", "r-13", "r-14", "r-15"]


def test_cap_drop_oldest_spares_file_being_replayed(tmp_path: Path) -> None:
    size = len(line(10)) + 1
    journal = Journal(tmp_path, max_bytes=size * 2, full_policy="drop_oldest")
    journal.append([line(1), line(2)])
    replaying = journal.rotate()
    journal.replaying = replaying
    result = journal.append([line(3)])
    assert result.dropped == 1
    assert replaying is not None and replaying.exists()


class DiskFull:
    """Make os.write fail with ENOSPC while active, as a full filesystem does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        real_write = os.write

        def write(fd: int, data: bytes) -> int:
            if self.active:
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)


def test_disk_full_drops_newest_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFull(monkeypatch)
    journal = Journal(tmp_path, full_policy="drop_newest")
    journal.append([line(1)])
    disk.active = True
    result = journal.append([line(2), line(3)])
    assert (result.written, result.dropped, result.reason) == (0, 2, "disk_full")
    disk.active = False
    assert journal.append([line(4)]).written == 1
    rotated = journal.rotate()
    assert rotated is not None
    # No torn fragment of the failed write is left between the good lines.
    assert rotated.read_bytes() == line(1) + b"\n" + line(4) + b"\n"


def test_disk_full_on_real_small_filesystem(tmp_path: Path) -> None:
    """ENOSPC from a real 64 KiB tmpfs; needs root (CI runs as root)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        journal = Journal(mount / "data", fsync="always", max_bytes=0)
        written = dropped = 0
        for n in range(2000):
            outcome = journal.append([line(n) + b" " * 200])
            written += outcome.written
            dropped += outcome.dropped
        assert dropped > 0
        assert written > 0
        assert written + dropped == 2000
        journal.close()
        lines = (mount / "data" / "current.jsonl").read_bytes().splitlines()
        assert len(lines) == written
        assert all(orjson.loads(raw)["id"].startswith("r-") for raw in lines)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize(
    ("policy", "appends", "expected"),
    [("always", 3, 3), ("never", 3, 0), ("interval", 3, 0)],
)
def test_fsync_policy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    appends: int,
    expected: int,
) -> None:
    journal = Journal(tmp_path, fsync=policy, fsync_interval=3600)
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    for n in range(appends):
        journal.append([line(n)])
    assert len(calls) == expected


def test_fsync_interval_is_due_after_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, fsync="interval", fsync_interval=0.05)
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    journal.append([line(1)])
    assert calls == []
    import time

    time.sleep(0.06)
    journal.maybe_sync()
    assert len(calls) == 1
    journal.maybe_sync()
    assert len(calls) == 1, "nothing new to sync"
