"""The read-only HTTP server behind /metrics, /healthz, /readyz and /status."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from http import HTTPStatus

import pytest
from prometheus_client import CollectorRegistry, Counter

from cnc_backend.config import BackendConfig
from cnc_common.config import load
from cnc_common.httpserver import (
    EndpointServer,
    Response,
    health_route,
    json_response,
    metrics_route,
    parse_listen,
)
from cnc_edge.config import EdgeConfig
from tests.prometheus import request


def failing_route(headers: Mapping[str, str]) -> Response:
    raise RuntimeError("boom")


@pytest.fixture
def server() -> Iterator[EndpointServer]:
    registry = CollectorRegistry()
    Counter("demo_events_total", "Events for the test.", registry=registry).inc(3)
    routes = {
        "/metrics": metrics_route(registry),
        "/healthz": health_route,
        "/status": lambda headers: json_response(HTTPStatus.OK, {"state": "ONLINE"}),
        "/broken": failing_route,
    }
    endpoint = EndpointServer("127.0.0.1:0", routes)
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.close()


def test_get_routes_return_their_responses(server: EndpointServer) -> None:
    status, headers, body = request(server.url + "/healthz")
    assert status == 200
    assert body == b"ok\n"

    status, headers, body = request(server.url + "/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert b'"state": "ONLINE"' in body


def test_metrics_route_serves_text_format(server: EndpointServer) -> None:
    status, headers, body = request(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b"demo_events_total 3.0" in body


def test_metrics_route_negotiates_openmetrics(server: EndpointServer) -> None:
    with socket.create_connection(server._server.server_address[:2], timeout=5) as sock:
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            b"Accept: application/openmetrics-text; version=1.0.0\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert b"Content-Type: application/openmetrics-text" in reply
    assert reply.rstrip().endswith(b"# EOF")


def test_head_sends_headers_without_body(server: EndpointServer) -> None:
    status, headers, body = request(server.url + "/healthz", method="HEAD")
    assert status == 200
    assert headers["Content-Length"] == "3"
    assert body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405(server: EndpointServer, method: str) -> None:
    for path in ("/metrics", "/healthz", "/unknown"):
        status, headers, _ = request(server.url + path, method=method)
        assert status == 405, f"{method} {path}"
        assert headers["Allow"] == "GET, HEAD"


def test_unknown_path_gets_404_listing_endpoints(server: EndpointServer) -> None:
    status, _, body = request(server.url + "/nope")
    assert status == 404
    assert b"/metrics" in body


def test_query_string_is_ignored(server: EndpointServer) -> None:
    status, _, _ = request(server.url + "/healthz?verbose=1")
    assert status == 200


def test_failing_route_gets_500_and_is_logged(
    server: EndpointServer, caplog: pytest.LogCaptureFixture
) -> None:
    status, _, body = request(server.url + "/broken")
    assert status == 500
    assert b"boom" not in body
    assert "endpoint failed: /broken" in caplog.text


def test_port_zero_binds_free_loopback_port(server: EndpointServer) -> None:
    host, _, port = server.url.removeprefix("http://").rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0


def test_busy_port_raises_oserror(server: EndpointServer) -> None:
    port = server.url.rpartition(":")[2]
    with pytest.raises(OSError):
        EndpointServer(f"127.0.0.1:{port}", {}).start()


def test_listen_parses_ipv6_brackets() -> None:
    assert parse_listen("[::1]:9101") == ("::1", 9101)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)


def test_default_listen_is_loopback() -> None:
    edge = load(
        EdgeConfig,
        {
            "machine": {"id": "m1"},
            "serial": {"url": "loop://"},
            "journal": {"data_dir": "/tmp/unused"},
        },
        source="test",
    )
    backend = load(BackendConfig, {}, source="test")
    assert edge.metrics.listen == "127.0.0.1:9101"
    assert backend.metrics.listen == "127.0.0.1:9102"
