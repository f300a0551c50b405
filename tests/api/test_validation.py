"""Every bad parameter is a 400 naming it; good spellings are accepted."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from api.validation import format_duration, parse_duration, rfc3339
from tests.api.conftest import AUTH

BAD = [
    ("/task-completion?window=30s", "window"),
    ("/task-completion?window=31d", "window"),
    ("/task-completion?window=5x", "window"),
    ("/task-completion?window=1m1h", "window"),
    ("/task-completion?window=", "window"),
    ("/task-completion?window=1.5h", "window"),
    ("/task-completion?task_type=two%20words", "task_type"),
    ("/task-completion?agent=%22%7D", "agent"),
    ("/task-completion?agent=" + "a" * 65, "agent"),
    ("/agent-performance?window=0m", "window"),
    ("/agent-performance?agent=-lead", "agent"),
    ("/executive-dashboard?window=1y", "window"),
    ("/export", "dataset"),
    ("/export?dataset=nope", "dataset"),
    ("/export?dataset=task_throughput&format=xml", "format"),
    ("/export?dataset=task_throughput&start=yesterday", "start"),
    ("/export?dataset=task_throughput&end=2024-13-01T00:00:00Z", "end"),
    ("/export?dataset=task_throughput&start=2024-05-01T00:00:00", "start"),
    ("/export?dataset=task_throughput&step=0", "step"),
    ("/export?dataset=task_throughput&step=2d", "step"),
    ("/export?dataset=task_throughput&step=abc", "step"),
    ("/export?dataset=task_throughput&start=200&end=100", "end"),
    ("/export?dataset=task_throughput&start=0&end=3000000", "start"),
    ("/export?dataset=task_throughput&start=0&end=86400&step=1", "step"),
    # Parameters an endpoint does not take, or given twice, would be ignored (a view reads the
    # first value) and two different queries answered alike.
    ("/task-completion?windw=1h", "windw"),
    ("/agent-performance?agent%3Dalpha%26window=1d", "agent=alpha&window"),
    ("/agent-performance?task_type=qualify_lead", "task_type"),
    ("/executive-dashboard?agent=lead-qualifier", "agent"),
    ("/export?dataset=task_throughput&limit=5", "limit"),
    ("/task-completion?window=1h&window=1d", "window"),
    ("/agent-performance?agent=a&window=1h&agent=b", "agent"),
    ("/export?dataset=task_throughput&dataset=agent_success_ratio", "dataset"),
]


@pytest.mark.parametrize(("path", "parameter"), BAD)
def test_bad_parameters_are_400_naming_the_parameter(client: Any, path: str,
                                                     parameter: str) -> None:
    r = client.get(path, headers=AUTH)
    assert r.status_code == 400, r.json
    assert r.is_json
    err = r.json["error"]
    assert err["parameter"] == parameter
    assert err["code"] == "invalid_parameter" and err["status"] == 400
    assert err["message"].startswith(parameter + ":")
    assert "Traceback" not in r.get_data(as_text=True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m", 60), ("90m", 5400), ("1h30m", 5400), ("7d", 604800), ("1w", 604800),
     ("30d", 2592000), ("1d12h", 129600), ("", None), ("1h1d", None), ("m", None)],
)
def test_durations(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds


def test_windows_are_echoed_canonically(client: Any) -> None:
    assert client.get("/task-completion?window=90m").json["window"] == "1h30m"
    assert client.get("/task-completion?window=1w").json["window_seconds"] == 604800
    assert format_duration(86400) == "1d"


def test_unknown_routes_and_methods_are_json(client: Any) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    r = client.post("/task-completion")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"


def _rfc3339_by_datetime(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def test_rfc3339_agrees_with_datetime_to_the_millisecond() -> None:
    """Formatted from time.gmtime, rounded like datetime (to the microsecond, then truncated to
    the millisecond), including values that sit on a rounding edge."""
    rng = random.Random(7)
    edges = [0.0, 1.0005, 1.9995, 1349378758.5249994, 1764000000.9999996, 1764000000.999]
    values = edges + [rng.uniform(0, 4e9) for _ in range(20_000)]
    values += [float(rng.randint(0, 4_000_000_000)) + rng.choice((0.0005, 0.9999995, 0.0000005))
               for _ in range(5_000)]
    for ts in values:
        assert rfc3339(ts) == _rfc3339_by_datetime(ts), ts
    assert rfc3339(1764072000.25) == "2025-11-25T12:00:00.250Z"
