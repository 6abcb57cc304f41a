"""The ``cnc-diagrams`` command: write or check the state diagrams of both programs.

For each state machine (``edge`` from cnc_edge.fsm, ``backend`` from
cnc_backend.fsm) it writes ``<name>.mmd`` (Mermaid) and, where Graphviz is
available, ``<name>.svg``. With ``--readme`` it also rewrites the Mermaid
block that follows the line ``<!-- cnc-diagrams: <name> -->`` in that file.

``--check`` writes nothing and exits 1 listing every difference. Mermaid
files and README blocks are compared byte for byte. An SVG file is compared
by the SHA-256 of the dot source recorded in it, because the SVG that
``dot`` writes differs between Graphviz versions while the dot source does
not. That check needs only the graphviz Python package. Without the package
the SVG check is reported as skipped.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cnc_common.diagrams import (
    MachineDefinition,
    dot_source,
    graphviz_missing,
    mermaid,
    render_svg,
    source_hash,
    stamp_svg,
    stamped_hash,
)
from cnc_common.errors import DiagramUnavailable

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2

README_MARKER = "<!-- cnc-diagrams: {name} -->"


def definitions() -> list[MachineDefinition]:
    """Return the machines drawn by cnc-diagrams, edge agent first."""
    from cnc_backend.fsm import DIAGRAM as backend
    from cnc_edge.fsm import DIAGRAM as edge

    return [edge, backend]


def _readme_block(name: str) -> re.Pattern[str]:
    marker = re.escape(README_MARKER.format(name=name))
    return re.compile(rf"({marker}\n```mermaid\n)(.*?)(^```$)", re.S | re.M)


def embedded_mermaid(readme: str, name: str) -> str | None:
    """Return the Mermaid text embedded in ``readme`` for ``name``, or None."""
    match = _readme_block(name).search(readme)
    return match.group(2) if match else None


def embed_mermaid(readme: str, name: str, text: str) -> str:
    """Replace the Mermaid block for ``name`` in ``readme``; raise KeyError if absent."""
    pattern = _readme_block(name)
    if pattern.search(readme) is None:
        raise KeyError(name)
    return pattern.sub(lambda m: m.group(1) + text + m.group(3), readme, count=1)


def check(out: Path, readme: Path | None) -> tuple[list[str], list[str]]:
    """Compare the files with the code; return (differences, skipped checks)."""
    differences: list[str] = []
    skipped: list[str] = []
    readme_text = readme.read_text(encoding="utf-8") if readme else None
    for definition in definitions():
        text = mermaid(definition)
        differences += _compare_mermaid(out / f"{definition.name}.mmd", text)
        if readme is not None and readme_text is not None:
            embedded = embedded_mermaid(readme_text, definition.name)
            if embedded != text:
                problem = "missing" if embedded is None else "differs"
                marker = README_MARKER.format(name=definition.name)
                differences.append(f"{problem}: {readme} block after {marker}")
        line = _compare_svg(definition, out / f"{definition.name}.svg")
        if line.startswith("skipped:"):
            skipped.append(line)
        elif line:
            differences.append(line)
    return differences, skipped


def _compare_mermaid(path: Path, text: str) -> list[str]:
    if not path.exists():
        return [f"missing: {path}"]
    if path.read_text(encoding="utf-8") != text:
        return [f"differs: {path}"]
    return []


def _compare_svg(definition: MachineDefinition, path: Path) -> str:
    """Return a "missing:", "differs:" or "skipped:" line, or "" when it matches."""
    if not path.exists():
        return f"missing: {path}"
    try:
        source = dot_source(definition)
    except DiagramUnavailable as exc:
        return f"skipped: {path} ({exc.reason})"
    if stamped_hash(path.read_bytes()) != source_hash(source):
        return f"differs: {path}"
    return ""


def write(out: Path, readme: Path | None) -> list[str]:
    """Write every diagram, and the README blocks; return one line per file."""
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    readme_text = readme.read_text(encoding="utf-8") if readme else None
    for definition in definitions():
        text = mermaid(definition)
        path = out / f"{definition.name}.mmd"
        path.write_text(text, encoding="utf-8")
        lines.append(f"wrote: {path}")
        if readme_text is not None:
            readme_text = embed_mermaid(readme_text, definition.name, text)
        lines.append(_write_svg(definition, out / f"{definition.name}.svg"))
    if readme is not None and readme_text is not None:
        readme.write_text(readme_text, encoding="utf-8")
        lines.append(f"wrote: {readme}")
    return lines


def _write_svg(definition: MachineDefinition, path: Path) -> str:
    missing = graphviz_missing()
    if missing is not None:
        return f"skipped: {path} ({missing})"
    try:
        source = dot_source(definition)
        path.write_bytes(stamp_svg(render_svg(source), source))
    except DiagramUnavailable as exc:
        return f"skipped: {path} ({exc.reason})"
    return f"wrote: {path}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnc-diagrams",
        description=(
            "Write the state diagrams of the edge agent and the backend from "
            "their state machines: Mermaid (.mmd) always, SVG where Graphviz "
            "is installed."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fsm_diagrams"),
        metavar="DIR",
        help="directory of the diagram files (default: fsm_diagrams)",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        metavar="PATH",
        help="also update (or check) the Mermaid blocks embedded in this file",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 and list every file that differs from the code",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            differences, skipped = check(args.out, args.readme)
            for line in [*differences, *skipped]:
                print(line)
            if differences:
                print(
                    "cnc-diagrams: diagrams differ from the code; regenerate them "
                    "with cnc-diagrams without --check",
                    file=sys.stderr,
                )
                return EXIT_DIFFERENT
            print(f"up to date: {args.out}")
            return EXIT_OK
        for line in write(args.out, args.readme):
            print(line)
    except KeyError as exc:
        marker = README_MARKER.format(name=exc.args[0])
        print(
            f"cnc-diagrams: {args.readme} has no Mermaid block after {marker}; "
            "add the marker line and an empty ```mermaid block where it belongs",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except OSError as exc:
        print(f"cnc-diagrams: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
