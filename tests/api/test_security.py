"""API keys (both header forms), require_key_for_all, CORS allow-list, rate limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from api.security import KeyChecker, presented_key
from tests.api.conftest import API_KEY, OTHER_KEY, KnownPrometheus

PROTECTED = ("/executive-dashboard?window=1h", "/export?dataset=task_throughput")
OPEN = ("/task-completion", "/agent-performance")


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong-key"}, 401),
        ({"X-API-Key": "wrong-key"}, 401),
        ({"Authorization": f"Basic {API_KEY}"}, 401),
        ({"Authorization": f"Bearer {API_KEY}x"}, 401),
        ({"Authorization": f"Bearer {API_KEY}"}, 200),
        ({"Authorization": f"bearer {OTHER_KEY}"}, 200),
        ({"X-API-Key": API_KEY}, 200),
    ],
)
def test_protected_endpoints_need_a_key(client: Any, path: str, headers: dict[str, str],
                                        status: int) -> None:
    r = client.get(path, headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.json["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", OPEN)
def test_open_endpoints_need_no_key_unless_configured(
    known_prometheus: KnownPrometheus, make_app: Callable[..., Flask], path: str
) -> None:
    assert make_app(known_prometheus.url).test_client().get(path).status_code == 200
    strict = make_app(known_prometheus.url, require_key_for_all=True).test_client()
    assert strict.get(path).status_code == 401
    assert strict.get(path, headers={"X-API-Key": API_KEY}).status_code == 200
    # Probes, scrapes and the spec stay open.
    for public in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert strict.get(public).status_code == 200, public


def test_no_configured_keys_lock_protected_endpoints(
    known_prometheus: KnownPrometheus, make_app: Callable[..., Flask]
) -> None:
    c = make_app(known_prometheus.url, api_keys=()).test_client()
    assert c.get("/executive-dashboard", headers={"X-API-Key": ""}).status_code == 401
    assert c.get("/executive-dashboard", headers={"Authorization": "Bearer "}).status_code == 401


def test_key_checker() -> None:
    checker = KeyChecker(["a1", "b2"])
    assert checker.valid("a1") and checker.valid("b2")
    assert not checker.valid("a") and not checker.valid("a1 ") and not checker.valid(None)
    assert presented_key({"Authorization": "Bearer  k "}) == "k"
    assert presented_key({"X-API-Key": " k2"}) == "k2"
    assert presented_key({"Authorization": "Token k"}) is None


ORIGIN = "https://crm.example.com"


def test_cors_allow_list(known_prometheus: KnownPrometheus,
                         make_app: Callable[..., Flask]) -> None:
    c = make_app(known_prometheus.url, cors_origins=[ORIGIN]).test_client()
    allowed = c.get("/task-completion", headers={"Origin": ORIGIN})
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
    denied = c.get("/task-completion", headers={"Origin": "https://evil.example.org"})
    assert denied.status_code == 200
    assert "Access-Control-Allow-Origin" not in denied.headers
    # A preflight for a protected endpoint carries no key and must not be refused.
    pre = c.options("/executive-dashboard", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization, X-Request-ID"})
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "GET" in pre.headers["Access-Control-Allow-Methods"]
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    bad_pre = c.options("/executive-dashboard", headers={
        "Origin": "https://evil.example.org", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in bad_pre.headers


def test_no_cors_origins_means_no_cors_headers(client: Any) -> None:
    r = client.get("/task-completion", headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert not [h for h in r.headers.keys() if h.lower().startswith("access-control-")]
    pre = client.options("/executive-dashboard", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 200
    assert not [h for h in pre.headers.keys() if h.lower().startswith("access-control-")]


def test_rate_limit(known_prometheus: KnownPrometheus, make_app: Callable[..., Flask]) -> None:
    c = make_app(known_prometheus.url, rate_limit="3/minute").test_client()
    codes = [c.get("/task-completion").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = c.get("/agent-performance")
    assert r.status_code == 429
    assert r.json["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) > 0
    assert r.headers["X-RateLimit-Limit"] == "3"
    # A valid key has its own bucket; health probes are never limited.
    assert c.get("/task-completion", headers={"X-API-Key": API_KEY}).status_code == 200
    assert all(c.get("/healthz").status_code == 200 for _ in range(5))


@pytest.mark.parametrize("cache_ttl", [0, 60])
@pytest.mark.parametrize("strict", [False, True])
def test_wrong_keys_are_rate_limited(known_prometheus: KnownPrometheus,
                                     make_app: Callable[..., Flask], cache_ttl: int,
                                     strict: bool) -> None:
    """A refused key counts under the client address like any request without a valid key, so
    guessing keys hits the limit: 401 within it, 429 past it (with the cache-hit path in front
    of Flask, and for every endpoint with require_key_for_all)."""
    c = make_app(known_prometheus.url, rate_limit="3/minute", cache_ttl_seconds=cache_ttl,
                 require_key_for_all=strict).test_client()
    assert c.get("/executive-dashboard", headers={"X-API-Key": API_KEY}).status_code == 200
    path = "/task-completion" if strict else "/executive-dashboard"
    answers = [c.get(path, headers={"X-API-Key": f"guess-{i}"}) for i in range(5)]
    answers.append(c.get("/export?dataset=task_throughput", headers={
        "Authorization": "Bearer guess-export"}))
    answers.append(c.get(path))  # no key at all
    assert [r.status_code for r in answers] == [401, 401, 401, 429, 429, 429, 429]
    assert answers[0].headers["X-RateLimit-Remaining"] == "2"
    assert answers[3].json["error"]["code"] == "rate_limited"
    assert int(answers[3].headers["Retry-After"]) > 0
    # The valid key keeps its own bucket.
    assert c.get("/executive-dashboard", headers={"X-API-Key": API_KEY}).status_code == 200


@pytest.mark.parametrize("cache_ttl", [0, 60])
def test_clients_behind_a_trusted_proxy_have_their_own_limits(
        known_prometheus: KnownPrometheus, make_app: Callable[..., Flask], cache_ttl: int) -> None:
    """With trusted_proxy_hops the client address is the proxy's X-Forwarded-For entry: one
    noisy client behind the proxy does not use up everyone's limit (on the cache-hit path too)."""
    c = make_app(known_prometheus.url, rate_limit="3/minute", cache_ttl_seconds=cache_ttl,
                 trusted_proxy_hops=1).test_client()

    def get(client_addr: str) -> int:
        # What a proxy sends: the header a client wrote, then the address the proxy saw.
        return c.get("/task-completion", environ_base={"REMOTE_ADDR": "172.18.0.1"},
                     headers={"X-Forwarded-For": f"6.6.6.6, {client_addr}"}).status_code

    assert [get("203.0.113.7") for _ in range(4)] == [200, 200, 200, 429]
    assert [get("198.51.100.9") for _ in range(3)] == [200, 200, 200]


@pytest.mark.parametrize("cache_ttl", [0, 60])
def test_without_a_trusted_proxy_x_forwarded_for_is_ignored(
        known_prometheus: KnownPrometheus, make_app: Callable[..., Flask], cache_ttl: int) -> None:
    """A client cannot leave its limit behind by writing X-Forwarded-For itself."""
    c = make_app(known_prometheus.url, rate_limit="3/minute",
                 cache_ttl_seconds=cache_ttl).test_client()
    codes = [c.get("/task-completion", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
             for i in range(4)]
    assert codes == [200, 200, 200, 429]
