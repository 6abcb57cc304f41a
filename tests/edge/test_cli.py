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


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("serial.url", "bogus://x", "unknown scheme"),
        ("serial.url", "socket://127.0.0.1", "HOST:PORT"),
        ("nats.url", "nats://127.0.0.1:99999", "port"),
        ("journal.data_dir", "relative/dir", "absolute path"),
        ("journal.data_dir", "", "absolute path"),
    ],
    ids=["serial-scheme", "socket-no-port", "nats-port", "relative-dir", "empty-dir"],
)
def test_check_rejects_values_that_cannot_work(
    tmp_path: Path, key: str, value: str, hint: str
) -> None:
    section, name = key.split(".")
    text = GOOD.format(data=tmp_path / "data")
    if key == "serial.url":
        text = text.replace('url = "loop://"', f'url = "{value}"')
    elif key == "journal.data_dir":
        text = text.replace(
            f'data_dir = "{tmp_path / "data"}"', f'data_dir = "{value}"'
        )
    else:
        text += f'[{section}]\n{name} = "{value}"\n'
    config = tmp_path / "edge.toml"
    config.write_text(text)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2
    assert key in result.stderr
    assert hint in result.stderr


def test_check_on_directory_is_clear(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(tmp_path))
    assert result.returncode == 2
    assert "is a directory" in result.stderr
    assert "Traceback" not in result.stderr


def write_run_config(tmp_path: Path, data_dir: Path) -> Path:
    config = tmp_path / "run.toml"
    config.write_text(
        GOOD.format(data=data_dir)
        + '[nats]\nurl = "nats://127.0.0.1:1"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    return config


def test_second_agent_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    config = write_run_config(tmp_path, tmp_path / "data")
    first = subprocess.Popen(
        [sys.executable, "-m", "cnc_edge.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = 30
        import time

        start = time.monotonic()
        while not (tmp_path / "data" / "agent.json").exists():
            assert time.monotonic() - start < deadline, "first agent did not start"
            time.sleep(0.1)
        second = run_cli("run", "--config", str(config))
        assert second.returncode == 2
        assert "in use by another cnc-edge agent" in second.stderr
    finally:
        first.terminate()
        first.wait(60)
    assert first.returncode == 0


def test_unusable_data_dir_stops_start_up(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli(
        "run", "--config", str(write_run_config(tmp_path, blocker / "data"))
    )
    assert result.returncode == 2
    assert "journal.data_dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_log_format_json_reaches_every_process(tmp_path: Path) -> None:
    config = write_run_config(tmp_path, tmp_path / "data")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnc_edge.cli",
            "run",
            "--config",
            str(config),
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    import time

    time.sleep(4)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    roles = set()
    for line in lines:
        entry = orjson.loads(line)
        assert entry["machine"] == "m1"
        roles.add(entry["role"])
    assert {"agent", "poller", "buffer", "publisher"} <= roles
