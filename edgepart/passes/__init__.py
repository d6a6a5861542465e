"""Analysis passes over a traced fx.GraphModule; each annotates node.meta and returns the module.

Shapes are recorded by compiler.trace while it runs the example inputs (passes.shapes);
the passes here derive everything else from node.meta, the module and the arguments.
"""
from __future__ import annotations

import torch.fx as fx

from edgepart.passes.epilogue import annotate_epilogues
from edgepart.passes.flops import annotate_flops
from edgepart.passes.ops import annotate_ops
from edgepart.passes.pools import mark_replicated, split_global_pools
from edgepart.passes.rowmap import annotate_rowmaps
from edgepart.passes.shapes import check_shapes

__all__ = ["analyse", "split_global_pools", "mark_replicated", "annotate_ops", "annotate_rowmaps", "annotate_flops",
           "annotate_epilogues"]


def analyse(gm: fx.GraphModule, cluster=None, split_pools: bool = True) -> fx.GraphModule:
    """Run every analysis pass in order (global pools split → ops → row maps → replicated
    squeeze-excite MLPs → FLOPs → convolution epilogues) on a graph from compiler.trace. ``split_pools=False`` leaves global
    pools whole (the compiler before ``passes.pools``; for measuring what the pass gains)."""
    check_shapes(gm)
    if split_pools:
        split_global_pools(gm)
    annotate_ops(gm)
    annotate_rowmaps(gm)
    mark_replicated(gm)
    annotate_flops(gm)
    annotate_epilogues(gm)
    return gm
