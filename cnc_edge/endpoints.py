"""HTTP endpoints of the edge agent, served by the parent process.

- ``/metrics``: the metrics of all three children, summed from their files.
- ``/healthz``: 200 while the parent runs.
- ``/readyz``: 200 when at least one command of the last poll cycle
  succeeded and that cycle ended recently; 503 with the reason otherwise,
  which names the condition when the serial link is down or the controller
  is off. A busy controller is ready, because it still answers.
- ``/status``: JSON with the buffer's ``state.json`` (state, since, counters,
  last sync, journal size), the last poll with the controller's condition
  and clocks, and the process ids.
- ``/fsm``: the state machine with the state from ``state.json`` highlighted,
  as SVG where Graphviz is installed and as Mermaid text otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from cnc_common.diagrams import LiveDiagram
from cnc_common.httpserver import (
    Response,
    Route,
    health_route,
    json_response,
    metrics_route,
    text_response,
)
from cnc_common.reading import CONDITIONS, Condition
from cnc_edge.buffer import STATE_FILE
from cnc_edge.config import EdgeConfig
from cnc_edge.fsm import DIAGRAM


def max_poll_age(config: EdgeConfig) -> float:
    """Seconds after which the last poll counts as stale for /readyz.

    Twice the longest normal cycle: the interval plus every command timing
    out, so a slow controller is not reported as lost.
    """
    commands = len(config.poll.commands) + len(config.poll.macros)
    if config.poll.controller_clock:
        # #3011 and #3012, and #3011 again in the first minute of a day.
        commands += 3
    return 2 * (config.poll.interval + commands * config.serial.query_timeout)


class AgentEndpoints:
    """Routes of the agent's HTTP server, computed from the children's metrics."""

    def __init__(
        self,
        config: EdgeConfig,
        registry: CollectorRegistry,
        processes: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.registry = registry
        self.processes = processes
        self.clock = clock
        self.max_age = max_poll_age(config)

    def routes(self) -> dict[str, Route]:
        return {
            "/metrics": metrics_route(self.registry),
            "/healthz": health_route,
            "/readyz": self._readyz,
            "/status": self._status,
            "/fsm": LiveDiagram(DIAGRAM, self._fsm_label(), self._current_state).route,
        }

    def _fsm_label(self) -> str:
        return f"{DIAGRAM.title} {self.config.machine.id}"

    def _current_state(self) -> str | None:
        # The buffer process owns the state machine and writes state.json on
        # every change, so the parent reads the state from there.
        return _read_state_file(self.config.data_dir / STATE_FILE).get("state")

    def _sample(self, name: str) -> float | None:
        return self.registry.get_sample_value(name, {"machine": self.config.machine.id})

    def last_poll(self) -> dict[str, Any] | None:
        """Return when the last poll cycle ended, whether any command succeeded,
        the controller's condition and the clock readings of that cycle."""
        at = self._sample("cnc_edge_last_poll_timestamp_seconds")
        if not at:
            return None
        success = self._sample("cnc_edge_poll_success") == 1
        skew = self._sample("cnc_edge_controller_clock_skew_seconds")
        synced = self._sample("cnc_edge_host_clock_synced")
        return {
            "at": at,
            "success": success,
            "condition": self.condition(),
            "controller_clock_skew_seconds": (
                None if skew is None or math.isnan(skew) else skew
            ),
            "host_clock_synced": None if synced is None else synced == 1,
        }

    def condition(self) -> str | None:
        """Return the controller condition of the last poll cycle, if known."""
        machine = self.config.machine.id
        for condition in CONDITIONS:
            labels = {"machine": machine, "condition": condition}
            value = self.registry.get_sample_value(
                "cnc_edge_controller_condition", labels
            )
            if value == 1:
                return condition
        return None

    def readiness(self) -> tuple[bool, str]:
        """Return whether the controller is being polled successfully, and why not."""
        poll = self.last_poll()
        if poll is None:
            return False, "no poll cycle has finished yet"
        if poll["condition"] == Condition.LINK_DOWN:
            return False, "link_down: the serial port failed or cannot be opened"
        if poll["condition"] == Condition.CONTROLLER_OFF:
            return False, "controller_off: the controller sends no bytes"
        if not poll["success"]:
            return False, "no command of the last poll cycle succeeded"
        age = self.clock() - poll["at"]
        if age > self.max_age:
            return False, f"the last poll cycle ended {age:.0f} s ago"
        if poll["condition"] == Condition.CONTROLLER_BUSY:
            return True, "polling the controller (controller_busy)"
        return True, "polling the controller"

    def _readyz(self, headers: Mapping[str, str]) -> Response:
        ready, reason = self.readiness()
        if ready:
            return text_response(HTTPStatus.OK, f"ready: {reason}")
        return text_response(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}")

    def status(self) -> dict[str, Any]:
        status = _read_state_file(self.config.data_dir / STATE_FILE)
        ready, reason = self.readiness()
        status.update(
            machine=self.config.machine.id,
            ready=ready,
            ready_reason=reason,
            last_poll=self.last_poll(),
            agent=self.processes(),
        )
        return status

    def _status(self, headers: Mapping[str, str]) -> Response:
        return json_response(HTTPStatus.OK, self.status())


def _read_state_file(path: Path) -> dict[str, Any]:
    """Return the buffer's last state.json, or state STARTING before the first."""
    try:
        data = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {"state": "STARTING"}
    # The buffer's pid is reported under agent.children with the others.
    data.pop("pid", None)
    return data
