"""Files in the data directory: owner-only modes and no writes through symlinks.

An attacker who can plant a symlink in the data directory (a directory left
group-writable, a shared volume) must not make the agent overwrite, read or
publish the file it points to.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import orjson
import pytest

from cnc_common.embedded import NatsServer
from cnc_common.reading import encode, make_reading, new_boot_id
from cnc_edge.journal import (
    QUARANTINE,
    Journal,
    quarantine_line,
    read_journal,
    write_new_private_file,
)
from tests.helpers import (
    start_program,
    stop_program,
    stream_ids,
    wait_for,
    wait_for_state,
    write_edge_config,
)

VICTIM_TEXT = b"owned by someone else\n"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def plant(link: Path, tmp_path: Path, name: str) -> Path:
    """Make ``link`` a symlink to a new victim file outside the data directory."""
    victim = tmp_path / f"victim-{name}"
    victim.write_bytes(VICTIM_TEXT)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return victim


def reading_line(seq: int) -> bytes:
    value = make_reading(
        machine="m1",
        boot=new_boot_id(),
        seq=seq,
        ts="2024-05-01T12:00:00.000001Z",
        mono=float(seq),
        fields={"spindle_rpm": 1000},
        errors={},
    )
    return encode(value)


def test_journal_files_are_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    journal = Journal(data)
    journal.append([reading_line(1)])
    rotated = journal.rotate()
    assert rotated is not None
    journal.save_progress(rotated, 10)
    quarantine_line(data / QUARANTINE, rotated, 1, b"garbage")
    journal.close()

    assert mode_of(data) == 0o700
    assert mode_of(data / "sync") == 0o700
    assert mode_of(data / "current.jsonl") == 0o600
    assert mode_of(rotated) == 0o600
    assert mode_of(journal.progress_path(rotated)) == 0o600
    assert mode_of(data / QUARANTINE) == 0o600


def test_open_data_dir_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    caplog.set_level(logging.WARNING)

    Journal(data).close()

    assert mode_of(data) == 0o700
    assert "permissions tightened" in caplog.text


def test_symlink_current_journal_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    victim = plant(data / "current.jsonl", tmp_path, "current")

    with pytest.raises(OSError):
        Journal(data)

    assert victim.read_bytes() == VICTIM_TEXT


def test_symlink_quarantine_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    journal_file = data / "sync" / "1.jsonl"
    journal_file.parent.mkdir(parents=True)
    journal_file.write_bytes(b"not json\n" + reading_line(1) + b"\n")
    victim = plant(data / QUARANTINE, tmp_path, "quarantine")

    with pytest.raises(OSError):
        list(read_journal(journal_file, data / QUARANTINE))

    assert victim.read_bytes() == VICTIM_TEXT


def test_symlink_sync_file_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    plant(data / "sync" / "0.jsonl", tmp_path, "sync")

    journal = Journal(data)

    assert journal.sync_files() == []
    journal.close()


def test_symlink_sync_file_not_read(tmp_path: Path) -> None:
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(reading_line(1) + b"\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(victim)

    with pytest.raises(OSError):
        list(read_journal(link, tmp_path / QUARANTINE))


def test_new_private_file_replaces_symlink(tmp_path: Path) -> None:
    victim = plant(tmp_path / "state.tmp", tmp_path, "tmp")

    write_new_private_file(tmp_path / "state.tmp", b"{}")

    assert victim.read_bytes() == VICTIM_TEXT
    assert not (tmp_path / "state.tmp").is_symlink()
    assert mode_of(tmp_path / "state.tmp") == 0o600


def test_progress_tmp_symlink_not_followed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    journal = Journal(data)
    journal.append([reading_line(1)])
    rotated = journal.rotate()
    assert rotated is not None
    victim = plant(rotated.with_suffix(".progress-tmp"), tmp_path, "progress")

    journal.save_progress(rotated, 42)
    journal.close()

    assert victim.read_bytes() == VICTIM_TEXT
    assert journal.load_progress(rotated) == 42


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_agent_ignores_planted_symlinks(tmp_path: Path, sim_pty) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats.url
    )
    data = tmp_path / "edge" / "data"
    victims = {
        name: plant(data / name, tmp_path, name)
        for name in ("state.json", "state.tmp", "agent.json", "agent.tmp")
    }
    # A planted "sync file" whose target contains a well-formed reading. Replaying
    # it would publish a file the agent was never meant to read.
    secret_line = reading_line(99)
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(secret_line + b"\n")
    (data / "sync").mkdir()
    (data / "sync" / "0.jsonl").symlink_to(secret)
    data.chmod(0o755)
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=30, agent=agent)
        wait_for(lambda: len(stream_ids(nats.url)) > 3, 30, "live readings published")
    finally:
        assert stop_program(agent) == 0
        published = stream_ids(nats.url)
        nats.close()

    for name, victim in victims.items():
        assert victim.read_bytes() == VICTIM_TEXT, name
    assert orjson.loads(secret_line)["id"] not in published
    assert mode_of(data) == 0o700
    for name in ("state.json", "agent.json"):
        assert not (data / name).is_symlink(), name
        assert mode_of(data / name) == 0o600, name
    assert os.path.islink(data / "sync" / "0.jsonl")
