"""api/process_metrics.py against a /proc tree written by the test: the sums, the fullest
process's descriptors, and a worker reaped in the middle of a reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api import process_metrics as pm

TICKS = pm._TICKS
MASTER = 100


def write_process(proc: Path, pid: int, ppid: int, *, utime: int, cutime: int = 0,
                  rss_pages: int = 10, vsize: int = 1000, start: int = 500, fds: int = 3,
                  limit: str = "1024", name: str = "gunicorn") -> None:
    d = proc / str(pid)
    (d / "fd").mkdir(parents=True, exist_ok=True)
    for i in range(fds):
        (d / "fd" / str(i)).touch()
    # Fields after the command name: state, ppid, ..., utime (11), stime (12), cutime (13),
    # cstime (14), ..., starttime (19), vsize (20), rss (21).
    rest = ["S", str(ppid)] + ["0"] * 9 + [str(utime), "0", str(cutime), "0"] + ["0"] * 4 + [
        str(start), str(vsize), str(rss_pages)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} ({name}) " + " ".join(rest) + "\n")
    (d / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        f"Max open files            {limit}                 4096                 files\n")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    write_process(tmp_path, MASTER, 1, utime=50, cutime=30, rss_pages=10, vsize=1000)
    write_process(tmp_path, 101, MASTER, utime=200, rss_pages=40, vsize=3000, fds=20)
    write_process(tmp_path, 102, MASTER, utime=100, rss_pages=30, vsize=2000, fds=8,
                  limit="16")
    write_process(tmp_path, 200, 1, utime=9999, rss_pages=999, name="someone else")
    return tmp_path


def values(collector: pm.ServiceProcessCollector) -> dict[str, float]:
    return {m.samples[0].name: m.samples[0].value for m in collector.collect()}


def test_sums_over_the_master_and_its_workers_only(proc: Path) -> None:
    got = values(pm.ServiceProcessCollector(MASTER, str(proc)))
    assert got["process_cpu_seconds_total"] == pytest.approx((50 + 30 + 200 + 100) / TICKS)
    assert got["process_resident_memory_bytes"] == (10 + 40 + 30) * pm._PAGESIZE
    assert got["process_virtual_memory_bytes"] == 1000 + 3000 + 2000
    assert got["process_start_time_seconds"] == pytest.approx(1700000000 + 500 / TICKS)
    # 8 of 16 is fuller than 20 of 1024: that process's pair, not a sum against one limit.
    assert (got["process_open_fds"], got["process_max_fds"]) == (8, 16)


def test_an_unlimited_process_and_an_odd_command_name(proc: Path) -> None:
    write_process(proc, 102, MASTER, utime=100, fds=8, limit="unlimited", name="a ) b")
    got = values(pm.ServiceProcessCollector(MASTER, str(proc)))
    assert got["process_cpu_seconds_total"] == pytest.approx(380 / TICKS)
    assert (got["process_open_fds"], got["process_max_fds"]) == (20, 1024)


def test_a_worker_reaped_during_the_reading_is_counted_once(
        proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 101 is read alive, then reaped (its time moves to the master's cutime) before
    the master is read: summing that reading would count it twice."""
    real = pm.read_stat
    reads = 0
    reaped = False

    def read_then_reap(root: str, pid: int) -> Any:
        nonlocal reads, reaped
        got = real(root, pid)
        reads += pid == 101
        if reads == 1 and not reaped:  # found among the master's children, then reaped
            reaped = True
            for f in (proc / "101").rglob("*"):
                if f.is_file():
                    f.unlink()
            for d in sorted((proc / "101").rglob("*"), reverse=True):
                d.rmdir()
            (proc / "101").rmdir()
            write_process(proc, MASTER, 1, utime=50, cutime=230)
        return got

    monkeypatch.setattr(pm, "read_stat", read_then_reap)
    got = values(pm.ServiceProcessCollector(MASTER, str(proc)))
    assert reaped
    assert got["process_cpu_seconds_total"] == pytest.approx((50 + 230 + 100) / TICKS)


def test_no_series_without_a_master(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert values(pm.ServiceProcessCollector(999, str(proc))) == {}
    monkeypatch.delenv(pm.MASTER_PID_ENV, raising=False)
    assert pm.service_collector(str(proc)) is None
    monkeypatch.setenv(pm.MASTER_PID_ENV, str(MASTER))
    collector = pm.service_collector(str(proc))
    assert collector is not None and collector.master == MASTER
