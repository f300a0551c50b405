"""The REST shim: the documented analytics endpoints, answered from a Prometheus HTTP API.

``create_app()`` follows Flask's application-factory pattern; everything the app talks to
(config, API keys, the Prometheus client, the cache, the metrics registry) can be passed in.
Run it with ``aicrm-api`` or ``gunicorn -c api/gunicorn.conf.py 'api:create_app()'``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from flask import Flask, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from limits import parse_many

from exporter.config import Config, ConfigError, load_config, parse_config

from . import errors, observability
from .cache import ResponseCache, make_cache
from .common import SERVICES, Services
from .observability import RequestMetrics
from .promql import PrometheusClient
from .security import KeyChecker, key_id, keys_from_env, presented_key

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
    keys = KeyChecker(keys_from_env(cfg.api.api_keys_env) if api_keys is None else api_keys)
    logger = observability.configure_logging(app, keys.secrets)
    if not keys.configured:
        logger.warning("no API keys configured: key-protected endpoints answer 401",
                       extra={"env_var": cfg.api.api_keys_env})
    svc = Services(
        config=cfg,
        prometheus=prometheus
        or PrometheusClient(cfg.api.prometheus_url, cfg.api.query_timeout_seconds),
        cache=cache or make_cache(cfg.api.redis_url),
        keys=keys,
        metrics=metrics or RequestMetrics(),
        logger=logger,
        protected=PROTECTED_ENDPOINTS,
    )
    app.extensions[SERVICES] = svc
    errors.register(app)
    observability.install(app, svc.metrics, logger)

    @app.before_request
    def _authenticate() -> None:
        endpoint = request.endpoint
        if request.method == "OPTIONS" or endpoint is None or endpoint in PUBLIC_ENDPOINTS:
            return
        if cfg.api.require_key_for_all or endpoint in svc.protected:
            g.key_id = key_id(keys.check(request.headers))
            return
        key = presented_key(request.headers)
        if key is not None and keys.valid(key):
            g.key_id = key_id(key)

    def rate_key() -> str:
        """Per API key when the request carries a valid one, else per client address."""
        kid = g.get("key_id")
        return f"key:{kid}" if kid else f"addr:{request.remote_addr or 'unknown'}"

    limiter = Limiter(
        rate_key,
        app=app,
        application_limits=[cfg.api.rate_limit],
        application_limits_exempt_when=lambda: request.method == "OPTIONS",
        storage_uri=cfg.api.redis_url or "memory://",
        strategy="fixed-window",
        headers_enabled=True,
        key_prefix="aicrm-api",
        swallow_errors=True,
    )
    app.extensions["aicrm_limiter"] = limiter
    CORS(app, origins=list(cfg.api.cors_origins), methods=["GET", "OPTIONS"],
         allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED, max_age=600,
         supports_credentials=False)

    from . import agents, executive, export, health, tasks

    limiter.exempt(health.bp)
    for bp in (health.bp, tasks.bp, agents.bp, executive.bp, export.bp):
        app.register_blueprint(bp)
    return app


def close_app(app: Flask) -> None:
    """Release the app's connections (Prometheus pool, Redis) when it is discarded."""
    svc: Services = app.extensions[SERVICES]
    svc.prometheus.close()
    svc.cache.close()
    limiter = app.extensions.get("aicrm_limiter")
    storage = getattr(limiter, "storage", None) if limiter is not None else None
    client = getattr(storage, "storage", None)
    close = getattr(client, "close", None)
    if callable(close):
        close()


__all__ = ["create_app", "close_app"]
