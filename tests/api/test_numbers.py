"""Every number the endpoints return, against values computed by hand from tests/api/data.py.

The data's rates are constant, so a window of W seconds holds rate x W of everything; the
percentiles interpolate linearly inside the bucket the rank falls in, as histogram_quantile does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.api.conftest import AUTH, KnownPrometheus


def approx(x: float) -> Any:
    """Equal up to float rounding and scrape-time jitter at a window's edges."""
    return pytest.approx(x, rel=1e-4, abs=1e-9)


def compared(value: float, previous: float) -> dict[str, Any]:
    """A number and the one before it, with their change and change ratio: the change's error
    is that of both operands (a 1e-4 jitter on 2,880 and 1,440 is 0.29 on their difference of
    1,440, 2e-4 of it), so it is allowed what the operands are, not 1e-4 of itself."""
    tol = 1e-4 * (abs(value) + abs(previous))
    return {"value": approx(value), "previous": approx(previous),
            "change": pytest.approx(value - previous, abs=tol),
            "change_ratio": pytest.approx((value - previous) / previous,
                                          abs=tol / abs(previous))}


def values(block: dict[str, Any]) -> dict[str, Any]:
    """{name: value} of a block of {value, unit} quantities."""
    return {k: v["value"] for k, v in block.items() if isinstance(v, dict) and "unit" in v}


def by(items: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


def test_task_completion_1h(client: Any) -> None:
    r = client.get("/task-completion?window=1h")
    assert r.status_code == 200, r.json
    body = r.json
    assert body["window"] == "1h" and body["window_seconds"] == 3600
    assert body["filters"] == {"task_type": None, "agent": None}
    types = by(body["data"]["task_types"], "task_type")
    assert sorted(types) == ["qualify_lead", "write_email"]
    # qualify_lead: completed 0.4 + 0.1 = 0.5/s, failed 0.05/s, cancelled 0.05/s, terminal 0.6/s.
    # Durations 0.25/s in (30, 60] and 0.25/s in (60, 90]:
    #   p50: rank 0.25 -> 30 + 30 * 0.25/0.25 = 60; p95: rank 0.475 -> 60 + 30 * 0.225/0.25 = 87;
    #   p99: rank 0.495 -> 60 + 30 * 0.245/0.25 = 89.4.
    assert values(types["qualify_lead"]) == {
        "completion_ratio": approx(0.5 / 0.6), "completed": approx(1800), "failed": approx(180),
        "cancelled": approx(180), "terminal": approx(2160), "throughput": approx(0.5),
        "duration_p50": approx(60), "duration_p95": approx(87), "duration_p99": approx(89.4),
        # The queue now: waits 0.5/s in (10, 30] -> p95 = 10 + 20 * 0.95 = 29.
        "queued": approx(100), "running": approx(4), "oldest_open_age": approx(600),
        "wait_p95": approx(29),
    }
    # write_email: completed 0.3/s, failed 0.1/s, none cancelled; durations 0.4/s in (10, 15]:
    #   p50 = 10 + 5 * 0.5 = 12.5, p95 = 14.75, p99 = 14.95.
    assert values(types["write_email"]) == {
        "completion_ratio": approx(0.75), "completed": approx(1080), "failed": approx(360),
        "cancelled": approx(0), "terminal": approx(1440), "throughput": approx(0.3),
        "duration_p50": approx(12.5), "duration_p95": approx(14.75), "duration_p99": approx(14.95),
        # Waits 0.2/s in (60, 120] -> p95 = 60 + 60 * 0.95 = 117.
        "queued": approx(150), "running": approx(6), "oldest_open_age": approx(1200),
        "wait_p95": approx(117),
    }
    # Overall: completed 0.8/s of 1.0/s. Cumulative buckets le=15: 0.4, 30: 0.4, 60: 0.65,
    # 90: 0.9. p50: rank 0.45 -> 30 + 30 * 0.05/0.25 = 36; p95: rank 0.855 -> 60 + 30 * 0.205/0.25
    # = 84.6; p99: rank 0.891 -> 60 + 30 * 0.241/0.25 = 88.92.
    assert values(body["data"]["overall"]) == {
        "completion_ratio": approx(0.8), "completed": approx(2880), "failed": approx(540),
        "cancelled": approx(180), "terminal": approx(3600), "throughput": approx(0.8),
        "duration_p50": approx(36), "duration_p95": approx(84.6), "duration_p99": approx(88.92),
        # Waits together: 0.5/s up to 30, 0.7/s up to 120; rank 0.665 -> 60 + 60 * 0.165/0.2.
        "queued": approx(250), "running": approx(10), "oldest_open_age": approx(1200),
        "wait_p95": approx(109.5),
    }
    assert body["data"]["overall"]["throughput"]["unit"] == "tasks/s"
    assert body["data"]["overall"]["duration_p95"]["unit"] == "s"


def test_task_completion_filtered_by_agent_reads_raw_counters(client: Any) -> None:
    r = client.get("/task-completion?window=10m&agent=email-writer")
    assert r.status_code == 200, r.json
    types = by(r.json["data"]["task_types"], "task_type")
    # email-writer: qualify_lead 0.1/s completed only, no durations recorded for it;
    # write_email 0.3/s completed + 0.1/s failed; 600 s.
    assert values(types["qualify_lead"]) == {
        "completion_ratio": approx(1), "completed": approx(60), "failed": approx(0),
        "cancelled": approx(0), "terminal": approx(60), "throughput": approx(0.1),
        "duration_p50": None, "duration_p95": None, "duration_p99": None,
        # The queue is not the agent's: open tasks have no agent yet.
        "queued": approx(100), "running": approx(4), "oldest_open_age": approx(600),
        "wait_p95": approx(29),
    }
    assert values(types["write_email"])["completed"] == approx(180)
    assert values(types["write_email"])["duration_p95"] == approx(14.75)
    overall = values(r.json["data"]["overall"])
    assert overall["completed"] == approx(240) and overall["terminal"] == approx(300)
    assert overall["completion_ratio"] == approx(0.8)


def test_task_completion_short_and_long_windows(client: Any) -> None:
    # 1m is shorter than any recorded window: the 5m rates answer it.
    short = client.get("/task-completion?window=1m&task_type=write_email").json
    assert [t["task_type"] for t in short["data"]["task_types"]] == ["write_email"]
    assert values(short["data"]["overall"])["completed"] == approx(0.3 * 60)
    assert values(short["data"]["overall"])["completion_ratio"] == approx(0.75)
    # 30d: the 1h rates, recorded here only since this Prometheus started, so how much of the
    # month they cover depends on the time; the numbers over partly covered windows are checked
    # against data of known extent below.
    long = client.get("/task-completion?window=30d&task_type=qualify_lead").json
    assert long["window"] == "30d" and long["window_seconds"] == 30 * 86400
    # A declared-looking task type without data: nulls, not zeros.
    none = client.get("/task-completion?task_type=no_such_type").json
    assert none["data"]["task_types"] == []
    assert set(values(none["data"]["overall"]).values()) == {None}


def test_agent_performance_1h(client: Any) -> None:
    r = client.get("/agent-performance?window=1h")
    assert r.status_code == 200, r.json
    agents = by(r.json["data"]["agents"], "agent")
    assert sorted(agents) == ["email-writer", "lead-qualifier"]
    lead, email = agents["lead-qualifier"], agents["email-writer"]
    # lead-qualifier: 1.0 result/s (0.96 success, 0.02 failure, 0.02 escalated), 0.1 retries/s,
    # durations 1.0/s in (90, 120] -> p95 = 90 + 30 * 0.95 = 118.5; 150 tokens/s; $0.002/s;
    # objective 0.95 (config), met.
    assert values(lead) == {
        "success_ratio": approx(0.96), "results_total": approx(3600),
        "escalation_ratio": approx(0.02), "retries": approx(360), "retries_per_task": approx(0.1),
        "duration_p95": approx(118.5), "tokens": approx(540_000), "tokens_per_task": approx(150),
        "spend": approx(7.2), "cost_per_successful_task": approx(0.002 / 0.96),
        "objective": approx(0.95), "escalations": approx(72),
    }
    assert values(lead["results"]) == {"success": approx(3456), "failure": approx(72),
                                       "escalated": approx(72)}
    assert lead["objective_met"] is True
    # email-writer: 0.5 + 0.5 results/s: success 0.2 + 0.4, failure 0.2 + 0.1, escalated 0.1;
    # retries 0.05 + 0.25; durations 0.5/s in (5, 10], 0.5/s in (10, 15] -> p95 = 10 + 5 * 0.9
    # = 14.5; 300 tokens/s; $0.0012/s; objective = agent_success_ratio_min 0.9, not met.
    assert values(email) == {
        "success_ratio": approx(0.6), "results_total": approx(3600),
        "escalation_ratio": approx(0.1), "retries": approx(1080), "retries_per_task": approx(0.3),
        "duration_p95": approx(14.5), "tokens": approx(1_080_000), "tokens_per_task": approx(300),
        "spend": approx(4.32), "cost_per_successful_task": approx(0.002),
        "objective": approx(0.9), "escalations": approx(360),
    }
    assert email["objective_met"] is False
    assert email["spend"]["unit"] == "usd" and email["tokens"]["unit"] == "tokens"


def test_agent_performance_one_agent_other_window(client: Any) -> None:
    # 70 minutes: the mean of the 5m rates, all inside the data's 80 minutes (a window
    # reaching further back counts only what the data holds; see the last test).
    r = client.get("/agent-performance?window=70m&agent=lead-qualifier")
    agents = r.json["data"]["agents"]
    assert [a["agent"] for a in agents] == ["lead-qualifier"]
    assert values(agents[0])["results_total"] == approx(4200)
    assert values(agents[0])["spend"] == approx(8.4)
    assert r.json["filters"] == {"agent": "lead-qualifier"}


def test_executive_dashboard(client: Any, known_prometheus: KnownPrometheus) -> None:
    r = client.get("/executive-dashboard?window=1h", headers=AUTH)
    assert r.status_code == 200, r.json
    data = r.json["data"]

    def kpi(name: str) -> dict[str, Any]:
        return {k: v for k, v in data["kpis"][name].items() if k != "unit"}

    # Now: completed 0.8/s of 1.0/s terminal; results 2.0/s of which 1.56/s successful;
    # spend $0.0032/s; human time saved 0.5/s x 900 s + 0.3/s x 600 s = 630 s/s.
    # The hour before (tests/api/data.py PREVIOUS): 0.4, 0.8, 1.0 of 2.0, $0.0016/s, 315 s/s.
    assert kpi("tasks_completed") == compared(2880, 1440)
    assert kpi("task_completion_ratio") == compared(0.8, 0.5)
    assert kpi("agent_success_ratio") == compared(0.78, 0.5)
    assert kpi("spend") == compared(11.52, 5.76)
    assert kpi("cost_per_successful_task") == compared(0.0032 / 1.56, 0.0016)
    assert kpi("human_hours_saved") == compared(630, 315)
    assert data["kpis"]["human_hours_saved"]["unit"] == "h"
    # Efficiency (weights 0.4/0.3/0.2/0.1): completion 0.8/0.95, success 0.78/0.9, speed 1
    # (p95 87 s < 120 s target, 14.75 s < 60 s), retries 1/(1 + 0.4/2.0).
    eff = data["scores"]["workflow_efficiency"]
    expected = 100 * (0.4 * 0.8 / 0.95 + 0.3 * 0.78 / 0.9 + 0.2 * 1 + 0.1 / 1.2)
    assert eff["value"] == approx(expected) and eff["previous"] == approx(80)
    assert eff["change"] == compared(expected, 80)["change"]
    assert values(eff["components"]) == {"completion": approx(0.8 / 0.95),
                                         "success": approx(0.78 / 0.9), "speed": approx(1),
                                         "retries": approx(1 / 1.2)}
    # Health (0.3/0.3/0.3/0.1): sources 1, integrations 0 (salesforce fails 10% > 2%),
    # agents 0.5 (one of two meets its objective), backlog min(1, 500/250) = 1 -> 55.
    health = data["scores"]["system_health"]
    assert health["value"] == approx(55) and health["previous"] == approx(40)
    assert health["change_ratio"] == compared(55, 40)["change_ratio"]
    # Users now: 1.6 interactions/s, approvals 0.3 + 0.1 = 0.4/s against 0.1/s rejections; the
    # hour before: 0.8/s, approvals 0.2/s and rejections 0.2/s.
    users = data["users"]
    assert {k: v for k, v in users["interactions"].items() if k != "unit"} == compared(
        5760, 2880)
    assert {k: v for k, v in users["approval_ratio"].items() if k != "unit"} == compared(
        0.8, 0.5)
    assert (users["interactions"]["unit"], users["approval_ratio"]["unit"]) == (
        "interactions", "ratio")
    assert values(users["interactions_by_type"]) == {
        "message": approx(3600), "approval": approx(1440), "rejection": approx(360),
        "feedback": approx(180), "escalation": approx(180)}
    assert users["active_users"] == {"1h": {"value": 25, "unit": "users"},
                                     "24h": {"value": 120, "unit": "users"}}
    firing = {(a["name"], tuple(sorted(a["labels"].items()))) for a in data["alerts"]}
    assert ("AicrmAgentSuccessBelowObjective",
            (("agent", "email-writer"), ("team", "marketing"))) in firing
    assert ("AicrmIntegrationErrorRatioHigh", (("platform", "salesforce"),)) in firing
    assert all(a["severity"] != "recommendation" for a in data["alerts"])
    # The always-firing AicrmWatchdog is no problem to report, though Prometheus has it firing.
    backend = requests.get(f"{known_prometheus.url}/api/v1/alerts", timeout=10).json()
    assert any(a["labels"]["alertname"] == "AicrmWatchdog" and a["state"] == "firing"
               for a in backend["data"]["alerts"])
    assert all(a["name"] != "AicrmWatchdog" for a in data["alerts"] + data["recommendations"])
    route = [a for a in data["recommendations"] if a["name"] == "AicrmRecommendRouteTaskType"]
    assert len(route) == 1
    assert route[0]["labels"] == {"agent": "lead-qualifier", "task_type": "qualify_lead",
                                  "team": "sales-ops"}  # joined from aicrm_agent_info
    assert route[0]["summary"].startswith("Route qualify_lead tasks to lead-qualifier")


PARTIAL_GRID = 1800
"""The subquery step of a 30-day window over 1h rates (api/queries.py step_for), which is also
a multiple of a 2-day window's (120 s): data aligned to it falls on whole points."""

Segment = tuple[str, float, float, float]
"""(series, value, first sample, span): samples a minute apart, the last one 6 minutes before
the span's end, so the point at the end (beyond Prometheus' 5-minute lookback) does not see it
and the segment covers exactly span / step points."""


def _samples(segments: list[Segment]) -> Iterator[tuple[str, float, float]]:
    for name, v, first, span in segments:
        t = first
        while t <= first + span - 360:
            yield name, v, t
            t += 60


def _partial_backend(kind: str, tmp_path: Any, segments: list[Segment]) -> Any:
    """A Prometheus (blocks from promtool, no rules) or a VictoriaMetrics (imported) holding
    only the segments."""
    import subprocess

    from tests import servers

    if kind == "victoriametrics":
        vm = servers.start_victoria_metrics(tmp_path)
        lines = [f"{name} {v!r} {round(t * 1000)}" for name, v, t in _samples(segments)]
        requests.post(f"{vm.url}/api/v1/import/prometheus", data="\n".join(lines) + "\n",
                      timeout=30).raise_for_status()
        vm.force_flush()
        return vm
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    om = workdir / "data.om"
    lines = []
    for family in sorted({name.split("{", 1)[0] for name, *_ in segments}):
        lines.append(f"# TYPE {family} gauge")
        lines += [f"{name} {v!r} {t:.0f}" for name, v, t in _samples(segments)
                  if name.split("{", 1)[0] == family]
    om.write_text("\n".join([*lines, "# EOF"]) + "\n")
    subprocess.run([servers.require_binary("promtool"), "tsdb", "create-blocks-from",
                    "openmetrics", str(om), str(workdir / "data")],
                   check=True, capture_output=True)
    server = servers.PrometheusServer("prometheus", workdir, servers.free_port())
    server.config_path.write_text("global: {}\n")
    server.start(["prometheus", f"--config.file={server.config_path}",
                  f"--storage.tsdb.path={workdir / 'data'}", "--storage.tsdb.retention.time=10y",
                  f"--web.listen-address=127.0.0.1:{server.port}"],
                 cwd=workdir, ready_check=servers.http_ok(f"{server.url}/-/ready"))
    return server


@pytest.mark.parametrize("backend", ["prometheus", "victoriametrics"])
def test_series_that_cover_part_of_the_window_count_only_where_they_exist(
    backend: str, tmp_path: Any, make_app: Any,
) -> None:
    """A series that exists for part of a window (a fresh Prometheus, a new agent or status)
    counts as zero where it has no sample: its rate over the part it covers must not stand for
    the whole window, or a day's tasks read as a month's and a status that began late skews the
    ratio. Recorded 1h rates only, in a backend that evaluates no rules.

    VictoriaMetrics places a subquery's points and looks back for their samples in its own
    way (a whole step back, not 5 minutes), so there a segment may gain or lose a point or two
    at its ends: within two steps' worth (the bug this guards against is a factor of 30)."""
    now = time.time()
    day = 86400
    start = (now - 3 * day) // PARTIAL_GRID * PARTIAL_GRID  # three days ago, on the grid
    tasks = "task_type_status:aicrm_tasks:rate1h"
    completed = f'{tasks}{{task_type="qualify_lead",status="completed"}}'
    failed = f'{tasks}{{task_type="qualify_lead",status="failed"}}'
    done = "global:aicrm_tasks_completed:rate1h"
    segments: list[Segment] = [
        # A whole day: 0.4/s x 86,400 s = 34,560 completed.
        (completed, 0.4, start, day),
        # Failures only in that day's last 6 hours: 0.4/s x 21,600 s = 8,640.
        (failed, 0.4, start + day - 6 * 3600, 6 * 3600),
        # Executive, 2-day window: 0.25/s for 4 h of the previous window (3,600), then 0.5/s
        # for 12 h of the current one (21,600).
        (done, 0.25, start - 4 * 3600, 4 * 3600),
        (done, 0.5, start + 2 * day + PARTIAL_GRID, 12 * 3600),
    ]
    server = _partial_backend(backend, tmp_path, segments)

    def counted(value: float, expected: float, rate: float, step: float) -> bool:
        if backend == "victoriametrics":
            return abs(value - expected) <= 2 * rate * step * (1 + 1e-9)
        return bool(value == approx(expected))

    try:
        client = make_app(server.url).test_client()
        r = client.get("/task-completion?window=30d&task_type=qualify_lead")
        assert r.status_code == 200, r.json
        overall = values(r.json["data"]["overall"])
        # The mean of the points each series has, times 30 days, read 1,036,800 for both.
        assert counted(overall["completed"], 34_560, 0.4, PARTIAL_GRID), overall
        assert counted(overall["failed"], 8_640, 0.4, PARTIAL_GRID), overall
        assert counted(overall["terminal"], 43_200, 0.8, 2 * PARTIAL_GRID), overall
        # It read 0.5.
        assert overall["completion_ratio"] == pytest.approx(34_560 / 43_200, rel=0.02)
        assert overall["throughput"] == pytest.approx(overall["completed"] / (30 * day))

        r = client.get("/executive-dashboard?window=2d", headers=AUTH)
        assert r.status_code == 200, r.json
        kpi = r.json["data"]["kpis"]["tasks_completed"]
        assert counted(kpi["value"], 21_600, 0.5, 120), kpi
        assert counted(kpi["previous"], 3_600, 0.25, 120), kpi
    finally:
        server.stop()
