"""State diagrams: committed files match the code, /fsm falls back to Mermaid.

The committed Mermaid files and the README blocks must equal what the code
generates, byte for byte. The committed SVG files must exist, and the dot
source hash recorded in each must match the current dot source. That check
needs the graphviz Python package (in the test extra) but not the dot
program, because dot's SVG output differs between Graphviz versions. Tests
that lay out SVG need dot and are skipped without it; CI installs it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cnc_backend.fsm import DIAGRAM as BACKEND
from cnc_backend.fsm import TRANSITIONS as BACKEND_TRANSITIONS
from cnc_common import diagrams
from cnc_common.diagrams import (
    MERMAID_CONTENT_TYPE,
    SVG_CONTENT_TYPE,
    LiveDiagram,
    MachineDefinition,
    dot_source,
    mermaid,
    source_hash,
    stamped_hash,
    wants_mermaid,
)
from cnc_common.diagrams_cli import definitions, embedded_mermaid, main
from cnc_common.errors import DiagramUnavailable
from cnc_edge.fsm import DIAGRAM as EDGE
from cnc_edge.fsm import TRANSITIONS as EDGE_TRANSITIONS

ROOT = Path(__file__).resolve().parents[2]
DIAGRAM_DIR = ROOT / "fsm_diagrams"
REGENERATE = "regenerate with: cnc-diagrams --out fsm_diagrams --readme README.md"
SVG_NS = "{http://www.w3.org/2000/svg}"

needs_dot = pytest.mark.skipif(
    diagrams.graphviz_missing() is not None,
    reason=f"SVG layout unavailable: {diagrams.graphviz_missing()}",
)

DEFINITIONS = [EDGE, BACKEND]
ids = [definition.name for definition in DEFINITIONS]


@pytest.fixture
def no_graphviz_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import graphviz`` fail, as it does without the diagrams extra."""
    monkeypatch.setitem(sys.modules, "graphviz", None)


@pytest.fixture
def failing_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a ``dot`` first on PATH that fails as a broken Graphviz would."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'dot: simulated failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")


def svg_nodes(svg: bytes) -> dict[str, ET.Element]:
    """Map each node title of a Graphviz SVG to its <g class="node"> element."""
    root = ET.fromstring(svg)
    nodes = {}
    for group in root.iter(f"{SVG_NS}g"):
        if group.get("class") == "node":
            title = group.find(f"{SVG_NS}title")
            assert title is not None and title.text is not None
            nodes[title.text] = group
    return nodes


def node_fill(group: ET.Element) -> str | None:
    shape = next(
        (e for e in group if e.tag in (f"{SVG_NS}path", f"{SVG_NS}polygon")), None
    )
    return None if shape is None else shape.get("fill")


# Committed diagrams ----------------------------------------------------------


def test_cli_draws_both_programs() -> None:
    assert [d.name for d in definitions()] == ["edge", "backend"]


@pytest.mark.parametrize("definition", DEFINITIONS, ids=ids)
def test_committed_mermaid_matches_code(definition: MachineDefinition) -> None:
    path = DIAGRAM_DIR / f"{definition.name}.mmd"
    assert path.exists(), f"{path} is missing; {REGENERATE}"
    assert path.read_text(encoding="utf-8") == mermaid(definition), (
        f"{path} differs from the state machine; {REGENERATE}"
    )


@pytest.mark.parametrize("definition", DEFINITIONS, ids=ids)
def test_readme_embeds_current_mermaid(definition: MachineDefinition) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    embedded = embedded_mermaid(readme, definition.name)
    assert embedded is not None, (
        f"README.md has no block after <!-- cnc-diagrams: {definition.name} -->"
    )
    assert embedded == mermaid(definition), (
        f"README.md's {definition.name} diagram is stale; {REGENERATE}"
    )


@pytest.mark.parametrize("definition", DEFINITIONS, ids=ids)
def test_committed_svg_matches_dot_source(definition: MachineDefinition) -> None:
    path = DIAGRAM_DIR / f"{definition.name}.svg"
    assert path.exists(), f"{path} is missing; {REGENERATE}"
    pytest.importorskip("graphviz")
    assert stamped_hash(path.read_bytes()) == source_hash(dot_source(definition)), (
        f"{path} was drawn from other dot source; {REGENERATE}"
    )


@pytest.mark.parametrize(
    ("definition", "table"),
    [(EDGE, EDGE_TRANSITIONS), (BACKEND, BACKEND_TRANSITIONS)],
    ids=ids,
)
def test_mermaid_has_every_transition(
    definition: MachineDefinition, table: list[dict]
) -> None:
    text = mermaid(definition)
    for transition in table:
        sources = transition["source"]
        for source in sources if isinstance(sources, list) else [sources]:
            edge = f"{source.name} --> {transition['dest'].name}: "
            line = next((ln for ln in text.splitlines() if edge in ln), None)
            assert line is not None, f"no edge {edge!r} in\n{text}"
            assert transition["trigger"] in line


def test_mermaid_front_matter_is_yaml_title() -> None:
    text = mermaid(EDGE, title="cnc-edge agent m1: ONLINE")
    assert text.startswith('---\ntitle: "cnc-edge agent m1: ONLINE"\n---\n')
    assert "stateDiagram-v2" in text
    assert all(line == line.rstrip() for line in text.splitlines())


def test_mermaid_highlights_only_active_state() -> None:
    text = mermaid(EDGE, active="SYNCING")
    assert "Class SYNCING s_active" in text
    assert "Class OFFLINE s_default" in text
    assert "Class ONLINE s_default" in text


def test_mermaid_of_definition_highlights_nothing() -> None:
    assert "s_active\n" not in mermaid(BACKEND).replace("classDef s_active", "")


def test_invalid_state_raises() -> None:
    with pytest.raises(ValueError, match="invalid state 'STARTING'"):
        mermaid(EDGE, active="STARTING")


@needs_dot
def test_svg_highlights_active_state() -> None:
    nodes = svg_nodes(diagrams.svg(BACKEND, active="RECONNECTING"))
    assert set(nodes) >= {"STARTING", "CONNECTED", "RECONNECTING", "DRAINING"}
    assert node_fill(nodes["RECONNECTING"]) == "darksalmon"
    assert node_fill(nodes["CONNECTED"]) == "white"


# cnc-diagrams ---------------------------------------------------------------


def copy_diagrams(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "fsm_diagrams"
    shutil.copytree(DIAGRAM_DIR, out)
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    return out, readme


def test_check_passes_on_committed_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, readme = copy_diagrams(tmp_path)
    assert main(["--out", str(out), "--readme", str(readme), "--check"]) == 0
    assert f"up to date: {out}" in capsys.readouterr().out


def test_check_lists_every_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, readme = copy_diagrams(tmp_path)
    (out / "edge.mmd").write_text("stateDiagram-v2\n")
    (out / "backend.svg").unlink()
    readme.write_text(readme.read_text().replace("drain_finished", "drained"))

    assert main(["--out", str(out), "--readme", str(readme), "--check"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert f"differs: {out / 'edge.mmd'}" in printed
    assert f"missing: {out / 'backend.svg'}" in printed
    assert any(line.startswith(f"differs: {readme} block") for line in printed)
    assert f"differs: {out / 'backend.mmd'}" not in printed


def test_check_detects_svg_of_other_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("graphviz")
    out, _ = copy_diagrams(tmp_path)
    shutil.copy(out / "backend.svg", out / "edge.svg")
    assert main(["--out", str(out), "--check"]) == 1
    assert f"differs: {out / 'edge.svg'}" in capsys.readouterr().out


@needs_dot
def test_write_then_check_round_trip(tmp_path: Path) -> None:
    out, readme = copy_diagrams(tmp_path)
    shutil.rmtree(out)
    readme.write_text(readme.read_text().replace("drain_finished", "drained"))
    assert main(["--out", str(out), "--readme", str(readme)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "backend.mmd",
        "backend.svg",
        "edge.mmd",
        "edge.svg",
    ]
    assert readme.read_text() == (ROOT / "README.md").read_text()
    assert main(["--out", str(out), "--readme", str(readme), "--check"]) == 0


def test_write_without_graphviz_writes_mermaid(
    tmp_path: Path, no_graphviz_package: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "diagrams"
    assert main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "edge.mmd").read_text() == mermaid(EDGE)
    assert not (out / "edge.svg").exists()
    assert f"skipped: {out / 'edge.svg'} (the graphviz Python package" in printed


def test_check_without_graphviz_skips_svg(
    tmp_path: Path, no_graphviz_package: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = copy_diagrams(tmp_path)
    assert main(["--out", str(out), "--check"]) == 0
    assert f"skipped: {out / 'edge.svg'}" in capsys.readouterr().out


def test_write_reports_missing_readme_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no diagrams here\n")
    assert main(["--out", str(tmp_path / "out"), "--readme", str(readme)]) == 2
    assert "<!-- cnc-diagrams: edge -->" in capsys.readouterr().err


# Live diagram (/fsm) -------------------------------------------------------


def live(state: str | None) -> LiveDiagram:
    return LiveDiagram(EDGE, "cnc-edge agent m1", lambda: state)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", False),
        ("*/*", False),
        ("text/html,application/xhtml+xml,*/*;q=0.8", False),
        ("text/vnd.mermaid", True),
        ("text/plain", True),
        ("TEXT/VND.MERMAID; charset=utf-8", True),
        ("image/svg+xml, text/vnd.mermaid", False),
    ],
)
def test_wants_mermaid(accept: str, expected: bool) -> None:
    assert wants_mermaid(accept) is expected


def test_live_mermaid_on_request() -> None:
    response = live("ONLINE").route({"accept": "text/vnd.mermaid"})
    assert response.status == 200
    assert response.content_type == MERMAID_CONTENT_TYPE
    text = response.body.decode()
    assert 'title: "cnc-edge agent m1: ONLINE"' in text
    assert "Class ONLINE s_active" in text
    assert response.headers["Vary"] == "Accept"


def test_live_unknown_state_highlights_nothing() -> None:
    text = live("STARTING").route({"accept": "text/plain"}).body.decode()
    assert 'title: "cnc-edge agent m1: state unknown"' in text
    assert "s_active\n" not in text.replace("classDef s_active", "")


@needs_dot
def test_live_svg_by_default() -> None:
    response = live("SYNCING").route({})
    assert response.content_type == SVG_CONTENT_TYPE
    nodes = svg_nodes(response.body)
    assert node_fill(nodes["SYNCING"]) == "darksalmon"
    assert node_fill(nodes["ONLINE"]) == "white"


def test_live_follows_state_changes() -> None:
    state = {"now": "OFFLINE"}
    diagram = LiveDiagram(EDGE, "agent", lambda: state["now"])
    first = diagram.route({"accept": "text/plain"}).body.decode()
    state["now"] = "ONLINE"
    second = diagram.route({"accept": "text/plain"}).body.decode()
    assert "Class OFFLINE s_active" in first
    assert "Class ONLINE s_active" in second
    assert "Class OFFLINE s_default" in second


def test_live_without_graphviz_package_serves_mermaid(
    no_graphviz_package: None, caplog: pytest.LogCaptureFixture
) -> None:
    diagram = live("OFFLINE")
    with caplog.at_level(logging.INFO, logger="cnc_common.diagrams"):
        first = diagram.route({})
        second = diagram.route({})
    assert first.content_type == MERMAID_CONTENT_TYPE
    assert second.content_type == MERMAID_CONTENT_TYPE
    assert "Class OFFLINE s_active" in first.body.decode()
    fallbacks = [r for r in caplog.records if "serving Mermaid" in r.getMessage()]
    assert len(fallbacks) == 1, "the fallback is logged once, not per request"
    assert fallbacks[0].levelno == logging.INFO


def test_live_without_dot_serves_mermaid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("graphviz")
    monkeypatch.setenv("PATH", str(tmp_path))
    response = live("ONLINE").route({})
    assert response.content_type == MERMAID_CONTENT_TYPE


def test_live_failing_dot_serves_mermaid_and_warns(
    failing_dot: None, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("graphviz")
    diagram = live("ONLINE")
    with caplog.at_level(logging.WARNING, logger="cnc_common.diagrams"):
        responses = [diagram.route({}) for _ in range(3)]
    assert {r.content_type for r in responses} == {MERMAID_CONTENT_TYPE}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "repeated failures are rate-limited"
    assert "exited with status 3" in warnings[0].getMessage()


def test_render_svg_failure_raises(failing_dot: None) -> None:
    with pytest.raises(DiagramUnavailable, match="simulated failure"):
        diagrams.render_svg("digraph { a -> b }")
