"""Real servers from Debian packages, started on loopback for integration tests.

Every server runs on a free 127.0.0.1 port in its own temporary directory, is polled until it
answers (or the test fails with the tail of its log), and is stopped with terminate, wait, kill.
A missing binary is an error naming the package to install: integration tests never skip.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import psycopg
import requests
import yaml
from psycopg import sql


def _newest_postgres_bin(root: Path = Path("/usr/lib/postgresql")) -> Path:
    """Debian installs each major version beside the others (/usr/lib/postgresql/<major>/bin):
    the newest one installed (a placeholder naming the layout when there is none)."""
    versions = [p.parents[1] for p in root.glob("*/bin/postgres") if p.parents[1].name.isdigit()]
    if not versions:
        return root / "<version>" / "bin"
    return max(versions, key=lambda p: int(p.name)) / "bin"


PG_BIN = _newest_postgres_bin()
PG_USER = "aicrm"

# binary -> Debian package that ships it
PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "redis-server": "redis-server",
    "victoria-metrics": "victoria-metrics",
    "vmalert": "victoria-metrics",
    str(PG_BIN / "initdb"): "postgresql",
    str(PG_BIN / "postgres"): "postgresql",
}

_running: set[ProcessHandle] = set()


def free_port() -> int:
    """Ask the kernel for an unused loopback port (tiny race, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str) -> str:
    """Resolve a server binary, failing loudly with the package to install."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        raise RuntimeError(f"{name} not found: install the Debian package {package!r}")
    return path


def http_ok(url: str) -> Callable[[], bool]:
    """Readiness check: the URL answers 200."""

    def check() -> bool:
        with requests.get(url, timeout=2) as response:
            return response.status_code == 200

    return check


def tcp_ok(port: int) -> Callable[[], bool]:
    """Readiness check: something accepts connections on the port."""

    def check() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    return check


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Child side: get SIGKILL if the test process dies, so a crash leaves no orphans."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessHandle:
    """A child process in its own process group, with a log file and a clean stop."""

    stop_signal = signal.SIGTERM

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} not started"
        return self.process.pid

    def start(
        self,
        argv: Sequence[str | os.PathLike[str]],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_check: Callable[[], bool] | None = None,
        timeout: float = 30.0,
        user: str | None = None,
    ) -> ProcessHandle:
        """Start argv and wait until ready_check() is true; raise with the log tail if not."""
        args = [str(arg) for arg in argv]
        if os.sep not in args[0]:
            args[0] = require_binary(args[0])
        elif not os.access(args[0], os.X_OK):
            package = PACKAGES.get(args[0], args[0])
            raise RuntimeError(f"{args[0]} not found: install the Debian package {package!r}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        try:
            self.process = subprocess.Popen(
                args,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                user=user,
            )
        except BaseException:
            self._finish(timeout=0)
            raise
        _running.add(self)
        if ready_check is not None:
            self.wait_ready(ready_check, timeout)
        return self

    def wait_ready(self, ready_check: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll until ready; an early exit or the deadline stops the process and raises."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                self.stop()
                raise RuntimeError(
                    f"{self.name} exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if ready_check():
                    return
            except Exception as exc:  # not up yet; reported if it never comes up
                last_error = exc
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} not ready after {timeout}s (last error: {last_error}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> None:
        """Simulate a crash: SIGKILL the whole process group, then reap it."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGKILL)
        self._finish(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask politely, wait, then SIGKILL the group; idempotent."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
        self._finish(timeout)

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def _finish(self, timeout: float) -> None:
        if self.process is not None:
            self.process.wait(timeout)
            # Kill anything the server forked that outlived it in its group.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        _running.discard(self)
        self.cleanup()

    def cleanup(self) -> None:
        """Hook for subclasses that own files outside the test's temp dir."""


@atexit.register
def _stop_all() -> None:
    for handle in list(_running):
        handle.stop(timeout=5)


def _workdir(tmpdir: Path, name: str) -> Path:
    """A fresh directory per server, so two servers may share one tmpdir."""
    Path(tmpdir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmpdir))


class Server(ProcessHandle):
    """A server listening on 127.0.0.1:port, with its files in workdir."""

    def __init__(self, name: str, workdir: Path, port: int) -> None:
        super().__init__(name, workdir)
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def get_json(self, path: str, **params: Any) -> Any:
        with requests.get(self.url + path, params=params, timeout=10) as response:
            response.raise_for_status()
            return response.json()


class _PromQueryMixin(Server):
    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the 'result' list, or RuntimeError on an error status."""
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        with requests.get(f"{self.url}/api/v1/query", params=params, timeout=10) as response:
            body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{self.name} query {expr!r} failed: {body}")
        return list(body["data"]["result"])


# --- PostgreSQL ---------------------------------------------------------------------------


def _postgres_os_user() -> str | None:
    """PostgreSQL refuses root: pick (or create) an unprivileged account to run it as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "aicrm-pg"],
        check=True,
        capture_output=True,
    )
    return "aicrm-pg"


class PostgresServer(Server):
    """A throwaway cluster: trust auth on loopback, fsync off, superuser 'aicrm'."""

    stop_signal = signal.SIGINT  # fast shutdown: don't wait for pooled clients

    def __init__(self, name: str, workdir: Path, port: int, datadir: Path) -> None:
        super().__init__(name, workdir, port)
        self.datadir = datadir
        self.url = self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname=database, autocommit=True
        )

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def cleanup(self) -> None:
        if self.datadir.parent != self.workdir:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres(tmpdir: Path) -> PostgresServer:
    initdb, postgres = str(PG_BIN / "initdb"), str(PG_BIN / "postgres")
    for binary in (initdb, postgres):
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"{binary} not found: install the Debian package 'postgresql'")
    workdir = _workdir(tmpdir, "postgres")
    user = _postgres_os_user()
    if user is None:
        datadir = workdir / "data"
    else:
        # pytest's tmp dirs are root-only (0700); the server's user needs its own tree.
        owned = Path(tempfile.mkdtemp(prefix="aicrm-pg-"))
        entry = pwd.getpwnam(user)
        os.chown(owned, entry.pw_uid, entry.pw_gid)
        datadir = owned / "data"
    port = free_port()
    server = PostgresServer("postgres", workdir, port, datadir)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    with open(workdir / "initdb.log", "wb") as log:
        result = subprocess.run(
            [initdb, "-D", datadir, "-U", PG_USER, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            cwd="/",
            env=env,
            user=user,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    if result.returncode != 0:
        server.cleanup()
        tail = (workdir / "initdb.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"initdb failed ({result.returncode}):\n{tail}")

    def ready() -> bool:
        with server.connect():
            return True

    server.start(
        [postgres, "-D", datadir, "-p", str(port), "-h", "127.0.0.1", "-k", datadir,
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=200", "-c", "log_min_messages=warning"],
        cwd=Path("/"),
        env=env,
        ready_check=ready,
        user=user,
    )
    return server


# --- Redis --------------------------------------------------------------------------------


class RedisServer(Server):
    """Redis without persistence; .url is a redis:// URL for database 0."""

    def __init__(self, name: str, workdir: Path, port: int) -> None:
        super().__init__(name, workdir, port)
        self.url = f"redis://127.0.0.1:{port}/0"


def start_redis(tmpdir: Path) -> RedisServer:
    workdir = _workdir(tmpdir, "redis")
    port = free_port()
    server = RedisServer("redis", workdir, port)

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    server.start(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
        cwd=workdir,
        ready_check=ready,
    )
    return server


# --- Prometheus ---------------------------------------------------------------------------


class PrometheusServer(_PromQueryMixin):
    """Prometheus with the lifecycle API on, so tests can reload rewritten config."""

    def __init__(self, name: str, workdir: Path, port: int) -> None:
        super().__init__(name, workdir, port)
        self.config_path = workdir / "prometheus.yml"

    def reload(self) -> None:
        with requests.post(f"{self.url}/-/reload", timeout=30) as response:
            if response.status_code != 200:
                raise RuntimeError(f"prometheus reload failed: {response.text}")

    def targets(self) -> list[dict[str, Any]]:
        return list(self.get_json("/api/v1/targets", state="active")["data"]["activeTargets"])

    def wait_for_targets_up(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until there is at least one target and every active target is up."""
        deadline = time.monotonic() + timeout
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            time.sleep(0.2)
        summary = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
        raise RuntimeError(f"targets not up after {timeout}s: {summary}")


def start_prometheus(
    tmpdir: Path,
    config: dict[str, Any],
    rule_files: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> PrometheusServer:
    """Start Prometheus; pass port= when the config must name Prometheus' own address."""
    workdir = _workdir(tmpdir, "prometheus")
    server = PrometheusServer("prometheus", workdir, port or free_port())
    config = dict(config)
    config["rule_files"] = [*config.get("rule_files", []), *(str(p) for p in rule_files)]
    server.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    server.start(
        ["prometheus", f"--config.file={server.config_path}",
         f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{server.port}", "--web.enable-lifecycle",
         *extra_args],
        cwd=workdir,
        ready_check=http_ok(f"{server.url}/-/ready"),
    )
    return server


# --- Alertmanager -------------------------------------------------------------------------


class AlertmanagerServer(Server):
    """A single Alertmanager (clustering off)."""

    def alerts(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.get_json("/api/v2/alerts", **params))


def start_alertmanager(tmpdir: Path, config: dict[str, Any] | Path) -> AlertmanagerServer:
    workdir = _workdir(tmpdir, "alertmanager")
    server = AlertmanagerServer("alertmanager", workdir, free_port())
    if isinstance(config, dict):
        config_path = workdir / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        config_path = Path(config)
    server.start(
        ["prometheus-alertmanager", f"--config.file={config_path}",
         f"--storage.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{server.port}", "--cluster.listen-address="],
        cwd=workdir,
        ready_check=http_ok(f"{server.url}/-/ready"),
    )
    return server


# --- VictoriaMetrics and vmalert ----------------------------------------------------------


class VictoriaMetricsServer(_PromQueryMixin):
    """Single-node VictoriaMetrics; fresh samples are queryable at once (no latency offset)."""

    def force_flush(self) -> None:
        """Make just-ingested samples searchable."""
        with requests.get(f"{self.url}/internal/force_flush", timeout=10) as response:
            response.raise_for_status()


def start_victoria_metrics(
    tmpdir: Path, extra_args: Sequence[str] = ()
) -> VictoriaMetricsServer:
    workdir = _workdir(tmpdir, "victoria-metrics")
    server = VictoriaMetricsServer("victoria-metrics", workdir, free_port())
    server.start(
        ["victoria-metrics", f"-storageDataPath={workdir / 'data'}",
         f"-httpListenAddr=127.0.0.1:{server.port}", "-retentionPeriod=100y",
         "-search.latencyOffset=0s", "-search.disableCache", *extra_args],
        cwd=workdir,
        ready_check=http_ok(f"{server.url}/health"),
    )
    return server


class VmalertServer(Server):
    """vmalert evaluating our rule files against a Prometheus-compatible datasource.

    vmalert refuses alerting rules without a notifier: pass notifier_url (an Alertmanager).
    """

    def rules(self) -> list[dict[str, Any]]:
        return list(self.get_json("/api/v1/rules")["data"]["groups"])


def start_vmalert(
    tmpdir: Path,
    rule_files: Sequence[Path],
    datasource_url: str,
    remote_write_url: str | None = None,
    notifier_url: str | None = None,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> VmalertServer:
    """``port``: chosen before, when VictoriaMetrics started first must proxy to it."""
    workdir = _workdir(tmpdir, "vmalert")
    server = VmalertServer("vmalert", workdir, port or free_port())
    argv = ["vmalert", *(f"-rule={p}" for p in rule_files), f"-datasource.url={datasource_url}",
            f"-httpListenAddr=127.0.0.1:{server.port}", "-evaluationInterval=1s"]
    if remote_write_url:
        argv.append(f"-remoteWrite.url={remote_write_url}")
    if notifier_url:
        argv.append(f"-notifier.url={notifier_url}")
    server.start(
        [*argv, *extra_args], cwd=workdir, ready_check=http_ok(f"{server.url}/-/healthy")
    )
    return server


class LocalHTTPServer:
    """A throwaway HTTP server in a thread: fake backends and webhook receivers in tests."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class WebhookReceiver:
    """A webhook receiver: Alertmanager POSTs notification groups here (``url``)."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.http = LocalHTTPServer(Handler)
        self.url = self.http.url + "/alerts"

    def alerts(self) -> list[dict[str, Any]]:
        return [a for n in list(self.notifications) for a in n["alerts"]]

    def close(self) -> None:
        self.http.close()
