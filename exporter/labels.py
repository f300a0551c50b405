"""Bounded label sets: values declared in config.json pass, anything else becomes ``other``.

This keeps every metric's cardinality fixed by the config, whatever the events say. The
caller counts overflows (``aicrm_label_overflow_total{label}``); this module only maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .catalog import OTHER_VALUE
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
        )
