"""Emulation of a slower CPU by dilating compute stages (the Emulator's ``cpu="dilate"``)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("edgepart.emulate")


class CpuDilation:
    """Emulation of a slower device: a compute stage lasts its CPU time ÷ share (wall clock).

    The share (0 < share ≤ 1, the fraction of this CPU the emulated device is) is read from a
    file the emulator writes and may rewrite (re-read when its mtime changes), so the testbed can
    follow a drifting host speed between requests. The stage runs at full speed, then the compute
    thread sleeps until CPU time ÷ share has passed since it started: time lost waiting for the CPU
    counts towards that, and pieces that arrive meanwhile are received at once — unlike a CFS
    quota, which enforces the share only in bursts of the scheduler tick (4 ms of CPU here), i.e.
    several milliseconds of device time per burst for a slow device.
    """

    def __init__(self, path: str):
        self.path = path
        self.mtime: int | None = None
        self.share = 1.0

    def current(self) -> float:
        try:
            m = os.stat(self.path).st_mtime_ns
            if m != self.mtime:
                v = float(Path(self.path).read_text().strip())
                if not 0 < v <= 1:
                    raise ValueError(f"share {v} not in (0, 1]")
                self.mtime, self.share = m, v
        except (OSError, ValueError) as e:
            log.warning("cpu share file %s: %s; keeping share %.3g", self.path, e, self.share)
        return self.share

    def stretch(self, t0: float, c0: float) -> float:
        """Sleep until the stage begun at wall t0 / thread CPU c0 has lasted CPU ÷ share; its duration."""
        target = (time.thread_time() - c0) / self.current()
        left = target - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return time.perf_counter() - t0
