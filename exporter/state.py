"""Durable exporter state: one file, replaced atomically, holding counters and read positions.

Counters and the file positions they correspond to are written together in one snapshot, so
after a crash the exporter resumes exactly where the served numbers left off: lines after the
saved positions are read again and counted once, lines before them never again. The server
writes a snapshot before it serves /metrics whenever the values changed, so Prometheus never
sees a value that a restart could take back (which it would read as a counter reset).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)

STATE_FILE = "exporter-state.json"


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
