"""System Overview: is the stack healthy, is work flowing and are users engaging, at a glance."""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

SOURCE = 'source=~"$source"'


def health_score() -> stat.Panel:
    return c.stat_panel(
        "System health score",
        "0-100: weighted mean of the health components (sources, integrations, agents, "
        "backlog); weights from config.json `scores.health`.",
        c.SCORE,
        [c.query("global:aicrm_system_health:score", "health")],
        color=model.FieldColorModeId.CONTINUOUS_RD_YL_GR,
        min_val=0,
        max_val=100,
    )


def health_components() -> bargauge.Panel:
    return c.bar_panel(
        "Health components",
        "Each component of the health score, 0-100%: sources read, integrations within their "
        "thresholds, agents meeting their objective, backlog under its limit.",
        c.RATIO,
        [c.instant("global:aicrm_system_health_component:ratio", "{{component}}")],
        width=6,
        height=4,
        min_val=0,
        max_val=1,
    )


def exporters_up() -> stat.Panel:
    return c.stat_panel(
        "Exporter targets up",
        "Share of the aicrm-exporter scrape targets Prometheus reaches.",
        c.RATIO,
        [c.query('avg(up{job="aicrm-exporter"})', "up")],
        color=model.FieldColorModeId.CONTINUOUS_RD_YL_GR,
        min_val=0,
        max_val=1,
    )


def firing_alerts() -> stat.Panel:
    return c.stat_panel(
        "Firing alerts",
        "Alerts firing now (recommendations and the always-firing AicrmWatchdog excluded); "
        "they also show as red annotations.",
        c.COUNT,
        [c.query(f"count(ALERTS{{{c.PROBLEMS}}}) or vector(0)", "firing")],
    )


def interactions_by_type() -> timeseries.Panel:
    return c.timeseries_panel(
        "User interactions",
        "Interactions of users with agents per second, by type: messages, approvals and "
        "rejections of what agents proposed, feedback, escalations to a human (5m, stacked).",
        c.OPS,
        [c.query("type:aicrm_user_interactions:rate5m", "{{type}}")],
        width=9,
        stack=True,
    )


def approval_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Approval ratio",
        "Approvals / (approvals + rejections) of what agents proposed, over all channels and by "
        "channel (1h); no value where users made no decision in the hour.",
        c.RATIO,
        [
            c.query("global:aicrm_user_interactions:approval_ratio_rate1h", "all channels"),
            c.query("channel:aicrm_user_interactions:approval_ratio_rate1h", "{{channel}}", "B"),
        ],
        width=9,
        min_val=0,
        max_val=1,
    )


def active_users() -> stat.Panel:
    return c.stat_panel(
        "Active users",
        "Distinct users who interacted with agents in the last hour and day (with several "
        "exporter shards, the largest shard's count).",
        c.COUNT,
        [c.query("window:aicrm_active_users:max", "{{window}}")],
        width=3,
        height=8,
    )


def user_rating() -> stat.Panel:
    return c.stat_panel(
        "User rating",
        "Mean 1-5 rating users gave agents, all agents together (1h); by agent on Agent "
        "Performance.",
        c.FACTOR,
        [c.query("global:aicrm_user_feedback_rating:mean1h", "mean rating")],
        width=3,
        height=8,
        color=model.FieldColorModeId.CONTINUOUS_RD_YL_GR,
        min_val=1,
        max_val=5,
    )


def throughput() -> timeseries.Panel:
    return c.timeseries_panel(
        "Work done",
        "Task results reported by agents and tasks completed in the task database, per second.",
        c.OPS,
        [
            c.query("global:aicrm_agent_task_results:rate5m", "agent task results"),
            c.query("global:aicrm_tasks_completed:rate5m", "tasks completed", "B"),
        ],
        width=8,
    )


def success_and_completion() -> timeseries.Panel:
    return c.timeseries_panel(
        "Success and completion",
        "Share of agent results that succeeded and of terminal tasks that completed (5m). "
        "Dashed: the task completion objective.",
        c.RATIO,
        [
            c.query("global:aicrm_agent_task_results:success_ratio_rate5m", "agent success"),
            c.query("global:aicrm_tasks:completed_ratio_rate5m", "task completion", "B"),
            c.query(c.objective("task_completion_ratio"), "completion objective",
                    c.THRESHOLD_REF),
        ],
        width=8,
        max_val=1,
    )


def spend() -> timeseries.Panel:
    return c.timeseries_panel(
        "Model spend per hour",
        "LLM spend of all agents, in US dollars per hour (5m rate).",
        c.USD,
        [c.query("global:aicrm_agent_cost_usd:rate5m * 3600", "USD per hour")],
        width=8,
    )


def integration_errors() -> timeseries.Panel:
    return c.timeseries_panel(
        "Integration error ratio",
        "Share of requests to external platforms that ended in 5xx or timeout (5m). "
        "Dashed: the global integration_error_ratio_max.",
        c.RATIO,
        [
            c.query("global:aicrm_integration_requests:error_ratio_rate5m", "error ratio"),
            c.query(c.threshold("integration_error_ratio_max", matchers='platform=""'),
                    "threshold", c.THRESHOLD_REF),
        ],
    )


def backlog() -> timeseries.Panel:
    return c.timeseries_panel(
        "Backlog and forecast",
        "Queued tasks, and where the last 30 minutes' trend puts them in one hour. "
        "Dashed: task_backlog_max.",
        c.COUNT,
        [
            c.query("global:aicrm_tasks_queued:sum", "queued"),
            c.query("global:aicrm_tasks_queued:forecast1h", "forecast in 1h", "B"),
            c.query(c.threshold("task_backlog_max"), "threshold", c.THRESHOLD_REF),
        ],
    )


def sources_up() -> stat.Panel:
    return c.stat_panel(
        "Sources",
        "Whether the exporter read each source on its last attempt (every shard).",
        c.COUNT,
        [c.query(f"source:aicrm_source_up:min{{{SOURCE}}}", "{{source}}")],
        width=6,
        height=8,
    ).mappings(c.up_down_mappings()).color_mode(common.BigValueColorMode.BACKGROUND)


def events_rate() -> timeseries.Panel:
    return c.timeseries_panel(
        "Events ingested",
        "Events accepted from each source, per second.",
        c.OPS,
        [c.query(f"source:aicrm_source_events:rate5m{{{SOURCE}}}", "{{source}}")],
        width=6,
    )


def rejected_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Rejected events",
        "Share of the lines each source received that were rejected (5m). "
        "Dashed: rejected_events_ratio_max.",
        c.RATIO,
        [
            c.query(f"source:aicrm_source_events:rejected_ratio_rate5m{{{SOURCE}}}",
                    "{{source}}"),
            c.query(c.threshold("rejected_events_ratio_max"), "threshold", c.THRESHOLD_REF),
        ],
        width=6,
    )


def source_lag() -> timeseries.Panel:
    return c.timeseries_panel(
        "Source lag",
        "Delay between the newest event's timestamp and its ingestion. "
        "Dashed: source_lag_max_seconds.",
        c.SECONDS,
        [
            c.query(f"source:aicrm_source_lag_seconds:max{{{SOURCE}}}", "{{source}}"),
            c.query(c.threshold("source_lag_max_seconds"), "threshold", c.THRESHOLD_REF),
        ],
        width=6,
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "overview",
        "AI-CRM / System Overview",
        "Health, throughput, spend and sources of the AI-CRM stack.",
        time_from="now-6h",
        refresh="30s",
        variables=[c.label_variable("source", "Source", "source:aicrm_source_up:min")],
        alerts=c.firing_alerts(),
    )
    builder = c.add_row(
        builder,
        "Health",
        [health_score(), health_components(), exporters_up(), firing_alerts()],
    )
    builder = c.add_row(
        builder,
        "Activity",
        [throughput(), success_and_completion(), spend(), integration_errors(), backlog()],
    )
    builder = c.add_row(
        builder, "Sources", [sources_up(), events_rate(), rejected_ratio(), source_lag()]
    )
    builder = c.add_row(
        builder, "Users", [interactions_by_type(), approval_ratio(), active_users(), user_rating()]
    )
    return c.finish(builder)
