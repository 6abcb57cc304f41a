"""The publisher process: owns the NATS connection and reports PubAcks.

It receives batches from the buffer process and sends one result for each:

- ``("live", [(id, payload), ...])`` -> ``("acked", [ids])`` and/or
  ``("failed", [ids], reason)``; every live id gets exactly one answer.
- ``("replay", token, [(id, payload), ...])`` -> ``("replayed", token, ok, reason)``;
  ``ok`` only when every reading of the batch was acknowledged.
- ``("control", token, [(msg id, payload), ...])`` -> ``("controlled", token,
  [acknowledged msg ids], reason)``: loss reports, on the control subject.
  A failed control publish does not take the link down, because a broker
  that rejects only this subject (permissions) would otherwise make the
  agent go OFFLINE and back for ever; the buffer retries with backoff.
- ``("stop",)`` closes the connection and ends the process.

Every reading carries the header ``Cnc-Delivery``: ``live`` when sent from
memory while ONLINE, ``backfill`` when replayed from the journal, and
``backfill-reduced`` for a replayed reduced record (its id starts with
``reduced-``).

It also sends ``("link", up, reason)`` when its judgement of the link
changes. The link is judged by real traffic: a publish that gets no PubAck
within ``ack_timeout`` takes it down even while the TCP connection looks
healthy (a frozen server, a stream that vanished), and it only comes back
when the stream answers again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from cnc_common.backoff import Backoff, RateLimitedCounter, not_logged
from cnc_common.coverage import (
    BACKFILL,
    BACKFILL_REDUCED,
    DELIVERY_HEADER,
    LIVE,
    control_subject,
)
from cnc_common.natsconn import connect_options, describe_nats_error, is_rejection
from cnc_edge.config import EdgeConfig
from cnc_edge.crashpoints import crash_point
from cnc_edge.metrics import PublisherMetrics

log = logging.getLogger(__name__)

Batch = list[tuple[str, bytes]]


class Publisher:
    def __init__(
        self,
        config: EdgeConfig,
        inbox: Any,
        outbox: Any,
        metrics: PublisherMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or PublisherMetrics(config.machine.id)
        self.nats_cfg = config.nats
        self.inbox = inbox
        self.outbox = outbox
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.link_up = False
        self._link_changed = asyncio.Event()
        self._stopping = False
        self._connect_failures = RateLimitedCounter(interval=30.0)
        # Refused and timed-out attempts are counted apart, so that they never
        # suppress the WARNING for a rejected login.
        self._unreachable = RateLimitedCounter(interval=30.0)
        self._work: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    # Link state ---------------------------------------------------------

    def _set_link(self, up: bool, reason: str) -> None:
        if up == self.link_up:
            return
        self.link_up = up
        self._link_changed.set()
        log.info("link %s: %s (%s)", "up" if up else "down", self.nats_cfg.url, reason)
        self.outbox.put(("link", up, reason))

    async def _on_disconnected(self) -> None:
        self._set_link(False, "disconnected")

    async def _on_reconnected(self) -> None:
        log.info("reconnected: %s", self._server_name())
        self._link_changed.set()

    async def _on_error(self, exc: Exception) -> None:
        # nats-py retries a failed first connection by itself and reports each
        # failure only here, so a rejected login has to be logged from here.
        if not is_rejection(exc):
            log.debug("nats client error: %r", exc)
            if self.nc is None or not self.nc.is_connected:
                # A refused or timed-out attempt, which is not logged elsewhere.
                suppressed = self._unreachable.hit()
                if suppressed is not None:
                    log.warning(
                        "connect failed: %s (%s%s)",
                        self.nats_cfg.url,
                        describe_nats_error(exc),
                        not_logged(suppressed),
                    )
            return
        suppressed = self._connect_failures.hit()
        if suppressed is not None:
            log.warning(
                "rejected by nats: %s (%s%s)",
                self.nats_cfg.url,
                describe_nats_error(exc),
                not_logged(suppressed),
            )

    def _server_name(self) -> str:
        if self.nc is not None and self.nc.connected_url is not None:
            url = self.nc.connected_url
            return f"{url.hostname}:{url.port}"
        return self.nats_cfg.url

    # Connection ---------------------------------------------------------

    async def _connect_forever(self) -> None:
        """Connect, retrying with capped jittered backoff until stopped."""
        backoff = Backoff(
            initial=self.nats_cfg.reconnect_backoff_initial,
            cap=self.nats_cfg.reconnect_backoff_cap,
        )
        while not self._stopping:
            try:
                self.nc = await nats.connect(
                    servers=[url.strip() for url in self.nats_cfg.url.split(",")],
                    name=f"cnc-edge-{self.config.machine.id}",
                    connect_timeout=self.nats_cfg.connect_timeout,
                    # After the first connection nats-py reconnects by itself;
                    # -1 removes its default budget of 60 attempts.
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self.nats_cfg.reconnect_backoff_initial,
                    ping_interval=self.nats_cfg.ping_interval,
                    max_outstanding_pings=self.nats_cfg.max_outstanding_pings,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    **connect_options(self.nats_cfg, self.nats_cfg.url),
                )
            except Exception as exc:  # noqa: BLE001 - any failure means retry
                suppressed = self._connect_failures.hit()
                if suppressed is not None:
                    log.warning(
                        "connect failed: %s (%s%s)",
                        self.nats_cfg.url,
                        type(exc).__name__,
                        not_logged(suppressed),
                    )
                await asyncio.sleep(backoff.next_delay())
                continue
            self.js = self.nc.jetstream(timeout=self.nats_cfg.ack_timeout)
            log.info("connected: %s", self._server_name())
            return

    async def _probe(self) -> bool:
        """Check that the stream responds, creating it if allowed and missing."""
        assert self.js is not None
        stream = self.nats_cfg.stream
        try:
            await self.js.stream_info(stream)
            return True
        except nats.js.errors.NotFoundError:
            if not self.nats_cfg.create_stream:
                log.warning("stream missing: %s (create_stream is off)", stream)
                return False
        except Exception as exc:  # noqa: BLE001 - the probe only reports health
            log.debug("probe failed: %s (%r)", stream, exc)
            return False
        try:
            await self.js.add_stream(
                StreamConfig(
                    name=stream,
                    subjects=[f"{self.nats_cfg.subject_prefix}.>"],
                    storage=StorageType.FILE,
                    duplicate_window=self.nats_cfg.duplicate_window,
                )
            )
            log.warning("stream created: %s (it was missing on the server)", stream)
            return True
        except Exception as exc:  # noqa: BLE001
            log.warning("stream create failed: %s (%r)", stream, exc)
            return False

    async def _link_watch(self) -> None:
        """Bring the link up whenever the connection is usable and the stream responds."""
        backoff = Backoff(initial=0.2, cap=2.0)
        while not self._stopping:
            if self.nc is None or self.nc.is_closed:
                await self._connect_forever()
                continue
            if not self.link_up and self.nc.is_connected:
                if await self._probe():
                    backoff.reset()
                    self._set_link(True, "stream answers")
                    continue
            self._link_changed.clear()
            delay = backoff.next_delay() if not self.link_up else 1.0
            try:
                await asyncio.wait_for(self._link_changed.wait(), timeout=delay)
            except TimeoutError:
                pass

    # Publishing ---------------------------------------------------------

    async def _publish(
        self, batch: Batch, kind: str = "live"
    ) -> tuple[list[str], list[str], str]:
        """Publish a batch with pipelined PubAcks; return (acked, failed, reason).

        ``kind`` is ``live``, ``replay`` or ``control`` (loss reports).
        """
        if not self.link_up or self.js is None:
            return [], [rid for rid, _ in batch], "offline"
        if kind == "control":
            subject = control_subject(
                self.nats_cfg.subject_prefix, self.config.machine.id
            )
        else:
            subject = self.config.subject
        futures: list[tuple[str, asyncio.Future[Any]]] = []
        failed: list[str] = []
        reason = ""
        for rid, payload in batch:
            started = time.monotonic()
            try:
                future = await self.js.publish_async(
                    subject,
                    payload,
                    wait_stall=self.nats_cfg.ack_timeout,
                    headers=message_headers(kind, rid),
                )
            except Exception as exc:  # noqa: BLE001 - the reading goes back to disk
                failed.append(rid)
                reason = reason or type(exc).__name__
                continue
            futures.append((rid, future))
            if kind != "control":
                self.metrics.time_ack(kind, future, started)
        if futures:
            await asyncio.wait(
                [future for _, future in futures], timeout=self.nats_cfg.ack_timeout
            )
        acked: list[str] = []
        for rid, future in futures:
            if not future.done():
                future.cancel()
                failed.append(rid)
                reason = reason or "ack timeout"
            elif future.cancelled() or future.exception() is not None:
                failed.append(rid)
                exc = None if future.cancelled() else future.exception()
                reason = reason or (type(exc).__name__ if exc else "cancelled")
            else:
                acked.append(rid)
        if failed and kind != "control":
            self._set_link(False, f"publish failed: {reason}")
        return acked, failed, reason

    async def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "live":
            acked, failed, reason = await self._publish(item[1])
            self.metrics.record_acked("live", len(acked))
            if acked:
                self.outbox.put(("acked", acked))
            if failed:
                self.outbox.put(("failed", failed, reason))
        elif kind == "replay":
            crash_point("publisher_replay")
            token, batch = item[1], item[2]
            acked, failed, reason = await self._publish(batch, "replay")
            self.metrics.record_acked("replay", len(acked))
            self.outbox.put(("replayed", token, not failed, reason, len(acked)))
        elif kind == "control":
            token, batch = item[1], item[2]
            acked, failed, reason = await self._publish(batch, "control")
            self.outbox.put(("controlled", token, acked, reason))
        elif kind == "stop":
            self._stopping = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = threading.Thread(target=self._read_inbox, args=(loop,), daemon=True)
        reader.start()
        watch = asyncio.create_task(self._link_watch())
        try:
            while not self._stopping:
                item = await self._work.get()
                await self._handle(item)
        finally:
            watch.cancel()
            if self.nc is not None and not self.nc.is_closed:
                try:
                    await asyncio.wait_for(self.nc.close(), timeout=5)
                except Exception as exc:  # noqa: BLE001
                    log.warning("close failed: %s (%r)", self.nats_cfg.url, exc)
            log.info("publisher stopped: %s", self.config.machine.id)

    def _read_inbox(self, loop: asyncio.AbstractEventLoop) -> None:
        """Move items from the multiprocessing queue onto the event loop."""
        while True:
            try:
                item = self.inbox.get(timeout=0.5)
            except queue.Empty:
                if self._stopping:
                    return
                continue
            except (EOFError, OSError):
                item = ("stop",)
            loop.call_soon_threadsafe(self._work.put_nowait, item)
            if item[0] == "stop":
                return


def message_headers(kind: str, msg_id: str) -> dict[str, str]:
    """Return the NATS headers of a message of ``kind`` (live, replay, control)."""
    headers = {"Nats-Msg-Id": msg_id}
    if kind == "live":
        headers[DELIVERY_HEADER] = LIVE
    elif kind == "replay":
        reduced = msg_id.startswith("reduced-")
        headers[DELIVERY_HEADER] = BACKFILL_REDUCED if reduced else BACKFILL
    return headers


def run_publisher(config: EdgeConfig, inbox: Any, outbox: Any) -> None:
    """Entry point of the publisher process."""
    from cnc_edge.process import child_setup

    child_setup(config, "publisher")
    asyncio.run(Publisher(config, inbox, outbox).run())
