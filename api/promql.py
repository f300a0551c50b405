"""A small client for the Prometheus HTTP API (also spoken by VictoriaMetrics, Thanos, Mimir).

It only moves queries and results; failures become the API's errors: backend unreachable
or failing is 503, too slow is 504, so a client can tell "retry later" from "ask less"; a
backend that rejects a query, answers malformed or has no Prometheus API at the configured URL
is 502 (never its own 404, which would tell the client that the API's path does not exist).
"""

from __future__ import annotations

import base64
import functools
import math
import ssl
import threading
import time
import weakref
from typing import Any, Literal
from urllib.parse import quote_plus, unquote, urlsplit

import msgspec

from . import http11
from .errors import ApiError


class BackendUnavailable(ApiError):
    status = 503
    code = "backend_unavailable"


class BackendTimeout(ApiError):
    status = 504
    code = "backend_timeout"


class BackendError(ApiError):
    """The backend rejected a query the API built: a bug or an incompatible backend."""

    status = 502
    code = "backend_error"


class BackendNotFound(BackendError):
    """The backend answered 404: no such API at api.prometheus_url (a wrong path prefix, or no
    Prometheus API at all). A 502 like any incompatible backend; alerts() tells it apart, as
    backends without an alerts API (VictoriaMetrics without a vmalert proxy) answer 404 there."""


# msgspec structs rather than frozen dataclasses: an answer makes one per series, and a struct is
# built in a seventh of the time (no cycles through them, so not tracked by the collector).
class Sample(msgspec.Struct, frozen=True, gc=False):
    labels: dict[str, str]
    value: float | None
    """None for NaN and infinities, which JSON cannot carry."""


class RangeSeries(msgspec.Struct, frozen=True, gc=False):
    labels: dict[str, str]
    points: list[tuple[float, float | None]]


def to_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


_decode = msgspec.json.Decoder().decode


class _Series(msgspec.Struct):
    metric: dict[str, str]
    value: tuple[float, str]


class _Vector(msgspec.Struct):
    resultType: Literal["vector"]  # noqa: N815 - the Prometheus API's name
    result: list[_Series]


class _VectorAnswer(msgspec.Struct):
    status: Literal["success"]
    data: _Vector


_decode_vector = msgspec.json.Decoder(_VectorAnswer).decode
"""The answer of nearly every instant query, decoded straight into its shape (about a fifth of
building it from generic dicts and lists); anything else takes the general path below."""


class _RangeSeries(msgspec.Struct):
    metric: dict[str, str]
    values: list[tuple[float, str]]


class _Matrix(msgspec.Struct):
    resultType: Literal["matrix"]  # noqa: N815 - the Prometheus API's name
    result: list[_RangeSeries]


class _MatrixAnswer(msgspec.Struct):
    status: Literal["success"]
    data: _Matrix


_decode_matrix = msgspec.json.Decoder(_MatrixAnswer).decode
"""A range query's answer, decoded straight into its shape, like ``_decode_vector``."""


def _checked(kind: type[Any], result: Any) -> Any:
    """``result`` (generic JSON) converted to ``kind``, checking every type on the way: a label
    map that is null or holds a number, a value that is no [time, "text"] pair, would otherwise
    pass into the answer and fail in the view (a 500)."""
    return msgspec.convert(result, kind)


@functools.lru_cache(maxsize=1024)
def _quoted(text: str) -> str:
    """Form-encoded text, memoized: urllib's quoting runs per character in Python (about 1 ms for
    a 3.5 kB expression), and every request of an endpoint sends one of a few expressions."""
    return quote_plus(text)


def _form(data: dict[str, str]) -> bytes:
    return "&".join(f"{k}={_quoted(v) if len(v) > 64 else quote_plus(v)}"
                    for k, v in data.items()).encode()


def _malformed(path: str, kind: object) -> BackendError:
    return BackendError(f"the metrics backend's {path} answer is malformed "
                        f"(a {kind!r} result not in the Prometheus API's shape)")


_STALE = (http11.ClosedBeforeAnswer, ConnectionResetError, ConnectionAbortedError,
          BrokenPipeError)
"""What a kept-alive connection the backend has since closed fails with: retried once, fresh."""


class PrometheusClient:
    """One persistent HTTP/1.1 connection per thread (api/http11.py), one deadline per call.

    A gthread worker's threads each keep their own connection, so no pool lock or per-request
    session set-up sits between a request and its query; bodies are decoded with msgspec.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = min(timeout, 3.05)
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._ssl else 80)
        self._prefix = parts.path
        host = self._host if ":" not in self._host else f"[{self._host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        # Loopback or a private network: compressing small JSON costs both sides more than it
        # saves.
        head = [f"Host: {host}", "Accept: application/json", "Accept-Encoding: identity",
                "User-Agent: aicrm-api"]
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            head.append("Authorization: Basic " + base64.b64encode(token.encode()).decode())
        self._head = "".join(f"{h}\r\n" for h in head)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Weak: a connection lives as long as its thread's local storage, so a server that
        # starts a thread per request does not pile up sockets; close() reaches the live ones.
        self._open: weakref.WeakSet[http11.Connection] = weakref.WeakSet()

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), weakref.WeakSet()
        for conn in conns:
            conn.close()

    def _connection(self) -> http11.Connection:
        """This thread's connection, opened when it has none."""
        conn: http11.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        if conn is not None:
            self._forget(conn)
        conn = http11.Connection(self._host, self._port, connect_timeout=self.connect_timeout,
                                 ssl_context=self._ssl)
        self._local.conn = conn
        with self._lock:
            self._open.add(conn)
        return conn

    def _forget(self, conn: http11.Connection) -> None:
        conn.close()
        with self._lock:
            self._open.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}"
        if body is None:
            return f"{head}\r\n".encode("latin-1")
        return (f"{head}Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body

    def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        request = self._request(method, path, body)
        deadline = time.monotonic() + self.timeout
        for attempt in (0, 1):
            conn = self._connection()
            reused = conn.exchanges > 0
            try:
                answer = conn.exchange(request, deadline)
            except _STALE:
                self._forget(conn)
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                self._forget(conn)
                raise
            if conn.closed:
                self._forget(conn)
            return answer.status, answer.body
        raise AssertionError("unreachable")

    def _fetch(self, method: str, path: str, data: dict[str, str] | None) -> tuple[int, bytes]:
        """Status and body of one exchange; transport failures become the API's errors."""
        body = _form(data) if data is not None else None
        try:
            return self._exchange(method, path, body)
        except OSError as exc:  # timeouts and http11's errors included
            raise self._transport_error(exc) from None

    def _transport_error(self, exc: OSError) -> ApiError:
        if isinstance(exc, http11.ConnectTimeout):
            return BackendUnavailable(
                f"the metrics backend accepted no connection within {self.connect_timeout:g}s")
        if isinstance(exc, TimeoutError):
            return BackendTimeout(f"the metrics backend did not answer within {self.timeout:g}s")
        if isinstance(exc, http11.AnswerTooLarge):
            return BackendError(f"the metrics backend's answer is too large: {exc}")
        return BackendUnavailable("the metrics backend is unreachable")

    @staticmethod
    def _data(path: str, status: int, raw: bytes) -> Any:
        """The ``data`` object of a successful answer; the API's error for any other."""
        try:
            decoded = _decode(raw)
        except msgspec.DecodeError:
            decoded = None
        if isinstance(decoded, dict) and decoded.get("status") == "success":
            data = decoded.get("data")
            if not isinstance(data, dict):
                raise BackendError(f"the metrics backend's {path} answer has no data object")
            return data
        error_type = decoded.get("errorType") if isinstance(decoded, dict) else None
        if error_type == "timeout" or status == 504:
            raise BackendTimeout("the metrics backend timed out evaluating the query")
        if status == 404:
            raise BackendNotFound(f"the metrics backend has no {path} (it answered HTTP 404): "
                                  "check api.prometheus_url")
        if status in (400, 422) and isinstance(decoded, dict):
            raise BackendError(f"the metrics backend rejected a query: {decoded.get('error')}")
        raise BackendUnavailable(f"the metrics backend answered HTTP {status}")

    def _call(self, method: str, path: str, data: dict[str, str] | None = None) -> Any:
        status, raw = self._fetch(method, path, data)
        return self._data(path, status, raw)

    def _query_form(self, expr: str, at: float | None) -> dict[str, str]:
        params = {"query": expr, "timeout": f"{self.timeout:g}s"}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return params

    def query(self, expr: str, time: float | None = None) -> list[Sample]:
        """Instant query; a scalar result comes back as one unlabelled sample."""
        status, raw = self._fetch("POST", "/api/v1/query", self._query_form(expr, time))
        return self._samples(status, raw)

    def start_query(self, expr: str, at: float) -> PendingQuery | None:
        """Send an instant query now and read its answer later (``PendingQuery.result``), so
        that the caller's own work overlaps the backend's evaluation. The connection is this
        thread's, lent to the pending query: another query meanwhile opens one of its own.
        None when the query could not be sent (the caller asks with ``query``, which reports
        the failure)."""
        request = self._request("POST", "/api/v1/query", _form(self._query_form(expr, at)))
        deadline = time.monotonic() + self.timeout
        try:
            conn = self._connection()
        except OSError:
            return None
        self._local.conn = None
        reused = conn.exchanges > 0
        try:
            conn.send(request, deadline)
        except OSError:
            self._forget(conn)
            return None
        return PendingQuery(self, expr, at, conn, deadline, reused)

    def _give_back(self, conn: http11.Connection) -> None:
        """A lent connection returns to its thread, unless the thread has another by now."""
        held: http11.Connection | None = getattr(self._local, "conn", None)
        if conn.closed or (held is not None and not held.closed):
            self._forget(conn)
        else:
            self._local.conn = conn

    def _samples(self, status: int, raw: bytes) -> list[Sample]:
        """An instant query's answer as samples, or the API's error for it."""
        if status == 200:
            try:
                vector = _decode_vector(raw).data.result
            except msgspec.DecodeError:  # ValidationError included
                pass  # a scalar, an error, or malformed: the general path tells which
            else:
                try:
                    return [Sample(r.metric, to_float(r.value[1])) for r in vector]
                except ValueError:
                    raise _malformed("/api/v1/query", "vector") from None
        data = self._data("/api/v1/query", status, raw)
        kind, result = data.get("resultType"), data.get("result")
        try:
            if kind == "vector":
                # The strict decoder refused it (or the status was not 200): check every type.
                return [Sample(r.metric, to_float(r.value[1]))
                        for r in _checked(list[_Series], result)]
            if kind == "scalar":
                return [Sample({}, to_float(result[1]))]
        except (KeyError, IndexError, TypeError, ValueError, msgspec.ValidationError):
            raise _malformed("/api/v1/query", kind) from None
        raise BackendError(f"unexpected result type {kind!r}")

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        """Range query; ``step`` is sent in whole milliseconds, the backend's resolution (round
        it first to report the step the points are apart: validation.step does)."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                  "step": f"{round(step * 1000)}ms", "timeout": f"{self.timeout:g}s"}
        status, raw = self._fetch("POST", "/api/v1/query_range", params)
        series: list[_RangeSeries] | None = None
        if status == 200:
            try:
                series = _decode_matrix(raw).data.result
            except msgspec.DecodeError:  # ValidationError included
                pass  # an error or malformed: the general path tells which
        kind = "matrix"
        try:
            if series is None:
                data = self._data("/api/v1/query_range", status, raw)
                kind = data.get("resultType")
                if kind != "matrix":
                    raise ValueError(kind)
                series = _checked(list[_RangeSeries], data.get("result"))
            return [RangeSeries(r.metric, [(t, to_float(v)) for t, v in r.values])
                    for r in series]
        except (TypeError, ValueError, msgspec.ValidationError):
            raise _malformed("/api/v1/query_range", kind) from None

    def alerts(self) -> list[dict[str, Any]] | None:
        """Active alerts with annotations, or None when the backend has no alerts API."""
        try:
            data = self._call("GET", "/api/v1/alerts")
        except BackendNotFound:
            return None
        alerts = data.get("alerts", [])
        if not isinstance(alerts, list):
            raise BackendError("the metrics backend's /api/v1/alerts answer has no alerts list")
        return alerts

    def ping(self) -> None:
        """Raise unless the backend evaluates a trivial query."""
        self.query("vector(1)")


class PendingQuery:
    """An instant query sent by ``PrometheusClient.start_query``; read once with ``result`` or
    given up with ``abandon``."""

    __slots__ = ("client", "expr", "at", "_conn", "_deadline", "_reused", "done")

    def __init__(self, client: PrometheusClient, expr: str, at: float,
                 conn: http11.Connection, deadline: float, reused: bool) -> None:
        self.client = client
        self.expr = expr
        self.at = at
        """The evaluation time sent with the query."""
        self._conn = conn
        self._deadline = deadline
        self._reused = reused
        self.done = False

    def result(self) -> list[Sample]:
        """The samples, or the API's error, as ``query(expr, at)`` gives them."""
        if self.done:
            raise RuntimeError("a pending query is read once")
        self.done = True
        client, conn = self.client, self._conn
        try:
            answer = conn.receive(self._deadline)
        except OSError as exc:
            client._forget(conn)
            if self._reused and isinstance(exc, _STALE):
                # The backend had closed the kept-alive connection: ask again, as query does.
                return client.query(self.expr, self.at)
            raise client._transport_error(exc) from None
        except BaseException:
            client._forget(conn)
            raise
        client._give_back(conn)
        return client._samples(answer.status, answer.body)

    def abandon(self) -> None:
        """Close the connection unread: the backend stops evaluating (Prometheus cancels a
        query whose client has gone) and the thread's next query opens a fresh one."""
        if not self.done:
            self.done = True
            self.client._forget(self._conn)
