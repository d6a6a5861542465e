"""Pass: shapes, dtypes, bytes and row counts of every node's value.

The values exist only while compiler.trace runs the graph once on the example
inputs; it calls :func:`record_value` for each node as it is computed, and the
interpreter drops each tensor once its last user has run, so node.meta holds
metadata and never an example tensor (issue #15: for VGG-16 at 224 the values
were about 110 MiB that every fresh Bundle kept).

node.meta["shape"]     tuple of ints (None for a value that is not one tensor, e.g. a tuple)
node.meta["dtype"]     torch dtype name, e.g. "float32" (None likewise)
node.meta["bytes"]     size of the tensors in the value, in bytes
node.meta["rows"]      how many rows the value has: H for a 4-D (N, C, H, W) tensor, else 1
                       (a non-4-D value always moves as one piece, "rows [0, 1)")
node.meta["constant"]  only for a value holding no tensor (``x.size(2)``, ``x.shape``): the
                       value itself (a torch.Size as a tuple), which compiler.trace folds
                       into the node's users
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from edgepart.errors import TraceError

SHAPE_KEYS = ("shape", "dtype", "bytes", "rows")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rows_of_shape(shape) -> int:
    return int(shape[2]) if shape is not None and len(shape) == 4 else 1


def holds_tensor(v: Any) -> bool:
    """Whether ``v`` is a tensor or a (nested) tuple, list or dict containing one."""
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(holds_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(holds_tensor(x) for x in v.values())
    return False


def record_value(n: fx.Node, v: Any) -> None:
    """Describe ``v``, the value node ``n`` computed, in n.meta (keys above); keeps no tensor."""
    if isinstance(v, torch.Tensor):
        n.meta.update(shape=tuple(v.shape), dtype=dtype_name(v.dtype), bytes=v.numel() * v.element_size(),
                      rows=rows_of_shape(v.shape))
        return
    n.meta.update(shape=None, dtype=None, bytes=_tree_bytes(v), rows=1)   # moves as one piece
    if not holds_tensor(v):
        n.meta["constant"] = tuple(v) if isinstance(v, torch.Size) else v


def check_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Raise TraceError unless every node's value was recorded (the graph came from compiler.trace)."""
    for n in gm.graph.nodes:
        if n.op != "output" and any(k not in n.meta for k in SHAPE_KEYS):
            raise TraceError(f"node {n.name!r} has no recorded shape; run compiler.trace first")
    return gm


def _tree_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_tree_bytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_tree_bytes(x) for x in v.values())
    return 0
