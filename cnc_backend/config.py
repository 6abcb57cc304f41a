"""Backend configuration: a TOML file plus ``CNC_BACKEND_<SECTION>_<KEY>`` overrides.

Durations are in seconds. ``config/backend.toml`` lists every key at its
default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from psycopg2.extensions import parse_dsn

from cnc_common.config import (
    CHECK,
    SECRET,
    host_port,
    load,
    load_toml,
    nats_url,
    one_of,
    positive,
    read_config_file,
    read_secret_file,
)
from cnc_common.errors import ConfigError
from cnc_common.natsconn import NatsSecurity, check_security
from cnc_common.reading import MACHINE_ID_PATTERN, SUBJECT_PREFIX

ENV_PREFIX = "CNC_BACKEND"

#: libpq sslmode values, from the weakest to the strictest.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _max_deliver(value: int) -> str | None:
    if value == -1 or value >= 1:
        return None
    return "expected -1 (no limit) or a number of deliveries of 1 or more"


def _nats_name(value: str) -> str | None:
    # Stream and consumer names become tokens of JetStream API subjects.
    if MACHINE_ID_PATTERN.match(value):
        return None
    return "expected 1 to 64 letters, digits, '-' or '_'"


def _subject_prefix(value: str) -> str | None:
    tokens = value.split(".")
    if value and all(token and token not in ("*", ">") for token in tokens):
        return None
    return "expected dot-separated subject tokens without wildcards, e.g. cnc.readings"


def _replicas(value: int) -> str | None:
    if 1 <= value <= 5:
        return None
    return "expected 1 to 5, the replica counts JetStream allows"


def _dsn(value: str) -> str | None:
    try:
        parse_dsn(value)
    except Exception:  # psycopg2 raises ProgrammingError; any failure means invalid.
        return "expected a libpq connection string or postgresql:// URI"
    return None


@dataclass(frozen=True)
class NatsConfig(NatsSecurity):
    """The ``[nats]`` section, with the auth and TLS keys of NatsSecurity."""

    url: str = field(default="nats://127.0.0.1:4222", metadata={CHECK: nats_url})
    stream: str = field(default="CNC_READINGS", metadata={CHECK: _nats_name})
    subject_prefix: str = field(
        default=SUBJECT_PREFIX, metadata={CHECK: _subject_prefix}
    )
    durable: str = field(default="cnc-backend", metadata={CHECK: _nats_name})
    batch_size: int = field(default=500, metadata={CHECK: positive})
    fetch_timeout: float = field(default=1.0, metadata={CHECK: positive})
    ack_wait: float = field(default=30.0, metadata={CHECK: positive})
    max_deliver: int = field(default=-1, metadata={CHECK: _max_deliver})
    max_payload_bytes: int = field(default=65536, metadata={CHECK: positive})
    duplicate_window: float = field(default=120.0, metadata={CHECK: positive})
    stream_replicas: int = field(default=1, metadata={CHECK: _replicas})
    connect_timeout: float = field(default=2.0, metadata={CHECK: positive})
    ping_interval: float = field(default=10.0, metadata={CHECK: positive})
    max_outstanding_pings: int = field(default=3, metadata={CHECK: positive})


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str = field(
        default="postgresql://postgres@127.0.0.1:5432/test",
        repr=False,
        metadata={SECRET: True, CHECK: _dsn},
    )
    # libpq takes whole seconds here, and treats values below 2 as 2.
    connect_timeout: int = field(default=5, metadata={CHECK: positive})
    statement_timeout: float = field(default=15.0, metadata={CHECK: positive})
    keepalives_idle: int = field(default=10, metadata={CHECK: positive})
    keepalives_interval: int = field(default=5, metadata={CHECK: positive})
    keepalives_count: int = field(default=3, metadata={CHECK: positive})
    #: File whose content is the password. It overrides a password in the
    #: DSN and the PGPASSWORD variable, which libpq also reads.
    password_file: str | None = None
    # The SSL keys below override the same parameters in the DSN when set.
    sslmode: str | None = field(default=None, metadata={CHECK: one_of(*SSL_MODES)})
    #: CA certificates for verify-ca and verify-full ("system": the OS store).
    sslrootcert: str | None = None
    #: Client certificate and key; libpq refuses a key readable by others.
    sslcert: str | None = None
    sslkey: str | None = None


@dataclass(frozen=True)
class ServiceConfig:
    drain_timeout: float = field(default=10.0, metadata={CHECK: positive})
    reconnect_initial: float = field(default=0.5, metadata={CHECK: positive})
    reconnect_cap: float = field(default=10.0, metadata={CHECK: positive})


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = field(default="127.0.0.1:9102", metadata={CHECK: host_port})


@dataclass(frozen=True)
class LogConfig:
    level: str = field(
        default="INFO", metadata={CHECK: one_of("DEBUG", "INFO", "WARNING", "ERROR")}
    )
    format: str = field(default="text", metadata={CHECK: one_of("text", "json")})


@dataclass(frozen=True)
class BackendConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(path: str | Path) -> BackendConfig:
    """Load and check the backend configuration; raise ConfigError if invalid."""
    source = str(path)
    config = load(BackendConfig, load_toml(path), source=source, env_prefix=ENV_PREFIX)
    check_consistency(config, source)
    check_security(config.nats, config.nats.url, source)
    check_postgres_files(config.postgres, source)
    return config


def check_consistency(config: BackendConfig, source: str) -> None:
    """Check rules that involve more than one key; raise ConfigError."""
    if config.nats.fetch_timeout >= config.service.drain_timeout:
        raise ConfigError(
            source,
            "nats.fetch_timeout",
            "must be less than service.drain_timeout "
            f"({config.service.drain_timeout:g} s), because a drain waits for "
            "the fetch in progress",
            config.nats.fetch_timeout,
        )
    if config.service.reconnect_initial > config.service.reconnect_cap:
        raise ConfigError(
            source,
            "service.reconnect_initial",
            f"must not exceed service.reconnect_cap ({config.service.reconnect_cap:g} s)",
            config.service.reconnect_initial,
        )


def config_warnings(config: BackendConfig) -> list[str]:
    """Return settings that work but are likely mistakes, for the start-up log."""
    warnings = []
    # A write that may run longer than ack_wait lets JetStream redeliver the
    # batch while it is still being written. Storage stays correct because
    # inserts are idempotent, but such a batch is fetched and written twice.
    if config.postgres.statement_timeout >= config.nats.ack_wait:
        warnings.append(
            f"postgres.statement_timeout ({config.postgres.statement_timeout:g} s) "
            f"is not below nats.ack_wait ({config.nats.ack_wait:g} s); a slow write "
            "may be redelivered while it runs"
        )
    return warnings


def check_postgres_files(config: PostgresConfig, source: str) -> None:
    """Check the password and SSL files of ``[postgres]``; raise ConfigError."""
    if config.password_file:
        if "password" in parse_dsn(config.dsn):
            raise ConfigError(
                source,
                "postgres.password_file",
                "set either a password in postgres.dsn or postgres.password_file, "
                "not both",
            )
        read_secret_file(config.password_file, "postgres.password_file", source)
    if bool(config.sslcert) != bool(config.sslkey):
        missing = "sslkey" if config.sslcert else "sslcert"
        raise ConfigError(
            source,
            f"postgres.{missing}",
            "missing: a client certificate needs both postgres.sslcert and "
            "postgres.sslkey",
        )
    for key in ("sslrootcert", "sslcert", "sslkey"):
        path = getattr(config, key)
        if path and not (key == "sslrootcert" and path == "system"):
            read_config_file(path, f"postgres.{key}", source)


def postgres_connect_options(config: PostgresConfig) -> dict[str, Any]:
    """Return the psycopg2.connect keyword arguments for the password file and SSL.

    Keyword arguments override the same parameters in the DSN.
    """
    options: dict[str, Any] = {
        key: getattr(config, key)
        for key in ("sslmode", "sslrootcert", "sslcert", "sslkey")
        if getattr(config, key)
    }
    if config.password_file:
        options["password"] = read_secret_file(
            config.password_file, "postgres.password_file", "config"
        )
    return options


def describe_dsn(dsn: str) -> str:
    """Return ``user@host:port/dbname`` for log lines, without the password."""
    try:
        parts = parse_dsn(dsn)
    except Exception:
        return "(invalid dsn)"
    user = parts.get("user", "")
    host = parts.get("host", "localhost")
    port = parts.get("port", "5432")
    dbname = parts.get("dbname", user)
    return f"{user}@{host}:{port}/{dbname}"


def describe_nats_url(url: str) -> str:
    """Return the server URLs with any ``user:password@`` removed."""
    cleaned = []
    for part in url.split(","):
        split = urlsplit(part.strip())
        netloc = split.netloc.rpartition("@")[2]
        cleaned.append(urlunsplit(split._replace(netloc=netloc)))
    return ",".join(cleaned)
