"""How fast each op type (FCPM family) runs now relative to the CPU as a whole: a device's ``calibration``."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe
from edgepart.compiler.cost.calibration.program import ProgramTimer
from edgepart.compiler.cost.calibration.timing import layer_runner, pinned_one_thread, retime_records
from edgepart.compiler.cost.calibration.whole_model import model_speed
from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.ops import family, time_callable


def measure_family_speeds(profile, per_family: int = 3, budget_s: float = 3.0, cpuset: list[int] | None = None,
                          relative_to: float = 1.0, nodes: list[dict] | None = None,
                          backend: str = "torch", make_runner=None,
                          linear_memory_speed: float | None = None) -> dict[str, float]:
    """How fast each op type of an FCPM profile runs now, relative to when it was profiled.

    Without ``nodes``: for every family (op type) of the profile, ``per_family`` of its recorded
    layers at load 0 (50 µs – 30 ms; spread over the upper half of their times) are re-timed; the
    family's speed is median(recorded / now). With ``nodes`` (node infos, ``cost.node_info``, of the
    model about to be planned — what DCFP's online step knows): those layers are timed whole, and a
    family's speed is Σ predicted ÷ Σ measured over its nodes, weighted by time like the plan is — one
    op type's layers drift apart by size (on this VM 3×3 convolutions with small weights ran 1.2–1.4×
    faster than profiled while one with 38 MB of weights ran 0.9×), so a few random records can
    mislead the layers a model spends its time in. Timing: thread CPU, one torch thread, pinned to
    ``cpuset``; the result is divided by ``relative_to``. Pass the host speed an emulator normalises by
    as ``relative_to``: what is left is how much more one op type drifted than the CPU as a whole.
    The result is a device's ``calibration`` in a cluster description (``CostModel`` divides that
    family's predictions by it). ``linear`` is left out — weight streaming is ``memory_speed``'s job —
    unless ``linear_memory_speed`` is given (with ``nodes``): the model's linear layers are then timed
    too, against their prediction with that memory speed applied (as ``CostModel`` applies it), for a
    profile whose linear model does not hold at the model's sizes (``linear_layers_timed``).
    ``backend`` (with ``nodes``): the layers run as a device on that backend runs them
    (:func:`~.timing.layer_runner`; or ``make_runner``, one such factory kept between calls), against
    ``profile``, that backend's profile.
    """
    prof = profile if hasattr(profile, "measurements") else DeviceProfile.load(profile)
    if nodes is not None:
        with pinned_one_thread(cpuset):
            sums = _retime_nodes(prof, nodes, budget_s, make_runner or layer_runner(backend), linear_memory_speed)
        ratios = {fam: [p / m] for fam, (p, m) in sums.items() if m > 0}
    else:
        meas = prof.measurements or {}
        configs = {c["cid"]: c for c in meas.get("configs", [])}
        by_family: dict[str, list[dict]] = {}
        for r in meas.get("records", []):
            if r.get("load", 0.0) == 0.0 and 50e-6 <= r["t"] <= 30e-3 and r["cid"] in configs \
                    and r["family"] not in ("linear", "trivial"):
                by_family.setdefault(r["family"], []).append(r)
        if not by_family:
            raise ValueError("the profile holds no recorded timings at load 0 (fitted without measurements?)")
        picks = []
        for v in by_family.values():   # spread over sizes: the upper half, where time is spent
            v = sorted(v, key=lambda r: r["t"])
            qs = [0.5 + 0.45 * i / max(1, per_family - 1) for i in range(per_family)] if per_family > 1 else [0.75]
            picks += {id(r): r for r in (v[min(len(v) - 1, int(q * len(v)))] for q in qs)}.values()
        with pinned_one_thread(cpuset):
            ratios = retime_records(configs, picks, budget_s)
    # clamped: one odd timing must not make a family look 10x off
    return {fam: round(min(5.0, max(0.2, float(np.median(v)) / relative_to)), 3)
            for fam, v in sorted(ratios.items())}


def linear_layers_timed(backend: str) -> bool:
    """Whether the calibration times a model's linear layers on ``backend`` (and calibrates the
    ``linear`` op type from them) rather than leaving them to ``memory_speed``. On ONNX Runtime: its
    profile's linear model, fitted on layers up to 151 MB, predicted VGG-16's 411 MB classifier layer
    at 5.3 ms (78 GB/s where this machine streams 17), which the profile's own streaming layer re-timed
    cannot see, and the testbed's classifier stage ran 2–3× its prediction. On torch the fitted model
    holds (22.4 ms, 18 GB/s), and ``memory_speed`` alone scales it."""
    return backend != "torch"


def _retime_nodes(prof, nodes: list[dict], budget_s: float, make_runner,
                  linear_memory_speed: float | None = None) -> dict[str, tuple[float, float]]:
    """{family: (Σ isolated prediction, Σ measured thread CPU)} over ``nodes`` timed whole
    (``make_runner``: :func:`~.timing.layer_runner`); linear layers only with ``linear_memory_speed``,
    their prediction's memory-bound share ÷ it."""
    skip = ("trivial",) if linear_memory_speed else ("linear", "trivial")
    todo = [n for n in nodes if family(n) not in skip]
    sums: dict[str, tuple[float, float]] = {}
    for info in todo:
        try:
            run, call_s = make_runner(info, None)
        except Exception:   # noqa: BLE001 — a node the profiler cannot build alone is not timed
            continue
        m = time_callable(run, target_s=budget_s / max(1, len(todo)), min_repeats=3, max_repeats=20,
                          clock=time.thread_time)["t"]
        m = max(m - call_s, 0.05 * m)
        p = prof.predict(info, None, context="isolated")
        fam = family(info)
        if fam == "linear" and hasattr(prof, "memory_bound_fraction"):
            share = prof.memory_bound_fraction(info, None, p)
            p *= (1.0 - share) + share / linear_memory_speed
        a, b = sums.get(fam, (0.0, 0.0))
        sums[fam] = (a + p, b + m)
    return sums


def _streaming_runner(prof, make_runner) -> tuple | None:
    """(callable, seconds off each call, recorded seconds) for ``prof``'s largest recorded linear layer
    as ``make_runner`` (:func:`~.timing.layer_runner`) runs it (what ``HostSpeedProbe`` re-times for
    torch); () if the profile records none."""
    ref = prof.streaming_reference() if hasattr(prof, "streaming_reference") else None
    if ref is None:
        return ()
    run, call_s = make_runner(ref[0], None)
    return run, call_s, ref[1]


def _streaming_speed(stream: tuple, cpuset: list[int] | None) -> float:
    """recorded ÷ now (median of 5 calls, thread CPU) of a :func:`_streaming_runner`."""
    run, call_s, recorded = stream
    with pinned_one_thread(cpuset):
        run()
        ts = []
        for _ in range(5):
            c = time.thread_time()
            run()
            ts.append(max(time.thread_time() - c - call_s, 1e-9))
    return recorded / sorted(ts)[len(ts) // 2]


@dataclass(frozen=True)
class OpTypeRound:
    """One round of :func:`calibrate_op_types`: the host speed and, right after it, the rest relative to it."""
    host_speed: float
    memory_speed: float                  # ÷ host_speed; 1.0 if the profile records no streaming layer
    calibration: dict[str, float]        # per op type, ÷ host_speed (before the model speed)
    model_speed: float | None            # None: the model was not timed whole


@dataclass(frozen=True)
class OpTypeCalibration:
    """The medians over the rounds of :func:`calibrate_op_types` (what a device's cluster keys take)."""
    host_speed: float
    memory_speed: float                  # ÷ host_speed, 3 decimals
    calibration: dict[str, float]        # per op type, ÷ host_speed and × model_speed, 3 decimals
    model_speed: float | None            # 3 decimals; None: the model was not timed whole
    rounds: tuple[OpTypeRound, ...]


def calibrate_op_types(probe: HostSpeedProbe, budget_s: float = 2.0, rounds: int = 3, family_budget_s: float = 3.0,
                       nodes: list[dict] | None = None, forward: Callable[[], object] | ProgramTimer | None = None,
                       program: bool = False, backend: str = "torch", profile=None,
                       stage_charge_s: float = 0.0) -> OpTypeCalibration:
    """The online calibration of an emulated device's cost model per op type, measured now with
    ``probe``'s profile, pinned to its cpuset: ``host_speed``, and ``memory_speed`` and
    ``calibration`` (per op type) both relative to host_speed — the emulator already scales CPU time
    by it (the cluster's device keys ``memory_speed``, ``calibration``).

    In ``rounds`` rounds, each measuring the host speed and right after it the op types relative
    to it (``budget_s`` and ``family_budget_s`` split over the rounds); every value is the median
    over the rounds, so one round that another program slowed down part-way (the op types read
    0.6x of the host speed it had just measured, say) does not skew the plan. ``nodes``: the
    node infos of the model to plan, timed instead of the profile's records
    (:func:`measure_family_speeds`).

    ``forward`` (with ``nodes``): the model's whole forward pass on one thread. Its layers timed
    one by one miss what running them in sequence does (caches warm from the layer before, or
    cold after it; the per-layer in-network correction of the profile is fitted on synthetic
    networks and misses zoo models by 5–25 %, either way depending on the host's state when it
    was profiled — MobileNetV2 +17 % with one profile of this VM, −23 % with the next), so each
    round also times the model whole and scales every op type of it by ``model_speed`` = (the cost
    model's prediction of that pass with these calibrations) ÷ (its measured time × host speed): the
    device's calibrated prediction of the whole model is then what was measured, and the op types
    keep the proportions their own layers showed. ``forward`` may be a :class:`ProgramTimer` (the
    program timed in a worker), and ``program=True`` says a callable ``forward`` runs the device
    program (:func:`~edgepart.compiler.cost.calibration.program.program_forward`; see
    :func:`~edgepart.compiler.cost.calibration.whole_model.model_speed`).

    ``backend`` and ``profile`` (default: the probe's, a torch profile): calibrate devices that run on
    ``backend`` and are costed with ``profile`` (that backend's). The host speed stays the probe's — it
    is the CPU's speed, which the emulator scales every worker by, whatever runs on it — and the rest is
    timed on that backend relative to it: the layers as :func:`~.timing.layer_runner` runs them, the
    memory speed on ``profile``'s largest linear layer, the model whole as ``forward`` runs it; on
    a backend whose linear layers are timed (:func:`linear_layers_timed`) the model's linear layers too."""
    n = max(1, rounds)
    prof = probe.profile if profile is None else profile
    make_runner = layer_runner(backend)
    stream = None if backend == "torch" else _streaming_runner(prof, make_runner)
    per_round = []
    for _ in range(n):
        m = probe.measure(budget_s / n)
        hs = m["host_speed"]
        ms = m["memory_speed"] / hs if m.get("memory_speed") else 1.0
        if stream is not None:
            ms = _streaming_speed(stream, probe.cpuset) / hs if stream else 1.0
        cal = measure_family_speeds(prof, cpuset=probe.cpuset, relative_to=hs,
                                    budget_s=family_budget_s / n, nodes=nodes, make_runner=make_runner,
                                    linear_memory_speed=ms if linear_layers_timed(backend) else None)
        k = None
        if forward is not None and nodes:
            k = model_speed(prof, nodes, cal, ms, forward, hs, cpuset=probe.cpuset,
                            budget_s=family_budget_s / n, program=program, backend=backend,
                            stage_charge_s=stage_charge_s)
        per_round.append(OpTypeRound(hs, ms, cal, k))
    families = sorted({f for r in per_round for f in r.calibration})
    calibration = {f: statistics.median(r.calibration[f] for r in per_round if f in r.calibration) for f in families}
    ks = [r.model_speed for r in per_round if r.model_speed is not None]
    k = statistics.median(ks) if ks else None
    if k is not None:
        for f in {family(info) for info in nodes} - {"trivial"}:
            calibration[f] = calibration.get(f, 1.0) * k
    return OpTypeCalibration(host_speed=statistics.median(r.host_speed for r in per_round),
                             memory_speed=round(statistics.median(r.memory_speed for r in per_round), 3),
                             calibration={f: round(v, 3) for f, v in sorted(calibration.items())},
                             model_speed=None if k is None else round(k, 3),
                             rounds=tuple(per_round))
