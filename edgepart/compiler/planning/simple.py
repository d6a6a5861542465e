"""Simple strategies ``fn(gm, cluster) -> Plan``:

- single:        the whole model on the fastest device
- even:          every row-splittable block split in equal rows over all devices,
                 the rest on the fastest device
- proportional:  like even, rows in proportion to device speed
"""
from __future__ import annotations

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.planning.plan import Plan, Planner, Stage, compute_nodes
from edgepart.compiler.planning.primitives import blocks, merge_whole, runs, slices_for


def plan_single(gm: fx.GraphModule, cluster: Cluster) -> Plan:
    return Plan([Stage("whole", [n.name for n in compute_nodes(gm)], device=cluster.fastest())], "single",
                chosen="single")


def _plan_split(gm: fx.GraphModule, cluster: Cluster, weights: list[float], name: str) -> Plan:
    devices = cluster.names
    fastest = cluster.fastest()
    stages: list[Stage] = []
    for splittable, run in runs(gm):
        if not splittable:
            stages.append(Stage("whole", [n.name for n in run], device=fastest))
            continue
        for block in blocks(run):
            rows = block[-1].meta["rows"]
            sl = slices_for(rows, devices, weights)
            if len(sl) == 1:
                stages.append(Stage("whole", [n.name for n in block], device=sl[0][0]))
            else:
                stages.append(Stage("split", [n.name for n in block], slices=sl))
    return Plan(merge_whole(stages), name, chosen=name)


def plan_even(gm: fx.GraphModule, cluster: Cluster) -> Plan:
    return _plan_split(gm, cluster, [1.0] * len(cluster), "even")


def plan_proportional(gm: fx.GraphModule, cluster: Cluster) -> Plan:
    return _plan_split(gm, cluster, [d.speed for d in cluster.devices], "proportional")


SIMPLE: dict[str, Planner] = {"single": plan_single, "even": plan_even, "proportional": plan_proportional}
