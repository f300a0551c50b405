"""Helpers of scripts/run.sh: generate the local configuration, wait for health, print status.

run.sh owns the processes; this module only writes files under the data directory and talks
HTTP to the components, so every decision about what runs where stays in one shell script.

    runlocal.py generate     write $AICRM_DATA_DIR/run/{config.json,prometheus.yml,alertmanager.yml}
    runlocal.py rules        the rule file globs Prometheus or vmalert evaluates, one a line
    runlocal.py ports        fail if a port run.sh is about to use is taken
    runlocal.py wait NAME URL PID LOG [TIMEOUT]
    runlocal.py targets      wait (bounded) until Prometheus has scraped every target once
    runlocal.py status       one line: each component's health, targets up, events ingested
    runlocal.py token        a random secret

Settings come from the environment run.sh exports (AICRM_DATA_DIR, AICRM_*_PORT, ...).
With AICRM_RUN_PROFILE=scale (docker-compose.yml's `scale` profile) Prometheus runs
prometheus/prometheus.scale.yml: it remote-writes to VictoriaMetrics and evaluates only the
watch on vmalert and VictoriaMetrics (recording_rules/scale/); vmalert evaluates the rest
against VictoriaMetrics, and the API queries VictoriaMetrics.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from exporter import alertmanager_config

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_TEMPLATE = ROOT / "prometheus" / "prometheus.yml"
PROMETHEUS_SCALE_TEMPLATE = ROOT / "prometheus" / "prometheus.scale.yml"
ALERTMANAGER_YML = ROOT / "alertmanager" / "alertmanager.yml"
RULES_DIR = ROOT / "recording_rules"
RULE_GLOBS = ("*.rules.yml", "alerts/*.alerts.yml")
"""What vmalert evaluates in the scale profile (compose's -rule flags)."""
PROMETHEUS_RULES_MOUNT = "/etc/prometheus/rules/"

PROFILE_ENV = "AICRM_RUN_PROFILE"
PROFILES = ("", "scale")
"""The default stack (unset or empty) and docker-compose.yml's `scale` profile."""
SCALE_COMPONENTS = ("victoriametrics", "vmalert")
"""What the scale profile runs besides the default stack."""

# Component (also its service name in docker-compose.yml) -> default port.
DEFAULT_PORTS = {
    "exporter": 9464,
    "api": 5000,
    "prometheus": 9090,
    "alertmanager": 9093,
    "victoriametrics": 8428,
    "vmalert": 8880,
}
# Scrape job in prometheus/prometheus.yml and prometheus.scale.yml -> the component it scrapes.
JOBS = {
    "aicrm-exporter": "exporter",
    "aicrm-api": "api",
    "prometheus": "prometheus",
    "alertmanager": "alertmanager",
    "victoriametrics": "victoriametrics",
    "vmalert": "vmalert",
}
# Services Debian's packages start on the same default ports (systemd units).
SYSTEM_UNITS = {
    "prometheus": "prometheus",
    "alertmanager": "prometheus-alertmanager",
    "victoriametrics": "victoria-metrics",
}
DURATION_RE = re.compile(r"^(\d+(ms|s|m|h))+$")


class Fail(Exception):
    """A message for the user; run.sh prints it and stops."""


def port_env(name: str) -> str:
    """The variable that sets a component's port: AICRM_<NAME>_PORT."""
    return f"AICRM_{name.upper()}_PORT"


def port(name: str) -> int:
    if name not in DEFAULT_PORTS:
        raise Fail(f"no component {name!r}; the components are {', '.join(DEFAULT_PORTS)}")
    value = os.environ.get(port_env(name)) or str(DEFAULT_PORTS[name])
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise Fail(f"{port_env(name)}={value!r} is not a port number")
    return int(value)


def local_url(name: str, path: str = "") -> str:
    return f"http://127.0.0.1:{port(name)}{path}"


def profile() -> str:
    value = os.environ.get(PROFILE_ENV, "")
    if value not in PROFILES:
        raise Fail(
            f"{PROFILE_ENV}={value!r} is not a run profile: set it to scale (VictoriaMetrics "
            "and vmalert, as docker-compose.yml's scale profile), or leave it unset or empty "
            "for the default stack"
        )
    return value


def scale() -> bool:
    return profile() == "scale"


def data_dir() -> Path:
    return Path(os.environ.get("AICRM_DATA_DIR") or ROOT / "data").resolve()


def api_enabled() -> bool:
    return os.environ.get("AICRM_RUN_API", "1") == "1"


def components() -> list[str]:
    """What run.sh starts in this profile, in DEFAULT_PORTS' order."""
    names = ["exporter", "prometheus", "alertmanager"]
    if api_enabled():
        names.append("api")
    if scale():
        names.extend(SCALE_COMPONENTS)
    return [name for name in DEFAULT_PORTS if name in names]


def query_component() -> str:
    """What the API (and Grafana in compose: AICRM_QUERY_URL) queries."""
    return "victoriametrics" if scale() else "prometheus"


def _duration(env: str) -> str | None:
    value = os.environ.get(env) or None
    if value is not None and not DURATION_RE.match(value):
        raise Fail(f"{env}={value!r} is not a Prometheus duration such as 15s or 1m")
    return value


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


# --- generate ---------------------------------------------------------------------------


def local_config(source: Path, data: Path) -> dict[str, Any]:
    """config.json with its data paths moved under ``data`` and the local listen addresses."""
    cfg = json.loads(source.read_text(encoding="utf-8"))
    base = source.resolve().parent
    repo_data = ROOT / "data"

    def move(path: str) -> str:
        p = Path(path) if os.path.isabs(path) else base / path
        try:
            return str(data / p.relative_to(repo_data))
        except ValueError:
            return str(p)

    sources = cfg.setdefault("sources", {})
    for log in sources.get("event_logs", []):
        log["path"] = move(log["path"])
    task_db = sources.get("task_db")
    if task_db and task_db.get("url", "").startswith("sqlite:///"):
        rel = task_db["url"].removeprefix("sqlite:///")
        if rel and not rel.startswith(":memory:"):
            task_db["url"] = "sqlite:///" + move(rel)
    exporter = cfg.setdefault("exporter", {})
    exporter["state_dir"] = move(exporter.get("state_dir", "data/state"))
    exporter["listen"] = f"127.0.0.1:{port('exporter')}"
    api = cfg.setdefault("api", {})
    api["prometheus_url"] = local_url(query_component())
    api["listen"] = f"127.0.0.1:{port('api')}"
    return cfg


def local_rules(run: Path, patterns: tuple[str, ...] = RULE_GLOBS) -> list[str]:
    """Rule file globs (under recording_rules/); with AICRM_RULE_INTERVAL, copies whose groups
    all use that interval."""
    interval = _duration("AICRM_RULE_INTERVAL")
    if interval is None:
        return [str(RULES_DIR / g) for g in patterns]
    out = run / "rules"
    for pattern in patterns:
        for path in sorted(RULES_DIR.glob(pattern)):
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            for group in doc["groups"]:
                group["interval"] = interval
            target = out / path.relative_to(RULES_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return [str(out / g) for g in patterns]


def template_rule_globs(template: dict[str, Any], source: Path) -> tuple[str, ...]:
    """The template's rule_files as globs under recording_rules/ (compose mounts it at
    PROMETHEUS_RULES_MOUNT): both profiles' Prometheus load what their file names."""
    globs = []
    for path in template.get("rule_files", []):
        if not str(path).startswith(PROMETHEUS_RULES_MOUNT):
            raise Fail(f"{source}: rule file {path!r} is not under {PROMETHEUS_RULES_MOUNT}")
        globs.append(str(path).removeprefix(PROMETHEUS_RULES_MOUNT))
    return tuple(globs)


def _local_target(url: str, source: Path) -> str:
    """A URL of the template (http://victoriametrics:8428/api/v1/write) on loopback."""
    parts = urlsplit(url)
    name = parts.hostname or ""
    if name not in components():
        raise Fail(f"{source}: {url!r} names no component run.sh starts in this profile")
    return urlunsplit(parts._replace(scheme="http", netloc=f"127.0.0.1:{port(name)}"))


def local_prometheus(
    template: dict[str, Any], rule_files: list[str], source: Path = PROMETHEUS_TEMPLATE
) -> dict[str, Any]:
    """``source`` (prometheus/prometheus.yml or prometheus.scale.yml) with loopback targets and
    remote-write URLs, local rule paths and intervals."""
    cfg = json.loads(json.dumps(template))  # deep copy
    glob = cfg.setdefault("global", {})
    scrape = _duration("AICRM_SCRAPE_INTERVAL")
    if scrape:
        glob["scrape_interval"] = scrape
        if _seconds(glob.get("scrape_timeout", "10s")) > _seconds(scrape):
            glob["scrape_timeout"] = scrape
    evaluation = _duration("AICRM_RULE_INTERVAL")
    if evaluation:
        glob["evaluation_interval"] = evaluation
    if rule_files:
        cfg["rule_files"] = rule_files
    else:
        cfg.pop("rule_files", None)
    cfg["alerting"] = {
        "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{port('alertmanager')}"]}]}]
    }
    for remote in cfg.get("remote_write", []):
        remote["url"] = _local_target(remote["url"], source)
    running = components()
    jobs = []
    for job in cfg.get("scrape_configs", []):
        name = job["job_name"]
        if name not in JOBS:
            raise Fail(f"{source}: job {name!r} has no local component")
        if JOBS[name] == "api" and not api_enabled():
            continue
        if JOBS[name] not in running:
            raise Fail(f"{source}: job {name!r} scrapes {JOBS[name]}, which runs only with "
                       f"{PROFILE_ENV}=scale")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port(JOBS[name])}"]}]
        jobs.append(job)
    cfg["scrape_configs"] = jobs
    return cfg


def local_alertmanager(source: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """alertmanager.yml with only the integrations configured here (exporter.alertmanager_config,
    the same rendering docker-compose.yml runs): webhooks only with AICRM_WEBHOOK_URL, Slack and
    e-mail only when their secret files exist and are not empty.

    Returns the config and the notes to tell the user. Routes, inhibitions and receiver names
    stay as they are, so the local Alertmanager groups and inhibits exactly as deployed.
    """
    try:
        cfg, notes = alertmanager_config.render(
            source,
            webhook_url=os.environ.get(alertmanager_config.WEBHOOK_ENV),
            templates_dir=str(ALERTMANAGER_YML.parent),
        )
    except alertmanager_config.RenderError as exc:
        raise Fail(str(exc)) from exc
    return cfg, [f"alertmanager: {note}" for note in notes]


def generate() -> None:
    data = data_dir()
    run = data / "run"
    run.mkdir(parents=True, exist_ok=True)
    source = Path(os.environ.get("AICRM_SOURCE_CONFIG") or ROOT / "config.json")
    config = local_config(source, data)
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # Prometheus loads what its template names: every rule file, or in the scale profile only
    # the watch on vmalert and VictoriaMetrics (vmalert gets the rest: `runlocal.py rules`).
    source = PROMETHEUS_SCALE_TEMPLATE if scale() else PROMETHEUS_TEMPLATE
    template = yaml.safe_load(source.read_text(encoding="utf-8"))
    rules = local_rules(run, template_rule_globs(template, source))
    prometheus = local_prometheus(template, rules, source)
    (run / "prometheus.yml").write_text(
        f"# Generated by scripts/run.sh from {source.relative_to(ROOT)}; edits are overwritten.\n"
        + yaml.safe_dump(prometheus, sort_keys=False),
        encoding="utf-8",
    )
    alertmanager, notes = local_alertmanager(
        yaml.safe_load(ALERTMANAGER_YML.read_text(encoding="utf-8"))
    )
    alertmanager_config.write(alertmanager, run / "alertmanager.yml")
    for note in notes:
        print(f"run: {note}")


# --- health -----------------------------------------------------------------------------


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def healthy(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except (OSError, ValueError):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; its parent (run.sh) has not reaped it yet.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def wait(name: str, url: str, pid: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            raise Fail(f"{name} exited before it was healthy; last lines of {log}:\n{tail(log)}")
        if healthy(url):
            return
        time.sleep(0.2)
    raise Fail(f"{name} not healthy at {url} after {timeout:g}s; last lines of {log}:\n{tail(log)}")


def prometheus_targets() -> tuple[int, int]:
    url = f"http://127.0.0.1:{port('prometheus')}/api/v1/targets?state=active"
    try:
        status, body = http_get(url)
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
    except (OSError, ValueError, KeyError):
        return 0, 0
    return sum(t.get("health") == "up" for t in targets), len(targets)


def wait_targets(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up, total = prometheus_targets()
        if total and up == total:
            return
        time.sleep(0.5)


def events_ingested() -> int | None:
    """Sum of aicrm_source_events_total, read from the exporter itself (always current)."""
    try:
        status, body = http_get(f"http://127.0.0.1:{port('exporter')}/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("aicrm_source_events_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def status_line() -> str:
    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    url = local_url
    parts = [f"exporter {mark(healthy(url('exporter', '/healthz')))}"]
    up, total = prometheus_targets()
    prom_ok = healthy(url("prometheus", "/-/ready"))
    parts.append(f"prometheus {mark(prom_ok)} (targets {up}/{total})")
    parts.append(f"alertmanager {mark(healthy(url('alertmanager', '/-/ready')))}")
    if scale():
        parts.append(f"victoriametrics {mark(healthy(url('victoriametrics', '/health')))}")
        parts.append(f"vmalert {mark(healthy(url('vmalert', '/-/healthy')))}")
    if api_enabled():
        parts.append(f"api {mark(healthy(url('api', '/healthz')))}")
    else:
        parts.append("api – (not installed)")
    events = events_ingested()
    line = " ".join(parts)
    return line + (f" · {events} events ingested" if events is not None else "")


def active_system_unit(name: str) -> str | None:
    """The systemd unit of Debian's package for ``name``, if it is running."""
    unit = SYSTEM_UNITS.get(name)
    systemctl = shutil.which("systemctl")
    if unit is None or systemctl is None:
        return None
    try:
        result = subprocess.run([systemctl, "is-active", "--quiet", unit], timeout=5,
                                stdin=subprocess.DEVNULL, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return unit if result.returncode == 0 else None


def check_ports(names: list[str]) -> None:
    taken = []
    for name in names:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port(name)))
            except OSError:
                var = port_env(name)
                unit = active_system_unit(name)
                if unit:
                    taken.append(
                        f"{name} port {port(name)} is in use, probably by the system service "
                        f"{unit} that Debian's package started: stop it with "
                        f"`sudo systemctl disable --now {unit}` if this machine does not need "
                        f"it, or set {var}"
                    )
                else:
                    taken.append(f"{name} port {port(name)} is in use (set {var})")
    if taken:
        raise Fail("; ".join(taken))


def main(argv: list[str]) -> int:
    try:
        match argv:
            case ["generate"]:
                generate()
            case ["rules"]:
                rules = local_rules(data_dir() / "run")
                if any("," in rule for rule in rules):  # vmalert splits -rule at commas
                    raise Fail(f"vmalert cannot read rule files whose path has a comma: "
                               f"{', '.join(rules)} (move the repository, or set AICRM_DATA_DIR)")
                print("\n".join(rules))
            case ["ports", *names]:
                check_ports(names)
            case ["wait", name, url, pid, log, *rest]:
                wait(name, url, int(pid), Path(log), float(rest[0]) if rest else 60.0)
            case ["targets", seconds]:
                wait_targets(float(seconds))
            case ["status"]:
                print(status_line(), flush=True)
            case ["token"]:
                print(secrets.token_urlsafe(32))
            case _:
                print(__doc__, file=sys.stderr)
                return 2
    except Fail as exc:
        print(f"run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
