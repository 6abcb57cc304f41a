"""The cnc-backend command as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnc_common.embedded import NatsServer, free_port
from tests.backend.conftest import make_readings, publish_readings, stored_ids, wait_for

DRAIN_TIMEOUT = 4.0


def write_config(directory: Path, nats_url: str) -> Path:
    path = directory / "backend.toml"
    path.write_text(
        f"""[nats]
url = "{nats_url}"
ack_wait = 2.0
fetch_timeout = 0.5
connect_timeout = 1.0

[postgres]
statement_timeout = 1.5

[service]
drain_timeout = {DRAIN_TIMEOUT}
reconnect_initial = 0.05
reconnect_cap = 0.5
"""
    )
    return path


def command(args: list[str], dsn: str | None) -> tuple[list[str], dict[str, str]]:
    """Return the argv and environment for ``cnc-backend ARGS``."""
    env = dict(os.environ)
    if dsn is not None:
        env["CNC_BACKEND_POSTGRES_DSN"] = dsn
    return [sys.executable, "-m", "cnc_backend.cli", *args], env


def start(args: list[str], dsn: str, log_path: Path) -> subprocess.Popen[bytes]:
    argv, env = command(args, dsn)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )


def run(args: list[str], dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    argv, env = command(args, dsn)
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=30, check=False
    )


def sigterm_exit(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Send SIGTERM; return the exit status and the seconds until exit."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(DRAIN_TIMEOUT + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("cnc-backend ignored SIGTERM") from None
    return status, time.monotonic() - started


def wait_for_log(
    process: subprocess.Popen[bytes], log_path: Path, text: str, timeout: float
) -> None:
    """Wait until ``text`` is in the log; fail at once, with the log, if it exits."""
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        status = process.poll()
        if status is not None or time.monotonic() > deadline:
            tail = log_path.read_text()[-3000:]
            problem = f"exited with {status}" if status is not None else "timed out"
            raise AssertionError(f"{problem} before {text!r} in the log:\n{tail}")
        time.sleep(0.05)


def test_cli_check_accepts_example():
    example = Path(__file__).resolve().parents[2] / "config" / "backend.toml"

    result = run(["check", "--config", str(example)])

    assert result.returncode == 0
    assert result.stdout.startswith("OK")


def test_cli_bad_config_exits_2(tmp_path):
    path = tmp_path / "backend.toml"
    path.write_text("[nats]\nack_wait = -1\n")

    result = run(["run", "--config", str(path)])

    assert result.returncode == 2
    assert f"{path}: invalid nats.ack_wait (got -1): must be greater" in result.stderr


def test_cli_missing_config_exits_2(tmp_path):
    result = run(["check", "--config", str(tmp_path / "absent.toml")])

    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_cli_migrate_then_noop(tmp_path, pg_dsn):
    config = write_config(tmp_path, "nats://127.0.0.1:4222")

    first = run(["migrate", "--config", str(config)], pg_dsn)
    second = run(["migrate", "--config", str(config)], pg_dsn)

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied migrations 1")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("schema up to date")


@pytest.mark.timeout(60)
def test_cli_sigterm_drains_and_exits_0(tmp_path, nats_server, pg_dsn):
    config = write_config(tmp_path, nats_server.url)
    log_path = tmp_path / "backend.log"
    process = start(["run", "--config", str(config)], pg_dsn, log_path)
    try:
        wait_for_log(process, log_path, "-> CONNECTED", 20)
        readings = make_readings(200)
        publish_readings(nats_server.url, readings)
        wait_for(lambda: len(stored_ids(pg_dsn)) > 0, 10, "first readings stored")
        status, took = sigterm_exit(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    log = log_path.read_text()
    assert status == 0, log
    assert took < DRAIN_TIMEOUT
    assert "signal: SIGTERM (draining)" in log
    assert "-> STOPPED" in log
    assert "Traceback" not in log


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_cli_sigterm_while_reconnecting(tmp_path, pg_dsn):
    # Nothing listens on this port, so the backend stays in RECONNECTING.
    absent = NatsServer(tmp_path / "absent", port=free_port())
    config = write_config(tmp_path, absent.url)
    log_path = tmp_path / "backend.log"
    process = start(["run", "--config", str(config)], pg_dsn, log_path)
    try:
        wait_for_log(process, log_path, "-> RECONNECTING", 20)
        time.sleep(1.0)
        assert process.poll() is None
        status, took = sigterm_exit(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    log = log_path.read_text()
    assert status == 0, log
    assert took < DRAIN_TIMEOUT
    assert "waiting for nats" in log
