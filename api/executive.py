"""GET /executive-dashboard: the business overview, KPIs against the previous window,
scores, user interactions, firing alerts and the optimisation recommendations the alert rules
raise. Two backend requests, the query and the alerts, sent at the same time."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, request

from exporter import catalog

from . import queries, validation
from .common import Services, cached, envelope, first, json_response, services
from .promql import Sample

bp = Blueprint("executive", __name__)

DEFAULT_WINDOW = "1d"
PARAMETERS = frozenset({"window"})
SEVERITY_ORDER = {"page": 0, "critical": 0, "warning": 1, "ticket": 2, "info": 3}
RECOMMENDATION = "recommendation"
PIPELINE = "none"
"""Severity of alerts that only prove the alerting pipeline works (AicrmWatchdog)."""
SHOWN_APART = frozenset({"alertname", "severity", "alertgroup"})
"""Labels not repeated in an alert's ``labels``: its name and severity have fields of their own,
and vmalert's ``alertgroup`` (the rule group, which Prometheus does not add) would make the
same alert differ between backends."""


def _change(fields: dict[str, list[Sample]], name: str, unit: str) -> dict[str, Any]:
    """A number over the window, over the one before it, the difference and the difference
    relative to the previous value (null where either is null, or the previous is 0)."""
    value = first(fields.get(f"{name}.value"))
    previous = first(fields.get(f"{name}.previous"))
    change = ratio = None
    if value is not None and previous is not None:
        change = value - previous
        ratio = change / previous if previous != 0 else None
    return {"value": value, "unit": unit, "previous": previous, "change": change,
            "change_ratio": ratio}


def _users(fields: dict[str, list[Sample]]) -> dict[str, Any]:
    """Every interaction type and active-user window, null where there is no data."""
    def values(name: str, label: str) -> dict[str, float | None]:
        return {s.labels.get(label, ""): s.value for s in fields.get(name, ())}

    by_type = values("users.by_type", "type")
    active = values("users.active_users", "window")
    return {
        **{name: _change(fields, f"users.{name}", unit) for name, unit in queries.USERS.items()},
        "interactions_by_type": {t: {"value": by_type.get(t), "unit": "interactions"}
                                 for t in catalog.INTERACTION_TYPES},
        "active_users": {w: {"value": active.get(w), "unit": "users"}
                         for w in catalog.ACTIVE_USER_WINDOWS},
    }


def _components(samples: list[Sample] | None) -> dict[str, Any]:
    return {s.labels.get("component", ""): {"value": s.value, "unit": "ratio"}
            for s in sorted(samples or (), key=lambda s: s.labels.get("component", ""))}


def _alerts(svc: Services, now: float) -> list[dict[str, Any]]:
    """Firing alerts with annotations; from the ALERTS series where the backend has no
    alerts API (VictoriaMetrics without a vmalert proxy), then without annotations."""
    raw = svc.prometheus.alerts()
    out: list[dict[str, Any]] = []
    if raw is None:
        for s in svc.prometheus.query(queries.FIRING_ALERTS, now):
            labels = {k: v for k, v in s.labels.items()
                      if k not in ("__name__", "alertstate")}
            out.append({"labels": labels, "annotations": {}, "active_at": None})
    else:
        for a in raw:
            if a.get("state") != "firing":
                continue
            out.append({"labels": dict(a.get("labels", {})),
                        "annotations": dict(a.get("annotations", {})),
                        "active_at": a.get("activeAt")})
    alerts = []
    for a in out:
        labels = a["labels"]
        if labels.get("severity") == PIPELINE:
            continue  # AicrmWatchdog: always firing, for a dead man's switch, not a problem
        ann = a["annotations"]
        alerts.append({
            "name": labels.get("alertname", ""),
            "severity": labels.get("severity", ""),
            "summary": ann.get("summary"),
            "description": ann.get("description"),
            "runbook_url": ann.get("runbook_url"),
            "dashboard_url": ann.get("dashboard_url"),
            "active_at": a["active_at"],
            "labels": {k: v for k, v in sorted(labels.items()) if k not in SHOWN_APART},
        })
    alerts.sort(key=lambda a: (SEVERITY_ORDER.get(a["severity"], 9), a["name"],
                               sorted(a["labels"].items())))
    return alerts


@bp.get("/executive-dashboard")
@cached
def executive_dashboard() -> Response:
    validation.only(request.args, PARAMETERS)
    window = validation.window(request.args, DEFAULT_WINDOW)
    svc = services()
    now = time.time()
    expr = queries.expr_of(queries.executive, window.seconds)
    # The alerts are asked for while the backend evaluates the query, not after it.
    pending = svc.background.submit(_alerts, svc, now)
    try:
        fields = queries.split(svc.prometheus.query(expr, now))
    except BaseException:
        pending.cancel()  # if not started yet; a running request ends within its timeout
        raise
    alerts = pending.result()
    data = {
        "kpis": {
            name: _change(fields, f"kpi.{name}", unit)
            for name, (unit, _) in queries.KPIS.items()
        },
        "scores": {
            name: {**_change(fields, f"score.{name}", "score"),
                   "components": _components(fields.get(f"component.{name}"))}
            for name in ("workflow_efficiency", "system_health")
        },
        "users": _users(fields),
        "alerts": [a for a in alerts if a["severity"] != RECOMMENDATION],
        "recommendations": [a for a in alerts if a["severity"] == RECOMMENDATION],
    }
    return json_response(envelope(window, now, data))
