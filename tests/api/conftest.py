"""A real Prometheus holding tests/api/data.py's known data, evaluating the real rule files.

The past 80 minutes are backfilled with promtool; from then on Prometheus scrapes data.Target,
which serves the same linear counters. Every rule group runs every second and alerts fire at
once (``for: 0s``), so recorded series and alerts are in place within seconds.
"""

from __future__ import annotations

import math
import shutil
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
from api import queries
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
"""Backfilled at the scrape interval: rate() extrapolates a window's edges from the mean
sample spacing, so a mixture of spacings would skew rates by a few tenths of a percent."""
LEAD_SECONDS = 30
"""The backfill runs this far into the future; the server starts (after the probe) before it
ends, so its first rule results see no gap between backfill and scrapes."""
PROBE_LEAD_SECONDS = 4


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
        argv = ["prometheus", f"--config.file={server.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}", "--storage.tsdb.retention.time=10y",
                f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"]
        # A probe on the same data with a shorter lead (the server's would keep it from
        # recording anything until then): what the rules record from it, written back as
        # their history before the server proper starts.
        probe_data = workdir / "probe-data"
        om = workdir / "probe.om"
        data.write_openmetrics(om, end - HISTORY_SECONDS, now + PROBE_LEAD_SECONDS,
                               STEP_SECONDS, "aicrm-exporter", target.address)
        data.finish(om)
        subprocess.run(
            [servers.require_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics",
             str(om), str(probe_data)],
            check=True, capture_output=True,
        )
        om.unlink()
        probe = servers.PrometheusServer("prometheus-probe", workdir, servers.free_port())
        probe.start([*argv[:2], f"--storage.tsdb.path={probe_data}", *argv[3:4],
                     f"--web.listen-address=127.0.0.1:{probe.port}"],
                    cwd=workdir, ready_check=servers.http_ok(f"{probe.url}/-/ready"))
        try:
            backfill_recorded(probe, workdir, end - HISTORY_SECONDS)
        finally:
            probe.stop()
            shutil.rmtree(probe_data)
        server.start(argv, cwd=workdir, ready_check=servers.http_ok(f"{server.url}/-/ready"))
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


def averaged_families() -> list[str]:
    """The recorded 5m rates the API averages over windows longer than 5m, less those
    data.PREVIOUS gives a history of its own. The 1h and 1d rates are not written back: the
    rules build them from the 5m ones (so they are right from the first evaluation), and
    a young probe's would still hold its first evaluations."""
    previous = {name.split("{", 1)[0] for name in data.PREVIOUS}
    names = {family.names["5m"] for family in vars(queries).values()
             if isinstance(family, queries.Recorded) and "5m" in family.names}
    return sorted(names - previous)


def backfill_recorded(server: servers.PrometheusServer, workdir: Path, start: float) -> None:
    """The recorded rates' settled values over the raw data's history, as rules running all
    along would have left them: the API counts a window from the recorded points it holds, so
    without them a window reaching back before this Prometheus started would count only the
    seconds since."""
    settled = wait_recorded(server)
    end = time.time()
    om = workdir / "recorded.om"
    with open(om, "w") as out:
        for name, samples in settled.items():
            out.write(f"# TYPE {name} gauge\n")
            for sample in samples:
                labels = ",".join(
                    f'{k}="{v}"' for k, v in sorted(sample["metric"].items()) if k != "__name__")
                t = start
                while t < end:
                    out.write(f"{name}{{{labels}}} {sample['value'][1]} {t:.3f}\n")
                    t += 30
        out.write("# EOF\n")
    subprocess.run(
        [servers.require_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics",
         str(om), str(workdir / "data")],
        check=True, capture_output=True,
    )
    om.unlink()


def wait_recorded(server: servers.PrometheusServer,
                  timeout: float = 30) -> dict[str, list[dict[str, Any]]]:
    """The averaged families' series once the probe has scraped a few times, every family has
    some, and three readings a second apart agree (the rules' later layers are computed from
    the earlier ones)."""
    deadline = time.monotonic() + timeout
    while not _value(server, 'count_over_time(up{job="aicrm-exporter"}[1m]) >= 3'):
        # Rates from the backfill alone dip at the window's end until scrapes follow it.
        if time.monotonic() > deadline:
            raise RuntimeError("the probe did not scrape the known data")
        time.sleep(0.5)
    previous: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        current = {name: server.query(name) for name in averaged_families()}
        values = {name: {str(sorted(s["metric"].items())): float(s["value"][1])
                         for s in samples} for name, samples in current.items()}
        if all(values.values()) and len(previous) >= 2 and all(
                _close(values, p) for p in previous[-2:]):
            return current
        previous.append(values)
        time.sleep(1)
    missing = sorted(name for name, v in previous[-1].items() if not v) if previous else []
    raise RuntimeError(f"recorded rates did not settle on the known data; missing: {missing}")


def _close(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    """The same series in both, each value within a millionth (rates move in their last digits
    as a window's edges pass the samples)."""
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys()
        and all(math.isclose(a[k][s], b[k][s], rel_tol=1e-6, abs_tol=1e-12) for s in a[k])
        for k in a)


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
