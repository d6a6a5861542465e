"""How each layer of a model runs now, whole and as slices of its rows, relative to its op type:
a device's ``node_calibration``."""
from __future__ import annotations

import time

from edgepart.compiler.cost.calibration.timing import layer_runner, pinned_one_thread
from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.ops import family, time_callable


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
                             bounds: tuple[float, float] = (0.33, 3.0), backend: str = "torch") -> dict[str, list]:
    """How each layer of a model runs now — whole and as slices of its rows — relative to its op type.

    The op-type calibration (:func:`~edgepart.compiler.cost.calibration.op_types.measure_family_speeds`,
    × :func:`~edgepart.compiler.cost.calibration.whole_model.model_speed`) sets one factor per
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
    medians of ≥ 7 calls (3 left a 1024→1024 convolution's slices ±20–30 % apart between runs).
    ``backend``: time each layer as a device on that backend runs it (:func:`~.timing.layer_runner`),
    against ``profile``, that backend's profile."""
    prof = profile if hasattr(profile, "predict") else DeviceProfile.load(profile)
    todo = [(info, row_points(int(info.get("rows", 1) or 1))) for info in nodes
            if info.get("name") and family(info) not in ("linear", "trivial")]
    n_points = sum(len(p) for _, p in todo) or 1
    ratios: dict[str, dict[int, float]] = {}
    sums: dict[str, list[float]] = {}          # op type -> [Σ predicted, Σ measured] of whole layers
    make_runner = layer_runner(backend)
    with pinned_one_thread(cpuset):
        for info, pts in todo:
            measured: dict[int, float] = {}
            for r in pts:
                try:
                    run, call_s = make_runner(info, r)
                except Exception:   # noqa: BLE001 — a node the profiler cannot build alone keeps its op type's
                    measured = {}
                    break
                t = time_callable(run, target_s=budget_s / n_points, min_repeats=7, max_repeats=30,
                                  warmup_s=0.002, clock=time.thread_time)["t"]
                measured[r] = max(t - call_s, 0.05 * t)
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
