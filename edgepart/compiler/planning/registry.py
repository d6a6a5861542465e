"""Simple planners, chosen by ``strategy=``. The OFPM MILP is another strategy.

- single:        the whole model on the fastest device
- even:          every row-splittable block split in equal rows over all devices,
                 the rest on the fastest device
- proportional:  like even, rows in proportion to device speed

Blocks: a maximal run (in graph order) of splittable nodes is cut after every node
except where a row-local elementwise op only continues the block's last node
(conv → batch-norm → ReLU stay together), so each split stage has one output and
devices exchange only halo rows between stages.
"""
from __future__ import annotations

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.errors import PlanError

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
    out: list[list[fx.Node]] = []
    for n in run:
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
    counts = share_rows(rows, weights)
    out, at = [], 0
    for d, c in zip(devices, counts):
        if c > 0:
            out.append((d, at, at + c))
            at += c
    return out


def plan_single(gm: fx.GraphModule, cluster: Cluster) -> Plan:
    return Plan([Stage("whole", [n.name for n in compute_nodes(gm)], device=cluster.fastest())], "single")


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
    return Plan(_merge_whole(stages), name)


def _merge_whole(stages: list[Stage]) -> list[Stage]:
    out: list[Stage] = []
    for s in stages:
        if out and s.kind == "whole" and out[-1].kind == "whole" and out[-1].device == s.device:
            out[-1].nodes += s.nodes
        else:
            out.append(s)
    return out


def plan_even(gm: fx.GraphModule, cluster: Cluster) -> Plan:
    return _plan_split(gm, cluster, [1.0] * len(cluster), "even")


def plan_proportional(gm: fx.GraphModule, cluster: Cluster) -> Plan:
    return _plan_split(gm, cluster, [d.speed for d in cluster.devices], "proportional")


STRATEGIES = {"single": plan_single, "even": plan_even, "proportional": plan_proportional}


def register_strategy(name: str, fn) -> None:
    STRATEGIES[name] = fn


def make_plan(gm: fx.GraphModule, cluster: Cluster, strategy) -> Plan:
    if isinstance(strategy, Plan):
        return strategy
    if isinstance(strategy, dict):
        return Plan.from_dict(strategy)
    if strategy not in STRATEGIES:
        # The solver and the published baselines register themselves on import; importing them
        # here (not at module top) keeps planners free of a cycle and `import edgepart` light.
        import edgepart.compiler.planning.baselines  # noqa: F401
        import edgepart.compiler.planning.ofpm  # noqa: F401
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)} or pass a Plan")
    return STRATEGIES[strategy](gm, cluster)
