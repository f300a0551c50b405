"""Rule evaluation cost at scale: 1,000 agents x 20 task types x 10 platforms.

Two exporter shards (500 agents and 5 platforms each, config gauges on both) are served from
local HTTP endpoints whose counters grow on every scrape. A real Prometheus on 127.0.0.1 scrapes
them every 15s and evaluates every rule file of recording_rules/. After the warm-up the script
samples ``prometheus_rule_group_last_duration_seconds`` against
``prometheus_rule_group_interval_seconds`` per group, prints a table, and exits 1 if any group
needed 10% of its interval or more.

    .venv/bin/python bench/rules_scale.py [--minutes 8] [--agents 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter import catalog as c  # noqa: E402

TASK_TYPES = 20
PLATFORMS = 10
OPERATIONS = 5
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")
TOOLS = ("crm.search", "crm.update", "email.send", "calendar.book", "web.lookup")
CHANNELS = ("web", "email", "slack")
SCRAPE_INTERVAL = "15s"
LIMIT = 0.10


def _labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kw.items()) + "}"


class Shard:
    """One exporter's series: static gauges plus counters that grow by ``coef`` per scrape."""

    def __init__(self, index: int, agents: list[str], task_types: list[str],
                 platforms: list[str], all_agents: list[str], owns_task_db: bool):
        self.prefixes: list[str] = []
        self.coefs: list[int] = []
        static: list[str] = []
        self.scrapes = 0
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

        def counter(name: str, labels: str, coef: int) -> None:
            self.prefixes.append(f"{name}{labels} ")
            self.coefs.append(coef)

        def histogram(name: str, base: dict[str, str], buckets: tuple[float, ...],
                      per_bucket: int, total: int) -> None:
            cum = 0
            for i, le in enumerate(buckets):
                cum = min(total, cum + (per_bucket if i % 3 else 0))
                counter(f"{name}_bucket", _labels(**base, le=f"{le:g}"), cum)
            counter(f"{name}_bucket", _labels(**base, le="+Inf"), total)
            counter(f"{name}_sum", _labels(**base), total * 7)
            counter(f"{name}_count", _labels(**base), total)

        def gauge(name: str, labels: str, value: float) -> None:
            static.append(f"{name}{labels} {value:g}\n")

        for ai, agent in enumerate(agents):
            good = 6 + (ai % 5)  # success weight: ratios differ between agents
            for tt in task_types:
                for status, k in (("completed", good), ("failed", 1), ("cancelled", 1)):
                    counter(c.TASKS.name, _labels(task_type=tt, agent=agent, status=status), k)
                for outcome, k in (("success", good), ("failure", 1), ("escalated", 1)):
                    counter(c.AGENT_TASK_RESULTS.name,
                            _labels(agent=agent, task_type=tt, outcome=outcome), k)
                counter(c.AGENT_RETRIES.name, _labels(agent=agent, task_type=tt), 1)
                histogram(c.TASK_DURATION.name, {"task_type": tt, "agent": agent},
                          c.TASK_SECONDS_BUCKETS, 1, 8)
                histogram(c.AGENT_TASK_DURATION.name, {"agent": agent, "task_type": tt},
                          c.TASK_SECONDS_BUCKETS, 1, 8)
            for other in (all_agents[(ai + 1) % len(all_agents)],
                          all_agents[(ai + 7) % len(all_agents)]):
                counter(c.AGENT_HANDOFFS.name, _labels(from_agent=agent, to_agent=other), 1)
            model = MODELS[ai % len(MODELS)]
            for m in MODELS:
                counter(c.AGENT_COST.name, _labels(agent=agent, model=m), 3 if m == model else 1)
            for tool in TOOLS:
                for outcome, k in (("success", 4), ("failure", 1)):
                    counter(c.AGENT_TOOL_CALLS.name,
                            _labels(agent=agent, tool=tool, outcome=outcome), k)
                histogram(c.AGENT_TOOL_CALL_DURATION.name, {"agent": agent, "tool": tool},
                          c.CALL_SECONDS_BUCKETS, 1, 5)
            genai = {"gen_ai_operation_name": "chat", "gen_ai_request_model": model,
                     "gen_ai_provider_name": "openai", "gen_ai_agent_name": agent}
            histogram(c.GENAI_OPERATION_DURATION.name, genai, c.GENAI_DURATION_BUCKETS, 1, 6)
            for tt_name in c.TOKEN_TYPES:
                histogram(c.GENAI_TOKEN_USAGE.name, {**genai, "gen_ai_token_type": tt_name},
                          c.GENAI_TOKEN_BUCKETS, 1, 6)
            histogram(c.USER_FEEDBACK_RATING.name, {"agent": agent}, c.RATING_BUCKETS, 1, 3)
            gauge(c.AGENT_INFO.name, _labels(agent=agent, team=f"team-{ai % 10}"), 1)

        for platform in platforms:
            for op in range(OPERATIONS):
                for sc, k in (("2xx", 50), ("4xx", 1), ("429", 1), ("5xx", 1), ("timeout", 1)):
                    counter(c.INTEGRATION_REQUESTS.name,
                            _labels(platform=platform, operation=f"op{op}", status_class=sc), k)
                histogram(c.INTEGRATION_REQUEST_DURATION.name,
                          {"platform": platform, "operation": f"op{op}"},
                          c.CALL_SECONDS_BUCKETS, 5, 54)
        for channel in CHANNELS:
            for itype in c.INTERACTION_TYPES:
                counter(c.USER_INTERACTIONS.name, _labels(channel=channel, type=itype), 2)

        source = f"agent-logs-{index}"
        gauge(c.SOURCE_UP.name, _labels(source=source), 1)
        gauge(c.SOURCE_LAG.name, _labels(source=source), 2)
        counter(c.SOURCE_EVENTS.name, _labels(source=source), 1000)
        counter(c.SOURCE_REJECTED.name, _labels(source=source, reason="invalid_json"), 1)
        if owns_task_db:
            gauge(c.SOURCE_UP.name, _labels(source="task_db"), 1)
            for tt in task_types:
                gauge(c.TASKS_OPEN.name, _labels(task_type=tt, status="queued"), 12)
                gauge(c.TASKS_OPEN.name, _labels(task_type=tt, status="running"), 5)
                gauge(c.TASK_OLDEST_OPEN_AGE.name, _labels(task_type=tt), 90)
                histogram(c.TASK_WAIT.name, {"task_type": tt}, c.WAIT_SECONDS_BUCKETS, 20, 200)

        # Config gauges: identical on every shard.
        thresholds = {
            "agent_success_ratio_min": 0.9, "task_completion_ratio_min": 0.95,
            "integration_error_ratio_max": 0.05, "integration_latency_p95_max_seconds": 2,
            "task_backlog_max": 500, "task_wait_p95_max_seconds": 300,
            "source_lag_max_seconds": 300, "rejected_events_ratio_max": 0.01,
            "cost_per_successful_task_max_usd": 1, "anomaly_zscore_max": 3,
        }
        for name, value in thresholds.items():
            gauge(c.THRESHOLD.name, _labels(name=name), value)
        for agent in [*all_agents, c.OTHER_VALUE]:
            gauge(c.THRESHOLD.name, _labels(name="agent_success_ratio_min", agent=agent), 0.9)
            gauge(c.OBJECTIVE.name, _labels(name="agent_success_ratio", agent=agent), 0.95)
        for platform in [*(f"platform-{p}" for p in range(PLATFORMS)), c.OTHER_VALUE]:
            gauge(c.THRESHOLD.name,
                  _labels(name="integration_error_ratio_max", platform=platform), 0.05)
            gauge(c.THRESHOLD.name,
                  _labels(name="integration_latency_p95_max_seconds", platform=platform), 1.5)
        for tt in [f"task-{t:02d}" for t in range(TASK_TYPES)]:
            gauge(c.THRESHOLD.name, _labels(name="task_duration_target_seconds", task_type=tt), 120)
            gauge(c.TASK_HUMAN_SECONDS_SAVED.name, _labels(task_type=tt), 600)
        gauge(c.OBJECTIVE.name, _labels(name="task_completion_ratio"), 0.95)
        for comp, w in (("completion", 0.4), ("success", 0.3), ("speed", 0.2), ("retries", 0.1)):
            gauge(c.SCORE_WEIGHT.name, _labels(score="efficiency", component=comp), w)
        for comp, w in (("sources", 0.3), ("integrations", 0.3), ("agents", 0.3), ("backlog", 0.1)):
            gauge(c.SCORE_WEIGHT.name, _labels(score="health", component=comp), w)
        self.static = "".join(static)

    @property
    def series(self) -> int:
        return len(self.prefixes) + self.static.count("\n")

    def body(self, k: int) -> bytes:
        lines = "".join([f"{p}{n * k}\n" for p, n in zip(self.prefixes, self.coefs, strict=True)])
        return (self.static + lines).encode()

    def prerender(self, scrapes: int) -> None:
        """Render the bodies of the first scrapes up front, so serving costs no CPU while
        Prometheus evaluates (the exporter's own cost is measured elsewhere)."""
        self.bodies = [self.body(k) for k in range(1, scrapes + 1)]

    def render(self) -> bytes:
        with self.lock:
            self.scrapes += 1
            k = self.scrapes
        if k <= len(self.bodies):
            return self.bodies[k - 1]
        return self.body(k)


def serve(shard: Shard) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            data = shard.render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)["data"]["result"]


def self_metrics(base: str) -> dict[str, dict[str, float]]:
    """Prometheus's own /metrics: family -> {rule group or "": value} for the ones read here."""
    wanted = (
        "prometheus_rule_group_last_duration_seconds",
        "prometheus_rule_group_interval_seconds",
        "prometheus_rule_group_iterations_total",
        "prometheus_rule_evaluation_failures_total",
        "prometheus_tsdb_head_series",
    )
    out: dict[str, dict[str, float]] = {w: {} for w in wanted}
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        for raw in resp.read().decode().splitlines():
            name = raw.split("{", 1)[0].split(" ", 1)[0]
            if name not in out:
                continue
            group = ""
            if 'rule_group="' in raw:
                group = raw.split('rule_group="', 1)[1].split('"', 1)[0].rsplit(";", 1)[-1]
            value = float(raw.rsplit(" ", 1)[1])
            out[name][group] = out[name].get(group, 0.0) + value
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=8.0,
                    help="total run time; sampling starts after 5.5 minutes (full 5m windows)")
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    args = ap.parse_args()

    agents = [f"agent-{i:04d}" for i in range(args.agents)]
    task_types = [f"task-{t:02d}" for t in range(TASK_TYPES)]
    platforms = [f"platform-{p}" for p in range(PLATFORMS)]
    half, phalf = len(agents) // 2, PLATFORMS // 2
    t0 = time.monotonic()
    shards = [
        Shard(0, agents[:half], task_types, platforms[:phalf], agents, owns_task_db=True),
        Shard(1, agents[half:], task_types, platforms[phalf:], agents, owns_task_db=False),
    ]
    total_series = sum(s.series for s in shards)
    # Prometheus scrapes every 15s; a margin covers its first scrapes and the final reads.
    scrapes = int(args.minutes * 4) + 12
    for s in shards:
        s.prerender(scrapes)
    print(f"generated {total_series:,} series and {scrapes} scrapes per shard in "
          f"{time.monotonic() - t0:.0f}s", flush=True)
    servers = [serve(s) for s in shards]

    rule_files = sorted(ROOT.glob("recording_rules/*.rules.yml"))
    rule_files += sorted(ROOT.glob("recording_rules/alerts/*.alerts.yml"))
    with tempfile.TemporaryDirectory(prefix="aicrm-rules-scale-") as tmp:
        targets = ", ".join(f'"127.0.0.1:{s.server_port}"' for s in servers)
        cfg = Path(tmp, "prometheus.yml")
        cfg.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL}\n"
            "  scrape_timeout: 14s\n"
            "  evaluation_interval: 30s\n"
            "rule_files:\n" + "".join(f"  - {p}\n" for p in rule_files) +
            "scrape_configs:\n"
            "  - job_name: aicrm-exporter\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(Path(tmp, "prometheus.log"), "w")  # noqa: SIM115
        prom = subprocess.Popen(
            [args.prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        peak: dict[str, float] = {}
        last: dict[str, float] = {}
        interval: dict[str, float] = {}
        try:
            deadline = t_start = time.monotonic()
            deadline += args.minutes * 60
            sample_from = t_start + min(5.5 * 60, args.minutes * 60 * 0.6)
            while time.monotonic() < deadline:
                time.sleep(15)
                if prom.poll() is not None:
                    print(Path(tmp, "prometheus.log").read_text()[-3000:], file=sys.stderr)
                    raise SystemExit("prometheus exited")
                elapsed = time.monotonic() - t_start
                try:
                    m = self_metrics(base)
                    scrape = query(base, 'scrape_duration_seconds{job="aicrm-exporter"}')
                except OSError:
                    continue
                heads = int(m["prometheus_tsdb_head_series"].get("", 0))
                sd = max((float(r["value"][1]) for r in scrape), default=0.0)
                print(f"  t={elapsed:5.0f}s head series {heads:,}  scrape {sd:.2f}s", flush=True)
                if time.monotonic() < sample_from:
                    continue
                for g, v in m["prometheus_rule_group_last_duration_seconds"].items():
                    last[g] = v
                    peak[g] = max(peak.get(g, 0.0), v)
                interval.update(m["prometheus_rule_group_interval_seconds"])
            m = self_metrics(base)
            evals = {g: int(v) for g, v in m["prometheus_rule_group_iterations_total"].items()}
            failed = sum(m["prometheus_rule_evaluation_failures_total"].values())
        finally:
            prom.terminate()
            prom.wait(timeout=60)
            log.close()
            for s in servers:
                s.shutdown()

    print()
    now = datetime.datetime.now(datetime.UTC)
    print(f"date: {now:%Y-%m-%d %H:%M UTC}; nproc {os.cpu_count()}; CPU {cpu_model()}; "
          f"{total_series:,} exporter series; scrape every {SCRAPE_INTERVAL}")
    head = f"{'group':32} {'interval':>8} {'evals':>5} {'last (s)':>9} {'max (s)':>9}"
    print(f"{head} {'max/int':>8}")
    worst = 0.0
    missing = []
    for g in sorted(interval):
        if g not in peak:
            missing.append(g)
            continue
        ratio = peak[g] / interval[g]
        worst = max(worst, ratio)
        flag = "" if ratio < LIMIT else "  OVER"
        print(f"{g:32} {interval[g]:7.0f}s {evals.get(g, 0):5d} {last[g]:9.3f} {peak[g]:9.3f} "
              f"{ratio:7.2%}{flag}")
    if failed:
        print(f"rule evaluation failures: {failed:g}")
        return 1
    if missing:
        print(f"groups never sampled (run longer): {missing}")
        return 1
    print(f"worst group: {worst:.2%} of its interval (limit {LIMIT:.0%})")
    return 0 if worst < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
