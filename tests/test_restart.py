"""Exactly-once as Prometheus sees it, across ``kill -9``.

A real exporter process is fed by a file writer and a pusher while a scraper records every
value it serves; the process is killed with SIGKILL several times mid-file and mid-push and
started again. Every counter must continue from the last value served (never lower), and at
the end the totals must equal the lines written and the pushed lines acknowledged.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import config_dict, eventually
from tests.servers import ProcessHandle, free_port, http_ok

TOKEN = "test-token-123"
AGENTS = ["lead-qualifier", "email-writer"]


def _line(i: int) -> str:
    return json.dumps({
        "event": "task_result", "agent": AGENTS[i % 2], "task_type": "qualify_lead",
        "outcome": "success" if i % 5 else "failure", "task_id": i, "duration_ms": i % 900,
    })


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        # The exporter's own counters; the process's (process_*, python_gc_*) start over.
        if fam.type not in ("counter", "histogram") or not fam.name.startswith("aicrm_"):
            continue
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Exporter:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = config_dict(
            sources={
                "event_logs": [{"name": "logs", "path": str(tmp / "events" / "*.jsonl")}],
                "push": {"enabled": True},
            },
            exporter={"listen": f"127.0.0.1:{self.port}", "state_dir": str(tmp / "state"),
                      "checkpoint_seconds": 0.5, "poll_seconds": 0.05,
                      "journal_segment_bytes": 65536},
        )
        self.config = tmp / "config.json"
        self.config.write_text(json.dumps(cfg))
        self.handle = ProcessHandle("exporter", tmp)
        self.env = {**os.environ, "AICRM_INGEST_TOKEN": TOKEN}

    def start(self) -> None:
        self.handle.start([sys.executable, "-m", "exporter", "--config", str(self.config)],
                          env=self.env, ready_check=http_ok(self.url + "/healthz"))


def test_kill9_mid_file_and_mid_push_loses_and_repeats_nothing(tmp_path: Path) -> None:
    rng = random.Random(7)
    (tmp_path / "events").mkdir()
    exp = Exporter(tmp_path)
    exp.start()
    stop = threading.Event()
    written = [0]
    acked = [0]
    unacked = [0]
    served: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    regressions: list[str] = []
    lock = threading.Lock()

    def writer() -> None:
        path = tmp_path / "events" / "agents.jsonl"
        with open(path, "a", buffering=1) as f:
            i = 0
            while not stop.is_set() and i < 30000:
                n = rng.randint(1, 200)
                # Half-written lines on purpose: the tail of a line arrives in a later write.
                chunk = "".join(_line(i + k) + "\n" for k in range(n))
                cut = rng.randint(0, len(chunk) - 1)
                f.write(chunk[:cut])
                f.flush()
                time.sleep(0.001)
                f.write(chunk[cut:])
                f.flush()
                i += n
                with lock:
                    written[0] = i
                time.sleep(0.005)

    def pusher() -> None:
        i = 1_000_000
        session = requests.Session()
        while not stop.is_set():
            n = rng.randint(1, 50)
            body = "".join(_line(i + k) + "\n" for k in range(n)).encode()
            i += n
            try:
                r = session.post(exp.url + "/v1/events", data=body, timeout=5,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
            except requests.RequestException:
                with lock:
                    unacked[0] += n
                session.close()
                session = requests.Session()
                time.sleep(0.05)
                continue
            with lock:
                if r.status_code == 200:
                    assert r.json()["accepted"] == n
                    acked[0] += n
                else:
                    unacked[0] += n
        session.close()

    def scraper() -> None:
        while not stop.is_set():
            try:
                values = _scrape(exp.url)
            except requests.RequestException:
                time.sleep(0.02)
                continue
            with lock:
                for k, v in values.items():
                    if v < served.get(k, 0.0):
                        regressions.append(f"{k}: served {served[k]} then {v}")
                    served[k] = max(v, served.get(k, 0.0))
            time.sleep(0.01)

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, pusher, scraper)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            time.sleep(rng.uniform(0.6, 1.5))
            exp.handle.kill9()
            time.sleep(rng.uniform(0.05, 0.3))
            exp.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    # Everything written has been read: wait for the exporter to catch up.
    deadline = time.monotonic() + 30
    while True:
        values = _scrape(exp.url)
        logs = values.get(("aicrm_source_events_total", (("source", "logs"),)), 0)
        push = values.get(("aicrm_source_events_total", (("source", "push"),)), 0)
        if (logs >= written[0] and push >= acked[0]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    exp.handle.stop()

    assert not regressions, regressions[:5]
    assert written[0] > 1000 and acked[0] > 100, (written, acked)
    assert logs == written[0], f"file lines: counted {logs}, written {written[0]}"
    # A batch whose answer was lost in the crash may or may not have been journaled.
    assert acked[0] <= push <= acked[0] + unacked[0], (push, acked, unacked)
    results = sum(v for (name, _), v in values.items()
                  if name == "aicrm_agent_task_results_total")
    assert results == logs + push, "every event counted once in the event metrics too"
    rejected = sum(v for (name, _), v in values.items()
                   if name == "aicrm_source_rejected_events_total")
    assert rejected == 0


FAILURES = "aicrm_exporter_state_write_failures_total"


def _served(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exporter's counters as served, without the count of failed state writes."""
    return {k: v for k, v in _scrape(url).items() if k[0] != FAILURES}


def _failures(url: str) -> float:
    return _scrape(url).get((FAILURES, ()), 0.0)


def test_state_write_failure_serves_only_what_is_on_disk(tmp_path: Path) -> None:
    """While the state file cannot be written, /metrics serves the values last written (a
    restart after kill -9 continues from those, so Prometheus never sees a counter go down),
    counts the failures, and logs them once, not once per scrape; nothing read meanwhile is
    lost. A process that has never written its state answers 503."""
    events = tmp_path / "events"
    events.mkdir()
    log = events / "a.jsonl"
    exp = Exporter(tmp_path)
    exp.start()
    results = ("aicrm_agent_task_results_total",
               (("agent", "lead-qualifier"), ("outcome", "success"), ("task_type", "qualify_lead")))
    try:
        with log.open("a") as f:
            f.writelines(_line(i) + "\n" for i in (2, 4, 6))
        assert eventually(lambda: _served(exp.url).get(results) == 3, 10)
        on_disk = _served(exp.url)
        blocker = tmp_path / "state" / "exporter-state.tmp"
        blocker.mkdir()  # every state write now fails (the temporary file cannot be made)
        with log.open("a") as f:
            f.writelines(_line(i) + "\n" for i in (8, 12, 14, 16, 18))
        eventually(lambda: _failures(exp.url) > 0 or _served(exp.url) != on_disk, 10)
        for _ in range(10):
            assert _served(exp.url) == on_disk
        assert _failures(exp.url) > 0
        exp.handle.kill9()
        assert exp.handle.log_path.read_text().count("cannot write state") == 1
        blocker.rmdir()
        exp.start()
        after = _served(exp.url)
        assert all(after[k] >= v for k, v in on_disk.items())
        assert eventually(lambda: _served(exp.url).get(results) == 8, 10)
    finally:
        exp.handle.stop()

    # Never written (a first start): nothing may be served.
    fresh = tmp_path / "fresh"
    (fresh / "events").mkdir(parents=True)
    (fresh / "state" / "exporter-state.tmp").mkdir(parents=True)
    exp = Exporter(fresh)
    exp.start()
    try:
        assert requests.get(exp.url + "/metrics", timeout=10).status_code == 503
        (fresh / "state" / "exporter-state.tmp").rmdir()
        assert requests.get(exp.url + "/metrics", timeout=10).status_code == 200
    finally:
        exp.handle.stop()


def test_a_second_exporter_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    """Two processes on one state directory would rewrite each other's files: the second start
    stops with an error naming exporter.state_dir and the running one's pid, and touches
    nothing the running one uses, whether it could listen (another port) or not (the same)."""
    (tmp_path / "events").mkdir()
    first = Exporter(tmp_path)
    first.start()
    try:
        index = tmp_path / "state" / "push" / "idempotency.jsonl"
        r = requests.post(first.url + "/v1/events", data=_line(2) + "\n", timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k1"})
        assert r.status_code == 200
        before = index.stat()

        other_port = json.loads(first.config.read_text())
        other_port["exporter"]["listen"] = f"127.0.0.1:{free_port()}"
        other_config = tmp_path / "other-port.json"
        other_config.write_text(json.dumps(other_port))
        for name, config in (("second-other-port", other_config),
                             ("second-same-port", first.config)):
            second = ProcessHandle(name, tmp_path)
            second.start([sys.executable, "-m", "exporter", "--config", str(config)],
                         env=first.env)
            try:
                assert second.process is not None
                assert second.process.wait(30) != 0
            finally:
                second.stop()
            message = second.log_path.read_text()
            assert "exporter.state_dir" in message, message
            assert f"already used by another running exporter, pid {first.handle.pid}" \
                in message, message
            after = index.stat()
            assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)

        # The running one still records its keys where a restart finds them.
        r = requests.post(first.url + "/v1/events", data=_line(4) + "\n", timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k2"})
        assert r.status_code == 200
        assert '"k2"' in index.read_text()
    finally:
        first.handle.stop()
    # Released at exit: the next start works (and so does one after kill -9: the kernel
    # drops the lock with the process).
    first.start()
    first.handle.kill9()
    first.start()
    first.handle.stop()


# --- the state lock on a full disk (in-process) ---------------------------------------------


class _Os:
    """``os`` as exporter.state sees it, with ``write`` and ``ftruncate`` replaced."""

    def __init__(self, fail: BaseException) -> None:
        self._fail = fail

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: object) -> int:
        raise self._fail

    def ftruncate(self, fd: int, length: int) -> None:
        raise self._fail


def _full_disk() -> _Os:
    return _Os(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def _counters(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        if fam.type in ("counter", "histogram") and fam.name.startswith("aicrm_"):
            out.update({(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples})
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_state_lock_is_taken_on_a_full_disk(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The pid in the lock file is only for a second start's message: on a full disk the
    lock is still taken (and refuses a second holder, in this process too), and released."""
    from exporter import state

    fds = _open_fds()
    monkeypatch.setattr(state, "os", _full_disk())
    lock = state.StateLock(tmp_path / "state")
    lock.acquire()
    try:
        with pytest.raises(state.StateDirInUse, match="already used by another running"):
            state.StateLock(tmp_path / "state").acquire()
    finally:
        lock.release()
    assert _open_fds() == fds
    again = state.StateLock(tmp_path / "state")
    again.acquire()
    again.release()
    assert _open_fds() == fds


def test_a_failed_state_lock_acquire_holds_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever stops an acquire after the flock (here an interrupt while writing the pid),
    the descriptor is closed and the lock dropped: a retry in the same process takes it."""
    from exporter import state

    fds = _open_fds()
    with monkeypatch.context() as m:
        m.setattr(state, "os", _Os(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            state.StateLock(tmp_path / "state").acquire()
    assert _open_fds() == fds
    lock = state.StateLock(tmp_path / "state")
    lock.acquire()
    lock.release()


def test_exporter_starts_on_a_full_disk_and_serves_the_last_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/exporter.md: on a full disk the exporter keeps serving the values of the last
    snapshot, a restart included (the lock's pid cannot be written either)."""
    from exporter import state
    from exporter.config import parse_config
    from exporter.runtime import Exporter

    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "a.jsonl").write_text("".join(_line(i) + "\n" for i in (2, 4, 6)))
    cfg = parse_config(config_dict(
        sources={"event_logs": [{"name": "logs", "path": str(tmp_path / "events" / "*.jsonl")}]},
        exporter={"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state")}))

    def start() -> Exporter:
        return Exporter(cfg, registry=CollectorRegistry(auto_describe=False))

    def stop(e: Exporter) -> None:
        e.server.httpd.server_close()
        e.tailer.close()
        e.state_lock.release()

    first = start()
    try:
        first.tailer.poll()
        served = first.render()
    finally:
        stop(first)
    assert _counters(served)[("aicrm_agent_task_results_total", (
        ("agent", "lead-qualifier"), ("outcome", "success"), ("task_type", "qualify_lead")))] == 3

    monkeypatch.setattr(state, "os", _full_disk())  # no state file or lock pid can be written
    (tmp_path / "events" / "a.jsonl").write_text("".join(_line(i) + "\n" for i in (8, 12)))
    second = start()
    try:
        second.tailer.poll()
        # The counters as the last snapshot holds them, not the lines read since.
        now = _counters(second.render())
        assert now.pop((FAILURES, ())) == 1  # the process's own count: not in the snapshot
        assert now == {k: v for k, v in _counters(served).items() if k[0] != FAILURES}
        with pytest.raises(state.StateDirInUse):
            state.StateLock(tmp_path / "state").acquire()
    finally:
        stop(second)
    lock = state.StateLock(tmp_path / "state")
    lock.acquire()
    lock.release()
