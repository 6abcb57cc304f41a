"""Machine model, protocol engine and command line of the Haas simulator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
import serial

from cnc_edge.errors import SerialLinkError
from cnc_edge.haas import HaasClient, extract_frame, parse_answer
from cnc_edge.simulator import (
    Fault,
    HaasProtocol,
    MachineModel,
    MachineState,
    format_duration,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_machine(clock: FakeClock, **options) -> MachineModel:
    options.setdefault("alarm_probability", 0.0)
    options.setdefault("feed_hold_probability", 0.0)
    return MachineModel(seed=3, cycle_seconds=60.0, clock=clock, **options)


def field(machine: MachineModel, command: str) -> dict:
    return parse_answer(command, machine.answer(command))


def run_until(machine: MachineModel, clock: FakeClock, state: MachineState) -> None:
    for _ in range(10_000):
        machine.advance()
        if machine.state is state:
            return
        clock.now += 1.0
    raise AssertionError(f"machine never reached {state}")


# -- machine model ------------------------------------------------------------


def test_machine_same_seed_same_answers():
    answers = []
    for _ in range(2):
        clock = FakeClock()
        machine = MachineModel(seed=11, cycle_seconds=30.0, clock=clock)
        run = []
        for _ in range(200):
            clock.now += 3.0
            run.append([machine.answer(c) for c in ("Q100", "Q200", "Q500")])
        answers.append(run)
    assert answers[0] == answers[1]


def test_machine_cycle_counts_part_and_tools():
    clock = FakeClock()
    machine = make_machine(clock)
    run_until(machine, clock, MachineState.RUNNING)
    parts = field(machine, "Q402")["m30_parts"]
    tool_changes = field(machine, "Q200")["tool_changes"]
    assert field(machine, "Q500") == {"execution": "BUSY"}
    assert field(machine, "Q104") == {"mode": "MEM"}

    run_until(machine, clock, MachineState.IDLE)
    assert field(machine, "Q402")["m30_parts"] == parts + 1
    assert field(machine, "Q200")["tool_changes"] == tool_changes + 3
    q500 = field(machine, "Q500")
    assert q500["execution"] == "IDLE"
    assert q500["parts"] == parts + 1
    assert q500["program"] == "O00110"
    assert 59 <= field(machine, "Q303")["last_cycle_seconds"] <= 61


def test_machine_timers_follow_pace():
    clock = FakeClock()
    machine = make_machine(clock, pace=6.0)
    power_on = field(machine, "Q300")["power_on_seconds"]
    clock.now += 10.0
    assert field(machine, "Q300")["power_on_seconds"] == power_on + 60


def test_machine_motion_time_only_while_running():
    clock = FakeClock()
    machine = make_machine(clock)
    run_until(machine, clock, MachineState.RUNNING)
    motion = field(machine, "Q301")["motion_seconds"]
    clock.now += 20.0
    assert field(machine, "Q301")["motion_seconds"] == motion + 20
    run_until(machine, clock, MachineState.IDLE)
    motion = field(machine, "Q301")["motion_seconds"]
    clock.now += 5.0
    assert field(machine, "Q301")["motion_seconds"] == motion


def test_machine_alarm_raised_and_cleared():
    clock = FakeClock()
    machine = make_machine(clock, alarm_probability=1.0)
    parts = field(machine, "Q402")["m30_parts"]
    run_until(machine, clock, MachineState.ALARM)
    q500 = field(machine, "Q500")
    assert q500["execution"] == "ALARM ON"
    assert q500["program"] == "MDI"
    assert field(machine, "Q104") == {"mode": "MDI"}
    run_until(machine, clock, MachineState.IDLE)
    # The alarm aborted the cycle, so no part was counted.
    assert field(machine, "Q402")["m30_parts"] == parts


def test_machine_feed_hold():
    clock = FakeClock()
    machine = make_machine(clock, feed_hold_probability=1.0)
    run_until(machine, clock, MachineState.FEED_HOLD)
    assert field(machine, "Q500")["execution"] == "FEED HOLD"


def test_machine_macros():
    clock = FakeClock()
    machine = make_machine(clock)
    assert field(machine, "Q600 3027") == {"macros": {"3027": 0.0}}
    run_until(machine, clock, MachineState.RUNNING)
    assert field(machine, "Q600 3027")["macros"]["3027"] > 0
    first = field(machine, "Q600 5041")["macros"]["5041"]
    clock.now += 2.0
    assert field(machine, "Q600 5041")["macros"]["5041"] != first
    assert field(machine, "Q600 100") == {"macros": {"100": 0.0}}


def test_machine_clock_macros_with_skew():
    # 2026-12-04 23:59:30 UTC, shown with a 45 s skew in UTC+09:00.
    wall = datetime(2026, 12, 4, 23, 59, 30, tzinfo=UTC).timestamp()
    machine = make_machine(
        FakeClock(),
        wall_clock=lambda: wall,
        clock_skew=45.0,
        time_zone=timezone(timedelta(hours=9)),
    )
    assert field(machine, "Q600 3011") == {"macros": {"3011": 20261205.0}}
    assert field(machine, "Q600 3012") == {"macros": {"3012": 90015.0}}


def test_machine_unsupported_command_is_unknown():
    machine = make_machine(FakeClock(), unsupported_commands={"Q303"})
    assert machine.answer("Q303") == "UNKNOWN"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "00000:00:00"),
        (100259, "00027:50:59"),
        (1_000_000 * 3600 + 1, "1000000:00:01"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# -- protocol engine ----------------------------------------------------------


def make_protocol(**options) -> HaasProtocol:
    return HaasProtocol(make_machine(FakeClock()), seed=5, **options)


def reply_bytes(protocol: HaasProtocol, data: bytes) -> bytes:
    replies = protocol.receive(data)
    return b"".join(chunk for reply in replies for _, chunk in reply.chunks)


def test_protocol_real_framing():
    protocol = make_protocol()
    data = reply_bytes(protocol, b"?Q102\r\n")
    assert data == b"\x02MODEL, " + protocol.machine.model.encode() + b"\x17\r\n>"


def test_protocol_query_split_across_reads():
    protocol = make_protocol()
    assert protocol.receive(b"?Q1") == []
    assert protocol.receive(b"04") == []
    data = reply_bytes(protocol, b"\r\n")
    assert extract_frame(bytearray(data)) == "MODE, (MEM)"


def test_protocol_two_queries_in_one_read():
    replies = make_protocol().receive(b"?Q100\r\n?Q104\n")
    assert len(replies) == 2


def test_protocol_dc_codes_framing():
    data = reply_bytes(make_protocol(dc_codes=True), b"?Q104\r\n")
    assert data == b"\x12\x02MODE, (MEM)\x17\r\n\x14>"


def test_protocol_xon_xoff_sprinkled():
    data = reply_bytes(make_protocol(xon_xoff=True), b"?Q104\r\n")
    assert set(data) & {0x11, 0x13}
    assert extract_frame(bytearray(data)) == "MODE, (MEM)"


@pytest.mark.parametrize("line", [b"?Q999\r\n", b"Q100\r\n", b"?hello\r\n"])
def test_protocol_unknown_query(line):
    assert reply_bytes(make_protocol(), line) == b"\x02UNKNOWN\x17\r\n>"


def test_protocol_ignore_first_query_per_connection():
    protocol = make_protocol(ignore_first_query=True)
    assert reply_bytes(protocol, b"?Q100\r\n") == b""
    assert reply_bytes(protocol, b"?Q100\r\n") != b""
    protocol.connection_made()
    assert reply_bytes(protocol, b"?Q100\r\n") == b""


def test_protocol_fault_count_then_normal():
    protocol = make_protocol()
    protocol.inject("ignore", count=2)
    assert reply_bytes(protocol, b"?Q100\r\n") == b""
    assert reply_bytes(protocol, b"?Q100\r\n") == b""
    assert reply_bytes(protocol, b"?Q100\r\n") != b""


def test_protocol_faults_apply_in_order():
    protocol = make_protocol()
    protocol.inject(Fault.IGNORE)
    protocol.inject(Fault.DISCONNECT)
    assert protocol.receive(b"?Q100\r\n")[0].chunks == []
    assert protocol.receive(b"?Q100\r\n")[0].disconnect
    assert not protocol.receive(b"?Q100\r\n")[0].disconnect


def test_protocol_fault_limited_to_command():
    protocol = make_protocol()
    protocol.inject("ignore", count=2, command="q500")
    assert reply_bytes(protocol, b"?Q100\r\n") != b""
    assert reply_bytes(protocol, b"?Q500\r\n") == b""
    assert reply_bytes(protocol, b"?Q104\r\n") != b""
    assert reply_bytes(protocol, b"?Q500\r\n") == b""
    assert reply_bytes(protocol, b"?Q500\r\n") != b""


def test_protocol_power_off_until_power_on():
    protocol = make_protocol()
    protocol.inject("power_off")
    assert protocol.powered_off
    for line in (b"?Q100\r\n", b"?Q500\r\n", b"?Q600 3011\r\n", b"?X\r\n"):
        replies = protocol.receive(line)
        assert len(replies) == 1
        assert replies[0].chunks == []
        assert not replies[0].disconnect
    protocol.power_on()
    assert reply_bytes(protocol, b"?Q100\r\n").startswith(b"\x02SERIAL NUMBER")


def test_protocol_power_off_ends_after_seconds():
    protocol = make_protocol()
    protocol.inject("power_off", seconds=0.2)
    assert reply_bytes(protocol, b"?Q100\r\n") == b""
    time.sleep(0.3)
    assert not protocol.powered_off
    assert reply_bytes(protocol, b"?Q100\r\n") != b""


def test_protocol_clear_faults_powers_on():
    protocol = make_protocol()
    protocol.inject("power_off")
    protocol.inject("ignore", count=5)
    protocol.clear_faults()
    assert reply_bytes(protocol, b"?Q100\r\n") != b""


def test_protocol_trickle_spreads_bytes():
    protocol = make_protocol()
    protocol.inject("trickle", seconds=2.0)
    (reply,) = protocol.receive(b"?Q104\r\n")
    assert all(len(chunk) == 1 for _, chunk in reply.chunks)
    assert sum(delay for delay, _ in reply.chunks) == pytest.approx(2.0)
    assert b"".join(chunk for _, chunk in reply.chunks) == b"\x02MODE, (MEM)\x17\r\n>"


def test_protocol_garble_has_invalid_byte():
    protocol = make_protocol()
    protocol.inject("garble", count=20)
    for _ in range(20):
        data = reply_bytes(protocol, b"?Q100\r\n")
        text = data[1 : data.index(b"\x17")]
        assert any(not 0x20 <= byte <= 0x7E for byte in text)


def test_protocol_truncate_has_no_etb():
    protocol = make_protocol()
    protocol.inject("truncate")
    data = reply_bytes(protocol, b"?Q100\r\n")
    assert data.startswith(b"\x02")
    assert b"\x17" not in data
    assert data.endswith(b"\r\n>")


def test_protocol_half_then_silence():
    protocol = make_protocol()
    full = reply_bytes(protocol, b"?Q100\r\n")
    protocol.inject("half_then_silence")
    assert reply_bytes(protocol, b"?Q100\r\n") == full[: len(full) // 2]


def test_protocol_stale_echo_uses_previous_variable():
    protocol = make_protocol()
    reply_bytes(protocol, b"?Q600 5041\r\n")
    protocol.inject("stale_echo")
    text = extract_frame(bytearray(reply_bytes(protocol, b"?Q600 5042\r\n")))
    assert text.startswith("MACRO, 5041, ")


def test_protocol_stale_echo_without_history():
    protocol = make_protocol()
    protocol.inject("stale_echo", count=2)
    macro = extract_frame(bytearray(reply_bytes(protocol, b"?Q600 3027\r\n")))
    assert not macro.startswith("MACRO, 3027,")
    other = extract_frame(bytearray(reply_bytes(protocol, b"?Q100\r\n")))
    assert not other.startswith("SERIAL NUMBER")


def test_protocol_noise_is_strippable():
    protocol = make_protocol()
    protocol.inject("noise", count=10)
    for _ in range(10):
        assert extract_frame(bytearray(reply_bytes(protocol, b"?Q104\r\n"))) == (
            "MODE, (MEM)"
        )


def test_protocol_fault_rate_draws_faults():
    protocol = make_protocol(fault_rate=1.0)
    good = b"\x02MODE, (MEM)\x17\r\n>"
    for _ in range(30):
        (reply,) = protocol.receive(b"?Q104\r\n")
        assert reply.chunks != [(0.0, good)]


def test_protocol_overlong_line_discarded():
    protocol = make_protocol()
    assert protocol.receive(b"?" + b"Q" * 200) == []
    assert reply_bytes(protocol, b"\r\n?Q104\r\n").startswith(b"\x02MODE")


@pytest.mark.parametrize(
    ("fault", "count", "options", "message"),
    [
        ("melt", 1, {}, "melt"),
        ("trickle", 0, {}, "at least 1"),
        ("trickle", 1, {"speed": 3}, "unknown fault options"),
        ("trickle", 1, {"seconds": -1}, "must not be negative"),
        ("ignore", 1, {"command": "Q999"}, "unsupported Haas query"),
    ],
)
def test_protocol_inject_rejects(fault, count, options, message):
    with pytest.raises(ValueError, match=message):
        make_protocol().inject(fault, count, **options)


# -- command line -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "cnc_edge.simulator", "--seed", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().strip()
    if not line:
        process.kill()
        raise AssertionError(f"cnc-sim printed nothing: {process.stderr.read()}")
    return process, line


def stop_cli(process: subprocess.Popen, signum: int) -> int:
    process.send_signal(signum)
    try:
        return process.wait(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.timeout(30)
def test_cli_tcp_with_control_port():
    control_port = free_port()
    process, url = start_cli("--tcp", "0", "--control-port", str(control_port))
    try:
        assert url.startswith("socket://127.0.0.1:")
        with serial.serial_for_url(url, timeout=1.0) as port:
            client = HaasClient(port, query_timeout=0.5)
            assert client.query("Q100")["serial_number"]

            with socket.create_connection(("127.0.0.1", control_port)) as control:
                reader = control.makefile("r")
                control.sendall(b"fault ignore 1\n")
                assert reader.readline().strip() == "ok"
                control.sendall(b"url\n")
                assert reader.readline().strip() == f"ok {url}"
                control.sendall(b"fault melt\n")
                assert reader.readline().startswith("error: ")
            assert client.poll(["Q100"]).errors == {"Q100": "timeout"}
            assert client.query("Q100")["serial_number"]
    finally:
        assert stop_cli(process, signal.SIGTERM) == 0


@pytest.mark.timeout(30)
def test_cli_pty_prints_device():
    process, path = start_cli("--pty", "--dc-codes", "--pace", "10")
    try:
        assert os.path.exists(path)
        with serial.serial_for_url(path, timeout=1.0) as port:
            assert HaasClient(port, query_timeout=0.5).query("Q104")["mode"]
    finally:
        assert stop_cli(process, signal.SIGINT) == 0


@pytest.mark.timeout(30)
def test_cli_pty_reopens_after_disconnect(tmp_path):
    link = str(tmp_path / "haas")
    control_port = free_port()
    process, path = start_cli(
        "--pty",
        "--link",
        link,
        "--reopen-seconds",
        "0.2",
        "--control-port",
        str(control_port),
    )
    try:
        assert path == link
        with socket.create_connection(("127.0.0.1", control_port)) as control:
            control.sendall(b"fault disconnect\n")
            assert control.makefile("r").readline().strip() == "ok"
        with serial.serial_for_url(link, timeout=1.0) as port:
            client = HaasClient(port, query_timeout=0.5)
            with pytest.raises(SerialLinkError):
                client.query("Q100")
        time.sleep(0.5)
        with serial.serial_for_url(link, timeout=1.0) as port:
            assert HaasClient(port, query_timeout=0.5).query("Q100")["serial_number"]
    finally:
        assert stop_cli(process, signal.SIGTERM) == 0
