"""Pull requests to a durable JetStream consumer, collected by a callback.

nats-py 2.16's ``PullSubscription.fetch`` waits for each message with
``next_msg``, which creates a task, a UUID and a timer per message. In a
loop of fetch(500) and acks over 50,000 messages on 2 CPUs, that path cost
41 to 54 microseconds of CPU per message, against 11 to 14 for a callback
subscription. In a profile of the backend's ingest it was the largest cost
on the event loop thread (docs/BENCHMARKS.md). This module
sends the same pull requests (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>``,
the subject that nats-py and the server permissions use) and collects the
deliveries in a subscription callback.

Each request gets its own reply subject under one wildcard subscription, so
a status message such as "408 Request Timeout" is matched to the request it
ends. Messages that arrive while no fetch runs, from a request that ended on
this side first, are deliveries waiting for an acknowledgement all the same,
so the next fetch returns them first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DEFAULT_PREFIX, Header

log = logging.getLogger(__name__)

#: Status codes that end a pull request without an error: no messages for a
#: no_wait request (404), the request expired (408), or the server ended it
#: (409, for example because the consumer was deleted or its leader changed).
END_STATUSES = frozenset({"404", "408", "409"})

#: Status code of an idle heartbeat or flow control message.
CONTROL_STATUS = "100"


class PullFailed(nats.errors.Error):
    """The server ended a pull request with an error status, such as 503."""

    def __init__(self, status: str, description: str) -> None:
        super().__init__()
        self.status = status
        self.description = description

    def __str__(self) -> str:
        return f"pull request failed with status {self.status} ({self.description})"


@dataclass
class _Request:
    """One pull request in flight and what has arrived for it."""

    token: str
    batch: int
    messages: list[Msg] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    failure: PullFailed | None = None


class PullInbox:
    """Fetch batches from one durable pull consumer over one connection.

    Call ``start`` once per client; nats-py renews the subscription after a
    reconnect by itself. Only one ``fetch`` may run at a time.
    """

    def __init__(
        self, nc: Client, stream: str, durable: str, api_prefix: str = DEFAULT_PREFIX
    ) -> None:
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._prefix = ""
        self._tokens = itertools.count()
        self._current: _Request | None = None
        # Deliveries for a request that fetch() had already returned from.
        self._late: list[Msg] = []
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the reply subjects of this client's pull requests."""
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_message)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Return up to ``batch`` messages, or [] if none arrived in ``timeout`` s.

        First a no_wait request with an expiry takes what the consumer has.
        The server (2.15 here) keeps it open until at least one message is
        available or it expires, then ends it, so a live stream is fetched
        without delay.
        If that request ended without messages before the timeout, as on a
        409, a second request waits for messages until the timeout. As with
        nats-py's fetch, the second request ends early only when the batch is
        full or the server ends it, so its deliveries are not left behind.
        Raises PullFailed for an error status (503 when no consumer received
        the request) and the nats-py errors of a failed publish.
        """
        started = time.monotonic()
        messages = self._take_late(batch)
        if len(messages) == batch:
            return messages
        # nats-py's fetch omits the expiry when it already has messages, so
        # that the server responds at once instead of waiting for more.
        expires = None if messages else timeout
        request = await self._request(batch - len(messages), True, expires)
        await self._wait(request, started + timeout)
        messages += request.messages
        if messages:
            return messages
        remaining = started + timeout - time.monotonic()
        if remaining <= 0.01:
            return []
        request = await self._request(batch, expires=remaining)
        await self._wait(request, started + timeout)
        return request.messages

    def _take_late(self, batch: int) -> list[Msg]:
        head, self._late = self._late[:batch], self._late[batch:]
        return head

    async def _request(
        self, batch: int, no_wait: bool = False, expires: float | None = None
    ) -> _Request:
        request = _Request(str(next(self._tokens)), batch)
        body: dict[str, object] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
        if expires is not None:
            # The server ends the request slightly before this side gives up,
            # so that its 408 arrives before the next request is sent.
            body["expires"] = max(int(expires * 1e9) - 100_000, 1_000_000)
        self._current = request
        await self._nc.publish(
            self._next_subject,
            orjson.dumps(body),
            reply=f"{self._prefix}.{request.token}",
        )
        return request

    async def _wait(self, request: _Request, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining > 0:
                await asyncio.wait_for(request.ended.wait(), remaining)
        except TimeoutError:
            pass
        finally:
            # Deliveries of this request that arrive from now on are kept
            # for the next fetch.
            self._current = None
        if request.failure is not None and not request.messages:
            raise request.failure

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(Header.STATUS.value) if msg.headers else None
        request = self._current
        if status is None:
            # A delivery carries the stream's subject, not the reply subject
            # of its request, so it is counted for the request in flight.
            if request is None or len(request.messages) >= request.batch:
                self._late.append(msg)
                return
            request.messages.append(msg)
            if len(request.messages) >= request.batch:
                request.ended.set()
            return
        # A status message is sent to the reply subject of its request.
        token = msg.subject.rpartition(".")[2]
        if status == CONTROL_STATUS or request is None or request.token != token:
            return
        if status not in END_STATUSES:
            description = msg.headers.get(Header.DESCRIPTION.value, "") or ""
            request.failure = PullFailed(status, description)
        request.ended.set()
