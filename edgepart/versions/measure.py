"""What a version costs: MACs, parameters, bytes, predicted and measured single-device latency.

The prediction is the compiler's own: the model compiled for one device whose FCPM profile is
``profile`` (``profiles/host.json`` of this repository by default), simulated with the cost model
(``simulate_plan``, which sums ``DeviceProfile.predict`` over the compute nodes plus the runtime's
per-node and per-stage overheads). The measurement runs that same single-device bundle in-process
(``Bundle.run_local``: the generated device program, as a worker runs it) on one thread, the median of
``repeats`` calls after a warm-up; ``eager_ms`` is ``model(x)`` timed the same way, the only measure
an int8 version has (edgepart cannot compile quantised ops).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgepart.cluster import Cluster
from edgepart.compiler.bundle import Bundle
from edgepart.compiler.bundle import compile as compile_model
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.cost.simulator import simulate_plan

HOST_PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "host.json"


@dataclass(frozen=True)
class Costs:
    macs: int
    params: int
    bytes: int
    predicted_ms: float | None        # None: not compiled (int8) or no profile
    measured_ms: float | None         # the single-device bundle, run_local, one thread
    eager_ms: float | None            # model(x) in-process, one thread


def single_device_cluster(profile: Path | None = HOST_PROFILE) -> Cluster:
    """One device of speed 1.0, with ``profile`` when it exists (else the cost model's FLOPs fallback)."""
    device = {"name": "d0", "speed": 1.0}
    if profile is not None and Path(profile).is_file():
        device["profile"] = str(profile)
    return Cluster.from_dict({"devices": [device]})


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights file holds, less its header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _median_ms(fn, x: torch.Tensor, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the profile was taken on one thread
    try:
        with torch.no_grad():
            fn(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * statistics.median(times)


def single_device_bundle(model: nn.Module, example: torch.Tensor, profile: Path | None = HOST_PROFILE) -> Bundle:
    return compile_model(model, (example,), single_device_cluster(profile), strategy="single")


def predicted_ms(bundle: Bundle) -> float:
    """The simulated latency of a single-device bundle, from the cost model of its cluster."""
    cluster = bundle.cluster
    return 1e3 * simulate_plan(bundle.graph, bundle.plan, cluster, CostModel(cluster)).latency


def measure(model: nn.Module, example: torch.Tensor, *, compiled: bool = True, nbytes: int | None = None,
            macs: int | None = None, params: int | None = None, profile: Path | None = HOST_PROFILE,
            repeats: int = 20) -> Costs:
    """The costs of ``model`` on ``example`` (batch 1). ``compiled=False`` (an int8 version) skips the
    bundle: no prediction, no bundle measurement; then ``macs`` and ``params`` (of its fp32 source) and
    ``nbytes`` (its stored size) are given by the caller. ``repeats=0`` skips the timings."""
    if params is None:
        params = sum(p.numel() for p in model.parameters())
    predicted = measured = None
    if compiled:
        bundle = single_device_bundle(model, example, profile)
        macs = bundle.report["macs"]
        predicted = predicted_ms(bundle) if profile is not None and Path(profile).is_file() else None
        if repeats:
            measured = _median_ms(bundle.run_local, example, repeats)
    eager = _median_ms(model, example, repeats) if repeats else None
    return Costs(int(macs or 0), int(params), int(state_bytes(model) if nbytes is None else nbytes),
                 predicted, measured, eager)
