"""Command line of the edge agent: ``cnc-edge run|check|status``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from cnc_common import logs
from cnc_common.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnc-edge",
        description="Edge agent: serial CNC controller to NATS JetStream.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the agent (poller, buffer and publisher processes)"
    )
    run.add_argument("--config", required=True, help="path of the edge TOML config")
    run.add_argument(
        "--log-format", choices=("text", "json"), help="override [log] format"
    )
    run.add_argument(
        "--log-level", help="override [log] level (DEBUG, INFO, WARNING, ERROR)"
    )
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", required=True)
    status = sub.add_parser(
        "status", help="print the state of an agent from its data directory"
    )
    group = status.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="edge config whose data directory to read")
    group.add_argument("--data-dir", help="data directory to read")
    status.add_argument(
        "--json", action="store_true", help="print JSON instead of text"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cnc_edge.config import load_config

    try:
        config = load_config(args.config) if args.config else None
    except ConfigError as exc:
        print(f"cnc-edge: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.config}: OK (machine {config.machine.id})")
        return 0
    if args.command == "status":
        data_dir = Path(args.data_dir) if args.data_dir else config.data_dir
        return _print_status(data_dir, args.json)
    level = args.log_level or config.log.level
    fmt = args.log_format or config.log.format
    logs.configure(level, fmt, machine=config.machine.id, role="agent")
    from cnc_edge.agent import run_agent

    return run_agent(config)


def _print_status(data_dir: Path, as_json: bool) -> int:
    from cnc_edge.buffer import STATE_FILE

    path = data_dir / STATE_FILE
    try:
        status = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        print(
            f"cnc-edge: no state file at {path}; has the agent run with this data directory?",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        return 0
    age = time.time() - status.get("updated", 0)
    print(f"machine:        {status['machine']}")
    print(f"state:          {status['state']} since {time.ctime(status['since'])}")
    print(f"updated:        {age:.0f} s ago (pid {status['pid']})")
    print(
        f"buffered:       {status['buffered_bytes']} bytes in current.jsonl and "
        f"{status['sync_files']} sync files"
    )
    for key, value in status["counters"].items():
        print(f"{key + ':':<16}{value}")
    last = status.get("last_sync")
    if last:
        print(
            f"last sync:      {time.ctime(last['at'])}, {last['readings']} readings "
            f"in {last['seconds']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
