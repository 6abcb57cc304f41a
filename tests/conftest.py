"""Fixtures that start real servers for the tests.

Tests that stop or kill a server get their own instance on a free loopback
port; the shared PostgreSQL on 127.0.0.1:5432 (database ``test``) is only
used to create a throwaway database per test, and an embedded PostgreSQL
stands in when it does not answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from cnc_common.embedded import NatsServer, PostgresServer

SHARED_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _shared_pg_answers() -> bool:
    try:
        psycopg2.connect(SHARED_PG_DSN, connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a PostgreSQL server the tests may create databases on."""
    if _shared_pg_answers():
        yield SHARED_PG_DSN
        return
    server = PostgresServer(tmp_path_factory.mktemp("pg-session")).start()
    try:
        yield server.dsn
    finally:
        server.close()


def _with_database(admin_dsn: str, name: str) -> str:
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"cnc_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(pg_admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(pg_admin_dsn, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )
        admin.close()


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster owned by this test, which it may stop and start."""
    server = PostgresServer(tmp_path / "pg").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream owned by this test, on a free port."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def sim_pty() -> Iterator[object]:
    """A simulated Haas control answering on a real pseudo-terminal."""
    from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer

    server = PtyServer(
        HaasProtocol(MachineModel(seed=1, pace=30, cycle_seconds=20), seed=1)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
