"""gunicorn's logger, with the access log built as one JSON object per line.

gunicorn formats an access line from a dict of every request and response header, the WSGI
environment and a dozen derived values (about 60 us a request on the benchmark machine, a tenth
of a cached answer's own CPU), and its ``%``-format cannot escape text: a request for a path
with a quote in it made a line that was not JSON. This logger writes the same fields from the
few values it needs, encoded by msgspec. No request header is read, so neither
``Authorization`` nor ``X-API-Key`` can reach the access log. Everything else (the error log,
files reopened on USR1, ``accesslog``/``errorlog`` settings) is gunicorn's own.

api/gunicorn.conf.py sets ``logger_class`` to ``api.gunicorn_logging.JsonAccessLogger``.
"""

from __future__ import annotations

import logging
import time
import traceback
from datetime import timedelta
from typing import Any

import msgspec
from gunicorn.glogging import Logger

from .validation import rfc3339

_encode = msgspec.json.Encoder().encode


def access_record(status: Any, sent: int | None, headers: Any, environ: dict[str, Any],
                  request_time: timedelta, now: float) -> dict[str, Any]:
    """The access line's fields: ts, request_id, remote, method, path (no query string),
    status, bytes, duration_us."""
    if isinstance(status, str):
        status = status.split(None, 1)[0]
    request_id = ""
    for name, value in headers or ():
        if name.lower() == "x-request-id":
            request_id = value
            break
    try:
        code: int | str = int(status)
    except (TypeError, ValueError):
        code = str(status)
    return {
        "ts": rfc3339(now),
        "request_id": request_id,
        "remote": environ.get("REMOTE_ADDR", "-"),
        "method": environ.get("REQUEST_METHOD", "-"),
        "path": environ.get("PATH_INFO", ""),
        "status": code,
        "bytes": sent,
        "duration_us": request_time.days * 86_400_000_000 + request_time.seconds * 1_000_000
        + request_time.microseconds,
    }


_PLAIN_HANDLERS = (logging.StreamHandler, logging.FileHandler)


def plain_handlers(log: logging.Logger) -> list[logging.StreamHandler[Any]] | None:
    """The logger's handlers when writing the message to each one's stream is all that
    ``log.info(message)`` would do; None otherwise."""
    if log.filters or log.propagate or not log.isEnabledFor(logging.INFO) or not log.handlers:
        return None
    out = []
    for h in log.handlers:
        fmt = h.formatter
        if (type(h) not in _PLAIN_HANDLERS or h.filters or h.level > logging.INFO
                or type(fmt) is not logging.Formatter or fmt._fmt != "%(message)s"):
            return None
        out.append(h)
    return out  # type: ignore[return-value]


def write_line(log: logging.Logger, line: str) -> None:
    handlers = plain_handlers(log)
    if handlers is None:
        log.info(line)
        return
    for h in handlers:
        h.acquire()
        try:
            stream = h.stream
            if stream is None and isinstance(h, logging.FileHandler):
                # Closed and not yet reopened (FileHandler.emit does the same).
                h.stream = stream = h._open()
            stream.write(line + h.terminator)
            stream.flush()
        finally:
            h.release()


class JsonAccessLogger(Logger):
    def access(self, resp: Any, req: Any, environ: dict[str, Any],
               request_time: timedelta) -> None:
        if not self.access_log_enabled:
            return
        try:
            record = access_record(resp.status, getattr(resp, "sent", None), resp.headers,
                                   environ, request_time, time.time())
            write_line(self.access_log, _encode(record).decode())
        except Exception:
            self.error(traceback.format_exc())
