"""The request fast path: the limiter's one Redis script (windows and the cached response in one
round trip), several limits at once, a Redis outage, and the Prometheus client's kept-alive
connections (a connection the backend closed is replaced, not reported)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from api.promql import PrometheusClient
from api.ratelimit import RedisCounters
from tests import servers
from tests.api.conftest import API_KEY, KnownPrometheus
from tests.helpers import eventually
from tests.servers import LocalHTTPServer


def test_redis_limit_and_cache_in_one_script(
    known_prometheus: KnownPrometheus, redis_server: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    import redis

    # The Redis server is shared by the session: another test's entry for this URL would make
    # the first answer a HIT.
    redis.Redis.from_url(redis_server.url).flushdb()
    app = make_app(known_prometheus.url, redis_url=redis_server.url, cache_ttl_seconds=60,
                   rate_limit="4/minute;1000/hour")
    c = app.test_client()
    env = {"REMOTE_ADDR": "192.0.2.17"}
    first = c.get("/task-completion?window=3h", environ_base=env)
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    assert first.headers["X-RateLimit-Limit"] == "4"
    assert first.headers["X-RateLimit-Remaining"] == "3"
    hit = c.get("/task-completion?window=3h", environ_base=env)
    assert hit.headers["X-Cache"] == "HIT" and hit.get_data() == first.get_data()
    codes = [c.get("/agent-performance", environ_base=env).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    refused = c.get("/task-completion?window=3h", environ_base=env)
    assert refused.status_code == 429 and "X-Cache" not in refused.headers
    assert refused.json["error"]["code"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    # Another client, and a valid key, count in their own windows.
    assert c.get("/task-completion?window=3h",
                 environ_base={"REMOTE_ADDR": "192.0.2.18"}).status_code == 200
    assert c.get("/task-completion?window=3h", environ_base=env,
                 headers={"X-API-Key": API_KEY}).status_code == 200
    # Both windows live in Redis with an expiry.
    counters = app.extensions["aicrm_limiter"].counters
    assert isinstance(counters, RedisCounters)
    keys = sorted(k.decode() for k in counters.client.keys("aicrm:api:limit:addr:192.0.2.17:*"))
    assert keys == ["aicrm:api:limit:addr:192.0.2.17:1000/3600",
                    "aicrm:api:limit:addr:192.0.2.17:4/60"]
    assert all(0 < counters.client.pttl(k) <= 3_600_000 for k in keys)


def test_redis_counters_survive_script_flush_and_dropped_connections(
    redis_server: servers.RedisServer,
) -> None:
    """The limiter keeps its own connection per thread: a script Redis forgot (SCRIPT FLUSH, a
    restart) is sent in full, and a connection Redis dropped is replaced within the same call,
    so neither loses a count nor lets a request through uncounted."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    counters = RedisCounters(client)
    admin = redis.Redis.from_url(redis_server.url)
    window = [("aicrm:test:fastpath:survive", 60, 100)]
    try:
        admin.delete(window[0][0])
        assert counters.hit(window, None)[0][0][0] == 1
        admin.script_flush()
        assert counters.hit(window, None)[0][0][0] == 2
        assert admin.script_exists(counters._sha) == [True]
        admin.client_kill_filter(_type="normal", skipme=True)
        assert counters.hit(window, None)[0][0][0] == 3
        assert int(admin.get(window[0][0]) or 0) == 3
        # Those calls were packed once: one client, one packed call.
        assert list(counters._packed) == [(window[0][0],)]
        # Each thread has its own connection, gone when the thread is.
        other: list[int] = []

        def in_thread() -> None:
            other.append(counters.hit(window, None)[0][0][0])
            other.append(len(counters._open))

        t = threading.Thread(target=in_thread)
        t.start()
        t.join(10)
        assert other == [4, 2] and eventually(lambda: len(counters._open) == 1)
    finally:
        counters.close()
        admin.close()
    assert not counters._open


def test_redis_outage_lets_requests_through(known_prometheus: KnownPrometheus,
                                            make_app: Callable[..., Flask]) -> None:
    down = f"redis://127.0.0.1:{servers.free_port()}/0"
    c = make_app(known_prometheus.url, redis_url=down, rate_limit="1/minute",
                 cache_ttl_seconds=60).test_client()
    for _ in range(3):
        r = c.get("/task-completion")
        assert r.status_code == 200
        assert r.headers["X-Cache"] == "MISS" and "X-RateLimit-Limit" not in r.headers


class ClosingBackend:
    """Speaks HTTP/1.1 but closes every connection after one answer, without saying so."""

    def __init__(self) -> None:
        self.connections = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections += 1

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b'{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = LocalHTTPServer(Handler)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def closing_backend() -> Iterator[ClosingBackend]:
    backend = ClosingBackend()
    yield backend
    backend.close()


def test_client_replaces_connections_the_backend_closed(closing_backend: ClosingBackend) -> None:
    client = PrometheusClient(closing_backend.url, timeout=2)
    try:
        for _ in range(3):
            assert client.query("vector(3)")[0].value == 3.0
        assert closing_backend.connections == 3
    finally:
        client.close()


def test_client_keeps_one_connection_per_thread(known_prometheus: KnownPrometheus) -> None:
    client = PrometheusClient(known_prometheus.url, timeout=5)
    try:
        for _ in range(5):
            assert client.query("vector(1)")[0].value == 1.0
        assert len(client._open) == 1
        seen: list[int] = []

        def in_thread() -> None:
            client.query("vector(1)")
            seen.append(len(client._open))

        t = threading.Thread(target=in_thread)
        t.start()
        t.join(10)
        assert seen == [2]
        assert eventually(lambda: len(client._open) == 1)  # the thread's connection ended with it
    finally:
        client.close()
    assert not client._open


def test_connections_end_with_their_threads(known_prometheus: KnownPrometheus,
                                            redis_server: servers.RedisServer) -> None:
    """Under a server that starts a thread per request, the per-thread connections to
    Prometheus and Redis go when their thread does, instead of piling up."""
    import gc

    import redis

    client = PrometheusClient(known_prometheus.url, timeout=5)
    counters = RedisCounters(redis.Redis.from_url(redis_server.url))
    admin = redis.Redis.from_url(redis_server.url)
    window = [("aicrm:test:fastpath:threads", 60, 1000)]
    try:
        baseline = len(admin.client_list())

        def request() -> None:
            assert client.query("vector(1)")[0].value == 1.0
            counters.hit(window, None)

        for _ in range(20):
            t = threading.Thread(target=request)
            t.start()
            t.join(10)
        gc.collect()
        assert len(client._open) == 0 and len(counters._open) == 0
        assert len(admin.client_list()) <= baseline
    finally:
        client.close()
        counters.close()
        admin.close()
