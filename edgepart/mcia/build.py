"""A task's cost table from its version set: trace each version, cost its nodes on each tier, find the legal cuts.

A cut after node c-1 (prefix [0, c) of the compute nodes in graph order) is *legal* when exactly one
tensor crosses it (one producer before the cut with a user at or after it, and it is a tensor, not a
tuple); cut 0 (the input crosses) and cut N (the output crosses) always are. The bytes crossing and
the per-node compute seconds (edgepart.compiler.cost.CostModel on the end device, the edge server and
the cloud, each at full speed) follow the same rules as the Neurosurgeon baseline
(compiler.planning.baselines.plan_neurosurgeon). Versions that do not compile (int8: they run only
whole, in-process) are left out of the table.
"""
from __future__ import annotations

import itertools

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.planning.ofpm import param_bytes
from edgepart.compiler.planning.plan import compute_nodes
from edgepart.passes.trace import trace
from edgepart.errors import EdgepartError
from edgepart.mcia.scenario import Task, Tiers
from edgepart.mcia.table import TaskTable, VersionCosts, reference_latency
from edgepart.passes import analyse
from edgepart.versions import VersionSet


def _tensor_bytes(n: fx.Node) -> int:
    return int(n.meta.get("bytes", 0)) if n.meta.get("shape") is not None else 0


def legal_cuts(gm: fx.GraphModule) -> list[tuple[int, int, str]]:
    """(c, bytes crossing, label) for every legal cut c in 0..N, prefix [0, c) before it."""
    nodes = compute_nodes(gm)
    index = {n.name: i for i, n in enumerate(nodes)}
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    out = [(0, sum(_tensor_bytes(p) for p in inputs), "input")]
    for c in range(1, len(nodes)):
        crossing = [p for p in inputs + nodes[:c]
                    if any(index.get(u.name, -1) >= c for u in p.users if u.op != "output")
                    or (p in outputs and c < len(nodes))]
        if len(crossing) == 1 and crossing[0].meta.get("shape") is not None:
            out.append((c, _tensor_bytes(crossing[0]), nodes[c - 1].name))
    out.append((len(nodes), sum(_tensor_bytes(o) for o in outputs), "output"))
    return out


def version_costs(gm: fx.GraphModule, cost: CostModel, end: str, edge: str, cloud: str | None,
                  name: str, accuracy: float) -> VersionCosts:
    nodes = compute_nodes(gm)
    cuts = legal_cuts(gm)

    def prefix(values):
        acc = [0.0, *itertools.accumulate(values)]
        return tuple(acc[c] for c, _, _ in cuts)
    return VersionCosts(
        name=name, accuracy=accuracy,
        end_s=prefix(cost.compute_time(n, end) for n in nodes),
        edge_s=prefix(cost.compute_time(n, edge) for n in nodes),
        cloud_s=prefix(cost.compute_time(n, cloud) for n in nodes) if cloud else prefix(0.0 for _ in nodes),
        cut_bytes=tuple(b for _, b, _ in cuts),
        param_bytes=tuple(int(v) for v in prefix(param_bytes(gm, n) for n in nodes)),
        cuts=tuple(label for _, _, label in cuts))


def build_table(task: Task, cluster: Cluster, tiers: Tiers, vs: VersionSet | None = None) -> TaskTable:
    """The cost table of ``task`` (its version set loaded from ``task.versions`` unless given)."""
    if vs is None:
        if task.versions is None:
            raise EdgepartError(f"task {task.name!r}: no versions directory")
        vs = VersionSet.load(task.versions)
    cost = CostModel(cluster)
    cloud = tiers.cloud.name if tiers.cloud else None
    versions = []
    for name in vs.names:
        rec = vs.records[name]
        if not rec.partitionable:
            continue
        model, x = vs.model(name)
        gm = trace(model, (x,))
        analyse(gm, cluster)
        versions.append(version_costs(gm, cost, task.source, tiers.edge.name, cloud, name, rec.accuracy))
    if not versions:
        raise EdgepartError(f"task {task.name!r}: version set {vs.dir} has no partitionable version")
    full = max(versions, key=lambda v: v.param_bytes[-1])
    return TaskTable(task, tuple(versions), reference_latency(full))
