"""Request ids, structured logs without keys, and the API's own metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from api.observability import JsonFormatter, RedactFilter, request_id_from
from tests.api.conftest import API_KEY, OTHER_KEY, KnownPrometheus


def test_request_id_echoed_or_generated(client: Any) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123.x"})
    assert r.headers["X-Request-ID"] == "abc-123.x"
    for insane in ("has space", "x" * 200, "quote\"d", "new\\nline"):
        r = client.get("/healthz", headers={"X-Request-ID": insane})
        assert r.headers["X-Request-ID"] != insane
        assert len(r.headers["X-Request-ID"]) == 32
    r = client.get("/task-completion?window=bad", headers={"X-Request-ID": "req-42"})
    assert r.json["error"]["request_id"] == "req-42"
    assert request_id_from(None) != request_id_from(None)


def test_logs_are_json_and_never_carry_keys(
    known_prometheus: KnownPrometheus, make_app: Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = make_app(known_prometheus.url, rate_limit="2/minute").test_client()
    caplog.set_level(logging.INFO, logger="aicrm.api")
    c.get("/executive-dashboard", headers={"Authorization": "Bearer not-" + API_KEY,
                                           "X-Request-ID": "rid-1"})
    c.get("/executive-dashboard", headers={"X-API-Key": API_KEY})
    c.get("/export?dataset=task_throughput", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    for _ in range(2):  # the key's third request is over the limit, and logged
        c.get("/task-completion", headers={"X-API-Key": API_KEY})
    logging.getLogger("aicrm.api").warning("leak attempt %s", API_KEY)
    assert caplog.records
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    text = "\n".join(lines) + caplog.text
    assert API_KEY not in text and OTHER_KEY not in text
    assert "[REDACTED]" in text
    refused = [json.loads(line) for line in lines if '"request refused"' in line]
    assert {r["status"] for r in refused} == {401, 429}
    assert refused[0]["request_id"] == "rid-1"
    assert all(set(r) >= {"ts", "level", "logger", "message"} for r in refused)


def test_redact_filter_cleans_args_and_extras() -> None:
    record = logging.makeLogRecord({"msg": "key=%s", "args": ("s3cret",), "header": "s3cret!"})
    assert RedactFilter(["s3cret"]).filter(record)
    assert record.getMessage() == "key=[REDACTED]"
    assert record.header == "[REDACTED]!"  # type: ignore[attr-defined]


def test_metrics_count_requests_by_route_template(client: Any) -> None:
    client.get("/task-completion?window=1h")
    client.get("/task-completion?window=bad")
    client.get("/no/such/route")
    text = client.get("/metrics").get_data(as_text=True)
    assert ('aicrm_api_requests_total{code="200",endpoint="/task-completion",method="GET"} 1.0'
            in text)
    assert ('aicrm_api_requests_total{code="400",endpoint="/task-completion",method="GET"} 1.0'
            in text)
    assert 'endpoint="unmatched"' in text and "/no/such/route" not in text
    assert 'aicrm_api_request_duration_seconds_count{endpoint="/task-completion"} 2.0' in text
