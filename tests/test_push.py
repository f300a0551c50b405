"""POST /v1/events on a real exporter: auth, limits, batches, the journal and restarts."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry

from exporter import catalog as c
from exporter.config import ConfigError, parse_config
from exporter.metrics import MetricStore
from exporter.runtime import Exporter
from exporter.sources import files, push
from exporter.sources.files import FileTailer
from exporter.sources.push import BATCH_MARKER, Journal, ingest_batch
from tests.servers import ProcessHandle, free_port, http_ok

TOKEN = "s3cret-push-token"
TOKEN_ENV = "AICRM_TEST_INGEST_TOKEN"
MAX_BODY = 8192
SEGMENT = 4096


def config(state_dir: Path, **push: Any) -> dict[str, Any]:
    return {
        "agents": [{"name": "qualifier"}, {"name": "writer"}],
        "task_types": [{"name": "qualify_lead"}],
        "sources": {"push": {"enabled": True, "token_env": TOKEN_ENV,
                             "max_body_bytes": MAX_BODY, **push}},
        "exporter": {"listen": "127.0.0.1:0", "state_dir": str(state_dir),
                     "poll_seconds": 0.02, "checkpoint_seconds": 0.05,
                     "journal_segment_bytes": SEGMENT},
    }


class Running:
    def __init__(self, exporter: Exporter, registry: CollectorRegistry):
        self.exporter = exporter
        self.registry = registry
        self.url = f"http://127.0.0.1:{exporter.port}"
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.exporter.stop()

    def push(self, body: bytes, token: str | None = TOKEN,
             headers: dict[str, str] | None = None) -> requests.Response:
        hdrs = {"Content-Type": "application/x-ndjson", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        return requests.post(self.url + "/v1/events", data=body, headers=hdrs, timeout=10)

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def pushed(self) -> float:
        return self.value(c.SOURCE_EVENTS.name, source="push")

    def results(self, agent: str = "qualifier") -> float:
        return self.value(c.AGENT_TASK_RESULTS.name, agent=agent, task_type="qualify_lead",
                          outcome="success")

    def rejected(self, reason: str) -> float:
        return self.value(c.SOURCE_REJECTED.name, source="push", reason=reason)

    def requests_by_code(self, code: int) -> float:
        return self.value(c.PUSH_REQUESTS.name, code=str(code))

    def wait_for(self, check: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.01)


@pytest.fixture
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Running]]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    running: list[Running] = []

    def make(state_dir: Path | None = None, **push: Any) -> Running:
        cfg = parse_config(config(state_dir or tmp_path / "state", **push))
        registry = CollectorRegistry(auto_describe=False)
        exporter = Exporter(cfg, registry=registry)
        exporter.start()
        r = Running(exporter, registry)
        running.append(r)
        return r

    yield make
    for r in running:
        r.stop()


@pytest.fixture
def exp(start: Callable[..., Running]) -> Running:
    return start()


_ids = iter(range(1, 1_000_000))


def event(agent: str = "qualifier", **fields: Any) -> bytes:
    body = {"event": "task_result", "agent": agent, "task_type": "qualify_lead",
            "outcome": "success", "task_id": f"t-{next(_ids)}", **fields}
    return json.dumps(body).encode()


def batch(n: int, agent: str = "qualifier") -> bytes:
    return b"".join(event(agent) + b"\n" for _ in range(n))


def journal_lines(state_dir: Path) -> list[bytes]:
    out: list[bytes] = []
    for seg in sorted((state_dir / "push").glob("journal-*.jsonl")):
        out.extend(seg.read_bytes().splitlines())
    return out


def event_lines(state_dir: Path) -> list[bytes]:
    """The journal's lines without the keyed batches' markers."""
    return [x for x in journal_lines(state_dir) if not x.startswith(BATCH_MARKER)]


def raw_request(port: int, head: bytes, body: bytes = b"", *, half_close: bool = False
                ) -> tuple[int, dict[str, Any]]:
    """One request over a plain socket, for what HTTP clients will not send."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


# --- authentication and limits -------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_missing_or_wrong_token_is_401_and_ingests_nothing(
    exp: Running, tmp_path: Path, token: str | None
) -> None:
    r = exp.push(batch(2), token=token)
    assert r.status_code == 401
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert "token" in r.json()["error"]
    time.sleep(0.1)
    assert journal_lines(tmp_path / "state") == []
    assert exp.pushed() == 0 and exp.results() == 0
    assert exp.requests_by_code(401) == 1


def test_other_authorization_schemes_are_401(exp: Running) -> None:
    r = exp.push(batch(1), token=None, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_the_bearer_scheme_is_case_insensitive(exp: Running, scheme: str) -> None:
    """RFC 7235: an auth-scheme is a case-insensitive token."""
    r = exp.push(batch(1), token=None, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert r.status_code == 200, r.text


def test_a_token_variable_with_a_trailing_newline_is_stripped(
        start: Callable[..., Running], monkeypatch: pytest.MonkeyPatch) -> None:
    """A token mounted from a file usually ends with a newline; clients send it without."""
    monkeypatch.setenv(TOKEN_ENV, f"  {TOKEN}\n")
    exp = start()
    assert exp.push(batch(1)).status_code == 200
    assert exp.push(batch(1), token=TOKEN[:-1]).status_code == 401


@pytest.mark.parametrize("value", ["", " ", "\n", " \t\r\n"])
def test_an_empty_token_variable_stops_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(TOKEN_ENV, value)
    with pytest.raises(ConfigError, match=rf"sources\.push\.token_env: .*\${TOKEN_ENV} is "
                                          "empty"):
        Exporter(parse_config(config(tmp_path / "state")))


def expect_100(port: int, headers: dict[str, str], body: bytes = b"",
               send_body: bool = True) -> tuple[bytes, bytes]:
    """A request with ``Expect: 100-continue`` on a plain socket: (the first answer's head,
    whatever follows until the server closes), sending the body only after a 100."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST /v1/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{head}"
                  "\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        first, _, rest = data.partition(b"\r\n\r\n")
        if first.startswith(b"HTTP/1.1 100") and send_body:
            s.sendall(body)
            s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            rest += chunk
    return first, rest


@pytest.mark.parametrize(("headers", "code"), [
    ({"Content-Length": "5000000"}, 401),
    ({"Content-Length": "5000000", "Authorization": "Bearer wrong-token"}, 401),
    ({"Content-Length": "100", "Authorization": f"Basic {TOKEN}"}, 401),
    ({"Content-Length": str(MAX_BODY + 1), "Authorization": f"Bearer {TOKEN}"}, 413),
    ({"Authorization": f"Bearer {TOKEN}"}, 411),
    ({"Content-Length": "100", "Authorization": f"Bearer {TOKEN}",
      "Content-Encoding": "br"}, 415),
    ({"Content-Length": "100", "Authorization": f"Bearer {TOKEN}",
      "Idempotency-Key": "has space"}, 400),
])
def test_expect_100_continue_is_refused_before_the_body(
        exp: Running, tmp_path: Path, headers: dict[str, str], code: int) -> None:
    """The checks that need no body come before ``100 Continue``: an unauthenticated client
    is not invited to upload max_body_bytes, it gets its error and the connection closes."""
    first, rest = expect_100(exp.exporter.port, headers, send_body=False)
    assert first.split(b"\r\n", 1)[0].startswith(f"HTTP/1.1 {code} ".encode()), first
    assert b"100 Continue" not in first + rest
    if code == 401:
        assert b"WWW-Authenticate: Bearer" in first
    time.sleep(0.1)
    assert journal_lines(tmp_path / "state") == []
    assert exp.requests_by_code(code) == 1


def test_expect_100_continue_with_a_good_request_continues(exp: Running) -> None:
    body = batch(2)
    first, rest = expect_100(exp.exporter.port, {
        "Authorization": f"Bearer {TOKEN}", "Content-Length": str(len(body)),
        "Connection": "close"}, body)
    assert first.startswith(b"HTTP/1.1 100 Continue"), first
    assert rest.startswith(b"HTTP/1.1 200 "), rest
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["accepted"] == 2


@pytest.mark.parametrize("length", ["1_0", "+10", "0x10", "-0"])
def test_a_content_length_that_is_not_digits_is_400(exp: Running, length: str) -> None:
    """int() accepts '1_0', '+10' and other digits; HTTP's Content-Length is 1*DIGIT."""
    head = (f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()
    code, answer = raw_request(exp.exporter.port, head, batch(1)[:10])
    assert code == 400 and "Content-Length" in answer["error"]


def test_push_disabled_is_404(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cfg = parse_config(config(tmp_path / "state", enabled=False))
    exporter = Exporter(cfg, registry=CollectorRegistry(auto_describe=False))
    exporter.start()
    try:
        r = requests.post(f"http://127.0.0.1:{exporter.port}/v1/events", data=batch(1),
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 404 and "disabled" in r.json()["error"]
        assert not (tmp_path / "state" / "push").exists()
    finally:
        exporter.stop()


def test_push_enabled_without_its_token_variable_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        Exporter(parse_config(config(tmp_path / "state")))


def test_body_over_the_limit_is_413(exp: Running, tmp_path: Path) -> None:
    body = batch(MAX_BODY // 90 + 10)
    assert len(body) > MAX_BODY
    r = exp.push(body)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    assert journal_lines(tmp_path / "state") == []
    assert exp.requests_by_code(413) == 1


def test_missing_content_length_is_411(exp: Running) -> None:
    head = (b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    code, body = raw_request(exp.exporter.port, head, batch(1), half_close=True)
    assert code == 411 and "Content-Length" in body["error"]
    assert exp.requests_by_code(411) == 1
    assert exp.pushed() == 0


def test_body_shorter_than_its_content_length_is_400(exp: Running, tmp_path: Path) -> None:
    body = batch(1) + event()[:-1]  # the client died before the end of its body
    head = (b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Length: " + str(len(body) + 40).encode() + b"\r\n\r\n")
    code, answer = raw_request(exp.exporter.port, head, body, half_close=True)
    assert code == 400 and "Content-Length" in answer["error"]
    assert journal_lines(tmp_path / "state") == []


def test_gzip_body_is_accepted(exp: Running) -> None:
    r = exp.push(gzip.compress(batch(3)), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json() == {"accepted": 3, "rejected": []}
    exp.wait_for(lambda: exp.results() == 3)


def test_multi_member_gzip_body_is_read_whole(exp: Running) -> None:
    body = gzip.compress(batch(2)) + gzip.compress(batch(3))
    r = exp.push(body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 5


@pytest.mark.parametrize("body", [
    b"this is not gzip at all",
    gzip.compress(b"\n".join(event() for _ in range(5)) + b"\n")[:-12],  # cut short
], ids=["garbage", "truncated"])
def test_bad_gzip_is_400(exp: Running, tmp_path: Path, body: bytes) -> None:
    r = exp.push(body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    assert journal_lines(tmp_path / "state") == []
    assert exp.requests_by_code(400) == 1


def test_gzip_that_inflates_over_the_limit_is_413(exp: Running) -> None:
    body = gzip.compress(b"\n" * (MAX_BODY * 4))
    assert len(body) < MAX_BODY
    r = exp.push(body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "larger" in r.json()["error"]


def test_unsupported_content_encoding_is_415(exp: Running) -> None:
    r = exp.push(batch(1), headers={"Content-Encoding": "br"})
    assert r.status_code == 415 and "br" in r.json()["error"]
    assert exp.pushed() == 0


# --- batches -------------------------------------------------------------------------------


def test_mixed_batch_accepts_the_good_lines_and_names_the_bad(
    exp: Running, tmp_path: Path
) -> None:
    body = b"\n".join([
        event(),
        b"{oops",
        event("writer"),
        b'{"event": "page_view"}',
        b"",
        event("writer") + b"\r",
        b'{"event": "task_result", "agent": "qualifier", "task_type": "qualify_lead", '
        b'"outcome": "success", "duration_ms": -1}',
        b'{"event": "handoff", "from_agent": "qualifier", "to_agent": "writer", "x": "\xff"}',
        event(),
    ])
    r = exp.push(body)
    assert r.status_code == 200
    answer = r.json()
    assert answer["accepted"] == 4
    assert [(x["line"], x["reason"]) for x in answer["rejected"]] == [
        (2, "invalid_json"), (4, "unknown_event"), (7, "out_of_range"), (8, "invalid_utf8"),
    ]
    assert all(isinstance(x["error"], str) and x["error"] for x in answer["rejected"])
    assert "duration_ms" in answer["rejected"][2]["error"]
    assert len(journal_lines(tmp_path / "state")) == 4
    exp.wait_for(lambda: exp.pushed() == 4)
    assert (exp.results(), exp.results("writer")) == (2, 2)
    for reason in ("invalid_json", "unknown_event", "out_of_range", "invalid_utf8"):
        assert exp.rejected(reason) == 1
    assert exp.requests_by_code(200) == 1
    text = requests.get(exp.url + "/metrics", timeout=10).text
    assert 'aicrm_source_events_total{source="push"} 4.0\n' in text


def test_all_bad_batch_is_400_and_counted(exp: Running, tmp_path: Path) -> None:
    r = exp.push(b"[1]\n" + b'{"event": "handoff", "from_agent": "qualifier"}\n')
    assert r.status_code == 400
    answer = r.json()
    assert answer["accepted"] == 0 and answer["error"]
    assert [(x["line"], x["reason"]) for x in answer["rejected"]] == [
        (1, "not_object"), (2, "missing_field")]
    assert exp.rejected("not_object") == 1 and exp.rejected("missing_field") == 1
    assert journal_lines(tmp_path / "state") == []
    assert exp.requests_by_code(400) == 1


def test_an_answer_lists_at_most_1000_rejected_lines(exp: Running) -> None:
    r = exp.push(b"x\n" * 1200 + batch(1))
    assert r.status_code == 200
    answer = r.json()
    assert answer["accepted"] == 1 and answer["rejected_total"] == 1200
    assert len(answer["rejected"]) == 1000 and answer["rejected"][-1]["line"] == 1000
    assert exp.rejected("invalid_json") == 1200  # every line is still counted
    small = exp.push(b"x\n" + batch(1)).json()
    assert "rejected_total" not in small and len(small["rejected"]) == 1


def test_too_long_line_in_a_batch_is_rejected(start: Callable[..., Running]) -> None:
    exp = start()
    long_line = event(pad="x" * (1024 * 1024 + 1))
    r = requests.post(exp.url + "/v1/events", data=long_line + b"\n" + event(),
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 413  # larger than max_body_bytes, before any line is read
    exp.stop()
    exp = start(max_body_bytes=4 * 1024 * 1024)
    r = exp.push(long_line + b"\n" + event())
    assert r.status_code == 200
    assert r.json()["rejected"][0]["reason"] == "line_too_long"
    exp.wait_for(lambda: exp.results() == 1)


# --- the journal ---------------------------------------------------------------------------


def test_accepted_lines_are_in_the_journal_before_the_answer(
    exp: Running, tmp_path: Path
) -> None:
    lines = [event() for _ in range(3)]
    r = exp.push(b"\n".join(lines) + b"\n")
    assert r.status_code == 200
    assert journal_lines(tmp_path / "state") == lines


def test_segments_roll_over_and_read_ones_are_deleted(exp: Running, tmp_path: Path) -> None:
    push_dir = tmp_path / "state" / "push"
    total = 0
    for _ in range(8):
        assert exp.push(batch(20)).status_code == 200  # about 2 kB a batch
        total += 20
    exp.wait_for(lambda: exp.pushed() == total)
    exp.wait_for(lambda: len(list(push_dir.glob("journal-*.jsonl"))) == 1)
    (current,) = push_dir.glob("journal-*.jsonl")
    assert int(current.stem.removeprefix("journal-")) >= 4  # 16 kB in 4 kB segments
    assert current.stat().st_size < SEGMENT + 2 * 1024
    time.sleep(0.2)
    assert exp.results() == total


def test_restart_neither_loses_nor_double_counts(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    exp = start(state_dir)
    for _ in range(5):
        assert exp.push(batch(15)).status_code == 200
    exp.wait_for(lambda: exp.pushed() == 75)
    assert exp.push(batch(10, "writer")).status_code == 200
    exp.stop()  # right after the answer: the tailer may not have read this batch yet

    exp2 = start(state_dir)
    exp2.wait_for(lambda: exp2.results("writer") == 10)
    assert exp2.results() == 75
    assert exp2.push(batch(5)).status_code == 200
    exp2.wait_for(lambda: exp2.results() == 80)
    time.sleep(0.2)
    assert (exp2.results(), exp2.results("writer"), exp2.pushed()) == (80, 10, 90)
    exp2.stop()

    exp3 = start(state_dir)
    time.sleep(0.2)
    assert (exp3.results(), exp3.results("writer"), exp3.pushed()) == (80, 10, 90)


# --- journal write failures ----------------------------------------------------------------


class JournalRig:
    """A journal, the file source following it and a store, in this thread: each step of a
    failing write can be watched from the tailer's side."""

    def __init__(self, state_dir: Path):
        self.store = MetricStore(parse_config(config(state_dir)))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.store)
        self.journal = Journal(state_dir, segment_bytes=SEGMENT)
        self.now = 1_700_000_000.0
        self.tailer = FileTailer([self.journal.watch], self.store, clock=lambda: self.now)

    def ingest(self, body: bytes, marker: push.BatchMarker | None = None) -> push.BatchResult:
        return ingest_batch(body, self.journal, self.store, max_line_bytes=1024,
                            marker=marker)

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def counts(self) -> tuple[float, float]:
        """(task results, rejected invalid_json lines) after a pass of the tailer."""
        self.tailer.poll()
        return (self.value(c.AGENT_TASK_RESULTS.name, agent="qualifier",
                           task_type="qualify_lead", outcome="success"),
                self.value(c.SOURCE_REJECTED.name, source="push", reason="invalid_json"))

    def segments(self) -> list[Path]:
        return sorted(self.journal.dir.glob("journal-*.jsonl"))

    def close(self) -> None:
        self.tailer.close()
        self.journal.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[JournalRig]:
    r = JournalRig(tmp_path / "state")
    yield r
    r.close()


def test_a_journal_write_cut_short_counts_nothing_and_its_retry_counts_once(
    rig: JournalRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up half-way through a batch: the client gets a 503 ("nothing was
    accepted"), so neither the lines that reached the file nor the batch's rejects count,
    and the retry's first line is not glued onto a partial one."""
    rig.ingest(batch(2))
    real_write_all = push.write_all

    def disk_full(fd: int, data: bytes) -> None:
        real_write_all(fd, data[: len(data) // 2 + 5])
        raise OSError(errno.ENOSPC, "No space left on device")

    body = batch(4) + b"not json\n"
    monkeypatch.setattr(push, "write_all", disk_full)
    with pytest.raises(OSError):
        rig.ingest(body)
    assert rig.counts() == (2, 0)
    (segment,) = rig.segments()
    assert len(segment.read_bytes().splitlines()) == 2  # cut back to its committed end
    monkeypatch.setattr(push, "write_all", real_write_all)
    assert rig.ingest(body).as_dict()["accepted"] == 4
    assert rig.counts() == (6, 1)
    assert len(segment.read_bytes().splitlines()) == 6


def test_the_file_source_never_reads_a_batch_before_its_fsync(
    rig: JournalRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tailer passes while the batch is written but not yet fsync'ed, and the fsync then
    fails: the batch was never committed, so nothing of it may have been counted."""
    rig.ingest(batch(1))
    real_fsync = os.fsync
    seen: list[tuple[float, float]] = []

    def failing_fsync(fd: int) -> None:
        seen.append(rig.counts())
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(push.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        rig.ingest(batch(3) + b"{oops\n")
    monkeypatch.setattr(push.os, "fsync", real_fsync)
    assert seen == [(1, 0)]
    assert rig.counts() == (1, 0)
    rig.ingest(batch(3) + b"{oops\n")
    assert rig.counts() == (4, 1)

    def polling_fsync(fd: int) -> None:
        seen.append(rig.counts())
        real_fsync(fd)

    seen.clear()
    monkeypatch.setattr(push.os, "fsync", polling_fsync)
    rig.ingest(batch(2))
    assert seen == [(4, 1)] and rig.counts() == (6, 1)


def _io_error(*args: Any) -> None:
    raise OSError(errno.EIO, "Input/output error")


def _give_up_first_segment(rig: JournalRig, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A batch whose fsync fails and whose bytes cannot be cut back off the segment either."""
    rig.ingest(batch(2))
    real_fsync, real_ftruncate = os.fsync, os.ftruncate
    monkeypatch.setattr(push.os, "fsync", _io_error)
    monkeypatch.setattr(push.os, "ftruncate", _io_error)
    monkeypatch.setattr(push.os, "truncate", _io_error)
    with pytest.raises(OSError):
        rig.ingest(batch(4), marker=push.BatchMarker("k", "0" * 64, 1.0))
    monkeypatch.setattr(push.os, "fsync", real_fsync)
    monkeypatch.setattr(push.os, "ftruncate", real_ftruncate)
    (first,) = rig.segments()
    assert len(first.read_bytes().splitlines()) == 2 + 4 + 1  # the uncommitted tail is there
    return first


def test_a_segment_that_cannot_be_cut_back_is_read_only_to_its_committed_end(
    rig: JournalRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fsync fails and so does the truncation: that segment is given up (an error names
    it), the next batch goes to a new segment, and the old one is cut back once it can be."""
    first = _give_up_first_segment(rig, monkeypatch)
    assert any(r.levelno == logging.ERROR and first.name in r.getMessage()
               for r in caplog.records)
    assert rig.counts() == (2, 0)
    rig.ingest(batch(3))  # the truncation still fails
    assert [p.name for p in rig.segments()] == [first.name, "journal-000000000002.jsonl"]
    assert len(first.read_bytes().splitlines()) == 7
    assert rig.counts() == (5, 0)
    monkeypatch.undo()  # truncation works again
    rig.ingest(batch(1))
    assert len(first.read_bytes().splitlines()) == 2  # cut back at the next append
    assert rig.counts() == (6, 0)


def test_a_given_up_segment_is_released_at_its_committed_end(
    rig: JournalRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read to its committed end, the given-up segment is deleted like any other, and its
    uncommitted tail is not taken for an unfinished last line when the tailer lets it go."""
    first = _give_up_first_segment(rig, monkeypatch)
    rig.ingest(batch(3))
    assert rig.counts() == (5, 0)
    with rig.store.lock:
        positions = rig.tailer.positions()
    rig.journal.release(positions)
    assert [p.name for p in rig.segments()] == ["journal-000000000002.jsonl"]
    assert not first.exists()
    rig.tailer.poll()
    rig.now += files.ROTATED_GRACE_SECONDS + 1
    assert rig.counts() == (5, 0)
    assert [os.path.basename(t.path) for t in rig.tailer.files.values()] == [
        "journal-000000000002.jsonl"]
    monkeypatch.undo()  # truncation works again
    rig.ingest(batch(1))
    assert rig.counts() == (6, 0)


def test_a_503_counts_no_rejects_and_its_retry_counts_them_once(
    exp: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = batch(2) + b"not json\n"
    real_write_all = push.write_all

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(push, "write_all", disk_full)
    r = exp.push(body)
    assert r.status_code == 503
    assert exp.rejected("invalid_json") == 0
    monkeypatch.setattr(push, "write_all", real_write_all)
    assert exp.push(body).status_code == 200
    exp.wait_for(lambda: exp.results() == 2)
    assert exp.rejected("invalid_json") == 1 and exp.pushed() == 2


# --- other endpoints -----------------------------------------------------------------------


def test_health_and_readiness(exp: Running) -> None:
    r = requests.get(exp.url + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    exp.wait_for(lambda: requests.get(exp.url + "/readyz", timeout=10).status_code == 200)
    body = requests.get(exp.url + "/readyz", timeout=10).json()
    assert body["status"] == "ok" and body["sources"] == {"push": 1.0}


def test_readiness_is_503_while_a_source_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    raw = config(tmp_path / "state")
    raw["sources"]["event_logs"] = [{"name": "logs", "path": str(tmp_path / "nope" / "*.jsonl")}]
    exporter = Exporter(parse_config(raw), registry=CollectorRegistry(auto_describe=False))
    exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.port}"
        time.sleep(0.1)
        r = requests.get(url + "/readyz", timeout=10)
        assert r.status_code == 503
        assert r.json()["status"] == "degraded" and r.json()["sources"]["logs"] == 0
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        exporter.stop()


def test_unknown_paths_are_404_json(exp: Running) -> None:
    for method in ("GET", "POST"):
        r = requests.request(method, exp.url + "/nope", timeout=10)
        assert r.status_code == 404
        assert r.headers["Content-Type"] == "application/json"
        assert "/nope" in r.json()["error"]


def test_metrics_endpoint_serves_the_exposition(exp: Running) -> None:
    r = requests.get(exp.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    gz = requests.get(exp.url + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert gz.headers["Content-Encoding"] == "gzip"


def test_push_requests_are_counted_by_code(exp: Running) -> None:
    assert exp.push(batch(1)).status_code == 200
    assert exp.push(batch(1)).status_code == 200
    assert exp.push(b"nope\n").status_code == 400
    assert exp.push(batch(1), token="bad").status_code == 401
    assert exp.push(b"x" * (MAX_BODY + 1)).status_code == 413
    got = {code: exp.requests_by_code(code) for code in (200, 400, 401, 413, 404)}
    assert got == {200: 2, 400: 1, 401: 1, 413: 1, 404: 0}


def test_kept_alive_answers_do_not_wait_for_delayed_acks(exp: Running) -> None:
    """The answer's head and body are two writes; with Nagle's algorithm on, every answer on a
    kept-alive connection waited for the client's delayed ACK (at least 40 ms on Linux). 20
    answers on one connection must take well under 20 x 40 ms; they take a few ms in all."""
    with requests.Session() as s:
        s.get(exp.url + "/healthz", timeout=10)  # connected and warm
        started = time.perf_counter()
        for _ in range(20):
            assert s.get(exp.url + "/healthz", timeout=10).status_code == 200
        elapsed = time.perf_counter() - started
    assert elapsed < 0.4, f"20 kept-alive answers took {elapsed:.3f} s"


# --- Idempotency-Key -----------------------------------------------------------------------


def keyed(exp: Running, body: bytes, key: str) -> requests.Response:
    return exp.push(body, headers={"Idempotency-Key": key})


def test_a_retried_batch_is_answered_again_and_counted_once(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    exp = start(state_dir)
    body = batch(7) + b"not json\n"
    first = keyed(exp, body, "batch-0001")
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    again = keyed(exp, body, "batch-0001")
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and first.json()["accepted"] == 7
    exp.wait_for(lambda: exp.results() == 7)
    exp.stop()
    # After a restart the key is still known: the retry of a lost answer counts nothing.
    exp2 = start(state_dir)
    replay = keyed(exp2, body, "batch-0001")
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json() == first.json()
    assert keyed(exp2, batch(2), "batch-0002").status_code == 200
    exp2.wait_for(lambda: exp2.results() == 9)
    time.sleep(0.2)
    assert exp2.results() == 9
    assert len(event_lines(state_dir)) <= 9  # the replays wrote nothing
    # Without a key nothing is deduplicated (the contract's default is unchanged).
    plain = batch(1)
    assert exp2.push(plain).status_code == 200 and exp2.push(plain).status_code == 200


def test_a_key_reused_for_another_batch_is_422(exp: Running) -> None:
    assert keyed(exp, batch(3), "k-1").status_code == 200
    r = keyed(exp, batch(4), "k-1")
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]
    exp.wait_for(lambda: exp.results() == 3)
    time.sleep(0.2)
    assert exp.results() == 3


def test_an_all_bad_batch_is_refused_once(exp: Running) -> None:
    body = b"[1]\n" + b'{"event": "handoff", "from_agent": "qualifier"}\n'
    first = keyed(exp, body, "bad-1")
    again = keyed(exp, body, "bad-1")
    assert first.status_code == again.status_code == 400
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    # Counted from the batch's marker when the file source reads it, once.
    exp.wait_for(lambda: exp.rejected("not_object") == 1 and exp.rejected("missing_field") == 1)
    time.sleep(0.2)
    assert exp.rejected("not_object") == 1 and exp.rejected("missing_field") == 1
    assert exp.requests_by_code(400) == 2  # both answers are counted as requests


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "quote\"d"])
def test_a_malformed_key_is_400_naming_the_header(exp: Running, key: str) -> None:
    r = keyed(exp, batch(1), key)
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]
    time.sleep(0.1)
    assert exp.pushed() == 0


def test_concurrent_retries_apply_the_batch_once(exp: Running) -> None:
    import threading

    body = batch(5)
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def send() -> None:
        r = keyed(exp, body, "same-key")
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [r.status_code for r in answers] == [200] * 8
    assert sum("Idempotent-Replayed" not in r.headers for r in answers) == 1
    exp.wait_for(lambda: exp.results() == 5)
    time.sleep(0.2)
    assert exp.results() == 5


CRASH_IN_RECORD = """
import os, sys
from exporter.sources import push
push.IdempotencyIndex._record = lambda *args: os._exit(137)  # a crash before the key's record
from exporter.cli import main
sys.exit(main(["--config", sys.argv[1]]))
"""


def test_a_crash_between_journal_and_key_record_still_answers_the_retry_once(
    start: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after the batch is journaled (fsync'ed) and before its key is: the
    client got no answer and retries. The next start finds the key in the journal's marker,
    and the batch's rejected lines count once: the marker carries their counts, whether or
    not the crashed process got to save them."""
    state_dir = tmp_path / "state"
    port = free_port()
    cfg = config(state_dir)
    cfg["exporter"]["listen"] = f"127.0.0.1:{port}"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    crashing = ProcessHandle("crashing-exporter", tmp_path)
    crashing.start([sys.executable, "-c", CRASH_IN_RECORD, str(tmp_path / "config.json")],
                   env={**os.environ, TOKEN_ENV: TOKEN},
                   ready_check=http_ok(f"http://127.0.0.1:{port}/healthz"))
    # More rejected lines than an answer lists: its rejected_total must come back too.
    n_bad_json = push.MAX_REPORTED_REJECTS + 2
    body = (batch(7) + b"[1]\n" + b'{"event": "handoff", "from_agent": "qualifier"}\n'
            + b"x\n" * n_bad_json)
    assert len(body) <= MAX_BODY
    with pytest.raises(requests.ConnectionError):
        requests.post(f"http://127.0.0.1:{port}/v1/events", data=body, timeout=10,
                      headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "b-1"})
    assert crashing.process is not None and crashing.process.wait(10) == 137
    crashing.stop()
    assert len(event_lines(state_dir)) == 7  # journaled before the crash

    exp = start(state_dir)
    retry = keyed(exp, body, "b-1")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    answer = retry.json()
    assert answer["accepted"] == 7 and answer["rejected_total"] == n_bad_json + 2
    assert len(answer["rejected"]) == push.MAX_REPORTED_REJECTS
    assert [(x["line"], x["reason"]) for x in answer["rejected"][:3]] == [
        (8, "not_object"), (9, "missing_field"), (10, "invalid_json")]
    assert keyed(exp, body, "b-1").json() == answer  # and from the record from now on
    assert keyed(exp, batch(4) + b"x\n", "b-1").status_code == 422  # the digest was kept
    counted = {"not_object": 1, "missing_field": 1, "invalid_json": n_bad_json}

    def rejected() -> dict[str, float]:
        return {r: n for r in c.REJECT_REASONS if (n := exp.rejected(r))}

    exp.wait_for(lambda: exp.results() == 7 and rejected() == counted)
    time.sleep(0.2)
    # The batch's rejects count once: the retry counted nothing, and the marker line is not
    # an event the file source rejects.
    assert exp.results() == 7 and rejected() == counted
    assert len(event_lines(state_dir)) == 7
    # The same batch under a new key, applied for real: the answer and counts the crashed
    # process would have given.
    fresh = keyed(exp, body, "b-2")
    assert "Idempotent-Replayed" not in fresh.headers
    assert (fresh.status_code, fresh.json()) == (200, answer)
    exp.wait_for(lambda: exp.results() == 14
                 and rejected() == {r: 2 * n for r, n in counted.items()})


def test_a_keyed_batch_s_rejects_are_in_a_snapshot_exactly_when_its_marker_is(
    rig: JournalRig, tmp_path: Path
) -> None:
    """A keyed batch's rejects are counted from its marker by the file source, under the lock
    of the read position: a restart from a snapshot taken before the marker was read counts
    them (whatever the crashed process had counted was not saved), and one from a snapshot
    taken after does not count them again."""
    state_dir = tmp_path / "state"
    body = batch(2) + b"[1]\n" + b"x\n" * 3
    rig.ingest(body, marker=push.BatchMarker("k-1", "0" * 64, rig.now))

    def snapshot(r: JournalRig) -> dict[str, Any]:
        with r.store.lock:
            return {**r.store.dump(), "positions": r.tailer.positions()}

    def not_object(r: JournalRig) -> float:
        return r.value(c.SOURCE_REJECTED.name, source="push", reason="not_object")

    assert rig.value(c.SOURCE_REJECTED.name, source="push", reason="invalid_json") == 0
    before = snapshot(rig)  # not counted when ingested: nothing to save yet
    assert rig.counts() == (2, 3) and not_object(rig) == 1
    after = snapshot(rig)
    for snap in (before, after):
        restarted = JournalRig(state_dir)
        try:
            restarted.store.load(snap)
            restarted.tailer.restore(snap["positions"])
            assert restarted.counts() == (2, 3) and not_object(restarted) == 1
            assert restarted.counts() == (2, 3) and not_object(restarted) == 1
        finally:
            restarted.close()


def test_a_marker_without_rejected_counts_recovers_as_before(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    """A marker written before markers carried rejected counts (that process counted the
    rejects when it ingested the batch): its key is still recovered, the retry is answered
    from the body, and the file source counts the batch's events and nothing else."""
    state_dir = tmp_path / "state"
    (state_dir / "push").mkdir(parents=True)
    good = event()
    body = good + b"\n" + b"[1]\n" + b"x\n"
    old_marker = BATCH_MARKER + json.dumps(
        {"key": "old-1", "digest": hashlib.sha256(body).hexdigest(), "at": time.time()},
        separators=(",", ":")).encode() + b"}"
    assert push.marker_rejects(old_marker) == {}
    (state_dir / "push" / "journal-000000000001.jsonl").write_bytes(
        good + b"\n" + old_marker + b"\n")
    exp = start(state_dir)
    retry = keyed(exp, body, "old-1")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert [(x["line"], x["reason"]) for x in retry.json()["rejected"]] == [
        (2, "not_object"), (3, "invalid_json")]
    assert retry.json()["accepted"] == 1 and "rejected_total" not in retry.json()
    exp.wait_for(lambda: exp.results() == 1)
    time.sleep(0.2)
    assert exp.results() == 1 and sum(exp.rejected(r) for r in c.REJECT_REASONS) == 0
    assert len(journal_lines(state_dir)) == 2  # the replay journaled nothing


def test_marker_rejects_takes_only_known_reasons_and_whole_counts(
    caplog: pytest.LogCaptureFixture
) -> None:
    line = push.BatchMarker("k", "0" * 64, 1.0).line(
        {"invalid_json": 2, "made_up": 5, "not_object": -1, "wrong_type": 1.5})  # type: ignore[dict-item]
    assert json.loads(line)[push.MARKER_KEY]["rejected"]["made_up"] == 5
    assert push.marker_rejects(line) == {"invalid_json": 2}
    assert push.marker_rejects(push.BatchMarker("k", "0" * 64, 1.0).line({})) == {}
    assert b"rejected" not in push.BatchMarker("k", "0" * 64, 1.0).line({})
    assert push.marker_rejects(b'{"aicrm_push_batch":{"key":"k","rejected":[1]}}') == {}
    assert push.marker_rejects(b'{"aicrm_push_batch":') == {}
    assert sum("marker" in r.getMessage() for r in caplog.records) == 5


def test_a_pushed_line_like_a_batch_marker_is_rejected(exp: Running) -> None:
    """Only the exporter writes markers: a client's line that looks like one is no event."""
    forged = b'{"aicrm_push_batch":{"key":"b-9","digest":"00","at":1}}\n'
    r = keyed(exp, forged + batch(1), "b-8")
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert [x["line"] for x in r.json()["rejected"]] == [1]
    journal = journal_lines(Path(exp.exporter.cfg.exporter.state_dir))
    assert len(journal) == 2 and journal[1].startswith(BATCH_MARKER)  # the event, its marker
    assert b'"b-9"' not in journal[1] and b'"b-8"' in journal[1]


def _no_replay() -> tuple[int, dict[str, Any]]:
    raise AssertionError("only a batch recovered from the journal is replayed")


def test_idempotency_index_expiry_damage_and_bounds(tmp_path: Path) -> None:
    from exporter.sources.push import IdempotencyIndex

    now = [1_000_000.0]
    index = IdempotencyIndex(tmp_path, retention_seconds=100, max_entries=3,
                             clock=lambda: now[0])
    applied: list[str] = []

    def apply(name: str, status: int = 200) -> Callable[[bytes], tuple[int, dict[str, Any]]]:
        return lambda _marker: (applied.append(name), (status, {"name": name}))[1]

    assert index.run("a", b"A", apply("a"), _no_replay) == (200, {"name": "a"}, False)
    assert index.run("a", b"A", apply("a2"), _no_replay) == (200, {"name": "a"}, True)
    # A failed write (503) is not recorded: the retry is applied for real.
    assert index.run("b", b"B", apply("b", 503), _no_replay)[0] == 503
    assert index.run("b", b"B", apply("b2"), _no_replay)[2] is False
    now[0] += 101  # "a" expires
    assert index.run("a", b"A", apply("a3"), _no_replay)[2] is False
    assert applied == ["a", "b", "b2", "a3"]
    for k in ("c", "d", "e"):
        index.run(k, k.encode(), apply(k), _no_replay)
    assert len(index) == 3  # the oldest entries gave way
    index.close()
    # A line cut by a crash is skipped; the rest survive a restart.
    with (tmp_path / IdempotencyIndex.FILE).open("ab") as f:
        f.write(b'{"key": "cut", "at": ')
    reopened = IdempotencyIndex(tmp_path, retention_seconds=100, max_entries=3,
                                clock=lambda: now[0])
    assert reopened.run("e", b"e", apply("e2"), _no_replay)[2] is True
    assert reopened.run("c", b"c", apply("c2"), _no_replay)[2] is True
    lines = (tmp_path / IdempotencyIndex.FILE).read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["key"] in "cde" for x in lines)
    reopened.close()


def test_idempotency_index_keeps_at_most_max_bytes_of_answers(tmp_path: Path) -> None:
    """A keyed batch of rejected lines has a long answer: the byte bound evicts the oldest."""
    from exporter.sources.push import IdempotencyIndex

    index = IdempotencyIndex(tmp_path, max_bytes=4096)
    long_answer = {"accepted": 0, "rejected": [{"line": i, "reason": "malformed_json",
                                                "error": "x" * 40} for i in range(20)]}
    for k in range(6):  # about 1.6 kB a line
        index.run(f"k{k}", b"%d" % k, lambda _m: (400, long_answer), _no_replay)
    assert len(index) == 2
    assert index.run("k5", b"5", lambda _m: (200, {}), _no_replay)[2] is True  # newest kept
    assert index.run("k0", b"0", lambda _m: (200, {"again": 1}), _no_replay)[2] is False
    index.close()
    reopened = IdempotencyIndex(tmp_path, max_bytes=4096)
    # k4, k5 and the small new k0 fit in 4 kB, and survive the restart.
    assert len(reopened) == 3 and reopened.run("k5", b"5", lambda _m: (200, {}),
                                               _no_replay)[2] is True
    assert reopened.run("k0", b"0", lambda _m: (200, {}), _no_replay)[1] == {"again": 1}
    reopened.close()
