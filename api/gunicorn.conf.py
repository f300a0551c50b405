"""gunicorn settings for the API: ``gunicorn -c api/gunicorn.conf.py 'api:create_app()'``.

Environment: AICRM_API_BIND (default 0.0.0.0:5000, the container's address), AICRM_API_WORKERS
(4), AICRM_API_THREADS (4), AICRM_API_TIMEOUT (30 s), AICRM_API_ACCESS_LOG ("-" for stdout,
a path, or "off"), AICRM_API_CONTROL_SOCKET (gunicornc's socket; none by default),
AICRM_API_REUSE_PORT (1: a listening socket per worker on a TCP address;
0: one socket shared by all workers), AICRM_API_KEEPALIVE_LINGER_MS (2: how long a thread waits
for a kept-alive connection's next request; api/gunicorn_worker.py), PROMETHEUS_MULTIPROC_DIR
(the request metrics' shared directory; by default one per master, removed when it exits).
Sets AICRM_API_MASTER_PID for the workers' process series.
"""

import os
import shutil
import tempfile
from typing import Any

# Multiprocess metrics must be on before prometheus_client is first imported (the worker
# class's import brings in the app's modules). By default a directory of this master's own:
# one shared by every instance of the user was wiped by each start under the others' workers.
# A HUP reload finds the variable set and keeps the directory; a USR2 re-exec starts from the
# environment gunicorn was started with, so the new master has a directory of its own and the
# old one's workers keep theirs until they stop.
_OWN_DIR = "AICRM_API_OWN_METRICS_DIR"
"""Set to the directory when this file chose it, so on_exit removes only its own."""
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_OWN_DIR] = os.path.join(
        tempfile.gettempdir(), f"aicrm-api-metrics-{os.getuid()}-{os.getpid()}")

# After the metrics directory is set: importing the worker's module loads the app's package.
from api.gunicorn_worker import linger_ms  # noqa: E402

linger_ms()  # a bad AICRM_API_KEEPALIVE_LINGER_MS stops start-up here, naming the variable

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
threads = int(os.environ.get("AICRM_API_THREADS", "4"))
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
    """A fresh metrics directory: files of a previous run would be summed in forever. Not on a
    USR2 re-exec (GUNICORN_PID names the old master, as gunicorn's arbiter reads it): a
    directory given in PROMETHEUS_MULTIPROC_DIR then holds the old master's live workers'
    files. And the socket-per-worker mode only where it works (see reuse_port above)."""
    # The workers' /metrics report the process series of this master and its workers
    # (api/process_metrics.py); a USR2 re-exec's new master names itself.
    os.environ["AICRM_API_MASTER_PID"] = str(os.getpid())
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if os.environ.get(_OWN_DIR) == directory:
        # In the shared temporary directory: left by a master of this pid that died without
        # on_exit. Made anew with mode 0700, and start-up fails if another user's entry stays.
        shutil.rmtree(directory, ignore_errors=True)
        os.mkdir(directory, 0o700)
    else:
        if "GUNICORN_PID" not in os.environ:
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


def on_exit(server: Any) -> None:
    """Remove the metrics directory this master chose (never one given in the environment)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.environ.get(_OWN_DIR) == directory:
        shutil.rmtree(directory, ignore_errors=True)


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's live-only series (gauges); its counters stay summed."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
