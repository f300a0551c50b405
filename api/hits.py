"""Cache hits answered below Flask.

A cached endpoint's hit needs little: who is asking (an API key or the address), one limiter
call that also returns the stored body, and the stored bytes with their headers. Through Flask
the same answer cost about 0.45 ms more CPU per request on the benchmark machine (request and
app contexts, routing, the hooks, a Response object): a third of a hit. ``CachedHits`` wraps
the app's ``wsgi_app`` (the middleware pattern of werkzeug's ProxyFix) and answers a request
itself only when it is certain to give the very answer Flask would:

- a GET of a cached endpoint's exact path, cache on, no CORS question (an ``Origin`` header
  while an allow-list is configured goes to Flask, which adds the CORS headers);
- a key, when the endpoint needs one, that is valid (anything else goes to Flask, which counts
  it under the client address and answers 401, or 429 once over the limit);
- the limiter admits the request and the cache holds a body for the same key Flask computes
  (the same path decoding and query parsing as werkzeug's ``request.path`` and ``request.args``).

Every other request goes to Flask with what was already learnt (the limiter's verdict and the
cache lookup) in the WSGI environment, so a request is never counted twice and Flask's hooks
give the 429, compute the miss and store it. The responses are the same bytes and headers
either way (tests/api/test_hits.py compares them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import werkzeug.urls  # noqa: F401 - registers the "werkzeug.url_quote" codec error handler

from .cache import ResponseCache, cache_key
from .observability import REQUEST_ID_HEADER, RequestMetrics, request_id_from
from .ratelimit import RateLimiter, WindowState
from .security import KeyChecker, key_id, presented_key

SIMPLE_GET_PATHS = "aicrm_simple_get_paths"
"""``app.extensions`` key: the paths of the endpoints answered below Flask, whose plain GETs
the gunicorn worker also reads and answers without gunicorn's general HTTP machinery
(api/gunicorn_worker.py, api/simple_http.py)."""
ADMISSION = "aicrm.admission"
"""WSGI environ key: the ``Admission`` of a request CachedHits passed on to Flask."""

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class Admission:
    """What the limiter said about a request (None: its storage was unreachable) and, for a
    cached endpoint, the cache key and the stored body (None: a miss)."""

    state: WindowState | None
    cache_key: str | None
    body: bytes | None


@dataclass(frozen=True, slots=True)
class CachedRoute:
    rule: str
    """The route as Flask names it in the request metrics (``/task-completion``)."""
    needs_key: bool


class EnvironHeaders:
    """The two key headers of a WSGI environ, as ``presented_key`` reads them."""

    __slots__ = ("_environ",)
    _NAMES = {"Authorization": "HTTP_AUTHORIZATION", "X-API-Key": "HTTP_X_API_KEY"}

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._environ = environ

    def get(self, name: str, /) -> str | None:
        value = self._environ.get(self._NAMES[name])
        return value if isinstance(value, str) else None


def limiter_client(environ: Mapping[str, Any], keys: KeyChecker, needs_key: bool) -> str | None:
    """Who the limiter counts a request under, as Flask's hooks decide it: a valid key's id,
    else the client address; None when the endpoint needs a key and has no valid one (Flask
    answers the 401)."""
    key = presented_key(EnvironHeaders(environ))
    if key is not None and keys.valid(key):
        return f"key:{key_id(key)}"
    if needs_key:
        return None
    return f"addr:{environ.get('REMOTE_ADDR') or 'unknown'}"


def request_path(environ: Mapping[str, Any]) -> str:
    """``request.path`` as werkzeug decodes it from PATH_INFO."""
    return str(environ.get("PATH_INFO") or "").encode("latin1").decode(errors="replace")


def request_args(environ: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``request.args.items(multi=True)`` as werkzeug parses QUERY_STRING."""
    query = str(environ.get("QUERY_STRING", "")).encode("latin1").decode()
    return parse_qsl(query, keep_blank_values=True, errors="werkzeug.url_quote")


class CachedHits:
    def __init__(self, app: WSGIApp, routes: Mapping[str, CachedRoute], *, keys: KeyChecker,
                 limiter: RateLimiter, cache: ResponseCache, prefetch: bool,
                 metrics: RequestMetrics, cors: bool, logger: logging.Logger) -> None:
        self.app = app
        self.routes = dict(routes)
        self.keys = keys
        self.limiter = limiter
        self.cache = cache
        self.prefetch = prefetch
        """The limiter's call returns the stored body itself (Redis for both)."""
        self.metrics = metrics
        self.cors = cors
        self.extra_headers = [("Vary", "Origin")] if cors else []
        """What Flask adds to the same answer: with CORS configured, ``Vary: Origin`` (and
        no CORS headers, as a request with an Origin never gets here)."""
        self.logger = logger

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        route = self.routes.get(environ.get("PATH_INFO", ""))  # type: ignore[arg-type]
        if (route is None or environ.get("REQUEST_METHOD") != "GET"
                or (self.cors and "HTTP_ORIGIN" in environ)):
            return self.app(environ, start_response)
        started = time.perf_counter()
        try:
            answer = self._hit(environ, route)
        except Exception:  # noqa: BLE001 - Flask answers, and reports, whatever went wrong
            self.logger.exception("cache-hit path failed; the request goes through the app")
            environ.pop(ADMISSION, None)
            return self.app(environ, start_response)
        if answer is None:
            return self.app(environ, start_response)
        body, state = answer
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("X-Cache", "HIT"), *state.headers().items(),
                   (REQUEST_ID_HEADER, request_id_from(environ.get("HTTP_X_REQUEST_ID"))),
                   *self.extra_headers]
        start_response("200 OK", headers)
        self.metrics.cache.labels("hit").inc()
        self.metrics.observe(route.rule, "GET", 200, time.perf_counter() - started)
        return [body]

    def _hit(self, environ: dict[str, Any],
             route: CachedRoute) -> tuple[bytes, WindowState] | None:
        """The body and limiter state of a hit to answer here; None hands the request to Flask
        (with an ``Admission`` in the environ once the limiter has counted it)."""
        client = limiter_client(environ, self.keys, route.needs_key)
        if client is None:
            return None
        try:
            ck = cache_key(request_path(environ), request_args(environ))
        except UnicodeDecodeError:
            # Raw bytes in the query string that are not UTF-8: counted here, and Flask's
            # request.args fails alike and answers the 400.
            state, _ = self.limiter.hit(client)
            environ[ADMISSION] = Admission(state, None, None)
            return None
        state, body = self.limiter.hit(client, ck if self.prefetch else None)
        if state is not None and not state.exceeded and not self.prefetch:
            body = self.cache.get(ck)
        if state is None or state.exceeded or body is None:
            environ[ADMISSION] = Admission(state, ck, body)
            return None
        return body, state
