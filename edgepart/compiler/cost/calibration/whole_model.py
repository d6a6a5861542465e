"""How fast a whole model runs now relative to its calibrated prediction (layers in sequence, as a device runs them)."""
from __future__ import annotations

import time
from collections.abc import Callable

from edgepart.compiler.cost.calibration.program import ProgramTimer
from edgepart.compiler.cost.calibration.timing import pinned_one_thread
from edgepart.compiler.cost.model import calibrated_prediction, fused_into, program_overhead
from edgepart.fcpm.ops import family, time_callable


def predicted_model_time(profile, nodes: list[dict], calibration: dict[str, float], memory_speed: float,
                         backend: str = "torch") -> float:
    """Σ over ``nodes`` of the profile's prediction as calibrated (``cost.calibrated_prediction``), what
    ``CostModel.compute_time`` charges a device on ``backend`` for the model whole in one stage before the
    runtime's own overhead: trivial nodes and the epilogues ``backend`` computes inside their
    convolution (``cost.fused_into``) cost nothing."""
    return sum(calibrated_prediction(profile, info, None, 0.0, calibration, memory_speed)
               for info in nodes if family(info) != "trivial" and fused_into(info, backend) is None)


def model_speed(profile, nodes: list[dict], calibration: dict[str, float], memory_speed: float,
                forward: Callable[[], object] | ProgramTimer, relative_to: float = 1.0, cpuset: list[int] | None = None,
                budget_s: float = 1.0, bounds: tuple[float, float] = (0.5, 2.0), program: bool = False,
                backend: str = "torch", stage_charge_s: float = 0.0) -> float:
    """How fast a whole model runs now relative to its calibrated prediction: Σ over ``nodes`` of the
    profile's in-network prediction as calibrated (``cost.calibrated_prediction``, what
    ``CostModel.compute_time`` charges before the runtime's own overhead) ÷ (``forward()``'s thread CPU time ×
    ``relative_to``). Clamped to ``bounds`` (0.5–2): one disturbed timing must not halve every prediction.

    ``forward`` is timed here (thread CPU, pinned to ``cpuset``), or, a :class:`ProgramTimer`, in its worker.
    ``program=True`` (implied by a ``ProgramTimer``): ``forward`` runs edgepart's device program of the
    whole model (:func:`~edgepart.compiler.cost.calibration.program.program_forward`), what a device
    really runs, and the cost model's own charge for the program (``cost.program_overhead`` of every
    node) is taken off its time first, so the calibrated prediction *with* that charge is what
    was measured. Timing the eager model instead leaves the charge unchecked: its fit (13.6 µs per node +
    0.21 ns per padded byte, ``results/runtime_overhead.md``) says 5.3 ms for MobileNetV2 at 224 where
    the program measured 1.5 ms more than the eager model, and the testbed's MobileNetV2 stages ran
    0.76–0.79× their prediction. ``backend="onnxruntime"``: ``forward`` runs the program on ONNX
    Runtime, whose cost model charges no per-node overhead (its profile timed the layers in sessions), so
    nothing is taken off, and the batch norms and activations it fuses into their convolutions are
    predicted free (:func:`predicted_model_time`): charged at their time alone, the model speed spread
    their time over every layer, and YOLOv2-tiny's first stage — the large activations, where batch
    norms and activations are a large share — ran 0.68× its prediction, its later stages 1.05–1.2×.
    ``stage_charge_s``: what the cost model charges the program's one stage beyond its layers (profiled
    machine; ``CostModel.stage_start_time`` + ``stage_io_time`` of the model's input and output), taken
    off its time like the torch program's per-node charge."""
    predicted = predicted_model_time(profile, nodes, calibration, memory_speed, backend)
    program = program or isinstance(forward, ProgramTimer)
    overhead = sum(program_overhead(info, max(1, int(info.get("rows", 1) or 1))) for info in nodes) \
        if program and backend == "torch" else 0.0
    if isinstance(forward, ProgramTimer):
        measured = forward.time(budget_s)
    else:
        with pinned_one_thread(cpuset):
            measured = time_callable(forward, target_s=budget_s, min_repeats=3, max_repeats=20,
                                     clock=time.thread_time)["t"]
    # at least half of the measured time is the layers': a charge that large is the fit's error, not the program's
    layers = max(measured * relative_to - overhead - stage_charge_s, 0.5 * measured * relative_to)
    return min(bounds[1], max(bounds[0], predicted / max(layers, 1e-9)))
