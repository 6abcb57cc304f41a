"""A small read-only HTTP server for /metrics, /healthz, /readyz and /status.

Both programs serve their operational endpoints with it. It serves GET and
HEAD only. Any other standard method gets 405 with an ``Allow`` header, and
``http.server`` itself returns 501 for a method it does not recognise.
Each request runs in its own daemon thread, so a slow scrape never blocks the
program and never delays its exit.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

ALLOWED_METHODS = "GET, HEAD"

#: Seconds a connection may stay silent before the server closes it.
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


#: A route gets the request headers, names in lower case, and returns the
#: whole response.
Route = Callable[[Mapping[str, str]], Response]


def text_response(status: int, text: str) -> Response:
    return Response(status, (text + "\n").encode())


def json_response(status: int, data: Any) -> Response:
    body = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
    return Response(status, body, "application/json")


def metrics_route(registry: CollectorRegistry) -> Route:
    """Serve ``registry`` in the format the scraper requests in ``Accept``."""

    def route(headers: Mapping[str, str]) -> Response:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return Response(HTTPStatus.OK, encoder(registry), content_type)

    return route


def health_route(headers: Mapping[str, str]) -> Response:
    """Return 200 for as long as the process can run this thread."""
    return text_response(HTTPStatus.OK, "ok")


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:9101`` for IPv6) into host and port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: Mapping[str, Route]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.routes = routes
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _reject_method(self) -> None:
        response = text_response(
            HTTPStatus.METHOD_NOT_ALLOWED, f"method not allowed; use {ALLOWED_METHODS}"
        )
        # The request body, if any, is never read, so the connection cannot
        # carry another request.
        self.close_connection = True
        extra = {"Allow": ALLOWED_METHODS, "Connection": "close"}
        self._send(response, send_body=True, extra=extra)

    do_POST = do_PUT = do_DELETE = do_PATCH = _reject_method
    do_OPTIONS = do_TRACE = do_CONNECT = _reject_method

    def _answer(self, send_body: bool) -> None:
        path = self.path.partition("?")[0]
        route = self.server.routes.get(path)
        if route is None:
            known = ", ".join(sorted(self.server.routes))
            response = text_response(
                HTTPStatus.NOT_FOUND, f"not found: {path} (endpoints: {known})"
            )
        else:
            try:
                headers = {name.lower(): value for name, value in self.headers.items()}
                response = route(headers)
            except Exception:
                log.exception("endpoint failed: %s", path)
                response = text_response(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the log"
                )
        self._send(response, send_body)

    def _send(
        self,
        response: Response,
        send_body: bool,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in {**response.headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("request: %s %s", self.address_string(), format % args)


class EndpointServer:
    """Serve ``routes`` on ``listen`` from a background thread.

    Port 0 picks a free port; ``url`` gives the address actually bound.
    """

    def __init__(self, listen: str, routes: Mapping[str, Route]) -> None:
        self.listen = listen
        self.routes = dict(routes)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("endpoint server is not started")
        host, port = self._server.socket.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Bind and start serving; return the base URL.

        Raises OSError when the address is in use or cannot be bound.
        """
        self._server = _Server(parse_listen(self.listen), self.routes)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http-endpoints",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def close(self) -> None:
        """Stop accepting requests and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
