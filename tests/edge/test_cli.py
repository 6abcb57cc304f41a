"""cnc-edge check and status, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cnc_common.reading import encode, make_reading, new_boot_id

GOOD = """[machine]
id = "m1"
[serial]
url = "loop://"
[journal]
data_dir = "{data}"
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnc_edge.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_accepts_example_config() -> None:
    result = run_cli("check", "--config", "config/edge.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("extra", "key", "hint"),
    [
        ('[poll]\ninterval = "fast"\n', "poll.interval", "expected a number"),
        ("[poll]\nintervall = 1.0\n", "poll.intervall", "unknown key"),
        ('[poll]\ncommands = ["Q999"]\n', "poll.commands", "Q999"),
        ('[nats]\nurl = "http://x"\n', "nats.url", "nats://"),
        ('[journal2]\nfsync = "always"\n', "journal2", "unknown key"),
        ('[machine]\nid = "bad id!"\n', "machine.id", "letters"),
    ],
    ids=[
        "wrong-type",
        "misspelt-key",
        "bad-command",
        "bad-url",
        "unknown-section",
        "bad-id",
    ],
)
def test_check_rejects_bad_config(
    tmp_path: Path, extra: str, key: str, hint: str
) -> None:
    text = GOOD.format(data=tmp_path / "data")
    if extra.startswith("[machine]"):
        text = text.replace('[machine]\nid = "m1"\n', extra)
    else:
        text += extra
    config = tmp_path / "edge.toml"
    config.write_text(text)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert key in result.stderr
    assert hint in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_status_counts_what_is_on_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sync").mkdir(parents=True)
    boot = new_boot_id()
    readings = [
        encode(
            make_reading(
                machine="m1",
                boot=boot,
                seq=n,
                ts=f"2026-01-01T00:00:0{n}Z",
                mono=0.0,
                fields={},
                errors={},
            )
        )
        for n in range(5)
    ]
    (data / "sync" / "00000000000000000001.jsonl").write_bytes(
        b"\n".join(readings[:3]) + b"\n"
    )
    (data / "current.jsonl").write_bytes(b"\n".join(readings[3:]) + b"\n")
    (data / "quarantine.jsonl").write_bytes(b'{"line": 1}\n')
    result = run_cli("status", "--data-dir", str(data), "--json")
    assert result.returncode == 0, result.stderr
    status = orjson.loads(result.stdout)
    assert status["buffered_readings"] == 5
    assert status["sync_files"] == 1
    assert status["oldest_buffered_ts"] == "2026-01-01T00:00:00Z"
    assert status["quarantined_lines"] == 1
    assert status["running"] is False
    text = run_cli("status", "--data-dir", str(data))
    assert "5 readings" in text.stdout
