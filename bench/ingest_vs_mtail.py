"""Ingest throughput of the exporter against mtail on the same task_result lines, one core each,
and the cost of /metrics for about 10,000 series.

Targets (issue #2): the exporter doing its full job ingests at least 2x mtail's lines per second
on one core, and /metrics for 10,000 series renders in under 100 ms.

* mtail runs bench/mtail/task_results.mtail (results by agent, task type and outcome; a duration
  histogram in seconds with the exporter's buckets) with GOMAXPROCS=1 under ``taskset``, twice:
  ``-one_shot`` (read the file to EOF, print, exit) and as a daemon tailing a file that the
  lines are appended to (time until its /metrics counts every line).
* The exporter is the real ``aicrm-exporter`` process under ``taskset`` with one event_logs
  source on the file, timed from its start until /metrics shows every line counted in
  ``aicrm_source_events_total`` (each scrape also writes the state checkpoint). The in-process
  rate (``FileTailer.poll`` into a ``MetricStore``) is a secondary figure.
* Every tool's counts are checked against the totals the generator expects.

    .venv/bin/python bench/ingest_vs_mtail.py [--lines 1000000] [--rounds 2] [--cpu 0]
        [--output docs/benchmarks-ingest.md] [--profile]

Exits 1 when a target is missed or a tool's counts are wrong. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import gc
import io
import json
import math
import os
import pstats
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Samples,
    free_port,
    http_get,
    machine,
    parse_text,
    pin_self,
    pinned,
    process_cpu_seconds,
    stop,
    tool_version,
    unpin_self,
    wait_http,
)
from exporter import catalog as c  # noqa: E402
from exporter.config import load_config  # noqa: E402
from exporter.metrics import MetricStore  # noqa: E402
from exporter.sources.files import FileTailer, Watch  # noqa: E402

MTAIL_PROGS = ROOT / "bench" / "mtail"
MTAIL_PROGRAM = MTAIL_PROGS / "task_results.mtail"
BUCKETS = c.AGENT_TASK_DURATION.buckets
SOURCE = "bench"
RESULTS = c.AGENT_TASK_RESULTS.name
DURATION = c.AGENT_TASK_DURATION.name
INGEST_RATIO_TARGET = 2.0
RENDER_TARGET_MS = 100.0
POLL_SECONDS = 0.2
START_TS = 1_748_764_800_000  # 2025-06-01T08:00:00Z, in ms


# --- the lines ---------------------------------------------------------------------------


@dataclass
class Expected:
    """What every tool must report after reading the generated file."""

    lines: int = 0
    results: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    buckets: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    """Per-bucket (not cumulative) counts, +Inf last."""
    sums: dict[tuple[str, str], float] = field(default_factory=dict)
    size: int = 0


def generate(path: Path, cfg: dict[str, Any], n: int, seed: int) -> Expected:
    """``n`` task_result lines as an agent fleet writes them: each agent mostly does its own
    kind of task, succeeds about as often as its objective says, takes a log-normal time
    around the task type's target, and now and then retries."""
    rnd = random.Random(seed)
    agents = [(a["name"], float(a.get("success_objective", 0.9))) for a in cfg["agents"]]
    types = [(t["name"], float(t.get("target_seconds") or 60)) for t in cfg["task_types"]]
    home = {name: types[i % len(types)] for i, (name, _) in enumerate(agents)}
    exp = Expected(lines=n)
    nb = len(BUCKETS) + 1
    ts_ms, last_sec, prefix = START_TS, -1, ""
    lognorm, rand, choice, choices = rnd.lognormvariate, rnd.random, rnd.choice, rnd.choices
    retry_values, retry_weights = (0, 1, 2, 3), (85, 10, 4, 1)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        out: list[str] = []
        for i in range(n):
            agent, objective = choice(agents)
            task_type, target = home[agent] if rand() < 0.8 else choice(types)
            r = rand()
            outcome = (
                "success" if r < objective
                else "failure" if r < objective + (1 - objective) * 0.7
                else "escalated"
            )
            ms = f"{lognorm(math.log(target * 600), 0.8):.3f}"
            retries = choices(retry_values, retry_weights)[0]
            ts_ms += int(rand() * 1200)
            sec = ts_ms // 1000
            if sec != last_sec:
                prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
                last_sec = sec
            out.append(
                f'{{"event":"task_result","ts":"{prefix}.{ts_ms % 1000:03d}Z",'
                f'"agent":"{agent}","task_type":"{task_type}","outcome":"{outcome}",'
                f'"task_id":"tsk_{i:08d}","duration_ms":{ms},"retries":{retries}}}\n'
            )
            key = (agent, task_type)
            exp.results[(agent, task_type, outcome)] += 1
            seconds = float(ms) / 1000
            b = exp.buckets.get(key)
            if b is None:
                b = exp.buckets[key] = [0] * nb
                exp.sums[key] = 0.0
            b[bisect.bisect_left(BUCKETS, seconds)] += 1
            exp.sums[key] += seconds
            if len(out) == 50_000:
                fh.write("".join(out))
                out.clear()
        fh.write("".join(out))
    exp.size = path.stat().st_size
    return exp


def check(samples: Samples, exp: Expected) -> list[str]:
    """Differences between a tool's /metrics and the expected counts (empty when equal)."""
    problems: list[str] = []
    got = {
        (d["agent"], d["task_type"], d["outcome"]): v
        for ls, v in samples.get(RESULTS, {}).items()
        if v and (d := dict(ls))
    }
    want = {k: float(v) for k, v in exp.results.items()}
    if got != want:
        total = sum(got.values())
        problems.append(f"{RESULTS}: {len(got)} series summing to {total:.0f}, "
                        f"expected {len(want)} summing to {exp.lines}")
    bounds = [*BUCKETS, math.inf]
    buckets = samples.get(DURATION + "_bucket", {})
    counts = samples.get(DURATION + "_count", {})
    sums = samples.get(DURATION + "_sum", {})
    for (agent, task_type), per in sorted(exp.buckets.items()):
        base = frozenset({("agent", agent), ("task_type", task_type)})
        acc = 0
        for le, n in zip(bounds, per, strict=True):
            acc += n
            le_s = "+Inf" if le == math.inf else None
            found = [v for ls, v in buckets.items() if base <= ls and any(
                k == "le" and (x == le_s or (le_s is None and x != "+Inf" and float(x) == le))
                for k, x in ls)]
            if found != [float(acc)]:
                problems.append(f"{DURATION}_bucket{{{agent},{task_type},le={le}}}: "
                                f"{found} != {acc}")
                break
        if counts.get(base) != float(sum(per)):
            problems.append(f"{DURATION}_count{{{agent},{task_type}}}: "
                            f"{counts.get(base)} != {sum(per)}")
        got_sum = sums.get(base)
        if got_sum is None or not math.isclose(got_sum, exp.sums[(agent, task_type)],
                                               rel_tol=1e-9):
            problems.append(f"{DURATION}_sum{{{agent},{task_type}}}: "
                            f"{got_sum} != {exp.sums[(agent, task_type)]}")
        if len(problems) > 5:
            break
    return problems


def check_program_buckets() -> None:
    """The mtail program must bucket exactly like the exporter's catalog."""
    for line in MTAIL_PROGRAM.read_text().splitlines():
        if line.startswith("histogram ") and " buckets " in line:
            declared = tuple(float(x) for x in line.split(" buckets ", 1)[1].split(","))
            if declared != tuple(float(b) for b in BUCKETS):
                raise SystemExit(f"{MTAIL_PROGRAM}: buckets {declared} differ from the "
                                 f"catalog's {BUCKETS}")
            return
    raise SystemExit(f"{MTAIL_PROGRAM}: no histogram declaration")


# --- one measurement ---------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    lines: int
    seconds: float
    cpu_seconds: float
    problems: list[str]
    slowest_scrape: float | None = None
    """Longest /metrics response while the backlog was read, in seconds."""

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.lines / self.cpu_seconds if self.cpu_seconds else 0.0


LINE_COUNT_PROGRAM = "counter lines_total\n/$/ {\n  lines_total++\n}\n"
"""mtail's floor: a program that only counts lines (its per-line cost without parsing)."""


def mtail_argv(logs: str, port: int, *extra: str, progs: Path = MTAIL_PROGS) -> list[str]:
    return ["mtail", "-progs", str(progs), "-logs", logs, "-logtostderr",
            "-address", "127.0.0.1", "-port", str(port), *extra]


def mtail_env() -> dict[str, str]:
    return {**os.environ, "GOMAXPROCS": "1"}


def run_mtail_oneshot(path: Path, exp: Expected, work: Path, cpu: int | None,
                      floor: bool = False) -> Run:
    progs = MTAIL_PROGS
    if floor:
        progs = work / "mtail-floor"
        progs.mkdir(exist_ok=True)
        (progs / "lines.mtail").write_text(LINE_COUNT_PROGRAM)
    argv = pinned(mtail_argv(str(path), free_port(), "-one_shot", "-one_shot_format",
                             "prometheus", progs=progs), cpu)
    out_path, err_path = work / "mtail-oneshot.prom", work / "mtail-oneshot.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=mtail_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"mtail -one_shot failed ({proc.returncode}); see {err_path}")
    samples = parse_text(out_path.read_text(), frozenset({"prog"}))
    used = usage.ru_utime + usage.ru_stime
    if floor:
        n = _count(samples, "lines_total")
        problems = [] if n == exp.lines else [f"lines_total {n:.0f} != {exp.lines}"]
        return Run("reference: mtail -one_shot, a program that only counts lines", exp.lines,
                   wall, used, problems)
    return Run("mtail -one_shot", exp.lines, wall, used, check(samples, exp))


def _count(samples: Samples, name: str, labels: frozenset[tuple[str, str]] | None = None
           ) -> float:
    series = samples.get(name, {})
    if labels is not None:
        return series.get(labels, 0.0)
    return sum(series.values())


def _poll_until(url: str, proc: subprocess.Popen[bytes], done: Callable[[Samples], bool],
                timeout: float) -> tuple[float, Samples, float]:
    """Scrape ``url`` every POLL_SECONDS until ``done``. Returns when that scrape came back,
    what it said, and the longest time a scrape took."""
    end = time.perf_counter() + timeout
    slowest = 0.0
    while time.perf_counter() < end:
        time.sleep(POLL_SECONDS)
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        asked = time.perf_counter()
        try:
            body = http_get(url, timeout=timeout)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            continue
        now = time.perf_counter()
        slowest = max(slowest, now - asked)
        samples = parse_text(body.decode(), frozenset({"prog"}))
        if done(samples):
            return now, samples, slowest
    raise SystemExit(f"{url}: not every line counted within {timeout:.0f} s")


def run_mtail_daemon(path: Path, exp: Expected, work: Path, cpu: int | None) -> Run:
    """mtail reads a file it discovers from its end, so the lines are appended to a file it
    already tails; timed from the first appended byte until /metrics counts every line."""
    logdir = work / "mtail-logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    target = logdir / "events.jsonl"
    target.touch()
    port = free_port()
    err_path = work / "mtail-daemon.log"
    argv = pinned(mtail_argv(str(logdir / "*.jsonl"), port, "-poll_interval", "50ms",
                             "-poll_log_interval", "50ms"), cpu)
    with err_path.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=mtail_env())
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_http(url, proc)
        end = time.monotonic() + 30
        while f"Tailing {target}" not in err_path.read_text(errors="replace"):
            if time.monotonic() > end:
                raise SystemExit(f"mtail never tailed {target}; see {err_path}")
            time.sleep(0.05)
        cpu0 = process_cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        with path.open("rb") as src, target.open("ab") as dst:
            shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
        t1, samples, _ = _poll_until(url, proc, lambda s: _count(s, RESULTS) >= exp.lines,
                                     timeout=max(120.0, exp.lines / 5_000))
        used = process_cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
    return Run("mtail daemon, tailing", exp.lines, t1 - t0, used, check(samples, exp))


def exporter_bin() -> str:
    local = ROOT / ".venv" / "bin" / "aicrm-exporter"
    if local.exists():
        return str(local)
    found = shutil.which("aicrm-exporter")
    if found is None:
        raise SystemExit("aicrm-exporter not found: install the project (pip install -e .)")
    return found


def exporter_config(base: dict[str, Any], path: Path, state_dir: Path, port: int
                    ) -> dict[str, Any]:
    """``base`` with one event_logs source on ``path``: no task database, no push."""
    data = {k: v for k, v in base.items() if k not in ("sources", "exporter", "api")}
    data["sources"] = {"event_logs": [{"name": SOURCE, "path": str(path)}],
                       "push": {"enabled": False}}
    data["exporter"] = {"listen": f"127.0.0.1:{port}", "state_dir": str(state_dir)}
    return data


def start_exporter(base: dict[str, Any], path: Path, work: Path, name: str, cpu: int | None
                   ) -> tuple[subprocess.Popen[bytes], str]:
    state = work / f"{name}-state"
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    cfg_path = work / f"{name}-config.json"
    cfg_path.write_text(json.dumps(exporter_config(base, path, state, port), indent=1))
    argv = pinned([exporter_bin(), "--config", str(cfg_path), "--log-level", "WARNING"], cpu)
    with (work / f"{name}.log").open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    return proc, f"http://127.0.0.1:{port}/metrics"


def events_counted(samples: Samples) -> float:
    return _count(samples, c.SOURCE_EVENTS.name, frozenset({("source", SOURCE)}))


def run_exporter(base: dict[str, Any], path: Path, exp: Expected, work: Path,
                 cpu: int | None) -> Run:
    t0 = time.perf_counter()
    proc, url = start_exporter(base, path, work, "exporter", cpu)
    try:
        t1, samples, slowest = _poll_until(url, proc,
                                           lambda s: events_counted(s) >= exp.lines,
                                           timeout=max(120.0, exp.lines / 5_000))
        used = process_cpu_seconds(proc.pid)
    finally:
        stop(proc)
    problems = check(samples, exp)
    if events_counted(samples) != exp.lines:
        problems.append(f"{c.SOURCE_EVENTS.name}: {events_counted(samples)} != {exp.lines}")
    rejected = _count(samples, c.SOURCE_REJECTED.name)
    if rejected:
        problems.append(f"{c.SOURCE_REJECTED.name}: {rejected:.0f} lines rejected")
    return Run("aicrm-exporter process, full job", exp.lines, t1 - t0, used, problems,
               slowest)


def run_in_process(cfg_path: Path, path: Path, exp: Expected, cpu: int | None,
                   profile: bool = False) -> Run:
    cfg = load_config(cfg_path)
    store = MetricStore(cfg)
    tailer = FileTailer([Watch(SOURCE, str(path))], store,
                        max_line_bytes=cfg.exporter.max_line_bytes)
    before = pin_self(cpu)
    prof = cProfile.Profile() if profile else None
    try:
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        n = tailer.poll()
        if prof is not None:
            prof.disable()
        wall, used = time.perf_counter() - t0, time.process_time() - c0
    finally:
        unpin_self(before)
        tailer.close()
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        print(buf.getvalue())
    samples = parse_text(store.render_text().decode())
    problems = check(samples, exp)
    if n != exp.lines:
        problems.append(f"FileTailer.poll consumed {n} lines, expected {exp.lines}")
    return Run("exporter in-process ingest (FileTailer.poll)", exp.lines, wall, used, problems)


# --- /metrics for ~10,000 series -----------------------------------------------------------


def fleet_config(base: dict[str, Any], agents: int, task_types: int) -> dict[str, Any]:
    """A large fleet: ``agents`` x ``task_types``, no models or tools."""
    data = {k: v for k, v in base.items() if k not in ("sources", "exporter", "api")}
    data["agents"] = [{"name": f"agent-{i:03d}", "team": f"team-{i % 8}",
                       "success_objective": 0.9 + (i % 8) / 100} for i in range(agents)]
    data["task_types"] = [{"name": f"task_type_{j:03d}", "target_seconds": 30 * (1 + j % 12),
                           "minutes_saved": 5 + j % 20} for j in range(task_types)]
    data["models"], data["tools"] = [], []
    return data


def percentile(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def timed_ms(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


@dataclass
class Render:
    agents: int
    task_types: int
    series: int
    bytes: int
    events: int
    figures: dict[str, list[float]]
    identical: bool


def measure_render(base: dict[str, Any], work: Path, agents: int, task_types: int,
                   events: int, runs: int, cpu: int | None, seed: int) -> Render:
    from prometheus_client import CollectorRegistry, generate_latest

    data = fleet_config(base, agents, task_types)
    feed = work / "fleet.jsonl"
    generate(feed, data, events, seed)
    cfg_path = work / "fleet-config.json"
    cfg_path.write_text(json.dumps(exporter_config(data, feed, work / "fleet-inproc", 0)))
    cfg = load_config(cfg_path)
    store = MetricStore(cfg)
    tailer = FileTailer([Watch(SOURCE, str(feed))], store)
    tailer.poll()
    tailer.close()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    text = store.render_text()
    series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
    identical = text == generate_latest(registry)

    figures: dict[str, list[float]] = {}
    before = pin_self(cpu)
    try:
        store.render_text()
        figures["MetricStore.render_text()"] = timed_ms(store.render_text, runs)
        figures["prometheus_client.generate_latest()"] = timed_ms(
            lambda: generate_latest(registry), max(5, runs // 5))
    finally:
        unpin_self(before)

    proc, url = start_exporter(data, feed, work, "fleet-exporter", cpu)
    try:
        _poll_until(url, proc, lambda s: events_counted(s) >= events, timeout=120)
        figures["HTTP GET /metrics"] = timed_ms(lambda: http_get(url), runs)
        figures["HTTP GET /metrics, gzip"] = timed_ms(
            lambda: http_get(url, headers={"Accept-Encoding": "gzip"}), runs)
    finally:
        stop(proc)
    return Render(agents, task_types, series, len(text), events, figures, identical)


# --- report --------------------------------------------------------------------------------


def ingest_table(runs: list[Run], mtail_rate: float) -> list[str]:
    rows = ["| tool | lines | seconds | lines/s | vs fastest mtail | CPU s | lines/CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        rows.append(f"| {r.tool} | {r.lines:,} | {r.seconds:.2f} | {r.rate:,.0f} | "
                    f"{r.rate / mtail_rate:.2f}x | {r.cpu_seconds:.2f} | {r.cpu_rate:,.0f} |")
    return rows


def render_table(rd: Render) -> list[str]:
    rows = ["| what | runs | median ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, xs in rd.figures.items():
        rows.append(f"| {name} | {len(xs)} | {statistics.median(xs):.1f} | "
                    f"{percentile(xs, 99):.1f} | {max(xs):.1f} |")
    return rows


def markdown(args: argparse.Namespace, runs: list[Run], rd: Render,
             verdicts: list[str], mach: dict[str, str], mtail_version: str,
             exp: Expected, elapsed: float, loads: list[str]) -> str:
    mtail_rate = max(r.rate for r in runs if r.tool.startswith("mtail"))
    lines = [
        "# Ingest and /metrics benchmark: aicrm-exporter against mtail",
        "",
        "Written by `bench/ingest_vs_mtail.py`; figures are from the run described below.",
        "",
        "## Result",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        f"## Ingest: {exp.lines:,} `task_result` lines ({exp.size / 1e6:.0f} MB), one core each",
        "",
        f"Best of {args.rounds} round{'s' if args.rounds != 1 else ''} for each tool "
        "(other work may share the machine; the best round is the one least disturbed). "
        "Every round's counts were checked against the generator's totals: results by agent, "
        "task type and outcome, every histogram bucket, count and sum.",
        "",
        *busy_note(mach, loads),
        *ingest_table(runs, mtail_rate),
        "",
        "- *mtail -one_shot*: `GOMAXPROCS=1 taskset -c N mtail -one_shot` over the file; wall "
        "time from exec to exit, CPU from the child's rusage. Its best case: no HTTP server "
        "work, no tailing.",
        "- *mtail daemon, tailing*: mtail started on an empty file in a watched directory "
        "(it reads a file it discovers from its end), then the lines appended; time from the "
        "first appended byte until its /metrics (scraped every "
        f"{POLL_SECONDS} s) counts every line. Start-up is not counted; its poll intervals "
        "are set to 50 ms.",
        "- *aicrm-exporter process*: the installed `aicrm-exporter --config <temp config>` "
        "(one event_logs source on the file, no task database, push off, fresh state "
        "directory) under `taskset -c N`; time from spawning the process (Python start-up and "
        "imports included) until a scrape of /metrics, every "
        f"{POLL_SECONDS} s, shows `aicrm_source_events_total{{source=\"{SOURCE}\"}}` equal to "
        "the line count. That scrape also writes the state checkpoint (fsync and rename) "
        "before rendering, so this is the full job: read, decode and validate, map labels, "
        "update counters and histograms, persist, expose.",
        "- *in-process*: `FileTailer.poll()` over the file into a `MetricStore`, this process "
        "pinned to the same core; no HTTP, no checkpoint.",
        "- *reference*: mtail running a program that only counts lines, once: the cost of "
        "mtail's per-line machinery alone, showing that its figures above are not held back "
        "by the benchmark's program. Not used for the ratio.",
        "",
        "Wall-clock lines/s is the target's measure; lines per CPU second is shown beside it "
        "because it is less sensitive to other work on the machine. The generated lines carry "
        "every field of a `task_result` (`ts` in RFC 3339, `task_id`, `duration_ms` with "
        "microsecond precision, `retries`), agents and task types from config.json. mtail "
        "matches them with bench/mtail/task_results.mtail, which relies on the key order the "
        "generator writes; the exporter decodes and validates each line fully "
        "(`ts` parsed, types and ranges checked).",
        "",
    ]
    lines += [
            f"## /metrics for {rd.series:,} series",
        "",
        f"{rd.agents} agents x {rd.task_types} task types, no models or tools, the "
        f"integrations and channels of config.json, {rd.events:,} events fed; "
        f"{rd.series:,} sample lines, {rd.bytes / 1e6:.1f} MB. `render_text()` and "
        f"`generate_latest()` in this process pinned to one core; HTTP against a running "
        "`aicrm-exporter` pinned to one core (a new connection per request, as urllib "
        "makes them; after the first scrape nothing changes, so no checkpoint is "
        "written).",
        f"`render_text()` output is {'byte-identical' if rd.identical else 'NOT identical'}"
        " to `generate_latest()` on the same registry.",
        "",
        *render_table(rd),
        "",
    ]
    lines += [
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, {mach['cores']} cores (each tool pinned to core {args.cpu})",
        f"- RAM: {mach['ram']}",
        f"- OS: {mach['os']}",
        f"- {mach['python']}",
        f"- {mtail_version}",
        f"- Date: {mach['date']}",
        f"- Load average (1, 5, 15 min) before and after: {loads[0]}; {loads[-1]}",
        f"- Whole run: {elapsed:.0f} s",
        "",
        "## Reproduce",
        "",
        "```",
        "sudo apt-get install mtail",
        "cd /path/to/repo && " + " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "bench/ingest_vs_mtail.py",
                                     *args.argv]),
        "```",
        "",
        "`--lines 100000 --rounds 1` is a quick smoke run. The script exits 1 when a target "
        "is missed or a tool's counts differ from the expected ones.",
        "",
    ]
    return "\n".join(lines)


def busy_note(mach: dict[str, str], loads: list[str]) -> list[str]:
    cores = int(mach["cores"] or 1)
    peak = max(float(x.split()[0]) for x in loads)
    if peak < 0.5 * cores:
        return []
    return [f"The machine was busy with other work during this run (1-minute load average up "
            f"to {peak:.2f} on {cores} cores), so every tool's wall-clock figures are "
            "pessimistic; the CPU-second figures are less affected.", ""]


def report(rnd: int, r: Run, by_tool: dict[str, list[Run]]) -> None:
    by_tool.setdefault(r.tool, []).append(r)
    status = "counts ok" if not r.problems else "WRONG: " + "; ".join(r.problems)
    print(f"round {rnd + 1}: {r.tool}: {r.seconds:.2f} s, {r.rate:,.0f} lines/s, "
          f"CPU {r.cpu_seconds:.2f} s, {status}", flush=True)


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=2, help="best round per tool is reported")
    p.add_argument("--cpu", type=int, default=0, help="the core every tool is pinned to")
    p.add_argument("--config", default=str(ROOT / "config.json"),
                   help="agents and task types of the generated lines")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--fleet", default="20x20", help="agents x task types for /metrics")
    p.add_argument("--render-runs", type=int, default=50)
    p.add_argument("--output", default=None, help="write the figures as Markdown here")
    p.add_argument("--profile", action="store_true",
                   help="print a cProfile of the in-process ingest (first round)")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    if shutil.which("mtail") is None:
        print("mtail is not installed (Debian/Ubuntu: apt-get install mtail)", file=sys.stderr)
        return 2
    check_program_buckets()
    cpu = args.cpu if args.cpu in os.sched_getaffinity(0) else None
    base = json.loads(Path(args.config).read_text())
    mach = machine()
    loads = [mach["load"]]
    mtail_version = tool_version(["mtail", "--version"]).split(" git ")[0]
    started = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="aicrm-bench-"))
    try:
        path = work / "events.jsonl"
        t0 = time.perf_counter()
        exp = generate(path, base, args.lines, args.seed)
        print(f"generated {exp.lines:,} lines, {exp.size / 1e6:.0f} MB, in "
              f"{time.perf_counter() - t0:.1f} s ({work})", flush=True)
        inproc_cfg = work / "inproc-config.json"
        inproc_cfg.write_text(json.dumps(exporter_config(base, path, work / "inproc", 0)))

        by_tool: dict[str, list[Run]] = {}
        for rnd in range(args.rounds):
            for run in (
                lambda: run_mtail_oneshot(path, exp, work, cpu),
                lambda: run_mtail_daemon(path, exp, work, cpu),
                lambda: run_exporter(base, path, exp, work, cpu),
                lambda rnd=rnd: run_in_process(inproc_cfg, path, exp, cpu,
                                               args.profile and rnd == 0),
            ):
                report(rnd, run(), by_tool)
        report(0, run_mtail_oneshot(path, exp, work, cpu, floor=True), by_tool)

        agents, _, types = args.fleet.partition("x")
        rd = measure_render(base, work, int(agents), int(types),
                            min(args.lines, 200_000), args.render_runs, cpu, args.seed + 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    loads.append(machine()["load"])
    elapsed = time.perf_counter() - started

    runs = [best(rs) for rs in by_tool.values()]
    wrong = [r for rs in by_tool.values() for r in rs if r.problems]
    mtail_rate = max(r.rate for r in runs if r.tool.startswith("mtail"))
    mtail_cpu_rate = max(r.cpu_rate for r in runs if r.tool.startswith("mtail"))
    exporter = next(r for r in runs if r.tool.startswith("aicrm-exporter"))
    ratio = exporter.rate / mtail_rate
    http_median = statistics.median(rd.figures["HTTP GET /metrics"])
    render_p99 = percentile(rd.figures["MetricStore.render_text()"], 99)
    ok_ingest = ratio >= INGEST_RATIO_TARGET
    ok_render = http_median < RENDER_TARGET_MS and render_p99 < RENDER_TARGET_MS
    verdicts = [
        f"Ingest, full job on one core: {exporter.rate:,.0f} lines/s against mtail's "
        f"{mtail_rate:,.0f} (its faster mode): **{ratio:.2f}x** "
        f"(target {INGEST_RATIO_TARGET:g}x: {'met' if ok_ingest else 'MISSED'}); "
        f"per CPU second {exporter.cpu_rate:,.0f} against {mtail_cpu_rate:,.0f}: "
        f"{exporter.cpu_rate / mtail_cpu_rate:.2f}x.",
        f"/metrics for {rd.series:,} series: HTTP GET median {http_median:.1f} ms, "
        f"`render_text()` p99 {render_p99:.1f} ms "
        f"(target < {RENDER_TARGET_MS:g} ms: {'met' if ok_render else 'MISSED'}).",
        "Counts: " + ("every tool's totals equal the expected ones in every round."
                      if not wrong else f"WRONG in {len(wrong)} runs (see the log)."),
    ]
    if exporter.slowest_scrape is not None:
        verdicts.append(
            f"While the exporter read the {exp.lines:,}-line backlog, its slowest /metrics "
            f"response took {exporter.slowest_scrape:.2f} s (a scrape waits for the "
            "backlog pass in progress).")

    print()
    print("\n".join(ingest_table(runs, mtail_rate)))
    print()
    print(f"/metrics, {rd.series:,} series ({rd.agents}x{rd.task_types} fleet, "
          f"{rd.bytes / 1e6:.1f} MB), render_text identical to generate_latest: {rd.identical}")
    print("\n".join(render_table(rd)))
    print()
    print("\n".join(verdicts))
    if args.output:
        Path(args.output).write_text(markdown(args, runs, rd, verdicts, mach, mtail_version,
                                              exp, elapsed, loads))
        print(f"wrote {args.output}")
    return 0 if ok_ingest and ok_render and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
