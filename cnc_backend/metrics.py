"""Prometheus metrics of the backend (one process, one plain registry).

The state and the totals that ``BackendService.counters`` already keeps are
read from the service at each scrape. Everything else is recorded by hooks
in the service: state transitions, reconnects, each fetched and each
committed batch. ``refresh_pending`` requests the consumer's pending counts
from JetStream while the service is CONNECTED.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from cnc_backend.store import (
    REJECTED_BY_DATABASE,
    DeadLetter,
    LossRow,
    ReadingRow,
    WriteResult,
)

if TYPE_CHECKING:
    from cnc_backend.consumer import BackendService

log = logging.getLogger(__name__)

#: Seconds between two requests for the consumer's pending counts.
PENDING_REFRESH_INTERVAL = 5.0

#: Dead-letter reasons: from classify() in consumer.py, and for rows the
#: database rejected.
DEAD_LETTER_REASONS = (
    "oversize",
    "invalid_json",
    "schema",
    "subject_mismatch",
    REJECTED_BY_DATABASE,
)

#: Totals of ``Counters`` exported as counters: (field, name, help).
_SERVICE_COUNTERS = (
    ("fetched", "cnc_backend_messages_fetched", "Messages fetched from JetStream."),
    (
        "inserted",
        "cnc_backend_readings_inserted",
        "Readings committed to the readings table.",
    ),
    (
        "duplicates",
        "cnc_backend_duplicate_readings",
        "Readings skipped because their id was already stored.",
    ),
    ("batches", "cnc_backend_batches", "Batches committed."),
    (
        "stream_recreated",
        "cnc_backend_stream_recreated",
        "Times the stream was missing after this process had used it and was "
        "created again; the messages it held are lost.",
    ),
    (
        "consumer_recreated",
        "cnc_backend_consumer_recreated",
        "Times the durable consumer was missing after this process had used it "
        "and was created again.",
    ),
)


@dataclass(frozen=True)
class SequenceStep:
    """Effect of one stored reading on its boot's sequence."""

    #: The reading is new to this process: a first sight, a higher seq or a
    #: seq that fills a gap. False for a repeat.
    new: bool
    #: Sequence numbers skipped by this reading.
    gap: int = 0
    #: 1 when this reading fills a gap counted earlier.
    filled: int = 0


@dataclass
class _BootSequence:
    high: int
    #: Sorted, disjoint half-open ranges of skipped seqs below ``high``.
    missing: list[tuple[int, int]] = field(default_factory=list)


class SequenceTracker:
    """Find gaps in the sequence numbers an agent gives readings within one boot.

    A boot's first reading seen by this process only sets the starting point,
    since earlier ones may have been stored before this process started.
    A reading that arrives late (redelivered after a failed commit, or
    replayed after an outage) fills its gap and is counted as filled.
    """

    def __init__(self, max_boots: int = 8, max_ranges: int = 10_000) -> None:
        self.max_boots = max_boots
        self.max_ranges = max_ranges
        self._boots: dict[str, OrderedDict[str, _BootSequence]] = {}

    def observe(self, machine: str, boot: str, seq: int) -> SequenceStep:
        boots = self._boots.setdefault(machine, OrderedDict())
        current = boots.get(boot)
        if current is None:
            boots[boot] = _BootSequence(high=seq)
            # An agent draws a new boot id at each start, so old boots go first.
            while len(boots) > self.max_boots:
                boots.popitem(last=False)
            return SequenceStep(new=True)
        boots.move_to_end(boot)
        if seq > current.high:
            gap = seq - current.high - 1
            if gap and len(current.missing) < self.max_ranges:
                # NOTE: past max_ranges a gap is counted but a late reading
                # filling it is not, so the alert stays on until it ages out.
                current.missing.append((current.high + 1, seq))
            current.high = seq
            return SequenceStep(new=True, gap=gap)
        if _take(current.missing, seq):
            return SequenceStep(new=True, filled=1)
        return SequenceStep(new=False)


def _take(ranges: list[tuple[int, int]], seq: int) -> bool:
    """Remove ``seq`` from sorted half-open ``ranges``; return whether it was in one."""
    index = bisect.bisect_right(ranges, (seq, float("inf"))) - 1
    if index < 0:
        return False
    start, end = ranges[index]
    if not start <= seq < end:
        return False
    pieces = [(lo, hi) for lo, hi in ((start, seq), (seq + 1, end)) if lo < hi]
    ranges[index : index + 1] = pieces
    return True


class _ServiceCollector:
    """Export the service's state and ``Counters`` totals at scrape time."""

    def __init__(self, service: BackendService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        current = self.service.state
        state = GaugeMetricFamily(
            "cnc_backend_state",
            "1 for the backend's current state, 0 for the others.",
            labels=["state"],
        )
        for member in type(current):
            state.add_metric([member.name], int(member is current))
        yield state
        counters = self.service.counters
        for attribute, name, documentation in _SERVICE_COUNTERS:
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], getattr(counters, attribute, 0))
            yield counter
        lost = GaugeMetricFamily(
            "cnc_backend_coverage_lost_seconds",
            "Seconds of LOST coverage in the ledger for each machine, all "
            "reasons (see the coverage view).",
            labels=["machine"],
        )
        for machine, seconds in sorted(self.service.store.lost_seconds.items()):
            lost.add_metric([machine], seconds)
        yield lost


class BackendMetrics:
    """The backend's metrics and the hooks the service calls to record them."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self.sequences = SequenceTracker()
        self.state_since = clock()
        #: Summary of the last committed batch, for /status.
        self.last_batch: dict[str, Any] | None = None
        #: Last pending counts from JetStream and when they came, for /status.
        self.consumer_pending: dict[str, Any] | None = None
        self._newest: dict[str, float] = {}
        self._machines: set[str] = set()
        ProcessCollector(registry=self.registry)
        self._init_state_metrics()
        self._init_batch_metrics()
        self._init_reading_metrics()

    def _init_state_metrics(self) -> None:
        self.transitions = Counter(
            "cnc_backend_state_transitions_total",
            "State changes of the backend, by source and destination state.",
            ("from", "to"),
            registry=self.registry,
        )
        self.reconnects = Counter(
            "cnc_backend_reconnects_total",
            "Entries into RECONNECTING, by the server that failed (nats or postgres).",
            ("server",),
            registry=self.registry,
        )
        for server in ("nats", "postgres"):
            self.reconnects.labels(server)
        self.pending = Gauge(
            "cnc_backend_consumer_pending_messages",
            "Messages in the stream not yet delivered to the durable consumer "
            "(num_pending), refreshed while CONNECTED.",
            registry=self.registry,
        )
        self.ack_pending = Gauge(
            "cnc_backend_consumer_ack_pending_messages",
            "Messages delivered to the durable consumer and not yet acknowledged "
            "(num_ack_pending), refreshed while CONNECTED.",
            registry=self.registry,
        )

    def _init_batch_metrics(self) -> None:
        self.dead_letters = Counter(
            "cnc_backend_dead_letters_total",
            "Messages stored in dead_letters instead of readings, by reason.",
            ("reason",),
            registry=self.registry,
        )
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        self.batch_messages = Histogram(
            "cnc_backend_batch_messages",
            "Messages per fetched batch.",
            registry=self.registry,
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
        )
        self.commit_duration = Histogram(
            "cnc_backend_batch_commit_duration_seconds",
            "Seconds to write one batch to PostgreSQL and commit it.",
            registry=self.registry,
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
        self.last_message = Gauge(
            "cnc_backend_last_message_timestamp_seconds",
            "Unix time at which the last non-empty batch was fetched.",
            registry=self.registry,
        )

    def _init_reading_metrics(self) -> None:
        self.poll_to_commit = Histogram(
            "cnc_backend_poll_to_commit_seconds",
            "Seconds from a reading's poll time (edge clock) to its commit, for "
            "readings new to this process.",
            registry=self.registry,
            buckets=(
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
                900,
                3600,
                14400,
                86400,
            ),
        )
        self.newest_reading = Gauge(
            "cnc_backend_newest_reading_timestamp_seconds",
            "Poll time (edge clock) of the newest reading stored for each machine.",
            ("machine",),
            registry=self.registry,
        )
        self.last_seq = Gauge(
            "cnc_backend_last_sequence",
            "Sequence number of the newest reading stored for each machine "
            "(it restarts at 0 when the agent starts a new boot).",
            ("machine",),
            registry=self.registry,
        )
        self.reanchored = Counter(
            "cnc_backend_reanchored_readings_total",
            "Readings recorded while the host clock was not synchronised whose "
            "time was re-anchored on the monotonic clock.",
            ("machine",),
            registry=self.registry,
        )
        self.loss_reports = Counter(
            "cnc_backend_loss_reports_total",
            "Loss reports received from edge agents, by reason.",
            ("machine", "reason"),
            registry=self.registry,
        )
        self.reduced_records = Counter(
            "cnc_backend_reduced_records_total",
            "Reduced records stored (continuous values summarised near the "
            "edge's journal cap).",
            ("machine",),
            registry=self.registry,
        )
        self.gaps = Counter(
            "cnc_backend_sequence_gap_readings_total",
            "Sequence numbers skipped within an agent boot when a later reading "
            "was stored.",
            ("machine",),
            registry=self.registry,
        )
        self.gaps_filled = Counter(
            "cnc_backend_sequence_gap_filled_readings_total",
            "Skipped sequence numbers whose reading was stored later.",
            ("machine",),
            registry=self.registry,
        )

    def watch(self, service: BackendService) -> None:
        """Export the state and totals of ``service`` at each scrape."""
        self.registry.register(_ServiceCollector(service))

    # Hooks called by the service.

    def record_transition(self, source: str, dest: str, server: str | None) -> None:
        """Count a state change; ``server`` names what failed when entering RECONNECTING."""
        self.state_since = self.clock()
        self.transitions.labels(source, dest).inc()
        if dest == "RECONNECTING" and server is not None:
            self.reconnects.labels(server).inc()

    def record_fetch(self, count: int) -> None:
        self.batch_messages.observe(count)
        self.last_message.set(self.clock())

    def record_commit(
        self,
        rows: list[ReadingRow],
        dead_letters: list[DeadLetter],
        result: WriteResult,
        seconds: float,
        losses: Sequence[LossRow] = (),
    ) -> None:
        """Record one committed batch: duration, dead letters and its readings."""
        now = self.clock()
        self.commit_duration.observe(seconds)
        for letter in dead_letters:
            self.dead_letters.labels(letter.reason).inc()
        if result.rejected:
            self.dead_letters.labels(REJECTED_BY_DATABASE).inc(len(result.rejected))
        rejected = set(result.rejected)
        for index, row in enumerate(rows):
            if index not in rejected:
                self._record_row(row, now)
        for loss in losses:
            self.loss_reports.labels(loss.machine_id, loss.reason).inc()
        for machine, count in result.reduced_by_machine.items():
            self.reduced_records.labels(machine).inc(count)
        for machine, count in result.reanchored_by_machine.items():
            self.reanchored.labels(machine).inc(count)
        self.last_batch = {
            "at": now,
            "messages": len(rows) + len(dead_letters),
            "inserted": result.inserted,
            "duplicates": result.duplicates,
            "dead_lettered": result.dead_lettered,
            "seconds": round(seconds, 4),
        }

    def _record_row(self, row: ReadingRow, now: float) -> None:
        if row.machine_id not in self._machines:
            # Both gap series exist from the first reading on, so that
            # alerts subtracting one from the other find both.
            self._machines.add(row.machine_id)
            self.gaps.labels(row.machine_id)
            self.gaps_filled.labels(row.machine_id)
        step = self.sequences.observe(row.machine_id, row.boot_id, row.seq)
        if step.gap:
            self.gaps.labels(row.machine_id).inc(step.gap)
        if step.filled:
            self.gaps_filled.labels(row.machine_id).inc(step.filled)
        if not step.new:
            return
        polled = row.ts.timestamp()
        self.poll_to_commit.observe(max(now - polled, 0.0))
        if polled > self._newest.get(row.machine_id, 0.0):
            self._newest[row.machine_id] = polled
            self.newest_reading.labels(row.machine_id).set(polled)
            self.last_seq.labels(row.machine_id).set(row.seq)

    def record_pending(self, pending: int, ack_pending: int) -> None:
        self.pending.set(pending)
        self.ack_pending.set(ack_pending)
        self.consumer_pending = {
            "pending": pending,
            "ack_pending": ack_pending,
            "at": self.clock(),
        }


async def refresh_pending(
    service: BackendService, interval: float = PENDING_REFRESH_INTERVAL
) -> None:
    """Request the consumer's pending counts from JetStream every ``interval`` seconds.

    Runs until cancelled. While the service is not CONNECTED the gauges keep
    their last values, and the state metric shows why.
    """
    while True:
        await asyncio.sleep(interval)
        if service.state.name != "CONNECTED":
            continue
        try:
            pending, ack_pending = await service.nats.pending_counts()
        except Exception as exc:  # noqa: BLE001 - the serving loop handles NATS failures
            log.debug("pending counts failed: %s (%r)", service.nats.target, exc)
            continue
        service.metrics.record_pending(pending, ack_pending)
