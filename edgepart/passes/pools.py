"""Pass: a global average pool becomes a mean over each row, then a mean over the rows.

``mean over (H, W) == mean over H of (mean over W)``. The first part is row-local — row i of the
row means needs only row i of the input — so it stays in the split stage that computed the
input, on the devices that hold the rows; only the row means (N, C, H, 1), W times smaller than
the input, move to the device that takes the second part (the ``combine``) and the small MLP of a
squeeze-excite block after it. Before this pass a global pool ended the split stage and its whole
input was gathered onto one device (an SE block inside a trunk moved every activation it pooled).

Exact up to the order of the float summation (two means instead of one): differences are at the
float32 rounding level, ~1e-7 relative, well inside edgepart's 1e-4 exactness tolerance.

A squeeze-excite MLP — the one-row nodes from a combine back into the rows (``x * s``) — is marked
``replicated`` (``mark_replicated``): it may run inside a split stage, every device of the stage
computing all of it. Such a stage starts with an all-gather of the row means (each device receives
the other devices' rows of them, (N, C, rows, 1) floats per message), then each device takes the
mean, runs the MLP and scales its own rows: one exchange instead of a gather onto one device and a
broadcast of the scale, and no stage boundary on either side of the MLP. The messages are ordinary
row transfers, so the schedule, the simulator, the MILP and both executors handle them unchanged.

Recognised: ``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)`` and ``x.mean((2, 3))`` /
``torch.mean(x, (2, 3))`` (any spelling of the last two dims, with or without ``keepdim``) of a 4-D
input with at least two rows. The pool node keeps its name and becomes the combine; the row means
are a new node ``<pool>_rows``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from edgepart.passes.graph import COMPUTE_OPS
from edgepart.passes.shapes import record_value

ROW_MEAN_SUFFIX = "_rows"
COMBINE = "global_pool_combine"     # node.meta key, True on a pool this pass rewrote into its combine


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) in ((1, 1), (1,)))


def _dims(dim) -> set[int] | None:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return {d % 4 for d in dims}


def global_pool(gm: fx.GraphModule, n: fx.Node) -> tuple[fx.Node, bool] | None:
    """(input, keepdim) when ``n`` averages a 4-D input over both spatial dims, else None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is nn.AdaptiveAvgPool2d and _is_one(m.output_size) and len(n.args) == 1 and not n.kwargs:
            return n.args[0], True
        return None
    if n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        size = n.kwargs.get("output_size", n.args[1] if len(n.args) > 1 else None)
        return (n.args[0], True) if n.args and _is_one(size) else None
    if (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
        a = dict(zip(("input", "dim", "keepdim"), n.args), **n.kwargs)
        if set(a) - {"input", "dim", "keepdim"} or "dim" not in a or _dims(a["dim"]) != {2, 3}:
            return None
        keepdim = a.get("keepdim", False)
        return (a["input"], keepdim) if isinstance(keepdim, bool) else None
    return None


def split_global_pools(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every global average pool of a 4-D input with >= 2 rows into row means + combine."""
    changed = False
    for n in list(gm.graph.nodes):
        found = global_pool(gm, n) if n.op in ("call_module", "call_function", "call_method") else None
        if found is None:
            continue
        x, keepdim = found
        shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
        if shape is None or len(shape) != 4 or shape[2] < 2 or x.meta.get("dtype") not in ("float32", "float64",
                                                                                            "float16", "bfloat16"):
            continue
        with gm.graph.inserting_before(n):
            rows = gm.graph.create_node("call_method", "mean", (x, 3), {"keepdim": True},
                                        name=n.name + ROW_MEAN_SUFFIX)
        record_value(rows, torch.empty((*shape[:3], 1), dtype=getattr(torch, x.meta["dtype"]), device="meta"))
        n.op, n.target = "call_method", "mean"
        n.args, n.kwargs = (rows, (2, 3)), {"keepdim": keepdim}
        n.meta[COMBINE] = True
        changed = True
    if changed:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return gm


def mark_replicated(gm: fx.GraphModule) -> fx.GraphModule:
    """Mark the one-row nodes between a global pool's combine and the rows it feeds back into as
    ``replicated`` (and splittable: a split stage may hold them; every device computes them whole).

    A node qualifies when its value has one row, every input is a constant, a qualifying node or
    (for a combine) the row means it averages, and every user qualifies or is a splittable
    node with more than one row. Run after passes.rowmap (it reads ``splittable``)."""
    def one_row(n: fx.Node) -> bool:
        return n.op in COMPUTE_OPS and n.meta.get("rows") == 1 and not n.meta.get("splittable")

    cand: set[str] = set()
    for n in gm.graph.nodes:                       # forward: what every input allows
        if not one_row(n):
            continue
        inputs = [p for p in n.all_input_nodes if p.op != "get_attr"]
        combine = n.meta.get(COMBINE) and inputs[0].meta.get("splittable")    # its row means stay split
        if combine or (inputs and all(p.name in cand for p in inputs)):
            cand.add(n.name)
    changed = True
    while changed:                                 # backward: every user must take it back into rows
        changed = False
        for n in gm.graph.nodes:
            if n.name in cand and not all(u.name in cand or (u.meta.get("splittable") and u.meta.get("rows", 1) > 1)
                                          for u in n.users):
                cand.discard(n.name)
                changed = True
    for n in gm.graph.nodes:
        if n.name in cand:
            n.meta.update(splittable=True, replicated=True, why_whole="")
    return gm
