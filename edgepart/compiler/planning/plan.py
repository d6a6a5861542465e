"""A plan: who computes what. Pure data (JSON), no code.

A plan is a list of stages in execution order. A *whole* stage runs its nodes on
one device. A *split* stage runs a connected group of row-splittable nodes on
several devices; each owns a contiguous row range ("slice") of the stage's last
node (its anchor), and computes whatever rows of the other nodes that needs,
halo included. Transfers are derived from the plan (see schedule.py).

A plan made by a strategy also says how it was chosen: ``chosen`` names the
candidate that won (the strategy's own name for a strategy that makes one plan;
``milp``, ``milp+refine`` or ``warm:<strategy>`` for ofpm), and ``candidates``
lists every candidate a strategy compared, with its predicted latency or the
error that ruled it out.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.passes.graph import COMPUTE_OPS
from edgepart.errors import PlanError


@dataclass
class Stage:
    kind: str                                   # "whole" or "split"
    nodes: list[str]
    device: str | None = None                   # whole: the device
    slices: list[tuple[str, int, int]] = field(default_factory=list)  # split: (device, a, b), by row

    def devices(self) -> list[str]:
        return [self.device] if self.kind == "whole" else [d for d, a, b in self.slices]

    def to_dict(self) -> dict:
        if self.kind == "whole":
            return {"kind": "whole", "nodes": list(self.nodes), "device": self.device}
        return {"kind": "split", "nodes": list(self.nodes), "slices": [[d, a, b] for d, a, b in self.slices]}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        if d.get("kind") == "whole":
            return cls("whole", list(d["nodes"]), device=d["device"])
        if d.get("kind") == "split":
            return cls("split", list(d["nodes"]), slices=[(str(s[0]), int(s[1]), int(s[2])) for s in d["slices"]])
        raise PlanError(f"stage kind must be 'whole' or 'split', got {d.get('kind')!r}")


@dataclass
class Candidate:
    """One plan a strategy compared: its predicted latency (seconds, exact schedule + simulator), or
    ``error`` (``"Type: message"``) when it could not be planned or evaluated (then no latency)."""
    name: str
    latency: float | None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "latency": self.latency, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        latency = d.get("latency")
        return cls(str(d["name"]), None if latency is None else float(latency), d.get("error"))


@dataclass
class Plan:
    stages: list[Stage]
    strategy: str = "custom"
    chosen: str | None = None                   # the winning candidate; None for a plan not made by a strategy
    candidates: list[Candidate] = field(default_factory=list)   # what the strategy compared (ofpm)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "chosen": self.chosen,
                "candidates": [c.to_dict() for c in self.candidates],
                "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Also reads plans written before ``chosen`` / ``candidates`` existed (they stay unset)."""
        try:
            return cls([Stage.from_dict(s) for s in d["stages"]], d.get("strategy", "custom"), d.get("chosen"),
                       [Candidate.from_dict(c) for c in d.get("candidates") or []])
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from e

    def devices(self) -> list[str]:
        seen: list[str] = []
        for s in self.stages:
            for d in s.devices():
                if d not in seen:
                    seen.append(d)
        return seen


Planner = Callable[[fx.GraphModule, Cluster], Plan]
"""A strategy: plans a traced, analysed graph for a cluster."""


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]


def validate_plan(gm: fx.GraphModule, plan: Plan, cluster: Cluster) -> None:
    """Raise PlanError naming the stage, node or device if ``plan`` is not legal."""
    nodes = {n.name: n for n in compute_nodes(gm)}
    order = {n.name: i for i, n in enumerate(compute_nodes(gm))}
    stage_of: dict[str, int] = {}
    for i, st in enumerate(plan.stages):
        if not st.nodes:
            raise PlanError(f"stage {i} has no nodes")
        for name in st.nodes:
            if name not in nodes:
                raise PlanError(f"stage {i}: node {name!r} is not in the graph")
            if name in stage_of:
                raise PlanError(f"node {name!r} is in stage {stage_of[name]} and stage {i}; each node runs in one stage")
            stage_of[name] = i
        for d in st.devices():
            if d not in cluster.names:
                raise PlanError(f"stage {i}: device {d!r} is not in the cluster {cluster.names}")
    missing = [n for n in nodes if n not in stage_of]
    if missing:
        raise PlanError(f"nodes not assigned to any stage: {missing[:10]}{' …' if len(missing) > 10 else ''}")
    for name, node in nodes.items():
        for p in node.all_input_nodes:
            if p.name in stage_of and stage_of[p.name] > stage_of[name]:
                raise PlanError(f"node {name!r} (stage {stage_of[name]}) uses {p.name!r} which is computed later, "
                                f"in stage {stage_of[p.name]}; stages must follow the data flow")
    for i, st in enumerate(plan.stages):
        if st.kind == "whole":
            continue
        for name in st.nodes:
            if not nodes[name].meta.get("splittable"):
                raise PlanError(f"stage {i} is split but node {name!r} cannot be split by rows: "
                                f"{nodes[name].meta.get('why_whole')}; put it in a whole stage")
        anchor = max(st.nodes, key=order.__getitem__)
        rows = nodes[anchor].meta["rows"]
        if not st.slices:
            raise PlanError(f"split stage {i} has no slices")
        devs = [d for d, _, _ in st.slices]
        if len(set(devs)) != len(devs):
            raise PlanError(f"split stage {i}: a device appears twice in its slices {st.slices}")
        expect = 0
        for d, a, b in st.slices:
            if a != expect or b <= a:
                raise PlanError(f"split stage {i}: slices must be non-empty, contiguous and ordered from row 0; "
                                f"device {d!r} has rows [{a}, {b}) but the next slice should start at {expect}")
            expect = b
        if expect != rows:
            raise PlanError(f"split stage {i}: slices cover rows [0, {expect}) but anchor {anchor!r} has {rows} rows")
