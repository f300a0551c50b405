"""gunicorn settings for the API: ``gunicorn -c api/gunicorn.conf.py 'api:create_app()'``.

Environment: AICRM_API_BIND (default 0.0.0.0:5000, the container's address), AICRM_API_WORKERS
(4), AICRM_API_THREADS (2), AICRM_API_TIMEOUT (30 s), AICRM_API_ACCESS_LOG ("-" for stdout,
a path, or "off"), AICRM_API_CONTROL_SOCKET (gunicornc's socket; none by default),
AICRM_API_REUSE_PORT (1: a listening socket per worker on a TCP address;
0: one socket shared by all workers), PROMETHEUS_MULTIPROC_DIR (the request metrics' shared
directory).
"""

import os
import shutil
import tempfile
from typing import Any

# Multiprocess metrics must be on before prometheus_client is first imported.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"aicrm-api-metrics-{os.getuid()}"),
)

bind = os.environ.get("AICRM_API_BIND", "0.0.0.0:5000")
workers = int(os.environ.get("AICRM_API_WORKERS", "4"))
# gthread, closing a stopping worker's own listening socket at once (api/gunicorn_worker.py).
worker_class = "api.gunicorn_worker.Worker"
# A listening socket per worker (SO_REUSEPORT): the kernel spreads connections over the
# workers instead of the first to wake taking a whole burst. on_starting turns it off for a
# unix socket (which every worker would unlink and bind again), an fd, or systemd's sockets.
reuse_port = os.environ.get("AICRM_API_REUSE_PORT", "1") != "0"
# gunicorn 25.1+ opens a control socket for gunicornc at a per-user default path that every
# instance of the user shares; off unless AICRM_API_CONTROL_SOCKET names a path (mode 0600).
_control = os.environ.get("AICRM_API_CONTROL_SOCKET")
if _control:
    control_socket = _control
else:
    control_socket_disable = True
threads = int(os.environ.get("AICRM_API_THREADS", "2"))
timeout = int(os.environ.get("AICRM_API_TIMEOUT", "30"))
graceful_timeout = 20
keepalive = 5
max_requests = 0
_access = os.environ.get("AICRM_API_ACCESS_LOG", "-")
accesslog = None if _access == "off" else _access
errorlog = "-"
loglevel = "info"
# JSON lines (ts, request_id, remote, method, path without the query string, status, bytes,
# duration_us), written by api/gunicorn_logging.py: no request header is logged, so neither
# Authorization nor X-API-Key can reach the access log.
logger_class = "api.gunicorn_logging.JsonAccessLogger"


def on_starting(server: Any) -> None:
    """A fresh metrics directory: files of a previous run would be summed in forever. And the
    socket-per-worker mode only where it works (see reuse_port above)."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    if server.cfg.reuse_port:
        if any(not isinstance(a, tuple) for a in server.cfg.address) or os.environ.get(
                "LISTEN_FDS"):
            # A unix socket or fd given with --bind, or systemd's sockets: one shared socket.
            server.cfg.set("reuse_port", False)
        elif os.environ.get("GUNICORN_FD") == "":
            # A USR2 re-exec from a master in this mode hands over no sockets, and gunicorn
            # 27 would fail to parse the empty list before it reaches its own reuse_port
            # check; the new master's workers bind their sockets beside the old ones.
            os.environ["GUNICORN_FD"] = "-1"


def when_ready(server: Any) -> None:
    """With a socket per worker the arbiter binds none itself: check the address can be bound
    now (gunicorn's own bind, with its retries), so a port held by another program stops
    start-up with gunicorn's "Connection in use" instead of workers failing to boot forever."""
    if not server.cfg.reuse_port:
        return
    from gunicorn import sock

    probes = sock.create_sockets(server.cfg, server.log)
    names = ", ".join(str(p) for p in probes)
    sock.close_sockets(probes, unlink=False)
    server.log.info("Listening at: %s (a socket per worker, SO_REUSEPORT)", names)


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's live-only series (gauges); its counters stay summed."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
