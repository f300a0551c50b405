"""gunicorn's gthread worker, for a listening socket per worker (``reuse_port``), serving a
kept-alive connection's next request in the thread that answered the last one.

With one shared listening socket every worker polls it and whichever wakes first accepts, so a
burst of connections piles onto one worker (27 of 32 in one benchmark run) and that worker's
GIL sets the pace. With ``reuse_port`` gunicorn gives each worker its own SO_REUSEPORT socket
and the kernel spreads new connections over them (11/8/7/6 of 32 in the same benchmark).

What this class changes:

- A worker told to stop closes its sockets as soon as it stops accepting. gthread keeps them
  open until its last connection is done (up to ``graceful_timeout``); with a socket of its
  own, connections the kernel keeps routing to it meanwhile would wait unanswered and be reset
  at the close. Closed at once, the kernel sends new connections to the other workers; the few
  already queued on it are reset (or moved to another worker where
  ``net.ipv4.tcp_migrate_req = 1``).
- gthread hands every request of a kept-alive connection from its main thread (which polls
  the idle connections) to a pool thread and back: a pool submission, a pipe write to wake the
  main thread, a poller registration each way. On the benchmark machine that was 11 context
  switches and 3.1 ms of CPU per uncached request, against 4 and 2.6 ms when the thread that
  answered waits briefly for the connection's next request and serves it itself
  (docs/benchmarks.md). A thread waits only while no other connection of this worker waits
  for a thread, and for at most ``AICRM_API_KEEPALIVE_LINGER_MS`` (2 ms by default, 0 turns it
  off): a request arriving meanwhile on another connection waits at most that long for a
  thread. A connection without a request by then goes back to the poller, as in gthread.
- A kept-alive connection's plain GET of an endpoint the app answers below Flask (the paths in
  ``app.extensions[SIMPLE_GET_PATHS]``) is read, handed to the app and answered here
  (api/simple_http.py: only requests gunicorn's parser would read exactly alike; the same
  environment, hooks, access line, error answers and bytes on the wire), not by gunicorn's
  general parser and ``Response``: 1.23 against 1.43 ms of CPU per uncached answer on the
  benchmark machine. Anything else, and a connection's first request, is gunicorn's. Off for
  TLS, the PROXY protocol, uWSGI and a ``SCRIPT_NAME`` in the environment.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from gunicorn.http.wsgi import _make_early_hints_callback
from gunicorn.workers.gthread import ThreadWorker

from . import simple_http
from .hits import SIMPLE_GET_PATHS

LINGER_ENV = "AICRM_API_KEEPALIVE_LINGER_MS"
DEFAULT_LINGER_MS = 2.0


def linger_ms(environ: Mapping[str, str] = os.environ) -> float:
    """The linger from the environment; a bad value stops start-up naming the variable."""
    text = environ.get(LINGER_ENV, "").strip()
    if not text:
        return DEFAULT_LINGER_MS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{LINGER_ENV}={text!r}: expected milliseconds, such as 2") from None
    if not 0 <= value <= 1000:
        raise ValueError(f"{LINGER_ENV}={text!r}: must be between 0 and 1000 milliseconds")
    return value


class Worker(ThreadWorker):  # type: ignore[misc]
    alive: bool  # gunicorn's, set here too (max_requests)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.linger_ms = linger_ms()
        self.simple: simple_http.Rules | None = None
        self._environ: simple_http.Environ | None = None

    def load_wsgi(self) -> None:
        super().load_wsgi()
        cfg = self.cfg
        paths = getattr(self.wsgi, "extensions", {}).get(SIMPLE_GET_PATHS)
        if (paths and not cfg.is_ssl and cfg.proxy_protocol in ("off", False, None)
                and getattr(cfg, "protocol", "http") == "http"
                and not os.environ.get("SCRIPT_NAME")):
            self.simple = simple_http.Rules.of(cfg, paths)
            self._environ = simple_http.Environ(cfg)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive and self.cfg.reuse_port:
            for listener in self.sockets:
                listener.close()  # idempotent: gthread closes them again at the end

    def handle(self, conn: Any) -> Any:
        """gthread's ``handle`` for one request, then the connection's next ones for as long
        as each comes within the linger and no other connection waits for a thread."""
        while True:
            result = self._handle_one(conn)
            if (result is not True or not self.alive or self.linger_ms <= 0
                    or getattr(conn, "is_http2", False)):
                return result
            if not self.tpool._work_queue.empty():
                # Another connection waits for a thread: this one goes back (to the poller, or
                # to the queue's end with a request already read ahead), as in gthread.
                return result
            if not conn.parser.unreader.buf.getvalue() and not self._next_request_comes(conn):
                return result  # to the poller, as in gthread
            # The next request is here (or already read ahead): served in this thread.

    def _handle_one(self, conn: Any) -> Any:
        if self.simple is not None and conn.initialized and not getattr(conn, "is_http2", True):
            served = self._serve_simple(conn)
            if served is not None:
                return served
        return super().handle(conn)

    def _serve_simple(self, conn: Any) -> bool | None:
        """A plain GET of one of the app's paths, answered here (True: keep the connection);
        None when the next request is anything else, its bytes given back to gunicorn."""
        assert self.simple is not None and self._environ is not None
        conn.sock.setblocking(True)  # as gthread's handle: the poller left it non-blocking
        unreader = conn.parser.unreader
        data = unreader.take_buffered()
        if not data:
            try:
                data = conn.sock.recv(8192)  # gunicorn's read size
            except OSError as exc:
                self._socket_error(exc)
                return False
            if not data:
                return False  # the client closed the connection
        req = simple_http.parse(data, self.simple)
        if req is None or not isinstance(conn.server, tuple) or not isinstance(
                conn.client, tuple):
            unreader.unread(data)
            return None
        if len(data) > req.consumed:
            unreader.unread(data[req.consumed:])  # pipelined: the next request's start
        return self._answer_simple(conn, req)

    def _answer_simple(self, conn: Any, req: simple_http.SimpleGet) -> bool:
        """gthread's ``handle_request`` and ``handle`` error handling for a ``SimpleGet``."""
        assert self._environ is not None
        reply = simple_http.Reply()
        environ: dict[str, Any] = {}
        try:
            self.cfg.pre_request(self, req)
            started = time.perf_counter()
            environ = self._environ(req, conn.sock, conn.client, conn.server,
                                    conn.parser.unreader,
                                    _make_early_hints_callback(req, conn.sock, reply))
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                reply.force_close()
            if not self.alive or not self.cfg.keepalive:
                reply.force_close()
            elif len(self.keepalived_conns) >= self.max_keepalived:
                reply.force_close()
            respiter = self.wsgi(environ, reply.start_response)
            try:
                for item in respiter:
                    reply.write(item)
                conn.sock.sendall(reply.encode())
            finally:
                self.log.access(reply, req, environ,
                                timedelta(seconds=time.perf_counter() - started))
                if hasattr(respiter, "close"):
                    respiter.close()
            return not reply.should_close()
        except OSError as exc:
            self._socket_error(exc)
        except Exception as exc:  # noqa: BLE001 - gunicorn's answer to an application error
            self.handle_error(req, conn.sock, conn.client, exc)
        finally:
            try:
                self.cfg.post_request(self, req, environ, reply)
            except Exception:  # noqa: BLE001 - as gthread
                self.log.exception("Exception in post_request hook")
        return False

    def _socket_error(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            self.log.exception("Socket error processing request.")

    def _next_request_comes(self, conn: Any) -> bool:
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        try:
            return bool(poller.poll(self.linger_ms))
        except OSError:
            return False


__all__ = ["Worker"]
