"""The one cost model: predicted compute time of a node's rows on a device, and of a transfer.

The planners (and the OFPM solver) optimise with these functions and the simulator
reports with them, so a plan's predicted latency can be checked against both.
A device with a fitted FCPM profile uses it, divided by the device's ``speed``
(speed is relative to the machine the profile was fitted on: 1.0 for a profile
of the device itself, 0.5 for a device half as fast as the profiled machine —
an emulated device with half a core of it, say); one without falls back to
FLOPs ÷ (its declared speed × REFERENCE_FLOPS) and the model says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

from edgepart.cluster import Cluster
from edgepart.fcpm.model import DeviceProfile as FittedProfile
from edgepart.fcpm.ops import family as op_family
from edgepart.passes.info import node_info

# FLOP/s of a device with speed 1.0 when no profile is known (one core of a
# laptop-class CPU running PyTorch convolutions, roughly).
REFERENCE_FLOPS = 20e9

# What edgepart's device program adds to each node over the layer an FCPM profile predicts, in
# seconds of the profiled machine (÷ speed like the profile): the generated code's window lookups
# and put per node, and a copy of the input window of every row-padded convolution / pooling
# (border rows are padded explicitly). Measured by benchmarks/runtime_overhead.py (device program
# vs eager forward, 9 zoo models; results/runtime_overhead.md). Applied to profiled devices only.
RUNTIME_NODE_S = 13.6e-6
RUNTIME_PAD_BYTE_S = 0.21e-9
# What starting a stage costs a device that waited for its input pieces: the profile times layers
# back to back with warm caches, a stage after a wait starts cold. Per (device, stage) run, in
# seconds of the profiled machine (÷ speed); measured by benchmarks/stage_start.py (results/stage_start.md;
# 170 µs and 155 µs in two runs, 120–260 µs per model).
RUNTIME_STAGE_S = 170e-6
# The same on ONNX Runtime, on top of the session call its profile measured warm (``stage_start_s``):
# benchmarks/stage_start.py --backend onnxruntime (results/stage_start_ort.md).
ORT_STAGE_S = 37e-6
# What the bytes crossing a stage's boundary cost on ONNX Runtime, per byte of the profiled machine
# (÷ speed): the session reorders every input into its blocked (NCHWc) layout and every output back,
# and the program copies the feeds; the profile's layers, and a model run whole, pay it once at the
# model's input and output, a stage of a split plan at each of its inputs and outputs. Fitted by
# benchmarks/stage_overhead.py on the testbed's plans run in one process, with the stage start above
# (results/stage_overhead.md: 271 µs per MB; ONNX Runtime's profiler puts its reorders at 150–350).
ORT_STAGE_IO_S_PER_BYTE = 0.271e-9


@dataclass(frozen=True)
class StageOverhead:
    """What a device spends on each stage it runs beyond its layers, in seconds of the profiled machine:
    ``start_s`` per (device, stage), ``io_s_per_byte`` per byte the stage reads from outside it and leaves for
    after it, ``weights_s_per_byte`` per byte of weights its layers read; None: the cost model's default for
    that part. A cluster takes it per device as :meth:`device_keys` (÷ the device's speed); a model calibrated
    whole takes :meth:`whole_model_s` off its time, since the cost model charges its one stage that much."""
    start_s: float | None = None
    io_s_per_byte: float | None = None
    weights_s_per_byte: float | None = None

    def device_keys(self, speed: float) -> dict[str, float]:
        """The cluster description's keys for a device of ``speed`` (those of the parts given):
        ``stage_start_ms``, ``stage_io_us_per_mb``, ``stage_weights_us_per_mb``."""
        out = {}
        if self.start_s is not None:
            out["stage_start_ms"] = self.start_s * 1e3 / speed
        if self.io_s_per_byte is not None:
            out["stage_io_us_per_mb"] = self.io_s_per_byte * 1e12 / speed
        if self.weights_s_per_byte is not None:
            out["stage_weights_us_per_mb"] = self.weights_s_per_byte * 1e12 / speed
        return out

    def whole_model_s(self, io_bytes: float, weight_bytes: float) -> float:
        """Seconds (profiled machine) the parts given charge a model run whole as one stage."""
        return ((self.start_s or 0.0) + (self.io_s_per_byte or 0.0) * io_bytes
                + (self.weights_s_per_byte or 0.0) * weight_bytes)


def whole_model_bytes(model, inputs: tuple, output) -> tuple[int, int]:
    """(bytes of the model's inputs and ``output``, bytes of its parameters and buffers): what its one stage
    reads and leaves, and the weights its layers read, when it runs whole."""
    from torch.utils._pytree import tree_leaves
    io = sum(t.numel() * t.element_size() for t in tree_leaves((inputs, output)) if hasattr(t, "numel"))
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return int(io), int(weights)


# The same in emulated workers on ONNX Runtime, fitted jointly by benchmarks/stage_overhead.py on the testbed's
# plans (results/stage_overhead.md, non-negative three-term fit; 202 / 186 µs per stage, 0 per byte in and out,
# 23 / 24 µs per MB of weights in two runs): where a worker runs a stage after waiting for its pieces, the
# weights its layers read come from memory, and every device of a split stage reads each layer's weights
# whole. The testbed (its latest fit) and the demo plan with it; the cost model's defaults are the in-process
# figures above.
ORT_WORKER_STAGE = StageOverhead(start_s=186e-6, io_s_per_byte=0.0, weights_s_per_byte=2.4e-11)
_WINDOW_KINDS = ("conv2d", "max_pool2d", "avg_pool2d")

# The convolution epilogues (passes.epilogue) a device on ONNX Runtime computes inside the convolution:
# the exporter folds an eval-mode batch norm into the convolution's weights, and ONNX Runtime's graph
# optimisation (ORT_ENABLE_ALL, runtime.ort.session_options) fuses these activations into it (FusedConv,
# or its NCHWc Conv). Checked on the exporter's stage graphs against the model ORT optimises
# (tests/test_ort_fusion.py). SiLU stays an op of its own; Hardswish is fused into a convolution whose
# output feeds another one and not into the last of a stage graph, so it is charged.
ORT_FUSED_FAMILIES = frozenset({"bn", "act:relu", "act:relu6", "act:leaky_relu", "act:sigmoid", "act:tanh"})


def fused_into(info: dict, backend: str) -> str | None:
    """The convolution whose kernel computes this node on ``backend`` — its cost is then in the
    convolution's, and the node's own is 0 — or None if the node runs as an op of its own.

    The one rule the planner, the simulator and the online calibration cost fusion with. It holds
    when the node runs in the same stage on the same device as that convolution (the exported stage
    graph holds both); :meth:`CostModel.compute_time` with ``stage`` checks that."""
    if backend != "onnxruntime":
        return None
    conv = info.get("epilogue_of")
    return conv if conv and op_family(info) in ORT_FUSED_FAMILIES else None


def padded_input_bytes(info: dict, rows: int | None) -> float:
    """Bytes of the input window a row-padded convolution / pooling copies for ``rows`` output rows."""
    if info.get("kind") not in _WINDOW_KINDS or not info.get("in_shape"):
        return 0.0
    p = info.get("params") or {}
    pad = p.get("pad") if p.get("pad") is not None else p.get("padding")
    if isinstance(pad, (int, float)):
        pad = (pad, pad)
    if not pad or not any(pad[:2] if len(pad) == 4 else pad[:1]):
        return 0.0
    total = max(1, info.get("rows", 1))
    n = 4
    for d in info["in_shape"]:
        n *= d
    return float(n) * (total if rows is None else rows) / total


def ort_stage_start(profile, cold_s: float = ORT_STAGE_S) -> float:
    """Seconds (profiled machine) an ONNX Runtime stage costs beyond its layers: one session run's own
    cost, which the ORT profile measured warm and took off every layer (its ``stage_start_s``; 0 in a
    profile without it), + ``cold_s``, what starting it cold after a wait adds (:data:`ORT_STAGE_S`)."""
    meta = getattr(profile, "meta", {}) or {}
    return float(meta.get("stage_start_s", 0.0)) + cold_s


class DeviceProfile(Protocol):
    def predict(self, op: dict, rows: int, load: float = 0.0) -> float: ...


def calibrated_prediction(prof, info: dict, rows: int | None, load: float = 0.0,
                          calibration: dict[str, float] | None = None, memory_speed: float = 1.0) -> float:
    """Seconds the profiled machine needs for ``rows`` rows of ``info`` as calibrated online: the
    profile's prediction ÷ the ``calibration`` of the node's op type, with its memory-bound share
    ÷ ``memory_speed`` (see :class:`CostModel`)."""
    t = prof.predict(info, rows, load)
    if calibration:
        t /= calibration.get(op_family(info), 1.0)
    if memory_speed != 1.0 and hasattr(prof, "memory_bound_fraction"):
        m = prof.memory_bound_fraction(info, rows, t)
        t *= (1.0 - m) + m / memory_speed
    return t


def program_overhead(info: dict, rows: int, node_s: float = RUNTIME_NODE_S,
                     pad_byte_s: float = RUNTIME_PAD_BYTE_S) -> float:
    """Seconds (profiled machine) the device program adds to ``rows`` rows of a node over the layer
    the profile predicts: ``node_s`` per node + ``pad_byte_s`` per byte of row-padded input."""
    return node_s + pad_byte_s * padded_input_bytes(info, rows)


def node_factor(shape: list, rows: int) -> float:
    """A node's measured calibration (``[[rows, factor], ...]``, rows ascending) at ``rows``: linear between
    the measured points, the nearest point's factor outside them."""
    if rows <= shape[0][0]:
        return float(shape[0][1])
    for (r0, f0), (r1, f1) in zip(shape, shape[1:]):
        if rows <= r1:
            return float(f0 + (f1 - f0) * (rows - r0) / (r1 - r0))
    return float(shape[-1][1])


class CostModel:
    def __init__(self, cluster: Cluster, profiles: dict[str, DeviceProfile] | None = None,
                 loads: dict[str, float] | None = None, reference_flops: float = REFERENCE_FLOPS,
                 runtime_node_s: float = RUNTIME_NODE_S, runtime_pad_byte_s: float = RUNTIME_PAD_BYTE_S,
                 runtime_stage_s: float = RUNTIME_STAGE_S, ort_stage_s: float = ORT_STAGE_S, memory_speed: float | dict[str, float] | None = None):
        self.cluster = cluster
        self.profiles = dict(profiles or {})
        # how each device runs its stages: the profile of that backend costs it (device keys "profile"
        # for torch, "profiles" for the others), and the device program's overheads are that backend's
        self.backend = {d.name: d.backend or "torch" for d in cluster.devices}
        loaded: dict[str, DeviceProfile] = {}
        for d in cluster.devices:
            path = d.profile_for(self.backend[d.name])
            if d.name not in self.profiles and path:
                if path not in loaded:        # devices emulated from one profile share it
                    loaded[path] = FittedProfile.load(path)
                self.profiles[d.name] = loaded[path]
        self.loads = dict(loads or {})
        self.speed = {d.name: d.speed for d in cluster.devices}
        self.reference_flops = reference_flops
        self.runtime_node_s = runtime_node_s
        self.runtime_pad_byte_s = runtime_pad_byte_s
        self.runtime_stage_s = runtime_stage_s
        self.ort_stage_s = ort_stage_s
        self.stage_start_ms = {d.name: d.stage_start_ms for d in cluster.devices}
        self.stage_io_us_per_mb = {d.name: d.stage_io_us_per_mb for d in cluster.devices}
        self.stage_weights_us_per_mb = {d.name: d.stage_weights_us_per_mb for d in cluster.devices}
        self.ort_stage_io_s_per_byte = ORT_STAGE_IO_S_PER_BYTE
        # How fast a profiled device streams weights from memory now, relative to when it was
        # profiled (memory bandwidth is shared with other programs and drifts on its own; see
        # calibration.host_speed.HostSpeedProbe): the memory-bound share of a prediction is divided by it.
        # Default: each device's ``memory_speed`` in the cluster description.
        if memory_speed is None:
            self.memory_speed = {d.name: d.memory_speed for d in cluster.devices}
        elif isinstance(memory_speed, dict):
            self.memory_speed = dict(memory_speed)
        else:
            self.memory_speed = {d: float(memory_speed) for d in cluster.names}
        # per device and op type (FCPM family): speed now ÷ when profiled (calibration.op_types.measure_family_speeds)
        self.calibration = {d.name: dict(d.calibration) for d in cluster.devices}
        # per device and node: how it runs, whole and sliced, relative to its op type (calibration.layers.measure_node_calibration)
        self.node_calibration = {d.name: dict(d.node_calibration) for d in cluster.devices}
        self.fallback_devices = [d for d in cluster.names if d not in self.profiles]
        self._warned = False

    def warn_fallback(self) -> None:
        if self.fallback_devices and self.profiles and not self._warned:
            warnings.warn(f"no FCPM profile for devices {self.fallback_devices}: their compute time is "
                          "estimated as FLOPs ÷ declared speed", stacklevel=2)
            self._warned = True

    def compute_time(self, node, device: str, rows: int | None = None, stage=None) -> float:
        """Seconds for ``device`` to compute ``rows`` output rows of ``node`` (all rows if None).

        0 for a node its backend computes inside the convolution before it (:func:`fused_into`) —
        if ``stage`` (the names of the nodes the device runs in the same stage) is given, only when
        that convolution is among them; without it (the planners, which keep a convolution and its
        epilogue in one block) always.

        With a profile (its backend's): (the profile's prediction ÷ the device's ``calibration`` of the node's op
        type, × the node's own ``node_calibration`` at these rows, its memory-bound share ÷
        ``memory_speed``, + the torch device program's own overhead per
        node, :meth:`runtime_overhead`) ÷ the device's speed (relative to the profiled machine);
        without: FLOPs ÷ (speed × reference FLOP/s). Load slows both (the profile models it itself)."""
        info = node_info(node)
        total_rows = max(1, info.get("rows", 1))
        rows = total_rows if rows is None else rows
        if rows <= 0:
            return 0.0
        conv = fused_into(info, self.backend.get(device, "torch"))
        if conv is not None and (stage is None or conv in stage):
            return 0.0
        prof = self.profiles.get(device)
        if prof is not None:
            t = calibrated_prediction(prof, info, rows, self.loads.get(device, 0.0), self.calibration.get(device),
                                      self.memory_speed.get(device, 1.0))
            shape = self.node_calibration.get(device, {}).get(info.get("name"))
            if shape:
                t *= node_factor(shape, rows)
            if self.backend.get(device, "torch") == "torch":
                t += self.runtime_overhead(info, rows)
            return t / self._speed(device)
        self.warn_fallback()
        speed = self._speed(device) * max(1e-3, 1.0 - self.loads.get(device, 0.0))
        return info.get("flops", 0) * rows / total_rows / (speed * self.reference_flops)

    def runtime_overhead(self, info: dict, rows: int) -> float:
        """Seconds (profiled machine) the device program adds to ``rows`` rows of a node."""
        return program_overhead(info, rows, self.runtime_node_s, self.runtime_pad_byte_s)

    def stage_start_time(self, device: str) -> float:
        """Seconds ``device`` adds to each stage it runs (cold start after waiting for its pieces);
        charged once per (device, stage) by the simulator and the OFPM model. The device's
        ``stage_start_ms`` if the cluster gives one, else, on profiled devices only (like
        :meth:`runtime_overhead`), ``runtime_stage_s`` ÷ speed on torch and :func:`ort_stage_start` ÷ speed
        on ONNX Runtime."""
        ms = self.stage_start_ms.get(device)
        if ms is not None:
            return ms / 1e3
        if device not in self.profiles:
            return 0.0
        if self.backend.get(device, "torch") != "torch":
            return ort_stage_start(self.profiles[device], self.ort_stage_s) / self._speed(device)
        return self.runtime_stage_s / self._speed(device)

    def stage_io_time(self, device: str, nbytes: float) -> float:
        """Seconds ``device`` spends on the ``nbytes`` a stage reads from outside it and leaves for after
        it (:func:`edgepart.compiler.cost.simulator.stage_io_bytes`): the device's ``stage_io_us_per_mb``
        if the cluster gives one, else :data:`ORT_STAGE_IO_S_PER_BYTE` ÷ speed on a profiled device on
        ONNX Runtime, else 0 (on torch the per-node :meth:`runtime_overhead` covers the copies)."""
        if nbytes <= 0:
            return 0.0
        rate = self.stage_io_us_per_mb.get(device)
        if rate is not None:
            return rate * 1e-12 * nbytes
        if device not in self.profiles or self.backend.get(device, "torch") == "torch":
            return 0.0
        return self.ort_stage_io_s_per_byte * nbytes / self._speed(device)

    def stage_weights_time(self, device: str, nbytes: float) -> float:
        """Seconds ``device`` spends streaming the ``nbytes`` of weights a stage's layers read: the device's
        ``stage_weights_us_per_mb`` (its own time) if the cluster gives one, else 0 (the profile's layers
        and the calibrated model carry it)."""
        rate = self.stage_weights_us_per_mb.get(device)
        return rate * 1e-12 * nbytes if rate and nbytes > 0 else 0.0

    def charges_stage_weights(self) -> bool:
        """Whether :meth:`stage_weights_time` is other than 0 on any device."""
        return any(v for v in self.stage_weights_us_per_mb.values())

    def charges_stage_io(self) -> bool:
        """Whether :meth:`stage_io_time` is other than 0 on any device (the simulator skips counting bytes)."""
        return any(v for v in self.stage_io_us_per_mb.values()) or (
            self.ort_stage_io_s_per_byte > 0 and any(self.backend.get(d) == "onnxruntime" and d in self.profiles
                                                     for d in self.speed))

    def _speed(self, device: str) -> float:
        s = self.speed.get(device)
        return s if s is not None else self.cluster.device(device).speed   # (raises, naming the devices)

    def transfer_time(self, nbytes: int, src: str, dst: str) -> float:
        """Seconds to move ``nbytes`` from src to dst over their link (latency + size / bandwidth)."""
        if src == dst or nbytes <= 0:
            return 0.0
        link = self.cluster.link(src, dst)
        return link["latency_ms"] / 1e3 + nbytes * 8 / (link["bandwidth_mbps"] * 1e6)
