"""Durable exporter state: one file, replaced atomically, holding counters and read positions.

Counters and the file positions they correspond to are written together in one snapshot, so
after a crash the exporter resumes exactly where the served numbers left off: lines after the
saved positions are read again and counted once, lines before them never again. The server
writes a snapshot before it serves /metrics whenever the values changed, so Prometheus never
sees a value that a restart could take back (which it would read as a counter reset).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)

STATE_FILE = "exporter-state.json"
LOCK_FILE = "lock"


class StateDirInUse(RuntimeError):
    """Another running exporter holds the state directory."""


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/lock``, held for the life of the exporter.

    Two processes on one state directory would each rewrite files the other appends to (the
    idempotency index, the state file, the push journal), losing data. The kernel drops the
    lock when its holder exits, even by ``kill -9``, so a crash leaves no stale lock; the file
    holds the holder's pid, for the message.
    """

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise: StateDirInUse if held, RuntimeError naming
        ``exporter.state_dir`` if the directory cannot be used."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RuntimeError(f"exporter.state_dir: cannot use {self.dir}: "
                               f"{exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                try:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                except OSError:
                    holder = ""
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise RuntimeError(f"exporter.state_dir: cannot lock {self.path}: "
                                       f"{exc.strerror or exc}") from exc
                pid = f", pid {holder}" if holder.isdigit() else ""
                raise StateDirInUse(f"exporter.state_dir: {self.dir} is already used by "
                                    f"another running exporter{pid}") from None
            # The lock is ours. The pid is only for the message of a second start: a full
            # disk (or any write error) must not stop this one, which then serves the last
            # snapshot (docs/exporter.md).
            try:
                os.ftruncate(fd, 0)
                write_all(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:
                log.warning("cannot write the pid to %s (%s); holding the lock without it",
                            self.path, exc.strerror or exc)
        except BaseException:
            os.close(fd)  # closing drops the flock, if taken: a failed acquire holds nothing
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass  # a stale pid is harmless: only a held lock means "in use"
            finally:
                os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename over ``path``, fsync the directory: a reader
    (or a restart after power loss) sees the old content or the new, never a mix."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateFile:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def read(self) -> dict[str, Any] | None:
        """The last snapshot, or None on first start. A corrupt file is an error, not a
        silent reset: counting from zero would double-count every line already served."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise RuntimeError(
                f"state file {self.path} is corrupt ({exc}); move it away to start from zero"
            ) from None
        if not isinstance(data, dict):
            raise RuntimeError(f"state file {self.path} is not a JSON object")
        return data

    def write(self, data: dict[str, Any]) -> None:
        """All or nothing on power loss (replace_atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        replace_atomically(self.path, msgspec.json.encode(data))
