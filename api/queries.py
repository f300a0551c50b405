"""Every PromQL expression the API sends, built from the recorded series of recording_rules/.

A window W (1m..30d) is answered from the rates the rules record at 5m, 1h and, for some
series, 1d ("bases"):

- W equal to a base: the recorded series itself (the number Grafana and alerts show);
- otherwise the mean of the recorded rate over W (``window_mean``: the rate counts as 0 where it
  was not recorded), from the longest base b with 12 b <= W (the shortest one if none is).
  That mean weighs what happened in the last b (and the b
  before W) partly, so b is kept at most a twelfth of W: a change in the last hour of a
  90-minute window is not averaged away as it is with the 1h rates. A series is sampled at
  most 1,440 times (``step_for``);
- W shorter than every base (1m..4m; under 1h for a family recorded at 1h and 1d): the shortest
  base's rate, and the window before it is that base's length back, not W, so the two do not
  overlap.

Counts are mean rate x W seconds (a window reaching back before the data counts only what the
data holds); ratios are ratios of mean rates (never means of ratios);
percentiles are ``histogram_quantile`` of the mean recorded bucket rates. The task database's
recorded series drop the ``agent`` label, so with an ``agent`` filter /task-completion applies the
rules' own expression to the raw counters as a subquery (same bases, same arithmetic).

One endpoint sends one query: each field is tagged with ``label_replace`` into FIELD_LABEL and
the fields are joined with ``or``, so a response is a single round trip evaluated at one instant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter import catalog

from .promql import Sample

FIELD_LABEL = "aicrm_api_field"
BASES = {"5m": 300, "1h": 3600, "1d": 86400}
INTERVALS = {"5m": 30, "1h": 60, "1d": 300}
"""Subquery step when a raw family is read over a window longer than its base: the shortest
interval at which the rules record that base (recording_rules/*.rules.yml; the groups over the
largest families record less often, docs/rules.md)."""
MAX_SAMPLES = 1440
QUANTILES = (0.5, 0.95, 0.99)


def duration(seconds: int) -> str:
    return f"{seconds}s"


def selector(name: str, matchers: Sequence[str]) -> str:
    return f"{name}{{{', '.join(matchers)}}}" if matchers else name


def matcher(label: str, value: str, op: str = "=") -> str:
    """A label matcher; values are validated upstream, quoting makes sure anyway."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{label}{op}"{escaped}"'


SMEAR = 12
"""A window averages a base's rates only when it is at least this many bases long."""


def pick_base(available: Iterable[str], window: int) -> str:
    ordered = sorted(available, key=BASES.__getitem__)
    for b in ordered:
        if BASES[b] == window:
            return b
    fitting = [b for b in ordered if BASES[b] * SMEAR <= window]
    return fitting[-1] if fitting else ordered[0]


def _offset(offset: int, window: int, base: str) -> int:
    """A window shorter than its base is answered by the base's rate, so the window before it
    starts one base back."""
    return max(offset, BASES[base]) if offset and window < BASES[base] else offset


def step_for(base: str, window: int) -> int:
    """Subquery step for a recorded rate over ``window``: the rules' shortest interval for the
    base, coarsened in whole intervals so that the window has at most MAX_SAMPLES points. The
    step stays under the base (W <= 30d), so the points sample the recorded moving rate finely
    enough for their sum to stand for its integral."""
    interval = INTERVALS[base]
    return interval * -(-window // (MAX_SAMPLES * interval))


def window_mean(inner: str, window: int, step: int, offset: int = 0) -> str:
    """Mean per-second rate over the window ending ``offset`` seconds ago, where a series counts
    as 0 at every point it did not exist: the sum of its values at the subquery's points over the
    number of points (``vector(1)`` has one at each). ``avg_over_time`` would average only the
    points a series has, so a series that began an hour into a 30-day window (a new agent, a
    new status, a fresh Prometheus) would have that hour's rate stand for the whole month, and
    its count (mean x W) would be multiplied by up to 720."""
    rng = f"[{duration(window)}:{duration(step)}]"
    if offset:
        rng += f" offset {duration(offset)}"
    return f"(sum_over_time({inner}{rng}) / scalar(count_over_time(vector(1){rng})))"


@dataclass(frozen=True)
class Recorded:
    """A per-second rate recorded by the rules at one or more bases."""

    names: Mapping[str, str]

    def base(self, window: int) -> str:
        return pick_base(self.names, window)

    def mean(self, window: int, matchers: Sequence[str] = (), offset: int = 0) -> str:
        """Mean per-second rate over the window ending ``offset`` seconds ago."""
        b = self.base(window)
        sel = selector(self.names[b], matchers)
        offset = _offset(offset, window, b)
        if window <= BASES[b]:
            return f"{sel} offset {duration(offset)}" if offset else sel
        return window_mean(sel, window, step_for(b, window), offset)


@dataclass(frozen=True)
class Raw:
    """A raw counter family read as the rules read it, for filters the rules aggregate away."""

    metric: str
    by: tuple[str, ...]
    bases: tuple[str, ...] = ("5m", "1h")

    def base(self, window: int) -> str:
        return pick_base(self.bases, window)

    def mean(self, window: int, matchers: Sequence[str] = (), offset: int = 0) -> str:
        if offset:
            raise ValueError("raw families are not read with an offset")
        b = self.base(window)
        rate = f"sum by ({', '.join(self.by)}) (rate({selector(self.metric, matchers)}[{b}]))"
        if window <= BASES[b]:
            return rate
        step = INTERVALS[b] if window // INTERVALS[b] <= MAX_SAMPLES else BASES[b]
        return window_mean(f"({rate})", window, step)


# --- families ----------------------------------------------------------------------------

TASKS = Recorded({"5m": "task_type_status:aicrm_tasks:rate5m",
                  "1h": "task_type_status:aicrm_tasks:rate1h"})
TASK_DURATION_BUCKETS = Recorded({
    "5m": "task_type_le:aicrm_task_duration_seconds_bucket:rate5m",
    "1h": "task_type_le:aicrm_task_duration_seconds_bucket:rate1h",
})
RAW_TASKS = Raw(catalog.TASKS.name, ("task_type", "status"))
RAW_TASK_DURATION_BUCKETS = Raw(catalog.TASK_DURATION.name + "_bucket", ("task_type", "le"))

RESULTS = Recorded({"5m": "agent_task_type_outcome:aicrm_agent_task_results:rate5m",
                    "1h": "agent_task_type_outcome:aicrm_agent_task_results:rate1h"})
RETRIES = Recorded({"5m": "agent:aicrm_agent_retries:rate5m"})
AGENT_DURATION_BUCKETS = Recorded(
    {"5m": "agent_le:aicrm_agent_task_duration_seconds_bucket:rate5m"}
)
TOKENS = Recorded({"5m": "agent_model_token_type:gen_ai_client_token_usage_sum:rate5m",
                   "1h": "agent_model:gen_ai_client_token_usage_sum:rate1h"})
SPEND = Recorded({"5m": "agent:aicrm_agent_cost_usd:rate5m",
                  "1h": "agent:aicrm_agent_cost_usd:rate1h",
                  "1d": "agent:aicrm_agent_cost_usd:rate1d"})

G_COMPLETED = Recorded({"5m": "global:aicrm_tasks_completed:rate5m",
                        "1h": "global:aicrm_tasks_completed:rate1h",
                        "1d": "global:aicrm_tasks_completed:rate1d"})
G_TERMINAL = Recorded({"5m": "global:aicrm_tasks:rate5m", "1h": "global:aicrm_tasks:rate1h",
                       "1d": "global:aicrm_tasks:rate1d"})
G_RESULTS = Recorded({"5m": "global:aicrm_agent_task_results:rate5m",
                      "1h": "global:aicrm_agent_task_results:rate1h"})
G_SUCCESS = Recorded({"5m": "global:aicrm_agent_task_results_success:rate5m",
                      "1h": "global:aicrm_agent_task_results_success:rate1h"})
G_SPEND = Recorded({"5m": "global:aicrm_agent_cost_usd:rate5m",
                    "1h": "global:aicrm_agent_cost_usd:rate1h",
                    "1d": "global:aicrm_agent_cost_usd:rate1d"})
G_SAVED = Recorded({"1h": "global:aicrm_task_human_seconds_saved:rate1h",
                    "1d": "global:aicrm_task_human_seconds_saved:rate1d"})
G_INTERACTIONS = Recorded({"5m": "global:aicrm_user_interactions:rate5m",
                           "1h": "global:aicrm_user_interactions:rate1h"})
TYPE_INTERACTIONS = Recorded({"5m": "type:aicrm_user_interactions:rate5m",
                              "1h": "type:aicrm_user_interactions:rate1h"})
ACTIVE_USERS = "window:aicrm_active_users:max"
EFFICIENCY_SCORE = "global:aicrm_workflow_efficiency:score1h"
EFFICIENCY_COMPONENTS = "global:aicrm_workflow_efficiency_component:ratio1h"
HEALTH_SCORE = "global:aicrm_system_health:score"
HEALTH_COMPONENTS = "global:aicrm_system_health_component:ratio"
FIRING_ALERTS = 'ALERTS{alertstate="firing"}'
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
OUTCOMES = ("success", "failure", "escalated")


# --- one query per endpoint --------------------------------------------------------------


@dataclass
class Query:
    """Named PromQL fields, sent as one expression."""

    fields: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, expr: str) -> None:
        self.fields[name] = expr

    @property
    def expr(self) -> str:
        return "\nor ".join(
            f'label_replace({e}, "{FIELD_LABEL}", "{n}", "", "")' for n, e in self.fields.items()
        )


@functools.lru_cache(maxsize=1024)
def expr_of(builder: Callable[..., Query], *args: Any) -> str:
    """``builder(*args).expr``, memoized: an endpoint sends one of a few expressions, and
    building a 3-4 kB one costs about 0.2 ms a request. Bounded, as the arguments come from
    validated query parameters."""
    return builder(*args).expr


def split(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Results of ``Query.expr`` by field, with the tag and metric name dropped."""
    out: dict[str, list[Sample]] = {}
    for s in samples:
        labels = dict(s.labels)
        name = labels.pop(FIELD_LABEL, None)
        labels.pop("__name__", None)
        if name is not None:
            out.setdefault(name, []).append(Sample(labels, s.value))
    return out


def split_by(samples: Iterable[Sample], label: str) -> dict[str, dict[str, float | None]]:
    """Results of ``Query.expr`` as field -> {value of ``label`` ("" without it) -> value}, for
    an endpoint whose fields carry no other label: one pass, then a dictionary lookup per
    number (``value``) instead of a scan of the field's samples (those scans were about a fifth
    of the API's own time on an uncached /agent-performance, in-process). The first sample of
    a key wins, as with ``common.first``."""
    out: dict[str, dict[str, float | None]] = {}
    for s in samples:
        name = s.labels.get(FIELD_LABEL)
        if name is not None:
            by = out.get(name)
            if by is None:
                by = out[name] = {}
            by.setdefault(s.labels.get(label, ""), s.value)
    return out


def value(fields: dict[str, dict[str, float | None]], name: str, key: str = "") -> float | None:
    """Field ``name``'s value for ``key`` in a ``split_by`` result (None when absent)."""
    by = fields.get(name)
    return None if by is None else by.get(key)


def _sum(by: str, expr: str) -> str:
    return f"sum by ({by}) ({expr})" if by else f"sum ({expr})"


def _or_zero(num: str, den: str) -> str:
    """A numerator with no series yet counts as 0 where the denominator has data."""
    return f"({num} or {den} * 0)"


def task_completion(window: int, task_type: str | None, agent: str | None) -> Query:
    """Completed/failed/cancelled counts, completion ratio, throughput, duration percentiles."""
    m = [matcher("task_type", task_type)] if task_type else []
    tasks, buckets = TASKS, TASK_DURATION_BUCKETS
    if agent is not None:
        m.append(matcher("agent", agent))
        tasks, buckets = RAW_TASKS, RAW_TASK_DURATION_BUCKETS  # type: ignore[assignment]
    q = Query()
    terminal = tasks.mean(window, m)
    for level, by in (("task_type", "task_type"), ("overall", "")):
        total = _sum(by, terminal)
        q.add(f"{level}.terminal", f"{total} * {window}")
        for status in TERMINAL_STATUSES:
            part = _sum(by, tasks.mean(window, [*m, matcher("status", status)]))
            q.add(f"{level}.{status}", f"{_or_zero(part, total)} * {window}")
        completed = _or_zero(_sum(by, tasks.mean(window, [*m, matcher("status", "completed")])),
                             total)
        q.add(f"{level}.throughput", completed)
        q.add(f"{level}.completion_ratio", f"{completed} / ({total} > 0)")
        observed = _sum(by, buckets.mean(window, [*m, matcher("le", "+Inf")]))
        by_le = f"{by}, le" if by else "le"
        for quantile in QUANTILES:
            q.add(
                f"{level}.duration_p{round(quantile * 100)}",
                f"histogram_quantile({quantile}, {_sum(by_le, buckets.mean(window, m))})"
                f" and on ({by}) ({observed} > 0)",
            )
    _backlog(q, task_type)
    return q


OPEN_TASKS = "task_type_status:aicrm_tasks_open:sum"
OLDEST_OPEN = "task_type:aicrm_task_oldest_open_age_seconds:max"
WAIT_P95 = "task_type:aicrm_task_wait_seconds:p95_rate5m"
WAIT_BUCKETS = "task_type_le:aicrm_task_wait_seconds_bucket:rate5m"


def _backlog(q: Query, task_type: str | None) -> None:
    """The queue now (not over the window): queued and running tasks, the oldest open task's
    age, the 95th percentile wait of the last 5 minutes. Open tasks have no agent yet, so an
    agent filter does not apply to them."""
    m = [matcher("task_type", task_type)] if task_type else []
    for level, by in (("task_type", "task_type"), ("overall", "")):
        for status in ("queued", "running"):
            q.add(f"{level}.{status}",
                  _sum(by, selector(OPEN_TASKS, [*m, matcher("status", status)])))
        oldest = selector(OLDEST_OPEN, m)
        q.add(f"{level}.oldest_open_age", f"max by ({by}) ({oldest})" if by else f"max ({oldest})")
    q.add("task_type.wait_p95", selector(WAIT_P95, m))
    q.add("overall.wait_p95",
          f"histogram_quantile(0.95, sum by (le) ({selector(WAIT_BUCKETS, m)}))"
          f" and on () (sum ({selector(WAIT_BUCKETS, [*m, matcher('le', '+Inf')])}) > 0)")


def agent_performance(window: int, agent: str | None) -> Query:
    m = [matcher("agent", agent)] if agent else []
    q = Query()
    total = _sum("agent", RESULTS.mean(window, m))
    by_outcome = {
        o: _or_zero(_sum("agent", RESULTS.mean(window, [*m, matcher("outcome", o)])), total)
        for o in OUTCOMES
    }
    q.add("results_total", f"{total} * {window}")
    for outcome, expr in by_outcome.items():
        q.add(f"results.{outcome}", f"{expr} * {window}")
    success_ratio = f"({by_outcome['success']} / ({total} > 0))"
    q.add("success_ratio", success_ratio)
    q.add("escalation_ratio", f"{by_outcome['escalated']} / ({total} > 0)")
    retries = _or_zero(_sum("agent", RETRIES.mean(window, m)), total)
    q.add("retries", f"{retries} * {window}")
    q.add("retries_per_task", f"{retries} / ({total} > 0)")
    buckets = AGENT_DURATION_BUCKETS.mean(window, m)
    observed = _sum("agent", AGENT_DURATION_BUCKETS.mean(window, [*m, matcher("le", "+Inf")]))
    q.add("duration_p95",
          f"histogram_quantile(0.95, {_sum('agent, le', buckets)}) and on (agent) ({observed} > 0)")
    tokens = _sum("agent", TOKENS.mean(window, m))
    q.add("tokens", f"{tokens} * {window}")
    q.add("tokens_per_task", f"{tokens} / on (agent) ({total} > 0)")
    spend = _sum("agent", SPEND.mean(window, m))
    q.add("spend", f"{spend} * {window}")
    successes = _sum("agent", RESULTS.mean(window, [*m, matcher("outcome", "success")]))
    q.add("cost_per_successful_task", f"{spend} / on (agent) ({successes} > 0)")
    objective = (
        "max by (agent) ("
        + selector(catalog.OBJECTIVE.name, ['name="agent_success_ratio"', 'agent!=""', *m])
        + ")"
    )
    q.add("objective", objective)
    q.add("objective_met", f"{success_ratio} >= bool on (agent) {objective}")
    return q


KPIS: dict[str, tuple[str, str]] = {
    "tasks_completed": ("tasks", "count"),
    "task_completion_ratio": ("ratio", "ratio"),
    "agent_success_ratio": ("ratio", "ratio"),
    "spend": ("usd", "count"),
    "cost_per_successful_task": ("usd", "ratio"),
    "human_hours_saved": ("h", "count"),
}


def _kpi(name: str, window: int, offset: int) -> str:
    def mean(family: Recorded) -> str:
        return family.mean(window, (), offset)

    if name == "tasks_completed":
        return f"{mean(G_COMPLETED)} * {window}"
    if name == "task_completion_ratio":
        return f"{mean(G_COMPLETED)} / ({mean(G_TERMINAL)} > 0)"
    if name == "agent_success_ratio":
        return f"{mean(G_SUCCESS)} / ({mean(G_RESULTS)} > 0)"
    if name == "spend":
        return f"{mean(G_SPEND)} * {window}"
    if name == "cost_per_successful_task":
        return f"{mean(G_SPEND)} / ({mean(G_SUCCESS)} > 0)"
    if name == "human_hours_saved":
        return f"{mean(G_SAVED)} * {window} / 3600"
    raise KeyError(name)


def _changes(q: Query, name: str, current: str, previous: str) -> None:
    """The number over the window and over the one before it. Their difference and its ratio
    to the previous value are taken from these two (api/executive.py), not sent as fields of
    their own: each would repeat both expressions, tripling the query (over VictoriaMetrics'
    16 kB default limit at windows longer than a base) and its evaluation."""
    q.add(f"{name}.value", current)
    q.add(f"{name}.previous", previous)


USERS: dict[str, str] = {"interactions": "interactions", "approval_ratio": "ratio"}
"""The users block's numbers compared with the previous window, and their units."""


def _users(name: str, window: int, offset: int) -> str:
    if name == "interactions":
        return f"{G_INTERACTIONS.mean(window, (), offset)} * {window}"
    if name == "approval_ratio":
        def total(types: str) -> str:
            """Interactions/s whose type matches ``types``, a label matcher."""
            return f"sum ({TYPE_INTERACTIONS.mean(window, [types], offset)})"

        decisions = total(matcher("type", "approval|rejection", "=~"))
        approvals = _or_zero(total(matcher("type", "approval")), decisions)
        return f"{approvals} / ({decisions} > 0)"
    raise KeyError(name)


def executive(window: int) -> Query:
    """KPIs over the window against the window before it; scores now against W ago; user
    interactions over the window and active users now."""
    q = Query()
    for name in KPIS:
        _changes(q, f"kpi.{name}", _kpi(name, window, 0), _kpi(name, window, window))
    for name in USERS:
        _changes(q, f"users.{name}", _users(name, window, 0), _users(name, window, window))
    q.add("users.by_type", f"sum by (type) ({TYPE_INTERACTIONS.mean(window)}) * {window}")
    q.add("users.active_users", ACTIVE_USERS)
    for name, series in (("workflow_efficiency", EFFICIENCY_SCORE),
                         ("system_health", HEALTH_SCORE)):
        _changes(q, f"score.{name}", series, f"{series} offset {duration(window)}")
    q.add("component.workflow_efficiency", f"max by (component) ({EFFICIENCY_COMPONENTS})")
    q.add("component.system_health", f"max by (component) ({HEALTH_COMPONENTS})")
    return q


@dataclass(frozen=True)
class Dataset:
    series: str
    labels: tuple[str, ...]
    unit: str
    description: str

    def expr(self) -> str:
        by = ", ".join(self.labels)
        return f"max by ({by}) ({self.series})" if by else f"max ({self.series})"


DATASETS: dict[str, Dataset] = {
    "task_completion_ratio": Dataset(
        "task_type:aicrm_tasks:completed_ratio_rate5m", ("task_type",), "ratio",
        "completed / terminal tasks, 5m"),
    "task_throughput": Dataset(
        "task_type:aicrm_tasks_completed:rate5m", ("task_type",), "tasks/s",
        "completed tasks per second, 5m"),
    "task_duration_p95": Dataset(
        "task_type:aicrm_task_duration_seconds:p95_rate5m", ("task_type",), "s",
        "95th percentile task duration, 5m"),
    "task_backlog": Dataset(
        "task_type:aicrm_tasks_queued:sum", ("task_type",), "tasks", "queued tasks"),
    "agent_success_ratio": Dataset(
        "agent:aicrm_agent_task_results:success_ratio_rate5m", ("agent",), "ratio",
        "successful / all task results, 5m"),
    "agent_spend_rate": Dataset(
        "agent:aicrm_agent_cost_usd:rate5m", ("agent",), "usd/s", "model spend per second, 5m"),
    "agent_cost_per_successful_task": Dataset(
        "agent:aicrm_agent_cost_usd_per_successful_task:ratio_rate5m", ("agent",), "usd",
        "spend / successful task results, 5m"),
    "integration_error_ratio": Dataset(
        "platform:aicrm_integration_requests:error_ratio_rate5m", ("platform",), "ratio",
        "5xx + timeout / all requests, 5m"),
    "integration_latency_p95": Dataset(
        "platform:aicrm_integration_request_duration_seconds:p95_rate5m", ("platform",), "s",
        "95th percentile request latency, 5m"),
    "workflow_efficiency_score": Dataset(
        EFFICIENCY_SCORE, (), "score", "0-100 workflow efficiency, 1h"),
    "system_health_score": Dataset(HEALTH_SCORE, (), "score", "0-100 system health"),
}
