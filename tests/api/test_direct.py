"""One-query endpoints answered below Flask (api/direct.py): the same bytes and headers as
Flask's answer, nothing sent for a request Flask refuses, a client past its limit costs the
backend at most one query per thread, backend errors answered by Flask, and the lent
connection comes back (or is replaced when the backend closed it)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.test import Client

from api.direct import DirectAnswers
from api.promql import PrometheusClient
from tests import servers
from tests.api.conftest import API_KEY, KnownPrometheus
from tests.api.test_fastpath import ClosingBackend
from tests.api.test_hits import Through
from tests.api.test_promql import EMPTY_VECTOR, FakeBackend
from tests.helpers import eventually

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PLANNED = ["/task-completion?window=3h", "/task-completion?window=1h&task_type=lead_qualification",
           "/task-completion?window=2h&agent=lead-qualifier", "/agent-performance",
           "/agent-performance?window=2h&agent=lead-qualifier"]


class Calls:
    """Counts a PrometheusClient's ``query`` and ``start_query`` calls (the real methods run)."""

    def __init__(self, client: PrometheusClient) -> None:
        self.query = self.start_query = 0
        real_query, real_start = client.query, client.start_query

        def query(*args: Any, **kwargs: Any) -> Any:
            self.query += 1
            return real_query(*args, **kwargs)

        def start_query(*args: Any, **kwargs: Any) -> Any:
            self.start_query += 1
            return real_start(*args, **kwargs)

        client.query = query  # type: ignore[method-assign]
        client.start_query = start_query  # type: ignore[method-assign]


def _direct(app: Flask) -> DirectAnswers:
    assert isinstance(app.wsgi_app, DirectAnswers)
    return app.wsgi_app


def _prometheus(app: Flask) -> PrometheusClient:
    client: PrometheusClient = app.extensions["aicrm"].prometheus
    return client


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _comparable(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k not in ("X-RateLimit-Remaining", "X-RateLimit-Reset", "Content-Length")}


def test_direct_answer_is_the_answer_flask_gives(known_prometheus: KnownPrometheus,
                                                 make_app: Callable[..., Flask],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # One evaluation time for both paths, so that the numbers are the same to the last bit.
    at = time.time() - 5
    monkeypatch.setattr(time, "time", lambda: at)
    for settings in ({}, {"cors_origins": ["https://ops.example"]}):
        app = make_app(known_prometheus.url, **settings)
        calls = Calls(_prometheus(app))
        through = Through(app)
        direct = app.test_client()
        flask_only = Client(_direct(app).app)  # the same app without the direct path
        for url in PLANNED:
            sent_before, asked_before, seen_before = calls.start_query, calls.query, through.count
            got = direct.get(url, headers={"X-Request-ID": "req-1"})
            assert got.status_code == 200, (url, got.json)
            assert through.count == seen_before, f"{url}: went through Flask"
            assert (calls.start_query, calls.query) == (sent_before + 1, asked_before)
            reference = flask_only.get(url, headers={"X-Request-ID": "req-1"})
            assert calls.query == asked_before + 1 and through.count == seen_before + 1
            assert reference.status_code == 200
            # Equal but for the last bits of a sum: Prometheus adds a sum's series in no fixed
            # order, so the same query at the same time can differ there.
            assert _same(got.json, reference.json), (url, got.json, reference.json)
            assert _comparable(got.headers) == _comparable(reference.headers), url
            assert got.headers["X-Request-ID"] == "req-1"
            assert int(got.headers["Content-Length"]) == len(got.get_data())
        # The connection was lent to each query and came back: one, reused throughout.
        assert len(_prometheus(app)._open) == 1


def test_with_an_origin_flask_answers_from_the_query_sent(
    known_prometheus: KnownPrometheus, make_app: Callable[..., Flask],
) -> None:
    app = make_app(known_prometheus.url, cors_origins=["https://ops.example"])
    calls = Calls(_prometheus(app))
    through = Through(app)
    r = app.test_client().get("/agent-performance?window=2h",
                              headers={"Origin": "https://ops.example"})
    assert r.status_code == 200, r.json
    assert r.headers["Access-Control-Allow-Origin"] == "https://ops.example"
    assert (through.count, calls.start_query, calls.query) == (1, 1, 0)


@pytest.fixture
def counting_backend() -> Iterator[tuple[FakeBackend, list[str]]]:
    queries: list[str] = []

    def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        queries.append(path)
        return 200, EMPTY_VECTOR

    backend = FakeBackend(answer)
    yield backend, queries
    backend.close()


@pytest.mark.parametrize(("url", "headers", "status"), [
    ("/agent-performance?window=90d", AUTH, 400),
    ("/agent-performance?window=1h&window=2h", AUTH, 400),
    ("/task-completion?windows=1h", AUTH, 400),
    ("/task-completion?agent=no%20spaces", AUTH, 400),
    ("/agent-performance", {}, 401),
    ("/task-completion", {"Authorization": "Bearer wrong"}, 401),
])
def test_nothing_is_sent_for_a_request_flask_refuses(
    url: str, headers: dict[str, str], status: int,
    counting_backend: tuple[FakeBackend, list[str]], make_app: Callable[..., Flask],
) -> None:
    backend, queries = counting_backend
    app = make_app(backend.url, require_key_for_all=True)
    r = app.test_client().get(url, headers=headers)
    assert r.status_code == status, r.json
    assert queries == []
    # The same app sends the query early for a request it answers.
    assert app.test_client().get("/agent-performance", headers=AUTH).status_code == 200
    assert queries == ["/api/v1/query"]


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_a_client_past_its_limit_costs_one_query_per_thread(
    backend: str, counting_backend: tuple[FakeBackend, list[str]],
    redis_server: servers.RedisServer, make_app: Callable[..., Flask],
) -> None:
    fake, queries = counting_backend
    if backend == "redis":
        redis.Redis.from_url(redis_server.url).flushdb()
    app = make_app(fake.url, rate_limit="2/minute",
                   redis_url=redis_server.url if backend == "redis" else None)
    c = app.test_client()
    statuses = [c.get("/agent-performance?window=1h").status_code for _ in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    # The third request's query went before the limiter's verdict (this process had not seen
    # the client refused); after it, none. (Abandoned at once, it may reach the backend's
    # handler thread after the answer.)
    assert eventually(lambda: len(queries) >= 3, seconds=5)
    time.sleep(0.2)
    assert len(queries) == 3
    # The abandoned query's connection was closed, not handed to the next request: another
    # client is answered on a fresh one.
    r = c.get("/agent-performance?window=1h", headers=AUTH)
    assert r.status_code == 200, r.json
    assert len(queries) == 4


def test_with_the_cache_on_only_admitted_misses_are_sent_early(
    counting_backend: tuple[FakeBackend, list[str]], redis_server: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    fake, queries = counting_backend
    redis.Redis.from_url(redis_server.url).flushdb()
    app = make_app(fake.url, rate_limit="3/minute", redis_url=redis_server.url,
                   cache_ttl_seconds=600)
    calls = Calls(_prometheus(app))
    c = app.test_client()
    assert c.get("/agent-performance?window=1h").headers["X-Cache"] == "MISS"
    assert c.get("/agent-performance?window=1h").headers["X-Cache"] == "HIT"
    assert c.get("/agent-performance?window=2h").headers["X-Cache"] == "MISS"
    assert (calls.start_query, calls.query, len(queries)) == (2, 0, 2)
    # Counted below Flask and refused there: nothing sent, not even speculatively.
    assert c.get("/agent-performance?window=3h").status_code == 429
    assert (calls.start_query, len(queries)) == (2, 2)


def test_a_lent_connection_the_backend_closed_is_replaced() -> None:
    backend = ClosingBackend()  # closes each connection after one answer, without saying so
    client = PrometheusClient(backend.url, timeout=2)
    try:
        for _ in range(3):
            time.sleep(0.05)  # the backend has closed the previous connection by now
            pending = client.start_query("vector(3)", time.time())
            assert pending is not None
            assert [s.value for s in pending.result()] == [3.0]
        # Sent on the closed connection, then asked again on a fresh one.
        assert backend.connections == 3
        assert len(client._open) == 1
    finally:
        client.close()
        backend.close()


def test_abandon_closes_the_connection_and_the_next_query_opens_one(
    known_prometheus: KnownPrometheus,
) -> None:
    client = PrometheusClient(known_prometheus.url, timeout=5)
    try:
        assert client.query("vector(1)")[0].value == 1.0
        pending = client.start_query("vector(2)", time.time())
        assert pending is not None
        # The thread's connection is lent: a query meanwhile opens a second one.
        assert client.query("vector(4)")[0].value == 4.0
        assert len(client._open) == 2
        pending.abandon()
        assert len(client._open) == 1
        with pytest.raises(RuntimeError):
            pending.result()
        pending = client.start_query("vector(5)", time.time())
        assert pending is not None
        assert [s.value for s in pending.result()] == [5.0]
        # Given back only when the thread has no other: it has one, so this one is closed.
        assert len(client._open) == 1
    finally:
        client.close()


def test_threads_lend_their_own_connections(known_prometheus: KnownPrometheus) -> None:
    client = PrometheusClient(known_prometheus.url, timeout=5)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                pending = client.start_query(f"vector({n * 100 + i})", time.time())
                assert pending is not None
                assert [s.value for s in pending.result()] == [float(n * 100 + i)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    finally:
        client.close()


def test_plans_are_kept_by_query_string_bounded_and_never_for_bad_parameters(
    counting_backend: tuple[FakeBackend, list[str]], make_app: Callable[..., Flask],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import api.direct

    backend, queries = counting_backend
    app = make_app(backend.url)
    direct = _direct(app)
    client = app.test_client()
    assert client.get("/agent-performance?window=2h").status_code == 200
    kept = dict(direct._plans)
    assert list(kept) == [("/agent-performance", "window=2h")]
    assert client.get("/agent-performance?window=2h").status_code == 200
    assert direct._plans[("/agent-performance", "window=2h")] is kept[
        ("/agent-performance", "window=2h")]
    # The same parameters on another endpoint are another plan; a bad window is Flask's 400.
    assert client.get("/task-completion?window=2h").status_code == 200
    assert client.get("/task-completion?window=2x").status_code == 400
    assert set(direct._plans) == {("/agent-performance", "window=2h"),
                                  ("/task-completion", "window=2h")}
    assert direct._plans[("/task-completion", "window=2h")].expr != kept[
        ("/agent-performance", "window=2h")].expr
    monkeypatch.setattr(api.direct, "_PLANS_MAX", 4)
    for hours in range(1, 10):
        assert client.get(f"/agent-performance?window={hours}h").status_code == 200
        assert len(direct._plans) <= 4
    assert len(queries) == 12
