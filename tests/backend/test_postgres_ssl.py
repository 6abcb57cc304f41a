"""PostgreSQL over SSL: sslmode, sslrootcert, sslcert and sslkey reach libpq.

A private cluster accepts TCP logins only over SSL with a client
certificate (``hostssl ... clientcert=verify-full``, ``hostnossl ...
reject``). The pgserver wheel's PostgreSQL is built without SSL, so the
test uses the Debian server binaries and is skipped where none with SSL
support is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg2
import pytest

from cnc_backend.config import PostgresConfig, check_postgres_files
from cnc_backend.errors import StoreUnavailable
from cnc_backend.store import open_connection
from cnc_common.embedded import PostgresServer
from cnc_common.errors import ConfigError
from tests.security import Certificates, make_certificates

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _bindir_with_ssl() -> Path | None:
    for postgres in sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        linked = subprocess.run(
            ["ldd", str(postgres)], capture_output=True, text=True, check=False
        ).stdout
        if "libssl" in linked and (postgres.parent / "initdb").exists():
            return postgres.parent
    return None


@pytest.fixture
def ssl_cluster(tmp_path: Path) -> Iterator[tuple[PostgresServer, Certificates]]:
    bindir = _bindir_with_ssl()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries with SSL support installed")
    certs = make_certificates(tmp_path / "certs", client_name="postgres")
    server = PostgresServer(tmp_path / "pg")
    server.bindir = bindir
    server.start()
    try:
        _enable_ssl(server, certs)
        yield server, certs
    finally:
        server.close()


def _enable_ssl(server: PostgresServer, certs: Certificates) -> None:
    # The server account must read the key, and PostgreSQL accepts a key it
    # owns only with mode 0600.
    owner = server.pgdata.stat()
    for source, name in (
        (certs.server_cert, "server.pem"),
        (certs.server_key, "server.key"),
        (certs.ca, "ca.pem"),
    ):
        target = server.pgdata / name
        shutil.copy(source, target)
        target.chmod(0o600)
        os.chown(target, owner.st_uid, owner.st_gid)
    with open(server.pgdata / "postgresql.conf", "a") as conf:
        conf.write(
            "ssl = on\nssl_cert_file = 'server.pem'\n"
            "ssl_key_file = 'server.key'\nssl_ca_file = 'ca.pem'\n"
        )
    (server.pgdata / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 trust clientcert=verify-full\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
    )
    admin = psycopg2.connect(
        host=str(server.base_dir), port=server.port, user="postgres"
    )
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT pg_reload_conf()")
    admin.close()


def _config(
    server: PostgresServer, certs: Certificates, **keys: object
) -> PostgresConfig:
    defaults = {
        "sslmode": "verify-full",
        "sslrootcert": str(certs.ca),
        "sslcert": str(certs.client_cert),
        "sslkey": str(certs.client_key),
    }
    dsn = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    return PostgresConfig(dsn=dsn, connect_timeout=2, **{**defaults, **keys})


def _uses_ssl(config: PostgresConfig) -> bool:
    conn = open_connection(config)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            row = cur.fetchone()
            return bool(row and row[0])
    finally:
        conn.close()


def test_config_ssl_keys_reach_libpq(ssl_cluster) -> None:
    server, certs = ssl_cluster

    assert _uses_ssl(_config(server, certs))


def test_ssl_parameters_in_dsn_pass(ssl_cluster) -> None:
    server, certs = ssl_cluster
    dsn = (
        f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres "
        f"sslmode=verify-full sslrootcert={certs.ca} "
        f"sslcert={certs.client_cert} sslkey={certs.client_key}"
    )

    config = PostgresConfig(dsn=dsn, connect_timeout=2)

    assert _uses_ssl(config)


def test_plaintext_login_rejected(ssl_cluster) -> None:
    server, certs = ssl_cluster
    config = _config(server, certs, sslmode="disable", sslcert=None, sslkey=None)

    with pytest.raises(StoreUnavailable) as caught:
        open_connection(config)

    assert "no encryption" in str(caught.value)


def test_missing_client_certificate_rejected(ssl_cluster) -> None:
    server, certs = ssl_cluster
    config = _config(server, certs, sslcert=None, sslkey=None)

    with pytest.raises(StoreUnavailable) as caught:
        open_connection(config)

    assert "certificate" in str(caught.value)


def test_unknown_server_ca_rejected(ssl_cluster) -> None:
    server, certs = ssl_cluster
    config = _config(server, certs, sslrootcert=str(certs.other_ca))

    with pytest.raises(StoreUnavailable) as caught:
        open_connection(config)

    assert "certificate verify failed" in str(caught.value)


def test_ssl_file_checks(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    base = PostgresConfig(sslmode="verify-full", sslrootcert=str(certs.ca))

    with pytest.raises(ConfigError) as no_key:
        check_postgres_files(replace(base, sslcert=str(certs.client_cert)), "b.toml")
    with pytest.raises(ConfigError) as missing:
        check_postgres_files(
            replace(base, sslrootcert=str(tmp_path / "absent.pem")), "b.toml"
        )

    assert no_key.value.key == "postgres.sslkey"
    assert missing.value.key == "postgres.sslrootcert"
    assert missing.value.reason == "file not found"
