"""Executive: what the agents deliver and cost, against the previous period, in plain words.

Every figure covers the dashboard's time range and is compared with the range just before
it (same length), so "last 7 days" reads against the 7 days before. Totals are the range's
mean of the recorded 1h rates times its length, a rate counting as 0 where it was not
recorded. Ratios are the range mean of the recorded
numerator rate over that of the denominator (total over total), never the mean of hourly
ratios, which would weigh a quiet hour as much as a busy one.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

AG = 'agent=~"$agent"'


POINTS = 10_000
"""maxDataPoints of the headline panels: Grafana's ``$__interval`` is the range over this (at
least the data source's scrape interval), the step at which a rate is summed over the range:
4.3 minutes over 30 days, 53 minutes over a year, finer than the hour the recorded rates move
over, so the points' sum stands for the rate's integral."""


def _over_range(series: str | tuple[str, str], total: bool, previous: bool = False,
                rate: bool = True) -> str:
    """The range's mean of a recorded rate (times the range's length if ``total``), or for a
    (numerator, denominator) pair the ratio of their means; no value where the denominator
    was zero throughout. A rate counts as 0 where it was not recorded (the sum of its points
    over the number of points, ``vector(1)`` having one at each), as in the API
    (api/queries.py): an average of the points it has would let the first day of a new
    Prometheus stand for the whole of a 30-day range. A score (``rate=False``) is no rate:
    where it was not computed it has no value, and its mean is that of the points it has."""
    if isinstance(series, tuple):
        numerator, denominator = (_over_range(s, False, previous) for s in series)
        return f"{numerator} / ({denominator} > 0)"
    offset = " offset $__range" if previous else ""
    if not rate:
        return f"avg_over_time({series}[$__range]{offset})"
    rng = f"[$__range:$__interval]{offset}"
    expr = f"(sum_over_time({series}{rng}) / scalar(count_over_time(vector(1){rng})))"
    return f"{expr} * $__range_s" if total else expr


def _kpi(
    title: str,
    description: str,
    unit: str,
    series: str | tuple[str, str],
    *,
    total: bool = False,
    relative: bool = True,
    scale: str = "",
    limit: str = "",
    above_is_bad: bool = False,
    rate: bool = True,
) -> stat.Panel:
    """A headline number for the range, its change against the previous range, and
    (with limit) its colour against a config.json threshold or objective."""
    current = _over_range(series, total, rate=rate) + scale
    previous = _over_range(series, total, previous=True, rate=rate) + scale
    if relative:
        change, change_unit = f"({current}) / (({previous}) > 0) - 1", c.RATIO
        change_text = "relative change"
    else:
        change, change_unit = f"({current}) - ({previous})", unit
        change_text = "change in points"
    targets = [c.instant(current, "current"), c.instant(change, "vs previous period", "B")]
    if limit:
        targets.append(c.instant(limit, "threshold", c.THRESHOLD_REF))
    panel = (
        c.stat_panel(
            title,
            f"{description} Second value: {change_text} against the previous period.",
            unit,
            targets,
            width=6,
            height=5,
        )
        .graph_mode(common.BigValueGraphMode.NONE)
        .max_data_points(POINTS)
        .override_by_query("B", c.change_override(change_unit))
    )
    if limit:
        panel = c.threshold_from_query(panel, above_is_bad=above_is_bad, apply_to="A")
    return panel


def tasks_automated() -> stat.Panel:
    return _kpi(
        "Tasks automated",
        "Tasks the agents completed in the period (task database).",
        c.COUNT,
        "global:aicrm_tasks_completed:rate1h",
        total=True,
    ).decimals(0)


def completion_ratio() -> stat.Panel:
    return _kpi(
        "Task completion",
        "Share of finished tasks that completed rather than failed or were cancelled; red "
        "below the task_completion_ratio objective.",
        c.RATIO,
        ("global:aicrm_tasks_completed:rate1h", "global:aicrm_tasks:rate1h"),
        relative=False,
        limit=c.objective("task_completion_ratio"),
    )


def success_ratio() -> stat.Panel:
    return _kpi(
        "Agent success",
        "Share of the agents' task results that succeeded; red below agent_success_ratio_min.",
        c.RATIO,
        (
            "global:aicrm_agent_task_results_success:rate1h",
            "global:aicrm_agent_task_results:rate1h",
        ),
        relative=False,
        limit=c.threshold("agent_success_ratio_min", matchers='agent=""'),
    )


def hours_saved() -> stat.Panel:
    return _kpi(
        "Estimated hours saved",
        "Completed tasks times the minutes of human work one task of that type saves "
        "(config.json `minutes_saved`).",
        c.HOURS,
        "global:aicrm_task_human_seconds_saved:rate1h",
        total=True,
        scale=" / 3600",
    )


def efficiency_score() -> stat.Panel:
    return _kpi(
        "Workflow efficiency",
        "0-100 score of completion, success, speed and retries (weights in config.json).",
        c.SCORE,
        "global:aicrm_workflow_efficiency:score1h",
        relative=False,
        rate=False,
    )


def health_score() -> stat.Panel:
    return _kpi(
        "System health",
        "0-100 score of sources, integrations, agents and backlog (weights in config.json).",
        c.SCORE,
        "global:aicrm_system_health:score",
        relative=False,
        rate=False,
    )


def spend() -> stat.Panel:
    return _kpi(
        "Model spend",
        "What the agents' LLM calls cost in the period.",
        c.USD,
        "global:aicrm_agent_cost_usd:rate1h",
        total=True,
    )


def cost_per_task() -> stat.Panel:
    return _kpi(
        "Cost per successful task",
        "Model spend divided by successful task results; red above "
        "cost_per_successful_task_max_usd.",
        c.USD,
        ("global:aicrm_agent_cost_usd:rate1h", "global:aicrm_agent_task_results_success:rate1h"),
        limit=c.threshold("cost_per_successful_task_max_usd"),
        above_is_bad=True,
    )


# Every recommendation, whatever its rule: a new rule shows here without a dashboard change.
# One about a declared agent carries its owner's `team` (from aicrm_agent_info); the others
# (the `other` agent, no agent) have none, which only team=All (`.*`, matches "") lets through.
RECOMMENDATIONS = 'ALERTS{alertstate="firing", severity="recommendation", team=~"$team"}'
# Columns of the ALERTS series that say nothing about the recommendation; every other label
# (team, agent, task_type, platform, model, ...) is a column, the rule's name first.
RECOMMENDATION_NOISE = ("Time", "Value", "__name__", "alertstate", "severity")


def recommendations() -> table.Panel:
    return (
        table.Panel()
        .title("Open recommendations")
        .description(
            "Optimisations the rules found and that have held for an hour, one row each, with "
            "the labels that say what to change; with teams picked, only those about their "
            "agents. Each rule is explained in docs/runbooks.md under its name."
        )
        .datasource(c.DATASOURCE)
        .unit(c.COUNT)
        .span(24)
        .height(6)
        .targets([c.table_query(RECOMMENDATIONS)])
        .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": dict.fromkeys(RECOMMENDATION_NOISE, True),
                    "indexByName": {"alertname": 0, "team": 1},
                    "renameByName": {"alertname": "recommendation"},
                },
            )
        )
        .sort_by([common_builders.TableSortByFieldState().display_name("recommendation")])
    )


def cost_by_agent() -> bargauge.Panel:
    panel = c.bar_panel(
        "Cost per successful task by agent",
        "Last hour; red above cost_per_successful_task_max_usd.",
        c.USD,
        [
            c.instant(f"agent:aicrm_agent_cost_usd_per_successful_task:ratio_rate1h{{{AG}}}",
                      "{{agent}}"),
            c.instant(c.threshold("cost_per_successful_task_max_usd"), "threshold",
                      c.THRESHOLD_REF),
        ],
        width=8,
        min_val=0,
    )
    return c.threshold_from_query(panel, above_is_bad=True)


def spend_by_agent() -> timeseries.Panel:
    return c.timeseries_panel(
        "Spend per hour by agent",
        "Model spend of each agent, US dollars per hour (1h).",
        c.USD,
        [c.query(f"agent:aicrm_agent_cost_usd:rate1h{{{AG}}} * 3600", "{{agent}}")],
        width=8,
        stack=True,
    )


def spend_forecast() -> timeseries.Panel:
    return c.timeseries_panel(
        "Daily spend: now and in 24 hours",
        "Spend per day at the current hourly rate, and where the last 6 hours' trend puts "
        "it a day from now. For 7 hours after spend begins (or resumes after an hour without "
        "any) the trend holds the hourly rate's ramp from 0 and overshoots; the budget alert "
        "waits those hours out.",
        c.USD,
        [
            c.query("global:aicrm_agent_cost_usd:rate1h * 86400", "per day now"),
            c.query("global:aicrm_agent_cost_usd:forecast24h_rate1h * 86400",
                    "per day in 24h (forecast)", "B"),
        ],
        width=8,
    )


def hours_saved_by_task_type() -> timeseries.Panel:
    return c.timeseries_panel(
        "Hours saved per day by task type",
        "Human hours a day of automation saves at the last hour's pace, by task type.",
        c.HOURS,
        [c.query("task_type:aicrm_task_human_seconds_saved:rate1h * 24", "{{task_type}}")],
        width=24,
        stack=True,
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "executive",
        "AI-CRM / Executive",
        "What the AI agents deliver and cost, against the previous period.",
        time_from="now-7d",
        refresh="5m",
        variables=[c.team_variable(), c.agent_variable("agent:aicrm_agent_cost_usd:rate1h")],
        alerts=c.firing_alerts('severity=~"page|warning"'),
    )
    builder = c.add_row(
        builder,
        "Delivered",
        [tasks_automated(), completion_ratio(), success_ratio(), hours_saved()],
    )
    builder = c.add_row(
        builder, "Quality and cost", [efficiency_score(), health_score(), spend(), cost_per_task()]
    )
    builder = c.add_row(builder, "What to do next", [recommendations()])
    builder = c.add_row(
        builder, "Spend", [cost_by_agent(), spend_by_agent(), spend_forecast()]
    )
    builder = c.add_row(builder, "Value", [hours_saved_by_task_type()])
    return c.finish(builder)
