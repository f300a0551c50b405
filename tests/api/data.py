"""Known data for the API tests: counters that grow at constant rates, so every rate, ratio,
count and percentile over any window is computable by hand (the tests do it in comments).

The same function serves the past (backfilled with ``promtool tsdb create-blocks-from
openmetrics``) and the present (a tiny scrape target with explicit timestamps), so the series
run on without a seam while Prometheus evaluates the real rule files live.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter import catalog as c
from exporter.metrics import MetricStore
from tests.helpers import make_config

T0 = 1_600_000_000.0
"""Counters are rate x (t - T0): large and positive at every sampled time."""

# (labels, per-second rate) per counter family.
TASKS = [
    ({"task_type": "qualify_lead", "agent": "lead-qualifier", "status": "completed"}, 0.4),
    ({"task_type": "qualify_lead", "agent": "lead-qualifier", "status": "failed"}, 0.05),
    ({"task_type": "qualify_lead", "agent": "lead-qualifier", "status": "cancelled"}, 0.05),
    ({"task_type": "qualify_lead", "agent": "email-writer", "status": "completed"}, 0.1),
    ({"task_type": "write_email", "agent": "email-writer", "status": "completed"}, 0.3),
    ({"task_type": "write_email", "agent": "email-writer", "status": "failed"}, 0.1),
]
# Histograms: labels -> {upper bound of the bucket an observation falls in: observations/s}.
TASK_DURATION = [
    ({"task_type": "qualify_lead", "agent": "lead-qualifier"}, {60: 0.25, 90: 0.25}),
    ({"task_type": "write_email", "agent": "email-writer"}, {15: 0.4}),
]
# Waits by task type only (the tasks table's created -> started).
TASK_WAIT = [
    ({"task_type": "qualify_lead"}, {30: 0.5}),
    ({"task_type": "write_email"}, {120: 0.2}),
]
RESULTS = [
    ({"agent": "lead-qualifier", "task_type": "qualify_lead", "outcome": "success"}, 0.96),
    ({"agent": "lead-qualifier", "task_type": "qualify_lead", "outcome": "failure"}, 0.02),
    ({"agent": "lead-qualifier", "task_type": "qualify_lead", "outcome": "escalated"}, 0.02),
    ({"agent": "email-writer", "task_type": "qualify_lead", "outcome": "success"}, 0.2),
    ({"agent": "email-writer", "task_type": "qualify_lead", "outcome": "failure"}, 0.2),
    ({"agent": "email-writer", "task_type": "qualify_lead", "outcome": "escalated"}, 0.1),
    ({"agent": "email-writer", "task_type": "write_email", "outcome": "success"}, 0.4),
    ({"agent": "email-writer", "task_type": "write_email", "outcome": "failure"}, 0.1),
]
RETRIES = [
    ({"agent": "lead-qualifier", "task_type": "qualify_lead"}, 0.1),
    ({"agent": "email-writer", "task_type": "qualify_lead"}, 0.05),
    ({"agent": "email-writer", "task_type": "write_email"}, 0.25),
]
AGENT_DURATION = [
    ({"agent": "lead-qualifier", "task_type": "qualify_lead"}, {120: 1.0}),
    ({"agent": "email-writer", "task_type": "write_email"}, {10: 0.5, 15: 0.5}),
]
COST = [
    ({"agent": "lead-qualifier", "model": "gpt-4o"}, 0.002),
    ({"agent": "email-writer", "model": "gpt-4o"}, 0.0012),
]
_GENAI = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "gpt-4o",
          "gen_ai_provider_name": "openai"}
TOKENS = [
    ({**_GENAI, "gen_ai_token_type": "input", "gen_ai_agent_name": "lead-qualifier"}, 100.0),
    ({**_GENAI, "gen_ai_token_type": "output", "gen_ai_agent_name": "lead-qualifier"}, 50.0),
    ({**_GENAI, "gen_ai_token_type": "input", "gen_ai_agent_name": "email-writer"}, 200.0),
    ({**_GENAI, "gen_ai_token_type": "output", "gen_ai_agent_name": "email-writer"}, 100.0),
]
INTEGRATIONS = [
    ({"platform": "salesforce", "operation": "query", "status_class": "2xx"}, 0.9),
    ({"platform": "salesforce", "operation": "query", "status_class": "5xx"}, 0.1),
]
INTERACTIONS = [
    ({"channel": "web", "type": "message"}, 1.0),
    ({"channel": "web", "type": "approval"}, 0.3),
    ({"channel": "email", "type": "approval"}, 0.1),
    ({"channel": "web", "type": "rejection"}, 0.1),
    ({"channel": "slack", "type": "feedback"}, 0.05),
    ({"channel": "slack", "type": "escalation"}, 0.05),
]
GAUGES: list[tuple[str, dict[str, str], float]] = [
    (c.TASKS_OPEN.name, {"task_type": "qualify_lead", "status": "queued"}, 100.0),
    (c.TASKS_OPEN.name, {"task_type": "write_email", "status": "queued"}, 150.0),
    (c.TASKS_OPEN.name, {"task_type": "qualify_lead", "status": "running"}, 4.0),
    (c.TASKS_OPEN.name, {"task_type": "write_email", "status": "running"}, 6.0),
    (c.TASK_OLDEST_OPEN_AGE.name, {"task_type": "qualify_lead"}, 600.0),
    (c.TASK_OLDEST_OPEN_AGE.name, {"task_type": "write_email"}, 1200.0),
    (c.SOURCE_UP.name, {"source": "agent-logs"}, 1.0),
    (c.ACTIVE_USERS.name, {"window": "1h"}, 25.0),
    (c.ACTIVE_USERS.name, {"window": "24h"}, 120.0),
]
CONFIG_GAUGES = (c.THRESHOLD.name, c.OBJECTIVE.name, c.SCORE_WEIGHT.name,
                 c.TASK_HUMAN_SECONDS_SAVED.name, c.AGENT_INFO.name)

# Recorded series as they stood in the hour before: the executive dashboard's previous window.
PREVIOUS = {
    "global:aicrm_tasks_completed:rate1h": 0.4,
    "global:aicrm_tasks:rate1h": 0.8,
    "global:aicrm_agent_task_results_success:rate1h": 1.0,
    "global:aicrm_agent_task_results:rate1h": 2.0,
    "global:aicrm_agent_cost_usd:rate1h": 0.0016,
    "global:aicrm_task_human_seconds_saved:rate1h": 315.0,
    "global:aicrm_workflow_efficiency:score1h": 80.0,
    "global:aicrm_system_health:score": 40.0,
    "global:aicrm_user_interactions:rate1h": 0.8,
    'type:aicrm_user_interactions:rate1h{type="approval"}': 0.2,
    'type:aicrm_user_interactions:rate1h{type="rejection"}': 0.2,
}


def config() -> Any:
    return make_config()


def _config_lines() -> list[tuple[str, str, float]]:
    """(name, rendered labels, value) of the exporter's own config gauges for config()."""
    out = []
    for line in MetricStore(config()).render_text().decode().splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name in CONFIG_GAUGES:
            labels = series[len(name):].strip("{}")
            out.append((name, labels, float(value)))
    return out


def _fmt(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def _join(*parts: str) -> str:
    inner = ",".join(p for p in parts if p)
    return "{" + inner + "}" if inner else ""


def families(extra_labels: str) -> Iterator[tuple[str, str, list[tuple[str, float, bool]]]]:
    """(family, type, [(series, rate-or-value, is_counter)]) for every family."""
    counters = [
        (c.TASKS, TASKS), (c.AGENT_TASK_RESULTS, RESULTS), (c.AGENT_RETRIES, RETRIES),
        (c.AGENT_COST, COST), (c.INTEGRATION_REQUESTS, INTEGRATIONS),
        (c.USER_INTERACTIONS, INTERACTIONS),
    ]
    for spec, rows in counters:
        yield spec.base_name, "counter", [
            (spec.name + _join(_fmt(lab), extra_labels), r, True) for lab, r in rows
        ]
    for spec, hrows in ((c.TASK_DURATION, TASK_DURATION), (c.AGENT_TASK_DURATION, AGENT_DURATION),
                        (c.TASK_WAIT, TASK_WAIT)):
        series = []
        for lab, per_bucket in hrows:
            base = _fmt(lab)
            cumulative = 0.0
            for bound in (*spec.buckets, float("inf")):
                cumulative += sum(r for b, r in per_bucket.items() if b == bound)
                le = "+Inf" if bound == float("inf") else f"{float(bound):g}"
                series.append((spec.name + "_bucket" + _join(base, f'le="{le}"', extra_labels),
                               cumulative, True))
            series.append((spec.name + "_count" + _join(base, extra_labels), cumulative, True))
            total = sum(b * r for b, r in per_bucket.items())
            series.append((spec.name + "_sum" + _join(base, extra_labels), total, True))
        yield spec.name, "histogram", series
    spec = c.GENAI_TOKEN_USAGE
    yield spec.name, "histogram", [
        (spec.name + "_sum" + _join(_fmt(lab), extra_labels), r, True) for lab, r in TOKENS
    ] + [
        (spec.name + "_count" + _join(_fmt(lab), extra_labels), 1.0, True) for lab, _ in TOKENS
    ]
    by_name: dict[str, list[tuple[str, float, bool]]] = {}
    for name, lab, v in GAUGES:
        by_name.setdefault(name, []).append((name + _join(_fmt(lab), extra_labels), v, False))
    for name, labels, v in _config_lines():
        by_name.setdefault(name, []).append((name + _join(labels, extra_labels), v, False))
    for name, gauge_rows in by_name.items():
        yield name, "gauge", gauge_rows


def value(rate: float, counter: bool, t: float) -> float:
    return rate * (t - T0) if counter else rate


def write_openmetrics(path: Path, start: float, end: float, step: float, job: str,
                      instance: str) -> None:
    """Raw families in [start, end] with the target labels a scrape would add, plus
    PREVIOUS up to ``previous_end`` (see backfill)."""
    extra = f'instance="{instance}",job="{job}"'
    times = []
    t = start
    while t <= end:
        times.append(t)
        t += step
    with open(path, "w") as out:
        for family, kind, series in families(extra):
            out.write(f"# TYPE {family} {kind}\n")
            for name, rate, counter in series:
                for ts in times:
                    out.write(f"{name} {value(rate, counter, ts)!r} {ts:.3f}\n")


def write_previous(path: Path, start: float, end: float, step: float) -> None:
    by_family: dict[str, list[tuple[str, float]]] = {}
    for name, v in PREVIOUS.items():
        by_family.setdefault(name.split("{", 1)[0], []).append((name, v))
    with open(path, "a") as out:
        for family, series in by_family.items():
            out.write(f"# TYPE {family} gauge\n")
            for name, v in series:
                t = start
                while t <= end:
                    out.write(f"{name} {v!r} {t:.3f}\n")
                    t += step


def finish(path: Path) -> None:
    with open(path, "a") as out:
        out.write("# EOF\n")


class Target:
    """A scrape target serving the same families at the current time, timestamps included."""

    def __init__(self) -> None:
        families_ = list(families(""))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                now = time.time()
                ms = int(now * 1000)
                lines = []
                for _family, _kind, series in families_:
                    for name, rate, counter in series:
                        lines.append(f"{name} {value(rate, counter, ms / 1000)!r} {ms}")
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
