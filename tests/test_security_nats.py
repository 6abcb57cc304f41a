"""Each NATS authentication mode against a real nats-server configured for it.

For every mode the edge publisher's connection code (``Publisher``) publishes
a reading and gets its PubAck, and the backend's (``JetStreamConsumer``)
fetches and acknowledges it. A wrong credential for the same mode is
rejected, the edge logs "authorization failed" (or the TLS failure) and the
secret appears nowhere.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cnc_backend.config import NatsConfig
from cnc_backend.consumer import JetStreamConsumer
from cnc_backend.errors import NatsUnavailable
from cnc_common import config as cfg
from cnc_common.backoff import Backoff
from cnc_common.embedded import NatsServer
from cnc_common.natsconn import check_security
from cnc_common.reading import encode, make_reading, new_boot_id
from cnc_edge.config import EdgeConfig
from cnc_edge.metrics import PublisherMetrics
from cnc_edge.publisher import Publisher
from tests.security import (
    Certificates,
    make_certificates,
    make_decentralized,
    new_nkey,
    start_nats,
    tls_block,
    write_secret,
)

pytestmark = pytest.mark.timeout(120)

EDGE_SECRET = "edge-Secret-7c1d0e"
BACKEND_SECRET = "backend-Secret-52aa91"
WRONG_SECRET = "wrong-Secret-0b44f3"


@dataclass
class Mode:
    """A server config plus the [nats] keys of an edge and a backend that log in."""

    server: str
    edge: dict[str, Any]
    backend: dict[str, Any]
    #: [nats] keys of an edge whose credentials the server must reject.
    wrong_edge: dict[str, Any]
    url_scheme: str = "nats"
    secrets: list[str] = field(default_factory=list)
    #: Text that the edge log and the backend error contain for wrong credentials.
    rejection: str | None = "authorization failed"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _user_password(tmp: Path, certs: Certificates) -> Mode:
    return Mode(
        server=(
            "authorization { users = [\n"
            f'  {{ user: edge, password: "{EDGE_SECRET}" }}\n'
            f'  {{ user: backend, password: "{BACKEND_SECRET}" }}\n'
            "] }\n"
        ),
        edge={
            "user": "edge",
            "password_file": str(write_secret(tmp / "edge.pw", EDGE_SECRET)),
        },
        backend={"user": "backend", "password": BACKEND_SECRET},
        wrong_edge={"user": "edge", "password": WRONG_SECRET},
    )


def _token(tmp: Path, certs: Certificates) -> Mode:
    return Mode(
        server=f'authorization {{ token: "{EDGE_SECRET}" }}\n',
        edge={"token_file": str(write_secret(tmp / "token", EDGE_SECRET))},
        backend={"token": EDGE_SECRET},
        wrong_edge={"token": WRONG_SECRET},
    )


def _nkey(tmp: Path, certs: Certificates) -> Mode:
    edge, backend, stranger = new_nkey(), new_nkey(), new_nkey()
    return Mode(
        server=(
            "authorization { users = [\n"
            f"  {{ nkey: {edge.public} }}\n  {{ nkey: {backend.public} }}\n"
            "] }\n"
        ),
        edge={"nkey_seed_file": str(write_secret(tmp / "edge.nk", edge.seed))},
        backend={"nkey_seed_file": str(write_secret(tmp / "be.nk", backend.seed))},
        wrong_edge={
            "nkey_seed_file": str(write_secret(tmp / "stranger.nk", stranger.seed))
        },
        secrets=[edge.seed, backend.seed, stranger.seed],
    )


def _creds(tmp: Path, certs: Certificates) -> Mode:
    ours, foreign = make_decentralized(), make_decentralized()
    edge, backend, stranger = new_nkey(), new_nkey(), new_nkey()
    return Mode(
        server=ours.server_config(),
        edge={"creds_file": str(write_secret(tmp / "e.creds", ours.creds(edge)))},
        backend={"creds_file": str(write_secret(tmp / "b.creds", ours.creds(backend)))},
        # Signed by an account of another operator, which the server does not trust.
        wrong_edge={
            "creds_file": str(write_secret(tmp / "x.creds", foreign.creds(stranger)))
        },
        secrets=[edge.seed, backend.seed, stranger.seed],
    )


def _tls(tmp: Path, certs: Certificates) -> Mode:
    mode = _user_password(tmp, certs)
    mode.server += tls_block(certs)
    mode.edge["tls_ca_file"] = str(certs.ca)
    mode.backend["tls_ca_file"] = str(certs.ca)
    # Right password, but the server certificate is not from the trusted CA.
    mode.wrong_edge = {**mode.edge, "tls_ca_file": str(certs.other_ca)}
    mode.url_scheme = "tls"
    mode.rejection = "TLS certificate verification failed"
    return mode


def _mutual_tls(tmp: Path, certs: Certificates) -> Mode:
    mode = _nkey(tmp, certs)
    mode.server += tls_block(certs, verify=True)
    client = {
        "tls_ca_file": str(certs.ca),
        "tls_cert_file": str(certs.client_cert),
        "tls_key_file": str(certs.client_key),
        # The URL names 127.0.0.1, and the certificate also carries this name.
        "tls_hostname": "nats.cnc.test",
    }
    mode.edge.update(client)
    mode.backend.update(client)
    # A valid NKey and the right CA, but no client certificate.
    mode.wrong_edge = {**mode.edge, "tls_cert_file": None, "tls_key_file": None}
    # Under TLS 1.3 the client learns that its missing certificate was refused
    # either from an alert or from a reset connection, depending on timing.
    mode.rejection = None
    return mode


MODES = {
    "user-password": _user_password,
    "token": _token,
    "nkey": _nkey,
    "creds": _creds,
    "tls": _tls,
    "mutual-tls": _mutual_tls,
}


@pytest.fixture(params=list(MODES))
def mode_server(
    request: pytest.FixtureRequest, tmp_path: Path, certs: Certificates
) -> Iterator[tuple[Mode, NatsServer]]:
    mode = MODES[request.param](tmp_path, certs)
    mode.secrets += [EDGE_SECRET, BACKEND_SECRET, WRONG_SECRET]
    server = start_nats(tmp_path / "nats", mode.server)
    try:
        yield mode, server
    finally:
        server.close()


def _url(mode: Mode, server: NatsServer) -> str:
    return server.url.replace("nats://", f"{mode.url_scheme}://")


def edge_config(url: str, keys: dict[str, Any], data_dir: Path) -> EdgeConfig:
    nats_keys = {key: value for key, value in keys.items() if value is not None}
    data = {
        "machine": {"id": "m1"},
        "serial": {"url": "loop://"},
        "journal": {"data_dir": str(data_dir)},
        "nats": {
            "url": url,
            "ack_timeout": 2.0,
            "connect_timeout": 2.0,
            "reconnect_backoff_initial": 0.1,
            "reconnect_backoff_cap": 0.5,
            **nats_keys,
        },
    }
    config = cfg.load(EdgeConfig, data, source="edge-test")
    check_security(config.nats, url, "edge-test")
    return config


def backend_config(url: str, keys: dict[str, Any]) -> NatsConfig:
    data = {"url": url, "fetch_timeout": 0.5, "connect_timeout": 2.0, **keys}
    config = cfg.load(NatsConfig, data, source="backend-test")
    check_security(config, url, "backend-test")
    return config


def _reading() -> tuple[str, bytes]:
    reading = make_reading(
        machine="m1",
        boot=new_boot_id(),
        seq=1,
        ts="2024-05-01T12:00:00.000001Z",
        mono=1.0,
        fields={"spindle_rpm": 1200},
        errors={},
    )
    return reading["id"], encode(reading)


async def _expect(outbox: queue.Queue[Any], kind: str, timeout: float) -> tuple:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            item = outbox.get_nowait()
        except queue.Empty:
            await asyncio.sleep(0.05)
            continue
        if item[0] == kind:
            return item
    raise AssertionError(f"no {kind!r} message from the publisher in {timeout} s")


async def publish_one(config: EdgeConfig, reading: tuple[str, bytes]) -> tuple:
    """Run the edge Publisher until one live reading is acknowledged."""
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    metrics = PublisherMetrics("m1", registry=CollectorRegistry())
    publisher = Publisher(config, inbox, outbox, metrics)
    task = asyncio.create_task(publisher.run())
    try:
        link = await _expect(outbox, "link", 15)
        assert link[1] is True, link
        inbox.put(("live", [reading]))
        return await _expect(outbox, "acked", 10)
    finally:
        inbox.put(("stop",))
        await asyncio.wait_for(task, 10)


async def consume_one(config: NatsConfig) -> bytes:
    """Connect, set up the durable consumer, fetch one message and ack it."""
    consumer = JetStreamConsumer(config, Backoff(), lambda: None, lambda: None)
    try:
        await consumer.connect()
        await consumer.setup()
        messages = await consumer.fetch()
        assert len(messages) == 1
        assert await consumer.settle(messages, [])
        return messages[0].data
    finally:
        await consumer.close()


def test_mode_publishes_and_consumes(
    mode_server: tuple[Mode, NatsServer], tmp_path: Path
) -> None:
    mode, server = mode_server
    url = _url(mode, server)
    reading = _reading()

    acked = asyncio.run(publish_one(edge_config(url, mode.edge, tmp_path), reading))
    payload = asyncio.run(consume_one(backend_config(url, mode.backend)))

    assert acked == ("acked", [reading[0]])
    assert payload == reading[1]


async def _edge_rejected(config: EdgeConfig) -> None:
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    metrics = PublisherMetrics("m1", registry=CollectorRegistry())
    task = asyncio.create_task(Publisher(config, inbox, outbox, metrics).run())
    await asyncio.sleep(2.0)
    inbox.put(("stop",))
    await asyncio.wait_for(task, 10)
    assert outbox.empty(), "the link must never come up with wrong credentials"


def test_mode_rejects_wrong_credentials(
    mode_server: tuple[Mode, NatsServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mode, server = mode_server
    url = _url(mode, server)
    caplog.set_level(logging.DEBUG)

    asyncio.run(_edge_rejected(edge_config(url, mode.wrong_edge, tmp_path)))
    with pytest.raises(NatsUnavailable) as caught:
        asyncio.run(consume_one(backend_config(url, mode.wrong_edge)))

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if mode.rejection is not None:
        assert any(mode.rejection in line for line in warnings), warnings
        assert mode.rejection in str(caught.value)
    everything = caplog.text + str(caught.value)
    for secret in mode.secrets:
        assert secret not in everything


def test_handshake_first_refuses_plaintext_server(tmp_path: Path) -> None:
    # nats-py 2.16 falls back to plaintext when the server does not announce
    # TLS, even with a TLS context. TLS-first closes that hole.
    certs = make_certificates(tmp_path / "certs")
    server = NatsServer(tmp_path / "nats").start()
    try:
        keys = {"tls_ca_file": str(certs.ca), "tls_handshake_first": True}
        with pytest.raises(NatsUnavailable) as caught:
            asyncio.run(consume_one(backend_config(server.url, keys)))
    finally:
        server.close()

    assert "TLS" in str(caught.value)


def test_handshake_first_against_tls_first_server(
    tmp_path: Path, certs: Certificates
) -> None:
    block = tls_block(certs).replace("}\n", "  handshake_first: true\n}\n")
    server = start_nats(tmp_path / "nats", block)
    try:
        keys = {"tls_ca_file": str(certs.ca), "tls_handshake_first": True}
        reading = _reading()
        acked = asyncio.run(
            publish_one(edge_config(server.url, keys, tmp_path), reading)
        )
        payload = asyncio.run(consume_one(backend_config(server.url, keys)))
    finally:
        server.close()

    assert acked == ("acked", [reading[0]])
    assert payload == reading[1]
