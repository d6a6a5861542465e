"""Building blocks every planner shares: runs and blocks of the graph, integer row shares.

Blocks: a maximal run (in graph order) of splittable nodes is cut after every node
except where a row-local elementwise op only continues the block's last node
(conv → batch-norm → ReLU stay together), so each split stage has one output and
devices exchange only halo rows between stages. A block never ends at a replicated node (a
squeeze-excite MLP, passes.pools): it joins the block that scales the rows with it.

A leaf of the planning package: it imports only the plan records, so every
strategy module can use it without importing another strategy.
"""
from __future__ import annotations

import torch.fx as fx

from edgepart.compiler.planning.plan import Stage, compute_nodes

ELEMENTWISE = {"batch_norm", "activation", "identity", "pointwise"}


def runs(gm: fx.GraphModule) -> list[tuple[bool, list[fx.Node]]]:
    """Maximal runs of compute nodes (graph order) that are all splittable or all not."""
    out: list[tuple[bool, list[fx.Node]]] = []
    for n in compute_nodes(gm):
        s = bool(n.meta.get("splittable"))
        if out and out[-1][0] == s:
            out[-1][1].append(n)
        else:
            out.append((s, [n]))
    return out


def blocks(run: list[fx.Node]) -> list[list[fx.Node]]:
    """A splittable run cut into blocks (see the module docstring), in graph order."""
    out: list[list[fx.Node]] = []
    for n in run:
        if out and out[-1][-1].meta.get("replicated"):
            out[-1].append(n)       # a one-row node every device computes never ends a block
            continue
        if out:
            block = out[-1]
            last = block[-1]
            in_block = {m.name for m in block}
            producers = [p for p in n.all_input_nodes if p.op != "get_attr"]
            continues = (n.meta["op"].kind in ELEMENTWISE and last in producers and len(last.users) == 1
                         and all(p.name in in_block or p.meta["rows"] == 1 or p.op == "placeholder"
                                 for p in producers if p is not last)
                         and all(len(m.users) == 1 for m in block[:-1]))
            if continues:
                block.append(n)
                continue
        out.append([n])
    return out


def share_rows(rows: int, weights: list[float]) -> list[int]:
    """Integer row counts ∝ weights summing to ``rows`` (largest remainder), zero allowed."""
    total = sum(weights)
    exact = [rows * w / total for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: rows - sum(counts)]:
        counts[i] += 1
    return counts


def slices_for(rows: int, devices: list[str], weights: list[float]) -> list[tuple[str, int, int]]:
    """Contiguous row slices (device, a, b) in device order, rows ∝ weights; devices given no row are left out."""
    counts = share_rows(rows, weights)
    out, at = [], 0
    for d, c in zip(devices, counts):
        if c > 0:
            out.append((d, at, at + c))
            at += c
    return out


def merge_whole(stages: list[Stage]) -> list[Stage]:
    """Consecutive whole stages on one device become one stage (extends the first in place)."""
    out: list[Stage] = []
    for s in stages:
        if out and s.kind == "whole" and out[-1].kind == "whole" and out[-1].device == s.device:
            out[-1].nodes += s.nodes
        else:
            out.append(s)
    return out
