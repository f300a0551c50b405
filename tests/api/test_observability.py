"""Request ids, structured logs without keys, and the API's own metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from api.gunicorn_logging import JsonAccessLogger
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


@pytest.fixture
def access_logger(tmp_path: Path) -> Iterator[JsonAccessLogger]:
    """The access logger of api/gunicorn.conf.py writing to tmp_path/access.log; its file is
    closed after the test."""
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("accesslog", str(tmp_path / "access.log"))
    log = JsonAccessLogger(cfg)
    yield log
    for h in list(log.access_log.handlers):
        if getattr(h, "_gunicorn", False):
            log.access_log.removeHandler(h)
            h.close()


def test_access_log_lines_are_json_without_headers(
    tmp_path: Path, access_logger: JsonAccessLogger,
) -> None:
    """gunicorn's access logger as configured in api/gunicorn.conf.py: one JSON object per
    request, valid even for a path with quotes and backslashes, no request header in it."""
    log = access_logger

    class Resp:
        status = "429 TOO MANY REQUESTS"
        sent = 321
        headers = [("Content-Type", "application/json"), ("X-Request-ID", "rid-1"),
                   ("Retry-After", "7")]

    class Req:
        headers = [("AUTHORIZATION", f"Bearer {API_KEY}"), ("X-API-KEY", API_KEY)]

    environ = {"REMOTE_ADDR": "192.0.2.9", "REQUEST_METHOD": "GET",
               "PATH_INFO": '/task-completion/"x\\y', "QUERY_STRING": f"key={API_KEY}",
               "HTTP_AUTHORIZATION": f"Bearer {API_KEY}", "HTTP_X_API_KEY": API_KEY}
    log.access(Resp, Req, environ, timedelta(seconds=1, microseconds=2500))
    text = (tmp_path / "access.log").read_text()
    assert API_KEY not in text
    (entry,) = [json.loads(line) for line in text.splitlines()]
    assert entry == {"ts": entry["ts"], "request_id": "rid-1", "remote": "192.0.2.9",
                     "method": "GET", "path": '/task-completion/"x\\y', "status": 429,
                     "bytes": 321, "duration_us": 1_002_500}
    assert entry["ts"].endswith("Z") and entry["ts"][10] == "T"


def test_access_lines_bypass_logging_only_for_plain_handlers(
    tmp_path: Path, access_logger: JsonAccessLogger, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn's own file handler gets the line straight to its stream, also after USR1's
    reopen; a handler or filter added by other logging set-up sees every line."""
    from api.gunicorn_logging import plain_handlers

    log = access_logger
    # pytest attaches its capture handlers to every non-propagating logger during a test;
    # gunicorn's access log has only its own handler in a server.
    for h in [h for h in log.access_log.handlers if not getattr(h, "_gunicorn", False)]:
        log.access_log.removeHandler(h)
    records: list[logging.LogRecord] = []
    handle = log.access_log.handle
    monkeypatch.setattr(log.access_log, "handle",
                        lambda r: (records.append(r), handle(r))[1])

    class Resp:
        status = "200 OK"
        sent = 2
        headers = [("X-Request-ID", "rid-2")]

    environ = {"REMOTE_ADDR": "192.0.2.9", "REQUEST_METHOD": "GET", "PATH_INFO": "/healthz"}
    assert plain_handlers(log.access_log) is not None
    log.access(Resp, None, environ, timedelta(microseconds=5))
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    log.reopen_files()
    log.access(Resp, None, environ, timedelta(microseconds=6))
    old = [json.loads(x) for x in (tmp_path / "access.log.1").read_text().splitlines()]
    new = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert [e["duration_us"] for e in old] == [5] and [e["duration_us"] for e in new] == [6]
    assert records == []  # no LogRecord was made for them

    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    extra = Capture()
    log.access_log.addHandler(extra)
    try:
        assert plain_handlers(log.access_log) is None
        log.access(Resp, None, environ, timedelta(microseconds=7))
    finally:
        log.access_log.removeHandler(extra)
    assert [json.loads(m)["duration_us"] for m in seen] == [7] and len(records) == 1
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert [json.loads(x)["duration_us"] for x in lines] == [6, 7]
    dropped = logging.Filter("not-this-logger")
    log.access_log.addFilter(dropped)
    try:
        log.access(Resp, None, environ, timedelta(microseconds=8))
    finally:
        log.access_log.removeFilter(dropped)
    assert len((tmp_path / "access.log").read_text().splitlines()) == 2
