"""Twenty broker outages from a seeded schedule, some in the middle of a sync.

The edge agent polls a simulated control every 20 ms and replays in chunks
of two readings, so a sync after a long outage takes long enough for the
schedule to kill the broker in the middle of it. The agent's reconnect
wait is 0.1 s, so an outage of 8 s or more outlasts the 60 attempts nats-py
allows by default (its budget is counted in attempts, not seconds); the
agent must come back from those too.
"""

from __future__ import annotations

import collections
import random
import time
from pathlib import Path

import pytest

from cnc_common.embedded import NatsServer
from tests.helpers import (
    edge_status,
    journal_is_empty,
    polled_ids,
    start_program,
    stop_program,
    stored_ids,
    stream_ids,
    wait_for,
    wait_for_state,
    write_backend_config,
    write_edge_config,
)

SEED = 20261204
OUTAGES = 20

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(600)]


def schedule(rng: random.Random) -> list[tuple[str, float, bool]]:
    """(how, seconds down, wait for SYNCING first) for each outage."""
    plan = []
    for n in range(OUTAGES):
        how = rng.choice(["kill", "kill", "stop", "freeze"])
        if n in (3, 11):
            seconds = rng.uniform(8.0, 10.0)  # beyond the default attempt budget
        else:
            seconds = rng.uniform(0.1, 3.0)
        plan.append((how, seconds, n % 3 == 2))
    return plan


def diagnose(polled: list[str], pg_dsn: str, nats_url: str) -> str:
    """Say where the missing readings were lost: before or after the stream."""
    import psycopg2

    missing = sorted(set(polled) - set(stored_ids(pg_dsn)))
    in_stream = set(stream_ids(nats_url))
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason")
        dead = cur.fetchall()
    positions = [polled.index(rid) for rid in missing]
    return (
        f"{len(missing)} polled readings not stored, at poll positions "
        f"{positions[:40]}; {len(set(missing) & in_stream)} of them are in the "
        f"stream; dead letters: {dead}"
    )


def take_down(nats: NatsServer, how: str) -> None:
    if how == "kill":
        nats.kill()
    elif how == "stop":
        nats.stop()
    else:
        nats.freeze()


def bring_up(nats: NatsServer, how: str) -> None:
    if how == "freeze":
        nats.thaw()
    else:
        nats.start()


def test_random_outages_lose_nothing(tmp_path: Path, sim_pty, pg_dsn: str) -> None:
    rng = random.Random(SEED)
    nats = NatsServer(tmp_path / "nats").start()
    backend = start_program(
        "cnc_backend.cli",
        [
            "run",
            "--config",
            str(write_backend_config(tmp_path / "b", nats_url=nats.url)),
        ],
        tmp_path / "backend.log",
        {"CNC_BACKEND_POSTGRES_DSN": pg_dsn},
    )
    edge_dir = tmp_path / "edge"
    config = write_edge_config(
        edge_dir,
        serial_url=sim_pty.url,
        nats_url=nats.url,
        interval=0.02,
        commands=["Q500"],
    )
    config.write_text(
        config.read_text().replace(
            f'data_dir = "{edge_dir / "data"}"',
            f'data_dir = "{edge_dir / "data"}"\nreplay_chunk = 2',
        )
    )
    data = edge_dir / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    mid_sync = 0
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        for how, seconds, during_sync in schedule(rng):
            if during_sync:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if edge_status(data).get("state") == "SYNCING":
                        mid_sync += 1
                        break
                    time.sleep(0.005)
            else:
                time.sleep(rng.uniform(0.3, 2.0))
            take_down(nats, how)
            time.sleep(seconds)
            bring_up(nats, how)
        wait_for_state(data, "ONLINE", timeout=120, agent=agent)
        time.sleep(0.5)
        assert edge_status(data)["state"] == "ONLINE"
        assert stop_program(agent) == 0
        polled = polled_ids(edge_dir)
        try:
            wait_for(
                lambda: set(polled) <= set(stored_ids(pg_dsn)),
                120,
                "every polled reading stored",
                interval=1.0,
            )
        except AssertionError:
            raise AssertionError(diagnose(polled, pg_dsn, nats.url)) from None
    finally:
        nats.thaw()
        stop_program(agent)
        stop_program(backend)
        nats.close()
    counts = collections.Counter(stored_ids(pg_dsn))
    assert len(polled) > 1000
    assert set(counts) == set(polled)
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert journal_is_empty(data)
    # The schedule must really have hit syncs in progress.
    assert mid_sync >= 2, f"only {mid_sync} outages started during a sync"
