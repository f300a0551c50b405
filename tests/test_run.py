"""scripts/run.sh end to end: start the local stack, see data flow through it, stop it cleanly.

The stack runs from the repository on free loopback ports with its data in a temporary
directory (AICRM_DATA_DIR), scraping and evaluating every second so recorded series appear in
seconds. Prometheus, Alertmanager and the venv's entry points are the real ones.
"""

from __future__ import annotations

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
from typing import Any

import pytest
import requests

from tests.servers import free_port, require_binary

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "scripts" / "run.sh"
READY_LINE = "running; Ctrl-C stops everything"


def api_installed() -> bool:
    import api

    return callable(getattr(api, "create_app", None))


class Stack:
    """run.sh as a child process, with its output collected line by line."""

    def __init__(self, data: Path) -> None:
        self.data = data
        names = ("exporter", "api", "prometheus", "alertmanager")
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
        for name in ("AICRM_INGEST_TOKEN", "AICRM_API_KEYS", "AICRM_CONFIG"):
            env.pop(name, None)
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [str(RUN_SH)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
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

    def query(self, expr: str) -> list[dict[str, Any]]:
        with requests.get(
            self.url("prometheus") + "/api/v1/query", params={"query": expr}, timeout=10
        ) as response:
            response.raise_for_status()
            return list(response.json()["data"]["result"])

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
    pids = stack.pids()
    expected = {"simulator", "exporter", "prometheus", "alertmanager"}
    assert set(pids) == expected | ({"api"} if with_api else set())
    assert all(pid_alive(pid) for pid in pids.values())
    os.kill(stack.process.pid, signal.SIGINT)
    assert stack.process.wait(45) == 0, stack.output
    stack._reader.join(5)
    assert "stopped" in stack.lines[-1], stack.output
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert processes_using(stack.data) == []
    assert not list((stack.data / "run" / "pids").glob("*.pid"))
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
def test_run_sh_names_what_is_missing_off_debian(tmp_path: Path) -> None:
    """Without the servers and off Debian, run.sh says what to install or to use compose."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "cat", "grep", "env", "realpath"):
        target = require_binary(tool)
        (bin_dir / tool).symlink_to(target)
    result = subprocess.run(
        ["bash", str(RUN_SH)],
        cwd=ROOT,
        env={"PATH": str(bin_dir), "AICRM_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "missing: prometheus alertmanager" in result.stderr
    assert "docker compose" in result.stderr
    assert not (tmp_path / "data").exists()


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
