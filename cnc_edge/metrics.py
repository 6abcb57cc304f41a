"""Prometheus metrics of the edge agent, aggregated over its three processes.

Each child process (poller, buffer, publisher) updates its own metrics
below. prometheus_client's multiprocess mode stores them in memory-mapped
files, one set per process id, in a directory named by
``PROMETHEUS_MULTIPROC_DIR``. The parent empties that directory and sets
the variable before it spawns the children, because the client library
reads it once, on its first import, and a spawned child imports it only
after inheriting the variable. The parent serves the sum with
``MultiProcessCollector`` and writes no metrics itself.

Across a child's exit, counters and histograms keep the dead process's file
and so never go backwards. Every gauge uses a ``live*`` mode, and the parent
calls ``mark_process_dead`` for each child that exits, so no value of a
dead process is exported. Each gauge has one writing process, so ``livemax``
exports exactly that process's value.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from cnc_common.coverage import LOSS_REASONS
from cnc_common.reading import CONDITIONS
from cnc_edge.fsm import TRANSITIONS, EdgeState

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Subdirectory of the data directory holding the metric files.
METRICS_DIR = "metrics"

#: Error kinds a reading's ``errors`` can hold: per command from HaasClient,
#: and ``link_down`` or ``internal`` under the key ``serial`` from the poller.
SERIAL_ERROR_KINDS = (
    "timeout",
    "partial",
    "garbled",
    "unknown_command",
    "stale_echo",
    "link_down",
    "internal",
)
READING_STATUSES = ("ok", "partial", "error")
DROP_REASONS = ("journal_full", "disk_full")
SYNC_RESULTS = ("completed", "failed", "interrupted")
PUBLISH_KINDS = ("live", "replay")


def prepare_multiprocess_dir(path: Path) -> None:
    """Empty ``path`` and name it in PROMETHEUS_MULTIPROC_DIR for children.

    Files left by an earlier run would add its counters to this run's, so
    the directory is removed first (rmtree refuses a symlink in its place).
    """
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)
    # Created here before the buffer's journal does it, so with its mode.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.mkdir(mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)


def aggregate_registry(path: Path) -> CollectorRegistry:
    """Return a registry that sums the metric files of every process in ``path``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return registry


def forget_process(pid: int, path: Path) -> None:
    """Drop the live gauges of an exited process; its counters stay."""
    mark_process_dead(pid, str(path))


def _counter(
    name: str,
    doc: str,
    labels: tuple[str, ...] = (),
    *,
    registry: CollectorRegistry | None,
) -> Counter:
    return Counter(name, doc, ("machine", *labels), registry=registry)


def _gauge(
    name: str,
    doc: str,
    labels: tuple[str, ...] = (),
    *,
    registry: CollectorRegistry | None,
) -> Gauge:
    # livemax: one process writes each gauge, and "live" drops its value
    # once the parent marks that process dead.
    return Gauge(
        name,
        doc,
        ("machine", *labels),
        registry=registry,
        multiprocess_mode="livemax",
    )


class PollerMetrics:
    """Metrics of the poller process: polls, serial errors, last poll."""

    def __init__(self, machine: str, registry: CollectorRegistry | None = None) -> None:
        self.polled = _counter(
            "cnc_edge_readings_polled_total",
            "Readings produced by the poller, one per poll cycle, by status.",
            ("status",),
            registry=registry,
        )
        self.serial_errors = _counter(
            "cnc_edge_serial_errors_total",
            "Failed controller queries by kind; link_down and internal count "
            "whole poll cycles.",
            ("kind",),
            registry=registry,
        )
        self.poll_duration = Histogram(
            "cnc_edge_poll_duration_seconds",
            "Seconds one poll cycle took, all commands included.",
            ("machine",),
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        ).labels(machine)
        self.poll_success = _gauge(
            "cnc_edge_poll_success",
            "1 if the last poll cycle got at least one valid answer, else 0.",
            registry=registry,
        ).labels(machine)
        self.last_poll = _gauge(
            "cnc_edge_last_poll_timestamp_seconds",
            "Unix time at which the last poll cycle ended.",
            registry=registry,
        ).labels(machine)
        self.last_success = _gauge(
            "cnc_edge_last_successful_poll_timestamp_seconds",
            "Unix time at which the last poll cycle with a valid answer ended.",
            registry=registry,
        ).labels(machine)
        self.machine = machine
        self._init_controller_metrics(registry)
        for status in READING_STATUSES:
            self.polled.labels(machine, status)
        for kind in SERIAL_ERROR_KINDS:
            self.serial_errors.labels(machine, kind)

    def _init_controller_metrics(self, registry: CollectorRegistry | None) -> None:
        self.cycles = _counter(
            "cnc_edge_poll_cycles_total",
            "Poll cycles by the controller condition they observed (ok, "
            "controller_busy, controller_off, link_down).",
            ("condition",),
            registry=registry,
        )
        self.condition = _gauge(
            "cnc_edge_controller_condition",
            "1 for the controller condition of the last poll cycle, 0 for the others.",
            ("condition",),
            registry=registry,
        )
        self.clock_skew = _gauge(
            "cnc_edge_controller_clock_skew_seconds",
            "Controller clock minus host wall clock at the last poll, in seconds "
            "(the controller clock has 1 s resolution); NaN when the last poll "
            "did not read the controller clock.",
            registry=registry,
        ).labels(self.machine)
        self.host_clock_synced = _gauge(
            "cnc_edge_host_clock_synced",
            "1 if the host clock was synchronised at the last poll, else 0.",
            registry=registry,
        ).labels(self.machine)
        self.clock_skew.set(math.nan)
        for condition in CONDITIONS:
            self.cycles.labels(self.machine, condition)
            self.condition.labels(self.machine, condition)

    def record_poll(self, reading: dict[str, Any], seconds: float) -> None:
        """Count one poll cycle's reading and its errors."""
        now = time.time()
        self.polled.labels(self.machine, reading["status"]).inc()
        for kind in reading["errors"].values():
            # Commands skipped because the agent is stopping were never sent.
            if kind != "stopped":
                self.serial_errors.labels(self.machine, kind).inc()
        self.poll_duration.observe(seconds)
        # make_reading marks a cycle "error" only when no command succeeded.
        success = reading["status"] != "error"
        self.poll_success.set(1 if success else 0)
        self.last_poll.set(now)
        if success:
            self.last_success.set(now)
        self._record_controller(reading)

    def _record_controller(self, reading: dict[str, Any]) -> None:
        # Readings built by hand (tests, older code) may lack these keys; the
        # defaults are the values the backend assumes for them.
        current = reading.get("condition", "ok")
        self.cycles.labels(self.machine, current).inc()
        for condition in CONDITIONS:
            self.condition.labels(self.machine, condition).set(
                int(condition == current)
            )
        self.host_clock_synced.set(int(reading.get("clock_synced", True)))
        self.clock_skew.set(clock_skew_seconds(reading))


class BufferMetrics:
    """Metrics of the buffer process: state, journal, drops and syncs."""

    def __init__(self, machine: str, registry: CollectorRegistry | None = None) -> None:
        self.machine = machine

        self.state = _gauge(
            "cnc_edge_state",
            "1 for the agent's current state (OFFLINE, SYNCING, ONLINE), 0 for "
            "the others.",
            ("state",),
            registry=registry,
        )
        self.transitions = _counter(
            "cnc_edge_state_transitions_total",
            "State changes of the agent, by source and destination state.",
            ("from", "to"),
            registry=registry,
        )
        self.journaled = _counter(
            "cnc_edge_readings_journaled_total",
            "Readings appended to the journal (offline, syncing, failed "
            "publishes and those held at stop).",
            registry=registry,
        ).labels(machine)

        self.dropped = _counter(
            "cnc_edge_readings_dropped_total",
            "Readings lost because the journal reached its cap or the disk was "
            "full, by reason.",
            ("reason",),
            registry=registry,
        )
        self.publish_failed = _counter(
            "cnc_edge_readings_publish_failed_total",
            "Live readings whose publish failed and that went to the journal.",
            registry=registry,
        ).labels(machine)
        self.quarantined = _counter(
            "cnc_edge_quarantined_lines_total",
            "Journal lines moved to quarantine.jsonl because they could not be parsed.",
            registry=registry,
        ).labels(machine)
        self.loss_reports = _counter(
            "cnc_edge_loss_reports_total",
            "Loss reports recorded for readings that will never be sent, by "
            "reason; a drop merged into a waiting report does not count again.",
            ("reason",),
            registry=registry,
        )
        self.loss_reports_pending = _gauge(
            "cnc_edge_loss_reports_pending",
            "Loss reports in losses.jsonl not yet acknowledged by JetStream.",
            registry=registry,
        ).labels(machine)
        for reason in LOSS_REASONS:
            self.loss_reports.labels(machine, reason)
        self._init_sync_metrics(registry)
        self._init_journal_gauges(registry)

        for state in EdgeState:
            self.state.labels(machine, state.value)
        for transition in TRANSITIONS:
            sources = transition["source"]
            for source in sources if isinstance(sources, list) else [sources]:
                self.transitions.labels(machine, source.value, transition["dest"].value)
        for reason in DROP_REASONS:
            self.dropped.labels(machine, reason)

    def _init_sync_metrics(self, registry: CollectorRegistry | None) -> None:
        self.syncs = _counter(
            "cnc_edge_syncs_total",
            "Sync attempts by result: completed (went ONLINE), failed (an error "
            "other than the link), interrupted (the link went down).",
            ("result",),
            registry=registry,
        )
        for result in SYNC_RESULTS:
            self.syncs.labels(self.machine, result)
        self.sync_duration = Histogram(
            "cnc_edge_sync_duration_seconds",
            "Seconds from SYNCING to ONLINE for each completed sync.",
            ("machine",),
            registry=registry,
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
        ).labels(self.machine)
        self.sync_readings = Histogram(
            "cnc_edge_sync_readings",
            "Journaled readings replayed by each completed sync.",
            ("machine",),
            registry=registry,
            buckets=(0, 10, 100, 1000, 10_000, 100_000, 1_000_000),
        ).labels(self.machine)

    def _init_journal_gauges(self, registry: CollectorRegistry | None) -> None:
        self.journal_bytes = _gauge(
            "cnc_edge_journal_bytes",
            "Bytes waiting for replay: current.jsonl plus every file in sync/.",
            registry=registry,
        ).labels(self.machine)
        self.journal_max_bytes = _gauge(
            "cnc_edge_journal_max_bytes",
            "Configured cap on the journal (journal.max_buffer_bytes); 0 means no cap.",
            registry=registry,
        ).labels(self.machine)
        self.oldest_age = _gauge(
            "cnc_edge_oldest_buffered_reading_age_seconds",
            "Age of the oldest reading waiting in the journal; 0 when it is empty.",
            registry=registry,
        ).labels(self.machine)
        self.inflight = _gauge(
            "cnc_edge_inflight_readings",
            "Live readings handed to the publisher and not yet acknowledged.",
            registry=registry,
        ).labels(self.machine)

    def record_start(self, state: EdgeState, max_bytes: int) -> None:
        self.journal_max_bytes.set(max_bytes)
        self._set_state(state)

    def record_state(self, source: EdgeState, dest: EdgeState) -> None:
        self._set_state(dest)
        self.transitions.labels(self.machine, source.value, dest.value).inc()

    def _set_state(self, current: EdgeState) -> None:
        for state in EdgeState:
            self.state.labels(self.machine, state.value).set(int(state is current))

    def record_sync(
        self, result: str, seconds: float | None = None, readings: int | None = None
    ) -> None:
        """Count one sync attempt; a completed one also gets its duration and size."""
        self.syncs.labels(self.machine, result).inc()
        if seconds is not None:
            self.sync_duration.observe(seconds)
        if readings is not None:
            self.sync_readings.observe(readings)

    def record_append(self, written: int, dropped: int, reason: str | None) -> None:
        self.journaled.inc(written)
        if dropped:
            self.dropped.labels(self.machine, reason or "unknown").inc(dropped)

    def record_status(self, status: dict[str, Any]) -> None:
        """Refresh the journal gauges from ``Buffer.status()``."""
        self.journal_bytes.set(status["buffered_bytes"])
        self.loss_reports_pending.set(status.get("loss_reports_pending", 0))
        self.inflight.set(status["inflight"])
        self.oldest_age.set(_age_seconds(status["oldest_buffered_ts"]))


def clock_skew_seconds(reading: dict[str, Any]) -> float:
    """Return the reading's ``ctrl_ts`` minus its ``ts`` in seconds, or NaN."""
    ctrl_ts = reading.get("ctrl_ts")
    if not ctrl_ts:
        return math.nan
    try:
        delta = datetime.fromisoformat(ctrl_ts) - datetime.fromisoformat(reading["ts"])
    except (KeyError, TypeError, ValueError):
        return math.nan
    return delta.total_seconds()


def _age_seconds(ts: str | None) -> float:
    if ts is None:
        return 0.0
    try:
        stamp = datetime.fromisoformat(ts).timestamp()
    except ValueError:
        # A journal line with a malformed ts must not stop the buffer.
        return float("nan")
    age = time.time() - stamp
    # Clamp a reading stamped slightly ahead of this clock (a clock step).
    return max(age, 0.0)


class PublisherMetrics:
    """Metrics of the publisher process: acknowledged readings and latency."""

    def __init__(self, machine: str, registry: CollectorRegistry | None = None) -> None:
        self.published = _counter(
            "cnc_edge_readings_published_total",
            "Live readings acknowledged by JetStream.",
            registry=registry,
        ).labels(machine)
        self.replayed = _counter(
            "cnc_edge_readings_replayed_total",
            "Journaled readings acknowledged by JetStream during a sync.",
            registry=registry,
        ).labels(machine)
        latency = Histogram(
            "cnc_edge_publish_ack_latency_seconds",
            "Seconds from publishing a reading to its PubAck, by kind (live or "
            "replay).",
            ("machine", "kind"),
            registry=registry,
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
            ),
        )
        self.latency = {kind: latency.labels(machine, kind) for kind in PUBLISH_KINDS}

    def record_acked(self, kind: str, count: int) -> None:
        if kind == "replay":
            self.replayed.inc(count)
        else:
            self.published.inc(count)

    def time_ack(self, kind: str, future: asyncio.Future[Any], started: float) -> None:
        """Observe the latency of ``future`` from ``started`` (monotonic) to its PubAck."""
        histogram = self.latency[kind]

        def observe(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                histogram.observe(time.monotonic() - started)

        future.add_done_callback(observe)
