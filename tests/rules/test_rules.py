"""Rule files, their promtool tests, vmalert compatibility and the Alertmanager configuration.

Runs the real tools from Debian's packages (promtool, vmalert, amtool, prometheus-alertmanager);
a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter.catalog import ALL, LINK_INFO, Kind
from exporter.config import Links
from tests import servers
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "recording_rules"
ALERTMANAGER_YML = ROOT / "alertmanager" / "alertmanager.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

RECORDING_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
# scale/: what Prometheus evaluates in the scale profile, where vmalert evaluates the rest.
ALERT_FILES = sorted((RULES_DIR / "alerts").glob("*.alerts.yml")) + sorted(
    (RULES_DIR / "scale").glob("*.alerts.yml"))
RULE_FILES = RECORDING_FILES + ALERT_FILES
TEST_FILES = sorted(RULES_DIR.rglob("*_test.yml"))

# Every alert link starts with a base from aicrm_link_info (config.json `links`): the current
# series; if no exporter publishes it (all down), the newest of the last week; else the default.
LINK_LAST_SEEN = f"grafana_url_runbook_url:{LINK_INFO.name}:timestamp"  # system.rules.yml
LINK_QUERIES = (LINK_INFO.name, f"topk(1, last_over_time({LINK_LAST_SEEN}[1w]))")
_PICK = r'\{\{ with query "(?P<%s>[^"]*)" \}\}\{\{ \. \| first \| label "(?P<%s>\w+)" \}\}'
LINK = re.compile(
    _PICK % ("query", "label") + r"\{\{ else \}\}" + _PICK % ("fallback", "fallback_label")
    + r"\{\{ else \}\}(?P<default>[^{}]+)\{\{ end \}\}\{\{ end \}\}(?P<rest>.*)",
    re.DOTALL,
)
DASHBOARD_UIDS = {
    "aicrm-overview",
    "aicrm-tasks",
    "aicrm-agents",
    "aicrm-workflow",
    "aicrm-integrations",
    "aicrm-executive",
    "aicrm-stack",
}
# "none": AicrmWatchdog, the always-firing heartbeat for a dead man's switch (never to people).
SEVERITIES = {"page", "ticket", "warning", "info", "recommendation", "none"}
LOCAL_WEBHOOK = "http://127.0.0.1:5001/alerts"
# Series alerts may read that are not the exporter's catalog: the monitoring components' own,
# and the standard process series client_python serves beside the catalog.
# tests/test_scale.py checks that the real binaries serve every such name the system alerts read.
UPSTREAM_SERIES = {"alertmanager_notifications_failed_total", "process_open_fds",
                   "process_max_fds", "prometheus_rule_evaluation_failures_total",
                   "prometheus_rule_group_iterations_missed_total",
                   "vmalert_iteration_missed_total", "vm_storage_is_read_only",
                   "vm_free_disk_space_bytes", "vm_free_disk_space_limit_bytes",
                   "vm_rows_added_to_storage_total", "vm_data_size_bytes", "vm_rows"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240)


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def _rules(files: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in files:
        for group in _load(path)["groups"]:
            for rule in group["rules"]:
                yield path, rule


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(RULES_DIR)) for p in paths]


def test_rule_files_exist() -> None:
    assert len(RECORDING_FILES) >= 7
    assert ALERT_FILES


def test_docs_group_table_matches_the_rule_files() -> None:
    """docs/rules.md lists every group once, in its file, at the interval it really has."""
    text = (ROOT / "docs" / "rules.md").read_text()
    documented: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"^\| (\S+\.yml) \| (aicrm-[a-z0-9-]+) \| (\w+) \|", text, re.MULTILINE):
        assert m.group(2) not in documented, f"{m.group(2)} listed twice in docs/rules.md"
        documented[m.group(2)] = (m.group(1), m.group(3))
    actual = {
        group["name"]: (str(path.relative_to(RULES_DIR)), group.get("interval", "1m"))
        for path in RULE_FILES
        for group in _load(path)["groups"]
    }
    assert documented == actual


@pytest.mark.parametrize("path", RULE_FILES, ids=_ids(RULE_FILES))
def test_promtool_check_rules(path: Path) -> None:
    proc = _run([_tool("promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=_ids(TEST_FILES))
def test_promtool_test_rules(path: Path) -> None:
    proc = _run([_tool("promtool"), "test", "rules", path.name], cwd=path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", RULE_FILES, ids=_ids(RULE_FILES))
def test_vmalert_accepts_rule_file(path: Path) -> None:
    proc = _run([_tool("vmalert"), "-dryRun", f"-rule={path}", "-loggerLevel=ERROR"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", RULE_FILES, ids=_ids(RULE_FILES))
def test_every_rule_file_has_a_test_beside_it(path: Path) -> None:
    test = path.with_name(path.name.removesuffix(".yml") + "_test.yml")
    assert test.exists(), f"missing {test.name}"
    assert path.name in _load(test)["rule_files"]


def _unit_tests() -> Iterator[dict[str, Any]]:
    for path in TEST_FILES:
        yield from _load(path)["tests"]


def test_every_recording_rule_has_an_expression_test() -> None:
    tested = " ".join(
        case["expr"] for test in _unit_tests() for case in test.get("promql_expr_test", [])
    )
    names = set(re.findall(r"[A-Za-z_:][\w:]*", tested))
    missing = sorted({r["record"] for _, r in _rules(RECORDING_FILES)} - names)
    assert not missing, f"recording rules without a promql_expr_test: {missing}"


def test_every_alert_has_a_quiet_and_a_firing_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in _unit_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {r["alert"] for _, r in _rules(ALERT_FILES)}
    assert not alerts - firing, f"alerts never tested firing: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts never tested quiet: {sorted(alerts - quiet)}"


def test_rules_and_alerts_live_in_separate_files() -> None:
    for path, rule in _rules(RECORDING_FILES):
        assert "record" in rule, f"{path.name}: alert {rule.get('alert')} in a recording file"
    for path, rule in _rules(ALERT_FILES):
        assert "alert" in rule, f"{path.name}: record {rule.get('record')} in an alert file"


@pytest.mark.parametrize("path", ALERT_FILES, ids=_ids(ALERT_FILES))
def test_alert_shape(path: Path) -> None:
    runbooks = RUNBOOKS.read_text(encoding="utf-8") if RUNBOOKS.exists() else ""
    headings = {h.strip().lower() for h in re.findall(r"^##+ (.+)$", runbooks, re.M)}
    for _, rule in _rules([path]):
        name = rule["alert"]
        assert re.fullmatch(r"Aicrm[A-Z][A-Za-z0-9]+", name), name
        assert rule.get("for"), f"{name}: no `for`"
        labels = rule.get("labels", {})
        assert labels.get("severity") in SEVERITIES, f"{name}: severity {labels.get('severity')}"
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "dashboard_url", "runbook_url"):
            assert ann.get(key), f"{name}: no {key} annotation"
        dashboard = _link(name, ann["dashboard_url"], "grafana_url", Links().grafana_url)
        assert dashboard.startswith("/d/"), f"{name}: {ann['dashboard_url']}"
        uid = dashboard.removeprefix("/d/").split("?")[0]
        assert uid in DASHBOARD_UIDS, f"{name}: unknown dashboard {uid}"
        runbook = _link(name, ann["runbook_url"], "runbook_url", Links().runbook_url)
        assert runbook == f"#{name.lower()}", f"{name}: {ann['runbook_url']}"
        assert name.lower() in headings, f"docs/runbooks.md has no section {name}"


def _link(alert: str, template: str, label: str, default: str) -> str:
    """What an alert link appends to its base; the base must come from aicrm_link_info's
    ``label``, falling back to config.json's default for the key."""
    m = LINK.fullmatch(template)
    assert m, f"{alert}: link does not start with the aicrm_link_info base: {template}"
    assert (m["query"], m["fallback"]) == LINK_QUERIES, f"{alert}: {template}"
    assert (m["label"], m["fallback_label"], m["default"]) == (label, label, default), (
        f"{alert}: {template}")
    assert label in LINK_INFO.labels
    return m["rest"]


def test_link_fallback_reads_a_recorded_series() -> None:
    assert LINK_LAST_SEEN in {r["record"] for _, r in _rules(RECORDING_FILES)}


def test_link_template_parsing() -> None:
    url = "".join(
        f'{{{{ with query "{q}" }}}}{{{{ . | first | label "grafana_url" }}}}{{{{ else }}}}'
        for q in LINK_QUERIES
    ) + "http://localhost:3000{{ end }}{{ end }}/d/aicrm-tasks?var-x={{ $labels.x }}"
    assert _link("A", url, "grafana_url", "http://localhost:3000") == (
        "/d/aicrm-tasks?var-x={{ $labels.x }}")
    for bad in ("http://localhost:3000/d/aicrm-tasks",
                url.replace("grafana_url", "runbook_url", 1),
                url.replace("[1w]", "[1d]"),
                url.replace("{{ end }}{{ end }}", "{{ end }}"),
                url.replace("http://localhost:3000", "http://grafana:3000")):
        with pytest.raises(AssertionError):
            _link("A", bad, "grafana_url", "http://localhost:3000")


def _catalog_names() -> set[str]:
    names = set()
    for spec in ALL:
        names.add(spec.name)
        if spec.kind is Kind.HISTOGRAM:
            names.update(spec.name + s for s in ("_bucket", "_sum", "_count"))
    return names


_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}


def _metric_names(expr: str) -> set[str]:
    """Series names an expression selects (label matchers, strings and grouping removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def test_expressions_use_only_catalog_or_recorded_series() -> None:
    known = _catalog_names() | {"up", "ALERTS", "ALERTS_FOR_STATE"} | UPSTREAM_SERIES
    known |= {r["record"] for _, r in _rules(RECORDING_FILES)}
    unknown = {}
    for path, rule in _rules(RULE_FILES):
        bad = _metric_names(rule["expr"]) - known
        if bad:
            unknown[f"{path.name}:{rule.get('record') or rule.get('alert')}"] = sorted(bad)
    assert not unknown, unknown


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (agent, le) (rate(aicrm_x_bucket{le="+Inf", a=~"b|c"}[5m] offset 1d)) '
        '> on (agent) group_left (team) max(aicrm_info) and 1e-3 < bool a:b:c'
    )
    assert _metric_names(expr) == {"aicrm_x_bucket", "aicrm_info", "a:b:c"}


def test_recorded_names_follow_level_metric_operations() -> None:
    for _, rule in _rules(RECORDING_FILES):
        name = rule["record"]
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name
        assert "_total:" not in name, name


# --- Alertmanager ---------------------------------------------------------------------------


def test_amtool_check_config() -> None:
    proc = _run([_tool("amtool"), "check-config", str(ALERTMANAGER_YML)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=page", "agent=lead-qualifier"], "page"),
        (["severity=ticket", "team=sales-ops"], "team"),
        (["severity=warning", "team=marketing"], "team"),
        (["severity=warning"], "operations"),
        (["severity=recommendation", "team=sales-ops"], "recommendations"),
        (["severity=recommendation", "platform=hubspot"], "recommendations"),
        (["severity=info"], "webhook"),
        (["alertname=AicrmWatchdog", "severity=none"], "watchdog"),
        (["alertname=AicrmLabelOverflow", "severity=ticket", "label=model"], "operations"),
        (["alertname=AicrmAgentEscalationRatioHigh", "severity=ticket", "agent=lead-qualifier",
          "team=sales-ops"], "team"),
        (["alertname=AicrmTaskErrorBudgetBurn", "severity=page", "task_type=qualify_lead"], "page"),
        (["alertname=AicrmTaskErrorBudgetBurn", "severity=ticket", "task_type=qualify_lead"],
         "operations"),
    ],
)
def test_routing(labels: list[str], receiver: str) -> None:
    proc = _run(
        [_tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == receiver


def test_recommendations_are_batched_per_team() -> None:
    """The recommendation route groups by team, and every recommendation about an agent joins
    the owning team from aicrm_agent_info (with a fallback for agents without agent_info)."""
    (route,) = (
        r for r in _load(ALERTMANAGER_YML)["route"]["routes"]
        if r.get("matchers") == ['severity="recommendation"']
    )
    assert "team" in route["group_by"]
    for _, rule in _rules(ALERT_FILES):
        if rule.get("labels", {}).get("severity") != "recommendation":
            continue
        per_agent = any(
            "agent" in name.split(":")[0].split("_") for name in _metric_names(rule["expr"])
        )
        joined = re.search(
            r"\* on \(agent\) group_left \(team\) max by \(agent, team\) \(aicrm_agent_info\)"
            r"\s+or on \(agent\)",
            rule["expr"],
        )
        assert joined or not per_agent, f"{rule['alert']}: per agent but no team"


def test_no_secrets_in_alertmanager_config() -> None:
    cfg = _load(ALERTMANAGER_YML)
    text = ALERTMANAGER_YML.read_text(encoding="utf-8")
    assert "hooks.slack.com" not in text
    assert "smtp_auth_password" not in cfg["global"]
    assert "slack_api_url" not in cfg["global"]
    for receiver in cfg["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert "api_url" not in slack
        for email in receiver.get("email_configs", []):
            assert "auth_password" not in email


def _http(method: str, url: str, payload: Any = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
        is_json = resp.headers.get_content_type() == "application/json"
    return json.loads(raw) if raw and is_json else raw


def _shipped_config(tmp_path: Path, webhook_url: str) -> Path:
    """alertmanager.yml as shipped, with its webhook URL pointed at ``webhook_url`` and the
    secret files created in ``tmp_path``."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "slack_webhook_url").write_text("http://127.0.0.1:9/slack\n")
    (secrets / "smtp_password").write_text("unused\n")
    text = ALERTMANAGER_YML.read_text(encoding="utf-8")
    text = text.replace(LOCAL_WEBHOOK, webhook_url)
    text = text.replace("/etc/alertmanager/secrets", str(secrets))
    config = tmp_path / "alertmanager.yml"
    config.write_text(text)
    shutil.copytree(ALERTMANAGER_YML.parent / "templates", tmp_path / "templates")
    return config


_ANNOTATIONS = {
    "summary": "s",
    "description": "d",
    "dashboard_url": "https://grafana.example.com/d/aicrm-stack",
    "runbook_url": "https://runbooks.example.com/aicrm.md#aicrmexporterdown",
}


@pytest.mark.integration
def test_alertmanager_delivers_and_inhibits(
    tmp_path: Path, alertmanager_factory: Callable[..., servers.AlertmanagerServer]
) -> None:
    """A real Alertmanager: pages reach the webhook; the whole exporter job down inhibits
    derived alerts and the per-target pages."""
    receiver = servers.WebhookReceiver()
    try:
        am = alertmanager_factory(_shipped_config(tmp_path, receiver.url))
        job = {"severity": "page", "job": "aicrm-exporter"}
        _http(
            "POST",
            am.url + "/api/v2/alerts",
            [
                {"labels": {"alertname": "AicrmExporterJobDown", **job},
                 "annotations": _ANNOTATIONS},
                {"labels": {"alertname": "AicrmExporterDown", "instance": "a", **job},
                 "annotations": _ANNOTATIONS},
                {
                    "labels": {
                        "alertname": "AicrmAgentSuccessBelowObjective",
                        "severity": "warning",
                        "agent": "lead-qualifier",
                        "team": "sales-ops",
                    },
                    "annotations": _ANNOTATIONS,
                },
            ],
        )
        assert eventually(lambda: bool(receiver.notifications), 40, 0.2), (
            "no notification reached the webhook")
        first = receiver.notifications[0]
        assert first["receiver"] == "page"
        assert first["commonLabels"]["alertname"] == "AicrmExporterJobDown"
        assert eventually(lambda: _suppressed(am) == {
            "AicrmExporterDown", "AicrmAgentSuccessBelowObjective/lead-qualifier/warning"},
            10, 0.2), am.alerts()
    finally:
        receiver.close()


def _suppressed(am: servers.AlertmanagerServer) -> set[str]:
    """Names (with the agent, if any) of the alerts Alertmanager holds back by inhibition."""
    names = set()
    for alert in am.alerts():
        if alert["status"]["state"] == "suppressed" and alert["status"]["inhibitedBy"]:
            labels = alert["labels"]
            name = labels["alertname"]
            if "agent" in labels:
                name += f"/{labels['agent']}/{labels['severity']}"
            elif "task_type" in labels and labels["alertname"].startswith("AicrmTask"):
                name += f"/{labels['task_type']}/{labels['severity']}"
            elif "source" in labels and labels["alertname"] != "AicrmSourceDown":
                name += f"/{labels['source']}"
            names.add(name)
    return names


_AGENT = {"agent": "lead-qualifier", "team": "sales-ops"}
_BURN_PAGE = {"alertname": "AicrmAgentErrorBudgetBurn", "severity": "page", **_AGENT}
_BURN_TICKET = {"alertname": "AicrmAgentErrorBudgetBurn", "severity": "ticket",
                "agent": "email-writer", "team": "marketing"}
_BELOW = {"alertname": "AicrmAgentSuccessBelowObjective", "severity": "warning",
          "agent": "email-writer", "team": "marketing"}
_TASK_WAIT = {"alertname": "AicrmTaskWaitHigh", "severity": "warning", "task_type": "qualify_lead"}
_TASK_BURN_PAGE = {"alertname": "AicrmTaskErrorBudgetBurn", "severity": "page",
                   "task_type": "qualify_lead"}
_INTEGRATION = {"alertname": "AicrmIntegrationErrorRatioHigh", "severity": "warning",
                "platform": "salesforce"}
_SHARD_A = {"alertname": "AicrmExporterDown", "severity": "page", "job": "aicrm-exporter",
            "instance": "a"}
_SHARD_B = {**_SHARD_A, "instance": "b"}
_JOB_DOWN = {"alertname": "AicrmExporterJobDown", "severity": "page", "job": "aicrm-exporter"}
_WATCHDOG = {"alertname": "AicrmWatchdog", "severity": "none"}
_LLM = {"alertname": "AicrmLlmErrorRatioHigh", "severity": "warning", "model": "gpt-4o"}
_TOOL = {"alertname": "AicrmToolFailureRatioHigh", "severity": "warning", "tool": "crm.update"}
_SPEND = {"alertname": "AicrmSpendForecastOverBudget", "severity": "warning"}
_OVERFLOW = {"alertname": "AicrmLabelOverflow", "severity": "ticket", "label": "model"}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("firing", "suppressed"),
    [
        # An event source down (a ticket, possibly for days: a file source whose directory is
        # missing) holds back its own lag and rejected-events warnings only. Nothing ties it to
        # an agent, platform, model or tool, so the integration, agent, LLM, tool and spend
        # alerts still go out, and another source's lag too.
        (
            [{"alertname": "AicrmSourceDown", "severity": "ticket", "source": "push"},
             {"alertname": "AicrmSourceLagHigh", "severity": "warning", "source": "push"},
             {"alertname": "AicrmSourceLagHigh", "severity": "warning", "source": "files"},
             _BURN_PAGE, _BURN_TICKET, _BELOW, _INTEGRATION, _TASK_WAIT, _LLM, _TOOL, _SPEND,
             _OVERFLOW, _WATCHDOG],
            {"AicrmSourceLagHigh/push"},
        ),
        # The task database down holds back task alerts only, and never the task burn page.
        (
            [{"alertname": "AicrmSourceDown", "severity": "ticket", "source": "task_db"},
             _TASK_WAIT, _BELOW, _BURN_PAGE, _TASK_BURN_PAGE],
            {"AicrmTaskWaitHigh/qualify_lead/warning"},
        ),
        # One exporter shard of two down: the other's data still arrive; nothing derived is
        # held back (they carry no instance to tie them to the shard).
        (
            [_SHARD_A, _BURN_PAGE, _BELOW, _TASK_WAIT, _INTEGRATION],
            set(),
        ),
        # Every shard down: one page (the job's); everything derived and the shards' pages wait.
        # The watchdog is never held back: it must reach its dead man's switch; nor are the
        # stack's own alerts that do not follow from the exporters (a refused config reload).
        (
            [_JOB_DOWN, _SHARD_A, _SHARD_B, _BURN_PAGE, _BELOW, _TASK_WAIT, _INTEGRATION,
             {"alertname": "AicrmSourceDown", "severity": "ticket", "source": "push"},
             _LLM, _TOOL, _SPEND, _OVERFLOW, _WATCHDOG,
             {"alertname": "AicrmConfigSeriesAbsent", "severity": "ticket"},
             {"alertname": "AicrmConfigReloadFailed", "severity": "ticket", "job": "prometheus",
              "instance": "localhost:9090"},
             {"alertname": "AicrmRuleEvaluationFailing", "severity": "page", "job": "prometheus",
              "instance": "localhost:9090", "rule_group": "scores.rules.yml;aicrm-scores"}],
            {"AicrmExporterDown", "AicrmAgentErrorBudgetBurn/lead-qualifier/page",
             "AicrmConfigSeriesAbsent",
             "AicrmAgentSuccessBelowObjective/email-writer/warning",
             "AicrmTaskWaitHigh/qualify_lead/warning",
             "AicrmIntegrationErrorRatioHigh", "AicrmSourceDown", "AicrmLlmErrorRatioHigh",
             "AicrmToolFailureRatioHigh", "AicrmSpendForecastOverBudget", "AicrmLabelOverflow"},
        ),
        # A task type's completion budget burn pages: its own ticket and below-objective
        # warning wait, another task type's do not (no agent label: task_type tells them apart).
        (
            [_TASK_BURN_PAGE, {**_TASK_BURN_PAGE, "severity": "ticket"},
             {**_TASK_BURN_PAGE, "severity": "ticket", "task_type": "write_email"},
             {"alertname": "AicrmTaskCompletionBelowObjective", "severity": "warning",
              "task_type": "qualify_lead"},
             {"alertname": "AicrmTaskCompletionBelowObjective", "severity": "warning",
              "task_type": "write_email"}],
            {"AicrmTaskErrorBudgetBurn/qualify_lead/ticket",
             "AicrmTaskCompletionBelowObjective/qualify_lead/warning"},
        ),
        # VictoriaMetrics read-only (scale profile): every series vmalert looks for goes
        # stale, so the alerts on missing series wait, and so does the disk-headroom ticket of
        # the same store; a target really down and the watchdog do not.
        (
            [{"alertname": "AicrmStoreReadOnly", "severity": "page", "job": "victoriametrics",
              "instance": "victoriametrics:8428", "path": "/storage"},
             {"alertname": "AicrmStoreDiskFillingUp", "severity": "ticket",
              "job": "victoriametrics", "instance": "victoriametrics:8428"},
             {"alertname": "AicrmScrapeJobAbsent", "severity": "ticket", "job": "aicrm-api"},
             {"alertname": "AicrmConfigSeriesAbsent", "severity": "ticket"},
             {"alertname": "AicrmTargetDown", "severity": "ticket", "job": "aicrm-api",
              "instance": "api:5000"},
             _WATCHDOG],
            {"AicrmStoreDiskFillingUp", "AicrmScrapeJobAbsent", "AicrmConfigSeriesAbsent"},
        ),
    ],
    ids=["event-source-down", "task-db-down", "one-shard-down", "exporter-job-down",
         "task-burn-page", "store-read-only"],
)
def test_alertmanager_inhibits_symptoms_of_the_same_cause_only(
    tmp_path: Path,
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
    firing: list[dict[str, str]],
    suppressed: set[str],
) -> None:
    am = alertmanager_factory(_shipped_config(tmp_path, "http://127.0.0.1:9/alerts"))
    _http("POST", am.url + "/api/v2/alerts",
          [{"labels": labels, "annotations": _ANNOTATIONS} for labels in firing])
    assert eventually(lambda: len(am.alerts()) == len(firing), 10, 0.1), am.alerts()
    # Inhibition takes effect as Alertmanager sees the source alerts: wait for the expected
    # set, then check it holds (nothing else gets suppressed a moment later).
    eventually(lambda: _suppressed(am) == suppressed, 5, 0.1)
    time.sleep(1)
    assert _suppressed(am) == suppressed


@pytest.mark.integration
def test_pages_of_different_task_types_or_agents_notify_apart(
    tmp_path: Path, alertmanager_factory: Callable[..., servers.AlertmanagerServer]
) -> None:
    """The page route groups by agent and task_type: the completion burn of two task types
    (or the success burn of two agents) are two notifications, not one folded together."""
    am = alertmanager_factory(_shipped_config(tmp_path, "http://127.0.0.1:9/alerts"))
    firing = [_TASK_BURN_PAGE, {**_TASK_BURN_PAGE, "task_type": "write_email"},
              _BURN_PAGE, {**_BURN_PAGE, "agent": "email-writer", "team": "marketing"}]
    _http("POST", am.url + "/api/v2/alerts",
          [{"labels": labels, "annotations": _ANNOTATIONS} for labels in firing])

    def page_groups() -> list[list[str]]:
        return sorted(
            sorted(a["labels"].get("task_type") or a["labels"]["agent"] for a in g["alerts"])
            for g in am.get_json("/api/v2/alerts/groups")
            if g["receiver"]["name"] == "page"
        )

    expected = [["email-writer"], ["lead-qualifier"], ["qualify_lead"], ["write_email"]]
    assert eventually(lambda: page_groups() == expected, 10, 0.1), page_groups()


# --- Links in a second ruler ----------------------------------------------------------------


@pytest.mark.integration
def test_vmalert_expands_links_from_aicrm_link_info(
    tmp_path: Path,
    vm_factory: Callable[..., servers.VictoriaMetricsServer],
    vmalert_factory: Callable[..., servers.VmalertServer],
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
) -> None:
    """vmalert over VictoriaMetrics (the scale profile) renders the same links as promtool's
    tests: the newest links of the last week (as recorded by system.rules.yml) while the exporter
    is down, then the current ones."""
    doc = _load(RULES_DIR / "alerts" / "system.alerts.yml")
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = "0s"
    rules = tmp_path / "system.alerts.yml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    vm = vm_factory()

    def push(lines: list[str]) -> None:
        url = f"{vm.url}/api/v1/import/prometheus"
        with requests.post(url, data="\n".join(lines), timeout=10) as response:
            response.raise_for_status()
        vm.force_flush()

    def links(grafana: str, runbook: str) -> str:
        return f'{{grafana_url="{grafana}",runbook_url="{runbook}"}}'

    now = int(time.time())
    # Named to sort first, as VictoriaMetrics orders results: only topk() picks the newest.
    old = links("https://grafana-old.example.com", "docs/old-runbooks.md")
    new = links("https://grafana.example.com", "https://runbooks.example.com/aicrm.md")
    # Published old links 3h-2h ago, new links 2h-1h ago; down ever since.
    push([f"{LINK_LAST_SEEN}{old} {t} {t * 1000}"
          for t in range(now - 3 * 3600, now - 2 * 3600, 30)]
         + [f"{LINK_LAST_SEEN}{new} {t} {t * 1000}"
            for t in range(now - 2 * 3600, now - 3600, 30)]
         + [f'up{{job="aicrm-exporter",instance="a"}} 0 {t * 1000}'
            for t in range(now - 600, now + 600, 15)])
    am = alertmanager_factory({"route": {"receiver": "null"}, "receivers": [{"name": "null"}]})
    vmalert_factory([rules], vm.url, notifier_url=am.url)

    def annotations() -> dict[str, str]:
        deadline = time.monotonic() + 30
        while True:
            for alert in am.alerts(filter="alertname=AicrmExporterDown"):
                return dict(alert["annotations"])
            assert time.monotonic() < deadline, "AicrmExporterDown never reached Alertmanager"
            time.sleep(0.2)

    ann = annotations()
    assert ann["dashboard_url"] == "https://grafana.example.com/d/aicrm-stack", ann
    assert ann["runbook_url"] == "https://runbooks.example.com/aicrm.md#aicrmexporterdown", ann

    # Another exporter publishes links now: they win over any older ones.
    current = links("https://current.example.com/grafana", "docs/runbooks.md")
    push([f'{LINK_INFO.name}{{job="aicrm-exporter",instance="b",{current[1:]} 1 {t * 1000}'
          for t in range(now - 60, now + 600, 15)])
    assert eventually(lambda: annotations()["dashboard_url"]
                      == "https://current.example.com/grafana/d/aicrm-stack", 30, 0.2), (
        annotations())
    assert annotations()["runbook_url"] == "docs/runbooks.md#aicrmexporterdown"
