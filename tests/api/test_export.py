"""GET /export: CSV and JSON range data, streamed, and the point bound."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask

import api
from api.promql import PrometheusClient, RangeSeries, Sample
from tests.api.conftest import API_KEY, AUTH, KnownPrometheus, api_config


def _range(known: KnownPrometheus) -> str:
    # Five steps after the rules started recording: every step has data.
    start = int(known.started) + 5
    return f"start={start}&end={start + 20}&step=5s"


def test_csv(client: Any, known_prometheus: KnownPrometheus) -> None:
    # Unbuffered, to see the answer as the app returns it: a stream.
    r = client.get(f"/export?dataset=task_throughput&{_range(known_prometheus)}", headers=AUTH,
                   buffered=False)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.is_streamed
    assert r.mimetype == "text/csv"
    assert r.headers["Content-Disposition"] == 'attachment; filename="task_throughput.csv"'
    rows = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert rows[0] == ["timestamp", "task_type", "value", "unit"]
    body = rows[1:]
    # 2 task types x 5 steps; completed tasks/s: qualify_lead 0.5, write_email 0.3.
    assert len(body) == 10 == int(r.headers["X-Export-Points"])
    for ts, task_type, value, unit in body:
        assert ts.endswith("Z") and unit == "tasks/s"
        assert float(value) == pytest.approx({"qualify_lead": 0.5, "write_email": 0.3}[task_type],
                                             rel=1e-4)
    assert [row[1] for row in body] == ["qualify_lead"] * 5 + ["write_email"] * 5


def test_json(client: Any, known_prometheus: KnownPrometheus) -> None:
    r = client.get(f"/export?dataset=agent_success_ratio&format=json&{_range(known_prometheus)}",
                   headers={"X-API-Key": AUTH["Authorization"].split()[1]})
    assert r.status_code == 200
    body = r.json
    assert body["dataset"] == "agent_success_ratio" and body["unit"] == "ratio"
    assert body["series_name"] == "agent:aicrm_agent_task_results:success_ratio_rate5m"
    ratios = {s["labels"]["agent"]: {v for _, v in s["points"]} for s in body["series"]}
    assert ratios.keys() == {"email-writer", "lead-qualifier"}
    assert [pytest.approx(v, rel=1e-4) for v in ratios["email-writer"]] == [0.6] * len(
        ratios["email-writer"])
    assert all(len(s["points"]) == 5 for s in body["series"])


def test_global_dataset_and_defaults(client: Any) -> None:
    r = client.get("/export?dataset=system_health_score&format=json&step=30", headers=AUTH)
    assert r.status_code == 200
    series = r.json["series"]
    assert len(series) == 1 and series[0]["labels"] == {}
    # Default range: the last hour; points only where the rules had recorded.
    assert series[0]["points"][-1][1] == pytest.approx(55)


def test_point_bound(known_prometheus: KnownPrometheus, make_app: Callable[..., Flask]) -> None:
    rng = _range(known_prometheus)
    ten = make_app(known_prometheus.url, export_max_points=10).test_client()
    assert ten.get(f"/export?dataset=task_throughput&{rng}", headers=AUTH).status_code == 200
    # 11 steps per series is refused before querying...
    start = int(known_prometheus.started)
    r = ten.get(f"/export?dataset=task_throughput&start={start}&end={start + 50}&step=5",
                headers=AUTH)
    assert r.status_code == 400 and r.json["error"]["parameter"] == "step"
    # ...and 2 series x 5 steps over a bound of 8 too, the series counted first.
    eight = make_app(known_prometheus.url, export_max_points=8).test_client()
    r = eight.get(f"/export?dataset=task_throughput&{rng}", headers=AUTH)
    assert r.status_code == 400 and r.json["error"]["parameter"] == "step"
    assert "2 series x 5 steps = 10 points" in r.json["error"]["message"]
    assert "export_max_points (8)" in r.json["error"]["message"]


class CountingClient(PrometheusClient):
    """The real client, recording the range queries sent; ``undercount`` makes the instant
    series count answer 1 (a series that ended inside the range is not counted at its end)."""

    def __init__(self, url: str, undercount: bool = False) -> None:
        super().__init__(url, 10)
        self.ranges: list[str] = []
        self.undercount = undercount

    def query(self, expr: str, time: float | None = None) -> list[Sample]:
        if self.undercount and expr.startswith("count("):
            return [Sample({}, 1.0)]
        return super().query(expr, time)

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[RangeSeries]:
        self.ranges.append(expr)
        return super().query_range(expr, start, end, step)


@pytest.mark.parametrize("undercount", [False, True])
def test_series_are_counted_before_the_range_is_loaded(known_prometheus: KnownPrometheus,
                                                       undercount: bool) -> None:
    """Series x steps over the bound is refused before the range query, so a large answer is
    never downloaded and decoded just to be refused; the check on the answer stays for series
    the count at the range's end misses."""
    rng = _range(known_prometheus)
    results = []
    for max_points in (10, 8):
        prometheus = CountingClient(known_prometheus.url, undercount)
        app = api.create_app(api_config(known_prometheus.url, export_max_points=max_points),
                             api_keys=(API_KEY,), prometheus=prometheus)
        try:
            r = app.test_client().get(f"/export?dataset=task_throughput&{rng}", headers=AUTH)
            results.append((r.status_code, len(prometheus.ranges), r.get_data(as_text=True)))
        finally:
            api.close_app(app)
    assert results[0][:2] == (200, 1)
    if undercount:
        assert results[1][:2] == (400, 1)
        assert "10 points in 2 series" in results[1][2]
    else:
        assert results[1][:2] == (400, 0), results[1]


def test_rfc3339_times(client: Any, known_prometheus: KnownPrometheus) -> None:
    start = int(known_prometheus.started) + 5
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    end = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start + 20))
    r = client.get(f"/export?dataset=task_throughput&start={iso}&end={quote(end)}&step=5",
                   headers=AUTH)
    assert r.status_code == 200 and int(r.headers["X-Export-Points"]) == 10
