"""Least-privilege PostgreSQL roles, password logins and secrets kept out of output.

A private cluster is switched from trust to scram-sha-256 for TCP logins,
set up with ``config/postgres/roles.sql``, migrated as cnc_migrator with
``cnc-backend migrate``, granted with ``config/postgres/grants.sql``, and
then written by ``cnc-backend run`` as cnc_writer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from cnc_common.embedded import NatsServer, PostgresServer
from tests.backend.conftest import make_readings, publish_readings
from tests.helpers import (
    start_program,
    stop_program,
    stored_ids,
    wait_for,
    write_backend_config,
)
from tests.security import write_secret

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "admin-Pw-3e7a61"
MIGRATOR_PASSWORD = "migrator-Pw-8c20f4"
WRITER_PASSWORD = "writer-Pw-51d9b2"
WRONG_PASSWORD = "wrong-Pw-c4a0e7"


@dataclass
class Cluster:
    server: PostgresServer
    admin_dsn: str

    def dsn(self, role: str) -> str:
        return f"postgresql://{role}@{self.server.host}:{self.server.port}/cnc"


def _run_sql_file(dsn: str, path: Path) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(path.read_text())
    finally:
        conn.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A private cluster with database cnc, the two roles and password-only TCP logins."""
    server = PostgresServer(tmp_path / "pg").start()
    try:
        trust_dsn = server.dsn
        conn = psycopg2.connect(trust_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE cnc")
            cur.execute(f"ALTER ROLE postgres PASSWORD '{ADMIN_PASSWORD}'")
        conn.close()
        admin_cnc = trust_dsn.rpartition("/")[0] + "/cnc"
        _run_sql_file(admin_cnc, ROOT / "config" / "postgres" / "roles.sql")
        conn = psycopg2.connect(admin_cnc)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"ALTER ROLE cnc_migrator PASSWORD '{MIGRATOR_PASSWORD}'")
            cur.execute(f"ALTER ROLE cnc_writer PASSWORD '{WRITER_PASSWORD}'")
            # Overwriting in place keeps the file owned by the server's account.
            (server.pgdata / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
            )
            cur.execute("SELECT pg_reload_conf()")
        conn.close()
        admin = f"postgresql://postgres:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/cnc"
        wait_for(lambda: _password_required(trust_dsn), 10, "scram-sha-256 in force")
        yield Cluster(server, admin)
    finally:
        server.close()


def _password_required(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=2).close()
    except psycopg2.OperationalError:
        return True
    return False


def _backend_config(tmp_path: Path, nats_url: str, password_file: Path) -> Path:
    return write_backend_config(
        tmp_path,
        nats_url=nats_url,
        extra=f'\n[postgres]\npassword_file = "{password_file}"\nconnect_timeout = 2\n',
    )


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnc_backend.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
    )


def _migrate_as_migrator(
    cluster: Cluster, tmp_path: Path
) -> subprocess.CompletedProcess:
    secret = write_secret(tmp_path / "migrator.pw", MIGRATOR_PASSWORD)
    config = _backend_config(tmp_path / "migrator", "nats://127.0.0.1:4222", secret)
    return _cli(
        "migrate",
        "--config",
        str(config),
        env={"CNC_BACKEND_POSTGRES_DSN": cluster.dsn("cnc_migrator")},
    )


def test_migrator_migrates_and_writer_stores(cluster: Cluster, tmp_path: Path) -> None:
    migrated = _migrate_as_migrator(cluster, tmp_path)
    _run_sql_file(cluster.admin_dsn, ROOT / "config" / "postgres" / "grants.sql")
    nats = NatsServer(tmp_path / "nats").start()
    secret = write_secret(tmp_path / "writer.pw", WRITER_PASSWORD)
    config = _backend_config(tmp_path / "writer", nats.url, secret)
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(config)],
        tmp_path / "backend.log",
        {"CNC_BACKEND_POSTGRES_DSN": cluster.dsn("cnc_writer")},
    )
    readings = make_readings(20)
    try:
        publish_readings(nats.url, readings, retry_for=20)
        expected_ids = {reading["id"] for reading in readings}
        wait_for(
            lambda: expected_ids <= set(stored_ids(cluster.admin_dsn)),
            60,
            "readings stored by cnc_writer",
            interval=0.5,
        )
    finally:
        exit_code = stop_program(backend)
        nats.close()
    output = migrated.stdout + migrated.stderr + (tmp_path / "backend.log").read_text()

    assert migrated.returncode == 0, migrated.stderr
    assert "applied migrations 1" in migrated.stdout
    assert exit_code == 0
    assert "connected: postgres cnc_writer@127.0.0.1" in output
    for password in (MIGRATOR_PASSWORD, WRITER_PASSWORD):
        assert password not in output


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE readings",
        "ALTER TABLE readings ADD COLUMN extra int",
        "CREATE TABLE spare (id int)",
        "TRUNCATE readings",
        "DELETE FROM readings",
        "UPDATE readings SET status = 'x'",
        "DELETE FROM dead_letters",
        "INSERT INTO schema_migrations (version, name) VALUES (99, 'x')",
        "CREATE INDEX spare_idx ON readings (status)",
    ],
    ids=lambda statement: " ".join(statement.split()[:2]).lower(),
)
def test_writer_cannot_change_schema_or_data(
    cluster: Cluster, tmp_path: Path, statement: str
) -> None:
    assert _migrate_as_migrator(cluster, tmp_path).returncode == 0
    _run_sql_file(cluster.admin_dsn, ROOT / "config" / "postgres" / "grants.sql")
    conn = psycopg2.connect(cluster.dsn("cnc_writer"), password=WRITER_PASSWORD)
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            with conn.cursor() as cur:
                cur.execute(statement)
    finally:
        conn.close()


def test_pgpassword_environment_variable_works(
    cluster: Cluster, tmp_path: Path
) -> None:
    config = write_backend_config(tmp_path, nats_url="nats://127.0.0.1:4222")

    result = _cli(
        "migrate",
        "--config",
        str(config),
        env={
            "CNC_BACKEND_POSTGRES_DSN": cluster.dsn("cnc_migrator"),
            "PGPASSWORD": MIGRATOR_PASSWORD,
        },
    )

    assert result.returncode == 0, result.stderr


def test_wrong_password_fails_without_secret(cluster: Cluster, tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "wrong.pw", WRONG_PASSWORD)
    nats = NatsServer(tmp_path / "nats").start()
    config = _backend_config(tmp_path / "backend", nats.url, secret)
    log_path = tmp_path / "backend.log"
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(config)],
        log_path,
        {"CNC_BACKEND_POSTGRES_DSN": cluster.dsn("cnc_writer")},
    )
    try:
        wait_for(
            lambda: "password authentication failed" in log_path.read_text(),
            30,
            "the failed login in the log",
        )
        url = re.search(r"metrics: listening on (\S+)", log_path.read_text())
        assert url is not None
        with urllib.request.urlopen(url.group(1) + "/status", timeout=5) as response:
            status = response.read().decode()
        time.sleep(1.0)
    finally:
        stop_program(backend)
        nats.close()
    output = log_path.read_text()

    assert 'password authentication failed for user "cnc_writer"' in output
    assert WRONG_PASSWORD not in output
    assert WRONG_PASSWORD not in status
    assert "Traceback" not in output
