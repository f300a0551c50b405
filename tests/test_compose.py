"""docker-compose.yml, the Dockerfile and prometheus/: parsed and cross-checked statically.

No Docker engine is needed: the compose file is read as YAML and checked against the repository
(every bind-mounted path exists), config.json and DESIGN.md's ports, the Prometheus configs
(promtool, with the rule paths mapped to the repository) and the Alertmanager config (amtool).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter import alertmanager_config
from exporter.config import ENV_OVERRIDES
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
DEFAULT_SERVICES = {
    "exporter", "api", "redis", "prometheus", "alertmanager-config", "alertmanager", "grafana",
}
# Run once and exit; the services after them wait for them to complete.
ONE_SHOT = {"alertmanager-config"}
PROFILES = {"simulator": ["demo"], "victoriametrics": ["scale"], "vmalert": ["scale"]}
# Where each compose path is mounted, so in-container paths can be mapped back to the repo.
PROMETHEUS_RULES_MOUNT = "/etc/prometheus/rules"
PROMETHEUS_CONFIG_MOUNT = "/etc/prometheus/config"
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
        if name in ONE_SHOT:
            # The image's HEALTHCHECK polls the exporter; a job that exits has no health.
            assert check == {"disable": True}, name
            assert service.get("restart") == "no", name
        else:
            assert check and check["test"][0] == "CMD", f"{name} has no exec-form healthcheck"
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec["condition"] == expected, (name, dep)
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
    assert "alertmanager-config" in named["alertmanager"]
    assert "grafana-data" in named["grafana"]
    assert "vm-data" in named["victoriametrics"]


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    for var in ("AICRM_INGEST_TOKEN", "AICRM_API_KEYS", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(r"\$\{" + var + r":\?", text), f"{var} must be required, not defaulted"
    for secret in compose["secrets"].values():
        assert set(secret) == {"environment"}
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".dockerignore").read_text()
    # No secret in a container's environment (docker inspect shows it): Grafana reads a file.
    services = compose["services"]
    grafana = services["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/grafana_admin_password")
    assert grafana["secrets"] == ["grafana_admin_password"]
    assert compose["secrets"]["grafana_admin_password"] == {"environment": "GRAFANA_ADMIN_PASSWORD"}
    for name, service in services.items():
        for var, value in (service.get("environment") or {}).items():
            assert not re.search(r"PASSWORD|SECRET|SLACK|SMTP", var) or var.endswith("__FILE"), (
                name, var, value)
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
    # The scale variant: the same scrape jobs and alerting, remote write instead of rules, and
    # the profile's own store and ruler scraped on the ports their services listen on.
    vmalert_port = command_flags(services["vmalert"])["httpListenAddr"].rsplit(":", 1)[1]
    n = len(base["scrape_configs"])
    assert scale["scrape_configs"][:n] == base["scrape_configs"]
    assert {j["job_name"]: j["static_configs"][0]["targets"]
            for j in scale["scrape_configs"][n:]} == {
        "victoriametrics": [f"victoriametrics:{PORTS['victoriametrics']}"],
        "vmalert": [f"vmalert:{vmalert_port}"],
    }
    assert scale["alerting"] == base["alerting"]
    assert scale["global"] == base["global"]
    # Its one rule file watches vmalert and VictoriaMetrics from outside (both down: vmalert
    # evaluates nothing); vmalert's -rule globs do not load it, so no alert has two rulers.
    (watch,) = scale["rule_files"]
    rel = watch.removeprefix(PROMETHEUS_RULES_MOUNT + "/")
    assert (ROOT / "recording_rules" / rel).is_file(), watch
    vmalert_globs = [a.split("=", 1)[1].removeprefix(VMALERT_RULES_MOUNT + "/")
                     for a in services["vmalert"]["command"] if str(a).startswith("-rule=")]
    assert not any(fnmatch.fnmatch(rel, g) for g in vmalert_globs), (rel, vmalert_globs)
    assert not any(fnmatch.fnmatch(rel, g.removeprefix(PROMETHEUS_RULES_MOUNT + "/"))
                   for g in base["rule_files"]), "the default profile loads it too"
    # Their ALERTS, and no other alert's, go on to VictoriaMetrics (tests/test_scale.py runs it).
    watch = {r["alert"] for g in load(ROOT / "recording_rules" / rel)["groups"]
             for r in g["rules"]}
    (marked,) = [c["regex"] for c in scale["remote_write"][0]["write_relabel_configs"]
                 if c.get("target_label") == "__tmp_scale_watch"]
    names = re.fullmatch(r"ALERTS;\((.+)\)", marked)
    assert names is not None and set(names.group(1).split("|")) == watch, marked
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
    assert mounts[PROMETHEUS_CONFIG_MOUNT] == "./prometheus"
    config_file = command_flags(services["prometheus"])["config.file"]
    assert config_file == PROMETHEUS_CONFIG_MOUNT + "/${PROMETHEUS_CONFIG:-prometheus.yml}"
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
    # VictoriaMetrics hands /api/v1/alerts to vmalert (else it answers an empty list and the
    # API's /executive-dashboard shows no alerts; tests/test_scale.py runs it).
    port = flags["httpListenAddr"].rsplit(":", 1)[1]
    assert command_flags(services["victoriametrics"])["vmalert.proxyURL"] == (
        f"http://vmalert:{port}")


def test_reloaded_configuration_is_mounted_as_directories(services: dict[str, Any]) -> None:
    """A single-file bind mount pins the file's inode: an editor that saves by writing a new
    file and renaming it over the old leaves the container on the old content, and
    `/-/reload` silently reloads that."""
    for name in ("prometheus", "alertmanager", "alertmanager-config", "vmalert", "grafana"):
        for src, dst in bind_mounts(services[name]):
            assert (ROOT / src).is_dir(), f"{name}: {src} is mounted as a single file at {dst}"


def _render_as_compose(
    services: dict[str, Any], tmp_path: Path, secrets: dict[str, str], webhook: str | None
) -> tuple[Path, str]:
    """Run the alertmanager-config service's command with its mounts mapped to the repository
    and ``tmp_path``; returns the rendered file and the command's output."""
    service = services["alertmanager-config"]
    command = [str(a) for a in service["command"]]
    assert command[:3] == ["python", "-m", "exporter.alertmanager_config"]
    args = dict(zip(command[3::2], command[4::2], strict=True))
    mounts = dict((dst, src) for src, dst in bind_mounts(service))
    source_dir = posix_parent(args["--source"])
    source = ROOT / mounts[source_dir] / args["--source"].removeprefix(source_dir + "/")
    output = tmp_path / "rendered" / "alertmanager.yml"
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    targets = {s["source"]: s["target"] for s in service["secrets"]}
    for name, value in secrets.items():
        (secret_dir / Path(targets[name]).name).write_text(value)
    env = {k: v for k, v in os.environ.items() if k != alertmanager_config.WEBHOOK_ENV}
    if webhook is not None:
        env[alertmanager_config.WEBHOOK_ENV] = webhook
    result = subprocess.run(
        [".venv/bin/python" if (ROOT / ".venv/bin/python").exists() else "python3", "-m",
         "exporter.alertmanager_config", "--source", str(source), "--output", str(output),
         "--templates-dir", args["--templates-dir"], "--secrets-dir", str(secret_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return output, result.stderr


def posix_parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def test_alertmanager_reads_what_alertmanager_config_renders(services: dict[str, Any]) -> None:
    render, am = services["alertmanager-config"], services["alertmanager"]
    assert am["depends_on"]["alertmanager-config"] == {
        "condition": "service_completed_successfully"}
    # The rendered file lands in a named volume that Alertmanager mounts read-only where its
    # --config.file points.
    command = [str(a) for a in render["command"]]
    output = command[command.index("--output") + 1]
    volume = next(v.split(":") for v in render["volumes"] if v.startswith("alertmanager-config:"))
    assert output == volume[1] + "/alertmanager.yml"
    am_volume = next(v.split(":") for v in am["volumes"] if v.startswith("alertmanager-config:"))
    assert am_volume[2] == "ro"
    assert command_flags(am)["config.file"] == am_volume[1] + "/alertmanager.yml"
    # Templates resolve where Alertmanager mounts them.
    templates_dir = command[command.index("--templates-dir") + 1]
    mounts = dict((dst, src) for src, dst in bind_mounts(am))
    assert mounts[templates_dir + "/templates"] == "./alertmanager/templates"
    # Both see the secrets at the paths alertmanager.yml names.
    glob = load(ROOT / "alertmanager" / "alertmanager.yml")["global"]
    for service in (render, am):
        targets = {s["target"] for s in service["secrets"]}
        for key in ("slack_api_url_file", "smtp_auth_password_file"):
            assert glob[key] in targets, (key, service["command"])
    assert render["environment"][alertmanager_config.WEBHOOK_ENV] == "${AICRM_WEBHOOK_URL:-}"


@pytest.mark.parametrize(
    ("secrets", "webhook", "integrations"),
    [
        # docs/deploy.md's .env with the optional values left empty.
        ({"slack_webhook_url": "", "smtp_password": ""}, None, set()),
        ({"slack_webhook_url": "\n", "smtp_password": ""}, "http://hooks:8080/alerts",
         {"webhook_configs"}),
        ({"slack_webhook_url": "https://hooks.example.com/x\n", "smtp_password": ""}, None,
         {"slack_configs"}),
        ({"slack_webhook_url": "https://hooks.example.com/x", "smtp_password": "pw"},
         "https://hooks.example.com/alerts",
         {"slack_configs", "email_configs", "webhook_configs"}),
    ],
)
def test_rendered_alertmanager_config_passes_amtool(
    services: dict[str, Any], tmp_path: Path, secrets: dict[str, str], webhook: str | None,
    integrations: set[str],
) -> None:
    amtool = require_binary("amtool")
    config, output = _render_as_compose(services, tmp_path, secrets, webhook)
    result = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = load(config)
    used = {k for r in cfg["receivers"] for k in r if k.endswith("_configs")}
    assert used == integrations
    hooks = {h["url"] for r in cfg["receivers"] for h in r.get("webhook_configs", [])}
    assert hooks == ({webhook} if webhook else set())
    # Nothing secret is copied into the rendered file, only the paths to read it from.
    text = config.read_text()
    for value in secrets.values():
        assert not value.strip() or value.strip() not in text
    assert cfg["templates"] == ["/etc/alertmanager/templates/*.tmpl"]
    if not integrations:
        assert "notify no one" in output


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
    # A patch release (and Debian release): a floating tag rebuilds onto another interpreter.
    assert len(froms) == 1 and re.fullmatch(r"python:3\.12\.\d+-slim-\w+", froms[0]), froms
    users = [i[1].strip() for i in instructions if i[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in keywords
    assert keywords.index("USER") < keywords.index("CMD")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "data", ".env"):
        assert path in ignored


def test_redis_is_shared_by_the_api_workers(services: dict[str, Any]) -> None:
    """gunicorn runs 4 workers: without Redis every worker keeps its own rate-limit windows and
    cache, so a client gets 4 times its limit and cached answers miss 3 times in 4."""
    api, redis = services["api"], services["redis"]
    (var,) = [v for v, (section, key) in ENV_OVERRIDES.items() if (section, key) == (
        "api", "redis_url")]
    assert api["environment"][var] == "redis://redis:6379/0"
    assert api["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # only the API talks to it, inside the compose network
    assert "profiles" not in redis


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        if image.startswith("aicrm-analytics:"):
            continue  # built here from the Dockerfile (test_dockerfile)
        tag = image.rsplit(":", 1)[1] if ":" in image else "latest"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned"
