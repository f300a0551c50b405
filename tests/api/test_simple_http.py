"""api/simple_http.py held to gunicorn's own parser, ``wsgi.create`` and ``Response``: whatever
request ``parse`` accepts, gunicorn reads the same way and builds the same environment from;
whatever it refuses is left to gunicorn; every answer is written byte for byte as gunicorn's
``Response`` writes it (but the ``Date``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import InvalidResponseHeader, InvalidResponseHeaderName
from gunicorn.http.parser import RequestParser
from gunicorn.http.wsgi import Response, create
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api import simple_http

PATHS = frozenset({"/task-completion", "/agent-performance"})
CLIENT = ("10.1.2.3", 40000)
SERVER = ("127.0.0.1", 5000)


def _cfg(**settings_: Any) -> Config:
    cfg = Config()
    cfg.set("workers", 4)
    for name, value in settings_.items():
        cfg.set(name, value)
    return cfg


class Sink:
    """A socket that keeps what is written to it."""

    def __init__(self) -> None:
        self.out = b""

    def sendall(self, data: bytes) -> None:
        self.out += data

    send = sendall


def gunicorn_reads(data: bytes, cfg: Config) -> tuple[Any, dict[str, Any], bytes] | Exception:
    """gunicorn's request, environment and unread rest for ``data``; or its error."""
    parser = RequestParser(cfg, [data], CLIENT)
    try:
        req = next(parser)
        _, env = create(req, Sink(), CLIENT, SERVER, cfg)
        env["wsgi.multithread"] = True  # as gthread's handle_request sets it
    except StopIteration:
        return ValueError("no request")
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        return exc
    return req, env, parser.unreader.buf.getvalue() + b"".join(parser.unreader.iter)


_OBJECTS = ("wsgi.input", "wsgi.errors", "gunicorn.socket", "wsgi.early_hints",
            "wsgi.file_wrapper")


def check_request(data: bytes, cfg: Config) -> simple_http.SimpleGet | None:
    rules = simple_http.Rules.of(cfg, PATHS)
    ours = simple_http.parse(data, rules)
    theirs = gunicorn_reads(data, cfg)
    if ours is None:
        return None
    assert not isinstance(theirs, Exception), (data, theirs)
    req, env, rest = theirs
    assert (ours.method, ours.uri, ours.path, ours.query, ours.version) == (
        req.method, req.uri, req.path, req.query, req.version)
    assert ours.headers == req.headers
    assert data[ours.consumed:] == rest
    mine = simple_http.Environ(cfg)(ours, Sink(), CLIENT, SERVER, None, lambda headers: None)
    assert {k: v for k, v in mine.items() if k not in _OBJECTS} == {
        k: v for k, v in env.items() if k not in _OBJECTS}
    assert mine.keys() == env.keys()
    assert type(mine["wsgi.input"]) is type(env["wsgi.input"])
    assert mine["wsgi.input"].read() == env["wsgi.input"].read() == b""
    return ours


def test_a_plain_get_is_read_as_gunicorn_reads_it() -> None:
    cfg = _cfg()
    data = (b"GET /task-completion?window=1h&agent=a%20b HTTP/1.1\r\nHost: api\r\n"
            b"User-Agent: x/1\r\nX-API-Key:  k1 \r\nAccept: */*\r\n"
            b"Connection: Keep-Alive\r\n\r\nGET /next")
    req = check_request(data, cfg)
    assert req is not None and req.query == "window=1h&agent=a%20b"
    assert req.consumed == data.index(b"GET /next")
    assert ("X-API-KEY", "k1") in req.headers
    assert check_request(b"GET /agent-performance HTTP/1.1\r\n\r\n", cfg) is not None


@pytest.mark.parametrize("data", [
    b"POST /task-completion HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /task-completion HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET /export HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /task-completion/ HTTP/1.1\r\n\r\n",
    b"GET /task-completion#x HTTP/1.1\r\n\r\n",
    b"GET /task%2Dcompletion HTTP/1.1\r\n\r\n",
    b"GET //task-completion HTTP/1.1\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nHost: a\r\n",  # head not complete yet
    b"GET /task-completion HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nContent-Type: text/plain\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX_API_Key: k\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-Forwarded-Proto: https\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A : 1\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A: a\nb\r\n\r\n",
    b"GET /task-completion HTTP/1.1\nX-A: 1\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A: caf\xc3\xa9\r\n\r\n",
    b"GET /task-completion HTTP/1.1\r\nX-A: \x00\r\n\r\n",
    b"\r\nGET /task-completion HTTP/1.1\r\n\r\n",
    b"GET  /task-completion HTTP/1.1\r\n\r\n",
    b"GET /task-completion?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
])
def test_anything_else_is_left_to_gunicorn(data: bytes) -> None:
    assert simple_http.parse(data, simple_http.Rules.of(_cfg(), PATHS)) is None


def test_limits_are_gunicorns() -> None:
    cfg = _cfg(limit_request_line=40, limit_request_fields=2, limit_request_field_size=20)
    rules = simple_http.Rules.of(cfg, PATHS)
    # At each limit exactly: accepted, and read alike by gunicorn.
    assert len(b"GET /task-completion?window=10h HTTP/1.1") == 40
    assert len(b"A: 123456789012345\r\n") == 20  # gunicorn counts the CRLF
    for ok in (b"GET /task-completion?window=10h HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n",
               b"GET /task-completion HTTP/1.1\r\nA: 123456789012345\r\n\r\n"):
        assert check_request(ok, cfg) is not None
    assert len(b"GET /task-completion?window=100h HTTP/1.1") == 41
    for data in (b"GET /task-completion?window=100h HTTP/1.1\r\n\r\n",
                 b"GET /task-completion HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
                 b"GET /task-completion HTTP/1.1\r\nA: 1234567890123456\r\n\r\n"):
        assert simple_http.parse(data, rules) is None
        assert isinstance(gunicorn_reads(data, cfg), Exception)


_SAFE = list(" !%,;=aZ09") * 6
_names = st.sampled_from(["Host", "X-API-Key", "authorization", "X-Request-Id", "Origin",
                          "Accept", "A", "a"] * 3
                         + ["Connection", "Content-Length", "X_Api_Key", "X-Forwarded-Proto",
                            "Expect", "Transfer-Encoding", "Content-Type", "Bad Name", ""])
_value_chars = st.sampled_from(_SAFE + list("\t\x00\x7f\x80\xe9\r\n")
                               + ["keep-alive", "Keep-Alive", "close"])
_header = st.tuples(_names, st.sampled_from([":", ": ", ":\t", ": ", ":  "] * 3 + [" :"]),
                    st.lists(_value_chars, max_size=6).map("".join),
                    st.sampled_from(["", "", "", " ", "\t"]))
_targets = st.sampled_from(["/task-completion", "/agent-performance"] * 6
                           + ["/x", "//task-completion", "/task-completion/", "*",
                              "http://a/task-completion"])
_queries = st.lists(st.sampled_from(list("aZ0=&+-._~") * 4 + list("%2F?#;\"<>`{}\x7f ")),
                    max_size=8).map("".join)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET"] * 8 + ["get", "POST", "HEAD"]), target=_targets,
       query=st.one_of(st.none(), _queries),
       version=st.sampled_from(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.10"]),
       headers=st.lists(_header, max_size=5),
       eol=st.sampled_from(["\r\n"] * 8 + ["\n"]), rest=st.sampled_from(["", "GET / HTTP/1.1"]),
       limits=st.tuples(st.integers(20, 60), st.integers(1, 5), st.integers(4, 24)))
@example(method="GET", target="/task-completion", query="window=1h", version="HTTP/1.1",
         headers=[("Host", ":\t", "api", "\t"), ("Connection", ": ", "keep-alive", " ")],
         eol="\r\n", rest="", limits=(40, 2, 20))
def test_whatever_parse_accepts_gunicorn_reads_alike(method: str, target: str, query: str | None,
                                                     version: str,
                                                     headers: list[tuple[str, str, str, str]],
                                                     eol: str, rest: str,
                                                     limits: tuple[int, int, int]) -> None:
    uri = target if query is None else f"{target}?{query}"
    head = f"{method} {uri} {version}{eol}" + "".join(
        f"{n}{sep}{v}{pad}{eol}" for n, sep, v, pad in headers)
    data = (head + eol + rest).encode("latin-1")
    check_request(data, _cfg())
    check_request(data, _cfg(forwarded_allow_ips="*"))
    # Small limits, so that requests around each one are compared too.
    check_request(data, _cfg(limit_request_line=limits[0], limit_request_fields=limits[1],
                             limit_request_field_size=limits[2]))


@settings(max_examples=300, deadline=None)
@given(target=st.sampled_from(sorted(PATHS)),
       query=st.one_of(st.none(), st.lists(st.sampled_from(list("aZ0=&+-._~%2F;")),
                                           max_size=12).map("".join)),
       headers=st.lists(st.tuples(
           st.sampled_from(["Host", "X-API-Key", "Authorization", "X-Request-Id", "Origin",
                            "Accept", "User-Agent", "If-None-Match", "Connection"]),
           st.sampled_from([":", ": ", ":\t", ":  "]),
           st.lists(st.sampled_from(list(" !%,;=aZ09") + ["Bearer x"]), max_size=6).map("".join),
           st.sampled_from(["", " ", "\t"])), max_size=6, unique_by=lambda h: h[0]),
       rest=st.sampled_from(["", "GET / HTTP/1.1"]))
def test_every_plain_get_is_accepted_and_read_as_gunicorn_reads_it(
        target: str, query: str | None, headers: list[tuple[str, str, str, str]],
        rest: str) -> None:
    """Plain GETs by construction: each is accepted (so the comparison is made every time)."""
    uri = target if query is None else f"{target}?{query}"
    lines = [f"GET {uri} HTTP/1.1"] + [
        f"{n}{sep}{'keep-alive' if n == 'Connection' else v}{pad}" for n, sep, v, pad in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n" + rest).encode("ascii")
    assert check_request(data, _cfg()) is not None, data


# --- answers -------------------------------------------------------------------------------

_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def _written(resp: Any, finish: Any, status: str, headers: list[tuple[Any, Any]],
             body: list[bytes], force_close: bool) -> tuple[bytes, bool] | type:
    """What a writer put on the wire (``finish`` ends the answer and returns it, the Date
    blanked) and whether it closes the connection; or the type of the error it raised."""
    if force_close:
        resp.force_close()
    try:
        resp.start_response(status, headers)
        for item in body:
            resp.write(item)
        out = finish()
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        return type(exc)
    return _DATE.sub(b"\r\nDate: -\r\n", out), resp.should_close()


def gunicorn_writes(req: Any, cfg: Config, status: str, headers: list[tuple[Any, Any]],
                    body: list[bytes], force_close: bool) -> tuple[bytes, bool] | type:
    sock = Sink()
    resp = Response(req, sock, cfg)

    def finish() -> bytes:
        resp.close()
        return sock.out

    return _written(resp, finish, status, headers, body, force_close)


def simple_writes(status: str, headers: list[tuple[Any, Any]], body: list[bytes],
                  force_close: bool) -> tuple[bytes, bool] | type:
    reply = simple_http.Reply()
    return _written(reply, reply.encode, status, headers, body, force_close)


_GET = b"GET /task-completion HTTP/1.1\r\nHost: a\r\n\r\n"


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from(["200 OK", "204 No Content", "304 Not Modified", "429 Too Many",
                               "500 Internal Server Error", "200", "2000 X", "103 Early"]),
       headers=st.lists(st.tuples(
           st.sampled_from(["Content-Type", "Content-Length", "X-RateLimit-Limit", "Connection",
                            "Upgrade", "Keep-Alive", "Vary", "Bad Name", "X-A", "Server"]),
           st.sampled_from(["application/json", "5", "0", "12", "upgrade", "websocket",
                            " padded\t", "a\r\nb", "close", "Origin"])), max_size=4),
       body=st.lists(st.sampled_from([b"", b"{}", b"hello", b'{"data":[1,2,3],"more":true}']),
                     max_size=3),
       force_close=st.booleans())
@example(status="200 OK", headers=[("Content-Type", "application/json"),
                                   ("Content-Length", "2")], body=[b"{}"], force_close=False)
@example(status="204 No Content", headers=[("Content-Length", "5")], body=[b"hello"],
         force_close=False)
@example(status="304 Not Modified", headers=[("Content-Length", "5")], body=[b"hello"],
         force_close=False)
@example(status="200 OK", headers=[("Content-Length", "5")], body=[b"he", b"llo there"],
         force_close=False)
def test_every_answer_is_written_as_gunicorn_writes_it(
        status: str, headers: list[tuple[str, str]], body: list[bytes], force_close: bool) -> None:
    cfg = _cfg()
    req = next(RequestParser(cfg, [_GET], CLIENT))
    assert simple_writes(status, headers, body, force_close) == gunicorn_writes(
        req, cfg, status, headers, body, force_close)


def test_bad_answers_fail_as_in_gunicorn() -> None:
    cfg = _cfg()
    req = next(RequestParser(cfg, [_GET], CLIENT))
    for status, headers, body in (
            ("200 OK", [("Bad Name", "x")], [b""]),
            ("200 OK", [("X-A", "a\r\nb")], [b""]),
            ("200 OK", [(b"X-A", "1")], [b""]),
            ("OK", [], [b""]),
            ("200 OK", [("Content-Length", "2")], ["{}"])):
        ours = simple_writes(status, headers, body, False)  # type: ignore[arg-type]
        assert ours == gunicorn_writes(req, cfg, status, headers, body, False)  # type: ignore[arg-type]
        assert isinstance(ours, type) and issubclass(ours, Exception)
    assert simple_writes("200 OK", [("X-A", "a\r\nb")], [], False) is InvalidResponseHeader
    assert simple_writes("200 OK", [("Bad Name", "x")], [], False) is InvalidResponseHeaderName


def test_the_date_is_the_current_second() -> None:
    import time
    from email.utils import formatdate, parsedate_to_datetime

    before = int(time.time())
    text = simple_http.http_date()
    after = int(time.time())
    assert before <= parsedate_to_datetime(text).timestamp() <= after
    assert text in {formatdate(t, usegmt=True) for t in range(before, after + 1)}


# --- through gunicorn -----------------------------------------------------------------------


def _read_answer(sock: Any, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length from ``sock`` (``buf`` keeps what was read past it)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers["content-length"])
    while len(buf) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return int(lines[0].split()[1]), headers, body


@pytest.mark.integration
def test_gunicorn_answers_plain_gets_itself_and_leaves_the_rest_to_gunicorn(
        known_prometheus: Any, tmp_path: Path) -> None:
    """One worker, one thread, one connection: its first request is read by gunicorn (the
    connection is set up there), the next plain GETs by the worker itself (the ``pre_request``
    hook sees a ``SimpleGet``), anything else by gunicorn, in order, pipelined or not; the
    answers and access lines are the same either way."""
    import json as json_
    import os
    import socket
    import sys

    from tests import servers
    from tests.api.conftest import ROOT
    from tests.helpers import config_dict

    hooks = tmp_path / "hooks.log"
    ours_conf = str(ROOT / "api" / "gunicorn.conf.py")
    (tmp_path / "gunicorn.conf.py").write_text(
        "import runpy\n"
        f"globals().update({{k: v for k, v in runpy.run_path({ours_conf!r}).items()"
        " if not k.startswith('__')})\n"
        "def pre_request(worker, req):\n"
        f"    with open({str(hooks)!r}, 'a') as f:\n"
        "        f.write(f'{type(req).__name__} {req.method} {req.path}\\n')\n")
    (tmp_path / "config.json").write_text(json_.dumps(config_dict(api={
        "prometheus_url": known_prometheus.url, "redis_url": None, "cache_ttl_seconds": 0,
        "rate_limit": "100000/minute"})))
    port = servers.free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AICRM_CONFIG": str(tmp_path / "config.json"), "AICRM_API_BIND": f"127.0.0.1:{port}",
           "AICRM_API_WORKERS": "1", "AICRM_API_THREADS": "1",
           "AICRM_API_ACCESS_LOG": str(tmp_path / "access.log"),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    gunicorn = servers.ProcessHandle("gunicorn", tmp_path)
    gunicorn.start([Path(sys.executable).parent / "gunicorn", "-c", tmp_path / "gunicorn.conf.py",
                    "api:create_app()"], cwd=ROOT, env=env,
                   ready_check=servers.http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60)
    plain = b"GET /agent-performance?window=1h HTTP/1.1\r\nHost: api\r\nX-Request-Id: r-1\r\n\r\n"
    try:
        hooks.write_text("")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            buf = bytearray()
            answers = []
            for _ in range(2):
                sock.sendall(plain)
                answers.append(_read_answer(sock, buf))
            sock.sendall(plain
                         + b"GET /agent-performance?window=1h HTTP/1.1\r\nX_Api_Key: k\r\n\r\n"
                         + b"POST /agent-performance HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
                         + b"GET /agent-performance?window=2x HTTP/1.1\r\n\r\n"
                         + plain)
            answers += [_read_answer(sock, buf) for _ in range(5)]
            sock.sendall(b"GET /agent-performance HTTP/1.1\r\nX-A : 1\r\n\r\n")
            bad = _read_answer(sock, buf)
            assert sock.recv(1) == b""  # gunicorn closes after a bad request
    finally:
        gunicorn.stop()
    assert [a[0] for a in answers] == [200, 200, 200, 200, 405, 400, 200]
    assert bad[0] == 400
    first, second = answers[0], answers[1]
    assert first[1].keys() == second[1].keys()
    assert first[1]["x-request-id"] == second[1]["x-request-id"] == "r-1"
    assert first[1]["connection"] == second[1]["connection"] == "keep-alive"
    one, two = json_.loads(first[2]), json_.loads(second[2])
    assert one.keys() == two.keys() and one["data"]["agents"]
    # The known data is live (scraped, evaluated): the same agents and fields, not the values.
    assert [(a["agent"], a.keys()) for a in one["data"]["agents"]] == [
        (a["agent"], a.keys()) for a in two["data"]["agents"]]
    assert json_.loads(answers[5][2])["error"]["parameter"] == "window"
    assert hooks.read_text().split("\n")[:-1] == [
        "Request GET /agent-performance", "SimpleGet GET /agent-performance",
        "SimpleGet GET /agent-performance", "Request GET /agent-performance",
        "Request POST /agent-performance", "SimpleGet GET /agent-performance",
        "SimpleGet GET /agent-performance"]
    lines = [json_.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    ours = [x for x in lines if x["path"] == "/agent-performance"]
    assert [x["status"] for x in ours] == [200, 200, 200, 200, 405, 400, 200]
    assert ours[0].keys() == ours[1].keys()
    assert ours[1]["request_id"] == "r-1" and ours[1]["bytes"] == len(second[2])
