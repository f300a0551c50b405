"""A real Prometheus holding tests/api/data.py's known data, evaluating the real rule files.

The past 80 minutes are backfilled with promtool; from then on Prometheus scrapes data.Target,
which serves the same linear counters. Every rule group runs every second and alerts fire at
once (``for: 0s``), so recorded series and alerts are in place within seconds.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

import api
from exporter.config import Config, parse_config
from tests import servers
from tests.api import data
from tests.helpers import config_dict

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "recording_rules"
API_KEY = "test-key-5f0c1a"
OTHER_KEY = "second-key-93be"
HISTORY_SECONDS = 80 * 60
STEP_SECONDS = 2
LEAD_SECONDS = 12
"""Backfilled at the scrape interval: rate() extrapolates a window's edges from the mean
sample spacing, so a mixture of spacings would skew rates by a few tenths of a percent."""


def fast_rules(dest: Path) -> list[Path]:
    """Copies of every rule file with 1s group intervals and alerts that fire at once."""
    out = []
    for src in sorted([*RULES.glob("*.rules.yml"), *(RULES / "alerts").glob("*.alerts.yml")]):
        doc = yaml.safe_load(src.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = "0s"
        path = dest / src.name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(path)
    return out


class KnownPrometheus:
    def __init__(self, server: servers.PrometheusServer, target: data.Target, started: float):
        self.server = server
        self.target = target
        self.url = server.url
        self.started = started


def _value(server: servers.PrometheusServer, expr: str) -> float | None:
    result = server.query(expr)
    return float(result[0]["value"][1]) if result else None


def start_known_prometheus(tmp: Path) -> KnownPrometheus:
    target = data.Target()
    try:
        workdir = Path(tmp) / "prometheus"
        workdir.mkdir(parents=True)
        now = time.time()
        # Into the near future: until Prometheus passes the last backfilled sample it refuses
        # older scrapes and rule results, so neither sees a gap between backfill and scrapes
        # (a gap would bend the first recorded rates, and averages over them).
        end = now + LEAD_SECONDS
        om = workdir / "data.om"
        data.write_openmetrics(om, end - HISTORY_SECONDS, end, STEP_SECONDS, "aicrm-exporter",
                               target.address)
        # The previous hour's recorded values, up to 45 minutes ago: inside the previous
        # window of any query made in the next quarter hour, outside the current one.
        data.write_previous(om, now - 3 * 3600, now - 2700, 30)
        data.finish(om)
        subprocess.run(
            [servers.require_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics",
             str(om), str(workdir / "data")],
            check=True, capture_output=True,
        )
        om.unlink()
        rule_files = fast_rules(workdir)
        port = servers.free_port()
        server = servers.PrometheusServer("prometheus", workdir, port)
        config = {
            "global": {"scrape_interval": f"{STEP_SECONDS}s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "aicrm-exporter",
                                "static_configs": [{"targets": [target.address]}]}],
            "rule_files": [str(p) for p in rule_files],
        }
        server.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        server.start(
            ["prometheus", f"--config.file={server.config_path}",
             f"--storage.tsdb.path={workdir / 'data'}", "--storage.tsdb.retention.time=10y",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            cwd=workdir,
            ready_check=servers.http_ok(f"{server.url}/-/ready"),
        )
    except BaseException:
        target.close()
        raise
    known = KnownPrometheus(server, target, end)
    try:
        wait_settled(server)
    except BaseException:
        stop_known(known)
        raise
    return known


def wait_settled(server: servers.PrometheusServer, timeout: float = 60) -> None:
    """Until the last layers of the rules (scores, recommendations) show the known data."""
    deadline = time.monotonic() + timeout
    checks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        checks = {
            "health": _value(server, "global:aicrm_system_health:score"),
            "efficiency": _value(server, "global:aicrm_workflow_efficiency:score1h"),
            "route": _value(server, 'count(ALERTS{alertname="AicrmRecommendRouteTaskType",'
                                    'alertstate="firing"})'),
            "below": _value(server, 'count(ALERTS{alertname="AicrmAgentSuccessBelowObjective",'
                                    'alertstate="firing"})'),
        }
        if (checks["health"] is not None and abs(checks["health"] - 55) < 1e-6
                and checks["efficiency"] is not None and checks["route"]
                and checks["below"]):
            time.sleep(2)  # a few more evaluations, so 5m windows hold only settled samples
            return
        time.sleep(0.5)
    raise RuntimeError(f"rules did not settle on the known data: {checks}")


def stop_known(known: KnownPrometheus) -> None:
    try:
        known.server.stop()
    finally:
        known.target.close()


@pytest.fixture(scope="session")
def known_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnownPrometheus]:
    known = start_known_prometheus(tmp_path_factory.mktemp("known-prometheus"))
    yield known
    stop_known(known)


def api_config(prometheus_url: str, **api_overrides: Any) -> Config:
    settings = {"prometheus_url": prometheus_url, "cache_ttl_seconds": 0,
                "rate_limit": "100000/minute", **api_overrides}
    return parse_config(config_dict(api=settings), "test-config")


class ClosingClient(FlaskClient):
    """Closes every response once its body is read, as a WSGI server does after writing it
    (PEP 3333; werkzeug's test client leaves that to the caller), so what the app does on
    close (storing a cache entry) has happened before the next request, as it has in gunicorn."""

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """make_app(prometheus_url, api_keys=..., **api settings): closed at teardown."""
    apps: list[Flask] = []

    def make(prometheus_url: str, api_keys: tuple[str, ...] = (API_KEY, OTHER_KEY),
             **api_overrides: Any) -> Flask:
        app = api.create_app(api_config(prometheus_url, **api_overrides), api_keys=api_keys)
        app.testing = True
        app.test_client_class = ClosingClient
        apps.append(app)
        return app

    yield make
    for app in apps:
        api.close_app(app)


@pytest.fixture
def client(known_prometheus: KnownPrometheus, make_app: Callable[..., Flask]) -> Any:
    return make_app(known_prometheus.url).test_client()


AUTH = {"Authorization": f"Bearer {API_KEY}"}
