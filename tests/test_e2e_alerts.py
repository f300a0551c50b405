"""End to end: simulator with an incident → exporter → Prometheus with the project's rules →
Alertmanager with the project's routing → a webhook receiver in this test.

The rule files are the real ones, copied with their evaluation intervals and `for:` durations
shortened so the chain completes in a minute; Alertmanager runs the real alertmanager.yml with
the webhook URL pointed at this test and secret files created empty.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import ProcessHandle, WebhookReceiver, free_port, http_ok

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "recording_rules").glob("*.rules.yml")) + sorted(
    (ROOT / "recording_rules" / "alerts").glob("*.alerts.yml"))
DEGRADED = "lead-qualifier"


def fast_rule_copies(dest: Path, interval: str = "1s", for_: str = "0s") -> list[Path]:
    """The project's rule files with short intervals and `for:`, same expressions."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in RULES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = interval
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = for_
        target = dest / path.name
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(target)
    return out


def alertmanager_config(tmp: Path, webhook_url: str) -> dict[str, Any]:
    """alertmanager.yml as shipped, with secrets in empty temp files and our webhook."""
    cfg = yaml.safe_load((ROOT / "alertmanager" / "alertmanager.yml").read_text())
    secrets = tmp / "secrets"
    secrets.mkdir()
    for key, value in list(cfg.get("global", {}).items()):
        if key.endswith("_file"):
            f = secrets / Path(value).name
            f.write_text("http://127.0.0.1:9/unused\n" if "url" in key else "unused\n")
            cfg["global"][key] = str(f)
    cfg["templates"] = [str(ROOT / "alertmanager" / t) for t in cfg.get("templates", [])]
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    # Deliver quickly: the routing tree, matchers and receivers stay as shipped.
    def shorten(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(cfg["route"])
    cfg["route"]["group_wait"] = "1s"
    cfg["route"]["group_interval"] = "1s"
    return cfg


@pytest.mark.integration
def test_incident_alert_reaches_the_webhook(
    tmp_path: Path, prometheus_factory: Any, alertmanager_factory: Any
) -> None:
    receiver = WebhookReceiver()
    procs: list[ProcessHandle] = []
    try:
        exporter_port = free_port()
        cfg = json.loads((ROOT / "config.json").read_text())
        cfg["sources"] = {
            "event_logs": [{"name": "agent-logs", "path": str(tmp_path / "events" / "*.jsonl")}],
            "task_db": {"url": f"sqlite:///{tmp_path / 'tasks.db'}", "poll_seconds": 1},
        }
        cfg["exporter"] = {"listen": f"127.0.0.1:{exporter_port}",
                           "state_dir": str(tmp_path / "state")}
        cfg["links"] = {"grafana_url": "https://grafana.example.com/",
                        "runbook_url": "https://runbooks.example.com/aicrm.md"}
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        simulator = ProcessHandle("simulator", tmp_path)
        simulator.start([sys.executable, "-m", "exporter.simulate", "--config", str(config_path),
                         "--rate", "10", "--speedup", "30", "--seed", "3", "--duration", "300",
                         "--control", str(tmp_path / "incidents"),
                         "--incident", f"agent-degraded:{DEGRADED}"], env=env)
        procs.append(simulator)
        exporter = ProcessHandle("exporter", tmp_path)
        exporter.start([sys.executable, "-m", "exporter", "--config", str(config_path)], env=env,
                       ready_check=http_ok(f"http://127.0.0.1:{exporter_port}/healthz"))
        procs.append(exporter)

        am = alertmanager_factory(alertmanager_config(tmp_path, receiver.url))
        prom = prometheus_factory({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "alerting": {"alertmanagers": [
                {"static_configs": [{"targets": [f"127.0.0.1:{am.port}"]}]}]},
            "scrape_configs": [{
                "job_name": "aicrm-exporter",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            }],
        }, rule_files=fast_rule_copies(tmp_path / "rules"))

        deadline = time.monotonic() + 120
        firing: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not firing:
            firing = [a for a in receiver.alerts()
                      if a["labels"].get("alertname") == "AicrmAgentSuccessBelowObjective"
                      and a["labels"].get("agent") == DEGRADED and a["status"] == "firing"]
            time.sleep(1)
        assert firing, (
            "no AicrmAgentSuccessBelowObjective for the degraded agent reached the webhook; "
            f"received: {[a['labels'] for a in receiver.alerts()]}; "
            f"ALERTS: {prom.query('ALERTS')}"
        )
        alert = firing[0]
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["team"] == "sales-ops"  # joined from aicrm_agent_info
        # Links start with config.json's bases, through aicrm_link_info.
        assert alert["annotations"]["dashboard_url"] == (
            f"https://grafana.example.com/d/aicrm-agents?var-agent={DEGRADED}")
        assert alert["annotations"]["runbook_url"] == (
            "https://runbooks.example.com/aicrm.md#aicrmagentsuccessbelowobjective")
        assert "below its objective" in alert["annotations"]["summary"]
        # The alert is about the incident, not noise: as results accumulate, the degraded
        # agent settles clearly below every healthy one.
        def ratios() -> dict[str, float]:
            return {r["metric"]["agent"]: float(r["value"][1]) for r in prom.query(
                "agent:aicrm_agent_task_results:success_ratio_rate1h")}

        def separated(r: dict[str, float]) -> bool:
            return r.get(DEGRADED, 1.0) < 0.75 and all(
                v > 0.8 for a, v in r.items() if a != DEGRADED)

        # Its own wait: on a loaded machine the simulator's events (and so the settling) come
        # slower than the alert, which fires as soon as the ratio crosses the objective.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not separated(ratios()):
            time.sleep(1)
        assert separated(ratios()), ratios()
        # Alertmanager itself holds it, routed by the shipped tree.
        assert any(a["labels"]["alertname"] == "AicrmAgentSuccessBelowObjective"
                   for a in am.alerts())

        # The exporter goes down: its aicrm_link_info goes stale at once, and the page still
        # links to the configured Grafana (the last links system.rules.yml recorded).
        exporter.stop()
        deadline = time.monotonic() + 60
        down: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not down:
            down = [a for a in prom.get_json("/api/v1/alerts")["data"]["alerts"]
                    if a["labels"]["alertname"] == "AicrmExporterDown"
                    and a["state"] == "firing"]
            time.sleep(0.5)
        assert down, "AicrmExporterDown did not fire after the exporter stopped"
        assert not prom.query("aicrm_link_info")
        assert down[0]["annotations"]["dashboard_url"] == (
            "https://grafana.example.com/d/aicrm-stack")
        assert down[0]["annotations"]["runbook_url"] == (
            "https://runbooks.example.com/aicrm.md#aicrmexporterdown")
    finally:
        for p in reversed(procs):
            p.stop()
        receiver.close()
