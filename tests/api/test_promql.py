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


Answer = Callable[[str, str, bytes], tuple[int, bytes]]
"""(method, path, body) -> (status, body) of a fake backend."""


class FakeBackend:
    """A backend answering every request as ``answer`` says, in a thread per connection."""

    def __init__(self, answer: Answer) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, out = answer(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if out[:1] == b"{"
                                 else "text/plain")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = LocalHTTPServer(Handler)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def fake_backend() -> Iterator[Callable[[Answer], FakeBackend]]:
    started: list[FakeBackend] = []

    def start(answer: Answer) -> FakeBackend:
        backend = FakeBackend(answer)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


EMPTY_VECTOR = b'{"status":"success","data":{"resultType":"vector","result":[]}}'


def test_backend_without_the_query_api_is_502(fake_backend: Callable[[Answer], FakeBackend],
                                              make_app: Callable[..., Flask]) -> None:
    """A backend that answers 404 (a prometheus_url with a wrong path prefix, a server that does
    not speak the Prometheus API) is a bad gateway: a 404 would tell the client that the API's
    own path does not exist, and the spec allows only 502, 503 and 504 for backend trouble."""
    backend = fake_backend(lambda method, path, body: (404, b"404 page not found\n"))
    c = make_app(backend.url + "/wrong-prefix").test_client()
    for path in DATA_PATHS:
        r = c.get(path, headers=AUTH)
        assert r.status_code == 502, (path, r.get_data(as_text=True))
        assert r.json["error"]["code"] == "backend_error"
        message = r.json["error"]["message"]
        assert "/api/v1/query" in message and "api.prometheus_url" in message, message
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json["error"]["status"] == 503
    # The spec lists 502 for it on every data endpoint.
    spec = c.get("/openapi.json").json
    for path in DATA_PATHS:
        responses = spec["paths"][path.split("?")[0]]["get"]["responses"]
        assert "502" in responses and "404" not in responses, path
        assert "api.prometheus_url" in responses["502"]["description"]


def test_backend_without_the_alerts_api_falls_back_to_the_alerts_series(
        fake_backend: Callable[[Answer], FakeBackend], make_app: Callable[..., Flask]) -> None:
    """The one place a backend's 404 is expected: /api/v1/alerts (VictoriaMetrics without a
    vmalert proxy), where the firing alerts come from the ALERTS series instead."""
    firing = (b'{"status":"success","data":{"resultType":"vector","result":[{"metric":'
              b'{"__name__":"ALERTS","alertname":"AicrmSourceDown","alertstate":"firing",'
              b'"severity":"ticket"},"value":[1,"1"]}]}}')

    def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if path == "/api/v1/alerts":
            return 404, b"404 page not found\n"
        return 200, firing if b"query=ALERTS" in body else EMPTY_VECTOR

    c = make_app(fake_backend(answer).url).test_client()
    r = c.get("/executive-dashboard", headers=AUTH)
    assert r.status_code == 200, r.json
    assert [(a["name"], a["summary"]) for a in r.json["data"]["alerts"]] == [
        ("AicrmSourceDown", None)]


MALFORMED_VECTORS = [
    b'[{"metric":null,"value":[1,"1"]}]',
    b'[{"metric":{"task_type":5},"value":[1,"1"]}]',
    b'[{"metric":"x","value":[1,"1"]}]',
    b'[{"metric":{},"value":"1"}]',
    b'[{"metric":{},"value":[1]}]',
    b'[{"metric":{},"value":null}]',
    b'[{"metric":{},"value":[1,"1",2]}]',
    b'[{"metric":{},"value":[1,"one"]}]',
    b'[{"metric":{},"value":[1,1]}]',
    b'[{"metric":{},"value":[1,null]}]',
    b'[null]',
    b'{"metric":{},"value":[1,"1"]}',
]


@pytest.mark.parametrize("result", MALFORMED_VECTORS)
def test_malformed_vectors_are_502_never_500(fake_backend: Callable[[Answer], FakeBackend],
                                             make_app: Callable[..., Flask],
                                             result: bytes) -> None:
    """A vector the strict decoder refuses is looked at again by the general path: there, too, a
    series without a label map of strings or a value that is not a [time, "number"] pair is the
    backend's fault (502), not a crash later on in the view (500)."""
    vector = b'{"status":"success","data":{"resultType":"vector","result":%s}}' % result
    matrix = (b'{"status":"success","data":{"resultType":"matrix","result":%s}}'
              % result.replace(b'"value":', b'"values":'))

    def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if path == "/api/v1/alerts":
            return 200, b'{"status":"success","data":{"alerts":[]}}'
        return 200, matrix if path == "/api/v1/query_range" else vector

    backend = fake_backend(answer)
    client = PrometheusClient(backend.url, timeout=2)
    try:
        with pytest.raises(BackendError) as err:
            client.query("vector(1)")
        assert err.value.status == 502 and "malformed" in err.value.message
    finally:
        client.close()
    c = make_app(backend.url).test_client()
    for path in DATA_PATHS[:3]:
        r = c.get(path, headers=AUTH)
        assert r.status_code == 502, (path, r.get_data(as_text=True))
        assert r.json["error"]["code"] == "backend_error"


MALFORMED_MATRICES = [
    b'[{"metric":null,"values":[[1,"1"]]}]',
    b'[{"metric":{"agent":5},"values":[[1,"1"]]}]',
    b'[{"metric":{},"values":[[1,"1",2]]}]',
    b'[{"metric":{},"values":[1,"1"]}]',
    b'[{"metric":{},"values":[["x","1"]]}]',
    b'[{"metric":{},"values":[[1,"one"]]}]',
    b'[{"metric":{},"values":null}]',
]


@pytest.mark.parametrize("result", MALFORMED_MATRICES)
def test_malformed_matrices_are_502_never_500(fake_backend: Callable[[Answer], FakeBackend],
                                              make_app: Callable[..., Flask],
                                              result: bytes) -> None:
    matrix = b'{"status":"success","data":{"resultType":"matrix","result":%s}}' % result
    count = b'{"status":"success","data":{"resultType":"vector","result":[]}}'

    def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        return 200, matrix if path == "/api/v1/query_range" else count

    c = make_app(fake_backend(answer).url).test_client()
    for fmt in ("csv", "json"):
        r = c.get(f"/export?dataset=agent_spend_rate&format={fmt}", headers=AUTH)
        assert r.status_code == 502, (fmt, r.get_data(as_text=True))
        assert r.json["error"]["code"] == "backend_error"
