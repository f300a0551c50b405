"""Past one machine: remote write to VictoriaMetrics with vmalert, and exporter shards.

(a) One Prometheus scrapes a real exporter, evaluates recording_rules/ and remote-writes the raw
    samples to VictoriaMetrics; vmalert evaluates the same rule files against VictoriaMetrics and
    writes its results there. Both stores must give the same answers.
(b) Two exporters, each owning half of the event files, against one exporter owning all of them,
    each behind its own Prometheus with the rules: the totals and the derived series agree.

The workload is a fixed block of event lines written several times, the same block into every
file, so every counter grows in the same proportions whenever Prometheus happens to scrape. Ratios
and percentiles of the recorded series are then independent of scrape and evaluation timing and
must agree exactly; rates (which depend on when samples were taken) are compared only between
two Prometheus servers.
Copies of the rule files evaluate every second.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests import servers

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "recording_rules"
EXPORTER_BIN = Path(sys.executable).parent / "aicrm-exporter"
BATCHES = 4
BATCH_SECONDS = 2.0
# The first batch holds this many blocks and is ingested before Prometheus first scrapes, so
# every series starts at the same scrape with a value far above one block's step: Prometheus
# and VictoriaMetrics' increase() then both count from that first value for every series (VM
# counts a new series from zero when its first value is below about ten times its next step).
# Every per-block amount is >= 0.25 for the same reason.
FIRST_BLOCKS = 50

# Recorded series whose values depend only on the workload's proportions.
EXACT = (
    "agent:aicrm_agent_task_results:success_ratio_rate5m",
    "agent:aicrm_agent_task_results:escalated_ratio_rate5m",
    "task_type:aicrm_agent_task_results:success_ratio_rate5m",
    "global:aicrm_agent_task_results:success_ratio_rate5m",
    "tool:aicrm_agent_tool_calls:failure_ratio_rate5m",
    "agent:aicrm_agent_task_duration_seconds:p95_rate5m",
    "platform:aicrm_integration_requests:error_ratio_rate5m",
    "platform:aicrm_integration_requests:throttled_ratio_rate5m",
    "platform:aicrm_integration_request_duration_seconds:p95_rate5m",
)
# Ratios of recorded series from different rule groups or evaluations: read at slightly
# different times, so each engine's rate() (Prometheus extrapolates to the window's edges,
# VictoriaMetrics does not) moves them a little while the 5m window fills.
CLOSE = (
    "agent:aicrm_agent_retries_per_task:ratio_rate5m",
    "global:aicrm_integration_requests:error_ratio_rate5m",
    "agent:aicrm_agent_cost_usd_per_successful_task:ratio_rate5m",
    "agent:gen_ai_client_token_usage_per_task:ratio_rate5m",
)
RATES = ("global:aicrm_agent_task_results:rate5m", "platform:aicrm_integration_requests:rate5m")
CLOSE_REL = 0.06
RATE_REL = 0.10
# Raw totals: exact once every line is ingested.
TOTALS = (
    "sum by (agent, task_type, outcome) (aicrm_agent_task_results_total)",
    "sum by (platform, status_class) (aicrm_integration_requests_total)",
    "sum by (agent, model) (aicrm_agent_cost_usd_total)",
    "sum by (channel, type) (aicrm_user_interactions_total)",
)


# --- workload -----------------------------------------------------------------------------


def workload_block() -> list[dict[str, Any]]:
    """One block of events covering every family the compared rules read."""
    cfg = json.loads((ROOT / "config.json").read_text())
    agents = [a["name"] for a in cfg["agents"]]
    task_types = [t["name"] for t in cfg["task_types"]]
    models = [m["name"] if isinstance(m, dict) else m for m in cfg["models"]]
    tools = cfg["tools"]
    events: list[dict[str, Any]] = []
    for i, agent in enumerate(agents):
        task_type = task_types[i % len(task_types)]
        # Agent i: 8 + i successes, i + 1 failures, 1 escalation; durations spread over buckets.
        outcomes = ["success"] * (8 + i) + ["failure"] * (i + 1) + ["escalated"]
        for j, outcome in enumerate(outcomes):
            events.append({
                "event": "task_result", "agent": agent, "task_type": task_type,
                "outcome": outcome, "duration_ms": 2000 + 7000 * j + 1000 * i,
                "retries": j % 3, "workflow": "lead-to-meeting",
            })
        for j in range(3):
            events.append({
                "event": "llm_call", "agent": agent, "model": models[j % len(models)],
                "input_tokens": 800 + 100 * i, "output_tokens": 200 + 10 * j,
                "cost_usd": 0.3 + 0.1 * i + 0.01 * j, "duration_ms": 400 + 300 * j,
            })
        for j, tool in enumerate(tools):
            events.append({
                "event": "tool_call", "agent": agent, "tool": tool, "duration_ms": 300 + 40 * j,
                "outcome": "failure" if (i + j) % 4 == 0 else "success",
            })
        events.append({"event": "handoff", "from_agent": agent,
                       "to_agent": agents[(i + 1) % len(agents)]})
    for p, integ in enumerate(cfg["integrations"]):
        statuses = [200] * (10 + p) + [500, "timeout"] + [429] * (p + 1) + [404]
        for j, status in enumerate(statuses):
            events.append({
                "event": "integration_call", "platform": integ["platform"],
                "operation": integ["operations"][j % len(integ["operations"])],
                "status": status, "duration_ms": 250 + 90 * j + 10 * p,
            })
    for c, channel in enumerate(cfg["channels"]):
        for kind in ("message", "approval", "feedback"):
            events.append({"event": "interaction", "channel": channel, "type": kind,
                           "user": f"user-{c}", "agent": agents[c], "rating": 4})
    return events


def block_lines() -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in workload_block())


def write_blocks(files: list[Path], blocks: int) -> None:
    data = block_lines() * blocks
    for path in files:
        with open(path, "ab") as f:
            f.write(data)


def write_batches(files: list[Path]) -> int:
    """After the first batch: one block into every file, BATCHES times, BATCH_SECONDS apart.

    Returns the number of blocks each file holds in all.
    """
    for _ in range(BATCHES):
        time.sleep(BATCH_SECONDS)
        write_blocks(files, 1)
    return FIRST_BLOCKS + BATCHES


# --- servers ------------------------------------------------------------------------------


def exporter_config(tmp: Path, name: str, glob: str) -> Path:
    """config.json with the same labels, only the given event files as sources."""
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["sources"] = {"event_logs": [{"name": "agent-logs", "path": glob}]}
    cfg["exporter"] = {"listen": f"127.0.0.1:{servers.free_port()}",
                       "state_dir": str(tmp / f"state-{name}")}
    path = tmp / f"config-{name}.json"
    path.write_text(json.dumps(cfg))
    return path


class Exporter(servers.Server):
    pass


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[[str, str], Exporter]]:
    started: list[Exporter] = []

    def start(name: str, glob: str) -> Exporter:
        config = exporter_config(tmp_path, name, glob)
        port = int(json.loads(config.read_text())["exporter"]["listen"].rsplit(":", 1)[1])
        exporter = Exporter(f"exporter-{name}", tmp_path, port)
        started.append(exporter)
        exporter.start(
            [EXPORTER_BIN, "--config", config], cwd=tmp_path,
            ready_check=servers.http_ok(f"{exporter.url}/readyz"),
        )
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


@pytest.fixture
def fast_rules(tmp_path: Path) -> list[Path]:
    """Copies of every rule file with each group evaluated every second."""
    out = []
    for path in sorted(RULES.glob("*.rules.yml")) + sorted(RULES.glob("alerts/*.alerts.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
        target = tmp_path / "rules" / path.relative_to(RULES)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(target)
    return out


def prometheus_config(targets: list[str], alertmanager: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {"job_name": "aicrm-exporter", "static_configs": [{"targets": targets}]},
        ],
    }


def scale_remote_write(vm_url: str) -> dict[str, Any]:
    """prometheus/prometheus.scale.yml's remote_write, pointed at the test's VictoriaMetrics."""
    doc = yaml.safe_load((ROOT / "prometheus" / "prometheus.scale.yml").read_text())
    (remote,) = doc["remote_write"]
    return {**remote, "url": f"{vm_url}/api/v1/write",
            "queue_config": {**remote.get("queue_config", {}), "batch_send_deadline": "500ms"}}


ALERTMANAGER_CONFIG = {
    "route": {"receiver": "null"},
    "receivers": [{"name": "null"}],
}


# --- comparison ---------------------------------------------------------------------------

Series = dict[tuple[tuple[str, str], ...], float]


def values(server: servers._PromQueryMixin, expr: str) -> Series:
    out: Series = {}
    for item in server.query(expr):
        labels = tuple(sorted((k, v) for k, v in item["metric"].items() if k != "__name__"))
        out[labels] = float(item["value"][1])
    return out


def same(a: Series, b: Series, rel: float) -> bool:
    if not a or a.keys() != b.keys():
        return False
    return all(
        math.isfinite(a[k]) and math.isclose(a[k], b[k], rel_tol=rel, abs_tol=1e-12) for k in a
    )


def wait_equal(
    left: servers._PromQueryMixin,
    right: servers._PromQueryMixin,
    exprs: tuple[str, ...],
    rel: float,
    timeout: float,
    before: Callable[[], None] = lambda: None,
) -> dict[str, Series]:
    """Poll until every expression gives the same series with the same values on both sides."""
    deadline = time.monotonic() + timeout
    pending = list(exprs)
    seen: dict[str, Series] = {}
    last: dict[str, tuple[Series, Series]] = {}
    while pending and time.monotonic() < deadline:
        before()
        for expr in list(pending):
            a, b = values(left, expr), values(right, expr)
            last[expr] = (a, b)
            if same(a, b, rel):
                seen[expr] = a
                if rel:
                    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)
                    print(f"{expr}: {left.name} vs {right.name} within {worst:.4f}")
                pending.remove(expr)
        time.sleep(0.5)
    if pending:
        detail = "\n".join(
            f"{e}:\n  {left.name}: {last[e][0]}\n  {right.name}: {last[e][1]}" for e in pending
        )
        pytest.fail(f"{len(pending)} series differ after {timeout}s:\n{detail}")
    return seen


def wait_scraped(server: servers._PromQueryMixin, events: int) -> None:
    """Wait until the store has a sample with every event ingested."""
    deadline = time.monotonic() + 30
    got: Series = {}
    while time.monotonic() < deadline:
        got = values(server, "sum(aicrm_source_events_total)")
        if got == {(): float(events)}:
            return
        time.sleep(0.2)
    pytest.fail(f"{server.name}: sum(aicrm_source_events_total) = {got}, expected {events}")


def wait_ingested(exporters: list[Exporter], lines: int) -> None:
    deadline = time.monotonic() + 30
    total = 0.0
    while time.monotonic() < deadline:
        total = 0.0
        for exporter in exporters:
            with requests.get(f"{exporter.url}/metrics", timeout=5) as response:
                for line in response.text.splitlines():
                    if line.startswith("aicrm_source_events_total{"):
                        total += float(line.rsplit(" ", 1)[1])
        if total == lines:
            return
        time.sleep(0.2)
    pytest.fail(f"exporters ingested {total} events, expected {lines}")


# --- tests --------------------------------------------------------------------------------


@pytest.mark.integration
def test_victoria_metrics_with_vmalert_answers_like_prometheus(
    tmp_path: Path,
    start_exporter: Callable[[str, str], Exporter],
    fast_rules: list[Path],
    prometheus_factory: Callable[..., servers.PrometheusServer],
    vm_factory: Callable[..., servers.VictoriaMetricsServer],
    vmalert_factory: Callable[..., servers.VmalertServer],
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
) -> None:
    events = tmp_path / "events"
    events.mkdir()
    files = [events / "a.jsonl", events / "b.jsonl"]
    for f in files:
        f.touch()
    exporter = start_exporter("all", str(events / "*.jsonl"))
    write_blocks(files, FIRST_BLOCKS)
    wait_ingested([exporter], FIRST_BLOCKS * len(files) * len(workload_block()))
    alertmanager = alertmanager_factory(ALERTMANAGER_CONFIG)
    am = f"127.0.0.1:{alertmanager.port}"
    # As docker-compose.yml runs it: VictoriaMetrics hands /api/v1/alerts to vmalert.
    vmalert_port = servers.free_port()
    vm = vm_factory(extra_args=[f"-vmalert.proxyURL=http://127.0.0.1:{vmalert_port}"])
    config = prometheus_config([f"127.0.0.1:{exporter.port}"], am)
    config["remote_write"] = [scale_remote_write(vm.url)]
    rules = [*fast_rules, always_firing_rule(tmp_path)]
    prometheus = prometheus_factory(config, rule_files=rules)
    vmalert = vmalert_factory(
        rules, vm.url, remote_write_url=vm.url, notifier_url=alertmanager.url,
        extra_args=["-remoteWrite.flushInterval=500ms"], port=vmalert_port,
    )
    prometheus.wait_for_targets_up()

    blocks = write_batches(files)
    wait_ingested([exporter], blocks * len(files) * len(workload_block()))
    wait_scraped(prometheus, blocks * len(files) * len(workload_block()))

    # Remote write is faithful: the raw totals are the same in both stores.
    wait_equal(prometheus, vm, TOTALS, rel=0, timeout=30, before=vm.force_flush)
    # Only vmalert wrote recorded series into VictoriaMetrics (remote write drops them).
    assert {r["metric"]["__name__"] for r in vm.query('{__name__=~".+:.+"}')}
    rule_health = [r for g in vmalert.rules() for r in g["rules"] if r.get("lastError")]
    assert rule_health == [], rule_health
    # vmalert over VictoriaMetrics gives the recorded series Prometheus gives.
    seen = wait_equal(prometheus, vm, EXACT, rel=1e-9, timeout=60, before=vm.force_flush)
    assert seen["global:aicrm_agent_task_results:success_ratio_rate5m"]
    assert len(seen["agent:aicrm_agent_task_results:success_ratio_rate5m"]) == 5
    wait_equal(prometheus, vm, CLOSE, rel=CLOSE_REL, timeout=30, before=vm.force_flush)
    # The API pointed at either store answers the same (ratios; see the note on rates below).
    assert api_success_ratios(vm.url) == pytest.approx(api_success_ratios(prometheus.url),
                                                       rel=1e-9)
    # Rates themselves are not compared here: while the window is not yet full, VictoriaMetrics'
    # rate() divides by the time the samples span, Prometheus' by the window (extrapolated).

    # The ruler's, Prometheus's and Alertmanager's own series the system alerts read exist
    # under those names in the real binaries (a typo would leave an alert that never fires).
    served = {name: metric_names(url + "/metrics")
              for name, url in (("prometheus", prometheus.url), ("alertmanager", alertmanager.url),
                                ("vmalert", vmalert.url), ("vm", vm.url))}
    for name in system_alert_upstream_names():
        component = name.split("_", 1)[0]
        assert name in served[component], f"{component} does not serve {name}"

    # /executive-dashboard's alerts, with their annotations, through VictoriaMetrics's proxy to
    # vmalert as from Prometheus (without the proxy VictoriaMetrics answers an empty list).
    over_vm = executive_alert(vm.url)
    assert over_vm == executive_alert(prometheus.url)
    assert over_vm["summary"] == ALWAYS_FIRING_SUMMARY
    assert over_vm["severity"] == "ticket" and over_vm["labels"] == {"component": "scale-test"}


def metric_names(url: str) -> set[str]:
    with requests.get(url, timeout=10) as r:
        r.raise_for_status()
        return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)[{ ]", r.text, re.M)}


def system_alert_upstream_names() -> set[str]:
    """Prometheus's, Alertmanager's, vmalert's and VictoriaMetrics' own series named in
    system.alerts.yml and the scale profile's ruler watch."""
    names = set()
    for path in (RULES / "alerts" / "system.alerts.yml", RULES / "scale" / "ruler.alerts.yml"):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                names |= set(re.findall(
                    r"\b((?:prometheus|alertmanager|vmalert|vm)_[a-z_]+)\b", rule["expr"]))
    assert {"vmalert_recording_rules_error", "prometheus_rule_evaluation_failures_total",
            "alertmanager_config_last_reload_successful", "vm_storage_is_read_only"} <= names, names
    return names


ALWAYS_FIRING = "ScaleTestAlwaysFiring"
ALWAYS_FIRING_SUMMARY = "Fires from the first evaluation, in both rulers."


def always_firing_rule(tmp: Path) -> Path:
    path = tmp / "always-firing.alerts.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "scale-test", "interval": "1s", "rules": [
        {"alert": ALWAYS_FIRING, "expr": "vector(1)",
         "labels": {"severity": "ticket", "component": "scale-test"},
         "annotations": {"summary": ALWAYS_FIRING_SUMMARY}}]}]}))
    return path


def executive_alert(query_url: str) -> dict[str, Any]:
    """The always-firing alert as /executive-dashboard over ``query_url`` lists it."""
    import api
    from tests.api.conftest import API_KEY, api_config

    app = api.create_app(api_config(query_url), api_keys=(API_KEY,))
    try:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while not found and time.monotonic() < deadline:
            r = app.test_client().get("/executive-dashboard", headers={"X-API-Key": API_KEY})
            assert r.status_code == 200, r.json
            found = [a for a in r.json["data"]["alerts"] if a["name"] == ALWAYS_FIRING]
            time.sleep(0.2)
    finally:
        api.close_app(app)
    assert len(found) == 1, f"{ALWAYS_FIRING} not listed by the API over {query_url}"
    alert = found[0]
    assert alert["active_at"], alert
    return {k: v for k, v in alert.items() if k != "active_at"}


def api_success_ratios(query_url: str) -> dict[str, float]:
    """/agent-performance's success ratio per agent, from the REST API over ``query_url``."""
    import api
    from tests.api.conftest import api_config

    app = api.create_app(api_config(query_url), api_keys=("scale-test-key",))
    try:
        r = app.test_client().get("/agent-performance?window=5m")
        assert r.status_code == 200, r.json
        out = {a["agent"]: a["success_ratio"]["value"] for a in r.json["data"]["agents"]}
    finally:
        api.close_app(app)
    assert out and all(v is not None for v in out.values()), out
    return out


@pytest.mark.integration
def test_remote_write_ships_only_the_scale_watch_alerts(
    tmp_path: Path,
    prometheus_factory: Callable[..., servers.PrometheusServer],
    vm_factory: Callable[..., servers.VictoriaMetricsServer],
) -> None:
    """prometheus.scale.yml's remote write: the state of the alerts of recording_rules/scale/
    (Prometheus their only ruler) reaches VictoriaMetrics, where Grafana reads; recorded series
    and every other alert's state (vmalert's to write) do not, nor the marking label."""
    watch = [r["alert"] for g in yaml.safe_load(
        (RULES / "scale" / "ruler.alerts.yml").read_text(encoding="utf-8"))["groups"]
        for r in g["rules"]]
    rules = tmp_path / "fire.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "fire", "interval": "1s", "rules": [
        {"record": "scale_test:vector:one", "expr": "vector(1)"},
        *({"alert": name, "expr": "vector(1)"} for name in [*watch, "AicrmExporterDown"]),
        {"alert": "AicrmStoreReadOnlyNot", "expr": "vector(1)", "for": "1h"},
    ]}]}))
    vm = vm_factory()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "remote_write": [scale_remote_write(vm.url)], "scrape_configs": []}
    prometheus = prometheus_factory(config, rule_files=[rules])

    def shipped() -> set[str]:
        vm.force_flush()
        return {r["metric"]["alertname"] for r in vm.query("ALERTS")}

    deadline = time.monotonic() + 30
    while shipped() != set(watch) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert shipped() == set(watch)
    # Prometheus holds them all (the pending one too): the remote write chose.
    assert {r["metric"]["alertname"] for r in prometheus.query("ALERTS")} == {
        *watch, "AicrmExporterDown", "AicrmStoreReadOnlyNot"}
    assert not vm.query('{__name__=~"scale_test:vector:one|ALERTS_FOR_STATE"}')
    assert all(set(r["metric"]) == {"__name__", "alertname", "alertstate"}
               for r in vm.query("ALERTS")), vm.query("ALERTS")


@pytest.mark.integration
def test_two_exporter_shards_add_up_to_one(
    tmp_path: Path,
    start_exporter: Callable[[str, str], Exporter],
    fast_rules: list[Path],
    prometheus_factory: Callable[..., servers.PrometheusServer],
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
) -> None:
    events = tmp_path / "events"
    events.mkdir()
    files = [events / "shard-a-1.jsonl", events / "shard-a-2.jsonl",
             events / "shard-b-1.jsonl", events / "shard-b-2.jsonl"]
    for f in files:
        f.touch()
    single = start_exporter("single", str(events / "*.jsonl"))
    shard_a = start_exporter("a", str(events / "shard-a-*.jsonl"))
    shard_b = start_exporter("b", str(events / "shard-b-*.jsonl"))
    write_blocks(files, FIRST_BLOCKS)
    wait_ingested([single], FIRST_BLOCKS * len(files) * len(workload_block()))
    alertmanager = alertmanager_factory(ALERTMANAGER_CONFIG)
    am = f"127.0.0.1:{alertmanager.port}"
    one = prometheus_factory(
        prometheus_config([f"127.0.0.1:{single.port}"], am), rule_files=fast_rules
    )
    one.name = "prometheus-single"
    two = prometheus_factory(
        prometheus_config([f"127.0.0.1:{shard_a.port}", f"127.0.0.1:{shard_b.port}"], am),
        rule_files=fast_rules,
    )
    two.name = "prometheus-shards"
    one.wait_for_targets_up()
    two.wait_for_targets_up()

    blocks = write_batches(files)
    lines = blocks * len(workload_block())
    wait_ingested([single], 4 * lines)
    wait_ingested([shard_a], 2 * lines)
    wait_ingested([shard_b], 2 * lines)
    wait_scraped(one, 4 * lines)
    wait_scraped(two, 4 * lines)

    totals = wait_equal(one, two, TOTALS, rel=0, timeout=30)
    results = totals["sum by (agent, task_type, outcome) (aicrm_agent_task_results_total)"]
    assert sum(results.values()) == 4 * blocks * sum(
        e["event"] == "task_result" for e in workload_block()
    )
    wait_equal(one, two, EXACT, rel=1e-9, timeout=60)
    # Config gauges come from every shard and are read with max by: no double counting. The
    # retries component divides retries (aicrm-agents-activity) by results (aicrm-agents):
    # two groups, so it is only close (see CLOSE).
    component = "global:aicrm_workflow_efficiency_component:ratio1h"
    wait_equal(one, two, (f'{component}{{component!="retries"}}',), rel=1e-9, timeout=30)
    wait_equal(one, two, (f'{component}{{component="retries"}}',), rel=CLOSE_REL, timeout=30)
    wait_equal(one, two, CLOSE, rel=CLOSE_REL, timeout=30)
    wait_equal(one, two, RATES, rel=RATE_REL, timeout=30)
