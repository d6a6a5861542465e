"""Which backend each device runs its stages on: the cluster file's ``backend:``, or the faster one.

A device without a ``backend:`` key runs on whichever backend its profiles predict faster for the
whole model on it; without a profile of ONNX Runtime there is nothing to compare, and it keeps torch
(whose costs the planner knows). The choice is made before planning, so the planner costs each
device with the profile of the backend it will run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import CostModel
from edgepart.passes.graph import COMPUTE_OPS


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    why: str


def with_backends(cluster: Cluster, backends: dict[str, str]) -> Cluster:
    """A copy of ``cluster`` whose devices have these backends."""
    devices = [dataclasses.replace(d, backend=backends.get(d.name, d.backend)) for d in cluster.devices]
    return Cluster(devices, cluster.default_link, cluster.overrides, cluster.source, cluster.shared_medium)


def _whole_model_time(gm: fx.GraphModule, cluster: Cluster, device: str, backend: str) -> float:
    cost = CostModel(with_backends(cluster, {device: backend}))
    nodes = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    return sum(cost.compute_time(n, device) for n in nodes) + cost.stage_start_time(device)


def choose_backends(gm: fx.GraphModule, cluster: Cluster) -> tuple[Cluster, dict[str, BackendChoice]]:
    """The cluster with every device's backend decided, and per device what and why."""
    choice = {}
    for d in cluster.devices:
        if d.backend:
            choice[d.name] = BackendChoice(d.backend, "set in the cluster description")
        elif not d.profile_for("onnxruntime"):
            choice[d.name] = BackendChoice("torch", "no onnxruntime profile to compare with")
        elif not d.profile_for("torch"):
            choice[d.name] = BackendChoice("onnxruntime", "only an onnxruntime profile")
        else:
            t = {b: _whole_model_time(gm, cluster, d.name, b) for b in ("torch", "onnxruntime")}
            best = min(t, key=t.__getitem__)
            choice[d.name] = BackendChoice(best, "faster on its profiles: whole model "
                                           + ", ".join(f"{b} {s * 1e3:.1f} ms" for b, s in t.items()))
    return with_backends(cluster, {d: c.backend for d, c in choice.items()}), choice
