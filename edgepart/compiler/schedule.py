"""From a plan to what each device does: its rows of every node, and every transfer.

Everything here follows from the plan and the row maps:
- In a split stage, each device computes the rows of each node that its slice of
  the anchor needs (walking the stage backwards through the row maps), plus the
  rows it *owns* of any other node used outside the stage.
- Every tensor's rows are partitioned among owners: the device of a whole stage,
  the slices of a split stage, the source device for model inputs.
- A device that needs rows it does not hold receives them from their owners:
  one kind of communication, "rows [a, b) of tensor T, from X to Y".
- Each device's actions are ordered by stage: receive inputs, run, send outputs.
  Sends never wait, so this order cannot deadlock.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.planning.plan import Plan, validate_plan
from edgepart.errors import PlanError
from edgepart.ir.manifest import Action, EmitOutput, NodeRows, Recv, Run, Send, TakeInput, TensorSpec, Transfer, Window
from edgepart.passes.rowmap import input_windows

Interval = tuple[int, int]


@dataclass
class Schedule:
    plan: Plan
    source: str
    tensors: dict[str, TensorSpec]
    owners: dict[str, list[tuple[str, int, int]]]  # tensor -> [(device, a, b)]
    rows: dict[str, dict[int, dict[str, NodeRows]]]  # device -> stage -> node (in execution order) -> its rows
    actions: dict[str, list[Action]]
    transfers: list[Transfer] = field(default_factory=list)
    constants: dict[str, set[str]] = field(default_factory=dict)  # device -> get_attr nodes it reads

    def devices(self) -> list[str]:
        return list(self.actions)


def _hull(intervals) -> Interval | None:
    intervals = [(a, b) for a, b in intervals if b > a]
    if not intervals:
        return None
    return min(a for a, _ in intervals), max(b for _, b in intervals)


def _subtract(need: Interval, held: list[Interval]) -> list[Interval]:
    """Parts of ``need`` not covered by the union of ``held``."""
    parts = [need]
    for ha, hb in held:
        nxt = []
        for a, b in parts:
            if hb <= a or ha >= b:
                nxt.append((a, b))
                continue
            if a < ha:
                nxt.append((a, ha))
            if hb < b:
                nxt.append((hb, b))
        parts = nxt
    return [(a, b) for a, b in parts if b > a]


def _piece_bytes(total_bytes: int, rows: int, a: int, b: int) -> int:
    return total_bytes * (b - a) // max(1, rows)


def proportional_partition(rows: int, anchor_rows: int, slices) -> list[tuple[str, int, int]]:
    """Split [0, rows) in the proportions of ``slices`` of [0, anchor_rows)."""
    out = []
    for i, (d, a, b) in enumerate(slices):
        lo = 0 if i == 0 else (rows * a) // anchor_rows
        hi = rows if i == len(slices) - 1 else (rows * b) // anchor_rows
        out.append((d, lo, hi))
    return out


def build_schedule(gm: fx.GraphModule, plan: Plan, cluster: Cluster) -> Schedule:
    validate_plan(gm, plan, cluster)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    source = cluster.source
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    stage_of = {name: i for i, st in enumerate(plan.stages) for name in st.nodes}

    tensors: dict[str, TensorSpec] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "call_module", "call_function", "call_method"):
            tensors[n.name] = TensorSpec(n.meta["dtype"], tuple(n.meta["shape"]) if n.meta["shape"] else None,
                                         n.meta["rows"])

    owners: dict[str, list[tuple[str, int, int]]] = {p.name: [(source, 0, p.meta["rows"])] for p in placeholders}
    held: dict[str, dict[str, list[Interval]]] = {d: {} for d in cluster.names}
    for p in placeholders:
        held[source][p.name] = [(0, p.meta["rows"])]
    rows: dict[str, dict[int, dict[str, dict]]] = {d: {} for d in cluster.names}
    constants: dict[str, set[str]] = {d: set() for d in cluster.names}
    keyed: dict[str, list[tuple[tuple, Action]]] = {d: [] for d in cluster.names}
    transfers: list[Transfer] = []
    for p in placeholders:
        keyed[source].append(((-1, 0, 0), TakeInput(p.name)))

    def producer_stage(t: str) -> int:
        return stage_of.get(t, -1)

    def fetch(dev: str, t: str, need: Interval, consumer_stage: int) -> list[Recv]:
        """Transfers that bring rows ``need`` of tensor t to dev; returns dev's recv actions."""
        recvs = []
        for a, b in _subtract(need, held[dev].get(t, [])):
            for owner, oa, ob in owners[t]:
                pa, pb = max(a, oa), min(b, ob)
                if pb <= pa:
                    continue
                if owner == dev:
                    raise PlanError(f"internal: device {dev!r} owns rows [{pa}, {pb}) of {t!r} but does not hold them")
                if tensors[t].shape is None:
                    raise PlanError(f"node {t!r} produces a tuple, which cannot move between devices "
                                    f"({owner!r} → {dev!r}); put it and its users in one whole stage")
                tr = Transfer(t, pa, pb, owner, dev, _piece_bytes(nodes[t].meta["bytes"], tensors[t].rows, pa, pb),
                              consumer_stage, producer_stage(t))
                transfers.append(tr)
                ps = producer_stage(t)
                keyed[owner].append(((ps, 2, consumer_stage, len(transfers)), Send(t, pa, pb, dev)))
                recvs.append(Recv(t, pa, pb, owner))
                held[dev].setdefault(t, []).append((pa, pb))
        return recvs

    for si, st in enumerate(plan.stages):
        stage_nodes = sorted(st.nodes, key=order.__getitem__)
        in_stage = set(stage_nodes)
        outputs = [n for n in stage_nodes if any(u.name not in in_stage for u in nodes[n].users)]
        demand: dict[str, dict[str, Interval]] = {}   # device -> node -> rows computed
        if st.kind == "whole":
            demand[st.device] = {n: (0, nodes[n].meta["rows"]) for n in stage_nodes}
            for n in outputs:
                owners[n] = [(st.device, 0, nodes[n].meta["rows"])]
        else:
            anchor = stage_nodes[-1]
            anchor_rows = nodes[anchor].meta["rows"]
            owned = {n: proportional_partition(nodes[n].meta["rows"], anchor_rows, st.slices) for n in outputs}
            owned[anchor] = list(st.slices)
            for k, (dev, _, _) in enumerate(st.slices):
                dem: dict[str, Interval] = {}
                for n in reversed(stage_nodes):
                    wants = [(owned[n][k][1], owned[n][k][2])] if n in owned else []
                    for u in nodes[n].users:
                        if u.name in in_stage and u.name in dem:
                            lo, hi, _, _ = input_windows(u, *dem[u.name])[n]
                            wants.append((lo, hi))
                    h = _hull(wants)
                    if h is not None:
                        dem[n] = h
                demand[dev] = dem
            for n in outputs:
                owners[n] = [o for o in owned[n] if o[2] > o[1]]
        for dev, dem in demand.items():
            table = {}
            external: dict[str, list[Interval]] = {}
            for n in stage_nodes:
                if n not in dem:
                    continue
                wins = input_windows(nodes[n], *dem[n])
                table[n] = NodeRows(tuple(dem[n]), {p: Window(*w) for p, w in wins.items()})
                for p, (lo, hi, _, _) in wins.items():
                    if nodes[p].op == "get_attr":
                        constants[dev].add(p)
                    elif p not in in_stage and hi > lo:
                        external.setdefault(p, []).append((lo, hi))
            recvs = []
            for p in sorted(external, key=order.__getitem__):
                recvs += fetch(dev, p, _hull(external[p]), si)
            keyed[dev] += [((si, 0, 0), r) for r in recvs]
            keyed[dev].append(((si, 1, 0), Run(si)))
            rows[dev][si] = table
            for n, iv in dem.items():
                held[dev].setdefault(n, []).append(iv)

    final = len(plan.stages)
    out_tensors = [n.name for n in output_node.all_input_nodes]
    recvs = []
    for t in out_tensors:
        if nodes[t].op == "get_attr":
            constants[source].add(t)
            continue
        recvs += fetch(source, t, (0, tensors[t].rows), final)
    keyed[source] += [((final, 0, 0), r) for r in recvs]
    keyed[source].append(((final, 1, 0), EmitOutput()))

    actions = {}
    for dev in cluster.names:
        acts = [a for _, a in sorted(keyed[dev], key=lambda kv: kv[0])]
        if acts:
            actions[dev] = acts
    return Schedule(plan, source, tensors, owners, {d: r for d, r in rows.items() if d in actions},
                    actions, transfers, {d: c for d, c in constants.items() if d in actions})
