"""/healthz (the process answers), /readyz (the backend answers), /metrics, /openapi.json."""

from __future__ import annotations

from flask import Blueprint, Response

from .common import json_response, services
from .errors import ApiError
from .observability import METRICS_CONTENT_TYPE

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    try:
        services().prometheus.ping()
    except ApiError as exc:
        return json_response({"status": "unavailable", "error": {
            "status": 503, "code": exc.code, "message": exc.message}}, status=503)
    return json_response({"status": "ok"})


@bp.get("/metrics")
def metrics() -> Response:
    return Response(services().metrics.exposition(), mimetype=METRICS_CONTENT_TYPE)


@bp.get("/openapi.json")
def openapi() -> Response:
    from .openapi import spec_json

    return Response(spec_json(), mimetype="application/json")
