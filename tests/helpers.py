"""Small builders shared by the tests: configs and registries."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from exporter.config import Config, parse_config
from exporter.metrics import MetricStore

BASE_CONFIG: dict[str, Any] = {
    "agents": [
        {"name": "lead-qualifier", "team": "sales-ops", "success_objective": 0.95},
        {"name": "email-writer", "team": "marketing"},
    ],
    "task_types": [
        {"name": "qualify_lead", "target_seconds": 120, "minutes_saved": 15},
        {"name": "write_email", "target_seconds": 60, "minutes_saved": 10},
    ],
    "integrations": [
        {"platform": "salesforce", "operations": ["query", "update"],
         "error_ratio_max": 0.02, "latency_p95_max_seconds": 1.5},
    ],
    "models": [{"name": "gpt-4o", "provider": "openai"}],
    "tools": ["crm.search"],
    "channels": ["web"],
}


def config_dict(**overrides: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE_CONFIG)
    d.update(copy.deepcopy(overrides))
    return d


def make_config(**overrides: Any) -> Config:
    return parse_config(config_dict(**overrides), "test-config")


def store_and_registry(cfg: Config | None = None) -> tuple[MetricStore, CollectorRegistry]:
    store = MetricStore(cfg or make_config())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    return store, registry


def eventually(check: Callable[[], bool], seconds: float = 2.0, step: float = 0.01) -> bool:
    """True once ``check()`` holds, False if it still does not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
