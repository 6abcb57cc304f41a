"""Configuration of the edge agent (``cnc-edge run --config edge.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cnc_common import config as cfg
from cnc_common.natsconn import NatsSecurity, check_security
from cnc_common.reading import MACHINE_ID_PATTERN, SUBJECT_PREFIX
from cnc_edge.reduce import DEFAULT_CONTINUOUS_FIELDS, check_continuous_fields

#: Commands polled when the config names none: identity, mode, counters,
#: timers and the program/status response.
DEFAULT_POLL_COMMANDS = [
    "Q100",
    "Q104",
    "Q200",
    "Q201",
    "Q300",
    "Q301",
    "Q303",
    "Q402",
    "Q500",
]


def _machine_id(value: str) -> str | None:
    if MACHINE_ID_PATTERN.match(value):
        return None
    return (
        "expected 1 to 64 letters, digits, '_' or '-' (it becomes a NATS subject token)"
    )


def _serial_url(value: str) -> str | None:
    """Check the scheme and the port of a pyserial URL, or a device path."""
    if value.startswith("/"):
        return None
    scheme, sep, rest = value.partition("://")
    if not sep:
        return "expected a device path such as /dev/ttyUSB0 or a URL such as socket://HOST:PORT"
    if scheme not in _SERIAL_SCHEMES:
        return "unknown scheme; expected a device path or one of " + ", ".join(
            f"{name}://" for name in sorted(_SERIAL_SCHEMES)
        )
    if scheme in ("socket", "rfc2217"):
        host, colon, port = rest.split("?")[0].rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"expected {scheme}://HOST:PORT with a port from 1 to 65535"
    return None


#: URL schemes that pyserial's serial_for_url opens (pyserial 3.5).
_SERIAL_SCHEMES = {"socket", "rfc2217", "loop", "spy", "alt", "hwgrep", "cp2110"}


def _data_dir(value: str) -> str | None:
    # A relative path would follow the working directory, which is / under
    # supervisord.
    if not value or not value.startswith("/"):
        return "expected an absolute path, for example /var/lib/cnc-edge/haas-vf2-01"
    return None


def _commands(value: list[str]) -> str | None:
    # Imported here so that loading a config does not import pyserial users.
    from cnc_edge.haas import validate_command

    for command in value:
        try:
            validate_command(command)
        except ValueError as exc:
            return str(exc)
    return None if value else "expected at least one command"


def _time_zone(value: str) -> str | None:
    if not value:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return (
            "unknown time zone; expected an IANA name such as Europe/Berlin, "
            "or an empty string for the host's local zone"
        )
    return None


def _fraction(value: float) -> str | None:
    if 0 < value <= 1:
        return None
    return "expected a fraction greater than 0 and at most 1, for example 0.8"


def _continuous_fields(value: list[str]) -> str | None:
    try:
        check_continuous_fields(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class MachineSection:
    id: str = field(metadata={cfg.CHECK: _machine_id})
    #: IANA time zone of the controller's clock, for example "Europe/Berlin";
    #: empty means the host's local zone.
    time_zone: str = field(default="", metadata={cfg.CHECK: _time_zone})


@dataclass(frozen=True)
class SerialSection:
    #: Anything pyserial's serial_for_url accepts: /dev/ttyUSB0, socket://host:port, loop://
    url: str = field(metadata={cfg.CHECK: _serial_url})
    baudrate: int = field(default=9600, metadata={cfg.CHECK: cfg.positive})
    bytesize: int = field(
        default=8,
        metadata={
            cfg.CHECK: lambda v: None if v in (5, 6, 7, 8) else "expected 5, 6, 7 or 8"
        },
    )
    parity: str = field(
        default="N", metadata={cfg.CHECK: cfg.one_of("N", "E", "O", "M", "S")}
    )
    stopbits: float = field(
        default=1.0,
        metadata={
            cfg.CHECK: lambda v: None if v in (1, 1.5, 2) else "expected 1, 1.5 or 2"
        },
    )
    xonxoff: bool = False
    rtscts: bool = False
    #: Overall deadline of one query in seconds, however slowly bytes arrive.
    query_timeout: float = field(default=2.0, metadata={cfg.CHECK: cfg.positive})
    reopen_backoff_initial: float = field(
        default=0.5, metadata={cfg.CHECK: cfg.positive}
    )
    reopen_backoff_cap: float = field(default=5.0, metadata={cfg.CHECK: cfg.positive})


@dataclass(frozen=True)
class PollSection:
    #: Seconds between the starts of two poll cycles.
    interval: float = field(default=1.0, metadata={cfg.CHECK: cfg.positive})
    commands: list[str] = field(
        default_factory=lambda: list(DEFAULT_POLL_COMMANDS),
        metadata={cfg.CHECK: _commands},
    )
    #: Macro variables read with Q600 on every poll.
    macros: list[int] = field(default_factory=list)
    #: Append every reading id the poller produces to this file (demo and tests).
    audit_file: str | None = None
    #: Read the controller's clock (macro variables #3011 date and #3012
    #: time) every cycle and record it as the reading's ctrl_ts.
    controller_clock: bool = True


@dataclass(frozen=True)
class NatsSection(NatsSecurity):
    """The ``[nats]`` section, with the auth and TLS keys of NatsSecurity."""

    url: str = field(
        default="nats://127.0.0.1:4222", metadata={cfg.CHECK: cfg.nats_url}
    )
    stream: str = "CNC_READINGS"
    subject_prefix: str = SUBJECT_PREFIX
    #: Create the stream when it is missing (a server that lost its store).
    create_stream: bool = True
    #: JetStream de-duplication window of a stream this agent creates, seconds.
    duplicate_window: float = field(default=120.0, metadata={cfg.CHECK: cfg.positive})
    #: A publish without a PubAck after this many seconds counts as failed and
    #: takes the agent OFFLINE.
    ack_timeout: float = field(default=5.0, metadata={cfg.CHECK: cfg.positive})
    connect_timeout: float = field(default=5.0, metadata={cfg.CHECK: cfg.positive})
    #: Keepalive: a server that misses max_outstanding_pings pings sent every
    #: ping_interval seconds is dropped; bound = interval * (pings + 1).
    ping_interval: float = field(default=5.0, metadata={cfg.CHECK: cfg.positive})
    max_outstanding_pings: int = field(default=2, metadata={cfg.CHECK: cfg.positive})
    reconnect_backoff_initial: float = field(
        default=0.2, metadata={cfg.CHECK: cfg.positive}
    )
    reconnect_backoff_cap: float = field(
        default=5.0, metadata={cfg.CHECK: cfg.positive}
    )


@dataclass(frozen=True)
class JournalSection:
    data_dir: str = field(metadata={cfg.CHECK: _data_dir})
    #: always: fsync every write; interval: at most fsync_interval_ms after a
    #: write; never: leave it to the kernel.
    fsync: str = field(
        default="interval",
        metadata={cfg.CHECK: cfg.one_of("always", "interval", "never")},
    )
    fsync_interval_ms: int = field(default=1000, metadata={cfg.CHECK: cfg.positive})
    #: Cap on current.jsonl plus sync/ in bytes (0: no cap). When it is
    #: reached, or the disk is full, full_policy decides which readings are
    #: dropped; every dropped reading is counted and logged (rate-limited).
    max_buffer_bytes: int = field(
        default=1 << 30, metadata={cfg.CHECK: cfg.non_negative}
    )
    full_policy: str = field(
        default="drop_newest",
        metadata={cfg.CHECK: cfg.one_of("drop_newest", "drop_oldest")},
    )
    #: Fraction of max_buffer_bytes at which the journal starts to keep only
    #: the readings whose discrete values changed and to fold the others
    #: into reduced records. Reduction is off when max_buffer_bytes is 0.
    reduce_at: float = field(default=0.8, metadata={cfg.CHECK: _fraction})
    #: Seconds of readings that one reduced record covers at most.
    reduce_window: float = field(default=60.0, metadata={cfg.CHECK: cfg.positive})
    #: Fields reduced to min, max and mean. Every other field is discrete and
    #: kept exactly, and "macros.*" matches every macro variable.
    continuous_fields: list[str] = field(
        default_factory=lambda: list(DEFAULT_CONTINUOUS_FIELDS),
        metadata={cfg.CHECK: _continuous_fields},
    )
    #: current.jsonl is rotated into sync/ when it reaches this size, which
    #: is also how much drop_oldest deletes at a time.
    segment_bytes: int = field(default=8 << 20, metadata={cfg.CHECK: cfg.positive})
    #: Readings sent to the publisher at once while replaying.
    replay_chunk: int = field(default=1000, metadata={cfg.CHECK: cfg.positive})


@dataclass(frozen=True)
class MetricsSection:
    listen: str = field(default="127.0.0.1:9101", metadata={cfg.CHECK: cfg.host_port})


@dataclass(frozen=True)
class LogSection:
    level: str = field(
        default="INFO",
        metadata={cfg.CHECK: cfg.one_of("DEBUG", "INFO", "WARNING", "ERROR")},
    )
    format: str = field(
        default="text", metadata={cfg.CHECK: cfg.one_of("text", "json")}
    )


@dataclass(frozen=True)
class EdgeConfig:
    machine: MachineSection
    serial: SerialSection
    journal: JournalSection
    poll: PollSection = field(default_factory=PollSection)
    nats: NatsSection = field(default_factory=NatsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.journal.data_dir)

    @property
    def subject(self) -> str:
        return f"{self.nats.subject_prefix}.{self.machine.id}"


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> EdgeConfig:
    """Load and check an edge config file; raise ConfigError naming the key."""
    data = cfg.load_toml(path)
    config = cfg.load(
        EdgeConfig, data, source=str(path), env_prefix="CNC_EDGE", environ=environ
    )
    check_security(config.nats, config.nats.url, str(path))
    return config
