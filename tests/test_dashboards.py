"""Grafana dashboards: generated JSON is current, queries name real series, parse, follow the
dashboard linter's rules, and return data from a real Prometheus fed by the simulator.

There is no Grafana here, so Grafana's template variables are substituted the way Grafana
would before a query reaches Prometheus (see `substitute`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter import catalog
from grafana import common, generate
from tests import servers
from tests.test_e2e_alerts import alertmanager_config

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
RULES_DIR = ROOT / "recording_rules"
RECORDING_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
ALERT_FILES = sorted((RULES_DIR / "alerts").glob("*.alerts.yml"))
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"

# Grafana unit ids the dashboard linter accepts (the subset these dashboards may use).
VALID_UNITS = {
    "none", "short", "percent", "percentunit", "s", "ms", "m", "h", "d", "dtdurations",
    "currencyUSD", "ops", "reqps", "rps", "cps", "bytes", "bool",
}
PROMQL_WORDS = {
    "and", "or", "unless", "offset", "bool", "inf", "nan", "by", "without", "on", "ignoring",
    "group_left", "group_right", "atan2",
}


# --- Reading the dashboards ---------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


DASHBOARDS = {p.stem: _load(p) for p in DASHBOARD_FILES}


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row (rows of these dashboards are open: panels are flat)."""
    for panel in dash.get("panels", []):
        if panel["type"] != "row":
            yield panel
        yield from (p for p in panel.get("panels", []) if p["type"] != "row")


def variable_names(dash: dict[str, Any]) -> set[str]:
    return {v["name"] for v in dash["templating"]["list"]}


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and variable of a dashboard."""
    for panel in panels(dash):
        for target in panel.get("targets", []):
            yield f"{dash['uid']} / {panel['title']} / {target['refId']}", target["expr"]
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            yield f"{dash['uid']} / annotation {ann['name']}", ann["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            match = LABEL_VALUES.fullmatch(var["query"])
            assert match, f"{dash['uid']} variable {var['name']}: {var['query']!r}"
            yield f"{dash['uid']} / variable {var['name']}", match.group(1)


LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)")
"""A `label_values(<selector>, <label>)` variable query."""


def variable(dash: dict[str, Any], name: str) -> dict[str, Any]:
    (var,) = (v for v in dash["templating"]["list"] if v["name"] == name)
    return var


def dashboard_targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of a dashboard."""
    return [
        (f"{dash['uid']} / {p['title']} / {t['refId']}", t["expr"])
        for p in panels(dash)
        for t in p.get("targets", [])
    ]


def all_queries() -> list[tuple[str, str, set[str]]]:
    return [(w, q, variable_names(d)) for d in DASHBOARDS.values() for w, q in queries(d)]


GRAFANA_GLOBALS_FOR_PARSING = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range_s": "3600",
    "__range": "1h",
}


def substitute(
    expr: str, variables: set[str] | Mapping[str, str], globals_: dict[str, str]
) -> str:
    """Expand Grafana variables as Grafana does: globals to durations, dashboard variables
    to the text Grafana writes for them (`grafana_variables`), or given only their names, to
    `.*`, which parses wherever a multi-value variable appears (only in =~ matchers)."""
    values = variables if isinstance(variables, Mapping) else dict.fromkeys(variables, ".*")

    def expand(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in globals_:
            return globals_[name]
        if name in values:
            return values[name]
        return match.group(0)  # e.g. label_replace's "$1"

    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", expand, expr)


# --- Series that exist ------------------------------------------------------------------------


def recorded_series() -> set[str]:
    names: set[str] = set()
    for path in RECORDING_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return names


# Series of the monitoring components themselves that the Stack health view reads: Prometheus'
# per-target scrape series and its own metrics, Alertmanager's, and the process metrics both
# serve. Not ours to catalogue; test_every_panel_returns_data checks that the real binaries,
# scraped as prometheus.yml scrapes them, serve every one of these names.
UPSTREAM_SERIES = {
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "prometheus_config_last_reload_successful",
    "prometheus_http_request_duration_seconds_bucket",
    "prometheus_notifications_alertmanagers_discovered",
    "prometheus_notifications_dropped_total",
    "prometheus_notifications_errors_total",
    "prometheus_notifications_queue_capacity",
    "prometheus_notifications_queue_length",
    "prometheus_notifications_sent_total",
    "prometheus_rule_evaluation_failures_total",
    "prometheus_rule_group_interval_seconds",
    "prometheus_rule_group_iterations_missed_total",
    "prometheus_rule_group_last_duration_seconds",
    "prometheus_tsdb_head_series",
    "prometheus_tsdb_head_series_created_total",
    "prometheus_tsdb_head_series_removed_total",
    "alertmanager_alerts",
    "alertmanager_alerts_invalid_total",
    "alertmanager_alerts_received_total",
    "alertmanager_config_last_reload_successful",
    "alertmanager_notifications_failed_total",
    "alertmanager_notifications_total",
    "alertmanager_silences",
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "vmalert_alerting_rules_error",
    "vmalert_alerts_send_errors_total",
    "vmalert_config_last_reload_successful",
    "vmalert_iteration_duration_seconds_count",
    "vmalert_iteration_duration_seconds_sum",
    "vmalert_iteration_interval_seconds",
    "vmalert_iteration_missed_total",
    "vmalert_recording_rules_error",
    "vmalert_remotewrite_dropped_rows_total",
    "vmalert_remotewrite_errors_total",
    "vmalert_remotewrite_sent_rows_total",
    "vm_data_size_bytes",
    "vm_free_disk_space_bytes",
    "vm_free_disk_space_limit_bytes",
    "vm_http_request_errors_total",
    "vm_http_requests_total",
    "vm_new_timeseries_created_total",
    "vm_rows_inserted_total",
    "vm_slow_queries_total",
}


def known_series() -> set[str]:
    names = {"ALERTS", "ALERTS_FOR_STATE", "up"} | recorded_series() | UPSTREAM_SERIES
    for spec in (*catalog.ALL, *catalog.API):
        names.add(spec.name)
        if spec.kind is catalog.Kind.HISTOGRAM:
            names.update(f"{spec.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: strings, matchers, ranges, grouping label
    lists, functions and keywords removed; plus those a `__name__` matcher lists."""
    names = {
        name
        for value in re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr)
        for name in value.split("|")
        if re.fullmatch(r"[A-Za-z_:][\w:]*", name)
    }
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_name_parser() -> None:
    expr = (
        'sum by (agent) (rate(aicrm_agent_retries_total{agent=~"$agent"}[5m] offset 1h)) '
        '/ on (agent) group_left (team) label_replace(up, "a", "$1", "b", "(.*)") '
        "and bool max(aicrm_threshold{name=\"x\"}) * 1e3 or vector(0)"
    )
    assert metric_names(expr) == {"aicrm_agent_retries_total", "up", "aicrm_threshold"}
    assert metric_names('{__name__=~"a:b:rate1h|aicrm_agent_info", team=~".*"}') == {
        "a:b:rate1h", "aicrm_agent_info"}


# --- Generation -------------------------------------------------------------------------------


def test_committed_json_matches_the_code() -> None:
    assert generate.stale() == [], "run: python -m grafana.generate"


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    generate.write(tmp_path)
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 0
    (tmp_path / "overview.json").write_text("{}\n", encoding="utf-8")
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 1


def test_every_view_is_generated_with_its_fixed_uid() -> None:
    assert {d["uid"] for d in DASHBOARDS.values()} == set(common.UIDS.values())
    assert set(DASHBOARDS) == set(common.UIDS)


# --- Dashboard shape and the linter's rules ------------------------------------------------


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_has_uid_title_tags_links_annotations(name: str) -> None:
    dash = DASHBOARDS[name]
    assert dash["uid"] == common.UIDS[name]
    assert dash["title"].startswith("AI-CRM / ")
    assert common.TAG in dash["tags"]
    assert dash["editable"] is False, "provisioned from code: edits would be overwritten"
    assert any(
        link["type"] == "dashboards" and link["tags"] == [common.TAG] and link["keepTime"]
        and link["includeVars"]
        for link in dash["links"]
    ), "must link to the other views"
    alerts = [a for a in dash["annotations"]["list"] if "ALERTS{" in a.get("expr", "")]
    assert alerts and all('alertstate="firing"' in a["expr"] for a in alerts)
    assert dash["time"]["from"].startswith("now-") and dash["refresh"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_template_rules(name: str) -> None:
    """template-datasource-rule, template-label-promql-rule (shape; validity is checked
    against Prometheus below), template-on-time-change-reload-rule."""
    variables = DASHBOARDS[name]["templating"]["list"]
    datasources = [v for v in variables if v["type"] == "datasource"]
    assert len(datasources) == 1
    ds = datasources[0]
    assert (ds["name"], ds["label"], ds["query"]) == ("datasource", "Data source", "prometheus")
    assert ds["current"]["value"] == common.DATASOURCE_UID
    for var in variables:
        if var["type"] != "query":
            continue
        assert re.fullmatch(r"label_values\(.+,\s*\w+\)", var["query"]), var["name"]
        assert var["refresh"] == 2, f"{var['name']} must refresh on time range change"
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["includeAll"] and var["multi"]
        if re.search(r"\$\w", var["query"]):
            # Chained: at All, Grafana writes the values the query listed, so the panels
            # follow the variables it depends on (an allValue would match everyone).
            assert "allValue" not in var, var["name"]
        else:
            assert var["allValue"] == ".*", var["name"]


AGENT_DASHBOARDS = sorted(n for n, d in DASHBOARDS.items() if "agent" in variable_names(d))


@pytest.mark.parametrize("name", AGENT_DASHBOARDS)
def test_agent_variable_is_narrowed_by_team(name: str) -> None:
    """A `team` variable over config.json's owning teams comes before `agent`, whose query
    reads it; what it returns is checked against a real Prometheus in
    test_every_panel_returns_data."""
    dash = DASHBOARDS[name]
    order = [v["name"] for v in dash["templating"]["list"]]
    assert "team" in order and order.index("team") < order.index("agent"), order
    team = variable(dash, "team")
    assert team["query"] == "label_values(aicrm_agent_info, team)"
    assert (team["label"], team["multi"], team["includeAll"], team["allValue"], team["sort"]) == (
        "Team", True, True, ".*", 1)
    assert team["current"]["value"] == "$__all"
    agent = variable(dash, "agent")
    assert 'team=~"$team"' in agent["query"]
    assert "allValue" not in agent, "agent=All must mean the listed (the teams') agents"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panel_rules(name: str) -> None:
    """panel-datasource-rule, panel-title-description-rule, panel-units-rule,
    panel-no-targets-rule; plus: no threshold value typed into a panel."""
    problems = []
    for panel in panels(DASHBOARDS[name]):
        title = panel.get("title", "?")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{title}: datasource is not ${{datasource}}")
        if not panel.get("title") or not panel.get("description"):
            problems.append(f"{title}: missing title or description")
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        if defaults.get("unit") not in VALID_UNITS:
            problems.append(f"{title}: unit {defaults.get('unit')!r}")
        for override in panel.get("fieldConfig", {}).get("overrides", []):
            for prop in override["properties"]:
                if prop["id"] == "unit" and prop["value"] not in VALID_UNITS:
                    problems.append(f"{title}: override unit {prop['value']!r}")
        if not panel.get("targets"):
            problems.append(f"{title}: no targets")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{title}/{target['refId']}: target datasource")
        steps = defaults.get("thresholds", {}).get("steps", [])
        if any(step.get("value") is not None for step in steps):
            problems.append(f"{title}: typed threshold {steps}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_target_rules(name: str) -> None:
    """target-rate-interval-rule and target-counter-agg-rule."""
    problems = []
    for where, expr in queries(DASHBOARDS[name]):
        for fn, rng in re.findall(r"\b(i?rate|increase)\s*\([^\[()]*\[([^\]]*)\]", expr):
            allowed = {"$__rate_interval"} | ({"$__range"} if fn == "increase" else set())
            if rng not in allowed:
                problems.append(f"{where}: {fn}(...[{rng}]) should use $__rate_interval")
        for counter in {n for n in metric_names(expr) if n.endswith("_total")}:
            pattern = rf"\b(?:i?rate|increase)\s*\(\s*{counter}\s*(?:\{{[^}}]*\}})?\s*\["
            if not re.search(pattern, expr):
                problems.append(f"{where}: counter {counter} not under rate/increase")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_threshold_queries_read_config_series(name: str) -> None:
    """Thresholds are drawn from aicrm_threshold / aicrm_objective, never typed; another
    series only as an `and on (...)` filter (lines for the platforms with traffic)."""
    config = {"aicrm_threshold", "aicrm_objective"}
    for panel in panels(DASHBOARDS[name]):
        for target in panel.get("targets", []):
            if target["refId"] == common.THRESHOLD_REF:
                head, _, tail = target["expr"].partition(" and on (")
                assert metric_names(head) and metric_names(head) <= config, panel["title"]
                assert not tail or not metric_names(tail) & config, panel["title"]


def test_every_query_names_only_existing_series() -> None:
    known = known_series()
    unknown = []
    for where, expr, variables in all_queries():
        names = metric_names(substitute(expr, variables, GRAFANA_GLOBALS_FOR_PARSING))
        if names - known:
            unknown.append(f"{where}: {sorted(names - known)}")
    assert not unknown, "\n".join(unknown)


def test_alert_links_point_at_dashboards_and_their_variables() -> None:
    variables = {d["uid"]: variable_names(d) for d in DASHBOARDS.values()}
    problems = []
    for path in ALERT_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                url = rule.get("annotations", {}).get("dashboard_url", "")
                match = re.search(r"/d/([\w-]+)(?:\?(.*))?$", url)
                if not match:
                    problems.append(f"{rule['alert']}: {url!r}")
                    continue
                uid, params = match.group(1), match.group(2) or ""
                if uid not in variables:
                    problems.append(f"{rule['alert']}: no dashboard {uid}")
                    continue
                for var in re.findall(r"var-(\w+)=", params):
                    if var not in variables[uid]:
                        problems.append(f"{rule['alert']}: {uid} has no variable {var}")
    assert not problems, "\n".join(problems)


def test_open_recommendations_select_every_recommendation_rule() -> None:
    """A new recommendation rule shows on the executive view without a dashboard change: the
    table selects by severity, never by rule name, and hides no label but the alert's own."""
    (panel,) = (p for p in panels(DASHBOARDS["executive"]) if p["title"] == "Open recommendations")
    (expr,) = (t["expr"] for t in panel["targets"])
    # With teams picked, only recommendations about their agents (which carry `team`).
    assert re.fullmatch(
        r'ALERTS\{alertstate="firing", severity="recommendation", team=~"\$team"\}', expr
    )
    assert not any(t["id"] == "filterFieldsByName" for t in panel["transformations"])
    (organize,) = (t["options"] for t in panel["transformations"] if t["id"] == "organize")
    assert set(organize["excludeByName"]) == {"Time", "Value", "__name__", "alertstate",
                                              "severity"}


# --- Real Prometheus -------------------------------------------------------------------------


def _query(server: servers.PrometheusServer, expr: str) -> requests.Response:
    return requests.get(f"{server.url}/api/v1/query", params={"query": expr}, timeout=10)


def _label_values(server: servers.PrometheusServer, query: str) -> requests.Response:
    """A `label_values(<selector>, <label>)` variable query as Grafana sends it: the selector
    as `match[]` of the label values API, which takes a series selector, not an expression."""
    match = LABEL_VALUES.fullmatch(query)
    assert match, query
    return requests.get(f"{server.url}/api/v1/label/{match.group(2)}/values",
                        params={"match[]": match.group(1)}, timeout=10)


def label_values(server: servers.PrometheusServer, query: str) -> set[str]:
    """The values a variable query (its variables already substituted) offers."""
    response = _label_values(server, query)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{query}: {body}"
    return set(body["data"])


def grafana_regex(values: Sequence[str]) -> str:
    """Values of a multi-value variable as Grafana writes them into a Prometheus query
    (interpolateQueryExpr): each regex-escaped inside a PromQL string, several as (a|b)."""
    escaped = [
        re.sub(r"[$^*{}\[\]+?.()|]", lambda m: "\\\\" + m.group(0), v.replace("\\", "\\" * 4))
        for v in values
    ]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def grafana_variables(
    server: servers.PrometheusServer,
    dash: dict[str, Any],
    picked: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """What Grafana writes for each query variable of a dashboard, resolved in order (a
    chained variable's query sees the ones before it): the picked values, else "All": the
    allValue if there is one, else every value the variable's query now returns."""
    picked = picked or {}
    written: dict[str, str] = {}
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        if var["name"] in picked:
            written[var["name"]] = grafana_regex(picked[var["name"]])
        elif "allValue" in var:
            written[var["name"]] = var["allValue"]
        else:
            query = substitute(var["query"], written, GRAFANA_GLOBALS_FOR_DATA)
            written[var["name"]] = grafana_regex(sorted(label_values(server, query)))
    return written


@pytest.mark.integration
def test_every_query_is_valid_promql(
    prometheus_factory: Callable[..., servers.PrometheusServer],
) -> None:
    """target-promql-rule: Prometheus answers 400 bad_data to a query it cannot parse; and
    template-label-promql-rule: a variable's selector is one the label values API takes."""
    prom = prometheus_factory({"global": {"scrape_interval": "15s"}})
    invalid = []
    for where, expr, variables in all_queries():
        promql = substitute(expr, variables, GRAFANA_GLOBALS_FOR_PARSING)
        response = _query(prom, promql)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            invalid.append(f"{where}: {body.get('error')}\n    {promql}")
    for dash in DASHBOARDS.values():
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = substitute(var["query"], variable_names(dash), GRAFANA_GLOBALS_FOR_PARSING)
            response = _label_values(prom, query)
            if response.status_code != 200 or response.json().get("status") != "success":
                invalid.append(f"{dash['uid']} / variable {var['name']}: "
                               f"{response.json().get('error')}\n    {query}")
    assert not invalid, "\n".join(invalid)


# The data test compresses time: rule groups evaluate every second and alerts need to hold
# for seconds, so the 5m/1h/1w windows and the hour-long `for` of recommendations fill up
# within a minute. `$__range` is 15s so "the previous period" (offset $__range) exists.
GRAFANA_GLOBALS_FOR_DATA = {
    "__rate_interval": "4s",
    "__interval": "1s",
    "__range_s": "15",
    "__range": "15s",
}
SIMULATION_SECONDS = 150
DATA_DEADLINE_SECONDS = 100


def _fast_rule_copies(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in [*RECORDING_FILES, *ALERT_FILES]:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in data["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "3s"
        copy = dest / path.name
        copy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        copies.append(copy)
    return copies


PUSH_TOKEN = "stack-push-token"
API_KEY, BURST_KEY = "stack-api-key", "stack-burst-key"
API_RATE_LIMIT = 60
"""Requests a minute per key (and per gunicorn worker: without Redis each counts its own)."""


def _stack_config(tmp: Path, port: int, prometheus_url: str) -> Path:
    """config.json for the exporter and the API: sources in tmp, push on, the API querying
    the test's Prometheus with a short cache and a rate limit a burst can exceed."""
    cfg = json.loads((ROOT / "config.json").read_text(encoding="utf-8"))
    cfg["sources"] = {
        "event_logs": [{"name": "agent-logs", "path": str(tmp / "events" / "*.jsonl")}],
        "task_db": {"url": f"sqlite:///{tmp / 'tasks.db'}", "table": "tasks",
                    "poll_seconds": 1},
        "push": {"enabled": True, "token_env": "AICRM_INGEST_TOKEN"},
    }
    cfg["exporter"] = {"listen": f"127.0.0.1:{port}", "state_dir": str(tmp / "state")}
    cfg["api"] = {**cfg["api"], "prometheus_url": prometheus_url, "cache_ttl_seconds": 2,
                  "api_keys_env": "AICRM_API_KEYS", "rate_limit": f"{API_RATE_LIMIT}/minute"}
    # With --speedup the cost-spike agent spends about $0.25 per successful task, the others
    # a few cents at most: a limit between them makes the cheaper-model recommendation fire.
    cfg["thresholds"]["cost_per_successful_task_max_usd"] = 0.1
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def shipped_scrape_jobs() -> set[str]:
    """The job names of prometheus/prometheus.yml and of the scale profile's
    prometheus.scale.yml: rules, alerts and dashboards select on them."""
    return {job["job_name"]
            for path in (PROMETHEUS_CONFIG, PROMETHEUS_CONFIG.with_name("prometheus.scale.yml"))
            for job in yaml.safe_load(path.read_text(encoding="utf-8"))["scrape_configs"]}


class Clients:
    """The stack's clients, in a thread until stop(): an agent pushing events to the exporter
    and one with a revoked token; a dashboard polling the API with its key, a caller without
    one, and once a burst over the rate limit. Nothing is faked: these are HTTP requests to
    the real exporter and the real API under gunicorn."""

    PERIOD = 1.0
    LINE = b'{"event": "interaction", "channel": "web", "type": "message", "user": "stack"}\n'

    def __init__(self, push_url: str, api_url: str) -> None:
        self.push_url = push_url
        self.api_url = api_url
        self.codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _send(self, session: requests.Session, what: str, method: str, url: str,
             **kwargs: Any) -> None:
        try:
            with session.request(method, url, timeout=10, **kwargs) as response:
                key = f"{what} {response.status_code}"
        except requests.RequestException as exc:
            key = f"{what} {type(exc).__name__}"
        self.codes[key] = self.codes.get(key, 0) + 1

    def _run(self) -> None:
        tasks = f"{self.api_url}/task-completion?window=1h"
        with requests.Session() as s:
            # Over the limit even if every worker counts its own window.
            for _ in range(3 * API_RATE_LIMIT):
                self._send(s, "burst", "GET", tasks, headers={"X-API-Key": BURST_KEY})
            tick = 0
            while not self._stop.is_set():
                self._send(s, "push", "POST", self.push_url, data=self.LINE,
                          headers={"Authorization": f"Bearer {PUSH_TOKEN}"})
                self._send(s, "api", "GET", tasks, headers={"X-API-Key": API_KEY})
                if tick % 3 == 0:
                    self._send(s, "push revoked", "POST", self.push_url, data=self.LINE,
                              headers={"Authorization": "Bearer revoked"})
                    self._send(s, "api without key", "GET", f"{self.api_url}/export")
                tick += 1
                self._stop.wait(self.PERIOD)


def _start_api(tmp: Path, config: Path, port: int) -> servers.ProcessHandle:
    """The API as deployed (gunicorn with api/gunicorn.conf.py), with 2 workers."""
    metrics_dir = tmp / "api-metrics"
    metrics_dir.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AICRM_CONFIG": str(config),
        "AICRM_API_KEYS": f"{API_KEY},{BURST_KEY}",
        "AICRM_API_BIND": f"127.0.0.1:{port}",
        "AICRM_API_WORKERS": "2",
        "AICRM_API_ACCESS_LOG": "off",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    api = servers.ProcessHandle("api", tmp)
    api.start(
        [sys.executable, "-m", "gunicorn", "-c", ROOT / "api" / "gunicorn.conf.py",
         "api:create_app()"],
        cwd=ROOT, env=env, ready_check=servers.http_ok(f"http://127.0.0.1:{port}/healthz"),
        timeout=60,
    )
    return api


@pytest.mark.integration
def test_every_panel_returns_data(
    tmp_path: Path,
    prometheus_factory: Callable[..., servers.PrometheusServer],
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
    vm_factory: Callable[..., servers.VictoriaMetricsServer],
    vmalert_factory: Callable[..., servers.VmalertServer],
) -> None:
    """The whole stack, each part real: exporter + simulator (cost-spike incident, so the
    cheaper-model recommendation fires, and a little noise, so rejected events exist), the
    REST API under gunicorn, Alertmanager with the shipped routing, and Prometheus with the
    project's rules, scraping every job of prometheus/prometheus.yml and of the scale profile
    (itself, VictoriaMetrics it remote-writes to and vmalert evaluating the same rules
    included) and sending its alerts to that Alertmanager; Clients push events and call the
    API. Every panel query must return at least one series."""
    (tmp_path / "events").mkdir()
    port, api_port, prom_port = servers.free_port(), servers.free_port(), servers.free_port()
    cfg = _stack_config(tmp_path, port, f"http://127.0.0.1:{prom_port}")
    simulator = servers.ProcessHandle("simulator", tmp_path)
    exporter = servers.ProcessHandle("exporter", tmp_path)
    receiver = servers.WebhookReceiver()
    api: servers.ProcessHandle | None = None
    clients: Clients | None = None
    try:
        simulator.start(
            [sys.executable, "-m", "exporter.simulate", "--config", cfg, "--rate", "20",
             "--speedup", "30", "--duration", str(SIMULATION_SECONDS), "--seed", "1",
             "--noise", "0.02", "--incident", "cost-spike:email-writer",
             "--control", tmp_path / "incidents"],
            cwd=tmp_path,
        )
        exporter.start(
            [sys.executable, "-m", "exporter", "--config", cfg],
            cwd=tmp_path,
            env={**os.environ, "AICRM_INGEST_TOKEN": PUSH_TOKEN},
            ready_check=servers.http_ok(f"http://127.0.0.1:{port}/healthz"),
        )
        api = _start_api(tmp_path, cfg, api_port)
        am = alertmanager_factory(alertmanager_config(tmp_path, receiver.url))
        rules = _fast_rule_copies(tmp_path / "rules")
        vm = vm_factory()
        # vmalert only has to show its own health: one recording and one alerting file (the
        # stack's), not a second evaluation of every rule beside Prometheus' on two cores.
        vmalert = vmalert_factory([r for r in rules if r.name.startswith("system.")], vm.url,
                                  remote_write_url=vm.url, notifier_url=am.url)
        jobs = {
            "aicrm-exporter": f"127.0.0.1:{port}",
            "aicrm-api": f"127.0.0.1:{api_port}",
            "prometheus": f"127.0.0.1:{prom_port}",
            "alertmanager": f"127.0.0.1:{am.port}",
            "victoriametrics": f"127.0.0.1:{vm.port}",
            "vmalert": f"127.0.0.1:{vmalert.port}",
        }
        assert set(jobs) == shipped_scrape_jobs(), "scrape every job the shipped configs scrape"
        prom = prometheus_factory(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "alerting": {"alertmanagers": [
                    {"static_configs": [{"targets": [jobs["alertmanager"]]}]}]},
                "remote_write": [{"url": f"{vm.url}/api/v1/write"}],
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [target]}]}
                    for job, target in jobs.items()
                ],
            },
            rule_files=rules,
            port=prom_port,
        )
        prom.wait_for_targets_up()
        clients = Clients(f"http://127.0.0.1:{port}/v1/events", f"http://127.0.0.1:{api_port}")
        clients.start()
        deadline = time.monotonic() + DATA_DEADLINE_SECONDS
        empty: list[str] = ["(not run yet)"]
        while empty and time.monotonic() < deadline:
            time.sleep(3)
            empty = []
            for dash in DASHBOARDS.values():
                # Every variable at "All", written as Grafana would now write it.
                written = grafana_variables(prom, dash)
                for where, expr in dashboard_targets(dash):
                    promql = substitute(expr, written, GRAFANA_GLOBALS_FOR_DATA)
                    if not prom.query(promql):
                        empty.append(f"{where}\n    {promql}")
        if empty:
            targets = [f"{t['labels']['job']} {t['health']} {t['lastError']}"
                       for t in prom.get_json("/api/v1/targets")["data"]["activeTargets"]]
            pytest.fail(f"{len(empty)} panel queries return no data:\n" + "\n".join(empty)
                        + f"\nclient requests: {clients.codes}\ntargets:\n" + "\n".join(targets))
        owners = {a["name"]: a.get("team", "default")
                  for a in json.loads(cfg.read_text(encoding="utf-8"))["agents"]}
        problems = team_variable_problems(prom, owners)
        assert not problems, "\n".join(problems)
        served = set(prom.get_json("/api/v1/label/__name__/values")["data"])
        assert UPSTREAM_SERIES <= served, f"not served: {sorted(UPSTREAM_SERIES - served)}"
        # The Processes row covers every process the stack scrapes, the API's gunicorn too.
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "process_open_fds", "process_max_fds", "process_start_time_seconds"):
            have = {r["metric"]["job"] for r in prom.query(name)}
            assert have == set(jobs), f"{name}: served by {sorted(have)}"
        # A threshold line named by a label ("threshold {{platform}}") must carry it: with a
        # variable at "All" (.*) a selector also matches the exporter's global default, which
        # has no such label and would draw an unnamed line at a limit no series has.
        unnamed = []
        for d in DASHBOARDS.values():
            for p in panels(d):
                for t in p.get("targets", []):
                    names = re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", ""))
                    if t["refId"] != common.THRESHOLD_REF or not names:
                        continue
                    promql = substitute(t["expr"], variable_names(d), GRAFANA_GLOBALS_FOR_DATA)
                    unnamed += [f"{d['uid']} / {p['title']}: {r['metric']}"
                                for r in prom.query(promql)
                                if any(not r["metric"].get(n) for n in names)]
        assert not unnamed, "threshold lines without their legend's label:\n" + "\n".join(unnamed)
    finally:
        if clients is not None:
            clients.stop()
        if api is not None:
            api.stop()
        exporter.stop()
        simulator.stop()
        receiver.close()


def team_variable_problems(
    server: servers.PrometheusServer, owners: Mapping[str, str]
) -> list[str]:
    """On every dashboard with a `team` variable: it offers the teams of config.json
    (`owners`: agent -> team); picking teams narrows `agent` to exactly their agents; at
    All, `agent` offers every agent with data, `other` (no aicrm_agent_info) included."""
    problems = []
    teams = sorted(set(owners.values()))
    picks = [[team] for team in teams] + [teams[:2]]
    saw_other = False
    chained = [d for d in DASHBOARDS.values() if "team" in variable_names(d)]
    if not chained:
        problems.append("no dashboard has a team variable")
    for dash in chained:
        uid, team, query = dash["uid"], variable(dash, "team"), variable(dash, "agent")["query"]
        offered = label_values(server, team["query"])
        if offered != set(teams):
            problems.append(f"{uid}: team offers {sorted(offered)}, not {teams}")
        for pick in picks:
            agents = label_values(server, substitute(query, {"team": grafana_regex(pick)}, {}))
            expected = {agent for agent, team in owners.items() if team in pick}
            if agents != expected:
                problems.append(f"{uid}: team={pick} offers agents {sorted(agents)}, "
                                f"not {sorted(expected)}")
        # Agents with data: those of the series the agent variable lists, whatever the team.
        match = LABEL_VALUES.fullmatch(query)
        assert match, query
        (series,) = metric_names(match.group(1)) - {common.AGENT_INFO}
        with_data = label_values(server, f"label_values({series}, agent)")
        saw_other = saw_other or catalog.OTHER_VALUE in with_data
        agents = label_values(server, substitute(query, {"team": team["allValue"]}, {}))
        if agents != with_data | set(owners):
            problems.append(f"{uid}: team=All offers agents {sorted(agents)}, not those with "
                            f"data {sorted(with_data)} and the declared ones")
    if chained and not saw_other:
        problems.append(f"no agent variable's series has data for {catalog.OTHER_VALUE!r}: "
                        "the fallback agent is not exercised")
    return problems


# A busy hour then a quiet one whose ratio is ten times higher: the headline must be the range's
# total over its total (as a rule over the whole range would say), not the mean of the two
# hourly ratios. Per series: (numerator, denominator) rates of the busy hour, of the quiet hour.
UNEVEN_HOURS = {
    "Task completion": (
        ("global:aicrm_tasks_completed:rate1h", 90, 1),
        ("global:aicrm_tasks:rate1h", 100, 10),
    ),
    "Agent success": (
        ("global:aicrm_agent_task_results_success:rate1h", 90, 1),
        ("global:aicrm_agent_task_results:rate1h", 100, 10),
    ),
    "Cost per successful task": (
        ("global:aicrm_agent_cost_usd:rate1h", 1, 0.1),
        ("global:aicrm_agent_task_results_success:rate1h", 100, 1),
    ),
}


@pytest.mark.parametrize("title", sorted(UNEVEN_HOURS))
def test_executive_ratios_are_total_over_total(tmp_path: Path, title: str) -> None:
    (panel,) = (p for p in panels(DASHBOARDS["executive"]) if p["title"] == title)
    (expr,) = (t["expr"] for t in panel["targets"] if t["refId"] == "A")
    promql = substitute(expr, variable_names(DASHBOARDS["executive"]),
                        {"__range": "2h", "__range_s": "7200", "__interval": "1m"})
    (num, num_busy, num_quiet), (den, den_busy, den_quiet) = UNEVEN_HOURS[title]
    # One sample a minute from 1m to 120m: the 2h range at 120m holds all of them.
    series = {num: (num_busy, num_quiet), den: (den_busy, den_quiet)}
    expected = (num_busy + num_quiet) / (den_busy + den_quiet)
    assert abs(expected - (num_busy / den_busy + num_quiet / den_quiet) / 2) > expected / 10
    (tmp_path / "none.yml").write_text("groups: []\n", encoding="utf-8")
    test = {
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": name, "values": f"_ {busy}x59 {quiet}x59"}
                for name, (busy, quiet) in series.items()
            ],
            # 1 when the panel's value is the expected one (to rounding); nothing if no value.
            "promql_expr_test": [{
                "expr": f"abs(({promql}) - {expected!r}) < bool 1e-9",
                "eval_time": "120m",
                "exp_samples": [{"value": 1}],
            }],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test), encoding="utf-8")
    proc = subprocess.run(
        [servers.require_binary("promtool"), "test", "rules", "test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_executive_totals_count_only_where_the_rate_was_recorded(tmp_path: Path) -> None:
    """A rate recorded for the last 30 minutes of a 2-hour range (a new Prometheus) counts
    those 30 minutes, not its mean over them times 2 hours (7,200: a quarter of an hour's
    tasks read as two hours')."""
    (panel,) = (p for p in panels(DASHBOARDS["executive"]) if p["title"] == "Tasks automated")
    assert panel["maxDataPoints"] >= 10_000  # so $__interval stays under the rates' hour
    (expr,) = (t["expr"] for t in panel["targets"] if t["refId"] == "A")
    promql = substitute(expr, variable_names(DASHBOARDS["executive"]),
                        {"__range": "2h", "__range_s": "7200", "__interval": "1m"})
    (tmp_path / "none.yml").write_text("groups: []\n", encoding="utf-8")
    # One task a second, recorded each minute from 91m to 120m; the range ends at 120m30s, so
    # its 120 one-minute points are 1m..120m.
    values = " ".join(["_"] * 91 + ["1"] * 30)
    test = {
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": "global:aicrm_tasks_completed:rate1h",
                              "values": values}],
            "promql_expr_test": [{
                "expr": f"abs(({promql}) - 1800) < bool 1e-9",
                "eval_time": "7230s",
                "exp_samples": [{"value": 1}],
            }],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test), encoding="utf-8")
    proc = subprocess.run(
        [servers.require_binary("promtool"), "test", "rules", "test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_provisioning_points_at_the_fixed_datasource_and_the_dashboards() -> None:
    provisioning = ROOT / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert (ds["uid"], ds["type"], ds["url"]) == (
        common.DATASOURCE_UID, "prometheus", "${PROMETHEUS_URL}"
    )
    providers = yaml.safe_load((provisioning / "dashboards" / "aicrm.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert provider["allowUiUpdates"] is False
