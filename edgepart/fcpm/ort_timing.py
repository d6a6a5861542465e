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
import logging
import os
import sys
import tempfile
import warnings
from typing import Callable

import numpy as np
import torch

from edgepart.fcpm.ops import Runner, time_callable
from edgepart.runtime.ort import new_session

log = logging.getLogger("edgepart.fcpm")

OPSET = 17


class _Call(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _export(fn: Callable, x: torch.Tensor) -> bytes:
    """``fn`` at input ``x`` as an ONNX model; an op the exporter cannot write raises (the caller reports it
    in a line of its own). The exporter's dump of the graph on such a failure, which its C++ side writes to
    standard output whatever its log setting, goes to the debug log instead of the user's terminal."""
    buf = io.BytesIO()
    with _CapturedStdout() as failed, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")     # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(_Call(fn).eval(), (x,), buf, dynamo=False, opset_version=OPSET, input_names=["x"])
        except Exception:
            failed.append(True)
            raise
    return buf.getvalue()


class _CapturedStdout:
    """File descriptor 1 goes to a temporary file for the block; afterwards what it caught is written back
    to standard output, or, if the block appended to the list it was given, to the debug log."""

    def __enter__(self) -> list:
        self.failed: list = []
        sys.stdout.flush()
        self.tmp = tempfile.TemporaryFile()
        self.saved = os.dup(1)
        os.dup2(self.tmp.fileno(), 1)
        return self.failed

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        self.tmp.seek(0)
        text = self.tmp.read().decode(errors="replace")
        self.tmp.close()
        if text and self.failed:
            log.debug("ONNX exporter output: %s", text[-4000:])
        elif text:
            sys.stdout.write(text)


class OrtRunner:
    """A zero-argument callable: ``fn(x)`` (e.g. a :class:`Runner`'s computation) in an ONNX Runtime session
    (or the ONNX graph ``model`` already exported from it)."""

    def __init__(self, fn: Callable | None, x: torch.Tensor, model: bytes | None = None):
        self.model = model if model is not None else _export(fn, x)
        self.session = new_session(self.model)
        self.feed = {"x": np.ascontiguousarray(x.numpy())}

    def __call__(self):
        return self.session.run(None, self.feed)


def ort_layer(info: dict, rows: int | None = None, seed: int = 0) -> tuple[OrtRunner, torch.Tensor]:
    """``(runner, its input)``: the :class:`Runner` of ``info`` at ``rows`` exported and loaded in a
    session, the same graph as ``OrtRunner(Runner(info, rows).fn, ...)``, with the torch layer (its
    weights) dropped before the session is made. The session copies the graph's weights and
    prepacks them, so a layer made the other way held its weights five or six times at once:
    VGG-16's 411 MB classifier layer took 2.4 GB to set up (``results/calibration_memory.md``)."""
    runner = Runner(info, rows, seed=seed)
    x = runner._x
    model = _export(runner.fn, x)
    del runner
    return OrtRunner(None, x, model), x


# The exported graphs the sweep keeps for its second pass, at most this many bytes: a full sweep's
# sessions held every layer's weights several times over (prepacked) and took 22 GB of this 24 GB
# host before the sweep ended; a graph beyond the cap is exported again when its job comes round.
CACHE_BYTES = 1 << 30


def ort_runner_factory(cache_bytes: int = CACHE_BYTES) -> Callable[[dict, int, int], OrtRunner]:
    """``(info, rows, seed) -> OrtRunner``, a new session each time (the caller drops it after timing),
    from the exported graph and input kept since an earlier call with the same (seed, rows) while what is
    kept fits in ``cache_bytes`` (the sweep times each job in several passes and load levels). A kept job
    builds no torch layer; a new one is made by :func:`ort_layer` (its torch weights dropped before the
    session is made)."""
    cache: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = {}
    held = [0]

    def make(info: dict, rows: int, seed: int) -> OrtRunner:
        key = (seed, rows)
        if key in cache:
            model, x = cache[key]
            return OrtRunner(None, x, model)
        r, x = ort_layer(info, rows, seed=seed)
        size = len(r.model) + x.numel() * x.element_size()
        if held[0] + size <= cache_bytes:
            cache[key] = (r.model, x)
            held[0] += size
        return r
    return make


def ort_net(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A network as one ONNX Runtime session run on ``x``."""
    return OrtRunner(net, x)


def session_call_s(target_s: float = 0.2) -> float:
    """Seconds one run of a session costs beyond its graph: an Identity of one float."""
    call = OrtRunner(lambda x: x + 0.0, torch.zeros(1))
    return time_callable(call, target_s=target_s, min_repeats=20, max_repeats=2000)["t"]
