"""Online calibration of the cost model (DCFP's online step): how fast this machine, each op type,
a model whole and each of its layers run now, relative to the FCPM profile its devices are emulated from.

:func:`calibrate` measures all of it for one model and returns a :class:`Calibration`;
:meth:`Calibration.apply` gives it to a cluster's devices (keys ``memory_speed``, ``calibration``,
``node_calibration``). The package's modules each measure one thing:

- ``host_speed``: :class:`~.host_speed.HostSpeedProbe`, the CPU (and memory) now;
- ``op_types``: each op type (``measure_family_speeds``), and ``calibrate_op_types``, rounds of
  host speed, op types and model speed, with medians;
- ``whole_model``: ``model_speed``, the model timed whole against its calibrated prediction;
- ``program``: the model's device program to time, here (``program_forward``) or in a worker
  (``ProgramTimer``);
- ``layers``: ``measure_node_calibration``, each layer whole and sliced relative to its op type;
- ``timing``: how all of them time (one pinned thread, thread CPU time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from edgepart.cluster import Cluster
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe
from edgepart.compiler.cost.calibration.layers import measure_node_calibration
from edgepart.compiler.cost.calibration.op_types import OpTypeRound, calibrate_op_types
from edgepart.compiler.cost.calibration.program import ProgramTimer
from edgepart.compiler.cost.model import fused_into
from edgepart.fcpm import DeviceProfile
from edgepart.passes.info import node_info
from edgepart.compiler.planning.plan import compute_nodes
from edgepart.passes.trace import trace
from edgepart.passes import analyse
from edgepart.runtime.allocator import release_memory


@dataclass(frozen=True)
class Calibration:
    """One online calibration of a model on this machine (:func:`calibrate`); read-only.

    Every speed is (now ÷ when profiled); all but ``host_speed`` are relative to ``host_speed``,
    which the emulator already scales the devices' CPU time by."""
    host_speed: float                    # this CPU now ÷ the profiled one (median over the rounds)
    memory_speed: float                  # weight streaming ÷ host_speed; 1.0 if the profile records none
    calibration: dict[str, float]        # per op type (FCPM family), × model_speed if measured
    model_speed: float | None            # the model whole vs its calibrated prediction; None: not timed
    node_calibration: dict[str, list]    # {node name: [[rows, factor], ...]}; {}: layers not measured
    rounds: tuple[OpTypeRound, ...]      # the op-type rounds the medians were taken over
    measured: tuple[str, ...]            # of "op_types", "model", "layers": what was timed
    op_type_seconds: float               # wall time of the op-type rounds (host speed, op types, model)
    layer_seconds: float                 # wall time of the per-layer calibration (0 if not measured)

    def device_keys(self) -> dict:
        """The keys of a device in a cluster description that this calibration sets."""
        return {"memory_speed": self.memory_speed, "calibration": dict(self.calibration),
                "node_calibration": {name: [list(p) for p in pts] for name, pts in self.node_calibration.items()}}

    def apply(self, cluster: Cluster | dict) -> Cluster | dict:
        """``cluster`` (a :class:`Cluster` or its description) with every device calibrated: a new
        one of the same kind, each device's ``memory_speed``, ``calibration`` and ``node_calibration``
        replaced by this calibration's. Meant for clusters whose devices are all emulated from the
        profile that was calibrated (speeds relative to it); a device without a profile ignores them."""
        keys = self.device_keys()
        description = cluster.to_dict() if isinstance(cluster, Cluster) else cluster
        calibrated = {**description, "devices": [{**d, **keys} for d in description["devices"]]}
        return Cluster.from_dict(calibrated) if isinstance(cluster, Cluster) else calibrated


def calibrate(model, example_inputs: tuple, probe: HostSpeedProbe, *, budget_s: float = 2.0, rounds: int = 3,
              family_budget_s: float = 3.0, layer_budget_s: float = 4.0, time_model: bool = True,
              time_layers: bool = True, backend: str = "torch", profile=None,
              split_pools: bool = True, between=None, stage_charge_s: float = 0.0) -> Calibration:
    """Calibrate the cost model of devices emulated from ``probe.profile`` for ``model`` now, pinned to ``probe.cpuset``.

    1. :func:`~.op_types.calibrate_op_types` on the model's own layers: host speed, memory speed and
       op types in ``rounds`` rounds (``budget_s`` for the host speed, ``family_budget_s`` for the op
       types, and as much again for the model whole, each split over the rounds); with ``time_model``,
       every op type of the model × its model speed, the model's device program timed whole in a
       worker (:class:`~.program.ProgramTimer`, stopped before anything else runs).
    2. With ``time_layers``, right after, in the same state of the host: each layer whole and sliced
       relative to its op type (:func:`~.layers.measure_node_calibration`, ``layer_budget_s``).

    ``example_inputs``: the model's inputs, as for tracing it. ``backend`` and ``profile``: calibrate
    devices that run on that backend, costed with that profile (default: the probe's; give the
    backend's, e.g. ``profiles/host_ort.json`` for ``onnxruntime``); everything but the host speed is
    then timed as that backend runs it (:func:`~.op_types.calibrate_op_types`). ``split_pools``: the
    layers as the compiler sees them with (default) or without ``passes.pools``. ``between``: called
    before each request of the model timed whole (:class:`~.program.ProgramTimer`), what the devices
    do between requests (e.g. the testbed's host-speed probe). ``stage_charge_s``: what the cost model
    will charge the model's one stage beyond its layers (``whole_model.model_speed``). The batch norms and activations
    ``backend`` fuses into their convolutions (``cost.fused_into``) are neither timed nor predicted."""
    prof = probe.profile if profile is None else (profile if hasattr(profile, "predict") else DeviceProfile.load(profile))
    nodes = [node_info(n) for n in compute_nodes(analyse(trace(model, example_inputs), split_pools=split_pools))]
    # an epilogue the backend computes inside its convolution costs nothing there: not timed alone
    nodes = [info for info in nodes if fused_into(info, backend) is None]
    release_memory()     # what the process freed before (kept by the timing's malloc settings): not counted here
    t = time.perf_counter()
    if time_model:
        with ProgramTimer(model, example_inputs, cpuset=probe.cpuset, backend=backend, between=between) as timer:
            ops = calibrate_op_types(probe, budget_s, rounds, family_budget_s, nodes=nodes, forward=timer,
                                     backend=backend, profile=prof, stage_charge_s=stage_charge_s)
    else:
        ops = calibrate_op_types(probe, budget_s, rounds, family_budget_s, nodes=nodes, backend=backend, profile=prof)
    op_type_seconds = time.perf_counter() - t
    release_memory()     # the one-device program's compile, the layers' graphs and sessions: freed, handed back
    node_calibration, layer_seconds = {}, 0.0
    if time_layers:
        t = time.perf_counter()
        node_calibration = measure_node_calibration(prof, nodes, budget_s=layer_budget_s, cpuset=probe.cpuset,
                                                    backend=backend)
        layer_seconds = time.perf_counter() - t
        release_memory()
    measured = ("op_types",) + (("model",) if ops.model_speed is not None else ()) + (("layers",) if time_layers else ())
    return Calibration(host_speed=ops.host_speed, memory_speed=ops.memory_speed, calibration=ops.calibration,
                       model_speed=ops.model_speed, node_calibration=node_calibration, rounds=ops.rounds,
                       measured=measured, op_type_seconds=op_type_seconds, layer_seconds=layer_seconds)
