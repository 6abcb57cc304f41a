"""The buffer process: owns the state machine and the offline journal.

Two threads share one lock:

- the intake thread takes readings from the poller and, under the lock,
  either hands them to the publisher (ONLINE) or appends them to
  ``current.jsonl`` (OFFLINE, SYNCING, stopping);
- the main thread reads the publisher's results, drives the state machine
  and runs the sync, which blocks it (not the poller, not the intake) until
  every file in ``sync/`` is acknowledged and deleted.

A live reading handed to the publisher is kept in ``inflight`` until its
PubAck; a failed publish puts it back into the journal. So every reading is
acknowledged by the broker or on disk, except for the ones inside this
process at the moment it is killed with SIGKILL: at most the readings in
``inflight`` (bounded by what the publisher can have outstanding within one
ack timeout) and those not yet read from the poller's queue.

Readings that will never be sent are reported as loss reports on the
control subject (cnc_edge.losses): drops at the journal cap or on a full
disk, quarantined lines between two readings of one boot, and the readings
of the previous boot that ended without a clean stop. The reports wait in
``losses.jsonl`` and go out while ONLINE, so always after a completed sync.

Once the journal reaches ``journal.reduce_at`` of ``journal.max_buffer_bytes``,
new readings from the poller pass through cnc_edge.reduce before they are
journaled: readings whose discrete values changed are kept in full and the
runs in between become reduced records. The readings of the reducer's open
window (at most ``journal.reduce_window`` seconds) are also written to
``reducing.jsonl`` until it closes, and a new buffer journals the ones it
finds there in full.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from transitions import EventData

from cnc_common.backoff import Backoff, RateLimitedCounter, not_logged
from cnc_common.coverage import loss_msg_id, loss_report
from cnc_edge.config import EdgeConfig
from cnc_edge.crashpoints import crash_point
from cnc_edge.fsm import EdgeState, build_machine
from cnc_edge.journal import (
    QUARANTINE,
    Journal,
    Loss,
    WindowFile,
    iso_ts_or_none,
    oldest_buffered_ts,
    read_journal,
    write_new_private_file,
)
from cnc_edge.losses import LossLog
from cnc_edge.metrics import BufferMetrics
from cnc_edge.process import parent_alive
from cnc_edge.reduce import Reducer, reduce_threshold

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class Buffer:
    # Set by transitions: the current EdgeState and the trigger methods.
    state: EdgeState

    def __init__(
        self,
        config: EdgeConfig,
        in_queue: Any,
        to_publisher: Any,
        from_publisher: Any,
        stop_event: Any,
        publisher_dead: Any,
        metrics: BufferMetrics | None = None,
        previous_poll: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or BufferMetrics(config.machine.id)
        self.in_queue = in_queue
        self.to_publisher = to_publisher
        self.from_publisher = from_publisher
        self.stop_event = stop_event
        self.publisher_dead = publisher_dead
        self.data_dir = config.data_dir
        self.journal = Journal(
            self.data_dir,
            fsync=config.journal.fsync,
            fsync_interval=config.journal.fsync_interval_ms / 1000,
            max_bytes=config.journal.max_buffer_bytes,
            full_policy=config.journal.full_policy,
            segment_bytes=config.journal.segment_bytes,
        )
        self.losses = LossLog(
            self.data_dir,
            fsync=config.journal.fsync,
            fsync_interval=config.journal.fsync_interval_ms / 1000,
        )
        #: Journal size in bytes from which readings are reduced; None: never.
        self.reduce_from = reduce_threshold(
            config.journal.max_buffer_bytes, config.journal.reduce_at
        )
        self.reducer = Reducer(
            config.journal.continuous_fields, config.journal.reduce_window
        )
        self.window_file = WindowFile(
            self.data_dir,
            fsync=config.journal.fsync,
            fsync_interval=config.journal.fsync_interval_ms / 1000,
        )
        self._window_write_log = RateLimitedCounter(interval=60.0)
        self.lock = threading.RLock()
        self.inflight: dict[str, bytes] = {}
        self.link_is_up = False
        self.stopping = False
        self.state_since = time.time()
        self.counters = {
            "received": 0,
            "published": 0,
            "journaled": 0,
            "replayed": 0,
            "publish_failed": 0,
            "quarantined": 0,
            "syncs": 0,
            "reduced": 0,
        }
        self.dropped: dict[str, int] = {}
        self._drop_log = RateLimitedCounter(interval=60.0)
        self._loss_log = RateLimitedCounter(interval=60.0)
        self._loss_fail_log = RateLimitedCounter(interval=60.0)
        self.loss_backoff = Backoff(initial=1.0, cap=60.0)
        self._loss_token = 0
        self._loss_awaiting: int | None = None
        self._loss_deadline = 0.0
        # The last good journal line replayed, and whether lines were
        # quarantined since: the pair around them bounds the lost readings.
        self._replayed_line: bytes | None = None
        self._quarantined_since = False
        # A failing publish can fail every batch for ack_timeout seconds, and
        # a full disk fails every state write; one line a minute is enough.
        self._publish_fail_log = RateLimitedCounter(interval=60.0)
        self._state_write_log = RateLimitedCounter(interval=60.0)
        self.last_sync: dict[str, Any] | None = None
        self.sync_backoff = Backoff(initial=0.5, cap=30.0)
        self.next_sync_attempt = 0.0
        self._token = 0
        self._awaiting: int | None = None
        self._replay_result: tuple[Any, ...] | None = None
        self._intake_done = threading.Event()
        self._last_state_write = 0.0
        build_machine(self, after_state_change="_on_state_change", send_event=True)
        self.metrics.record_start(self.state, config.journal.max_buffer_bytes)
        if previous_poll is not None:
            self._report_agent_down(previous_poll)
        self._recover_window()

    # State machine callbacks ------------------------------------------

    def _on_state_change(self, event: EventData) -> None:
        source = event.transition.source
        dest = event.transition.dest
        self.state_since = time.time()
        self.metrics.record_state(EdgeState[source], self.state)
        log.info(
            "state: %s -> %s (machine %s, trigger %s)",
            source,
            dest,
            self.config.machine.id,
            event.event.name,
        )
        self.write_state_file()

    # Intake thread ----------------------------------------------------

    def _intake_loop(self) -> None:
        while True:
            try:
                first = self.in_queue.get(timeout=0.2)
            except queue.Empty:
                if self._intake_done.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < 1000:
                try:
                    batch.append(self.in_queue.get_nowait())
                except queue.Empty:
                    break
            self._route(batch)

    def _route(self, batch: list[tuple[str, bytes]]) -> None:
        with self.lock:
            self.counters["received"] += len(batch)
            if self.state is EdgeState.ONLINE and not self.stopping:
                for rid, payload in batch:
                    self.inflight[rid] = payload
                self.to_publisher.put(("live", batch))
            else:
                self._journal_readings([payload for _, payload in batch])

    # Publisher events -------------------------------------------------

    def _next_event(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            return self.from_publisher.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "link":
            self.link_is_up = bool(event[1])
            if not self.link_is_up:
                with self.lock:
                    if self.may_link_down():
                        self.link_down()
        elif kind == "acked":
            with self.lock:
                for rid in event[1]:
                    self.inflight.pop(rid, None)
                self.counters["published"] += len(event[1])
        elif kind == "failed":
            self._journal_failed(event[1], event[2])
        elif kind == "replayed":
            if event[1] == self._awaiting:
                self._replay_result = event
        elif kind == "controlled":
            self._losses_published(event[1], event[2], event[3])

    def _append(self, payloads: list[bytes]) -> None:
        """Journal readings (lock held), counting and logging any that are dropped."""
        result = self.journal.append(payloads)
        self.counters["journaled"] += result.written
        self.metrics.record_append(result.written, result.dropped, result.reason)
        for loss in result.losses:
            self._record_journal_loss(loss)
        if not result.dropped:
            return
        reason = result.reason or "unknown"
        self.dropped[reason] = self.dropped.get(reason, 0) + result.dropped
        suppressed = self._drop_log.hit()
        if suppressed is not None:
            log.warning(
                "readings dropped: %d (machine %s, %s, policy %s, %d in total%s)",
                result.dropped,
                self.config.machine.id,
                reason,
                self.config.journal.full_policy,
                sum(self.dropped.values()),
                not_logged(suppressed),
            )

    # Reduction ------------------------------------------------------------

    def _sync_window(self) -> None:
        try:
            self.window_file.maybe_sync()
        except OSError as exc:
            log.warning("reduction window not synced: %s", exc)

    def _journal_readings(self, payloads: list[bytes]) -> None:
        """Journal new readings from the poller, reduced near the cap (lock held).

        Only readings in poll order go through the reducer. Failed live
        publishes are older than readings it may have seen, so they are
        journaled in full.
        """
        if self.reduce_from is None:
            self._append(payloads)
            return
        if self.journal.buffered_bytes() < self.reduce_from:
            self._flush_reducer(payloads)
            return
        items: list[bytes] = []
        window: list[bytes] = []
        closed = False
        for payload in payloads:
            lines, kept = self._reduce(payload)
            items.extend(lines)
            if len(lines) > int(kept):
                # A window closed: its readings are in a record in ``items``.
                closed, window = True, []
            if not kept:
                window.append(payload)
        # The record goes to the journal before its readings leave the window
        # file, so a crash in between journals them twice, never not at all.
        self._append(items)
        if closed:
            self.window_file.clear()
        self._write_window(window)

    def _reduce(self, payload: bytes) -> tuple[list[bytes], bool]:
        """Feed one reading to the reducer; return the lines to journal now.

        The flag is True when the reading is among them, kept in full, and
        False when it went into the open window.
        """
        try:
            reading = orjson.loads(payload)
            output = self.reducer.feed(reading)
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            # Journal it unreduced: a reading that cannot be reduced is
            # still a reading, and the reducer starts afresh after it.
            log.warning(
                "reduction skipped: %s (machine %s)", exc, self.config.machine.id
            )
            records = [self._encode_reduced(r) for r in self.reducer.flush()]
            return [*records, payload], True
        lines = [
            payload if item is reading else self._encode_reduced(item)
            for item in output
        ]
        return lines, any(item is reading for item in output)

    def _flush_reducer(self, payloads: list[bytes] | None = None) -> None:
        """Journal the open window as a record, then ``payloads`` (lock held)."""
        records = [self._encode_reduced(r) for r in self.reducer.flush()]
        self._append([*records, *(payloads or [])])
        if records:
            self.window_file.clear()

    def _write_window(self, lines: list[bytes]) -> None:
        try:
            self.window_file.append(lines)
        except OSError as exc:
            # The readings stay in the reducer, in memory only, until the
            # window closes into a journaled record.
            suppressed = self._window_write_log.hit()
            if suppressed is not None:
                log.warning(
                    "reduction window not written: %s (%s%s)",
                    self.window_file.path,
                    exc,
                    not_logged(suppressed),
                )

    def _recover_window(self) -> None:
        """Journal in full the open window a previous buffer left on disk."""
        readings = self.window_file.readings()
        if readings:
            with self.lock:
                self._append(readings)
                self.journal.sync()
            log.info(
                "reduction window recovered: %d readings journaled in full from %s",
                len(readings),
                self.window_file.path.name,
            )
        self.window_file.clear()

    def _encode_reduced(self, record: dict[str, Any]) -> bytes:
        self.counters["reduced"] += record["count"]
        return orjson.dumps(record)

    def _journal_failed(self, ids: list[str], reason: str) -> None:
        with self.lock:
            payloads = [self.inflight.pop(rid) for rid in ids if rid in self.inflight]
            self._append(payloads)
            self.counters["publish_failed"] += len(payloads)
            self.metrics.publish_failed.inc(len(payloads))
            suppressed = self._publish_fail_log.hit()
            if suppressed is not None:
                log.warning(
                    "publish failed: %d readings journaled (machine %s, %s%s)",
                    len(payloads),
                    self.config.machine.id,
                    reason,
                    not_logged(suppressed),
                )
            if self.may_link_down():
                self.link_down()

    # Sync ---------------------------------------------------------------

    def _maybe_sync(self) -> None:
        if self.stopping or not self.link_is_up:
            return
        if (
            self.state is not EdgeState.OFFLINE
            or time.monotonic() < self.next_sync_attempt
        ):
            return
        with self.lock:
            self.link_up()
        self.run_sync()

    def run_sync(self) -> None:
        """Replay everything on disk, then go ONLINE; blocks until done or failed."""
        started = time.monotonic()
        replayed = 0
        self._replayed_line = None
        self._quarantined_since = False
        try:
            while True:
                with self.lock:
                    self.journal.rotate()
                for path in self.journal.sync_files():
                    ok, count = self._replay_file(path)
                    replayed += count
                    if not ok:
                        self._abort_sync(f"replay of {path.name} incomplete")
                        return
                    crash_point("sync_before_remove")
                    with self.lock:
                        self.journal.remove(path)
                    log.info(
                        "sync file done: %s (%d readings acknowledged)",
                        path.name,
                        count,
                    )
                if not self._settle_inflight(self.config.nats.ack_timeout + 2):
                    self._abort_sync("live readings still unacknowledged")
                    return
                with self.lock:
                    # Readings in the reducer's open window must be on disk
                    # before ONLINE: nothing is fed to the reducer while
                    # ONLINE, so the window would stay open until the next
                    # outage.
                    self._flush_reducer()
                    if (
                        self.journal.current_size() == 0
                        and not self.journal.sync_files()
                    ):
                        self._finish_sync(started, replayed)
                        return
                # Readings arrived while replaying: rotate and go round again.
        except OSError as exc:
            log.error(
                "sync failed: %s (machine %s)",
                exc,
                self.config.machine.id,
                exc_info=True,
            )
            self._abort_sync(str(exc), failed=True)

    def _finish_sync(self, started: float, replayed: int) -> None:
        duration = time.monotonic() - started
        self.counters["syncs"] += 1
        self.counters["replayed"] += replayed
        self.metrics.record_sync("completed", duration, replayed)
        self.last_sync = {
            "at": time.time(),
            "readings": replayed,
            "seconds": round(duration, 3),
        }
        self.sync_backoff.reset()
        log.info(
            "sync complete: %d readings in %.2f s (machine %s)",
            replayed,
            duration,
            self.config.machine.id,
        )
        self.sync_done()

    def _abort_sync(self, reason: str, failed: bool = False) -> None:
        self.next_sync_attempt = time.monotonic() + self.sync_backoff.next_delay()
        with self.lock:
            if self.state is not EdgeState.SYNCING:
                return
            log.warning("sync aborted: %s (machine %s)", reason, self.config.machine.id)
            result = "failed" if failed or self.link_is_up else "interrupted"
            self.metrics.record_sync(result)
            if failed or self.link_is_up:
                self.sync_failed()
            else:
                self.link_down()

    def _replay_file(self, path: Path) -> tuple[bool, int]:
        """Replay one sync file from its saved progress; return (complete, count)."""

        def count_quarantined() -> None:
            self.counters["quarantined"] += 1
            self.metrics.quarantined.inc()
            self._quarantined_since = True

        start = self.journal.load_progress(path)
        if start:
            log.info("replay resumed: %s from byte %d", path.name, start)
        with self.lock:
            self.journal.replaying = path
        try:
            sent = 0
            chunk: list[tuple[str, bytes]] = []
            end = start
            size = self.config.journal.replay_chunk
            quarantine = self.data_dir / QUARANTINE
            lines = read_journal(path, quarantine, count_quarantined, start)
            for rid, line, offset in lines:
                if self._quarantined_since:
                    self._report_corrupt(path, line)
                self._replayed_line = line
                chunk.append((rid, line))
                end = offset
                if len(chunk) >= size:
                    if not self._replay_chunk(chunk):
                        return False, sent
                    sent += len(chunk)
                    chunk = []
                    self.journal.save_progress(path, end)
                    crash_point("replay_after_chunk")
            if chunk:
                if not self._replay_chunk(chunk):
                    return False, sent
                sent += len(chunk)
            return True, sent
        finally:
            with self.lock:
                self.journal.replaying = None

    def _replay_chunk(self, chunk: list[tuple[str, bytes]]) -> bool:
        """Send one chunk and wait for its result, handling other events meanwhile."""
        self._token += 1
        self._awaiting = self._token
        self._replay_result = None
        self.to_publisher.put(("replay", self._token, chunk))
        # The publisher responds within ack_timeout once it started the chunk;
        # the margin covers the queue and a busy machine.
        deadline = time.monotonic() + 2 * self.config.nats.ack_timeout + 10
        while self._replay_result is None:
            if self.state is not EdgeState.SYNCING or self._stop_requested():
                return False
            if time.monotonic() > deadline:
                log.warning(
                    "replay timed out: no result for a chunk of %d readings", len(chunk)
                )
                return False
            event = self._next_event(0.2)
            if event is not None:
                self._handle(event)
            self._housekeeping()
        return bool(self._replay_result[2])

    def _settle_inflight(self, timeout: float) -> bool:
        """Wait until every live reading sent earlier is acknowledged or journaled."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            if self.publisher_dead.is_set() or time.monotonic() > deadline:
                return False
            event = self._next_event(0.2)
            if event is not None:
                self._handle(event)
        return True

    # Loss reports ---------------------------------------------------------

    def _record_loss(self, report: dict[str, Any]) -> None:
        """Store a loss report until the broker acknowledges it (lock held)."""
        if not self.losses.add(report):
            return  # merged into a waiting report, which was counted and logged
        self.metrics.loss_reports.labels(self.config.machine.id, report["reason"]).inc()
        suppressed = self._loss_log.hit()
        if suppressed is not None:
            log.warning(
                "loss recorded: readings %d..%d of boot %s (machine %s, %s%s)",
                report["seq_start"],
                report["seq_end"],
                report["boot"],
                self.config.machine.id,
                report["reason"],
                not_logged(suppressed),
            )

    def _record_journal_loss(self, loss: Loss) -> None:
        self._record_loss(
            loss_report(
                machine=self.config.machine.id,
                boot=loss.boot,
                seq_start=loss.seq_start,
                seq_end=loss.seq_end,
                reason=loss.reason,
                ts_start=loss.ts_start,
                ts_end=loss.ts_end,
                detail=loss.detail,
            )
        )

    def _report_agent_down(self, last: dict[str, Any]) -> None:
        """Report the previous boot's readings, from 0 to its last poll.

        It goes out after the first sync, once everything that boot
        journaled is on the broker, so it marks LOST only the readings that
        boot never journaled or never saw acknowledged.
        """
        detail = f"previous boot ended; its last poll was seq {last['seq']}"
        with self.lock:
            self._record_loss(
                loss_report(
                    machine=self.config.machine.id,
                    boot=last["boot"],
                    seq_start=0,
                    seq_end=last["seq"],
                    reason="agent_down",
                    ts_end=iso_ts_or_none(last.get("ts")),
                    detail=detail,
                )
            )

    def _report_corrupt(self, path: Path, after: bytes) -> None:
        """Report the readings between the lines around a quarantined stretch."""
        self._quarantined_since = False
        if self._replayed_line is None:
            return
        before = _seq_bounds(self._replayed_line)
        following = _seq_bounds(after)
        if before is None or following is None or before[0] != following[0]:
            return  # another boot, or not a reading: the gap has no known bounds
        start, end = before[2] + 1, following[1] - 1
        if start > end:
            return
        detail = (
            f"quarantined line in {path.name} between seq {start - 1} and {end + 1}"
        )
        with self.lock:
            self._record_loss(
                loss_report(
                    machine=self.config.machine.id,
                    boot=before[0],
                    seq_start=start,
                    seq_end=end,
                    reason="corrupt_journal_line",
                    detail=detail,
                )
            )

    def _maybe_publish_losses(self) -> None:
        """Send the waiting loss reports while ONLINE, one batch at a time."""
        now = time.monotonic()
        if self.state is not EdgeState.ONLINE or self.stopping:
            return
        if now < self._loss_deadline:
            return
        with self.lock:
            batch = [(loss_msg_id(r), orjson.dumps(r)) for r in self.losses.pending]
        if not batch:
            return
        self._loss_token += 1
        self._loss_awaiting = self._loss_token
        # Like a replay chunk, the result comes within ack_timeout once the
        # publisher starts the batch; past this deadline the batch is resent.
        self._loss_deadline = now + 2 * self.config.nats.ack_timeout + 10
        self.to_publisher.put(("control", self._loss_token, batch))

    def _losses_published(self, token: int, acked: list[str], reason: str) -> None:
        if token != self._loss_awaiting:
            return
        self._loss_awaiting = None
        with self.lock:
            done = self.losses.acknowledge(set(acked))
            waiting = len(self.losses.pending)
        for report in done:
            log.info(
                "loss reported: readings %d..%d of boot %s (machine %s, %s)",
                report["seq_start"],
                report["seq_end"],
                report["boot"],
                self.config.machine.id,
                report["reason"],
            )
        if not waiting:
            self.loss_backoff.reset()
            self._loss_deadline = 0.0
            return
        # Reports that failed, or grew while in flight, go out again later.
        self._loss_deadline = time.monotonic() + self.loss_backoff.next_delay()
        if not reason:
            return
        suppressed = self._loss_fail_log.hit()
        if suppressed is not None:
            log.warning(
                "loss report publish failed: %d waiting (machine %s, %s%s)",
                waiting,
                self.config.machine.id,
                reason or "not acknowledged",
                not_logged(suppressed),
            )

    # Main loop and shutdown ---------------------------------------------

    def _stop_requested(self) -> bool:
        return self.stop_event.is_set() or not parent_alive(self.parent_pid)

    def _housekeeping(self) -> None:
        with self.lock:
            self.journal.maybe_sync()
            self.losses.maybe_sync()
            self._sync_window()
        if time.monotonic() - self._last_state_write >= 1.0:
            self.write_state_file()

    def run(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        intake = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
        intake.start()
        log.info("buffer started: %s (state %s)", self.data_dir, self.state.value)
        while not self._stop_requested():
            event = self._next_event(0.2)
            if event is not None:
                self._handle(event)
            self._maybe_sync()
            self._maybe_publish_losses()
            self._housekeeping()
        self._shutdown(intake)

    def _shutdown(self, intake: threading.Thread) -> None:
        """Put every reading this process holds on disk, then stop the publisher."""
        with self.lock:
            self.stopping = True
        self._intake_done.set()
        intake.join(timeout=10)
        if not self.publisher_dead.is_set():
            self._settle_inflight(self.config.nats.ack_timeout + 1)
        with self.lock:
            leftover = list(self.inflight.values())
            self.inflight.clear()
            self._flush_reducer(leftover)
            self.journal.close()
            self.window_file.close()
            self.losses.close()
        if leftover:
            log.info("stop: %d unacknowledged readings journaled", len(leftover))
        self.to_publisher.put(("stop",))
        self.write_state_file()
        log.info(
            "buffer stopped: %s (state %s)", self.config.machine.id, self.state.value
        )

    # Status -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sync_files = self.journal.sync_files()
        return {
            "machine": self.config.machine.id,
            "pid": os.getpid(),
            "state": self.state.value,
            "since": self.state_since,
            "link_up": self.link_is_up,
            "inflight": len(self.inflight),
            "buffered_bytes": self.journal.buffered_bytes(),
            "sync_files": len(sync_files),
            "oldest_buffered_ts": oldest_buffered_ts(self.data_dir),
            "counters": dict(self.counters),
            "dropped": dict(self.dropped),
            "loss_reports_pending": len(self.losses.pending),
            "last_sync": self.last_sync,
            "updated": time.time(),
        }

    def write_state_file(self) -> None:
        """Write state.json atomically, for ``cnc-edge status`` and cnc-demo."""
        self._last_state_write = time.monotonic()
        target = self.data_dir / STATE_FILE
        tmp = target.with_suffix(".tmp")
        try:
            with self.lock:
                status = self.status()
                data = orjson.dumps(status, option=orjson.OPT_INDENT_2)
            self.metrics.record_status(status)
            write_new_private_file(tmp, data)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and _overwrite(target, data):
                return
            suppressed = self._state_write_log.hit()
            if suppressed is not None:
                log.warning(
                    "state file write failed: %s (%s%s)",
                    target,
                    exc,
                    not_logged(suppressed),
                )


def _seq_bounds(line: bytes) -> tuple[str, int, int] | None:
    """Return (boot, first seq, last seq) of a reading or reduced record."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("boot"), str):
        return None
    if data.get("type") == "reduced":
        start, end = data.get("seq_start"), data.get("seq_end")
    else:
        start = end = data.get("seq")
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return data["boot"], start, end


def _overwrite(target: Path, data: bytes) -> bool:
    """Rewrite a file in place, which needs no free space while it does not grow.

    On a full disk the atomic write-and-rename fails, yet the state file is
    exactly what an operator reads to find out why. A reader may see a torn
    file for a moment, and retries.
    """
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def run_buffer(
    config: EdgeConfig,
    in_queue: Any,
    to_publisher: Any,
    from_publisher: Any,
    stop_event: Any,
    publisher_dead: Any,
    parent_pid: int,
    previous_poll: dict[str, Any] | None = None,
) -> None:
    """Entry point of the buffer process.

    ``previous_poll`` is the last poll of the previous boot (``poller.last``),
    read by the parent before the new poller overwrote it.
    """
    from cnc_edge.process import child_setup

    child_setup(config, "buffer")
    buffer = Buffer(
        config,
        in_queue,
        to_publisher,
        from_publisher,
        stop_event,
        publisher_dead,
        previous_poll=previous_poll,
    )
    buffer.run(parent_pid)
