"""/openapi.json is the source of truth: it is served, lists every route, and schemathesis,
generating requests from it against the live app and known data, finds no 5xx and no response
that breaks the schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import AUTH, KnownPrometheus

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
MAX_EXAMPLES = 30


def test_spec_is_served_and_lists_every_route(client: Any) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.is_json
    spec = r.json
    assert spec["openapi"].startswith("3.")
    routes = {rule.rule for rule in client.application.url_map.iter_rules()}
    assert routes == set(spec["paths"])
    window = next(p for p in spec["paths"]["/task-completion"]["get"]["parameters"]
                  if p["name"] == "window")
    assert window["schema"]["default"] == "1h"


def test_schemathesis(known_prometheus: KnownPrometheus,
                      make_app: Callable[..., Flask]) -> None:
    app = make_app(known_prometheus.url, cache_ttl_seconds=0)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/task-completion", "/export"}
    calls = 0
    for operation in operations:

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[
                      hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers=AUTH, checks=CHECKS)

        run()
    assert calls >= len(operations)
