"""GET /agent-performance: per agent results, cost and whether its success objective is met."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from werkzeug.datastructures import MultiDict

from . import direct, queries, validation
from .common import cached, envelope, quantity
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


def plan(args: MultiDict[str, str]) -> direct.Plan:
    validation.only(args, PARAMETERS)
    window = validation.window(args, DEFAULT_WINDOW)
    agent = validation.label_value(args, "agent")
    expr = queries.expr_of(queries.agent_performance, window.seconds, agent)
    return direct.Plan(expr, window, {"agent": agent})


def shape(samples: list[Sample], p: direct.Plan, now: float) -> dict[str, Any]:
    fields = queries.split_by(samples, "agent")
    # Agents with results or spend in the window.
    active = {a for name, by in fields.items() if name not in NOT_ACTIVITY for a in by if a}
    data = {"agents": [_agent(fields, a) for a in sorted(active)]}
    return envelope(p.window, now, data, filters=p.filters)


@bp.get("/agent-performance")
@direct.planned(plan, shape)
@cached
def agent_performance() -> Response:
    return direct.respond(plan, shape)
