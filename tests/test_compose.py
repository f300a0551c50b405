"""docker-compose.yml, the Dockerfile and prometheus/: parsed and cross-checked statically.

No Docker engine is needed: the compose file is read as YAML and checked against the repository
(every bind-mounted path exists), config.json and DESIGN.md's ports, the Prometheus configs
(promtool, with the rule paths mapped to the repository) and the Alertmanager config (amtool).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import require_binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "prometheus"

# DESIGN.md, "Deployment".
PORTS = {
    "exporter": 9464,
    "api": 5000,
    "prometheus": 9090,
    "alertmanager": 9093,
    "grafana": 3000,
    "victoriametrics": 8428,
}
DEFAULT_SERVICES = {"exporter", "api", "prometheus", "alertmanager", "grafana"}
PROFILES = {"simulator": ["demo"], "victoriametrics": ["scale"], "vmalert": ["scale"]}
# Where each compose path is mounted, so in-container paths can be mapped back to the repo.
PROMETHEUS_RULES_MOUNT = "/etc/prometheus/rules"
VMALERT_RULES_MOUNT = "/etc/rules"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load(COMPOSE)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of every bind mount (a source starting with . or /)."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                out.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def published(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) pairs."""
    out = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def command_flags(service: dict[str, Any]) -> dict[str, str]:
    flags = {}
    for arg in service.get("command", []):
        m = re.match(r"^-{1,2}([\w.-]+)=(.*)$", str(arg))
        if m:
            flags.setdefault(m.group(1), m.group(2))
    return flags


def test_services_and_profiles(services: dict[str, Any]) -> None:
    assert set(services) == DEFAULT_SERVICES | set(PROFILES)
    for name, service in services.items():
        assert service.get("profiles") == PROFILES.get(name), name


def test_every_bind_mount_exists(services: dict[str, Any]) -> None:
    mounts = [(name, src, dst) for name, s in services.items() for src, dst in bind_mounts(s)]
    assert mounts
    missing = [(name, src) for name, src, _ in mounts if not (ROOT / src).exists()]
    assert missing == []


def test_ports_match_design_and_config(services: dict[str, Any]) -> None:
    for name, port in PORTS.items():
        assert published(services[name]) == [(port, port)], name
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    config = json.loads((ROOT / "config.json").read_text())
    exporter_port = int(config["exporter"]["listen"].rsplit(":", 1)[1])
    assert exporter_port == PORTS["exporter"]
    assert config["api"]["prometheus_url"].endswith(f":{PORTS['prometheus']}")
    assert f"0.0.0.0:{PORTS['exporter']}" in services["exporter"]["command"]
    assert f"0.0.0.0:{PORTS['api']}" in services["api"]["command"]
    vm_listen = command_flags(services["victoriametrics"])["httpListenAddr"]
    assert vm_listen == f":{PORTS['victoriametrics']}"


def test_healthchecks_and_dependencies(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"][0] == "CMD", f"{name} has no exec-form healthcheck"
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert spec["condition"] == "service_healthy", (name, dep)
            # A service may only wait for one that runs whenever it runs.
            dep_profiles = services[dep].get("profiles")
            assert dep_profiles is None or dep_profiles == service.get("profiles"), (name, dep)
    # Data that must survive restarts lives in named volumes.
    named = {
        name: {str(v).split(":")[0] for v in s.get("volumes", []) if not str(v).startswith(".")}
        for name, s in services.items()
    }
    assert "aicrm-data" in named["exporter"] and "aicrm-data" in named["simulator"]
    assert "prometheus-data" in named["prometheus"]
    assert "alertmanager-data" in named["alertmanager"]
    assert "grafana-data" in named["grafana"]
    assert "vm-data" in named["victoriametrics"]


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    for var in ("AICRM_INGEST_TOKEN", "AICRM_API_KEYS", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(r"\$\{" + var + r":\?", text), f"{var} must be required, not defaulted"
    for secret in compose["secrets"].values():
        assert set(secret) == {"environment"}
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".dockerignore").read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for var in set(re.findall(r"\$\{(\w+)", text)) | {
        s["environment"] for s in compose["secrets"].values()
    }:
        assert var in deploy, f"docs/deploy.md does not mention {var}"


def _prometheus_mapped(name: str, tmp_path: Path) -> Path:
    """The compose Prometheus config with its in-container rule paths mapped to the repo."""
    cfg = load(PROMETHEUS_DIR / name)
    cfg["rule_files"] = [
        p.replace(PROMETHEUS_RULES_MOUNT, str(ROOT / "recording_rules"))
        for p in cfg.get("rule_files", [])
    ]
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.scale.yml"])
def test_promtool_checks_the_prometheus_configs(name: str, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    path = _prometheus_mapped(name, tmp_path)
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if name == "prometheus.yml":
        # Every recording and alerting rule file is loaded, and no promtool test file.
        rules = sorted((ROOT / "recording_rules").glob("*.rules.yml")) + sorted(
            (ROOT / "recording_rules").glob("alerts/*.alerts.yml")
        )
        for rule in rules:
            assert f"SUCCESS: {rule}" in result.stdout + result.stderr or str(rule) in (
                result.stdout + result.stderr
            ), rule
        assert "_test.yml" not in result.stdout + result.stderr


def test_prometheus_configs_agree_with_compose(services: dict[str, Any]) -> None:
    base = load(PROMETHEUS_DIR / "prometheus.yml")
    scale = load(PROMETHEUS_DIR / "prometheus.scale.yml")
    # The scale variant: the same scrape jobs and alerting, remote write instead of rules.
    assert scale["scrape_configs"] == base["scrape_configs"]
    assert scale["alerting"] == base["alerting"]
    assert scale["global"] == base["global"]
    assert "rule_files" not in scale
    (remote,) = scale["remote_write"]
    assert remote["url"] == f"http://victoriametrics:{PORTS['victoriametrics']}/api/v1/write"
    # Every target is a compose service on its DESIGN port (Prometheus scrapes itself).
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in base["scrape_configs"]}
    assert jobs == {
        "aicrm-exporter": [f"exporter:{PORTS['exporter']}"],
        "aicrm-api": [f"api:{PORTS['api']}"],
        "prometheus": [f"localhost:{PORTS['prometheus']}"],
        "alertmanager": [f"alertmanager:{PORTS['alertmanager']}"],
    }
    (am,) = base["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == [f"alertmanager:{PORTS['alertmanager']}"]
    # The rule globs resolve through the compose mount to the repo's rule files.
    mounts = dict((dst, src) for src, dst in bind_mounts(services["prometheus"]))
    assert mounts[PROMETHEUS_RULES_MOUNT] == "./recording_rules"
    for name in ("prometheus.yml", "prometheus.scale.yml"):
        assert mounts[f"/etc/prometheus/{name}"] == f"./prometheus/{name}"
    for glob in base["rule_files"]:
        rel = glob.removeprefix(PROMETHEUS_RULES_MOUNT + "/")
        assert list((ROOT / "recording_rules").glob(rel)), glob


def test_vmalert_runs_the_same_rule_files(services: dict[str, Any]) -> None:
    base = load(PROMETHEUS_DIR / "prometheus.yml")
    vmalert = services["vmalert"]
    rules = [a.split("=", 1)[1] for a in vmalert["command"] if str(a).startswith("-rule=")]
    mounts = dict((dst, src) for src, dst in bind_mounts(vmalert))
    assert mounts[VMALERT_RULES_MOUNT] == "./recording_rules"
    assert [r.replace(VMALERT_RULES_MOUNT, "") for r in rules] == [
        r.replace(PROMETHEUS_RULES_MOUNT, "") for r in base["rule_files"]
    ]
    flags = command_flags(vmalert)
    vm = f"http://victoriametrics:{PORTS['victoriametrics']}"
    assert flags["datasource.url"] == vm and flags["remoteWrite.url"] == vm
    assert flags["notifier.url"] == f"http://alertmanager:{PORTS['alertmanager']}"


def test_alertmanager_config_passes_amtool(services: dict[str, Any]) -> None:
    amtool = require_binary("amtool")
    mounts = dict((dst, src) for src, dst in bind_mounts(services["alertmanager"]))
    config = ROOT / mounts["/etc/alertmanager/alertmanager.yml"]
    result = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The secret files alertmanager.yml reads are provided by compose secrets.
    glob = load(config)["global"]
    targets = {s["target"] for s in services["alertmanager"]["secrets"]}
    for key in ("slack_api_url_file", "smtp_auth_password_file"):
        if key in glob:
            assert glob[key] in targets, key


def test_grafana_provisioning(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = dict((dst, src) for src, dst in bind_mounts(grafana))
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasources = [
        ds for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in load(f).get("datasources", [])
    ]
    prometheus = [ds for ds in datasources if ds.get("uid") == "aicrm-prometheus"]
    assert prometheus and prometheus[0]["url"] == "${PROMETHEUS_URL}"
    assert "PROMETHEUS_URL" in grafana["environment"]
    providers = [
        p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in load(f).get("providers", [])
    ]
    paths = {p["options"]["path"] for p in providers}
    # Every provider reads a mounted directory of the repo's dashboards.
    for path in paths:
        source = next((src for dst, src in mounts.items() if path.startswith(dst)), None)
        assert source is not None, f"dashboard provider path {path} is not mounted"
        assert list((ROOT / source).rglob("*.json")), source


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")
        and not line.startswith(" ")
    ]
    keywords = [i[0] for i in instructions]
    froms = [i[1] for i in instructions if i[0] == "FROM"]
    assert froms == ["python:3.12-slim"]
    users = [i[1].strip() for i in instructions if i[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in keywords
    assert keywords.index("USER") < keywords.index("CMD")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "data", ".env"):
        assert path in ignored
