"""Scrapes of a real edge agent and a real backend, checked with promtool.

The backend logs "metrics: listening on URL"; the edge agent records the
same URL as metrics_url in <data_dir>/agent.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
import pytest

from tests.helpers import (
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)
from tests.prometheus import assert_promtool_clean, request, scrape, values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LISTENING = re.compile(r"metrics: listening on (http://\S+)")


def logged_url(log: Path) -> str | None:
    match = LISTENING.search(log.read_text()) if log.exists() else None
    return match.group(1) if match else None


def agent_url(data: Path) -> str | None:
    try:
        return orjson.loads((data / "agent.json").read_bytes()).get("metrics_url")
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def test_edge_and_backend_scrapes_pass_promtool(
    tmp_path: Path, nats_server, sim_pty, pg_dsn: str
) -> None:
    backend_log = tmp_path / "backend.log"
    backend_config = write_backend_config(
        tmp_path / "backend", nats_url=nats_server.url
    )
    edge_config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats_server.url
    )
    data = tmp_path / "edge" / "data"
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(backend_config)],
        backend_log,
        {"CNC_BACKEND_POSTGRES_DSN": pg_dsn},
    )
    edge = start_program(
        "cnc_edge.cli", ["run", "--config", str(edge_config)], tmp_path / "edge.log"
    )
    try:
        wait_for(
            lambda: logged_url(backend_log), 30, "the backend's metrics URL in its log"
        )
        wait_for(lambda: agent_url(data), 30, "metrics_url in agent.json")
        backend_url, edge_url = logged_url(backend_log), agent_url(data)
        assert backend_url.startswith("http://127.0.0.1:")
        assert edge_url.startswith("http://127.0.0.1:")

        wait_for(
            lambda: request(backend_url + "/readyz")[0] == 200,
            30,
            "backend /readyz 200",
        )
        wait_for_state(data, "ONLINE", timeout=30)
        wait_for(
            lambda: (
                values(scrape(backend_url), "cnc_backend_readings_inserted_total").get(
                    frozenset(), 0
                )
                > 0
            ),
            30,
            "readings stored by the backend",
        )
        # The pending counts are first requested 5 s after the start.
        wait_for(
            lambda: json.loads(request(backend_url + "/status")[2])["consumer"],
            30,
            "consumer pending counts in /status",
        )

        backend_text = scrape(backend_url)
        edge_text = scrape(edge_url)
        assert_promtool_clean(backend_text)
        assert_promtool_clean(edge_text)

        states = values(backend_text, "cnc_backend_state")
        assert [labels for labels, value in states.items() if value == 1] == [
            frozenset({("state", "CONNECTED")})
        ]
        machine = frozenset({("machine", "m1")})
        assert (
            values(backend_text, "cnc_backend_newest_reading_timestamp_seconds")[
                machine
            ]
            > 0
        )
        assert values(backend_text, "cnc_backend_sequence_gap_readings_total") == {
            machine: 0
        }
        assert values(backend_text, "cnc_backend_consumer_pending_messages")
        assert (
            values(backend_text, "cnc_backend_poll_to_commit_seconds_count")[
                frozenset()
            ]
            > 0
        )

        assert request(backend_url + "/healthz")[0] == 200
        assert request(backend_url + "/metrics", method="POST")[0] == 405
    finally:
        assert stop_program(edge) == 0
        assert stop_program(backend) == 0
