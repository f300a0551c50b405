import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalog
from exporter.config import load_config, parse_config
from exporter.events import HistogramData, TaskDbSnapshot, decode_line
from exporter.metrics import MetricStore, status_class
from tests.helpers import config_dict, make_config, store_and_registry

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"


def feed(store: MetricStore, *lines: str) -> None:
    for line in lines:
        ev = decode_line(line.encode(), now=store.clock())  # a ts is checked on its clock
        assert not hasattr(ev, "reason"), ev
        store.apply(ev)  # type: ignore[arg-type]


# --- the catalog -------------------------------------------------------------------------


def test_catalog_follows_naming_practice() -> None:
    names = [m.name for m in catalog.ALL]
    assert len(names) == len(set(names))
    for m in catalog.ALL:
        assert re.fullmatch(r"(aicrm|gen_ai)_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind is catalog.Kind.COUNTER), m.name
        assert (m.kind is catalog.Kind.HISTOGRAM) == bool(m.buckets), m.name
        assert list(m.buckets) == sorted(set(m.buckets)), m.name
        for label in m.labels:
            assert re.fullmatch(r"[a-z_]+", label) and label not in ("le", "job", "instance")
        assert "id" not in m.labels and "user" not in m.labels  # ids are never labels
        if m.unit == "s":
            assert m.name.endswith("_seconds")


DESIGN_CATALOG_SNAPSHOT = ROOT / "tests" / "golden" / "design_catalog_names.txt"


def _design_catalog_names() -> set[str]:
    """Metric and label names in DESIGN.md's catalog section.

    DESIGN.md lives beside the checkout (../shared), which a bare clone may not have; the committed
    snapshot stands in for it then, and is held equal to DESIGN.md whenever DESIGN.md is there.
    """
    snapshot = {line for line in DESIGN_CATALOG_SNAPSHOT.read_text().splitlines()
                if line and not line.startswith("#")}
    design_md = ROOT.parent / "shared" / "DESIGN.md"
    if not design_md.exists():
        return snapshot
    section = design_md.read_text().split("## Public metric catalog", 1)[1]
    section = section.split("## Derived series", 1)[0]
    mentioned = set(re.findall(r"`((?:aicrm|gen_ai)_[a-z0-9_]+)", section))
    assert mentioned == snapshot, (
        f"{DESIGN_CATALOG_SNAPSHOT.name} is out of date with DESIGN.md: "
        f"add {sorted(mentioned - snapshot)}, remove {sorted(snapshot - mentioned)}")
    return mentioned


def test_design_catalog_names_are_all_present() -> None:
    mentioned = _design_catalog_names()
    assert len(mentioned) >= 30
    labels = {label for m in catalog.ALL for label in m.labels}
    missing = mentioned - set(catalog.BY_NAME) - labels
    assert not missing


# --- events to series --------------------------------------------------------------------


def test_task_result() -> None:
    store, reg = store_and_registry()
    feed(store,
         '{"event":"task_result","agent":"lead-qualifier","task_type":"qualify_lead",'
         '"outcome":"success","duration_ms":1500,"retries":2}',
         '{"event":"task_result","agent":"lead-qualifier","task_type":"qualify_lead",'
         '"outcome":"failure","duration_ms":200000}')
    labels = {"agent": "lead-qualifier", "task_type": "qualify_lead"}
    assert reg.get_sample_value("aicrm_agent_task_results_total",
                                {**labels, "outcome": "success"}) == 1
    assert reg.get_sample_value("aicrm_agent_task_results_total",
                                {**labels, "outcome": "failure"}) == 1
    assert reg.get_sample_value("aicrm_agent_task_results_total",
                                {**labels, "outcome": "escalated"}) == 0
    assert reg.get_sample_value("aicrm_agent_retries_total", labels) == 2
    assert reg.get_sample_value("aicrm_agent_task_duration_seconds_count", labels) == 2
    assert reg.get_sample_value("aicrm_agent_task_duration_seconds_sum", labels) == 201.5
    assert reg.get_sample_value("aicrm_agent_task_duration_seconds_bucket",
                                {**labels, "le": "2.5"}) == 1
    assert reg.get_sample_value("aicrm_agent_task_duration_seconds_bucket",
                                {**labels, "le": "180.0"}) == 1
    assert reg.get_sample_value("aicrm_agent_task_duration_seconds_bucket",
                                {**labels, "le": "300.0"}) == 2
    assert reg.get_sample_value("aicrm_agent_task_duration_seconds_bucket",
                                {**labels, "le": "+Inf"}) == 2


def test_llm_call_uses_genai_names() -> None:
    store, reg = store_and_registry()
    feed(store,
         '{"event":"llm_call","agent":"email-writer","model":"gpt-4o","duration_ms":640,'
         '"input_tokens":1000,"output_tokens":50,"cost_usd":0.0125}',
         '{"event":"llm_call","agent":"email-writer","model":"gpt-4o","duration_ms":30000,'
         '"error_type":"timeout","provider":"azure.ai.openai","operation":"text_completion"}')
    base = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "gpt-4o",
            "gen_ai_provider_name": "openai", "gen_ai_agent_name": "email-writer"}
    assert reg.get_sample_value("gen_ai_client_operation_duration_seconds_count",
                                {**base, "error_type": ""}) == 1
    assert reg.get_sample_value("gen_ai_client_operation_duration_seconds_bucket",
                                {**base, "error_type": "", "le": "0.64"}) == 1
    assert reg.get_sample_value("gen_ai_client_token_usage_sum",
                                {**base, "gen_ai_token_type": "input"}) == 1000
    assert reg.get_sample_value("gen_ai_client_token_usage_sum",
                                {**base, "gen_ai_token_type": "output"}) == 50
    assert reg.get_sample_value("aicrm_agent_cost_usd_total",
                                {"agent": "email-writer", "model": "gpt-4o"}) == 0.0125
    failed = {**base, "gen_ai_operation_name": "text_completion",
              "gen_ai_provider_name": "azure.ai.openai", "error_type": "timeout"}
    assert reg.get_sample_value("gen_ai_client_operation_duration_seconds_count", failed) == 1


@pytest.mark.parametrize(("status", "cls"), [
    (None, "2xx"), (200, "2xx"), (204, "2xx"), (302, "2xx"), (400, "4xx"), (404, "4xx"),
    (429, "429"), (500, "5xx"), (503, "5xx"), ("timeout", "timeout"),
])
def test_status_class(status: int | str | None, cls: str) -> None:
    assert status_class(status) == cls


def test_tool_handoff_integration_interaction() -> None:
    store, reg = store_and_registry()
    feed(store,
         '{"event":"tool_call","agent":"lead-qualifier","tool":"crm.search","duration_ms":120,'
         '"outcome":"failure","error_type":"tool_error"}',
         '{"event":"handoff","from_agent":"lead-qualifier","to_agent":"email-writer"}',
         '{"event":"integration_call","platform":"salesforce","operation":"query","status":429,'
         '"duration_ms":800}',
         '{"event":"interaction","channel":"web","type":"feedback","user":"u1","rating":4,'
         '"agent":"email-writer"}')
    assert reg.get_sample_value("aicrm_agent_tool_calls_total", {
        "agent": "lead-qualifier", "tool": "crm.search", "outcome": "failure"}) == 1
    assert reg.get_sample_value("aicrm_agent_tool_call_duration_seconds_sum", {
        "agent": "lead-qualifier", "tool": "crm.search"}) == 0.12
    assert reg.get_sample_value("aicrm_agent_handoffs_total", {
        "from_agent": "lead-qualifier", "to_agent": "email-writer"}) == 1
    assert reg.get_sample_value("aicrm_integration_requests_total", {
        "platform": "salesforce", "operation": "query", "status_class": "429"}) == 1
    assert reg.get_sample_value("aicrm_integration_request_duration_seconds_bucket", {
        "platform": "salesforce", "operation": "query", "le": "0.75"}) == 0
    assert reg.get_sample_value("aicrm_integration_request_duration_seconds_bucket", {
        "platform": "salesforce", "operation": "query", "le": "1.0"}) == 1
    assert reg.get_sample_value("aicrm_user_interactions_total",
                                {"channel": "web", "type": "feedback"}) == 1
    assert reg.get_sample_value("aicrm_user_feedback_rating_bucket",
                                {"agent": "email-writer", "le": "3.0"}) == 0
    assert reg.get_sample_value("aicrm_user_feedback_rating_bucket",
                                {"agent": "email-writer", "le": "4.0"}) == 1


def test_undeclared_values_become_other_and_are_counted() -> None:
    store, reg = store_and_registry()
    feed(store,
         '{"event":"task_result","agent":"rogue-agent","task_type":"qualify_lead",'
         '"outcome":"success"}',
         '{"event":"task_result","agent":"rogue-2","task_type":"mystery","outcome":"success"}',
         '{"event":"integration_call","platform":"salesforce","operation":"delete_all"}',
         '{"event":"integration_call","platform":"zendesk","operation":"query"}')
    assert reg.get_sample_value("aicrm_agent_task_results_total", {
        "agent": "other", "task_type": "qualify_lead", "outcome": "success"}) == 1
    assert reg.get_sample_value("aicrm_agent_task_results_total", {
        "agent": "other", "task_type": "other", "outcome": "success"}) == 1
    assert reg.get_sample_value("aicrm_label_overflow_total", {"label": "agent"}) == 2
    assert reg.get_sample_value("aicrm_label_overflow_total", {"label": "task_type"}) == 1
    assert reg.get_sample_value("aicrm_label_overflow_total", {"label": "platform"}) == 1
    assert reg.get_sample_value("aicrm_label_overflow_total", {"label": "operation"}) == 2
    assert reg.get_sample_value("aicrm_integration_requests_total", {
        "platform": "other", "operation": "other", "status_class": "2xx"}) == 1
    text = store.render_text().decode()
    assert "rogue" not in text and "zendesk" not in text and "delete_all" not in text


def test_declared_combinations_start_at_zero() -> None:
    store, reg = store_and_registry()
    assert reg.get_sample_value("aicrm_agent_task_results_total", {
        "agent": "email-writer", "task_type": "write_email", "outcome": "escalated"}) == 0
    assert reg.get_sample_value("aicrm_integration_requests_total", {
        "platform": "salesforce", "operation": "update", "status_class": "5xx"}) == 0
    assert reg.get_sample_value("gen_ai_client_token_usage_count", {
        "gen_ai_operation_name": "chat", "gen_ai_request_model": "gpt-4o",
        "gen_ai_provider_name": "openai", "gen_ai_token_type": "output",
        "gen_ai_agent_name": "lead-qualifier"}) == 0
    assert reg.get_sample_value("aicrm_user_interactions_total",
                                {"channel": "web", "type": "approval"}) == 0
    # Nothing is pre-created for values nobody declared.
    assert reg.get_sample_value("aicrm_agent_task_results_total", {
        "agent": "other", "task_type": "write_email", "outcome": "success"}) is None


def test_config_series() -> None:
    cfg = make_config(thresholds={"integration_error_ratio_max": 0.07, "task_backlog_max": 42})
    _, reg = store_and_registry(cfg)
    g = reg.get_sample_value
    assert g("aicrm_threshold", {"name": "task_backlog_max"}) == 42
    # Per platform: its own value, else the global one (also for `other`).
    assert g("aicrm_threshold", {"name": "integration_error_ratio_max",
                                 "platform": "salesforce"}) == 0.02
    assert g("aicrm_threshold", {"name": "integration_error_ratio_max",
                                 "platform": "other"}) == 0.07
    assert g("aicrm_threshold", {"name": "integration_latency_p95_max_seconds",
                                 "platform": "salesforce"}) == 1.5
    assert g("aicrm_threshold", {"name": "task_duration_target_seconds",
                                 "task_type": "write_email"}) == 60
    assert g("aicrm_objective", {"name": "agent_success_ratio", "agent": "lead-qualifier"}) == 0.95
    assert g("aicrm_objective", {"name": "agent_success_ratio", "agent": "email-writer"}) == 0.9
    assert g("aicrm_objective", {"name": "task_completion_ratio"}) == 0.95
    assert g("aicrm_score_weight", {"score": "efficiency", "component": "completion"}) == 0.4
    assert g("aicrm_task_human_seconds_saved", {"task_type": "qualify_lead"}) == 900
    assert g("aicrm_agent_info", {"agent": "lead-qualifier", "team": "sales-ops"}) == 1
    assert g("aicrm_build_info", {"version": "0.1.0"}) == 1


def test_link_info_series() -> None:
    """One series, labelled with the link bases that alert annotations read."""
    links = {"grafana_url": "https://grafana.example.com/",
             "runbook_url": "https://runbooks.example.com/aicrm.md"}
    store, reg = store_and_registry(make_config(links=links))
    configured = {"grafana_url": "https://grafana.example.com",
                  "runbook_url": "https://runbooks.example.com/aicrm.md"}
    assert reg.get_sample_value("aicrm_link_info", configured) == 1
    assert (b'\naicrm_link_info{grafana_url="https://grafana.example.com",'
            b'runbook_url="https://runbooks.example.com/aicrm.md"} 1.0\n') in store.render_text()
    series = [s for m in reg.collect() if m.name == "aicrm_link_info" for s in m.samples]
    assert [s.labels for s in series] == [configured]
    _, reg = store_and_registry(make_config())
    assert reg.get_sample_value("aicrm_link_info", {
        "grafana_url": "http://localhost:3000", "runbook_url": "docs/runbooks.md"}) == 1


def test_active_users_windows() -> None:
    now = [1_800_000_000.0]
    store = MetricStore(make_config(), clock=lambda: now[0])
    _, reg = None, None
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(store)
    two_h_ago = now[0] - 7200
    feed(store,
         '{"event":"interaction","channel":"web","type":"message","user":"alice"}',
         '{"event":"interaction","channel":"web","type":"message","user":"alice"}',
         '{"event":"interaction","channel":"web","type":"message","user":42}',
         f'{{"event":"interaction","channel":"web","type":"message","user":"bob","ts":{two_h_ago}}}')
    assert reg.get_sample_value("aicrm_active_users", {"window": "1h"}) == 2
    assert reg.get_sample_value("aicrm_active_users", {"window": "24h"}) == 3
    now[0] += 3601
    assert reg.get_sample_value("aicrm_active_users", {"window": "1h"}) == 0
    assert reg.get_sample_value("aicrm_active_users", {"window": "24h"}) == 3
    assert "alice" not in store.render_text().decode()


# --- exposition --------------------------------------------------------------------------


def _populated_store() -> MetricStore:
    store = MetricStore(load_config(ROOT / "config.json"), clock=lambda: 1_800_000_000.0)
    store.add_source("agent-logs")
    feed(store,
         '{"event":"task_result","agent":"lead-qualifier","task_type":"qualify_lead",'
         '"outcome":"success","duration_ms":1500}',
         '{"event":"llm_call","agent":"email-writer","model":"gpt-4o","duration_ms":640,'
         '"input_tokens":1000,"output_tokens":50,"cost_usd":0.0125}',
         '{"event":"integration_call","platform":"hubspot","operation":"x","status":500}',
         '{"event":"interaction","channel":"web","type":"message","user":"u"}')
    store.accepted("agent-logs", 4, 1_799_999_990.0)
    store.reject("agent-logs", "invalid_json")
    store.source_status("agent-logs", True)
    store.task_snapshot(TaskDbSnapshot(
        totals={("qualify_lead", "lead-qualifier", "completed"): 3},
        duration={("qualify_lead", "lead-qualifier"): HistogramData(
            (1,) + (0,) * 16 + (2,), 7205.5, 3)},
        wait={"qualify_lead": HistogramData((3,) + (0,) * 13, 1.5, 3)},
        open={("qualify_lead", "queued"): 4},
        oldest_open_age={"qualify_lead": 12.5},
    ))
    return store


def test_fast_renderer_matches_client_python() -> None:
    store = _populated_store()
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(store)
    assert store.render_text() == generate_latest(reg)


def test_exposition_exact_text() -> None:
    cfg = make_config(agents=[{"name": "a"}], task_types=[{"name": "t"}], integrations=[],
                      models=[], tools=[], channels=[])
    store = MetricStore(cfg, clock=lambda: 1_800_000_000.0)
    store.add_source("logs")
    feed(store, '{"event":"task_result","agent":"a","task_type":"t","outcome":"success",'
                '"duration_ms":2000,"retries":1}')
    store.accepted("logs", 1, 1_799_999_999.5)
    store.source_status("logs", True)
    expected = (GOLDEN / "minimal.prom").read_text()
    assert store.render_text().decode() == expected


def test_promtool_finds_nothing_to_say() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    body = _populated_store().render_text()
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr.decode() + proc.stdout.decode()
    assert proc.stdout.decode().strip() == "" and proc.stderr.decode().strip() == ""


def test_dump_and_load_round_trip() -> None:
    store = _populated_store()
    with store.lock:
        state = store.dump()
    other = MetricStore(load_config(ROOT / "config.json"), clock=lambda: 1_800_000_000.0)
    other.load(state)
    other.add_source("agent-logs")
    a = [ln for ln in store.render_text().decode().splitlines() if "source_" not in ln
         and "aicrm_task" not in ln and "aicrm_tasks" not in ln]
    b = [ln for ln in other.render_text().decode().splitlines() if "source_" not in ln
         and "aicrm_task" not in ln and "aicrm_tasks" not in ln]
    assert a == b


def test_a_sum_saved_as_null_loads_as_infinity() -> None:
    """JSON has no infinity: a state from before the event bounds may hold an overflowed sum
    as null, which must not stop the start."""
    store = _populated_store()
    with store.lock:
        state = store.dump()
    name, rows = next((k, v) for k, v in state["counters"].items() if v)
    rows[0][-1] = None
    hname, hrows = next((k, v) for k, v in state["histograms"].items() if v)
    hrows[0][-1][-2] = None  # the sum
    other, registry = store_and_registry(load_config(ROOT / "config.json"))
    other.load(state)
    labels = dict(zip(catalog.BY_NAME[name].labels, rows[0][:-1], strict=True))
    assert registry.get_sample_value(name, labels) == math.inf
    assert other.dump()["histograms"][hname][0][-1][-2] == math.inf


def test_load_rejects_unknown_version() -> None:
    store, _ = store_and_registry()
    with pytest.raises(ValueError, match="unsupported state version"):
        store.load({"version": 99})


def test_metrics_doc_is_generated_from_the_catalog() -> None:
    from exporter.gendocs import metrics_doc

    assert (ROOT / "docs" / "metrics.md").read_text() == metrics_doc(), "run: make generate"


def test_agents_task_types_limit_precreated_series() -> None:
    cfg = make_config(agents=[{"name": "lead-qualifier", "task_types": ["qualify_lead"]},
                              {"name": "email-writer"}])
    _, reg = store_and_registry(cfg)
    g = reg.get_sample_value
    assert g("aicrm_agent_task_results_total", {
        "agent": "lead-qualifier", "task_type": "qualify_lead", "outcome": "success"}) == 0
    assert g("aicrm_agent_task_results_total", {
        "agent": "lead-qualifier", "task_type": "write_email", "outcome": "success"}) is None
    assert g("aicrm_agent_task_results_total", {
        "agent": "email-writer", "task_type": "write_email", "outcome": "success"}) == 0


def test_the_exporter_serves_its_process_metrics(tmp_path: Path) -> None:
    """CPU, memory, descriptors and start time of the exporter process, as every client_python
    exporter serves them, after the catalog's families."""
    from exporter.runtime import Exporter

    exporter = Exporter(parse_config(config_dict(exporter={"listen": "127.0.0.1:0",
                                                           "state_dir": str(tmp_path)})))
    exporter.start()
    try:
        text = exporter.render().decode()
    finally:
        exporter.stop()
    values = {s.name: s.value for fam in text_string_to_metric_families(text)
              for s in fam.samples if not s.labels}
    assert values["process_resident_memory_bytes"] > 1e6
    assert 0 < values["process_open_fds"] < values["process_max_fds"]
    assert 0 <= time.time() - values["process_start_time_seconds"] < 86400
    assert text.index("process_cpu_seconds_total") > text.index("aicrm_")
