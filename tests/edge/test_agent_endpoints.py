"""The HTTP endpoints of a real edge agent against nats-server and a pty control."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from tests.helpers import (
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_edge_config,
)
from tests.prometheus import assert_promtool_clean, request, scrape, values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: Metrics written by each child process; the scrape must contain all three.
METRIC_OF_PROCESS = {
    "poller": "cnc_edge_readings_polled_total",
    "buffer": "cnc_edge_state",
    "publisher": "cnc_edge_readings_published_total",
}


def read_agent_file(data: Path) -> dict:
    try:
        return orjson.loads((data / "agent.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def counter_samples(text: str) -> dict:
    """Samples of counters and histograms, which must never decrease."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.partition("{")[0]
        if name.endswith(("_total", "_count", "_sum", "_bucket")):
            found[name_and_labels] = float(value)
    return found


def test_agent_endpoints_cover_all_processes(
    tmp_path: Path, nats_server, sim_pty
) -> None:
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats_server.url
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for(
            lambda: read_agent_file(data).get("metrics_url"),
            30,
            "metrics_url in agent.json",
        )
        info = read_agent_file(data)
        url = info["metrics_url"]
        assert url.startswith("http://127.0.0.1:")
        wait_for_state(data, "ONLINE", timeout=30)
        wait_for(lambda: request(url + "/readyz")[0] == 200, 30, "/readyz 200")

        # Each child writes its own metric files, named by its pid.
        files = {path.name for path in (data / "metrics").iterdir()}
        for name, pid in info["children"].items():
            assert f"counter_{pid}.db" in files, name
        wait_for(
            lambda: (
                sum(values(scrape(url), "cnc_edge_readings_published_total").values())
                > 0
            ),
            30,
            "a published reading",
        )
        first = scrape(url)
        for process, metric in METRIC_OF_PROCESS.items():
            assert values(first, metric), f"no {metric} from the {process}"
        states = values(first, "cnc_edge_state")
        assert sorted(states.values()) == [0, 0, 1]
        assert states[frozenset({("machine", "m1"), ("state", "ONLINE")})] == 1
        assert_promtool_clean(first)

        wait_for(
            lambda: counter_samples(scrape(url)) != counter_samples(first),
            30,
            "counters to move",
        )
        second = scrape(url)
        before, after = counter_samples(first), counter_samples(second)
        assert set(before) <= set(after)
        went_back = {
            key: (before[key], after[key]) for key in before if after[key] < before[key]
        }
        assert went_back == {}

        status, _, body = request(url + "/healthz")
        assert status == 200
        status, _, body = request(url + "/status")
        assert status == 200
        report = json.loads(body)
        assert report["state"] == "ONLINE"
        assert report["ready"] is True
        assert report["agent"]["children"] == info["children"]
        # The buffer rewrites state.json once a second.
        wait_for(
            lambda: (
                json.loads(request(url + "/status")[2])["counters"]["published"] > 0
            ),
            10,
            "published readings in /status",
        )
        for method in ("POST", "PUT", "DELETE"):
            assert request(url + "/metrics", method=method)[0] == 405, method

        sim_pty.stop()
        wait_for(lambda: request(url + "/readyz")[0] == 503, 30, "/readyz 503")
        status, _, body = request(url + "/readyz")
        assert body == (
            b"not ready: link_down: the serial port failed or cannot be opened\n"
        )
        link_down = values(scrape(url), "cnc_edge_serial_errors_total")[
            frozenset({("machine", "m1"), ("kind", "link_down")})
        ]
        assert link_down > 0
    finally:
        assert stop_program(agent) == 0
