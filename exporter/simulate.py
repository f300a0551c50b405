"""``aicrm-simulate``: a realistic multi-agent CRM workload written into the configured sources.

Two layers, data flowing one way. ``Workload`` is a pure, seeded discrete-event model: it turns
simulated time into typed events (``exporter.events``), raw lines and task-row changes, and does
no I/O, so tests drive it directly. The writers (event files, HTTP push, task database) only
persist what it produces. ``main`` ties them to the wall clock, the incident control file and
the progress line.

Incidents (``agent-degraded``, ``integration-failing``, ``backlog``, ``cost-spike``) reshape the
model's draws so that every dashboard and alert of the stack has something to show.
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import math
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import msgspec

from .config import Config, ConfigError, TaskDbColumns, default_config_path, load_config
from .events import (
    Event,
    Handoff,
    IntegrationCall,
    Interaction,
    LlmCall,
    TaskResult,
    ToolCall,
)

# --- Incidents ----------------------------------------------------------------------------

INCIDENT_KINDS = ("agent-degraded", "integration-failing", "backlog", "cost-spike")
_TARGETED = {"agent-degraded": "agent", "integration-failing": "platform", "cost-spike": "agent"}


@dataclass(frozen=True, slots=True, order=True)
class Incident:
    kind: str
    target: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind


def parse_incident(text: str, cfg: Config) -> Incident:
    """``NAME[:TARGET]`` to an Incident; a missing target means the first declared one."""
    kind, _, target = text.strip().partition(":")
    if kind not in INCIDENT_KINDS:
        raise ValueError(f"unknown incident {kind!r} (one of {', '.join(INCIDENT_KINDS)})")
    what = _TARGETED.get(kind)
    if what is None:
        if target:
            raise ValueError(f"incident {kind!r} takes no target")
        return Incident(kind)
    names = (
        [a.name for a in cfg.agents] if what == "agent" else [i.platform for i in cfg.integrations]
    )
    if not names:
        raise ValueError(f"incident {kind!r} needs a declared {what}, and config.json has none")
    if not target:
        return Incident(kind, names[0])
    if target not in names:
        raise ValueError(f"incident {kind!r}: {target!r} is not a declared {what}")
    return Incident(kind, target)


def read_control_file(path: Path, cfg: Config) -> tuple[set[Incident], list[str]]:
    """Incidents listed in the control file (one per line, ``#`` comments) and any errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set(), []
    except (OSError, UnicodeDecodeError) as exc:
        return set(), [f"{path}: {exc}"]
    found: set[Incident] = set()
    errors: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            found.add(parse_incident(line, cfg))
        except ValueError as exc:
            errors.append(f"{path}:{n}: {exc}")
    return found, errors


# --- What the model produces --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskChange:
    """A row of the tasks table as of one lifecycle step (epoch seconds, UTC)."""

    id: str
    task_type: str
    workflow: str | None
    status: str
    agent: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class RawLine:
    """A deliberately malformed or undeclared event line (``--noise``)."""

    data: bytes


Output = Event | RawLine | TaskChange
Outcome = Literal["success", "failure", "escalated"]

_encoder = msgspec.json.Encoder()


def encode_line(event: Event) -> bytes:
    """An event as one JSON line body: ``event`` and ``ts`` first, unset fields left out."""
    body: dict[str, Any] = {"event": type(event).__struct_config__.tag}
    if event.ts is not None:
        body["ts"] = event.ts
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if value is not None and name != "ts":
            body[name] = value
    return _encoder.encode(body)


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


# --- Static knowledge: who does what, what it costs -----------------------------------------

# (word in an agent's name or task types, word in a tool/platform name): the agent uses it.
_AFFINITY = (
    ("lead", "crm"), ("lead", "web"), ("lead", "salesforce"), ("lead", "hubspot"),
    ("qualif", "crm"), ("email", "email"), ("email", "gmail"), ("email", "hubspot"),
    ("email", "crm"), ("meeting", "calendar"), ("meeting", "gmail"), ("meeting", "slack"),
    ("meeting", "salesforce"), ("meeting", "crm"), ("enrich", "web"), ("enrich", "crm"),
    ("record", "salesforce"), ("record", "hubspot"), ("support", "slack"), ("support", "crm"),
    ("triag", "hubspot"), ("ticket", "gmail"),
)
# Workflows: name, task-type keywords in order, share of new work.
_WORKFLOWS = (
    ("lead-to-meeting", ("qualif", "email", "meeting"), 0.45),
    ("support-ticket", ("triag", "email"), 0.2),
    ("record-hygiene", ("enrich",), 0.35),
)
_CONTINUE = 0.6
"""Chance that a successful workflow step leads to the next one (a qualified lead, ...)."""
# USD per million input / output tokens, by a word of the model's name.
_PRICES = (
    ("mini", (0.15, 0.6)), ("nano", (0.1, 0.4)), ("haiku", (0.8, 4.0)), ("flash", (0.3, 2.5)),
    ("opus", (15.0, 75.0)), ("o1", (15.0, 60.0)), ("sonnet", (3.0, 15.0)), ("gpt-4o", (2.5, 10.0)),
    ("gpt-4", (2.0, 8.0)), ("gemini", (1.25, 10.0)), ("mistral", (2.0, 6.0)),
)
_DEFAULT_PRICE = (2.0, 8.0)
_PROVIDER_HINTS = (
    ("gpt", "openai"), ("o1", "openai"), ("o3", "openai"), ("claude", "anthropic"),
    ("gemini", "gcp.gemini"), ("mistral", "mistral_ai"), ("command", "cohere"),
    ("deepseek", "deepseek"), ("grok", "x_ai"),
)
# Median latency in ms by a word of the platform's name.
_LATENCY = (("salesforce", 250.0), ("hubspot", 300.0), ("slack", 150.0), ("gmail", 400.0))
_TOOL_LATENCY = (("calendar", 600.0), ("web", 800.0), ("email", 400.0))


def _words(name: str) -> list[str]:
    return [w for w in name.lower().replace("-", "_").replace(".", "_").split("_") if w]


def _related(a: str, b: str) -> bool:
    """Names share a word, allowing suffixes: 'qualify_lead' and 'lead-qualifier' do."""
    return any(
        min(len(x), len(y)) >= 4 and (x.startswith(y) or y.startswith(x) or x[:5] == y[:5])
        for x in _words(a)
        for y in _words(b)
    )


def _affine(subject: str, names: Sequence[str]) -> list[str]:
    text = subject.lower()
    hits = [n for n in names if any(a in text and c in n.lower() for a, c in _AFFINITY)]
    return hits or list(names)


def _lookup(table: Iterable[tuple[str, Any]], name: str, default: Any) -> Any:
    low = name.lower()
    for key, value in table:
        if key in low:
            return value
    return default


@dataclass(slots=True)
class _Task:
    id: str
    task_type: str
    workflow: str
    step: int
    agent: str
    created: float
    started: float | None = None
    status: str = "queued"

    def change(self, finished: float | None = None) -> TaskChange:
        return TaskChange(self.id, self.task_type, self.workflow, self.status,
                          self.agent if self.started is not None else None,
                          self.created, self.started, finished)


@dataclass(slots=True)
class Stats:
    """Running totals for the progress line and for tests."""

    events: int = 0
    raw_lines: int = 0
    tasks_created: int = 0
    queued: int = 0
    running: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


# Heap actions.
_EMIT, _FINISH, _PATIENCE = 0, 1, 2


class Workload:
    """The multi-agent CRM as a seeded discrete-event model; ``advance`` moves its clock.

    Nothing here reads a clock or touches a file: the caller passes time in and persists what
    comes out, so the same seed and start give the same lines.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        start: float,
        rate: float = 1.0,
        seed: int | None = None,
        speedup: float = 1.0,
        users: int = 300,
        noise: float = 0.0,
        id_prefix: str = "sim",
        incidents: Iterable[Incident] = (),
    ) -> None:
        if rate <= 0 or speedup <= 0:
            raise ValueError("rate and speedup must be positive")
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.rate = rate
        self.speedup = speedup
        self.noise = noise
        self.id_prefix = id_prefix
        self.now = start
        self.stats = Stats()
        self.incidents: frozenset[Incident] = frozenset(incidents)
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._n = 0
        self._out: list[Output] = []

        self.agents = [a.name for a in cfg.agents]
        objective = {
            a.name: a.success_objective
            if a.success_objective is not None
            else cfg.thresholds.agent_success_ratio_min
            for a in cfg.agents
        }
        # Healthy agents spend about half their error budget.
        self.base_success = {a: 1 - (1 - o) * 0.5 for a, o in objective.items()}
        self.target = {t.name: t.target_seconds or 60.0 for t in cfg.task_types}
        self.handlers = self._assign_handlers(
            {a.name: tuple(a.task_types) for a in cfg.agents})
        self.workflows = self._workflows()
        handled = {a: " ".join([a, *(t for t, hs in self.handlers.items() if a in hs)])
                   for a in self.agents}
        self.tools = {a: _affine(handled[a], cfg.tools) if cfg.tools else [] for a in self.agents}
        platforms = [i.platform for i in cfg.integrations]
        self.platforms = {a: _affine(handled[a], platforms) if platforms else []
                          for a in self.agents}
        self.operations = {i.platform: list(i.operations) or ["request"]
                           for i in cfg.integrations}
        models = list(cfg.model_names)
        self.models = models
        self.primary_model = {a: models[i % len(models)] for i, a in enumerate(self.agents)} \
            if models else {}
        self.expensive_model = max(models, key=lambda m: sum(_lookup(_PRICES, m, _DEFAULT_PRICE))) \
            if models else None
        self.providers = {m: self._provider(m) for m in models}
        self.error_types = set(cfg.error_types)
        self.channels = list(cfg.channels)
        self.users = [f"user-{i:04d}" for i in range(max(1, users))]
        cum = 0.0
        self.user_weights = []
        for i in range(len(self.users)):
            cum += 1 / (i + 1) ** 0.8
            self.user_weights.append(cum)
        self.workers = self._capacity()
        self.busy = dict.fromkeys(self.agents, 0)
        self.queues: dict[str, list[_Task]] = {a: [] for a in self.agents}
        self.queue_head = dict.fromkeys(self.agents, 0)
        self.open: dict[str, _Task] = {}
        self._next_arrival = start + self._interarrival()
        self._next_message = start + self.rng.expovariate(self._message_rate())

    # -- set-up ------------------------------------------------------------------------------

    def _assign_handlers(self, declared: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
        """Task type -> agents able to do it. When the config says (``agents[].task_types``):
        the agents that list the type, and those that list none (they handle every type).
        When no agent lists any: related names first, round-robin otherwise; so does a type
        that no agent can take."""
        out: dict[str, list[str]] = {}
        if any(declared.values()):
            for t in self.target:
                out[t] = [a for a in self.agents if not declared[a] or t in declared[a]]
        for i, t in enumerate(self.target):
            if out.get(t):
                continue
            matched = [a for a in self.agents if _related(t, a)]
            out[t] = matched or [self.agents[i % len(self.agents)]]
        if any(declared.values()):
            return out
        idle = [a for a in self.agents if not any(a in hs for hs in out.values())]
        types = list(out)
        for i, a in enumerate(idle):
            out[types[i % len(types)]].append(a)
        return out

    def _workflows(self) -> list[tuple[str, list[str], float]]:
        types = list(self.target)
        flows: list[tuple[str, list[str], float]] = []
        for name, keys, weight in _WORKFLOWS:
            steps = [next(t for t in types if k in t) for k in keys if any(k in t for t in types)]
            if steps:
                flows.append((name, list(dict.fromkeys(steps)), weight))
        # A task type no known workflow covers runs as a workflow of its own.
        rest = [t for t in types if not any(t in s for _, s, _ in flows)]
        flows.extend((t.replace("_", "-"), [t], 0.1) for t in rest)
        return flows

    def _provider(self, model: str) -> str | None:
        p = self.cfg.model_provider(model) or _lookup(_PROVIDER_HINTS, model, None)
        return p if p in self.cfg.providers else None

    def _task_rates(self) -> dict[str, float]:
        """Expected arrivals per second of each task type at the nominal rate."""
        total_weight = sum(w for _, _, w in self.workflows)
        per_start: dict[str, float] = dict.fromkeys(self.target, 0.0)
        for _, steps, w in self.workflows:
            reach = w / total_weight
            for t in steps:
                per_start[t] += reach
                reach *= 0.95 * _CONTINUE
        tasks_per_start = sum(per_start.values())
        self.tasks_per_start = tasks_per_start
        return {t: self.rate * v / tasks_per_start for t, v in per_start.items()}

    def _capacity(self) -> dict[str, int]:
        """Workers per agent so that a healthy agent is about 55% busy."""
        load = dict.fromkeys(self.agents, 0.0)
        for t, lam in self._task_rates().items():
            hs = self.handlers[t]
            mean = self.target[t] * math.exp(0.45**2 / 2) / self.speedup
            for a in hs:
                load[a] += lam * mean / len(hs)
        return {a: max(2, math.ceil(v / 0.55)) for a, v in load.items()}

    # -- incidents -----------------------------------------------------------------------------

    def set_incidents(self, incidents: Iterable[Incident]) -> None:
        self.incidents = frozenset(incidents)

    def _has(self, kind: str, target: str | None = None) -> bool:
        return Incident(kind, target) in self.incidents

    def _arrival_factor(self) -> float:
        return 3.0 if self._has("backlog") else 1.0

    def _interarrival(self) -> float:
        starts = self.rate / self.tasks_per_start * self._arrival_factor()
        return self.rng.expovariate(starts)

    def _message_rate(self) -> float:
        return 0.4 * self.rate

    # -- the clock -------------------------------------------------------------------------------

    def advance(self, until: float) -> list[Output]:
        """Run the model up to ``until`` (epoch seconds); returns what happened, in time order."""
        while True:
            t_heap = self._heap[0][0] if self._heap else math.inf
            t = min(t_heap, self._next_arrival, self._next_message)
            if t > until:
                break
            self.now = t
            if t == t_heap:
                _, _, action, payload = heapq.heappop(self._heap)
                if action == _EMIT:
                    self._emit(payload)
                elif action == _FINISH:
                    self._finish(payload)
                else:
                    self._patience(payload)
            elif t == self._next_arrival:
                self._start_workflow()
                self._next_arrival = t + self._interarrival()
            else:
                self._spontaneous_message()
                self._next_message = t + self.rng.expovariate(self._message_rate())
        self.now = max(self.now, until)
        out, self._out = self._out, []
        return out

    def close_open(self) -> list[Output]:
        """Cancel every open task at the current time (the workers are going away)."""
        for task in sorted(self.open.values(), key=lambda k: k.created):
            self._end(task, "cancelled")
        self.open.clear()
        out, self._out = self._out, []
        return out

    def _schedule(self, t: float, action: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, action, payload))

    def _emit(self, item: Event | RawLine) -> None:
        self._out.append(item)
        if isinstance(item, RawLine):
            self.stats.raw_lines += 1
            return
        self.stats.events += 1
        if self.noise and self.rng.random() < self.noise:
            self._out.append(self._noise_line())
            self.stats.raw_lines += 1

    # -- tasks -----------------------------------------------------------------------------------

    def _start_workflow(self) -> None:
        flows = self.workflows
        name, steps, _ = self.rng.choices(flows, weights=[w for _, _, w in flows])[0]
        t = steps[0]
        self._create(t, name, 0, self.rng.choice(self.handlers[t]))

    def _create(self, task_type: str, workflow: str, step: int, agent: str) -> _Task:
        self._n += 1
        task = _Task(f"{self.id_prefix}-{self._n:08d}", task_type, workflow, step, agent, self.now)
        self.open[task.id] = task
        self.queues[agent].append(task)
        self.stats.tasks_created += 1
        self.stats.queued += 1
        self._out.append(task.change())
        patience = self.rng.expovariate(1 / (20 * self.target[task_type] / self.speedup))
        self._schedule(self.now + patience, _PATIENCE, task)
        self._dispatch(agent)
        return task

    def _dispatch(self, agent: str) -> None:
        q = self.queues[agent]
        while self.busy[agent] < self.workers[agent] and self.queue_head[agent] < len(q):
            task = q[self.queue_head[agent]]
            self.queue_head[agent] += 1
            if task.status == "queued":
                self._run(task)
        if self.queue_head[agent] > 1024:
            del q[: self.queue_head[agent]]
            self.queue_head[agent] = 0

    def _patience(self, task: _Task) -> None:
        if task.status == "queued":
            self._end(task, "cancelled")

    def _end(self, task: _Task, status: str) -> None:
        if task.status == "queued":
            self.stats.queued -= 1
        elif task.status == "running":
            self.stats.running -= 1
            self.busy[task.agent] -= 1
        task.status = status
        self.open.pop(task.id, None)
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        self._out.append(task.change(self.now))

    def _run(self, task: _Task) -> None:
        """Start a task and plan its whole execution: calls, outcome, follow-ups."""
        rng, a, t0 = self.rng, task.agent, self.now
        task.started, task.status = t0, "running"
        self.busy[a] += 1
        self.stats.queued -= 1
        self.stats.running += 1
        self._out.append(task.change())

        degraded = self._has("agent-degraded", a)
        slow = (3.0 if degraded else 1.0) * (2.0 if self._has("backlog") else 1.0)
        median = self.target[task.task_type] * slow / self.speedup
        duration = median * math.exp(rng.gauss(0, 0.45))

        broken = self._plan_integrations(task, t0, duration)
        p = 0.5 if degraded else self.base_success[a]
        if broken and rng.random() < 0.25 * broken:
            p = 0.0
        r = rng.random()
        outcome: Outcome = (
            "success" if r < p else ("failure" if r < p + (1 - p) * 0.75 else "escalated")
        )
        self._plan_llm(task, t0, duration, outcome)
        self._plan_tools(task, t0, duration, degraded)
        if outcome == "success":
            retries = 1 if rng.random() < (0.3 if degraded else 0.06) else 0
        else:
            retries = rng.randint(1, 3)
        result = TaskResult(
            agent=a, task_type=task.task_type, outcome=outcome, task_id=task.id,
            duration_ms=round(duration * 1000, 1), retries=retries, workflow=task.workflow,
            ts=_ts(t0 + duration),
        )
        self._schedule(t0 + duration, _FINISH, (task, result))

    def _finish(self, payload: tuple[_Task, TaskResult]) -> None:
        task, result = payload
        self._emit(result)
        self._end(task, "completed" if result.outcome == "success" else "failed")
        self._plan_interactions(task, result.outcome)
        if result.outcome == "success":
            steps = next(s for n, s, _ in self.workflows if n == task.workflow)
            if task.step + 1 < len(steps) and self.rng.random() < _CONTINUE:
                nxt = steps[task.step + 1]
                to = self.rng.choice(self.handlers[nxt])
                self._emit(Handoff(from_agent=task.agent, to_agent=to, workflow=task.workflow,
                                   task_id=task.id, ts=_ts(self.now)))
                self._create(nxt, task.workflow, task.step + 1, to)
        self._dispatch(task.agent)

    # -- calls within a task -----------------------------------------------------------------------

    def _error_type(self, *choices: str) -> str | None:
        for c in choices:
            if c in self.error_types:
                return c
        return None

    def _plan_integrations(self, task: _Task, t0: float, duration: float) -> int:
        """Schedule the task's integration calls; returns how many failed server-side."""
        rng, broken = self.rng, 0
        platforms = self.platforms[task.agent]
        if not platforms:
            return 0
        for _ in range(rng.randint(1, 3)):
            platform = rng.choice(platforms)
            failing = self._has("integration-failing", platform)
            latency = _lookup(_LATENCY, platform, 300.0) * math.exp(rng.gauss(0, 0.6))
            if failing:
                latency *= 4
            r = rng.random()
            status: int | Literal["timeout"]
            if failing and r < 0.4:
                status = "timeout" if r < 0.15 else rng.choice((500, 502, 503))
            elif r < 0.004:
                status = 429
            elif r < 0.006:
                status = "timeout"
            elif r < 0.008:
                status = rng.choice((500, 502, 503))
            elif r < 0.011:
                status = rng.choice((400, 404, 409))
            else:
                status = rng.choice((200, 200, 200, 201))
            if status == "timeout":
                latency = rng.uniform(10_000, 30_000)
            if status == "timeout" or (isinstance(status, int) and status >= 500):
                broken += 1
            t = t0 + rng.random() * duration
            self._schedule(t, _EMIT, IntegrationCall(
                platform=platform, operation=rng.choice(self.operations[platform]),
                status=status, duration_ms=round(latency, 1), agent=task.agent, ts=_ts(t),
            ))
        return broken

    def _plan_llm(self, task: _Task, t0: float, duration: float, outcome: str) -> None:
        if not self.models:
            return
        rng, a = self.rng, task.agent
        spike = self._has("cost-spike", a)
        n = rng.randint(6, 12) if spike else rng.choice((1, 2, 2, 3, 3, 4))
        for i in range(n):
            if spike:
                model = self.expensive_model or self.models[0]
                tin, tout = 40_000 * math.exp(rng.gauss(0, 0.4)), 1500 * math.exp(rng.gauss(0, 0.5))
            else:
                model = self.primary_model[a] if rng.random() < 0.8 else rng.choice(self.models)
                tin, tout = 1200 * math.exp(rng.gauss(0, 0.6)), 250 * math.exp(rng.gauss(0, 0.6))
            ms = (400 + tout * 12) * math.exp(rng.gauss(0, 0.3))
            error = None
            last = i == n - 1
            if (last and outcome != "success" and rng.random() < 0.3) or rng.random() < 0.015:
                error = self._error_type(rng.choice(("timeout", "rate_limited", "server_error")))
            if error is not None:
                tout = 0
            pin, pout = _lookup(_PRICES, model, _DEFAULT_PRICE)
            cost = (int(tin) * pin + int(tout) * pout) / 1e6
            t = t0 + duration * (i + rng.random()) / n
            self._schedule(t, _EMIT, LlmCall(
                agent=a, model=model, operation="chat", provider=self.providers[model],
                duration_ms=round(ms, 1), input_tokens=int(tin), output_tokens=int(tout),
                cost_usd=round(cost, 6), error_type=error, ts=_ts(t),
            ))

    def _plan_tools(self, task: _Task, t0: float, duration: float, degraded: bool) -> None:
        tools = self.tools[task.agent]
        if not tools:
            return
        rng = self.rng
        for _ in range(rng.randint(0, 3)):
            tool = rng.choice(tools)
            failed = rng.random() < (0.25 if degraded else 0.02)
            t = t0 + rng.random() * duration
            self._schedule(t, _EMIT, ToolCall(
                agent=task.agent, tool=tool,
                duration_ms=round(_lookup(_TOOL_LATENCY, tool, 200.0)
                                  * math.exp(rng.gauss(0, 0.5)), 1),
                outcome="failure" if failed else "success",
                error_type=self._error_type("tool_error") if failed else None, ts=_ts(t),
            ))

    # -- users -----------------------------------------------------------------------------------

    def _user(self) -> str:
        return self.rng.choices(self.users, cum_weights=self.user_weights)[0]

    def _channel(self) -> str:
        n = len(self.channels)
        weights = [2.0 if i == 0 else 1.0 for i in range(n)]
        return self.rng.choices(self.channels, weights=weights)[0]

    def _rating(self, agent: str) -> int:
        weights = (0.2, 0.25, 0.25, 0.2, 0.1) if self._has("agent-degraded", agent) \
            else (0.02, 0.04, 0.1, 0.34, 0.5)
        return self.rng.choices((1, 2, 3, 4, 5), weights=weights)[0]

    def _plan_interactions(self, task: _Task, outcome: str) -> None:
        if not self.channels:
            return
        rng, a = self.rng, task.agent
        later = self.now + rng.expovariate(1 / 120) / self.speedup
        if outcome == "escalated":
            self._schedule(self.now, _EMIT, Interaction(
                channel=self._channel(), type="escalation", user=self._user(), agent=a,
                ts=_ts(self.now)))
        elif outcome == "success" and rng.random() < 0.25:
            rejected = rng.random() < (0.5 if self._has("agent-degraded", a) else 0.12)
            self._schedule(later, _EMIT, Interaction(
                channel=self._channel(), type="rejection" if rejected else "approval",
                user=self._user(), agent=a, ts=_ts(later)))
        if rng.random() < 0.15:
            self._schedule(later, _EMIT, Interaction(
                channel=self._channel(), type="feedback", user=self._user(), agent=a,
                rating=self._rating(a), ts=_ts(later)))

    def _spontaneous_message(self) -> None:
        if not self.channels:
            return
        self._emit(Interaction(channel=self._channel(), type="message", user=self._user(),
                               agent=self.rng.choice(self.agents), ts=_ts(self.now)))

    # -- noise -----------------------------------------------------------------------------------

    def _noise_line(self) -> RawLine:
        """One line the exporter must reject, or accept with an undeclared label value."""
        ts = _ts(self.now).isoformat().replace("+00:00", "Z")
        a = self.rng.choice(self.agents)
        lines = (
            b'{"event": "task_result", "agent": "' + a.encode() + b'", "task_ty',
            b'{"event": "telemetry", "ts": "' + ts.encode() + b'"}',
            b'{"event": "task_result", "agent": "' + a.encode() + b'", "ts": "' + ts.encode()
            + b'"}',
            b'{"event": "tool_call", "agent": "' + a.encode() + b'", "tool": "x", "duration_ms": '
            b"-5}",
            b'["task_result"]',
            b'{"event": "task_result", "agent": "unregistered-agent", "task_type": "'
            + next(iter(self.target)).encode() + b'", "outcome": "success", "ts": "'
            + ts.encode() + b'"}',
        )
        return RawLine(self.rng.choice(lines))


# --- Writers ------------------------------------------------------------------------------------


class EventSink(Protocol):
    written: int

    def add(self, item: Event | RawLine) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _stream(item: Event | RawLine) -> str:
    if isinstance(item, IntegrationCall):
        return "integrations"
    if isinstance(item, Interaction):
        return "users"
    return "agents"


def _line(item: Event | RawLine) -> bytes:
    return (item.data if isinstance(item, RawLine) else encode_line(item)) + b"\n"


def event_paths(glob: str) -> dict[str, Path]:
    """File per stream (agents, integrations, users) that the ``event_logs`` glob matches."""
    p = Path(glob)
    parts = p.parts
    fixed = next((i for i, s in enumerate(parts[:-1]) if any(c in s for c in "*?[")), None)
    if fixed is not None:
        base = Path(*parts[:fixed]) if fixed else Path(".")
        return {s: base / "simulator" / f"{s}.jsonl" for s in ("agents", "integrations", "users")}
    name = parts[-1]
    if "*" not in name:
        return dict.fromkeys(("agents", "integrations", "users"), p)
    out = {}
    for s in ("agents", "integrations", "users"):
        candidate = name.replace("*", s, 1)
        out[s] = p.parent / (candidate if fnmatch.fnmatch(candidate, name) else f"{s}.jsonl")
    return out


class FileWriter:
    """Appends event lines to JSONL files; each flush is one write per file."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.written = 0
        self._files: dict[Path, BinaryIO] = {}
        self._buffers: dict[Path, list[bytes]] = {}
        for path in paths.values():
            if path not in self._files:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._files[path] = open(path, "ab", buffering=0)  # noqa: SIM115
                self._buffers[path] = []

    def add(self, item: Event | RawLine) -> None:
        self._buffers[self.paths[_stream(item)]].append(_line(item))

    def flush(self) -> None:
        for path, buf in self._buffers.items():
            if buf:
                data = memoryview(b"".join(buf))
                while data:
                    n = self._files[path].write(data)
                    data = data[n or 0 :]
                self.written += len(buf)
                buf.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for f in self._files.values():
                f.close()


def push_url(url: str) -> str:
    """``http://host:9464`` and ``http://host:9464/v1/events`` both mean the push endpoint."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--push needs an http(s) URL, got {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1/events")
    return urlunsplit(parts)


class PushWriter:
    """POSTs NDJSON batches to the exporter; keeps lines to retry while it is unreachable.

    Each batch carries an ``Idempotency-Key``; a batch that got no answer (or a 5xx/429) is
    sent again with the same lines and key, so one the exporter had journaled before the
    answer was lost is not counted twice."""

    def __init__(self, url: str, token: str | None, max_body_bytes: int = 1 << 20,
                 max_pending: int = 200_000, timeout: float = 10.0) -> None:
        import requests

        self.url = push_url(url)
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/x-ndjson"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.max_body = max_body_bytes
        self.max_pending = max_pending
        self.timeout = timeout
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._pending: list[bytes] = []
        self._unanswered: tuple[str, int] | None = None
        """(key, number of lines) of the first pending batch, sent without a final answer."""

    def add(self, item: Event | RawLine) -> None:
        self._pending.append(_line(item))

    def flush(self) -> None:
        import requests

        while self._pending:
            if self._unanswered is not None:
                key, n = self._unanswered
            else:
                size, n = 0, 0
                for line in self._pending:
                    if n and size + len(line) > self.max_body:
                        break
                    size += len(line)
                    n += 1
                key = uuid.uuid4().hex
            batch = self._pending[:n]
            self._unanswered = (key, n)
            try:
                r = self.session.post(self.url, data=b"".join(batch), timeout=self.timeout,
                                      headers={"Idempotency-Key": key})
            except requests.RequestException as exc:
                self.last_error = f"push: {type(exc).__name__}"
                break
            if r.status_code >= 500 or r.status_code == 429:
                self.last_error = f"push: HTTP {r.status_code}"
                break
            self._unanswered = None
            del self._pending[:n]
            if r.ok:
                self.written += n
                self.last_error = None
            else:
                # The request itself is wrong (token, size): retrying will not help.
                self.dropped += n
                self.last_error = f"push: HTTP {r.status_code} {r.text[:120].strip()}"
        if len(self._pending) > self.max_pending:
            extra = len(self._pending) - self.max_pending
            if self._unanswered is not None:
                # The oldest lines go, and with them the whole unanswered batch, never a part
                # of it: its other lines may have been journaled already.
                extra = max(extra, self._unanswered[1])
                self._unanswered = None
            del self._pending[:extra]
            self.dropped += extra

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.session.close()


def _naive(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).replace(tzinfo=None)


class TaskDbWriter:
    """Inserts and updates rows of the tasks table, one transaction per flush."""

    def __init__(self, url: str, table: str = "tasks",
                 columns: TaskDbColumns | None = None) -> None:
        from sqlalchemy import create_engine

        from .tasks_schema import create_tasks_table

        self.engine = create_engine(url, future=True)
        self.table = create_tasks_table(self.engine, table, columns)
        self.has_workflow = "workflow" in self.table.c
        self.has_updated = "updated_at" in self.table.c
        self.rows_written = 0
        self._pending: dict[str, TaskChange] = {}
        self._new: set[str] = set()

    def cancel_stale(self, id_prefix: str, now: float) -> int:
        """Cancel open rows an earlier simulator run left behind when it was killed."""
        t = self.table
        values: dict[str, Any] = {"status": "cancelled", "finished_at": _naive(now)}
        if self.has_updated:
            values["updated_at"] = _naive(now)
        with self.engine.begin() as conn:
            result = conn.execute(
                t.update()
                .where(t.c.id.like(f"{id_prefix}-%"), t.c.status.in_(("queued", "running")))
                .values(**values)
            )
        return result.rowcount or 0

    def add(self, change: TaskChange) -> None:
        if change.id not in self._pending and change.status == "queued" \
                and change.started_at is None:
            self._new.add(change.id)
        self._pending[change.id] = change

    def _row(self, c: TaskChange) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": c.id, "task_type": c.task_type, "agent": c.agent, "status": c.status,
            "created_at": _naive(c.created_at), "started_at": _naive(c.started_at),
            "finished_at": _naive(c.finished_at),
        }
        if self.has_workflow:
            row["workflow"] = c.workflow
        if self.has_updated:
            row["updated_at"] = _naive(c.finished_at or c.started_at or c.created_at)
        return row

    def flush(self) -> None:
        if not self._pending:
            return
        from sqlalchemy import bindparam

        t = self.table
        inserts = [self._row(c) for i, c in self._pending.items() if i in self._new]
        updates = []
        for i, c in self._pending.items():
            if i not in self._new:
                row = self._row(c)
                row["b_id"] = row.pop("id")
                for k in ("task_type", "created_at", "workflow"):
                    row.pop(k, None)
                updates.append(row)
        with self.engine.begin() as conn:
            if inserts:
                conn.execute(t.insert(), inserts)
            if updates:
                conn.execute(t.update().where(t.c.id == bindparam("b_id")), updates)
        self.rows_written += len(self._pending)
        self._pending.clear()
        self._new.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.engine.dispose()


class Writers:
    """Routes the model's output: events to files or push, task changes to the database."""

    def __init__(self, events: EventSink | None, tasks: TaskDbWriter | None) -> None:
        self.events = events
        self.tasks = tasks

    def write(self, items: Iterable[Output]) -> None:
        for item in items:
            if isinstance(item, TaskChange):
                if self.tasks is not None:
                    self.tasks.add(item)
            elif self.events is not None:
                self.events.add(item)

    def flush(self) -> None:
        if self.events is not None:
            self.events.flush()
        if self.tasks is not None:
            self.tasks.flush()

    def close(self) -> None:
        try:
            if self.events is not None:
                self.events.close()
        finally:
            if self.tasks is not None:
                self.tasks.close()

    @property
    def lines_written(self) -> int:
        return self.events.written if self.events is not None else 0


# --- Progress -----------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed every N s otherwise."""

    def __init__(self, stream: Any, every: float) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = 0.5 if self.tty else every
        self.last = -math.inf
        self.width = 0

    def show(self, now: float, text: str, force: bool = False) -> None:
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


def _status(elapsed: float, writers: Writers, model: Workload, extra: str = "") -> str:
    h, rem = divmod(int(elapsed), 3600)
    m, s = divmod(rem, 60)
    incidents = ", ".join(sorted(str(i) for i in model.incidents)) or "none"
    st = model.stats
    text = (
        f"elapsed {h:02d}:{m:02d}:{s:02d}  events {writers.lines_written:,}  "
        f"tasks open {st.queued + st.running:,} (queued {st.queued:,})  incidents: {incidents}"
    )
    return text + (f"  [{extra}]" if extra else "")


# --- Command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aicrm-simulate",
        description="Write a realistic multi-agent CRM workload, with switchable incidents, "
        "into the sources configured in config.json.",
    )
    p.add_argument("--config", default=None,
                   help="config.json (default: $AICRM_CONFIG, then ./config.json)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="new tasks per second at normal load (about 8 event lines each)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds to run live; 0 or absent: until Ctrl-C "
                   "(with --backfill, absent means exit after the backfill)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible runs")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="task durations and waits run this many times faster")
    p.add_argument("--incident", action="append", default=[], metavar="NAME[:TARGET]",
                   help=f"start with an incident on ({', '.join(INCIDENT_KINDS)}); repeatable")
    p.add_argument("--control", default=None, metavar="PATH",
                   help="incident control file, re-read every second "
                   "(default: data/simulator/incidents beside config.json)")
    p.add_argument("--noise", type=float, default=0.0, metavar="RATIO",
                   help="share of extra malformed or undeclared lines (e.g. 0.01)")
    p.add_argument("--users", type=int, default=300, help="size of the user population")
    p.add_argument("--push", default=None, metavar="URL",
                   help="POST events to the exporter's /v1/events instead of writing files")
    p.add_argument("--backfill", type=float, default=None, metavar="HOURS",
                   help="first write the past HOURS of history, as fast as possible")
    p.add_argument("--progress-seconds", type=float, default=10.0,
                   help="interval of the progress line when stderr is not a terminal")
    p.add_argument("--no-db", action="store_true", help="do not write the task database")
    return p


def _check(value: float, name: str, low: float, high: float = math.inf) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def _build_writers(cfg: Config, args: argparse.Namespace) -> Writers:
    events: EventSink | None = None
    if args.push:
        # Stripped as the exporter strips it (a secret mounted from a file ends with a newline).
        token = (os.environ.get(cfg.sources.push.token_env) or "").strip() or None
        events = PushWriter(args.push, token, min(cfg.sources.push.max_body_bytes, 1 << 20))
    elif cfg.sources.event_logs:
        events = FileWriter(event_paths(cfg.sources.event_logs[0].path))
    tasks: TaskDbWriter | None = None
    db = cfg.sources.task_db
    if db is not None and not args.no_db:
        # As the exporter reads it: $url_env if set and not empty, else url.
        url = (os.environ.get(db.url_env) or "").strip() if db.url_env else ""
        try:
            if not url:
                if db.url is None:
                    raise ConfigError("environment", [(
                        "sources.task_db.url_env",
                        f"${db.url_env} is not set (or empty) and sources.task_db.url is not "
                        "configured")])
                url = db.url
            tasks = TaskDbWriter(url, db.table, db.columns)
        except Exception:
            if events is not None:
                events.close()
            raise
    return Writers(events, tasks)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    err = sys.stderr
    config_path = Path(args.config or default_config_path())
    try:
        cfg = load_config(config_path)
        _check(args.rate, "--rate", 1e-6)
        _check(args.speedup, "--speedup", 1e-6)
        _check(args.noise, "--noise", 0.0, 1.0)
        _check(args.users, "--users", 1)
        if args.duration is not None:
            _check(args.duration, "--duration", 0.0)
        if args.backfill is not None:
            _check(args.backfill, "--backfill", 0.0, 24 * 365)
        start_incidents = {parse_incident(i, cfg) for i in args.incident}
        if args.push:
            push_url(args.push)
    except (ConfigError, ValueError) as exc:
        print(f"aicrm-simulate: {exc}", file=err)
        return 2
    if not args.push and not cfg.sources.event_logs and (cfg.sources.task_db is None
                                                         or args.no_db):
        print("aicrm-simulate: nothing to write: config.json has no event_logs or task_db "
              "source (or use --push)", file=err)
        return 2
    control = Path(args.control) if args.control else \
        config_path.resolve().parent / "data" / "simulator" / "incidents"

    wall0 = time.time()
    live = args.backfill is None or args.duration is not None
    start = wall0 - (args.backfill or 0.0) * 3600
    try:
        writers = _build_writers(cfg, args)
    except Exception as exc:  # a database that cannot be reached, a directory not writable
        print(f"aicrm-simulate: cannot open the sources: {exc}", file=err)
        return 1
    model = Workload(cfg, start=start, rate=args.rate, seed=args.seed, speedup=args.speedup,
                     users=args.users, noise=args.noise, id_prefix=f"sim-{int(wall0):x}",
                     incidents=start_incidents)
    stop: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    previous: dict[signal.Signals, Callable[..., Any] | int | None] = {}
    if _in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    progress = Progress(err, args.progress_seconds)
    reported: set[str] = set()
    try:
        if writers.tasks is not None:
            writers.tasks.cancel_stale("sim", wall0)
        if args.backfill:
            step = 60.0
            t = start
            while t < wall0 and not stop:
                t = min(t + step, wall0)
                writers.write(model.advance(t))
                writers.flush()
                note = f"backfill at {_ts(t):%Y-%m-%d %H:%M}Z"
                progress.show(time.monotonic(), _status(time.time() - wall0, writers, model, note))
        if live:
            deadline = None if not args.duration else time.monotonic() + args.duration
            last_control = -math.inf
            last_flush = time.monotonic()
            while not stop:
                mono = time.monotonic()
                if deadline is not None and mono >= deadline:
                    break
                if mono - last_control >= 1.0:
                    last_control = mono
                    found, errors = read_control_file(control, cfg)
                    for e in errors:
                        if e not in reported:
                            reported.add(e)
                            print(f"aicrm-simulate: {e}", file=err)
                    model.set_incidents(start_incidents | found)
                writers.write(model.advance(time.time()))
                if mono - last_flush >= 0.5:
                    writers.flush()
                    last_flush = mono
                extra = getattr(writers.events, "last_error", None) or ""
                progress.show(mono, _status(time.time() - wall0, writers, model, extra))
                time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - mono)))
        writers.write(model.advance(time.time()))
        open_tasks = model.stats.queued + model.stats.running
        writers.write(model.close_open())
        writers.flush()
        note = f"stopped, {open_tasks} open tasks cancelled"
        progress.show(math.inf, _status(time.time() - wall0, writers, model, note), force=True)
    finally:
        progress.done()
        try:
            writers.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
