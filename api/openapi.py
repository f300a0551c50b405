"""The OpenAPI 3 document served at /openapi.json: parameters come from api/validation.py and
api/queries.py constants, and units from the blueprints, so the spec cannot drift from them."""

from __future__ import annotations

import functools
import json
from typing import Any

from exporter import catalog
from exporter.config import LABEL_VALUE_RE

from . import agents, executive, queries, tasks, validation

VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


def _window(default: str) -> dict[str, Any]:
    return _param(
        "window",
        "Look-back window, Prometheus duration syntax, 1m to 30d (e.g. 5m, 1h, 1h30m, 7d).",
        {"type": "string", "pattern": validation.DURATION_RE, "minLength": 2, "maxLength": 16,
         "default": default},
    )


def _label(name: str, what: str) -> dict[str, Any]:
    return _param(name, f"Only this {what} (a label value as declared in config.json).",
                  {"type": "string", "pattern": LABEL_VALUE_RE})


_TIME = {"type": "string", "maxLength": 40,
         "description": "RFC 3339 date-time with offset, or Unix seconds"}
_ERRORS = {
    "400": "A parameter is invalid; `error.parameter` names it (code `invalid_query_string`, "
           "without `parameter`: the query string has raw bytes that are not UTF-8).",
    "401": "An API key is required or the one given is wrong.",
    "429": "Rate limit exceeded; see Retry-After.",
    "502": "The metrics backend rejected the query, answered in a shape that is not the "
           "Prometheus API's, or has no Prometheus API (HTTP 404 from it: check "
           "api.prometheus_url).",
    "503": "The metrics backend is unreachable or failing.",
    "504": "The metrics backend did not answer in time.",
}


def _error_responses(codes: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for code in codes:
        resp: dict[str, Any] = {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if code == "429":
            resp["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                               "description": "Seconds to wait."}}
        out[code] = resp
    return out


def _ok(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description,
            "headers": {"X-Request-ID": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": schema}}}


def _quantities(units: dict[str, str]) -> dict[str, Any]:
    return {name: _ref("Quantity") for name in units}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required}


def _envelope(data: dict[str, Any], extra: dict[str, Any] | None = None,
              windowed: bool = True) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if windowed:
        props["window"] = {"type": "string", "description": "The window, canonical spelling."}
        props["window_seconds"] = {"type": "integer"}
    props.update(extra or {})
    props["generated_at"] = {"type": "string", "format": "date-time"}
    props["evaluated_at"] = {"type": "string", "format": "date-time",
                             "description": "The instant every query was evaluated at."}
    props["data"] = data
    return _object(props)


def _nullable_string() -> dict[str, Any]:
    return {"type": "string", "nullable": True}


def build() -> dict[str, Any]:
    task_block = _object(_quantities(tasks.UNITS))
    task_type_block = _object({"task_type": {"type": "string"}, **_quantities(tasks.UNITS)})
    agent_block = _object({
        "agent": {"type": "string"},
        **_quantities(agents.UNITS),
        "results": _object({o: _ref("Quantity") for o in queries.OUTCOMES}),
        "escalations": _ref("Quantity"),
        "objective_met": {"type": "boolean", "nullable": True,
                          "description": "success_ratio >= objective; null without data"},
    })
    change = _object({
        "value": {"type": "number", "nullable": True},
        "unit": {"type": "string"},
        "previous": {"type": "number", "nullable": True,
                     "description": "The same number over the window before."},
        "change": {"type": "number", "nullable": True, "description": "value - previous"},
        "change_ratio": {"type": "number", "nullable": True,
                         "description": "(value - previous) / previous"},
    })
    score = {"allOf": [change, _object({"components": {
        "type": "object", "additionalProperties": _ref("Quantity")}})]}
    users = _object({
        **{name: change for name in queries.USERS},
        "interactions_by_type": _object({t: _ref("Quantity")
                                         for t in catalog.INTERACTION_TYPES}),
        "active_users": _object({w: _ref("Quantity") for w in catalog.ACTIVE_USER_WINDOWS}),
    })
    users["description"] = (
        "User interactions over the window (approval_ratio: approvals / (approvals + "
        "rejections)), against the window before it; distinct active users now, by trailing "
        "window.")
    alert = _object({
        "name": {"type": "string"},
        "severity": {"type": "string"},
        "summary": _nullable_string(),
        "description": _nullable_string(),
        "runbook_url": _nullable_string(),
        "dashboard_url": _nullable_string(),
        "active_at": _nullable_string(),
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    })
    export_json = _object({
        "dataset": {"type": "string", "enum": list(queries.DATASETS)},
        "series_name": {"type": "string"},
        "unit": {"type": "string"},
        "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time",
                "description": "The range's effective end: the end asked for, or now if that "
                               "is later (the backend has no data after now)."},
        "step": {"type": "number",
                 "description": "Seconds between points: the step asked for, to the "
                                "millisecond."},
        "series": {"type": "array", "items": _object({
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "points": {"type": "array", "items": {
                "type": "array", "minItems": 2, "maxItems": 2,
                "items": {"oneOf": [{"type": "string"}, {"type": "number", "nullable": True}]},
            }},
        })},
    })
    data_errors = ("400", "429", "502", "503", "504")
    secured: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    datasets = "\n".join(f"- `{k}`: {d.description} ({d.unit}; recorded series "
                         f"`{d.series}`)" for k, d in queries.DATASETS.items())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "AI-CRM Analytics API",
            "version": VERSION,
            "description": "Task, agent and business analytics of a multi-agent AI CRM, every "
                           "number a PromQL query over the recorded series of recording_rules/ "
                           "(see docs/api.md). Numbers come as {value, unit}; value is null "
                           "when there is no data.",
        },
        "paths": {
            "/task-completion": {"get": {
                "summary": "Task completion, throughput and duration percentiles",
                "operationId": "taskCompletion",
                "parameters": [_window(tasks.DEFAULT_WINDOW), _label("task_type", "task type"),
                               _label("agent", "agent")],
                "responses": {"200": _ok(_envelope(
                    _object({"overall": task_block,
                             "task_types": {"type": "array", "items": task_type_block}}),
                    {"filters": _object({"task_type": _nullable_string(),
                                         "agent": _nullable_string()})},
                ), "Overall and per task type."), **_error_responses(("401", *data_errors))},
            }},
            "/agent-performance": {"get": {
                "summary": "Per agent results, cost and success objective",
                "operationId": "agentPerformance",
                "parameters": [_window(agents.DEFAULT_WINDOW), _label("agent", "agent")],
                "responses": {"200": _ok(_envelope(
                    _object({"agents": {"type": "array", "items": agent_block}}),
                    {"filters": _object({"agent": _nullable_string()})},
                ), "One entry per agent with data."), **_error_responses(("401", *data_errors))},
            }},
            "/executive-dashboard": {"get": {
                "summary": "Business overview: KPIs, scores, alerts, recommendations",
                "operationId": "executiveDashboard",
                "security": secured,
                "parameters": [_window(executive.DEFAULT_WINDOW)],
                "responses": {"200": _ok(_envelope(_object({
                    "kpis": _object({k: change for k in queries.KPIS}),
                    "scores": _object({"workflow_efficiency": score, "system_health": score}),
                    "users": users,
                    "alerts": {"type": "array", "items": alert},
                    "recommendations": {"type": "array", "items": alert},
                })), "KPIs against the previous window."),
                    **_error_responses(("401", *data_errors))},
            }},
            "/export": {"get": {
                "summary": "Range data of one dataset, CSV or JSON",
                "description": "Datasets:\n" + datasets,
                "operationId": "export",
                "security": secured,
                "parameters": [
                    {**_param("dataset", "The dataset to export.",
                              {"type": "string", "enum": list(queries.DATASETS)}),
                     "required": True},
                    _param("format", "csv (default) or json.",
                           {"type": "string", "enum": list(validation.EXPORT_FORMATS),
                            "default": "csv"}),
                    _param("start", "Range start (default: end - 1h).", _TIME),
                    _param("end", "Range end (default: now; a later end is taken as now, as the "
                                  "backend has no data after now).", _TIME),
                    _param("step", "Resolution: seconds or a duration, 1s to 1d (default 60), "
                                   "rounded to the millisecond.",
                           {"type": "string", "maxLength": 16}),
                ],
                "responses": {"200": {
                    "description": "Streamed; at most api.export_max_points points.",
                    "headers": {"X-Export-Points": {"schema": {"type": "string"}}},
                    "content": {"text/csv": {"schema": {"type": "string"}},
                                "application/json": {"schema": export_json}},
                }, **_error_responses(("401", *data_errors))},
            }},
            "/healthz": {"get": {
                "summary": "The process is up", "operationId": "healthz",
                "responses": {"200": _ok(_object({"status": {"type": "string"}}), "Up.")},
            }},
            "/readyz": {"get": {
                "summary": "The metrics backend answers", "operationId": "readyz",
                "responses": {
                    "200": _ok(_ref("Ready"), "Ready."),
                    "503": {"description": "Backend unreachable, failing or too slow.",
                            "content": {"application/json": {"schema": _ref("Ready")}}},
                },
            }},
            "/metrics": {"get": {
                "summary": "The API's own request metrics (Prometheus text format)",
                "operationId": "metrics",
                "responses": {"200": {"description": "All workers' metrics.",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": {"get": {
                "summary": "This document", "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.0",
                                      "content": {"application/json": {
                                          "schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Quantity": _object({"value": {"type": "number", "nullable": True},
                                     "unit": {"type": "string"}}),
                "Error": _object({"error": _object({
                    "status": {"type": "integer"},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "parameter": {"type": "string"},
                    "request_id": {"type": "string"},
                }, ["status", "code", "message"])}),
                "Ready": _object({"status": {"type": "string", "enum": ["ok", "unavailable"]},
                                  "error": _object({"status": {"type": "integer"},
                                                    "code": {"type": "string"},
                                                    "message": {"type": "string"}})},
                                 ["status"]),
            },
        },
    }


@functools.cache
def spec_json() -> bytes:
    return json.dumps(build(), indent=1, sort_keys=True).encode()
