"""PullInbox against a real nats-server: batches, partial batches, errors."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from cnc_backend.pull import PullFailed, PullInbox

STREAM = "PULL_TEST"
DURABLE = "pull-test"


async def _setup(url: str, count: int) -> nats.NATS:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=STREAM, subjects=["pull.>"], storage=StorageType.MEMORY)
    )
    await js.add_consumer(
        STREAM,
        ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT),
    )
    for seq in range(count):
        await js.publish("pull.m1", str(seq).encode())
    return nc


def test_pull_fetches_batches_in_order(nats_server):
    async def main() -> list[list[bytes]]:
        nc = await _setup(nats_server.url, 25)
        try:
            inbox = PullInbox(nc, STREAM, DURABLE)
            await inbox.start()
            batches = []
            for _ in range(3):
                messages = await inbox.fetch(10, timeout=0.5)
                batches.append([m.data for m in messages])
                for message in messages:
                    await message.ack()
            return batches
        finally:
            await nc.close()

    batches = asyncio.run(main())

    assert [len(batch) for batch in batches] == [10, 10, 5]
    received = [int(data) for batch in batches for data in batch]
    assert received == list(range(25))


def test_pull_empty_stream_returns_nothing(nats_server):
    async def main() -> list[object]:
        nc = await _setup(nats_server.url, 0)
        try:
            inbox = PullInbox(nc, STREAM, DURABLE)
            await inbox.start()
            return await inbox.fetch(10, timeout=0.3)
        finally:
            await nc.close()

    assert asyncio.run(main()) == []


def test_pull_missing_consumer_raises(nats_server):
    async def main() -> None:
        nc = await _setup(nats_server.url, 1)
        try:
            inbox = PullInbox(nc, STREAM, "no-such-consumer")
            await inbox.start()
            await inbox.fetch(10, timeout=0.5)
        finally:
            await nc.close()

    with pytest.raises(PullFailed) as failure:
        asyncio.run(main())

    assert failure.value.status == "503"
