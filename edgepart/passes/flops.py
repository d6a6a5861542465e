"""Pass: multiply-accumulates and floating-point operations of every node.

node.meta["macs"]   multiply-accumulates of the whole node (convs and linears;
                    the published GMAC figures of VGG/ResNet count these)
node.meta["flops"]  floating-point operations: 2*macs for convs/linears, about one
                    per output element (per window element for pooling) elsewhere

Row-local work is spread evenly over output rows, so a slice of r rows of a node
costs flops * r / rows: the cost model uses that.
"""
from __future__ import annotations

import math

import torch.fx as fx

from edgepart.passes.graph import COMPUTE_OPS


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def node_macs_flops(node: fx.Node) -> tuple[int, int]:
    spec = node.meta["op"]
    out = _numel(node.meta.get("shape"))
    p = spec.params
    if spec.kind == "conv2d":
        kh, kw = p["kernel"]
        macs = out * (p["in_channels"] // p["groups"]) * kh * kw
        return macs, 2 * macs + (out if p.get("bias") or p.get("bias_node") is not None else 0)
    if spec.kind == "linear":
        macs = out * p["in_features"]
        return macs, 2 * macs + (out if p.get("bias") or p.get("bias_node") is not None else 0)
    if spec.kind in ("max_pool2d", "avg_pool2d"):
        kh, kw = p["kernel"]
        return 0, out * kh * kw
    if spec.kind == "batch_norm":
        return 0, 2 * out
    if spec.kind == "interpolate":
        return 0, 4 * out if p["mode"] != "nearest" else out
    if spec.kind in ("adaptive_avg_pool2d", "row_mean") and spec.input is not None:
        return 0, _numel(spec.input.meta.get("shape"))
    if spec.kind in ("identity", "flatten", "pad"):
        return 0, 0
    return 0, out


def annotate_flops(gm: fx.GraphModule) -> fx.GraphModule:
    for n in gm.graph.nodes:
        if n.op in COMPUTE_OPS:
            n.meta["macs"], n.meta["flops"] = node_macs_flops(n)
    return gm


def total_macs(gm: fx.GraphModule) -> int:
    return sum(n.meta.get("macs", 0) for n in gm.graph.nodes)
