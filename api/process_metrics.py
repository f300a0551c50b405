"""The standard ``process_*`` series for the API as one service: its gunicorn master and the
workers alive at the scrape.

prometheus_client's multiprocess mode has no process collector (each worker would report only
itself, and which worker answers a scrape is the kernel's choice), so the API's /metrics reads
/proc for the master named by ``AICRM_API_MASTER_PID`` (set by api/gunicorn.conf.py) and its
children:

- ``process_cpu_seconds_total``: the master's own time, the time of every worker it has reaped
  (the kernel adds it to the master's ``cutime``/``cstime`` when the worker is waited for) and the
  live workers' time: it keeps growing across worker restarts. Read again when a worker was reaped
  during the reading, so a restart is neither lost nor counted twice.
- ``process_resident_memory_bytes`` / ``process_virtual_memory_bytes``: summed over the processes
  (pages a worker still shares with the master after the fork are counted in each).
- ``process_open_fds`` / ``process_max_fds``: of the process nearest its limit: the limit applies
  to each process, so a sum against it would mean nothing.
- ``process_start_time_seconds``: the master's start, the service's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MASTER_PID_ENV = "AICRM_API_MASTER_PID"
_TICKS = float(os.sysconf("SC_CLK_TCK"))
_PAGESIZE = os.sysconf("SC_PAGESIZE")
_ATTEMPTS = 3


class Stat(NamedTuple):
    ppid: int
    own_cpu: float
    children_cpu: float
    start_ticks: int
    vsize: int
    rss_pages: int


def read_stat(proc: str, pid: int) -> Stat | None:
    """The fields of /proc/<pid>/stat used here, or None when the process is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        # The command name (field 2) is in parentheses and may hold spaces or ')'.
        fields = data.rsplit(b")", 1)[1].split()
        return Stat(ppid=int(fields[1]),
                    own_cpu=(int(fields[11]) + int(fields[12])) / _TICKS,
                    children_cpu=(int(fields[13]) + int(fields[14])) / _TICKS,
                    start_ticks=int(fields[19]), vsize=int(fields[20]),
                    rss_pages=int(fields[21]))
    except (IndexError, ValueError):
        return None


def children_of(proc: str, parent: int) -> dict[int, Stat]:
    """The processes whose parent is ``parent`` with their stat, found by reading every stat
    file (the kernel's per-task ``children`` list is not built into every kernel)."""
    found: dict[int, Stat] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return found
    for name in names:
        if name.isdigit():
            st = read_stat(proc, int(name))
            if st is not None and st.ppid == parent:
                found[int(name)] = st
    return found


def fds(proc: str, pid: int) -> tuple[int, int] | None:
    """(open descriptors, soft limit) of a process, or None when they cannot be read."""
    try:
        open_fds = len(os.listdir(f"{proc}/{pid}/fd"))
        with open(f"{proc}/{pid}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max open files"):
                    soft = line.split()[3]
                    limit = -1 if soft == b"unlimited" else int(soft)
                    return open_fds, limit
    except (OSError, ValueError, IndexError):
        return None
    return None


def boot_time(proc: str) -> float | None:
    try:
        with open(f"{proc}/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class ServiceProcessCollector(Collector):
    """process_* for a gunicorn master and its workers (module docstring)."""

    def __init__(self, master: int, proc: str = "/proc") -> None:
        self.master = master
        self.proc = proc
        self.btime = boot_time(proc)  # fixed while the machine runs

    def collect(self) -> Iterable[Metric]:
        btime = self.btime
        if btime is None:
            return []
        master = None
        children: dict[int, Stat] = {}
        for _ in range(_ATTEMPTS):
            before = read_stat(self.proc, self.master)
            if before is None:
                return []
            children = children_of(self.proc, self.master)
            master = read_stat(self.proc, self.master)
            if master is None:
                return []
            if master.children_cpu == before.children_cpu:
                break
        assert master is not None
        pids, workers = list(children), list(children.values())
        everyone = [master, *workers]
        cpu = master.own_cpu + master.children_cpu + sum(w.own_cpu for w in workers)
        out: list[Metric] = [
            CounterMetricFamily(
                "process_cpu_seconds_total",
                "User and system CPU time of the API's gunicorn master, its live workers and the "
                "workers it has reaped, in seconds.", value=cpu),
            GaugeMetricFamily(
                "process_resident_memory_bytes",
                "Resident memory of the API's gunicorn master and live workers, summed, in bytes.",
                value=float(sum(s.rss_pages for s in everyone) * _PAGESIZE)),
            GaugeMetricFamily(
                "process_virtual_memory_bytes",
                "Virtual memory of the API's gunicorn master and live workers, summed, in bytes.",
                value=float(sum(s.vsize for s in everyone))),
            GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the API's gunicorn master since unix epoch in seconds.",
                value=btime + master.start_ticks / _TICKS),
        ]
        nearest: tuple[int, int] | None = None
        for pid in [self.master, *pids]:
            got = fds(self.proc, pid)
            if got is None:
                continue
            if nearest is None or _fill(got) > _fill(nearest):
                nearest = got
        if nearest is not None:
            out.append(GaugeMetricFamily(
                "process_open_fds",
                "Open file descriptors of the API's process (gunicorn master or worker) nearest "
                "its limit.", value=float(nearest[0])))
            if nearest[1] >= 0:
                out.append(GaugeMetricFamily(
                    "process_max_fds",
                    "Open file descriptor limit of that process (process_open_fds).",
                    value=float(nearest[1])))
        return out


def _fill(got: tuple[int, int]) -> float:
    open_fds, limit = got
    return open_fds / limit if limit > 0 else 0.0


def service_collector(proc: str = "/proc") -> ServiceProcessCollector | None:
    """The collector for the master in the environment, or None outside api/gunicorn.conf.py."""
    raw = os.environ.get(MASTER_PID_ENV, "")
    return ServiceProcessCollector(int(raw), proc) if raw.isdigit() else None
