"""JSONL event files: following, rotation, truncation, restarts and bad lines."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from exporter import catalog as c
from exporter.config import parse_config
from exporter.metrics import MetricStore
from exporter.sources import files
from exporter.sources.files import FileTailer, Watch
from exporter.state import StateFile

MAX_LINE = 1024
SOURCE = "agent-logs"
CONFIG: dict[str, Any] = {
    "agents": [{"name": "qualifier"}, {"name": "writer"}],
    "task_types": [{"name": "qualify_lead"}],
    "integrations": [{"platform": "salesforce", "operations": ["query"]}],
    "models": ["gpt-4o"],
    "tools": ["crm.search"],
    "channels": ["web"],
}

_ids = iter(range(1, 1_000_000))


def event(**fields: Any) -> bytes:
    """A valid task_result line (no newline); each one differs from the others."""
    body: dict[str, Any] = {
        "event": "task_result", "agent": "qualifier", "task_type": "qualify_lead",
        "outcome": "success", "task_id": f"t-{next(_ids)}",
    }
    body.update(fields)
    return json.dumps(body).encode()


def lines(n: int, **fields: Any) -> bytes:
    return b"".join(event(**fields) + b"\n" for _ in range(n))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, pattern: str, clock: Clock, max_line_bytes: int = MAX_LINE,
                 source: str = SOURCE, max_open_files: int | None = None):
        self.pattern = pattern
        self.clock = clock
        self.max_line_bytes = max_line_bytes
        self.source = source
        self.max_open_files = max_open_files
        self.store = MetricStore(parse_config(CONFIG))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.store)
        self.tailer = self.new_tailer()

    def new_tailer(self) -> FileTailer:
        if self.max_open_files is None:
            return FileTailer([Watch(self.source, self.pattern)], self.store,
                              max_line_bytes=self.max_line_bytes, clock=self.clock)
        return FileTailer([Watch(self.source, self.pattern)], self.store,
                          max_line_bytes=self.max_line_bytes, clock=self.clock,
                          max_open_files=self.max_open_files)

    def poll(self) -> int:
        return self.tailer.poll()

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def results(self, agent: str = "qualifier", outcome: str = "success") -> float:
        return self.value(c.AGENT_TASK_RESULTS.name, agent=agent, task_type="qualify_lead",
                          outcome=outcome)

    def accepted(self) -> float:
        return self.value(c.SOURCE_EVENTS.name, source=self.source)

    def rejected(self, reason: str) -> float:
        return self.value(c.SOURCE_REJECTED.name, source=self.source, reason=reason)

    def up(self) -> float | None:
        return self.registry.get_sample_value(c.SOURCE_UP.name, {"source": self.source})

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in self.registry.collect() for s in m.samples
        }

    def checkpoint(self) -> dict[str, Any]:
        with self.store.lock:
            data = self.store.dump()
            data["positions"] = self.tailer.positions()
        return data


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def h(logs: Path, clock: Clock) -> Iterator[Harness]:
    harness = Harness(str(logs / "*.jsonl"), clock)
    yield harness
    harness.tailer.close()


# --- following -----------------------------------------------------------------------------


def test_appended_lines_are_read_on_the_next_poll(h: Harness, logs: Path) -> None:
    log = logs / "app.jsonl"
    append(log, lines(3))
    assert h.poll() == 3
    assert h.results() == 3 and h.accepted() == 3
    assert h.poll() == 0
    append(log, lines(2, outcome="failure"))
    h.poll()
    assert (h.results(), h.results(outcome="failure"), h.accepted()) == (3, 2, 5)


def test_new_matching_files_are_picked_up_and_others_ignored(h: Harness, logs: Path) -> None:
    append(logs / "a.jsonl", lines(1))
    h.poll()
    append(logs / "b.jsonl", lines(2))
    append(logs / "b.jsonl.1", lines(4))
    append(logs / "notes.txt", lines(8))
    (logs / "sub.jsonl").mkdir()
    h.poll()
    assert h.accepted() == 3
    assert sorted(os.path.basename(t.path) for t in h.tailer.files.values()) == [
        "a.jsonl", "b.jsonl"]


def test_half_written_line_waits_for_its_newline(h: Harness, logs: Path) -> None:
    log = logs / "app.jsonl"
    whole = event()
    append(log, lines(1) + whole[:25])
    h.poll()
    assert h.accepted() == 1
    append(log, whole[25:])
    h.poll()
    assert h.accepted() == 1
    append(log, b"\n")
    h.poll()
    h.poll()
    assert h.accepted() == 2 and h.results() == 2
    assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0


def test_blank_lines_are_ignored_and_crlf_accepted(h: Harness, logs: Path) -> None:
    append(logs / "app.jsonl", b"\n   \n" + event() + b"\r\n\r\n" + event() + b"\n")
    h.poll()
    assert h.accepted() == 2
    assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0


# --- rotation and truncation ---------------------------------------------------------------


def test_rotation_by_rename_counts_every_line_once(
    h: Harness, logs: Path, clock: Clock
) -> None:
    log, rotated = logs / "app.jsonl", logs / "app.jsonl.1"
    writer = open(log, "ab")  # noqa: SIM115 - a writer that keeps its descriptor across rename
    try:
        writer.write(lines(2))
        writer.flush()
        h.poll()
        os.rename(log, rotated)
        writer.write(lines(1))  # late write by the old writer, into the renamed file
        writer.flush()
        append(log, lines(3, agent="writer"))
        h.poll()
        assert (h.results(), h.results("writer")) == (3, 3)
        clock.now += files.ROTATED_GRACE_SECONDS - 1
        writer.write(lines(1))  # still within the grace period
        writer.flush()
        h.poll()
        assert h.results() == 4
        clock.now += 2
        h.poll()
        assert [os.path.basename(t.path) for t in h.tailer.files.values()] == ["app.jsonl"]
        writer.write(lines(1))  # after the grace period the renamed file is let go
        writer.flush()
    finally:
        writer.close()
    append(log, lines(1, agent="writer"))
    h.poll()
    h.poll()
    assert (h.results(), h.results("writer"), h.accepted()) == (4, 4, 8)


def test_rotation_within_the_glob_does_not_reread(logs: Path, clock: Clock) -> None:
    h = Harness(str(logs / "*.jsonl*"), clock)
    try:
        log = logs / "app.jsonl"
        append(log, lines(2))
        h.poll()
        os.rename(log, logs / "app.jsonl.1")
        append(logs / "app.jsonl.1", lines(1))
        append(log, lines(2, agent="writer"))
        h.poll()
        clock.now += files.ROTATED_GRACE_SECONDS * 3
        h.poll()
        assert (h.results(), h.results("writer")) == (3, 2)
        os.rename(logs / "app.jsonl.1", logs / "app.jsonl.2")
        os.rename(log, logs / "app.jsonl.1")
        append(log, lines(1, agent="writer"))
        h.poll()
        h.poll()
        assert (h.results(), h.results("writer"), h.accepted()) == (3, 3, 6)
        assert len(h.tailer.files) == 3
    finally:
        h.tailer.close()


def test_rotation_between_finding_and_opening_a_file_reads_each_file_once(
    logs: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logrotate renames the file and creates a new one after the tailer found the name and
    before it opened it: the handle it gets is the new file's, so that is the file tracked."""
    h = Harness(str(logs / "*.jsonl*"), clock)
    log = logs / "app.jsonl"
    append(log, lines(3))
    real_open = open

    def rotating_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == str(log) and not (logs / "app.jsonl.1").exists():
            os.rename(log, logs / "app.jsonl.1")
            append(log, lines(5, agent="writer"))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", rotating_open, raising=False)
    try:
        for _ in range(3):
            h.poll()
        assert (h.results(), h.results("writer"), h.accepted()) == (3, 5, 8)
        tracked = sorted((os.path.basename(t.path), t.key) for t in h.tailer.files.values())
        assert [name for name, _ in tracked] == ["app.jsonl", "app.jsonl.1"]
        for name, key in tracked:
            st = os.stat(logs / name)
            assert key == f"{st.st_dev}:{st.st_ino}"
    finally:
        h.tailer.close()


def test_copytruncate_reads_the_new_content_once(h: Harness, logs: Path) -> None:
    log = logs / "app.jsonl"
    append(log, lines(3))
    h.poll()
    os.truncate(log, 0)
    append(log, lines(1, agent="writer"))
    h.poll()
    h.poll()
    assert (h.results(), h.results("writer")) == (3, 1)


def test_copytruncate_then_more_bytes_than_before_is_still_noticed(
    h: Harness, logs: Path
) -> None:
    log = logs / "app.jsonl"
    append(log, lines(1))
    h.poll()
    os.truncate(log, 0)
    append(log, lines(3, agent="writer"))
    h.poll()
    h.poll()
    assert (h.results(), h.results("writer")) == (1, 3)
    assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0


# --- restarts ------------------------------------------------------------------------------


def _restart(h: Harness, state_dir: Path, edit: Any = None, source: str | None = None
             ) -> Harness:
    """Checkpoint, stop, and resume from the saved state in a new store and tailer (whose
    watch may be named ``source`` now)."""
    state = StateFile(state_dir)
    state.write(h.checkpoint())
    h.tailer.close()
    saved = state.read()
    assert saved is not None
    if edit is not None:
        edit(saved["positions"])
    h2 = Harness(h.pattern, h.clock, h.max_line_bytes, source or h.source)
    h2.store.load(saved)
    h2.tailer.restore(saved["positions"])
    return h2


def test_restart_neither_recounts_nor_skips(h: Harness, logs: Path, tmp_path: Path) -> None:
    log = logs / "app.jsonl"
    half = event()
    append(log, lines(3) + half[:10])
    append(logs / "other.jsonl", lines(1, agent="writer"))
    h.poll()
    h2 = _restart(h, tmp_path / "state")
    try:
        append(log, half[10:] + b"\n" + lines(1))  # written while the exporter was down
        append(logs / "new.jsonl", lines(2, agent="writer"))
        h2.poll()
        assert (h2.results(), h2.results("writer"), h2.accepted()) == (5, 3, 8)
        append(log, lines(1))
        h2.poll()
        assert (h2.results(), h2.accepted()) == (6, 9)
    finally:
        h2.tailer.close()


def test_restart_keeps_positions_of_files_not_seen_yet(
    logs: Path, tmp_path: Path, clock: Clock
) -> None:
    h = Harness(str(logs / "*.jsonl"), clock)
    append(logs / "app.jsonl", lines(2))
    h.poll()
    h2 = _restart(h, tmp_path / "state")
    h2.tailer.watches = []  # a run that does not get to this file before its next checkpoint
    h3 = _restart(h2, tmp_path / "state")
    try:
        h3.poll()
        assert h3.results() == 2
    finally:
        h3.tailer.close()


def test_positions_of_files_no_run_finds_are_forgotten_after_30_days(
    logs: Path, tmp_path: Path, clock: Clock
) -> None:
    """A file renamed out of the glob while the exporter was stopped is never found again; its
    saved position is kept across restarts, with the time it was first missed, for 30 days."""
    h = Harness(str(logs / "*.jsonl"), clock)
    append(logs / "app.jsonl", lines(2))
    append(logs / "kept.jsonl", lines(1))
    h.poll()
    h.tailer.close()
    (logs / "app.jsonl").rename(tmp_path / "app.jsonl.archived")
    h2 = _restart(h, tmp_path / "state")
    h2.poll()
    assert sorted(p["path"].rsplit("/", 1)[1] for p in h2.tailer.positions()) == [
        "app.jsonl", "kept.jsonl"]
    clock.now += 29 * 86400
    h3 = _restart(h2, tmp_path / "state")  # the first-missed time survives the restart
    h3.poll()
    assert len(h3.tailer.positions()) == 2
    clock.now += 2 * 86400
    h3.poll()
    assert [p["path"].rsplit("/", 1)[1] for p in h3.tailer.positions()] == ["kept.jsonl"]
    h4 = _restart(h3, tmp_path / "state")
    try:
        h4.poll()
        assert [p["path"].rsplit("/", 1)[1] for p in h4.tailer.positions()] == ["kept.jsonl"]
        assert h4.results() == 3  # nothing counted again
    finally:
        h4.tailer.close()


def test_reused_inode_is_read_from_the_start(h: Harness, logs: Path, tmp_path: Path) -> None:
    log = logs / "app.jsonl"
    append(log, lines(3))
    h.poll()

    def other_file(positions: list[dict[str, Any]]) -> None:
        (p,) = positions
        p["fingerprint"] = "0" * len(p["fingerprint"])

    h2 = _restart(h, tmp_path / "state", other_file)
    try:
        append(log, lines(1))
        h2.poll()
        assert h2.results() == 3 + 4
    finally:
        h2.tailer.close()


def test_renaming_a_source_keeps_the_read_positions_of_its_files(
    h: Harness, logs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The event metrics are not per source: a file that a renamed source finds again is
    read on from its position, not counted a second time from its start."""
    log = logs / "app.jsonl"
    append(log, lines(3))
    h.poll()
    h2 = _restart(h, tmp_path / "state", source="agent_logs")
    try:
        caplog.set_level(logging.INFO, logger=files.__name__)
        append(log, lines(1))
        h2.poll()
        assert (h2.results(), h2.accepted()) == (4, 1)
        assert [p["source"] for p in h2.tailer.positions()] == ["agent_logs"]
        assert any("agent-logs" in r.getMessage() and "agent_logs" in r.getMessage()
                   for r in caplog.records)
    finally:
        h2.tailer.close()


# --- bad lines -----------------------------------------------------------------------------

BAD_LINES = [
    (b'{"event": "handoff", "from_agent": "qualifier\xff", "to_agent": "writer"}',
     "invalid_utf8"),
    (b"\xfe\xff\x00{}", "invalid_utf8"),
    (b'{"event": "handoff", "from_agent": "qualifier", "to_agent": "writer", "x": "\xc3"}',
     "invalid_utf8"),
    (b'{"event": "task_result", "agent": "qualifier"', "invalid_json"),
    (b"not json at all", "invalid_json"),
    (b'{"event": "handoff", "from_agent": "qualifier", "to_agent": "writer"} {}',
     "invalid_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"task_result"', "not_object"),
    (b"42", "not_object"),
    (b'{"event": "page_view", "agent": "qualifier"}', "unknown_event"),
    (b'{"agent": "qualifier", "task_type": "qualify_lead", "outcome": "success"}',
     "missing_field"),
    (b'{"event": "task_result", "agent": "qualifier", "outcome": "success"}', "missing_field"),
    (b'{"event": "llm_call", "agent": "qualifier"}', "missing_field"),
    (b'{"event": 7}', "wrong_type"),
    (b'{"event": "task_result", "agent": 1, "task_type": "qualify_lead", '
     b'"outcome": "success"}', "wrong_type"),
    (b'{"event": "llm_call", "agent": "qualifier", "model": "gpt-4o", '
     b'"input_tokens": "12"}', "wrong_type"),
    (b'{"event": "llm_call", "agent": "qualifier", "model": "gpt-4o", '
     b'"input_tokens": 1.5}', "wrong_type"),
    (b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
     b'"outcome": "success", "ts": "yesterday"}', "wrong_type"),
    (b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
     b'"outcome": "success", "duration_ms": -5}', "out_of_range"),
    (b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
     b'"outcome": "success", "retries": -1}', "out_of_range"),
    (b'{"event": "llm_call", "agent": "qualifier", "model": "gpt-4o", '
     b'"cost_usd": -0.01}', "out_of_range"),
    (b'{"event": "llm_call", "agent": "qualifier", "model": "gpt-4o", '
     b'"output_tokens": -3}', "out_of_range"),
    (b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
     b'"outcome": "done"}', "out_of_range"),
    (b'{"event": "interaction", "channel": "web", "type": "message", "rating": 6}',
     "out_of_range"),
    (b'{"event": "integration_call", "platform": "salesforce", "operation": "query", '
     b'"status": 999}', "out_of_range"),
    (b'{"event": "handoff", "from_agent": "", "to_agent": "writer"}', "out_of_range"),
    (b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
     b'"outcome": "success", "pad": "' + b"x" * MAX_LINE + b'"}', "line_too_long"),
    # Epoch milliseconds where seconds belong, and a date far ahead: no real event time.
    (b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
     b'"outcome": "success", "ts": 1700000000000}', "out_of_range"),
    (b'{"event": "handoff", "from_agent": "qualifier", "to_agent": "writer", '
     b'"ts": "2999-01-01T00:00:00Z"}', "out_of_range"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES,
                         ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD_LINES)])
def test_bad_line_is_rejected_by_reason_and_changes_nothing_else(
    h: Harness, logs: Path, line: bytes, reason: str
) -> None:
    assert reason in c.REJECT_REASONS
    log = logs / "app.jsonl"
    append(log, lines(1))
    h.poll()
    before = h.samples()
    append(log, line + b"\n")
    h.poll()
    after = h.samples()
    key = (c.SOURCE_REJECTED.name, (("reason", reason), ("source", SOURCE)))
    assert after[key] == before[key] + 1
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {key}
    append(log, lines(1))
    h.poll()
    assert h.results() == 2 and h.rejected(reason) == 1


def test_rejected_lines_are_logged_with_file_and_line_number(
    h: Harness, logs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logs / "app.jsonl"
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        append(log, lines(1) + b"{oops\n" + lines(1) + b'{"event": "nope"}\n')
        h.poll()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{log}:2: invalid_json" in m for m in messages)
    assert any(f"{log}:4: unknown_event" in m for m in messages)
    assert h.results() == 2


def test_huge_line_with_its_newline_is_rejected_once(h: Harness, logs: Path) -> None:
    append(logs / "app.jsonl", b"x" * (5 * MAX_LINE) + b"\n" + lines(1))
    h.poll()
    h.poll()
    assert (h.rejected("line_too_long"), h.results()) == (1, 1)


def test_huge_line_without_its_newline_is_rejected_once(h: Harness, logs: Path) -> None:
    log = logs / "app.jsonl"
    append(log, lines(1) + b'{"event": "task_result", "pad": "' + b"y" * MAX_LINE)
    h.poll()
    assert (h.rejected("line_too_long"), h.results()) == (1, 1)
    append(log, b"z" * (3 * MAX_LINE))
    h.poll()
    append(log, b'"}')
    h.poll()
    assert h.rejected("line_too_long") == 1
    append(log, b"\n" + lines(1))
    h.poll()
    h.poll()
    assert (h.rejected("line_too_long"), h.results()) == (1, 2)
    assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 1


def test_half_written_line_of_exactly_the_limit_is_accepted(h: Harness, logs: Path) -> None:
    log = logs / "app.jsonl"
    start = event()[:-1] + b', "pad": "'
    line = start + b"p" * (MAX_LINE - len(start) - 2) + b'"}'
    assert len(line) == MAX_LINE
    append(log, line)
    h.poll()
    append(log, b"\n")
    h.poll()
    assert (h.results(), h.rejected("line_too_long")) == (1, 0)


def test_undeclared_label_values_become_other(h: Harness, logs: Path) -> None:
    append(logs / "app.jsonl", lines(2, agent="ghost") + lines(1, task_type="mystery")
           + b'{"event": "tool_call", "agent": "qualifier", "tool": "web.fetch"}\n')
    h.poll()
    other = h.value(c.AGENT_TASK_RESULTS.name, agent="other", task_type="qualify_lead",
                    outcome="success")
    assert other == 2
    assert h.value(c.AGENT_TASK_RESULTS.name, agent="qualifier", task_type="other",
                   outcome="success") == 1
    assert h.value(c.AGENT_TOOL_CALLS.name, agent="qualifier", tool="other",
                   outcome="success") == 1
    assert h.value(c.LABEL_OVERFLOW.name, label="agent") == 2
    assert h.value(c.LABEL_OVERFLOW.name, label="task_type") == 1
    assert h.value(c.LABEL_OVERFLOW.name, label="tool") == 1
    assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0


# --- health and I/O errors -----------------------------------------------------------------


def test_source_up_follows_the_directory(h: Harness, logs: Path, tmp_path: Path,
                                         clock: Clock) -> None:
    assert h.up() == 0  # declared before the first poll
    h.poll()
    assert h.up() == 1
    missing = Harness(str(tmp_path / "missing" / "*.jsonl"), clock)
    afile = tmp_path / "plain"
    afile.write_text("x")
    under_file = Harness(str(afile / "*.jsonl"), clock)
    try:
        missing.poll()
        under_file.poll()
        assert missing.up() == 0 and under_file.up() == 0
        (tmp_path / "missing").mkdir()
        append(tmp_path / "missing" / "late.jsonl", lines(1))
        missing.poll()
        assert missing.up() == 1 and missing.results() == 1
    finally:
        missing.tailer.close()
        under_file.tailer.close()


class LockCheckedDict(dict[str, Any]):
    """Records each change and whether the thread making it held ``lock`` (another thread
    tries to take it), since a scrape snapshots positions under that lock."""

    def __init__(self, lock: Any, *args: Any) -> None:
        super().__init__(*args)
        self.lock = lock
        self.changes: list[tuple[str, bool]] = []

    def _note(self, what: str) -> None:
        taken: list[bool] = []

        def probe() -> None:
            got = self.lock.acquire(blocking=False)
            if got:
                self.lock.release()
            taken.append(got)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        self.changes.append((what, not taken[0]))

    def __setitem__(self, key: str, value: Any) -> None:
        self._note("set")
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._note("del")
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        self._note("pop")
        return super().pop(key, *default)


def test_tracked_files_change_only_under_the_store_lock(
    h: Harness, logs: Path, tmp_path: Path, clock: Clock
) -> None:
    """A scrape iterates the tracked files under the store's lock: the tailer must not add or
    drop one without it (the iteration would fail), nor hand a saved position over to its
    file in two steps a snapshot could fall between (the position would be lost)."""
    append(logs / "app.jsonl", lines(2))
    h.poll()
    h2 = _restart(h, tmp_path / "state")
    try:
        t = h2.tailer
        t.files = LockCheckedDict(h2.store.lock, t.files)  # type: ignore[assignment]
        t._saved = LockCheckedDict(h2.store.lock, t._saved)  # type: ignore[assignment]
        append(logs / "new.jsonl", lines(1))
        h2.poll()  # app.jsonl resumes from its saved position, new.jsonl is new
        os.unlink(logs / "app.jsonl")
        h2.poll()
        clock.now += files.ROTATED_GRACE_SECONDS + 1
        h2.poll()  # app.jsonl is let go
        changes = t.files.changes + t._saved.changes  # type: ignore[attr-defined]
        assert {what for what, _ in changes} == {"set", "del", "pop"}
        assert [what for what, locked in changes if not locked] == []
        assert h2.results() == 3
    finally:
        h2.tailer.close()


class FailingReads:
    """A file handle whose reads fail like a disk or network filesystem error."""

    def __init__(self, fh: Any):
        self.fh = fh

    def fileno(self) -> int:
        return int(self.fh.fileno())

    def seek(self, *args: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def read(self, *args: Any) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    def close(self) -> None:
        self.fh.close()


def test_io_errors_never_escape_a_poll(h: Harness, logs: Path) -> None:
    bad, good = logs / "a.jsonl", logs / "b.jsonl"
    append(bad, lines(1))
    append(good, lines(1, agent="writer"))
    h.poll()
    (tracked,) = [t for t in h.tailer.files.values() if t.path == str(bad)]
    real = tracked.fh
    tracked.fh = FailingReads(real)  # type: ignore[assignment]
    append(bad, lines(2))
    append(good, lines(2, agent="writer"))
    h.poll()  # must not raise, and must still read the healthy file
    assert (h.results(), h.results("writer")) == (1, 3)
    tracked.fh = real
    h.poll()
    assert (h.results(), h.results("writer")) == (3, 3)
    assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0


def test_deleted_file_is_let_go_after_the_grace_period(
    h: Harness, logs: Path, clock: Clock
) -> None:
    log = logs / "app.jsonl"
    append(log, lines(1))
    h.poll()
    os.unlink(log)
    h.poll()
    clock.now += files.ROTATED_GRACE_SECONDS + 1
    h.poll()
    assert h.tailer.files == {} and h.up() == 1
    assert h.tailer.positions() == []



def test_unfinished_line_of_a_rotated_file_is_rejected_when_let_go(logs: Path,
                                                                    clock: Clock) -> None:
    h = Harness(str(logs / "*.jsonl"), clock)
    path = logs / "a.jsonl"
    path.write_bytes(lines(1) + b'{"event":"task_res')
    h.poll()
    path.rename(logs / "a.jsonl.1")
    h.poll()
    assert h.rejected("invalid_json") == 0  # a late write could still finish it
    clock.now += files.ROTATED_GRACE_SECONDS + 1
    h.poll()
    assert h.rejected("invalid_json") == 1
    assert h.accepted() == 1
    assert h.tailer.files == {}
    h.tailer.close()


# --- files that come back, event time, open handles, copies, error logs ---------------------


def test_directory_moved_away_and_back_is_not_read_again(
    logs: Path, tmp_path: Path, clock: Clock
) -> None:
    """A tracked file that is away from the glob for longer than the grace period (its
    directory renamed away and back, a share that was unreachable) is let go, but its
    position is kept: when the same file comes back it reads on, not from its start."""
    h = Harness(str(logs / "*.jsonl"), clock)
    try:
        append(logs / "app.jsonl", lines(100))
        h.poll()
        away = tmp_path / "logs.away"
        os.rename(logs, away)
        append(away / "app.jsonl", lines(1))  # a late write, drained while it is still held
        for _ in range(3):
            clock.now += 3
            h.poll()
        assert h.tailer.files == {}
        assert [p["path"].rsplit("/", 1)[1] for p in h.tailer.positions()] == ["app.jsonl"]
        append(away / "app.jsonl", lines(2))  # written while it is away
        os.rename(away, logs)
        h.poll()
        assert (h.results(), h.accepted()) == (103, 103)
        append(logs / "app.jsonl", lines(1))
        h.poll()
        assert (h.results(), h.accepted()) == (104, 104)
    finally:
        h.tailer.close()


def test_listing_that_fails_for_a_while_does_not_recount(
    h: Harness, logs: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glob returns [] when it cannot list the directory (a network share's hiccup)."""
    append(logs / "app.jsonl", lines(5))
    h.poll()
    with monkeypatch.context() as m:
        m.setattr(files.glob, "glob", lambda pattern: [])
        for _ in range(4):
            clock.now += 2
            h.poll()
    h.poll()
    assert h.results() == 5


def test_lag_follows_the_newest_event_and_ts_less_events_are_lag_0(
    logs: Path, clock: Clock
) -> None:
    clock.now = time.time()  # the store's clock is the wall clock
    h = Harness(str(logs / "*.jsonl"), clock)
    log = logs / "app.jsonl"

    def lag() -> float:
        return h.value(c.SOURCE_LAG.name, source=SOURCE)

    try:
        append(log, lines(1, ts=time.time() - 3600))
        h.poll()
        assert 3599 < lag() < 3700
        append(log, lines(5))  # no ts: ingested now
        h.poll()
        assert lag() == 0
        append(log, lines(1, ts=time.time() - 3600))
        h.poll()
        assert lag() > 3599
        # The newest of the batch counts, not the last one.
        append(log, lines(1, ts=time.time() - 10) + lines(1, ts=time.time() - 1800))
        h.poll()
        assert 9 < lag() < 100
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
        append(log, lines(1, ts=time.time() - 3600) + lines(1, ts=stamp))
        h.poll()
        assert 59 < lag() < 150
        append(log, lines(1, ts=time.time() - 3600) + lines(1))
        h.poll()
        assert lag() == 0
        assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0
    finally:
        h.tailer.close()


def test_ts_in_milliseconds_is_rejected_not_read_as_lag_0(
    logs: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    clock.now = time.time()
    h = Harness(str(logs / "*.jsonl"), clock)
    log = logs / "app.jsonl"
    try:
        append(log, lines(1, ts=time.time() - 3600))
        h.poll()
        with caplog.at_level(logging.WARNING, logger=files.__name__):
            append(log, lines(1, ts=time.time() * 1000) + lines(1, ts=time.time() + 3600))
            h.poll()
        assert (h.accepted(), h.rejected("out_of_range")) == (2, 1)  # an hour ahead: a drift
        assert any(f"{log}:2: out_of_range: `$.ts`" in r.getMessage() and "milliseconds"
                   in r.getMessage() for r in caplog.records)
    finally:
        h.tailer.close()


def test_open_files_are_capped_and_closed_files_read_on(logs: Path, clock: Clock) -> None:
    """Files kept for weeks (dated, hourly) must not exhaust the descriptors: past
    max_open_files the least recently grown are closed, and opened again when they grow."""
    h = Harness(str(logs / "*.jsonl*"), clock, max_open_files=4)
    try:
        names = [logs / f"events-{i:02d}.jsonl" for i in range(20)]
        for p in names:
            append(p, lines(1))
        h.poll()
        assert h.accepted() == 20 and h.up() == 1
        assert sum(t.fh is not None for t in h.tailer.files.values()) <= 4
        for p in names[:10]:  # closed ones grow
            append(p, lines(1) + event()[:10])
        h.poll()
        h.poll()
        assert h.accepted() == 30
        assert sum(t.fh is not None for t in h.tailer.files.values()) <= 4
        for p in names[:10]:  # the half-written lines are finished
            append(p, event()[10:] + b"\n")
        h.poll()
        assert h.accepted() == 40
        # A closed file truncated and rewritten: found by its fingerprint when reopened.
        (t0,) = [t for t in h.tailer.files.values() if t.path == str(names[19])]
        assert t0.fh is None
        os.truncate(names[19], 0)
        append(names[19], lines(3, agent="writer"))
        # A closed file renamed within the glob is still the same file.
        (t1,) = [t for t in h.tailer.files.values() if t.path == str(names[18])]
        assert t1.fh is None
        os.rename(names[18], logs / "events-18.jsonl.1")
        append(logs / "events-18.jsonl.1", lines(1))
        h.poll()
        h.poll()
        assert (h.results(), h.results("writer")) == (41, 3)
        assert sum(t.fh is not None for t in h.tailer.files.values()) <= 4
        assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0
    finally:
        h.tailer.close()


def test_many_files_under_a_low_descriptor_limit_are_all_read(tmp_path: Path) -> None:
    """300 files with RLIMIT_NOFILE at 256 (in a child process): every one is read."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        from pathlib import Path
        sys.path[:0] = [{str(Path(__file__).parent.parent)!r}, {str(Path(__file__).parent)!r}]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from test_files import Harness, Clock, lines
        d = Path({str(tmp_path)!r})
        h = Harness(str(d / "*.jsonl"), Clock())
        for i in range(300):
            (d / f"events-{{i:04d}}.jsonl").write_bytes(lines(1))
        h.poll()
        for i in range(0, 300, 7):
            with open(d / f"events-{{i:04d}}.jsonl", "ab") as fh:
                fh.write(lines(1))
        h.poll()
        print(json.dumps([h.accepted(), h.up()]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [300 + 43, 1]


def test_copytruncate_with_the_copy_in_the_glob_counts_once(logs: Path, clock: Clock) -> None:
    h = Harness(str(logs / "app.jsonl*"), clock)
    log = logs / "app.jsonl"
    try:
        append(log, lines(100))
        h.poll()
        append(log, lines(2))  # written after the last read: in the copy only
        shutil.copyfile(log, logs / "app.jsonl.1")
        os.truncate(log, 0)
        h.poll()
        append(log, lines(3, agent="writer"))
        h.poll()
        h.poll()
        assert (h.results(), h.results("writer"), h.accepted()) == (102, 3, 105)
    finally:
        h.tailer.close()


def test_copytruncate_seen_before_the_truncation_counts_once(
    logs: Path, clock: Clock
) -> None:
    """A poll between the copy (even a partial one) and the truncation waits for it."""
    h = Harness(str(logs / "app.jsonl*"), clock)
    log = logs / "app.jsonl"
    try:
        append(log, lines(50))
        h.poll()
        data = log.read_bytes()
        (logs / "app.jsonl.1").write_bytes(data[: len(data) // 2])  # the copy under way
        h.poll()
        clock.now += 1
        (logs / "app.jsonl.1").write_bytes(data)
        h.poll()
        os.truncate(log, 0)
        clock.now += 1
        h.poll()
        h.poll()
        assert h.accepted() == 50
    finally:
        h.tailer.close()


def test_new_file_that_starts_like_a_tracked_one_is_still_read(
    logs: Path, clock: Clock
) -> None:
    """Same first bytes, but the tracked file was never truncated: a file of its own, read
    once the grace period for a copytruncate in progress is over."""
    h = Harness(str(logs / "*.jsonl"), clock)
    try:
        same = lines(1, task_id="same")
        append(logs / "a.jsonl", same + lines(2))
        h.poll()
        append(logs / "b.jsonl", same + lines(4))
        h.poll()
        clock.now += files.ROTATED_GRACE_SECONDS + 1
        h.poll()
        assert h.accepted() == 3 + 5
    finally:
        h.tailer.close()


def test_errors_about_an_unreadable_path_are_not_logged_at_every_poll(
    h: Harness, logs: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.symlink(logs / "loop.jsonl", logs / "loop.jsonl")  # ELOOP at every stat
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        for _ in range(40):  # 10 s at poll_seconds 0.25
            h.poll()
        assert len(caplog.records) == 1
        assert "loop.jsonl" in caplog.records[0].getMessage()
        later = time.monotonic() + files.ERROR_LOG_INTERVAL + 1
        monkeypatch.setattr(h.tailer._error_log, "clock", lambda: later)
        h.poll()
    assert len(caplog.records) == 2
    assert "39 more times" in caplog.records[1].getMessage()
    assert h.up() == 0


# --- the open-file cap and rotation, copies in the glob, let-go positions, lag per pass ------


def test_rename_rotation_at_the_open_file_cap_drains_the_renamed_file(
    logs: Path, clock: Clock
) -> None:
    """The cap must not close the renamed file before the pass has found it gone (it was
    closed by the open of the new file at its name, and never read again)."""
    h = Harness(str(logs / "*.jsonl"), clock, max_open_files=2)
    a, b = logs / "a.jsonl", logs / "b.jsonl"
    try:
        append(a, lines(10))
        append(b, lines(10))
        h.poll()
        append(a, lines(5))  # written, then rotated before the next poll
        os.rename(a, logs / "a.jsonl.1")
        append(a, lines(1))
        append(b, lines(1))
        for _ in range(3):
            h.poll()
            clock.now += 3
        assert h.accepted() == 27
        assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0
    finally:
        h.tailer.close()


def test_closed_file_that_grew_and_was_renamed_out_of_the_glob_is_drained(
    logs: Path, clock: Clock
) -> None:
    """A file closed by the cap, written and renamed in its directory before the next pass, is
    found there by its inode and read to its end (late writes too, until it is let go)."""
    h = Harness(str(logs / "*.jsonl"), clock, max_open_files=2)
    try:
        names = [logs / f"f{i}.jsonl" for i in range(4)]
        for p in names:
            append(p, lines(1))
        h.poll()
        for p in names[1:]:
            append(p, lines(1))
        h.poll()
        (t,) = [t for t in h.tailer.files.values() if t.path == str(names[0])]
        assert t.fh is None
        append(names[0], lines(2))
        os.rename(names[0], logs / "f0.jsonl.1")
        h.poll()
        append(logs / "f0.jsonl.1", lines(1))  # a late write by the old writer
        clock.now += 3
        h.poll()
        clock.now += files.ROTATED_GRACE_SECONDS
        h.poll()
        assert h.accepted() == 4 + 3 + 3
        assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0
    finally:
        h.tailer.close()


def _copytruncate_empty_copy_seen_first(h: Harness, logs: Path, clock: Clock) -> int:
    log, copy = logs / "app.jsonl", logs / "app.jsonl.1"
    append(log, lines(100))
    h.poll()
    copy.write_bytes(b"")  # logrotate creates the copy, and a poll comes before any byte
    h.poll()
    shutil.copyfile(log, copy)
    os.truncate(log, 0)
    return 100


def _copytruncate_small_partial_copy(h: Harness, logs: Path, clock: Clock) -> int:
    log, copy = logs / "app.jsonl", logs / "app.jsonl.1"
    append(log, lines(100))
    h.poll()
    data = log.read_bytes()
    copy.write_bytes(data[:100])  # fewer bytes than a fingerprint
    h.poll()
    copy.write_bytes(data)
    os.truncate(log, 0)
    return 100


def _copytruncate_slow_copy(h: Harness, logs: Path, clock: Clock) -> int:
    log, copy = logs / "app.jsonl", logs / "app.jsonl.1"
    append(log, lines(1000))
    h.poll()
    data = log.read_bytes()
    for part in range(1, 8):  # longer than the grace period
        copy.write_bytes(data[: len(data) * part // 8])
        h.poll()
        clock.now += 1
    copy.write_bytes(data)
    os.truncate(log, 0)
    return 1000


def _copytruncate_of_a_closed_file(h: Harness, logs: Path, clock: Clock) -> int:
    log = logs / "app.jsonl"
    append(log, lines(50))
    h.poll()
    for i in range(3):  # other files grow after it: it is closed
        append(logs / f"other{i}.jsonl", lines(1))
        h.poll()
    (t,) = [t for t in h.tailer.files.values() if t.path == str(log)]
    assert t.fh is None
    shutil.copyfile(log, logs / "app.jsonl.1")
    h.poll()  # between the copy and the truncation
    os.truncate(log, 0)
    return 53


@pytest.mark.parametrize("case", [
    _copytruncate_empty_copy_seen_first, _copytruncate_small_partial_copy,
    _copytruncate_slow_copy, _copytruncate_of_a_closed_file,
])
def test_copytruncate_with_the_copy_in_the_glob_counts_once_whenever_polled(
    logs: Path, clock: Clock, case: Any
) -> None:
    h = Harness(str(logs / "*.jsonl*"), clock, max_open_files=2)
    try:
        expected = case(h, logs, clock)
        clock.now += 1
        h.poll()
        h.poll()
        append(logs / "app.jsonl", lines(2, agent="writer"))
        h.poll()
        clock.now += 2 * files.ROTATED_GRACE_SECONDS
        h.poll()
        assert (h.accepted(), h.results("writer")) == (expected + 2, 2)
        assert sum(h.rejected(r) for r in c.REJECT_REASONS) == 0
        assert h.tailer._pending == {}
    finally:
        h.tailer.close()


def test_positions_of_rotated_files_are_dropped_once_deleted(
    logs: Path, clock: Clock
) -> None:
    """A let-go position is kept while its file exists (it may come back), not for 30 days
    after its rotation deleted it: the state file would grow with every rotation."""
    h = Harness(str(logs / "*.jsonl"), clock)
    log = logs / "app.jsonl"
    try:
        append(log, lines(1))
        h.poll()
        for i in range(1, 41):
            os.rename(log, logs / f"app.jsonl.{i}")
            append(log, lines(1))
            h.poll()
            clock.now += files.ROTATED_GRACE_SECONDS + 1
            h.poll()
        assert len(h.tailer._saved) == 40
        for i in range(1, 40):  # logrotate's rotate 1: all but the newest deleted
            os.unlink(logs / f"app.jsonl.{i}")
        os.rename(logs / "app.jsonl.40", logs / "app.jsonl.old")  # renamed on: still there
        clock.now += 61  # the check runs once a minute
        h.poll()
        positions = h.tailer.positions()
        assert len(positions) == 2  # the live file's, and the one still there
        assert sorted(p["path"].rsplit("/", 1)[1] for p in positions) == [
            "app.jsonl", "app.jsonl.old"]
        assert h.accepted() == 41
    finally:
        h.tailer.close()


def test_lag_is_that_of_the_newest_event_of_the_pass_over_all_files(
    logs: Path, clock: Clock
) -> None:
    h = Harness(str(logs / "*.jsonl"), clock)
    h.store.clock = clock
    try:
        append(logs / "a-current.jsonl", lines(5, ts=clock.now - 2))
        append(logs / "b-quiet.jsonl", lines(5, ts=clock.now - 3600))  # read last
        h.poll()
        assert h.value(c.SOURCE_LAG.name, source=SOURCE) == 2
        append(logs / "a-current.jsonl", lines(1))  # no ts: lag 0 for the whole pass
        append(logs / "b-quiet.jsonl", lines(1, ts=clock.now - 3600))
        h.poll()
        assert h.value(c.SOURCE_LAG.name, source=SOURCE) == 0
        append(logs / "b-quiet.jsonl", lines(1, ts=clock.now - 3600))
        h.poll()
        assert h.value(c.SOURCE_LAG.name, source=SOURCE) == 3600
    finally:
        h.tailer.close()
