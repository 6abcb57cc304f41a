"""The ``cnc-backend`` command: run, migrate, coverage or check."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import psycopg2
import psycopg2.errors

from cnc_backend import ledger, service
from cnc_backend.config import BackendConfig, describe_dsn, load_config
from cnc_backend.errors import BackendError
from cnc_backend.schema import migrate
from cnc_backend.store import open_connection
from cnc_common import logs
from cnc_common.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnc-backend",
        description="Consume CNC readings from NATS JetStream into PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="consume readings until SIGTERM or SIGINT")
    _add_config(run)
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log line format on stderr (default: [log] format)",
    )
    run.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="lowest level logged (default: [log] level)",
    )

    _add_config(commands.add_parser("migrate", help="apply pending schema migrations"))
    coverage = commands.add_parser(
        "coverage",
        help="print a machine's coverage spans and the share of time per kind",
    )
    _add_config(coverage)
    coverage.add_argument("--machine", required=True, help="machine id")
    coverage.add_argument(
        "--since",
        default="24h",
        type=_time_arg,
        help="start: ISO 8601 time (UTC unless it has a zone), or an age such as "
        "90m, 24h, 7d (default 24h)",
    )
    coverage.add_argument(
        "--until", type=_time_arg, help="end: ISO 8601 time or an age (default now)"
    )
    coverage.add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    _add_config(commands.add_parser("check", help="validate the configuration file"))
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, metavar="PATH", help="TOML configuration file"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cnc-backend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(f"OK: {args.config}")
        return EXIT_OK
    if args.command == "migrate":
        return _migrate(config)
    if args.command == "coverage":
        return _coverage(config, args)
    return _run(config, args)


def _migrate(config: BackendConfig) -> int:
    logs.configure(config.log.level, config.log.format, role="backend")
    target = describe_dsn(config.postgres.dsn)
    try:
        conn = open_connection(config.postgres)
        try:
            applied = migrate(conn)
        finally:
            conn.close()
    except (BackendError, psycopg2.Error) as exc:
        # MigrationError and StoreUnavailable carry the context; a bare
        # psycopg2 error here is a connection lost during a migration.
        print(f"cnc-backend: migrate failed on {target}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))} to {target}")
    else:
        print(f"schema up to date on {target}")
    return EXIT_OK


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _time_arg(text: str) -> datetime:
    """Parse an ISO 8601 time (UTC if it has no zone) or an age like ``24h``."""
    unit = text[-1:]
    try:
        if unit in _AGE_UNITS and text[:-1].isdigit():
            age = timedelta(seconds=int(text[:-1]) * _AGE_UNITS[unit])
            return datetime.now(UTC) - age
        value = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: give an ISO 8601 time such as "
            "2026-12-04T08:00:00Z or an age such as 90m, 24h or 7d "
            "(at most a few thousand years)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _coverage(config: BackendConfig, args: argparse.Namespace) -> int:
    target = describe_dsn(config.postgres.dsn)
    until = args.until or datetime.now(UTC)
    if args.since >= until:
        print(
            f"cnc-backend: --since {args.since.isoformat()} is not before --until "
            f"{until.isoformat()}: give a start earlier than the end",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        conn = open_connection(config.postgres)
        try:
            with conn, conn.cursor() as cur:
                known = ledger.machines(cur)
                rows = ledger.coverage(cur, args.machine, args.since, until)
        finally:
            conn.close()
    except psycopg2.errors.UndefinedTable:
        print(
            f"cnc-backend: no coverage ledger on {target}: check [postgres] dsn "
            "(or CNC_BACKEND_POSTGRES_DSN), then run 'cnc-backend migrate' if "
            "this is the backend's database",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except (BackendError, psycopg2.Error) as exc:
        print(f"cnc-backend: coverage failed on {target}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.machine not in known:
        listed = ", ".join(known[:20]) or "none yet"
        print(
            f"cnc-backend: no machine {args.machine!r} in the ledger on {target} "
            f"(machines: {listed})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    shares = ledger.summary(rows, (until - args.since).total_seconds())
    if args.json:
        print(json.dumps(ledger.report(args.machine, rows, shares), indent=2))
    else:
        print(ledger.format_table(args.machine, rows, shares))
    return EXIT_OK


def _run(config: BackendConfig, args: argparse.Namespace) -> int:
    level = args.log_level or config.log.level
    logs.configure(level, args.log_format or config.log.format, role="backend")
    # transitions logs every callback at INFO; the service logs each state
    # change itself.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if service.run(config):
        return EXIT_OK
    # A database call that outlived the drain deadline still occupies its
    # thread, and a normal interpreter exit would wait for it to finish.
    logging.shutdown()
    os._exit(EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
