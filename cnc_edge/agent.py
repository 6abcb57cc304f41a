"""The edge agent's parent process: starts, watches and stops three children.

poller -> buffer -> publisher, each its own OS process, so that a serial
driver hanging in a system call, a slow disk or a stuck NATS client cannot
stall the others. The parent only supervises: if a child dies it stops the
others in order, so the buffer can put what it holds on disk, and exits
non-zero for supervisord to restart the agent.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import orjson

from cnc_common.httpserver import EndpointServer
from cnc_edge.buffer import STATE_FILE, run_buffer
from cnc_edge.config import EdgeConfig
from cnc_edge.endpoints import AgentEndpoints
from cnc_edge.errors import EdgeError
from cnc_edge.journal import make_private_dir, write_new_private_file
from cnc_edge.metrics import (
    METRICS_DIR,
    aggregate_registry,
    forget_process,
    prepare_multiprocess_dir,
)
from cnc_edge.poller import PREVIOUS_POLL_FILE, read_last_poll, run_poller
from cnc_edge.process import StopFlag
from cnc_edge.publisher import run_publisher

log = logging.getLogger(__name__)

#: Seconds each child gets to stop before it is killed. The sum, plus
#: KILL_WAIT for each child, stays below stopwaitsecs in
#: config/supervisord.conf (a test checks it).
POLLER_STOP_TIMEOUT = 10.0
BUFFER_STOP_TIMEOUT = 20.0
PUBLISHER_STOP_TIMEOUT = 10.0
#: Seconds to wait for a child to exit after SIGKILL.
KILL_WAIT = 5.0

AGENT_FILE = "agent.json"
#: Written at a clean stop with the boot id that ended; see _record_clean_stop.
CLEAN_STOP_FILE = "clean_stop.json"
LOCK_FILE = "agent.lock"


class EdgeAgent:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.ctx = multiprocessing.get_context("spawn")
        self.readings = self.ctx.Queue()
        self.to_publisher = self.ctx.Queue()
        self.from_publisher = self.ctx.Queue()
        self.poller_stop = StopFlag(self.ctx)
        self.buffer_stop = StopFlag(self.ctx)
        self.publisher_dead = StopFlag(self.ctx)
        self.children: dict[str, Any] = {}
        self._stop_requested = threading.Event()
        self.metrics_dir = config.data_dir / METRICS_DIR
        self.metrics_url: str | None = None
        self._endpoint_server: EndpointServer | None = None

    def _start_children(self) -> None:
        pid = os.getpid()
        # Read before the new poller starts: it overwrites poller.last with
        # its first reading. The buffer reports the previous boot's readings
        # up to this one as lost with reason agent_down, unless acknowledged.
        previous_poll = read_last_poll(self.config.data_dir) or read_last_poll(
            self.config.data_dir, PREVIOUS_POLL_FILE
        )
        if previous_poll is not None and _stopped_cleanly(
            self.config.data_dir, previous_poll["boot"]
        ):
            # Everything that boot polled is on disk or acknowledged.
            previous_poll = None
        (self.config.data_dir / CLEAN_STOP_FILE).unlink(missing_ok=True)
        specs = {
            "publisher": (
                run_publisher,
                (self.config, self.to_publisher, self.from_publisher),
            ),
            "buffer": (
                run_buffer,
                (
                    self.config,
                    self.readings,
                    self.to_publisher,
                    self.from_publisher,
                    self.buffer_stop,
                    self.publisher_dead,
                    pid,
                    previous_poll,
                ),
            ),
            "poller": (run_poller, (self.config, self.readings, self.poller_stop, pid)),
        }
        for name, (target, args) in specs.items():
            process = self.ctx.Process(
                target=target, args=args, name=f"cnc-edge-{name}"
            )
            process.start()
            self.children[name] = process
            log.info("child started: %s (pid %s)", name, process.pid)
        self.write_agent_file()

    def write_agent_file(self) -> None:
        """Record the process ids in ``<data_dir>/agent.json`` for operators and tests."""
        info = {
            "pid": os.getpid(),
            "machine": self.config.machine.id,
            "started": time.time(),
            "children": {name: process.pid for name, process in self.children.items()},
            "metrics_url": self.metrics_url,
        }
        target = self.config.data_dir / AGENT_FILE
        make_private_dir(target.parent)
        tmp = target.with_suffix(".tmp")
        write_new_private_file(tmp, orjson.dumps(info, option=orjson.OPT_INDENT_2))
        os.replace(tmp, target)

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        if signum is not None:
            log.info("stop requested: signal %s", signal.Signals(signum).name)
        self._stop_requested.set()

    def run(self) -> int:
        """Run until a stop signal or a child's death; return the exit status."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # A state file left by the previous run would report its last state
        # until the new buffer writes one.
        (self.config.data_dir / STATE_FILE).unlink(missing_ok=True)
        self._start_endpoints()
        try:
            return self._supervise()
        finally:
            self._stop_endpoints()

    def _supervise(self) -> int:
        self._start_children()
        sentinels = {process.sentinel: name for name, process in self.children.items()}
        died: str | None = None
        while not self._stop_requested.is_set():
            ready = wait(list(sentinels), timeout=0.5)
            if ready:
                died = sentinels[ready[0]]
                self.children[died].join(1)
                # Its gauges must not be served while the others stop.
                forget_process(self.children[died].pid, self.metrics_dir)
                code = self.children[died].exitcode
                log.error(
                    "child died: %s (exit code %s); stopping the agent", died, code
                )
                break
        self._stop_children(died)
        if died is None and all(
            self.children[name].exitcode == 0 for name in ("poller", "buffer")
        ):
            self._record_clean_stop()
        return 1 if died else 0

    def _record_clean_stop(self) -> None:
        """Record that the boot that just ended lost nothing it polled.

        The poller and the buffer exited normally, so every reading polled
        is journaled or acknowledged, and the next start need not report
        the boot's readings as lost with reason agent_down.
        """
        last = read_last_poll(self.config.data_dir)
        if last is None:
            return
        target = self.config.data_dir / CLEAN_STOP_FILE
        tmp = target.with_suffix(".tmp")
        try:
            write_new_private_file(tmp, orjson.dumps({"boot": last["boot"]}))
            os.replace(tmp, target)
        except OSError as exc:
            # The next start then reports the boot's readings as agent_down,
            # which marks nothing LOST that was stored.
            log.warning("clean stop not recorded: %s (%s)", target, exc)

    def _stop_children(self, died: str | None) -> None:
        """Stop in data-flow order: no new readings, flush to disk, then close NATS."""
        if died == "publisher":
            self.publisher_dead.set()
        self.poller_stop.set()
        self._join("poller", POLLER_STOP_TIMEOUT)
        self.buffer_stop.set()
        self._join("buffer", BUFFER_STOP_TIMEOUT)
        if self.children["buffer"].exitcode != 0:
            # The buffer could not send its stop message; stop the publisher directly.
            self.to_publisher.put(("stop",))
        self._join("publisher", PUBLISHER_STOP_TIMEOUT)
        for q in (self.readings, self.to_publisher, self.from_publisher):
            q.cancel_join_thread()
            q.close()
        log.info("agent stopped: %s", self.config.machine.id)

    def _join(self, name: str, timeout: float) -> None:
        process = self.children[name]
        process.join(timeout)
        if process.is_alive():
            log.error("child did not stop: %s after %.0f s, killing it", name, timeout)
            process.kill()
            process.join(KILL_WAIT)
        if not process.is_alive():
            forget_process(process.pid, self.metrics_dir)

    # HTTP endpoints -------------------------------------------------------

    def _start_endpoints(self) -> None:
        """Empty the children's metric directory and serve the endpoints.

        Runs before any child is spawned, because the children read
        PROMETHEUS_MULTIPROC_DIR from the environment they inherit.
        """
        prepare_multiprocess_dir(self.metrics_dir)
        registry = aggregate_registry(self.metrics_dir)
        endpoints = AgentEndpoints(self.config, registry, self._process_ids)
        server = EndpointServer(self.config.metrics.listen, endpoints.routes())
        try:
            self.metrics_url = server.start()
        except OSError as exc:
            # Polling matters more than metrics: a busy port must not stop the
            # agent from collecting readings.
            log.error(
                "metrics endpoint failed: %s (%s); running without it",
                self.config.metrics.listen,
                exc,
            )
            return
        self._endpoint_server = server
        log.info("metrics: listening on %s", self.metrics_url)

    def _stop_endpoints(self) -> None:
        if self._endpoint_server is not None:
            self._endpoint_server.close()
            self._endpoint_server = None

    def _process_ids(self) -> dict[str, Any]:
        children = list(self.children.items())
        return {
            "pid": os.getpid(),
            "children": {name: process.pid for name, process in children},
        }


class DataDirError(EdgeError):
    """The data directory cannot be used: not creatable, or in use by another agent."""


def claim_data_dir(data_dir: Path) -> int:
    """Create the data directory and lock it for this agent; return the lock's fd.

    Two agents on one directory would rotate and delete each other's
    journal files. The lock is released by the kernel when this process
    exits, however it exits.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(
            data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        raise DataDirError(
            f"journal.data_dir {data_dir} cannot be used ({exc.strerror}); "
            "point it at a writable directory"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirError(
            f"journal.data_dir {data_dir} is in use by another cnc-edge agent; "
            "give each machine its own data directory"
        ) from None
    return fd


def _stopped_cleanly(data_dir: Path, boot: str) -> bool:
    """Return whether the boot ``boot`` recorded a clean stop."""
    try:
        data = orjson.loads((data_dir / CLEAN_STOP_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("boot") == boot


def run_agent(config: EdgeConfig) -> int:
    started = time.monotonic()
    lock = claim_data_dir(config.data_dir)
    try:
        code = EdgeAgent(config).run()
    finally:
        os.close(lock)
    log.info("agent exit: %d after %.1f s", code, time.monotonic() - started)
    return code
