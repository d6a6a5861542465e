"""Pass: shapes, dtypes, bytes and row counts of every tensor-valued node.

node.meta["shape"]  tuple of ints (None for a tuple-valued node)
node.meta["dtype"]  torch dtype name, e.g. "float32"
node.meta["bytes"]  size of the whole value in bytes
node.meta["rows"]   how many rows the value has: H for a 4-D (N, C, H, W) tensor, else 1
                    (a non-4-D value always moves as one piece, "rows [0, 1)")
"""
from __future__ import annotations

import torch
import torch.fx as fx

from edgepart.errors import TraceError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rows_of_shape(shape) -> int:
    return int(shape[2]) if shape is not None and len(shape) == 4 else 1


def annotate_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op == "get_attr":
            v = _fetch_attr(gm, n.target)
        else:
            if "value_example" not in n.meta:
                raise TraceError(f"node {n.name!r} has no recorded value; run compiler.trace first")
            v = n.meta["value_example"]
        if isinstance(v, torch.Tensor):
            n.meta["shape"] = tuple(v.shape)
            n.meta["dtype"] = dtype_name(v.dtype)
            n.meta["bytes"] = v.numel() * v.element_size()
            n.meta["rows"] = rows_of_shape(v.shape)
        else:  # tuple of tensors: moves as one piece
            n.meta["shape"] = None
            n.meta["dtype"] = None
            n.meta["bytes"] = _tree_bytes(v)
            n.meta["rows"] = 1
    return gm


def _tree_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_tree_bytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_tree_bytes(x) for x in v.values())
    return 0


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
