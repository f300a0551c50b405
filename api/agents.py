"""GET /agent-performance: per agent results, cost and whether its success objective is met."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, request

from . import queries, validation
from .common import cached, envelope, json_response, quantity, services

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


NOT_ACTIVITY = ("objective", "objective_met")
"""Fields that do not make an agent active: a bare objective is not activity."""


def _agent(fields: dict[str, dict[str, float | None]], agent: str) -> dict[str, Any]:
    out: dict[str, Any] = {"agent": agent}
    for name, unit in UNITS.items():
        out[name] = quantity(queries.value(fields, name, agent), unit)
    out["results"] = {
        o: quantity(queries.value(fields, f"results.{o}", agent), "results")
        for o in queries.OUTCOMES
    }
    out["escalations"] = out["results"]["escalated"]
    met = queries.value(fields, "objective_met", agent)
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
    fields = queries.split_by(svc.prometheus.query(expr, now), "agent")
    # Agents with results or spend in the window.
    active = {a for name, by in fields.items() if name not in NOT_ACTIVITY for a in by if a}
    data = {"agents": [_agent(fields, a) for a in sorted(active)]}
    return json_response(envelope(window, now, data, filters={"agent": agent}))
