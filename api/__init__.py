"""The REST shim: the documented analytics endpoints, answered from a Prometheus HTTP API.

``create_app()`` follows Flask's application-factory pattern; everything the app talks to
(config, API keys, the Prometheus client, the cache, the metrics registry) can be passed in.
Run it with ``aicrm-api`` or ``gunicorn -c api/gunicorn.conf.py 'api:create_app()'``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from flask import Flask, Response, g, request
from flask_cors import CORS
from limits import parse_many
from werkzeug.middleware.proxy_fix import ProxyFix

from exporter.config import Config, ConfigError, load_config, parse_config

from . import errors, observability, validation
from .cache import RedisCache, ResponseCache, cache_key, make_cache
from .common import CACHE_PREFETCH, SERVICES, Services, is_cached
from .direct import DirectAnswers, DirectRoute, planned_of
from .hits import ADMISSION, SIMPLE_GET_PATHS, Admission, CachedHits, CachedRoute
from .observability import RequestMetrics
from .promql import PrometheusClient
from .ratelimit import Counters, MemoryCounters, RateLimited, RateLimiter, RedisCounters
from .security import KeyChecker, Unauthorized, key_id, keys_from_env, presented_key

PROTECTED_ENDPOINTS = frozenset({"executive.executive_dashboard", "export.export"})
"""Endpoints that always need an API key; with require_key_for_all, every data endpoint does."""
PUBLIC_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "health.metrics",
                              "health.openapi", "static"})
"""Probes, scrapes and the spec: never behind a key or a rate limit."""
CORS_HEADERS = ["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"]
CORS_EXPOSED = ["X-Request-ID", "X-Cache", "Retry-After", "X-RateLimit-Limit",
                "X-RateLimit-Remaining", "X-RateLimit-Reset", "Content-Disposition"]


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _config(config: Config | Mapping[str, Any] | None) -> Config:
    """A Config as is; None loads config.json ($AICRM_CONFIG first); a mapping overrides it."""
    if isinstance(config, Config):
        return config
    loaded = load_config()
    if config is None:
        return loaded
    return parse_config(_merge(loaded.model_dump(mode="json"), config), "create_app(config)")


def create_app(
    config: Config | Mapping[str, Any] | None = None,
    *,
    api_keys: Sequence[str] | None = None,
    prometheus: PrometheusClient | None = None,
    cache: ResponseCache | None = None,
    metrics: RequestMetrics | None = None,
) -> Flask:
    cfg = _config(config)
    try:
        parse_many(cfg.api.rate_limit)
    except ValueError as exc:
        raise ConfigError("config", [("api.rate_limit", str(exc))]) from None

    app = Flask(__name__, static_folder=None)
    app.request_class = validation.Request
    keys = KeyChecker(keys_from_env(cfg.api.api_keys_env) if api_keys is None else api_keys)
    logger = observability.configure_logging(app, keys.secrets)
    if not keys.configured:
        logger.warning("no API keys configured: key-protected endpoints answer 401",
                       extra={"env_var": cfg.api.api_keys_env})
    cache = cache or make_cache(cfg.api.redis_url)
    svc = Services(
        config=cfg,
        prometheus=prometheus
        or PrometheusClient(cfg.api.prometheus_url, cfg.api.query_timeout_seconds),
        cache=cache,
        keys=keys,
        metrics=metrics or RequestMetrics(),
        logger=logger,
        protected=PROTECTED_ENDPOINTS,
    )
    counters: Counters
    if cfg.api.redis_url:
        # The limiter shares the cache's connection pool, so a cached endpoint's lookup rides
        # along with the limiter's script: one Redis round trip per request.
        if isinstance(cache, RedisCache):
            counters = RedisCounters(cache.client)
        else:
            counters = RedisCounters(redis.Redis.from_url(
                cfg.api.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5))
    else:
        counters = MemoryCounters()
    prefetch_cache = (isinstance(cache, RedisCache) and isinstance(counters, RedisCounters)
                      and counters.client is cache.client)
    limiter = RateLimiter(cfg.api.rate_limit, counters, logger)
    app.extensions[SERVICES] = svc
    app.extensions["aicrm_limiter"] = limiter
    errors.register(app)
    observability.install(app, svc.metrics, logger)

    @app.before_request
    def _authenticate() -> None:
        endpoint = request.endpoint
        if request.method == "OPTIONS" or endpoint is None or endpoint in PUBLIC_ENDPOINTS:
            return
        if cfg.api.require_key_for_all or endpoint in svc.protected:
            try:
                g.key_id = key_id(keys.check(request.headers))
            except Unauthorized:
                # Counted under the address like any request without a valid key, so key
                # guesses are limited too: over the limit the answer is a 429, not a 401.
                state, _ = limiter.hit(f"addr:{request.remote_addr or 'unknown'}")
                if state is not None:
                    g.rate_limit = state
                    if state.exceeded:
                        raise RateLimited(f"rate limit exceeded ({state.limit})",
                                          headers=state.headers()) from None
                raise
            return
        key = presented_key(request.headers)
        if key is not None and keys.valid(key):
            g.key_id = key_id(key)

    @app.before_request
    def _rate_limit() -> None:
        """Per API key when the request carries a valid one, else per client address; every
        data endpoint counts against the same windows."""
        endpoint = request.endpoint
        if request.method == "OPTIONS" or endpoint is None or endpoint in PUBLIC_ENDPOINTS:
            return
        admitted = request.environ.pop(ADMISSION, None)
        if isinstance(admitted, Admission):
            # CachedHits has counted this request already (and looked in the cache).
            state, prefetch, body = admitted.state, admitted.cache_key, admitted.body
        else:
            kid = g.get("key_id")
            client = f"key:{kid}" if kid else f"addr:{request.remote_addr or 'unknown'}"
            prefetch = None
            if (prefetch_cache and cfg.api.cache_ttl_seconds > 0
                    and is_cached(app.view_functions.get(endpoint))):
                try:
                    prefetch = cache_key(request.path, request.args.items(multi=True))
                except errors.InvalidQueryString:
                    prefetch = None  # counted all the same; the view answers the 400
            state, body = limiter.hit(client, prefetch)
        if state is None:
            return
        g.rate_limit = state
        if state.exceeded:
            raise RateLimited(f"rate limit exceeded ({state.limit})", headers=state.headers())
        if prefetch is not None:
            g.setdefault(CACHE_PREFETCH, (prefetch, body))

    @app.after_request
    def _rate_limit_headers(response: Response) -> Response:
        state = g.get("rate_limit")
        if state is not None:
            for k, v in state.headers().items():
                response.headers.setdefault(k, v)
        return response

    if cfg.api.cors_origins:
        # Without an allow-list no response carries CORS headers, so the extension (a hook
        # on every response) is not installed at all. A request without Origin asked no CORS
        # question and gets no CORS headers (always_send=False), on the cache-hit path too;
        # every response says Vary: Origin, as its CORS headers depend on that header, so a
        # cache in between never gives one origin's answer to another (or to no origin).
        CORS(app, origins=list(cfg.api.cors_origins), methods=["GET", "OPTIONS"],
             allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED, max_age=600,
             supports_credentials=False, always_send=False, vary_header=False)

        @app.after_request
        def _vary_origin(response: Response) -> Response:
            response.vary.add("Origin")
            return response

    from . import agents, executive, export, health, tasks

    for bp in (health.bp, tasks.bp, agents.bp, executive.bp, export.bp):
        app.register_blueprint(bp)
    direct = {
        rule.rule: DirectRoute(rule.rule, found, cfg.api.require_key_for_all
                               or rule.endpoint in svc.protected)
        for rule in app.url_map.iter_rules()
        if not rule.arguments and "GET" in (rule.methods or ())
        and (found := planned_of(app.view_functions.get(rule.endpoint))) is not None
    }
    if direct:
        # Inside CachedHits: with the cache on, only a counted, admitted miss comes here.
        app.wsgi_app = DirectAnswers(  # type: ignore[method-assign]
            app.wsgi_app, direct, keys=keys, limiter=limiter, prometheus=svc.prometheus,
            metrics=svc.metrics, cache=cache, cache_ttl=cfg.api.cache_ttl_seconds,
            cors=bool(cfg.api.cors_origins), logger=logger)
    routes: dict[str, CachedRoute] = {}
    if cfg.api.cache_ttl_seconds > 0:
        routes = {
            rule.rule: CachedRoute(rule.rule, cfg.api.require_key_for_all
                                   or rule.endpoint in svc.protected)
            for rule in app.url_map.iter_rules()
            if not rule.arguments and "GET" in (rule.methods or ())
            and is_cached(app.view_functions.get(rule.endpoint))
        }
        app.wsgi_app = CachedHits(  # type: ignore[method-assign]
            app.wsgi_app, routes, keys=keys, limiter=limiter, cache=cache,
            prefetch=prefetch_cache, metrics=svc.metrics, cors=bool(cfg.api.cors_origins),
            logger=logger)
    # Their plain GETs are also read and answered without gunicorn's general HTTP machinery
    # (api/simple_http.py) by the API's gunicorn worker.
    app.extensions[SIMPLE_GET_PATHS] = frozenset(direct) | frozenset(routes)
    if cfg.api.trusted_proxy_hops:
        # Outermost, so the cache-hit path, the limiter and the access line all see the
        # client's address rather than the proxy's.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=cfg.api.trusted_proxy_hops, x_proto=0, x_host=0, x_port=0,
            x_prefix=0)
    return app


def close_app(app: Flask) -> None:
    """Release the app's connections (Prometheus, Redis) when it is discarded."""
    svc: Services = app.extensions[SERVICES]
    svc.background.shutdown(wait=True, cancel_futures=True)
    svc.prometheus.close()
    svc.cache.close()
    limiter = app.extensions.get("aicrm_limiter")
    if isinstance(limiter, RateLimiter):
        limiter.close()


__all__ = ["create_app", "close_app"]
