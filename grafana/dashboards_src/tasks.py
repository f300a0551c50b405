"""Task Performance: throughput, completion, backlog, waits and durations by task type."""

from __future__ import annotations

from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

TT = 'task_type=~"$task_type"'


def throughput() -> timeseries.Panel:
    return c.timeseries_panel(
        "Throughput",
        "Tasks completed per second, by task type (5m).",
        c.OPS,
        [c.query(f"task_type:aicrm_tasks_completed:rate5m{{{TT}}}", "{{task_type}}")],
        width=8,
    )


def completion_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Completion ratio",
        "Share of terminal tasks that completed rather than failed or were cancelled (5m). "
        "Dashed: the task_completion_ratio objective.",
        c.RATIO,
        [
            c.query(f"task_type:aicrm_tasks:completed_ratio_rate5m{{{TT}}}", "{{task_type}}"),
            c.query(c.objective("task_completion_ratio"), "objective", c.THRESHOLD_REF),
        ],
        width=8,
        max_val=1,
    )


def outcomes() -> timeseries.Panel:
    return c.timeseries_panel(
        "Terminal tasks by status",
        "Tasks reaching completed, failed or cancelled, per second (5m), stacked.",
        c.OPS,
        [c.query(f"sum by (status) (task_type_status:aicrm_tasks:rate5m{{{TT}}})", "{{status}}")],
        width=8,
        stack=True,
    )


def queued() -> timeseries.Panel:
    return c.timeseries_panel(
        "Queued tasks",
        "Tasks waiting for an agent, by task type, and the 1h-ahead forecast of each.",
        c.COUNT,
        [
            c.query(f"task_type:aicrm_tasks_queued:sum{{{TT}}}", "{{task_type}}"),
            c.query(f"task_type:aicrm_tasks_queued:forecast1h{{{TT}}}",
                    "forecast {{task_type}}", "B"),
        ],
        width=8,
    )


def backlog_forecast() -> timeseries.Panel:
    return c.timeseries_panel(
        "Backlog against its limit",
        "All queued tasks and the 1h-ahead forecast. Dashed: task_backlog_max.",
        c.COUNT,
        [
            c.query("global:aicrm_tasks_queued:sum", "queued"),
            c.query("global:aicrm_tasks_queued:forecast1h", "forecast in 1h", "B"),
            c.query(c.threshold("task_backlog_max"), "threshold", c.THRESHOLD_REF),
        ],
        width=8,
    )


def oldest_open() -> timeseries.Panel:
    return c.timeseries_panel(
        "Oldest open task",
        "Age of the oldest queued or running task, by task type.",
        c.SECONDS,
        [c.query(f"task_type:aicrm_task_oldest_open_age_seconds:max{{{TT}}}", "{{task_type}}")],
        width=8,
    )


def wait_p95() -> timeseries.Panel:
    return c.timeseries_panel(
        "Queue wait (p95)",
        "95th percentile of the time tasks wait between creation and start (5m). "
        "Dashed: task_wait_p95_max_seconds.",
        c.SECONDS,
        [
            c.query(f"task_type:aicrm_task_wait_seconds:p95_rate5m{{{TT}}}", "{{task_type}}"),
            c.query(c.threshold("task_wait_p95_max_seconds"), "threshold", c.THRESHOLD_REF),
        ],
    )


def duration_vs_target() -> timeseries.Panel:
    return c.timeseries_panel(
        "Task duration (p95) against target",
        "95th percentile of start-to-finish time (5m), by task type. "
        "Dashed: each task type's target_seconds.",
        c.SECONDS,
        [
            c.query(f"task_type:aicrm_task_duration_seconds:p95_rate5m{{{TT}}}",
                    "{{task_type}}"),
            c.query(
                c.threshold("task_duration_target_seconds", "task_type", TT),
                "target {{task_type}}",
                c.THRESHOLD_REF,
            ),
        ],
    )


DURATION_BUCKETS = "task_type_le:aicrm_task_duration_seconds_bucket:rate5m"


def _duration_quantile(q: float) -> str:
    """A quantile of every selected task type's durations together: their recorded bucket
    rates summed by le (a percentile of percentiles, e.g. their max, is not one); no value
    while none of them finished a task."""
    return (
        f"histogram_quantile({q}, sum by (le) ({DURATION_BUCKETS}{{{TT}}}))"
        f' and on () (sum({DURATION_BUCKETS}{{{TT}, le="+Inf"}}) > 0)'
    )


def duration_percentiles() -> timeseries.Panel:
    return c.timeseries_panel(
        "Task duration percentiles",
        "p50, p95 and p99 of start-to-finish time over all tasks of the selected task types "
        "(5m).",
        c.SECONDS,
        [
            c.query(_duration_quantile(0.5), "p50"),
            c.query(_duration_quantile(0.95), "p95", "B"),
            c.query(_duration_quantile(0.99), "p99", "C"),
        ],
    )


def throughput_baseline() -> timeseries.Panel:
    band = (
        f"task_type:aicrm_tasks_completed:stddev1w_rate1h{{{TT}}}"
        f" * on () group_left () {c.threshold('anomaly_zscore_max')}"
    )
    return c.timeseries_panel(
        "Throughput against its weekly baseline",
        "Completed tasks per second (1h) with the past week's mean and the band of "
        "anomaly_zscore_max standard deviations around it; outside the band for 30m alerts, "
        "unless within 2x of the same time yesterday or a week ago (a daily or weekly batch "
        "at its usual hour).",
        c.OPS,
        [
            c.query(f"task_type:aicrm_tasks_completed:rate1h{{{TT}}}", "{{task_type}}"),
            c.query(f"task_type:aicrm_tasks_completed:avg1w_rate1h{{{TT}}}",
                    "weekly mean {{task_type}}", "B"),
            c.query(
                f"task_type:aicrm_tasks_completed:avg1w_rate1h{{{TT}}} + on (task_type) "
                f"({band})",
                "upper band {{task_type}}",
                "C",
            ),
            c.query(
                f"clamp_min(task_type:aicrm_tasks_completed:avg1w_rate1h{{{TT}}} - on (task_type) "
                f"({band}), 0)",
                "lower band {{task_type}}",
                "D",
            ),
        ],
        width=24,
    ).override_by_regexp(
        "(upper|lower) band.*",
        [
            model.DynamicConfigValue(
                id_val="custom.lineStyle", value={"fill": "dot", "dash": [0, 10]}
            ),
            model.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        ],
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "tasks",
        "AI-CRM / Task Performance",
        "Tasks from the task database: throughput, completion, backlog, waits and durations.",
        time_from="now-6h",
        refresh="1m",
        variables=[
            c.label_variable("task_type", "Task type", "task_type:aicrm_tasks:rate1h"),
        ],
        alerts=c.firing_alerts('alertname=~"AicrmTask.*"'),
    )
    builder = c.add_row(builder, "Throughput", [throughput(), completion_ratio(), outcomes()])
    builder = c.add_row(builder, "Backlog", [queued(), backlog_forecast(), oldest_open()])
    builder = c.add_row(
        builder, "Latency", [wait_p95(), duration_vs_target(), duration_percentiles()]
    )
    builder = c.add_row(builder, "Anomalies", [throughput_baseline()])
    return c.finish(builder)
