"""Online calibration of the cost model: how fast this machine, each op type, the model and each of its layers run now."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager

log = logging.getLogger("edgepart.calibration")


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
    """

    def __init__(self, profile, cpuset: list[int] | None = None, kind: str = "networks",
                 networks=REFERENCE_NETWORKS, seed: int = 0):
        from edgepart.fcpm import DeviceProfile
        if kind not in ("networks", "layers"):
            raise ValueError(f"kind must be 'networks' or 'layers', not {kind!r}")
        self.profile = profile if isinstance(profile, DeviceProfile) else DeviceProfile.load(profile)
        self.cpuset = cpuset
        self.kind = kind
        self.seed = seed
        self.nets: list[tuple] = []
        # memory: the profile's biggest recorded linear layer (weights streamed from DRAM) re-timed
        ref = self.profile.streaming_reference() if hasattr(self.profile, "streaming_reference") else None
        self.stream_ref = None
        if ref is not None:
            from edgepart.fcpm.ops import Runner
            self.stream_ref = (Runner(ref[0]), ref[1])
        if kind == "networks":
            import torch

            from edgepart import models
            from edgepart.compiler.cost.model import node_info
            from edgepart.compiler.planning.plan import compute_nodes
            from edgepart.compiler.trace import trace
            from edgepart.passes import analyse
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
        import time

        import torch
        t0 = time.perf_counter()
        with _pinned_one_thread(self.cpuset):
            if self.kind == "layers":
                r = _layer_speed(self.profile, budget_s, self.seed)
            else:
                per, pred_sum, meas_sum = {}, 0.0, 0.0
                rounds = 0
                with torch.no_grad():
                    while True:
                        for name, model, x, pred in self.nets:
                            c = time.thread_time()
                            model(x)
                            dt = time.thread_time() - c
                            per.setdefault(name, []).append(dt)
                        rounds += 1
                        if time.perf_counter() - t0 >= budget_s or rounds >= 20:
                            break
                for name, model, x, pred in self.nets:
                    m = sorted(per[name])[len(per[name]) // 2]      # median over the rounds
                    pred_sum += pred
                    meas_sum += m
                    per[name] = pred / m
                r = {"host_speed": pred_sum / meas_sum, "per": per, "rounds": rounds}
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

    def calibrate(self, budget_s: float = 2.0, rounds: int = 3, family_budget_s: float = 3.0,
                  nodes: list[dict] | None = None, forward: "Callable[[], object] | ProgramTimer | None" = None,
                  program: bool = False) -> dict:
        """The online calibration of an emulated device's cost model, measured now: {"host_speed",
        "memory_speed" and "calibration" (per op type), both relative to host_speed — the emulator
        already scales CPU time by it} (the cluster's device keys ``memory_speed``, ``calibration``).

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
        was profiled — MobileNetV2 +17 % with one profile of this VM, −23 % with the next), so each round also times the model whole and scales every op type of it by
        ``model_speed`` = (the cost model's prediction of that pass with these calibrations) ÷
        (its measured time × host speed): the device's calibrated prediction of the whole model is
        then what was measured, and the op types keep the proportions their own layers showed.
        ``forward`` may be a :class:`ProgramTimer` (the program timed in a worker), and ``program=True`` says a
        callable ``forward`` runs the device program (:func:`program_forward`; see :func:`model_speed`)."""
        import statistics
        per_round = []
        for _ in range(max(1, rounds)):
            m = self.measure(budget_s / max(1, rounds))
            hs = m["host_speed"]
            ms = m["memory_speed"] / hs if m.get("memory_speed") else 1.0
            cal = measure_family_speeds(self.profile, cpuset=self.cpuset, relative_to=hs,
                                        budget_s=family_budget_s / max(1, rounds), nodes=nodes)
            k = None
            if forward is not None and nodes:
                k = model_speed(self.profile, nodes, cal, ms, forward, hs, cpuset=self.cpuset,
                                budget_s=family_budget_s / max(1, rounds), program=program)
            per_round.append((hs, ms, cal, k))
        families = sorted({f for _, _, cal, _ in per_round for f in cal})
        calibration = {f: statistics.median(cal[f] for _, _, cal, _ in per_round if f in cal) for f in families}
        ks = [k for *_, k in per_round if k is not None]
        k = statistics.median(ks) if ks else None
        if k is not None:
            from edgepart.fcpm.ops import family
            for f in {family(n) for n in nodes} - {"trivial"}:
                calibration[f] = calibration.get(f, 1.0) * k
        return {"host_speed": statistics.median(r[0] for r in per_round),
                "memory_speed": round(statistics.median(r[1] for r in per_round), 3),
                "calibration": {f: round(v, 3) for f, v in sorted(calibration.items())},
                "model_speed": None if k is None else round(k, 3),
                "rounds": [{"host_speed": hs, "memory_speed": ms, "calibration": cal, "model_speed": k}
                           for hs, ms, cal, k in per_round]}


@contextmanager
def _pinned_one_thread(cpuset: list[int] | None):
    """One torch thread, pinned to ``cpuset`` if given (where the testbed's workers run); restored after."""
    import torch
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


def _retime(configs: dict, records: list[dict], budget_s: float) -> dict[str, list[float]]:
    """recorded / now for each of the profile's ``records`` re-timed (thread CPU time), per family."""
    import time

    from edgepart.fcpm.ops import Runner, time_callable
    ratios: dict[str, list[float]] = {}
    for r in records:
        m = time_callable(Runner(configs[r["cid"]]["info"], r["rows"], seed=int(r["cid"])),
                          target_s=budget_s / max(1, len(records)) * 0.7, min_repeats=3, clock=time.thread_time)
        ratios.setdefault(r["family"], []).append(r["t"] / max(m["t"], 1e-9))
    return ratios


def measure_family_speeds(profile, per_family: int = 3, budget_s: float = 3.0, cpuset: list[int] | None = None,
                          relative_to: float = 1.0, nodes: list[dict] | None = None) -> dict[str, float]:
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
    family's predictions by it). ``linear`` is left out: weight streaming is ``memory_speed``'s job.
    """
    import numpy as np

    prof = profile if hasattr(profile, "measurements") else _load_profile(profile)
    if nodes is not None:
        with _pinned_one_thread(cpuset):
            sums = _retime_nodes(prof, nodes, budget_s)
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
        with _pinned_one_thread(cpuset):
            ratios = _retime(configs, picks, budget_s)
    # clamped: one odd timing must not make a family look 10x off
    return {fam: round(min(5.0, max(0.2, float(np.median(v)) / relative_to)), 3)
            for fam, v in sorted(ratios.items())}


def model_speed(profile, nodes: list[dict], calibration: dict[str, float], memory_speed: float,
                forward: "Callable[[], object] | ProgramTimer", relative_to: float = 1.0, cpuset: list[int] | None = None,
                budget_s: float = 1.0, bounds: tuple[float, float] = (0.5, 2.0), program: bool = False) -> float:
    """How fast a whole model runs now relative to its calibrated prediction: Σ over ``nodes`` of the
    profile's in-network prediction as calibrated (``cost.calibrated_prediction``, what
    ``CostModel.compute_time`` charges before the runtime's own overhead) ÷ (``forward()``'s thread CPU time ×
    ``relative_to``). Clamped to ``bounds`` (0.5–2): one disturbed timing must not halve every prediction.

    ``forward`` is timed here (thread CPU, pinned to ``cpuset``), or, a :class:`ProgramTimer`, in its worker.
    ``program=True`` (implied by a ``ProgramTimer``): ``forward`` runs edgepart's device program of the
    whole model (:func:`program_forward`), what a device really runs, and the cost model's own charge for
    the program (``cost.program_overhead`` of every node) is taken off its time first, so the calibrated prediction *with* that charge is what
    was measured. Timing the eager model instead leaves the charge unchecked: its fit (13.6 µs per node +
    0.21 ns per padded byte, ``results/runtime_overhead.md``) says 5.3 ms for MobileNetV2 at 224 where
    the program measured 1.5 ms more than the eager model, and the testbed's MobileNetV2 stages ran
    0.76–0.79× their prediction."""
    import time

    from edgepart.compiler.cost.model import calibrated_prediction, program_overhead
    from edgepart.fcpm.ops import family, time_callable
    predicted = sum(calibrated_prediction(profile, info, None, 0.0, calibration, memory_speed)
                    for info in nodes if family(info) != "trivial")
    program = program or isinstance(forward, ProgramTimer)
    overhead = sum(program_overhead(info, max(1, int(info.get("rows", 1) or 1))) for info in nodes) if program else 0.0
    if isinstance(forward, ProgramTimer):
        measured = forward.time(budget_s)
    else:
        with _pinned_one_thread(cpuset):
            measured = time_callable(forward, target_s=budget_s, min_repeats=3, max_repeats=20,
                                     clock=time.thread_time)["t"]
    # at least half of the measured time is the layers': a charge that large is the fit's error, not the program's
    layers = max(measured * relative_to - overhead, 0.5 * measured * relative_to)
    return min(bounds[1], max(bounds[0], predicted / max(layers, 1e-9)))


def _one_device_bundle(model, example_inputs: tuple):
    """``model`` compiled for a cluster of one device named ``device`` (its whole device program)."""
    import warnings

    from edgepart.cluster import Cluster
    from edgepart.compiler.bundle import compile as compile_model
    one = Cluster.from_dict({"source": "device", "devices": [{"name": "device", "speed": 1.0}], "links": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # no profile: the plan is one device whatever the costs say
        return compile_model(model, example_inputs, one, strategy="single")


def program_forward(model, example_inputs) -> Callable[[], object]:
    """A callable that runs ``model``'s edgepart device program on ``example_inputs`` in this process:
    the model compiled for one device (strategy ``single``) and run by the reference executor, as a
    worker runs it. For timing the model as the runtime executes it (:func:`model_speed` with
    ``program=True``)."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    bundle = _one_device_bundle(model, inputs)
    return lambda: bundle.run_local(*inputs)


class ProgramTimer:
    """Times a model's device program as a worker runs it: the model compiled for one device, deployed
    to one local worker process (unemulated, pinned to ``cpuset``) and the worker's thread CPU time in
    its stages (``stage_cpu_us`` of its stats) read per request. For :func:`model_speed`: the devices
    are such workers, and timed in the planning process instead the same program read far less
    steadily (MobileNetV2 on this VM: model speed 0.88–1.33 between rounds of one calibration there,
    1.15–1.28 in a worker).

        with ProgramTimer(model, (x,), cpuset=[1]) as timer:
            seconds = timer.time(budget_s=1.0)
    """

    def __init__(self, model, example_inputs, cpuset: list[int] | None = None):
        from edgepart.testbed.local import LocalCluster
        self.inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.cluster = LocalCluster(_one_device_bundle(model, self.inputs), cpuset=cpuset)
        try:
            self.cluster.infer(*self.inputs)     # deployed and warm
        except BaseException:
            self.cluster.close()                 # no worker left behind by a failed first request
            raise

    def _stage_cpu_s(self) -> float:
        stats = self.cluster.stats()["device"]
        return sum(v for k, v in stats.items() if k.startswith("stage_cpu_us:")) / 1e6

    def time(self, budget_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 20) -> float:
        """Median thread CPU seconds of the worker's stages per request, over requests sent for about ``budget_s``."""
        import statistics
        import time
        t0, per = time.perf_counter(), []
        while len(per) < max_repeats and (len(per) < min_repeats or time.perf_counter() - t0 < budget_s):
            before = self._stage_cpu_s()
            self.cluster.infer(*self.inputs)
            per.append(self._stage_cpu_s() - before)
        return statistics.median(per)

    def close(self) -> None:
        self.cluster.close()

    def __enter__(self) -> "ProgramTimer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def row_points(total: int, max_points: int = 10) -> list[int]:
    """Row counts at which a node of ``total`` output rows is timed: every count up to ``max_points``
    rows, else 1, 2, 3 and a geometric series up to ``total`` (the thin slices, where the time per
    row bends, densest)."""
    if total <= max_points:
        return list(range(1, total + 1))
    pts = {1, 2, 3, total}
    k = max_points - len(pts)
    for i in range(1, k + 1):
        pts.add(int(round(3 * (total / 3) ** (i / (k + 1)))))
    return sorted(p for p in pts if 1 <= p <= total)


def smooth_slice_factors(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Each slice size's factor → the median of it and its two neighbours; the end points kept.

    A planner picks the slice sizes that look cheapest, so one low reading among a layer's points is
    the one a plan ends up on: YOLOv2-tiny's 1024→1024 convolution at 3 of 8 rows read 0.66 in one
    calibration where its neighbours and other runs read 0.8–1.0, the plan gave a device those 3
    rows, and its stage ran 1.32× the prediction. The whole layer's factor is the op type's
    reference (and timed longest), and the first point has one neighbour only: both stay."""
    if len(points) < 3:
        return list(points)
    vals = [v for _, v in points]
    middle = [(points[i][0], sorted(vals[i - 1:i + 2])[1]) for i in range(1, len(points) - 1)]
    return [points[0]] + middle + [points[-1]]


def measure_node_calibration(profile, nodes: list[dict], budget_s: float = 4.0, cpuset: list[int] | None = None,
                             bounds: tuple[float, float] = (0.33, 3.0)) -> dict[str, list]:
    """How each layer of a model runs now — whole and as slices of its rows — relative to its op type.

    The op-type calibration (:func:`measure_family_speeds`, × :func:`model_speed`) sets one factor per
    op type, time-weighted over the model's layers; the layers of one type drift apart by size around
    it (MobileNetV2's first layers, large activations and few channels, ran 0.56–0.9× the time its
    conv / bn / act factors predict on this machine while its late 1×1 convolutions ran 1.0–1.2×),
    and the FCPM is least accurate for thin slices of layers with large weights (VGG-16's
    512-channel 3×3 convolutions at 1–3 of 10 rows ran 1.3–2.5× their prediction, the whole layer
    within 10 %: the weights are read whole however few rows are computed). DCFP's online step
    knows the model: each of its layers (``nodes``, ``cost.node_info``; not linear layers, whose
    weight streaming is ``memory_speed``'s) is timed whole and, if it has several rows, at the row
    counts :func:`row_points` picks; its factor at r rows is

        factor(r) = (measured(r) ÷ predicted(r)) ÷ (Σ measured ÷ Σ predicted over its op type's layers, whole),

    the profile's isolated prediction throughout. The level of an op type stays the op-type
    calibration's (a factor's time-weighted mean over an op type's layers whole is 1), so this
    only redistributes time between layers and rows. Returns {node name: [[rows, factor], ...]}
    (factors clamped to ``bounds``), a device's ``node_calibration`` (``CostModel`` interpolates
    between the points). Measured time never falls as a slice grows (running max), so noise does not
    make a planner prefer a bigger slice, and one low reading does not make it prefer that slice size
    (:func:`smooth_slice_factors`). Timing: thread CPU, one torch thread, pinned to ``cpuset``,
    medians of ≥ 7 calls (3 left a 1024→1024 convolution's slices ±20–30 % apart between runs)."""
    import time

    from edgepart.fcpm.ops import Runner, family, time_callable
    prof = profile if hasattr(profile, "predict") else _load_profile(profile)
    todo = [(info, row_points(int(info.get("rows", 1) or 1))) for info in nodes
            if info.get("name") and family(info) not in ("linear", "trivial")]
    n_points = sum(len(p) for _, p in todo) or 1
    ratios: dict[str, dict[int, float]] = {}
    sums: dict[str, list[float]] = {}          # op type -> [Σ predicted, Σ measured] of whole layers
    with _pinned_one_thread(cpuset):
        for info, pts in todo:
            measured: dict[int, float] = {}
            for r in pts:
                try:
                    run = Runner(info, r)
                except Exception:   # noqa: BLE001 — a node the profiler cannot build alone keeps its op type's
                    measured = {}
                    break
                measured[r] = time_callable(run, target_s=budget_s / n_points, min_repeats=7, max_repeats=30,
                                            warmup_s=0.002, clock=time.thread_time)["t"]
            total = pts[-1]
            if total not in measured:
                continue
            ratio, peak = {}, 0.0
            for r in sorted(measured):
                peak = max(peak, measured[r])
                ratio[r] = peak / max(prof.predict(info, r, context="isolated"), 1e-9)
            ratios[info["name"]] = dict(smooth_slice_factors(sorted(ratio.items())))
            acc = sums.setdefault(family(info), [0.0, 0.0])
            acc[0] += prof.predict(info, None, context="isolated")
            acc[1] += peak                     # the whole node's time, as its factor uses it
    fam_of = {info["name"]: family(info) for info, _ in todo}
    out = {}
    for name, ratio in ratios.items():
        p, m = sums[fam_of[name]]
        level = m / p if p > 0 else 1.0
        out[name] = [[r, round(min(bounds[1], max(bounds[0], v / level)), 3)] for r, v in sorted(ratio.items())]
    return out


def _retime_nodes(prof, nodes: list[dict], budget_s: float) -> dict[str, tuple[float, float]]:
    """{family: (Σ isolated prediction, Σ measured thread CPU)} over ``nodes`` timed whole."""
    import time

    from edgepart.fcpm.ops import Runner, family, time_callable
    todo = [n for n in nodes if family(n) not in ("linear", "trivial")]
    sums: dict[str, tuple[float, float]] = {}
    for info in todo:
        try:
            run = Runner(info)
        except Exception:   # noqa: BLE001 — a node the profiler cannot build alone is not timed
            continue
        m = time_callable(run, target_s=budget_s / max(1, len(todo)), min_repeats=3, max_repeats=20,
                          clock=time.thread_time)["t"]
        p = prof.predict(info, None, context="isolated")
        fam = family(info)
        a, b = sums.get(fam, (0.0, 0.0))
        sums[fam] = (a + p, b + m)
    return sums


def _load_profile(path):
    from edgepart.fcpm import DeviceProfile
    return DeviceProfile.load(path)


def measure_host_speed(profile, budget_s: float = 2.0, cpuset: list[int] | None = None,
                       kind: str = "networks") -> dict:
    """One-shot :class:`HostSpeedProbe` measurement (see there)."""
    return HostSpeedProbe(profile, cpuset, kind).measure(budget_s)


def _layer_speed(prof, budget_s: float, seed: int, families: dict[str, int] | None = None) -> dict:
    """median(recorded / now) over a sample of the profile's recorded layer timings at load 0 (1–30 ms each)."""
    import numpy as np

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
    ratios = _retime(configs, pick, budget_s)
    allr = [x for v in ratios.values() for x in v]
    return {"host_speed": float(np.median(allr)), "n": len(allr),
            "per": {f: float(np.median(v)) for f, v in ratios.items()}}
