"""The edge agent under link flapping, frozen brokers, lost streams and bad disks.

These tests check the stream itself rather than a database: every reading
the poller produced must be in the stream, and the journal must be empty.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import nats
import pytest

from cnc_common.embedded import NatsServer
from tests.helpers import (
    edge_status,
    journal_is_empty,
    polled_ids,
    start_program,
    stop_program,
    stream_ids,
    wait_for,
    wait_for_state,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


def start_agent(tmp_path: Path, sim_url: str, nats_url: str, extra_journal: str = ""):
    edge_dir = tmp_path / "edge"
    config = write_edge_config(edge_dir, serial_url=sim_url, nats_url=nats_url)
    if extra_journal:
        config.write_text(
            config.read_text().replace(
                f'data_dir = "{edge_dir / "data"}"',
                f'data_dir = "{edge_dir / "data"}"\n{extra_journal}',
            )
        )
    agent = start_program(
        "cnc_edge.cli", ["run", "--config", str(config)], tmp_path / "edge.log"
    )
    return agent, edge_dir, edge_dir / "data"


def assert_all_in_stream(edge_dir: Path, nats_url: str) -> None:
    polled = polled_ids(edge_dir)
    missing = set(polled) - set(stream_ids(nats_url))
    assert polled
    assert not missing, (
        f"{len(missing)} of {len(polled)} polled readings not in the stream"
    )
    assert journal_is_empty(edge_dir / "data")


def test_flapping_link_ends_in_matching_state(tmp_path: Path, sim_pty) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    agent, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats.url)
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        for n in range(15):
            nats.kill()
            time.sleep(0.1 + (n % 4) * 0.1)
            nats.start()
            time.sleep(0.05 + (n % 3) * 0.15)
        # Down at the end: the state must follow the link down...
        nats.kill()
        wait_for_state(data, "OFFLINE", timeout=30, agent=agent)
        time.sleep(1.0)
        assert edge_status(data)["state"] == "OFFLINE"
        # ...and still react when it comes back.
        nats.start()
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        assert_all_in_stream(edge_dir, nats.url)
    finally:
        stop_program(agent)
        nats.close()


def test_frozen_broker_takes_agent_offline(tmp_path: Path, sim_pty) -> None:
    """SIGSTOP keeps the TCP connection open; missing PubAcks must still count."""
    nats = NatsServer(tmp_path / "nats").start()
    agent, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats.url)
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        nats.freeze()
        frozen_at = time.monotonic()
        # ack_timeout is 1 s in the test config; allow for a busy machine.
        wait_for_state(data, "OFFLINE", timeout=10, agent=agent)
        assert time.monotonic() - frozen_at < 10
        time.sleep(2)
        nats.thaw()
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        assert_all_in_stream(edge_dir, nats.url)
    finally:
        nats.thaw()
        stop_program(agent)
        nats.close()


def test_deleted_stream_is_recreated(tmp_path: Path, sim_pty) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    agent, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats.url)

    async def delete_stream() -> None:
        nc = await nats_connect(nats.url)
        await nc.jetstream().delete_stream("CNC_READINGS")
        await nc.close()

    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        asyncio.run(delete_stream())
        deleted_at = len(polled_ids(edge_dir))
        wait_for(
            lambda: (
                "stream created" in (tmp_path / "edge.log").read_text()
                and len(polled_ids(edge_dir)) > deleted_at + 20
            ),
            60,
            "stream recreated and 20 more polls",
        )
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        # Readings published before the deletion went with the stream; the
        # ones after it must all be there.
        after = polled_ids(edge_dir)[deleted_at + 5 :]
        missing = set(after) - set(stream_ids(nats.url))
        assert not missing
        assert journal_is_empty(data)
    finally:
        stop_program(agent)
        nats.close()


async def nats_connect(url: str):
    return await nats.connect(url, connect_timeout=5)


def test_unwritable_sync_dir_keeps_readings_and_retries(
    tmp_path: Path, sim_pty
) -> None:
    nats = NatsServer(tmp_path / "nats")
    agent, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats.url)
    try:
        wait_for_state(data, "OFFLINE", timeout=60, agent=agent)
        wait_for(lambda: len(polled_ids(edge_dir)) >= 10, 30, "10 polls")
        # A file where sync/ should be: the rotation's rename fails (as root,
        # permission bits would not stop it).
        shutil.rmtree(data / "sync")
        (data / "sync").write_text("not a directory")
        nats.start()
        wait_for(
            lambda: (tmp_path / "edge.log").read_text().count("sync failed") >= 2,
            60,
            "two failed sync attempts",
        )
        assert edge_status(data)["state"] in ("OFFLINE", "SYNCING")
        assert (data / "current.jsonl").stat().st_size > 0
        (data / "sync").unlink()
        (data / "sync").mkdir(mode=0o700)
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        assert_all_in_stream(edge_dir, nats.url)
    finally:
        stop_program(agent)
        nats.close()


def test_torn_and_garbage_lines_are_quarantined_at_start(
    tmp_path: Path, sim_pty
) -> None:
    from cnc_common.reading import encode, make_reading, new_boot_id

    data = tmp_path / "edge" / "data"
    (data / "sync").mkdir(parents=True)
    boot = new_boot_id()
    good = [
        encode(
            make_reading(
                machine="m1",
                boot=boot,
                seq=n,
                ts="2026-01-01T00:00:00Z",
                mono=0.0,
                fields={},
                errors={},
            )
        )
        for n in range(6)
    ]
    # A sync file with garbage in the middle and a torn last line, and a
    # current.jsonl whose last record was cut off by a power failure.
    (data / "sync" / "00000000000000000001.jsonl").write_bytes(
        good[0] + b"\n\xff\xfe garbage\n" + good[1] + b"\n" + good[2][:20]
    )
    (data / "current.jsonl").write_bytes(
        good[3] + b"\n" + good[4] + b"\n" + good[5][:30]
    )
    nats = NatsServer(tmp_path / "nats").start()
    agent, edge_dir, data = start_agent(tmp_path, sim_pty.url, nats.url)
    try:
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        in_stream = set(stream_ids(nats.url))
        expected = {f"{boot}-{n}" for n in (0, 1, 3, 4)}
        assert expected <= in_stream
        quarantine = (data / "quarantine.jsonl").read_bytes().splitlines()
        assert len(quarantine) == 3
        assert edge_status(data)["counters"]["quarantined"] == 3
        assert_all_in_stream(edge_dir, nats.url)
    finally:
        stop_program(agent)
        nats.close()


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_journal_cap_keeps_agent_polling(tmp_path: Path, sim_pty, policy: str) -> None:
    nats = NatsServer(tmp_path / "nats")
    agent, edge_dir, data = start_agent(
        tmp_path,
        sim_pty.url,
        nats.url,
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
        polled_before = len(polled_ids(edge_dir))
        time.sleep(1)
        assert len(polled_ids(edge_dir)) > polled_before, "polling stopped at the cap"
        status = edge_status(data)
        assert set(status["dropped"]) == {"journal_full"}
        assert status["buffered_bytes"] <= 20000
        assert "readings dropped" in (tmp_path / "edge.log").read_text()
        nats.start()
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        polled = polled_ids(edge_dir)
        in_stream = set(stream_ids(nats.url))
        dropped = sum(edge_status(data)["dropped"].values())
        # Every reading is either in the stream or counted as dropped.
        assert len(set(polled) - in_stream) == dropped
        if policy == "drop_newest":
            assert polled[0] in in_stream
        else:
            assert polled[0] not in in_stream
    finally:
        stop_program(agent)
        nats.close()


def test_full_disk_keeps_agent_polling_and_recovers(tmp_path: Path, sim_pty) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    nats = NatsServer(tmp_path / "nats")
    edge_dir = tmp_path / "edge"
    config = write_edge_config(edge_dir, serial_url=sim_pty.url, nats_url=nats.url)
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
        polled_before = len(polled_ids(edge_dir))
        time.sleep(1)
        assert len(polled_ids(edge_dir)) > polled_before
        nats.start()
        wait_for_state(data, "ONLINE", timeout=60, agent=agent)
        assert stop_program(agent) == 0
        polled = polled_ids(edge_dir)
        dropped = sum(edge_status(data)["dropped"].values())
        assert len(set(polled) - set(stream_ids(nats.url))) == dropped
        assert journal_is_empty(data)
    finally:
        stop_program(agent)
        nats.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)
