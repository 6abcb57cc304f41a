"""What the poller records for the coverage ledger, against the simulator on a pty:
the controller condition, the controller and host clocks, and poller.last."""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from prometheus_client import CollectorRegistry

from cnc_common.config import load
from cnc_common.errors import ConfigError, InvalidReading
from cnc_common.reading import decode, encode, make_reading, new_boot_id, validate
from cnc_edge.config import EdgeConfig
from cnc_edge.haas import PollResult
from cnc_edge.hostclock import TEST_CLOCK_ENV
from cnc_edge.metrics import PollerMetrics
from cnc_edge.poller import (
    LAST_POLL_FILE,
    LAST_POLL_LINE_BYTES,
    PREVIOUS_POLL_FILE,
    LastPollFile,
    Poller,
    controller_timestamp,
    decide_condition,
    read_last_poll,
    read_previous_boot_poll,
)
from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer

pytestmark = pytest.mark.timeout(60)

QUERY_TIMEOUT = 0.3
COMMANDS = ["Q100", "Q104", "Q500"]


def start_sim(**machine_options: Any) -> PtyServer:
    machine = MachineModel(seed=1, pace=30, cycle_seconds=20, **machine_options)
    server = PtyServer(HaasProtocol(machine, seed=1))
    server.start()
    return server


@pytest.fixture
def sim() -> Iterator[PtyServer]:
    server = start_sim()
    try:
        yield server
    finally:
        server.stop()


def make_config(
    tmp_path: Path, url: str, poll: dict | None = None, machine: dict | None = None
) -> EdgeConfig:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True, mode=0o700)
    data = {
        "machine": {"id": "m1", **(machine or {})},
        "serial": {
            "url": url,
            "query_timeout": QUERY_TIMEOUT,
            "reopen_backoff_initial": 0.05,
            "reopen_backoff_cap": 0.1,
        },
        "poll": {"interval": 0.05, "commands": COMMANDS, **(poll or {})},
        "journal": {"data_dir": str(data_dir)},
    }
    return load(EdgeConfig, data, source="test")


def make_poller(config: EdgeConfig, registry: CollectorRegistry | None = None):
    metrics = PollerMetrics("m1", registry=registry or CollectorRegistry())
    return Poller(config, queue.Queue(), threading.Event(), metrics)


def seconds_between(later: str, earlier: str) -> float:
    delta = datetime.fromisoformat(later) - datetime.fromisoformat(earlier)
    return delta.total_seconds()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"machine": "m1", **labels})


# -- conditions ----------------------------------------------------------------


def test_condition_ok_with_every_key(tmp_path: Path, sim: PtyServer) -> None:
    poller = make_poller(make_config(tmp_path, sim.url))
    reading = poller.poll_once()
    assert validate(reading) is reading
    assert reading["condition"] == "ok"
    assert reading["errors"] == {}
    assert (
        reading["host_boot"]
        == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    )
    assert isinstance(reading["clock_synced"], bool)
    assert reading["ctrl_ts"] is not None
    # The clock queries add no field: their values are ctrl_ts.
    assert "macros" not in reading["fields"]
    assert reading["id"] == f"{poller.boot}-0"


def test_condition_busy_when_one_command_ignored(
    tmp_path: Path, sim: PtyServer
) -> None:
    registry = CollectorRegistry()
    poller = make_poller(make_config(tmp_path, sim.url), registry)
    sim.inject("ignore", count=1000, command="Q500")
    reading = poller.poll_once()
    poller.metrics.record_poll(reading, 0.1)
    assert reading["condition"] == "controller_busy"
    assert reading["errors"] == {"Q500": "timeout"}
    assert reading["fields"]["mode"] == "MEM"
    assert reading["ctrl_ts"] is not None
    assert (
        sample(registry, "cnc_edge_poll_cycles_total", condition="controller_busy") == 1
    )
    assert (
        sample(registry, "cnc_edge_controller_condition", condition="controller_busy")
        == 1
    )


def test_condition_busy_when_answer_trickles(tmp_path: Path, sim: PtyServer) -> None:
    poller = make_poller(make_config(tmp_path, sim.url))
    sim.inject("trickle", count=1000, command="Q104", seconds=2.0)
    reading = poller.poll_once()
    assert reading["condition"] == "controller_busy"
    assert reading["errors"] == {"Q104": "partial"}


def test_condition_off_then_back_on(tmp_path: Path, sim: PtyServer) -> None:
    registry = CollectorRegistry()
    poller = make_poller(make_config(tmp_path, sim.url), registry)
    assert poller.poll_once()["condition"] == "ok"

    sim.protocol.power_off()
    reading = poller.poll_once()
    poller.metrics.record_poll(reading, 1.0)
    assert reading["condition"] == "controller_off"
    assert reading["status"] == "error"
    assert reading["ctrl_ts"] is None
    assert set(reading["errors"].values()) == {"timeout"}
    assert (
        sample(registry, "cnc_edge_controller_condition", condition="controller_off")
        == 1
    )
    assert sample(registry, "cnc_edge_controller_condition", condition="ok") == 0
    assert math.isnan(sample(registry, "cnc_edge_controller_clock_skew_seconds"))

    sim.protocol.power_on()
    assert poller.poll_once()["condition"] == "ok"


def test_condition_garbled_answer_is_ok(tmp_path: Path, sim: PtyServer) -> None:
    poller = make_poller(make_config(tmp_path, sim.url))
    sim.inject("garble", count=1000, command="Q104")
    reading = poller.poll_once()
    assert reading["errors"] == {"Q104": "garbled"}
    assert reading["condition"] == "ok"


def test_condition_link_down(tmp_path: Path) -> None:
    server = start_sim()
    registry = CollectorRegistry()
    poller = make_poller(make_config(tmp_path, server.url), registry)
    try:
        assert poller.poll_once()["condition"] == "ok"
    finally:
        server.stop()
    # The first cycle after the pty is gone fails on the open port, the
    # next ones fail to open it again.
    for _ in range(3):
        reading = poller.poll_once()
        poller.metrics.record_poll(reading, 0.01)
        assert reading["condition"] == "link_down"
        assert reading["errors"] == {"serial": "link_down"}
        assert reading["ctrl_ts"] is None
    assert sample(registry, "cnc_edge_poll_cycles_total", condition="link_down") == 3


def test_condition_link_down_when_port_never_opens(tmp_path: Path) -> None:
    poller = make_poller(make_config(tmp_path, str(tmp_path / "no-such-tty")))
    reading = poller.poll_once()
    assert reading["condition"] == "link_down"
    assert validate(reading)["status"] == "error"


def test_decide_condition_table() -> None:
    cases = [
        (PollResult(), None),
        (PollResult(sent=["Q100"]), "ok"),
        (
            PollResult(errors={"Q100": "unknown_command"}, sent=["Q100", "Q104"]),
            "ok",
        ),
        (
            PollResult(
                errors={"Q100": "timeout"}, sent=["Q100", "Q104"], silent=["Q100"]
            ),
            "controller_busy",
        ),
        (
            PollResult(errors={"Q100": "stale_echo"}, sent=["Q100"]),
            "controller_busy",
        ),
        (
            PollResult(
                errors={"Q100": "timeout", "Q104": "timeout"},
                sent=["Q100", "Q104"],
                silent=["Q100", "Q104"],
            ),
            "controller_off",
        ),
    ]
    for result, expected in cases:
        assert decide_condition(result) == expected, result


# -- controller clock ------------------------------------------------------------


def test_ctrl_ts_follows_controller_skew(tmp_path: Path) -> None:
    server = start_sim(clock_skew=120.0)
    registry = CollectorRegistry()
    try:
        poller = make_poller(make_config(tmp_path, server.url), registry)
        reading = poller.poll_once()
        poller.metrics.record_poll(reading, 0.01)
    finally:
        server.stop()
    # The controller clock has 1 s resolution and is read after ts.
    skew = seconds_between(reading["ctrl_ts"], reading["ts"])
    assert 118.5 <= skew <= 121.5
    metric = sample(registry, "cnc_edge_controller_clock_skew_seconds")
    assert metric == pytest.approx(skew)


def test_ctrl_ts_in_configured_zone(tmp_path: Path) -> None:
    server = start_sim(time_zone=ZoneInfo("Asia/Tokyo"))
    try:
        config = make_config(tmp_path, server.url, machine={"time_zone": "Asia/Tokyo"})
        reading = make_poller(config).poll_once()
        config = make_config(tmp_path, server.url, machine={"time_zone": "UTC"})
        wrong_zone = make_poller(config).poll_once()
    finally:
        server.stop()
    assert reading["ctrl_ts"].endswith("+09:00")
    assert abs(seconds_between(reading["ctrl_ts"], reading["ts"])) < 2
    # Read as UTC, Tokyo's wall clock is nine hours ahead.
    skew = seconds_between(wrong_zone["ctrl_ts"], wrong_zone["ts"])
    assert abs(skew - 9 * 3600) < 2


def test_ctrl_ts_date_read_again_at_midnight(tmp_path: Path) -> None:
    # The date is read at 23:59:59.9 and the time at 00:00:00.1, so the
    # first date belongs to the day before the time.
    before = datetime(2026, 12, 4, 23, 59, 59, 900000, tzinfo=UTC).timestamp()
    walls = iter([before, before + 0.2, before + 0.3])
    server = start_sim(wall_clock=lambda: next(walls), time_zone=UTC)
    try:
        config = make_config(
            tmp_path,
            server.url,
            poll={"commands": ["Q100"]},
            machine={"time_zone": "UTC"},
        )
        poller = make_poller(config)
        # Q100 of the prime runs before the clock queries and reads no clock.
        poller._ensure_open()
        reading = poller.poll_once()
    finally:
        server.stop()
    assert reading["ctrl_ts"] == "2026-12-05T00:00:00+00:00"


def test_controller_clock_can_be_turned_off(tmp_path: Path, sim: PtyServer) -> None:
    config = make_config(tmp_path, sim.url, poll={"controller_clock": False})
    poller = make_poller(config)
    sim.protocol.power_off()
    reading = poller.poll_once()
    assert reading["ctrl_ts"] is None
    assert set(reading["errors"]) == set(COMMANDS)


def test_controller_timestamp_rejects_invalid_values() -> None:
    assert (
        controller_timestamp(20261204.0, 235959.0, UTC) == "2026-12-04T23:59:59+00:00"
    )
    for date, clock in [
        (0.0, 120000.0),
        (20261304.0, 120000.0),
        (20261204.0, 246000.0),
        (20261204.5, 120000.0),
        (-20261204.0, 120000.0),
    ]:
        assert controller_timestamp(date, clock, UTC) is None, (date, clock)


@pytest.mark.parametrize(
    ("zone", "message"),
    [("Mars/Olympus", "unknown time zone"), ("../etc", "unknown time zone")],
)
def test_time_zone_config_rejected(tmp_path: Path, zone: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        make_config(tmp_path, "loop://", machine={"time_zone": zone})
    assert "machine.time_zone" in str(caught.value)


# -- host clock seam ---------------------------------------------------------------


def test_clock_seam_shifts_ts_and_sync(
    tmp_path: Path, sim: PtyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tmp_path / "clock.json"
    settings.write_bytes(orjson.dumps({"offset_s": -3600, "synced": False}))
    monkeypatch.setenv(TEST_CLOCK_ENV, str(settings))
    registry = CollectorRegistry()
    poller = make_poller(make_config(tmp_path, sim.url), registry)

    reading = poller.poll_once()
    poller.metrics.record_poll(reading, 0.01)
    now = datetime.now(UTC).isoformat()
    assert -3602 < seconds_between(reading["ts"], now) < -3598
    assert reading["clock_synced"] is False
    assert sample(registry, "cnc_edge_host_clock_synced") == 0
    # The controller clock is not shifted, so the skew shows the jump.
    assert 3598 < sample(registry, "cnc_edge_controller_clock_skew_seconds") < 3602
    first_mono = reading["mono"]

    # The file is read again every cycle.
    settings.write_bytes(orjson.dumps({"offset_s": 0, "synced": True}))
    reading = poller.poll_once()
    poller.metrics.record_poll(reading, 0.01)
    assert abs(seconds_between(reading["ts"], datetime.now(UTC).isoformat())) < 2
    assert reading["clock_synced"] is True
    assert sample(registry, "cnc_edge_host_clock_synced") == 1
    assert reading["mono"] > first_mono


def test_clock_seam_invalid_file_means_no_offset(
    tmp_path: Path, sim: PtyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tmp_path / "clock.json"
    settings.write_text("{not json")
    monkeypatch.setenv(TEST_CLOCK_ENV, str(settings))
    reading = make_poller(make_config(tmp_path, sim.url)).poll_once()
    assert abs(seconds_between(reading["ts"], datetime.now(UTC).isoformat())) < 2


# -- poller.last -------------------------------------------------------------------


class CheckingQueue:
    """A queue that records poller.last at the moment each reading is put."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.items: list[tuple[dict, dict | None]] = []

    def put(self, item: tuple[str, bytes]) -> None:
        self.items.append((decode(item[1]), read_last_poll(self.data_dir)))


def run_poller_cycles(config: EdgeConfig, cycles: int) -> tuple[Poller, CheckingQueue]:
    out = CheckingQueue(config.data_dir)
    stop = threading.Event()
    poller = Poller(
        config, out, stop, PollerMetrics("m1", registry=CollectorRegistry())
    )
    thread = threading.Thread(target=poller.run, args=(os.getppid(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(out.items) < cycles and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    return poller, out


def test_last_poll_written_before_queue(tmp_path: Path, sim: PtyServer) -> None:
    config = make_config(tmp_path, sim.url)
    poller, out = run_poller_cycles(config, 5)
    assert len(out.items) >= 5
    for reading, last in out.items:
        assert last is not None
        assert last["boot"] == reading["boot"]
        assert last["seq"] == reading["seq"]
        assert last["ts"] == reading["ts"]
        assert last["mono"] == reading["mono"]
        assert last["condition"] == reading["condition"]
    final = read_last_poll(config.data_dir)
    assert final["seq"] == poller.seq - 1
    path = config.data_dir / LAST_POLL_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_size == LAST_POLL_LINE_BYTES


def test_last_poll_of_previous_boot_kept(tmp_path: Path, sim: PtyServer) -> None:
    config = make_config(tmp_path, sim.url)
    first, _ = run_poller_cycles(config, 2)
    earlier = read_last_poll(config.data_dir)
    assert earlier["boot"] == first.boot
    # The next boot's buffer may read before or after its poller starts.
    assert read_previous_boot_poll(config.data_dir, "f" * 32) == earlier

    second, _ = run_poller_cycles(config, 2)
    assert read_last_poll(config.data_dir)["boot"] == second.boot
    assert read_last_poll(config.data_dir, PREVIOUS_POLL_FILE) == earlier
    assert read_previous_boot_poll(config.data_dir, second.boot) == earlier


def test_last_poll_empty_file_keeps_previous(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    boot = new_boot_id()
    record = {"boot": boot, "seq": 7, "ts": "2026-12-04T10:00:00.000000Z", "mono": 1.5}
    (data_dir / PREVIOUS_POLL_FILE).write_bytes(orjson.dumps(record))
    # A boot that died between creating poller.last and its first write.
    (data_dir / LAST_POLL_FILE).write_bytes(b"")
    LastPollFile(data_dir).close()
    assert read_last_poll(data_dir, PREVIOUS_POLL_FILE) == record
    assert read_previous_boot_poll(data_dir, new_boot_id()) == record


def test_last_poll_refuses_symlink(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (data_dir / LAST_POLL_FILE).symlink_to(target)
    with pytest.raises(OSError):
        LastPollFile(data_dir)
    assert target.read_text() == "keep"
    assert read_last_poll(data_dir) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"boot": "b", "seq": "1", "ts": "t", "mono": 1.0}',
        b'{"boot": "b", "seq": true, "ts": "t", "mono": 1.0}',
        b'{"boot": "b", "seq": 1, "ts": "t"}',
    ],
)
def test_read_last_poll_invalid_is_none(tmp_path: Path, content: bytes) -> None:
    (tmp_path / LAST_POLL_FILE).write_bytes(content)
    assert read_last_poll(tmp_path) is None


# -- reading layout ----------------------------------------------------------------


def old_reading() -> dict:
    """A reading as the previous version journaled it, without the new keys."""
    boot = new_boot_id()
    return {
        "v": 1,
        "id": f"{boot}-3",
        "machine": "m1",
        "boot": boot,
        "seq": 3,
        "ts": "2026-12-04T10:00:00.000000Z",
        "mono": 12.5,
        "status": "ok",
        "fields": {"mode": "MEM"},
        "errors": {},
    }


def test_old_format_reading_still_valid() -> None:
    reading = old_reading()
    assert decode(encode(reading)) == reading


def test_make_reading_defaults_are_backend_assumptions() -> None:
    reading = make_reading(
        machine="m1",
        boot=new_boot_id(),
        seq=0,
        ts="2026-12-04T10:00:00Z",
        mono=1.0,
        fields={},
        errors={},
    )
    assert reading["condition"] == "ok"
    assert reading["clock_synced"] is True
    assert reading["ctrl_ts"] is None
    assert reading["host_boot"] == ""
    assert validate(reading) is reading


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("condition", "asleep"),
        ("condition", 1),
        ("clock_synced", "yes"),
        ("clock_synced", 1),
        ("ctrl_ts", "2026-12-04T10:00:00"),
        ("ctrl_ts", "yesterday"),
        ("ctrl_ts", 1733300000),
        ("host_boot", None),
    ],
)
def test_new_keys_checked_when_present(key: str, value: Any) -> None:
    reading = {**old_reading(), key: value}
    with pytest.raises(InvalidReading):
        validate(reading)
