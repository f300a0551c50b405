"""GET /task-completion: how many tasks finished, how many completed, how fast."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from werkzeug.datastructures import MultiDict

from . import direct, queries, validation
from .common import cached, envelope, quantity
from .promql import Sample

bp = Blueprint("tasks", __name__)

DEFAULT_WINDOW = "1h"
PARAMETERS = frozenset({"window", "task_type", "agent"})
UNITS = {
    "completion_ratio": "ratio",
    "completed": "tasks",
    "failed": "tasks",
    "cancelled": "tasks",
    "terminal": "tasks",
    "throughput": "tasks/s",
    "duration_p50": "s",
    "duration_p95": "s",
    "duration_p99": "s",
    # The queue now, whatever the window (open tasks have no agent, so not filtered by one).
    "queued": "tasks",
    "running": "tasks",
    "oldest_open_age": "s",
    "wait_p95": "s",
}


def _block(fields: dict[str, dict[str, float | None]], level: str,
           task_type: str = "") -> dict[str, Any]:
    """The numbers of one level: "overall" (fields without labels) or one task type's."""
    return {
        name: quantity(queries.value(fields, f"{level}.{name}", task_type), unit)
        for name, unit in UNITS.items()
    }


def plan(args: MultiDict[str, str]) -> direct.Plan:
    validation.only(args, PARAMETERS)
    window = validation.window(args, DEFAULT_WINDOW)
    task_type = validation.label_value(args, "task_type")
    agent = validation.label_value(args, "agent")
    expr = queries.expr_of(queries.task_completion, window.seconds, task_type, agent)
    return direct.Plan(expr, window, {"task_type": task_type, "agent": agent})


def shape(samples: list[Sample], p: direct.Plan, now: float) -> dict[str, Any]:
    fields = queries.split_by(samples, "task_type")
    task_types = {tt for name, by in fields.items() if name.startswith("task_type.")
                  for tt in by if tt}
    data = {
        "overall": _block(fields, "overall"),
        "task_types": [
            {"task_type": tt, **_block(fields, "task_type", tt)} for tt in sorted(task_types)
        ],
    }
    return envelope(p.window, now, data, filters=p.filters)


@bp.get("/task-completion")
@direct.planned(plan, shape)
@cached
def task_completion() -> Response:
    return direct.respond(plan, shape)
