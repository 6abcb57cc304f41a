"""JetStream consumer and the backend's state machine.

The service pulls batches from a durable JetStream consumer, writes each batch
to PostgreSQL in one transaction and acknowledges the messages only after the
commit. A batch that fails to commit is never acknowledged, so JetStream
redelivers it after ``ack_wait``, and the idempotent insert skips whatever was
already stored. Poison messages are stored as dead letters in the same
transaction and terminated after the commit, so they are not redelivered.

States and what moves between them::

    STARTING --connection_ready--> CONNECTED --connection_lost--> RECONNECTING
    RECONNECTING --connection_ready--> CONNECTED
    any of the above --stop_requested--> DRAINING --drain_finished--> STOPPED
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from transitions import EventData

from cnc_backend.config import BackendConfig, NatsConfig, describe_nats_url
from cnc_backend.errors import BackendError, NatsUnavailable, StoreUnavailable
from cnc_backend.fsm import State, build_machine
from cnc_backend.metrics import BackendMetrics
from cnc_backend.pull import PullInbox
from cnc_backend.store import (
    REJECTED_BY_DATABASE,
    DeadLetter,
    LossRow,
    Origin,
    ReadingRow,
    ReducedRow,
    Store,
    WriteResult,
)
from cnc_common.backoff import Backoff, RateLimitedCounter
from cnc_common.coverage import (
    DELIVERIES,
    DELIVERY_HEADER,
    LIVE,
    control_subject,
    validate_loss,
    validate_reduced,
)
from cnc_common.errors import InvalidReading
from cnc_common.natsconn import connect_options, describe_nats_error
from cnc_common.reading import validate

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between checks that the durable consumer still exists while no
#: messages arrive. A deleted consumer looks like an empty one to fetch, because
#: nats-py turns the server's 409 status into a plain fetch timeout.
CONSUMER_CHECK_INTERVAL = 5.0

#: Seconds allowed for one JetStream API request (stream or consumer info).
JS_API_TIMEOUT = 5.0

#: Part of drain_timeout kept back for closing the connections.
CLOSE_RESERVE = 1.0

#: Seconds between checks for a PostgreSQL request stalled without a response.
STORE_WATCH_INTERVAL = 0.5

#: Errors nats-py raises for a lost connection or a failed JetStream request.
NATS_FAILURES = (nats.errors.Error, OSError, TimeoutError)


def _warn_repeated(counter: RateLimitedCounter, msg: str, *args: Any) -> None:
    """Log a repeated failure at WARNING, at most once per counter interval."""
    suppressed = counter.hit()
    if suppressed:
        log.warning(msg + " [%d more since the last such line]", *args, suppressed)
    elif suppressed == 0:
        log.warning(msg, *args)


@dataclass
class Counters:
    """Totals since the service started; ``last_batch_at`` is a Unix time."""

    fetched: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    reconnects: int = 0
    # The stream or the durable consumer was missing after this process had
    # used it, and was created again: the server lost its store, or someone
    # deleted it. Messages the server held then are gone.
    stream_recreated: int = 0
    consumer_recreated: int = 0
    last_batch_at: float | None = None


@dataclass
class PreparedBatch:
    """Fetched messages split into readings, ledger records and dead letters.

    Readings, reduced records and loss reports are all acknowledged after
    the commit. ``row_messages`` lists the messages of ``rows`` in order,
    and ``other_messages`` lists those of ``reduced`` and ``losses``.
    """

    rows: list[ReadingRow] = field(default_factory=list)
    row_messages: list[Msg] = field(default_factory=list)
    reduced: list[ReducedRow] = field(default_factory=list)
    losses: list[LossRow] = field(default_factory=list)
    other_messages: list[Msg] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    dead_messages: list[Msg] = field(default_factory=list)

    def settlement(self, result: WriteResult) -> tuple[list[Msg], list[Msg]]:
        """Return (messages to ack, messages to terminate) after a commit."""
        rejected = set(result.rejected)
        ack = [m for i, m in enumerate(self.row_messages) if i not in rejected]
        ack += self.other_messages
        term = self.dead_messages + [self.row_messages[i] for i in sorted(rejected)]
        return ack, term


def prepare_batch(messages: list[Msg], prefix: str, max_payload: int) -> PreparedBatch:
    """Decode and check each message; sort it by what it is."""
    batch = PreparedBatch()
    for msg in messages:
        origin = _origin(msg)
        outcome = classify(origin, prefix, max_payload, _delivery(msg))
        if isinstance(outcome, ReadingRow):
            batch.rows.append(outcome)
            batch.row_messages.append(msg)
        elif isinstance(outcome, DeadLetter):
            batch.dead_letters.append(outcome)
            batch.dead_messages.append(msg)
        else:
            if isinstance(outcome, ReducedRow):
                batch.reduced.append(outcome)
            else:
                batch.losses.append(outcome)
            batch.other_messages.append(msg)
    return batch


def _origin(msg: Msg) -> Origin:
    return Origin(msg.subject, msg.data, message=msg)


def _delivery(msg: Msg) -> str:
    """Return the message's Cnc-Delivery header, ``live`` when it has none."""
    value = (msg.headers or {}).get(DELIVERY_HEADER, LIVE)
    return value if value in DELIVERIES else LIVE


Outcome = ReadingRow | ReducedRow | LossRow | DeadLetter


def classify(
    origin: Origin, prefix: str, max_payload: int, delivery: str = LIVE
) -> Outcome:
    """Turn one payload into a row, or into a dead letter with a reason label.

    Reasons: ``oversize``, ``invalid_json``, ``schema`` and
    ``subject_mismatch`` (the machine id differs from the subject's token).
    """
    size = len(origin.raw)
    if size > max_payload:
        detail = f"payload is {size} bytes, limit is {max_payload}"
        return DeadLetter(origin, "oversize", detail)
    try:
        data = orjson.loads(origin.raw)
    except orjson.JSONDecodeError as exc:
        return DeadLetter(origin, "invalid_json", str(exc))
    kind = data.get("type", "reading") if isinstance(data, dict) else "reading"
    try:
        if kind == "reading":
            reading = validate(data)
        elif kind == "reduced":
            reading = validate_reduced(data)
        elif kind == "loss":
            reading = validate_loss(data)
        else:
            raise InvalidReading("schema", f"unknown message type {kind!r}")
    except InvalidReading as exc:
        return DeadLetter(origin, exc.reason, exc.detail)
    expected = f"{prefix}.{reading['machine']}"
    if kind == "loss":
        expected = control_subject(prefix, reading["machine"])
    if origin.subject != expected:
        detail = f"machine {reading['machine']!r} published on {origin.subject!r}"
        if kind == "loss":
            detail = (
                f"loss report published on {origin.subject!r}, expected {expected!r}"
            )
        elif origin.subject == control_subject(prefix, reading["machine"]):
            detail = f"{kind} published on {origin.subject!r}, expected {expected!r}"
        return DeadLetter(origin, "subject_mismatch", detail)
    if kind == "reduced":
        return _reduced_row(reading, origin)
    if kind == "loss":
        return _loss_row(reading, origin)
    return _reading_row(reading, origin, delivery)


def _reading_row(reading: dict[str, Any], origin: Origin, delivery: str) -> ReadingRow:
    ctrl_ts = reading.get("ctrl_ts")
    return ReadingRow(
        id=reading["id"],
        machine_id=reading["machine"],
        boot_id=reading["boot"],
        seq=reading["seq"],
        ts=datetime.fromisoformat(reading["ts"]),
        status=reading["status"],
        fields_json=orjson.dumps(reading["fields"]).decode(),
        errors_json=orjson.dumps(reading["errors"]).decode(),
        origin=origin,
        delivery=delivery,
        condition=reading.get("condition", "ok"),
        host_boot=reading.get("host_boot", ""),
        mono=float(reading["mono"]),
        clock_synced=reading.get("clock_synced", True),
        ctrl_ts=datetime.fromisoformat(ctrl_ts) if ctrl_ts else None,
    )


def _reduced_row(record: dict[str, Any], origin: Origin) -> ReducedRow:
    return ReducedRow(
        machine_id=record["machine"],
        boot_id=record["boot"],
        seq_start=record["seq_start"],
        seq_end=record["seq_end"],
        count=record["count"],
        ts_start=datetime.fromisoformat(record["ts_start"]),
        ts_end=datetime.fromisoformat(record["ts_end"]),
        stats_json=orjson.dumps(record.get("stats", {})).decode(),
        last_json=orjson.dumps(record.get("last", {})).decode(),
        origin=origin,
    )


def _loss_row(report: dict[str, Any], origin: Origin) -> LossRow:
    def when(key: str) -> datetime | None:
        value = report.get(key)
        return datetime.fromisoformat(value) if value else None

    return LossRow(
        machine_id=report["machine"],
        boot_id=report["boot"],
        seq_start=report["seq_start"],
        seq_end=report["seq_end"],
        reason=report["reason"],
        ts_start=when("ts_start"),
        ts_end=when("ts_end"),
        detail=report.get("detail", ""),
        origin=origin,
    )


class JetStreamConsumer:
    """The NATS side: connection, stream, durable pull consumer, fetch and ack.

    After the first connection nats-py reconnects by itself, without an
    attempt limit and with delays from ``backoff``. ``on_disconnected`` and
    ``on_reconnected`` report those events to the service, and
    ``on_recreated`` is called with "stream" or "consumer" when setup() had
    to create one that this object had found before.
    """

    def __init__(
        self,
        config: NatsConfig,
        backoff: Backoff,
        on_disconnected: Callable[[], None],
        on_reconnected: Callable[[], None],
        on_recreated: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.target = describe_nats_url(config.url)
        self.backoff = backoff
        self.needs_setup = True
        self._on_disconnected = on_disconnected
        self._on_reconnected = on_reconnected
        self._on_recreated = on_recreated
        self._stream_seen = False
        self._consumer_seen = False
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: PullInbox | None = None
        self._attempt_failed: asyncio.Event | None = None
        self._errors = RateLimitedCounter(interval=60.0)
        self._last_consumer_check = 0.0

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def is_reconnecting(self) -> bool:
        """Whether nats-py is retrying a connection that was established once."""
        return self._nc is not None and not self._nc.is_closed and not self.is_connected

    async def connect(self) -> None:
        """Make one connection attempt unless a client already exists."""
        if self._nc is not None and not self._nc.is_closed:
            return
        nc = Client()
        self._attempt_failed = asyncio.Event()
        attempt = asyncio.create_task(nc.connect(**self._connect_options(nc)))
        failed = asyncio.create_task(self._attempt_failed.wait())
        try:
            done, _ = await asyncio.wait(
                {attempt, failed},
                timeout=self.config.connect_timeout + 1.0,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            failed.cancel()
        if attempt in done and attempt.exception() is None:
            self._attempt_failed = None
            self._nc = nc
            self._js = nc.jetstream(timeout=JS_API_TIMEOUT)
            self._sub = None
            self.needs_setup = True
            log.info("connected: nats %s", self.target)
            return
        await self._abandon(nc, attempt)
        if nc.last_error is None:
            raise NatsUnavailable(self.target, "connect timed out")
        problem = f"connect failed, {describe_nats_error(nc.last_error)}"
        raise NatsUnavailable(self.target, problem, nc.last_error)

    async def _abandon(self, nc: Client, attempt: asyncio.Task[None]) -> None:
        # With max_reconnect_attempts=-1 nats-py retries the first connection
        # forever on its own fixed delay. The service wants one attempt per
        # backoff step, so it cancels the attempt after the first failure.
        self._attempt_failed = None
        attempt.cancel()
        try:
            await attempt
        except BaseException:
            pass  # The failure was already reported through error_cb.
        try:
            await asyncio.wait_for(nc.close(), timeout=1.0)
        except Exception:
            pass  # A half-open client may fail to close; it is dropped anyway.

    def _connect_options(self, nc: Client) -> dict[str, Any]:
        cfg = self.config

        # nats-py passes no client to its callbacks. Binding them to ``nc``
        # keeps a client abandoned by connect() from reporting on the
        # current one.
        async def disconnected() -> None:
            if nc is self._nc:
                self._on_disconnected()

        async def reconnected() -> None:
            if nc is self._nc:
                await self._reconnected_cb()

        async def closed() -> None:
            if nc is self._nc:
                await self._closed_cb()

        return {
            "servers": [url.strip() for url in cfg.url.split(",")],
            "name": "cnc-backend",
            "connect_timeout": cfg.connect_timeout,
            "ping_interval": cfg.ping_interval,
            "max_outstanding_pings": cfg.max_outstanding_pings,
            "max_reconnect_attempts": -1,
            # Only the first connection waits this long between attempts, and
            # connect() cancels that wait; reconnects use _next_server's delay.
            "reconnect_time_wait": 3600,
            "reconnect_to_server_handler": self._next_server,
            "error_cb": self._error_cb,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "closed_cb": closed,
            **connect_options(cfg, cfg.url),
        }

    def _next_server(
        self, servers: list[Any], info: dict[str, Any]
    ) -> tuple[Any, float]:
        # nats-py calls this before every reconnect attempt. Rotate through
        # the configured servers and wait a jittered, capped delay.
        server = servers[self.backoff.attempt % len(servers)] if servers else None
        return server, self.backoff.next_delay()

    async def _error_cb(self, exc: Exception) -> None:
        if self._attempt_failed is not None:
            # A failed first attempt: connect() raises and the service logs it.
            self._attempt_failed.set()
            return
        _warn_repeated(
            self._errors, "nats error: %s (%s)", self.target, exc or type(exc).__name__
        )

    async def _reconnected_cb(self) -> None:
        self.backoff.reset()
        self.needs_setup = True
        log.info("reconnected: nats %s", self.target)
        self._on_reconnected()

    async def _closed_cb(self) -> None:
        log.warning("closed: nats %s (client gave up; connecting anew)", self.target)
        self._nc = None
        self._sub = None
        self._on_disconnected()

    async def setup(self) -> None:
        """Create the stream and the durable consumer if missing, then bind."""
        if not self.needs_setup:
            return
        try:
            await self._ensure_stream()
            await self._ensure_consumer()
            await self._bind()
        except NATS_FAILURES as exc:
            problem = "stream or consumer setup failed"
            raise NatsUnavailable(self.target, problem, exc) from exc
        self.needs_setup = False
        self._last_consumer_check = time.monotonic()

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        cfg = self.config
        try:
            await self._js.stream_info(cfg.stream)
            self._stream_seen = True
            return
        except nats.js.errors.NotFoundError:
            pass
        await self._js.add_stream(
            api.StreamConfig(
                name=cfg.stream,
                subjects=[f"{cfg.subject_prefix}.>"],
                storage=api.StorageType.FILE,
                duplicate_window=cfg.duplicate_window,
                num_replicas=cfg.stream_replicas,
            )
        )
        if self._stream_seen:
            self._recreated("stream", cfg.stream, "the messages it held are gone")
        else:
            log.info(
                "created: stream %s (subjects %s.>, %d replicas)",
                cfg.stream,
                cfg.subject_prefix,
                cfg.stream_replicas,
            )
        self._stream_seen = True

    def _recreated(self, kind: str, name: str, loss: str) -> None:
        log.warning(
            "recreated: %s %s on nats %s (it was missing because the server "
            "lost its store or someone deleted it; %s)",
            kind,
            name,
            self.target,
            loss,
        )
        if self._on_recreated is not None:
            self._on_recreated(kind)

    def _consumer_config(self) -> api.ConsumerConfig:
        cfg = self.config
        return api.ConsumerConfig(
            name=cfg.durable,
            durable_name=cfg.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=cfg.ack_wait,
            max_deliver=cfg.max_deliver,
            filter_subject=f"{cfg.subject_prefix}.>",
            # Room for two processes, each with a batch being written and the
            # next one fetched meanwhile.
            max_ack_pending=max(1000, 4 * cfg.batch_size),
        )

    async def _ensure_consumer(self) -> None:
        assert self._js is not None
        cfg = self.config
        wanted = self._consumer_config()
        try:
            info = await self._js.consumer_info(cfg.stream, cfg.durable)
        except nats.js.errors.NotFoundError:
            await self._js.add_consumer(cfg.stream, wanted)
            if self._consumer_seen:
                self._recreated(
                    "consumer",
                    cfg.durable,
                    "delivery starts again at the first message of the stream",
                )
            else:
                log.info("created: consumer %s on stream %s", cfg.durable, cfg.stream)
            self._consumer_seen = True
            return
        self._consumer_seen = True
        current = info.config
        if (current.ack_wait, current.max_deliver) == (
            wanted.ack_wait,
            wanted.max_deliver,
        ):
            return
        try:
            await self._js.add_consumer(cfg.stream, wanted)
            # Every backend on this durable shares these settings, so a
            # difference usually means one host's config has drifted.
            log.warning(
                "updated: consumer %s (ack_wait %g s, max_deliver %d; it had "
                "ack_wait %g s, max_deliver %d; all backends on it now use the new values)",
                cfg.durable,
                cfg.ack_wait,
                cfg.max_deliver,
                current.ack_wait,
                current.max_deliver,
            )
        except nats.js.errors.BadRequestError as exc:
            log.warning(
                "update failed: consumer %s keeps its settings (%s)", cfg.durable, exc
            )

    async def _bind(self) -> None:
        # nats-py renews the subscription itself after a reconnect, and the
        # consumer keeps its name when it is recreated, so one binding per
        # client is enough.
        assert self._nc is not None
        if self._sub is not None:
            return
        inbox = PullInbox(self._nc, self.config.stream, self.config.durable)
        await inbox.start()
        self._sub = inbox

    async def fetch(self) -> list[Msg]:
        """Fetch up to one batch; return [] when none arrived within the timeout."""
        if self._sub is None or self.needs_setup:
            raise NatsUnavailable(self.target, "fetch before setup")
        try:
            messages = await self._sub.fetch(
                self.config.batch_size, self.config.fetch_timeout
            )
        except NATS_FAILURES as exc:
            # A 503 (no responders) means no consumer took the pull request,
            # for example because it was deleted. Checking the stream and the
            # consumer before the next fetch recreates whichever is missing.
            self.needs_setup = True
            raise NatsUnavailable(self.target, "fetch failed", exc) from exc
        if not messages and not self.is_connected:
            # An empty fetch looks the same as a request lost with the
            # connection, and only the latter is a failure.
            raise NatsUnavailable(self.target, "fetch failed (disconnected)")
        return messages

    async def check_consumer(self) -> None:
        """Check now and then that the consumer exists; raise NatsUnavailable if not."""
        now = time.monotonic()
        if now - self._last_consumer_check < CONSUMER_CHECK_INTERVAL:
            return
        self._last_consumer_check = now
        assert self._js is not None
        try:
            await self._js.consumer_info(self.config.stream, self.config.durable)
        except NATS_FAILURES as exc:
            self.needs_setup = True
            raise NatsUnavailable(self.target, "consumer check failed", exc) from exc

    async def pending_counts(self) -> tuple[int, int]:
        """Return the consumer's (num_pending, num_ack_pending) from consumer_info.

        Raises NatsUnavailable before the first connection, and the nats-py
        errors of a failed request.
        """
        if self._js is None:
            raise NatsUnavailable(self.target, "pending counts before connecting")
        info = await self._js.consumer_info(self.config.stream, self.config.durable)
        return info.num_pending or 0, info.num_ack_pending or 0

    async def settle(self, ack: list[Msg], term: list[Msg]) -> bool:
        """Acknowledge stored messages and terminate dead letters; True if sent.

        A lost acknowledgement is not an error: JetStream redelivers the
        message after ack_wait and the insert skips it as a duplicate.
        """
        try:
            for msg in ack:
                await msg.ack()
            for msg in term:
                await msg.term()
            if self.is_connected:
                assert self._nc is not None
                await self._nc.flush(timeout=int(JS_API_TIMEOUT))
        except NATS_FAILURES as exc:
            # str() of some nats-py errors includes the whole message.
            log.warning(
                "ack failed: %d messages (%s); they are redelivered after ack_wait",
                len(ack) + len(term),
                type(exc).__name__,
            )
            return False
        return True

    async def close(self) -> None:
        """Close the connection, sending whatever acks are still buffered."""
        nc, self._nc = self._nc, None
        self._sub = None
        if nc is None or nc.is_closed:
            return
        try:
            await nc.close()
        except NATS_FAILURES as exc:
            log.warning("close failed: nats %s (%s)", self.target, exc)
        log.info("closed: nats %s", self.target)


class _Stopped(Exception):
    """A stop was requested while the service waited."""


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class BackendService:
    """The backend: JetStream in, PostgreSQL out, under a state machine.

    Run it with ``await service.run()`` and stop it with
    ``service.request_stop()`` from the same event loop. ``state`` and
    ``counters`` may be read at any time.
    """

    state: State

    def __init__(
        self,
        config: BackendConfig,
        store: Store | None = None,
        metrics: BackendMetrics | None = None,
    ) -> None:
        self.config = config
        self.counters = Counters()
        self.metrics = metrics or BackendMetrics()
        self.metrics.watch(self)
        self.failure: str | None = None
        self.store = store or Store(config.postgres)
        svc = config.service
        self._backoff = Backoff(initial=svc.reconnect_initial, cap=svc.reconnect_cap)
        self.nats = JetStreamConsumer(
            config.nats,
            Backoff(initial=svc.reconnect_initial, cap=svc.reconnect_cap),
            on_disconnected=self._nats_disconnected,
            on_reconnected=self._nats_reconnected,
            on_recreated=self._nats_recreated,
        )
        # One thread, so that psycopg2 calls on the connection never overlap.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cnc-backend-db")
        # The batch being written and acknowledged while the next one is
        # fetched. There is at most one at a time.
        self._writing: asyncio.Task[bool] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._retries = RateLimitedCounter(interval=60.0)
        self._machine = build_machine(
            self, send_event=True, after_state_change="_log_state_change"
        )

    # State machine hooks and callbacks.

    def _log_state_change(self, event: EventData) -> None:
        assert event.transition is not None
        source = event.transition.source
        if source == self.state.name:
            return
        waiting = event.kwargs.get("waiting")
        self.metrics.record_transition(source, self.state.name, waiting)
        if self.state is State.RECONNECTING:
            self.counters.reconnects += 1
            detail = f"{self.failure}; waiting for {event.kwargs.get('waiting')}"
        elif self.state is State.CONNECTED:
            detail = f"nats {self.nats.target}, postgres {self.store.target}"
        elif self.state is State.DRAINING:
            detail = f"deadline {self.config.service.drain_timeout:g} s"
        else:
            detail = f"{self.counters.inserted} readings stored in total"
        log.info("state: %s -> %s (%s)", source, self.state.name, detail)

    def _nats_disconnected(self) -> None:
        self._lost(NatsUnavailable(self.nats.target, "connection lost"))

    def _nats_reconnected(self) -> None:
        self._wake.set()

    def _nats_recreated(self, kind: str) -> None:
        if kind == "stream":
            self.counters.stream_recreated += 1
        else:
            self.counters.consumer_recreated += 1

    def _lost(self, exc: BackendError) -> None:
        """Enter RECONNECTING, or log the repeated failure if already there."""
        if self.state in (State.DRAINING, State.STOPPED):
            return
        waiting = "postgres" if isinstance(exc, StoreUnavailable) else "nats"
        if self.state is State.RECONNECTING:
            _warn_repeated(self._retries, "reconnect failed: %s", exc)
            return
        self.failure = str(exc)
        self.connection_lost(waiting=waiting)  # type: ignore[attr-defined]

    # Public API.

    @property
    def stop_is_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Start draining; run() returns once the drain is done or timed out."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.state in (State.STARTING, State.CONNECTED, State.RECONNECTING):
            self.stop_requested()  # type: ignore[attr-defined]

    async def run(self) -> bool:
        """Serve until request_stop(); return False if the drain timed out."""
        serve = asyncio.create_task(self._serve())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({serve, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if serve.done() and not self._stop.is_set():
            # _serve returns after a stop, possibly before this coroutine
            # resumes, which is the normal drain below. Returning without a
            # stop is a bug: close and raise.
            await self._close(CLOSE_RESERVE)
            serve.result()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.service.drain_timeout
        drained = await self._finish_batch(
            serve, deadline - CLOSE_RESERVE - loop.time()
        )
        await self._close(max(deadline - loop.time(), 0.1))
        self.drain_finished()  # type: ignore[attr-defined]
        return drained

    async def _finish_batch(self, serve: asyncio.Task[None], timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(serve), timeout=max(timeout, 0.1))
            return True
        except TimeoutError:
            log.error(
                "drain timed out: batch in hand not finished after %g s; "
                "JetStream redelivers it after ack_wait",
                self.config.service.drain_timeout,
            )
            serve.cancel()
            # Free the database thread, so that closing does not queue
            # behind a request the server may never respond to.
            self.store.abort_stalled_request(force=True)
            return False

    async def _close(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.nats.close(), timeout=timeout)
        except TimeoutError:
            log.warning("close timed out: nats %s", self.nats.target)
        loop = asyncio.get_running_loop()
        closing = loop.run_in_executor(self._executor, self.store.close)
        try:
            await asyncio.wait_for(closing, timeout=timeout)
        except TimeoutError:
            log.warning("close timed out: postgres %s", self.store.target)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # The serving loop.

    async def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self.state is State.CONNECTED:
                    await self._run_one_batch()
                else:
                    await self._recover()
        finally:
            # A stop drains the batch in flight. On a drain timeout run()
            # cancels this task, and the cancellation reaches the write too.
            await self._finish_write()

    async def _recover(self) -> None:
        """Make one attempt to bring both connections up, or wait a backoff step."""
        try:
            if self.nats.is_reconnecting:
                # nats-py is reconnecting on its own; wait for it to report.
                await self._sleep(self.config.service.reconnect_cap)
                return
            await self._until_stopped(self._connect_all())
        except _Stopped:
            return
        except BackendError as exc:
            # Includes MigrationError, so a broken migration is retried and
            # logged rather than crash-looping the process.
            self._lost(exc)
            await self._sleep(self._backoff.next_delay())
            return
        if self._stop.is_set():
            # The stop arrived as the connections came up; the state is
            # DRAINING already, and connection_ready() is invalid there.
            return
        self.failure = None
        self.connection_ready()  # type: ignore[attr-defined]

    async def _connect_all(self) -> None:
        await self._in_thread(self.store.connect)
        await self.nats.connect()
        if not self.nats.is_connected:
            raise NatsUnavailable(self.nats.target, "connection lost")
        await self.nats.setup()

    async def _run_one_batch(self) -> None:
        """Fetch and decode one batch, then start writing it.

        The fetch and the decoding overlap the write of the previous batch,
        which runs as a task. The previous batch is committed and settled
        before this one is written, so at most one batch is written at a time
        and acknowledgements go out in the order of the commits.
        """
        # A stop does not cancel the fetch: messages the server already sent
        # for it would sit unacknowledged until ack_wait. fetch_timeout is
        # checked to be below drain_timeout, so waiting for it fits the drain.
        try:
            messages = await self.nats.fetch()
            # The backoff is reset here rather than when the connections come
            # up, so a failure that connecting does not reveal, such as a
            # fetch rejected every time, is retried with growing delays.
            self._backoff.reset()
            if not messages:
                await self.nats.check_consumer()
                return
        except NatsUnavailable as exc:
            await self._finish_write()
            self._lost(exc)
            await self._sleep(self._backoff.next_delay())
            return
        # From here on the batch is in hand: a stop request waits for it.
        cfg = self.config.nats
        self.counters.fetched += len(messages)
        self.metrics.record_fetch(len(messages))
        batch = prepare_batch(messages, cfg.subject_prefix, cfg.max_payload_bytes)
        if not await self._finish_write():
            # Writing the previous batch failed, so PostgreSQL is down. This
            # batch stays unacknowledged, and JetStream redelivers it.
            log.warning(
                "not written: batch of %d messages (postgres write failed); "
                "JetStream redelivers it after ack_wait",
                len(messages),
            )
            return
        self._writing = asyncio.create_task(self._store_batch(messages, batch))

    async def _finish_write(self) -> bool:
        """Wait for the batch in flight to settle and return whether it was written."""
        writing, self._writing = self._writing, None
        if writing is None:
            return True
        return await writing

    async def _store_batch(self, messages: list[Msg], batch: PreparedBatch) -> bool:
        """Write a batch, settle its messages and return whether it was written."""
        started = time.monotonic()
        try:
            result = await self._in_thread(
                self.store.write_batch,
                batch.rows,
                batch.dead_letters,
                batch.reduced,
                batch.losses,
            )
        except BackendError as exc:
            # Nothing is acknowledged: JetStream redelivers after ack_wait.
            self._lost(exc)
            return False
        seconds = time.monotonic() - started
        self.metrics.record_commit(
            batch.rows, batch.dead_letters, result, seconds, batch.losses
        )
        ack, term = batch.settlement(result)
        await self.nats.settle(ack, term)
        self._count(result)
        if result.dead_lettered:
            reasons = {letter.reason for letter in batch.dead_letters}
            if result.rejected:
                reasons.add(REJECTED_BY_DATABASE)
            log.warning(
                "dead-lettered: %d of %d messages (reasons %s)",
                result.dead_lettered,
                len(messages),
                ", ".join(sorted(reasons)),
            )
        return True

    def _count(self, result: WriteResult) -> None:
        counters = self.counters
        counters.inserted += result.inserted
        counters.duplicates += result.duplicates
        counters.dead_lettered += result.dead_lettered
        counters.batches += 1
        counters.last_batch_at = time.time()
        log.debug(
            "stored: batch %d (%d inserted, %d duplicates, %d dead-lettered)",
            counters.batches,
            result.inserted,
            result.duplicates,
            result.dead_lettered,
        )

    # Helpers.

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        # psycopg2 blocks; running it here keeps the event loop, and with it
        # the NATS client's PING replies, going while a query runs. A request
        # stalled without a response is aborted from here, which makes
        # ``func`` raise StoreUnavailable.
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, func, *args)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=STORE_WATCH_INTERVAL)
                if done:
                    return future.result()
                self.store.abort_stalled_request()
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, abandoning it and raising _Stopped on a stop request."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {work, stop}, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            work.cancel()
            raise
        finally:
            stop.cancel()
        if work in done:
            return work.result()
        work.cancel()
        # nats-py may turn the cancellation into its own error once the
        # connection closes; fetch it so asyncio does not report it as lost.
        work.add_done_callback(_consume_outcome)
        raise _Stopped

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, waking early on a stop or a NATS reconnect."""
        self._wake.clear()
        waits = {
            asyncio.create_task(self._stop.wait()),
            asyncio.create_task(self._wake.wait()),
        }
        try:
            await asyncio.wait(
                waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()
