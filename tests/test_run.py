"""scripts/run.sh end to end: start the local stack, see data flow through it, stop it cleanly.

The stack runs from the repository on free loopback ports with its data in a temporary
directory (AICRM_DATA_DIR), scraping and evaluating every second so recorded series appear in
seconds. Prometheus, Alertmanager, VictoriaMetrics, vmalert and the venv's entry points are the
real ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import yaml

from tests.servers import free_port, require_binary

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "scripts" / "run.sh"
READY_LINE = "running; Ctrl-C stops everything"
SCALE_BINARIES = ("prometheus", "promtool", "prometheus-alertmanager", "victoria-metrics",
                  "vmalert")
WATCHDOG = "AicrmWatchdog"  # recording_rules/alerts/system.alerts.yml: vector(1), always fires


def api_installed() -> bool:
    import api

    return callable(getattr(api, "create_app", None))


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in run.sh, as a terminal's Ctrl-C finds it: a shell cannot trap a
    signal it was started with ignored, and a test suite run as a background job without job
    control (`cmd &` in a script) passes SIGINT down ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Stack:
    """run.sh as a child process, with its output collected line by line.

    profile: AICRM_RUN_PROFILE ("" the default stack, "scale" with VictoriaMetrics and vmalert).
    """

    def __init__(self, data: Path, profile: str = "") -> None:
        self.data = data
        self.profile = profile
        names = ["exporter", "api", "prometheus", "alertmanager"]
        if profile == "scale":
            names += ["victoriametrics", "vmalert"]
        self.ports = {name: free_port() for name in names}
        env = {
            **os.environ,
            "AICRM_DATA_DIR": str(data),
            "AICRM_SCRAPE_INTERVAL": "1s",
            "AICRM_RULE_INTERVAL": "1s",
            "AICRM_SIM_RATE": "5",
            "AICRM_SIM_ARGS": "--speedup 30 --seed 7",
            "AICRM_STATUS_SECONDS": "0",
            **{f"AICRM_{name.upper()}_PORT": str(p) for name, p in self.ports.items()},
        }
        for name in ("AICRM_INGEST_TOKEN", "AICRM_API_KEYS", "AICRM_CONFIG", "AICRM_RUN_PROFILE",
                     "AICRM_VM_ARGS", "AICRM_VMALERT_ARGS", "AICRM_PROMETHEUS_URL"):
            env.pop(name, None)
        if profile:
            env["AICRM_RUN_PROFILE"] = profile
            # Fresh samples queryable at once and vmalert's results written every second, so a
            # chain of recording rules (each reading the one before from VictoriaMetrics) fills
            # in seconds rather than minutes.
            env["AICRM_VM_ARGS"] = "-search.latencyOffset=0s -search.disableCache"
            env["AICRM_VMALERT_ARGS"] = "-remoteWrite.flushInterval=1s"
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [str(RUN_SH)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(READY_LINE in line for line in self.lines):
                return
            if self.process.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"run.sh exited with {self.process.returncode}:\n{self.output}")
            time.sleep(0.2)
        pytest.fail(f"run.sh not ready after {timeout}s:\n{self.output}")

    def pids(self) -> dict[str, int]:
        return {
            p.stem: int(p.read_text()) for p in (self.data / "run" / "pids").glob("*.pid")
        }

    def query(self, expr: str, server: str = "prometheus") -> list[dict[str, Any]]:
        with requests.get(
            self.url(server) + "/api/v1/query", params={"query": expr}, timeout=10
        ) as response:
            response.raise_for_status()
            return list(response.json()["data"]["result"])

    def get_json(self, name: str, path: str, **kwargs: Any) -> Any:
        with requests.get(self.url(name) + path, timeout=10, **kwargs) as response:
            response.raise_for_status()
            return response.json()

    def status_line(self) -> str:
        return next(line for line in self.lines if line.startswith("exporter "))

    def secrets(self) -> dict[str, str]:
        text = (self.data / "run" / "secrets.env").read_text()
        return dict(line.split("=", 1) for line in text.splitlines())

    def interrupt(self) -> None:
        """Ctrl-C: run.sh stops everything, exits 0 and leaves nothing behind."""
        pids = self.pids()
        assert all(pid_alive(pid) for pid in pids.values())
        os.kill(self.process.pid, signal.SIGINT)
        assert self.process.wait(45) == 0, self.output
        self._reader.join(5)
        assert "stopped" in self.lines[-1], self.output
        assert not [name for name, pid in pids.items() if pid_alive(pid)]
        assert processes_using(self.data) == []
        assert not list((self.data / "run" / "pids").glob("*.pid"))

    def kill(self) -> None:
        """Teardown after a failure: run.sh and every component's process group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        for pid in self.pids().values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def processes_using(path: Path) -> list[str]:
    """Command lines of live processes that mention path (the stack's data directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    for binary in ("prometheus", "promtool", "prometheus-alertmanager"):
        require_binary(binary)
    s = Stack(tmp_path / "data")
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def scale_stack(tmp_path: Path) -> Iterator[Stack]:
    """run.sh with AICRM_RUN_PROFILE=scale."""
    for binary in SCALE_BINARIES:
        require_binary(binary)
    s = Stack(tmp_path / "data", profile="scale")
    try:
        yield s
    finally:
        s.kill()


def poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (requests.RequestException, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(f"{what} not seen after {timeout}s (last: {last!r})")


@pytest.mark.integration
def test_run_sh_starts_the_stack_and_stops_it_cleanly(stack: Stack) -> None:
    started = time.monotonic()
    stack.wait_ready(timeout=90)
    with_api = api_installed()

    # URLs and the one-line status are printed; secrets are on disk, 0600, never printed.
    assert stack.url("prometheus") in stack.output
    status = next(line for line in stack.lines if line.startswith("exporter "))
    assert "exporter ✓" in status and "prometheus ✓" in status and "alertmanager ✓" in status
    assert "events ingested" in status
    secrets_file = stack.data / "run" / "secrets.env"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in secrets_file.read_text().splitlines())
    assert values["AICRM_INGEST_TOKEN"] and values["AICRM_API_KEYS"]
    for secret in values.values():
        assert secret not in stack.output
        for log in (stack.data / "logs").glob("*.log"):
            assert secret not in log.read_text(errors="replace"), log

    # Alertmanager runs the rendered configuration: no AICRM_WEBHOOK_URL and no secret files
    # here, so no integration that could only fail (docs/deploy.md#where-notifications-go).
    rendered = (stack.data / "run" / "alertmanager.yml").read_text()
    assert "127.0.0.1:5001" not in rendered and "_configs" not in rendered
    assert "run: alertmanager: webhooks left out: AICRM_WEBHOOK_URL is not set" in stack.output

    # Every health endpoint answers.
    health = {
        "exporter": "/healthz",
        "prometheus": "/-/ready",
        "alertmanager": "/-/ready",
    }
    if with_api:
        health["api"] = "/healthz"
        assert "api ✓" in status
    else:
        assert "api – (not installed)" in status
    for name, path in health.items():
        with requests.get(stack.url(name) + path, timeout=5) as response:
            assert response.status_code == 200, (name, response.text)

    # Prometheus scrapes every component: targets all up, job names as the rules expect.
    def targets_up() -> set[str]:
        with requests.get(stack.url("prometheus") + "/api/v1/targets", timeout=5) as response:
            active = response.json()["data"]["activeTargets"]
        return {t["labels"]["job"] for t in active} if all(
            t["health"] == "up" for t in active
        ) else set()

    jobs = poll(targets_up, 30, "all targets up")
    assert jobs == {"aicrm-exporter", "prometheus", "alertmanager"} | (
        {"aicrm-api"} if with_api else set()
    )

    # Events flow simulator -> files/DB -> exporter -> Prometheus -> rules: numbers, not NaN.
    for expr in (
        "global:aicrm_agent_task_results:success_ratio_rate5m",
        "global:aicrm_tasks:rate5m",
        "sum(aicrm_source_events_total)",
    ):

        def positive(e: str = expr) -> float | None:
            result = stack.query(e)
            value = float(result[0]["value"][1]) if result else math.nan
            return value if math.isfinite(value) and value > 0 else None

        poll(positive, 60, f"{expr} > 0")

    if with_api:
        key = values["AICRM_API_KEYS"].split(",")[0]

        def api_numbers() -> dict[str, Any] | None:
            with requests.get(
                stack.url("api") + "/agent-performance",
                headers={"X-API-Key": key},
                timeout=10,
            ) as response:
                body = response.json() if response.status_code == 200 else None
            return body if body and _has_number(body) else None

        poll(api_numbers, 60, "numbers from the API")

    # Ctrl-C: everything stops, exit 0, nothing left behind.
    expected = {"simulator", "exporter", "prometheus", "alertmanager"}
    assert set(stack.pids()) == expected | ({"api"} if with_api else set())
    stack.interrupt()
    assert not (stack.data / "victoriametrics").exists()
    assert time.monotonic() - started < 120


def _has_number(body: Any) -> bool:
    """True when the JSON holds at least one finite number outside of null placeholders."""
    if isinstance(body, bool):
        return False
    if isinstance(body, int | float):
        return math.isfinite(body)
    if isinstance(body, dict):
        return any(_has_number(v) for v in body.values())
    if isinstance(body, list):
        return any(_has_number(v) for v in body)
    return False


@pytest.mark.integration
@pytest.mark.parametrize("profile", ["", "scale"])
def test_run_sh_names_what_is_missing_off_debian(tmp_path: Path, profile: str) -> None:
    """Without the servers and off Debian, run.sh says what to install or to use compose."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "cat", "grep", "env", "realpath"):
        target = require_binary(tool)
        (bin_dir / tool).symlink_to(target)
    result = subprocess.run(
        ["bash", str(RUN_SH)],
        cwd=ROOT,
        env={"PATH": str(bin_dir), "AICRM_DATA_DIR": str(tmp_path / "data"),
             "AICRM_RUN_PROFILE": profile},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "docker compose" in result.stderr
    assert not (tmp_path / "data").exists()
    missing = result.stderr.splitlines()[0]
    if profile == "scale":
        assert missing.startswith("run: missing: prometheus alertmanager victoria-metrics vmalert")
        assert "'victoria-metrics' and 'vmalert' on PATH" in result.stderr
        assert "--profile scale" in result.stderr
    else:
        assert missing.startswith("run: missing: prometheus alertmanager")
        assert "victoria-metrics" not in result.stderr and "vmalert" not in result.stderr


@pytest.mark.integration
def test_run_sh_names_the_system_service_holding_a_port(tmp_path: Path) -> None:
    """Debian's prometheus package starts a prometheus service on the stack's port: run.sh
    stops with the command that frees the port, rather than a bare "port in use"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"
    systemctl.write_text('#!/bin/sh\n[ "$*" = "is-active --quiet prometheus" ]\n')
    systemctl.chmod(0o755)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "AICRM_DATA_DIR": str(tmp_path / "data"),
            "AICRM_PROMETHEUS_PORT": str(held.getsockname()[1]),
            **{f"AICRM_{n.upper()}_PORT": str(free_port()) for n in ("exporter", "api",
                                                                     "alertmanager")},
        }
        result = subprocess.run([str(RUN_SH)], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sudo systemctl disable --now prometheus" in result.stderr
    assert "AICRM_PROMETHEUS_PORT" in result.stderr
    assert "alertmanager port" not in result.stderr


@pytest.mark.integration
def test_run_sh_scale_profile_runs_victoria_metrics_with_vmalert(scale_stack: Stack) -> None:
    """AICRM_RUN_PROFILE=scale: docker-compose.yml's scale profile from Debian's packages.
    Prometheus only scrapes and remote-writes; vmalert evaluates the rules against
    VictoriaMetrics and writes the results there; the API reads VictoriaMetrics."""
    stack = scale_stack
    stack.wait_ready(timeout=60)
    with_api = api_installed()

    status = stack.status_line()
    for part in ("exporter ✓", "prometheus ✓", "alertmanager ✓", "victoriametrics ✓",
                 "vmalert ✓"):
        assert part in status, status
    assert stack.url("victoriametrics") in stack.output and stack.url("vmalert") in stack.output
    config = json.loads((stack.data / "run" / "config.json").read_text())
    assert config["api"]["prometheus_url"] == stack.url("victoriametrics")
    assert (stack.data / "victoriametrics").is_dir()

    # Prometheus evaluates only the watch on vmalert and VictoriaMetrics (with either down,
    # vmalert evaluates nothing); it scrapes every part, VictoriaMetrics and vmalert too.
    def watch() -> list[dict[str, Any]] | None:
        groups = stack.get_json("prometheus", "/api/v1/rules")["data"]["groups"]
        return groups if groups and all(r.get("health") == "ok"
                                        for g in groups for r in g["rules"]) else None

    groups = poll(watch, 30, "Prometheus' rule group evaluated")
    assert [(g["name"], [r["name"] for r in g["rules"]]) for g in groups] == [
        ("aicrm-ruler-watch", ["AicrmRulerDown", "AicrmStoreReadOnly", "AicrmStoreDiskFillingUp"])]

    def targets_up() -> set[str]:
        active = stack.get_json("prometheus", "/api/v1/targets")["data"]["activeTargets"]
        return {t["labels"]["job"] for t in active} if all(
            t["health"] == "up" for t in active
        ) else set()

    jobs = poll(targets_up, 30, "all targets up")
    assert jobs == {"aicrm-exporter", "prometheus", "alertmanager", "victoriametrics",
                    "vmalert"} | ({"aicrm-api"} if with_api else set())

    # vmalert's alerts, through VictoriaMetrics (-vmalert.proxyURL), with their annotations.
    def watchdog() -> dict[str, Any] | None:
        alerts = stack.get_json("victoriametrics", "/api/v1/alerts")["data"]["alerts"]
        return next((a for a in alerts if a["labels"].get("alertname") == WATCHDOG), None)

    alert = poll(watchdog, 30, f"{WATCHDOG} in VictoriaMetrics' /api/v1/alerts")
    assert alert["state"] in ("pending", "firing") and alert["annotations"]["summary"]
    # ... and notifies the local Alertmanager (its notifier's series name the address; the
    # watchdog itself reaches Alertmanager only after its `for: 1m`).
    with requests.get(stack.url("vmalert") + "/metrics", timeout=10) as response:
        assert f'addr="{stack.url("alertmanager")}/api/v2/alerts"' in response.text

    # Recorded series in VictoriaMetrics, written by vmalert: numbers, not NaN; Prometheus
    # holds none (it records none, and its remote write would drop them anyway).
    def positive(expr: str = "global:aicrm_agent_task_results:success_ratio_rate5m") -> Any:
        result = stack.query(expr, "victoriametrics")
        value = float(result[0]["value"][1]) if result else math.nan
        return value if math.isfinite(value) and value > 0 else None

    poll(positive, 60, "global:aicrm_agent_task_results:success_ratio_rate5m in VictoriaMetrics")
    assert stack.query('count({__name__=~".+:.+"})', "victoriametrics")
    assert stack.query('count({__name__=~".+:.+"})') == []

    if with_api:
        headers = {"X-API-Key": stack.secrets()["AICRM_API_KEYS"].split(",")[0]}

        def agents() -> list[dict[str, Any]] | None:
            body = stack.get_json("api", "/agent-performance", headers=headers)
            found = body["data"]["agents"]
            return found if found and _has_number(found) else None

        assert {a["agent"] for a in poll(agents, 60, "agents from the API")}

        # /executive-dashboard answers over VictoriaMetrics, listing what vmalert has firing
        # (AicrmWatchdog aside: severity "none", api/executive.py). That it reads vmalert's
        # alerts API with annotations through the proxy, a firing alert included, is
        # tests/test_scale.py's; here the lists must agree, both ways.
        with requests.get(stack.url("api") + "/executive-dashboard", headers=headers,
                          timeout=30) as response:
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            listed_at = time.monotonic()
        firing = {a["labels"]["alertname"] for a in
                  stack.get_json("victoriametrics", "/api/v1/alerts")["data"]["alerts"]
                  if a["state"] == "firing" and a["labels"].get("severity") != "none"}
        listed = {a["name"] for a in data["alerts"] + data["recommendations"]}
        if time.monotonic() - listed_at < 1:  # vmalert evaluates every second: same round
            assert listed == firing
        assert all(a["summary"] for a in data["alerts"] + data["recommendations"])

    # Ctrl-C: exit 0, nothing left behind. run.sh names what it stops in start order (it stops
    # them in reverse): Alertmanager and VictoriaMetrics before vmalert, all before Prometheus.
    assert set(stack.pids()) == {"simulator", "exporter", "alertmanager", "victoriametrics",
                                 "vmalert", "prometheus"} | ({"api"} if with_api else set())
    stack.interrupt()
    order = next(line for line in stack.lines if line.startswith("run: stopping ")).split()[2:]
    assert order.index("alertmanager") < order.index("victoriametrics") < order.index(
        "vmalert") < order.index("prometheus")


def _runlocal() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runlocal", ROOT / "scripts" / "runlocal.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    """runlocal.py generate into tmp_path with fixed ports; returns the module."""
    runlocal = _runlocal()
    for name in ("AICRM_SCRAPE_INTERVAL", "AICRM_RULE_INTERVAL", "AICRM_SOURCE_CONFIG",
                 "AICRM_RUN_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    ports = {"exporter": 19464, "api": 15000, "prometheus": 19090, "alertmanager": 19093,
             "victoriametrics": 18428, "vmalert": 18880}
    for name, number in ports.items():
        monkeypatch.setenv(f"AICRM_{name.upper()}_PORT", str(number))
    monkeypatch.setenv("AICRM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AICRM_RUN_API", "1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runlocal.generate()
    return runlocal


def test_runlocal_generates_the_scale_profiles_prometheus_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _generate(tmp_path, monkeypatch, AICRM_RUN_PROFILE="scale", AICRM_SCRAPE_INTERVAL="1s",
              AICRM_RULE_INTERVAL="1s")
    capsys.readouterr()
    run = tmp_path / "run"
    text = (run / "prometheus.yml").read_text()
    assert text.startswith("# Generated by scripts/run.sh from prometheus/prometheus.scale.yml")
    prom = yaml.safe_load(text)
    template = yaml.safe_load((ROOT / "prometheus" / "prometheus.scale.yml").read_text())
    assert prom["rule_files"] == [str(run / "rules" / "scale/ruler.alerts.yml")]
    [remote] = prom["remote_write"]
    assert remote["url"] == "http://127.0.0.1:18428/api/v1/write"
    assert remote["write_relabel_configs"] == template["remote_write"][0]["write_relabel_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in prom["scrape_configs"]}
    assert targets == {
        "aicrm-exporter": ["127.0.0.1:19464"], "aicrm-api": ["127.0.0.1:15000"],
        "prometheus": ["127.0.0.1:19090"], "alertmanager": ["127.0.0.1:19093"],
        "victoriametrics": ["127.0.0.1:18428"], "vmalert": ["127.0.0.1:18880"],
    }
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "127.0.0.1:19093"]
    assert prom["global"]["scrape_interval"] == "1s"
    config = json.loads((run / "config.json").read_text())
    assert config["api"]["prometheus_url"] == "http://127.0.0.1:18428"
    # vmalert's rule files: the copies at AICRM_RULE_INTERVAL, as Prometheus would get them.
    runlocal = _runlocal()
    assert runlocal.main(["rules"]) == 0
    rules = capsys.readouterr().out.split()
    assert rules == [str(run / "rules" / "*.rules.yml"), str(run / "rules" / "alerts/*.alerts.yml")]
    copies = list((run / "rules").rglob("*.yml"))
    assert copies and all(
        {g["interval"] for g in yaml.safe_load(c.read_text())["groups"]} == {"1s"} for c in copies
    )


def test_runlocal_default_profile_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _generate(tmp_path, monkeypatch)
    capsys.readouterr()
    prom = yaml.safe_load((tmp_path / "run" / "prometheus.yml").read_text())
    assert "remote_write" not in prom
    assert prom["rule_files"] == [str(ROOT / "recording_rules" / "*.rules.yml"),
                                  str(ROOT / "recording_rules" / "alerts/*.alerts.yml")]
    assert {job["job_name"] for job in prom["scrape_configs"]} == {
        "aicrm-exporter", "aicrm-api", "prometheus", "alertmanager"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["api"]["prometheus_url"] == "http://127.0.0.1:19090"


def test_runlocal_rejects_unknown_profiles_and_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    runlocal = _runlocal()
    monkeypatch.setenv("AICRM_RUN_PROFILE", "big")
    with pytest.raises(runlocal.Fail, match="AICRM_RUN_PROFILE='big'.*scale"):
        runlocal.profile()
    monkeypatch.setenv("AICRM_RUN_PROFILE", "")
    template = {"scrape_configs": [{"job_name": "node", "static_configs": []}]}
    with pytest.raises(runlocal.Fail, match="job 'node' has no local component"):
        runlocal.local_prometheus(template, [])
    # A job of the scale profile's components only runs with it.
    template = {"scrape_configs": [{"job_name": "vmalert", "static_configs": []}]}
    with pytest.raises(runlocal.Fail, match="AICRM_RUN_PROFILE=scale"):
        runlocal.local_prometheus(template, [])
    monkeypatch.setenv("AICRM_VMALERT_PORT", "88800")
    with pytest.raises(runlocal.Fail, match="AICRM_VMALERT_PORT='88800'"):
        runlocal.port("vmalert")


@pytest.mark.integration
def test_run_sh_rejects_an_unknown_profile_before_starting(tmp_path: Path) -> None:
    env = {**os.environ, "AICRM_RUN_PROFILE": "scaled", "AICRM_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([str(RUN_SH)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "AICRM_RUN_PROFILE='scaled' is not a run profile" in result.stderr
    assert "scale" in result.stderr and "unset or empty" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()
