"""cnc-demo as the README runs it, and pointed at servers it does not own."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import nats
import orjson
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def run_demo(*args: str) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-m", "cnc_common.demo", *args],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    verdict = orjson.loads(lines[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    return verdict, result.stdout


def test_demo_with_outage_stores_everything_once() -> None:
    verdict, output = run_demo("--seconds", "15", "--outage-seconds", "3")
    assert verdict["missing"] == 0
    assert verdict["duplicates"] == 0
    assert verdict["outages"] == 1
    assert verdict["polled"] > 20
    assert verdict["stored"] == verdict["polled"]
    assert "edge OFFLINE" in output
    assert "edge synced" in output
    # The ledger saw the outage as backfilled, not lost.
    coverage = verdict["coverage"]
    assert coverage["LIVE"] > 0, coverage
    assert coverage["BACKFILLED"] > 0, coverage
    assert not [kind for kind in coverage if kind.startswith(("LOST", "GAP"))]
    assert "coverage: " in output


def test_demo_on_external_servers_leaves_their_streams_alone(
    nats_server, pg_dsn: str
) -> None:
    async def streams() -> list[str]:
        nc = await nats.connect(nats_server.url)
        names = [info.config.name for info in await nc.jetstream().streams_info()]
        await nc.close()
        return names

    for _ in range(2):
        verdict, output = run_demo(
            "--seconds", "8", "--nats-url", nats_server.url, "--pg-dsn", pg_dsn
        )
        # A second run on the same database counts only its own readings.
        assert verdict["stored"] == verdict["polled"]
        assert verdict["missing"] == 0
        assert "outage skipped" in output
    assert asyncio.run(streams()) == []
