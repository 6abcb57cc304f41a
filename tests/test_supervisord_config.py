"""config/supervisord.conf as supervisord's own parser reads it.

The stop deadlines must fit: supervisord kills a program whose stop takes
longer than stopwaitsecs, which for an edge agent means readings still in
memory never reach the journal.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ProcessConfig, ServerOptions

from cnc_backend.config import load_config as load_backend_config
from cnc_backend.consumer import CLOSE_RESERVE
from cnc_common.httpserver import parse_listen
from cnc_edge.agent import (
    BUFFER_STOP_TIMEOUT,
    KILL_WAIT,
    POLLER_STOP_TIMEOUT,
    PUBLISHER_STOP_TIMEOUT,
)
from cnc_edge.config import load_config as load_edge_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"

#: Seconds of stopwaitsecs beyond a program's own worst case, for a loaded machine.
MARGIN = 5


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ProcessConfig]:
    # supervisord rejects log paths in directories that do not exist, so
    # parse a copy laid out like a checkout with var/log created.
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(CONFIG_DIR, root / "config")
    (root / "var" / "log").mkdir(parents=True)
    options = ServerOptions()
    options.realize(args=["-c", str(root / "config" / "supervisord.conf")])
    return {
        process.name: process
        for group in options.process_group_configs
        for process in group.process_configs
    }


def edge_programs(programs: dict[str, ProcessConfig]) -> list[ProcessConfig]:
    return [p for name, p in programs.items() if name.startswith("cnc-edge-")]


def test_config_has_backend_and_two_edges(programs: dict[str, ProcessConfig]) -> None:
    assert "cnc-backend" in programs
    assert len(edge_programs(programs)) == 2


@pytest.mark.parametrize(
    "name", ["cnc-backend", "cnc-edge-haas-vf2-01", "cnc-edge-haas-st10-01"]
)
def test_program_stops_and_restarts_as_group(
    programs: dict[str, ProcessConfig], name: str
) -> None:
    program = programs[name]
    assert program.stopsignal == 15  # SIGTERM
    assert program.stopasgroup is True
    assert program.killasgroup is True
    assert program.autorestart is RestartUnconditionally
    assert program.startsecs >= 5
    assert program.startretries >= 100
    assert program.redirect_stderr is True
    assert program.stdout_logfile.endswith(f"/var/log/{name}.log")
    assert 0 < program.stdout_logfile_maxbytes <= 100 * 1024 * 1024
    assert program.stdout_logfile_backups > 0


def test_edge_stopwaitsecs_covers_agent_stop(
    programs: dict[str, ProcessConfig],
) -> None:
    # The parent stops its children one after the other, killing each one
    # that misses its deadline and waiting KILL_WAIT for it.
    worst = (
        POLLER_STOP_TIMEOUT + BUFFER_STOP_TIMEOUT + PUBLISHER_STOP_TIMEOUT
    ) + 3 * KILL_WAIT
    for program in edge_programs(programs):
        assert program.stopwaitsecs >= worst + MARGIN, program.name


def test_backend_stopwaitsecs_covers_drain(
    programs: dict[str, ProcessConfig],
) -> None:
    config = load_backend_config(CONFIG_DIR / "backend.toml")
    worst = config.service.drain_timeout + CLOSE_RESERVE
    assert programs["cnc-backend"].stopwaitsecs >= worst + MARGIN


def test_edges_differ_in_machine_port_and_files(
    programs: dict[str, ProcessConfig],
) -> None:
    edges = edge_programs(programs)
    for key in (
        "CNC_EDGE_MACHINE_ID",
        "CNC_EDGE_SERIAL_URL",
        "CNC_EDGE_JOURNAL_DATA_DIR",
        "CNC_EDGE_METRICS_LISTEN",
    ):
        settings = [program.environment[key] for program in edges]
        assert len(set(settings)) == len(edges), key
    for program in edges:
        machine = program.environment["CNC_EDGE_MACHINE_ID"]
        assert program.name == f"cnc-edge-{machine}"
        assert program.environment["CNC_EDGE_JOURNAL_DATA_DIR"].endswith(machine)


def test_ports_match_the_documented_scheme(
    programs: dict[str, ProcessConfig],
) -> None:
    ports = sorted(
        parse_listen(p.environment["CNC_EDGE_METRICS_LISTEN"])[1]
        for p in edge_programs(programs)
    )
    assert ports == [9101, 9111]
    backend = load_backend_config(CONFIG_DIR / "backend.toml")
    assert parse_listen(backend.metrics.listen)[1] == 9102


@pytest.mark.parametrize(
    "name", ["cnc-backend", "cnc-edge-haas-vf2-01", "cnc-edge-haas-st10-01"]
)
def test_command_uses_checkout_venv_and_config(
    programs: dict[str, ProcessConfig], name: str
) -> None:
    command = programs[name].command.split()
    program = "cnc-backend" if name == "cnc-backend" else "cnc-edge"
    assert command[0].endswith(f"/config/../.venv/bin/{program}")
    assert command[1:3] == ["run", "--config"]
    config_file = CONFIG_DIR / Path(command[3]).name
    assert config_file.exists()
    if program == "cnc-edge":
        # The shared file must load with each program's overrides.
        config = load_edge_config(config_file, environ=programs[name].environment)
        assert config.machine.id == programs[name].environment["CNC_EDGE_MACHINE_ID"]
