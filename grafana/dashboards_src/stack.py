"""Stack health: is the monitoring stack itself working? Scrape targets, the exporter's sources
and push endpoint, the REST API, Prometheus' rule evaluation, storage and alert delivery,
Alertmanager's notifications, the scale profile's VictoriaMetrics and vmalert, and their
processes.

Where a recording rule keeps what a panel needs (the sources' rates, rejected share and label
overflow), the panel reads it, as the alerts do. Everything else reads the components' own
series: Prometheus and Alertmanager have no rules of ours, and the API's request metrics are
not recorded. The `instance` variable narrows those to one exporter shard, API instance,
Prometheus or Alertmanager.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from grafana import common as c

INSTANCE = 'instance=~"$instance"'
EXPORTER = f'job="aicrm-exporter", {INSTANCE}'
API = f'job="aicrm-api", {INSTANCE}'
API_CLIENTS = f'{API}, endpoint!~"/metrics|/healthz|/readyz"'
"""The API's client requests: not Prometheus' scrapes of /metrics nor health probes."""
_RULES = Path(__file__).resolve().parents[2] / "recording_rules"
# recording_rules/scale/: Prometheus' own alerts in the scale profile, whose ALERTS its remote
# write passes on to VictoriaMetrics, where Grafana reads them.
SYSTEM_ALERTS = (_RULES / "alerts" / "system.alerts.yml", _RULES / "scale" / "ruler.alerts.yml")


def _stack_alerts() -> str:
    """A matcher for the alerts of system.alerts.yml and the scale profile's watch, read from
    the files so that a new one is on the dashboard without a second list; the always-firing
    watchdog (severity none) aside."""
    groups = [g for path in SYSTEM_ALERTS for g in yaml.safe_load(path.read_text())["groups"]]
    names = [r["alert"] for g in groups for r in g["rules"]
             if "alert" in r and r.get("labels", {}).get("severity") != "none"]
    return f'alertname=~"{"|".join(names)}"'


STACK_ALERTS = _stack_alerts()
RATE = "[$__rate_interval]"


def _rule_group(expr: str) -> str:
    """Prometheus names a rule group "<file>;<group>": keep the group's name as `group`."""
    return f'label_replace({expr}, "group", "$1", "rule_group", ".*;(.*)")'


# --- At a glance ---------------------------------------------------------------------------


def jobs_up() -> stat.Panel:
    return c.stat_panel(
        "Scrape jobs up",
        "Share of each scrape job's targets Prometheus reached on its last scrape. Below 100%: "
        "a target is down (AicrmExporterDown pages for the exporter, AicrmTargetDown tickets "
        "for the others); see Targets below for which one.",
        c.RATIO,
        [c.query(f"avg by (job) (up{{{INSTANCE}}})", "{{job}}")],
        width=8,
        color=model.FieldColorModeId.CONTINUOUS_RD_YL_GR,
        min_val=0,
        max_val=1,
    )


def firing_stack_alerts() -> stat.Panel:
    return c.stat_panel(
        "Firing stack alerts",
        "Alerts about the stack itself firing now (targets, scrape jobs, sources, label "
        "overflow, configuration series, Alertmanager delivery). Anything above 0 needs a look; "
        "they also show as red annotations.",
        c.COUNT,
        [c.query(f"count(ALERTS{{{c.PROBLEMS}, {STACK_ALERTS}}}) or vector(0)", "firing")],
        width=4,
    )


def alertmanagers_discovered() -> stat.Panel:
    return c.stat_panel(
        "Alertmanagers discovered",
        "Alertmanagers each Prometheus sends its alerts to. 0: alerts fire in Prometheus but "
        "reach no one (the alerting section of prometheus.yml, or Alertmanager's address).",
        c.COUNT,
        [c.query(f"prometheus_notifications_alertmanagers_discovered{{{INSTANCE}}}",
                 "{{instance}}")],
        width=4,
    )


def config_reloads() -> stat.Panel:
    return c.stat_panel(
        "Last config reload",
        "Whether Prometheus, Alertmanager (and vmalert) loaded their configuration on the last "
        "(re)load. Failed: they keep running the previous configuration, so a change made "
        "since (a new rule file, a receiver) is not in effect; their logs name the error.",
        c.COUNT,
        [
            c.query(f"prometheus_config_last_reload_successful{{{INSTANCE}}}",
                    "{{job}} {{instance}}"),
            c.query(f"alertmanager_config_last_reload_successful{{{INSTANCE}}}",
                    "{{job}} {{instance}}", "B"),
            c.query(f"vmalert_config_last_reload_successful{{{INSTANCE}}}",
                    "{{job}} {{instance}}", "C"),
        ],
        width=4,
    ).mappings(c.up_down_mappings("Failed", "OK")).color_mode(common.BigValueColorMode.BACKGROUND)


def rule_failures_now() -> stat.Panel:
    return c.stat_panel(
        "Rule evaluation failures",
        "Rule evaluations that failed per second, all groups of every Prometheus. Above 0: "
        "some recorded series or alerts are not being computed (see Rule groups for which).",
        c.OPS,
        [c.query(f"sum(rate(prometheus_rule_evaluation_failures_total{{{INSTANCE}}}{RATE}))",
                 "failures")],
        width=4,
    )


# --- Targets -------------------------------------------------------------------------------


def targets_up() -> stat.Panel:
    return c.stat_panel(
        "Targets",
        "Every scrape target: Up when Prometheus' last scrape of it succeeded. Down: the "
        "process is not running, not listening on that address, or answers /metrics with an "
        "error (Prometheus' Status > Targets page shows the error).",
        c.COUNT,
        [c.query(f"up{{{INSTANCE}}}", "{{job}} {{instance}}")],
        width=8,
        height=8,
    ).mappings(c.up_down_mappings()).color_mode(common.BigValueColorMode.BACKGROUND)


def scrape_duration() -> timeseries.Panel:
    return c.timeseries_panel(
        "Scrape duration",
        "How long each target took to answer Prometheus' scrape. Bad: nearing the "
        "scrape_timeout of prometheus.yml (10s), after which the scrape fails and the target "
        "reads as down; a slow exporter /metrics often means too many series.",
        c.SECONDS,
        [c.query(f"scrape_duration_seconds{{{INSTANCE}}}", "{{job}} {{instance}}")],
        width=8,
    )


def samples_scraped() -> timeseries.Panel:
    return c.timeseries_panel(
        "Samples per scrape",
        "Samples each target returned on a scrape. A sudden jump is new series (a label with "
        "unbounded values, more exporter shards or sources); a drop to 0 is a target that "
        "answers but serves nothing.",
        c.COUNT,
        [c.query(f"scrape_samples_scraped{{{INSTANCE}}}", "{{job}} {{instance}}")],
        width=8,
    )


# --- Exporter ------------------------------------------------------------------------------


def source_up() -> stat.Panel:
    return c.stat_panel(
        "Sources",
        "Whether each exporter shard read each source on its last attempt. Down: a file "
        "pattern matches nothing readable or the task database refuses the exporter; metrics "
        "from that source go stale (AicrmSourceDown after 5 minutes).",
        c.COUNT,
        [c.query(f"aicrm_source_up{{{EXPORTER}}}", "{{source}} {{instance}}")],
        width=6,
        height=8,
    ).mappings(c.up_down_mappings()).color_mode(common.BigValueColorMode.BACKGROUND)


def events_accepted() -> timeseries.Panel:
    return c.timeseries_panel(
        "Events accepted",
        "Events each source delivered per second (5m, every shard). A source falling to 0 "
        "while its writers are busy is stuck: check its lag and last event below.",
        c.OPS,
        [c.query("source:aicrm_source_events:rate5m", "{{source}}")],
        width=6,
    )


def rejected_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "Rejected share",
        "Share of the lines each source received that were rejected (5m). Above the dashed "
        "rejected_events_ratio_max: a writer sends malformed events (AicrmRejectedEventsSurge); "
        "the reasons are in the next panel.",
        c.RATIO,
        [
            c.query("source:aicrm_source_events:rejected_ratio_rate5m", "{{source}}"),
            c.query(c.threshold("rejected_events_ratio_max"), "threshold", c.THRESHOLD_REF),
        ],
        width=6,
    )


def rejected_by_reason() -> timeseries.Panel:
    return c.timeseries_panel(
        "Rejected events by reason",
        "Rejected lines per second by source and reason (invalid_json, missing_field, "
        "out_of_range, ...; docs/metrics.md lists them). No line: nothing was rejected. The "
        "reason tells the writer's owner what to fix.",
        c.OPS,
        [
            c.query(
                "sum by (source, reason) "
                f"(rate(aicrm_source_rejected_events_total{{{EXPORTER}}}{RATE})) > 0",
                "{{source}} {{reason}}",
            )
        ],
        width=6,
        stack=True,
    )


def source_lag() -> timeseries.Panel:
    return c.timeseries_panel(
        "Source lag",
        "How far behind its events' own timestamps each source is ingested, per shard. Above "
        "the dashed source_lag_max_seconds: the tailer or the task database poll falls behind "
        "(or writers send old events), and dashboards and alerts are late "
        "(AicrmSourceLagHigh).",
        c.SECONDS,
        [
            c.query(f"aicrm_source_lag_seconds{{{EXPORTER}}}", "{{source}} {{instance}}"),
            c.query(c.threshold("source_lag_max_seconds"), "threshold", c.THRESHOLD_REF),
        ],
        width=8,
    )


def last_event_age() -> timeseries.Panel:
    return c.timeseries_panel(
        "Time since last event",
        "Seconds since each source last delivered an accepted event, per shard. Growing "
        "without bound while agents work: the writers stopped, or write where the exporter "
        "does not read.",
        c.SECONDS,
        [c.query(f"time() - aicrm_source_last_event_timestamp_seconds{{{EXPORTER}}}",
                 "{{source}} {{instance}}")],
        width=8,
    )


def label_overflow() -> timeseries.Panel:
    return c.timeseries_panel(
        "Label overflow",
        "Label values per second that config.json does not declare, folded into `other`, by "
        "label (5m). Above 0 for long: declare the new agents, models, tools or platforms "
        "(AicrmLabelOverflow), or their data stays lumped together.",
        c.OPS,
        [c.query("label:aicrm_label_overflow:rate5m", "{{label}}")],
        width=8,
    )


def push_requests() -> timeseries.Panel:
    return c.timeseries_panel(
        "Push requests by status code",
        "Requests to the exporter's POST /v1/events per second, by HTTP code, stacked. 200: "
        "accepted and journaled. 401: wrong or missing token; 400/411/413/415: a malformed "
        "request; 503: the journal could not be written (disk full), nothing was accepted. "
        "The exporter does not time these requests.",
        c.REQPS,
        [c.query(f"sum by (code) (rate(aicrm_push_requests_total{{{EXPORTER}}}{RATE}))",
                 "{{code}}")],
        width=8,
        stack=True,
    )


def push_errors() -> timeseries.Panel:
    return c.timeseries_panel(
        "Push error ratio",
        "Share of push requests not answered 2xx. Above 0: a writer's events are not "
        "arriving; the codes in the panel on the left say why.",
        c.RATIO,
        [
            c.query(
                f'(sum(rate(aicrm_push_requests_total{{{EXPORTER}, code!~"2.."}}{RATE}))'
                f" or 0 * sum(rate(aicrm_push_requests_total{{{EXPORTER}}}{RATE})))"
                f" / (sum(rate(aicrm_push_requests_total{{{EXPORTER}}}{RATE})) > 0)",
                "error ratio",
            )
        ],
        width=8,
        min_val=0,
        max_val=1,
    )


def state_write_failures() -> timeseries.Panel:
    return c.timeseries_panel(
        "State write failures",
        "Failed writes of the exporter's state file per second, by instance. Above 0: disk "
        "full, read-only or no permission; the exporter serves the values last written, so its "
        "figures stand still until a write succeeds (nothing read is lost) "
        "(AicrmExporterStateWriteFailing).",
        c.OPS,
        [c.query(f"sum by (instance) (rate(aicrm_exporter_state_write_failures_total"
                 f"{{{EXPORTER}}}{RATE}))", "{{instance}}")],
        width=8,
        min_val=0,
    )


# --- REST API ------------------------------------------------------------------------------


def api_requests() -> timeseries.Panel:
    return c.timeseries_panel(
        "API requests by endpoint",
        "Requests the REST API answered per second, by route (Prometheus' scrapes of /metrics "
        "included). A drop to 0 for a route its clients poll: the clients or the way to the "
        "API are broken.",
        c.REQPS,
        [c.query(f"sum by (endpoint) (rate(aicrm_api_requests_total{{{API}}}{RATE}))",
                 "{{endpoint}}")],
        width=8,
        stack=True,
    )


def api_status_classes() -> timeseries.Panel:
    return c.timeseries_panel(
        "API responses by status class",
        "Client requests per second by status class (1xx-5xx), stacked; scrapes and health "
        "probes left out. 5xx: 503 = Prometheus unreachable, 504 = Prometheus too slow, 500 = "
        "a bug (the API's log has the request id).",
        c.REQPS,
        [
            c.query(
                'sum by (class) (label_replace(rate(aicrm_api_requests_total'
                f'{{{API_CLIENTS}}}{RATE}), "class", "${{1}}xx", "code", "(.).."))',
                "{{class}}",
            )
        ],
        width=8,
        stack=True,
    )


def api_error_ratio() -> timeseries.Panel:
    return c.timeseries_panel(
        "API error ratio (5xx)",
        "Share of client requests answered 5xx. Above 0: callers (dashboards, reports) get "
        "errors instead of numbers; 503/504 point at Prometheus, which the API only queries "
        "(it exposes no metrics of its own queries to it).",
        c.RATIO,
        [
            c.query(
                f'(sum(rate(aicrm_api_requests_total{{{API_CLIENTS}, code=~"5.."}}{RATE}))'
                f" or 0 * sum(rate(aicrm_api_requests_total{{{API_CLIENTS}}}{RATE})))"
                f" / (sum(rate(aicrm_api_requests_total{{{API_CLIENTS}}}{RATE})) > 0)",
                "5xx ratio",
            )
        ],
        width=8,
        min_val=0,
        max_val=1,
    )


def _api_quantile(q: float, by: str = "") -> str:
    grouping = f"le, {by}" if by else "le"
    return (
        f"histogram_quantile({q}, sum by ({grouping}) "
        f"(rate(aicrm_api_request_duration_seconds_bucket{{{API_CLIENTS}}}{RATE})))"
    )


BACKEND_QUERY_P95 = (
    "histogram_quantile(0.95, sum by (le) (rate(prometheus_http_request_duration_seconds_bucket"
    f'{{job="prometheus", handler="/api/v1/query"}}{RATE})))'
)
"""p95 of Prometheus' own instant-query answers, whichever instance the variable picks: the
API's backend is usually not the instance chosen to look at the API."""


def api_latency() -> timeseries.Panel:
    return c.timeseries_panel(
        "API latency",
        "p50, p95 and p99 of the time the API took to answer client requests (all routes), "
        "and the p95 of Prometheus' own /api/v1/query answers (to every client: the API's "
        "misses, and anyone else's instant queries). The gap between the two p95 lines is "
        "what the API adds (about 3 ms on the benchmark machine, docs/benchmarks-api.md); "
        "both high together: Prometheus is slow; the API's alone: its workers or Redis.",
        c.SECONDS,
        [
            c.query(_api_quantile(0.5), "p50"),
            c.query(_api_quantile(0.95), "p95", "B"),
            c.query(_api_quantile(0.99), "p99", "C"),
            c.query(BACKEND_QUERY_P95, "Prometheus /api/v1/query p95", "D"),
        ],
        width=6,
    )


def api_latency_by_endpoint() -> timeseries.Panel:
    return c.timeseries_panel(
        "API p95 latency by endpoint",
        "p95 answer time per route. /export and long windows cost the most; one route "
        "slow alone is its query, all routes slow together is Prometheus or the API's workers.",
        c.SECONDS,
        [c.query(_api_quantile(0.95, "endpoint"), "{{endpoint}}")],
        width=6,
    )


def api_cache_hits() -> timeseries.Panel:
    return c.timeseries_panel(
        "API cache hit ratio",
        "Share of response cache lookups answered from the cache (api.cache_ttl_seconds). "
        "Low: every request reaches Prometheus (short TTL, many distinct queries, or a cache "
        "per worker without Redis).",
        c.RATIO,
        [
            c.query(
                f'sum(rate(aicrm_api_cache_lookups_total{{{API}, result="hit"}}{RATE}))'
                f" / (sum(rate(aicrm_api_cache_lookups_total{{{API}}}{RATE})) > 0)",
                "hit ratio",
            )
        ],
        width=6,
        min_val=0,
        max_val=1,
    )


def api_refused() -> timeseries.Panel:
    return c.timeseries_panel(
        "API refused requests",
        "Requests per second refused before any query: 429 = over api.rate_limit (per key, or "
        "per address without one), 401/403 = missing or wrong API key. A burst of 401s is a "
        "client with a revoked key, or someone guessing.",
        c.REQPS,
        [
            c.query(
                "sum by (code) (rate(aicrm_api_requests_total"
                f'{{{API}, code=~"401|403|429"}}{RATE}))',
                "{{code}}",
            )
        ],
        width=6,
        stack=True,
    )


# --- Prometheus ----------------------------------------------------------------------------


def rule_group_load() -> timeseries.Panel:
    group_duration = f"prometheus_rule_group_last_duration_seconds{{{INSTANCE}}}"
    group_interval = f"prometheus_rule_group_interval_seconds{{{INSTANCE}}}"
    return c.timeseries_panel(
        "Rule group duration / interval",
        "The ten rule groups whose last evaluation took the largest share of their interval. "
        "Near 100%: the group cannot keep up, iterations are missed and its recorded series "
        "and alerts lag (docs/benchmarks-rules.md has the usual costs).",
        c.RATIO,
        [
            c.query(
                _rule_group(
                    f"topk(10, max by (rule_group) ({group_duration} / {group_interval}))"
                ),
                "{{group}}",
            )
        ],
        width=12,
        min_val=0,
    )


def rule_problems() -> timeseries.Panel:
    return c.timeseries_panel(
        "Rule evaluation failures and missed iterations",
        "Per Prometheus, per second: rule evaluations that failed (a query error, a "
        "recording rule producing duplicate series) and group iterations skipped because the "
        "previous one still ran. Both should be 0; Rule groups says which group.",
        c.OPS,
        [
            c.query(
                "sum by (instance) "
                f"(rate(prometheus_rule_evaluation_failures_total{{{INSTANCE}}}{RATE}))",
                "failures {{instance}}",
            ),
            c.query(
                "sum by (instance) "
                f"(rate(prometheus_rule_group_iterations_missed_total{{{INSTANCE}}}{RATE}))",
                "missed {{instance}}",
                "B",
            ),
        ],
        width=12,
    )


def rule_groups() -> table.Panel:
    return c.table_panel(
        "Rule groups",
        "Every rule group now: last evaluation time, interval, and failures and missed "
        "iterations over the dashboard's time range. A duration near the interval, or any "
        "failure or missed iteration, is what to fix first.",
        c.COUNT,
        [
            c.table_query(_rule_group(
                f"max by (rule_group) (prometheus_rule_group_last_duration_seconds{{{INSTANCE}}})"
            )),
            c.table_query(_rule_group(
                f"max by (rule_group) (prometheus_rule_group_interval_seconds{{{INSTANCE}}})"
            ), "B"),
            c.table_query(_rule_group(
                "sum by (rule_group) (increase(prometheus_rule_evaluation_failures_total"
                f"{{{INSTANCE}}}[$__range]))"
            ), "C"),
            c.table_query(_rule_group(
                "sum by (rule_group) (increase(prometheus_rule_group_iterations_missed_total"
                f"{{{INSTANCE}}}[$__range]))"
            ), "D"),
        ],
        columns={
            "Value #A": ("Last duration", c.SECONDS),
            "Value #B": ("Interval", c.SECONDS),
            "Value #C": ("Failures", c.COUNT),
            "Value #D": ("Missed iterations", c.COUNT),
        },
        keep=("group",),
    )


def head_series() -> timeseries.Panel:
    return c.timeseries_panel(
        "TSDB head series",
        "Series in each Prometheus' in-memory head block. Memory grows with it; a steep climb "
        "is a cardinality explosion (compare Samples per scrape and Label overflow).",
        c.COUNT,
        [c.query(f"prometheus_tsdb_head_series{{{INSTANCE}}}", "{{instance}}")],
        width=8,
    )


def series_churn() -> timeseries.Panel:
    return c.timeseries_panel(
        "Series churn",
        "Head series created and removed per second. Creation far above removal for long: "
        "series keep appearing (a label with changing values), and head series and memory "
        "keep growing.",
        c.OPS,
        [
            c.query(f"rate(prometheus_tsdb_head_series_created_total{{{INSTANCE}}}{RATE})",
                    "created {{instance}}"),
            c.query(f"rate(prometheus_tsdb_head_series_removed_total{{{INSTANCE}}}{RATE})",
                    "removed {{instance}}", "B"),
        ],
        width=8,
    )


def notification_queue() -> timeseries.Panel:
    return c.timeseries_panel(
        "Alert queue fill",
        "How full each Prometheus' queue of alerts waiting to be sent to Alertmanager is. "
        "Near 100%: Alertmanager is slow or unreachable, and alerts are about to be dropped.",
        c.RATIO,
        [
            c.query(
                f"prometheus_notifications_queue_length{{{INSTANCE}}}"
                f" / prometheus_notifications_queue_capacity{{{INSTANCE}}}",
                "{{instance}}",
            )
        ],
        width=8,
        min_val=0,
        max_val=1,
    )


def notifications_to_alertmanager() -> timeseries.Panel:
    return c.timeseries_panel(
        "Alerts sent to Alertmanager",
        "Alerts Prometheus sent to each Alertmanager per second, the sends that failed, and "
        "alerts dropped (queue full or no Alertmanager). Errors or drops above 0: firing "
        "alerts may never be notified.",
        c.OPS,
        [
            c.query(
                "sum by (alertmanager) "
                f"(rate(prometheus_notifications_sent_total{{{INSTANCE}}}{RATE}))",
                "sent {{alertmanager}}",
            ),
            c.query(
                "sum by (alertmanager) "
                f"(rate(prometheus_notifications_errors_total{{{INSTANCE}}}{RATE}))",
                "errors {{alertmanager}}",
                "B",
            ),
            c.query(
                f"sum(rate(prometheus_notifications_dropped_total{{{INSTANCE}}}{RATE}))",
                "dropped",
                "C",
            ),
        ],
        width=24,
    )


# --- Alertmanager --------------------------------------------------------------------------


def am_alerts() -> timeseries.Panel:
    return c.timeseries_panel(
        "Alerts in Alertmanager",
        "Alerts Alertmanager holds, by state: active (routed to receivers), suppressed "
        "(silenced or inhibited), unprocessed. Active while notifications stay at 0: see the "
        "failed notifications.",
        c.COUNT,
        [c.query(f"sum by (state) (alertmanager_alerts{{{INSTANCE}}})", "{{state}}")],
        width=8,
    )


def am_alerts_received() -> timeseries.Panel:
    return c.timeseries_panel(
        "Alerts received",
        "Alerts Alertmanager receives per second, firing and resolved, and invalid ones it "
        "refused. 0 while Prometheus has firing alerts (AicrmWatchdog always fires): "
        "Prometheus cannot reach it.",
        c.OPS,
        [
            c.query(
                f"sum by (status) (rate(alertmanager_alerts_received_total{{{INSTANCE}}}{RATE}))",
                "{{status}}",
            ),
            c.query(f"sum(rate(alertmanager_alerts_invalid_total{{{INSTANCE}}}{RATE}))",
                    "invalid", "B"),
        ],
        width=8,
    )


def am_silences() -> timeseries.Panel:
    return c.timeseries_panel(
        "Silences",
        "Active and pending (future) silences. An active silence hides matching alerts from "
        "everyone: check a forgotten one before trusting a quiet night.",
        c.COUNT,
        [c.query(f'sum by (state) (alertmanager_silences{{{INSTANCE}, state=~"active|pending"}})',
                 "{{state}}")],
        width=8,
    )


def am_notifications() -> timeseries.Panel:
    return c.timeseries_panel(
        "Notifications sent",
        "Notifications Alertmanager delivered per second, by integration (webhook, Slack, "
        "e-mail, ...), stacked. The webhook carries the AicrmWatchdog heartbeat every minute: "
        "0 for longer means the dead man's switch is about to alarm.",
        c.OPS,
        [
            c.query(
                "sum by (integration) "
                f"(rate(alertmanager_notifications_total{{{INSTANCE}}}{RATE}))",
                "{{integration}}",
            )
        ],
        stack=True,
    )


def am_failed() -> timeseries.Panel:
    return c.timeseries_panel(
        "Notifications failed",
        "Notifications Alertmanager gave up delivering after retrying, per second, by "
        "integration. Above 0: alerts routed there reach no one (a wrong Slack URL or SMTP "
        "password, a receiver down); AicrmAlertmanagerNotificationsFailing fires.",
        c.OPS,
        [
            c.query(
                "sum by (integration) "
                f"(rate(alertmanager_notifications_failed_total{{{INSTANCE}}}{RATE}))",
                "{{integration}}",
            )
        ],
    )


# --- VictoriaMetrics and vmalert (the scale profile) --------------------------------------
# In docker-compose.yml's scale profile vmalert evaluates the rules against VictoriaMetrics and
# Prometheus only scrapes and remote-writes; without the profile these panels have no data.
VMALERT = f'job="vmalert", {INSTANCE}'
VM = f'job="victoriametrics", {INSTANCE}'


def vmalert_group_load() -> timeseries.Panel:
    mean = (f"rate(vmalert_iteration_duration_seconds_sum{{{VMALERT}}}{RATE}) / "
            f"rate(vmalert_iteration_duration_seconds_count{{{VMALERT}}}{RATE})")
    return c.timeseries_panel(
        "vmalert rule group duration / interval",
        "The ten rule groups whose evaluations take the largest share of their interval "
        "(mean over the rate window). Near 100%: the group cannot keep up, iterations are "
        "missed and recorded series and alerts lag (AicrmRuleEvaluationsMissed).",
        c.RATIO,
        [c.query(
            f"topk(10, max by (group) (({mean}) / on (job, instance, group, file) "
            f"vmalert_iteration_interval_seconds{{{VMALERT}}}))",
            "{{group}}",
        )],
        width=8,
        min_val=0,
    )


def vmalert_problems() -> timeseries.Panel:
    return c.timeseries_panel(
        "vmalert failing rules and missed iterations",
        "Rules whose last evaluation failed, by group (AicrmRuleEvaluationFailing pages after "
        "15m), and iterations skipped per second because the previous one still ran. Both "
        "should be 0; vmalert's /vmalert/groups page shows the error.",
        c.COUNT,
        [
            c.query(
                "sum by (group) ({__name__=~\"vmalert_recording_rules_error|"
                f"vmalert_alerting_rules_error\", {VMALERT}}})",
                "failing {{group}}",
            ),
            c.query(
                f"sum by (group) (rate(vmalert_iteration_missed_total{{{VMALERT}}}{RATE}))",
                "missed/s {{group}}",
                "B",
            ),
        ],
        width=8,
    )


def vmalert_outputs() -> timeseries.Panel:
    return c.timeseries_panel(
        "vmalert writes and notifications",
        "Recorded samples vmalert writes back to VictoriaMetrics per second, and what fails: "
        "remote-write errors and dropped rows (recorded series get gaps), alert notifications "
        "that could not be sent to Alertmanager.",
        c.OPS,
        [
            c.query(f"sum by (instance) (rate(vmalert_remotewrite_sent_rows_total{{{VMALERT}}}"
                    f"{RATE}))", "rows written {{instance}}"),
            c.query(f"sum by (instance) (rate(vmalert_remotewrite_errors_total{{{VMALERT}}}"
                    f"{RATE}))", "write errors {{instance}}", "B"),
            c.query(f"sum by (instance) (rate(vmalert_remotewrite_dropped_rows_total"
                    f"{{{VMALERT}}}{RATE}))", "rows dropped {{instance}}", "C"),
            c.query(f"sum by (instance) (rate(vmalert_alerts_send_errors_total{{{VMALERT}}}"
                    f"{RATE}))", "notification errors {{instance}}", "D"),
        ],
        width=8,
    )


def vm_ingestion() -> timeseries.Panel:
    return c.timeseries_panel(
        "VictoriaMetrics ingestion",
        "Samples stored per second (Prometheus' remote write and vmalert's recorded series) "
        "and new series created per second: a jump in new series is cardinality growth.",
        c.OPS,
        [
            c.query(f"sum by (instance) (rate(vm_rows_inserted_total{{{VM}}}{RATE}))",
                    "samples {{instance}}"),
            c.query(f"sum by (instance) (rate(vm_new_timeseries_created_total{{{VM}}}{RATE}))",
                    "new series {{instance}}", "B"),
        ],
        width=8,
    )


def vm_storage() -> timeseries.Panel:
    return c.timeseries_panel(
        "VictoriaMetrics storage",
        "Data on disk and free space on its volume, with the limit below which "
        "VictoriaMetrics turns read-only (-storage.minFreeDiskSpaceBytes) and stores no sample "
        "(AicrmStoreReadOnly; AicrmStoreDiskFillingUp when the space left lasts under 3 days of "
        "ingestion).",
        c.BYTES,
        [
            c.query(f"sum by (instance) (vm_data_size_bytes{{{VM}}})", "data {{instance}}"),
            c.query(f"min by (instance) (vm_free_disk_space_bytes{{{VM}}})",
                    "free {{instance}}", "B"),
            c.query(f"max by (instance) (vm_free_disk_space_limit_bytes{{{VM}}})",
                    "read-only below {{instance}}", "C"),
        ],
        width=8,
    )


def vm_queries() -> timeseries.Panel:
    return c.timeseries_panel(
        "VictoriaMetrics queries",
        "Queries per second (the API, Grafana and vmalert ask these), slow ones (over "
        "-search.logSlowQueryDuration) and failed requests of any path.",
        c.OPS,
        [
            c.query(f"sum by (instance) (rate(vm_http_requests_total{{{VM}, "
                    f"path=~\"/api/v1/query|/api/v1/query_range\"}}{RATE}))",
                    "queries {{instance}}"),
            c.query(f"sum by (instance) (rate(vm_slow_queries_total{{{VM}}}{RATE}))",
                    "slow {{instance}}", "B"),
            c.query(f"sum by (instance) (rate(vm_http_request_errors_total{{{VM}}}{RATE}))",
                    "errors {{instance}}", "C"),
        ],
        width=8,
    )


# --- Processes -----------------------------------------------------------------------------

PROCESSES = (
    "the exporter, the REST API (its gunicorn master and workers as one: CPU and memory summed, "
    "descriptors of the process nearest its limit), Prometheus and Alertmanager, and in the "
    "scale profile VictoriaMetrics and vmalert"
)


def cpu() -> timeseries.Panel:
    return c.timeseries_panel(
        "CPU",
        f"CPU cores each process uses: {PROCESSES}. Pinned at its limit: rule evaluation or "
        "queries are starved.",
        c.FACTOR,
        [c.query(f"rate(process_cpu_seconds_total{{{INSTANCE}}}{RATE})", "{{job}} {{instance}}")],
        width=8,
    )


def memory() -> timeseries.Panel:
    return c.timeseries_panel(
        "Resident memory",
        f"Resident memory of each process: {PROCESSES}. Climbing with head series: "
        "cardinality; near the container's limit: an out-of-memory kill is next.",
        c.BYTES,
        [c.query(f"process_resident_memory_bytes{{{INSTANCE}}}", "{{job}} {{instance}}")],
        width=8,
    )


def open_fds() -> timeseries.Panel:
    return c.timeseries_panel(
        "Open file descriptors",
        f"Open file descriptors as a share of the limit: {PROCESSES}. Near 100%: new "
        "connections and files fail (scrapes, TSDB blocks).",
        c.RATIO,
        [
            c.query(
                f"process_open_fds{{{INSTANCE}}} / process_max_fds{{{INSTANCE}}}",
                "{{job}} {{instance}}",
            )
        ],
        width=8,
        min_val=0,
        max_val=1,
    )


def build() -> model.Dashboard:
    builder = c.new_dashboard(
        "stack",
        "AI-CRM / Stack health",
        "Is the monitoring stack itself working: scrape targets, the exporter's sources and "
        "push endpoint, the REST API, Prometheus' rules, storage and alert delivery, "
        "Alertmanager's notifications, and their processes.",
        time_from="now-3h",
        refresh="30s",
        variables=[c.label_variable("instance", "Instance", "up")],
        alerts=c.firing_alerts(STACK_ALERTS),
    )
    builder = c.add_row(
        builder,
        "At a glance",
        [jobs_up(), firing_stack_alerts(), alertmanagers_discovered(), config_reloads(),
         rule_failures_now()],
    )
    builder = c.add_row(builder, "Targets", [targets_up(), scrape_duration(), samples_scraped()])
    builder = c.add_row(
        builder,
        "Exporter",
        [source_up(), events_accepted(), rejected_ratio(), rejected_by_reason(), source_lag(),
         last_event_age(), label_overflow(), push_requests(), push_errors(),
         state_write_failures()],
    )
    builder = c.add_row(
        builder,
        "REST API",
        [api_requests(), api_status_classes(), api_error_ratio(), api_latency(),
         api_latency_by_endpoint(), api_cache_hits(), api_refused()],
    )
    builder = c.add_row(
        builder,
        "Prometheus",
        [rule_group_load(), rule_problems(), rule_groups(), head_series(), series_churn(),
         notification_queue(), notifications_to_alertmanager()],
    )
    builder = c.add_row(
        builder,
        "Alertmanager",
        [am_alerts(), am_alerts_received(), am_silences(), am_notifications(), am_failed()],
    )
    builder = c.add_row(
        builder,
        "VictoriaMetrics and vmalert (scale profile)",
        [vmalert_group_load(), vmalert_problems(), vmalert_outputs(), vm_ingestion(),
         vm_storage(), vm_queries()],
    )
    builder = c.add_row(builder, "Processes", [cpu(), memory(), open_fds()])
    return c.finish(builder)
