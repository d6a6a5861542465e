"""Controlled background CPU load for profiling: busy processes the profiler starts and stops.

A load level L (0..1) means L × (number of cores) cores kept busy by other work.
It is made by ``ceil(L × cores)`` processes, each spinning for ``duty`` of every
``period`` and sleeping the rest, with ``duty = L × cores / processes``: on
2 cores, 0.25 → one process at 50 %, 0.5 → one at 100 %, 0.75 → two at 75 %.
Only the processes started here are ever stopped, by their handles; a spinner
whose parent is gone (the profiler or worker was killed) exits by itself.

**Rate-limited devices** (``clock="cpu"``; a CPU quota such as an emulated slow
worker's cgroup, or a container's): the device has ``cores`` < 1 of a core
(its sustained share, :func:`sustained_share`), and load L means *L of that
share* is taken by other work in the same CPU budget — the spinners are children
of the profiling process, so they sit in its cgroup and spend its quota. Wall-clock
duty cycles do not work there (a spinner stalled by the quota would count the stall
as work), so each spinner tracks its own CPU time and spins until it has used
``duty × elapsed`` (at most ``DEBT_S`` behind). It is split into
``ceil(L / (1 - L))`` processes so that each asks for no more than its fair share
next to the profiled thread; the scheduler then gives the profiled thread the
remaining ``(1 - L) × share``. The profiler measures the share it really got.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

_SPIN = r"""
import os, sys, time
duty, period, clock = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 5 and sys.argv[5]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[5].split(",")})
parent = os.getppid()
busy = duty * period
if clock == "wall":
    while os.getppid() == parent:
        t0 = time.perf_counter()
        x = 0
        while time.perf_counter() - t0 < busy:
            for i in range(200):
                x += i * i
        rest = period - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
else:   # CPU-time budget: use duty x elapsed wall time of CPU, never more than DEBT behind
    debt = float(sys.argv[4])
    w0, c0 = time.perf_counter(), time.process_time()
    n = 0
    while True:
        n += 1
        if n % 64 == 0 and os.getppid() != parent:
            break
        behind = duty * (time.perf_counter() - w0) - (time.process_time() - c0)
        if behind > debt:
            c0 -= behind - debt
            behind = debt
        if behind > 0:
            x = 0
            for i in range(2000):
                x += i * i
        else:
            time.sleep(min(period, -behind / duty))
"""
DEBT_S = 0.1   # a CPU-clock spinner stalled longer than this (e.g. by a quota period) does not catch up beyond it


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def plan_load(level: float, cores: float | None = None, clock: str = "wall") -> tuple[int, float]:
    """(processes, duty cycle of one core each) that keep ``level`` of ``cores`` busy.

    ``clock="cpu"`` (a rate-limited device, ``cores`` its share of one core): enough processes
    that none asks for more than its fair share next to the profiled thread.
    """
    cores = cores or cpu_count()
    level = max(0.0, min(1.0, level))
    busy = level * cores
    if busy <= 1e-9:
        return 0, 0.0
    if clock == "cpu":
        procs = max(1, math.ceil(level / max(1e-9, 1.0 - level) - 1e-9))
        return procs, busy / procs
    procs = math.ceil(busy - 1e-9)
    return procs, busy / procs


def cpu_quota_cores(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """This process's CFS CPU quota in cores (the tightest of its cgroup and the cgroup's ancestors),
    or None if there is none or it cannot be read (no cgroup fs mounted here, e.g. under ``ip netns exec``)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1].split(","), parts[2].strip().lstrip("/")
        if parts[0] == "0" and parts[1] == "":           # cgroup v2: cpu.max holds "quota period" or "max period"
            dirs, read = [Path(root) / path], _v2_quota
        elif "cpu" in controllers:                       # cgroup v1: cpu.cfs_quota_us (-1: none) / cfs_period_us
            mounts = [Path(root) / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            dirs, read = [m / path for m in mounts if m.is_dir()], _v1_quota
        else:
            continue
        for d in dirs:
            while True:
                q = read(d)
                if q is not None:
                    best = q if best is None else min(best, q)
                if d == d.parent or d.name in ("", "cgroup") or str(d) == root or not str(d).startswith(root):
                    break
                d = d.parent
    return best


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def sustained_share(window_s: float = 0.4) -> float:
    """The share of one core this thread gets when it is always runnable: CPU time / wall time of a busy loop.

    About 1 on an idle machine; a CPU quota of q cores (q < 1) gives about q — a rate limit the
    median of short timings cannot see (the group runs at full speed until the quota is spent).
    """
    w0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - w0 < window_s:
        for i in range(500):
            x += i * i
    return (time.thread_time() - c0) / max(1e-9, time.perf_counter() - w0)


class BackgroundLoad:
    """Context manager: ``with BackgroundLoad(0.5): ...`` runs the body under 50 % background load."""

    def __init__(self, level: float, cores: float | None = None, period_s: float = 0.01, settle_s: float = 0.3,
                 clock: str = "wall", avoid_cpu: int | None = None):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
        self.level = float(level)
        self.cores = cores or cpu_count()
        self.period_s = period_s
        self.settle_s = settle_s
        self.clock = clock
        self.avoid_cpu = avoid_cpu
        self.procs: list[subprocess.Popen] = []

    def placement(self, n: int) -> list[str]:
        """Where each of ``n`` spinners runs ("" = anywhere). With ``avoid_cpu`` (a pinned timing thread's
        core, wall clock only) the spinners are pinned to the other cores first, one each, and only
        spinners beyond those share the timing core: the load a level means lands the same way in
        every run, not wherever the scheduler put it that time."""
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            cpus = []
        if self.avoid_cpu is None or self.clock != "wall" or not cpus:
            return [""] * n
        others = [c for c in cpus if c != self.avoid_cpu] or [self.avoid_cpu]
        order = others + ([self.avoid_cpu] if self.avoid_cpu in cpus else [])
        return [str(order[i % len(order)]) for i in range(n)]

    def start(self) -> "BackgroundLoad":
        n, duty = plan_load(self.level, self.cores, self.clock)
        for where in self.placement(n):
            cmd = [sys.executable, "-c", _SPIN, repr(min(1.0, duty)), repr(self.period_s), self.clock, repr(DEBT_S),
                   where]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        if self.procs:
            time.sleep(self.settle_s)
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def __enter__(self) -> "BackgroundLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
