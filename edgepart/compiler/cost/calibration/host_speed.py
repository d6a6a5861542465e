"""How fast one CPU of this machine is now, relative to the machine an FCPM profile describes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgepart import models
from edgepart.compiler.cost.calibration.timing import pinned_one_thread, retime_records
from edgepart.passes.info import node_info
from edgepart.compiler.planning.plan import compute_nodes
from edgepart.passes.trace import trace
from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.ops import Runner
from edgepart.passes import analyse

# Zoo networks the host profile predicts within about ±1 % of their measured time (benchmarks/results/
# fcpm_accuracy.md, whole models at load 0) and that the testbed benchmark does not run.
REFERENCE_NETWORKS = ("inception", "unet", "alexnet")


class HostSpeedProbe:
    """How fast one CPU of this machine is *now*, relative to the machine an FCPM ``profile`` describes.

    ``kind="networks"`` (default): whole forward passes of :data:`REFERENCE_NETWORKS` (one torch
    thread, thread CPU time, pinned to ``cpuset`` if given — where the pinned workers run); the speed
    is Σ profile prediction / Σ measured. Like a device program, a network runs its layers in
    sequence with its weights coming from memory, so memory and cache contention by other programs
    count as they do for the workers. ``kind="layers"``: a sample of the profile's own recorded layer
    timings re-timed (hot caches; on this 2-vCPU VM it reads about 7 % faster than networks while
    another program runs on the other vCPU). Another program on the sibling core of a small VM, a
    different CPU clock or a noisy neighbour all show up; pass the value to
    ``LocalCluster(..., host_speed=...)`` (or :meth:`Emulator.set_host_speed`).

    ``profile``: a :class:`DeviceProfile` or the path of one. The probe's ``profile`` and ``cpuset``
    are what the rest of the calibration measures against and pins to
    (:func:`edgepart.compiler.cost.calibration.calibrate`).
    """

    def __init__(self, profile: DeviceProfile | str | Path, cpuset: list[int] | None = None, kind: str = "networks",
                 networks=REFERENCE_NETWORKS, seed: int = 0):
        if kind not in ("networks", "layers"):
            raise ValueError(f"kind must be 'networks' or 'layers', not {kind!r}")
        self.profile = profile if isinstance(profile, DeviceProfile) else DeviceProfile.load(profile)
        self.cpuset = cpuset
        self.kind = kind
        self.seed = seed
        self.nets: list[tuple] = []
        # memory: the profile's biggest recorded linear layer (weights streamed from DRAM) re-timed
        ref = self.profile.streaming_reference() if hasattr(self.profile, "streaming_reference") else None
        self.stream_ref = None if ref is None else (Runner(ref[0]), ref[1])
        if kind == "networks":
            for name in networks:
                model, (x,) = models.get(name)
                gm = analyse(trace(model, (x,)))
                pred = sum(self.profile.predict(node_info(n), None) for n in compute_nodes(gm))
                self.nets.append((name, model, x, pred))
            with torch.no_grad():
                for _, model, x, _ in self.nets:
                    model(x)

    def measure(self, budget_s: float = 1.0) -> dict:
        """{"host_speed", "memory_speed", "seconds", "per": {network or family: speed}}: one measurement.

        ``memory_speed``: the profile's recorded time of its largest linear layer ÷ its time now (how
        fast weights stream from memory, relative to profiling; None if the profile has no such
        record). Relative to the CPU speed, ``memory_speed / host_speed``, it is what a cost model
        of an emulated device needs (``CostModel(memory_speed=...)``): the emulator scales CPU time
        by host_speed, so only the part of memory-bound layers that drifted apart stays unmodelled."""
        t0 = time.perf_counter()
        with pinned_one_thread(self.cpuset):
            r = _layer_speed(self.profile, budget_s, self.seed) if self.kind == "layers" else self._network_speed(budget_s, t0)
            r["memory_speed"] = None
            if self.stream_ref is not None:
                runner, recorded = self.stream_ref
                with torch.no_grad():
                    runner()
                    ts = []
                    for _ in range(5):
                        c = time.thread_time()
                        runner()
                        ts.append(time.thread_time() - c)
                r["memory_speed"] = recorded / sorted(ts)[len(ts) // 2]
        r["seconds"] = time.perf_counter() - t0
        return r

    def _network_speed(self, budget_s: float, t0: float) -> dict:
        """Σ predicted ÷ Σ measured (median over rounds) of the reference networks' forward passes,
        in rounds until ``budget_s`` after ``t0`` (perf_counter) or 20 rounds."""
        per: dict = {}
        rounds = 0
        with torch.no_grad():
            while True:
                for name, model, x, _ in self.nets:
                    c = time.thread_time()
                    model(x)
                    per.setdefault(name, []).append(time.thread_time() - c)
                rounds += 1
                if time.perf_counter() - t0 >= budget_s or rounds >= 20:
                    break
        pred_sum, meas_sum = 0.0, 0.0
        for name, _, _, pred in self.nets:
            m = sorted(per[name])[len(per[name]) // 2]      # median over the rounds
            pred_sum += pred
            meas_sum += m
            per[name] = pred / m
        return {"host_speed": pred_sum / meas_sum, "per": per, "rounds": rounds}


def measure_host_speed(profile, budget_s: float = 2.0, cpuset: list[int] | None = None,
                       kind: str = "networks") -> dict:
    """One-shot :class:`HostSpeedProbe` measurement (see there)."""
    return HostSpeedProbe(profile, cpuset, kind).measure(budget_s)


def _layer_speed(prof, budget_s: float, seed: int, families: dict[str, int] | None = None) -> dict:
    """median(recorded / now) over a sample of the profile's recorded layer timings at load 0 (1–30 ms each)."""
    meas = prof.measurements or {}
    configs = {c["cid"]: c for c in meas.get("configs", [])}
    recs = [r for r in meas.get("records", []) if r.get("load", 0.0) == 0.0 and 1e-3 <= r["t"] <= 30e-3
            and r["cid"] in configs]
    if not recs:
        raise ValueError("the profile holds no recorded timings at load 0 (fitted without measurements?)")
    want = families or {"conv": 10, "linear": 3, "maxpool": 3}
    rng = np.random.default_rng(seed)
    pick = []
    for fam, n in want.items():
        pool = [r for r in recs if r["family"] == fam]
        if pool:
            pick += [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    ratios = retime_records(configs, pick, budget_s)
    allr = [x for v in ratios.values() for x in v]
    return {"host_speed": float(np.median(allr)), "n": len(allr),
            "per": {f: float(np.median(v)) for f, v in ratios.items()}}
