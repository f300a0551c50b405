"""Task database reader vs prometheus-sql-exporter on one PostgreSQL table of 1M, then 5M tasks.

The peer (Debian's prometheus-sql-exporter) re-runs its aggregate queries on every refresh, so
each refresh costs a scan of the table; its /metrics answers from a cache. Our reader does one
aggregate read at start, then polls that cost in proportion to the rows that changed. Measured:

- peer refresh: server-side time of one cycle of the peer's queries (PostgreSQL statement
  durations of the peer's role, from the server log);
- peer /metrics: the HTTP scrape of the peer (served from its cache);
- ours: the start-up read, then steady-state polls while N tasks per poll are created, started
  and finished (wall clock in this process, every query and the Python work included), and
  rendering /metrics from the store.

Run: .venv/bin/python bench/taskdb_vs_sql_exporter.py [--sizes 1000000,5000000] [--polls 20]
Needs the Debian packages postgresql-15 and prometheus-sql-exporter; everything runs on
loopback in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from exporter import catalog  # noqa: E402
from exporter.config import TaskDbSource, parse_config  # noqa: E402
from exporter.metrics import MetricStore  # noqa: E402
from exporter.sources.taskdb import TaskDbReader  # noqa: E402
from exporter.tasks_schema import create_tasks_table  # noqa: E402
from tests import servers  # noqa: E402

TYPES = ("qualify_lead", "write_email", "book_meeting", "enrich_record", "triage_ticket")
AGENTS = ("lead-qualifier", "email-writer", "meeting-booker", "record-enricher",
          "support-triager", "legacy-bot")
OPEN_ROWS = 5000
POLL_SECONDS = 5.0
PEER_ROLE = "sqlexp"


def _sql_array(values: tuple[Any, ...]) -> str:
    return "ARRAY[" + ",".join(f"'{v}'" if isinstance(v, str) else repr(float(v))
                               for v in values) + "]"


def history_sql(first: int, last: int) -> str:
    """Finished tasks h<first>..h<last>, one every 0.5 s going back from :end."""
    return f"""
    INSERT INTO tasks (id, task_type, agent, status, created_at, started_at, finished_at)
    SELECT 'h' || g,
      ({_sql_array(TYPES)})[1 + g % 5],
      CASE WHEN g % 50 = 0 THEN NULL ELSE ({_sql_array(AGENTS)})[1 + (g / 7) % 6] END,
      CASE WHEN g % 50 = 0 THEN 'cancelled' WHEN g % 13 = 0 THEN 'failed' ELSE 'completed' END,
      f - make_interval(secs => w + d),
      CASE WHEN g % 50 = 0 THEN NULL ELSE f - make_interval(secs => d) END,
      f
    FROM (SELECT g, CAST(:end AS timestamp) - make_interval(secs => g * 0.5) AS f,
                 ((g * 104729) % 2400) / 4.0 + 0.25 AS d, (g * 7919) % 1800 + 1 AS w
          FROM generate_series(CAST({first} AS bigint), {last}) AS g) AS s
    """


OPEN_SQL = f"""
    INSERT INTO tasks (id, task_type, agent, status, created_at, started_at)
    SELECT 'o' || g, ({_sql_array(TYPES)})[1 + g % 5],
      CASE WHEN g % 2 = 1 THEN ({_sql_array(AGENTS)})[1 + g % 6] END,
      CASE WHEN g % 2 = 1 THEN 'running' ELSE 'queued' END,
      CAST(:end AS timestamp) - make_interval(secs => g),
      CASE WHEN g % 2 = 1 THEN CAST(:end AS timestamp) - make_interval(secs => g / 2.0) END
    FROM generate_series(1, {OPEN_ROWS}) AS g
"""


def peer_queries() -> list[dict[str, Any]]:
    """The peer's equivalent of our task families, written as fast as the peer allows."""
    dur = "extract(epoch FROM finished_at - started_at)"
    wait = "extract(epoch FROM started_at - created_at)"
    terminal = "status IN ('completed', 'failed', 'cancelled') AND finished_at IS NOT NULL"
    d_bounds = "ARRAY[" + ",".join(str(b) for b in catalog.TASK_DURATION.buckets) + "]::float8[]"
    w_bounds = "ARRAY[" + ",".join(str(b) for b in catalog.TASK_WAIT.buckets) + "]::float8[]"
    return [
        {"name": "tasks_total", "help": "Terminal tasks",
         "labels": ["task_type", "agent", "status"], "values": ["count"], "query": f"""
            SELECT task_type::text, coalesce(agent, 'unassigned')::text AS agent, status::text,
                   count(*)::float AS count
            FROM tasks WHERE {terminal} GROUP BY 1, 2, 3"""},
        {"name": "task_duration_seconds", "help": "Duration buckets",
         "labels": ["task_type", "agent", "bucket"], "values": ["count", "sum"], "query": f"""
            SELECT task_type::text, coalesce(agent, 'unassigned')::text AS agent,
                   width_bucket({dur}, {d_bounds})::text AS bucket,
                   count(*)::float AS count, sum({dur})::float AS sum
            FROM tasks WHERE {terminal} AND started_at IS NOT NULL GROUP BY 1, 2, 3"""},
        {"name": "task_wait_seconds", "help": "Wait buckets", "labels": ["task_type", "bucket"],
         "values": ["count", "sum"], "query": f"""
            SELECT task_type::text, width_bucket({wait}, {w_bounds})::text AS bucket,
                   count(*)::float AS count, sum({wait})::float AS sum
            FROM tasks WHERE {terminal} AND started_at IS NOT NULL GROUP BY 1, 2"""},
        {"name": "tasks_open", "help": "Open tasks", "labels": ["task_type", "status"],
         "values": ["count", "oldest"], "query": """
            SELECT task_type::text, status::text, count(*)::float AS count,
                   extract(epoch FROM now() - min(created_at))::float AS oldest
            FROM tasks WHERE status IN ('queued', 'running') GROUP BY 1, 2"""},
    ]


class Bench:
    def __init__(self, workdir: Path, polls: int) -> None:
        self.workdir = workdir
        self.polls = polls
        self.server = servers.start_postgres(workdir)
        self.url = self.server.create_database("bench")
        self.engine: Engine = create_engine(self.url)
        self.end = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=1)
        self.fake_now = time.time()
        self.batches: list[list[str]] = []
        self.seq = 0
        with open(ROOT / "config.json") as f:
            raw = json.load(f)
        self.cfg = parse_config({"agents": raw["agents"], "task_types": raw["task_types"]})
        with self.server.connect("bench") as conn:
            conn.execute(f"CREATE ROLE {PEER_ROLE} LOGIN")
            conn.execute(f"ALTER ROLE {PEER_ROLE} SET log_min_duration_statement = 0")

    def close(self) -> None:
        self.engine.dispose()
        self.server.stop()

    # --- data -----------------------------------------------------------------------------

    def load(self, first: int, last: int, with_open: bool) -> float:
        started = time.monotonic()
        with self.engine.begin() as conn:
            if first == 1:
                create_tasks_table(self.engine)
            conn.execute(text("DROP INDEX IF EXISTS ix_tasks_finished_at"))
            conn.execute(text("DROP INDEX IF EXISTS ix_tasks_status"))
            conn.execute(text(history_sql(first, last)), {"end": self.end})
            if with_open:
                conn.execute(text(OPEN_SQL), {"end": self.end})
            conn.execute(text("CREATE INDEX ix_tasks_finished_at ON tasks (finished_at)"))
            conn.execute(text("CREATE INDEX ix_tasks_status ON tasks (status)"))
            conn.execute(text(f"GRANT SELECT ON tasks TO {PEER_ROLE}"))
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE tasks"))
        return time.monotonic() - started

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM tasks")).scalar_one())

    def step(self, n: int) -> None:
        """One poll period of work: n tasks created, n started, n finished."""
        now = datetime.fromtimestamp(self.fake_now, UTC).replace(tzinfo=None)
        ids = [f"n{self.seq + i}" for i in range(n)]
        self.seq += n
        with self.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO tasks (id, task_type, status, created_at) "
                "SELECT id, (CAST(:types AS text[]))[1 + (hashtext(id) & 1023) % 5], "
                "'queued', :now "
                "FROM unnest(CAST(:ids AS text[])) AS id"),
                {"ids": ids, "now": now, "types": list(TYPES)})
            if len(self.batches) >= 1:
                conn.execute(text(
                    "UPDATE tasks SET status = 'running', started_at = :now, "
                    "agent = (CAST(:agents AS text[]))[1 + (hashtext(id) & 1023) % 6] "
                    "WHERE id = ANY(CAST(:ids AS text[]))"),
                    {"ids": self.batches[-1], "now": now, "agents": list(AGENTS)})
            if len(self.batches) >= 2:
                conn.execute(text(
                    "UPDATE tasks SET status = CASE WHEN hashtext(id) % 17 = 0 THEN 'failed' "
                    "ELSE 'completed' END, finished_at = :now "
                    "WHERE id = ANY(CAST(:ids AS text[]))"),
                    {"ids": self.batches[-2], "now": now})
        self.batches.append(ids)

    # --- the peer -------------------------------------------------------------------------

    def peer(self, cycles: int) -> dict[str, float]:
        port = servers.free_port()
        config = {"jobs": [{
            "name": "tasks", "interval": "1s",
            "connections": [f"postgres://{PEER_ROLE}@127.0.0.1:{self.server.port}/bench"
                            "?sslmode=disable"],
            "queries": peer_queries(),
        }]}
        cfg_path = self.workdir / "sql_exporter.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = self.server.log_path
        offset = log_path.stat().st_size
        n_queries = len(config["jobs"][0]["queries"])
        handle = servers.ProcessHandle("sql-exporter", self.workdir).start(
            ["prometheus-sql-exporter", f"-config.file={cfg_path}",
             f"-web.listen-address=127.0.0.1:{port}"],
            ready_check=servers.http_ok(f"http://127.0.0.1:{port}/metrics"),
        )
        try:
            durations: list[float] = []
            deadline = time.monotonic() + 600
            while len(durations) < cycles * n_queries and time.monotonic() < deadline:
                time.sleep(0.5)
                with open(log_path, "rb") as f:
                    f.seek(offset)
                    tail = f.read().decode(errors="replace")
                durations = [float(m) for m in re.findall(r"duration: ([0-9.]+) ms", tail)]
            if len(durations) < cycles * n_queries:
                raise RuntimeError(f"peer ran {len(durations)} queries; log {log_path}")
            per_cycle = [sum(durations[i:i + n_queries]) / 1000
                         for i in range(0, cycles * n_queries, n_queries)]
            url = f"http://127.0.0.1:{port}/metrics"
            body = requests.get(url, timeout=30).text
            if "sql_tasks_total" not in body:
                raise RuntimeError("the peer exported no sql_tasks_total")
            scrapes = []
            for _ in range(20):
                started = time.perf_counter()
                with requests.get(url, timeout=30) as response:
                    response.raise_for_status()
                scrapes.append(time.perf_counter() - started)
        finally:
            handle.stop()
        return {"refresh_s": statistics.median(per_cycle), "refresh_max_s": max(per_cycle),
                "scrape_s": statistics.median(scrapes), "series": float(body.count("\nsql_"))}

    # --- ours -----------------------------------------------------------------------------

    def ours(self, per_poll: tuple[int, ...]) -> dict[str, float]:
        store = MetricStore(self.cfg)
        registry = CollectorRegistry()
        registry.register(store)
        settings = TaskDbSource(url=self.url, poll_seconds=POLL_SECONDS, timeout_seconds=60)
        out: dict[str, float] = {}
        reader = TaskDbReader(settings, store.labels, store, clock=lambda: self.fake_now)
        try:
            started = time.perf_counter()
            reader.poll_once()
            out["initial_s"] = time.perf_counter() - started
            assert store._source_up.get("task_db") == 1.0, "initial read failed"
            for n in per_poll:
                times = []
                for _ in range(self.polls):
                    self.step(n)
                    self.fake_now += POLL_SECONDS
                    started = time.perf_counter()
                    reader.poll_once()
                    times.append(time.perf_counter() - started)
                steady = times[len(times) // 2:]  # after the lookback window filled up
                out[f"poll_{n}_s"] = statistics.median(steady)
                out[f"poll_{n}_max_s"] = max(steady)
            renders = []
            for _ in range(20):
                started = time.perf_counter()
                generate_latest(registry)
                renders.append(time.perf_counter() - started)
            out["render_s"] = statistics.median(renders)
            assert store._source_up.get("task_db") == 1.0, "a poll failed"
        finally:
            reader.close()
        return out

    def explain(self) -> list[str]:
        """Plans of the steady-state statements, as the reader compiles them."""
        from exporter.sources.taskdb import _Queries

        q = _Queries(TaskDbSource(url=self.url), "postgresql")
        mark = datetime.fromtimestamp(self.fake_now, UTC).replace(tzinfo=None)
        floor = mark - timedelta(seconds=120)
        stmts = {"window count": q.window_count(floor, mark), "new rows": q.rows_above(mark),
                 "open gauges": q.open, "unfinished bad rows": q.unfinished_bad}
        lines = []
        with self.engine.connect() as conn:
            for name, stmt in stmts.items():
                compiled = stmt.compile(dialect=self.engine.dialect,
                                        compile_kwargs={"render_postcompile": True})
                plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) "
                                            + str(compiled), compiled.params).scalars().all()
                lines.append(f"-- {name}")
                lines.extend(str(p) for p in plan)
        return lines


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    pg = subprocess.run([str(servers.PG_BIN / "postgres"), "--version"], capture_output=True,
                        text=True).stdout.strip()
    peer = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "prometheus-sql-exporter"],
                          capture_output=True, text=True).stdout.strip()
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": str(os.cpu_count()),
            "cpu": cpu, "python": platform.python_version(), "postgres": pg,
            "prometheus-sql-exporter": peer}


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-taskdb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,5000000")
    ap.add_argument("--polls", type=int, default=20, help="steady-state polls per rate")
    ap.add_argument("--per-poll", default="100,1000", help="tasks finished per poll")
    ap.add_argument("--peer-cycles", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    per_poll = tuple(int(n) for n in args.per_poll.split(","))
    say: Callable[..., None] = lambda *a: print(*a, flush=True)  # noqa: E731
    info = machine()
    say("machine:", json.dumps(info))
    results = []
    with workdir() as wd:
        bench = Bench(wd, args.polls)
        try:
            loaded = 0
            plans: list[str] = []
            for size in sizes:
                took = bench.load(loaded + 1, size - OPEN_ROWS if loaded == 0 else size,
                                  with_open=loaded == 0)
                loaded = size
                rows = bench.count()
                say(f"\n{rows:,} rows loaded in {took:.1f}s")
                peer = bench.peer(args.peer_cycles)
                say("peer:", json.dumps(peer))
                ours = bench.ours(per_poll)
                say("ours:", json.dumps(ours))
                results.append((rows, peer, ours))
                plans = bench.explain()
            say("\nquery plans at the largest size:")
            say("\n".join(plans))
        finally:
            bench.close()

    head = ["rows", "peer refresh (DB time)", "peer /metrics", "our start-up read"]
    head += [f"our poll, {n}/poll" for n in per_poll]
    head += ["our /metrics"] + [f"peer refresh ÷ our poll ({n}/poll)" for n in per_poll]
    say("\n| " + " | ".join(head) + " |")
    say("|" + "---|" * len(head))
    for rows, peer, ours in results:
        cells = [f"{rows:,}", fmt(peer["refresh_s"]), fmt(peer["scrape_s"]), fmt(ours["initial_s"])]
        cells += [fmt(ours[f"poll_{n}_s"]) for n in per_poll]
        cells += [fmt(ours["render_s"])]
        cells += [f"{peer['refresh_s'] / ours[f'poll_{n}_s']:.0f}x" for n in per_poll]
        say("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
