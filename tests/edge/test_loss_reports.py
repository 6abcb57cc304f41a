"""Loss ranges from the journal and the loss report file ``losses.jsonl``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest

from cnc_common.coverage import loss_msg_id, loss_report
from cnc_edge.journal import Journal
from cnc_edge.losses import LOSSES, LossLog
from cnc_edge.publisher import message_headers

BOOT = "a" * 32
OTHER_BOOT = "b" * 32


def ts(seq: int) -> str:
    """The time of reading ``seq``: one a second from 10:00."""
    return f"2026-12-04T10:{seq // 60:02d}:{seq % 60:02d}.000000Z"


def reading(seq: int, boot: str = BOOT) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "id": f"{boot}-{seq}",
            "boot": boot,
            "seq": seq,
            "ts": ts(seq),
        }
    )


def report(start: int, end: int, reason: str = "journal_cap", boot: str = BOOT):
    return loss_report(
        machine="m1",
        boot=boot,
        seq_start=start,
        seq_end=end,
        reason=reason,
        ts_start=ts(start),
        ts_end=ts(end),
    )


# Journal ------------------------------------------------------------------


def test_drop_newest_reports_dropped_range(tmp_path: Path) -> None:
    size = len(reading(10)) + 1
    journal = Journal(tmp_path, max_bytes=size * 3, full_policy="drop_newest")
    journal.append([reading(n) for n in range(10, 12)])

    result = journal.append([reading(n) for n in range(12, 16)])

    assert result.written == 1
    [loss] = result.losses
    assert (loss.boot, loss.seq_start, loss.seq_end) == (BOOT, 13, 15)
    assert loss.reason == "journal_cap"
    assert loss.ts_start == "2026-12-04T10:00:13.000000Z"
    assert loss.ts_end == "2026-12-04T10:00:15.000000Z"
    assert "drop_newest" in loss.detail


def test_drop_oldest_reports_deleted_file_from_progress(tmp_path: Path) -> None:
    size = len(reading(10)) + 1
    journal = Journal(
        tmp_path, max_bytes=size * 4, full_policy="drop_oldest", segment_bytes=size * 3
    )
    journal.append([reading(n) for n in range(10, 13)])  # rotated: one sync file
    [oldest] = journal.sync_files()
    journal.save_progress(oldest, size)  # seq 10 was acknowledged already
    journal.append([reading(13)])

    result = journal.append([reading(14), reading(15)])

    assert result.dropped == 2
    [loss] = result.losses
    assert (loss.seq_start, loss.seq_end) == (11, 12)
    assert loss.reason == "journal_cap"
    assert oldest.name in loss.detail


def test_drop_reports_one_range_per_boot(tmp_path: Path) -> None:
    size = len(reading(10)) + 1
    journal = Journal(tmp_path, max_bytes=size, full_policy="drop_newest")
    journal.append([reading(1)])

    result = journal.append([reading(5, OTHER_BOOT), reading(2), reading(3)])

    ranges = {(loss.boot, loss.seq_start, loss.seq_end) for loss in result.losses}
    assert ranges == {(BOOT, 2, 3), (OTHER_BOOT, 5, 5)}


def test_disk_full_reports_dropped_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    result = journal.append([reading(4), reading(5)])
    monkeypatch.setattr(os, "write", real_write)

    [loss] = result.losses
    assert (loss.seq_start, loss.seq_end, loss.reason) == (4, 5, "disk_full")
    assert "No space left on device" in loss.detail


def test_append_within_cap_reports_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1 << 20)
    assert journal.append([reading(1), reading(2)]).losses == []


# losses.jsonl ---------------------------------------------------------------


def test_loss_log_merges_adjacent_drops(tmp_path: Path) -> None:
    losses = LossLog(tmp_path, fsync="always")

    assert losses.add(report(10, 12)) is True
    assert losses.add(report(13, 13)) is False
    assert losses.add(report(14, 20)) is False

    [merged] = losses.pending
    assert (merged["seq_start"], merged["seq_end"]) == (10, 20)
    assert merged["ts_start"] == "2026-12-04T10:00:10.000000Z"
    assert merged["ts_end"] == "2026-12-04T10:00:20.000000Z"


def test_loss_log_keeps_reasons_boots_and_gaps_apart(tmp_path: Path) -> None:
    losses = LossLog(tmp_path)
    losses.add(report(10, 12))
    losses.add(report(13, 14, reason="disk_full"))
    losses.add(report(13, 14, boot=OTHER_BOOT))
    losses.add(report(16, 18))
    assert len(losses.pending) == 4


def test_loss_log_survives_reopen(tmp_path: Path) -> None:
    losses = LossLog(tmp_path, fsync="always")
    losses.add(report(10, 12))
    losses.add(report(13, 15))
    losses.add(report(40, 41, reason="corrupt_journal_line"))
    losses.close()

    reopened = LossLog(tmp_path)

    assert [(r["seq_start"], r["seq_end"]) for r in reopened.pending] == [
        (10, 15),
        (40, 41),
    ]


def test_loss_log_file_is_private(tmp_path: Path) -> None:
    losses = LossLog(tmp_path)
    losses.add(report(1, 2))
    assert stat.S_IMODE((tmp_path / LOSSES).stat().st_mode) == 0o600


def test_loss_log_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, tmp_path / LOSSES)
    losses = LossLog(tmp_path)
    losses.add(report(1, 2))
    assert target.read_bytes() == b""
    assert len(losses.pending) == 1, "kept in memory when the file is refused"


def test_acknowledged_report_is_removed_from_file(tmp_path: Path) -> None:
    losses = LossLog(tmp_path, fsync="always")
    first, second = report(1, 2), report(10, 11, reason="disk_full")
    losses.add(first)
    losses.add(second)

    done = losses.acknowledge({loss_msg_id(first)})

    assert done == [first]
    assert losses.pending == [second]
    assert LossLog(tmp_path).pending == [second]
    losses.acknowledge({loss_msg_id(second)})
    assert not (tmp_path / LOSSES).exists()


def test_report_grown_in_flight_stays_pending(tmp_path: Path) -> None:
    losses = LossLog(tmp_path)
    losses.add(report(1, 2))
    in_flight = loss_msg_id(losses.pending[0])
    losses.add(report(3, 4))

    assert losses.acknowledge({in_flight}) == []
    assert [(r["seq_start"], r["seq_end"]) for r in losses.pending] == [(1, 4)]


def test_unwritable_report_kept_and_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    losses = LossLog(tmp_path)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    losses.add(report(1, 2, reason="disk_full"))
    assert len(losses.pending) == 1
    assert (tmp_path / LOSSES).read_bytes() == b""

    monkeypatch.setattr(os, "write", real_write)
    losses.add(report(9, 9))

    stored = LossLog(tmp_path).pending
    assert [(r["seq_start"], r["reason"]) for r in stored] == [
        (1, "disk_full"),
        (9, "journal_cap"),
    ]


def test_loss_log_compacts_merged_lines(tmp_path: Path) -> None:
    losses = LossLog(tmp_path)
    for seq in range(200):
        losses.add(report(seq, seq))
    lines = (tmp_path / LOSSES).read_bytes().splitlines()
    assert len(lines) <= 40
    assert [(r["seq_start"], r["seq_end"]) for r in LossLog(tmp_path).pending] == [
        (0, 199)
    ]


def test_invalid_line_in_loss_file_is_skipped(tmp_path: Path) -> None:
    good = orjson.dumps(report(1, 2))
    (tmp_path / LOSSES).write_bytes(b'{"v": 1, "type": "loss"}\n[1]\n' + good + b"\n")
    assert LossLog(tmp_path).pending == [report(1, 2)]


# Headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "msg_id", "delivery"),
    [
        ("live", f"{BOOT}-1", "live"),
        ("replay", f"{BOOT}-1", "backfill"),
        ("replay", f"reduced-{BOOT}-1-9", "backfill-reduced"),
        ("control", f"loss-{BOOT}-1-9-journal_cap", None),
    ],
)
def test_message_headers(kind: str, msg_id: str, delivery: str | None) -> None:
    headers = message_headers(kind, msg_id)
    assert headers["Nats-Msg-Id"] == msg_id
    assert headers.get("Cnc-Delivery") == delivery
