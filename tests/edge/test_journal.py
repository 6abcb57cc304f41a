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
    ids = [rid for rid, _ in read_journal(rotated, tmp_path / QUARANTINE)]
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
        for rid, _ in read_journal(
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
    ids = [rid for rid, _ in read_journal(path, tmp_path / QUARANTINE)]
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
    assert [rid for rid, _ in read_journal(rotated, tmp_path / QUARANTINE)] == [
        "r-1",
        "r-2",
    ]
