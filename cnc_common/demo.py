"""cnc-demo: the whole pipeline on one machine, with an outage in the middle.

Starts a simulated Haas controller, an edge agent and a backend (and, unless
--nats-url or --pg-dsn is given, an embedded nats-server and PostgreSQL on
free loopback ports), takes the broker down and back up once, stops everything in order
and checks the database against every reading id the poller produced.

Before it, a line gives the share of the run's time per coverage kind from
the backend's ledger (LIVE, BACKFILLED, LOST with its reason; see
docs/COVERAGE.md). The last line printed is JSON:
``{"polled": P, "stored": S, "missing": M, "duplicates": D, "outages": O,
"coverage": {"LIVE": percent, ...}}``; the exit status is 1 when anything
is missing or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg2

from cnc_backend import ledger
from cnc_common.embedded import NatsServer, PostgresServer, die_with_parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnc-demo",
        description="Run simulator, edge agent and backend together and verify every reading.",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="how long to poll, in seconds (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--nats-url", help="use this NATS server instead of an embedded one"
    )
    parser.add_argument(
        "--pg-dsn", help="use this PostgreSQL database instead of an embedded one"
    )
    parser.add_argument(
        "--no-outage", action="store_true", help="do not take the broker down midway"
    )
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=5.0,
        help="how long the broker stays down (default: 5)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.2,
        help="poll interval of the edge agent in seconds (default: 0.2)",
    )
    parser.add_argument(
        "--workdir",
        help="keep configs, logs and data here instead of a temporary directory",
    )
    return parser


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.started_wall = time.time()
        if args.workdir:
            self.workdir = Path(args.workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.keep = True
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="cnc-demo-"))
            self.keep = False
        self.nats: NatsServer | None = None
        self.postgres: PostgresServer | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.outages = 0
        self.interrupted = False
        self.audit = self.workdir / "polled-ids.txt"
        # Names of this run, so that a demo pointed at a shared broker or
        # database neither takes other consumers' readings nor counts rows
        # of earlier runs.
        self.run_id = uuid.uuid4().hex[:8]
        self.machine = f"demo-vf2-{self.run_id}"
        self.stream = f"CNC_DEMO_{self.run_id.upper()}"
        self.subject_prefix = f"cncdemo.{self.run_id}"
        self.failed = False
        self.last_sync_at: float | None = None
        self.data_dir = self.workdir / "edge-data"

    # Output --------------------------------------------------------------

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    # Start-up ------------------------------------------------------------

    def start_servers(self) -> tuple[str, str]:
        if self.args.nats_url:
            nats_url = self.args.nats_url
        else:
            self.nats = NatsServer(self.workdir / "nats", die_with_parent=True).start()
            nats_url = self.nats.url
            self.say(
                f"nats-server started: {nats_url} (JetStream store in {self.nats.store_dir})"
            )
        if self.args.pg_dsn:
            pg_dsn = self.args.pg_dsn
        else:
            self.postgres = PostgresServer(self.workdir / "postgres").start()
            pg_dsn = self.postgres.dsn
            self.say(f"PostgreSQL started: 127.0.0.1:{self.postgres.port}")
        return nats_url, pg_dsn

    def _spawn(
        self, name: str, args: list[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        stderr = open(log_path, "ab")
        process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=die_with_parent,
            **kwargs,
        )
        stderr.close()
        self.procs[name] = process
        return process

    def start_simulator(self) -> str:
        process = self._spawn(
            "simulator",
            [
                "-m",
                "cnc_edge.simulator",
                "--tcp",
                "0",
                "--seed",
                "7",
                "--pace",
                "20",
                "--cycle-seconds",
                "30",
            ],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith("socket://"):
            raise RuntimeError(
                f"simulator did not print its URL (got {line!r}); see {self.workdir}/logs/simulator.log"
            )
        self.say(f"simulator listening: {line}")
        return line

    def write_configs(
        self, nats_url: str, pg_dsn: str, serial_url: str
    ) -> tuple[Path, Path]:
        edge = self.workdir / "edge.toml"
        edge.write_text(
            f"""[machine]
id = "{self.machine}"

[serial]
url = "{serial_url}"
query_timeout = 1.0

[poll]
interval = {self.args.interval}
audit_file = "{self.audit}"

[nats]
url = "{nats_url}"
stream = "{self.stream}"
subject_prefix = "{self.subject_prefix}"
ack_timeout = 2.0
ping_interval = 2.0

[journal]
data_dir = "{self.data_dir}"

[metrics]
listen = "127.0.0.1:0"
"""
        )
        backend = self.workdir / "backend.toml"
        backend.write_text(
            f"""[nats]
url = "{nats_url}"
stream = "{self.stream}"
subject_prefix = "{self.subject_prefix}"
durable = "cnc-demo-{self.run_id}"

[service]
reconnect_cap = 1.0

[postgres]

[metrics]
listen = "127.0.0.1:0"
"""
        )
        # The DSN may carry a password: pass it through the environment.
        os.environ["CNC_BACKEND_POSTGRES_DSN"] = pg_dsn
        return edge, backend

    # Watching --------------------------------------------------------------

    def edge_status(self) -> dict[str, Any]:
        try:
            return orjson.loads((self.data_dir / "state.json").read_bytes())
        except (OSError, ValueError):
            return {}

    def edge_state(self) -> str:
        return self.edge_status().get("state", "STARTING")

    def polled(self) -> list[str]:
        try:
            return self.audit.read_text().split()
        except FileNotFoundError:
            return []

    def stored_count(self, dsn: str) -> int | None:
        try:
            with contextlib.closing(psycopg2.connect(dsn, connect_timeout=2)) as conn:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM readings WHERE machine_id = %s",
                        (self.machine,),
                    )
                    return int(cur.fetchone()[0])
        except psycopg2.Error:
            return None

    def check_children(self) -> None:
        for name, process in self.procs.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {process.returncode}; last lines of "
                    f"{self.workdir}/logs/{name}.log:\n{self.log_tail(name)}"
                )

    def watch(self, pg_dsn: str) -> None:
        seconds = self.args.seconds
        outage_at = None
        if not self.args.no_outage:
            if self.nats is None:
                self.say("outage skipped: the broker is external (--nats-url)")
            else:
                outage_at = (
                    (seconds / 2 - self.args.outage_seconds / 2) if seconds else 15.0
                )
                outage_at = max(outage_at, 3.0)
        outage_end = None
        last_state = None
        last_report = 0.0
        run_started = time.monotonic()
        while not self.interrupted:
            elapsed = time.monotonic() - run_started
            if seconds is not None and elapsed >= seconds:
                break
            self.check_children()
            if outage_at is not None and elapsed >= outage_at and outage_end is None:
                assert self.nats is not None
                self.nats.stop()
                self.outages += 1
                outage_end = elapsed + self.args.outage_seconds
                self.say(
                    f"outage: nats-server stopped for {self.args.outage_seconds:.0f} s"
                )
            if (
                outage_end is not None
                and elapsed >= outage_end
                and outage_at is not None
            ):
                assert self.nats is not None
                self.nats.start()
                outage_at = None
                self.say("outage over: nats-server started again with its store")
            last_sync = self.edge_status().get("last_sync")
            if last_sync and last_sync["at"] != self.last_sync_at:
                self.last_sync_at = last_sync["at"]
                if last_sync["readings"]:
                    self.say(
                        f"edge synced: {last_sync['readings']} journaled readings "
                        f"replayed in {last_sync['seconds']} s, then ONLINE"
                    )
            state = self.edge_state()
            if state != last_state or elapsed - last_report >= 5:
                stored = self.stored_count(pg_dsn)
                self.say(
                    f"edge {state:<8} polled {len(self.polled()):>6}  stored {stored if stored is not None else '?':>6}"
                )
                last_state = state
                last_report = elapsed
            time.sleep(0.25)

    # Shutdown and verdict -----------------------------------------------------

    def stop_edge(self) -> None:
        if (
            self.nats is not None
            and self.nats.process
            and self.nats.process.poll() is not None
        ):
            self.nats.start()
            self.say("nats-server started again before stopping")
        deadline = time.monotonic() + 60
        while self.edge_state() != "ONLINE" and time.monotonic() < deadline:
            time.sleep(0.2)
        self._stop("edge", 60)

    def wait_stored(self, pg_dsn: str, expected: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stored = self.stored_count(pg_dsn)
            if stored is not None and stored >= expected:
                return
            time.sleep(0.25)

    def _stop(self, name: str, timeout: float) -> None:
        process = self.procs.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.say(f"{name} did not stop within {timeout:.0f} s; killing it")
            process.kill()
            process.wait()
        self.say(f"{name} stopped (exit status {process.returncode})")

    def verdict(self, pg_dsn: str) -> dict[str, Any]:
        polled = self.polled()
        with contextlib.closing(psycopg2.connect(pg_dsn, connect_timeout=5)) as conn:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT id FROM readings WHERE machine_id = %s", (self.machine,)
                )
                stored_ids = [row[0] for row in cur.fetchall()]
                since = datetime.fromtimestamp(self.started_wall, UTC)
                spans = ledger.coverage(cur, self.machine, since)
        stored = set(stored_ids)
        shares = ledger.summary(spans)
        self.say(
            "coverage: "
            + (", ".join(f"{k} {v:.1f}%" for k, v in shares.items()) or "none")
            + f" ({len(spans)} spans)"
        )
        if self.args.pg_dsn:
            self.say(
                "list the spans with: CNC_BACKEND_POSTGRES_DSN=<your --pg-dsn> "
                "cnc-backend coverage --config config/backend.toml "
                f"--machine {self.machine} --since 1h"
            )
        return {
            "polled": len(polled),
            "stored": len(stored_ids),
            "missing": len(set(polled) - stored),
            "duplicates": len(stored_ids) - len(stored),
            "outages": self.outages,
            "coverage": {key: round(value, 1) for key, value in shares.items()},
        }

    def cleanup(self) -> None:
        for name in list(self.procs):
            self._stop(name, 10)
        if self.nats is not None:
            self.nats.close()
        elif self.args.nats_url:
            self._delete_stream(self.args.nats_url)
        if self.postgres is not None:
            self.postgres.close()
        if self.failed:
            print(f"cnc-demo: kept {self.workdir} for inspection", file=sys.stderr)
        elif not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _delete_stream(self, nats_url: str) -> None:
        """Remove this run's stream from a broker that is not the demo's own."""

        async def delete() -> None:
            nc = await nats.connect(
                nats_url, connect_timeout=5, max_reconnect_attempts=1
            )
            try:
                await nc.jetstream().delete_stream(self.stream)
            finally:
                await nc.close()

        try:
            asyncio.run(delete())
        except Exception as exc:  # noqa: BLE001 - cleanup reports and goes on
            print(f"cnc-demo: stream {self.stream} not deleted: {exc}", file=sys.stderr)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        try:
            text = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])

    def run(self) -> int:
        self.say(f"work directory: {self.workdir} (logs in {self.workdir / 'logs'})")
        nats_url, pg_dsn = self.start_servers()
        serial_url = self.start_simulator()
        edge_cfg, backend_cfg = self.write_configs(nats_url, pg_dsn, serial_url)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cnc_backend.cli",
                "migrate",
                "--config",
                str(backend_cfg),
            ],
            check=True,
        )
        self._spawn(
            "backend", ["-m", "cnc_backend.cli", "run", "--config", str(backend_cfg)]
        )
        self._spawn("edge", ["-m", "cnc_edge.cli", "run", "--config", str(edge_cfg)])
        self.say(
            "edge agent and backend started"
            + ("" if self.args.seconds else "; Ctrl-C to stop")
        )
        self.watch(pg_dsn)
        self.say(
            "stopping: edge agent first, then the backend once it has stored everything"
        )
        self.stop_edge()
        self.wait_stored(pg_dsn, len(self.polled()))
        self._stop("backend", 30)
        self._stop("simulator", 10)
        result = self.verdict(pg_dsn)
        leftovers = list((self.data_dir / "sync").glob("*.jsonl"))
        current = self.data_dir / "current.jsonl"
        if leftovers or (current.exists() and current.stat().st_size):
            self.say(
                f"edge journal not empty: {len(leftovers)} sync files, current.jsonl {current.stat().st_size} bytes"
            )
        print(
            orjson.dumps(result).decode().replace(",", ", ").replace(":", ": "),
            flush=True,
        )
        self.failed = bool(result["missing"] or result["duplicates"])
        return 1 if self.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("seconds", "outage_seconds", "interval"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(
                f"--{name.replace('_', '-')} must be greater than 0, got {value}"
            )
    demo = Demo(args)

    def interrupt(signum: int, frame: Any) -> None:
        demo.interrupted = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return demo.run()
    except Exception as exc:  # noqa: BLE001 - report and clean up
        demo.failed = True
        print(f"cnc-demo: failed: {exc}", file=sys.stderr)
        return 2
    finally:
        demo.cleanup()


if __name__ == "__main__":
    sys.exit(main())
