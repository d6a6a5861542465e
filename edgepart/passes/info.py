"""A node's facts as one plain record: what the cost model and the FCPM read of an analysed node.

The dict is JSON-able (it is what FCPM profiles record for the layers they time) and built only
from ``node.meta`` that the passes wrote (shapes, the op spec, FLOPs).
"""
from __future__ import annotations

from typing import Any


def node_info(node) -> dict[str, Any]:
    """What the cost model needs to know of a node: from an fx node or a manifest entry."""
    if isinstance(node, dict):
        return node
    spec = node.meta["op"]
    tensor_inputs = [a for a in node.all_input_nodes if a.meta.get("shape") is not None and a.op != "get_attr"]
    return {"name": node.name, "kind": spec.kind, "params": spec.params, "macs": node.meta.get("macs", 0),
            "flops": node.meta.get("flops", 0), "rows": node.meta.get("rows", 1),
            "shape": node.meta.get("shape"), "bytes": node.meta.get("bytes", 0),
            "in_shape": spec.input.meta.get("shape") if spec.input is not None else None,
            # for the FCPM (edgepart.fcpm): which function, and how much it reads
            "label": spec.label, "n_inputs": len(tensor_inputs),
            "in_shapes": [tuple(a.meta["shape"]) for a in tensor_inputs],
            # the convolution whose output alone this BN / activation reads (passes.epilogue), or None
            "epilogue_of": node.meta.get("epilogue_of")}
