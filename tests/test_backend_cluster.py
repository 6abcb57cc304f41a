"""A three-node JetStream cluster losing its stream leader under live traffic.

The edge agent publishes readings from the simulated control and the backend
consumes them, both given all three servers. The stream has three replicas,
so a PubAck means a majority stored the message, and killing the leader
must lose nothing.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from cnc_backend.consumer import State
from cnc_common.embedded import NatsServer, free_port
from tests.backend.conftest import ServiceThread, create_stream, make_config
from tests.helpers import (
    polled_ids,
    start_program,
    stop_program,
    stored_ids,
    wait_for,
    wait_for_state,
    write_edge_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[dict[str, NatsServer]]:
    """Three nats-servers with JetStream, routed to each other on loopback."""
    names = ["n1", "n2", "n3"]
    route_ports = {name: free_port() for name in names}
    servers = {}
    for name in names:
        routes = ",".join(
            f"nats://127.0.0.1:{port}"
            for other, port in route_ports.items()
            if other != name
        )
        servers[name] = NatsServer(
            tmp_path / name,
            extra_args=[
                "--server_name",
                name,
                "--cluster_name",
                "cnc-test",
                "--cluster",
                f"nats://127.0.0.1:{route_ports[name]}",
                "--routes",
                routes,
            ],
        )
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.close()


def stream_leader(urls: str) -> str | None:
    """Return the server name of the stream's leader; None during an election."""

    async def read() -> str | None:
        nc = await nats.connect(urls.split(","), connect_timeout=2)
        try:
            info = await nc.jetstream(timeout=2.0).stream_info("CNC_READINGS")
        except (nats.errors.Error, TimeoutError):
            return None
        finally:
            await nc.close()
        assert info.config.num_replicas == 3
        return info.cluster.leader if info.cluster else None

    return asyncio.run(read())


def test_cluster_leader_kill_loses_nothing(
    tmp_path: Path, nats_cluster: dict[str, NatsServer], sim_pty, pg_dsn: str
) -> None:
    urls = ",".join(server.url for server in nats_cluster.values())
    create_stream(urls, replicas=3)
    # The backend needs nothing for the cluster but the list of servers.
    backend = ServiceThread(make_config(urls, pg_dsn)).start()
    edge_cfg = write_edge_config(
        tmp_path / "edge", serial_url=sim_pty.url, nats_url=urls
    )
    data = tmp_path / "edge" / "data"
    edge = start_program(
        "cnc_edge.cli", ["run", "--config", str(edge_cfg)], tmp_path / "edge.log"
    )
    try:
        wait_for_state(data, "ONLINE", timeout=30)
        backend.wait_for_state(State.CONNECTED, timeout=30)
        wait_for(lambda: len(stored_ids(pg_dsn)) >= 10, 30, "first readings stored")

        leader = stream_leader(urls)
        assert leader in nats_cluster
        nats_cluster[leader].kill()
        survivors = ",".join(
            server.url for name, server in nats_cluster.items() if name != leader
        )
        wait_for(
            lambda: stream_leader(survivors) not in (None, leader),
            30,
            "a new stream leader",
            interval=0.5,
        )
        # Readings keep arriving after the failover.
        count = len(stored_ids(pg_dsn))
        wait_for(
            lambda: len(stored_ids(pg_dsn)) >= count + 20,
            30,
            "readings stored after the failover",
            interval=0.5,
        )
        time.sleep(1.0)
        assert stop_program(edge) == 0
        polled = polled_ids(tmp_path / "edge")
        wait_for(
            lambda: set(polled) <= set(stored_ids(pg_dsn)),
            60,
            "every polled reading stored",
            interval=0.5,
        )
    finally:
        stop_program(edge)
        backend.stop()

    stored = stored_ids(pg_dsn)
    repeated = [rid for rid, n in collections.Counter(stored).items() if n > 1]
    assert len(polled) > 30
    assert repeated == []
    assert set(stored) == set(polled)
    assert backend.service is not None
    assert backend.service.counters.stream_recreated == 0
    assert backend.service.counters.consumer_recreated == 0
