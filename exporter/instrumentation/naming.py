"""Catalog names to OpenTelemetry names, chosen so the Prometheus translation gives them back.

OpenTelemetry's Prometheus exporters turn ``gen_ai.client.operation.duration`` with unit ``s``
into ``gen_ai_client_operation_duration_seconds``: dots become underscores, the unit becomes a
suffix (``s`` -> ``seconds``, ``{token}`` -> nothing, ``usd`` -> ``usd``) and counters get
``_total``. Deriving the instrument name from the catalog's Prometheus name (rather than
spelling it again) keeps the two paths on one set of names.
"""

from __future__ import annotations

import re

from .. import catalog as c
from ..catalog import Kind, MetricSpec

INSTRUMENTED: tuple[MetricSpec, ...] = (
    c.AGENT_TASK_RESULTS,
    c.AGENT_TASK_DURATION,
    c.AGENT_RETRIES,
    c.AGENT_HANDOFFS,
    c.AGENT_COST,
    c.AGENT_TOOL_CALLS,
    c.AGENT_TOOL_CALL_DURATION,
    c.GENAI_OPERATION_DURATION,
    c.GENAI_TOKEN_USAGE,
    c.INTEGRATION_REQUESTS,
    c.INTEGRATION_REQUEST_DURATION,
    c.USER_INTERACTIONS,
    c.USER_FEEDBACK_RATING,
    c.LABEL_OVERFLOW,
)
"""The catalog metrics an agent process records itself (the event-driven ones)."""

# UCUM units OpenTelemetry maps to a Prometheus word; any other unit is used as it is.
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": ""}
_ANNOTATION = re.compile(r"\{.*\}")
_GENAI = "gen_ai_"
# Semantic-convention attributes whose key is not the label with dots for underscores.
_SEMCONV_KEYS = {"error_type": "error.type"}


def prometheus_unit(unit: str) -> str:
    """The name suffix OpenTelemetry's Prometheus translation appends for ``unit``."""
    unit = _ANNOTATION.sub("", unit)
    return _UNIT_WORDS.get(unit, unit)


def otel_name(spec: MetricSpec) -> str:
    """The dotted instrument name whose Prometheus translation (with ``spec.unit``) is
    ``spec.name``: ``aicrm_agent_cost_usd_total`` -> ``aicrm.agent.cost`` (unit ``usd``)."""
    base = spec.base_name if spec.kind is Kind.COUNTER else spec.name
    suffix = prometheus_unit(spec.unit)
    if suffix:
        if not base.endswith("_" + suffix):
            raise ValueError(f"{spec.name}: unit {spec.unit!r} needs the suffix _{suffix}")
        base = base.removesuffix("_" + suffix)
    if base.startswith(_GENAI):
        # Semantic-convention names are dotted throughout: gen_ai.client.token.usage.
        return "gen_ai." + base.removeprefix(_GENAI).replace("_", ".")
    prefix, domain, rest = base.split("_", 2)
    return f"{prefix}.{domain}.{rest}"


def attribute_key(label: str) -> str:
    """The attribute key that becomes ``label`` in Prometheus: semantic-convention keys are
    dotted (``gen_ai.request.model``, ``error.type``); aicrm keys are the label itself."""
    if label in _SEMCONV_KEYS:
        return _SEMCONV_KEYS[label]
    if label.startswith(_GENAI):
        return "gen_ai." + label.removeprefix(_GENAI).replace("_", ".")
    return label
