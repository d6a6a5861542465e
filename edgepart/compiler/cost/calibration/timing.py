"""How the calibration times things: one torch thread, pinned where the workers run, thread CPU time."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from edgepart.fcpm.ops import Runner, time_callable


@contextmanager
def pinned_one_thread(cpuset: list[int] | None):
    """One torch thread, pinned to ``cpuset`` if given (where the testbed's workers run); restored after."""
    old_threads = torch.get_num_threads()
    old_aff = os.sched_getaffinity(0) if cpuset else None
    try:
        torch.set_num_threads(1)
        if cpuset:
            os.sched_setaffinity(0, set(cpuset))
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_aff is not None:
            os.sched_setaffinity(0, old_aff)


def retime_records(configs: dict, records: list[dict], budget_s: float) -> dict[str, list[float]]:
    """recorded / now for each of an FCPM profile's ``records`` re-timed (thread CPU time), per family.

    ``configs``: the profile's layer configurations by ``cid`` (``measurements["configs"]``); the
    caller pins and sets the thread count (:func:`pinned_one_thread`)."""
    ratios: dict[str, list[float]] = {}
    for r in records:
        m = time_callable(Runner(configs[r["cid"]]["info"], r["rows"], seed=int(r["cid"])),
                          target_s=budget_s / max(1, len(records)) * 0.7, min_repeats=3, clock=time.thread_time)
        ratios.setdefault(r["family"], []).append(r["t"] / max(m["t"], 1e-9))
    return ratios
