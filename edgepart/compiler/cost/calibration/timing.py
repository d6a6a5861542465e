"""How the calibration times things: one torch thread pinned to one core where the workers run, thread
CPU time; each layer as the device's backend runs it (:func:`layer_runner`)."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager

import torch

from edgepart.fcpm.harness import pinned_thread
from edgepart.fcpm.ops import Runner, time_callable

BACKENDS = ("torch", "onnxruntime")


def layer_runner(backend: str = "torch"):
    """``(info, rows) -> (callable, seconds to take off each call)``: a row slice of one node as a device
    on ``backend`` runs it — a torch :class:`Runner`, or the same computation exported to ONNX and run
    in a one-thread ONNX Runtime session (as ``edgepart profile --backend onnxruntime`` timed it), whose
    own cost per run (an empty session's, ``ort_timing.session_call_s``) the profile charges per stage,
    not per layer, and is taken off here as it was there. One factory keeps the graphs of the layers it
    made whole (``rows`` None), to time them again without exporting them again."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "torch":
        return lambda info, rows=None: (Runner(info, rows), 0.0)
    from edgepart.fcpm.ort_timing import OrtRunner, ort_layer, session_call_s   # why: onnxruntime loads on first use only
    call_s = session_call_s()
    # layers timed whole, exported once (the op types are timed in rounds; VGG-16's 411 MB linear layer
    # takes 11 s to export): {layer: (input, graph)}, at most the model's own weights, freed with the factory
    whole: dict[str, tuple[torch.Tensor, bytes]] = {}

    def make(info, rows=None):
        key = json.dumps(info, sort_keys=True, default=str) if rows is None else None
        if key in whole:
            x, model = whole[key]
            return OrtRunner(None, x, model), call_s
        run, x = ort_layer(info, rows)
        if key is not None:
            whole[key] = (x, run.model)
        return run, call_s
    return make


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
