"""Backend metrics: sequence gaps, batch hooks and the endpoints of a live service."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from cnc_backend.consumer import State, classify
from cnc_backend.endpoints import BackendEndpoints
from cnc_backend.metrics import BackendMetrics, SequenceStep, SequenceTracker
from cnc_backend.store import DeadLetter, Origin, ReadingRow, WriteResult
from cnc_common.httpserver import EndpointServer
from cnc_common.reading import encode, subject_for
from tests.backend.conftest import (
    make_config,
    make_readings,
    publish_readings,
    wait_for,
)
from tests.prometheus import assert_promtool_clean, request, scrape, values

BOOT = "a" * 32


# SequenceTracker ---------------------------------------------------------------


def test_tracker_first_reading_sets_start() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("m1", BOOT, 500) == SequenceStep(new=True)
    assert tracker.observe("m1", BOOT, 501) == SequenceStep(new=True)


def test_tracker_counts_skipped_seqs() -> None:
    tracker = SequenceTracker()
    tracker.observe("m1", BOOT, 0)
    assert tracker.observe("m1", BOOT, 5) == SequenceStep(new=True, gap=4)


def test_tracker_late_reading_fills_gap() -> None:
    tracker = SequenceTracker()
    tracker.observe("m1", BOOT, 0)
    tracker.observe("m1", BOOT, 5)
    assert tracker.observe("m1", BOOT, 3) == SequenceStep(new=True, filled=1)
    # Filled once; the same reading again is a repeat.
    assert tracker.observe("m1", BOOT, 3) == SequenceStep(new=False)
    for seq in (1, 2, 4):
        assert tracker.observe("m1", BOOT, seq) == SequenceStep(new=True, filled=1)
    assert tracker.observe("m1", BOOT, 4) == SequenceStep(new=False)


def test_tracker_repeat_is_not_new() -> None:
    tracker = SequenceTracker()
    for seq in range(3):
        tracker.observe("m1", BOOT, seq)
    assert tracker.observe("m1", BOOT, 1) == SequenceStep(new=False)
    assert tracker.observe("m1", BOOT, 2) == SequenceStep(new=False)


def test_tracker_new_boot_starts_over() -> None:
    tracker = SequenceTracker()
    tracker.observe("m1", BOOT, 100)
    assert tracker.observe("m1", "b" * 32, 0) == SequenceStep(new=True)
    assert tracker.observe("m2", BOOT, 0) == SequenceStep(new=True)


def test_tracker_forgets_oldest_boots() -> None:
    tracker = SequenceTracker(max_boots=2)
    tracker.observe("m1", "1" * 32, 10)
    tracker.observe("m1", "2" * 32, 10)
    tracker.observe("m1", "3" * 32, 10)
    # Boot 1 was dropped, so its reading is a first sight again.
    assert tracker.observe("m1", "1" * 32, 50) == SequenceStep(new=True)


def test_tracker_stops_tracking_past_range_limit() -> None:
    tracker = SequenceTracker(max_ranges=1)
    tracker.observe("m1", BOOT, 0)
    assert tracker.observe("m1", BOOT, 2).gap == 1
    assert tracker.observe("m1", BOOT, 4).gap == 1
    assert tracker.observe("m1", BOOT, 1) == SequenceStep(new=True, filled=1)
    assert tracker.observe("m1", BOOT, 3) == SequenceStep(new=False)


# BackendMetrics hooks -----------------------------------------------------------


def rows_for(readings: list[dict], seqs: list[int]) -> list[ReadingRow]:
    rows = []
    for seq in seqs:
        origin = Origin(subject_for(readings[seq]["machine"]), encode(readings[seq]))
        row = classify(origin, "cnc.readings", 65536)
        assert isinstance(row, ReadingRow)
        rows.append(row)
    return rows


def sample(metrics: BackendMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_record_commit_counts_gaps_and_dead_letters() -> None:
    now = datetime(2024, 5, 1, 13, 0, tzinfo=UTC).timestamp()
    metrics = BackendMetrics(CollectorRegistry(), clock=lambda: now)
    readings = make_readings(8, machine="m1")
    rows = rows_for(readings, [0, 1, 5, 6, 7])
    letter = DeadLetter(Origin("cnc.readings.m1", b"{"), "invalid_json", "bad")
    # Row 4 (seq 7) was rejected by the database: it is a dead letter, not a row.
    result = WriteResult(inserted=4, duplicates=0, dead_lettered=2, rejected=(4,))

    metrics.record_commit(rows, [letter], result, 0.02)

    assert sample(metrics, "cnc_backend_sequence_gap_readings_total", machine="m1") == 3
    assert (
        sample(metrics, "cnc_backend_sequence_gap_filled_readings_total", machine="m1")
        == 0
    )
    assert sample(metrics, "cnc_backend_dead_letters_total", reason="invalid_json") == 1
    assert (
        sample(metrics, "cnc_backend_dead_letters_total", reason="rejected_by_database")
        == 1
    )
    assert sample(metrics, "cnc_backend_dead_letters_total", reason="schema") == 0
    assert sample(metrics, "cnc_backend_poll_to_commit_seconds_count") == 4
    assert sample(metrics, "cnc_backend_batch_commit_duration_seconds_count") == 1
    newest = sample(
        metrics, "cnc_backend_newest_reading_timestamp_seconds", machine="m1"
    )
    assert newest == rows[3].ts.timestamp()
    assert metrics.last_batch == {
        "at": now,
        "messages": 6,
        "inserted": 4,
        "duplicates": 0,
        "dead_lettered": 2,
        "seconds": 0.02,
    }

    # The redelivered readings fill the gap; the repeat of seq 0 is no new
    # reading and adds no latency sample.
    late = rows_for(readings, [2, 3, 4, 0])
    metrics.record_commit(late, [], WriteResult(3, 1, 0), 0.01)
    assert (
        sample(metrics, "cnc_backend_sequence_gap_filled_readings_total", machine="m1")
        == 3
    )
    assert sample(metrics, "cnc_backend_poll_to_commit_seconds_count") == 7


def test_record_transition_counts_reconnects_by_server() -> None:
    metrics = BackendMetrics(CollectorRegistry(), clock=lambda: 42.0)
    metrics.record_transition("STARTING", "CONNECTED", None)
    metrics.record_transition("CONNECTED", "RECONNECTING", "postgres")
    metrics.record_transition("RECONNECTING", "CONNECTED", None)
    metrics.record_transition("CONNECTED", "RECONNECTING", "nats")
    assert sample(metrics, "cnc_backend_reconnects_total", server="postgres") == 1
    assert sample(metrics, "cnc_backend_reconnects_total", server="nats") == 1
    assert (
        sample(
            metrics,
            "cnc_backend_state_transitions_total",
            **{"from": "CONNECTED", "to": "RECONNECTING"},
        )
        == 2
    )
    assert metrics.state_since == 42.0


# A live service -------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_live_service_endpoints(nats_server, pg_dsn, run_service) -> None:
    runner = run_service(make_config(nats_server.url, pg_dsn))
    runner.wait_for_state(State.CONNECTED)
    server = EndpointServer("127.0.0.1:0", BackendEndpoints(runner.service).routes())
    url = server.start()
    try:
        status, _, body = request(url + "/readyz")
        assert (status, body) == (200, b"ready: CONNECTED\n")

        # Seqs 0-9 and 15-19 of one boot: five readings missing.
        readings = make_readings(20, machine="m1")
        publish_readings(nats_server.url, readings[:10] + readings[15:])
        wait_for(
            lambda: runner.service.counters.inserted == 15, 15, "15 stored readings"
        )
        text = scrape(url)
        assert_promtool_clean(text)
        states = values(text, "cnc_backend_state")
        assert states == {
            frozenset({("state", state.name)}): float(state is State.CONNECTED)
            for state in State
        }
        gaps = values(text, "cnc_backend_sequence_gap_readings_total")
        assert gaps == {frozenset({("machine", "m1")}): 5.0}
        inserted = values(text, "cnc_backend_readings_inserted_total")
        assert inserted == {frozenset(): 15.0}
        report = json.loads(request(url + "/status")[2])
        assert report["state"] == "CONNECTED"
        assert report["counters"]["inserted"] == 15
        assert report["last_batch"]["inserted"] >= 1

        nats_server.kill()
        wait_for(lambda: request(url + "/readyz")[0] == 503, 30, "/readyz 503")
        status, _, body = request(url + "/readyz")
        assert body.startswith(b"not ready: RECONNECTING")
        reconnects = values(scrape(url), "cnc_backend_reconnects_total")
        assert reconnects[frozenset({("server", "nats")})] == 1
    finally:
        server.close()
