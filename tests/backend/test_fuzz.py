"""Fuzzed payloads: random bytes, random JSON objects and damaged readings.

Whatever arrives, each message ends either stored as a reading or stored
as a dead letter and terminated, and it never keeps the good readings of
its batch from being committed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import orjson
import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from cnc_backend.consumer import State, prepare_batch
from cnc_backend.schema import DEAD_LETTER_RAW_LIMIT
from cnc_backend.store import Store
from cnc_common.reading import MACHINE_ID_PATTERN, encode, subject_for
from tests.backend.conftest import (
    consumer_counts,
    make_config,
    make_readings,
    query,
    wait_for,
)

MAX_PAYLOAD = 2048

REASONS = {
    "invalid_json",
    "schema",
    "subject_mismatch",
    "oversize",
    "rejected_by_database",
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    # Integers beyond 64 bits: orjson rejects them and PostgreSQL's bigint
    # cannot hold them.
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    # U+0000, which jsonb rejects, and strings that COPY text format escapes.
    | st.sampled_from(["\x00", "O1\x00", "a\tb\\c\nd\r", "\\N", "\\."]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=15,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=8)


@st.composite
def damaged_readings(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid reading with one key removed or replaced, or random fields."""
    reading: dict[str, Any] = make_readings(1, start=draw(st.integers(0, 10**6)))[0]
    key = draw(st.sampled_from(sorted(reading)))
    action = draw(st.sampled_from(["delete", "replace", "fields", "machine"]))
    if action == "delete":
        del reading[key]
    elif action == "replace":
        reading[key] = draw(json_values)
    elif action == "fields":
        # Still valid, but PostgreSQL may reject a value (U+0000 in jsonb).
        reading["fields"] = draw(json_objects)
    else:
        reading["machine"] = draw(st.from_regex(MACHINE_ID_PATTERN, fullmatch=True))
    machine = reading.get("machine")
    same_subject = isinstance(machine, str) and MACHINE_ID_PATTERN.match(machine)
    subject = subject_for(machine if same_subject else "m1")
    if draw(st.booleans()):
        subject = subject_for("m1")
    return subject, json.dumps(reading).encode()


payloads = st.one_of(
    st.tuples(
        st.just(subject_for("m1")),
        # Short noise, and sizes around max_payload_bytes.
        st.binary(max_size=200)
        | st.binary(min_size=MAX_PAYLOAD - 8, max_size=MAX_PAYLOAD + 8),
    ),
    st.tuples(
        st.just(subject_for("m1")),
        json_objects.map(lambda obj: json.dumps(obj).encode()),
    ),
    damaged_readings(),
)


def message(subject: str, payload: bytes) -> Msg:
    return Msg(_client=None, subject=subject, data=payload)  # type: ignore[arg-type]


def reading_id(payload: bytes) -> str | None:
    """Return the "id" a payload claims, if it is a JSON object with one."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


@pytest.fixture
def store(pg_dsn):
    store = Store(make_config("nats://127.0.0.1:1", pg_dsn).postgres)
    store.connect()
    yield store
    store.close()


@pytest.fixture
def reader(pg_dsn):
    """A query function on one autocommit connection, for many short checks."""
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True

    def read(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    yield read
    conn.close()


@pytest.mark.timeout(180)
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fuzzed=payloads)
def test_fuzzed_payload_in_batch(store, reader, fuzzed):
    subject, payload = fuzzed
    good = make_readings(2)
    messages = [
        message(subject_for("m1"), encode(good[0])),
        message(subject, payload),
        message(subject_for("m1"), encode(good[1])),
    ]
    letters_before = reader("SELECT count(*) FROM dead_letters")[0][0]

    batch = prepare_batch(messages, "cnc.readings", MAX_PAYLOAD)
    result = store.write_batch(batch.rows, batch.dead_letters)
    ack, term = batch.settlement(result)

    assert messages[0] in ack
    assert messages[2] in ack
    assert (messages[1] in ack) != (messages[1] in term)
    ids = {r["id"] for r in good}
    if messages[1] in ack:
        claimed = reading_id(payload)
        assert claimed is not None
        ids.add(claimed)
    stored = reader("SELECT id FROM readings WHERE id = ANY(%s)", (list(ids),))
    assert {row[0] for row in stored} == ids
    letters = reader("SELECT reason, raw FROM dead_letters ORDER BY id DESC LIMIT 1")
    letters_after = reader("SELECT count(*) FROM dead_letters")[0][0]
    if messages[1] in term:
        assert letters_after == letters_before + 1
        assert letters[0][0] in REASONS
        assert bytes(letters[0][1]) == payload[:DEAD_LETTER_RAW_LIMIT]
    else:
        assert letters_after == letters_before


def publish_batch(url: str, items: list[tuple[str, bytes]]) -> list[int]:
    """Publish each (subject, payload) and return the stream sequence of each."""

    async def send() -> list[int]:
        nc = await nats.connect(url, connect_timeout=2)
        js = nc.jetstream(timeout=5.0)
        try:
            acks = [await js.publish(subject, payload) for subject, payload in items]
            return [ack.seq for ack in acks]
        finally:
            await nc.close()

    return asyncio.run(send())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_service_survives_fuzzed_stream(nats_server, pg_dsn, run_service):
    config = make_config(
        nats_server.url, pg_dsn, nats={"max_payload_bytes": MAX_PAYLOAD}
    )
    runner = run_service(config)
    runner.wait_for_state(State.CONNECTED)

    @settings(
        max_examples=10,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(fuzzed=st.lists(payloads, min_size=1, max_size=30))
    def check(fuzzed: list[tuple[str, bytes]]) -> None:
        good = make_readings(5)
        items = [(subject_for("m1"), encode(r)) for r in good[:3]]
        items += fuzzed + [(subject_for("m1"), encode(r)) for r in good[3:]]
        sequences = publish_batch(nats_server.url, items)
        wait_for(lambda: consumer_counts(nats_server.url) == (0, 0), 20, "all settled")

        assert runner.state is State.CONNECTED
        stored = {
            row[0]
            for row in query(
                pg_dsn,
                "SELECT id FROM readings WHERE id = ANY(%s)",
                ([reading_id(p) or "" for _, p in items],),
            )
        }
        dead = {
            row[0]: bytes(row[1])
            for row in query(
                pg_dsn,
                "SELECT stream_seq, raw FROM dead_letters WHERE stream_seq = ANY(%s)",
                (sequences,),
            )
        }
        assert {r["id"] for r in good} <= stored
        for seq, (_, payload) in zip(sequences, items, strict=True):
            is_stored = reading_id(payload) in stored
            assert is_stored != (seq in dead), (seq, payload[:200])
            if seq in dead:
                assert dead[seq] == payload[:DEAD_LETTER_RAW_LIMIT]

    check()
    runner.stop()
    assert runner.drained is True
