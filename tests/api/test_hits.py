"""Cache hits answered below Flask (api/hits.py): the same answer as Flask's, counted once by
the limiter, and every request the path must not answer left to Flask."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wrappers import Request

from api.hits import CachedHits, request_args, request_path
from tests import servers
from tests.api.conftest import API_KEY, KnownPrometheus

CACHED = ["/task-completion?window=3h", "/agent-performance?window=2h&agent=lead-qualifier",
          "/executive-dashboard?window=1h"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def flushed_redis(redis_server: servers.RedisServer) -> Iterator[servers.RedisServer]:
    """The shared test Redis without the cache entries and windows of earlier tests."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushdb()
    yield redis_server
    admin.close()


class Through:
    """Counts the requests that reached Flask's own request handling."""

    def __init__(self, app: Flask) -> None:
        self.count = 0
        # First of the app's hooks, so a request Flask refuses is counted too.
        app.before_request_funcs.setdefault(None, []).insert(0, self._seen)

    def _seen(self) -> None:
        self.count += 1


def _hits(app: Flask) -> CachedHits:
    assert isinstance(app.wsgi_app, CachedHits)
    return app.wsgi_app


def _comparable(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k not in ("X-RateLimit-Remaining", "X-RateLimit-Reset")}


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_hit_below_flask_is_the_answer_flask_gives(
    backend: str, known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=600,
                   redis_url=flushed_redis.url if backend == "redis" else None)
    through = Through(app)
    below = app.test_client()
    flask_only = Client(_hits(app).app)  # the same app without the cache-hit path
    for url in CACHED:
        headers = {**AUTH, "X-Request-ID": "req-1"}
        miss = below.get(url, headers=headers)
        assert miss.status_code == 200 and miss.headers["X-Cache"] == "MISS", url
        before = through.count
        hit = below.get(url, headers=headers)
        assert through.count == before, f"{url}: the hit went through Flask"
        reference = flask_only.get(url, headers=headers)
        assert through.count == before + 1
        assert hit.status_code == reference.status_code == 200
        assert hit.get_data() == reference.get_data() == miss.get_data()
        assert _comparable(hit.headers) == _comparable(reference.headers), url
        assert hit.headers["X-Request-ID"] == "req-1"
        # Each request counted exactly once, whichever path answered it.
        remaining = [int(r.headers["X-RateLimit-Remaining"]) for r in (miss, hit, reference)]
        assert remaining == [remaining[0], remaining[0] - 1, remaining[0] - 2], url


def test_limiter_counts_each_request_once(
    known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=600, redis_url=flushed_redis.url,
                   rate_limit="3/minute")
    through = Through(app)
    c = app.test_client()
    env = {"REMOTE_ADDR": "198.51.100.7"}
    codes = [c.get(CACHED[0], environ_base=env) for _ in range(5)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429, 429]
    assert [r.headers.get("X-Cache") for r in codes[:3]] == ["MISS", "HIT", "HIT"]
    assert [r.headers["X-RateLimit-Remaining"] for r in codes] == ["2", "1", "0", "0", "0"]
    assert codes[3].json["error"]["code"] == "rate_limited"
    assert 0 < int(codes[3].headers["Retry-After"]) <= 60
    # Both refusals went to Flask; the two hits did not, nor did the miss (answered below
    # Flask too, by api/direct.py).
    assert through.count == 2
    admin = redis.Redis.from_url(flushed_redis.url)
    assert admin.get("aicrm:api:limit:addr:198.51.100.7:3/60") == b"5"
    admin.close()


def test_keys_decide_the_bucket_and_protected_hits(
    known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=600, redis_url=flushed_redis.url)
    through = Through(app)
    c = app.test_client()
    env = {"REMOTE_ADDR": "198.51.100.8"}
    dashboard = "/executive-dashboard?window=1h"
    assert c.get(dashboard, headers=AUTH, environ_base=env).headers["X-Cache"] == "MISS"
    n = through.count
    assert c.get(dashboard, headers=AUTH, environ_base=env).headers["X-Cache"] == "HIT"
    assert c.get(dashboard, headers={"X-API-Key": API_KEY},
                 environ_base=env).headers["X-Cache"] == "HIT"
    assert through.count == n
    # No key or a wrong one: Flask's 401, never the stored body, counted under the address.
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Basic " + API_KEY}):
        r = c.get(dashboard, headers=headers, environ_base=env)
        assert r.status_code == 401 and "X-Cache" not in r.headers, headers
    assert through.count == n + 3
    # An optional key: valid counts under the key, invalid under the address.
    url = CACHED[0]
    c.get(url, environ_base=env)
    c.get(url, headers={"X-API-Key": "wrong"}, environ_base=env)
    c.get(url, headers=AUTH, environ_base=env)
    admin = redis.Redis.from_url(flushed_redis.url)
    windows = {k.decode(): int(admin.get(k) or 0)
               for k in admin.keys("aicrm:api:limit:*")}
    admin.close()
    assert windows["aicrm:api:limit:addr:198.51.100.8:100000/60"] == 3 + 2
    key_windows = [v for k, v in windows.items() if k.startswith("aicrm:api:limit:key:")]
    assert key_windows == [4]  # three dashboard requests and one task-completion


def test_requests_the_path_leaves_to_flask(
    known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    origin = "https://ops.example.com"
    app = make_app(known_prometheus.url, cache_ttl_seconds=600, redis_url=flushed_redis.url,
                   cors_origins=[origin])
    through = Through(app)
    c = app.test_client()
    url = CACHED[0]
    assert c.get(url).headers["X-Cache"] == "MISS"
    n = through.count
    assert c.get(url).headers["X-Cache"] == "HIT" and through.count == n
    # A CORS request gets Flask's answer with the CORS headers.
    r = c.get(url, headers={"Origin": origin})
    assert r.headers["X-Cache"] == "HIT" and r.headers["Access-Control-Allow-Origin"] == origin
    assert through.count == n + 1
    # HEAD, another method, a trailing slash: Flask's routing decides.
    assert c.head(url).status_code == 200 and through.count == n + 2
    assert c.post(url).status_code == 405
    assert c.get("/task-completion/?window=3h").status_code == 404
    # A bad parameter is never a hit: Flask's 400 names it.
    r = c.get("/task-completion?window=13x")
    assert r.status_code == 400 and r.json["error"]["parameter"] == "window"


def _cors_headers(headers: Any) -> list[str]:
    return [k for k in headers.keys() if k.lower().startswith("access-control-")]


def _vary(headers: Any) -> list[str]:
    return [v.strip() for value in headers.get_all("Vary") for v in value.split(",")]


@pytest.mark.parametrize("origins", [["https://ops.example.com"],
                                     ["https://ops.example.com", "https://crm.example.com"]])
def test_cors_headers_are_the_same_on_both_paths(
    origins: list[str], known_prometheus: KnownPrometheus, make_app: Callable[..., Flask],
) -> None:
    """With CORS origins configured, a request without Origin gets no CORS headers, answered by
    Flask or below it, and every data response says ``Vary: Origin``: an answer to one origin
    (or to none) must not be served from a cache in between to another."""
    app = make_app(known_prometheus.url, cache_ttl_seconds=600, cors_origins=origins)
    through = Through(app)
    c = app.test_client()
    flask_only = Client(_hits(app).app)
    url = CACHED[0]
    rid = {"X-Request-ID": "req-1"}
    miss = c.get(url, headers=rid)
    n = through.count
    hit = c.get(url, headers=rid)
    assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    assert through.count == n, "the hit went through Flask"
    reference = flask_only.get(url, headers=rid)
    assert reference.headers["X-Cache"] == "HIT"
    for r in (miss, hit, reference):
        assert r.status_code == 200
        assert _cors_headers(r.headers) == [], r.headers
        assert _vary(r.headers) == ["Origin"], r.headers
    assert _comparable(hit.headers) == _comparable(reference.headers)
    # Other data endpoints and answers through Flask, errors included.
    for path, headers in [("/export?dataset=task_throughput", AUTH),
                          ("/agent-performance?window=13x", {}),
                          ("/executive-dashboard", {})]:
        r = c.get(path, headers=headers)
        assert _cors_headers(r.headers) == [] and _vary(r.headers) == ["Origin"], (path, r)
    # With an Origin: Flask's answer, for an allowed one with the CORS headers.
    for origin in origins:
        r = c.get(url, headers={"Origin": origin})
        assert r.headers["X-Cache"] == "HIT"
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert _vary(r.headers) == ["Origin"], r.headers
    r = c.get(url, headers={"Origin": "https://evil.example.org"})
    assert r.status_code == 200 and r.headers["X-Cache"] == "HIT"
    assert _cors_headers(r.headers) == [] and _vary(r.headers) == ["Origin"]


def test_no_cors_origins_no_vary(known_prometheus: KnownPrometheus,
                                 make_app: Callable[..., Flask]) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=600)
    c = app.test_client()
    for r in (c.get(CACHED[0]), c.get(CACHED[0]), c.get(CACHED[0], headers={"Origin": "x"})):
        assert "Vary" not in r.headers and _cors_headers(r.headers) == []


def test_a_failing_hit_path_hands_the_request_to_flask(
    known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=600, redis_url=flushed_redis.url)
    c = app.test_client()
    assert c.get(CACHED[0]).headers["X-Cache"] == "MISS"
    hits = _hits(app)
    limiter_hit = hits.limiter.hit
    calls = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return limiter_hit(*args, **kwargs)

    hits.limiter.hit = broken  # type: ignore[method-assign]
    r = c.get(CACHED[0])
    assert r.status_code == 200 and r.headers["X-Cache"] == "HIT"
    assert len(calls) == 2
    assert any("cache-hit path failed" in rec.getMessage() for rec in caplog.records)


def test_hits_show_in_the_request_metrics(
    known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=600, redis_url=flushed_redis.url)
    c = app.test_client()
    for _ in range(4):
        c.get(CACHED[0])
    text = c.get("/metrics").get_data(as_text=True)
    assert ('aicrm_api_requests_total{code="200",endpoint="/task-completion",method="GET"} 4.0'
            in text)
    assert 'aicrm_api_cache_lookups_total{result="hit"} 3.0' in text
    assert 'aicrm_api_cache_lookups_total{result="miss"} 1.0' in text
    assert ('aicrm_api_request_duration_seconds_count{endpoint="/task-completion"} 4.0'
            in text)


def test_no_hit_path_without_a_cache(known_prometheus: KnownPrometheus,
                                     make_app: Callable[..., Flask]) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=0)
    assert not isinstance(app.wsgi_app, CachedHits)


QUERIES = ["", "window=1h", "a=1&b=2&a=3", "agent=a+b", "agent=a%20b", "x", "x=", "=y", "&&",
           "agent=%FF%FE", "agent=%E2%82%AC", "agent=%zz", "a=1;b=2", "agent=caf\u00e9",
           "window=1h&window=2h", "k=%2B%26%3D"]


@pytest.mark.parametrize("query", QUERIES)
def test_parameters_parse_as_werkzeug_parses_them(query: str) -> None:
    environ = EnvironBuilder(path="/task-completion", query_string=query).get_environ()
    # cache_key sorts the pairs; MultiDict groups repeated names.
    assert sorted(request_args(environ)) == sorted(Request(environ).args.items(multi=True))


@pytest.mark.parametrize("path", ["/task-completion", "/t%C3%A4sk", "/caf\u00e9", "/%FF"])
def test_path_decodes_as_werkzeug_decodes_it(path: str) -> None:
    environ = EnvironBuilder(path=path).get_environ()
    assert request_path(environ) == Request(environ).path


@pytest.mark.parametrize("cache", ["off", "memory", "redis"])
def test_a_query_string_that_is_not_utf8_is_a_400(
    cache: str, known_prometheus: KnownPrometheus, flushed_redis: servers.RedisServer,
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture,
) -> None:
    """Raw bytes that are not UTF-8 in the query string (gunicorn refuses such a request line,
    other WSGI servers pass it on) are the client's mistake: a JSON 400 saying so, counted once
    by the limiter, on the cache-hit path and through Flask alike; never a 500 and an error log."""
    app = make_app(known_prometheus.url, cache_ttl_seconds=0 if cache == "off" else 600,
                   redis_url=flushed_redis.url if cache == "redis" else None,
                   rate_limit="50/minute", cors_origins=["https://ops.example.com"])
    assert isinstance(app.wsgi_app, CachedHits) == (cache != "off")
    c = app.test_client()
    env = {"REMOTE_ADDR": "198.51.100.9"}
    remaining = []
    queries = ("window=\xff", "window=1h&x=\xff\xfe", "\xff", "dataset=task_throughput\xe9")
    paths = ("/task-completion", "/agent-performance", "/executive-dashboard", "/export")
    for path in paths[:3]:
        # Stored first, so the query string's parameters could be a hit.
        assert c.get(f"{path}?window=1h", headers=AUTH).status_code == 200
    for path in paths:
        for i, query in enumerate(queries):
            # With an Origin, the request goes through Flask even when the cache is on.
            headers = {**AUTH, **({"Origin": "https://ops.example.com"} if i % 2 else {})}
            r = c.get(path, headers=headers, environ_base=env,
                      environ_overrides={"QUERY_STRING": query})
            assert r.status_code == 400, (path, query, r.get_data(as_text=True))
            error = r.json["error"]
            assert error["code"] == "invalid_query_string"
            assert "query string" in error["message"] and "UTF-8" in error["message"]
            remaining.append(int(r.headers["X-RateLimit-Remaining"]))
    assert remaining == list(range(46, 46 - len(remaining), -1))
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    # Percent-encoded bytes that are not UTF-8 are still what they were: a value (here a bad one).
    r = c.get("/task-completion?window=%FF")
    assert r.status_code == 400 and r.json["error"]["parameter"] == "window"
