"""Property tests of the journal reader on damaged and random files.

``read_journal`` must never raise on file content, must yield every valid
line in order with the byte offset of its end, and must quarantine every
other non-empty line with its raw bytes.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnc_edge.journal import read_journal

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

valid_line = st.builds(
    lambda rid, extra: orjson.dumps({"id": rid, "v": 1, **extra}),
    st.text(min_size=1, max_size=20),
    st.dictionaries(
        st.sampled_from(["ts", "seq", "fields", "errors"]),
        st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=10), st.none()),
        max_size=3,
    ),
)
invalid_line = st.one_of(
    st.binary(min_size=1, max_size=60).filter(lambda raw: b"\n" not in raw),
    st.sampled_from(
        [b"\x00\x00\x00", b'{"id": 5}', b"[1, 2]", b'{"id": "torn', b"\xff\xfe{}"]
    ),
).filter(lambda raw: _orjson_id(raw) is None and raw.strip(b"\n") != b"")


def _orjson_id(raw: bytes) -> str | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return data["id"]
    return None


def _read(content: bytes) -> tuple[list[tuple[str, bytes, int]], list[dict]]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "1.jsonl"
        path.write_bytes(content)
        quarantine = Path(directory) / "quarantine.jsonl"
        lines = list(read_journal(path, quarantine))
        quarantined = (
            [orjson.loads(line) for line in quarantine.read_bytes().splitlines()]
            if quarantine.exists()
            else []
        )
    return lines, quarantined


@FUZZ
@given(st.lists(st.tuples(st.booleans(), valid_line, invalid_line), max_size=30))
def test_reader_separates_valid_and_invalid_lines(
    choices: list[tuple[bool, bytes, bytes]],
) -> None:
    lines = [good if is_valid else bad for is_valid, good, bad in choices]
    content = b"".join(line + b"\n" for line in lines)

    yielded, quarantined = _read(content)

    expected = [orjson.loads(line)["id"] for line in lines if _orjson_id(line)]
    assert [rid for rid, _, _ in yielded] == expected
    invalid = [line for line in lines if _orjson_id(line) is None]
    assert [base64.b64decode(q["raw_b64"]) for q in quarantined] == invalid
    assert [q["line"] for q in quarantined] == [
        number for number, line in enumerate(lines, start=1) if _orjson_id(line) is None
    ]


@FUZZ
@given(st.binary(max_size=2000))
def test_reader_never_raises_on_random_bytes(content: bytes) -> None:
    yielded, quarantined = _read(content)

    non_empty = [line for line in content.split(b"\n") if line]
    assert len(yielded) + len(quarantined) == len(non_empty)
    for rid, line, end in yielded:
        assert _orjson_id(line) == rid
        assert content[:end].endswith(line + b"\n") or content[:end].endswith(line)
