"""Bounded label sets: values declared in config.json pass, anything else becomes ``other``.

This keeps every metric's cardinality fixed by the config, whatever the events say. The
caller counts overflows (``aicrm_label_overflow_total{label}``); this module only maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import product

from . import catalog as c
from .catalog import OTHER_VALUE, MetricSpec
from .config import GENAI_OPERATIONS, Config


@dataclass(frozen=True, slots=True)
class LabelSet:
    """One bounded set: ``label`` names it in ``aicrm_label_overflow_total``."""

    label: str
    values: frozenset[str]

    def __contains__(self, value: object) -> bool:
        return value in self.values

    def map(self, value: str) -> str:
        return value if value in self.values else OTHER_VALUE

    def with_other(self) -> tuple[str, ...]:
        """Declared values plus ``other``, in a stable order (for pre-created series)."""
        return (*sorted(self.values), OTHER_VALUE)


@dataclass(frozen=True, slots=True)
class LabelSets:
    agents: LabelSet
    task_types: LabelSet
    platforms: LabelSet
    models: LabelSet
    providers: LabelSet
    tools: LabelSet
    channels: LabelSet
    error_types: LabelSet
    genai_operations: LabelSet
    operations: dict[str, LabelSet] = field(default_factory=dict)
    """Declared operations per platform."""
    model_providers: dict[str, str] = field(default_factory=dict)
    agent_task_types: dict[str, frozenset[str]] = field(default_factory=dict)
    """The task types an agent declares it handles; an agent not listed handles all."""

    def operation(self, platform: str, operation: str) -> str:
        ops = self.operations.get(platform)
        return operation if ops is not None and operation in ops.values else OTHER_VALUE

    @classmethod
    def from_config(cls, cfg: Config) -> LabelSets:
        def s(label: str, values: Iterable[str]) -> LabelSet:
            return LabelSet(label, frozenset(values))

        return cls(
            agents=s("agent", (a.name for a in cfg.agents)),
            task_types=s("task_type", (t.name for t in cfg.task_types)),
            platforms=s("platform", (i.platform for i in cfg.integrations)),
            models=s("model", cfg.model_names),
            providers=s("provider", cfg.providers),
            tools=s("tool", cfg.tools),
            channels=s("channel", cfg.channels),
            error_types=s("error_type", cfg.error_types),
            genai_operations=s("operation", GENAI_OPERATIONS),
            operations={i.platform: s("operation", i.operations) for i in cfg.integrations},
            model_providers={
                name: p for name in cfg.model_names if (p := cfg.model_provider(name)) is not None
            },
            agent_task_types={a.name: frozenset(a.task_types) for a in cfg.agents if a.task_types},
        )


OVERFLOW_LABELS = ("agent", "task_type", "platform", "model", "provider", "tool", "channel",
                   "error_type", "operation")
"""The values of ``aicrm_label_overflow_total{label}``."""


def declared_series(ls: LabelSets) -> Iterator[tuple[MetricSpec, Iterable[tuple[str, ...]]]]:
    """The event-fed series that exist, at 0, before their first event: each metric with its
    declared label combinations (label values in catalog order), in a stable order.

    A series that first appears with value 1 hides that event from ``rate()`` and
    ``increase()``. The exporter (``MetricStore``) and the in-process instrumentation both
    start these, so their expositions match before and after any event.
    """
    agents = sorted(ls.agents.values)
    task_types = sorted(ls.task_types.values)
    tools = sorted(ls.tools.values)
    models = sorted(ls.models.values)
    handled = [
        (a, t) for a in agents for t in sorted(ls.agent_task_types.get(a) or task_types)
    ]
    yield c.AGENT_TASK_RESULTS, ((a, t, o) for (a, t) in handled for o in c.OUTCOMES)
    yield c.AGENT_TASK_DURATION, handled
    yield c.AGENT_RETRIES, handled
    yield c.AGENT_HANDOFFS, product(agents, agents)
    yield c.AGENT_COST, product(agents, models)
    yield c.AGENT_TOOL_CALLS, product(agents, tools, c.TOOL_OUTCOMES)
    yield c.AGENT_TOOL_CALL_DURATION, product(agents, tools)
    platforms = [(p, sorted(ops.values)) for p, ops in ls.operations.items()]
    yield c.INTEGRATION_REQUESTS, (
        (p, op, s) for p, ops in platforms for op in ops for s in c.STATUS_CLASSES
    )
    yield c.INTEGRATION_REQUEST_DURATION, ((p, op) for p, ops in platforms for op in ops)
    yield c.USER_INTERACTIONS, product(sorted(ls.channels.values), c.INTERACTION_TYPES)
    yield c.USER_FEEDBACK_RATING, ((a,) for a in agents)
    with_provider = list(ls.model_providers.items())
    # error_type "" is success: the label's value when error.type is absent.
    yield c.GENAI_OPERATION_DURATION, (
        ("chat", m, p, a, "") for (m, p), a in product(with_provider, agents)
    )
    yield c.GENAI_TOKEN_USAGE, (
        ("chat", m, p, t, a) for (m, p), t, a in product(with_provider, c.TOKEN_TYPES, agents)
    )
    yield c.LABEL_OVERFLOW, ((x,) for x in OVERFLOW_LABELS)
