"""Command line of the edge agent: ``cnc-edge run|check|status``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
        print(f"OK: {args.config} (machine {config.machine.id})")
        return 0
    if args.command == "status":
        data_dir = Path(args.data_dir) if args.data_dir else config.data_dir
        try:
            return _print_status(data_dir, args.json)
        except BrokenPipeError:
            # The reader went away (``cnc-edge status | head``); not an error.
            sys.stderr.close()
            return 0
    # The children read their log settings from the config, so the command
    # line overrides go into it.
    log_settings = dataclasses.replace(
        config.log,
        level=(args.log_level or config.log.level).upper(),
        format=args.log_format or config.log.format,
    )
    config = dataclasses.replace(config, log=log_settings)
    logs.configure(
        log_settings.level, log_settings.format, machine=config.machine.id, role="agent"
    )
    from cnc_edge.agent import DataDirError, run_agent

    try:
        return run_agent(config)
    except DataDirError as exc:
        print(f"cnc-edge: {exc}", file=sys.stderr)
        return 2


def disk_status(data_dir: Path) -> dict[str, Any]:
    """Summarise a data directory from its files and the buffer's state.json."""
    from cnc_edge.buffer import STATE_FILE
    from cnc_edge.journal import (
        CURRENT,
        QUARANTINE,
        SYNC_DIR,
        count_lines,
        oldest_buffered_ts,
    )
    from cnc_edge.poller import read_last_poll

    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    try:
        status: dict[str, Any] = orjson.loads((data_dir / STATE_FILE).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        status = {"state": "UNKNOWN"}
    status["running"] = _pid_alive(status.get("pid"))
    files = [data_dir / CURRENT, *sorted((data_dir / SYNC_DIR).glob("*.jsonl"))]
    readings = size = 0
    for path in files:
        if not path.exists():
            continue
        progress = 0
        if path.parent.name == SYNC_DIR:
            try:
                progress = int(path.with_suffix(".progress").read_text())
            except (FileNotFoundError, ValueError):
                progress = 0
        readings += count_lines(path, progress)
        size += path.stat().st_size - progress
    status["buffered_readings"] = readings
    status["buffered_bytes"] = size
    status["sync_files"] = len(files) - 1
    oldest = oldest_buffered_ts(data_dir)
    status["oldest_buffered_ts"] = oldest
    status["oldest_buffered_age_seconds"] = _age(oldest)
    status["quarantined_lines"] = count_lines(data_dir / QUARANTINE)
    status["last_poll"] = read_last_poll(data_dir)
    return status


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(ts: str | None) -> float | None:
    if ts is None:
        return None
    then = datetime.fromisoformat(ts)
    return round((datetime.now(UTC) - then).total_seconds(), 3)


def _print_status(data_dir: Path, as_json: bool) -> int:
    try:
        status = disk_status(data_dir)
    except FileNotFoundError as exc:
        print(f"cnc-edge: {exc}; check journal.data_dir in the config", file=sys.stderr)
        return 1
    if as_json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        return 0
    running = "running" if status["running"] else "not running"
    print(f"machine:          {status.get('machine', '?')}")
    print(f"state:            {status['state']} ({running})")
    if "since" in status:
        print(f"since:            {time.ctime(status['since'])}")
    print(
        f"buffered:         {status['buffered_readings']} readings, "
        f"{status['buffered_bytes']} bytes, {status['sync_files']} sync files"
    )
    if status["oldest_buffered_ts"]:
        print(
            f"oldest buffered:  {status['oldest_buffered_ts']} "
            f"({status['oldest_buffered_age_seconds']:.0f} s ago)"
        )
    print(f"quarantined:      {status['quarantined_lines']} lines")
    poll = status["last_poll"]
    if poll:
        print(
            f"controller:       {poll.get('condition', 'unknown')} "
            f"(last poll seq {poll['seq']} at {poll['ts']})"
        )
    last = status.get("last_sync")
    if last:
        print(
            f"last sync:        {time.ctime(last['at'])}, {last['readings']} readings "
            f"in {last['seconds']} s"
        )
    for key, value in status.get("counters", {}).items():
        print(f"{key + ':':<18}{value}")
    for reason, count in status.get("dropped", {}).items():
        print(f"{'dropped ' + reason + ':':<18}{count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
