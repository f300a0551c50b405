"""JSONL event files: follow globs like ``tail -F``, exactly once across restarts.

Each file is tracked by identity (device, inode and a fingerprint of its first bytes, so a
reused inode is not mistaken for the old file), not by name, and whatever source finds it (a
source renamed in the config reads on from where the old name left off). That is what makes
rotation (rename + new file) safe: a renamed file is drained to its end before it is let go,
and the new file at the old name starts at offset 0. A file's identity is taken from the
handle that was opened, not from the name it was found under, which a rotation may have given
to another file in between. A file that shrinks was truncated and is read again from the
start. Only complete lines are consumed; a half-written last line waits for its newline.
A file that leaves the glob for good is let go with its position saved, so one that comes
back (a directory moved away and back, a share that was unreachable) reads on where it was.
At most ``max_open_files`` files are kept open: the least recently grown of those the glob
found in this pass and that were read to their size are closed, and opened again when a stat
shows their size changed (their fingerprint is checked again then); one renamed out of the glob
while closed is looked for by inode in its directory. A new file that is a byte prefix of a
tracked file (copytruncate with a glob that matches the copies) is held, unread, until it is
either the copy of a truncated file (read on from that file's position) or no prefix any more.
Let-go positions are dropped once their file is gone from its directory (deleted).
Positions, and which files are tracked, are read and changed only under the store's lock, so
a state snapshot always pairs counters with the positions they came from.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

import msgspec

from ..events import (
    MAX_TS_AHEAD_SECONDS,
    Event,
    Rejected,
    decode_event,
    decode_line,
    ts_ahead,
    utf8_error,
)

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 256
TAIL_BYTES = 256
"""The last bytes read from a file are hashed too: a copy of it must hold the same bytes there."""
READ_CHUNK = 1024 * 1024
ROTATED_GRACE_SECONDS = 5.0
"""How long a file that left the glob (renamed or deleted) is still watched for late writes;
twice this, how long the position of a file whose truncation was read waits for its copy."""
FORGET_UNSEEN_SECONDS = 30 * 86400.0
"""A saved read position whose file no run has found for this long is dropped from the state:
a file renamed out of the glob while the exporter was stopped is never found again. Long, so
a share that is away for days and comes back is still read from where it was left."""
SAVED_CHECK_SECONDS = 60.0
"""How often the saved positions are checked for files that were deleted (dropped then)."""
ERROR_LOG_INTERVAL = 60.0
"""An error about one path (cannot stat, open or read it) is logged when it first happens, then
at most once per this many seconds, with the number of repeats not shown."""


class Sink(Protocol):
    lock: threading.RLock

    def apply(self, event: Event) -> None: ...
    def accepted(self, source: str, n: int = 1, newest_ts: float | None = None) -> None:
        """``newest_ts``: the newest event time; None when an event had none (lag 0)."""
    def reject(self, source: str, reason: str, n: int = 1) -> None: ...
    def source_status(self, source: str, up: bool) -> None: ...
    def add_source(self, source: str) -> None: ...


Readable = Callable[[str], int | None]
"""How far the file at a path may be read; None: to its end."""


@dataclass(frozen=True, slots=True)
class Watch:
    """One named source: a glob of JSONL files."""

    source: str
    pattern: str
    marker: bytes = b""
    """Lines that start with this and are not events are the writer's own bookkeeping (the
    push journal's batch markers): skipped without counting them as rejected."""
    readable: Readable | None = None
    """How far a file may be read: the push journal's committed size, so bytes of a write
    that has not been fsync'ed yet (and may fail) are never counted."""
    marker_rejects: Callable[[bytes], Mapping[str, int]] | None = None
    """Rejected lines by reason that a marker line records (the push journal's keyed batches
    carry their rejects this way): counted when the marker is read, under the same lock as
    the read position, so a state snapshot holds them exactly when its position is past it."""


@dataclass(slots=True)
class Tracked:
    source: str
    path: str
    dev: int
    ino: int
    offset: int = 0
    line: int = 0
    """Lines consumed so far: error messages name the line."""
    fingerprint: str = ""
    fp_len: int = 0
    skipping: bool = False
    """Inside an over-long line: discard up to the next newline."""
    fh: BinaryIO | None = None
    """None while closed (``max_open_files``): opened again when its size changes."""
    gone_since: float | None = None
    drained: bool = field(default=False)
    seen_size: int = -1
    """The size as of the last read (-1: never read)."""
    tail_fp: str = ""
    tail_len: int = 0
    """Fingerprint of the ``tail_len`` bytes before ``offset`` (0: unknown)."""
    claimed: bool = False
    """A copy took over its position before its truncation was read."""

    @property
    def key(self) -> str:
        return f"{self.dev}:{self.ino}"

    def position(self) -> dict[str, Any]:
        return {
            "source": self.source, "path": self.path, "dev": self.dev, "ino": self.ino,
            "offset": self.offset, "line": self.line, "fingerprint": self.fingerprint,
            "fp_len": self.fp_len, "skipping": self.skipping,
        }


def _fingerprint(fh: BinaryIO, length: int) -> str:
    fh.seek(0)
    return hashlib.blake2b(fh.read(length), digest_size=12).hexdigest()


def _size(t: Tracked, fh: BinaryIO, readable: Readable | None) -> int:
    """The file's size, or less if its writer has committed less (raises OSError)."""
    size = os.fstat(fh.fileno()).st_size
    if readable is not None:
        end = readable(t.path)
        if end is not None and end < size:
            return end
    return size


_DT_MIN = datetime.min.replace(tzinfo=UTC)


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def default_max_open_files() -> int:
    """A quarter of the process's descriptor limit (the rest is for sockets, the journal, the
    state file, the database), from 8 to 1024."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1024
    return max(8, min(1024, soft // 4))


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class RejectLog:
    """Says which file, line and field was wrong, without flooding the log under a storm."""

    def __init__(self, per_interval: int = 20, interval: float = 10.0):
        self.per_interval, self.interval = per_interval, interval
        self.window_start, self.shown, self.suppressed = 0.0, 0, 0

    def __call__(self, where: str, rejected: Rejected) -> None:
        now = time.monotonic()
        if now - self.window_start > self.interval:
            if self.suppressed:
                log.warning("%d more rejected lines not shown", self.suppressed)
            self.window_start, self.shown, self.suppressed = now, 0, 0
        if self.shown < self.per_interval:
            self.shown += 1
            log.warning("rejected %s: %s: %s", where, rejected.reason, rejected.detail)
        else:
            self.suppressed += 1


class ErrorLog:
    """Logs an error about one path when it first happens, then at most once per ``interval``
    with the number of repeats not shown: a path that stays broken (a symlink loop, a file
    without read permission) does not log at every poll."""

    MAX_KEYS = 10_000

    def __init__(self, interval: float = ERROR_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._last: dict[str, tuple[float, int]] = {}
        """key -> (when last logged, repeats not logged since)."""

    def __call__(self, key: str, msg: str, *args: object) -> None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._last) >= self.MAX_KEYS:
            self._last.clear()
        self._last[key] = (now, 0)
        if last is not None and last[1]:
            log.error(msg + " (%d more times in the last %.0f s)", *args, last[1],
                      now - last[0])
        else:
            log.error(msg, *args)


def _open_same(path: str, key: str) -> BinaryIO | None:
    """A new handle on ``path`` if it is still the file ``key`` (``dev:ino``), None if another
    file is at that name now (a rotation since it was seen); open()'s OSError is the caller's."""
    fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller, or here
    try:
        fst = os.fstat(fh.fileno())
    except OSError:
        fh.close()
        return None
    if f"{fst.st_dev}:{fst.st_ino}" != key:
        fh.close()
        return None
    return fh


class FileTailer:
    """Reads new complete lines from every watched file and hands them to the sink."""

    def __init__(
        self,
        watches: Sequence[Watch],
        sink: Sink,
        *,
        max_line_bytes: int = 1024 * 1024,
        clock: Callable[[], float] = time.time,
        max_open_files: int | None = None,
    ):
        self.watches = list(watches)
        self.sink = sink
        self.max_line_bytes = max_line_bytes
        self.clock = clock
        self.max_open_files = max(1, max_open_files or default_max_open_files())
        self.files: dict[str, Tracked] = {}
        self._saved: dict[str, dict[str, Any]] = {}
        self._open_files: dict[str, Tracked] = {}
        """Tracked files with an open handle, least recently grown first."""
        self._pending: dict[str, Tracked] = {}
        """New files that are a byte prefix of a tracked file (possible copies under way),
        held open, not read, until they are found to be a copy or a file of their own."""
        self._cut: dict[str, tuple[float, dict[str, Any]]] = {}
        """Positions of files whose truncation a read just found (when, ``_identity``): a copy
        found after that reads on from there."""
        self._seen_now: set[str] = set()
        """Files the glob found in this pass: only those may be closed."""
        self._newest: dict[str, float | None] = {}
        """The newest event time per source in this pass (None: an event had none)."""
        self._next_saved_check = 0.0
        self._reject_log = RejectLog()
        self._error_log = ErrorLog()
        self._markers = {w.source: (w.marker, w.marker_rejects)
                         for w in self.watches if w.marker}
        for w in self.watches:
            sink.add_source(w.source)

    # --- persistence ---------------------------------------------------------------------

    def positions(self) -> list[dict[str, Any]]:
        """Read positions (call with the sink's lock held, beside the metric dump)."""
        live = [t.position() for t in self.files.values()]
        keys = {f"{p['dev']}:{p['ino']}" for p in live}
        # Saved positions of files not seen yet this run stay until their file shows up, or
        # until no run has seen it for FORGET_UNSEEN_SECONDS. A copy of the items: the poll
        # thread takes entries out as it finds their files.
        now = self.clock()
        kept = []
        for k, p in list(self._saved.items()):
            if now - float(p["unseen_since"]) > FORGET_UNSEEN_SECONDS:
                self._saved.pop(k, None)
                log.info("forgetting the read position of %s: not seen for %.0f days",
                         p.get("path"), FORGET_UNSEEN_SECONDS / 86400)
            elif k not in keys:
                kept.append(p)
        return live + kept

    def restore(self, positions: Sequence[dict[str, Any]]) -> None:
        """Positions from the state file; each remembers since when no run has seen its file."""
        now = self.clock()
        self._saved = {f"{p['dev']}:{p['ino']}": {**p, "unseen_since": p.get("unseen_since", now)}
                       for p in positions}

    # --- polling -------------------------------------------------------------------------

    def poll(self) -> int:
        """One pass over every watch; returns the number of lines consumed."""
        total = 0
        self._seen_now = set()
        self._newest = {}
        for w in self.watches:
            seen = self._discover(w)
            for t in [t for t in self.files.values() if t.source == w.source]:
                st = seen.get(t.key)
                if st is None and t.gone_since is None:
                    if t.fh is None:
                        # Closed, and no longer in the glob: renamed within its directory
                        # (a rotation), it is opened there and drained like an open one.
                        self._find_moved(t)
                    t.gone_since = self.clock()
                if t.fh is not None or self._reopen(t, st):
                    total += self._read(t, w.readable)
                    self._limit_open()
                if t.gone_since is not None and self.clock() - t.gone_since > ROTATED_GRACE_SECONDS:
                    self._forget(t, w.readable)
        self._limit_open()
        now = self.clock()
        if self._cut:
            self._cut = {k: v for k, v in self._cut.items()
                         if now - v[0] <= 2 * ROTATED_GRACE_SECONDS}
        if now >= self._next_saved_check:
            self._next_saved_check = now + SAVED_CHECK_SECONDS
            self._drop_deleted_saved()
        return total

    def _discover(self, w: Watch) -> dict[str, os.stat_result]:
        """The tracked files found by the glob (opening new ones), by key, with their stat."""
        seen: dict[str, os.stat_result] = {}
        try:
            paths = sorted(glob.glob(w.pattern))
            up = os.path.isdir(os.path.dirname(w.pattern) or ".") or bool(paths)
        except OSError as exc:
            self._error_log(f"list:{w.pattern}", "source %s: cannot list %s: %s",
                            w.source, w.pattern, exc)
            self.sink.source_status(w.source, False)
            return seen
        for path in paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._error_log(f"stat:{path}", "source %s: cannot stat %s: %s",
                                w.source, path, exc)
                up = False
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = f"{st.st_dev}:{st.st_ino}"
            t = self.files.get(key)
            if t is None:
                if key in self._pending:
                    self._pending[key].path = path
                try:
                    t = self._open(w.source, path, copies=w.readable is None)
                except FileNotFoundError:
                    continue  # rotated away since the stat: found under its new name
                except OSError as exc:
                    self._error_log(f"open:{path}", "source %s: cannot open %s: %s",
                                    w.source, path, exc)
                    up = False
                    continue
                if t is None:
                    continue
                seen[t.key] = st
                self._seen_now.add(t.key)
                t.path = path
                t.gone_since = None
                if len(self._open_files) > self.max_open_files:
                    # Read it now, so that it may be closed: many new files at once (a first
                    # start over weeks of dated files) must not run out of descriptors.
                    self._read(t, w.readable)
                    self._limit_open()
                continue
            seen[t.key] = st
            self._seen_now.add(t.key)
            t.path = path
            t.gone_since = None
        # Possible copies that left the glob are decided on through their handle.
        for p in [p for p in self._pending.values() if p.source == w.source]:
            if p.key in seen:
                continue
            try:
                if p.fh is None or os.fstat(p.fh.fileno()).st_nlink == 0:
                    self._drop_pending(p)
                    continue
                self._open(w.source, p.path, copies=True, pending=p)
            except OSError:
                self._drop_pending(p)
        self.sink.source_status(w.source, up)
        return seen

    # --- open handles --------------------------------------------------------------------

    def _touch(self, t: Tracked) -> None:
        """``t`` was opened or grew: the last to be closed."""
        self._open_files.pop(t.key, None)
        self._open_files[t.key] = t

    def _closable(self, t: Tracked) -> bool:
        """Whether ``t`` may be closed: found by the glob in this pass (one that left it is
        drained through its handle until it is let go) and read to its current size (a closed
        file is opened again when its size changes; one with unread bytes could be renamed
        away before that, and they would be lost)."""
        if t.gone_since is not None or t.key not in self._seen_now or t.fh is None:
            return False
        if t.seen_size < 0:
            return False
        try:
            return os.fstat(t.fh.fileno()).st_size == t.seen_size
        except OSError:
            return False

    def _limit_open(self) -> None:
        """Close the least recently grown files past ``max_open_files`` that may be closed
        (``_closable``); the cap is exceeded rather than close one that may not."""
        excess = len(self._open_files) - self.max_open_files
        if excess <= 0:
            return
        for t in list(self._open_files.values()):
            if excess <= 0:
                break
            if self._closable(t):
                self._close(t)
                excess -= 1

    def _close(self, t: Tracked) -> None:
        self._open_files.pop(t.key, None)
        if t.fh is not None:
            fh, t.fh = t.fh, None
            fh.close()

    def _find_moved(self, t: Tracked) -> None:
        """Open the closed file ``t`` if it is still in the directory of its last known path
        under another name (renamed out of the glob there): its bytes written before and after
        the rename are then read like those of a renamed open file. One renamed into another
        directory, or deleted, while closed cannot be found: what it got since its last read
        is lost (docs/exporter.md)."""
        found = None
        try:
            with os.scandir(os.path.dirname(t.path) or ".") as entries:
                for e in entries:
                    if e.inode() == t.ino:
                        found = e.path
                        break
        except OSError:
            return
        if found is None:
            return
        try:
            fh = open(found, "rb", buffering=0)  # noqa: SIM115
        except OSError:
            return
        try:
            fst = os.fstat(fh.fileno())
        except OSError:
            fh.close()
            return
        if f"{fst.st_dev}:{fst.st_ino}" != t.key or not stat.S_ISREG(fst.st_mode):
            fh.close()
            return
        log.info("%s: renamed to %s while closed; reading it to its end", t.path, found)
        t.path, t.fh = found, fh
        self._touch(t)

    def _reopen(self, t: Tracked, st: os.stat_result | None) -> bool:
        """Open a closed file again if the glob found it with another size than it had at its
        last read. The handle is checked to be that file (a rotation since the stat may have
        put another one at the name: found then at the next pass); its fingerprint is checked
        again by the read, as for an open file."""
        if st is None or st.st_size == t.seen_size:
            return False
        fh = self._open_again(t)
        if fh is None:
            return False
        t.fh = fh
        self._touch(t)
        return True

    def _open_again(self, t: Tracked) -> BinaryIO | None:
        """A new handle on the closed file ``t`` at its path; None if it is not there."""
        try:
            return _open_same(t.path, t.key)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._error_log(f"open:{t.path}", "source %s: cannot open %s: %s",
                            t.source, t.path, exc)
            self.sink.source_status(t.source, False)
            return None

    def _drop_pending(self, p: Tracked) -> None:
        self._pending.pop(p.key, None)
        if p.fh is not None:
            fh, p.fh = p.fh, None
            fh.close()

    def _open(self, source: str, path: str, copies: bool = True,
              pending: Tracked | None = None) -> Tracked | None:
        """Track the file opened at ``path`` (or the one already tracked if a rotation since
        the stat put that one there); None if it is no regular file now, or if it may be a
        copy under way (``copies``: look for copies; not in the push journal, whose segments
        are never copied and may well start with the same batch). A possible copy is held
        open in ``_pending`` (``pending``: decide on that one, through its handle)."""
        if pending is None:
            # Kept open to follow the file across renames. Unbuffered: a buffer could hold
            # bytes read past the readable end that a writer has since cut back and rewritten.
            fh = open(path, "rb", buffering=0)  # noqa: SIM115
            try:
                st = os.fstat(fh.fileno())
            except BaseException:
                fh.close()
                raise
            key = f"{st.st_dev}:{st.st_ino}"
            known = self.files.get(key)
            if known is not None or not stat.S_ISREG(st.st_mode):
                fh.close()
                return known
            t = self._pending.get(key)
            if t is not None and t.fh is not None:
                fh.close()  # the handle held since it was first found
            else:
                t = Tracked(source, path, st.st_dev, st.st_ino, fh=fh)
        else:
            t = pending
        try:
            copied: dict[str, Any] | None = None
            if copies and t.key not in self._saved:
                found = self._copy_of(t)
                if found is None:  # a byte prefix of a tracked file: a copy under way?
                    if t.key not in self._pending:
                        log.info("%s holds the first bytes of a file already read; waiting "
                                 "until it is either that file's copy or a file of its own",
                                 path)
                    self._pending[t.key] = t
                    return None
                if isinstance(found, dict):
                    copied = found
            # The saved position is handed over to the tracked file in one step under the
            # lock: a snapshot has it in one place or the other.
            with self.sink.lock:
                saved = self._saved.get(t.key)
                if saved is not None:
                    self._resume(t, saved)
                elif copied is not None:
                    log.info("%s: a copy of %s (copytruncate?); reading on from its offset %d",
                             path, copied["path"], copied["offset"])
                    t.offset, t.line, t.skipping = (copied["offset"], copied["line"],
                                                    copied["skipping"])
                    t.fingerprint, t.fp_len = copied["fingerprint"], copied["fp_len"]
                self._saved.pop(t.key, None)
                self.files[t.key] = t
        except BaseException:
            self._drop_pending(t)
            raise
        self._pending.pop(t.key, None)
        self._touch(t)
        return t

    @staticmethod
    def _identity(o: Tracked) -> dict[str, Any]:
        return {"path": o.path, "offset": o.offset, "line": o.line, "skipping": o.skipping,
                "fingerprint": o.fingerprint, "fp_len": o.fp_len, "tail_fp": o.tail_fp,
                "tail_len": o.tail_len}

    def _copy_of(self, t: Tracked) -> dict[str, Any] | bool | None:
        """What the new file ``t`` is (copytruncate with the copies in the glob):

        - the position (``_identity``) of a tracked file it is a copy of: one that was
          truncated (just now, or not read since), whose fingerprint and last bytes read the
          new file holds at the same places; read on from there;
        - None: a byte prefix (by its first and last bytes, empty included) of a tracked file
          that was not truncated: a copy under way, or done and waiting for the truncation;
          decided again at the next pass (never read while it stays one: its events are those
          of the file it copies);
        - True: a file of its own, read from its start."""
        assert t.fh is not None
        size = os.fstat(t.fh.fileno()).st_size
        heads: dict[int, str] = {}

        def holds(ident: dict[str, Any]) -> bool:
            fp_len, offset = ident["fp_len"], ident["offset"]
            if not offset or not fp_len or size < offset:
                return False
            assert t.fh is not None
            head = heads.get(fp_len)
            if head is None:
                head = heads[fp_len] = _fingerprint(t.fh, fp_len)
            if head != ident["fingerprint"]:
                return False
            if ident["tail_len"]:
                t.fh.seek(offset - ident["tail_len"])
                return bool(_hash(t.fh.read(ident["tail_len"])) == ident["tail_fp"])
            return True

        for o in list(self.files.values()):
            if not o.claimed and holds(self._identity(o)) and self._truncated(o):
                o.claimed = True  # its truncation is read next: no record of it is kept
                return self._identity(o)
        for k, (_, ident) in list(self._cut.items()):
            if holds(ident):
                del self._cut[k]
                return ident
        for o in list(self.files.values()):
            if o.offset and self._prefix_of(t, size, o):
                return None
        return True

    def _peek(self, o: Tracked) -> tuple[BinaryIO, bool] | None:
        """A handle on the tracked file ``o``: its own, or a new one if it is closed (True:
        to be closed after use); None if it cannot be opened."""
        if o.fh is not None:
            return o.fh, False
        try:
            fh = _open_same(o.path, o.key)
        except OSError:
            return None
        return None if fh is None else (fh, True)

    def _prefix_of(self, t: Tracked, size: int, o: Tracked) -> bool:
        """Whether the new file ``t`` (``size`` bytes) holds the bytes ``o`` holds at the same
        places, at its start and at its end, ``o`` being no shorter: a copy of ``o`` under
        way, or done (an empty file is a copy just begun)."""
        assert t.fh is not None
        peek = self._peek(o)
        if peek is None:
            return False
        fh, own = peek
        try:
            if os.fstat(fh.fileno()).st_size < size:
                return False
            for start, end in ((0, min(size, FINGERPRINT_BYTES)),
                               (max(0, size - TAIL_BYTES), size)):
                t.fh.seek(start)
                fh.seek(start)
                if t.fh.read(end - start) != fh.read(end - start):
                    return False
            return True
        except OSError:
            return False
        finally:
            if own:
                fh.close()

    def _truncated(self, t: Tracked) -> bool:
        """Whether ``t`` was cut back below its read position, or rewritten from its start."""
        peek = self._peek(t)
        if peek is None:
            return False
        fh, own = peek
        try:
            size = os.fstat(fh.fileno()).st_size
            return size < t.offset or _fingerprint(fh, t.fp_len) != t.fingerprint
        except OSError:
            return False
        finally:
            if own:
                fh.close()

    @staticmethod
    def _list_inodes(d: str, dev: int) -> dict[int, str] | None:
        """The entries of directory ``d`` by inode; None if it cannot be listed, or is not on
        device ``dev`` (a mount point: its inodes are another file system's)."""
        try:
            if os.stat(d).st_dev != dev:
                return None
            with os.scandir(d) as entries:
                return {e.inode(): e.path for e in entries}
        except OSError:
            return None

    def _drop_deleted_saved(self) -> None:
        """Follow the files of saved positions within the directory of their last known path
        (a rotated file renamed on: .1, .2, ...), and drop the position of one that was found
        there (``located``) and is no longer there: deleted (by its rotation, as a rule). One
        never found there (moved to another directory, whose directory is missing or cannot
        be listed: moved away, a share that is unreachable) is kept for FORGET_UNSEEN_SECONDS:
        it may come back."""
        listed: dict[tuple[str, int], dict[int, str] | None] = {}
        gone: list[str] = []
        moved: dict[str, dict[str, Any]] = {}
        for k, p in list(self._saved.items()):
            try:
                d, dev, ino = os.path.dirname(str(p["path"])) or ".", int(p["dev"]), int(p["ino"])
            except (KeyError, TypeError, ValueError):
                continue
            if (d, dev) not in listed:
                listed[d, dev] = self._list_inodes(d, dev)
            found = listed[d, dev]
            if found is None:
                continue
            path = found.get(ino)
            if path is None:
                if p.get("located"):
                    gone.append(k)
            elif path != p["path"] or not p.get("located"):
                moved[k] = {**p, "path": path, "located": True}
        if not gone and not moved:
            return
        with self.sink.lock:
            for k in gone:
                self._saved.pop(k, None)
            for k, p in moved.items():
                if k in self._saved:
                    self._saved[k] = p
        if gone:
            log.info("dropped the saved read positions of %d deleted files", len(gone))

    @staticmethod
    def _resume(t: Tracked, saved: dict[str, Any]) -> None:
        """Read on from a saved position, unless the inode now holds another file."""
        assert t.fh is not None
        fp_len = int(saved.get("fp_len", 0))
        fp = _fingerprint(t.fh, fp_len) if fp_len else ""
        if fp_len and fp != saved.get("fingerprint"):
            log.info("%s: inode reused by a new file; reading it from the start", t.path)
            return
        if saved.get("source") != t.source:
            log.info("%s: now read as source %s (was %s); reading on from its saved position",
                     t.path, t.source, saved.get("source"))
        t.offset = int(saved["offset"])
        t.line = int(saved.get("line", 0))
        t.fingerprint, t.fp_len = saved.get("fingerprint", ""), fp_len
        t.skipping = bool(saved.get("skipping", False))

    def _forget(self, t: Tracked, readable: Readable | None = None) -> None:
        """Let go of a file that left the glob; an unfinished last line will never be. Unless
        it was deleted, its position is kept as a saved one (for FORGET_UNSEEN_SECONDS): a file
        that comes back (its directory moved away and back, a share that was unreachable) is
        read on from there, not counted again from its start."""
        pending, deleted = 0, False
        where: dict[str, Any] = {}
        if t.fh is not None:
            try:
                deleted = os.fstat(t.fh.fileno()).st_nlink == 0
                pending = _size(t, t.fh, readable) - t.offset
            except OSError:
                pending = 0
            if not deleted:
                # Where it is now (a rotated file: renamed in its directory): its position
                # is dropped once it is no longer there (_drop_deleted_saved).
                path = (self._list_inodes(os.path.dirname(t.path) or ".", t.dev)
                        or {}).get(t.ino)
                if path is not None:
                    where = {"path": path, "located": True}
        elif t.seen_size > t.offset:
            pending = t.seen_size - t.offset  # closed after its last read: a partial line
        with self.sink.lock:
            if pending > 0 and not t.skipping:
                self._reject(t, t.line + 1, Rejected(
                    "invalid_json", f"unfinished last line ({pending} bytes) in a file "
                    "that was rotated away or deleted"))
                t.offset += pending
                t.skipping = True  # should it come back finished: the rest is skipped
            del self.files[t.key]
            if not deleted:
                self._saved[t.key] = {**t.position(), "unseen_since": self.clock(), **where}
        self._close(t)

    def close(self) -> None:
        for t in self.files.values():
            self._close(t)
        for p in list(self._pending.values()):
            self._drop_pending(p)
        self._open_files.clear()

    def _read(self, t: Tracked, readable: Readable | None = None) -> int:
        fh = t.fh
        assert fh is not None
        try:
            size = _size(t, fh, readable)
        except OSError as exc:
            self._error_log(f"read:{t.path}", "%s: %s", t.path, exc)
            return 0
        if size != t.seen_size:
            self._touch(t)
        try:
            n = self._read_locked(t, fh, size)
        except OSError as exc:
            # Positions only move past applied lines, so the next pass resumes cleanly.
            self._error_log(f"read:{t.path}", "%s: %s", t.path, exc)
            self.sink.source_status(t.source, False)
            return 0
        t.seen_size = size
        return n

    def _read_locked(self, t: Tracked, fh: BinaryIO, size: int) -> int:
        """Read up to ``size``; the sink's lock is taken per chunk, so a scrape waits for at
        most one chunk even while a large backlog is being read."""
        consumed = 0
        with self.sink.lock:
            if size < t.offset or (
                # copytruncate followed by more writes than were read before the next pass
                size > t.offset and t.fp_len and _fingerprint(fh, t.fp_len) != t.fingerprint
            ):
                log.warning("%s: truncated (size %d, offset %d); reading from the start",
                            t.path, size, t.offset)
                if t.offset and not t.claimed:
                    self._cut[t.key] = (self.clock(), self._identity(t))
                t.claimed = False
                t.offset, t.line, t.skipping, t.fp_len, t.fingerprint = 0, 0, False, 0, ""
                t.tail_len = 0
            if t.fp_len < FINGERPRINT_BYTES and size > t.fp_len:
                t.fp_len = min(size, FINGERPRINT_BYTES)
                t.fingerprint = _fingerprint(fh, t.fp_len)
        read_size = max(READ_CHUNK, self.max_line_bytes + 1)
        while t.offset < size:
            fh.seek(t.offset)
            chunk = fh.read(min(read_size, size - t.offset))
            if not chunk:
                break
            end = chunk.rfind(b"\n")
            with self.sink.lock:
                if end < 0:
                    # No complete line yet: wait, unless the line is already too long.
                    if len(chunk) > self.max_line_bytes or t.skipping:
                        if not t.skipping:
                            self._reject(t, t.line + 1, Rejected(
                                "line_too_long", f"line longer than {self.max_line_bytes} bytes"))
                        t.skipping = True
                        t.offset += len(chunk)
                        t.tail_len = 0
                        continue
                    break
                consumed += self._lines(t, chunk[: end + 1])
                t.offset += end + 1
                tail = chunk[max(0, end + 1 - TAIL_BYTES): end + 1]
                t.tail_fp, t.tail_len = _hash(tail), len(tail)
        return consumed

    def _lines(self, t: Tracked, data: bytes) -> int:
        """Decode and apply complete lines (``data`` ends with a newline)."""
        sink, source = self.sink, t.source
        apply = sink.apply
        ok = 0
        # The newest event time: a ts-less event's is its ingestion (lag 0). A ts far ahead of
        # the clock is no time (epoch milliseconds?) and rejects its line.
        now = self.clock()
        limit = now + MAX_TS_AHEAD_SECONDS
        limit_dt = datetime.fromtimestamp(limit, UTC)
        # The limit in the offset of the events' ts (one object per offset, as a rule):
        # datetimes with the same tzinfo object compare without calling utcoffset().
        limit_tz: Any = UTC
        limit_in_tz = limit_dt
        newest = float("-inf")
        newest_dt = _DT_MIN
        untimed = False
        lines = data.split(b"\n")
        lines.pop()  # empty after the final newline
        first_line = t.line + 1
        if t.skipping:
            # The rest of an over-long line, already rejected.
            lines[0] = b""
            t.skipping = False
        max_len = self.max_line_bytes
        marker, marker_rejects = self._markers.get(source, (b"", None))
        check_utf8 = not _is_utf8(data)
        for i, line in enumerate(lines):
            if len(line) > max_len:
                self._reject(t, first_line + i, Rejected(
                    "line_too_long", f"line longer than {max_len} bytes"))
                continue
            if not line or line.isspace():
                continue
            if check_utf8 and (bad := utf8_error(line)) is not None:
                self._reject(t, first_line + i, bad)
                continue
            try:
                ev = decode_event(line)
            except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
                if marker and line.startswith(marker):
                    if marker_rejects is not None:
                        for reason, n in marker_rejects(line).items():
                            sink.reject(source, reason, n)
                    continue
                rej = decode_line(line)
                assert isinstance(rej, Rejected)
                self._reject(t, first_line + i, rej)
                continue
            # Only a ts newer than every one before can be past the limit.
            ts = ev.ts
            if ts is None:
                untimed = True
            elif ts.__class__ is datetime:
                if ts > newest_dt:  # type: ignore[operator]
                    if ts.tzinfo is not limit_tz:  # type: ignore[union-attr]
                        limit_tz = ts.tzinfo  # type: ignore[union-attr]
                        limit_in_tz = limit_dt.astimezone(limit_tz)
                    if ts > limit_in_tz:  # type: ignore[operator]
                        self._reject(t, first_line + i, ts_ahead(ev, now)
                                     or Rejected("out_of_range", "`$.ts` too far ahead"))
                        continue
                    newest_dt = ts  # type: ignore[assignment]
            elif ts > newest:  # type: ignore[operator]
                if ts > limit:  # type: ignore[operator]
                    self._reject(t, first_line + i, ts_ahead(ev, now)
                                 or Rejected("out_of_range", "`$.ts` too far ahead"))
                    continue
                newest = ts  # type: ignore[assignment]
            apply(ev)
            ok += 1
        t.line += len(lines)
        if ok:
            # The lag is that of the newest event read by the whole pass, from any file: the
            # newest so far is handed over with every chunk, so the last one sets it.
            acc: float | None = None
            if not untimed:
                if newest_dt is not _DT_MIN:
                    newest = max(newest, newest_dt.timestamp())
                prev = self._newest.get(source, newest)
                acc = None if prev is None else max(prev, newest)
            self._newest[source] = acc
            sink.accepted(source, ok, acc)
        return len(lines)

    def _reject(self, t: Tracked, line_no: int, rej: Rejected) -> None:
        self.sink.reject(t.source, rej.reason)
        self._reject_log(f"{t.path}:{line_no}", rej)

    def run(self, stop: threading.Event, interval: float,
            after_poll: Callable[[], None] | None = None) -> None:
        """Poll until ``stop`` is set; never raises (a failing pass is logged and retried)."""
        while not stop.is_set():
            try:
                n = self.poll()
                if after_poll is not None:
                    after_poll()
            except Exception:  # noqa: BLE001 - the ingest loop must survive anything
                log.exception("file source pass failed; retrying")
                n = 0
            if not n:
                stop.wait(interval)
