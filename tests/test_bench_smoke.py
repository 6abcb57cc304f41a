"""Smoke test of the benchmarks: ``python -m bench --quick`` runs and reports.

It checks that every benchmark runs on its own servers and writes sane
figures, not that anything is fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench.common import RESULTS_DIR


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_quick_writes_sane_figures(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.exists() else set()

    assert bench_main.main(["--quick"]) == 0

    written = set(RESULTS_DIR.glob("*.json")) - before
    assert len(written) == 1
    path = written.pop()
    document = json.loads(Path(path).read_text())
    figures = {(f["benchmark"], f["name"]): f for f in document["figures"]}
    benchmarks = {benchmark for benchmark, _ in figures}
    assert benchmarks == set(bench_main.BENCHMARKS)
    for key, figure in figures.items():
        assert figure["runs"], key
        assert all(value > 0 for value in figure["runs"]), key
    with_ceiling = [f for f in figures.values() if f["ceiling_name"]]
    assert {f["benchmark"] for f in with_ceiling} == {"journal", "replay", "ingest"}
    for figure in with_ceiling:
        assert figure["ratio_summary"]["median"] > 0, figure["name"]
    assert document["machine"]["nproc"] >= 1
    assert "| replay |" in capsys.readouterr().out
    path.unlink()
