"""A small HTTP/1.1 client for the one backend the API talks to.

The API sends one POST per response it builds and reads a JSON answer of a few kilobytes, so the
client's own cost sits on every uncached request. ``http.client`` spends about 0.4 ms of CPU per
exchange on this path (an ``email`` header parser, a ``readline`` per chunk-size line, separate
writes for head and body); this client writes the request in one ``sendall`` and parses the
answer from a buffer filled by ``recv``. It speaks just what a Prometheus-compatible HTTP API
needs: keep-alive, ``Content-Length``, ``chunked`` (trailers ignored), read-to-close bodies,
``1xx`` interim answers, TLS through an ``ssl`` context, and one deadline for the whole exchange.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
"""An answer larger than this is refused rather than held in a worker's memory."""
_RECV = 256 * 1024


class ProtocolError(OSError):
    """The backend's answer is not HTTP/1.x this client can read."""


class AnswerTooLarge(ProtocolError):
    pass


class ConnectTimeout(ConnectionError):
    """No connection within the connect timeout (TCP or the TLS handshake): the backend is
    down or unreachable, not slow to answer, so this is no TimeoutError."""


class ClosedBeforeAnswer(ConnectionError):
    """The backend closed the connection before sending any byte of an answer: on a kept-alive
    connection, the backend's idle timeout won the race, and the request can be sent again."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    will_close: bool


class Connection:
    """One TCP (or TLS) connection; not thread-safe, keep one per thread."""

    def __init__(self, host: str, port: int, *, connect_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {host}:{port} within "
                                 f"{connect_timeout:g}s") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no TLS handshake with {host}:{port} within "
                                     f"{connect_timeout:g}s") from None
            raise
        self.sock: socket.socket | None = sock
        self.exchanges = 0
        # Consumed bytes are deleted from the front, which CPython's bytearray does without
        # moving the rest: a body of many small chunks is not copied once per chunk.
        self._buf = bytearray()

    def __del__(self) -> None:
        # Dropped with its thread's local storage (PrometheusClient): close, don't warn.
        self.close()

    def close(self) -> None:
        sock, self.sock = getattr(self, "sock", None), None
        if sock is not None:
            sock.close()

    @property
    def closed(self) -> bool:
        return self.sock is None

    def exchange(self, request: bytes, deadline: float) -> Answer:
        """Send a complete request (head and body) and read its answer by ``deadline``
        (time.monotonic()). Raises TimeoutError, OSError (ClosedBeforeAnswer when nothing came
        back), or ProtocolError; the connection is closed on any error."""
        self.send(request, deadline)
        return self.receive(deadline)

    def send(self, request: bytes, deadline: float) -> None:
        """The first half of ``exchange``: the caller may do other work while the backend
        evaluates, then calls ``receive``. The connection is closed on any error."""
        sock = self.sock
        if sock is None:
            raise ClosedBeforeAnswer("connection is closed")
        try:
            self._settimeout(deadline)
            sock.sendall(request)
        except BaseException:
            self.close()
            raise

    def receive(self, deadline: float) -> Answer:
        """The answer to the request ``send`` sent (interim 1xx answers skipped)."""
        if self.sock is None:
            raise ClosedBeforeAnswer("connection is closed")
        try:
            while True:
                answer = self._read_answer(deadline)
                if answer is not None:
                    break
        except BaseException:
            self.close()
            raise
        self.exchanges += 1
        if answer.will_close or self._buf:
            # Bytes past the answer mean the stream is out of step: never reuse it.
            self.close()
        return answer

    # --- reading ------------------------------------------------------------------------

    def _settimeout(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        assert self.sock is not None
        self.sock.settimeout(left)

    def _fill(self, deadline: float, *, first: bool = False) -> None:
        self._settimeout(deadline)
        assert self.sock is not None
        chunk = self.sock.recv(_RECV)
        if not chunk:
            if first:
                raise ClosedBeforeAnswer("the backend closed the connection")
            raise ProtocolError("the backend closed the connection mid-answer")
        self._buf += chunk

    def _read_answer(self, deadline: float) -> Answer | None:
        """One answer; None for an interim 1xx answer (the caller reads on)."""
        end = self._buf.find(b"\r\n\r\n")
        first = not self._buf
        while end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError("answer head too long")
            self._fill(deadline, first=first)
            first = False
            end = self._buf.find(b"\r\n\r\n")
        head = self._buf[:end].decode("latin-1")
        del self._buf[:end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"malformed header line: {line[:80]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if 100 <= status < 200:
            return None
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (
            parts[0] == "HTTP/1.0" and "keep-alive" not in connection)
        if status in (204, 304):
            return Answer(status, b"", will_close)
        coding = headers.get("transfer-encoding", "").lower()
        if coding:
            if coding.rsplit(",", 1)[-1].strip() != "chunked":
                raise ProtocolError(f"unsupported transfer-encoding {coding!r}")
            return Answer(status, self._read_chunked(deadline), will_close)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ProtocolError(f"bad content-length {length!r}")
            return Answer(status, self._read_exactly(int(length), deadline), will_close)
        return Answer(status, self._read_to_close(deadline), True)

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        if n > MAX_BODY_BYTES:
            raise AnswerTooLarge(f"answer of {n} bytes is over {MAX_BODY_BYTES}")
        while len(self._buf) < n:
            self._fill(deadline)
        body = bytes(self._buf[:n])
        del self._buf[:n]
        return body

    def _line(self, deadline: float, what: str) -> bytes:
        """The next CRLF-terminated line, consumed, without its CRLF."""
        eol = self._buf.find(b"\r\n")
        while eol < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError(f"{what} too long")
            self._fill(deadline)
            eol = self._buf.find(b"\r\n")
        line = bytes(self._buf[:eol])
        del self._buf[:eol + 2]
        return line

    def _read_chunked(self, deadline: float) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            text = self._line(deadline, "chunk-size line").split(b";", 1)[0].strip()
            try:
                n = int(text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {text[:20]!r}") from None
            if n == 0:
                # Trailer fields, if any, end with an empty line.
                while self._line(deadline, "trailer field"):
                    pass
                return b"".join(parts)
            size += n
            if size > MAX_BODY_BYTES:
                raise AnswerTooLarge(f"answer over {MAX_BODY_BYTES} bytes")
            while len(self._buf) < n + 2:
                self._fill(deadline)
            if self._buf[n:n + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            parts.append(bytes(self._buf[:n]))
            del self._buf[:n + 2]

    def _read_to_close(self, deadline: float) -> bytes:
        assert self.sock is not None
        while True:
            if len(self._buf) > MAX_BODY_BYTES:
                raise AnswerTooLarge(f"answer over {MAX_BODY_BYTES} bytes")
            self._settimeout(deadline)
            chunk = self.sock.recv(_RECV)
            if not chunk:
                body = bytes(self._buf)
                self._buf.clear()
                return body
            self._buf += chunk
