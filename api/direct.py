"""One-query endpoints answered below Flask, their query sent as soon as it is known.

An uncached ``/agent-performance`` or ``/task-completion`` is one PromQL query and the shaping
of its answer. Through Flask the request also pays for a request context, URL routing, hooks, a
``Response`` object and the limiter's Redis round trip before its query leaves, about 1 ms of
CPU per request on the benchmark machine, where Prometheus itself takes 6-10 ms for the query:
the overhead the uncached speed target (within 1.3x of Prometheus) is about. ``DirectAnswers``
wraps the app's ``wsgi_app`` (like ``CachedHits``) and, for a GET of such an endpoint:

1. checks what it can without the backend: a key when the endpoint needs one (invalid: Flask
   answers the 401), the parameters with the endpoint's own ``plan`` (bad: Flask answers the
   400), and that this process has not refused the client in a window still running;
2. sends the query (``PrometheusClient.start_query``);
3. counts the request in the rate limit while Prometheus evaluates (with the cache on,
   ``CachedHits`` has counted it already and looked in the cache: only an admitted miss gets
   here);
4. reads the answer and shapes it with the endpoint's own ``shape``: the view's bytes and
   headers (tests/api/test_direct.py compares them with Flask's).

Anything else goes to Flask with what is known so far in the WSGI environment (the limiter's
verdict as an ``Admission``, so no request is counted twice; the query sent, or the backend's
error for it, so the view neither asks again nor answers differently): over the limit is
Flask's 429, a backend failure Flask's 502/503/504. A request with an ``Origin`` while CORS is
configured is answered by Flask too (flask-cors adds its headers), its query sent early all the
same.

The limit is checked after the query has gone, so a client past its limit can cost the backend
queries: the first refusal in a process is remembered until its window ends
(``RateLimiter.refused_recently``), so that is at most one query per worker thread and window
(each answered 429, the query abandoned: its connection closed, which stops Prometheus
evaluating it). A query sent and not read is abandoned when the app returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Response, request
from werkzeug.datastructures import MultiDict

from .cache import ResponseCache
from .common import encode_json, json_response, services
from .errors import ApiError
from .hits import ADMISSION, Admission, limiter_client, request_args
from .observability import REQUEST_ID_HEADER, RequestMetrics, request_id_from
from .promql import PendingQuery, PrometheusClient, Sample
from .ratelimit import RateLimiter, WindowState
from .security import KeyChecker
from .validation import Window

PENDING = "aicrm.pending_query"
"""WSGI environ key: the ``PendingQuery`` sent for this request, or its ``Failed`` outcome."""
_PLAN_ATTR = "_aicrm_plan"
_PLANS_MAX = 1024

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class Plan:
    """What an endpoint asks, from its validated parameters alone."""

    expr: str
    window: Window
    filters: dict[str, str | None] = field(default_factory=dict)


Planner = Callable[[MultiDict[str, str]], Plan]
"""An endpoint's parameters to its plan; raises the API's 400 for bad parameters."""
Shaper = Callable[[list[Sample], Plan, float], dict[str, Any]]
"""The samples of the plan's query, evaluated at a time, to the endpoint's answer body."""
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Planned:
    planner: Planner
    shaper: Shaper


def planned(planner: Planner, shaper: Shaper) -> Callable[[F], F]:
    """Mark a view as a one-query endpoint: ``planner`` gives its query, ``shaper`` its answer
    (the view must answer ``respond(planner, shaper)``)."""

    def mark(view: F) -> F:
        setattr(view, _PLAN_ATTR, Planned(planner, shaper))
        return view

    return mark


def planned_of(view: object) -> Planned | None:
    found: Planned | None = getattr(view, _PLAN_ATTR, None)
    return found


@dataclass(frozen=True, slots=True)
class Failed:
    """The backend's error for the query sent below Flask: the view raises it."""

    expr: str
    error: ApiError


def answer(prometheus: PrometheusClient, expr: str) -> tuple[list[Sample], float]:
    """The samples of ``expr`` and the evaluation time they are for: the query sent below
    Flask when there is one for this expression (or its error), else asked now."""
    pending = request.environ.pop(PENDING, None)
    if isinstance(pending, Failed) and pending.expr == expr:
        raise pending.error
    if isinstance(pending, PendingQuery):
        if pending.expr == expr and not pending.done:
            return pending.result(), pending.at
        pending.abandon()
    now = time.time()
    return prometheus.query(expr, now), now


def respond(planner: Planner, shaper: Shaper) -> Response:
    """A one-query endpoint's view through Flask: the same plan, query and shape as below it."""
    plan = planner(request.args)
    samples, at = answer(services().prometheus, plan.expr)
    return json_response(shaper(samples, plan, at))


@dataclass(frozen=True, slots=True)
class DirectRoute:
    rule: str
    """The route as Flask names it in the request metrics."""
    planned: Planned
    needs_key: bool


class _StoreOnClose:
    """A body that is stored in the cache once the server has written it (as the ``cached``
    view decorator does), so the client does not wait for the cache's round trip."""

    __slots__ = ("body", "store")

    def __init__(self, body: bytes, store: Callable[[], None]) -> None:
        self.body = body
        self.store = store

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        self.store()


class DirectAnswers:
    def __init__(self, app: WSGIApp, routes: Mapping[str, DirectRoute], *, keys: KeyChecker,
                 limiter: RateLimiter, prometheus: PrometheusClient, metrics: RequestMetrics,
                 cache: ResponseCache, cache_ttl: float, cors: bool,
                 logger: logging.Logger) -> None:
        self.app = app
        self.routes = dict(routes)
        self.keys = keys
        self.limiter = limiter
        self.prometheus = prometheus
        self.metrics = metrics
        self.cache = cache
        self.cache_ttl = cache_ttl
        self.counted_below = cache_ttl > 0
        """CachedHits runs first (the cache is on): it has counted every request it passes
        on with an Admission, and looked in the cache."""
        self.cors = cors
        self.extra_headers = [("Vary", "Origin")] if cors else []
        if self.counted_below:
            self.extra_headers.append(("X-Cache", "MISS"))
        self.logger = logger
        self._plans: dict[tuple[str, str], Plan] = {}
        """Plans by route and query string (a plan depends on the parameters alone): most
        requests repeat a few, and checking the parameters and building the expression was 8%
        of an uncached answer's CPU. At most ``_PLANS_MAX``; bad parameters are not kept."""

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        route = self.routes.get(environ.get("PATH_INFO", ""))  # type: ignore[arg-type]
        if route is None or environ.get("REQUEST_METHOD") != "GET":
            return self.app(environ, start_response)
        started = time.perf_counter()
        try:
            answered = self._answer(environ, route)
        except Exception:  # noqa: BLE001 - Flask answers, and reports, whatever went wrong
            self.logger.exception("answering below Flask failed; the request goes through it")
            answered = None
        if answered is None:
            return self._through_flask(environ, start_response)
        body, state, cache_key = answered
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   *(state.headers().items() if state is not None else ()),
                   (REQUEST_ID_HEADER, request_id_from(environ.get("HTTP_X_REQUEST_ID"))),
                   *self.extra_headers]
        start_response("200 OK", headers)
        if cache_key is not None:
            self.metrics.cache.labels("miss").inc()
        self.metrics.observe(route.rule, "GET", 200, time.perf_counter() - started)
        if cache_key is not None:
            cache, ttl = self.cache, self.cache_ttl
            return _StoreOnClose(body, lambda: cache.set(cache_key, body, ttl))
        return [body]

    def _through_flask(self, environ: dict[str, Any],
                       start_response: StartResponse) -> Iterable[bytes]:
        pending = environ.get(PENDING)
        try:
            return self.app(environ, start_response)
        finally:
            if isinstance(pending, PendingQuery):
                pending.abandon()  # nothing once the view has read it

    def _answer(self, environ: dict[str, Any], route: DirectRoute
                ) -> tuple[bytes, WindowState | None, str | None] | None:
        """The body, limiter state and cache key (None: the cache is off) of an answer given
        here; None hands the request to Flask, with what is known in the environ."""
        client: str | None = None
        cache_key: str | None = None
        state: WindowState | None = None
        if self.counted_below:
            admitted = environ.get(ADMISSION)
            if (not isinstance(admitted, Admission) or admitted.body is not None
                    or admitted.cache_key is None
                    or (admitted.state is not None and admitted.state.exceeded)):
                return None  # not counted below, a hit Flask serves, or a 429
            state, cache_key = admitted.state, admitted.cache_key
        else:
            client = limiter_client(environ, self.keys, route.needs_key)
            if client is None:
                return None  # Flask's 401
            if self.limiter.refused_recently(client):
                return None  # Flask's 429, without asking the backend
        query = environ.get("QUERY_STRING", "")
        plan = self._plans.get((route.rule, query))
        if plan is None:
            try:
                plan = route.planned.planner(MultiDict(request_args(environ)))
            except (ApiError, UnicodeDecodeError):
                return None  # Flask's 400
            if len(self._plans) >= _PLANS_MAX:
                self._plans = {}
            self._plans[(route.rule, query)] = plan
        pending = self.prometheus.start_query(plan.expr, time.time())
        if pending is None:
            return None  # Flask asks, and reports the failure
        environ[PENDING] = pending
        if client is not None:
            # While Prometheus evaluates. Counted once: Flask reads this Admission.
            state, _ = self.limiter.hit(client)
            environ[ADMISSION] = Admission(state, None, None)
            if state is not None and state.exceeded:
                return None  # Flask's 429; the query is abandoned
        if self.cors and "HTTP_ORIGIN" in environ:
            return None  # Flask adds the CORS headers; the view reads the query sent
        try:
            samples = pending.result()
        except ApiError as exc:
            environ[PENDING] = Failed(plan.expr, exc)
            return None  # Flask's error answer, the same as when the view asks
        body = encode_json(route.planned.shaper(samples, plan, pending.at))
        return body, state, cache_key
