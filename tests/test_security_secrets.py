"""Wrong credentials: the programs say what failed and never print the secret.

``cnc-edge run`` and ``cnc-backend run`` are started as an operator would,
with a wrong NATS password or token from the environment, against a
nats-server that requires the right one. Their complete output, the files
the edge writes and the ``/status`` endpoints are scanned for the secrets.
``check`` with contradictory settings is scanned the same way.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (
    start_program,
    stop_program,
    wait_for,
    write_backend_config,
    write_edge_config,
)
from tests.security import start_nats, write_secret

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RIGHT_SECRET = "right-Secret-4d2e88"
WRONG_SECRET = "wrong-Secret-a61f0c"

SERVERS = {
    "password": (
        f'authorization {{ users = [ {{ user: cnc, password: "{RIGHT_SECRET}" }} ] }}\n'
    ),
    "token": f'authorization {{ token: "{RIGHT_SECRET}" }}\n',
}


def _status(log: str) -> str:
    found = re.search(r"metrics: listening on (\S+)", log)
    assert found is not None, "the program logs its endpoint URL"
    with urllib.request.urlopen(found.group(1) + "/status", timeout=5) as response:
        return response.read().decode()


def _scan(text: str) -> None:
    assert WRONG_SECRET not in text
    assert RIGHT_SECRET not in text
    assert "Traceback" not in text


def _run_until_rejected(
    module: str, args: list[str], log_path: Path, env: dict[str, str]
) -> tuple[str, str]:
    process = start_program(module, args, log_path, env)
    try:
        wait_for(
            lambda: "authorization failed" in log_path.read_text(),
            30,
            f"{module} logs the rejected login",
        )
        status = _status(log_path.read_text())
    finally:
        stop_program(process)
    return log_path.read_text(), status


@pytest.mark.parametrize("method", list(SERVERS))
def test_edge_wrong_secret_not_printed(tmp_path: Path, sim_pty, method: str) -> None:
    server = start_nats(tmp_path / "nats", SERVERS[method])
    extra = '\n[log]\nlevel = "DEBUG"\n'
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=server.url, extra=extra
    )
    if method == "password":
        text = config.read_text().replace("[nats]\n", '[nats]\nuser = "cnc"\n')
        config.write_text(text)
    env = {f"CNC_EDGE_NATS_{method.upper()}": WRONG_SECRET}
    try:
        output, status = _run_until_rejected(
            "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log", env
        )
    finally:
        server.close()
    data_dir = tmp_path / "edge" / "data"
    files = "".join(
        path.read_text(errors="replace") for path in data_dir.glob("*.json")
    )

    assert "rejected by nats" in output
    assert "authorization failed" in output
    _scan(output)
    _scan(status)
    _scan(files)


@pytest.mark.parametrize("method", list(SERVERS))
def test_backend_wrong_secret_not_printed(
    tmp_path: Path, pg_dsn: str, method: str
) -> None:
    server = start_nats(tmp_path / "nats", SERVERS[method])
    extra = '\n[log]\nlevel = "DEBUG"\n'
    config = write_backend_config(tmp_path, nats_url=server.url, extra=extra)
    if method == "password":
        text = config.read_text().replace("[nats]\n", '[nats]\nuser = "cnc"\n')
        config.write_text(text)
    env = {
        "CNC_BACKEND_POSTGRES_DSN": pg_dsn,
        f"CNC_BACKEND_NATS_{method.upper()}": WRONG_SECRET,
    }
    try:
        output, status = _run_until_rejected(
            "cnc_backend.cli",
            ["run", "--config", str(config)],
            tmp_path / "backend.log",
            env,
        )
    finally:
        server.close()

    assert "connect failed, authorization failed" in output
    _scan(output)
    _scan(status)


def _check(program: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"{program}.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_edge_check_rejects_password_twice(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "pw", WRONG_SECRET)
    config = write_edge_config(
        tmp_path, serial_url="loop://", nats_url="nats://127.0.0.1:4222"
    )
    text = config.read_text().replace(
        "[nats]\n",
        f'[nats]\nuser = "cnc"\npassword = "{WRONG_SECRET}"\n'
        f'password_file = "{secret}"\n',
    )
    config.write_text(text)

    result = _check("cnc_edge", config)

    assert result.returncode == 2
    assert "nats.password_file" in result.stderr
    assert "not both" in result.stderr
    _scan(result.stdout + result.stderr)


def test_backend_check_rejects_dsn_password_and_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "pw", WRONG_SECRET)
    config = write_backend_config(
        tmp_path,
        nats_url="nats://127.0.0.1:4222",
        extra=(
            "\n[postgres]\n"
            f'dsn = "postgresql://cnc:{WRONG_SECRET}@127.0.0.1:5432/cnc"\n'
            f'password_file = "{secret}"\n'
        ),
    )

    result = _check("cnc_backend", config)

    assert result.returncode == 2
    assert "postgres.password_file" in result.stderr
    _scan(result.stdout + result.stderr)


def test_backend_check_rejects_url_credentials(tmp_path: Path) -> None:
    config = write_backend_config(
        tmp_path, nats_url=f"nats://cnc:{WRONG_SECRET}@127.0.0.1:4222"
    )

    result = _check("cnc_backend", config)

    assert result.returncode == 2
    assert "nats.url" in result.stderr
    _scan(result.stdout + result.stderr)
