"""What the blueprints share: the app's services, the response envelope, auth and caching."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from flask import Response, current_app, g, request

from exporter.config import Config

from .cache import ResponseCache, cache_key
from .observability import RequestMetrics
from .promql import PrometheusClient, Sample
from .security import KeyChecker
from .validation import Window, rfc3339

SERVICES = "aicrm"
CACHE_PREFETCH = "cache_prefetch"
"""``g`` key: (cache key, stored body or None), fetched with the rate-limit check."""
_CACHED_ATTR = "_aicrm_cached"


@dataclass
class Services:
    config: Config
    prometheus: PrometheusClient
    cache: ResponseCache
    keys: KeyChecker
    metrics: RequestMetrics
    logger: logging.Logger
    protected: frozenset[str]
    """Endpoint names that need a key even when require_key_for_all is off."""
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=64, thread_name_prefix="aicrm-api-backend"))
    """For a second backend request sent while a view waits on its query (the executive
    dashboard's alerts). Its threads start when needed, in the worker that uses them (so none
    is lost to gunicorn's fork), at most one per request running at once (the worker's
    threads; the bound only caps a misconfiguration), and keep their own backend
    connections."""


def services() -> Services:
    svc: Services = current_app.extensions[SERVICES]
    return svc


def quantity(value: float | None, unit: str) -> dict[str, Any]:
    """A number and its unit; null when the backend has no data for it."""
    return {"value": value, "unit": unit}


def first(samples: Iterable[Sample] | None, **labels: str) -> float | None:
    """The value of the sample with these labels (None when absent)."""
    for s in samples or ():
        if all(s.labels.get(k, "") == v for k, v in labels.items()):
            return s.value
    return None


def envelope(window: Window | None, evaluated_at: float, data: Any,
             **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if window is not None:
        body["window"] = window.text
        body["window_seconds"] = window.seconds
    body.update(extra)
    body["generated_at"] = rfc3339(time.time())
    body["evaluated_at"] = rfc3339(evaluated_at)
    body["data"] = data
    return body


encode_json = msgspec.json.Encoder().encode
"""Compact JSON (msgspec); values are already null where the backend had no number."""


def json_response(body: Any, status: int = 200) -> Response:
    return Response(encode_json(body), status=status, mimetype="application/json")


def is_cached(view: object) -> bool:
    """Whether a view function is wrapped by ``cached``."""
    return bool(getattr(view, _CACHED_ATTR, False))


F = TypeVar("F", bound=Callable[..., Response])


def cached(view: F) -> F:
    """Serve a fresh stored copy when there is one; store successful answers for the TTL."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        svc = services()
        ttl = svc.config.api.cache_ttl_seconds
        if ttl <= 0:
            return view(*args, **kwargs)
        prefetched = g.get(CACHE_PREFETCH)
        if prefetched is not None:
            key, body = prefetched
        else:
            key = cache_key(request.path, request.args.items(multi=True))
            body = svc.cache.get(key)
        if body is not None:
            svc.metrics.cache.labels("hit").inc()
            # The stored bytes as they are: no decoding or re-encoding on a hit.
            resp = Response(body, mimetype="application/json")
            resp.headers["X-Cache"] = "HIT"
            return resp
        svc.metrics.cache.labels("miss").inc()
        resp = view(*args, **kwargs)
        if resp.status_code == 200 and not resp.is_streamed:
            # Stored once the answer has gone out: the WSGI server closes the response after
            # writing its body, so the client does not wait for the cache's round trip. The
            # same request on another connection in that moment misses too, as two at once
            # always could; on the same kept-alive connection the next one comes after it.
            stored = resp.get_data()
            resp.call_on_close(lambda: svc.cache.set(key, stored, ttl))
        resp.headers["X-Cache"] = "MISS"
        return resp

    setattr(wrapper, _CACHED_ATTR, True)
    return wrapper  # type: ignore[return-value]


def request_id() -> str:
    return str(g.get("request_id", ""))
