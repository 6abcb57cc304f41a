"""Controller conditions seen through a running agent: /readyz, /status,
``cnc-edge status`` and the readings on the stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cnc_edge.poller import read_last_poll
from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer
from tests.helpers import (
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_edge_config,
)
from tests.prometheus import request, scrape, values

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(180)]


def read_metrics_url(data: Path) -> str | None:
    try:
        return orjson.loads((data / "agent.json").read_bytes()).get("metrics_url")
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def last_poll_status(url: str) -> dict:
    return json.loads(request(url + "/status")[2])["last_poll"] or {}


def cli_status(data: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cnc_edge.cli", "status", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def condition_cycles(url: str, condition: str) -> float:
    found = values(scrape(url), "cnc_edge_poll_cycles_total")
    return found.get(frozenset({("machine", "m1"), ("condition", condition)}), 0)


def test_agent_reports_each_condition(tmp_path: Path, nats_server) -> None:
    sim = PtyServer(
        HaasProtocol(MachineModel(seed=2, pace=30, cycle_seconds=20, clock_skew=30.0)),
        link=str(tmp_path / "ttyCNC"),
    )
    sim.start()
    config = write_edge_config(
        tmp_path / "edge",
        serial_url=sim.link,
        nats_url=nats_server.url,
        interval=0.2,
        commands=["Q100", "Q104", "Q500"],
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for(lambda: read_metrics_url(data), 30, "metrics_url in agent.json")
        url = read_metrics_url(data)
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        wait_for(lambda: request(url + "/readyz")[0] == 200, 30, "/readyz 200")
        poll = last_poll_status(url)
        assert poll["condition"] == "ok"
        assert 28 <= poll["controller_clock_skew_seconds"] <= 32
        assert isinstance(poll["host_clock_synced"], bool)
        assert "controller:       ok" in cli_status(data)

        sim.inject("ignore", count=100_000, command="Q500")
        wait_for(
            lambda: last_poll_status(url).get("condition") == "controller_busy",
            30,
            "controller_busy in /status",
        )
        status, _, body = request(url + "/readyz")
        assert status == 200
        assert body == b"ready: polling the controller (controller_busy)\n"
        sim.protocol.clear_faults()

        sim.protocol.power_off()
        wait_for(lambda: request(url + "/readyz")[0] == 503, 30, "/readyz 503")
        status, _, body = request(url + "/readyz")
        assert body == b"not ready: controller_off: the controller sends no bytes\n"
        assert last_poll_status(url)["controller_clock_skew_seconds"] is None
        wait_for(
            lambda: "controller:       controller_off" in cli_status(data),
            10,
            "controller_off in cnc-edge status",
        )
        sim.protocol.power_on()
        wait_for(lambda: request(url + "/readyz")[0] == 200, 30, "/readyz 200 again")

        sim.stop()
        wait_for(
            lambda: last_poll_status(url).get("condition") == "link_down",
            30,
            "link_down in /status",
        )
        for condition in ("ok", "controller_busy", "controller_off", "link_down"):
            assert condition_cycles(url, condition) > 0, condition
        last = read_last_poll(data)
        assert last["condition"] == "link_down"
        assert stop_program(agent) == 0
    finally:
        stop_program(agent)
        sim.stop()
    polled = (tmp_path / "edge" / "polled.txt").read_text().split()
    assert read_last_poll(data)["seq"] == len(polled) - 1
