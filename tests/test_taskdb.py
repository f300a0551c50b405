"""The task database source against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Table, bindparam, create_engine, text
from sqlalchemy.engine import Engine

from exporter import catalog
from exporter.config import Config, TaskDbSource, parse_config
from exporter.events import TaskDbSnapshot
from exporter.labels import LabelSets
from exporter.sources.taskdb import SOURCE, UNASSIGNED, TaskDbReader
from exporter.tasks_schema import create_tasks_table
from tests import servers

NOW = datetime(2024, 6, 1, 12, 0, 0)
"""Naive UTC, as the table stores it; the readers' clock is pinned here."""
DURATION_BOUNDS = catalog.TASK_DURATION.buckets
WAIT_BOUNDS = catalog.TASK_WAIT.buckets


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def bucket(bounds: tuple[float, ...], value: float) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


class FakeSink:
    """Records what the reader delivers."""

    def __init__(self) -> None:
        self.snapshots: list[TaskDbSnapshot] = []
        self.status: list[bool] = []
        self.rejected: Counter[str] = Counter()
        self.overflowed: Counter[str] = Counter()
        self.accepted_rows = 0
        self.newest: float | None = None
        self.saved: Any = None
        """The position handed back to a new reader (a previous run's, to resume from)."""
        self.position: Any = None
        self.resumed: bool | None = None
        self.saved_tasks: Any = None
        """The task families handed back to a new reader (saved with ``saved``)."""

    @property
    def snap(self) -> TaskDbSnapshot:
        return self.snapshots[-1]

    def task_snapshot(self, snap: TaskDbSnapshot) -> None:
        self.snapshots.append(snap)

    def source_status(self, source: str, up: bool) -> None:
        assert source == SOURCE
        self.status.append(up)

    def source_position(self, source: str) -> Any:
        assert source == SOURCE
        return self.saved

    def saved_task_families(self) -> Any:
        return self.saved_tasks

    def saved_state(self) -> tuple[Any, Any]:
        """(position, task families) as a state file would hold them after the last poll."""
        from exporter.metrics import _dump_tasks

        return self.position, json.loads(json.dumps(_dump_tasks(self.snap)))

    def source_totals(self, source: str, events: int, rejected: Mapping[str, int],
                      overflow: Mapping[str, int], newest_ts: float | None, *,
                      position: Any = None, resumed: bool = False,
                      tasks: TaskDbSnapshot | None = None) -> None:
        if tasks is not None:
            self.task_snapshot(tasks)
        assert source == SOURCE and set(rejected) <= set(catalog.REJECT_REASONS)
        assert resumed == (self.saved is not None)
        self.position, self.resumed = position, resumed
        assert events >= self.accepted_rows  # totals since the reader started
        self.rejected = Counter({r: n for r, n in rejected.items() if n})
        self.overflowed = Counter({label: n for label, n in overflow.items() if n})
        self.accepted_rows = events
        if newest_ts is not None:
            self.newest = newest_ts


class Db:
    """The tasks table of one test database, written the way an application would."""

    def __init__(self, url: str, table: str = "tasks", columns: dict[str, str] | None = None,
                 create: bool = True) -> None:
        self.url = url
        self.settings = TaskDbSource(url=url, table=table, columns=columns or {},
                                     poll_seconds=0.05, timeout_seconds=2)
        self.engine: Engine = create_engine(url)
        self.table: Table | None = None
        if create:
            self.create()

    def create(self) -> None:
        self.table = create_tasks_table(self.engine, self.settings.table, self.settings.columns)

    def insert(self, *rows: dict[str, Any]) -> None:
        assert self.table is not None
        full = [{"agent": None, "started_at": None, "finished_at": None, "created_at": ago(600),
                 **r} for r in rows]
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), full)

    def update(self, id_: str, **values: Any) -> None:
        assert self.table is not None
        with self.engine.begin() as conn:
            conn.execute(self.table.update().where(self.table.c.id == id_).values(**values))

    def close(self) -> None:
        self.engine.dispose()


AUTO = -1.0


def done(id_: str, status: str = "completed", *, task_type: str = "qualify_lead",
         agent: str | None = "lead-qualifier", created: float = AUTO,
         started: float | None = AUTO, finished: float = 400) -> dict[str, Any]:
    """A terminal row; times are seconds before NOW (by default it waited 100 s, ran 100 s)."""
    created = finished + 200 if created == AUTO else created
    started = finished + 100 if started == AUTO else started
    return {"id": id_, "task_type": task_type, "agent": agent, "status": status,
            "created_at": ago(created), "started_at": None if started is None else ago(started),
            "finished_at": ago(finished)}


def open_row(id_: str, status: str = "queued", *, task_type: str = "qualify_lead",
             created: float = 300, started: float | None = None) -> dict[str, Any]:
    return {"id": id_, "task_type": task_type, "status": status, "created_at": ago(created),
            "agent": None if started is None else "lead-qualifier",
            "started_at": None if started is None else ago(started)}


CONFIG: dict[str, Any] = {
    "agents": [{"name": "lead-qualifier"}, {"name": "email-writer"}],
    "task_types": [{"name": "qualify_lead"}, {"name": "write_email"}],
}


@pytest.fixture
def cfg() -> Config:
    return parse_config(CONFIG)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db(url: str) -> Iterator[Db]:
    d = Db(url)
    yield d
    d.close()


class Clock:
    def __init__(self) -> None:
        self.now = NOW.replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def reader(db: Db, cfg: Config, sink: Any, clock: Clock, **settings: Any) -> TaskDbReader:
    s = db.settings.model_copy(update=settings)
    return TaskDbReader(s, LabelSets.from_config(cfg), sink, clock=clock)


def total(snap: TaskDbSnapshot, task_type: str = "qualify_lead", agent: str = "lead-qualifier",
          status: str = "completed") -> int:
    return snap.totals.get((task_type, agent, status), 0)


def counted(snap: TaskDbSnapshot) -> int:
    return sum(snap.totals.values())


# --- tests ------------------------------------------------------------------------------------


def test_initial_aggregate(db: Db, cfg: Config, clock: Clock) -> None:
    db.insert(
        done("c1", created=600, started=590, finished=560),  # wait 10, duration 30
        done("c2", created=300, started=200, finished=199.5),  # wait 100, duration 0.5
        done("f1", "failed", agent="email-writer", task_type="write_email", finished=100),
        done("x1", "cancelled", agent=None, started=None, finished=50),
        open_row("q1", created=900), open_row("q2", created=60),
        open_row("r1", "running", task_type="write_email", created=120, started=100),
    )
    sink = FakeSink()
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
    snap = sink.snap
    assert sink.status == [True]
    assert total(snap) == 2
    assert total(snap, "write_email", "email-writer", "failed") == 1
    assert total(snap, "qualify_lead", UNASSIGNED, "cancelled") == 1
    assert total(snap, "write_email", "other", "cancelled") == 0  # declared combinations exist
    assert counted(snap) == 4 and sink.accepted_rows == 4
    assert sink.newest == ago(50).replace(tzinfo=UTC).timestamp()

    h = snap.duration[("qualify_lead", "lead-qualifier")]
    assert h.count == 2 and h.sum == pytest.approx(30.5)
    assert len(h.buckets) == len(DURATION_BOUNDS) + 1
    assert h.buckets[bucket(DURATION_BOUNDS, 30)] == 1
    assert h.buckets[bucket(DURATION_BOUNDS, 0.5)] == 1  # le="0.5" includes 0.5
    w = snap.wait["qualify_lead"]
    assert w.count == 2 and w.sum == pytest.approx(110)
    assert w.buckets[bucket(WAIT_BOUNDS, 10)] == 1 and w.buckets[bucket(WAIT_BOUNDS, 100)] == 1
    assert ("qualify_lead", UNASSIGNED) not in snap.duration  # never started: no duration

    assert snap.open[("qualify_lead", "queued")] == 2
    assert snap.open[("write_email", "running")] == 1
    assert snap.open[("other", "running")] == 0
    assert snap.oldest_open_age == {"qualify_lead": 900, "write_email": 120, "other": 0}
    assert not sink.rejected and not sink.overflowed


def test_incremental_open_to_counter_exactly_once(db: Db, cfg: Config, clock: Clock) -> None:
    sink = FakeSink()
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
        assert counted(sink.snap) == 0
        db.insert(open_row("t1", created=30))
        r.poll_once()
        assert sink.snap.open[("qualify_lead", "queued")] == 1
        db.update("t1", status="running", agent="lead-qualifier", started_at=ago(20))
        r.poll_once()
        assert sink.snap.open[("qualify_lead", "queued")] == 0
        assert sink.snap.open[("qualify_lead", "running")] == 1
        assert counted(sink.snap) == 0
        db.update("t1", status="completed", finished_at=ago(5))
        for _ in range(3):
            clock.now += 1
            r.poll_once()
            assert sink.snap.open[("qualify_lead", "running")] == 0
            assert total(sink.snap) == 1
        assert sink.snap.duration[("qualify_lead", "lead-qualifier")].count == 1
        assert sink.snap.wait["qualify_lead"].sum == pytest.approx(10)
        assert sink.accepted_rows == 1


def test_late_commit_counted_once(db: Db, cfg: Config, clock: Clock) -> None:
    sink = FakeSink()
    db.insert(done("old", finished=3600))
    with reader(db, cfg, sink, clock, lookback_seconds=120) as r:
        r.poll_once()
        db.insert(done("a", finished=10))
        r.poll_once()
        assert total(sink.snap) == 2
        # Finished before the newest row already read, committed after it was read.
        db.insert(done("late", finished=40), done("same-ts", finished=10))
        r.poll_once()
        assert total(sink.snap) == 4
        for _ in range(3):
            r.poll_once()
        assert total(sink.snap) == 4
        assert sink.accepted_rows == 4


def test_window_reread_does_not_double_count(db: Db, cfg: Config, clock: Clock) -> None:
    sink = FakeSink()
    db.insert(done("a", finished=30), done("b", finished=20))
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
        # A row still open but with finished_at set keeps the window re-read every poll.
        db.insert({**done("p", finished=15), "status": "running"})
        db.update("a", agent="email-writer")  # a counted row changes: not counted again
        for _ in range(3):
            r.poll_once()
        assert total(sink.snap) == 2 and counted(sink.snap) == 2
        db.update("p", status="failed")
        r.poll_once()
        r.poll_once()
        assert total(sink.snap, status="failed") == 1 and counted(sink.snap) == 3
        assert sink.snap.open[("qualify_lead", "running")] == 0


def test_a_row_leaving_the_window_does_not_hide_one_entering_it(
        db: Db, cfg: Config, clock: Clock) -> None:
    """In one poll interval a row leaves the window (reopened, deleted) and another enters it
    at or below the mark (a late commit, a tie at the mark): the window holds as many rows as
    before, yet not the same ones. The entering row is counted once, by this run and by a
    restart alike."""
    sink = FakeSink()
    db.insert(done("x", finished=30), done("m", finished=10))  # m sets the mark
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
        assert counted(sink.snap) == 2
        db.update("x", status="running", finished_at=None)  # reopened
        db.insert(done("y", finished=20))  # committed late, below the mark
        clock.now += 1
        r.poll_once()
        assert counted(sink.snap) == 3 and sink.accepted_rows == 3
        for _ in range(2):
            clock.now += 1
            r.poll_once()
        assert counted(sink.snap) == 3 and sink.accepted_rows == 3

        # A row of the window deleted, and one finishing at the mark's instant (a tie).
        delete(db, "m")
        db.insert(done("tie", finished=10))
        clock.now += 1
        r.poll_once()
        assert counted(sink.snap) == 4 and sink.accepted_rows == 4

        # The reopened row finishes again: it did finish twice.
        db.update("x", status="completed", finished_at=ago(-5))
        clock.now += 10
        r.poll_once()
        assert counted(sink.snap) == 5 and sink.accepted_rows == 5
    served = counted(sink.snap)

    again = FakeSink()
    again.saved, again.saved_tasks = sink.saved_state()
    with reader(db, cfg, again, clock) as r:
        r.poll_once()
        r.poll_once()
    assert counted(again.snap) == served and again.accepted_rows == 0


def test_restart_gives_same_values(db: Db, cfg: Config, clock: Clock) -> None:
    db.insert(done("a", finished=5000), done("b", "failed", finished=3000),
              done("c", agent="ghost", task_type="ghost-type", finished=100),
              done("bad", started=700, finished=100), open_row("q"))
    first = FakeSink()
    with reader(db, cfg, first, clock) as r:
        r.poll_once()
        db.insert(done("d", finished=50), done("e", "cancelled", agent=None, started=None,
                                                finished=40))
        db.update("q", status="running", agent="lead-qualifier", started_at=ago(30))
        r.poll_once()
        db.insert(done("late", finished=60))
        r.poll_once()
    second = FakeSink()
    with reader(db, cfg, second, clock) as r:
        r.poll_once()
    a, b = first.snap, second.snap
    assert a.totals == b.totals and counted(a) == 6
    assert a.open == b.open and a.oldest_open_age == b.oldest_open_age
    for got, want in ((a.duration, b.duration), (a.wait, b.wait)):
        assert got.keys() == want.keys()
        for k in got:
            assert got[k].buckets == want[k].buckets and got[k].count == want[k].count
            assert got[k].sum == pytest.approx(want[k].sum)
    assert first.rejected == second.rejected == {"bad_timestamps": 1}
    assert first.overflowed == second.overflowed == {"agent": 1, "task_type": 1}
    assert first.accepted_rows == second.accepted_rows == 6


def test_table_and_column_mapping(url: str, cfg: Config, clock: Clock) -> None:
    columns = {"id": "task_uuid", "task_type": "kind", "agent": "worker", "status": "state",
               "created_at": "enqueued", "started_at": "begun", "finished_at": "ended",
               "workflow": None}
    d = Db(url, table="agent_jobs", columns=columns)
    try:
        d.insert(done("a"), done("b", "failed", finished=20), open_row("q"))
        with d.engine.connect() as conn:
            names = set(conn.execute(text("SELECT * FROM agent_jobs")).keys())
        assert {"task_uuid", "kind", "worker", "state", "enqueued", "begun", "ended"} == names
        sink = FakeSink()
        with reader(d, cfg, sink, clock) as r:
            r.poll_once()
            d.insert(done("c", finished=10))
            r.poll_once()
        assert total(sink.snap) == 2 and total(sink.snap, status="failed") == 1
        assert sink.snap.open[("qualify_lead", "queued")] == 1
    finally:
        d.close()


def test_bad_rows_rejected_by_reason_once(db: Db, cfg: Config, clock: Clock) -> None:
    db.insert(
        done("unknown-finished", "exploded", finished=300),
        {**open_row("unknown-open"), "status": "paused"},
        done("finished-before-start", started=100, finished=200),
        done("started-before-created", created=100, started=200, finished=50),
        done("completed-never-started", started=None, finished=100),
        {**done("terminal-no-finish"), "finished_at": None},
        done("good"),
    )
    sink = FakeSink()
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
        assert sink.rejected == {"unknown_status": 2, "bad_timestamps": 2, "missing_field": 2}
        db.insert(done("late-bad", started=10, finished=20), {**open_row("odd"), "status": "x"})
        for _ in range(3):
            r.poll_once()
        assert sink.rejected == {"unknown_status": 3, "bad_timestamps": 3, "missing_field": 2}
    assert counted(sink.snap) == 1
    assert sum(sink.snap.open.values()) == 0


def test_undeclared_labels_become_other_and_count_once(db: Db, cfg: Config,
                                                       clock: Clock) -> None:
    db.insert(done("a", agent="mystery", finished=50), open_row("q", task_type="mystery-type"))
    sink = FakeSink()
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
        db.insert(done("b", agent="mystery", task_type="mystery-type", finished=10))
        r.poll_once()
        r.poll_once()
    assert total(sink.snap, agent="other") == 1
    assert total(sink.snap, "other", "other") == 1
    assert sink.snap.open[("other", "queued")] == 1
    assert sink.overflowed == {"agent": 2, "task_type": 1}


def test_table_missing_then_created(url: str, cfg: Config, clock: Clock,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.taskdb")
    d = Db(url, create=False)
    try:
        sink = FakeSink()
        with reader(d, cfg, sink, clock) as r:
            r.poll_once()
            r.poll_once()
            assert sink.status == [False, False] and not sink.snapshots
            assert sum("unavailable" in m for m in caplog.messages) == 1
            d.create()
            d.insert(done("a"))
            r.poll_once()
        assert sink.status[-1] is True and total(sink.snap) == 1
        assert any("reachable again" in m for m in caplog.messages)
    finally:
        d.close()


def test_run_stops_promptly_and_leaves_no_connection(db: Db, cfg: Config, clock: Clock) -> None:
    db.insert(done("a"))
    sink = FakeSink()
    r = reader(db, cfg, sink, clock)
    stop = threading.Event()
    before = threading.active_count()
    t = threading.Thread(target=r.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 10
    while len(sink.snapshots) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(5)
    assert not t.is_alive() and threading.active_count() == before
    assert total(sink.snap) == 1
    assert r._engine.pool.checkedout() == 0


def test_through_the_metric_store(db: Db, cfg: Config, clock: Clock) -> None:
    from exporter.metrics import MetricStore

    store = MetricStore(cfg, clock=clock)
    registry = CollectorRegistry()
    registry.register(store)
    store.add_source(SOURCE)
    db.insert(done("a", created=600, started=590, finished=560), done("b", "failed"),
              open_row("q"), done("bad", started=10, finished=20))
    with TaskDbReader(db.settings, store.labels, store, clock=clock) as r:
        r.poll_once()
    get = registry.get_sample_value
    labels = {"task_type": "qualify_lead", "agent": "lead-qualifier"}
    assert get("aicrm_tasks_total", {**labels, "status": "completed"}) == 1
    assert get("aicrm_tasks_total", {**labels, "status": "failed"}) == 1
    assert get("aicrm_tasks_total", {**labels, "status": "cancelled"}) == 0
    assert get("aicrm_task_duration_seconds_bucket", {**labels, "le": "30.0"}) == 1
    assert get("aicrm_task_duration_seconds_count", labels) == 2
    assert get("aicrm_tasks_open", {"task_type": "qualify_lead", "status": "queued"}) == 1
    assert get("aicrm_task_oldest_open_age_seconds", {"task_type": "qualify_lead"}) == 300
    assert get("aicrm_source_up", {"source": SOURCE}) == 1
    assert get("aicrm_source_events_total", {"source": SOURCE}) == 2
    assert get("aicrm_source_rejected_events_total",
               {"source": SOURCE, "reason": "bad_timestamps"}) == 1


# --- PostgreSQL only: a server that stops, restarts, stalls; timestamptz ----------------------


def test_postgres_down_and_back(tmp_path: Path, cfg: Config, clock: Clock,
                                caplog: pytest.LogCaptureFixture) -> None:
    """Stop the server mid-run: source down, last values kept; start it again: recovery."""
    caplog.set_level(logging.INFO, logger="exporter.sources.taskdb")
    server = servers.start_postgres(tmp_path)
    restarted: servers.ProcessHandle | None = None
    d = Db(server.create_database("tasks"))
    try:
        d.insert(done("a"), open_row("q"))
        sink = FakeSink()
        with reader(d, cfg, sink, clock) as r:
            r.poll_once()
            assert sink.status == [True] and total(sink.snap) == 1
            served = len(sink.snapshots)

            d.engine.dispose()
            assert server.process is not None
            argv = list(server.process.args)  # type: ignore[arg-type]
            os.kill(server.pid, signal.SIGINT)  # fast shutdown; the data directory stays
            server.process.wait(30)
            started = time.monotonic()
            r.poll_once()
            r.poll_once()
            assert time.monotonic() - started < 10
            assert sink.status[1:] == [False, False] and len(sink.snapshots) == served
            assert sum("unavailable" in m for m in caplog.messages) == 1

            restarted = servers.ProcessHandle("postgres-again", tmp_path).start(
                argv, cwd=Path("/"), user=servers._postgres_os_user(),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"},
                ready_check=servers.tcp_ok(server.port),
            )
            deadline = time.monotonic() + 30
            while sink.status[-1] is not True and time.monotonic() < deadline:
                time.sleep(0.2)
                r.poll_once()
            assert sink.status[-1] is True
            d.insert(done("b", finished=10))
            d.update("q", status="cancelled", finished_at=ago(5))
            r.poll_once()
            assert total(sink.snap) == 2 and total(sink.snap, UNASSIGNED, status="cancelled") == 0
            assert total(sink.snap, agent=UNASSIGNED, status="cancelled") == 1
            assert sink.snap.open[("qualify_lead", "queued")] == 0
        assert any("reachable again" in m for m in caplog.messages)
    finally:
        d.close()
        if restarted is not None:
            restarted.stop()
        server.stop()


def test_postgres_slow_query_times_out(pg_url: str, cfg: Config, clock: Clock) -> None:
    d = Db(pg_url)
    try:
        d.insert(done("a"))
        sink = FakeSink()
        with reader(d, cfg, sink, clock, timeout_seconds=0.5) as r:
            r.poll_once()
            with d.engine.connect() as blocker:
                blocker.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
                started = time.monotonic()
                r.poll_once()
                assert time.monotonic() - started < 5
                assert sink.status == [True, False] and total(sink.snap) == 1
                blocker.rollback()
            d.insert(done("b", finished=10))
            r.poll_once()
        assert sink.status[-1] is True and total(sink.snap) == 2
    finally:
        d.close()


def test_postgres_timestamptz_columns(pg_url: str, cfg: Config, clock: Clock) -> None:
    """timestamptz values are read as UTC whatever the session's time zone (the reader's
    bounds are naive UTC, which PostgreSQL would otherwise read in the session's zone)."""
    d = Db(pg_url)
    try:
        with d.engine.begin() as conn:
            for col in ("created_at", "started_at", "finished_at"):
                conn.execute(text(f"ALTER TABLE tasks ALTER COLUMN {col} TYPE timestamptz "
                                  f"USING {col} AT TIME ZONE 'UTC'"))
            name = conn.execute(text("SELECT current_database()")).scalar_one()
            conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone TO 'America/New_York'"))
        tz = timezone(timedelta(hours=2))

        def aware(seconds: float) -> datetime:
            return ago(seconds).replace(tzinfo=UTC).astimezone(tz)

        d.insert({"id": "a", "task_type": "qualify_lead", "agent": "lead-qualifier",
                  "status": "completed", "created_at": aware(600), "started_at": aware(590),
                  "finished_at": aware(560)},
                 {"id": "q", "task_type": "qualify_lead", "status": "queued",
                  "created_at": aware(240)})
        sink = FakeSink()
        with reader(d, cfg, sink, clock) as r:
            r.poll_once()
            d.insert({"id": "b", "task_type": "qualify_lead", "agent": "lead-qualifier",
                      "status": "completed", "created_at": aware(60), "started_at": aware(50),
                      "finished_at": aware(20)})
            r.poll_once()
        assert total(sink.snap) == 2
        assert sink.snap.duration[("qualify_lead", "lead-qualifier")].sum == pytest.approx(60)
        assert sink.snap.oldest_open_age["qualify_lead"] == pytest.approx(240)
        assert sink.newest == pytest.approx(ago(20).replace(tzinfo=UTC).timestamp())
    finally:
        d.close()


def exporter_config(db: Db, tmp_path: Path) -> Config:
    return parse_config({**CONFIG, "sources": {"task_db": {"url": db.url}},
                         "exporter": {"listen": "127.0.0.1:0",
                                      "state_dir": str(tmp_path / "state")}})


def _served(cfg: Config, *while_running: Callable[[], object]) -> CollectorRegistry:
    """Start an exporter, poll the table and scrape (which persists); then for each of
    ``while_running``, call it, poll and scrape again; stop. Its registry, as served last."""
    from exporter.runtime import Exporter

    registry = CollectorRegistry(auto_describe=False)
    e = Exporter(cfg, registry=registry)
    try:
        e.taskdb.poll_once()
        e.render()
        for action in while_running:
            action()
            e.taskdb.poll_once()
            e.render()
    finally:
        e.server.httpd.server_close()
        e.taskdb.close()
        e.state_lock.release()
    return registry


def run_exporter(cfg: Config, *while_running: Callable[[], object]) -> tuple[float | None, ...]:
    """``_served``'s self counters: (events, rejected as unknown_status, task_type
    overflows)."""
    get = _served(cfg, *while_running).get_sample_value
    return (get("aicrm_source_events_total", {"source": SOURCE}),
            get("aicrm_source_rejected_events_total",
                {"source": SOURCE, "reason": "unknown_status"}),
            get("aicrm_label_overflow_total", {"label": "task_type"}))


def delete(db: Db, *ids: str) -> None:
    """A retention purge."""
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM tasks WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)), {"ids": list(ids)})


def test_exporter_restart_adds_no_self_counts_twice(db: Db, tmp_path: Path) -> None:
    """The aggregate recounts the table at every start while the state file restores the self
    counters: a restart must not add the table to them again, nor take back a count."""
    db.insert(done("a", finished=900), done("b", finished=600),
              done("c", task_type="ghost-type", finished=300),
              done("d", "exploded", finished=200))
    cfg = exporter_config(db, tmp_path)

    assert run_exporter(cfg) == (3, 1, 1)
    assert run_exporter(cfg) == (3, 1, 1)
    assert run_exporter(cfg) == (3, 1, 1)
    # Finished while the exporter was down: counted once at the next start.
    db.insert(done("e", finished=100), done("f", "broken", task_type="ghost-type", finished=90))
    assert run_exporter(cfg) == (4, 2, 1)
    # Deleted while down: the aggregate no longer sees them, the counters keep them.
    delete(db, "a", "c", "d")
    assert run_exporter(cfg) == (4, 2, 1)
    assert run_exporter(cfg) == (4, 2, 1)


def test_exporter_restart_after_a_purge_while_down_counts_the_new_rows(db: Db,
                                                                       tmp_path: Path) -> None:
    """While the exporter is down a purge deletes counted rows and new rows finish: the next
    start adds exactly the new rows to the self counters (the deleted ones do not hide
    them), whether the aggregate reads them in bulk or the start reads them one by one."""
    db.insert(done("a", finished=900), done("b", finished=800),
              done("c", task_type="ghost-type", finished=700),
              done("d", "exploded", finished=600), done("e", finished=500))
    cfg = exporter_config(db, tmp_path)
    assert run_exporter(cfg) == (4, 1, 1)

    delete(db, "a", "b", "c", "d")
    db.insert(done("f", finished=300), done("g", "broken", finished=200),  # the aggregate's
              done("h", task_type="ghost-type", finished=20), done("i", finished=10))
    assert run_exporter(cfg) == (7, 2, 2)
    assert run_exporter(cfg) == (7, 2, 2)
    delete(db, "e", "f", "g", "h")
    assert run_exporter(cfg) == (7, 2, 2)


def test_exporter_restart_after_a_purge_while_running_counts_the_new_rows(
        db: Db, tmp_path: Path) -> None:
    """A purge while the exporter runs takes nothing from the next start either."""
    db.insert(done("a", finished=900), done("b", finished=800),
              done("c", task_type="ghost-type", finished=700), done("d", "exploded", finished=600))
    cfg = exporter_config(db, tmp_path)

    def purge() -> None:
        delete(db, "a", "b", "c", "d")
        db.insert(done("e", finished=500))

    assert run_exporter(cfg, purge) == (4, 1, 1)
    db.insert(done("f", finished=300), done("g", "broken", finished=200),
              done("h", task_type="ghost-type", finished=20))
    assert run_exporter(cfg) == (6, 2, 2)
    assert run_exporter(cfg, lambda: delete(db, "e", "f", "g")) == (6, 2, 2)
    db.insert(done("i", finished=10))
    assert run_exporter(cfg) == (7, 2, 2)


def run_tasks(cfg: Config, *while_running: Callable[[], object]) -> dict[str, float | None]:
    """``_served``'s task families."""
    get = _served(cfg, *while_running).get_sample_value
    series = {"task_type": "qualify_lead", "agent": "lead-qualifier"}
    return {
        "completed": get("aicrm_tasks_total", {**series, "status": "completed"}),
        "failed": get("aicrm_tasks_total", {**series, "status": "failed"}),
        "duration_count": get("aicrm_task_duration_seconds_count", series),
        "duration_sum": get("aicrm_task_duration_seconds_sum", series),
        "duration_le_60": get("aicrm_task_duration_seconds_bucket", {**series, "le": "60.0"}),
        "wait_count": get("aicrm_task_wait_seconds_count", {"task_type": "qualify_lead"}),
        "wait_sum": get("aicrm_task_wait_seconds_sum", {"task_type": "qualify_lead"}),
    }


def tasks_served(completed: int, failed: int = 0, short: int = 0) -> dict[str, float]:
    """What run_tasks returns for rows made by ``done`` (waited 100 s, ran 100 s) and
    ``short`` of them that ran 30 s."""
    n = completed + failed
    return {"completed": completed, "failed": failed, "duration_count": n,
            "duration_sum": pytest.approx(100.0 * (n - short) + 30.0 * short),
            "duration_le_60": short, "wait_count": n, "wait_sum": pytest.approx(100.0 * n)}


def test_exporter_restart_after_a_purge_never_lowers_the_task_families(
        db: Db, tmp_path: Path) -> None:
    """A retention purge deletes counted rows: the task families served after a restart
    must not drop (Prometheus would read a counter reset and count the whole remaining table
    again in increase()), while the rows that finished while the exporter was down are added
    once, whether the start reads them in bulk (the aggregate's range), one by one (above its
    floor) or at the saved mark's very instant."""
    db.insert(*(done(f"r{i}", finished=3000 - 100 * i) for i in range(10)))  # r9: the mark
    cfg = exporter_config(db, tmp_path)
    assert run_tasks(cfg) == tasks_served(10)

    # Purged while running, then restarted: nothing goes down.
    assert run_tasks(cfg, lambda: delete(db, *(f"r{i}" for i in range(6)))) == tasks_served(10)
    assert run_tasks(cfg) == tasks_served(10)

    # Down: another purge, and rows finishing (one ran 30 s).
    delete(db, "r6", "r7")
    db.insert(done("tie", finished=2100),  # at the mark's instant, not counted yet
              done("bulk", "failed", finished=1000),  # below the next start's floor
              done("short", finished=10, started=40, created=140))  # above it
    assert run_tasks(cfg) == tasks_served(12, failed=1, short=1)
    assert run_tasks(cfg) == tasks_served(12, failed=1, short=1)
    delete(db, "r8", "r9", "tie", "bulk", "short")
    assert run_tasks(cfg) == tasks_served(12, failed=1, short=1)
    db.insert(done("next", finished=5))
    assert run_tasks(cfg) == tasks_served(13, failed=1, short=1)


def test_exporter_restart_from_a_state_file_without_the_task_families(
        db: Db, tmp_path: Path) -> None:
    """A state file from before the task families were saved: that start serves the table's
    aggregate, as before; it saves them, so from the next start on a purge lowers nothing."""
    db.insert(*(done(f"r{i}", finished=3000 - 100 * i) for i in range(4)))
    cfg = exporter_config(db, tmp_path)
    assert run_tasks(cfg) == tasks_served(4)
    state_file = tmp_path / "state" / "exporter-state.json"
    state = json.loads(state_file.read_text())
    del state["task_families"]
    state_file.write_text(json.dumps(state))

    db.insert(done("new", finished=100))
    assert run_tasks(cfg) == tasks_served(5)
    assert "task_families" in json.loads(state_file.read_text())
    delete(db, "r0", "r1")
    assert run_tasks(cfg) == tasks_served(5)
    state = json.loads(state_file.read_text())  # an unreadable mark: the saved values floor
    state["source_positions"][SOURCE] = {"mark": "not a time"}
    state_file.write_text(json.dumps(state))
    assert run_tasks(cfg) == tasks_served(5)


@pytest.mark.parametrize("written_before", [("source_positions",),
                                            ("source_positions", "rebuilt")],
                         ids=["without-mark", "without-mark-or-rebuilt"])
def test_exporter_restart_from_a_state_file_without_the_mark(
        db: Db, tmp_path: Path, written_before: tuple[str, ...]) -> None:
    """A state file from before the mark was saved (and one from before the added counts
    were): that start adds what exceeds the counts already added, as those versions did, and
    saves a mark; from the next start on, a purge hides nothing."""
    db.insert(done("a", finished=900), done("b", finished=800),
              done("c", task_type="ghost-type", finished=700), done("d", "exploded", finished=600))
    cfg = exporter_config(db, tmp_path)
    assert run_exporter(cfg) == (3, 1, 1)
    state_file = tmp_path / "state" / "exporter-state.json"
    state = json.loads(state_file.read_text())
    for key in written_before:
        state.pop(key, None)
    state_file.write_text(json.dumps(state))

    db.insert(done("e", finished=500))
    assert run_exporter(cfg) == (4, 1, 1)
    delete(db, "a", "b", "c", "d")
    db.insert(done("f", finished=300), done("g", "broken", task_type="ghost-type", finished=200))
    assert run_exporter(cfg) == (5, 2, 1)
    assert "mark" in json.loads(state_file.read_text())["source_positions"][SOURCE]


def test_restart_counts_only_rows_after_the_saved_mark(db: Db, cfg: Config,
                                                       clock: Clock) -> None:
    """The reader hands its high-water mark with its counts; a reader started from it counts
    into its own counters only the rows that finished after it: a row at the very instant of
    the mark but not counted yet is, a row already counted ahead of the clock (a writer's clock
    ahead) and a rejected row without finished_at are not, nor is a late commit below the mark.
    The task families still count the whole table."""
    db.insert(done("old", finished=3600), done("t1", finished=0),  # t1: at the mark (now)
              done("ahead", finished=-30),  # finished 30 s in the reader's future
              {**done("no-end"), "finished_at": None}, done("bad", started=10, finished=50))
    first = FakeSink()
    with reader(db, cfg, first, clock) as r:
        r.poll_once()
    assert first.accepted_rows == 3 and first.rejected == {"missing_field": 1,
                                                           "bad_timestamps": 1}

    # Down for an hour: a purge, rows finished since the mark (one at its very instant), a late
    # commit below it, a new rejected row.
    clock.now += 3600
    delete(db, "old", "bad")
    db.insert(done("t2", finished=0), done("late", finished=60),
              done("new1", finished=-1800),  # read by the start-up aggregate
              done("new2", task_type="ghost-type", finished=-3590),  # read one by one
              {**done("no-end2", "failed"), "finished_at": None})
    second = FakeSink()
    second.saved = first.position
    with reader(db, cfg, second, clock) as r:
        r.poll_once()
        assert second.accepted_rows == 3  # t2, new1, new2
        assert second.rejected == {"missing_field": 1} and second.overflowed == {"task_type": 1}
        assert counted(second.snap) == 6  # t1, ahead, t2, late, new1, new2
        db.insert(done("new3", finished=-3595))
        clock.now += 1
        r.poll_once()
        assert second.accepted_rows == 4 and counted(second.snap) == 7

    third = FakeSink()
    third.saved = second.position
    with reader(db, cfg, third, clock) as r:
        r.poll_once()
    assert third.accepted_rows == 0 and not third.rejected and not third.overflowed
    assert counted(third.snap) == 7
    # The mark is capped at the clock; the rows saved with it: those counted at or above it.
    assert first.resumed is False and second.resumed is third.resumed is True
    assert first.position == {"mark": NOW.isoformat(),
                              "top": [["ahead", ago(-30).isoformat()], ["t1", NOW.isoformat()]],
                              "unfinished_bad": ["no-end"], "unreadable": []}


def test_restart_from_more_saved_rows_than_a_statement_takes_parameters(
        pg_url: str, cfg: Config, clock: Clock) -> None:
    """A writer's clock ahead of the exporter's leaves every row of its lead above the mark,
    saved by id with its time: more times than a statement may bind (psycopg: 65,535; SQL
    Server: 2,100; SQLite: 32,766 unless built otherwise). The next start must still come up,
    and count into its own counters only the rows no earlier run counted: here those at a
    saved time (ties) or between two, read in bulk. (test_restart_from_saved_rows_looked_up_in_
    several_queries runs the same lookup on SQLite too.)"""
    n = 66_000
    db = Db(pg_url)
    try:
        restart_from_many_saved_rows(db, cfg, clock, n)
    finally:
        db.close()


def restart_from_many_saved_rows(db: Db, cfg: Config, clock: Clock, n: int) -> None:
    with db.engine.begin() as conn:  # 10-76 s ahead of the clock, a millisecond apart
        conn.execute(text(
            "INSERT INTO tasks (id, task_type, agent, status, created_at, started_at, "
            "finished_at) SELECT 'r' || i, 'qualify_lead', 'lead-qualifier', 'completed', "
            ":now - interval '100 s', :now, :now + make_interval(secs => 10 + i / 1000.0) "
            "FROM generate_series(0, :last) AS i"), {"now": NOW, "last": n - 1})
    first = FakeSink()
    with reader(db, cfg, first, clock) as r:
        r.poll_once()
    assert first.accepted_rows == n and len(first.position["top"]) == n

    # Restarted at once: the saved rows lie above the floor, read one by one.
    second = FakeSink()
    second.saved = first.position
    with reader(db, cfg, second, clock) as r:
        r.poll_once()
    assert second.status == [True] and second.accepted_rows == 0

    # Down for an hour: the saved rows fall into the start-up aggregate's range, with new rows
    # at two of their times and between two.
    clock.now += 3600
    db.insert(done("tie-first", "broken", finished=-10),
              done("tie-last", task_type="ghost-type", finished=-(10 + (n - 1) / 1000)),
              done("between", finished=-10.0075),
              done("later", finished=-3000))  # above the floor
    third = FakeSink()
    third.saved = second.position
    with reader(db, cfg, third, clock) as r:
        r.poll_once()
    assert third.status == [True]
    assert third.accepted_rows == 3 and third.rejected == {"unknown_status": 1}
    assert third.overflowed == {"task_type": 1} and counted(third.snap) == n + 3
    assert third.position["top"] == [["later", ago(-3000).isoformat()]]


def test_restart_from_saved_rows_looked_up_in_several_queries(
        db: Db, cfg: Config, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved times are looked up a batch per query; across batches, the rows an earlier
    run counted (valid, rejected, overflowing) are taken back from the bulk count, new rows at
    the same times are kept, and a new row at the mark itself is added. SQLite places times to
    the millisecond, so there a1, a1b and b1 are at one time, which two batches look up."""
    from exporter.sources import taskdb

    monkeypatch.setattr(taskdb, "MARKS_PER_QUERY", 2)
    db.insert(done("t0", finished=0),  # at the mark (now)
              done("a1", finished=-5.0001), done("a1b", finished=-5.0004),
              done("a2", "exploded", finished=-6),
              done("a3", task_type="ghost-type", finished=-7),
              done("a4", finished=-8, started=-9),  # finished before it started
              done("a5", finished=-9))
    first = FakeSink()
    with reader(db, cfg, first, clock) as r:
        r.poll_once()
    assert first.accepted_rows == 5 and first.overflowed == {"task_type": 1}
    assert first.rejected == {"unknown_status": 1, "bad_timestamps": 1}
    assert len(first.position["top"]) == 7

    clock.now += 3600
    delete(db, "a5")
    db.insert(done("m0", finished=0),  # at the mark, not counted yet
              done("b1", finished=-5.0002), done("b2", "broken", finished=-7),
              done("b3", task_type="ghost-type", finished=-8),
              done("b4", finished=-100), done("last", finished=-3000))
    second = FakeSink()
    second.saved = first.position
    with reader(db, cfg, second, clock) as r:
        r.poll_once()
    assert second.accepted_rows == 5  # m0, b1, b3, b4, last
    assert second.rejected == {"unknown_status": 1} and second.overflowed == {"task_type": 1}
    assert counted(second.snap) == 9  # the rows of the table with a valid status and times

    # With the task families saved too, they continue from them: a5 keeps its count, the
    # saved rows the bulk count read again are taken back, and the new rows are added.
    third = FakeSink()
    third.saved, third.saved_tasks = first.saved_state()
    with reader(db, cfg, third, clock) as r:
        r.poll_once()
    assert counted(first.snap) == 5 and counted(third.snap) == 10
    assert third.accepted_rows == 5
    dur = third.snap.duration[("qualify_lead", "lead-qualifier")]
    assert dur.count == sum(dur.buckets) == 8 and dur.sum == pytest.approx(800)

def test_a_poll_with_nothing_new_costs_nothing_per_row_at_the_mark(
        db: Db, cfg: Config, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """One UPDATE can finish thousands of tasks at one instant, the mark's: every poll after it
    (each second) must cost what it reads, not a rebuild of the saved list of those rows, as
    long as no later row moves the mark. A row that joins them still joins the list."""
    from exporter.sources import taskdb

    n = 20_000
    db.insert(*(done(f"c{i}", "cancelled", started=None, finished=5) for i in range(n)))
    sink = FakeSink()
    keyed = Counter[str]()
    real_key = taskdb._key

    def counting_key(id_: Any) -> Any:
        keyed["calls"] += 1
        return real_key(id_)

    monkeypatch.setattr(taskdb, "_key", counting_key)
    with reader(db, cfg, sink, clock) as r:
        r.poll_once()
        assert len(sink.position["top"]) == n and sink.position["mark"] == ago(5).isoformat()
        before = (keyed["calls"], sink.position)
        for _ in range(3):
            clock.now += 1
            r.poll_once()
        assert (keyed["calls"], sink.position) == before and sink.position is before[1]

        db.insert(done("tie", finished=5))  # committed late, at the mark's very instant
        clock.now += 1
        r.poll_once()
        assert len(sink.position["top"]) == n + 1 and sink.accepted_rows == n + 1
        db.insert(done("next", finished=1))
        clock.now += 1
        r.poll_once()
        assert sink.position["top"] == [["next", ago(1).isoformat()]]
        assert sink.position["mark"] == ago(1).isoformat() and sink.accepted_rows == n + 2

def test_sqlite_timestamps_in_other_formats(tmp_path: Path, cfg: Config, clock: Clock,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """SQLite keeps any text in any column: ISO 8601 with 'Z' or an offset is read as UTC,
    and a value that is no time rejects its row (named in the log) without stopping the
    source; a restart counts the same."""
    from exporter.metrics import MetricStore

    caplog.set_level(logging.WARNING, logger="exporter.sources.taskdb")
    d = Db(f"sqlite:///{tmp_path / 'tasks.db'}")

    def z(seconds: float) -> str:
        return ago(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")

    def plus2(seconds: float) -> str:
        return ago(seconds).replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=2))) \
            .isoformat()

    def sql(seconds: float) -> str:
        return ago(seconds).strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's own format

    def raw(id_: str, created: str, started: str | None, finished: str) -> None:
        with d.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO tasks (id, task_type, agent, status, created_at, started_at, "
                "finished_at) VALUES (:id, 'qualify_lead', 'lead-qualifier', 'completed', "
                ":c, :s, :f)"), {"id": id_, "c": created, "s": started, "f": finished})

    def poll(r: TaskDbReader, store: MetricStore) -> dict[str, float | None]:
        r.poll_once()
        get = store_registry(store).get_sample_value
        labels = {"task_type": "qualify_lead", "agent": "lead-qualifier"}
        return {
            "up": get("aicrm_source_up", {"source": SOURCE}),
            "completed": get("aicrm_tasks_total", {**labels, "status": "completed"}),
            "duration_sum": get("aicrm_task_duration_seconds_sum", labels),
            "events": get("aicrm_source_events_total", {"source": SOURCE}),
            "bad": get("aicrm_source_rejected_events_total",
                       {"source": SOURCE, "reason": "bad_timestamps"}),
        }

    try:
        d.insert(done("a", finished=3600))  # ran 100 s
        raw("z-old", z(3800), z(3700), z(3650))  # ran 50 s
        raw("junk-old", "n/a", sql(3000), sql(2900))
        store = MetricStore(cfg, clock=clock)
        store.add_source(SOURCE)
        with TaskDbReader(d.settings, store.labels, store, clock=clock) as r:
            got = poll(r, store)
            assert got == {"up": 1, "completed": 2, "duration_sum": 150, "events": 2, "bad": 1}
            raw("z-new", plus2(90), z(60), z(30))  # ran 30 s
            raw("junk", "garbage", "garbage", "garbage")
            d.insert(done("b", finished=5))
            for _ in range(3):
                clock.now += 1
                got = poll(r, store)
            assert got == {"up": 1, "completed": 4, "duration_sum": 280, "events": 4, "bad": 2}
            # Time moves on: z-new falls below the floor, yet as text it still sorts above
            # every bound of the day ('T' > ' '), so every read returns it again.
            clock.now += 600
            d.insert(done("c", finished=-500))
            poll(r, store)
            d.insert(done("late", finished=-450))  # below the mark: the window is re-read
            for _ in range(3):
                clock.now += 1
                got = poll(r, store)
            assert got == {"up": 1, "completed": 6, "duration_sum": 480, "events": 6, "bad": 2}
        messages = "\n".join(caplog.messages)
        assert "row id='junk-old' has an unreadable created_at" in messages
        assert "row id='junk' has an unreadable finished_at" in messages

        again = MetricStore(cfg, clock=clock)
        again.add_source(SOURCE)
        with TaskDbReader(d.settings, again.labels, again, clock=clock) as r:
            assert poll(r, again) == got

        # Down for a while, restarted from the saved state: a purge, a row finished since the
        # mark in each format (SQLAlchemy's, read by the aggregate; 'Z', read one by one).
        # Only those two are added, to the counters and to the task families (which keep the
        # purged rows); 'junk' (remembered with the mark) is not rejected again.
        with store.lock:
            state = msgspec.json.decode(msgspec.json.encode(store.dump()))
        clock.now += 200
        with d.engine.begin() as conn:
            conn.execute(text("DELETE FROM tasks WHERE id IN ('a', 'z-old')"))
        d.insert(done("d", finished=-560))  # ran 100 s
        raw("z-down", z(-600), z(-650), z(-700))  # ran 50 s
        resumed = MetricStore(cfg, clock=clock)
        resumed.load(state)
        resumed.load_rebuilt(state)
        resumed.add_source(SOURCE)
        with TaskDbReader(d.settings, resumed.labels, resumed, clock=clock) as r:
            assert poll(r, resumed) == {"up": 1, "completed": 8, "duration_sum": 630,
                                        "events": 8, "bad": 2}
    finally:
        d.close()


def store_registry(store: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    return registry
