"""Integrations: request rates, errors, throttling and latency of Salesforce, HubSpot, ..."""

from __future__ import annotations

from grafana_foundation_sdk.builders import table, timeseries
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

PF = 'platform=~"$platform"'


def _platform_threshold(name: str) -> str:
    """A per-platform threshold line for the platforms with traffic. ``platform!=""``: with
    "All" the variable's ``.*`` also matches the global default (no platform label), which
    would draw an unlabelled line at a limit no platform has."""
    line = c.threshold(name, "platform", 'platform!="", ' + PF)
    return f"{line} and on (platform) platform:aicrm_integration_requests:rate5m{{{PF}}}"


def requests() -> timeseries.Panel:
    return c.timeseries_panel(
        "Requests",
        "Requests to each platform per second (5m).",
        c.REQPS,
        [c.query(f"platform:aicrm_integration_requests:rate5m{{{PF}}}", "{{platform}}")],
        width=8,
    )


def status_classes() -> timeseries.Panel:
    return c.timeseries_panel(
        "Responses by status class",
        "Requests per second by outcome: 2xx, 4xx, 429 (throttled), 5xx and timeout, stacked.",
        c.REQPS,
        [
            c.query(
                "sum by (status_class) "
                f"(platform_status_class:aicrm_integration_requests:rate5m{{{PF}}})",
                "{{status_class}}",
            )
        ],
        width=8,
        stack=True,
    )


def error_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Error ratio",
        "Share of requests ending in 5xx or timeout (5m). "
        "Dashed: each platform's integration_error_ratio_max.",
        c.RATIO,
        [
            c.query(f"platform:aicrm_integration_requests:error_ratio_rate5m{{{PF}}}",
                    "{{platform}}"),
            c.query(
                _platform_threshold("integration_error_ratio_max"),
                "threshold {{platform}}",
                c.THRESHOLD_REF,
            ),
        ],
        width=8,
    )


def throttled_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Throttled ratio (HTTP 429)",
        "Share of requests the platform rate-limited (5m): agents call faster than its quota. "
        "Dashed: each platform's integration_error_ratio_max, which the throttling alert uses.",
        c.RATIO,
        [
            c.query(f"platform:aicrm_integration_requests:throttled_ratio_rate5m{{{PF}}}",
                    "{{platform}}"),
            c.query(
                _platform_threshold("integration_error_ratio_max"),
                "threshold {{platform}}",
                c.THRESHOLD_REF,
            ),
        ],
    )


def latency_p95() -> timeseries.Panel:
    return c.timeseries_panel(
        "Latency (p95)",
        "95th percentile request duration (5m). "
        "Dashed: each platform's integration_latency_p95_max_seconds.",
        c.SECONDS,
        [
            c.query(f"platform:aicrm_integration_request_duration_seconds:p95_rate5m{{{PF}}}",
                    "{{platform}}"),
            c.query(
                _platform_threshold("integration_latency_p95_max_seconds"),
                "threshold {{platform}}",
                c.THRESHOLD_REF,
            ),
        ],
    )


def latency_percentiles() -> timeseries.Panel:
    return c.timeseries_panel(
        "Latency percentiles",
        "p50 and p99 request duration by platform (5m).",
        c.SECONDS,
        [
            c.query(f"platform:aicrm_integration_request_duration_seconds:p50_rate5m{{{PF}}}",
                    "p50 {{platform}}"),
            c.query(f"platform:aicrm_integration_request_duration_seconds:p99_rate5m{{{PF}}}",
                    "p99 {{platform}}", "B"),
        ],
    )


def operation_latency() -> timeseries.Panel:
    return c.timeseries_panel(
        "Latency (p95) by operation",
        "95th percentile duration of each platform operation (5m): which call is slow.",
        c.SECONDS,
        [
            c.query(
                "platform_operation:aicrm_integration_request_duration_seconds:p95_rate5m"
                f"{{{PF}}}",
                "{{platform}} {{operation}}",
            )
        ],
    )


def last_hour() -> table.Panel:
    return c.table_panel(
        "Last hour by platform",
        "Request rate, error and throttled ratios and p95 latency over the last hour.",
        c.REQPS,
        [
            c.table_query(f"platform:aicrm_integration_requests:rate1h{{{PF}}}", "A"),
            c.table_query(f"platform:aicrm_integration_requests:error_ratio_rate1h{{{PF}}}",
                          "B"),
            c.table_query(
                f"platform:aicrm_integration_requests:throttled_ratio_rate1h{{{PF}}}", "C"
            ),
            c.table_query(
                f"platform:aicrm_integration_request_duration_seconds:p95_rate1h{{{PF}}}", "D"
            ),
        ],
        keep=["platform"],
        columns={
            "Value #A": ("requests/s", c.REQPS),
            "Value #B": ("error ratio", c.RATIO),
            "Value #C": ("throttled ratio", c.RATIO),
            "Value #D": ("p95 latency", c.SECONDS),
        },
        width=12,
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "integrations",
        "AI-CRM / Integrations",
        "Calls from agents to CRM, messaging and mail platforms.",
        time_from="now-3h",
        refresh="30s",
        variables=[
            c.label_variable("platform", "Platform", "platform:aicrm_integration_requests:rate5m"),
        ],
        alerts=c.firing_alerts('alertname=~"AicrmIntegration.*", platform=~"$platform"'),
    )
    builder = c.add_row(builder, "Traffic", [requests(), status_classes(), error_ratio()])
    builder = c.add_row(
        builder,
        "Latency and limits",
        [throttled_ratio(), latency_p95(), latency_percentiles(), operation_latency()],
    )
    builder = c.add_row(builder, "Summary", [last_hour()])
    return c.finish(builder)
