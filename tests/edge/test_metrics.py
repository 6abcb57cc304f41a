"""Edge metrics: multiprocess aggregation, poll recording and readiness."""

from __future__ import annotations

import math
import multiprocessing
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from cnc_common.config import load
from cnc_edge.config import EdgeConfig
from cnc_edge.endpoints import AgentEndpoints, max_poll_age
from cnc_edge.fsm import EdgeState
from cnc_edge.metrics import (
    MULTIPROC_ENV,
    BufferMetrics,
    PollerMetrics,
    aggregate_registry,
    forget_process,
    prepare_multiprocess_dir,
)


def reading(status: str, errors: dict[str, str] | None = None) -> dict[str, Any]:
    return {"status": status, "errors": errors or {}}


def write_metrics_in_child(state: str, polls: int, release: Any) -> None:
    """Run in a spawned process: set the state, count polls, wait for release."""
    buffer = BufferMetrics("m1")
    buffer.record_start(EdgeState.OFFLINE, 1000)
    if state != "OFFLINE":
        buffer.record_state(EdgeState.OFFLINE, EdgeState(state))
    poller = PollerMetrics("m1")
    for _ in range(polls):
        poller.record_poll(reading("ok"), 0.01)
    if release is not None:
        release.wait(30)


def state_values(registry: CollectorRegistry) -> dict[str, float]:
    return {
        state.value: value
        for state in EdgeState
        if (
            value := registry.get_sample_value(
                "cnc_edge_state", {"machine": "m1", "state": state.value}
            )
        )
        is not None
    }


def polled_ok(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(
        "cnc_edge_readings_polled_total", {"machine": "m1", "status": "ok"}
    )


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # monkeypatch restores the variable, so that no later test or process
    # of this session writes metric files into the removed directory.
    monkeypatch.setenv(MULTIPROC_ENV, "unset-by-the-test")
    path = tmp_path / "data" / "metrics"
    prepare_multiprocess_dir(path)
    return path


def test_exited_child_gauges_vanish_counters_stay(metrics_dir: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    registry = aggregate_registry(metrics_dir)

    first = ctx.Process(target=write_metrics_in_child, args=("ONLINE", 3, None))
    first.start()
    first.join(60)
    assert first.exitcode == 0
    # Until the parent marks the process dead its last gauges are still read.
    assert state_values(registry) == {"OFFLINE": 0, "SYNCING": 0, "ONLINE": 1}
    forget_process(first.pid, metrics_dir)
    assert state_values(registry) == {}
    assert registry.get_sample_value("cnc_edge_poll_success", {"machine": "m1"}) is None
    assert polled_ok(registry) == 3

    release = ctx.Event()
    second = ctx.Process(target=write_metrics_in_child, args=("OFFLINE", 2, release))
    second.start()
    try:
        deadline = time.monotonic() + 60
        while polled_ok(registry) != 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert polled_ok(registry) == 5
        assert state_values(registry) == {"OFFLINE": 1, "SYNCING": 0, "ONLINE": 0}
    finally:
        release.set()
        second.join(60)
    forget_process(second.pid, metrics_dir)
    assert state_values(registry) == {}
    assert polled_ok(registry) == 5


def test_prepare_removes_earlier_run_files(metrics_dir: Path) -> None:
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")
    prepare_multiprocess_dir(metrics_dir)
    assert list(metrics_dir.iterdir()) == []
    assert metrics_dir.stat().st_mode & 0o777 == 0o700


def test_record_poll_counts_errors_and_success() -> None:
    registry = CollectorRegistry()
    poller = PollerMetrics("m1", registry=registry)
    labels = {"machine": "m1"}

    poller.record_poll(reading("error", {"serial": "link_down"}), 0.01)
    assert registry.get_sample_value("cnc_edge_poll_success", labels) == 0
    assert (
        registry.get_sample_value(
            "cnc_edge_last_successful_poll_timestamp_seconds", labels
        )
        == 0
    )
    assert registry.get_sample_value("cnc_edge_last_poll_timestamp_seconds", labels) > 0

    poller.record_poll(reading("partial", {"Q100": "timeout", "Q104": "garbled"}), 0.5)
    assert registry.get_sample_value("cnc_edge_poll_success", labels) == 1
    assert (
        registry.get_sample_value(
            "cnc_edge_last_successful_poll_timestamp_seconds", labels
        )
        > 0
    )
    for kind, count in {
        "link_down": 1,
        "timeout": 1,
        "garbled": 1,
        "partial": 0,
    }.items():
        value = registry.get_sample_value(
            "cnc_edge_serial_errors_total", {"machine": "m1", "kind": kind}
        )
        assert value == count, kind
    for status, count in {"ok": 0, "partial": 1, "error": 1}.items():
        value = registry.get_sample_value(
            "cnc_edge_readings_polled_total", {"machine": "m1", "status": status}
        )
        assert value == count, status


def test_record_state_sets_exactly_one_series() -> None:
    registry = CollectorRegistry()
    buffer = BufferMetrics("m1", registry=registry)
    buffer.record_start(EdgeState.OFFLINE, 0)
    buffer.record_state(EdgeState.OFFLINE, EdgeState.SYNCING)
    buffer.record_state(EdgeState.SYNCING, EdgeState.ONLINE)
    assert state_values(registry) == {"OFFLINE": 0, "SYNCING": 0, "ONLINE": 1}
    moves = {
        ("OFFLINE", "SYNCING"): 1,
        ("SYNCING", "ONLINE"): 1,
        ("ONLINE", "OFFLINE"): 0,
        ("SYNCING", "OFFLINE"): 0,
    }
    for (source, dest), count in moves.items():
        value = registry.get_sample_value(
            "cnc_edge_state_transitions_total",
            {"machine": "m1", "from": source, "to": dest},
        )
        assert value == count, (source, dest)


def test_record_status_reports_oldest_age() -> None:
    registry = CollectorRegistry()
    buffer = BufferMetrics("m1", registry=registry)
    status = {
        "buffered_bytes": 1234,
        "inflight": 2,
        "oldest_buffered_ts": "2000-01-01T00:00:00.000000Z",
    }
    buffer.record_status(status)
    labels = {"machine": "m1"}
    assert registry.get_sample_value("cnc_edge_journal_bytes", labels) == 1234
    assert registry.get_sample_value("cnc_edge_inflight_readings", labels) == 2
    age = registry.get_sample_value(
        "cnc_edge_oldest_buffered_reading_age_seconds", labels
    )
    assert age > 20 * 365 * 86400

    buffer.record_status({**status, "oldest_buffered_ts": "yesterday"})
    age = registry.get_sample_value(
        "cnc_edge_oldest_buffered_reading_age_seconds", labels
    )
    assert math.isnan(age)

    buffer.record_status({**status, "oldest_buffered_ts": None})
    assert (
        registry.get_sample_value(
            "cnc_edge_oldest_buffered_reading_age_seconds", labels
        )
        == 0
    )


# Readiness -------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> EdgeConfig:
    data = {
        "machine": {"id": "m1"},
        "serial": {"url": "loop://", "query_timeout": 0.5},
        "poll": {"interval": 1.0, "commands": ["Q100", "Q104"]},
        "journal": {"data_dir": str(tmp_path / "data")},
    }
    return load(EdgeConfig, data, source="test")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def endpoints_for(config: EdgeConfig) -> tuple[AgentEndpoints, PollerMetrics, Clock]:
    registry = CollectorRegistry()
    poller = PollerMetrics("m1", registry=registry)
    clock = Clock()
    processes = lambda: {"pid": 1, "children": {"poller": 2}}  # noqa: E731
    return AgentEndpoints(config, registry, processes, clock), poller, clock


def test_max_poll_age_covers_timeouts(config: EdgeConfig) -> None:
    # Two commands and three controller clock queries timing out at 0.5 s
    # each plus the 1 s interval, twice.
    assert max_poll_age(config) == 7.0


def test_readiness_before_first_poll(config: EdgeConfig) -> None:
    endpoints, _, _ = endpoints_for(config)
    assert endpoints.readiness() == (False, "no poll cycle has finished yet")
    response = endpoints.routes()["/readyz"]({})
    assert response.status == 503
    assert response.body.startswith(b"not ready: no poll cycle")


def test_readiness_follows_last_poll(config: EdgeConfig) -> None:
    endpoints, poller, clock = endpoints_for(config)
    poller.record_poll(reading("partial", {"Q100": "timeout"}), 0.5)
    clock.now = time.time()
    assert endpoints.readiness() == (True, "polling the controller")
    assert endpoints.routes()["/readyz"]({}).status == 200

    poller.record_poll(reading("error", {"serial": "link_down"}), 0.01)
    ready, reason = endpoints.readiness()
    assert not ready
    assert reason == "no command of the last poll cycle succeeded"


def test_readiness_stale_poll(config: EdgeConfig) -> None:
    endpoints, poller, clock = endpoints_for(config)
    poller.record_poll(reading("ok"), 0.01)
    clock.now = time.time() + max_poll_age(config) + 5
    ready, reason = endpoints.readiness()
    assert not ready
    assert reason.startswith("the last poll cycle ended")


def test_status_merges_state_file(config: EdgeConfig) -> None:
    endpoints, poller, _ = endpoints_for(config)
    assert endpoints.status()["state"] == "STARTING"

    config.data_dir.mkdir(parents=True)
    state = {"pid": 3, "state": "ONLINE", "since": 1.0, "counters": {"published": 5}}
    (config.data_dir / "state.json").write_bytes(orjson.dumps(state))
    poller.record_poll(reading("ok"), 0.01)
    status = orjson.loads(endpoints.routes()["/status"]({}).body)
    assert status["state"] == "ONLINE"
    assert status["since"] == 1.0
    assert status["counters"] == {"published": 5}
    assert status["ready"] is True
    assert status["last_poll"]["success"] is True
    assert status["agent"] == {"pid": 1, "children": {"poller": 2}}
    assert "pid" not in status
