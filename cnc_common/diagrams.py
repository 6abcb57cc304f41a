"""State diagrams of the programs' state machines, in Mermaid and SVG.

The diagram extension of transitions (``GraphMachine``) draws them from the
same ``build_machine`` function that each program runs, so a diagram shows
the transitions the code allows. Its Mermaid engine needs transitions 0.9.1
or newer.

Mermaid text needs nothing beyond transitions. SVG needs two optional parts:
the ``graphviz`` Python package (``pip install 'cnc-monitor[diagrams]'``),
which transitions' graphviz engine uses to write the dot source, and the
Graphviz ``dot`` program (Debian package ``graphviz``), which lays it out.
Without either of them SVG raises DiagramUnavailable and callers fall back
to Mermaid; a program never stops because of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from transitions import Machine

from cnc_common.backoff import RateLimitedCounter, not_logged
from cnc_common.errors import DiagramUnavailable
from cnc_common.httpserver import Response

log = logging.getLogger(__name__)

#: The media type Mermaid's documentation recommends for Mermaid text.
MERMAID_CONTENT_TYPE = "text/vnd.mermaid; charset=utf-8"
SVG_CONTENT_TYPE = "image/svg+xml"

#: Seconds ``dot`` may take to lay out a diagram of a few nodes.
DOT_TIMEOUT = 10.0

#: Start of the comment that ``stamp_svg`` puts into an SVG file.
SOURCE_HASH_COMMENT = "<!-- dot source sha256: "


@dataclass(frozen=True)
class MachineDefinition:
    """A program's state machine as its ``build_machine(model, machine_class)`` builds it.

    ``name`` is the file stem of its diagrams (``edge``, ``backend``).
    """

    name: str
    title: str
    build: Callable[..., Machine]


class _Model:
    """The object a diagram's machine is attached to."""


def state_names(definition: MachineDefinition) -> list[str]:
    """Return the names of the machine's states, in definition order."""
    machine = definition.build(_Model())
    return list(machine.states)


def _graph(
    definition: MachineDefinition, engine: str, title: str, active: str | None
) -> tuple[Machine, Any]:
    # Imported here, so that the processes that import this module only for
    # MachineDefinition do not load the diagram extension.
    from transitions.extensions.diagrams import GraphMachine

    model = _Model()
    machine = definition.build(
        model, machine_class=GraphMachine, graph_engine=engine, title=title
    )
    if active is not None and active not in machine.states:
        known = ", ".join(machine.states)
        raise ValueError(
            f"invalid state {active!r} of the {definition.name} machine; "
            f"expected one of {known}"
        )
    # GraphMachine styles the initial state as active. A diagram of the
    # definition highlights nothing; a live one highlights the current state.
    graph_styles = machine.model_graphs[id(model)]  # type: ignore[attr-defined]
    graph_styles.reset_styling()
    if active is not None:
        graph_styles.set_node_style(active, "active")
    return machine, model.get_graph()  # type: ignore[attr-defined]


def mermaid(
    definition: MachineDefinition, active: str | None = None, title: str | None = None
) -> str:
    """Draw the machine as Mermaid ``stateDiagram-v2`` text, ``active`` highlighted."""
    title = title or definition.title
    _, graph = _graph(definition, "mermaid", title, active)
    lines = [line.rstrip() for line in graph.source.splitlines()]
    # transitions 0.9.3 writes the bare title between the "---" lines. Mermaid
    # reads that block as YAML front matter, where the title is a "title" key.
    # A JSON string is a valid YAML scalar whatever characters it contains.
    if lines[:3] == ["---", title, "---"]:
        lines[1] = f"title: {json.dumps(title)}"
    return "\n".join(lines) + "\n"


def _package_missing() -> str | None:
    try:
        import graphviz  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        return (
            f"the graphviz Python package cannot be imported ({exc}); "
            "install it with pip install 'cnc-monitor[diagrams]'"
        )
    return None


def graphviz_missing() -> str | None:
    """Return why SVG cannot be drawn here, or None when it can."""
    missing = _package_missing()
    if missing is None and shutil.which("dot") is None:
        missing = "the Graphviz dot program is not on PATH (apt-get install graphviz)"
    return missing


def dot_source(
    definition: MachineDefinition, active: str | None = None, title: str | None = None
) -> str:
    """Write the machine as Graphviz dot source; needs the graphviz Python package.

    Raises DiagramUnavailable when the package is not installed.
    """
    missing = _package_missing()
    if missing is not None:
        raise DiagramUnavailable(missing)
    machine, graph = _graph(definition, "graphviz", title or definition.title, active)
    # The graphviz engine of transitions 0.9.3 draws no start marker; this
    # point and arrow match Mermaid's "[*] --> initial".
    graph.node("__start__", label="", shape="point", fillcolor="black", width="0.15")
    graph.edge("__start__", machine.initial)
    return str(graph.source)


def render_svg(source: str) -> bytes:
    """Lay out dot ``source`` as SVG with the ``dot`` program.

    Raises DiagramUnavailable when ``dot`` is missing, fails or times out.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise DiagramUnavailable(
            "the Graphviz dot program is not on PATH (apt-get install graphviz)"
        )
    try:
        result = subprocess.run(
            [dot, "-Tsvg"],
            input=source.encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DiagramUnavailable(f"dot timed out after {DOT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise DiagramUnavailable(f"dot failed to start: {exc}") from exc
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()
        raise DiagramUnavailable(
            f"dot exited with status {result.returncode}: {detail}"
        )
    return result.stdout


def svg(
    definition: MachineDefinition, active: str | None = None, title: str | None = None
) -> bytes:
    """Draw the machine as SVG, ``active`` highlighted; raises DiagramUnavailable."""
    return render_svg(dot_source(definition, active, title))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def stamp_svg(svg_bytes: bytes, source: str) -> bytes:
    """Record the SHA-256 of the dot source in an SVG, after its XML declaration.

    The SVG that ``dot`` writes differs between Graphviz versions, but the
    dot source does not, so a check compares the recorded hash instead.
    """
    comment = f"{SOURCE_HASH_COMMENT}{source_hash(source)} -->\n".encode()
    head, newline, rest = svg_bytes.partition(b"\n")
    if head.startswith(b"<?xml"):
        return head + newline + comment + rest
    return comment + svg_bytes


def stamped_hash(svg_bytes: bytes) -> str | None:
    """Return the dot source hash that ``stamp_svg`` recorded, or None."""
    marker = SOURCE_HASH_COMMENT.encode()
    start = svg_bytes.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = svg_bytes.find(b" -->", start)
    return svg_bytes[start:end].decode() if end > 0 else None


def wants_mermaid(accept: str) -> bool:
    """Whether an Accept header requests Mermaid text rather than SVG.

    Mermaid is chosen when the header names ``text/vnd.mermaid`` or
    ``text/plain`` and does not name ``image/svg+xml``; quality values are
    not weighed.
    """
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "image/svg+xml" in types:
        return False
    return bool(types & {"text/vnd.mermaid", "text/plain"})


class LiveDiagram:
    """The ``/fsm`` endpoint: the state machine with the current state highlighted.

    It serves SVG when Graphviz is available, and Mermaid text when it is
    not or when the request's Accept header requests it. ``current_state``
    returns the name of the current state, or None while it is unknown; an
    unknown state is drawn with nothing highlighted. Each drawing is cached
    by state and format, because only the highlight changes.
    """

    def __init__(
        self,
        definition: MachineDefinition,
        label: str,
        current_state: Callable[[], str | None],
    ) -> None:
        self.definition = definition
        self.label = label
        self.current_state = current_state
        self.states = set(state_names(definition))
        self._cache: dict[tuple[str | None, str], bytes] = {}
        self._lock = threading.Lock()
        self._svg_failures = RateLimitedCounter(interval=300.0)
        self._fallback_logged = False

    def route(self, headers: Mapping[str, str]) -> Response:
        state = self.current_state()
        if state not in self.states:
            state = None
        extra = {"Vary": "Accept"}
        if not wants_mermaid(headers.get("accept", "")):
            body = self._svg(state)
            if body is not None:
                return Response(HTTPStatus.OK, body, SVG_CONTENT_TYPE, extra)
        body = self._draw(state, "mermaid")
        return Response(HTTPStatus.OK, body, MERMAID_CONTENT_TYPE, extra)

    def _title(self, state: str | None) -> str:
        return f"{self.label}: {state or 'state unknown'}"

    def _draw(self, state: str | None, fmt: str) -> bytes:
        with self._lock:
            cached = self._cache.get((state, fmt))
            if cached is None:
                if fmt == "svg":
                    cached = svg(self.definition, state, self._title(state))
                else:
                    text = mermaid(self.definition, state, self._title(state))
                    cached = text.encode()
                self._cache[(state, fmt)] = cached
            return cached

    def _svg(self, state: str | None) -> bytes | None:
        """Return the SVG drawing, or None after logging why there is none."""
        missing = graphviz_missing()
        if missing is not None:
            # An optional part is not installed: log it once, not per request.
            if not self._fallback_logged:
                self._fallback_logged = True
                log.info("fsm diagram: serving Mermaid text (%s)", missing)
            return None
        try:
            return self._draw(state, "svg")
        except DiagramUnavailable as exc:
            suppressed = self._svg_failures.hit()
            if suppressed is not None:
                log.warning(
                    "fsm diagram failed: %s (%s%s); serving Mermaid text",
                    self.definition.name,
                    exc.reason,
                    not_logged(suppressed),
                )
            return None
