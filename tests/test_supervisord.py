"""config/supervisord.conf under a real supervisord, with real servers.

Each test renders a copy of the example config into its temporary directory.
The programs and every supervisord setting stay as committed. Only the paths
(this virtualenv, the socket), the environment (serial port, NATS,
PostgreSQL, journal directory, port 0 for the endpoints) and the configs the
programs read change. supervisord runs in the foreground with its own socket, so
no system supervisord is touched. Two edge agents poll two simulated
controls on real pseudo-terminals; a nats-server and a database belong to
each test.
"""

from __future__ import annotations

import collections
import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil
import pytest
from supervisor.datatypes import dict_of_key_value_pairs

from cnc_common.embedded import NatsServer
from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer
from tests.helpers import (
    edge_status,
    polled_ids,
    stored_ids,
    stream_ids,
    wait_for,
    write_backend_config,
    write_edge_config,
)
from tests.prometheus import request, scrape, values

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONF = ROOT / "config" / "supervisord.conf"
BIN = Path(sys.executable).parent
VENV_BIN = "%(here)s/../.venv/bin/"
BACKEND = "cnc-backend"


@dataclass
class Edge:
    program: str
    machine: str
    directory: Path
    sim: PtyServer

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def agent_info(self) -> dict:
        try:
            return orjson.loads((self.data / "agent.json").read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {}


class Supervisor:
    """A supervisord started by the test, driven through supervisorctl."""

    def __init__(self, conf: Path, log_dir: Path) -> None:
        self.conf = conf
        self.log_dir = log_dir
        self.parser = configparser.RawConfigParser()
        self.parser.read(conf)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_dir / "supervisord.out", "ab") as out:
            self.process = subprocess.Popen(
                [str(BIN / "supervisord"), "-n", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: self.ctl("status").returncode in (0, 3),
            30,
            "supervisord answering on its socket",
            interval=0.3,
        )

    def ctl(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, str]:
        """Map each program to its state (RUNNING, STARTING, STOPPED...)."""
        lines = self.ctl("status").stdout.splitlines()
        return {line.split()[0]: line.split()[1] for line in lines if line.strip()}

    def pid(self, program: str) -> int:
        return int(self.ctl("pid", program).stdout.strip())

    def wait_running(self, programs: list[str], timeout: float = 60) -> None:
        wait_for(
            lambda: all(self.status().get(p) == "RUNNING" for p in programs),
            timeout,
            f"{programs} RUNNING (last: {self.status()})",
            interval=0.5,
        )

    def stopwaitsecs(self, program: str) -> int:
        return self.parser.getint(f"program:{program}", "stopwaitsecs")

    def log(self) -> str:
        path = self.log_dir / "supervisord.log"
        return path.read_text() if path.exists() else ""

    def shutdown(self) -> None:
        """Stop every program through supervisord, then supervisord itself."""
        if self.process is None or self.process.poll() is not None:
            return
        pids = [int(p) for p in self.ctl("pid", "all").stdout.split() if p.isdigit()]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(180)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Programs are process group leaders; kill what supervisord left, if
        # anything, so that no agent of this test keeps running.
        for pid in pids:
            if psutil.pid_exists(pid):
                os.killpg(pid, signal.SIGKILL)


def render_conf(
    tmp: Path, socket_dir: Path, nats_url: str, pg_dsn: str, sims: list[PtyServer]
) -> tuple[Path, list[Edge]]:
    """Copy the example config into ``tmp/config`` with this test's values."""
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(EXAMPLE_CONF)
    conf_dir = tmp / "config"
    conf_dir.mkdir()
    (tmp / "var" / "log").mkdir(parents=True)
    write_edge_config(conf_dir, serial_url="set by each program", nats_url=nats_url)
    write_backend_config(conf_dir, nats_url=nats_url)

    # A unix socket path must fit in 108 bytes, which tmp_path may not.
    parser["unix_http_server"]["file"] = str(socket_dir / "supervisor.sock")
    parser["supervisorctl"]["serverurl"] = f"unix://{socket_dir}/supervisor.sock"
    edges = []
    for section in parser.sections():
        if not section.startswith("program:"):
            continue
        program = section.partition(":")[2]
        command = parser[section]["command"]
        assert command.startswith(VENV_BIN), command
        parser[section]["command"] = command.replace(VENV_BIN, f"{BIN}/", 1)
        if program == BACKEND:
            env = {"CNC_BACKEND_POSTGRES_DSN": pg_dsn}
        else:
            machine = dict_of_key_value_pairs(parser[section]["environment"])[
                "CNC_EDGE_MACHINE_ID"
            ]
            edge = Edge(program, machine, tmp / program, sims[len(edges)])
            edges.append(edge)
            env = {
                "CNC_EDGE_MACHINE_ID": machine,
                "CNC_EDGE_SERIAL_URL": edge.sim.url,
                "CNC_EDGE_JOURNAL_DATA_DIR": str(edge.data),
                "CNC_EDGE_POLL_AUDIT_FILE": str(edge.directory / "polled.txt"),
                "CNC_EDGE_METRICS_LISTEN": "127.0.0.1:0",
            }
        parser[section]["environment"] = ",".join(f'{k}="{v}"' for k, v in env.items())
    conf = conf_dir / "supervisord.conf"
    with open(conf, "w") as handle:
        parser.write(handle)
    return conf, edges


@dataclass
class Deployment:
    supervisor: Supervisor
    edges: list[Edge]
    nats: NatsServer
    pg_dsn: str
    log_dir: Path

    @property
    def programs(self) -> list[str]:
        return [BACKEND, *(edge.program for edge in self.edges)]

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of supervisord's and each program's log, for a failure."""
        parts = []
        for name in ["supervisord", *self.programs]:
            path = self.log_dir / f"{name}.log"
            text = path.read_text() if path.exists() else "(no log)"
            parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)


def new_sim(seed: int) -> PtyServer:
    model = MachineModel(seed=seed, pace=30, cycle_seconds=20)
    server = PtyServer(HaasProtocol(model, seed=seed))
    server.start()
    return server


@pytest.fixture
def deployment(
    tmp_path: Path, nats_server: NatsServer, pg_dsn: str
) -> Iterator[Deployment]:
    sims = [new_sim(1), new_sim(2)]
    socket_dir = Path(tempfile.mkdtemp(prefix="cnc-sv-"))
    supervisor = None
    try:
        conf, edges = render_conf(tmp_path, socket_dir, nats_server.url, pg_dsn, sims)
        assert len(edges) >= 2, "the example config should show two edge agents"
        supervisor = Supervisor(conf, tmp_path / "var" / "log")
        supervisor.start()
        deployment = Deployment(
            supervisor, edges, nats_server, pg_dsn, tmp_path / "var" / "log"
        )
        supervisor.wait_running(deployment.programs, timeout=90)
        for edge in edges:
            wait_for_edge_state(edge, "ONLINE", supervisor, timeout=60)
        yield deployment
    finally:
        if supervisor is not None:
            supervisor.shutdown()
        for sim in sims:
            sim.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def wait_for_edge_state(
    edge: Edge, state: str, supervisor: Supervisor, timeout: float = 30
) -> None:
    """Wait until the agent supervisord runs now reports ``state``."""

    def reached() -> bool:
        info = edge.agent_info()
        status = edge_status(edge.data)
        return (
            status.get("state") == state
            and info.get("pid") == supervisor.pid(edge.program)
            and info["children"].get("buffer") == status.get("pid")
        )

    wait_for(
        reached,
        timeout,
        f"{edge.program} {state} (last: {edge_status(edge.data).get('state')})",
        interval=0.3,
    )


def journal_ids(data: Path) -> set[str]:
    """Every reading id in current.jsonl and sync/*.jsonl."""
    ids = set()
    for path in [data / "current.jsonl", *sorted((data / "sync").glob("*.jsonl"))]:
        if not path.exists():
            continue
        for line in path.read_bytes().splitlines():
            if line.strip():
                ids.add(orjson.loads(line)["id"])
    return ids


def processes_holding(device: str) -> list[int]:
    """Pids of the processes other than this one with ``device`` open."""
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                if os.readlink(fd) == device:
                    holders.append(int(proc.name))
                    break
            except OSError:
                continue
    return holders


def backend_url(log_dir: Path, after: int = 0) -> str | None:
    """The endpoint URL the backend logged, the first after ``after`` such lines."""
    path = log_dir / f"{BACKEND}.log"
    text = path.read_text() if path.exists() else ""
    urls = re.findall(r"metrics: listening on (http://\S+)", text)
    return urls[after] if len(urls) > after else None


def state_series_at_one(url: str, metric: str) -> list[dict[str, str]]:
    return [
        dict(labels) for labels, value in values(scrape(url), metric).items() if value
    ]


# Tests -----------------------------------------------------------------------


def test_stop_with_nats_down_journals_and_frees_port(
    deployment: Deployment,
) -> None:
    supervisor, edge = deployment.supervisor, deployment.edges[0]
    assert set(supervisor.status()) == set(deployment.programs)
    info = edge.agent_info()
    agent_pids = [info["pid"], *info["children"].values()]

    deployment.nats.stop()
    wait_for_edge_state(edge, "OFFLINE", supervisor, timeout=30)
    journaled_before = len(journal_ids(edge.data))
    wait_for(
        lambda: len(journal_ids(edge.data)) >= journaled_before + 5,
        30,
        "readings journaled while NATS is down",
    )

    started = time.monotonic()
    result = supervisor.ctl("stop", edge.program)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{edge.program}: stopped" in result.stdout
    assert took < supervisor.stopwaitsecs(edge.program), f"stop took {took:.1f} s"
    # The agent exited by itself, not through supervisord's SIGKILL.
    assert f"stopped: {edge.program} (exit status 0)" in supervisor.log()
    assert [pid for pid in agent_pids if psutil.pid_exists(pid)] == []
    assert processes_holding(edge.sim.url) == []

    polled = set(polled_ids(edge.directory))
    on_disk = journal_ids(edge.data)
    deployment.nats.start()
    acknowledged = set(stream_ids(deployment.nats.url))
    assert len(polled) > 10
    assert on_disk, "nothing was journaled while NATS was down"
    assert sorted(polled - on_disk - acknowledged) == []


def test_killed_child_restarts_agent_without_loss(deployment: Deployment) -> None:
    supervisor, edge = deployment.supervisor, deployment.edges[0]
    first_pid = supervisor.pid(edge.program)
    publisher = edge.agent_info()["children"]["publisher"]

    os.kill(publisher, signal.SIGKILL)
    wait_for(
        lambda: supervisor.pid(edge.program) not in (0, first_pid),
        60,
        f"supervisord restarting {edge.program}",
        interval=0.5,
    )
    supervisor.wait_running([edge.program], timeout=60)
    wait_for_edge_state(edge, "ONLINE", supervisor, timeout=60)
    assert f"exited: {edge.program} (exit status 1; not expected)" in supervisor.log()

    polled = polled_ids(edge.directory)
    wait_for(
        lambda: set(polled) <= set(stored_ids(deployment.pg_dsn, edge.machine)),
        90,
        "every reading polled before and after the kill stored",
        interval=1.0,
    )
    counts = collections.Counter(stored_ids(deployment.pg_dsn, edge.machine))
    assert len(polled) > 20
    assert [rid for rid, n in counts.items() if n > 1] == []


def test_restarts_leave_one_state_series(deployment: Deployment) -> None:
    supervisor = deployment.supervisor
    for attempt in range(1, 6):
        result = supervisor.ctl("restart", "all")
        assert result.returncode == 0, result.stdout + deployment.log_tails()
        supervisor.wait_running(deployment.programs, timeout=60)
        for edge in deployment.edges:
            wait_for_edge_state(edge, "ONLINE", supervisor, timeout=60)
            url = edge.agent_info()["metrics_url"]
            at_one = state_series_at_one(url, "cnc_edge_state")
            assert at_one == [{"machine": edge.machine, "state": "ONLINE"}], (
                f"restart {attempt}: {edge.program}"
            )
        wait_for(
            lambda n=attempt: backend_url(deployment.log_dir, after=n) is not None,
            30,
            "the restarted backend's endpoint URL in its log",
        )
        url = backend_url(deployment.log_dir, after=attempt)
        assert url is not None
        wait_for(
            lambda u=url: request(u + "/readyz")[0] == 200,
            30,
            "backend CONNECTED",
        )
        assert state_series_at_one(url, "cnc_backend_state") == [
            {"state": "CONNECTED"}
        ], f"restart {attempt}: {BACKEND}"

    # The live diagrams of the restarted programs highlight their states.
    edge = deployment.edges[0]
    status, headers, body = request(edge.agent_info()["metrics_url"] + "/fsm")
    assert status == 200
    assert headers["Content-Type"] in (
        "image/svg+xml",
        "text/vnd.mermaid; charset=utf-8",
    )
    assert b"ONLINE" in body
