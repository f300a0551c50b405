"""gunicorn settings for the API: ``gunicorn -c api/gunicorn.conf.py 'api:create_app()'``.

Environment: AICRM_API_BIND (default 0.0.0.0:5000, the container's address), AICRM_API_WORKERS
(4), AICRM_API_THREADS (2), AICRM_API_TIMEOUT (30 s), AICRM_API_ACCESS_LOG ("-" for stdout,
a path, or "off"), PROMETHEUS_MULTIPROC_DIR (the request metrics' shared directory).
"""

import os
import shutil
import tempfile

# Multiprocess metrics must be on before prometheus_client is first imported.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"aicrm-api-metrics-{os.getuid()}"),
)

bind = os.environ.get("AICRM_API_BIND", "0.0.0.0:5000")
workers = int(os.environ.get("AICRM_API_WORKERS", "4"))
worker_class = "gthread"
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


def on_starting(server: object) -> None:
    """A fresh metrics directory: files of a previous run would be summed in forever."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's live-only series (gauges); its counters stay summed."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
