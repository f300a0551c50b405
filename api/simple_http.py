"""Plain GETs of the API's data endpoints read and answered without gunicorn's general HTTP/1.x
machinery, for the worker in api/gunicorn_worker.py.

gunicorn reads every request with its general parser (request line, header policies, body
framing, proxy protocol, forwarded headers, HTTP/2 upgrades), builds the WSGI environment and
writes the answer through its ``Response`` (headers in one write, the body in another, the
``Date`` formatted anew each time): about a third of the CPU of an uncached one-query answer on
the benchmark machine (docs/benchmarks.md), spent on features such a request does not use.

``parse`` accepts only a request whose meaning gunicorn's own parser would give exactly, and
gives up (None: gunicorn reads the same bytes) on anything else:

- ``GET <origin-form target> HTTP/1.1`` for one of the app's paths, the target visible ASCII
  without a fragment, the whole head in the bytes already read and within gunicorn's limits;
- header names of token characters without ``_`` (gunicorn drops or refuses those), values of
  visible ASCII, space and tab, no name twice, no line folding, no bare CR or LF;
- no header that gunicorn gives a meaning of its own: a body (``Content-Length``,
  ``Transfer-Encoding``), ``Expect``, ``Upgrade``/``HTTP2-Settings``, ``Content-Type``,
  ``Connection`` other than ``keep-alive``, and the configured forwarding and secure-scheme
  headers.

``environ`` then builds what gunicorn's ``wsgi.create`` builds for it, and ``Reply`` writes
what gunicorn's ``Response`` writes (status line, ``Server``, ``Date``, ``Connection``, the
application's headers validated the same way, hop-by-hop ones dropped, the body cut to its
``Content-Length`` or chunked without one) in one write. tests/api/test_simple_http.py holds
both to gunicorn's own functions, byte for byte, over generated requests and answers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from gunicorn import SERVER
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.errors import InvalidResponseHeader, InvalidResponseHeaderName
from gunicorn.http.message import TOKEN_RE
from gunicorn.http.wsgi import HEADER_VALUE_RE, STATUS_RE, base_environ
from gunicorn.util import is_hoppish, split_request_uri

_NAME = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+")
"""A header name gunicorn maps to the environment unchanged: a token without ``_``."""
_VALUE = re.compile(rb"[\t\x20-\x7e]*")
_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*")
"""Origin form, visible ASCII, no ``#``."""
_OWN_MEANING = frozenset({
    "CONTENT-LENGTH", "TRANSFER-ENCODING", "EXPECT", "UPGRADE", "HTTP2-SETTINGS",
    "CONTENT-TYPE", "TE", "TRAILER",
})
"""Headers gunicorn acts on, or files elsewhere in the environment: gunicorn reads those."""


@dataclass(frozen=True, slots=True)
class Rules:
    """What a worker accepts, from its configuration and its app."""

    paths: frozenset[str]
    limit_request_line: int
    """0: no limit."""
    limit_request_fields: int
    limit_request_field_size: int
    special: frozenset[str]
    """Upper-case names of the configured forwarding and secure-scheme headers."""

    @classmethod
    def of(cls, cfg: Any, paths: Iterable[str]) -> Rules:
        # The limits as gunicorn's Message and Request apply them.
        line = cfg.limit_request_line
        line = 8190 if line < 0 or line > 8190 else line
        fields = cfg.limit_request_fields
        fields = 32768 if fields <= 0 or fields > 32768 else fields
        size = cfg.limit_request_field_size
        size = 8190 if size <= 0 else size
        special = {str(n).upper() for n in cfg.secure_scheme_headers}
        special |= {str(n).upper() for n in cfg.forwarder_headers}
        return cls(frozenset(paths), line, fields, size, frozenset(special))


@dataclass(slots=True)
class SimpleGet:
    """A request ``parse`` accepted, with what gunicorn's ``Request`` offers the worker's
    hooks, error handler and access log."""

    uri: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    consumed: int
    """Bytes of the head; what follows belongs to the next request."""
    body: Any = None
    method: str = "GET"
    version: tuple[int, int] = (1, 1)
    scheme: str = "http"
    fragment: str = ""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    proxy_protocol_info: None = None

    def should_close(self) -> bool:
        return False  # HTTP/1.1 without "Connection: close"


def parse(data: bytes, rules: Rules) -> SimpleGet | None:
    """The request at the start of ``data`` when it is a plain GET of one of ``rules.paths``;
    None when it is anything else, or not complete in ``data`` (gunicorn reads it then)."""
    if not data.startswith(b"GET /"):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    line = lines[0]
    if rules.limit_request_line and len(line) > rules.limit_request_line:
        return None
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not _TARGET.fullmatch(parts[1]):
        return None
    uri = parts[1].decode("ascii")
    try:
        split = split_request_uri(uri)
    except ValueError:
        return None  # gunicorn's 400
    if split.path not in rules.paths:
        return None
    if len(lines) - 1 > rules.limit_request_fields:
        return None
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in lines[1:]:
        if len(raw) + 2 > rules.limit_request_field_size:
            return None  # gunicorn counts the line's CRLF
        name, sep, value = raw.partition(b":")
        if not sep or not _NAME.fullmatch(name):
            return None  # also a folded line, which starts with a space or tab
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            return None  # bare CR or LF, other control characters, non-ASCII
        upper = name.decode("ascii").upper()
        if upper in seen or upper in _OWN_MEANING or upper in rules.special:
            return None
        if upper == "CONNECTION" and value.lower() != b"keep-alive":
            return None
        seen.add(upper)
        headers.append((upper, value.decode("ascii")))
    return SimpleGet(uri, split.path, split.query, headers, end + 4)


class Environ:
    """The WSGI environment gunicorn's ``wsgi.create`` builds for a ``SimpleGet``."""

    def __init__(self, cfg: Any) -> None:
        base = base_environ(cfg)
        base["wsgi.multithread"] = True  # as gthread sets it
        base["wsgi.url_scheme"] = "http"
        base["REQUEST_METHOD"] = "GET"
        base["SERVER_PROTOCOL"] = "HTTP/1.1"
        base["SCRIPT_NAME"] = ""
        self.base = base

    def __call__(self, req: SimpleGet, sock: Any, client: tuple[Any, ...],
                 server: tuple[Any, ...], unreader: Any,
                 early_hints: Callable[..., None]) -> dict[str, Any]:
        env = self.base.copy()
        req.body = Body(LengthReader(unreader, 0))
        env["wsgi.input"] = req.body
        env["gunicorn.socket"] = sock
        env["QUERY_STRING"] = req.query
        env["RAW_URI"] = req.uri
        for name, value in req.headers:
            env["HTTP_" + name.replace("-", "_")] = value
        env["REMOTE_ADDR"] = client[0]
        env["REMOTE_PORT"] = str(client[1])
        env["SERVER_NAME"] = server[0]
        env["SERVER_PORT"] = str(server[1])
        env["PATH_INFO"] = req.path  # one of the app's paths: nothing to unquote
        env["wsgi.early_hints"] = early_hints
        return env


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header's value, formatted once a second (gunicorn formats it per answer)."""
    global _date
    now = int(time.time())
    cached = _date
    if cached[0] != now:
        cached = _date = (now, formatdate(now, usegmt=True))
    return cached[1]


class Reply:
    """``start_response`` and the answer's bytes, as gunicorn's ``Response`` would send them;
    the body is held until the application is done and written with the head in one call."""

    __slots__ = ("status", "status_code", "headers", "response_length", "sent", "chunks",
                 "must_close", "upgrade", "headers_sent", "_omits_body")

    def __init__(self) -> None:
        self.status: str | None = None
        self.status_code: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.response_length: int | None = None
        self.sent = 0
        self.chunks: list[bytes] = []
        self.must_close = False
        self.upgrade = False
        self.headers_sent = False
        self._omits_body = False

    def force_close(self) -> None:
        self.must_close = True

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is None and self.status is not None:
            raise AssertionError("Response headers already set!")
        # With exc_info the headers are replaced: nothing has been sent before the body ends.
        if not isinstance(status, str):
            raise TypeError(f"{status!r} is not a string")
        if not STATUS_RE.fullmatch(status):
            raise ValueError(f"Invalid status {status!r}")
        self.status = status
        try:
            self.status_code = int(status.split()[0])
        except ValueError:
            self.status_code = None
        self.headers = []
        self.response_length = None
        self.upgrade = False
        for name, value in headers:
            self._header(name, value)
        code = self.status_code
        self._omits_body = code in (204, 304) or (code is not None and 100 <= code < 200)
        if self._omits_body and (code == 204 or (code is not None and code < 200)):
            self.headers = [(k, v) for k, v in self.headers if k.lower() != "content-length"]
            self.response_length = None
        return self.write

    def _header(self, name: Any, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{name!r} is not a string")
        if not TOKEN_RE.fullmatch(name):
            raise InvalidResponseHeaderName(f"{name!r}")
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not a string")
        if not HEADER_VALUE_RE.fullmatch(value):
            raise InvalidResponseHeader(f"{name!r}")  # the name only: values may be secret
        value = value.strip(" \t")
        lname = name.lower()
        if lname == "content-length":
            self.response_length = int(value)
        elif is_hoppish(name):
            if lname == "connection" and value.lower() == "upgrade":
                self.upgrade = True
            elif lname == "upgrade" and value.lower() == "websocket":
                self.headers.append((name, value))
            return
        self.headers.append((name, value))

    @property
    def chunked(self) -> bool:
        return self.response_length is None and not self._omits_body

    def write(self, data: bytes) -> None:
        """Hold a piece of the body (gunicorn's ``Response.write`` rules: nothing for an
        answer without a body, nothing past its ``Content-Length``)."""
        if self.status is None:
            raise AssertionError("Response headers not set!")
        if not isinstance(data, bytes):
            raise TypeError(f"{data!r} is not a byte")
        if self._omits_body or not data:
            return
        if self.response_length is not None:
            room = self.response_length - self.sent
            if room <= 0:
                return
            if len(data) > room:
                data = data[:room]
        self.sent += len(data)
        self.chunks.append(data)

    def should_close(self) -> bool:
        if self.must_close:
            return True
        if self.response_length is not None or self.chunked:
            return False
        code = self.status_code
        return not (code is not None and (code < 200 or code in (204, 304)))

    def encode(self) -> bytes:
        """The whole answer; marks the head as sent."""
        if self.status is None:
            raise AssertionError("Response headers not set!")
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        head = [f"HTTP/1.1 {self.status}\r\nServer: {SERVER}\r\nDate: {http_date()}\r\n"
                f"Connection: {connection}\r\n"]
        chunked = self.chunked
        if chunked:
            head.append("Transfer-Encoding: chunked\r\n")
        head += [f"{k}: {v}\r\n" for k, v in self.headers]
        head.append("\r\n")
        self.headers_sent = True
        out = "".join(head).encode("latin-1")
        if not chunked:
            return out + b"".join(self.chunks)
        parts = [out]
        for chunk in self.chunks:
            parts += [b"%X\r\n" % len(chunk), chunk, b"\r\n"]
        parts.append(b"0\r\n\r\n")
        return b"".join(parts)


__all__ = ["Environ", "Reply", "Rules", "SimpleGet", "http_date", "parse"]
