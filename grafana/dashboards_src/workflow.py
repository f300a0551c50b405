"""Workflow Efficiency: the 0-100 efficiency score, its components, and who does what best."""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

TT = 'task_type=~"$task_type"'
AG_TT = 'agent=~"$agent", task_type=~"$task_type"'


def efficiency_score() -> stat.Panel:
    return c.stat_panel(
        "Workflow efficiency score",
        "0-100: weighted mean of completion, success, speed and retry components over the "
        "last hour; weights from config.json `scores.efficiency`.",
        c.SCORE,
        [c.query("global:aicrm_workflow_efficiency:score1h", "efficiency")],
        color=model.FieldColorModeId.CONTINUOUS_RD_YL_GR,
        min_val=0,
        max_val=100,
        height=8,
    )


def components() -> bargauge.Panel:
    return c.bar_panel(
        "Efficiency components",
        "Each component, 0-100%: completion against its objective, success against "
        "agent_success_ratio_min, p95 duration against target, 1 / (1 + retries per task).",
        c.RATIO,
        [c.instant("global:aicrm_workflow_efficiency_component:ratio1h", "{{component}}")],
        width=6,
        min_val=0,
        max_val=1,
    )


def score_by_task_type() -> timeseries.Panel:
    return c.timeseries_panel(
        "Efficiency score by task type",
        "The 0-100 score of each task type (1h).",
        c.SCORE,
        [c.query(f"task_type:aicrm_workflow_efficiency:score1h{{{TT}}}", "{{task_type}}")],
        min_val=0,
        max_val=100,
    )


def weakest_components() -> bargauge.Panel:
    return c.bar_panel(
        "Components by task type",
        "Every component of every selected task type, lowest first: where efficiency is lost.",
        c.RATIO,
        [
            c.instant(
                f"sort(task_type:aicrm_workflow_efficiency_component:ratio1h{{{TT}}})",
                "{{task_type}} {{component}}",
            )
        ],
        width=12,
        height=10,
        min_val=0,
        max_val=1,
    )


def agent_task_success() -> table.Panel:
    return c.table_panel(
        "Success by agent and task type (last hour)",
        "Which agent handles each task type best; the routing recommendation compares these.",
        c.RATIO,
        [
            c.table_query(
                f"agent_task_type:aicrm_agent_task_results:success_ratio_rate1h{{{AG_TT}}}", "A"
            ),
            c.table_query(f"agent_task_type:aicrm_agent_task_results:rate1h{{{AG_TT}}} * 3600",
                          "B"),
        ],
        keep=["task_type", "agent"],
        columns={
            "Value #A": ("success", c.RATIO),
            "Value #B": ("results/hour", c.COUNT),
        },
        width=12,
        height=10,
    )


def completion_vs_objective() -> timeseries.Panel:
    return c.timeseries_panel(
        "Completion ratio (1h)",
        "Share of terminal tasks that completed, by task type, over all agents (the task "
        "database's series have no agent label). Dashed: the task_completion_ratio objective.",
        c.RATIO,
        [
            c.query(f"task_type:aicrm_tasks:completed_ratio_rate1h{{{TT}}}", "{{task_type}}"),
            c.query(c.objective("task_completion_ratio"), "objective", c.THRESHOLD_REF),
        ],
        width=8,
        max_val=1,
    )


def duration_vs_target() -> timeseries.Panel:
    return c.timeseries_panel(
        "Task duration (p95, 1h) against target",
        "95th percentile start-to-finish time by task type, over all agents. "
        "Dashed: each type's target_seconds.",
        c.SECONDS,
        [
            c.query(f"task_type:aicrm_task_duration_seconds:p95_rate1h{{{TT}}}",
                    "{{task_type}}"),
            c.query(
                c.threshold("task_duration_target_seconds", "task_type", TT),
                "target {{task_type}}",
                c.THRESHOLD_REF,
            ),
        ],
        width=8,
    )


def retries_by_task_type() -> timeseries.Panel:
    return c.timeseries_panel(
        "Retries per task (1h)",
        "Retries agents needed per task result, by task type, over all agents.",
        c.FACTOR,
        [c.query(f"task_type:aicrm_agent_retries_per_task:ratio_rate1h{{{TT}}}",
                 "{{task_type}}")],
        width=8,
    )


def handoffs() -> timeseries.Panel:
    return c.timeseries_panel(
        "Handoffs between agents",
        "Work handed from one agent to the next, per second, by pair. No recording rule keeps "
        "the pair, so this reads the raw counter.",
        c.OPS,
        [
            c.query(
                "sum by (from_agent, to_agent) "
                '(rate(aicrm_agent_handoffs_total{from_agent=~"$agent"}[$__rate_interval]))',
                "{{from_agent}} → {{to_agent}}",
            )
        ],
    )


def volume() -> timeseries.Panel:
    return c.timeseries_panel(
        "Task results by agent and task type",
        "Results per second (1h) of each agent on each task type.",
        c.OPS,
        [c.query(f"agent_task_type:aicrm_agent_task_results:rate1h{{{AG_TT}}}",
                 "{{agent}} {{task_type}}")],
        stack=True,
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "workflow",
        "AI-CRM / Workflow Efficiency",
        "How efficiently task types flow through the agents, and where the score is lost.",
        time_from="now-24h",
        refresh="1m",
        variables=[
            c.label_variable("task_type", "Task type",
                             "task_type:aicrm_agent_task_results:rate1h"),
            c.team_variable(),
            c.agent_variable("agent:aicrm_agent_task_results:rate1h"),
        ],
        alerts=c.firing_alerts(
            'alertname=~"AicrmTask.*|AicrmAgent.*", task_type=~"$task_type|"'
        ),
    )
    builder = c.add_row(builder, "Score", [efficiency_score(), components(),
                                           score_by_task_type()])
    builder = c.add_row(builder, "Components", [weakest_components(), agent_task_success()])
    builder = c.add_row(
        builder, "Drivers",
        [completion_vs_objective(), duration_vs_target(), retries_by_task_type()],
    )
    builder = c.add_row(builder, "Flow", [handoffs(), volume()])
    return c.finish(builder)
