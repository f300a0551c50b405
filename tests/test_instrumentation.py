"""exporter.instrumentation records the exporter's events under the exporter's series."""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import requests
from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_attribute
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalog as c
from exporter.catalog import Kind
from exporter.config import Config, parse_config
from exporter.events import Event, Rejected, decode_line
from exporter.instrumentation import (
    INSTRUMENTED,
    Instrumentation,
    attribute_key,
    otel_name,
    prometheus_unit,
    views,
)
from exporter.labels import LabelSets, declared_series
from exporter.metrics import MetricStore

CONFIG: dict[str, Any] = {
    "agents": [{"name": "lead-qualifier"}, {"name": "email-writer"}],
    "task_types": [{"name": "qualify_lead"}, {"name": "write_email"}],
    "integrations": [
        {"platform": "salesforce", "operations": ["query", "update"]},
        {"platform": "slack", "operations": ["post_message"]},
    ],
    "models": [{"name": "gpt-4o", "provider": "openai"}, "local-llama"],
    "tools": ["crm.search", "email.send"],
    "channels": ["web", "email"],
}


@pytest.fixture
def cfg() -> Config:
    return parse_config(CONFIG)


@pytest.fixture
def inst(cfg: Config) -> Iterator[Instrumentation]:
    i = Instrumentation(cfg)
    yield i
    i.shutdown()


def value(inst: Instrumentation, name: str, **labels: str) -> float | None:
    assert inst.registry is not None
    return inst.registry.get_sample_value(name, labels)


def families(registry: prometheus_client.CollectorRegistry) -> dict[str, Metric]:
    text = prometheus_client.generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", INSTRUMENTED, ids=lambda s: s.name)
def test_otel_name_translates_back_to_the_catalog_name(spec: c.MetricSpec) -> None:
    # The Prometheus exporter: dots to underscores, the unit word appended unless present.
    name = otel_name(spec).replace(".", "_")
    unit = map_unit(spec.unit)
    assert prometheus_unit(spec.unit) == unit
    if unit and not name.endswith("_" + unit):
        name += "_" + unit
    if spec.kind is Kind.COUNTER:
        name += "_total"
    assert name == spec.name
    for label in spec.labels:
        assert sanitize_attribute(attribute_key(label)) == label


def test_semantic_convention_names() -> None:
    assert otel_name(c.GENAI_OPERATION_DURATION) == "gen_ai.client.operation.duration"
    assert otel_name(c.GENAI_TOKEN_USAGE) == "gen_ai.client.token.usage"
    assert otel_name(c.AGENT_TASK_RESULTS) == "aicrm.agent.task_results"
    assert otel_name(c.AGENT_COST) == "aicrm.agent.cost"
    assert [attribute_key(x) for x in c.GENAI_OPERATION_DURATION.labels] == [
        "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.provider.name",
        "gen_ai.agent.name", "error.type",
    ]
    assert attribute_key("gen_ai_token_type") == "gen_ai.token.type"
    assert attribute_key("task_type") == "task_type"


def record_one_of_each(inst: Instrumentation) -> None:
    inst.task_result("lead-qualifier", "qualify_lead", "success", duration_ms=1500, retries=1)
    inst.llm_call(
        "lead-qualifier", "gpt-4o", duration_ms=800, input_tokens=120, output_tokens=30,
        cost_usd=0.002,
    )
    inst.tool_call("email-writer", "email.send", duration_ms=40)
    inst.handoff("lead-qualifier", "email-writer")
    inst.integration_call("salesforce", "query", status=200, duration_ms=250)
    inst.interaction("web", "feedback", agent="email-writer", rating=5)
    inst.handoff("lead-qualifier", "nobody")


def test_exposition_has_catalog_names_types_help_and_labels_only(inst: Instrumentation) -> None:
    record_one_of_each(inst)
    assert inst.registry is not None
    fams = families(inst.registry)
    assert set(fams) == {s.base_name for s in INSTRUMENTED}
    for spec in INSTRUMENTED:
        fam = fams[spec.base_name]
        assert fam.type == spec.kind.value
        assert fam.documentation == spec.help
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == set(spec.labels), sample
    text = prometheus_client.generate_latest(inst.registry).decode()
    assert "target_info" not in text
    assert "otel_scope" not in text


# --- per event -------------------------------------------------------------------------------


def test_task_result(inst: Instrumentation) -> None:
    inst.task_result("lead-qualifier", "qualify_lead", "success", duration_ms=1500, retries=2)
    inst.task_result("lead-qualifier", "qualify_lead", "failure", retries=0)
    key = {"agent": "lead-qualifier", "task_type": "qualify_lead"}
    assert value(inst, "aicrm_agent_task_results_total", **key, outcome="success") == 1
    assert value(inst, "aicrm_agent_task_results_total", **key, outcome="failure") == 1
    assert value(inst, "aicrm_agent_retries_total", **key) == 2
    # milliseconds in, seconds out
    assert value(inst, "aicrm_agent_task_duration_seconds_sum", **key) == 1.5
    assert value(inst, "aicrm_agent_task_duration_seconds_count", **key) == 1
    assert value(inst, "aicrm_agent_task_duration_seconds_bucket", **key, le="1.0") == 0
    assert value(inst, "aicrm_agent_task_duration_seconds_bucket", **key, le="2.5") == 1


def test_retries_zero_creates_no_series(inst: Instrumentation) -> None:
    inst.task_result("lead-qualifier", "qualify_lead", "success", retries=0)
    inst.task_result("rogue", "qualify_lead", "success", retries=0)
    assert value(
        inst, "aicrm_agent_retries_total", agent="lead-qualifier", task_type="qualify_lead"
    ) == 0  # declared: pre-created
    assert value(
        inst, "aicrm_agent_retries_total", agent="other", task_type="qualify_lead"
    ) is None


def test_llm_call_defaults_provider_and_splits_tokens(inst: Instrumentation) -> None:
    inst.llm_call(
        "email-writer", "gpt-4o", duration_ms=640, input_tokens=900, output_tokens=0,
        cost_usd=0.25,
    )
    inst.llm_call("email-writer", "gpt-4o", cost_usd=0.5)
    key = {
        "gen_ai_operation_name": "chat", "gen_ai_request_model": "gpt-4o",
        "gen_ai_provider_name": "openai", "gen_ai_agent_name": "email-writer",
    }
    assert value(inst, "gen_ai_client_operation_duration_seconds_sum", **key, error_type="") == 0.64
    assert value(inst, "gen_ai_client_token_usage_sum", **key, gen_ai_token_type="input") == 900
    assert value(inst, "gen_ai_client_token_usage_count", **key, gen_ai_token_type="output") == 1
    assert value(inst, "aicrm_agent_cost_usd_total", agent="email-writer", model="gpt-4o") == 0.75


def test_llm_call_error_type_and_explicit_provider(inst: Instrumentation) -> None:
    inst.llm_call(
        "lead-qualifier", "local-llama", operation="text_completion", provider="groq",
        duration_ms=100, error_type="rate_limited",
    )
    inst.llm_call("lead-qualifier", "local-llama", duration_ms=100, error_type="meltdown")
    inst.llm_call("lead-qualifier", "local-llama", duration_ms=100)
    base = {"gen_ai_request_model": "local-llama", "gen_ai_agent_name": "lead-qualifier"}
    name = "gen_ai_client_operation_duration_seconds_count"
    assert value(
        inst, name, **base, gen_ai_operation_name="text_completion",
        gen_ai_provider_name="groq", error_type="rate_limited",
    ) == 1
    # a model without a declared provider and no provider given: "other", not an overflow
    assert value(
        inst, name, **base, gen_ai_operation_name="chat", gen_ai_provider_name="other",
        error_type="other",
    ) == 1
    assert value(
        inst, name, **base, gen_ai_operation_name="chat", gen_ai_provider_name="other",
        error_type="",
    ) == 1
    assert value(inst, "aicrm_label_overflow_total", label="error_type") == 1
    assert value(inst, "aicrm_label_overflow_total", label="provider") == 0


def test_undeclared_values_become_other_and_are_counted(inst: Instrumentation) -> None:
    inst.llm_call("rogue", "gpt-9", operation="dream", provider="acme", duration_ms=5)
    inst.task_result("rogue", "mystery", "escalated")
    inst.tool_call("rogue", "shell.exec", outcome="failure", duration_ms=10)
    inst.handoff("rogue", "ghost")
    inst.interaction("carrier-pigeon", "message")
    assert value(
        inst, "gen_ai_client_operation_duration_seconds_count",
        gen_ai_operation_name="other", gen_ai_request_model="other",
        gen_ai_provider_name="other", gen_ai_agent_name="other", error_type="",
    ) == 1
    assert value(
        inst, "aicrm_agent_task_results_total", agent="other", task_type="other",
        outcome="escalated",
    ) == 1
    assert value(
        inst, "aicrm_agent_tool_calls_total", agent="other", tool="other", outcome="failure"
    ) == 1
    assert value(inst, "aicrm_agent_handoffs_total", from_agent="other", to_agent="other") == 1
    assert value(inst, "aicrm_user_interactions_total", channel="other", type="message") == 1
    overflow = {
        "agent": 5, "model": 1, "operation": 1, "provider": 1, "task_type": 1, "tool": 1,
        "channel": 1,
    }
    for label, n in overflow.items():
        assert value(inst, "aicrm_label_overflow_total", label=label) == n, label


def test_tool_call(inst: Instrumentation) -> None:
    inst.tool_call("email-writer", "crm.search", outcome="failure", duration_ms=12.5)
    key = {"agent": "email-writer", "tool": "crm.search"}
    assert value(inst, "aicrm_agent_tool_calls_total", **key, outcome="failure") == 1
    assert value(inst, "aicrm_agent_tool_call_duration_seconds_sum", **key) == 0.0125
    assert value(inst, "aicrm_agent_tool_call_duration_seconds_bucket", **key, le="0.025") == 1


@pytest.mark.parametrize(
    ("status", "status_class"),
    [
        (None, "2xx"), (200, "2xx"), (204, "2xx"), (101, "2xx"), (302, "2xx"), (400, "4xx"),
        (404, "4xx"), (429, "429"), (500, "5xx"), (503, "5xx"), ("timeout", "timeout"),
    ],
)
def test_integration_status_class(
    inst: Instrumentation, status: int | str | None, status_class: str
) -> None:
    inst.integration_call("salesforce", "query", status=status, duration_ms=1200)
    key = {"platform": "salesforce", "operation": "query"}
    assert value(
        inst, "aicrm_integration_requests_total", **key, status_class=status_class
    ) == 1
    assert value(inst, "aicrm_integration_request_duration_seconds_sum", **key) == 1.2


def test_integration_operations_are_per_platform(inst: Instrumentation) -> None:
    inst.integration_call("slack", "query")  # declared for salesforce only
    inst.integration_call("teams", "post_message")
    requests_total = "aicrm_integration_requests_total"
    assert value(
        inst, requests_total, platform="slack", operation="other", status_class="2xx"
    ) == 1
    assert value(
        inst, requests_total, platform="other", operation="other", status_class="2xx"
    ) == 1
    assert value(inst, "aicrm_label_overflow_total", label="operation") == 2
    assert value(inst, "aicrm_label_overflow_total", label="platform") == 1


def test_interaction_rating(inst: Instrumentation) -> None:
    inst.interaction("email", "feedback", user="u-17", agent="email-writer", rating=4)
    inst.interaction("email", "feedback", rating=2)
    assert value(inst, "aicrm_user_interactions_total", channel="email", type="feedback") == 2
    name = "aicrm_user_feedback_rating"
    assert value(inst, f"{name}_bucket", agent="email-writer", le="3.0") == 0
    assert value(inst, f"{name}_bucket", agent="email-writer", le="4.0") == 1
    assert value(inst, f"{name}_sum", agent="other") == 2
    assert value(inst, "aicrm_label_overflow_total", label="agent") == 0
    text = prometheus_client.generate_latest(inst.registry).decode()  # type: ignore[arg-type]
    assert "u-17" not in text


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "message"),
    [
        ("task_result", ("a", "t", "done"), {}, "outcome must be one of"),
        ("task_result", ("a", "t", "success"), {"duration_ms": -1}, "duration_ms"),
        ("task_result", ("a", "t", "success"), {"duration_ms": float("nan")}, "duration_ms"),
        ("task_result", ("a", "t", "success"), {"retries": 1.5}, "retries"),
        ("llm_call", ("a", "m"), {"input_tokens": -3}, "input_tokens"),
        ("llm_call", ("a", "m"), {"cost_usd": -0.1}, "cost_usd"),
        ("tool_call", ("a", "t"), {"outcome": "escalated"}, "outcome"),
        ("integration_call", ("p", "o"), {"status": 99}, "status"),
        ("integration_call", ("p", "o"), {"status": "200"}, "status"),
        ("interaction", ("web", "like"), {}, "type must be one of"),
        ("interaction", ("web", "feedback"), {"rating": 6}, "rating"),
        # names: 1 to 256 characters, as events.Name; an undeclared valid name before the bad
        # one must not count an overflow either
        ("task_result", ("", "qualify_lead", "success"), {}, "agent must be a string"),
        ("task_result", ("rogue", "", "success"), {}, "task_type must be a string"),
        ("handoff", ("x" * 257, "email-writer"), {}, "from_agent must be a string"),
        ("handoff", ("lead-qualifier", 7), {}, "to_agent must be a string"),
        ("llm_call", ("lead-qualifier", "gpt-4o"), {"operation": "", "duration_ms": 10},
         "operation must be a string"),
        ("llm_call", ("rogue", "gpt-4o"), {"error_type": "", "duration_ms": 10},
         "error_type must be a string"),
        ("llm_call", ("lead-qualifier", "gpt-4o"), {"provider": ""}, "provider"),
        ("tool_call", ("lead-qualifier", "x" * 300), {}, "tool must be a string"),
        ("tool_call", ("lead-qualifier", "crm.search"), {"error_type": ""}, "error_type"),
        ("integration_call", ("salesforce", ""), {}, "operation must be a string"),
        ("integration_call", ("teams", "query"), {"agent": ""}, "agent must be a string"),
        ("interaction", ("", "message"), {}, "channel must be a string"),
        ("interaction", ("web", "message"), {"user": "u" * 257}, "user must be"),
        ("interaction", ("web", "message"), {"user": True}, "user must be"),
        ("task_result", ("a", "t", "success"), {"workflow": ""}, "workflow"),
        ("task_result", ("a", "t", "success"), {"task_id": "t" * 257}, "task_id"),
        # numbers: True is no number in an event line
        ("task_result", ("lead-qualifier", "qualify_lead", "success"), {"duration_ms": True},
         "duration_ms"),
        ("tool_call", ("lead-qualifier", "crm.search"), {"duration_ms": "12"}, "duration_ms"),
        ("llm_call", ("lead-qualifier", "gpt-4o"), {"cost_usd": True}, "cost_usd"),
        ("llm_call", ("lead-qualifier", "gpt-4o"), {"cost_usd": "0.1"}, "cost_usd"),
    ],
)
def test_values_the_exporter_would_reject_raise(
    inst: Instrumentation, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
    message: str,
) -> None:
    call = getattr(inst, method)
    line = {"event": method, **inspect.signature(call).bind(*args, **kwargs).arguments}
    assert isinstance(decode_line(json.dumps(line).encode()), Rejected), line
    assert inst.registry is not None
    before = prometheus_client.generate_latest(inst.registry)
    with pytest.raises(ValueError, match=message):
        call(*args, **kwargs)
    assert prometheus_client.generate_latest(inst.registry) == before


def test_record_accepts_typed_events(cfg: Config) -> None:
    direct, typed = Instrumentation(cfg), Instrumentation(cfg)
    record_one_of_each(direct)
    lines = [
        {"event": "task_result", "agent": "lead-qualifier", "task_type": "qualify_lead",
         "outcome": "success", "duration_ms": 1500, "retries": 1},
        {"event": "llm_call", "agent": "lead-qualifier", "model": "gpt-4o", "duration_ms": 800,
         "input_tokens": 120, "output_tokens": 30, "cost_usd": 0.002},
        {"event": "tool_call", "agent": "email-writer", "tool": "email.send", "duration_ms": 40},
        {"event": "handoff", "from_agent": "lead-qualifier", "to_agent": "email-writer"},
        {"event": "integration_call", "platform": "salesforce", "operation": "query",
         "status": 200, "duration_ms": 250},
        {"event": "interaction", "channel": "web", "type": "feedback", "agent": "email-writer",
         "rating": 5},
        {"event": "handoff", "from_agent": "lead-qualifier", "to_agent": "nobody"},
    ]
    for line in lines:
        event = decode_line(json.dumps(line).encode())
        assert not isinstance(event, Rejected), event
        typed.record(event)
    assert direct.registry is not None and typed.registry is not None
    assert prometheus_client.generate_latest(direct.registry) == prometheus_client.generate_latest(
        typed.registry
    )
    direct.shutdown()
    typed.shutdown()


# --- own meter provider, cardinality, serving ------------------------------------------------


def test_views_give_buckets_and_dotted_attributes_to_any_meter_provider(cfg: Config) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=views(LabelSets.from_config(cfg)))
    inst = Instrumentation(cfg, meter_provider=provider)
    inst.llm_call("lead-qualifier", "gpt-4o", duration_ms=10, input_tokens=5)
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics}
    tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}"
    point = tokens.data.data_points[0]
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == tuple(float(b) for b in c.GENAI_TOKEN_BUCKETS)
    assert dict(point.attributes or {}) == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.provider.name": "openai", "gen_ai.token.type": "input",
        "gen_ai.agent.name": "lead-qualifier",
    }
    assert metrics["gen_ai.client.operation.duration"].unit == "s"
    with pytest.raises(RuntimeError, match="serve"):
        inst.serve(0)
    provider.shutdown()


def test_declared_combinations_are_never_folded_into_an_overflow_series() -> None:
    # 60 agents x 40 task types x 3 outcomes = 7200 series, beyond OpenTelemetry's default 2000.
    cfg = parse_config({
        "agents": [{"name": f"agent-{i}"} for i in range(60)],
        "task_types": [{"name": f"type-{i}"} for i in range(40)],
    })
    inst = Instrumentation(cfg)
    for a in range(60):
        for t in range(40):
            for outcome in c.OUTCOMES:
                inst.task_result(f"agent-{a}", f"type-{t}", outcome)
    assert inst.registry is not None
    fam = families(inst.registry)["aicrm_agent_task_results"]
    assert len(fam.samples) == 7200
    assert all(set(s.labels) == {"agent", "task_type", "outcome"} for s in fam.samples)
    inst.shutdown()


def test_serve_exposes_metrics(inst: Instrumentation) -> None:
    inst.task_result("lead-qualifier", "qualify_lead", "success")
    server, thread = inst.serve(0)
    try:
        resp = requests.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert resp.status_code == 200
    assert (
        'aicrm_agent_task_results_total{agent="lead-qualifier",outcome="success",'
        'task_type="qualify_lead"} 1.0'
    ) in resp.text


# --- both paths, one exposition --------------------------------------------------------------


def workload(n: int, seed: int) -> list[bytes]:
    """Event lines of every kind, with undeclared values, errors and edge cases mixed in."""
    rnd = random.Random(seed)
    agents = ["lead-qualifier", "email-writer", "rogue-agent"]
    task_types = ["qualify_lead", "write_email", "unplanned"]
    models = ["gpt-4o", "local-llama", "gpt-9"]
    lines: list[dict[str, Any]] = []
    for _ in range(n):
        kind = rnd.choice(
            ["task_result", "llm_call", "tool_call", "handoff", "integration_call", "interaction"]
        )
        e: dict[str, Any] = {"event": kind}
        if kind == "task_result":
            e |= {"agent": rnd.choice(agents), "task_type": rnd.choice(task_types),
                  "outcome": rnd.choice(c.OUTCOMES), "task_id": rnd.randrange(10**6)}
            if rnd.random() < 0.9:
                e["duration_ms"] = rnd.choice([rnd.uniform(0, 400_000), 500, 120_000])
            if rnd.random() < 0.5:
                e["retries"] = rnd.choice([0, 0, 1, 3])
            if rnd.random() < 0.3:
                e["workflow"] = "inbound"
        elif kind == "llm_call":
            e |= {"agent": rnd.choice(agents), "model": rnd.choice(models)}
            if rnd.random() < 0.3:
                e["operation"] = rnd.choice(["embeddings", "invoke_agent", "dream"])
            if rnd.random() < 0.2:
                e["provider"] = rnd.choice(["openai", "anthropic", "acme"])
            if rnd.random() < 0.9:
                e["duration_ms"] = rnd.uniform(5, 90_000)
            if rnd.random() < 0.8:
                e["input_tokens"] = rnd.randrange(0, 200_000)
                e["output_tokens"] = rnd.randrange(0, 4_000)
            if rnd.random() < 0.7:
                e["cost_usd"] = rnd.choice([0, round(rnd.uniform(0, 0.2), 6)])
            if rnd.random() < 0.15:
                e["error_type"] = rnd.choice(["timeout", "rate_limited", "cosmic_ray"])
        elif kind == "tool_call":
            e |= {"agent": rnd.choice(agents),
                  "tool": rnd.choice(["crm.search", "email.send", "shell.exec"]),
                  "outcome": rnd.choice(c.TOOL_OUTCOMES)}
            if rnd.random() < 0.8:
                e["duration_ms"] = rnd.uniform(0, 40_000)
            if e["outcome"] == "failure":
                e["error_type"] = "tool_error"
        elif kind == "handoff":
            e |= {"from_agent": rnd.choice(agents), "to_agent": rnd.choice(agents)}
        elif kind == "integration_call":
            e |= {"platform": rnd.choice(["salesforce", "slack", "teams"]),
                  "operation": rnd.choice(["query", "update", "post_message", "delete"])}
            status = rnd.choice([None, 200, 201, 101, 304, 400, 404, 429, 500, 503, "timeout"])
            if status is not None:
                e["status"] = status
            if rnd.random() < 0.9:
                e["duration_ms"] = rnd.choice([rnd.uniform(0, 35_000), 10, 1000])
            if rnd.random() < 0.5:
                e["agent"] = rnd.choice(agents)
        else:
            e |= {"channel": rnd.choice(["web", "email", "fax"]),
                  "type": rnd.choice(c.INTERACTION_TYPES)}
            if rnd.random() < 0.7:
                e["user"] = f"user-{rnd.randrange(50)}"
            if rnd.random() < 0.6:
                e["rating"] = rnd.randint(1, 5)
                if rnd.random() < 0.8:
                    e["agent"] = rnd.choice(agents)
        lines.append(e)
    return [json.dumps(e).encode() for e in lines]


Series = dict[tuple[str, frozenset[tuple[str, str]]], dict[tuple[str, str], float]]


def series_of(fam: Metric) -> Series:
    """Samples grouped by series (labels without ``le``): sample name and ``le`` -> value."""
    out: Series = {}
    for s in fam.samples:
        labels = dict(s.labels)
        le = labels.pop("le", "")
        out.setdefault((fam.name, frozenset(labels.items())), {})[(s.name, le)] = s.value
    return out


# Declared values the workload never uses, so every counter family has zero series to compare.
IDLE_CONFIG: dict[str, Any] = {
    **CONFIG,
    "agents": [*CONFIG["agents"], {"name": "idle-agent", "task_types": ["renew_contract"]}],
    "task_types": [*CONFIG["task_types"], {"name": "renew_contract"}],
    "integrations": [*CONFIG["integrations"], {"platform": "hubspot", "operations": ["sync"]}],
    "models": [*CONFIG["models"], {"name": "claude-idle", "provider": "anthropic"}],
    "tools": [*CONFIG["tools"], "calendar.book"],
    "channels": [*CONFIG["channels"], "sms"],
}


def test_exporter_and_instrumentation_expose_identical_series() -> None:
    """The same event lines, applied by the exporter's store and recorded in-process.

    The store also serves families no event feeds (source self metrics, thresholds); those
    are left out. For every family the instrumentation emits: same name, TYPE and HELP, and
    exactly the same series (label names, label values, every sample value including each
    bucket), the counters' pre-created zero series included. The one difference: the store's
    pre-created histogram series that no event reached (count 0), which OpenTelemetry cannot
    create. Nothing is normalised or approximated.
    """
    cfg = parse_config(IDLE_CONFIG)
    events: list[Event] = []
    for line in workload(3000, seed=7):
        event = decode_line(line)
        assert not isinstance(event, Rejected), event
        events.append(event)

    store = MetricStore(cfg)
    for event in events:
        store.apply(event)
    exporter_registry = prometheus_client.CollectorRegistry()
    exporter_registry.register(store)
    exported = families(exporter_registry)

    inst = Instrumentation(cfg)
    for event in events:
        inst.record(event)
    assert inst.registry is not None
    recorded = families(inst.registry)
    inst.shutdown()

    assert set(recorded) == {s.base_name for s in INSTRUMENTED}
    for name, fam in sorted(recorded.items()):
        theirs = exported[name]
        assert (fam.type, fam.documentation) == (theirs.type, theirs.documentation), name
        ours = series_of(fam)
        expected = series_of(theirs)
        if fam.type == "histogram":
            expected = {k: v for k, v in expected.items() if v[(f"{name}_count", "")]}
        assert ours.keys() == expected.keys(), name
        for key, samples in ours.items():
            assert samples == expected[key], key
        assert ours, name


def counter_series(registry: prometheus_client.CollectorRegistry) -> Series:
    out: Series = {}
    for spec in INSTRUMENTED:
        fam = families(registry).get(spec.base_name)
        if spec.kind is Kind.COUNTER and fam is not None:
            out |= series_of(fam)
    return out


@pytest.mark.parametrize(
    "config",
    [CONFIG, {**CONFIG, "agents": [{"name": "lead-qualifier", "task_types": ["qualify_lead"]},
                                   {"name": "email-writer"}]}],
    ids=["all-task-types", "agent-task-types"],
)
def test_declared_counter_series_start_at_zero_as_in_the_exporter(config: dict[str, Any]) -> None:
    """Before any event, the counters serve the store's pre-created series, all at 0, so the
    first event of each shows in rate() and increase()."""
    cfg = parse_config(config)
    store = MetricStore(cfg)
    exporter_registry = prometheus_client.CollectorRegistry()
    exporter_registry.register(store)
    inst = Instrumentation(cfg)
    assert inst.registry is not None
    ours, theirs = counter_series(inst.registry), counter_series(exporter_registry)
    assert ours == theirs
    assert len(ours) == sum(
        len(list(combos)) for spec, combos in declared_series(LabelSets.from_config(cfg))
        if spec.kind is Kind.COUNTER
    )
    assert all(v == 0 for samples in ours.values() for v in samples.values())
    key = {"agent": "lead-qualifier", "task_type": "qualify_lead", "outcome": "failure"}
    assert value(inst, "aicrm_agent_task_results_total", **key) == 0
    inst.task_result("lead-qualifier", "qualify_lead", "failure")
    assert value(inst, "aicrm_agent_task_results_total", **key) == 1
    inst.shutdown()
    assert families(inst.registry) == {}


def test_success_has_no_error_type_attribute_and_an_empty_label(cfg: Config) -> None:
    """GenAI semantic conventions: ``error.type`` only on failure. Prometheus serves the
    missing attribute as ``error_type=""``, as the exporter does, even when no series of the
    family has an error (OpenTelemetry's reader fills it in only next to one that has)."""
    reader = InMemoryMetricReader()
    inst = Instrumentation(cfg, metric_readers=[reader])
    store = MetricStore(cfg)
    exporter_registry = prometheus_client.CollectorRegistry()
    exporter_registry.register(store)
    for event in (
        {"event": "llm_call", "agent": "lead-qualifier", "model": "gpt-4o", "duration_ms": 70},
        {"event": "llm_call", "agent": "rogue", "model": "gpt-9", "duration_ms": 5},
    ):
        e = decode_line(json.dumps(event).encode())
        assert not isinstance(e, Rejected)
        inst.record(e)
        store.apply(e)
    name = c.GENAI_OPERATION_DURATION.name
    assert inst.registry is not None
    ours = series_of(families(inst.registry)[name])
    theirs = {k: v for k, v in series_of(families(exporter_registry)[name]).items()
              if v[(f"{name}_count", "")]}
    assert ours == theirs
    assert len(ours) == 2
    data = reader.get_metrics_data()
    assert data is not None
    points = [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name == otel_name(c.GENAI_OPERATION_DURATION) for p in m.data.data_points]
    assert len(points) == 2
    assert all("error.type" not in (p.attributes or {}) for p in points)
    inst.llm_call("lead-qualifier", "gpt-4o", duration_ms=70, error_type="timeout")
    data = reader.get_metrics_data()
    assert data is not None
    errors = [dict(p.attributes or {}).get("error.type") for rm in data.resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics
              if m.name == otel_name(c.GENAI_OPERATION_DURATION) for p in m.data.data_points]
    assert sorted(map(str, errors)) == ["None", "None", "timeout"]
    inst.shutdown()


def test_docs_name_table_matches_the_code() -> None:
    """docs/instrumentation.md lists every instrumented metric with its instrument and unit."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "instrumentation.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [x.strip().strip("`") for x in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in c.BY_NAME:
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    assert rows == {
        s.name: (otel_name(s), s.kind.value, s.unit) for s in INSTRUMENTED
    }
    for spec in (c.GENAI_OPERATION_DURATION, c.GENAI_TOKEN_USAGE):
        for label in spec.labels:
            assert f"| `{label}` | `{attribute_key(label)}` |" in doc


def test_record_refuses_what_is_not_an_event(inst: Instrumentation) -> None:
    with pytest.raises(TypeError, match="not an event"):
        inst.record(Rejected("invalid_json", "x"))  # type: ignore[arg-type]
