"""How the calibration times things: one torch thread pinned to one core where the workers run, thread CPU time."""
from __future__ import annotations

import time
from contextlib import contextmanager

from edgepart.fcpm.harness import pinned_thread
from edgepart.fcpm.ops import Runner, time_callable


@contextmanager
def pinned_one_thread(cpuset: list[int] | None):
    """One torch thread, the calling thread pinned to one core — the last of ``cpuset`` (where the test
    bed's workers run) if given, else :func:`edgepart.fcpm.harness.timing_core` — restored after.
    Unpinned, the timing thread migrates between cores and a timing does not repeat (issue #20)."""
    with pinned_thread(cpuset=cpuset):
        yield


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
