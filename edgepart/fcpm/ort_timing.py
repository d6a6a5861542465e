"""Timing in ONNX Runtime, for ``edgepart profile --backend onnxruntime``.

The sweep's layers (:class:`edgepart.fcpm.ops.Runner`: a row slice of one node, border padding
and halo rows as the device program has them) and the synthetic networks are exported to ONNX
and timed as one-thread ONNX Runtime sessions, the way a device on that backend runs a stage.

Each session run has a cost of its own (feeds, outputs, the executor's start), which a stage pays
once however many layers it holds: :func:`session_call_s` measures it on an empty graph, the profiler
subtracts it from each layer's time and stores it as the profile's ``stage_start_s``, which the cost
model charges per stage run (:meth:`edgepart.compiler.cost.model.CostModel.stage_start_time`).
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import torch

from edgepart.fcpm.ops import Runner, time_callable
from edgepart.runtime.ort import new_session

OPSET = 17


class _Call(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _session(fn: Callable, x: torch.Tensor):
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")     # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_Call(fn).eval(), (x,), buf, dynamo=False, opset_version=OPSET, input_names=["x"])
    return new_session(buf.getvalue())


class OrtRunner:
    """A zero-argument callable: ``fn(x)`` (e.g. a :class:`Runner`'s computation) in an ONNX Runtime session."""

    def __init__(self, fn: Callable, x: torch.Tensor):
        self.session = _session(fn, x)
        self.feed = {"x": np.ascontiguousarray(x.numpy())}

    def __call__(self):
        return self.session.run(None, self.feed)


def ort_runner_factory() -> Callable[[dict, int, int], OrtRunner]:
    """``(info, rows, seed) -> OrtRunner``, exporting each (seed, rows) once (the sweep times each
    job in several passes and load levels)."""
    cache: dict[tuple[int, int], OrtRunner] = {}

    def make(info: dict, rows: int, seed: int) -> OrtRunner:
        key = (seed, rows)
        if key not in cache:
            runner = Runner(info, rows, seed=seed)
            cache[key] = OrtRunner(runner.fn, runner._x)
        return cache[key]
    return make


def ort_net(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A network as one ONNX Runtime session run on ``x``."""
    return OrtRunner(net, x)


def session_call_s(target_s: float = 0.2) -> float:
    """Seconds one run of a session costs beyond its graph: an Identity of one float."""
    call = OrtRunner(lambda x: x + 0.0, torch.zeros(1))
    return time_callable(call, target_s=target_s, min_repeats=20, max_repeats=2000)["t"]
