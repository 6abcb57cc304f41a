"""Serial faults seen through the whole agent: every cycle is still one reading,
and a failed read is an error in that reading, never a value."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from cnc_common.embedded import NatsServer
from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer
from tests.helpers import (
    polled_ids,
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]


def stream_readings(nats_url: str) -> list[dict]:
    import asyncio

    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    async def read() -> list[dict]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        total = (await js.stream_info("CNC_READINGS")).state.messages
        sub = await js.pull_subscribe(
            "", stream="CNC_READINGS", config=ConsumerConfig(ack_policy=AckPolicy.NONE)
        )
        out: list[dict] = []
        while len(out) < total:
            out += [
                orjson.loads(m.data)
                for m in await sub.fetch(min(500, total - len(out)), timeout=5)
            ]
        await nc.close()
        return out

    return asyncio.run(read())


@pytest.fixture
def sim_link(tmp_path: Path):
    server = PtyServer(
        HaasProtocol(MachineModel(seed=3, pace=30, cycle_seconds=20), seed=3),
        link=str(tmp_path / "ttyCNC"),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_agent(tmp_path: Path, serial_url: str):
    nats = NatsServer(tmp_path / "nats").start()
    edge_dir = tmp_path / "edge"
    config = write_edge_config(
        edge_dir,
        serial_url=serial_url,
        nats_url=nats.url,
        interval=0.2,
        commands=["Q100", "Q402", "Q500"],
    )
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    wait_for_state(edge_dir / "data", "ONLINE", timeout=60, agent=agent)
    return nats, edge_dir, agent


@pytest.mark.parametrize(
    "fault", ["half_then_silence", "trickle", "garble", "truncate"]
)
def test_bad_answers_become_errors_not_values(
    tmp_path: Path, sim_link, fault: str
) -> None:
    nats, edge_dir, agent = run_agent(tmp_path, sim_link.link)
    try:
        wait_for(lambda: len(polled_ids(edge_dir)) >= 5, 30, "5 polls")
        # query_timeout is 0.5 s in the test config; a 3 s trickle overruns it.
        sim_link.inject(fault, count=3, seconds=3.0)
        count = len(polled_ids(edge_dir))
        wait_for(lambda: len(polled_ids(edge_dir)) >= count + 15, 60, "15 more polls")
        assert stop_program(agent) == 0
        readings = stream_readings(nats.url)
    finally:
        stop_program(agent)
        nats.close()
    failed = [r for r in readings if r["errors"]]
    assert failed, f"no reading recorded the {fault} fault"
    kinds = {kind for r in failed for kind in r["errors"].values()}
    assert kinds <= {"partial", "timeout", "garbled", "stale_echo"}
    for reading in failed:
        assert reading["status"] in ("partial", "error")
        if "Q402" in reading["errors"]:
            assert "m30_parts" not in reading["fields"]
        if "Q500" in reading["errors"]:
            assert "execution" not in reading["fields"]
    # Polling went on: later readings are complete again.
    assert readings[-1]["status"] == "ok"
    assert len({r["seq"] for r in readings}) == len(readings)


def test_vanishing_device_is_a_gap_then_reopened(tmp_path: Path, sim_link) -> None:
    nats, edge_dir, agent = run_agent(tmp_path, sim_link.link)
    try:
        wait_for(lambda: len(polled_ids(edge_dir)) >= 5, 30, "5 polls")
        sim_link.inject("disconnect")
        wait_for(
            lambda: "serial link lost" in (tmp_path / "edge.log").read_text(),
            30,
            "link lost",
        )
        time.sleep(2.0)
        sim_link.reconnect()
        wait_for(
            lambda: (tmp_path / "edge.log").read_text().count("serial opened") >= 2,
            60,
            "port reopened",
        )
        count = len(polled_ids(edge_dir))
        wait_for(lambda: len(polled_ids(edge_dir)) >= count + 5, 30, "5 more polls")
        assert stop_program(agent) == 0
        readings = stream_readings(nats.url)
    finally:
        stop_program(agent)
        nats.close()
    gap = [r for r in readings if r["errors"].get("serial") == "link_down"]
    # About 2 s of 0.2 s cycles with the device gone; a loaded machine runs
    # fewer of them.
    assert len(gap) >= 3
    for reading in gap:
        assert reading["status"] == "error"
        assert reading["fields"] == {}
    assert readings[-1]["status"] == "ok"
    seqs = [r["seq"] for r in sorted(readings, key=lambda r: r["seq"])]
    assert seqs == list(range(len(seqs))), "a cycle without a reading"


def test_stop_mid_cycle_keeps_partial_reading(tmp_path: Path) -> None:
    """A silent controller makes a cycle last commands x query_timeout; a stop
    must not wait for the cycle, and the reading it cut short is kept."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(
        target=lambda: accepted.append(listener.accept()[0]), daemon=True
    ).start()
    port = listener.getsockname()[1]
    edge_dir = tmp_path / "edge"
    config = write_edge_config(
        edge_dir, serial_url=f"socket://127.0.0.1:{port}", nats_url="nats://127.0.0.1:1"
    )
    # 15 queries of 0.5 s each: a cycle takes 7.5 s when nothing answers.
    config.write_text(
        config.read_text().replace(
            "[poll]\n", "[poll]\nmacros = [5021, 5022, 5023, 5041, 5042, 5043]\n"
        )
    )
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for(lambda: accepted, 30, "the agent connected to the silent controller")
        time.sleep(2.0)
        stop_started = time.monotonic()
        assert stop_program(agent, timeout=30) == 0
        assert time.monotonic() - stop_started < 6
    finally:
        stop_program(agent)
        listener.close()
    log = (tmp_path / "edge.log").read_text()
    assert "did not stop" not in log
    journaled = [
        orjson.loads(line)
        for line in (edge_dir / "data" / "current.jsonl").read_bytes().splitlines()
    ]
    polled = polled_ids(edge_dir)
    assert {r["id"] for r in journaled} == set(polled)
    assert "stopped" in journaled[-1]["errors"].values()
    assert journaled[-1]["fields"] == {}
