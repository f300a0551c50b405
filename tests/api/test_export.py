"""GET /export: CSV and JSON range data, streamed, and the point bound."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask

import api
from api.promql import PrometheusClient, RangeSeries, Sample
from tests.api.conftest import API_KEY, AUTH, KnownPrometheus, api_config


def _span(known: KnownPrometheus, seconds: int = 20) -> int:
    """The start of a range of ``seconds`` that has passed (an export ends at now at the
    latest), recent, and from 30 s after the rules started recording: every step has data, of
    rates settled on the known ones."""
    end = max(int(time.time()) - 2, int(known.started) + 30 + seconds)
    delay = end + 1 - time.time()
    if delay > 0:
        time.sleep(delay)
    return end - seconds


def _range(known: KnownPrometheus) -> str:
    start = _span(known)
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
    start = _span(known_prometheus, 50)
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
    start = _span(known_prometheus)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    end = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start + 20))
    r = client.get(f"/export?dataset=task_throughput&start={iso}&end={quote(end)}&step=5",
                   headers=AUTH)
    assert r.status_code == 200 and int(r.headers["X-Export-Points"]) == 10


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_an_end_after_now_is_taken_as_now(known_prometheus: KnownPrometheus) -> None:
    """The backend has no data after now (a range query repeats each series' last sample for
    five minutes, then finds nothing): the range ends at now at the latest, so the series are
    counted where they are, and a request over the bound is refused before any range data is
    loaded (counted at an end more than five minutes ahead, there were none)."""
    results = []
    for max_points in (150, 1000):
        prometheus = CountingClient(known_prometheus.url)
        app = api.create_app(api_config(known_prometheus.url, export_max_points=max_points),
                             api_keys=(API_KEY,), prometheus=prometheus)
        try:
            now = time.time()
            start = round(now - 400, 3)
            # 81 steps of 5 s up to now (x 2 series: over 150); 143 up to the end asked for.
            r = app.test_client().get(f"/export?dataset=task_throughput&format=json"
                                      f"&start={start}&end={int(now) + 310}&step=5",
                                      headers=AUTH)
            results.append((r.status_code, len(prometheus.ranges), r.get_json(), now,
                            time.time()))
        finally:
            api.close_app(app)
    (refused, ranges, error, _, _), (ok, ranges_ok, body, asked, answered) = results
    assert (refused, ranges) == (400, 0), error
    assert "2 series x 81 steps = 162 points" in error["error"]["message"]
    assert (ok, ranges_ok) == (200, 1)
    # The head reports the range's effective end, and no point lies after it.
    end = _epoch(body["end"])
    assert asked - 0.001 <= end <= answered
    assert len(body["series"]) == 2
    for s in body["series"]:
        times = [_epoch(t) for t, _ in s["points"]]
        assert 0 < len(times) <= 81 and max(times) <= end
        assert max(times) > end - 5  # up to now


def test_a_range_after_now_has_no_points(client: Any) -> None:
    start = int(time.time()) + 600
    r = client.get(f"/export?dataset=task_throughput&format=json&start={start}"
                   f"&end={start + 60}&step=5", headers=AUTH)
    assert r.status_code == 200 and r.headers["X-Export-Points"] == "0"
    assert r.json["series"] == [] and _epoch(r.json["end"]) == _epoch(r.json["start"]) == start


@pytest.mark.parametrize(("step", "reported"), [("5.123456789", 5.123), ("1.001", 1.001),
                                                ("2.0004", 2.0), ("7s", 7.0)])
def test_points_are_the_reported_step_apart(client: Any, known_prometheus: KnownPrometheus,
                                             step: str, reported: float) -> None:
    """The backend works in milliseconds: the step is rounded to one and sent as that many
    milliseconds (a float in seconds becomes one millisecond less in one case out of fifty, as
    1.001 s does), and the head reports the step the points are apart."""
    start = _span(known_prometheus)
    r = client.get(f"/export?dataset=task_throughput&format=json&start={start}"
                   f"&end={start + 20}&step={step}", headers=AUTH)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.json["step"] == reported
    assert r.json["series"]
    for s in r.json["series"]:
        times = [round(_epoch(t) * 1000) for t, _ in s["points"]]
        assert len(times) >= 2
        # Steps apart (a step the rules had not recorded yet would have no point).
        gaps = {b - a for a, b in zip(times[:-1], times[1:], strict=True)}
        assert min(gaps) == round(reported * 1000), gaps
        assert all(g % round(reported * 1000) == 0 for g in gaps), gaps
