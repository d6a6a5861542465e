"""Controlled background CPU load for profiling: busy processes the profiler starts and stops.

A load level L (0..1) means L × (number of cores) cores kept busy by other work.
It is made by ``ceil(L × cores)`` processes, each spinning for ``duty`` of every
``period`` and sleeping the rest, with ``duty = L × cores / processes``: on
2 cores, 0.25 → one process at 50 %, 0.5 → one at 100 %, 0.75 → two at 75 %.
Only the processes started here are ever stopped, by their handles.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

_SPIN = r"""
import os, sys, time
duty, period = float(sys.argv[1]), float(sys.argv[2])
try:
    os.nice(0)
except Exception:
    pass
busy = duty * period
while True:
    t0 = time.perf_counter()
    x = 0
    while time.perf_counter() - t0 < busy:
        for i in range(200):
            x += i * i
    rest = period - (time.perf_counter() - t0)
    if rest > 0:
        time.sleep(rest)
"""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def plan_load(level: float, cores: int | None = None) -> tuple[int, float]:
    """(processes, duty cycle) that keep ``level`` of ``cores`` busy."""
    cores = cores or cpu_count()
    busy = max(0.0, min(1.0, level)) * cores
    if busy <= 1e-9:
        return 0, 0.0
    procs = math.ceil(busy - 1e-9)
    return procs, busy / procs


class BackgroundLoad:
    """Context manager: ``with BackgroundLoad(0.5): ...`` runs the body under 50 % background load."""

    def __init__(self, level: float, cores: int | None = None, period_s: float = 0.01, settle_s: float = 0.3):
        self.level = float(level)
        self.cores = cores or cpu_count()
        self.period_s = period_s
        self.settle_s = settle_s
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "BackgroundLoad":
        n, duty = plan_load(self.level, self.cores)
        for _ in range(n):
            cmd = [sys.executable, "-c", _SPIN, repr(min(1.0, duty)), repr(self.period_s)]
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
