"""What the edge agent sends the ledger: delivery headers and loss reports.

Each test runs the real agent against a real nats-server and the simulated
control, then reads every message of the stream, with its subject and
headers, through a JetStream consumer.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cnc_common.coverage import loss_msg_id, reduced_msg_id
from cnc_common.embedded import NatsServer
from cnc_common.reading import encode, make_reading, new_boot_id
from tests.helpers import (
    edge_status,
    polled_ids,
    start_program,
    stop_program,
    wait_for,
    wait_for_state,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


@dataclass
class Message:
    subject: str
    headers: dict[str, str]
    data: dict[str, Any]


def stream_messages(nats_url: str, stream: str = "CNC_READINGS") -> list[Message]:
    """Every message stored in the stream, in stream order."""

    async def read() -> list[Message]:
        nc = await nats.connect(nats_url, connect_timeout=5)
        try:
            js = nc.jetstream()
            total = (await js.stream_info(stream)).state.messages
            sub = await js.pull_subscribe(
                "",
                stream=stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL
                ),
            )
            messages: list[Message] = []
            while len(messages) < total:
                for msg in await sub.fetch(min(500, total - len(messages)), timeout=5):
                    messages.append(
                        Message(
                            msg.subject, dict(msg.headers or {}), orjson.loads(msg.data)
                        )
                    )
            await sub.unsubscribe()
            return messages
        finally:
            await nc.close()

    return asyncio.run(read())


def loss_reports(messages: list[Message]) -> list[dict[str, Any]]:
    reports = [m for m in messages if m.subject == "cnc.readings.m1.control"]
    for message in reports:
        assert message.headers["Nats-Msg-Id"] == loss_msg_id(message.data)
    return [message.data for message in reports]


def covered(reports: list[dict[str, Any]], reason: str) -> set[tuple[str, int]]:
    """The (boot, seq) pairs the reports of ``reason`` describe."""
    return {
        (report["boot"], seq)
        for report in reports
        if report["reason"] == reason
        for seq in range(report["seq_start"], report["seq_end"] + 1)
    }


def boot_seq(reading_id: str) -> tuple[str, int]:
    boot, _, seq = reading_id.rpartition("-")
    return boot, int(seq)


def start_agent(tmp_path: Path, sim_url: str, nats_url: str, journal: str = ""):
    edge_dir = tmp_path / "edge"
    config = write_edge_config(edge_dir, serial_url=sim_url, nats_url=nats_url)
    data = edge_dir / "data"
    if journal:
        config.write_text(
            config.read_text().replace(
                f'data_dir = "{data}"', f'data_dir = "{data}"\n{journal}'
            )
        )
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    return agent, config, edge_dir, data


def wait_reports_sent(data: Path, agent: subprocess.Popen[bytes]) -> None:
    wait_for_state(data, "ONLINE", timeout=60, agent=agent)
    wait_for(
        lambda: edge_status(data).get("loss_reports_pending") == 0,
        30,
        "every loss report acknowledged",
    )


def test_readings_carry_delivery_header(tmp_path: Path, sim_pty) -> None:
    nats_server = NatsServer(tmp_path / "nats")
    agent, _, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats_server.url)
    try:
        wait_for(lambda: len(polled_ids(edge_dir)) >= 10, 30, "10 polls offline")
        offline = set(polled_ids(edge_dir))
        nats_server.start()
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        online_from = len(polled_ids(edge_dir)) + 1
        wait_for(
            lambda: len(polled_ids(edge_dir)) >= online_from + 10, 30, "10 live polls"
        )
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    delivery = {m.data["id"]: m.headers.get("Cnc-Delivery") for m in messages}
    assert set(delivery.values()) == {"live", "backfill"}
    assert {delivery[rid] for rid in offline} == {"backfill"}
    online = polled_ids(edge_dir)[online_from:]
    assert {delivery[rid] for rid in online} == {"live"}
    assert all(m.headers["Nats-Msg-Id"] == m.data["id"] for m in messages)


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_journal_cap_reported_with_exact_bounds(
    tmp_path: Path, sim_pty, policy: str
) -> None:
    nats_server = NatsServer(tmp_path / "nats")
    agent, _, edge_dir, data = start_agent(
        tmp_path,
        sim_pty.url,
        nats_server.url,
        # With reduce_at = 1.0 reduction would start only at the cap itself,
        # so every reading missing from the stream was dropped.
        f'max_buffer_bytes = 20000\nsegment_bytes = 4000\nfull_policy = "{policy}"'
        "\nreduce_at = 1.0",
    )
    try:
        wait_for(
            lambda: sum(edge_status(data).get("dropped", {}).values()) >= 20,
            60,
            "20 readings dropped at the cap",
        )
        nats_server.start()
        wait_reports_sent(data, agent)
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    polled = {boot_seq(rid) for rid in polled_ids(edge_dir)}
    delivered = {boot_seq(m.data["id"]) for m in messages if "id" in m.data}
    dropped = polled - delivered
    reports = loss_reports(messages)
    assert len(dropped) == sum(edge_status(data)["dropped"].values())
    assert {report["reason"] for report in reports} == {"journal_cap"}
    assert covered(reports, "journal_cap") == dropped
    assert all(policy in report["detail"] for report in reports)
    assert not (data / "losses.jsonl").exists()


def test_corrupt_line_reported_with_missing_range(tmp_path: Path, sim_pty) -> None:
    boot, other = new_boot_id(), new_boot_id()

    def line(seq: int, of: str = boot) -> bytes:
        value = make_reading(
            machine="m1",
            boot=of,
            seq=seq,
            ts="2026-12-04T10:00:00.000000Z",
            mono=0.0,
            fields={},
            errors={},
        )
        return encode(value) + b"\n"

    data = tmp_path / "edge" / "data"
    (data / "sync").mkdir(parents=True)
    # Seq 4 to 6 were lost in a bad sector between 3 and 7; the garbage
    # between two boots bounds no range and must not be reported.
    (data / "sync" / "00000000000000000001.jsonl").write_bytes(
        line(2)
        + line(3)
        + b'{"v": 1, "id": "'
        + boot.encode()
        + b"-4\xff\xfe\n"
        + b"\x00\x00 bad sector\n"
        + line(7)
        + line(8)
        + b"garbage\n"
        + line(0, other)
    )
    nats_server = NatsServer(tmp_path / "nats").start()
    agent, _, _, data = start_agent(tmp_path, sim_pty.url, nats_server.url)
    try:
        wait_reports_sent(data, agent)
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    [report] = loss_reports(messages)
    assert report["reason"] == "corrupt_journal_line"
    assert (report["boot"], report["seq_start"], report["seq_end"]) == (boot, 4, 6)
    assert report["machine"] == "m1"
    assert edge_status(data)["counters"]["quarantined"] == 3


def test_clean_restart_reports_no_loss(tmp_path: Path, sim_pty) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    agent, config, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats_server.url)
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        wait_for(lambda: len(polled_ids(edge_dir)) >= 10, 30, "10 polls")
        assert stop_program(agent) == 0
        assert (data / "clean_stop.json").exists()
        agent = start_program(
            "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge-2.log"
        )
        wait_reports_sent(data, agent)
        wait_for(lambda: len(polled_ids(edge_dir)) >= 20, 30, "10 more polls")
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    assert loss_reports(messages) == []
    assert "loss recorded" not in (tmp_path / "edge-2.log").read_text()
    delivered = {boot_seq(m.data["id"]) for m in messages if "id" in m.data}
    assert {boot_seq(rid) for rid in polled_ids(edge_dir)} <= delivered


def test_killed_agent_reported_as_agent_down(tmp_path: Path, sim_pty) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    agent, config, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats_server.url)
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        wait_for(lambda: len(polled_ids(edge_dir)) >= 20, 30, "20 polls")
        info = orjson.loads((data / "agent.json").read_bytes())
        pids = [info["pid"], *info["children"].values()]
        # The whole agent at once: a parent killed alone lets the children
        # see it and stop cleanly.
        subprocess.run(["kill", "-9", *map(str, pids)], check=True)
        agent.wait(30)
        last = orjson.loads((data / "poller.last").read_bytes())
        first_boot = boot_seq(polled_ids(edge_dir)[0])[0]
        time.sleep(0.5)
        agent = start_program(
            "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge-2.log"
        )
        wait_reports_sent(data, agent)
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    reports = [r for r in loss_reports(messages) if r["reason"] == "agent_down"]
    assert len(reports) == 1
    [report] = reports
    assert report["boot"] == first_boot == last["boot"]
    assert (report["seq_start"], report["seq_end"]) == (0, last["seq"])
    assert report["ts_end"] == last["ts"]
    # The audit line follows the hand-over to the buffer; poller.last
    # precedes it, so it may be one reading ahead.
    audited = [seq for b, seq in map(boot_seq, polled_ids(edge_dir)) if b == first_boot]
    assert max(audited) in (last["seq"], last["seq"] - 1)


def test_near_cap_readings_reduced_and_replayed(tmp_path: Path, sim_pty) -> None:
    nats_server = NatsServer(tmp_path / "nats")
    agent, _, edge_dir, data = start_agent(
        tmp_path,
        sim_pty.url,
        nats_server.url,
        "max_buffer_bytes = 200000\nreduce_at = 0.02\nreduce_window = 2.0",
    )
    try:
        wait_for(
            lambda: edge_status(data).get("counters", {}).get("reduced", 0) >= 40,
            60,
            "40 readings folded into reduced records",
        )
        nats_server.start()
        wait_reports_sent(data, agent)
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    records = [m for m in messages if m.data.get("type") == "reduced"]
    assert records
    for message in records:
        assert message.headers["Cnc-Delivery"] == "backfill-reduced"
        assert message.headers["Nats-Msg-Id"] == reduced_msg_id(message.data)
        assert message.subject == "cnc.readings.m1"
    in_records = {
        (m.data["boot"], seq)
        for m in records
        for seq in range(m.data["seq_start"], m.data["seq_end"] + 1)
    }
    assert sum(m.data["count"] for m in records) == len(in_records)
    in_full = {boot_seq(m.data["id"]) for m in messages if "id" in m.data}
    assert not in_full & in_records, "a reading kept in full is inside a record"
    polled = {boot_seq(rid) for rid in polled_ids(edge_dir)}
    lost = covered(loss_reports(messages), "journal_cap")
    assert polled - in_full - in_records - lost == set()


@pytest.fixture
def slow_sim_pty() -> Iterator[object]:
    """A simulated control in real time with 10-minute cycles.

    Its discrete values change rarely, so the reducer's windows fill up.
    """
    from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer

    server = PtyServer(
        HaasProtocol(MachineModel(seed=1, pace=1, cycle_seconds=600), seed=1)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_killed_while_reducing_keeps_window_on_disk(
    tmp_path: Path, slow_sim_pty
) -> None:
    nats_server = NatsServer(tmp_path / "nats")
    agent, config, _, data = start_agent(
        tmp_path,
        slow_sim_pty.url,
        nats_server.url,
        "max_buffer_bytes = 200000\nreduce_at = 0.02\nreduce_window = 30.0",
    )
    window = data / "reducing.jsonl"
    try:
        wait_for(
            lambda: window.exists() and window.read_bytes().count(b"\n") >= 10,
            60,
            "10 readings in the open reduction window",
        )
        info = orjson.loads((data / "agent.json").read_bytes())
        subprocess.run(
            ["kill", "-9", str(info["pid"]), *map(str, info["children"].values())],
            check=True,
        )
        agent.wait(30)
        in_window = {
            orjson.loads(line)["id"] for line in window.read_bytes().splitlines()
        }

        nats_server.start()
        agent = start_program(
            "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge-2.log"
        )
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
    in_full = {m.data["id"] for m in messages if "id" in m.data}
    assert len(in_window) >= 10
    assert in_window <= in_full
    assert "reduction window recovered" in (tmp_path / "edge-2.log").read_text()


def test_full_disk_reported_from_memory(tmp_path: Path, sim_pty) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    nats_server = NatsServer(tmp_path / "nats")
    edge_dir = tmp_path / "edge"
    config = write_edge_config(
        edge_dir, serial_url=sim_pty.url, nats_url=nats_server.url
    )
    config.write_text(
        config.read_text().replace(
            f'data_dir = "{edge_dir / "data"}"', f'data_dir = "{mount / "data"}"'
        )
    )
    data = mount / "data"
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    try:
        wait_for(
            lambda: edge_status(data).get("dropped", {}).get("disk_full", 0) >= 10,
            90,
            "10 readings dropped on a full disk",
        )
        nats_server.start()
        wait_reports_sent(data, agent)
        assert stop_program(agent) == 0
        messages = stream_messages(nats_server.url)
    finally:
        stop_program(agent)
        nats_server.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)
    polled = {boot_seq(rid) for rid in polled_ids(edge_dir)}
    delivered = {boot_seq(m.data["id"]) for m in messages if "id" in m.data}
    reports = loss_reports(messages)
    assert {report["reason"] for report in reports} == {"disk_full"}
    assert covered(reports, "disk_full") == polled - delivered
    assert "loss report not written" in (tmp_path / "edge.log").read_text()
