"""The exporter's HTTP endpoint: encodes and serves, nothing else.

GET /metrics (persist-then-render, see state.py), POST /v1/events (push), GET /healthz,
GET /readyz, GET / (a short index).
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class Handlers:
    """What the HTTP layer calls; the runtime provides them (keeps this module I/O-only)."""

    def __init__(
        self,
        metrics: Callable[[], bytes],
        push: Callable[[bytes, str | None], tuple[int, dict[str, Any], bool]] | None,
        push_token: str | None,
        max_body_bytes: int,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        count_push: Callable[[int], None],
    ):
        self.metrics = metrics
        self.push = push
        self.push_token = push_token
        self.max_body_bytes = max_body_bytes
        self.health = health
        self.count_push = count_push


class MetricsUnavailable(Exception):
    """No values can be served yet (none is on disk): /metrics answers 503."""


def make_handler(h: Handlers) -> type[BaseHTTPRequestHandler]:
    from .sources.push import IDEMPOTENCY_HEADER, check_token, valid_idempotency_key

    class Handler(BaseHTTPRequestHandler):
        server_version = "aicrm-exporter"
        protocol_version = "HTTP/1.1"
        timeout = 30  # seconds; an idle or stalled client does not hold a thread forever
        # TCP_NODELAY: the head and the body go out as two writes, and with Nagle's algorithm
        # the body waited for the client's delayed ACK of the head, 40 ms a kept-alive request.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
                  ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, obj: dict[str, Any], extra: dict[str, str] | None = None
                  ) -> None:
            self._send(code, json.dumps(obj).encode() + b"\n", "application/json", extra)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = h.metrics()
                except MetricsUnavailable as exc:
                    self._send(503, f"{exc}\n".encode(), "text/plain; charset=utf-8",
                               {"Retry-After": "5"})
                    return
                if "gzip" in (self.headers.get("Accept-Encoding") or ""):
                    self._send(200, gzip.compress(body, 1), CONTENT_TYPE_LATEST,
                               {"Content-Encoding": "gzip"})
                else:
                    self._send(200, body, CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, detail = h.health()
                if path == "/healthz":
                    self._json(200, {"status": "ok"})
                else:
                    self._json(200 if ok else 503, {"status": "ok" if ok else "degraded", **detail})
            elif path == "/":
                self._send(200, b"aicrm-exporter: /metrics, POST /v1/events, /healthz, /readyz\n",
                           "text/plain; charset=utf-8")
            else:
                self._json(404, {"error": f"no such endpoint: {path}"})

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path != "/v1/events":
                self._drain_and(404, {"error": f"no such endpoint: {path}"})
                return
            code, body, replayed = self._push()
            self._push_answer(code, body, replayed)

        def _push_answer(self, code: int, body: dict[str, Any], replayed: bool = False
                         ) -> None:
            h.count_push(code)
            extra = {"WWW-Authenticate": "Bearer"} if code == 401 else {}
            if replayed:
                extra["Idempotent-Replayed"] = "true"
            self._json(code, body, extra or None)

        def _drain_and(self, code: int, obj: dict[str, Any]) -> None:
            self.close_connection = True
            self._json(code, obj)

        def handle_expect_100(self) -> bool:
            """``Expect: 100-continue``: the checks that need no body (path, token, length,
            encoding, key) come first, so a client that fails them is not invited to send
            its body: it gets the error instead of ``100 Continue``, and the connection
            closes (its body, if it sends one anyway, is never read)."""
            path = self.path.split("?", 1)[0]
            if self.command != "POST":
                return super().handle_expect_100()
            if path != "/v1/events":
                self._drain_and(404, {"error": f"no such endpoint: {path}"})
                return False
            refused = self._refuse_push()
            if refused is not None:
                self._push_answer(*refused)
                return False
            return super().handle_expect_100()

        def _refuse_push(self) -> tuple[int, dict[str, Any]] | None:
            """The answer to a push its headers alone refuse (closing the connection, whose
            body is left unread), or None."""
            err = self._check_push_headers()
            if err is not None:
                self.close_connection = True
            return err

        def _check_push_headers(self) -> tuple[int, dict[str, Any]] | None:
            if h.push is None:
                return 404, {"error": "push is disabled (sources.push.enabled)"}
            if h.push_token is None or not check_token(self.headers.get("Authorization"),
                                                       h.push_token):
                return 401, {"error": "missing or wrong bearer token"}
            key = self.headers.get(IDEMPOTENCY_HEADER)
            if key is not None and not valid_idempotency_key(key):
                return 400, {"error": f"{IDEMPOTENCY_HEADER} must be 1-128 characters of "
                                      "A-Z a-z 0-9 . _ : -"}
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                return 411, {"error": "Content-Length is required"}
            # 1*DIGIT (RFC 9110): int() would also take '+1', '1_0' or non-ASCII digits.
            length_header = length_header.strip()
            if not (length_header.isascii() and length_header.isdigit()):
                return 400, {"error": "Content-Length is not a valid length"}
            if int(length_header) > h.max_body_bytes:
                return 413, {"error": f"body larger than {h.max_body_bytes} bytes "
                                      "(sources.push.max_body_bytes)"}
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("identity", "gzip", "x-gzip"):
                return 415, {"error": f"unsupported Content-Encoding {encoding!r} "
                                      "(use gzip or none)"}
            return None

        def _push(self) -> tuple[int, dict[str, Any], bool]:
            refused = self._refuse_push()
            if refused is not None:
                return (*refused, False)
            assert h.push is not None  # _refuse_push answers 404 otherwise
            length = int(self.headers["Content-Length"])
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            key = self.headers.get(IDEMPOTENCY_HEADER)
            body = self.rfile.read(length)
            if len(body) != length:
                # The client went away mid-body: its last line may be cut anywhere.
                self.close_connection = True
                return 400, {"error": f"body shorter than Content-Length ({len(body)} of "
                                      f"{length} bytes)"}, False
            if encoding != "identity":
                try:
                    body = _gunzip(body, h.max_body_bytes)
                except ValueError as exc:
                    return 413 if "larger" in str(exc) else 400, {"error": str(exc)}, False
            return h.push(body, key)

    return Handler


def _gunzip(data: bytes, limit: int) -> bytes:
    import zlib

    out = bytearray()
    while True:  # a gzip file may hold several members, one after the other
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(f"body is not valid gzip: {exc}") from None
        if len(out) > limit:
            raise ValueError(f"decompressed body larger than {limit} bytes")
        if not d.eof:
            raise ValueError("body is not valid gzip: truncated")
        data = d.unused_data
        if not data:
            return bytes(out)


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Server:
    def __init__(self, host: str, port: int, handlers: Handlers):
        """``host`` is a name, an IPv4 address or an IPv6 literal (without brackets)."""
        cls = _ThreadingHTTPServerV6 if ":" in host else ThreadingHTTPServer
        self.httpd = cls((host, port), make_handler(handlers))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http",
                                       kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
