"""Wires config, state, sources, the metric store and the HTTP server into one process.

The exporter is a single process that owns all metric state (client_python's multiprocess
mode cannot carry custom collectors); threads: one file tailer, one task database poller,
the HTTP server.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from . import catalog
from .config import Config, ConfigError, parse_listen
from .metrics import MetricStore
from .server import Handlers, MetricsUnavailable, Server
from .sources.files import FileTailer, Watch
from .sources.push import (
    BatchMarker,
    BatchResult,
    IdempotencyIndex,
    Journal,
    ingest_batch,
    validate_batch,
)
from .state import StateFile, StateLock

log = logging.getLogger(__name__)

STATE_FAILURE_LOG_SECONDS = 60.0
"""While state writes keep failing, the error is logged at most this often."""


class Checkpointer:
    """Persists counters with the read positions they belong to (see state.py)."""

    def __init__(self, store: MetricStore, tailer: FileTailer, state: StateFile,
                 journal: Journal | None):
        self.store, self.tailer, self.state, self.journal = store, tailer, state, journal
        self.saved_version = -1
        self.failures = 0
        """Failed state writes since the process started (served as a counter)."""
        self._failing = False
        self._logged_at = -math.inf
        self._not_logged = 0

    def try_checkpoint(self, clock: Callable[[], float] = time.monotonic) -> bool:
        """``checkpoint``; False if it failed (counted, logged at most once a minute)."""
        try:
            self.checkpoint()
        except OSError as exc:
            self.failures += 1
            self._failing = True
            now = clock()
            if now - self._logged_at >= STATE_FAILURE_LOG_SECONDS:
                more = (f"; {self._not_logged} more failures since the last message"
                        if self._not_logged else "")
                log.error("cannot write state to %s (%s); serving the values last written, "
                          "retrying%s", self.state.path, exc, more)
                self._logged_at, self._not_logged = now, 0
            else:
                self._not_logged += 1
            return False
        if self._failing:
            self._failing = False
            log.warning("state written to %s again after %d failed writes", self.state.path,
                        self.failures)
        return True

    def checkpoint(self) -> None:
        """Write a snapshot if anything changed. Raises OSError if it cannot be written."""
        with self.store.lock:
            if self.store.version == self.saved_version:
                return
            version = self.store.version
            data = self.store.dump()
            data["positions"] = positions = self.tailer.positions()
            self.state.write(data)
            self.saved_version = version
        if self.journal is not None:
            self.journal.release(positions)


class Exporter:
    def __init__(self, cfg: Config, *, registry: CollectorRegistry | None = None):
        self.cfg = cfg
        # First of all: one process per state directory. A second one would rewrite the
        # files the first appends to (the idempotency index, the state file), losing data.
        self.state_lock = StateLock(cfg.exporter.state_dir)
        try:
            self.state_lock.acquire()  # a failed acquire holds nothing; release() is a no-op
            self._init(cfg, registry)
        except BaseException:
            server: Server | None = getattr(self, "server", None)
            if server is not None:
                server.httpd.server_close()
            self.state_lock.release()
            raise

    def _init(self, cfg: Config, registry: CollectorRegistry | None) -> None:
        self.store = MetricStore(cfg)
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.registry.register(self.store)
        # The process's own health, as every client_python exporter serves it (CPU, resident
        # memory, open descriptors against the limit, start time, the Python version and its
        # garbage collector): the stack health dashboard and a leak's alert read them.
        self.process_registry = CollectorRegistry(auto_describe=False)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.process_registry)
        self.state = StateFile(cfg.exporter.state_dir)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self._last_checkpoint = 0.0

        push = cfg.sources.push
        self.push_token: str | None = None
        self.journal: Journal | None = None
        self.idempotency: IdempotencyIndex | None = None
        if push.enabled:
            raw = os.environ.get(push.token_env)
            # Surrounding white space is not part of a token (a secret mounted from a file
            # ends with a newline, which no client sends). Never quote the value.
            token = (raw or "").strip()
            if not token:
                why = "is not set" if raw is None else "is empty (or only white space)"
                raise ConfigError("environment", [(
                    "sources.push.token_env", f"push is enabled but ${push.token_env} {why}",
                )])
            self.push_token = token

        # Listen before any state file is touched: a start that cannot (the port is taken,
        # e.g. by a copy already running) changes nothing on disk.
        host, port = parse_listen(cfg.exporter.listen)
        handlers = Handlers(
            metrics=self.render,
            push=self._push if push.enabled else None,
            push_token=self.push_token,
            max_body_bytes=push.max_body_bytes,
            health=self.health,
            count_push=self.store.push_request,
        )
        try:
            self.server = Server(host, port, handlers)
        except OSError as exc:  # address in use, unknown host name, no IPv6, ...
            raise OSError(f"exporter.listen: cannot listen on {cfg.exporter.listen}: "
                          f"{exc.strerror or exc}") from exc

        if push.enabled:
            self.journal = Journal(cfg.exporter.state_dir, cfg.exporter.journal_segment_bytes)
            self.idempotency = IdempotencyIndex(self.journal.dir)

        watches = [Watch(s.name, s.path) for s in cfg.sources.event_logs]
        if self.journal is not None:
            watches.append(self.journal.watch)
        self.tailer = FileTailer(watches, self.store, max_line_bytes=cfg.exporter.max_line_bytes)
        self.checkpointer = Checkpointer(self.store, self.tailer, self.state, self.journal)
        self.process_registry.register(_StateWriteFailures(self.checkpointer))
        self._persisted: bytes | None = None
        """The rendering of the values last written to the state file: served while a write
        fails (None: nothing written yet, /metrics answers 503)."""

        saved = self.state.read()
        if saved is not None:
            self.store.load(saved)
            self.store.load_rebuilt(saved)
            self.tailer.restore(saved.get("positions", []))
            self._persisted = self.store.render_text()  # exactly what the file holds
            log.info("resumed from %s", self.state.path)

        self.taskdb: Any = None
        if cfg.sources.task_db is not None:
            from .sources.taskdb import TaskDbReader

            self.store.add_source("task_db")
            self.taskdb = TaskDbReader(cfg.sources.task_db, self.store.labels, self.store)

    # --- HTTP-facing -----------------------------------------------------------------------

    def render(self) -> bytes:
        """Persist, then render what was persisted: a restart never serves lower counters.
        If the state cannot be written, serve what was last written (the values a restart
        would continue from), or nothing (MetricsUnavailable: 503) if nothing was."""
        with self.store.lock:
            if self.checkpointer.try_checkpoint():
                text = self._persisted = self.store.render_text()
            elif self._persisted is None:
                raise MetricsUnavailable(
                    f"cannot write the state file {self.state.path}; no values written yet")
            else:
                text = self._persisted
        return text + generate_latest(self.process_registry)

    def _push(self, body: bytes, key: str | None = None) -> tuple[int, dict[str, Any], bool]:
        """(status, answer, replayed): with an Idempotency-Key, a batch already answered gets
        its first answer again and is not journaled twice."""
        if key is None or self.idempotency is None:
            return (*self._apply_batch(body), False)
        return self.idempotency.run(key, body, lambda marker: self._apply_batch(body, marker),
                                    lambda: self._replay_batch(body))

    def _apply_batch(self, body: bytes, marker: BatchMarker | None = None
                     ) -> tuple[int, dict[str, Any]]:
        assert self.journal is not None
        try:
            result = ingest_batch(body, self.journal, self.store, marker=marker,
                                  max_line_bytes=self.cfg.exporter.max_line_bytes)
        except OSError as exc:
            log.error("push journal write failed: %s", exc)
            return 503, {"error": "could not store the batch durably; retry"}
        return _answer(result)

    def _replay_batch(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The answer of a batch already journaled (recovered after a crash), counting
        nothing again: its rejects are counted from its marker by the file source."""
        result, _ = validate_batch(body, max_line_bytes=self.cfg.exporter.max_line_bytes)
        return _answer(result)

    def health(self) -> tuple[bool, dict[str, Any]]:
        states = self.store.source_states()
        return all(states.values()), {"sources": {k: int(v) for k, v in states.items()}}

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()
        self._thread("files", self.tailer.run, self.stop_event,
                     self.cfg.exporter.poll_seconds, self._periodic)
        if self.taskdb is not None:
            self._thread("task_db", self.taskdb.run, self.stop_event)
        log.info("listening on %s", self.cfg.exporter.listen)

    def _thread(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_checkpoint >= self.cfg.exporter.checkpoint_seconds:
            self._last_checkpoint = now
            self.checkpointer.try_checkpoint()

    def stop(self) -> None:
        try:
            self.stop_event.set()
            self.server.stop()
            for t in self.threads:
                t.join(timeout=10)
            try:
                self.checkpointer.checkpoint()
            except OSError:
                log.exception("final state write failed")
            self.tailer.close()
            if self.journal is not None:
                self.journal.close()
            if self.idempotency is not None:
                self.idempotency.close()
        finally:
            self.state_lock.release()


class _StateWriteFailures(Collector):
    """``aicrm_exporter_state_write_failures_total``: served with the process's own series,
    outside the stored values (which are what a failing write cannot refresh)."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def collect(self) -> Iterator[CounterMetricFamily]:
        spec = catalog.STATE_WRITE_FAILURES
        m = CounterMetricFamily(spec.base_name, spec.help)
        m.add_metric([], float(self.checkpointer.failures))
        yield m


def _answer(result: BatchResult) -> tuple[int, dict[str, Any]]:
    if result.rejected_total and not result.accepted:
        return 400, {**result.as_dict(), "error": "no line was accepted"}
    return 200, result.as_dict()
