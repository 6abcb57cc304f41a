"""/fsm of the real programs: the live state highlighted, with or without Graphviz."""

from __future__ import annotations

import os
import re
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import orjson
import pytest

from cnc_common.diagrams import MERMAID_CONTENT_TYPE, SVG_CONTENT_TYPE, graphviz_missing
from cnc_common.embedded import NatsServer
from tests.helpers import (
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)
from tests.prometheus import request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MERMAID = {"Accept": "text/vnd.mermaid"}
SVG_NS = "{http://www.w3.org/2000/svg}"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """GET ``url``; return (status, Content-Type, body)."""
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as response:
        return response.status, response.headers["Content-Type"], response.read()


def active_state_in_svg(svg: bytes) -> list[str]:
    """Titles of the nodes that transitions' "active" style fills."""
    active = []
    for group in ET.fromstring(svg).iter(f"{SVG_NS}g"):
        if group.get("class") != "node":
            continue
        title = group.find(f"{SVG_NS}title")
        shapes = [e for e in group if e.tag in (f"{SVG_NS}path", f"{SVG_NS}polygon")]
        if title is not None and any(s.get("fill") == "darksalmon" for s in shapes):
            active.append(title.text or "")
    return active


def agent_url(data: Path) -> str | None:
    try:
        return orjson.loads((data / "agent.json").read_bytes()).get("metrics_url")
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def test_edge_fsm_follows_state(
    tmp_path: Path, nats_server: NatsServer, sim_pty
) -> None:
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats_server.url
    )
    data = tmp_path / "edge" / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=40, agent=agent)
        url = agent_url(data)
        assert url is not None
        status, content_type, body = get(url + "/fsm", MERMAID)
        assert status == 200
        assert content_type == MERMAID_CONTENT_TYPE
        assert 'title: "cnc-edge agent m1: ONLINE"' in body.decode()
        assert "Class ONLINE s_active" in body.decode()

        nats_server.stop()
        wait_for_state(data, "OFFLINE", timeout=30, agent=agent)
        text = get(url + "/fsm", MERMAID)[2].decode()
        assert "Class OFFLINE s_active" in text
        assert "Class ONLINE s_default" in text
        if graphviz_missing() is None:
            status, content_type, body = get(url + "/fsm")
            assert content_type == SVG_CONTENT_TYPE
            assert active_state_in_svg(body) == ["OFFLINE"]
    finally:
        assert stop_program(agent) == 0


def broken_graphviz_package(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``import graphviz`` fails, as on a broken install."""
    package = tmp_path / "fake" / "graphviz"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise ImportError("simulated broken graphviz package")\n'
    )
    path = os.pathsep.join(
        filter(None, [str(package.parent), os.environ.get("PYTHONPATH")])
    )
    return {"PYTHONPATH": path}


def failing_dot(tmp_path: Path) -> dict[str, str]:
    """An environment whose first ``dot`` on PATH exits with status 3."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'dot: simulated failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    return {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}


def no_dot(tmp_path: Path) -> dict[str, str]:
    """An environment with an empty PATH; the programs start by absolute path."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return {"PATH": str(empty)}


@pytest.mark.parametrize(
    ("breakage", "expected_log"),
    [
        (broken_graphviz_package, "INFO m1 agent cnc_common.diagrams: fsm diagram: "),
        (no_dot, "INFO m1 agent cnc_common.diagrams: fsm diagram: "),
        (failing_dot, "WARNING m1 agent cnc_common.diagrams: fsm diagram failed: "),
    ],
    ids=["broken-package", "no-dot", "failing-dot"],
)
def test_edge_without_graphviz_serves_mermaid(
    tmp_path: Path, nats_server: NatsServer, sim_pty, breakage, expected_log: str
) -> None:
    if breakage is failing_dot:
        # Without the package /fsm never runs dot, so nothing can fail.
        pytest.importorskip("graphviz")
    config = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=nats_server.url
    )
    data = tmp_path / "edge" / "data"
    log = tmp_path / "edge.log"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], log, breakage(tmp_path)
    )
    try:
        wait_for_state(data, "ONLINE", timeout=40, agent=agent)
        url = agent_url(data)
        assert url is not None
        for _ in range(3):
            status, content_type, body = get(url + "/fsm")
            assert status == 200
            assert content_type == MERMAID_CONTENT_TYPE
            assert "Class ONLINE s_active" in body.decode()
        assert request(url + "/healthz")[0] == 200
        assert agent.poll() is None, "the agent must keep running"
        wait_for_state(data, "ONLINE", timeout=5, agent=agent)
    finally:
        assert stop_program(agent) == 0
    fallbacks = [line for line in log.read_text().splitlines() if expected_log in line]
    assert len(fallbacks) == 1, "logged once, not per request"


def test_backend_fsm_shows_connected(
    tmp_path: Path, nats_server: NatsServer, pg_dsn: str
) -> None:
    config = write_backend_config(tmp_path / "backend", nats_url=nats_server.url)
    log = tmp_path / "backend.log"
    backend = start_program(
        "cnc_backend.cli",
        ["run", "--config", str(config)],
        log,
        {"CNC_BACKEND_POSTGRES_DSN": pg_dsn},
    )
    try:
        wait_for(
            lambda: "STARTING -> CONNECTED" in log.read_text(), 40, "backend CONNECTED"
        )
        match = re.search(r"metrics: listening on (http://\S+)", log.read_text())
        assert match is not None
        url = match.group(1)
        text = get(url + "/fsm", MERMAID)[2].decode()
        assert 'title: "cnc-backend: CONNECTED"' in text
        assert "Class CONNECTED s_active" in text
        if graphviz_missing() is None:
            status, content_type, body = get(url + "/fsm")
            assert content_type == SVG_CONTENT_TYPE
            assert active_state_in_svg(body) == ["CONNECTED"]
    finally:
        assert stop_program(backend) == 0
