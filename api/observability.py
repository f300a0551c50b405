"""Structured JSON logs with a request id, and the API's own request metrics.

Under gunicorn the metrics live in prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), so /metrics from any worker shows every worker's requests;
api/gunicorn.conf.py wipes the directory at start and marks dead workers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask, Response, g, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from exporter import catalog as c

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
LOGGER_NAME = "aicrm.api"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and extras."""

    _SKIP = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in self._SKIP and k not in out and not k.startswith("_"):
                out[k] = v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out)


JsonFormatter.converter = time.gmtime


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context() and not getattr(record, "request_id", None):
            record.request_id = g.get("request_id")
        return True


class RedactFilter(logging.Filter):
    """Replaces any configured secret that reaches a log record, wherever it appears."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def _clean(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "[REDACTED]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        for k, v in list(record.__dict__.items()):
            if isinstance(v, str) and k not in ("msg", "message"):
                record.__dict__[k] = self._clean(v)
        return True


def configure_logging(app: Flask, secrets: Iterable[str]) -> logging.Logger:
    """The app logger writes JSON to stderr (gunicorn's error log) through both filters."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_aicrm", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        handler._aicrm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for f in list(logger.filters):
        if isinstance(f, RequestIdFilter | RedactFilter):
            logger.removeFilter(f)
    logger.addFilter(RequestIdFilter())
    logger.addFilter(RedactFilter(secrets))
    logger.propagate = True
    return logger


def request_id_from(header: str | None) -> str:
    """The caller's id when it is short and plain (safe to log and echo), else a fresh one."""
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    # 128 random bits as 32 hex digits, like a uuid4's hex, without a getrandom() system call
    # per request: an id only has to be unique, not secret (the generator is reseeded in every
    # forked worker).
    return f"{random.getrandbits(128):032x}"


class RequestMetrics:
    """aicrm_api_requests_total and aicrm_api_request_duration_seconds (exporter/catalog.py)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            c.API_REQUESTS.base_name, c.API_REQUESTS.help, c.API_REQUESTS.labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            c.API_REQUEST_DURATION.name, c.API_REQUEST_DURATION.help,
            c.API_REQUEST_DURATION.labels, buckets=c.API_REQUEST_DURATION.buckets,
            registry=self.registry,
        )
        self.cache = Counter(
            c.API_CACHE_LOOKUPS.base_name, c.API_CACHE_LOOKUPS.help, c.API_CACHE_LOOKUPS.labels,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        """The labelled series per (endpoint, method, code): ``labels`` looks them up under a
        lock and checks the values on every call."""

    def observe(self, endpoint: str, method: str, code: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        key = (endpoint, method, code)
        children = self._children.get(key)
        if children is None:
            # Bounded: endpoints are the app's routes (or "other"), methods and codes few.
            children = self._children[key] = (self.requests.labels(endpoint, method, str(code)),
                                               self.duration.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> bytes:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            from prometheus_client import multiprocess

            from api.process_metrics import service_collector

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            service = service_collector()
            if service is not None:
                registry.register(service)
            return generate_latest(registry)
        return generate_latest(self.registry)


def install(app: Flask, metrics: RequestMetrics, logger: logging.Logger) -> None:
    """Request id in, request id out, one metric observation per request."""

    @app.before_request
    def _start() -> None:
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        rid = g.get("request_id")
        if rid:
            response.headers[REQUEST_ID_HEADER] = rid
        started = g.get("started")
        if started is not None:
            rule = request.url_rule
            endpoint = rule.rule if rule is not None else "unmatched"
            elapsed = time.perf_counter() - started
            metrics.observe(endpoint, request.method, response.status_code, elapsed)
            if response.status_code >= 500:
                logger.warning(
                    "request failed",
                    extra={"method": request.method, "path": request.path,
                           "status": response.status_code,
                           "duration_ms": round(elapsed * 1000, 3)},
                )
            elif response.status_code in (401, 403, 429):
                logger.info(
                    "request refused",
                    extra={"method": request.method, "path": request.path,
                           "status": response.status_code},
                )
        return response


METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
