"""The response cache: hits for the same path and parameters in any order, never errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask import Flask

from api import agents, executive, export, tasks
from api.cache import MemoryCache, RedisCache, cache_key
from tests import servers
from tests.api.conftest import AUTH, KnownPrometheus


def test_hits_misses_and_key_order(known_prometheus: KnownPrometheus,
                                   make_app: Callable[..., Flask]) -> None:
    c = make_app(known_prometheus.url, cache_ttl_seconds=60).test_client()
    first = c.get("/task-completion?window=1h&task_type=qualify_lead")
    assert first.headers["X-Cache"] == "MISS"
    again = c.get("/task-completion?task_type=qualify_lead&window=1h")
    assert again.headers["X-Cache"] == "HIT"
    assert again.get_data() == first.get_data()
    assert c.get("/task-completion?window=2h").headers["X-Cache"] == "MISS"
    assert c.get("/executive-dashboard", headers=AUTH).headers["X-Cache"] == "MISS"
    assert c.get("/executive-dashboard", headers=AUTH).headers["X-Cache"] == "HIT"
    # The key never opens the cache: auth runs first.
    assert c.get("/executive-dashboard").status_code == 401
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'aicrm_api_cache_lookups_total{result="hit"} 2.0' in metrics


def test_cache_keys_are_unambiguous() -> None:
    """A name holding ``=`` and ``&`` is one parameter, not two; a repeated name keeps the order
    of its values (the first is the one read)."""
    path = "/agent-performance"
    assert cache_key(path, [("agent=alpha&window", "1d")]) != cache_key(
        path, [("agent", "alpha"), ("window", "1d")])
    assert cache_key(path, [("agent", "alpha&window=1d")]) != cache_key(
        path, [("agent", "alpha"), ("window", "1d")])
    assert cache_key(path, [("window", "1h"), ("window", "1d")]) != cache_key(
        path, [("window", "1d"), ("window", "1h")])
    assert cache_key(path, [("a", "1"), ("b", "2"), ("a", "3")]) == cache_key(
        path, [("b", "2"), ("a", "1"), ("a", "3")])
    assert cache_key(path, [("a", "1")]) != cache_key(path + "?a=1", [])


@pytest.mark.parametrize("redis_cache", [False, True])
def test_another_querys_entry_cannot_be_taken(
    known_prometheus: KnownPrometheus, redis_server: servers.RedisServer,
    make_app: Callable[..., Flask], redis_cache: bool,
) -> None:
    """The poisoning of a shared entry: a request whose single parameter name spells another
    query, or with a repeated name, is refused and stores nothing, on both the Flask path and
    the cache-hit path below it."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushdb()
    admin.close()
    c = make_app(known_prometheus.url, cache_ttl_seconds=60,
                 redis_url=redis_server.url if redis_cache else None).test_client()
    for _ in range(2):  # the second time through the hit path, with any entry in place
        r = c.get("/agent-performance?agent%3Dlead-qualifier%26window=1d")
        assert r.status_code == 400, r.get_data(as_text=True)
        assert r.json["error"]["parameter"] == "agent=lead-qualifier&window"
        r = c.get("/task-completion?window=1h&window=1d")
        assert r.status_code == 400 and r.json["error"]["parameter"] == "window"
    victim = c.get("/agent-performance?agent=lead-qualifier&window=1d")
    assert victim.status_code == 200 and victim.headers["X-Cache"] == "MISS"
    assert victim.json["window"] == "1d"
    assert victim.json["filters"] == {"agent": "lead-qualifier"}
    assert [a["agent"] for a in victim.json["data"]["agents"]] == ["lead-qualifier"]
    assert c.get("/task-completion?window=1d").headers["X-Cache"] == "MISS"


def test_parameters_are_the_specs(client: Any) -> None:
    """Each endpoint takes exactly the parameters /openapi.json lists for it."""
    paths = client.get("/openapi.json").json["paths"]
    for path, module in (("/task-completion", tasks), ("/agent-performance", agents),
                         ("/executive-dashboard", executive), ("/export", export)):
        names = {p["name"] for p in paths[path]["get"]["parameters"]}
        assert names == module.PARAMETERS, path


def test_errors_are_not_cached(make_app: Callable[..., Flask]) -> None:
    c = make_app(f"http://127.0.0.1:{servers.free_port()}", cache_ttl_seconds=60).test_client()
    for _ in range(2):
        r = c.get("/task-completion")
        assert r.status_code == 503 and "X-Cache" not in r.headers
    assert c.get("/task-completion?window=2x").status_code == 400


def test_memory_cache_expires_and_is_bounded() -> None:
    cache = MemoryCache(max_entries=2)
    cache.set("a", b"1", 60)
    cache.set("b", b"2", 0.0001)
    cache.set("c", b"3", 60)
    time.sleep(0.01)
    assert cache.get("a") is None  # evicted, oldest first
    assert cache.get("c") == b"3"
    assert cache.get("b") is None  # expired
    assert cache_key("/x", [("b", "2"), ("a", "1")]) == cache_key("/x", [("a", "1"), ("b", "2")])


def test_redis_cache(redis_server: servers.RedisServer) -> None:
    cache = RedisCache(redis_server.url)
    try:
        cache.set("aicrm:api:cache:t", b"body", 60)
        assert cache.get("aicrm:api:cache:t") == b"body"
        assert cache.get("aicrm:api:cache:missing") is None
    finally:
        cache.close()
    down = RedisCache(f"redis://127.0.0.1:{servers.free_port()}/0", socket_timeout=0.2)
    try:
        down.set("k", b"v", 60)  # an outage means no caching, not an error
        assert down.get("k") is None
    finally:
        down.close()
