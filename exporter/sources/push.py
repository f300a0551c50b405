"""HTTP push (``POST /v1/events``): validate, then append accepted lines durably to a journal.

A batch is answered 2xx only after its accepted lines are fsync'ed into the journal, so a
``kill -9`` right after the answer loses nothing. The journal is a directory of segment files
that the file source follows like any other JSONL log (as source ``push``), which gives pushed
events the same exactly-once path as files. Segments are deleted once fully read and that
position is saved in a state snapshot.

A batch is in the journal once its fsync returned, and not before: the file source reads a
segment only up to its committed (fsync'ed) size, and a failed write or fsync (a full disk) is
cut back off the segment, so the 503 that follows ("nothing was accepted") is true and the
retry counts once. The batch's rejected lines are counted only after the fsync, too.

A batch sent with an ``Idempotency-Key`` header is applied once: its answer is kept (with a
digest of the body) for a day in ``<state_dir>/push/idempotency.jsonl``, and a retry with the
same key gets the same answer again without its lines being journaled a second time, also
after a restart. A client whose answer was lost can therefore retry without counting twice.
The batch's lines are journaled with a marker line naming its key (in the same write and
fsync), so a crash after the journal write and before the key's own record still leaves the
key known at the next start: the retry's answer is then worked out again from its body.

A keyed batch's rejected lines are not counted when it is ingested: its marker carries their
counts by reason, and the file source counts them when it reads the marker, right after the
batch's lines. They are thereby in a state snapshot exactly when its read position is past the
marker, like the batch's events: a crash anywhere (before or after the key's record, before
or after the answer) neither loses them nor counts them twice, as the next start reads on from
the saved position. A batch without a key has no marker; its rejects are counted once its
lines are fsync'ed (a crash before the next snapshot loses them, and its retry counts it all
again anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..catalog import REJECT_REASONS
from ..events import Rejected, decode_line
from ..state import replace_atomically, write_all
from .files import Watch

log = logging.getLogger(__name__)

SOURCE = "push"
MARKER_KEY = "aicrm_push_batch"
BATCH_MARKER = b'{"' + MARKER_KEY.encode() + b'":'
"""How a keyed batch's marker line in the journal starts: ``{"aicrm_push_batch": {"key": ...,
"digest": ..., "at": ..., "rejected": {reason: n, ...}}}`` (``rejected`` only when the batch had
rejected lines, and not in markers written before it was added). Not an event, so a pushed line
like it is rejected before it could reach the journal; the file source counts its ``rejected``
(``marker_rejects``) and nothing else."""
_SEGMENT_RE = re.compile(r"^journal-(\d{12})\.jsonl$")


class RejectSink(Protocol):
    def reject(self, source: str, reason: str, n: int = 1) -> None: ...


MAX_REPORTED_REJECTS = 1000
"""Rejected lines listed in an answer; the rest are counted in ``rejected_total`` (a 10 MiB
body of bad lines would otherwise make an answer of hundreds of MB)."""


@dataclass(slots=True)
class BatchResult:
    accepted: int = 0
    rejected: list[dict[str, object]] = field(default_factory=list)
    rejected_total: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    """Rejected lines by reason, counted in the store only once the batch is journaled."""

    def reject(self, line: int, reason: str, detail: str) -> None:
        self.rejected_total += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.rejected) < MAX_REPORTED_REJECTS:
            self.rejected.append({"line": line, "reason": reason, "error": detail})

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"accepted": self.accepted, "rejected": self.rejected}
        if self.rejected_total > len(self.rejected):
            out["rejected_total"] = self.rejected_total
        return out


@dataclass(frozen=True, slots=True)
class BatchMarker:
    """What a keyed batch's marker line records besides its rejected counts."""

    key: str
    digest: str
    at: float

    def line(self, rejected: Mapping[str, int]) -> bytes:
        """The journal line; ``rejected``: the batch's rejected lines by reason."""
        m: dict[str, object] = {"key": self.key, "digest": self.digest, "at": self.at}
        if rejected:
            m["rejected"] = dict(rejected)
        return BATCH_MARKER + json.dumps(m, separators=(",", ":")).encode() + b"}"


_REASONS = frozenset(REJECT_REASONS)


def marker_rejects(line: bytes) -> dict[str, int]:
    """The rejected counts by reason a marker line carries: empty for a marker written before
    markers carried them (that process counted them when it ingested the batch) and for one
    without rejects. A damaged marker counts nothing (a warning says so), and only known
    reasons with positive whole counts are taken: a label value comes from a fixed set."""
    try:
        m = json.loads(line)[MARKER_KEY]
        rejected = m.get("rejected", {})
        if not isinstance(rejected, dict):
            raise TypeError(f"rejected is {type(rejected).__name__}, not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("push journal: a batch marker's rejected counts skipped: %s", exc)
        return {}
    out = {}
    for reason, n in rejected.items():
        if reason in _REASONS and type(n) is int and n > 0:
            out[reason] = n
        else:
            log.warning("push journal: a batch marker's rejected count %r: %r skipped",
                        reason, n)
    return out


class Journal:
    """Append-only segment files under ``<state_dir>/push``.

    ``readable_size(path)`` is how much of a segment is committed: the current segment's size
    as of its last successful fsync, and that of a segment given up because a failed write
    could not be cut back off it. The file source reads no further (``watch``)."""

    def __init__(self, state_dir: str | os.PathLike[str], segment_bytes: int = 64 << 20):
        self.dir = Path(state_dir) / "push"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path = ""
        self._size = 0
        """Committed size of the current segment."""
        self._seq = max(self._sequences(), default=0)
        self._readable: dict[str, int] = {}
        """Committed sizes by path: the current segment's, and the given-up ones'."""
        self._given_up: set[str] = set()
        """Segments with an uncommitted tail still on disk, cut back at the next append if the
        filesystem lets us by then. Only this process knows their limit: a restart before that
        would read the tail. (Their limits are kept while this process runs, also once they
        are released: a handful of entries, and only after a failed truncation.)"""

    @property
    def watch(self) -> Watch:
        return Watch(SOURCE, str(self.dir / "journal-*.jsonl"), BATCH_MARKER,
                     self.readable_size, marker_rejects)

    def readable_size(self, path: str) -> int | None:
        """How far the file source may read ``path``; None: to its end (a segment that was
        closed whole). Called by the file source on every pass, so without the lock: one
        dict lookup is atomic, and a value from before an append is only smaller."""
        return self._readable.get(path)

    def _sequences(self) -> list[int]:
        return [int(m.group(1)) for p in self.dir.iterdir() if (m := _SEGMENT_RE.match(p.name))]

    def _segment(self, seq: int) -> Path:
        return self.dir / f"journal-{seq:012d}.jsonl"

    def append(self, lines: list[bytes]) -> None:
        """Write whole lines and fsync before returning; raises OSError on failure, and then
        none of the lines is in the journal."""
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        with self._lock:
            if self._given_up:
                self._cut_given_up()
            if self._fd is None or self._size >= self.segment_bytes:
                self._roll()
            assert self._fd is not None
            try:
                write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError:
                self._cut_back()
                raise
            self._size += len(data)
            self._readable[self._path] = self._size

    def _cut_back(self) -> None:
        """Truncate the current segment to its committed size after a failed write or fsync;
        if that fails too, give the segment up at that size and go on in a new one."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
            return
        except OSError as exc:
            log.error("push journal: cannot cut %s back to its committed %d bytes after a "
                      "failed write (%s); it is read no further and the next batch starts a "
                      "new segment", self._path, self._size, exc)
        self._given_up.add(self._path)
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None

    def _cut_given_up(self) -> None:
        for path in list(self._given_up):
            try:
                os.truncate(path, self._readable[path])
            except FileNotFoundError:
                # Released: its limit stays, for the file source still holding it open.
                self._given_up.discard(path)
                continue
            except OSError:
                continue
            log.info("push journal: %s cut back to its committed end", path)
            self._given_up.discard(path)
            self._readable.pop(path, None)

    def _roll(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._readable.pop(self._path, None)  # closed whole: readable to its end
        self._seq += 1
        path = str(self._segment(self._seq))
        # Known before the file exists: the file source must not read a first write that
        # has not been fsync'ed yet.
        self._readable[path] = 0
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            del self._readable[path]
            raise
        self._path = path
        self._size = self._readable[path] = os.fstat(self._fd).st_size
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the new file's name is durable too
        finally:
            os.close(dfd)

    def current_segment(self) -> str | None:
        with self._lock:
            return self._path if self._fd is not None else None

    def release(self, positions: list[dict[str, object]]) -> None:
        """Delete older segments whose (committed) end is recorded as read in a saved
        snapshot."""
        current = self.current_segment()
        for p in positions:
            path = str(p.get("path", ""))
            if p.get("source") != SOURCE or path == current or not _SEGMENT_RE.match(
                os.path.basename(path)
            ):
                continue
            try:
                end = self._readable.get(path)
                if (os.path.getsize(path) if end is None else end) == p.get("offset"):
                    seq = int(_SEGMENT_RE.match(os.path.basename(path)).group(1))  # type: ignore[union-attr]
                    if seq < self._seq:
                        os.unlink(path)
            except (OSError, ValueError):
                continue

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def check_token(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time; the scheme is
    case-insensitive (RFC 7235: ``bearer <token>`` is the same)."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


def ingest_batch(body: bytes, journal: Journal, sink: RejectSink, *,
                 max_line_bytes: int, marker: BatchMarker | None = None) -> BatchResult:
    """Validate an NDJSON body line by line; journal the good lines (and the marker line of
    a keyed batch, with its rejected counts, after them in the same fsync), report the bad
    ones. Nothing is counted before the journal has the batch: a failed append is answered
    503, and its retry would count again. A keyed batch's rejects are then counted by the
    file source when it reads the marker (so a state snapshot holds them exactly when its
    position is past the marker); an unkeyed batch's are counted in ``sink`` here."""
    result, good = validate_batch(body, max_line_bytes=max_line_bytes)
    if marker is not None:
        journal.append([*good, marker.line(result.reasons)])
        return result
    journal.append(good)
    for reason, n in result.reasons.items():
        sink.reject(SOURCE, reason, n)
    return result


def validate_batch(body: bytes, *, max_line_bytes: int) -> tuple[BatchResult, list[bytes]]:
    """The answer for an NDJSON body and its good lines; counts nothing (a recovered batch's
    retry works its answer out again with it)."""
    result = BatchResult()
    good: list[bytes] = []
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        if len(line) > max_line_bytes:
            rej: object = Rejected("line_too_long", f"line longer than {max_line_bytes} bytes")
        else:
            rej = decode_line(line)
        if isinstance(rej, Rejected):
            result.reject(i, rej.reason, rej.detail)
        else:
            good.append(line)
    result.accepted = len(good)
    return result, good


IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RECORDED_STATUSES = frozenset({200, 400})
"""Answers that a retry must get again; a 503 (the journal write failed) is retried for real."""
RECOVERED = 0
"""Status of a key found only as a journal marker: applied, its answer not recorded yet."""


def valid_idempotency_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


@dataclass(frozen=True, slots=True)
class Recorded:
    at: float
    """Wall-clock time of the first answer."""
    digest: str
    """SHA-256 of the body, to refuse a key reused for another batch."""
    status: int
    body: dict[str, Any]


class IdempotencyIndex:
    """The answers of keyed batches, for ``retention_seconds``, kept in memory and appended to
    ``<dir>/idempotency.jsonl`` (fsync'ed) before the answer goes out; rewritten without the
    expired entries at start and whenever it holds twice as many lines as live entries. At most
    ``max_entries`` answers and ``max_bytes`` of them are kept, the oldest giving way (a batch
    of rejected lines has a long answer).

    ``apply(marker)`` journals the batch with ``marker`` (its key, body digest and time; the
    line adds the batch's rejected counts) in the same fsync, and the key's record follows. A
    crash between the two (no answer was sent) is repaired at the next start: the journal's
    segments are searched for markers whose key has no record, each is kept as applied (status
    ``RECOVERED``), and the retry gets the answer ``replay()`` works out again from the body
    (the same answer, rejected lines and ``rejected_total`` included: validation depends on
    the body and ``max_line_bytes`` only), without journaling or counting it again. The
    batch's rejected lines are counted by the file source from the marker, once (see
    ``ingest_batch``), whether or not the crashed process got to save them.
    """

    FILE = "idempotency.jsonl"

    def __init__(self, directory: str | os.PathLike[str], retention_seconds: float = 86_400,
                 max_entries: int = 100_000, max_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(directory) / self.FILE
        self.retention = retention_seconds
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[str, Recorded] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lines = 0
        self._load()
        self._recover()
        self._rewrite()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _load(self) -> None:
        if not self.path.exists():
            return
        horizon = self.clock() - self.retention
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    d = json.loads(raw)
                    rec = Recorded(float(d["at"]), str(d["digest"]), int(d["status"]),
                                   dict(d["body"]))
                    key = str(d["key"])
                except (ValueError, KeyError, TypeError) as exc:
                    # A line cut by a crash mid-write, or damage: that key is forgotten.
                    log.warning("%s line %d skipped: %s", self.path, lineno, exc)
                    continue
                if rec.at >= horizon:
                    self._admit(key, rec, len(raw))

    def _recover(self) -> None:
        """Keep the keys of journaled batches whose record a crash cut off."""
        horizon = self.clock() - self.retention
        found = 0
        for path in sorted(p for p in self.path.parent.iterdir() if _SEGMENT_RE.match(p.name)):
            for key, rec in _markers(path):
                if rec.at >= horizon and key not in self._entries:
                    self._admit(key, rec, len(self._line(key, rec)))
                    found += 1
        if found:
            log.warning("%d keyed push batches were journaled but their answers not recorded "
                        "(a crash); their retries get the answer again without counting twice",
                        found)

    def _admit(self, key: str, rec: Recorded, size: int) -> None:
        """Keep an answer, then drop the oldest while over either bound (caller holds _lock
        or is the constructor)."""
        self._bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self._entries[key] = rec
        self._entries.move_to_end(key)
        while self._entries and (len(self._entries) > self.max_entries
                                 or self._bytes > self.max_bytes):
            old, _ = self._entries.popitem(last=False)
            self._bytes -= self._sizes.pop(old)

    @staticmethod
    def _line(key: str, rec: Recorded) -> bytes:
        return json.dumps({"key": key, "at": rec.at, "digest": rec.digest,
                           "status": rec.status, "body": rec.body},
                          separators=(",", ":")).encode() + b"\n"

    def _rewrite(self) -> None:
        """Replace the file with the live entries, all or nothing."""
        with self._lock:
            data = b"".join(self._line(k, r) for k, r in self._entries.items())
            self._lines = len(self._entries)
        replace_atomically(self.path, data)

    def _live(self, key: str) -> Recorded | None:
        rec = self._entries.get(key)
        if rec is not None and rec.at < self.clock() - self.retention:
            del self._entries[key]
            self._bytes -= self._sizes.pop(key)
            return None
        return rec

    def run(self, key: str, body: bytes,
            apply: Callable[[BatchMarker], tuple[int, dict[str, Any]]],
            replay: Callable[[], tuple[int, dict[str, Any]]]
            ) -> tuple[int, dict[str, Any], bool]:
        """``apply(marker)``'s answer, or the one recorded for ``key``: (status, body,
        replayed); ``replay()`` answers a retry of a batch recovered from the journal. A
        request with a key already being applied waits for that one to finish."""
        digest = hashlib.sha256(body).hexdigest()
        while True:
            with self._lock:
                rec = self._live(key)
                if rec is not None:
                    break
                waiting = self._inflight.get(key)
                if waiting is None:
                    self._inflight[key] = threading.Event()
                    break
            waiting.wait()
        if rec is not None:
            if rec.digest != digest:
                return 422, {"error": f"{IDEMPOTENCY_HEADER} {key!r} was used for another batch "
                                      "(a retry must resend the same body)"}, False
            if rec.status != RECOVERED:
                return rec.status, rec.body, True
        try:
            if rec is not None:
                status, answer = replay()
                self._record(key, Recorded(rec.at, digest, status, answer))
                return status, answer, True
            at = self.clock()
            status, answer = apply(BatchMarker(key, digest, at))
            if status in RECORDED_STATUSES:
                self._record(key, Recorded(at, digest, status, answer))
            return status, answer, False
        finally:
            if rec is None:
                with self._lock:
                    self._inflight.pop(key).set()

    def _record(self, key: str, rec: Recorded) -> None:
        # One lock over the append, the entry and any rewrite: a rewrite then never misses an
        # entry whose line is already in the file it replaces.
        with self._write_lock:
            line = self._line(key, rec)
            try:
                write_all(self._fd, line)
                os.fsync(self._fd)
            except OSError as exc:
                # The batch is journaled and answered; only a retry of it would count again.
                log.error("cannot record %s %r: %s", IDEMPOTENCY_HEADER, key, exc)
            with self._lock:
                self._admit(key, rec, len(line))
                self._lines += 1
                compact = self._lines > 2 * len(self._entries) + 1000
            if compact and self._fd >= 0:
                os.close(self._fd)
                try:
                    self._rewrite()
                except OSError as exc:
                    log.error("cannot rewrite %s: %s", self.path, exc)
                finally:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                       0o600)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._write_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _markers(path: Path) -> list[tuple[str, Recorded]]:
    """The batch markers in one journal segment (a damaged one is skipped with a warning)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.error("cannot read %s for batch markers: %s", path, exc)
        return []
    found = []
    start = 0 if data.startswith(BATCH_MARKER) else _next_marker(data, 0)
    while start >= 0:
        end = data.find(b"\n", start)
        if end < 0:
            break  # cut by a crash before its newline (and fsync): the batch was not answered
        try:
            d = json.loads(data[start:end])
            m = d[MARKER_KEY]
            if len(d) != 1:
                raise ValueError("not a marker")
            found.append((str(m["key"]), Recorded(float(m["at"]), str(m["digest"]),
                                                  RECOVERED, {})))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: a line starting like a batch marker skipped: %s", path, exc)
        start = _next_marker(data, end)
    return found


def _next_marker(data: bytes, frm: int) -> int:
    i = data.find(b"\n" + BATCH_MARKER, frm)
    return i + 1 if i >= 0 else -1
