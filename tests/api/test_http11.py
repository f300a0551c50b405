"""api/http11.py, the API's HTTP/1.1 client, against servers that answer byte by byte as a test
script says: every framing a Prometheus-compatible backend or a proxy in front of it may use,
the errors it must refuse, one deadline for a whole exchange, and TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api import http11
from api.promql import BackendTimeout, BackendUnavailable, PrometheusClient

Script = Callable[[socket.socket], None]


def ok_answer(body: bytes) -> bytes:
    """A complete HTTP/1.1 200 answer carrying ``body`` with its Content-Length."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


class ScriptedServer:
    """Accepts connections on loopback and runs ``script(conn)`` on each, in a thread."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.tls is not None:
                    with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
                        self.script(tls_conn)
                else:
                    self.script(conn)
            except OSError:
                pass

    def read_request(self, conn: socket.socket) -> bytes:
        """One request with a Content-Length body (or none)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        return head

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    started: list[ScriptedServer] = []

    def start(script: Script, tls: ssl.SSLContext | None = None) -> ScriptedServer:
        server = ScriptedServer(script, tls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


_clients: list[http11.Connection] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def _connect(server: ScriptedServer) -> http11.Connection:
    conn = http11.Connection("127.0.0.1", server.port, connect_timeout=2)
    _clients.append(conn)
    return conn


REQUEST = b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=1"


def _soon(seconds: float = 5) -> float:
    return time.monotonic() + seconds


def _trickle(conn: socket.socket, data: bytes, piece: int = 1) -> None:
    for i in range(0, len(data), piece):
        conn.sendall(data[i:i + piece])
        time.sleep(0.0005)


def test_chunked_answer_in_small_pieces_with_extensions_and_trailers(
    serve: Callable[..., ScriptedServer],
) -> None:
    body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    chunks = [body[:10], body[10:11], body[11:]]
    wire = b"".join(f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n" for c in chunks)
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" + wire + b"0\r\nX-Trailer: yes\r\n\r\n")

    def script(conn: socket.socket) -> None:
        while server.read_request(conn):
            _trickle(conn, answer, piece=3)

    server = serve(script)
    conn = _connect(server)
    for _ in range(2):  # the second exchange reuses the connection
        got = conn.exchange(REQUEST, _soon())
        assert (got.status, got.body, got.will_close) == (200, body, False)
    assert server.connections == 1 and len(server.requests) == 2
    assert server.requests[0].endswith(b"\r\n\r\na=1")


def test_content_length_answer_larger_than_one_read(serve: Callable[..., ScriptedServer]) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, arrives over many reads

    def script(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body))
        conn.sendall(body)

    server = serve(script)
    got = _connect(server).exchange(REQUEST, _soon())
    assert got.status == 503 and got.body == body


def test_interim_answer_then_close_delimited_body(serve: Callable[..., ScriptedServer]) -> None:
    def script(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.01)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":")
        time.sleep(0.01)
        conn.sendall(b"1}")
        conn.shutdown(socket.SHUT_WR)

    server = serve(script)
    conn = _connect(server)
    got = conn.exchange(REQUEST, _soon())
    assert (got.status, got.body, got.will_close) == (200, b'{"a":1}', True)
    assert conn.closed


def test_connection_close_and_no_content(serve: Callable[..., ScriptedServer]) -> None:
    def script(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    server = serve(script)
    conn = _connect(server)
    got = conn.exchange(REQUEST, _soon())
    assert (got.status, got.body, got.will_close) == (204, b"", True)
    assert conn.closed


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
])
def test_answers_that_are_not_http_are_refused(serve: Callable[..., ScriptedServer],
                                              answer: bytes) -> None:
    def script(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        time.sleep(0.2)

    server = serve(script)
    conn = _connect(server)
    with pytest.raises(http11.ProtocolError):
        conn.exchange(REQUEST, _soon())
    assert conn.closed


def test_answer_over_the_size_cap(serve: Callable[..., ScriptedServer],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http11, "MAX_BODY_BYTES", 1000)

    def script(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n")

    server = serve(script)
    with pytest.raises(http11.AnswerTooLarge):
        _connect(server).exchange(REQUEST, _soon())


def test_one_deadline_for_the_whole_exchange(serve: Callable[..., ScriptedServer]) -> None:
    """A backend that trickles a byte every 50 ms never lets a per-read timeout expire; the
    exchange's deadline still ends it."""
    stop = threading.Event()

    def script(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        until = time.monotonic() + 3  # then hang up, so a client without a deadline fails too
        while not stop.wait(0.05) and time.monotonic() < until:
            conn.sendall(b"x")

    server = serve(script)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            _connect(server).exchange(REQUEST, time.monotonic() + 0.4)
    finally:
        stop.set()
    assert 0.35 < time.monotonic() - started < 1.5


def test_closed_before_answer_is_told_apart(serve: Callable[..., ScriptedServer]) -> None:
    def script(conn: socket.socket) -> None:
        server.read_request(conn)

    server = serve(script)
    with pytest.raises(http11.ClosedBeforeAnswer):
        _connect(server).exchange(REQUEST, _soon())


def test_client_maps_protocol_errors_and_stalls(serve: Callable[..., ScriptedServer]) -> None:
    """Through PrometheusClient: garbage is 503 (unavailable), a stall past the query timeout is
    504, and neither leaves a broken connection behind for the next query."""
    def garbage(conn: socket.socket) -> None:
        server_g.read_request(conn)
        conn.sendall(b"nonsense\r\n\r\n")

    def stall(conn: socket.socket) -> None:
        server_s.read_request(conn)
        time.sleep(1)

    server_g, server_s = serve(garbage), serve(stall)
    for server, error in ((server_g, BackendUnavailable), (server_s, BackendTimeout)):
        client = PrometheusClient(f"http://127.0.0.1:{server.port}", timeout=0.3)
        try:
            for _ in range(2):
                with pytest.raises(error):
                    client.query("vector(1)")
            assert not client._open
        finally:
            client.close()


def test_requests_carry_host_auth_and_form_body(serve: Callable[..., ScriptedServer]) -> None:
    body = b'{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}'

    def script(conn: socket.socket) -> None:
        while server.read_request(conn):
            conn.sendall(ok_answer(body))

    server = serve(script)
    client = PrometheusClient(f"http://user:p%40ss@127.0.0.1:{server.port}/prom/", timeout=2)
    try:
        assert client.query('sum(rate(x{a="b c"}[5m]))', 1700000000.0)[0].value == 2.0
    finally:
        client.close()
    head, _, form = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /prom/api/v1/query HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in lines
    assert "Authorization: Basic dXNlcjpwQHNz" in lines  # user:p@ss
    assert "Content-Type: application/x-www-form-urlencoded" in lines
    assert form.startswith(b"query=sum%28rate%28x%7Ba%3D%22b+c%22%7D%5B5m%5D%29%29&")
    assert b"time=1700000000.000" in form


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found: install Debian package openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_backend_verified_against_trusted_roots(
    serve: Callable[..., ScriptedServer], tls_files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    body = b'{"status":"success","data":{"resultType":"scalar","result":[1,"7"]}}'

    def script(conn: socket.socket) -> None:
        while server.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")

    server = serve(script, tls=server_ctx)
    # Not trusted: refused as unavailable, never read.
    untrusted = PrometheusClient(f"https://localhost:{server.port}", timeout=2)
    try:
        with pytest.raises(BackendUnavailable):
            untrusted.query("vector(7)")
    finally:
        untrusted.close()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    client = PrometheusClient(f"https://localhost:{server.port}", timeout=2)
    try:
        assert [client.query("vector(7)")[0].value for _ in range(2)] == [7.0, 7.0]
        assert len(client._open) == 1
    finally:
        client.close()


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listener never accepts and whose accept queue is full: Linux drops further
    SYNs, so a connect there times out (as behind a firewall that drops, or a stuck backend)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued: list[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.socket()
            queued.append(s)
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            raise RuntimeError("the accept queue never filled")
        yield port
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_connect_timeout_is_told_apart(full_backlog: int,
                                       serve: Callable[..., ScriptedServer]) -> None:
    """No connection within the connect timeout (TCP, or a TLS handshake that never completes)
    means the backend is down or unreachable: 503, not the 504 of a backend slow to answer."""
    def silent(conn: socket.socket) -> None:
        time.sleep(2)

    no_tls = serve(silent)
    for url in (f"http://127.0.0.1:{full_backlog}", f"https://localhost:{no_tls.port}"):
        client = PrometheusClient(url, timeout=0.3)
        try:
            with pytest.raises(BackendUnavailable) as err:
                client.query("vector(1)")
            assert err.value.status == 503
            assert "accepted no connection within 0.3s" in err.value.message
        finally:
            client.close()
    started = time.monotonic()
    with pytest.raises(http11.ConnectTimeout) as caught:
        http11.Connection("127.0.0.1", full_backlog, connect_timeout=0.2)
    assert not isinstance(caught.value, TimeoutError)
    assert time.monotonic() - started < 2
