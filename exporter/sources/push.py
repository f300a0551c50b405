"""HTTP push (``POST /v1/events``): validate, then append accepted lines durably to a journal.

A batch is answered 2xx only after its accepted lines are fsync'ed into the journal, so a
``kill -9`` right after the answer loses nothing. The journal is a directory of segment files
that the file source follows like any other JSONL log (as source ``push``), which gives pushed
events the same exactly-once path as files. Segments are deleted once fully read and that
position is saved in a state snapshot.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..events import Rejected, decode_line
from .files import Watch

log = logging.getLogger(__name__)

SOURCE = "push"
_SEGMENT_RE = re.compile(r"^journal-(\d{12})\.jsonl$")


class RejectSink(Protocol):
    def reject(self, source: str, reason: str, n: int = 1) -> None: ...


@dataclass(slots=True)
class BatchResult:
    accepted: int = 0
    rejected: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"accepted": self.accepted, "rejected": self.rejected}


class Journal:
    """Append-only segment files under ``<state_dir>/push``."""

    def __init__(self, state_dir: str | os.PathLike[str], segment_bytes: int = 64 << 20):
        self.dir = Path(state_dir) / "push"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._seq = max(self._sequences(), default=0)

    @property
    def watch(self) -> Watch:
        return Watch(SOURCE, str(self.dir / "journal-*.jsonl"))

    def _sequences(self) -> list[int]:
        return [int(m.group(1)) for p in self.dir.iterdir() if (m := _SEGMENT_RE.match(p.name))]

    def _segment(self, seq: int) -> Path:
        return self.dir / f"journal-{seq:012d}.jsonl"

    def append(self, lines: list[bytes]) -> None:
        """Write whole lines and fsync before returning; raises OSError on failure."""
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        with self._lock:
            if self._fd is None or self._size >= self.segment_bytes:
                self._roll()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            self._size += len(data)

    def _roll(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._seq += 1
        path = self._segment(self._seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the new file's name is durable too
        finally:
            os.close(dfd)

    def current_segment(self) -> str | None:
        with self._lock:
            return str(self._segment(self._seq)) if self._fd is not None else None

    def release(self, positions: list[dict[str, object]]) -> None:
        """Delete older segments whose end is recorded as read in a saved snapshot."""
        current = self.current_segment()
        for p in positions:
            path = str(p.get("path", ""))
            if p.get("source") != SOURCE or path == current or not _SEGMENT_RE.match(
                os.path.basename(path)
            ):
                continue
            try:
                if os.path.getsize(path) == p.get("offset"):
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
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


def ingest_batch(body: bytes, journal: Journal, sink: RejectSink, *,
                 max_line_bytes: int) -> BatchResult:
    """Validate an NDJSON body line by line; journal the good lines, report the bad ones."""
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
            sink.reject(SOURCE, rej.reason)
            result.rejected.append({"line": i, "reason": rej.reason, "error": rej.detail})
        else:
            good.append(line)
    journal.append(good)
    result.accepted = len(good)
    return result
