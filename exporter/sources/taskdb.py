"""The task database source: the ``tasks`` table, read incrementally into ``TaskDbSnapshot``s.

One aggregate read at the first start gives true totals. Later starts continue the task
families from the values the state file saved with the high-water mark (below), adding only the
rows finished after it, so a purge of old rows cannot lower a served counter. Afterwards a poll
reads only rows whose ``finished_at`` lies above a *floor* that trails the newest
``finished_at`` by ``lookback_seconds``; the ids read above the floor are remembered, so a late
commit is counted once and re-reading the window counts nothing twice. Whether a row is valid,
why it is rejected and which histogram bucket it falls in is decided by one SQL expression
shared by both reads, so both reads agree to the row. docs/task-db.md has the full argument and
the indexes it relies on.

The reader's own counts (rows counted, rejected by reason, label overflows) live in the state
file with the other sources' counters, so a start must not count again what an earlier run
counted, even if the table has lost those rows since. With every report the reader hands the
sink its high-water mark (the newest ``finished_at`` read, and the rows counted at or above it);
the sink saves it with the counters and the task families as served, and the next start
counts into both only the rows finished after it.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    event,
    extract,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import NullType

from .. import catalog
from ..config import ConfigError, TaskDbSource, check_db_url
from ..events import HistogramData, TaskDbSnapshot
from ..labels import LabelSets
from ..tasks_schema import STATUSES, tasks_table

log = logging.getLogger(__name__)

SOURCE = "task_db"
UNASSIGNED = "unassigned"
"""``agent`` label of terminal tasks that never had an agent (e.g. cancelled while queued)."""
AGGREGATE_TIMEOUT_FACTOR = 10
"""The start-up aggregate scans the whole table, so it gets this many statement timeouts."""
MARKS_PER_QUERY = 500
"""Saved instants looked up per start-up query (``_Queries.at_marks``): each is a bound
parameter, and every dialect limits them per statement (SQL Server to 2,100, psycopg to
65,535), while a writer's clock ahead of the exporter's can leave many rows above the mark."""

_OK = "ok"
_OPEN = "open"
_UNREADABLE = "unreadable:"
"""Prefix of the internal reason of a row with a timestamp SQLite cannot read, followed by the
column's key; counted as ``bad_timestamps``."""
_DURATION_BOUNDS = catalog.TASK_DURATION.buckets
_WAIT_BOUNDS = catalog.TASK_WAIT.buckets


class Sink(Protocol):
    """Where the reader delivers typed data; ``exporter.metrics.MetricStore`` is one."""

    def source_status(self, source: str, up: bool) -> None: ...

    def source_position(self, source: str) -> Any:
        """The ``position`` last handed to ``source_totals`` by an earlier run, or None."""
        ...

    def saved_task_families(self) -> Any:
        """The task families as an earlier run last saved them (with the position
        ``source_position`` gives), or None: JSON, ``{"totals": [[task_type, agent, status,
        n]], "duration": [[task_type, agent, [buckets..., sum, count]]], "wait": [[task_type,
        [...]]]}``."""
        ...

    def source_totals(self, source: str, events: int, rejected: Mapping[str, int],
                      overflow: Mapping[str, int], newest_ts: float | None, *,
                      position: Any = None, resumed: bool = False,
                      tasks: TaskDbSnapshot | None = None) -> None:
        """Rows counted, rejected (by reason) and label overflows since this reader started;
        ``newest_ts`` is the newest row counted by this poll. ``resumed``: these count only
        rows after the position ``source_position`` gave (else the start-up aggregate's whole
        table is included). ``position`` (JSON) is what to hand back after a restart.
        ``tasks``: the task families as of this poll, to be saved with ``position`` (one
        step: the saved families always hold exactly the rows the saved position counted)."""
        ...


# --- SQL ------------------------------------------------------------------------------------


def _seconds(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, computed by the database so both reads round alike."""
    if dialect == "postgresql":
        return cast(extract("epoch", end - start), Float)
    if dialect == "sqlite":
        # julianday() keeps milliseconds; rounding removes the float noise of the subtraction.
        return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)
    if dialect in ("mysql", "mariadb"):
        return func.timestampdiff(literal_column("MICROSECOND"), start, end) / 1e6
    if dialect == "mssql":
        return func.datediff_big(literal_column("microsecond"), start, end) / 1e6
    raise ValueError(
        f"sources.task_db.url: the {dialect!r} dialect is not supported "
        "(use postgresql, sqlite, mysql, mariadb or mssql)"
    )


SQLITE_ID_HASH = "aicrm_id_hash"
"""The function the reader registers on its SQLite connections (``_sqlite_id_hash``)."""


def _sqlite_id_hash(value: Any) -> int:
    """32 bits of Python's hash of an id as SQLite stores it (SQLite has no hash function of
    its own). It differs between processes, which does not matter: the reader compares it only
    with what the same process read."""
    return hash(value) & 0xFFFFFFFF


def _id_hash(dialect: str, col: Any) -> ColumnElement[Any]:
    """A 32-bit hash of an id, computed by the database: the window check sums it over the
    window's rows and compares the sum with the one over the ids seen there, which it read
    with the rows (so it only has to be the same for one id from one query to the next)."""
    if dialect == "postgresql":
        return func.hashtext(cast(col, Text))
    if dialect == "sqlite":
        return getattr(func, SQLITE_ID_HASH)(col)
    if dialect in ("mysql", "mariadb"):
        return func.crc32(cast(col, String))
    if dialect == "mssql":
        return func.checksum(col)
    raise ValueError(f"sources.task_db.url: the {dialect!r} dialect is not supported")


def _unreadable(dialect: str, col: Any) -> ColumnElement[Any] | None:
    """True where a timestamp is set but cannot be read: only SQLite stores any value in any
    column (SQLAlchemy writes text that julianday() reads)."""
    if dialect != "sqlite":
        return None
    return and_(col.is_not(None),
                or_(func.typeof(col) != "text", func.julianday(col).is_(None)))


def _raw(col: Any) -> Any:
    """``col`` as the driver returns it: parsed by ``_utc``, which does not fail the poll."""
    return type_coerce(col, NullType())


def _bucket(dialect: str, value: ColumnElement[Any], bounds: Sequence[float], absent: Any) -> Any:
    """Index of the first bound ``value`` is <= to (len(bounds) for +Inf); NULL when ``absent``."""
    n = len(bounds)
    if dialect == "postgresql":
        # width_bucket() is left-closed; on negated values it counts the bounds >= value,
        # which gives Prometheus' right-closed buckets in one call instead of n comparisons.
        negated = ",".join(repr(-float(b)) for b in reversed(bounds))
        thresholds: ColumnElement[Any] = literal_column(f"ARRAY[{negated}]::float8[]")
        return case((absent, null()), else_=n - func.width_bucket(-value, thresholds))
    whens = [(value <= b, i) for i, b in enumerate(bounds)]
    return case((absent, null()), *whens, else_=n)


class _Queries:
    """Every statement the reader runs, built once for the mapped table and dialect."""

    def __init__(self, settings: TaskDbSource, dialect: str) -> None:
        t = tasks_table(settings.table, settings.columns)
        self.table = t
        self.dialect = dialect
        c = t.c
        status, started = c.status, c.started_at
        dur = _seconds(dialect, started, c.finished_at)
        wait = _seconds(dialect, c.created_at, started)
        life = _seconds(dialect, c.created_at, c.finished_at)
        not_started = started.is_(None)
        unreadable = [
            (cond, _UNREADABLE + key)
            for key in ("created_at", "started_at", "finished_at")
            if (cond := _unreadable(dialect, c[key])) is not None
        ]
        reason = case(
            (status.is_(None), "missing_field"),
            (status.not_in(STATUSES), "unknown_status"),
            (status.in_(catalog.OPEN_STATUSES), _OPEN),
            (or_(c.task_type.is_(None), c.created_at.is_(None)), "missing_field"),
            (and_(status == "completed", not_started), "missing_field"),
            *unreadable,
            (and_(~not_started, or_(wait < 0, dur < 0)), "bad_timestamps"),
            (and_(not_started, life < 0), "bad_timestamps"),
            else_=_OK,
        )
        self.finished = c.finished_at
        self.id_hash = _id_hash(dialect, c.id)
        # One row as both reads see it: (id, task_type, agent, status, finished_at,
        # reason, duration, wait, duration bucket, wait bucket).
        self.row = select(
            c.id, c.task_type, c.agent, status, _raw(c.finished_at),
            reason.label("reason"),
            case((not_started, null()), else_=dur).label("dur"),
            case((not_started, null()), else_=wait).label("wait"),
            _bucket(dialect, dur, _DURATION_BOUNDS, not_started).label("dur_b"),
            _bucket(dialect, wait, _WAIT_BOUNDS, not_started).label("wait_b"),
        ).where(c.finished_at.is_not(None))
        self.newest = select(_raw(func.max(c.finished_at)))
        readable = _unreadable(dialect, c.finished_at)
        if readable is not None:
            self.newest = self.newest.where(~readable)  # 'garbage' sorts above every date
        self.open = (
            select(c.task_type, status, func.count(), _raw(func.min(c.created_at)))
            .where(status.in_(catalog.OPEN_STATUSES))
            .group_by(c.task_type, status)
        )
        # Rows no finished_at scan will ever see, yet not open: reject them here.
        self.unfinished_bad = select(c.id, status).where(
            c.finished_at.is_(None), or_(status.is_(None), status.not_in(catalog.OPEN_STATUSES))
        )

    def aggregate(self, cutoff: datetime) -> Any:
        rows = self.row.where(self.finished <= cutoff).subquery()
        keys = (rows.c.task_type, rows.c.agent, rows.c.status, rows.c.reason, rows.c.dur_b,
                rows.c.wait_b)
        return select(*keys, func.count(), func.sum(rows.c.dur), func.sum(rows.c.wait)).group_by(
            *keys
        )

    def unreadable_ids(self, cutoff: datetime, limit: int) -> Any:
        """Some rows the aggregate rejected for an unreadable timestamp, to name them."""
        rows = self.row.where(self.finished <= cutoff).subquery()
        return (select(rows.c.id, rows.c.reason)
                .where(rows.c.reason.startswith(_UNREADABLE)).limit(limit))

    def _time(self, value: Any) -> Any:
        """A finished_at (column or bound) as a comparable time. SQLite compares text, which
        does not sort other ISO 8601 forms in time order; julianday() reads them (to the ms)."""
        if self.dialect != "sqlite":
            return value
        if isinstance(value, datetime):
            value = bindparam(None, value, type_=DateTime())
        return func.julianday(value)

    def _from(self, when: datetime) -> Any:
        """An index range holding every row that finished at ``when`` or later: on SQLite,
        where ``_time`` is not indexed, loose enough for any ISO 8601 text (an offset moves
        its date by less than a day)."""
        if self.dialect != "sqlite":
            return self.finished >= when
        return self.finished >= datetime.combine(when.date() - timedelta(days=2), dt_time())

    def _until(self, when: datetime) -> Any:
        """An index range holding every row that finished at ``when`` or earlier (loose on
        SQLite, as ``_from``)."""
        if self.dialect != "sqlite":
            return self.finished <= when
        return self.finished < datetime.combine(when.date() + timedelta(days=2), dt_time())

    def _after(self, mark: datetime) -> Any:
        t = self._time
        return t(self.finished) > t(mark)

    def after_mark(self, cutoff: datetime, mark: datetime | None) -> Any:
        """The rows the aggregate reads (``finished_at <= cutoff``) that finished after
        ``mark`` (all of them if None), grouped as ``aggregate`` groups them."""
        q = self.row.where(self.finished <= cutoff)
        if mark is not None:
            q = q.where(self._from(mark), self._after(mark))
        rows = q.subquery()
        keys = (rows.c.task_type, rows.c.agent, rows.c.status, rows.c.reason, rows.c.dur_b,
                rows.c.wait_b)
        return select(*keys, func.count(), func.sum(rows.c.dur), func.sum(rows.c.wait)
                      ).group_by(*keys)

    def at_marks(self, cutoff: datetime, mark: datetime | None,
                 marks: Sequence[datetime]) -> Any:
        """The rows the aggregate reads that finished at one of the times ``marks`` (sorted,
        at most ``MARKS_PER_QUERY``), each with whether ``after_mark`` counted it (1 or 0)."""
        t = self._time
        after = literal(1) if mark is None else case((self._after(mark), 1), else_=0)
        return self.row.add_columns(after.label("after")).where(
            self.finished <= cutoff, self._from(marks[0]), self._until(marks[-1]),
            t(self.finished).in_([t(m) for m in marks]))

    def rows_above(self, floor: datetime | None) -> Any:
        """The rows above ``floor``, each with its id's hash (``_id_hash``) last."""
        q = self.row.add_columns(self.id_hash.label("id_hash"))
        return q if floor is None else q.where(self.finished > floor)

    def window_count(self, floor: datetime | None, mark: datetime) -> Any:
        """(count, sum of the ids' hashes) of the rows with ``floor < finished_at <= mark``:
        one range of the finished_at index."""
        h = self.id_hash
        total = func.sum(cast(h, BigInteger) if self.dialect == "mssql" else h)
        q = select(func.count(), func.coalesce(total, 0)).select_from(self.table).where(
            self.finished <= mark)
        return q if floor is None else q.where(self.finished > floor)


# --- state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Hist:
    buckets: list[int]
    sum: float = 0.0
    count: int = 0

    def add(self, bucket: int, total: float, n: int) -> None:
        self.buckets[bucket] += n
        self.sum += total
        self.count += n

    def freeze(self) -> HistogramData:
        return HistogramData(tuple(self.buckets), self.sum, self.count)


@dataclass(slots=True)
class _Read:
    """Everything one poll read; applied to the state only once every query succeeded."""

    initial: bool = False
    aggregate: list[Any] | None = None
    newest: datetime | None = None
    rows: list[Any] = field(default_factory=list)
    full_window: bool = False
    floor: datetime | None = None
    open: list[Any] = field(default_factory=list)
    unfinished_bad: list[Any] = field(default_factory=list)
    unreadable: list[Any] = field(default_factory=list)
    """(id, reason) of some aggregated rows with an unreadable timestamp."""
    saved: _Saved | None = None
    """The high-water mark of the previous run (start-up only; None: count the whole table)."""
    saved_tasks: _SavedTasks | None = None
    """The task families the previous run saved with its mark (start-up only)."""
    after: list[Any] = field(default_factory=list)
    """The aggregated rows that finished after the saved mark, grouped as the aggregate."""
    at_marks: dict[Any, Any] = field(default_factory=dict)
    """The aggregated rows that finished at the saved mark or at a saved row's time, by id,
    each with whether ``after`` counted it."""


def _key(id_: Any) -> Any:
    """An id as the state file keeps it: an int or a string as it is, anything else (a UUID)
    as its text, the same before and after a restart."""
    if isinstance(id_, (int, str)) and not isinstance(id_, bool):
        return id_
    return str(id_)


@dataclass(frozen=True, slots=True)
class _Saved:
    """What an earlier run counted into the self counters, as the state file holds it.

    Every row with ``finished_at`` before ``mark``, the rows ``top`` names (counted, with
    ``finished_at`` at or after ``mark``), the rows without ``finished_at`` rejected
    (``unfinished_bad``) and the rows with an unreadable ``finished_at`` rejected
    (``unreadable``; SQLite only). The rest is new to these counters.
    """

    mark: datetime | None
    top: dict[Any, datetime]
    unfinished_bad: frozenset[Any]
    unreadable: frozenset[Any]

    def new(self, id_: Any, fin: datetime) -> bool:
        """Whether a row read with this ``finished_at`` was not counted by that run."""
        return (self.mark is None or fin >= self.mark) and _key(id_) not in self.top

    @classmethod
    def parse(cls, raw: Any) -> _Saved | None:
        """The position saved by ``TaskDbReader._position``; None (with a warning) if it is
        not one: the reader then counts the whole table, as after an older state file."""
        if raw is None:
            return None
        try:
            mark = raw["mark"]
            return cls(
                mark=None if mark is None else datetime.fromisoformat(mark),
                top={k: datetime.fromisoformat(f) for k, f in raw["top"]},
                unfinished_bad=frozenset(raw["unfinished_bad"]),
                unreadable=frozenset(raw["unreadable"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("task database: the saved high-water mark is unreadable (%s: %s); "
                        "recounting the table", type(exc).__name__, exc)
            return None


@dataclass(slots=True)
class _SavedTasks:
    """The task families as an earlier run served and saved them (``saved_task_families``)."""

    totals: dict[tuple[str, str, str], int]
    duration: dict[tuple[str, str], _Hist]
    wait: dict[str, _Hist]

    @classmethod
    def parse(cls, raw: Any) -> _SavedTasks | None:
        """None (with a warning if something was saved but cannot be used, e.g. the catalog's
        buckets changed): the start then counts the task families from the table alone."""
        if raw is None:
            return None

        def hist(values: Any, bounds: Sequence[float]) -> _Hist:
            *buckets, total, count = values
            if len(buckets) != len(bounds) + 1:
                raise ValueError("the histogram buckets changed")
            return _Hist([int(b) for b in buckets], float(total), int(count))

        try:
            return cls(
                totals={(str(t), str(a), str(st)): int(n) for t, a, st, n in raw["totals"]},
                duration={(str(t), str(a)): hist(h, _DURATION_BOUNDS)
                          for t, a, h in raw["duration"]},
                wait={str(t): hist(h, _WAIT_BOUNDS) for t, h in raw["wait"]},
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("task database: the saved task families are unusable (%s: %s); "
                        "counting them from the table", type(exc).__name__, exc)
            return None


def _utc(value: Any) -> datetime | None:
    """A timestamp as the driver returns it, to naive UTC (DESIGN.md: naive values are UTC).

    PostgreSQL's ``timestamptz`` and SQLite text with an offset or 'Z' are aware; comparing
    them with naive ones would fail, so every value the reader keeps is naive UTC. Raises
    ValueError for a value that is no timestamp (SQLite stores any text in any column).
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not a timestamp: {value[:40]!r}") from None
    if not isinstance(value, datetime):
        raise ValueError(f"not a timestamp: {value!r:.40}")
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _epoch(dt: datetime) -> float:
    return dt.replace(tzinfo=UTC).timestamp()


def _utc_now(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC).replace(tzinfo=None)


def _public(reason: str) -> str:
    return "bad_timestamps" if reason.startswith(_UNREADABLE) else reason


def _message(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {first[0] if first else ''}"


def _resolve_url(settings: TaskDbSource) -> tuple[str, str]:
    """(url, the config key it came from): ``$url_env`` if set and not empty (surrounding
    white space, such as the newline of a secret mounted from a file, stripped), else ``url``;
    ConfigError if neither gives one. Never quotes the URL (it may hold a password)."""
    if settings.url_env:
        loc = "sources.task_db.url_env"
        url = (os.environ.get(settings.url_env) or "").strip()
        if url:
            try:
                return check_db_url(url), loc
            except ValueError as exc:
                raise ConfigError("environment", [(loc, f"${settings.url_env}: {exc}")]) from None
        if settings.url is None:
            raise ConfigError("environment", [(loc, (
                f"${settings.url_env} is not set (or empty) and sources.task_db.url, the "
                "fallback, is not configured"))])
        log.info("$%s is not set: using sources.task_db.url", settings.url_env)
    if settings.url is None:  # the config's validation requires url or url_env
        raise ConfigError("config", [("sources.task_db.url", "Field required")])
    return settings.url, "sources.task_db.url"


def _engine(url: str, settings: TaskDbSource) -> Engine:
    """An engine that gives up quickly: pre-ping, connect and statement timeouts."""
    u = make_url(url)
    backend, driver = u.get_backend_name(), u.get_driver_name()
    args: dict[str, Any] = {}
    timeout = settings.timeout_seconds
    if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        args = {
            "connect_timeout": max(2, math.ceil(timeout)),
            # UTC: naive bounds compared with a timestamptz column are read in the session's
            # time zone, and the reader's naive values are UTC.
            "options": f"-c statement_timeout={int(timeout * 1000)} -c TimeZone=UTC",
            "application_name": "aicrm-exporter",
        }
    elif backend == "sqlite":
        args = {"timeout": timeout}
    elif backend in ("mysql", "mariadb"):
        args = {"connect_timeout": max(1, math.ceil(timeout))}
    engine = create_engine(url, pool_pre_ping=True, connect_args=args)
    if backend == "sqlite":
        @event.listens_for(engine, "connect")
        def _register(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.create_function(SQLITE_ID_HASH, 1, _sqlite_id_hash, deterministic=True)
    return engine


class TaskDbReader:
    """Polls the tasks table and hands each poll's snapshot to a ``Sink``."""

    def __init__(
        self,
        settings: TaskDbSource,
        labels: LabelSets,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._labels = labels
        self._sink = sink
        self._clock = clock
        self._lookback = timedelta(seconds=settings.lookback_seconds)
        url, loc = _resolve_url(settings)
        self._safe_url = make_url(url).render_as_string(hide_password=True)
        try:
            self._engine = _engine(url, settings)
            self._dialect = self._engine.dialect.name
            self._q = _Queries(settings, self._dialect)
        except (ArgumentError, ImportError, ValueError) as exc:
            # A driver that is not installed, a URL option the driver refuses: a config error.
            where = "environment" if settings.url_env else "config"
            raise ConfigError(where, [(loc, f"{self._safe_url}: {_message(exc)}")]) from None

        self._ready = False
        """The start-up aggregate succeeded; from then on every poll is incremental."""
        self._up: bool | None = None
        self._floor: datetime | None = None
        """Rows with finished_at at or below the floor are settled: never read again."""
        self._mark: datetime | None = None
        """Newest finished_at read so far, capped at now; rows above it are new."""
        self._seen: dict[Any, datetime] = {}
        """Ids read above the floor (counted or rejected), with the finished_at read."""
        self._hashes: dict[Any, int] = {}
        """The database's hash of each id in ``_seen`` (``_id_hash``), and their sum: the
        window check compares it with the window's."""
        self._hash_sum = 0
        self._heap: list[tuple[datetime, Any]] = []
        self._top: set[Any] = set()
        """Seen ids whose finished_at is at or above the mark: saved with it."""
        self._ahead: set[Any] = set()
        """Seen ids whose finished_at is above the mark (clock skew, future dates)."""
        self._unfinished_bad: set[Any] = set()
        self._unreadable: set[Any] = set()
        """Ids whose finished_at cannot be read (rejected once; SQLite only)."""
        self._saved_position: dict[str, Any] | None = None
        """``_position()`` as last built; None once the mark or an id set it lists changed.
        Many rows can share the mark (one UPDATE finishing thousands of tasks), and a poll
        with nothing new must not build and compare their list again."""
        self._events = 0
        self._rejected: Counter[str] = Counter()
        self._overflowed: Counter[str] = Counter()
        """The reader's own counts since it started, reported whole to the sink: rows after
        the saved high-water mark, or the whole table if there was none (``_resumed``)."""
        self._resumed = False

        types, agents = labels.task_types.with_other(), labels.agents.with_other()
        self._totals: dict[tuple[str, str, str], int] = {
            (t, a, s): 0 for t in types for a in agents for s in catalog.TERMINAL_STATUSES
        }
        self._duration: dict[tuple[str, str], _Hist] = {
            (t, a): self._new_hist(_DURATION_BOUNDS) for t in types for a in agents
        }
        self._wait: dict[str, _Hist] = {t: self._new_hist(_WAIT_BOUNDS) for t in types}

    @staticmethod
    def _new_hist(bounds: Sequence[float]) -> _Hist:
        return _Hist([0] * (len(bounds) + 1))

    # --- public ---------------------------------------------------------------------------

    def poll_once(self) -> None:
        """One poll: the aggregate read if none has succeeded yet, then the incremental one.

        Database errors mark the source down and keep the last snapshot; nothing is applied
        unless every query of the poll succeeded, so a failed poll counts nothing.
        """
        now = self._clock()
        started = time.monotonic()
        try:
            with self._engine.connect() as conn:
                read = self._read(conn, now)
        except (SQLAlchemyError, OSError) as exc:
            # Start the next poll from fresh connections: a pooled one may point at a
            # replaced SQLite file or a server that restarted.
            self._engine.dispose()
            self._set_up(False, exc)
            return
        first = not self._ready
        self._apply(read, now)
        if first:
            log.info("task database %s: initial read took %.2fs",
                     self._safe_url, time.monotonic() - started)
        self._set_up(True)

    def run(self, stop: threading.Event) -> None:
        """Poll every ``poll_seconds`` until ``stop`` is set; never raises."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.poll_once()
                except Exception:
                    log.exception("task database %s: unexpected error", self._safe_url)
                    self._set_up(False)
                elapsed = time.monotonic() - started
                stop.wait(max(0.0, self._settings.poll_seconds - elapsed))
        finally:
            self.close()

    def close(self) -> None:
        """Close pooled connections (the reader stays usable: a poll reconnects)."""
        self._engine.dispose()

    def __enter__(self) -> TaskDbReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading --------------------------------------------------------------------------

    def _read(self, conn: Connection, now: float) -> _Read:
        q = self._q
        read = _Read(floor=self._floor)
        if not self._ready:
            read.initial = True
            read.saved = _Saved.parse(self._sink.source_position(SOURCE))
            read.saved_tasks = _SavedTasks.parse(self._sink.saved_task_families())
            newest = _utc(conn.execute(q.newest).scalar())
            if newest is not None:
                read.newest = min(newest, _utc_now(now))
                read.floor = read.newest - self._lookback
                pg = self._dialect == "postgresql"
                ms = int(self._settings.timeout_seconds * 1000)
                if pg:
                    ms_agg = ms * AGGREGATE_TIMEOUT_FACTOR
                    conn.execute(text(f"SET LOCAL statement_timeout = {ms_agg}"))
                read.aggregate = list(conn.execute(q.aggregate(read.floor)))
                if any(str(r.reason).startswith(_UNREADABLE) for r in read.aggregate):
                    read.unreadable = list(conn.execute(q.unreadable_ids(read.floor, 10)))
                saved = read.saved
                if saved is not None:
                    # The aggregated rows new to the self counters: in bulk those after the
                    # mark, corrected one by one at the times the saved rows hold (ties,
                    # skew), a batch of times per query.
                    read.after = list(conn.execute(q.after_mark(read.floor, saved.mark)))
                    marks = sorted({*saved.top.values(),
                                    *(() if saved.mark is None else (saved.mark,))})
                    for i in range(0, len(marks), MARKS_PER_QUERY):
                        batch = marks[i:i + MARKS_PER_QUERY]
                        for row in conn.execute(q.at_marks(read.floor, saved.mark, batch)):
                            # Once by id: on SQLite two saved times may share a millisecond.
                            read.at_marks[row[0]] = row
                if pg:
                    conn.execute(text(f"SET LOCAL statement_timeout = {ms}"))
            read.rows = list(conn.execute(q.rows_above(read.floor)))
            read.full_window = True
        elif self._mark is None:
            read.rows = list(conn.execute(q.rows_above(self._floor)))
            read.full_window = True
        else:
            in_window, hash_sum = conn.execute(q.window_count(self._floor, self._mark)).one()
            # Anything but exactly the rows already seen: a late commit, a row still pending
            # (open status with finished_at), a deletion, a reopened row, or one of those
            # leaving while a late commit enters (the count alone would not change). Re-read
            # the window then.
            hashes = self._hashes
            ahead_sum = sum(hashes[i] for i in self._ahead)
            read.full_window = (in_window != len(self._seen) - len(self._ahead)
                                or int(hash_sum) != self._hash_sum - ahead_sum)
            floor = self._floor if read.full_window else self._mark
            read.rows = list(conn.execute(q.rows_above(floor)))
        read.open = list(conn.execute(q.open))
        read.unfinished_bad = list(conn.execute(q.unfinished_bad))
        return read

    # --- applying -------------------------------------------------------------------------

    def _apply(self, read: _Read, now: float) -> None:
        rejects: Counter[str] = Counter()
        overflow: Counter[str] = Counter()
        counted = 0
        """Rows counted into the task families (whose newest gives the lag)."""
        events = 0
        """Rows counted into the reader's own counters."""
        newest: datetime | None = None
        saved = read.saved if read.initial else None
        saved_tasks = read.saved_tasks if read.initial else None
        # The task families continue from the saved ones plus the rows after the saved mark
        # (else they are the table's aggregate, floored at the saved ones if any).
        resume_tasks = saved is not None and saved_tasks is not None

        if read.initial:
            self._resumed = saved is not None
            if resume_tasks:
                assert saved_tasks is not None
                self._restore(saved_tasks)
            unreadable = 0
            for tt, ag, st, reason, dur_b, wait_b, n, dur_sum, wait_sum in read.aggregate or ():
                if reason == _OK:
                    if not resume_tasks:
                        self._count(tt, ag, st, dur_b, dur_sum, wait_b, wait_sum, n)
                    counted += n
                elif reason != _OPEN:
                    unreadable += n if reason.startswith(_UNREADABLE) else 0
                if saved is None:
                    events += self._tally(tt, ag, reason, n, rejects, overflow)
            if saved is not None:
                for tt, ag, st, reason, dur_b, wait_b, n, dur_sum, wait_sum in read.after:
                    events += self._tally(tt, ag, reason, n, rejects, overflow)
                    if resume_tasks and reason == _OK:
                        self._count(tt, ag, st, dur_b, dur_sum, wait_b, wait_sum, n)
                # Of the rows at a saved time, the bulk count took those after the mark: take
                # back the ones the earlier run counted, add the new ones at the mark.
                for (id_, tt, ag, st, raw_fin, reason, dur, wait, dur_b, wait_b,
                     after) in read.at_marks.values():
                    try:
                        fin = _utc(raw_fin)
                    except ValueError:
                        continue  # SQLite placed it in time, Python cannot: as the bulk did
                    if fin is not None and saved.new(id_, fin) != bool(after):
                        sign = -1 if after else 1
                        events += self._tally(tt, ag, reason, sign, rejects, overflow)
                        if resume_tasks and reason == _OK:
                            self._count(tt, ag, st, dur_b, None if dur is None else sign * dur,
                                        wait_b, None if wait is None else sign * wait, sign)
            for id_, reason in read.unreadable:
                self._log_unreadable(id_, reason.removeprefix(_UNREADABLE))
            more = unreadable - len(read.unreadable)  # named above: at most 10
            if more > 0:
                log.warning("task database %s: %d more rows with an unreadable timestamp; "
                            "rejected as bad_timestamps", self._safe_url, more)
            newest = read.newest if counted else None
            self._ready = True
            self._floor = read.floor

        fetched: set[Any] = set()
        added: list[Any] = []
        mark = self._mark
        settled = None if read.initial else self._floor
        for id_, tt, ag, st, raw_fin, reason, dur, wait, dur_b, wait_b, id_hash in read.rows:
            fetched.add(id_)
            if id_ in self._unreadable:
                continue
            try:
                fin = _utc(raw_fin)
            except ValueError as exc:
                if reason != _OPEN and id_ not in self._seen:
                    # No time to place it by: rejected once, remembered by id while read
                    # (and across restarts, with the mark).
                    self._unreadable.add(id_)
                    self._saved_position = None
                    if saved is None or _key(id_) not in saved.unreadable:
                        rejects["bad_timestamps"] += 1
                    self._log_unreadable(id_, "finished_at", exc)
                continue
            assert fin is not None  # the query reads finished_at IS NOT NULL
            if mark is None or fin > mark:
                mark = fin
            if id_ in self._seen:
                if self._hashes[id_] != id_hash:  # the database hashes it differently now
                    self._hash_sum += int(id_hash) - self._hashes[id_]
                    self._hashes[id_] = int(id_hash)
                continue
            if reason == _OPEN:
                continue
            if settled is not None and fin <= settled:
                # At or below the floor, yet returned: stored in another format than the
                # bound (SQLite compares text), so it sorts above its time. It was counted
                # while above the floor or by the start-up aggregate; never count it again.
                continue
            self._seen[id_] = fin
            self._hashes[id_] = int(id_hash)
            self._hash_sum += int(id_hash)
            heapq.heappush(self._heap, (fin, id_))
            added.append(id_)
            new = saved is None or saved.new(id_, fin)
            if reason == _OK:
                if new or not resume_tasks:
                    self._count(tt, ag, st, dur_b, dur, wait_b, wait, 1)
                counted += 1
                if newest is None or fin > newest:
                    newest = fin
            elif reason.startswith(_UNREADABLE):
                self._log_unreadable(id_, reason.removeprefix(_UNREADABLE))
            if new:
                events += self._tally(tt, ag, reason, 1, rejects, overflow)
        if read.full_window:
            # Ids above the floor that are gone (deleted, reopened): forget them.
            for id_ in [i for i in self._seen if i not in fetched]:
                self._forget(id_)
                if id_ in self._top:
                    self._top.discard(id_)
                    self._ahead.discard(id_)
                    self._saved_position = None
            if not self._unreadable <= fetched:
                self._unreadable &= fetched
                self._saved_position = None
        self._advance(mark, now, added)

        current: dict[Any, str] = {}
        for id_, st in read.unfinished_bad:
            current[id_] = "unknown_status" if st is not None and st not in STATUSES \
                else "missing_field"
        for id_, reason in current.items():
            if id_ not in self._unfinished_bad and (
                    saved is None or _key(id_) not in saved.unfinished_bad):
                rejects[reason] += 1
        if self._unfinished_bad != current.keys():
            self._unfinished_bad = set(current)
            self._saved_position = None

        if saved_tasks is not None:
            # Never below what was served before the restart: exact when resumed (this
            # only evens out the float rounding of a sum taken back), a floor otherwise.
            self._floor_at(saved_tasks)

        self._events += events
        self._rejected.update(rejects)
        self._overflowed.update(overflow)
        self._sink.source_totals(SOURCE, self._events, self._rejected, self._overflowed,
                                 None if newest is None or not counted else _epoch(newest),
                                 position=self._position(), resumed=self._resumed,
                                 tasks=self._snapshot(read.open, now))

    def _restore(self, saved: _SavedTasks) -> None:
        """Start the task families from the saved ones (series no longer declared included:
        a served counter does not disappear)."""
        self._totals.update(saved.totals)
        for key, h in saved.duration.items():
            self._duration[key] = _Hist(list(h.buckets), h.sum, h.count)
        for tt, h in saved.wait.items():
            self._wait[tt] = _Hist(list(h.buckets), h.sum, h.count)

    def _floor_at(self, saved: _SavedTasks) -> None:
        """Raise every task-family value to at least its saved one."""
        for key, n in saved.totals.items():
            if self._totals.get(key, 0) < n:
                self._totals[key] = n
        hists: list[tuple[dict[Any, _Hist], dict[Any, _Hist], Sequence[float]]] = [
            (self._duration, saved.duration, _DURATION_BOUNDS),
            (self._wait, saved.wait, _WAIT_BOUNDS)]
        for mine, theirs, bounds in hists:
            for key, s in theirs.items():
                h = mine.get(key)
                if h is None:
                    h = mine[key] = self._new_hist(bounds)
                # Bucket by bucket: every cumulative bucket then is at least both.
                h.buckets = [max(a, b) for a, b in zip(h.buckets, s.buckets, strict=True)]
                h.count = sum(h.buckets)
                h.sum = max(h.sum, s.sum)

    def _position(self) -> dict[str, Any]:
        """What this run has counted into its own counters, for the state file (``_Saved``):
        the mark and the rows at or above it, the rejected rows no time places. Its size
        follows those rows, not the lookback window. The same object until one changes."""
        if self._saved_position is not None:
            return self._saved_position
        seen = self._seen

        def ids(keys: Iterable[Any]) -> list[Any]:
            return sorted(keys, key=str)

        self._saved_position = {
            "mark": None if self._mark is None else self._mark.isoformat(),
            "top": ids([_key(i), seen[i].isoformat()] for i in self._top),
            "unfinished_bad": ids(_key(i) for i in self._unfinished_bad),
            "unreadable": ids(_key(i) for i in self._unreadable),
        }
        return self._saved_position

    def _log_unreadable(self, id_: Any, key: str, exc: BaseException | None = None) -> None:
        column = getattr(self._settings.columns, key)
        why = f" ({exc})" if exc is not None else ""
        log.warning("task database %s: row %s=%r has an unreadable %s%s; rejected as "
                    "bad_timestamps", self._safe_url, self._settings.columns.id, id_, column, why)

    def _advance(self, mark: datetime | None, now: float, added: Iterable[Any]) -> None:
        """Move the mark (capped at now) and the floor behind it; forget settled ids."""
        if mark is None:
            return
        mark = min(mark, _utc_now(now))
        if self._mark is not None and mark < self._mark:
            mark = self._mark
        moved = mark != self._mark
        self._mark = mark
        floor = mark - self._lookback
        if self._floor is None or floor > self._floor:
            self._floor = floor
        heap, seen = self._heap, self._seen
        while heap and heap[0][0] <= self._floor:
            fin, id_ = heapq.heappop(heap)
            if seen.get(id_) == fin:
                self._forget(id_)
        if len(heap) > 2 * len(seen) + 1024:
            self._heap = [(f, i) for i, f in seen.items()]
            heapq.heapify(self._heap)
        if moved:
            # Seen ids at or above the mark were at or above the previous one, or are new.
            self._top = {i for i in (*self._top, *added) if i in seen and seen[i] >= mark}
            self._ahead = {i for i in self._top if seen[i] > mark}
            self._saved_position = None
            return
        # The same mark (and floor): the ids above it are those before and the new ones, so
        # a poll costs what it read, not the rows that finished at the mark.
        grown = [i for i in added if i in seen and seen[i] >= mark]
        if grown:
            self._top.update(grown)
            self._ahead.update(i for i in grown if seen[i] > mark)
            self._saved_position = None

    def _forget(self, id_: Any) -> None:
        """Drop a seen id (below the floor now, or gone from the window)."""
        del self._seen[id_]
        self._hash_sum -= self._hashes.pop(id_)

    def _tally(self, tt: str | None, ag: str | None, reason: str, n: int,
               rejects: Counter[str], overflow: Counter[str]) -> int:
        """Count ``n`` rows into the reader's own counters; returns the rows counted."""
        if reason == _OK:
            types, agents = self._labels.task_types, self._labels.agents
            if tt not in types:
                overflow[types.label] += n
            if ag is not None and ag not in agents:
                overflow[agents.label] += n
            return n
        if reason != _OPEN:
            rejects[_public(reason)] += n
        return 0

    def _count(
        self, tt: str, ag: str | None, st: str, dur_b: int | None, dur: float | None,
        wait_b: int | None, wait: float | None, n: int,
    ) -> None:
        """Count ``n`` terminal rows into the task families."""
        types, agents = self._labels.task_types, self._labels.agents
        t = types.map(tt)
        a = UNASSIGNED if ag is None else agents.map(ag)
        key = (t, a, st)
        self._totals[key] = self._totals.get(key, 0) + n
        if dur_b is not None and dur is not None:
            h = self._duration.get((t, a))
            if h is None:
                h = self._duration[(t, a)] = self._new_hist(_DURATION_BOUNDS)
            h.add(int(dur_b), float(dur), n)
        if wait_b is not None and wait is not None:
            self._wait[t].add(int(wait_b), float(wait), n)

    def _snapshot(self, open_rows: Iterable[Any], now: float) -> TaskDbSnapshot:
        types = self._labels.task_types
        open_counts = {
            (t, s): 0 for t in types.with_other() for s in catalog.OPEN_STATUSES
        }
        oldest = dict.fromkeys(types.with_other(), 0.0)
        for tt, st, n, raw_created in open_rows:
            t = types.map(tt)
            open_counts[(t, st)] += n
            try:
                min_created = _utc(raw_created)
            except ValueError:
                min_created = None  # unreadable: the age cannot be known (SQLite only)
            if min_created is not None:
                oldest[t] = max(oldest[t], now - _epoch(min_created))
        return TaskDbSnapshot(
            totals=dict(self._totals),
            duration={k: h.freeze() for k, h in self._duration.items()},
            wait={k: h.freeze() for k, h in self._wait.items()},
            open=open_counts,
            oldest_open_age=oldest,
        )

    def _set_up(self, up: bool, exc: BaseException | None = None) -> None:
        if up and self._up is False:
            log.info("task database %s: reachable again", self._safe_url)
        elif not up and self._up is not False:
            why = _message(exc) if exc is not None else "unexpected error"
            log.warning(
                "task database %s unavailable (%s); serving the last values, retrying every %gs",
                self._safe_url, why, self._settings.poll_seconds,
            )
        elif not up and exc is not None:
            log.debug("task database %s still unavailable: %s", self._safe_url, _message(exc))
        self._up = up
        self._sink.source_status(SOURCE, up)


__all__ = ["SOURCE", "UNASSIGNED", "Sink", "TaskDbReader"]
