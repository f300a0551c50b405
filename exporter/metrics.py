"""The metric layer: typed events in, the catalog's metric families out.

``MetricStore`` owns every value the exporter serves. It is deliberately not built from
client_python's ``Counter``/``Histogram`` objects: the ingest path updates plain dicts keyed by
label tuples (1-2 µs per event), and ``collect()`` turns them into metric
families when Prometheus scrapes. The whole state can be dumped and restored, which is what
makes restarts exactly-once (see ``state.py``).

All mutation happens under ``lock``; sources that must keep their own positions consistent
with the counters (the file tailer) hold it while they apply a batch.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from . import __version__
from . import catalog as c
from . import exposition as ex
from .catalog import Kind, MetricSpec
from .config import Config
from .events import (
    Event,
    Handoff,
    HistogramData,
    IntegrationCall,
    Interaction,
    LlmCall,
    TaskDbSnapshot,
    TaskResult,
    ToolCall,
)
from .labels import LabelSet, LabelSets, declared_series

LabelValues = tuple[str, ...]
# A histogram series: per-bucket counts (len(bounds) + 1 for +Inf), then sum, then count.
HistState = list[float]

STATE_VERSION = 1
TASK_DB_SPECS = frozenset({c.TASKS, c.TASK_DURATION, c.TASK_WAIT})
"""Served from the task database's latest snapshot, not from events."""
NOT_STORED = TASK_DB_SPECS | {c.STATE_WRITE_FAILURES}
"""Not in the store's counters: the state write failures are the process's own (runtime.py),
served even when the store's values cannot be."""


def status_class(status: int | str | None) -> str:
    """HTTP status (or 'timeout') to the bounded ``status_class`` label."""
    if status is None or status == "timeout":
        return "2xx" if status is None else "timeout"
    if status == 429:
        return "429"
    if isinstance(status, int):
        if status >= 500:
            return "5xx"
        if status >= 400:
            return "4xx"
    return "2xx"


def _user_key(user: str | int) -> int:
    """Users are counted, never stored: a 64-bit digest stands in for the id."""
    return int.from_bytes(hashlib.blake2b(str(user).encode(), digest_size=8).digest(), "big")


class MetricStore(Collector):
    """Every served value, updated by sources through ``apply`` and the sink methods."""

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.labels = LabelSets.from_config(cfg)
        self.clock = clock
        self.lock = threading.RLock()
        self.version = 0
        """Bumped by every change; the checkpointer compares it to know what is persisted."""
        self._counters: dict[str, dict[LabelValues, float]] = {
            s.name: {} for s in c.ALL if s.kind is Kind.COUNTER and s not in NOT_STORED
        }
        self._hists: dict[str, dict[LabelValues, HistState]] = {
            s.name: {} for s in c.ALL if s.kind is Kind.HISTOGRAM and s not in NOT_STORED
        }
        self._bounds: dict[str, tuple[float, ...]] = {
            # floats: bisect compares float to float faster than float to int
            s.name: tuple(float(b) for b in s.buckets) for s in c.ALL if s.kind is Kind.HISTOGRAM
        }
        self._users: dict[int, float] = {}
        # Bound once for the hot path (_task_result); load() updates these dicts in place.
        self._agent_values = self.labels.agents.values
        self._task_type_values = self.labels.task_types.values
        self._results = self._counters[c.AGENT_TASK_RESULTS.name]
        self._retries = self._counters[c.AGENT_RETRIES.name]
        self._task_durations = self._hists[c.AGENT_TASK_DURATION.name]
        self._task_duration_bounds = self._bounds[c.AGENT_TASK_DURATION.name]
        self._source_up: dict[str, float] = {}
        self._source_lag: dict[str, float] = {}
        self._source_last: dict[str, float] = {}
        self._tasks: TaskDbSnapshot | None = None
        self._saved_tasks: dict[str, Any] | None = None
        """The task families as the state file held them at start (``task_families``): kept
        in every snapshot until the task database's first report replaces them."""
        self._rebuilt: dict[str, dict[tuple[str, LabelValues], float]] = {}
        """Per source reporting totals (``source_totals``): how much of each self counter it
        has added, over every run; persisted with the counters."""
        self._reported: dict[str, dict[tuple[str, LabelValues], float]] = {}
        """The totals each such source last reported in this process."""
        self._rebuilt_unknown = False
        """Restored from a state file written before ``_rebuilt`` was persisted."""
        self._positions: dict[str, Any] = {}
        """Per source reporting totals: the position it handed with its last report (JSON: what
        it has counted, e.g. the task database's high-water mark); persisted with the counters,
        so the two always match."""
        self._apply: dict[type, Callable[[Any], None]] = {
            TaskResult: self._task_result,
            LlmCall: self._llm_call,
            ToolCall: self._tool_call,
            Handoff: self._handoff,
            IntegrationCall: self._integration_call,
            Interaction: self._interaction,
        }
        self._static = list(self._config_families())
        static: list[str] = []
        for m in self._static:
            ex.metric_lines(static, m)
        self._static_text = "".join(static)
        self._prefixes = ex.PrefixCache()
        self._precreate()

    # --- sink interface used by sources --------------------------------------------------

    def apply(self, event: Event) -> None:
        """Record one accepted event (the caller counts it with ``accepted``)."""
        self._apply[type(event)](event)
        self.version += 1

    def accepted(self, source: str, n: int = 1, newest_ts: float | None = None) -> None:
        """``n`` events from ``source`` were applied; ``newest_ts`` is the newest event time,
        None if one of them had none (its time is its ingestion: lag 0)."""
        now = self.clock()
        with self.lock:
            self._cinc(c.SOURCE_EVENTS, (source,), n)
            if n:
                self._source_last[source] = now
                self._source_lag[source] = (0.0 if newest_ts is None
                                            else max(0.0, now - newest_ts))
            self.version += 1

    def reject(self, source: str, reason: str, n: int = 1) -> None:
        with self.lock:
            self._cinc(c.SOURCE_REJECTED, (source, reason), n)
            self.version += 1

    def overflow(self, label: str, n: int = 1) -> None:
        with self.lock:
            self._cinc(c.LABEL_OVERFLOW, (label,), n)
            self.version += 1

    def source_position(self, source: str) -> Any:
        """The ``position`` ``source`` last handed to ``source_totals``, as restored from the
        state file; None if it never handed one (first start, or an older state file)."""
        with self.lock:
            return self._positions.get(source)

    def saved_task_families(self) -> dict[str, Any] | None:
        """The task families served when the state file was written (``task_families``:
        JSON as ``dump`` writes it), or None (first start, or an older state file)."""
        with self.lock:
            return self._saved_tasks

    def source_totals(self, source: str, events: int, rejected: Mapping[str, int],
                      overflow: Mapping[str, int], newest_ts: float | None, *,
                      position: Any = None, resumed: bool = False,
                      tasks: TaskDbSnapshot | None = None) -> None:
        """Self counts of a source that rebuilds them from its own data on every start (the
        task database), given as totals since it started.

        ``resumed``: the source counted, this run, only what came after the position that
        ``source_position`` returned, so the first report is added whole. Otherwise the
        totals are whole recounts: the counters restored from the state file already hold
        what earlier runs added, so the first report adds only what exceeds that (rows that
        arrived while the exporter was down). Either way a restart makes no jump, a count the
        source no longer sees (a deleted row) is kept, and later reports add their increase.
        ``position`` (JSON) is saved with the counters and handed back by ``source_position``
        after a restart. ``tasks`` replaces the task families in the same step, so a snapshot
        never holds a position with task families of another poll.
        """
        totals: dict[tuple[str, LabelValues], float] = {
            (c.SOURCE_EVENTS.name, (source,)): float(events)}
        for r, n in rejected.items():
            totals[(c.SOURCE_REJECTED.name, (source, r))] = float(n)
        for label, n in overflow.items():
            totals[(c.LABEL_OVERFLOW.name, (label,))] = float(n)
        now = self.clock()
        with self.lock:
            last = self._reported.get(source)
            added = self._rebuilt.get(source)
            if added is None:
                added = self._rebuilt[source] = {}
                if self._rebuilt_unknown:
                    # An older state file: its counters hold this source's whole counts of
                    # the previous run (those labelled by source exactly; the shared
                    # overflow counts are taken as including them), so add nothing now.
                    for (name, key), total in totals.items():
                        added[(name, key)] = (self._counters[name].get(key, 0.0)
                                              if name != c.LABEL_OVERFLOW.name else total)
            changed = False
            for (name, key), total in totals.items():
                if last is not None:
                    inc = total - last.get((name, key), 0.0)
                else:
                    inc = total if resumed else total - added.get((name, key), 0.0)
                if inc > 0:
                    d = self._counters[name]
                    d[key] = d.get(key, 0.0) + inc
                    added[(name, key)] = added.get((name, key), 0.0) + inc
                    changed = True
            delivered = events - (0 if last is None else last[(c.SOURCE_EVENTS.name, (source,))])
            self._reported[source] = totals
            if delivered > 0:
                self._source_last[source] = now
            if newest_ts is not None:
                self._source_lag[source] = max(0.0, now - newest_ts)
            if position is not None and position != self._positions.get(source):
                self._positions[source] = position
                changed = True
            if tasks is not None:
                self.task_snapshot(tasks)
            if changed:
                self.version += 1

    def load_rebuilt(self, state: dict[str, Any]) -> None:
        """Restore, after ``load``, what each ``source_totals`` source has already added and
        the position it last handed (none in a state file from before positions)."""
        with self.lock:
            rebuilt = state.get("rebuilt")
            self._rebuilt_unknown = rebuilt is None
            self._rebuilt = {
                source: {(row[0], tuple(row[1:-1])): float(row[-1]) for row in rows}
                for source, rows in (rebuilt or {}).items()
            }
            positions = state.get("source_positions")
            self._positions = dict(positions) if isinstance(positions, dict) else {}
            tasks = state.get("task_families")
            self._saved_tasks = tasks if isinstance(tasks, dict) else None

    def source_status(self, source: str, up: bool) -> None:
        with self.lock:
            self._source_up[source] = 1.0 if up else 0.0

    def source_states(self) -> dict[str, bool]:
        """Each source's last known state, for /readyz."""
        with self.lock:
            return {source: up == 1.0 for source, up in self._source_up.items()}

    def push_request(self, code: int) -> None:
        with self.lock:
            self._cinc(c.PUSH_REQUESTS, (str(code),), 1)
            self.version += 1

    def task_snapshot(self, snap: TaskDbSnapshot) -> None:
        """Replace the task database families. Their counters and histograms are persisted
        (``task_families``), so a change to them is a change to save before it is served."""
        with self.lock:
            old, self._tasks = self._tasks, snap
            if old is None or (old.totals, old.duration, old.wait) != (
                    snap.totals, snap.duration, snap.wait):
                self._saved_tasks = None
                self.version += 1

    def add_source(self, source: str) -> None:
        """Declare a source so its self metrics exist (at zero) before its first event."""
        with self.lock:
            self._source_up.setdefault(source, 0.0)
            self._counters[c.SOURCE_EVENTS.name].setdefault((source,), 0.0)
            rej = self._counters[c.SOURCE_REJECTED.name]
            for reason in c.REJECT_REASONS:
                rej.setdefault((source, reason), 0.0)

    # --- per-event updates (hot path) ----------------------------------------------------

    def _m(self, ls: LabelSet, value: str | None) -> str:
        if value in ls.values:
            return value  # type: ignore[return-value]
        self._cinc(c.LABEL_OVERFLOW, (ls.label,), 1)
        return c.OTHER_VALUE

    def _cinc(self, spec: MetricSpec, key: LabelValues, v: float) -> None:
        d = self._counters[spec.name]
        d[key] = d.get(key, 0.0) + v

    def _observe(self, spec: MetricSpec, key: LabelValues, v: float) -> None:
        d = self._hists[spec.name]
        h = d.get(key)
        bounds = self._bounds[spec.name]
        if h is None:
            h = d[key] = [0.0] * (len(bounds) + 3)
        h[bisect_left(bounds, v)] += 1
        h[-2] += v
        h[-1] += 1

    def _task_result(self, e: TaskResult) -> None:
        # The most frequent event: written out with pre-bound dicts (about 35% faster than
        # going through _m/_cinc/_observe).
        agent = e.agent if e.agent in self._agent_values else self._other("agent")
        task_type = (
            e.task_type if e.task_type in self._task_type_values else self._other("task_type")
        )
        results = self._results
        key = (agent, task_type, e.outcome)
        results[key] = results.get(key, 0.0) + 1
        if e.duration_ms is not None:
            key2 = (agent, task_type)
            h = self._task_durations.get(key2)
            if h is None:
                h = self._task_durations[key2] = [0.0] * (len(self._task_duration_bounds) + 3)
            v = e.duration_ms / 1000
            h[bisect_left(self._task_duration_bounds, v)] += 1
            h[-2] += v
            h[-1] += 1
        if e.retries:
            retries = self._retries
            key2 = (agent, task_type)
            retries[key2] = retries.get(key2, 0.0) + e.retries

    def _other(self, label: str) -> str:
        self._cinc(c.LABEL_OVERFLOW, (label,), 1)
        return c.OTHER_VALUE

    def _llm_call(self, e: LlmCall) -> None:
        ls = self.labels
        agent = self._m(ls.agents, e.agent)
        model = self._m(ls.models, e.model)
        op = self._m(ls.genai_operations, e.operation)
        if e.provider is not None:
            provider = self._m(ls.providers, e.provider)
        else:
            provider = ls.model_providers.get(e.model, c.OTHER_VALUE)
        if e.duration_ms is not None:
            err = "" if e.error_type is None else self._m(ls.error_types, e.error_type)
            self._observe(
                c.GENAI_OPERATION_DURATION, (op, model, provider, agent, err), e.duration_ms / 1000
            )
        if e.input_tokens is not None:
            self._observe(
                c.GENAI_TOKEN_USAGE, (op, model, provider, "input", agent), e.input_tokens
            )
        if e.output_tokens is not None:
            self._observe(
                c.GENAI_TOKEN_USAGE, (op, model, provider, "output", agent), e.output_tokens
            )
        if e.cost_usd:
            self._cinc(c.AGENT_COST, (agent, model), e.cost_usd)

    def _tool_call(self, e: ToolCall) -> None:
        ls = self.labels
        agent = self._m(ls.agents, e.agent)
        tool = self._m(ls.tools, e.tool)
        self._cinc(c.AGENT_TOOL_CALLS, (agent, tool, e.outcome), 1)
        if e.duration_ms is not None:
            self._observe(c.AGENT_TOOL_CALL_DURATION, (agent, tool), e.duration_ms / 1000)

    def _handoff(self, e: Handoff) -> None:
        ls = self.labels
        key = (self._m(ls.agents, e.from_agent), self._m(ls.agents, e.to_agent))
        self._cinc(c.AGENT_HANDOFFS, key, 1)

    def _integration_call(self, e: IntegrationCall) -> None:
        ls = self.labels
        platform = self._m(ls.platforms, e.platform)
        op = ls.operation(platform, e.operation)
        if op != e.operation:
            self._cinc(c.LABEL_OVERFLOW, ("operation",), 1)
        self._cinc(c.INTEGRATION_REQUESTS, (platform, op, status_class(e.status)), 1)
        if e.duration_ms is not None:
            self._observe(c.INTEGRATION_REQUEST_DURATION, (platform, op), e.duration_ms / 1000)

    def _interaction(self, e: Interaction) -> None:
        ls = self.labels
        self._cinc(c.USER_INTERACTIONS, (self._m(ls.channels, e.channel), e.type), 1)
        if e.rating is not None:
            agent = c.OTHER_VALUE if e.agent is None else self._m(ls.agents, e.agent)
            self._observe(c.USER_FEEDBACK_RATING, (agent,), e.rating)
        if e.user is not None:
            now = self.clock()
            ts = e.epoch()
            seen = now if ts is None or ts > now else ts
            key = _user_key(e.user)
            if self._users.get(key, 0.0) < seen:
                self._users[key] = seen

    # --- series that exist before the first event ----------------------------------------

    def _precreate(self) -> None:
        """Declared label combinations start at 0, so the first event shows in rate()."""
        for spec, combos in declared_series(self.labels):
            if spec.kind is Kind.COUNTER:
                d = self._counters[spec.name]
                for k in combos:
                    d.setdefault(k, 0.0)
            else:
                h = self._hists[spec.name]
                width = len(spec.buckets) + 3
                for k in combos:
                    h.setdefault(k, [0.0] * width)

    def _config_families(self) -> Iterator[Metric]:
        """aicrm_threshold, aicrm_objective and friends: config.json as series."""
        cfg, ls = self.cfg, self.labels
        th = cfg.thresholds

        threshold = Metric(c.THRESHOLD.name, c.THRESHOLD.help, "gauge")
        for key, value in th.model_dump().items():
            threshold.add_sample(c.THRESHOLD.name, {"name": key}, float(value))
        for agent in ls.agents.with_other():
            threshold.add_sample(
                c.THRESHOLD.name,
                {"name": "agent_success_ratio_min", "agent": agent},
                th.agent_success_ratio_min,
            )
        integrations = {i.platform: i for i in cfg.integrations}
        for platform in ls.platforms.with_other():
            integ = integrations.get(platform)
            err = integ.error_ratio_max if integ and integ.error_ratio_max is not None else None
            lat = (
                integ.latency_p95_max_seconds
                if integ and integ.latency_p95_max_seconds is not None
                else None
            )
            threshold.add_sample(
                c.THRESHOLD.name,
                {"name": "integration_error_ratio_max", "platform": platform},
                th.integration_error_ratio_max if err is None else err,
            )
            threshold.add_sample(
                c.THRESHOLD.name,
                {"name": "integration_latency_p95_max_seconds", "platform": platform},
                th.integration_latency_p95_max_seconds if lat is None else lat,
            )
        for tt in cfg.task_types:
            if tt.target_seconds is not None:
                threshold.add_sample(
                    c.THRESHOLD.name,
                    {"name": "task_duration_target_seconds", "task_type": tt.name},
                    tt.target_seconds,
                )
        yield threshold

        objective = Metric(c.OBJECTIVE.name, c.OBJECTIVE.help, "gauge")
        objectives = {a.name: a.success_objective for a in cfg.agents}
        for agent in ls.agents.with_other():
            target = objectives.get(agent)
            objective.add_sample(
                c.OBJECTIVE.name,
                {"name": "agent_success_ratio", "agent": agent},
                th.agent_success_ratio_min if target is None else target,
            )
        objective.add_sample(
            c.OBJECTIVE.name, {"name": "task_completion_ratio"}, th.task_completion_ratio_min
        )
        yield objective

        weights = Metric(c.SCORE_WEIGHT.name, c.SCORE_WEIGHT.help, "gauge")
        for score, comps in (("efficiency", cfg.scores.efficiency), ("health", cfg.scores.health)):
            for comp, w in sorted(comps.items()):
                weights.add_sample(c.SCORE_WEIGHT.name, {"score": score, "component": comp}, w)
        yield weights

        saved = Metric(c.TASK_HUMAN_SECONDS_SAVED.name, c.TASK_HUMAN_SECONDS_SAVED.help, "gauge")
        for tt in cfg.task_types:
            saved.add_sample(saved.name, {"task_type": tt.name}, tt.minutes_saved * 60)
        yield saved

        info = Metric(c.AGENT_INFO.name, c.AGENT_INFO.help, "gauge")
        for a in cfg.agents:
            info.add_sample(info.name, {"agent": a.name, "team": a.team}, 1.0)
        yield info

        links = Metric(c.LINK_INFO.name, c.LINK_INFO.help, "gauge")
        links.add_sample(links.name, {"grafana_url": cfg.links.grafana_url,
                                      "runbook_url": cfg.links.runbook_url}, 1.0)
        yield links

        build = Metric(c.BUILD_INFO.name, c.BUILD_INFO.help, "gauge")
        build.add_sample(build.name, {"version": __version__}, 1.0)
        yield build

    # --- exposition ------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            families = list(self._families())
        yield from families
        yield from self._static

    def _families(self) -> Iterator[Metric]:
        for name, series in self._counters.items():
            spec = c.BY_NAME[name]
            m = Metric(spec.base_name, spec.help, "counter")
            sname = spec.base_name + "_total"
            for key, v in series.items():
                m.samples.append(Sample(sname, dict(zip(spec.labels, key, strict=True)), v))
            yield m
        for name, hseries in self._hists.items():
            spec = c.BY_NAME[name]
            yield _histogram(spec, ((k, _hist_data(h)) for k, h in hseries.items()))
        yield from self._gauges()
        if self._tasks is not None:
            yield from _task_families(self._tasks)

    def render_text(self) -> bytes:
        """The same bytes ``generate_latest`` makes of ``collect()``, built faster."""
        out: list[str] = []
        cache = self._prefixes
        with self.lock:
            for name, series in self._counters.items():
                ex.counter_lines(out, cache, c.BY_NAME[name], series)
            for name, hseries in self._hists.items():
                ex.histogram_lines(out, cache, c.BY_NAME[name], hseries.items())
            for m in self._gauges():
                ex.metric_lines(out, m)
            snap = self._tasks
        if snap is not None:
            ex.counter_lines(out, cache, c.TASKS, snap.totals)
            for spec, hs in ((c.TASK_DURATION, snap.duration.items()),
                             (c.TASK_WAIT, (((k,), v) for k, v in snap.wait.items()))):
                ex.histogram_lines(out, cache, spec,
                                   ((k, [*d.buckets, d.sum, d.count]) for k, d in hs))
            for m in list(_task_families(snap))[3:]:
                ex.metric_lines(out, m)
        out.append(self._static_text)
        return "".join(out).encode()

    def _gauges(self) -> Iterator[Metric]:
        for spec, values in (
            (c.SOURCE_UP, self._source_up),
            (c.SOURCE_LAG, self._source_lag),
            (c.SOURCE_LAST_EVENT, self._source_last),
        ):
            m = Metric(spec.name, spec.help, "gauge")
            for source, v in values.items():
                m.samples.append(Sample(spec.name, {"source": source}, v))
            yield m
        now = self.clock()
        active = Metric(c.ACTIVE_USERS.name, c.ACTIVE_USERS.help, "gauge")
        for window, seconds in c.ACTIVE_USER_WINDOWS.items():
            since = now - seconds
            n = sum(1 for seen in self._users.values() if seen >= since)
            active.samples.append(Sample(active.name, {"window": window}, float(n)))
        yield active

    # --- persistence -----------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Everything a restart must continue from (call with ``lock`` held)."""
        horizon = self.clock() - max(c.ACTIVE_USER_WINDOWS.values())
        stale = [k for k, seen in self._users.items() if seen < horizon]
        for k in stale:
            del self._users[k]
        return {
            "version": STATE_VERSION,
            "counters": {
                n: [[*k, v] for k, v in s.items() if v] for n, s in self._counters.items()
            },
            "histograms": {
                n: [[*k, h] for k, h in s.items() if h[-1]] for n, s in self._hists.items()
            },
            "users": list(self._users.items()),
            "rebuilt": {
                source: [[name, *key, v] for (name, key), v in added.items()]
                for source, added in self._rebuilt.items()
            },
            "source_positions": dict(self._positions),
            "task_families": (self._saved_tasks if self._tasks is None
                              else _dump_tasks(self._tasks)),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore a ``dump``; series of metrics no longer in the catalog are dropped."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version')!r}")
        with self.lock:
            for name, rows in state.get("counters", {}).items():
                d = self._counters.get(name)
                if d is None:
                    continue
                for row in rows:
                    d[tuple(row[:-1])] = _saved(row[-1])
            for name, rows in state.get("histograms", {}).items():
                h = self._hists.get(name)
                if h is None:
                    continue
                width = len(self._bounds[name]) + 3
                for row in rows:
                    if len(row[-1]) == width:  # bucket layout unchanged
                        h[tuple(row[:-1])] = [_saved(x) for x in row[-1]]
            self._users = {int(k): float(v) for k, v in state.get("users", [])}
            self.version += 1


def _saved(value: float | None) -> float:
    """A saved number: JSON has no infinity, so a sum that overflowed was saved as null (the
    event bounds keep sums finite; a state from before them may hold one)."""
    return math.inf if value is None else float(value)


def _dump_tasks(snap: TaskDbSnapshot) -> dict[str, Any]:
    """The task families' counters and histograms as served, for the state file: a restart
    serves them plus the rows no earlier run counted (sources/taskdb.py), never less."""
    def hist(d: HistogramData) -> list[float]:
        return [*d.buckets, d.sum, d.count]

    return {
        "totals": [[*k, v] for k, v in snap.totals.items()],
        "duration": [[*k, hist(d)] for k, d in snap.duration.items()],
        "wait": [[k, hist(d)] for k, d in snap.wait.items()],
    }


def _hist_data(h: HistState) -> HistogramData:
    return HistogramData(tuple(int(x) for x in h[:-2]), h[-2], int(h[-1]))


def _fmt_bound(b: float) -> str:
    return str(float(b))


def _histogram(
    spec: MetricSpec, series: Iterable[tuple[LabelValues, HistogramData]]
) -> Metric:
    m = Metric(spec.name, spec.help, "histogram")
    bname, sname, cname = spec.name + "_bucket", spec.name + "_sum", spec.name + "_count"
    les = [_fmt_bound(b) for b in spec.buckets] + ["+Inf"]
    samples = m.samples
    for key, data in series:
        labels = dict(zip(spec.labels, key, strict=True))
        acc = 0
        for le, n in zip(les, data.buckets, strict=True):
            acc += n
            samples.append(Sample(bname, {**labels, "le": le}, float(acc)))
        samples.append(Sample(cname, labels, float(data.count)))
        samples.append(Sample(sname, labels, data.sum))
    return m


def _task_families(snap: TaskDbSnapshot) -> Iterator[Metric]:
    m = Metric(c.TASKS.base_name, c.TASKS.help, "counter")
    for key, v in snap.totals.items():
        m.samples.append(Sample(c.TASKS.name, dict(zip(c.TASKS.labels, key, strict=True)), v))
    yield m
    yield _histogram(c.TASK_DURATION, snap.duration.items())
    yield _histogram(c.TASK_WAIT, (((k,), v) for k, v in snap.wait.items()))
    open_ = Metric(c.TASKS_OPEN.name, c.TASKS_OPEN.help, "gauge")
    for okey, n in snap.open.items():
        open_.samples.append(
            Sample(open_.name, dict(zip(c.TASKS_OPEN.labels, okey, strict=True)), n))
    yield open_
    age = Metric(c.TASK_OLDEST_OPEN_AGE.name, c.TASK_OLDEST_OPEN_AGE.help, "gauge")
    for task_type, seconds in snap.oldest_open_age.items():
        age.samples.append(Sample(age.name, {"task_type": task_type}, seconds))
    yield age
