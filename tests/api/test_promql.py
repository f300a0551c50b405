"""Backend failures: Prometheus stopped is 503, a backend slower than the timeout is 504; both
JSON without a stack trace. /readyz follows the backend, /healthz does not."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from api.promql import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    PrometheusClient,
    Sample,
)
from tests import servers
from tests.api.conftest import AUTH, KnownPrometheus
from tests.api.test_http11 import ScriptedServer, ok_answer
from tests.servers import LocalHTTPServer

DATA_PATHS = ("/task-completion", "/agent-performance", "/executive-dashboard",
              "/export?dataset=task_throughput")


class SlowBackend:
    """Answers every request after ``delay`` seconds (to trip the API's query timeout)."""

    def __init__(self, delay: float) -> None:
        stop = self.stop_event = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _slow(self) -> None:
                stop.wait(delay)
                body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            do_GET = do_POST = _slow  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = LocalHTTPServer(Handler)
        self.url = self.http.url

    def close(self) -> None:
        self.stop_event.set()
        self.http.close()


@pytest.fixture
def slow_backend() -> Iterator[SlowBackend]:
    backend = SlowBackend(5)
    yield backend
    backend.close()


@pytest.mark.integration
def test_prometheus_stopped_is_503(prometheus_factory: Callable[..., servers.PrometheusServer],
                                   make_app: Callable[..., Flask]) -> None:
    prom = prometheus_factory({"global": {"scrape_interval": "15s"}})
    c = make_app(prom.url).test_client()
    assert c.get("/readyz").status_code == 200
    assert c.get("/task-completion").status_code == 200
    prom.stop()
    for path in DATA_PATHS:
        r = c.get(path, headers=AUTH)
        assert r.status_code == 503, path
        assert r.json["error"]["code"] == "backend_unavailable"
        assert "Traceback" not in r.get_data(as_text=True)
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json["status"] == "unavailable"
    assert c.get("/healthz").status_code == 200


def test_slow_backend_is_504(slow_backend: SlowBackend, make_app: Callable[..., Flask]) -> None:
    c = make_app(slow_backend.url, query_timeout_seconds=0.3).test_client()
    for path in DATA_PATHS:
        started = time.monotonic()
        r = c.get(path, headers=AUTH)
        assert r.status_code == 504, path
        assert time.monotonic() - started < 2
        assert r.json["error"]["code"] == "backend_timeout"
    assert c.get("/readyz").status_code == 503


def test_client_maps_errors(slow_backend: SlowBackend, known_prometheus: KnownPrometheus) -> None:
    slow = PrometheusClient(slow_backend.url, timeout=0.2)
    try:
        with pytest.raises(BackendTimeout):
            slow.query("vector(1)")
    finally:
        slow.close()
    dead = PrometheusClient(f"http://127.0.0.1:{servers.free_port()}", timeout=1)
    try:
        with pytest.raises(BackendUnavailable):
            dead.query("vector(1)")
    finally:
        dead.close()
    live = PrometheusClient(known_prometheus.url, timeout=5)
    try:
        assert live.query("vector(2)")[0].value == 2.0
        assert live.query("0/0")[0].value is None  # NaN is null
        assert live.query("vector(1/0)")[0].value is None  # so is +Inf, on the vector path
        assert live.query("scalar(vector(3))")[0] == Sample({}, 3.0)  # the general path
        two = live.query('label_replace(vector(1), "a", "x", "", "") or vector(2)')
        assert sorted(two, key=lambda s: s.value or 0) == [Sample({"a": "x"}, 1.0),
                                                           Sample({}, 2.0)]
        assert live.alerts() is not None
    finally:
        live.close()


MALFORMED = [
    (b'{"status":"success"}', "/api/v1/query answer", "has no data object"),
    (b'{"status":"success","data":null}', "/api/v1/query answer", "has no data object"),
    (b'{"status":"success","data":{"resultType":"vector","result":null}}', "/api/v1/query",
     "malformed"),
    (b'{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"2"]}]}}',
     "/api/v1/query", "malformed"),
    (b'{"status":"success","data":{"resultType":"scalar","result":[1]}}', "/api/v1/query",
     "malformed"),
    # The shape of a vector, but a value that is no number.
    (b'{"status":"success","data":{"resultType":"vector","result":'
     b'[{"metric":{},"value":[1,"many"]}]}}', "/api/v1/query", "malformed"),
]


@pytest.mark.parametrize(("body", "where", "what"), MALFORMED)
def test_malformed_success_answers_are_backend_errors(make_app: Callable[..., Flask],
                                                      body: bytes, where: str,
                                                      what: str) -> None:
    """A "success" answer without the data the API reads is the backend's fault: 502 with a
    message saying so, never an AttributeError or TypeError answered as a 500."""
    def script(conn: socket.socket) -> None:
        while server.read_request(conn):
            conn.sendall(ok_answer(body))

    server = ScriptedServer(script)
    client = PrometheusClient(f"http://127.0.0.1:{server.port}", timeout=2)
    try:
        calls = [lambda: client.query("vector(1)"),
                 lambda: client.query_range("vector(1)", 0, 60, 60)]
        if "no data" in what:
            calls.append(client.alerts)
        for call in calls:
            with pytest.raises(BackendError) as err:
                call()
            assert err.value.status == 502
        with pytest.raises(BackendError) as err:
            client.query("vector(1)")
        assert where in err.value.message and what in err.value.message
        r = make_app(f"http://127.0.0.1:{server.port}").test_client().get("/task-completion")
        assert r.status_code == 502 and r.json["error"]["code"] == "backend_error"
    finally:
        client.close()
        server.close()


def test_executive_dashboard_asks_for_the_alerts_while_the_query_runs(
        make_app: Callable[..., Flask]) -> None:
    """The backend answers the query only once the alerts request has arrived too: asked one
    after the other, the query would wait for 5 s and get a 503."""
    alerts_asked = threading.Event()
    alerts = (b'{"status":"success","data":{"alerts":[{"labels":{"alertname":"AicrmSourceDown",'
              b'"severity":"ticket"},"annotations":{},"state":"firing",'
              b'"activeAt":"2026-11-25T00:00:00Z"}]}}')
    query = b'{"status":"success","data":{"resultType":"vector","result":[]}}'

    def script(conn: socket.socket) -> None:
        while request := server.read_request(conn):
            if b" /api/v1/alerts " in request.split(b"\r\n", 1)[0]:
                alerts_asked.set()
                answer = ok_answer(alerts)
            elif alerts_asked.wait(5):
                answer = ok_answer(query)
            else:
                answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
            conn.sendall(answer)

    server = ScriptedServer(script)
    try:
        r = make_app(f"http://127.0.0.1:{server.port}").test_client().get(
            "/executive-dashboard", headers=AUTH)
        assert r.status_code == 200, r.json
        assert [a["name"] for a in r.json["data"]["alerts"]] == ["AicrmSourceDown"]
    finally:
        server.close()
