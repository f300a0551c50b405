"""``Instrumentation``: agent code records its events in-process, as the exporter would.

Every method applies the exporter's rules (``exporter.metrics.MetricStore``): label values
outside config.json's declared sets become ``other`` and are counted in
``aicrm_label_overflow_total``, milliseconds are recorded as seconds, HTTP statuses become
status classes. The OpenTelemetry instruments are named from the catalog (see ``naming``), and
the Prometheus reader is set up without ``target_info`` and ``otel_scope_*`` labels, so the
series an agent serves are the ones the exporter serves for the same events. Counters start the
exporter's declared series at 0 (``labels.declared_series``); histograms cannot (see
docs/instrumentation.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from threading import Thread
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter, MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import (
    DefaultAggregation,
    ExplicitBucketHistogramAggregation,
    View,
)
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .. import __version__
from .. import catalog as c
from ..catalog import Kind, MetricSpec
from ..config import Config, load_config
from ..events import (
    MAX_COST_USD,
    MAX_COUNT,
    MAX_DURATION_MS,
    AnyId,
    Event,
    Handoff,
    IntegrationCall,
    Interaction,
    LlmCall,
    Name,
    TaskResult,
    ToolCall,
)
from ..labels import LabelSet, LabelSets, declared_series
from ..metrics import status_class
from .naming import INSTRUMENTED, attribute_key, otel_name

SCOPE_NAME = "aicrm"
"""The meter (instrumentation scope) name; not exported as a label."""

_MS = 1000
# The event model's limits, read from its annotations: Name is Annotated[str, Meta(...)];
# AnyId is Annotated[str, Meta(max_length=...)] | int | None.
_NAME_MIN: int = get_args(Name)[1].min_length
_NAME_MAX: int = get_args(Name)[1].max_length
_ID_MAX: int = get_args(get_args(AnyId)[0])[1].max_length
_ERROR_TYPE = "error.type"


def views(label_sets: LabelSets) -> list[View]:
    """Views that give every instrument the catalog's buckets and a cardinality limit above
    what the declared label sets allow, so no series is folded into ``otel.metric.overflow``.

    Pass them to a ``MeterProvider`` you build yourself (for example with an OTLP reader).
    """
    sizes = _label_sizes(label_sets)
    out = []
    for spec in INSTRUMENTED:
        limit = math.prod(sizes[label] for label in spec.labels) + 1
        aggregation = (
            ExplicitBucketHistogramAggregation(boundaries=_bounds(spec))
            if spec.kind is Kind.HISTOGRAM
            else DefaultAggregation()
        )
        out.append(
            View(
                instrument_name=otel_name(spec),
                meter_name=SCOPE_NAME,
                aggregation=aggregation,
                aggregation_cardinality_limit=limit,
            )
        )
    return out


def _bounds(spec: MetricSpec) -> tuple[float, ...]:
    # Floats, so bucket bounds print as the exporter prints them (le="1.0", not le="1").
    return tuple(float(b) for b in spec.buckets)


def _label_sizes(ls: LabelSets) -> dict[str, int]:
    """An upper bound on the distinct values of each label (declared values, ``other`` and
    ``""``), for the cardinality limits."""

    def n(s: LabelSet) -> int:
        return len(s.values) + 2

    agents = n(ls.agents)
    ops = max((len(s.values) for s in ls.operations.values()), default=0) + 2
    label_names = {
        f.name: getattr(ls, f.name) for f in fields(ls) if isinstance(getattr(ls, f.name), LabelSet)
    }
    return {
        "agent": agents,
        "from_agent": agents,
        "to_agent": agents,
        "gen_ai_agent_name": agents,
        "task_type": n(ls.task_types),
        "outcome": len(c.OUTCOMES),
        "tool": n(ls.tools),
        "model": n(ls.models),
        "gen_ai_request_model": n(ls.models),
        "gen_ai_provider_name": n(ls.providers) + len(set(ls.model_providers.values())),
        "gen_ai_operation_name": n(ls.genai_operations),
        "gen_ai_token_type": len(c.TOKEN_TYPES),
        "error_type": n(ls.error_types),
        "platform": n(ls.platforms),
        "operation": ops,
        "status_class": len(c.STATUS_CLASSES),
        "channel": n(ls.channels),
        "type": len(c.INTERACTION_TYPES),
        "label": len(label_names),
    }


class _Instrument:
    """One catalog metric: label values in catalog order become the attribute dict."""

    __slots__ = ("keys", "record")

    def __init__(self, record: Callable[..., None], keys: tuple[str, ...]):
        self.record = record
        self.keys = keys

    @classmethod
    def create(cls, meter: Meter, spec: MetricSpec) -> _Instrument:
        keys = tuple(attribute_key(label) for label in spec.labels)
        name = otel_name(spec)
        if spec.kind is Kind.COUNTER:
            return cls(meter.create_counter(name, spec.unit, spec.help).add, keys)
        if spec.kind is Kind.HISTOGRAM:
            return cls(
                meter.create_histogram(
                    name, spec.unit, spec.help, explicit_bucket_boundaries_advisory=_bounds(spec)
                ).record,
                keys,
            )
        raise ValueError(f"{spec.name}: only counters and histograms are event-driven")

    def without(self, key: str) -> _Instrument:
        """The same instrument, recording without one attribute (``error.type`` on success)."""
        return _Instrument(self.record, tuple(k for k in self.keys if k != key))

    def __call__(self, value: float, *labels: str) -> None:
        self.record(value, dict(zip(self.keys, labels, strict=True)))


class _CatalogLabels(Collector):
    """The Prometheus reader's families with every catalog label on every sample.

    Where OpenTelemetry leaves an attribute out (``error.type`` on success), the exporter
    serves the label empty. The reader fills in ``""`` only when another series of the family
    has the attribute; this fills it in always. Prometheus stores an empty label as no label,
    so no stored series changes: the exposition just stays identical to the exporter's.
    """

    def __init__(self, source: CollectorRegistry):
        self.source = source
        self.labels = {spec.base_name: spec.labels for spec in INSTRUMENTED}

    def describe(self) -> list[Metric]:
        # Registering must not collect: the reader's provider may not exist yet.
        return []

    def collect(self) -> Iterator[Metric]:
        for fam in self.source.collect():
            labels = self.labels.get(fam.name, ())
            # The reader gives every sample of a family the same label names.
            if fam.samples and not all(x in fam.samples[0].labels for x in labels):
                empty = dict.fromkeys(labels, "")
                fam.samples = [s._replace(labels={**empty, **s.labels}) for s in fam.samples]
            yield fam


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} of length {len(text) - 2}"


def _name(field: str, value: object) -> None:
    """Event-line names (``events.Name``): a string of 1 to 256 characters."""
    if not isinstance(value, str) or not _NAME_MIN <= len(value) <= _NAME_MAX:
        raise ValueError(
            f"{field} must be a string of {_NAME_MIN} to {_NAME_MAX} characters, "
            f"got {_show(value)}"
        )


def _id(field: str, value: object) -> None:
    """``events.AnyId``: an integer or a string of at most 256 characters (never a label)."""
    if isinstance(value, bool) or not (
        isinstance(value, int) or isinstance(value, str) and len(value) <= _ID_MAX
    ):
        raise ValueError(
            f"{field} must be an integer or a string of at most {_ID_MAX} characters, "
            f"got {_show(value)}"
        )


def _duration(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= MAX_DURATION_MS
    ):
        raise ValueError(f"{name} must be a number from 0 to {MAX_DURATION_MS:g}, got {value!r}")
    return value / _MS


def _count(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be an integer from 0 to {MAX_COUNT}, got {value!r}")
    return value


def _one_of(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


class Instrumentation:
    """Records agent events as the catalog's metrics, through the OpenTelemetry SDK.

    With no ``meter_provider``, one is built with a Prometheus reader on ``registry`` (a new
    private ``CollectorRegistry`` unless given) plus any ``metric_readers``; ``serve()`` then
    exposes ``/metrics``. With your own ``meter_provider``, build it with ``views(...)`` so the
    histograms get the catalog's buckets.

    Arguments are checked against the event-line contract (DESIGN.md): a value the exporter
    would reject (an unknown outcome, a negative duration, an empty name, ``True`` for a
    number) raises ``ValueError``, and nothing is recorded.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        label_sets: LabelSets | None = None,
        registry: CollectorRegistry | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ):
        if label_sets is None:
            label_sets = LabelSets.from_config(config if config is not None else load_config())
        self.labels = label_sets
        self.registry = registry
        self._owns_provider = meter_provider is None
        self._exposition: _CatalogLabels | None = None
        if meter_provider is None:
            if self.registry is None:
                self.registry = CollectorRegistry()
            # The reader registers with a private registry; _CatalogLabels serves its families.
            own = CollectorRegistry(auto_describe=False)
            reader = PrometheusMetricReader(
                disable_target_info=True, scope_info_enabled=False, registry=own
            )
            meter_provider = SdkMeterProvider(
                metric_readers=[reader, *metric_readers], views=views(label_sets)
            )
            self._exposition = _CatalogLabels(own)
            self.registry.register(self._exposition)
        elif metric_readers:
            raise ValueError("metric_readers apply only when no meter_provider is given")
        self.meter_provider = meter_provider
        meter = meter_provider.get_meter(SCOPE_NAME, __version__)
        i = {spec.name: _Instrument.create(meter, spec) for spec in INSTRUMENTED}
        self._task_results = i[c.AGENT_TASK_RESULTS.name]
        self._task_duration = i[c.AGENT_TASK_DURATION.name]
        self._retries = i[c.AGENT_RETRIES.name]
        self._handoffs = i[c.AGENT_HANDOFFS.name]
        self._cost = i[c.AGENT_COST.name]
        self._tool_calls = i[c.AGENT_TOOL_CALLS.name]
        self._tool_duration = i[c.AGENT_TOOL_CALL_DURATION.name]
        self._genai_duration = i[c.GENAI_OPERATION_DURATION.name]
        # Success: no error.type attribute (GenAI semantic conventions: only on failure).
        self._genai_duration_ok = self._genai_duration.without(_ERROR_TYPE)
        self._genai_tokens = i[c.GENAI_TOKEN_USAGE.name]
        self._integration_requests = i[c.INTEGRATION_REQUESTS.name]
        self._integration_duration = i[c.INTEGRATION_REQUEST_DURATION.name]
        self._interactions = i[c.USER_INTERACTIONS.name]
        self._rating = i[c.USER_FEEDBACK_RATING.name]
        self._overflow = i[c.LABEL_OVERFLOW.name]
        self._record: Mapping[type, Callable[[Any], None]] = {
            TaskResult: self._record_task_result,
            LlmCall: self._record_llm_call,
            ToolCall: self._record_tool_call,
            Handoff: self._record_handoff,
            IntegrationCall: self._record_integration_call,
            Interaction: self._record_interaction,
        }
        # The exporter's declared series, at 0, so the first event shows in rate(). A
        # histogram series cannot exist before its first observation in OpenTelemetry.
        for spec, combos in declared_series(label_sets):
            if spec.kind is Kind.COUNTER:
                add = i[spec.name]
                for combo in combos:
                    add(0, *combo)

    def _m(self, ls: LabelSet, value: str) -> str:
        """Declared values pass; anything else is ``other`` and counted as an overflow."""
        if value in ls.values:
            return value
        self._overflow(1, ls.label)
        return c.OTHER_VALUE

    # --- events ------------------------------------------------------------------------------

    def task_result(
        self,
        agent: str,
        task_type: str,
        outcome: str,
        *,
        task_id: str | int | None = None,
        duration_ms: float | None = None,
        retries: int | None = None,
        workflow: str | None = None,
    ) -> None:
        """An agent finished a task. ``task_id`` and ``workflow`` are never labels."""
        _name("agent", agent)
        _name("task_type", task_type)
        _one_of("outcome", outcome, c.OUTCOMES)
        if task_id is not None:
            _id("task_id", task_id)
        if workflow is not None:
            _name("workflow", workflow)
        seconds = _duration("duration_ms", duration_ms)
        retries = _count("retries", retries)
        ls = self.labels
        agent = self._m(ls.agents, agent)
        task_type = self._m(ls.task_types, task_type)
        self._task_results(1, agent, task_type, outcome)
        if seconds is not None:
            self._task_duration(seconds, agent, task_type)
        if retries:
            self._retries(retries, agent, task_type)

    def llm_call(
        self,
        agent: str,
        model: str,
        *,
        operation: str = "chat",
        provider: str | None = None,
        duration_ms: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cost_usd: float | None = None,
        error_type: str | None = None,
    ) -> None:
        """A model call. ``provider`` defaults to the model's declared provider; no
        ``error_type`` means success: the duration has no ``error.type`` attribute (served as
        ``error_type=""``, as the exporter does)."""
        _name("agent", agent)
        _name("model", model)
        _name("operation", operation)
        if provider is not None:
            _name("provider", provider)
        if error_type is not None:
            _name("error_type", error_type)
        seconds = _duration("duration_ms", duration_ms)
        input_tokens = _count("input_tokens", input_tokens)
        output_tokens = _count("output_tokens", output_tokens)
        if cost_usd is not None and (
            isinstance(cost_usd, bool)
            or not isinstance(cost_usd, (int, float))
            or not 0 <= cost_usd <= MAX_COST_USD
        ):
            raise ValueError(f"cost_usd must be a number from 0 to {MAX_COST_USD:g}, "
                             f"got {cost_usd!r}")
        ls = self.labels
        agent_l = self._m(ls.agents, agent)
        model_l = self._m(ls.models, model)
        op = self._m(ls.genai_operations, operation)
        if provider is not None:
            provider = self._m(ls.providers, provider)
        else:
            provider = ls.model_providers.get(model, c.OTHER_VALUE)
        if seconds is not None:
            if error_type is None:
                self._genai_duration_ok(seconds, op, model_l, provider, agent_l)
            else:
                err = self._m(ls.error_types, error_type)
                self._genai_duration(seconds, op, model_l, provider, agent_l, err)
        if input_tokens is not None:
            self._genai_tokens(input_tokens, op, model_l, provider, "input", agent_l)
        if output_tokens is not None:
            self._genai_tokens(output_tokens, op, model_l, provider, "output", agent_l)
        if cost_usd:
            self._cost(cost_usd, agent_l, model_l)

    def tool_call(
        self,
        agent: str,
        tool: str,
        *,
        duration_ms: float | None = None,
        outcome: str = "success",
        error_type: str | None = None,
    ) -> None:
        """A tool call. ``error_type`` is accepted for parity; tool metrics carry ``outcome``."""
        _name("agent", agent)
        _name("tool", tool)
        _one_of("outcome", outcome, c.TOOL_OUTCOMES)
        if error_type is not None:
            _name("error_type", error_type)
        seconds = _duration("duration_ms", duration_ms)
        ls = self.labels
        agent = self._m(ls.agents, agent)
        tool = self._m(ls.tools, tool)
        self._tool_calls(1, agent, tool, outcome)
        if seconds is not None:
            self._tool_duration(seconds, agent, tool)

    def handoff(
        self,
        from_agent: str,
        to_agent: str,
        *,
        workflow: str | None = None,
        task_id: str | int | None = None,
    ) -> None:
        """Work passed between agents; ``workflow`` and ``task_id`` are never labels."""
        _name("from_agent", from_agent)
        _name("to_agent", to_agent)
        if workflow is not None:
            _name("workflow", workflow)
        if task_id is not None:
            _id("task_id", task_id)
        ls = self.labels
        self._handoffs(1, self._m(ls.agents, from_agent), self._m(ls.agents, to_agent))

    def integration_call(
        self,
        platform: str,
        operation: str,
        *,
        status: int | str | None = None,
        duration_ms: float | None = None,
        agent: str | None = None,
    ) -> None:
        """A request to an external platform. ``status`` is the HTTP code or ``"timeout"``;
        none counts as ``2xx``. Operations are declared per platform in config.json."""
        _name("platform", platform)
        _name("operation", operation)
        if agent is not None:
            _name("agent", agent)
        if status is not None and status != "timeout" and (
            isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599
        ):
            raise ValueError(f"status must be an HTTP code or 'timeout', got {status!r}")
        seconds = _duration("duration_ms", duration_ms)
        ls = self.labels
        platform = self._m(ls.platforms, platform)
        op = ls.operation(platform, operation)
        if op != operation:
            self._overflow(1, "operation")
        self._integration_requests(1, platform, op, status_class(status))
        if seconds is not None:
            self._integration_duration(seconds, platform, op)

    def interaction(
        self,
        channel: str,
        type: str,
        *,
        user: str | int | None = None,
        agent: str | None = None,
        rating: int | None = None,
    ) -> None:
        """A user interacted with an agent. ``user`` is never a label (distinct users are the
        exporter's ``aicrm_active_users``); a rating without an agent counts under ``other``."""
        _name("channel", channel)
        _one_of("type", type, c.INTERACTION_TYPES)
        if user is not None:
            _id("user", user)
        if agent is not None:
            _name("agent", agent)
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5
        ):
            raise ValueError(f"rating must be an integer from 1 to 5, got {rating!r}")
        ls = self.labels
        self._interactions(1, self._m(ls.channels, channel), type)
        if rating is not None:
            agent_l = c.OTHER_VALUE if agent is None else self._m(ls.agents, agent)
            self._rating(rating, agent_l)

    def record(self, event: Event) -> None:
        """Record a typed event from ``exporter.events`` (the model both paths share)."""
        record = self._record.get(type(event))
        if record is None:
            raise TypeError(f"not an event: {event!r}")
        record(event)

    def _record_task_result(self, e: TaskResult) -> None:
        self.task_result(
            e.agent, e.task_type, e.outcome, task_id=e.task_id,
            duration_ms=e.duration_ms, retries=e.retries, workflow=e.workflow,
        )

    def _record_llm_call(self, e: LlmCall) -> None:
        self.llm_call(
            e.agent, e.model, operation=e.operation, provider=e.provider,
            duration_ms=e.duration_ms, input_tokens=e.input_tokens,
            output_tokens=e.output_tokens, cost_usd=e.cost_usd, error_type=e.error_type,
        )

    def _record_tool_call(self, e: ToolCall) -> None:
        self.tool_call(
            e.agent, e.tool, duration_ms=e.duration_ms, outcome=e.outcome, error_type=e.error_type
        )

    def _record_handoff(self, e: Handoff) -> None:
        self.handoff(e.from_agent, e.to_agent, workflow=e.workflow, task_id=e.task_id)

    def _record_integration_call(self, e: IntegrationCall) -> None:
        self.integration_call(
            e.platform, e.operation, status=e.status, duration_ms=e.duration_ms, agent=e.agent
        )

    def _record_interaction(self, e: Interaction) -> None:
        self.interaction(e.channel, e.type, user=e.user, agent=e.agent, rating=e.rating)

    # --- serving -------------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, Thread]:
        """Serve this process's ``/metrics`` on a daemon thread (prometheus_client's server).
        Use ``addr="0.0.0.0"`` in a container so Prometheus can reach it."""
        if self.registry is None:
            raise RuntimeError("serve() needs the Prometheus reader: build without meter_provider")
        return start_http_server(port, addr, registry=self.registry)

    def shutdown(self) -> None:
        """Stop the meter provider this object built (its readers flush and unregister)."""
        if self._owns_provider and isinstance(self.meter_provider, SdkMeterProvider):
            self.meter_provider.shutdown()
        if self._exposition is not None and self.registry is not None:
            self.registry.unregister(self._exposition)
            self._exposition = None
