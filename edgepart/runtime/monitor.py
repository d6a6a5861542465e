"""What a worker reports about its CPU while serving: how much of it other work takes.

:class:`LoadMeter` compares the busy time of the CPUs this process may run on (``/proc/stat``,
per CPU, restricted to ``sched_getaffinity``) with this process's own CPU time over the same
interval: what is busy but not us is *other work*, and its share of the CPUs' capacity is the
load the online controller feeds the cost model (``CostModel(loads=...)``: a device whose budget
is 50 % taken by other work runs its stages about twice as long). It is sampled when asked (a
``stats`` frame), at most every ``min_interval`` seconds, and smoothed (EWMA).

Where ``/proc/stat`` cannot be read (not Linux), the load is 0 and :attr:`LoadMeter.available` is
False; the controller then relies on stage times alone. Under the emulated testbed every
device's worker shares the same core, so other devices' compute shows up as load here: the
controller weighs this reading only for devices it has no recent stage times of (see
``edgepart.online.state``).
"""
from __future__ import annotations

import os
import threading
import time


def _cpu_busy(cpus: set[int]) -> tuple[float, float] | None:
    """(busy seconds, total seconds) of ``cpus`` since boot from /proc/stat, None if unreadable."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = total = 0
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        try:
            n = int(name[3:])
        except ValueError:
            continue
        if n not in cpus:
            continue
        v = [int(x) for x in vals[:8]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)            # idle + iowait
        total += sum(v)
        busy += sum(v) - idle
    return busy / tick, total / tick


class LoadMeter:
    """Share (0..1) of this process's CPUs that other work keeps busy, smoothed over recent samples."""

    def __init__(self, min_interval: float = 0.25, alpha: float = 0.5):
        self.min_interval = min_interval
        self.alpha = alpha
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = set(range(os.cpu_count() or 1))
        self.lock = threading.Lock()
        self._last = self._sample()
        self.available = self._last is not None
        self.value = 0.0

    def _sample(self):
        b = _cpu_busy(self.cpus)
        if b is None:
            return None
        t = os.times()
        return b[0], b[1], t.user + t.system, time.monotonic()

    def load(self) -> float:
        """The smoothed load now (samples again if the last sample is older than ``min_interval``)."""
        with self.lock:
            if not self.available:
                return 0.0
            now = self._sample()
            last = self._last
            if now is None or now[3] - last[3] < self.min_interval:
                return self.value
            d_busy, d_total, d_own = now[0] - last[0], now[1] - last[1], now[2] - last[2]
            self._last = now
            if d_total <= 0:
                return self.value
            other = min(1.0, max(0.0, (d_busy - d_own) / d_total))
            self.value = self.alpha * other + (1 - self.alpha) * self.value
            return self.value
