"""The example server config ``config/nats/server.conf`` and its per-user permissions.

The test runs the example file itself, with its example public keys replaced
by keys generated here: each edge may publish only its own machine's
subject, and the backend may only consume.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
import pytest
from prometheus_client import CollectorRegistry

from cnc_backend.config import NatsConfig
from cnc_backend.consumer import JetStreamConsumer
from cnc_common import config as cfg
from cnc_common.backoff import Backoff
from cnc_common.coverage import loss_msg_id, loss_report
from cnc_common.embedded import NatsServer
from cnc_common.natsconn import connect_options
from cnc_common.reading import encode, make_reading, new_boot_id
from cnc_edge.config import EdgeConfig
from cnc_edge.metrics import PublisherMetrics
from cnc_edge.publisher import Publisher
from tests.security import NKey, new_nkey, start_nats, write_secret

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "nats" / "server.conf"
USERS = ("haas-vf2-01", "haas-st10-01", "backend")


@dataclass
class Deployment:
    server: NatsServer
    seed_files: dict[str, Path]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    text = EXAMPLE.read_text()
    examples = re.findall(r"nkey: (U[A-Z2-7]{55})", text)
    assert len(examples) == len(USERS), "the example lists two edges and a backend"
    keys: dict[str, NKey] = {}
    for user, example in zip(USERS, examples, strict=True):
        keys[user] = new_nkey()
        text = text.replace(example, keys[user].public)
    server = start_nats(tmp_path / "nats", text)
    seeds = {
        user: write_secret(tmp_path / f"{user}.nk", key.seed)
        for user, key in keys.items()
    }
    try:
        yield Deployment(server, seeds)
    finally:
        server.close()


def backend_config(deployment: Deployment) -> NatsConfig:
    data = {
        "url": deployment.server.url,
        "fetch_timeout": 0.5,
        "nkey_seed_file": str(deployment.seed_files["backend"]),
        "inbox_prefix": "_INBOX.backend",
    }
    return cfg.load(NatsConfig, data, source="backend-test")


def edge_config(
    deployment: Deployment, machine: str, login_as: str, data_dir: Path
) -> EdgeConfig:
    data = {
        "machine": {"id": machine},
        "serial": {"url": "loop://"},
        "journal": {"data_dir": str(data_dir)},
        "nats": {
            "url": deployment.server.url,
            "create_stream": False,
            "ack_timeout": 1.0,
            "reconnect_backoff_initial": 0.1,
            "reconnect_backoff_cap": 0.5,
            "nkey_seed_file": str(deployment.seed_files[login_as]),
            "inbox_prefix": f"_INBOX.edge-{login_as}",
        },
    }
    return cfg.load(EdgeConfig, data, source="edge-test")


def reading(machine: str) -> tuple[str, bytes]:
    value = make_reading(
        machine=machine,
        boot=new_boot_id(),
        seq=1,
        ts="2024-05-01T12:00:00.000001Z",
        mono=1.0,
        fields={"spindle_rpm": 900},
        errors={},
    )
    return value["id"], encode(value)


async def run_publisher(config: EdgeConfig, batch: list[tuple[str, bytes]]) -> list:
    """Run the edge Publisher until it acks or fails the batch; return its messages."""
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    metrics = PublisherMetrics(config.machine.id, registry=CollectorRegistry())
    task = asyncio.create_task(Publisher(config, inbox, outbox, metrics).run())
    received: list[tuple] = []
    try:
        for _ in range(300):
            while not outbox.empty():
                received.append(outbox.get_nowait())
            if any(item[0] in ("acked", "failed") for item in received):
                return received
            if any(item[:2] == ("link", True) for item in received) and not any(
                item[0] == "sent" for item in received
            ):
                inbox.put(("live", batch))
                received.append(("sent",))
            await asyncio.sleep(0.05)
        raise AssertionError(f"the publisher sent no ack or failure: {received}")
    finally:
        inbox.put(("stop",))
        await asyncio.wait_for(task, 10)


async def run_control(config: EdgeConfig, batch: list[tuple[str, bytes]]) -> tuple:
    """Run the edge Publisher until it responds to a batch of loss reports."""
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    metrics = PublisherMetrics(config.machine.id, registry=CollectorRegistry())
    task = asyncio.create_task(Publisher(config, inbox, outbox, metrics).run())
    sent = False
    try:
        for _ in range(300):
            while not outbox.empty():
                item = outbox.get_nowait()
                if item[0] == "controlled":
                    return item
                if item[:2] == ("link", True) and not sent:
                    inbox.put(("control", 1, batch))
                    sent = True
            await asyncio.sleep(0.05)
        raise AssertionError("the publisher sent no result for the loss reports")
    finally:
        inbox.put(("stop",))
        await asyncio.wait_for(task, 10)


def loss(machine: str) -> tuple[str, bytes]:
    report = loss_report(
        machine=machine,
        boot=new_boot_id(),
        seq_start=3,
        seq_end=7,
        reason="journal_cap",
    )
    return loss_msg_id(report), orjson.dumps(report)


async def setup_and_fetch(config: NatsConfig) -> list[bytes]:
    consumer = JetStreamConsumer(config, Backoff(), lambda: None, lambda: None)
    try:
        await consumer.connect()
        await consumer.setup()
        messages = await consumer.fetch()
        await consumer.settle(messages, [])
        return [message.data for message in messages]
    finally:
        await consumer.close()


def test_edges_publish_own_subject_and_backend_consumes(
    deployment: Deployment, tmp_path: Path
) -> None:
    backend = backend_config(deployment)
    first, second = reading("haas-vf2-01"), reading("haas-st10-01")

    assert asyncio.run(setup_and_fetch(backend)) == []
    answers = [
        asyncio.run(
            run_publisher(edge_config(deployment, machine, machine, tmp_path), [item])
        )
        for machine, item in (("haas-vf2-01", first), ("haas-st10-01", second))
    ]
    fetched = asyncio.run(setup_and_fetch(backend))

    assert ("acked", [first[0]]) in answers[0]
    assert ("acked", [second[0]]) in answers[1]
    assert sorted(fetched) == sorted([first[1], second[1]])


def test_edge_publishing_as_other_machine_rejected(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = backend_config(deployment)
    asyncio.run(setup_and_fetch(backend))
    forged = reading("haas-st10-01")
    caplog.set_level(logging.WARNING)

    # haas-vf2-01's credentials with machine id haas-st10-01: the subject is cnc.readings.haas-st10-01.
    config = edge_config(deployment, "haas-st10-01", "haas-vf2-01", tmp_path)
    answers = asyncio.run(run_publisher(config, [forged]))

    failed = [item for item in answers if item[0] == "failed"]
    assert failed and failed[0][1] == [forged[0]]
    assert "permission denied" in caplog.text
    assert 'violation for publish to "cnc.readings.haas-st10-01"' in caplog.text
    assert asyncio.run(setup_and_fetch(backend)) == []
    server_log = deployment.server.log_file.read_text()
    assert 'Publish Violation - Subject "cnc.readings.haas-st10-01"' in server_log


def test_edge_publishes_loss_report_on_own_control_subject(
    deployment: Deployment, tmp_path: Path
) -> None:
    backend = backend_config(deployment)
    asyncio.run(setup_and_fetch(backend))
    report = loss("haas-vf2-01")

    config = edge_config(deployment, "haas-vf2-01", "haas-vf2-01", tmp_path)
    answer = asyncio.run(run_control(config, [report]))

    assert answer[2] == [report[0]]
    assert answer[3] == ""


def test_edge_loss_report_as_other_machine_rejected(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(setup_and_fetch(backend_config(deployment)))
    forged = loss("haas-st10-01")
    caplog.set_level(logging.WARNING)

    config = edge_config(deployment, "haas-st10-01", "haas-vf2-01", tmp_path)
    answer = asyncio.run(run_control(config, [forged]))

    assert answer[2] == []
    assert 'violation for publish to "cnc.readings.haas-st10-01.control"' in (
        caplog.text
    )
    server_log = deployment.server.log_file.read_text()
    assert 'Publish Violation - Subject "cnc.readings.haas-st10-01.control"' in (
        server_log
    )


async def _violations(
    deployment: Deployment, user: str, inbox_prefix: str, attempt: Any
) -> list[str]:
    errors: list[str] = []

    async def collect(exc: Exception) -> None:
        errors.append(str(exc))

    options = connect_options(
        cfg.load(
            NatsConfig,
            {
                "nkey_seed_file": str(deployment.seed_files[user]),
                "inbox_prefix": inbox_prefix,
            },
            source="test",
        ),
        deployment.server.url,
    )
    nc = await nats.connect(
        deployment.server.url, error_cb=collect, allow_reconnect=False, **options
    )
    try:
        await attempt(nc)
        await nc.flush(timeout=2)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    return errors


@pytest.mark.parametrize(
    ("user", "inbox_prefix", "action"),
    [
        ("haas-vf2-01", "_INBOX.edge-haas-vf2-01", "subscribe-readings"),
        ("haas-vf2-01", "_INBOX.edge-haas-vf2-01", "subscribe-backend-inbox"),
        ("haas-vf2-01", "_INBOX.edge-haas-vf2-01", "create-consumer"),
        ("haas-vf2-01", "_INBOX.edge-haas-vf2-01", "delete-stream"),
        ("backend", "_INBOX.backend", "publish-reading"),
        ("backend", "_INBOX.backend", "delete-stream"),
    ],
    ids=lambda value: value if "-" in value and "INBOX" not in value else None,
)
def test_role_rejected_outside_its_subjects(
    deployment: Deployment, user: str, inbox_prefix: str, action: str
) -> None:
    asyncio.run(setup_and_fetch(backend_config(deployment)))

    async def attempt(nc: nats.NATS) -> None:
        if action == "subscribe-readings":
            await nc.subscribe("cnc.readings.>")
        elif action == "subscribe-backend-inbox":
            await nc.subscribe("_INBOX.backend.>")
        elif action == "create-consumer":
            subject = "$JS.API.CONSUMER.CREATE.CNC_READINGS.spy"
            await nc.publish(subject, b'{"stream_name":"CNC_READINGS","config":{}}')
        elif action == "delete-stream":
            await nc.publish("$JS.API.STREAM.DELETE.CNC_READINGS", b"")
        elif action == "publish-reading":
            await nc.publish("cnc.readings.haas-vf2-01", reading("haas-vf2-01")[1])

    errors = asyncio.run(_violations(deployment, user, inbox_prefix, attempt))

    # nats-py lower-cases the server's -ERR text.
    assert any("permissions violation" in error for error in errors), errors
    assert asyncio.run(setup_and_fetch(backend_config(deployment))) == []
