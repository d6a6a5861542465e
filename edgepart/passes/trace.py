"""Trace an nn.Module with torch.fx and record the shape metadata of every node on example inputs.

The graph is compiled for fixed input shapes, so anything that only depends on
shapes (``x.size(0)``, ``x.shape[2]``) is folded to a constant here: later passes,
the planner and the generated code see only tensor-valued nodes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from edgepart.errors import TraceError
from edgepart.passes.graph import COMPUTE_OPS
from edgepart.passes.shapes import record_value


class _Recorder(fx.Interpreter):
    """Runs the graph once, recording each node's shape metadata (passes.shapes.record_value).

    fx.Interpreter frees each value after its last user has run, and only metadata
    is recorded, so at most the live activations of the example run are held.
    """

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as e:  # name the node, not a frame deep inside torch
            raise TraceError(f"node {n.name!r} ({n.format_node()}) failed on the example input: "
                             f"{type(e).__name__}: {e}") from e
        record_value(n, value)
        return value


def _replace_in(arg: Any, node: fx.Node, value: Any) -> Any:
    if arg is node:
        return value
    if isinstance(arg, tuple):
        return tuple(_replace_in(a, node, value) for a in arg)
    if isinstance(arg, list):
        return [_replace_in(a, node, value) for a in arg]
    if isinstance(arg, dict):
        return {k: _replace_in(a, node, value) for k, a in arg.items()}
    if isinstance(arg, slice):
        return slice(_replace_in(arg.start, node, value), _replace_in(arg.stop, node, value),
                     _replace_in(arg.step, node, value))
    return arg


def fold_shape_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace compute nodes whose value holds no tensor (sizes, shapes, ints) by that constant."""
    for n in list(gm.graph.nodes):
        if n.op not in COMPUTE_OPS or "constant" not in n.meta:
            continue
        v = n.meta["constant"]
        for user in list(n.users):
            user.args = _replace_in(user.args, n, v)
            user.kwargs = _replace_in(user.kwargs, n, v)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def trace(model: torch.nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Symbolically trace ``model`` and record every node's shape metadata on ``example_inputs``."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if model.training:
        raise TraceError("the model is in training mode; call model.eval() first "
                         "(dropout and batch-norm statistics make training-mode outputs non-deterministic)")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. "
                         "Data-dependent Python control flow is the usual cause; make it a leaf module "
                         "or rewrite it with tensor operations.") from e
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise TraceError(f"the model takes {len(placeholders)} inputs "
                         f"({', '.join(p.name for p in placeholders)}) but {len(example_inputs)} were given")
    for p, x in zip(placeholders, example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TraceError(f"input {p.name!r} must be a tensor, got {type(x).__name__}")
    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)
    fold_shape_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
