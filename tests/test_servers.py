"""The real-server fixtures start, answer and stop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from tests import servers

pytestmark = pytest.mark.integration


def test_postgres_fresh_database(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE tasks (id integer PRIMARY KEY, status text)"))
            conn.execute(sa.text("INSERT INTO tasks VALUES (1, 'queued'), (2, 'running')"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, status FROM tasks ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, "queued"), (2, "running")]


def test_pg_url_databases_are_distinct(
    postgres_server: servers.PostgresServer, pg_url: str
) -> None:
    assert pg_url.startswith(f"postgresql+psycopg://aicrm@127.0.0.1:{postgres_server.port}/")
    assert postgres_server.create_database() != pg_url


def test_redis_incr(redis_server: servers.RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.incr("aicrm:test") == 1
        assert client.incr("aicrm:test") == 2
    finally:
        client.delete("aicrm:test")
        client.close()


def test_prometheus_scrapes_itself(
    prometheus_factory: Callable[..., servers.PrometheusServer],
) -> None:
    port = servers.free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        ],
    }
    prom = prometheus_factory(config, port=port)
    prom.wait_for_targets_up(timeout=15)
    result = prom.query('up{job="prometheus"}')
    assert [r["value"][1] for r in result] == ["1"]
    prom.reload()
    with pytest.raises(RuntimeError, match="query"):
        prom.query("up{")


def test_prometheus_loads_rule_files(
    tmp_path: Path, prometheus_factory: Callable[..., servers.PrometheusServer]
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n- name: t\n  interval: 1s\n"
        "  rules:\n  - record: job:one:sum\n    expr: vector(1)\n"
    )
    prom = prometheus_factory({"global": {"evaluation_interval": "1s"}}, rule_files=[rules])
    deadline = time.monotonic() + 15
    while not prom.query("job:one:sum") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prom.query("job:one:sum")[0]["value"][1] == "1"


def test_alertmanager_accepts_and_lists_alerts(
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
) -> None:
    config = {"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}
    am = alertmanager_factory(config)
    alert = {"labels": {"alertname": "AicrmTest", "severity": "warning"},
             "annotations": {"summary": "test"}}
    with requests.post(f"{am.url}/api/v2/alerts", json=[alert], timeout=10) as response:
        response.raise_for_status()
    alerts = am.alerts()
    assert [a["labels"]["alertname"] for a in alerts] == ["AicrmTest"]


def test_victoria_metrics_import_and_query(
    vm_factory: Callable[..., servers.VictoriaMetricsServer],
) -> None:
    vm = vm_factory()
    ts = int(time.time()) - 60
    body = f'aicrm_test_total{{agent="a"}} 42 {ts * 1000}\n'
    with requests.post(f"{vm.url}/api/v1/import/prometheus", data=body, timeout=10) as response:
        response.raise_for_status()
    vm.force_flush()
    result = vm.query("aicrm_test_total", time=ts)
    assert [(r["metric"]["agent"], r["value"][1]) for r in result] == [("a", "42")]


def test_vmalert_evaluates_rules_against_victoria_metrics(
    tmp_path: Path,
    vm_factory: Callable[..., servers.VictoriaMetricsServer],
    vmalert_factory: Callable[..., servers.VmalertServer],
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n- name: t\n  rules:\n  - record: job:one:sum\n    expr: vector(1)\n")
    vm = vm_factory()
    vmalert = vmalert_factory([rules], vm.url, remote_write_url=vm.url)
    groups = vmalert.rules()
    assert [r["name"] for g in groups for r in g["rules"]] == ["job:one:sum"]


def test_missing_binary_fails_loudly(tmp_path: Path) -> None:
    handle = servers.ProcessHandle("nothing", tmp_path)
    with pytest.raises(RuntimeError, match="install the Debian package"):
        handle.start(["aicrm-no-such-binary"])


def test_early_exit_reports_log_tail(tmp_path: Path) -> None:
    handle = servers.ProcessHandle("failing", tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        handle.start(["sh", "-c", "echo boom; exit 3"], ready_check=lambda: False)
    assert handle.process is not None and handle.process.returncode == 3


def test_stop_and_kill9_reap_the_process_group(tmp_path: Path) -> None:
    for stop in ("stop", "kill9"):
        handle = servers.ProcessHandle(f"sleeper-{stop}", tmp_path)
        handle.start(["sh", "-c", "sleep 60 & sleep 60"])
        getattr(handle, stop)()
        assert handle.process is not None and handle.process.poll() is not None
        assert _group_gone(handle.pid), f"{stop} left members of process group {handle.pid}"


def _group_gone(pgid: int, timeout: float = 5.0) -> bool:
    """Orphaned members are reaped by init shortly after SIGKILL; allow for that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_postgres_bin_is_the_newest_major_installed(tmp_path: Path) -> None:
    for version in ("9", "15", "17", "devel"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "postgres").touch()
    (tmp_path / "18" / "bin").mkdir(parents=True)  # a leftover directory without the server
    assert servers._newest_postgres_bin(tmp_path) == tmp_path / "17" / "bin"
    assert servers._newest_postgres_bin(tmp_path / "none").name == "bin"
