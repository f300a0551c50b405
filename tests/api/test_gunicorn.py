"""The API as deployed: gunicorn with 4 workers sharing one Redis for limits and the cache, and
one /metrics for all of them (prometheus_client multiprocess mode)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import servers
from tests.api.conftest import API_KEY, ROOT, KnownPrometheus
from tests.helpers import config_dict, eventually

LIMIT = 20
SENT = 50


@pytest.mark.integration
def test_four_workers_share_limits_cache_and_metrics(
    known_prometheus: KnownPrometheus, redis_server: servers.RedisServer, tmp_path: Path
) -> None:
    cfg = config_dict(api={"prometheus_url": known_prometheus.url, "redis_url": redis_server.url,
                           "rate_limit": f"{LIMIT}/minute", "cache_ttl_seconds": 60,
                           "api_keys_env": "TEST_API_KEYS"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    metrics_dir = tmp_path / "metrics"
    port = servers.free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AICRM_CONFIG": str(tmp_path / "config.json"),
        "TEST_API_KEYS": API_KEY,
        "AICRM_API_BIND": f"127.0.0.1:{port}",
        "AICRM_API_ACCESS_LOG": str(tmp_path / "access.log"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # on_starting wipes this
    url = f"http://127.0.0.1:{port}"
    gunicorn = servers.ProcessHandle("gunicorn", tmp_path)
    gunicorn.start(
        [sys.executable, "-m", "gunicorn", "-c", ROOT / "api" / "gunicorn.conf.py",
         "api:create_app()"],
        cwd=ROOT, env=env, ready_check=servers.http_ok(url + "/healthz"), timeout=60,
    )
    try:
        # The cache: one miss, then hits from whichever worker answers.
        with requests.Session() as s:
            caches = [s.get(url + "/agent-performance?window=2h",
                            headers={"X-API-Key": API_KEY}, timeout=10).headers["X-Cache"]
                      for _ in range(10)]
        assert Counter(caches) == {"MISS": 1, "HIT": 9}

        # The limit: 50 requests from 5 clients, each on a new connection so that every worker
        # takes some; exactly 20 are allowed across the 4 workers.
        codes: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            with requests.Session() as s:
                for _ in range(SENT // 5):
                    with s.get(url + "/task-completion", timeout=10,
                               headers={"Connection": "close"}) as r:
                        with lock:
                            codes.append(r.status_code)
                        if r.status_code == 429:
                            assert r.json()["error"]["code"] == "rate_limited"
                            assert int(r.headers["Retry-After"]) > 0

        threads = [threading.Thread(target=client) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert Counter(codes) == {200: LIMIT, 429: SENT - LIMIT}

        # /metrics sums every worker's files. The kernel may hand every connection so far to
        # one worker; new connections spread them, so keep asking until a second one answers.
        def worker_pids() -> set[str]:
            return {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("*.db")}

        for _ in range(400):
            if len(worker_pids()) >= 2:
                break
            with requests.get(url + "/openapi.json", timeout=10,
                              headers={"Connection": "close"}) as r:
                assert r.status_code == 200
        pids = worker_pids()
        assert len(pids) >= 2 and "999999" not in pids
        with requests.get(url + "/metrics", timeout=10) as r:
            text = r.text
        counts = {}
        for line in text.splitlines():
            if line.startswith("aicrm_api_requests_total{") and '"/task-completion"' in line:
                code = line.split('code="', 1)[1].split('"', 1)[0]
                counts[code] = float(line.rsplit(" ", 1)[1])
        assert counts == {"200": LIMIT, "429": SENT - LIMIT}
    finally:
        gunicorn.stop()
    access = (tmp_path / "access.log").read_text().splitlines()
    entries = [json.loads(line) for line in access]
    assert len(entries) >= SENT + 10
    assert {e["path"] for e in entries} >= {"/task-completion", "/agent-performance"}
    assert all(e["request_id"] for e in entries if e["path"] != "/healthz")
    assert API_KEY not in (tmp_path / "access.log").read_text()
    assert API_KEY not in gunicorn.log_path.read_text()


def _ss(port: int, *state: str) -> list[int]:
    """PIDs owning TCP sockets on local ``port`` (``ss``), e.g. ("listening",)."""
    out = subprocess.run(["ss", "-tnpH", "state", *state, f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [int(p) for p in re.findall(r"pid=([0-9]+)", out)]


def _start_api(tmp_path: Path, name: str, extra_args: list[str],
               api: dict[str, Any] | None = None,
               metrics_dir: Path | None = None,
               extra_env: dict[str, str] | None = None) -> tuple[servers.ProcessHandle, str]:
    """gunicorn from the venv's console script (what the Dockerfile runs), 2 workers, with
    these ``api`` settings; the metrics in ``metrics_dir``, else in ``tmp_path/metrics-name``,
    or, with ``TMPDIR``, in the default directory under it."""
    (tmp_path / "config.json").write_text(json.dumps(config_dict(api=api or {})))
    port = servers.free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AICRM_CONFIG": str(tmp_path / "config.json"), "AICRM_API_BIND": f"127.0.0.1:{port}",
           "AICRM_API_WORKERS": "2", "AICRM_API_ACCESS_LOG": "off", **(extra_env or {})}
    if metrics_dir is not None and metrics_dir.name == "TMPDIR":
        env["TMPDIR"] = str(metrics_dir)
    else:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir or tmp_path / f"metrics-{name}")
    handle = servers.ProcessHandle(name, tmp_path)
    handle.start([Path(sys.executable).parent / "gunicorn", "-c", ROOT / "api" / "gunicorn.conf.py",
                  *extra_args, "api:create_app()"], cwd=ROOT, env=env,
                 ready_check=(servers.http_ok(f"http://127.0.0.1:{port}/healthz")
                              if not extra_args else None), timeout=60)
    return handle, f"http://127.0.0.1:{port}"


@pytest.mark.integration
def test_each_worker_listens_and_a_stopping_worker_drops_no_connection(tmp_path: Path) -> None:
    """reuse_port: every worker owns a listening socket and the arbiter none; a worker told to
    stop while a request is in flight closes its socket at once, so connections made during its
    drain all reach the other worker (with gthread's late close, those the kernel still sent to
    the stopping worker hung, then were reset)."""
    from tests.api.test_promql import SlowBackend

    backend = SlowBackend(4)
    gunicorn, url = _start_api(tmp_path, "gunicorn", [], {
        "prometheus_url": backend.url, "redis_url": None, "cache_ttl_seconds": 0,
        "query_timeout_seconds": 10, "rate_limit": "100000/minute"})
    port = int(url.rsplit(":", 1)[1])
    try:
        deadline = time.monotonic() + 20
        while len(_ss(port, "listening")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        listeners = _ss(port, "listening")
        assert len(listeners) == 2 and gunicorn.pid not in listeners, listeners

        slow: dict[str, int] = {}
        t = threading.Thread(target=lambda: slow.update(status=requests.get(
            url + "/agent-performance", timeout=15).status_code))
        t.start()
        busy: list[int] = []
        while not busy and time.monotonic() < deadline:
            busy = [p for p in _ss(port, "established") if p != os.getpid()]
            time.sleep(0.05)
        assert len(busy) == 1, busy
        os.kill(busy[0], signal.SIGTERM)
        time.sleep(0.5)  # the worker is draining its slow request now
        assert t.is_alive()
        codes = []
        for _ in range(40):
            try:
                codes.append(requests.get(url + "/healthz", timeout=1.5).status_code)
            except requests.RequestException as exc:
                codes.append(type(exc).__name__)  # type: ignore[arg-type]
        assert codes == [200] * 40, Counter(codes)
        assert t.is_alive(), "the drain ended before the connections were made"
        t.join(15)
        assert slow == {"status": 200}  # the in-flight request was finished, not cut off
    finally:
        gunicorn.stop()
        backend.close()


@pytest.mark.integration
def test_a_port_taken_by_another_program_stops_start_up(tmp_path: Path) -> None:
    """No worker binds in the arbiter's place: the arbiter checks the address itself, so a port
    held without SO_REUSEPORT ends start-up with gunicorn's error instead of a boot loop."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    (tmp_path / "config.json").write_text(json.dumps(config_dict()))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AICRM_CONFIG": str(tmp_path / "config.json"), "AICRM_API_BIND": f"127.0.0.1:{port}",
           "AICRM_API_ACCESS_LOG": "off", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "m")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "api" / "gunicorn.conf.py"),
             "api:create_app()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert done.returncode != 0
    assert f"Connection in use: ('127.0.0.1', {port})" in done.stderr
    assert "Booting worker" not in done.stderr


@pytest.mark.integration
def test_usr2_upgrade_hands_over_to_a_new_master(tmp_path: Path) -> None:
    """The binary upgrade (USR2, then QUIT to the old master) with a socket per worker: the
    new master's workers listen beside the old ones, then alone."""
    gunicorn, url = _start_api(tmp_path, "usr2", [])
    port = int(url.rsplit(":", 1)[1])
    try:
        assert eventually(lambda: len(_ss(port, "listening")) == 2, 20)
        old = set(_ss(port, "listening"))
        os.kill(gunicorn.pid, signal.SIGUSR2)
        assert eventually(lambda: len(_ss(port, "listening")) == 4, 20), gunicorn.log_tail()
        os.kill(gunicorn.pid, signal.SIGQUIT)
        assert eventually(lambda: len(set(_ss(port, "listening")) - old) == 2
                          and not set(_ss(port, "listening")) & old, 20), gunicorn.log_tail()
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
        assert "Traceback" not in gunicorn.log_tail()
    finally:
        gunicorn.stop()


@pytest.mark.integration
def test_a_unix_socket_given_on_the_command_line_is_shared(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "api.sock"
    gunicorn, _ = _start_api(tmp_path, "unix", ["--bind", f"unix:{path}"])
    try:
        assert eventually(path.exists, 20)

        def answered() -> bool:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(str(path))
                    s.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
                    return s.recv(64).split(b"\r\n", 1)[0].endswith(b" 200 OK")
            except OSError:
                return False

        assert eventually(answered, 20)
        log = gunicorn.log_tail()
        assert f"Listening at: unix:{path}" in log and "SO_REUSEPORT" not in log, log
        assert "Control socket" not in log  # no gunicornc socket unless configured
    finally:
        gunicorn.stop()


def _healthz_count(url: str) -> float:
    """/healthz requests in the /metrics of whichever worker answers (all workers' files)."""
    with requests.get(url + "/metrics", timeout=10) as r:
        for line in r.text.splitlines():
            if line.startswith("aicrm_api_requests_total{") and '"/healthz"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _ask(url: str, n: int) -> None:
    for _ in range(n):
        with requests.get(url + "/healthz", timeout=10, headers={"Connection": "close"}) as r:
            assert r.status_code == 200


@pytest.mark.integration
def test_each_master_has_a_metrics_directory_of_its_own(tmp_path: Path) -> None:
    """By default the metrics live in a directory of the master's own (named with its pid),
    removed when it exits: a second instance of the same user no longer wipes the first's live
    files when it starts."""
    tmpdir = tmp_path / "TMPDIR"
    for d in (tmpdir, tmp_path / "a", tmp_path / "b"):
        d.mkdir()
    first, first_url = _start_api(tmp_path / "a", "first", [], metrics_dir=tmpdir)
    second = None
    try:
        own = tmpdir / f"aicrm-api-metrics-{os.getuid()}-{first.pid}"
        _ask(first_url, 10)
        assert eventually(lambda: any(own.glob("*.db")), 10), list(tmpdir.iterdir())
        assert own.stat().st_mode & 0o777 == 0o700
        files = sorted(p.name for p in own.glob("*.db"))
        asked = _healthz_count(first_url)
        assert asked >= 10  # and the start-up's ready checks
        second, _ = _start_api(tmp_path / "b", "second", [], metrics_dir=tmpdir)
        assert (tmpdir / f"aicrm-api-metrics-{os.getuid()}-{second.pid}").is_dir()
        # None of the first's files is gone (a worker that had not yet written any when
        # they were listed may have added its own since: the listing is no snapshot of all).
        assert set(files) <= {p.name for p in own.glob("*.db")}
        assert _healthz_count(first_url) == asked
        # Time enough for a graceful halt on a loaded machine (the test's group signal also
        # reaches the workers, and the master may have begun replacing one before its own
        # TERM): a master killed by the fallback SIGKILL never runs on_exit.
        second.stop(timeout=40)
        assert eventually(
            lambda: not (tmpdir / f"aicrm-api-metrics-{os.getuid()}-{second.pid}").exists(),
            10), second.log_tail()
        assert own.is_dir()
        first.stop(timeout=40)
        assert eventually(lambda: not own.exists(), 10), first.log_tail()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.integration
@pytest.mark.parametrize("given", [True, False])
def test_usr2_upgrade_keeps_the_old_workers_metrics(tmp_path: Path, given: bool) -> None:
    """The new master of a USR2 upgrade does not wipe the metrics of the old master's live
    workers: in a PROMETHEUS_MULTIPROC_DIR both share, the old workers' counts stay summed;
    by default the new master has a directory of its own and the old one is removed when the
    old master exits."""
    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    shared = tmp_path / "shared-metrics"
    gunicorn, url = _start_api(tmp_path, "usr2", [], metrics_dir=shared if given else tmpdir)
    port = int(url.rsplit(":", 1)[1])
    old_dir = shared if given else tmpdir / f"aicrm-api-metrics-{os.getuid()}-{gunicorn.pid}"
    try:
        assert eventually(lambda: len(_ss(port, "listening")) == 2, 20)
        _ask(url, 10)
        assert eventually(lambda: any(old_dir.glob("*.db")), 10)
        files = {p.name for p in old_dir.glob("*.db")}
        os.kill(gunicorn.pid, signal.SIGUSR2)
        assert eventually(lambda: len(_ss(port, "listening")) == 4, 20), gunicorn.log_tail()
        assert files <= {p.name for p in old_dir.glob("*.db")}, "the old workers' files went"
        dirs = sorted(tmpdir.iterdir())
        assert len(dirs) == (0 if given else 2), dirs
        os.kill(gunicorn.pid, signal.SIGQUIT)
        assert eventually(lambda: len(_ss(port, "listening")) == 2
                          and gunicorn.process is not None
                          and gunicorn.process.poll() is not None, 30), gunicorn.log_tail()
        if given:
            # The old workers' counters stay in the sum the new workers serve.
            assert _healthz_count(url) >= 10
        else:
            assert not old_dir.exists()
            (new_dir,) = tmpdir.iterdir()
            # The new master, no longer the test's child: stopped by its pid, its directory
            # goes with it.
            os.kill(int(new_dir.name.rsplit("-", 1)[1]), signal.SIGTERM)
            assert eventually(lambda: not new_dir.exists(), 20), gunicorn.log_tail()
        assert "Traceback" not in gunicorn.log_tail()
    finally:
        gunicorn.stop()


def _scrape_process_series(url: str) -> dict[str, float]:
    with requests.get(url + "/metrics", timeout=10) as r:
        assert r.status_code == 200
        text = r.text
    return {line.split(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("process_")}


def _children(pid: int) -> list[int]:
    from api.process_metrics import children_of

    return list(children_of("/proc", pid))


@pytest.mark.integration
def test_metrics_carry_the_services_process_series_across_a_worker_restart(
        tmp_path: Path) -> None:
    """The API's /metrics serves process_* for its master and workers: start time the
    master's, memory summed over the processes, descriptors of the fullest process, and CPU
    that keeps the time of a worker killed and replaced (reaped into the master's)."""
    from api.process_metrics import fds, read_stat

    gunicorn, url = _start_api(tmp_path, "gunicorn", [], {
        "redis_url": None, "cache_ttl_seconds": 0, "rate_limit": "100000/minute"})
    try:
        master = gunicorn.pid
        assert eventually(lambda: len(_children(master)) == 2, seconds=30)
        with requests.Session() as s:
            for _ in range(100):
                assert s.get(url + "/openapi.json", timeout=10).status_code == 200
            # Until one worker has used enough CPU for its loss to show below (a kept-alive
            # connection stays with the worker that accepted it).
            for _ in range(2000):
                if max(getattr(read_stat("/proc", p), "own_cpu", 0.0)
                       for p in _children(master)) > 0.15:
                    break
                s.get(url + "/openapi.json", timeout=10)
        first = _scrape_process_series(url)
        master_stat = read_stat("/proc", master)
        assert master_stat is not None
        with open("/proc/stat") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        ticks = os.sysconf("SC_CLK_TCK")
        assert first["process_start_time_seconds"] == pytest.approx(
            btime + master_stat.start_ticks / ticks, abs=0.02)
        workers = _children(master)
        stats = [read_stat("/proc", p) for p in [master, *workers]]
        rss = sum(s.rss_pages for s in stats if s) * os.sysconf("SC_PAGESIZE")
        assert 0.8 * rss <= first["process_resident_memory_bytes"] <= 1.25 * rss
        # More than any one process: the workers are in it.
        assert first["process_resident_memory_bytes"] > 1.5 * max(
            s.rss_pages for s in stats if s) * os.sysconf("SC_PAGESIZE")
        limits = [got for got in (fds("/proc", p) for p in [master, *workers]) if got]
        assert first["process_max_fds"] in {float(limit) for _, limit in limits}
        assert first["process_open_fds"] >= max(n for n, _ in limits) - 2
        live = sum(s.own_cpu for s in stats[1:] if s)
        assert first["process_cpu_seconds_total"] >= master_stat.own_cpu + live - 0.02

        # A worker killed: the master reaps it and starts another. Its CPU (boot and the
        # requests above) stays in the total instead of leaving it.
        victim = max(workers, key=lambda p: (read_stat("/proc", p) or master_stat).own_cpu)
        victim_cpu = read_stat("/proc", victim).own_cpu  # type: ignore[union-attr]
        assert victim_cpu > 0.1
        os.kill(victim, signal.SIGKILL)
        assert eventually(lambda: victim not in _children(master)
                          and len(_children(master)) == 2, seconds=30)
        second = _scrape_process_series(url)
        # The victim's time stays in (now in the master's cutime) and the new worker's start
        # adds to it: without the reaped workers' time the total would fall by victim_cpu
        # (over 0.1 s, above) and this would not hold.
        replacement = sum(
            s.own_cpu for s in (read_stat("/proc", p) for p in _children(master)
                                if p not in workers) if s)
        assert second["process_cpu_seconds_total"] >= (
            first["process_cpu_seconds_total"] + replacement - 0.05)
        assert second["process_start_time_seconds"] == first["process_start_time_seconds"]
    finally:
        gunicorn.stop()


def _main_thread_switches(pids: list[int]) -> int:
    """Voluntary context switches of the workers' main threads (gthread's poller)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/task/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f
                          if line.startswith("voluntary_ctxt_switches:"))
    return total


@pytest.mark.integration
@pytest.mark.parametrize("linger_ms", ["0", "50"])
def test_a_kept_alive_connection_is_served_by_the_thread_that_answered(
        tmp_path: Path, linger_ms: str) -> None:
    """With a linger, a connection's next request is served by the pool thread that answered
    the last one: the main thread (gthread's poller) is not woken per request. Without, every
    request goes main thread -> pool thread -> main thread, as in gthread."""
    gunicorn, url = _start_api(tmp_path, "gunicorn", [], {
        "redis_url": None, "cache_ttl_seconds": 0, "rate_limit": "100000/minute"},
        extra_env={"AICRM_API_KEEPALIVE_LINGER_MS": linger_ms})
    try:
        master = gunicorn.pid
        assert eventually(lambda: len(_children(master)) == 2, seconds=30)
        workers = _children(master)
        n = 300
        with requests.Session() as s:
            assert s.get(url + "/healthz", timeout=10).status_code == 200
            before = _main_thread_switches(workers)
            started = time.monotonic()
            for _ in range(n):
                assert s.get(url + "/healthz", timeout=10).status_code == 200
            took = time.monotonic() - started
            after = _main_thread_switches(workers)
        # The main threads also wake once a second each to tell the master they are alive.
        heartbeats = 2 * (took + 2)
        if linger_ms == "0":
            assert after - before >= n
        else:
            assert after - before <= heartbeats + n * 0.05, (after - before, took)
    finally:
        gunicorn.stop()


@pytest.mark.integration
def test_a_lingering_thread_keeps_another_connection_waiting_at_most_the_linger(
        tmp_path: Path) -> None:
    """One worker with one thread lingering on an idle kept-alive connection: a request on a
    second connection is served once the linger (300 ms here) is over, and the first
    connection is served again afterwards (from the poller)."""
    gunicorn, url = _start_api(tmp_path, "gunicorn", [], {
        "redis_url": None, "cache_ttl_seconds": 0, "rate_limit": "100000/minute"},
        extra_env={"AICRM_API_KEEPALIVE_LINGER_MS": "300", "AICRM_API_WORKERS": "1",
                   "AICRM_API_THREADS": "1"})
    try:
        with requests.Session() as first, requests.Session() as second:
            assert first.get(url + "/healthz", timeout=10).status_code == 200
            started = time.monotonic()
            assert second.get(url + "/healthz", timeout=10).status_code == 200
            waited = time.monotonic() - started
            assert waited < 0.3 + 1.0, waited
            assert first.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        gunicorn.stop()


def test_a_bad_linger_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    from api.gunicorn_worker import linger_ms

    assert linger_ms({}) == 2.0
    assert linger_ms({"AICRM_API_KEEPALIVE_LINGER_MS": " 0.5 "}) == 0.5
    for bad in ("2ms", "-1", "5000", "nan"):
        with pytest.raises(ValueError, match="AICRM_API_KEEPALIVE_LINGER_MS"):
            linger_ms({"AICRM_API_KEEPALIVE_LINGER_MS": bad})
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AICRM_API_KEEPALIVE_LINGER_MS": "soon", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([Path(sys.executable).parent / "gunicorn", "-c",
                           ROOT / "api" / "gunicorn.conf.py", "--check-config",
                           "api:create_app()"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "AICRM_API_KEEPALIVE_LINGER_MS='soon'" in done.stderr


@pytest.mark.integration
def test_a_pipelining_connection_does_not_keep_the_thread_from_another(tmp_path: Path) -> None:
    """One worker with one thread: a connection with 150 requests pipelined (in one read, so
    read ahead) goes to the back of the queue when another connection waits, as in gthread,
    so the other's request is answered before the pipelined ones are all done."""
    import socket

    gunicorn, url = _start_api(tmp_path, "gunicorn", [], {
        "redis_url": None, "cache_ttl_seconds": 0, "rate_limit": "100000/minute"},
        extra_env={"AICRM_API_KEEPALIVE_LINGER_MS": "500", "AICRM_API_WORKERS": "1",
                   "AICRM_API_THREADS": "1"})
    port = int(url.rsplit(":", 1)[1])
    n = 150  # 44 bytes each: all in gunicorn's first 8 kB read
    done: dict[str, float] = {}

    def pipelined() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: api\r\n\r\n" * n)
            seen = b""
            while seen.count(b"HTTP/1.1 200") < n:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                seen += chunk
            done["pipelined"] = time.monotonic()
            done["answers"] = seen.count(b"HTTP/1.1 200")

    try:
        reader = threading.Thread(target=pipelined)
        started = time.monotonic()
        reader.start()
        time.sleep(0.01)  # the pipelined requests are being served
        assert requests.get(url + "/healthz", timeout=30).status_code == 200
        other = time.monotonic()
        reader.join(60)
        assert done["answers"] == n
        # Served while the pipelined ones still were: not after (nearly) all of them.
        assert other - started < 0.5 * (done["pipelined"] - started), (
            other - started, done["pipelined"] - started)
    finally:
        gunicorn.stop()
