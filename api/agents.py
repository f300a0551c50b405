"""GET /agent-performance: per agent results, cost and whether its success objective is met."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, request

from . import queries, validation
from .common import cached, envelope, first, json_response, label_values, quantity, services
from .promql import Sample

bp = Blueprint("agents", __name__)

DEFAULT_WINDOW = "1h"
PARAMETERS = frozenset({"window", "agent"})
UNITS = {
    "success_ratio": "ratio",
    "results_total": "results",
    "escalation_ratio": "ratio",
    "retries": "retries",
    "retries_per_task": "retries/result",
    "duration_p95": "s",
    "tokens": "tokens",
    "tokens_per_task": "tokens/result",
    "spend": "usd",
    "cost_per_successful_task": "usd",
    "objective": "ratio",
}


def _agent(fields: dict[str, list[Sample]], agent: str) -> dict[str, Any]:
    out: dict[str, Any] = {"agent": agent}
    for name, unit in UNITS.items():
        out[name] = quantity(first(fields.get(name), agent=agent), unit)
    out["results"] = {
        o: quantity(first(fields.get(f"results.{o}"), agent=agent), "results")
        for o in queries.OUTCOMES
    }
    out["escalations"] = out["results"]["escalated"]
    met = first(fields.get("objective_met"), agent=agent)
    out["objective_met"] = None if met is None else met == 1.0
    return out


@bp.get("/agent-performance")
@cached
def agent_performance() -> Response:
    args = request.args
    validation.only(args, PARAMETERS)
    window = validation.window(args, DEFAULT_WINDOW)
    agent = validation.label_value(args, "agent")
    svc = services()
    now = time.time()
    expr = queries.expr_of(queries.agent_performance, window.seconds, agent)
    fields = queries.split(svc.prometheus.query(expr, now))
    # Agents with results or spend in the window; a bare objective is not activity.
    active = {k: v for k, v in fields.items() if k not in ("objective", "objective_met")}
    data = {"agents": [_agent(fields, a) for a in label_values(active, "agent")]}
    return json_response(envelope(window, now, data, filters={"agent": agent}))
