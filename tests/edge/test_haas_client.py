"""HaasClient against the simulator on a real pty and over socket://."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import serial

from cnc_edge.errors import (
    AnswerTimeout,
    GarbledAnswer,
    PartialAnswer,
    SerialLinkError,
    StaleAnswer,
)
from cnc_edge.haas import DEFAULT_COMMANDS, HaasClient, PollResult
from cnc_edge.simulator import HaasProtocol, MachineModel, PtyServer, TcpServer

DEADLINE = 0.5
# Loose bound on how far past its deadline a query may return on a loaded host.
MARGIN = 1.0

ALL_FIELDS = {
    "serial_number": str,
    "software_version": str,
    "model": str,
    "mode": str,
    "tool_changes": int,
    "tool_in_use": int,
    "power_on_seconds": int,
    "motion_seconds": int,
    "last_cycle_seconds": int,
    "m30_parts": int,
    "execution": str,
}
ALL_COMMANDS = [*DEFAULT_COMMANDS, "Q101", "Q102", "Q600 5041", "Q600 3027"]


def make_protocol(**options) -> HaasProtocol:
    unsupported = options.pop("unsupported_commands", ())
    machine = MachineModel(seed=7, unsupported_commands=unsupported)
    return HaasProtocol(machine, seed=7, **options)


@pytest.fixture
def pty_sim() -> Iterator[PtyServer]:
    with PtyServer(make_protocol()) as sim:
        yield sim


@pytest.fixture
def client(pty_sim: PtyServer) -> Iterator[HaasClient]:
    port = serial.serial_for_url(pty_sim.url, timeout=1.0)
    try:
        yield HaasClient(port, query_timeout=DEADLINE)
    finally:
        port.close()


def timed_poll(client: HaasClient, commands: list[str]) -> tuple[PollResult, float]:
    started = time.monotonic()
    result = client.poll(commands)
    return result, time.monotonic() - started


def assert_all_fields(result: PollResult) -> None:
    assert result.errors == {}
    for name, kind in ALL_FIELDS.items():
        assert type(result.fields[name]) is kind, name
    assert set(result.fields["macros"]) == {"5041", "3027"}
    if result.fields["execution"] != "BUSY":
        assert type(result.fields["parts"]) is int
        assert type(result.fields["program"]) is str


@pytest.mark.timeout(30)
def test_poll_pty_returns_all_fields(client):
    result = client.poll(ALL_COMMANDS)
    assert_all_fields(result)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "options",
    [{"dc_codes": True}, {"xon_xoff": True}, {"dc_codes": True, "xon_xoff": True}],
    ids=["dc-codes", "xon-xoff", "both"],
)
def test_poll_pty_with_flow_control(options):
    with PtyServer(make_protocol(**options)) as sim:
        with serial.serial_for_url(sim.url, timeout=1.0) as port:
            result = HaasClient(port, query_timeout=DEADLINE).poll(ALL_COMMANDS)
    assert_all_fields(result)


@pytest.mark.timeout(30)
def test_poll_tcp_returns_all_fields():
    with TcpServer(make_protocol()) as sim:
        assert sim.url.startswith("socket://127.0.0.1:")
        with serial.serial_for_url(sim.url, timeout=1.0) as port:
            result = HaasClient(port, query_timeout=DEADLINE).poll(ALL_COMMANDS)
    assert_all_fields(result)


@pytest.mark.timeout(30)
def test_poll_keeps_other_fields_on_failure(pty_sim, client):
    pty_sim.inject("garble")
    result = client.poll(["Q200", "Q201"])
    assert result.errors == {"Q200": "garbled"}
    assert "tool_changes" not in result.fields
    assert type(result.fields["tool_in_use"]) is int


@pytest.mark.timeout(30)
def test_poll_merges_macros(client):
    result = client.poll(["Q600 5041", "Q600 5042", "Q600 5043"])
    assert result.errors == {}
    assert set(result.fields["macros"]) == {"5041", "5042", "5043"}


@pytest.mark.timeout(30)
def test_poll_lists_sent_and_silent_commands(pty_sim, client):
    pty_sim.inject("ignore", command="Q200")
    pty_sim.inject("half_then_silence", command="Q201")
    result = client.poll(["Q100", "Q200", "Q201"])
    assert result.errors == {"Q200": "timeout", "Q201": "partial"}
    assert result.sent == ["Q100", "Q200", "Q201"]
    # A partial answer shows that the controller is powered; silence does not.
    assert result.silent == ["Q200"]


@pytest.mark.timeout(30)
def test_poll_every_command_silent_when_powered_off(pty_sim, client):
    pty_sim.protocol.power_off()
    result = client.poll(["Q100", "Q500"])
    assert result.silent == ["Q100", "Q500"]
    assert client.received_bytes == 0
    pty_sim.protocol.power_on()
    assert client.poll(["Q100"]).silent == []


@pytest.mark.timeout(30)
def test_half_frame_then_silence_is_partial(pty_sim, client):
    pty_sim.inject("half_then_silence")
    result, elapsed = timed_poll(client, ["Q100"])
    assert result.errors == {"Q100": "partial"}
    assert result.fields == {}
    assert DEADLINE <= elapsed < DEADLINE + MARGIN
    assert client.query("Q100")["serial_number"]


@pytest.mark.timeout(30)
def test_half_frame_raises_partial_answer(pty_sim, client):
    pty_sim.inject("half_then_silence")
    with pytest.raises(PartialAnswer):
        client.query("Q500")


@pytest.mark.timeout(30)
def test_trickle_beyond_deadline_fails_in_time(pty_sim, client):
    # Spread over 4 deadlines: a deadline reset per byte would wait for it all.
    pty_sim.inject("trickle", seconds=4 * DEADLINE)
    result, elapsed = timed_poll(client, ["Q100"])
    assert result.errors["Q100"] in ("timeout", "partial")
    assert "serial_number" not in result.fields
    assert elapsed < DEADLINE + MARGIN
    assert client.query("Q100")["serial_number"]


@pytest.mark.timeout(30)
def test_trickle_within_deadline_succeeds(pty_sim):
    with serial.serial_for_url(pty_sim.url, timeout=1.0) as port:
        client = HaasClient(port, query_timeout=2.0)
        pty_sim.inject("trickle", count=2, seconds=0.5)
        result, elapsed = timed_poll(client, ["Q100", "Q500"])
    assert result.errors == {}
    assert result.fields["serial_number"]
    assert result.fields["execution"]
    assert elapsed >= 0.8  # proves both answers really trickled


@pytest.mark.timeout(30)
def test_ignored_first_query_then_ok():
    with PtyServer(make_protocol(ignore_first_query=True)) as sim:
        with serial.serial_for_url(sim.url, timeout=1.0) as port:
            client = HaasClient(port, query_timeout=DEADLINE)
            assert client.prime() is False
            assert client.prime() is True
            assert client.query("Q102")["model"]


@pytest.mark.timeout(30)
def test_ignored_query_is_timeout(pty_sim, client):
    pty_sim.inject("ignore")
    started = time.monotonic()
    with pytest.raises(AnswerTimeout):
        client.query("Q104")
    assert time.monotonic() - started < DEADLINE + MARGIN
    assert client.query("Q104")["mode"] == "MEM"


@pytest.mark.timeout(30)
def test_stale_echo_rejected(pty_sim, client):
    assert "5041" in client.query("Q600 5041")["macros"]
    pty_sim.inject("stale_echo")
    result = client.poll(["Q600 5042"])
    assert result.errors == {"Q600 5042": "stale_echo"}
    assert "macros" not in result.fields
    assert client.query("Q600 5042")["macros"].keys() == {"5042"}


@pytest.mark.timeout(30)
def test_stale_answer_of_other_command_rejected(pty_sim, client):
    client.query("Q200")
    pty_sim.inject("stale_echo")
    with pytest.raises(StaleAnswer):
        client.query("Q201")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["garble", "truncate"])
def test_damaged_answer_is_garbled(pty_sim, client, fault):
    pty_sim.inject(fault)
    result, elapsed = timed_poll(client, ["Q300"])
    assert result.errors == {"Q300": "garbled"}
    assert result.fields == {}
    # Bad bytes are detected on arrival, without waiting for the deadline.
    assert elapsed < DEADLINE
    assert client.query("Q300")["power_on_seconds"] > 0


@pytest.mark.timeout(30)
def test_noise_is_stripped(pty_sim, client):
    pty_sim.inject("noise", count=3)
    result = client.poll(["Q100", "Q200", "Q600 5041"])
    assert result.errors == {}
    assert len(result.fields) == 3


@pytest.mark.timeout(30)
def test_unknown_command_reported():
    with PtyServer(make_protocol(unsupported_commands={"Q402"})) as sim:
        with serial.serial_for_url(sim.url, timeout=1.0) as port:
            result = HaasClient(port, query_timeout=DEADLINE).poll(["Q402", "Q100"])
    assert result.errors == {"Q402": "unknown_command"}
    assert "m30_parts" not in result.fields
    assert "serial_number" in result.fields


@pytest.mark.timeout(30)
def test_pty_disconnect_raises_link_error(pty_sim, client):
    old_path = pty_sim.url
    pty_sim.inject("disconnect")
    with pytest.raises(SerialLinkError) as caught:
        client.poll(["Q100", "Q104"])
    assert caught.value.port == old_path

    new_path = pty_sim.reconnect()
    with serial.serial_for_url(new_path, timeout=1.0) as port:
        assert HaasClient(port, query_timeout=DEADLINE).query("Q100")["serial_number"]


@pytest.mark.timeout(30)
def test_pty_link_follows_reconnect(tmp_path):
    link = str(tmp_path / "haas")
    with PtyServer(make_protocol(), link=link) as sim:
        old_port = serial.serial_for_url(link, timeout=1.0)
        new_path = sim.reconnect()
        assert os.path.realpath(link) == new_path
        # The port opened before the reconnect belongs to the closed pty.
        with pytest.raises(SerialLinkError):
            HaasClient(old_port, query_timeout=DEADLINE).query("Q102")
        old_port.close()
        with serial.serial_for_url(link, timeout=1.0) as port:
            assert HaasClient(port, query_timeout=DEADLINE).query("Q102")["model"]


@pytest.mark.timeout(30)
def test_tcp_disconnect_then_reconnect():
    with TcpServer(make_protocol()) as sim:
        port = serial.serial_for_url(sim.url, timeout=1.0)
        client = HaasClient(port, query_timeout=DEADLINE)
        assert client.query("Q100")
        sim.inject("disconnect")
        with pytest.raises(SerialLinkError):
            client.query("Q100")
        port.close()
        with serial.serial_for_url(sim.url, timeout=1.0) as port:
            assert HaasClient(port, query_timeout=DEADLINE).query("Q100")


@pytest.mark.timeout(30)
def test_query_restores_port_timeout(client):
    port = client._port
    client.query("Q100")
    assert port.timeout == 1.0


# -- scripted port: stale frames arriving after the input reset -------------------


class ScriptedPort:
    """A pyserial-like port that hands out scripted chunks after each write."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.port = "scripted"
        self.timeout: float | None = 1.0
        self.written = bytearray()
        self._script = chunks
        self._input = bytearray()
        self._error = error

    @property
    def in_waiting(self) -> int:
        return len(self._input)

    def reset_input_buffer(self) -> None:
        self._input.clear()

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self.written += data
        for chunk in self._script:
            self._input += chunk
        return len(data)

    def flush(self) -> None:
        pass

    def read(self, size: int = 1) -> bytes:
        if not self._input:
            time.sleep(min(self.timeout or 0.0, 0.05))
            return b""
        data = bytes(self._input[:size])
        del self._input[:size]
        return data


def test_late_stale_frame_skipped_for_right_one():
    port = ScriptedPort(
        [b"\x02MACRO, 5041, 1.0\x17\r\n>", b"\x02MACRO, 5042, 2.5\x17\r\n>"]
    )
    fields = HaasClient(port, query_timeout=DEADLINE).query("Q600 5042")
    assert fields == {"macros": {"5042": 2.5}}
    assert port.written == b"?Q600 5042\r\n"


def test_only_stale_frame_is_stale_echo():
    port = ScriptedPort([b"\x02TOOL CHANGES, 23\x17\r\n>"])
    result = HaasClient(port, query_timeout=0.2).poll(["Q201"])
    assert result.errors == {"Q201": "stale_echo"}
    assert result.fields == {}


def test_garbled_frame_in_scripted_port():
    port = ScriptedPort([b"\x02USING TOOL, \xff\x17\r\n>"])
    with pytest.raises(GarbledAnswer):
        HaasClient(port, query_timeout=0.2).query("Q201")


def test_deadline_uses_injected_clock():
    # The clock jumps past the deadline on its second reading, so the query
    # ends after one read although the port would wait much longer.
    readings = iter([0.0, 100.0, 100.0, 100.0])
    port = ScriptedPort([])
    client = HaasClient(port, query_timeout=5.0, clock=lambda: next(readings))
    started = time.monotonic()
    with pytest.raises(AnswerTimeout):
        client.query("Q100")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "error",
    [serial.SerialException("port gone"), OSError(5, "Input/output error")],
    ids=["serial-exception", "os-error"],
)
def test_port_errors_become_link_error(error):
    port = ScriptedPort([], error=error)
    with pytest.raises(SerialLinkError, match="scripted"):
        HaasClient(port, query_timeout=DEADLINE).poll(["Q100"])


def test_unsupported_command_raises_value_error():
    client = HaasClient(ScriptedPort([]), query_timeout=DEADLINE)
    with pytest.raises(ValueError, match="unsupported"):
        client.query("Q999")


def test_query_timeout_must_be_positive():
    with pytest.raises(ValueError, match="query_timeout"):
        HaasClient(ScriptedPort([]), query_timeout=0)
