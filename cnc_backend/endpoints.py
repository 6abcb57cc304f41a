"""HTTP endpoints of the backend.

- ``/metrics``: the service's registry (see ``cnc_backend.metrics``).
- ``/healthz``: 200 while the process runs.
- ``/readyz``: 200 while the state is CONNECTED; 503 with the state and the
  last failure otherwise.
- ``/status``: JSON with the state, since when, the totals, the last batch
  and the consumer's pending counts.
- ``/fsm``: the state machine with the current state highlighted, as SVG
  where Graphviz is installed and as Mermaid text otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from cnc_backend.fsm import DIAGRAM
from cnc_common.diagrams import LiveDiagram
from cnc_common.httpserver import (
    EndpointServer,
    Response,
    Route,
    health_route,
    json_response,
    metrics_route,
    text_response,
)

if TYPE_CHECKING:
    from cnc_backend.consumer import BackendService

log = logging.getLogger(__name__)


class BackendEndpoints:
    """Routes of the backend's HTTP server, read from a running service."""

    def __init__(self, service: BackendService) -> None:
        self.service = service

    def routes(self) -> dict[str, Route]:
        return {
            "/metrics": metrics_route(self.service.metrics.registry),
            "/healthz": health_route,
            "/readyz": self._readyz,
            "/status": self._status,
            "/fsm": LiveDiagram(DIAGRAM, DIAGRAM.title, self._current_state).route,
        }

    def _current_state(self) -> str:
        return self.service.state.name

    def _readyz(self, headers: Mapping[str, str]) -> Response:
        state = self.service.state.name
        if state == "CONNECTED":
            return text_response(HTTPStatus.OK, "ready: CONNECTED")
        reason = f"not ready: {state}"
        if self.service.failure:
            reason += f" ({self.service.failure})"
        return text_response(HTTPStatus.SERVICE_UNAVAILABLE, reason)

    def status(self) -> dict[str, Any]:
        service = self.service
        metrics = service.metrics
        return {
            "state": service.state.name,
            "since": metrics.state_since,
            "failure": service.failure,
            "counters": dataclasses.asdict(service.counters),
            "last_batch": metrics.last_batch,
            "consumer": metrics.consumer_pending,
        }

    def _status(self, headers: Mapping[str, str]) -> Response:
        return json_response(HTTPStatus.OK, self.status())


def start_endpoints(listen: str, service: BackendService) -> EndpointServer | None:
    """Serve the endpoints on ``listen``; return None if the address cannot be bound.

    The backend keeps storing readings without its endpoints, so a busy
    port is logged as an error rather than stopping it.
    """
    server = EndpointServer(listen, BackendEndpoints(service).routes())
    try:
        url = server.start()
    except OSError as exc:
        log.error("metrics endpoint failed: %s (%s); running without it", listen, exc)
        return None
    log.info("metrics: listening on %s", url)
    return server
