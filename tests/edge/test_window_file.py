"""The reducer's window file: readings on disk until their window closes."""

from __future__ import annotations

import stat
from pathlib import Path

import orjson

from cnc_edge.journal import WINDOW, WindowFile


def reading(seq: int) -> bytes:
    return orjson.dumps({"v": 1, "id": f"b-{seq}", "seq": seq})


def test_window_file_returns_written_readings(tmp_path: Path) -> None:
    window = WindowFile(tmp_path, fsync="always")
    window.append([reading(1), reading(2)])
    window.append([reading(3)])
    window.close()

    assert WindowFile(tmp_path).readings() == [reading(1), reading(2), reading(3)]


def test_window_file_clear_empties_it(tmp_path: Path) -> None:
    window = WindowFile(tmp_path)
    window.append([reading(1)])
    window.clear()
    window.append([reading(2)])
    window.close()

    assert WindowFile(tmp_path).readings() == [reading(2)]


def test_window_file_skips_torn_line(tmp_path: Path) -> None:
    (tmp_path / WINDOW).write_bytes(reading(1) + b"\n" + reading(2)[:7])
    assert WindowFile(tmp_path).readings() == [reading(1)]


def test_window_file_is_private(tmp_path: Path) -> None:
    WindowFile(tmp_path).append([reading(1)])
    assert stat.S_IMODE((tmp_path / WINDOW).stat().st_mode) == 0o600
