"""Wires config, state, sources, the metric store and the HTTP server into one process.

The exporter is a single process that owns all metric state (client_python's multiprocess
mode cannot carry custom collectors); threads: one file tailer, one task database poller,
the HTTP server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from .config import Config, ConfigError, parse_listen
from .metrics import MetricStore
from .server import Handlers, Server
from .sources.files import FileTailer, Watch
from .sources.push import (
    BatchMarker,
    BatchResult,
    IdempotencyIndex,
    Journal,
    ingest_batch,
    validate_batch,
)
from .state import StateFile

log = logging.getLogger(__name__)


class Checkpointer:
    """Persists counters with the read positions they belong to (see state.py)."""

    def __init__(self, store: MetricStore, tailer: FileTailer, state: StateFile,
                 journal: Journal | None):
        self.store, self.tailer, self.state, self.journal = store, tailer, state, journal
        self.saved_version = -1
        self.failures = 0

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
            token = os.environ.get(push.token_env)
            if not token:
                raise ConfigError("environment", [(
                    "sources.push.token_env",
                    f"push is enabled but ${push.token_env} is not set",
                )])
            self.push_token = token
            self.journal = Journal(cfg.exporter.state_dir, cfg.exporter.journal_segment_bytes)
            self.idempotency = IdempotencyIndex(self.journal.dir)

        watches = [Watch(s.name, s.path) for s in cfg.sources.event_logs]
        if self.journal is not None:
            watches.append(self.journal.watch)
        self.tailer = FileTailer(watches, self.store, max_line_bytes=cfg.exporter.max_line_bytes)
        self.checkpointer = Checkpointer(self.store, self.tailer, self.state, self.journal)

        saved = self.state.read()
        if saved is not None:
            self.store.load(saved)
            self.store.load_rebuilt(saved)
            self.tailer.restore(saved.get("positions", []))
            log.info("resumed from %s", self.state.path)

        self.taskdb: Any = None
        if cfg.sources.task_db is not None:
            from .sources.taskdb import TaskDbReader

            self.store.add_source("task_db")
            self.taskdb = TaskDbReader(cfg.sources.task_db, self.store.labels, self.store)

        host, port = parse_listen(cfg.exporter.listen)
        handlers = Handlers(
            metrics=self.render,
            push=self._push if self.journal is not None else None,
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

    # --- HTTP-facing -----------------------------------------------------------------------

    def render(self) -> bytes:
        """Persist, then render what was persisted: a restart never serves lower counters."""
        with self.store.lock:
            try:
                self.checkpointer.checkpoint()
            except OSError:
                log.exception("cannot write state; serving anyway")
            text = self.store.render_text()
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
            try:
                self.checkpointer.checkpoint()
            except OSError:
                log.exception("cannot write state to %s", self.state.path)

    def stop(self) -> None:
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


def _answer(result: BatchResult) -> tuple[int, dict[str, Any]]:
    if result.rejected_total and not result.accepted:
        return 400, {**result.as_dict(), "error": "no line was accepted"}
    return 200, result.as_dict()
