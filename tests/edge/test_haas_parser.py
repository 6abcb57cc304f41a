"""Frame and answer parsing of the Haas dialect, without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnc_edge.errors import (
    AnswerError,
    GarbledAnswer,
    StaleAnswer,
    UnknownCommandAnswer,
)
from cnc_edge.haas import (
    DEFAULT_COMMANDS,
    MAX_FRAME_LENGTH,
    extract_frame,
    parse_answer,
    parse_duration,
    strip_flow_control,
    validate_command,
)

STX, ETB, DC2, DC4, XON, XOFF = b"\x02", b"\x17", b"\x12", b"\x14", b"\x11", b"\x13"


def frame(text: str) -> bytes:
    return STX + text.encode("ascii") + ETB + b"\r\n>"


# -- commands -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("Q100", "Q100"),
        ("q500", "Q500"),
        ("  Q104 ", "Q104"),
        ("Q600 5041", "Q600 5041"),
        ("Q600   0042", "Q600 42"),
    ],
)
def test_validate_command_accepts(command, expected):
    assert validate_command(command) == expected


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("Q999", "unsupported"),
        ("?Q100", "without the leading '?'"),
        ("Q600", "needs a macro variable"),
        ("Q600 0", "between 1 and"),
        ("Q600 x", "invalid Haas query"),
        ("Q500 1", "takes no argument"),
        ("", "invalid Haas query"),
        ("M30", "invalid Haas query"),
    ],
)
def test_validate_command_rejects(command, message):
    with pytest.raises(ValueError, match=message):
        validate_command(command)


def test_default_commands_are_valid():
    for command in DEFAULT_COMMANDS:
        assert validate_command(command) == command


# -- frames -------------------------------------------------------------------


def test_extract_frame_returns_text_and_keeps_trailer():
    buffer = bytearray(frame("MODE, (MEM)"))
    assert extract_frame(buffer) == "MODE, (MEM)"
    assert buffer == b"\r\n>"


def test_extract_frame_skips_noise_before_stx():
    buffer = bytearray(b"\r\n>garbage\xff\x00" + frame("USING TOOL, 4"))
    assert extract_frame(buffer) == "USING TOOL, 4"


def test_extract_frame_noise_only_clears_buffer():
    buffer = bytearray(b"\r\n>\x17junk\xff")
    assert extract_frame(buffer) is None
    assert buffer == b""


def test_extract_frame_strips_dc_codes():
    buffer = bytearray(DC2 + frame("MODEL, VF2D") + DC4)
    assert extract_frame(buffer) == "MODEL, VF2D"


@pytest.mark.parametrize("code", [DC2, DC4, XON, XOFF])
def test_extract_frame_strips_flow_control_anywhere(code):
    raw = frame("SERIAL NUMBER, 1234567")
    for position in range(len(raw) + 1):
        buffer = bytearray(raw[:position] + code + code + raw[position:])
        assert extract_frame(buffer) == "SERIAL NUMBER, 1234567", position


def test_strip_flow_control_keeps_other_bytes():
    assert strip_flow_control(b"\x11a\x12b\x13c\x14d\x02") == b"abcd\x02"


def test_extract_frame_incomplete_then_complete():
    raw = frame("TOOL CHANGES, 23")
    buffer = bytearray()
    for byte in raw[: raw.index(ETB)]:
        buffer.append(byte)
        assert extract_frame(buffer) is None
    buffer += raw[raw.index(ETB) :]
    assert extract_frame(buffer) == "TOOL CHANGES, 23"


def test_extract_frame_two_frames_in_order():
    buffer = bytearray(frame("MODE, (MEM)") + frame("USING TOOL, 4"))
    assert extract_frame(buffer) == "MODE, (MEM)"
    assert extract_frame(buffer) == "USING TOOL, 4"
    assert extract_frame(buffer) is None


def test_extract_frame_cut_frame_superseded_by_next():
    buffer = bytearray(STX + b"SERIAL NUM" + frame("MODE, (MEM)"))
    assert extract_frame(buffer) == "MODE, (MEM)"


def test_extract_frame_empty_text():
    assert extract_frame(bytearray(STX + ETB)) == ""


@pytest.mark.parametrize("bad", [b"\x00", b"\x80", b"\xff", b"\x7f", b"\t"])
def test_extract_frame_rejects_invalid_byte(bad):
    buffer = bytearray(STX + b"MODE, " + bad + b"(MEM)" + ETB + b"\r\n>")
    with pytest.raises(GarbledAnswer, match="invalid byte"):
        extract_frame(buffer)
    # The rest of the bad frame is noise: no value comes out of it.
    assert extract_frame(buffer) is None


def test_extract_frame_rejects_invalid_byte_before_etb_arrives():
    # A truncated answer followed by the prompt: fail now, not at the deadline.
    buffer = bytearray(STX + b"SERIAL NUM\r\n>")
    with pytest.raises(GarbledAnswer):
        extract_frame(buffer)


def test_extract_frame_garbled_then_good_frame():
    buffer = bytearray(STX + b"MO\x00DE" + ETB + frame("MODE, (JOG)"))
    with pytest.raises(GarbledAnswer):
        extract_frame(buffer)
    assert extract_frame(buffer) == "MODE, (JOG)"


def test_extract_frame_accepts_max_length():
    text = "A" * MAX_FRAME_LENGTH
    assert extract_frame(bytearray(frame(text))) == text


def test_extract_frame_rejects_overlong_complete_frame():
    buffer = bytearray(frame("A" * (MAX_FRAME_LENGTH + 1)))
    with pytest.raises(GarbledAnswer, match="longer than"):
        extract_frame(buffer)


def test_extract_frame_overlong_stream_bounded():
    buffer = bytearray(STX)
    errors = 0
    for _ in range(100):
        buffer += b"A" * 100
        try:
            assert extract_frame(buffer) is None
        except GarbledAnswer:
            errors += 1
        assert len(buffer) <= MAX_FRAME_LENGTH + 1
    assert errors == 1
    buffer += ETB + frame("MODE, (MEM)")
    assert extract_frame(buffer) == "MODE, (MEM)"


# -- answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("Q100", "SERIAL NUMBER, 1234567", {"serial_number": "1234567"}),
        (
            "Q101",
            "SOFTWARE VERSION, 100.20.000.1110",
            {"software_version": "100.20.000.1110"},
        ),
        ("Q101", "SOFTWARE, M18.01", {"software_version": "M18.01"}),
        ("Q102", "MODEL, VF2D", {"model": "VF2D"}),
        ("Q104", "MODE, (MEM)", {"mode": "MEM"}),
        ("Q104", "MODE, (ZERO RET)", {"mode": "ZERO RET"}),
        ("Q104", "MODE, (LIST PROG)", {"mode": "LIST PROG"}),
        ("Q104", "MODE, MDI", {"mode": "MDI"}),
        ("Q200", "TOOL CHANGES, 23", {"tool_changes": 23}),
        ("Q201", "USING TOOL, 4", {"tool_in_use": 4}),
        ("Q300", "P.O. TIME, 00027:50:59", {"power_on_seconds": 100259}),
        ("Q301", "C.S. TIME, 00003:02:57", {"motion_seconds": 10977}),
        ("Q303", "LAST CYCLE, 00000:01:13", {"last_cycle_seconds": 73}),
        ("Q402", "M30 #1, 553", {"m30_parts": 553}),
        (
            "Q500",
            "PROGRAM, O00110, IDLE, PARTS, 4404",
            {"program": "O00110", "execution": "IDLE", "parts": 4404},
        ),
        (
            "Q500",
            "PROGRAM, MDI, ALARM ON, PARTS, 0",
            {"program": "MDI", "execution": "ALARM ON", "parts": 0},
        ),
        (
            "Q500",
            "PROGRAM, O01234, FEED HOLD, PARTS, 12",
            {"program": "O01234", "execution": "FEED HOLD", "parts": 12},
        ),
        ("Q500", "STATUS, BUSY", {"execution": "BUSY"}),
        ("Q600 5041", "MACRO, 5041, 234.5670", {"macros": {"5041": 234.567}}),
        ("Q600 5042", "MACRO, 5042, -12.0000", {"macros": {"5042": -12.0}}),
        ("Q600 3027", "MACRO, 3027, 8000", {"macros": {"3027": 8000.0}}),
    ],
)
def test_parse_answer_forms(command, text, expected):
    assert parse_answer(command, text) == expected


def test_parse_answer_value_types():
    assert type(parse_answer("Q200", "TOOL CHANGES, 23")["tool_changes"]) is int
    assert type(parse_answer("Q600 1", "MACRO, 1, 2")["macros"]["1"]) is float


def test_parse_answer_tolerates_spacing_and_case():
    assert parse_answer("Q200", "tool  changes ,  23 ") == {"tool_changes": 23}


def test_parse_answer_busy_has_no_program_or_parts():
    fields = parse_answer("Q500", "STATUS, BUSY")
    assert "program" not in fields
    assert "parts" not in fields


@pytest.mark.parametrize("command", ["Q100", "Q402", "Q500", "Q600 5041"])
def test_parse_answer_unknown(command):
    with pytest.raises(UnknownCommandAnswer) as caught:
        parse_answer(command, "UNKNOWN")
    assert caught.value.kind == "unknown_command"


def test_parse_answer_q600_echo_mismatch_is_stale():
    with pytest.raises(StaleAnswer, match="echoes variable 5041") as caught:
        parse_answer("Q600 5042", "MACRO, 5041, 234.5670")
    assert caught.value.kind == "stale_echo"


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("Q201", "TOOL CHANGES, 23"),
        ("Q200", "USING TOOL, 4"),
        ("Q100", "MODEL, VF2D"),
        ("Q500", "MACRO, 5041, 1.0"),
        ("Q600 5041", "P.O. TIME, 00027:50:59"),
    ],
)
def test_parse_answer_other_label_is_stale(command, text):
    with pytest.raises(StaleAnswer):
        parse_answer(command, text)


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("Q200", "TOOL CHANGES, 2x"),
        ("Q200", "TOOL CHANGES, -1"),
        ("Q200", "TOOL CHANGES, "),
        ("Q200", "TOOL CHANGES"),
        ("Q200", "TOOL CHANGES, 1, 2"),
        ("Q201", "USING TOOL, 4.5"),
        ("Q300", "P.O. TIME, 27:50"),
        ("Q300", "P.O. TIME, 00027:60:00"),
        ("Q300", "P.O. TIME, 00027:50:5"),
        ("Q300", "P.O. TIME, -1:00:00"),
        ("Q100", "SERIAL NUMBER, "),
        ("Q104", "MODE, ()"),
        ("Q500", "PROGRAM, O00110, IDLE, PARTS"),
        ("Q500", "PROGRAM, O00110, IDLE, COUNT, 4404"),
        ("Q500", "PROGRAM, O00110, IDLE, PARTS, many"),
        ("Q500", "STATUS, "),
        ("Q500", ""),
        ("Q600 5041", "MACRO, 5041"),
        ("Q600 5041", "MACRO, 5041, nan"),
        ("Q600 5041", "MACRO, 5041, inf"),
        ("Q600 5041", "MACRO, 5041, 1_000"),
        ("Q600 5041", "MACRO, x, 1.0"),
    ],
)
def test_parse_answer_rejects_malformed(command, text):
    with pytest.raises(GarbledAnswer) as caught:
        parse_answer(command, text)
    assert caught.value.kind == "garbled"
    assert caught.value.command == command


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00000:00:00", 0),
        ("00027:50:59", 27 * 3600 + 50 * 60 + 59),
        ("1234567:00:01", 1234567 * 3600 + 1),
        ("0:59:59", 3599),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3", "00:00", "00:00:60", "a:00:00"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# -- fuzzing ------------------------------------------------------------------

_PROTOCOL_BYTES = st.sampled_from(
    [STX, ETB, DC2, DC4, XON, XOFF, b"\r", b"\n", b">", b",", b"\x00", b"\xff"]
)
_STREAM = st.lists(st.one_of(_PROTOCOL_BYTES, st.binary(max_size=40)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_STREAM)
def test_extract_frame_fuzz(parts):
    data = b"".join(parts)
    stripped = strip_flow_control(data)
    buffer = bytearray(data)
    for _ in range(len(data) + 1):
        try:
            text = extract_frame(buffer)
        except GarbledAnswer:
            continue
        if text is None:
            # Only a started frame is kept, so memory stays bounded.
            assert len(buffer) <= MAX_FRAME_LENGTH + 1
            break
        # A value only ever comes from an STX ... ETB frame of printable ASCII.
        assert STX + text.encode("ascii") + ETB in stripped
        assert all(0x20 <= byte <= 0x7E for byte in text.encode("ascii"))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["Q100", "Q104", "Q200", "Q300", "Q500", "Q600 5041"]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)),
)
def test_parse_answer_fuzz(command, text):
    try:
        fields = parse_answer(command, text)
    except AnswerError:
        return
    assert fields
    for value in fields.values():
        assert value not in (None, "")


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("Q301", "C.S.TIME, 00098:18:29", {"motion_seconds": 98 * 3600 + 18 * 60 + 29}),
        ("Q100", "SERIAL NO, 1234567", {"serial_number": "1234567"}),
        ("Q201", "using tool, 4", {"tool_in_use": 4}),
    ],
    ids=["no-space-label", "other-firmware-label", "lower-case-label"],
)
def test_parse_answer_accepts_label_variants(command, text, expected):
    assert parse_answer(command, text) == expected
