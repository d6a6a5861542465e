"""The ONNX Runtime backend of a device program: one stage as one static-shape ONNX graph.

A stage exported for a device (:mod:`edgepart.compiler.export_onnx`) takes as inputs the input
windows its nodes read from other stages or devices, ``i0, i1, ...`` in the order of
:func:`stage_io`, and returns the rows of its nodes that are read after the stage (by a later stage,
a send or the model's output), ``o0, o1, ...``. Border padding, halo rows and slicing are inside the
graph: the row numbers of the plan are constants of it, so a new plan needs a new export.

Sessions run with one intra-op and one inter-op thread, like the torch backend's workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgepart.ir import output as output_tree
from edgepart.ir.manifest import DeviceSpec, Send


def _ort():
    """onnxruntime, imported on first use: importing it starts a native thread, and a thread that
    allocates before a worker applies its malloc settings (runtime.allocator.keep_freed_memory: one
    arena) gets an arena of its own, whose heaps are unmapped and page-faulted in again per request."""
    import onnxruntime
    return onnxruntime


@dataclass(frozen=True)
class StageIO:
    """What an exported stage reads and writes: ``inputs`` are (producer, lo, hi) windows fed as
    ``i<k>``, ``outputs`` are (node, a, b) rows returned as ``o<k>``."""
    inputs: tuple[tuple[str, int, int], ...]
    outputs: tuple[tuple[str, int, int], ...]


def stage_io(spec: DeviceSpec, stage: int, output: dict) -> StageIO:
    """The inputs and outputs of ``stage`` on the device ``spec`` describes (deterministic: the
    exporter and the runtime both call this on the manifest, so the graph's inputs need no names)."""
    table = spec.rows[stage]
    windows: dict[str, set[tuple[int, int]]] = {}
    for entry in table.values():
        for producer, w in entry.inputs.items():
            if producer in table or producer in spec.constants or w.hi <= w.lo:
                continue    # computed here, a constant baked into the graph, or a window of padding only
            windows.setdefault(producer, set()).add((w.lo, w.hi))
    inputs = []
    for producer in sorted(windows):
        spans = windows[producer]
        # a window inside another is served by the larger one (the store finds the chunk holding it)
        kept = sorted(s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans))
        inputs += [(producer, lo, hi) for lo, hi in kept]
    later = {p for s, t in spec.rows.items() if s != stage for e in t.values() for p in e.inputs}
    later |= {a.tensor for a in spec.actions if isinstance(a, Send)}
    later |= set(output_tree.leaves(output))
    outputs = tuple((node, *entry.out) for node, entry in table.items() if node in later)
    return StageIO(tuple(inputs), outputs)


def session_options():
    """One intra-op and one inter-op thread, sequential execution, all graph optimisations."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def new_session(model: bytes):
    return _ort().InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


class OrtStage:
    """One exported stage, loaded into an ONNX Runtime session."""

    def __init__(self, model: bytes, io: StageIO):
        self.session = new_session(model)
        self.io = io
        # the exporter drops inputs the graph does not read (a window only its border padding uses)
        names = {i.name for i in self.session.get_inputs()}
        self.feeds = [(f"i{k}", w) for k, w in enumerate(io.inputs) if f"i{k}" in names]
        self.names = [f"o{k}" for k in range(len(io.outputs))]

    def run(self, store) -> None:
        """Read the stage's input windows from ``store``, run the graph, put its outputs' rows back."""
        feeds = {}
        for name, (producer, lo, hi) in self.feeds:
            x = store.get(producer, lo, hi)
            feeds[name] = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        results = self.session.run(self.names, feeds)
        for (node, a, b), value in zip(self.io.outputs, results):
            store.put(node, a, b, torch.from_numpy(value))
