"""OFPM: one MILP for vertical + horizontal partitioning (``strategy="ofpm"``).

The network is a sequence of *units*: the blocks of every row-splittable run
(``primitives.blocks``: conv → BN → ReLU stay together) and every non-splittable
run. A *cut* c lies between unit c−1 and unit c; the tensors live at a cut are
those produced before it and used after it (skip connections included).

A *layout* says where the tensors at a cut are: ``W(d)`` — whole on device d —
or ``P(k)`` — split by rows over the k best devices (by the cost model's speed,
the source first among equals) in one fixed proportion per k (rows ∝ effective
speed, integer by largest remainder). One proportion per k keeps consecutive
split stages aligned, so between them only halo rows move. The MILP is a
shortest path, with side constraints, over states (cut, layout); binary arcs:

- *whole arcs* (c, W(d)) → (c+1, W(d)): unit c runs on d; cost Σ compute_time
  (consecutive whole units on one device become one whole stage);
- *split arcs* (c, μ) → (c', P(k)) for every interval [c, c') of at most
  ``max_fuse`` splittable units of one run: the units are fused into one split
  stage over the k devices with the P(k) integer row slices of its anchor. The
  cost is the stage's makespan max_d (arrival of d's inputs + compute of d's
  rows): rows per node come from the exact demand walk of ``build_schedule``
  (halo rows recomputed are counted exactly), inputs come from layout μ
  (μ = P(k): halo exchange; μ = W(d): scatter from d; μ = P(k') with k' a
  neighbouring device count and short intervals: re-split), pieces are timed
  with the simulator's contention rule (each sender's NIC, or the one shared
  medium, sends its pieces one after the other);
- *re-layout arcs* (c, μ) → (c, W(d)): gather / hand-off of every live tensor.

The path starts at (0, W(source)) (the input is at the source) and ends at
(U, W(source)) (the output returns to it). Memory: for every device whose
memory cannot hold the whole model, the weights of the units it computes must
fit ``memory_mb`` (a knapsack side constraint: this is what makes the problem a
MILP rather than a shortest path). Solved with HiGHS through PuLP (CBC as
fallback) with a time limit; the solver's relative MIP gap is reported.
``dag_shortest_path`` solves the same graph by DP (no memory constraints) and
serves as the test reference.

The MILP decides jointly: the stage cuts, which blocks are fused into one split
stage, how many (and so which) devices take part in each split stage and their
integer row slices (one slicing per device count), and the device of every
whole segment. Device classes: interchangeable devices (same speed, memory,
profile, default links; not the source) share one W layout, which keeps the
model small for 64 devices.

Objective vs simulator (documented gap): the MILP charges stages one after the
other (a barrier between stages), while the runtime — and the simulator, which
executes the exact schedule — lets a device start its next stage as soon as its
own inputs arrived and overlaps sends with compute; and the live tensors at a
cut are assumed to be in the layout of the previous stage (a skip tensor made
by an earlier stage of another resolution may in reality be owned slightly
differently). For plans of whole stages only the objective equals the
simulated latency exactly (tested); in the partition-quality benchmark the
median ratio objective / simulated is 1.00. The final plan is always judged by
the exact schedule + simulator, and that is what ``ofpm`` reports as its
predicted latency. After the solve, candidates — the MILP plan, its refinement
(slice boundaries moved ±1–2 rows on the exact simulator, ``refine_slices``),
and the warm-start plans the caller passes (the registry passes every other
strategy) — are compared by simulation and the best is returned. The plan
records which candidate won (``Plan.chosen``: ``milp``, ``milp+refine`` or
``warm:<name>``) and every candidate with its latency or error
(``Plan.candidates``); a candidate that fails is logged and recorded, never
dropped silently.
"""
from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pulp
import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.cost.simulator import param_bytes, simulate
from edgepart.compiler.planning.plan import Candidate, Plan, Planner, Stage
from edgepart.compiler.planning.primitives import blocks, runs, slices_for
from edgepart.compiler.schedule import build_schedule
from edgepart.errors import PlanError
from edgepart.passes.rowmap import input_windows

log = logging.getLogger("edgepart.planning")

# ------------------------------------------------------------------------------------------------------------
# the network as units and cuts


@dataclass
class Unit:
    nodes: list[fx.Node]
    splittable: bool
    run: int                      # index of the run it belongs to

    @property
    def rows(self) -> int:
        return self.nodes[-1].meta["rows"]


def make_units(gm: fx.GraphModule) -> list[Unit]:
    units: list[Unit] = []
    for r, (splittable, run) in enumerate(runs(gm)):
        if splittable:
            units += [Unit(b, True, r) for b in blocks(run)]
        else:
            units.append(Unit(list(run), False, r))
    return units


# ------------------------------------------------------------------------------------------------------------
# network contention, same rules as the simulator


class LinkTimes:
    """transfer_time of the cost model, memoised per link as latency + bytes × seconds-per-byte
    (CostModel.transfer_time is affine in the bytes; checked on first use of a link)."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        self.coef: dict[tuple[str, str], tuple[float, float]] = {}

    def __call__(self, nbytes: int, src: str, dst: str) -> float:
        if nbytes <= 0 or src == dst:
            return 0.0
        c = self.coef.get((src, dst))
        if c is None:
            t1, t2 = self.cost.transfer_time(1000, src, dst), self.cost.transfer_time(2000, src, dst)
            slope = (t2 - t1) / 1000
            c = self.coef[(src, dst)] = (t1 - 1000 * slope, slope)
        return c[0] + nbytes * c[1]


def pieces_time(pieces: list[tuple[str, str, int]], ttime, shared: bool) -> dict[str, float]:
    """Arrival time at each receiver of its last piece, all pieces ready at t=0.
    Each sender's NIC (or the one medium) sends its pieces in list order."""
    free: dict[str, float] = {}
    arrive: dict[str, float] = {}
    for src, dst, nbytes in pieces:
        q = "medium" if shared else src
        t = free.get(q, 0.0) + ttime(nbytes, src, dst)
        free[q] = t
        if t > arrive.get(dst, 0.0):
            arrive[dst] = t
    return arrive


def _overlap_pieces(owners, needs, nbytes_per_row) -> list[tuple[str, str, int]]:
    """Pieces (src, dst, bytes) that bring each need (dst, a, b) from the owners (sorted, contiguous)."""
    out = []
    starts = [o[1] for o in owners]
    for dst, na, nb in needs:
        k = max(0, bisect.bisect_right(starts, na) - 1)
        while k < len(owners) and owners[k][1] < nb:
            src, oa, ob = owners[k]
            if src != dst:
                a, b = max(na, oa), min(nb, ob)
                if b > a:
                    out.append((src, dst, int(nbytes_per_row * (b - a))))
            k += 1
    return out


# ------------------------------------------------------------------------------------------------------------


@dataclass
class Arc:
    kind: str            # whole | split | relayout
    c0: int
    m0: int
    c1: int
    m1: int
    cost: float
    slices: list[tuple[str, int, int]] = field(default_factory=list)
    device: str | None = None
    mem: dict[str, int] = field(default_factory=dict)


@dataclass
class OFPMResult:
    plan: Plan
    predicted: float          # simulated latency of the returned plan (exact schedule + simulator)
    objective: float          # MILP objective of the MILP's own plan (barrier model)
    milp_simulated: float     # simulated latency of the MILP's own plan
    solve_time: float         # seconds in the MILP solver
    build_time: float         # seconds to build the model (costs of all arcs)
    total_time: float
    gap: float                # relative MIP gap reported by the solver (0 = proven optimal for the model)
    status: str
    solver: str
    n_vars: int = 0
    n_constraints: int = 0

    @property
    def source(self) -> str:
        """Which candidate won: milp | milp+refine | warm:<name> (the plan's ``chosen``)."""
        return self.plan.chosen

    @property
    def candidates(self) -> dict[str, float]:
        """Simulated latency of every candidate that could be planned and simulated, by name."""
        return {c.name: c.latency for c in self.plan.candidates if c.error is None}


class OFPMModel:
    """Precomputed arcs of the OFPM MILP for one (graph, cluster, cost model)."""

    def __init__(self, gm: fx.GraphModule, cluster: Cluster, cost: CostModel | None = None,
                 max_fuse: int = 12, ks: list[int] | None = None, whole_devices: list[str] | None = None,
                 max_resplit: int = 4, build: bool = True):
        t0 = time.perf_counter()
        self.gm, self.cluster = gm, cluster
        self.cost = cost or CostModel(cluster)
        self.ttime = LinkTimes(self.cost)
        self.shared = cluster.shared_medium
        self.max_fuse = max_fuse
        self.max_resplit = max_resplit
        self.units = make_units(gm)
        self.U = len(self.units)
        self.unit_of: dict[str, int] = {}
        for u, unit in enumerate(self.units):
            for n in unit.nodes:
                self.unit_of[n.name] = u
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self._ctime: dict[tuple, float] = {}
        self._walks: dict[tuple, list] = {}
        self._layouts: dict[tuple, list] = {}
        self._live()
        full = {d: sum(self.ctime(n, d, n.meta["rows"]) for u in self.units for n in u.nodes)
                for d in cluster.names}
        self.eff_speed = {d: 1.0 / max(t, 1e-12) for d, t in full.items()}
        self._modes(ks, whole_devices)
        self._mem()
        self.arcs: list[Arc] = []
        if build:
            self._whole_arcs()
            self._split_arcs()
            self._relayout_arcs()
        self.build_time = time.perf_counter() - t0

    # --- structure ---------------------------------------------------------------------------------------
    def _live(self) -> None:
        """live[c]: tensors (name, bytes, rows) produced before cut c and used at or after it."""
        U = self.U
        prod: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                prod[n.name] = -1
            elif n.name in self.unit_of:
                prod[n.name] = self.unit_of[n.name]
        last_use: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            for p in n.all_input_nodes:
                if p.name not in prod:
                    continue
                u = U if n.op == "output" else self.unit_of.get(n.name, U)
                last_use[p.name] = max(last_use.get(p.name, -1), u)
        self.live: list[list[tuple[str, int, int, bool]]] = [[] for _ in range(U + 1)]
        for t, pu in prod.items():
            lu = last_use.get(t)
            if lu is None:
                continue
            meta = self.nodes[t].meta
            for c in range(pu + 1, min(lu, U) + 1):
                self.live[c].append((t, meta["bytes"], max(1, meta["rows"]), meta.get("shape") is not None))

    def _modes(self, ks, whole_devices) -> None:
        cl = self.cluster
        src = cl.source
        ranked = sorted(cl.devices, key=lambda d: (-round(self.eff_speed[d.name], 9), d.name != src,
                                                   cl.names.index(d.name)))
        self.ranked = [d.name for d in ranked]
        n = len(ranked)
        if ks is None:
            grid = (2, 3, 4, 5, 6, 7, 8, 10, 12, 16) if n <= 16 else (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
            ks = sorted({k for k in grid if k <= n} | {n})
            ks = [k for k in ks if k >= 2]
        self.ks = [k for k in ks if 2 <= k <= n]
        if whole_devices is None:
            whole_devices = self._device_classes()
        self.whole_devices = list(whole_devices)
        self.modes: list[tuple] = [("W", d) for d in self.whole_devices] + [("P", k) for k in self.ks]
        self.mode_index = {m: i for i, m in enumerate(self.modes)}

    def _device_classes(self) -> list[str]:
        """One representative per class of interchangeable devices (same speed, memory, profile and
        its calibration, stage start, links), the source always its own class."""
        cl = self.cluster
        seen: dict[tuple, str] = {}
        overridden = {o["a"] for o in cl.overrides} | {o["b"] for o in cl.overrides}
        for d in cl.devices:
            if d.name == cl.source or d.name in overridden:
                key = ("own", d.name)
            else:
                key = (d.speed, d.memory_mb, d.profile, d.memory_speed, d.calibration, d.stage_start_ms,
                       d.node_calibration)
            seen.setdefault(key, d.name)
        return list(seen.values())

    def _mem(self) -> None:
        self.unit_params = [sum(param_bytes(self.gm, n) for n in u.nodes) for u in self.units]
        self.mem_cap = {d.name: d.memory_mb * 2 ** 20 for d in self.cluster.devices}
        total = sum(self.unit_params)
        self.mem_binding = [d for d, cap in self.mem_cap.items() if cap < total]

    def memory_infeasible(self) -> str:
        """Why no plan fits the devices' memory (``memory_mb``), and by how much at least."""
        mib = 2 ** 20
        total = sum(self.unit_params)
        caps = {d: self.mem_cap[d] / mib for d in self.mem_cap}
        held = ", ".join(f"{d}: {c:.3g}" for d, c in caps.items())
        head = f"no plan fits the devices' memory: the model's weights are {total / mib:.3g} MiB; memory_mb is {held}"
        if total > sum(self.mem_cap.values()):
            return (f"{head}; together the devices hold {sum(caps.values()):.3g} MiB, "
                    f"{(total - sum(self.mem_cap.values())) / mib:.3g} MiB short — raise memory_mb or add devices")
        big = max(range(len(self.unit_params)), key=lambda i: self.unit_params[i])
        if self.unit_params[big] > max(self.mem_cap.values()):
            short = (self.unit_params[big] - max(self.mem_cap.values())) / mib
            return (f"{head}; the largest unit ({self.units[big].nodes[0]}...) alone needs "
                    f"{self.unit_params[big] / mib:.3g} MiB, {short:.3g} MiB more than the largest device holds "
                    "— raise memory_mb")
        return (f"{head}; the weights fit in total but not along any plan this planner can make (a split stage "
                f"copies its weights to every device of the split) — raise memory_mb of the devices above")

    def P_devices(self, k: int) -> list[str]:
        return self.ranked[:k]

    # --- costs -------------------------------------------------------------------------------------------
    def ctime(self, node: fx.Node, dev: str, rows: int) -> float:
        key = (node.name, dev, rows)
        v = self._ctime.get(key)
        if v is None:
            v = self.cost.compute_time(node, dev, rows) if rows > 0 else 0.0
            self._ctime[key] = v
        return v

    def walk(self, j: int, a: int, b: int) -> list[tuple[dict, dict]]:
        """Rows each node of units j-1, j-2, … computes for anchor rows [a, b) of unit j-1's last
        node, as build_schedule's demand walk; per unit (backwards): ({node: (lo, hi)},
        {input: (lo, hi)} read by the unit's nodes)."""
        key = (j, a, b)
        hit = self._walks.get(key)
        if hit is not None:
            return hit
        anchor = self.units[j - 1].nodes[-1]
        R = anchor.meta["rows"]
        dem: dict[str, tuple[int, int]] = {}
        out = []
        u = j - 1
        lo_unit = max(0, j - self.max_fuse)
        while u >= lo_unit and self.units[u].splittable and self.units[u].run == self.units[j - 1].run:
            unit_dem, unit_in = {}, {}
            for n in reversed(self.units[u].nodes):
                wants = []
                external_user = False
                for usr in n.users:
                    uu = self.unit_of.get(usr.name)
                    if uu is None or uu >= j:
                        external_user = True
                    elif usr.name in dem:
                        lo, hi, _, _ = input_windows(usr, *dem[usr.name])[n.name]
                        wants.append((lo, hi))
                if n is anchor:
                    wants.append((a, b))
                elif external_user:
                    rows = n.meta["rows"]
                    wants.append(((rows * a) // R, (rows * b) // R))
                wants = [(x, y) for x, y in wants if y > x]
                if wants:
                    dem[n.name] = (min(x for x, _ in wants), max(y for _, y in wants))
                    unit_dem[n.name] = dem[n.name]
                    for p, (lo, hi, _, _) in input_windows(n, *dem[n.name]).items():
                        if self.nodes[p].op == "get_attr" or hi <= lo:
                            continue
                        if p in unit_in:
                            unit_in[p] = (min(unit_in[p][0], lo), max(unit_in[p][1], hi))
                        else:
                            unit_in[p] = (lo, hi)
            out.append((unit_dem, unit_in))
            u -= 1
        self._walks[key] = out
        return out

    def segment_device_cost(self, i: int, j: int, dev: str, a: int, b: int):
        """(compute seconds, {external input: (lo, hi)}) of device dev with anchor rows [a, b)
        in the split stage of units [i, j)."""
        w = self.walk(j, a, b)
        comp = 0.0
        need: dict[str, tuple[int, int]] = {}
        for k in range(j - i):
            unit_dem, unit_in = w[k]
            for name, (lo, hi) in unit_dem.items():
                comp += self.ctime(self.nodes[name], dev, hi - lo)
            for p, (lo, hi) in unit_in.items():
                pu = self.unit_of.get(p, -1)
                if i <= pu < j:
                    continue
                need[p] = (min(need[p][0], lo), max(need[p][1], hi)) if p in need else (lo, hi)
        return comp, need

    def split_stage_cost(self, i: int, j: int, slices: list[tuple[str, int, int]], from_mode: tuple):
        """Makespan of a split stage of units [i, j) whose inputs are laid out by ``from_mode`` (W(d):
        whole on d, a scatter; P(k): canonical row layout of the k best devices, so in the same
        mode only halo rows move): pieces sent (sender NIC / medium FIFO), then compute.
        Returns (makespan, per-device times)."""
        return self._stage_cost([(dev,) + self.segment_device_cost(i, j, dev, a, b) for dev, a, b in slices],
                                from_mode, self.stage_out_bytes(j, slices), sum(self.unit_params[i:j]))

    def stage_out_bytes(self, j: int, slices: list[tuple[str, int, int]]) -> dict[str, float]:
        """Per device, the bytes of its rows of the split stage ending at unit ``j`` (its output)."""
        last = self.units[j - 1].nodes[-1].meta
        per_row = last["bytes"] / max(1, last["rows"])
        return {dev: (b - a) * per_row for dev, a, b in slices}

    def _stage_cost(self, per_device, from_mode, out_bytes: dict[str, float] | None = None, weights: float = 0.0):
        pieces = []
        io = dict(out_bytes or {})
        for dev, comp, need in per_device:
            for p, (lo, hi) in need.items():
                meta = self.nodes[p].meta
                rows = max(1, meta["rows"])
                owners = self.layout_owners(from_mode, rows)
                pieces += _overlap_pieces(owners, [(dev, lo, hi)], meta["bytes"] / rows)
                io[dev] = io.get(dev, 0.0) + (hi - lo) * meta["bytes"] / rows
        pieces.sort(key=lambda p: (p[0], p[1]))
        arrive = pieces_time(pieces, self.ttime, self.shared)
        times = {dev: arrive.get(dev, 0.0) + comp + (self.cost.stage_start_time(dev)
                                                     + self.cost.stage_io_time(dev, io.get(dev, 0.0))
                                                     + self.cost.stage_weights_time(dev, weights) if comp > 0 else 0.0)
                 for dev, comp, _ in per_device}
        return max(times.values()), times

    # --- arcs --------------------------------------------------------------------------------------------
    def _whole_arcs(self) -> None:
        for c, unit in enumerate(self.units):
            for d in self.whole_devices:
                m = self.mode_index[("W", d)]
                t = sum(self.ctime(n, d, n.meta["rows"]) for n in unit.nodes) + self.cost.stage_weights_time(
                    d, self.unit_params[c])
                if c == 0 and d == self.cluster.source:    # the plan's first stage starts here
                    t += self.cost.stage_start_time(d)
                self.arcs.append(Arc("whole", c, m, c + 1, m, t, device=d, mem={d: self.unit_params[c]}))

    def canonical_slices(self, rows: int, k: int) -> list[tuple[str, int, int]]:
        """Layout P(k) of a tensor with ``rows`` rows: rows ∝ effective speed of the k best devices.
        One fixed proportion per k keeps consecutive split stages aligned (only halo rows move)."""
        devs = self.P_devices(k)
        return slices_for(rows, devs, [self.eff_speed[d] for d in devs])

    def _split_arcs(self) -> None:
        for j in range(1, self.U + 1):
            last = self.units[j - 1]
            if not last.splittable or last.rows < 2:
                continue
            for i in range(j - 1, max(-1, j - 1 - self.max_fuse), -1):
                if not self.units[i].splittable or self.units[i].run != last.run:
                    break
                params = sum(self.unit_params[i:j])
                for k in self.ks:
                    slices = self.canonical_slices(last.rows, k)
                    if len(slices) < 2:
                        continue
                    m = self.mode_index[("P", k)]
                    mem = {d: params for d, _, _ in slices}
                    per_device = [(dev,) + self.segment_device_cost(i, j, dev, a, b) for dev, a, b in slices]
                    out_bytes = self.stage_out_bytes(j, slices)
                    for m0, mode in enumerate(self.modes):
                        if mode[0] == "P" and mode[1] != k and (j - i > self.max_resplit or
                                                                abs(self.ks.index(mode[1]) - self.ks.index(k)) > 1):
                            continue
                        span, _ = self._stage_cost(per_device, mode, out_bytes, params)
                        self.arcs.append(Arc("split", i, m0, j, m, span, slices=slices, mem=mem))

    def layout_owners(self, mode: tuple, rows: int) -> list[tuple[str, int, int]]:
        if mode[0] == "W":
            return [(mode[1], 0, rows)]
        key = (mode[1], rows)
        hit = self._layouts.get(key)
        if hit is None:
            hit = self._layouts[key] = self.canonical_slices(rows, mode[1])
        return hit

    def relayout_cost(self, c: int, m0: tuple, m1: tuple) -> float | None:
        pieces = []
        for t, nbytes, rows, movable in self.live[c]:
            own = self.layout_owners(m0, rows)
            need = self.layout_owners(m1, rows)
            ps = _overlap_pieces(own, need, nbytes / rows)
            if ps and not movable:
                return None
            pieces += ps
        pieces.sort(key=lambda p: (p[0], p[1]))
        arrive = pieces_time(pieces, self.ttime, self.shared)
        return max(arrive.values(), default=0.0)

    def _relayout_arcs(self) -> None:
        for c in range(self.U + 1):
            for a, m0 in enumerate(self.modes):
                for b, m1 in enumerate(self.modes):
                    if a == b or m1[0] != "W":    # into a split layout only through a split stage
                        continue
                    t = self.relayout_cost(c, m0, m1)
                    if t is not None and c < self.U:      # a whole stage on m1's device starts here
                        t += self.cost.stage_start_time(m1[1])
                    if t is not None:
                        self.arcs.append(Arc("relayout", c, a, c, b, t))

    # --- the MILP ----------------------------------------------------------------------------------------
    def solve(self, time_limit: float = 10.0, gap: float = 1e-4, solver: str = "highs", msg: bool = False):
        """Solve; returns (chosen arcs in path order, objective, solve seconds, mip gap, status, solver)."""
        prob = pulp.LpProblem("ofpm", pulp.LpMinimize)
        add = getattr(prob, "add_variable", None)    # PuLP >= 3.3 deprecates constructing LpVariable directly
        x = [add(f"x{i}", cat="Binary") if add else pulp.LpVariable(f"x{i}", cat="Binary")
             for i in range(len(self.arcs))]
        prob += pulp.lpSum(a.cost * v for a, v in zip(self.arcs, x))
        src_state = (0, self.mode_index[("W", self.cluster.source)])
        dst_state = (self.U, self.mode_index[("W", self.cluster.source)])
        out_arcs: dict[tuple, list] = {}
        in_arcs: dict[tuple, list] = {}
        for a, v in zip(self.arcs, x):
            out_arcs.setdefault((a.c0, a.m0), []).append(v)
            in_arcs.setdefault((a.c1, a.m1), []).append(v)
        for s in set(out_arcs) | set(in_arcs):
            rhs = (1 if s == src_state else 0) - (1 if s == dst_state else 0)
            prob += (pulp.lpSum(out_arcs.get(s, [])) - pulp.lpSum(in_arcs.get(s, [])) == rhs), f"flow_{s[0]}_{s[1]}"
        for d in self.mem_binding:
            terms = [a.mem[d] * v for a, v in zip(self.arcs, x) if a.mem.get(d)]
            if terms:
                prob += pulp.lpSum(terms) <= self.mem_cap[d], f"mem_{d}"
        solvers = []
        if solver in ("highs", "auto"):
            solvers.append(("HiGHS", lambda: pulp.HiGHS(msg=msg, timeLimit=time_limit, gapRel=gap)))
            solvers.append(("HiGHS_CMD", lambda: pulp.HiGHS_CMD(msg=msg, timeLimit=time_limit, gapRel=gap)))
        solvers.append(("CBC", lambda: pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, gapRel=gap)))
        t0 = time.perf_counter()
        used, status = None, "not solved"
        for name, make in solvers:
            try:
                s = make()
                if not s.available():
                    continue
                prob.solve(s)
                used = name
                status = pulp.LpStatus[prob.status]
                break
            except Exception:   # noqa: BLE001 — try the next solver
                continue
        solve_time = time.perf_counter() - t0
        if used is None or prob.status != pulp.LpStatusOptimal and prob.sol_status not in (1, 2):
            if status == "Infeasible" and self.mem_binding:
                raise PlanError(self.memory_infeasible())
            raise RuntimeError(f"OFPM MILP not solved ({status})")
        chosen = [a for a, v in zip(self.arcs, x) if (v.value() or 0) > 0.5]
        obj = sum(a.cost for a in chosen)
        mip_gap = _mip_gap(prob, used, obj)
        self.n_vars, self.n_constraints = len(x), prob.numConstraints()
        return self.order_path(chosen, src_state), obj, solve_time, mip_gap, status, used

    def order_path(self, chosen: list[Arc], start) -> list[Arc]:
        by_state: dict[tuple, list[Arc]] = {}
        for a in chosen:
            by_state.setdefault((a.c0, a.m0), []).append(a)
        path, s = [], start
        while s in by_state and by_state[s]:
            a = by_state[s].pop()
            path.append(a)
            s = (a.c1, a.m1)
        return path   # (cycles disjoint from the path have cost ≥ 0 and are dropped)

    def plan_from_path(self, path: list[Arc], name: str = "ofpm") -> Plan:
        stages: list[Stage] = []
        for a in path:
            if a.kind == "relayout":
                continue
            names = [n.name for u in self.units[a.c0:a.c1] for n in u.nodes]
            if a.kind == "whole" or len(a.slices) < 2:
                dev = a.device if a.kind == "whole" else a.slices[0][0]
                if stages and stages[-1].kind == "whole" and stages[-1].device == dev:
                    stages[-1].nodes += names
                else:
                    stages.append(Stage("whole", names, device=dev))
            else:
                stages.append(Stage("split", names, slices=list(a.slices)))
        return Plan(stages, name)

    def path_cost(self, path: list[Arc]) -> float:
        return sum(a.cost for a in path)


def dag_shortest_path(model: OFPMModel) -> tuple[list[Arc], float]:
    """Exact shortest path over the model's arcs by dynamic programming (ignores memory constraints).
    Cut by cut: split-layout states first, then re-layouts among whole layouts relaxed to a fixed
    point (they may chain), then the arcs leaving the cut. The reference the MILP is checked
    against, and AOFL's DP."""
    out: dict[tuple, list[Arc]] = {}
    for a in model.arcs:
        out.setdefault((a.c0, a.m0), []).append(a)
    src = (0, model.mode_index[("W", model.cluster.source)])
    dst = (model.U, model.mode_index[("W", model.cluster.source)])
    best: dict[tuple, float] = {src: 0.0}
    back: dict[tuple, Arc] = {}

    def relax(a: Arc) -> bool:
        s, t = (a.c0, a.m0), (a.c1, a.m1)
        if s not in best:
            return False
        v = best[s] + a.cost
        if v < best.get(t, math.inf) - 1e-15:
            best[t], back[t] = v, a
            return True
        return False

    P = [m for m, mode in enumerate(model.modes) if mode[0] == "P"]
    W = [m for m, mode in enumerate(model.modes) if mode[0] == "W"]
    for c in range(model.U + 1):
        for m in P:
            for a in out.get((c, m), []):
                relax(a)
        for _ in range(len(W)):
            if not any([relax(a) for m in W for a in out.get((c, m), []) if a.kind == "relayout"]):
                break
        for m in W:
            for a in out.get((c, m), []):
                if a.kind != "relayout":
                    relax(a)
    if dst not in best:
        raise RuntimeError("no path through the OFPM state graph")
    path, s = [], dst
    while s != src:
        a = back[s]
        path.append(a)
        s = (a.c0, a.m0)
    return path[::-1], best[dst]


def _mip_gap(prob, used: str, obj: float) -> float:
    """Relative MIP gap from the solver when it reports one (HiGHS), else 0 for 'Optimal'."""
    try:
        solver_model = getattr(prob, "solverModel", None)
        if solver_model is not None and hasattr(solver_model, "getInfo"):
            info = solver_model.getInfo()
            g = getattr(info, "mip_gap", None)
            if g is not None and math.isfinite(g):
                return max(0.0, float(g))
    except Exception:   # noqa: BLE001
        pass
    return 0.0 if pulp.LpStatus[prob.status] == "Optimal" else float("nan")


# ------------------------------------------------------------------------------------------------------------
# exact evaluation and refinement


def simulated_latency(gm, plan, cluster, cost) -> float:
    return simulate(build_schedule(gm, plan, cluster), cluster, cost, gm=gm).latency


def refine_slices(gm, plan: Plan, cluster: Cluster, cost: CostModel, budget_s: float = 1.0) -> tuple[Plan, float]:
    """Local search on the exact simulator: move one slice boundary of one split stage by ±1 row
    (or more), keep a move when the simulated latency drops; stops at the time budget."""
    best = simulated_latency(gm, plan, cluster, cost)
    t_end = time.perf_counter() + budget_s
    improved = True
    stages = [Stage(s.kind, list(s.nodes), s.device, list(s.slices)) for s in plan.stages]
    while improved and time.perf_counter() < t_end:
        improved = False
        for si, st in enumerate(stages):
            if st.kind != "split":
                continue
            for bi in range(len(st.slices) - 1):
                for step in (1, -1, 2, -2):
                    if time.perf_counter() >= t_end:
                        break
                    sl = list(st.slices)
                    d0, a0, b0 = sl[bi]
                    d1, a1, b1 = sl[bi + 1]
                    nb = b0 + step
                    if not (a0 < nb < b1):
                        continue
                    sl[bi], sl[bi + 1] = (d0, a0, nb), (d1, nb, b1)
                    trial = list(stages)
                    trial[si] = Stage("split", st.nodes, slices=sl)
                    lat = simulated_latency(gm, Plan(trial, plan.strategy), cluster, cost)
                    if lat < best - 1e-12:
                        best, stages, st = lat, trial, trial[si]
                        improved = True
                        break
    return Plan(stages, plan.strategy), best


def _warm_candidate(gm, cluster: Cluster, cost: CostModel, name: str,
                    entry: Plan | Planner) -> tuple[Candidate, Plan | None]:
    """Plan (when ``entry`` is a planner) and simulate one warm-start candidate; a failure becomes the
    candidate's error, logged, and the candidate takes no further part."""
    try:
        plan = entry if isinstance(entry, Plan) else entry(gm, cluster)
        return Candidate(name, simulated_latency(gm, plan, cluster, cost)), plan
    except Exception as e:   # noqa: BLE001 — a strategy that cannot plan this graph loses; its reason is kept
        error = f"{type(e).__name__}: {e}"
        log.warning("ofpm candidate %s failed: %s", name, error)
        return Candidate(name, None, error), None


def solve_ofpm(gm: fx.GraphModule, cluster: Cluster, cost: CostModel | None = None, *, time_limit: float = 10.0,
               gap: float = 1e-4, max_fuse: int = 12, ks: list[int] | None = None, refine_s: float = 1.0,
               warm_start: Mapping[str, Plan | Planner] | None = None, solver: str = "highs") -> OFPMResult:
    """Solve the MILP, refine its plan, compare both with the ``warm_start`` plans (given, or made here
    by the given planners) by exact simulation; the fastest wins (the MILP's plan on a tie, then the
    first in order). The returned plan is labelled ``ofpm`` and records the winner and every candidate."""
    t0 = time.perf_counter()
    cost = cost or CostModel(cluster)
    model = OFPMModel(gm, cluster, cost, max_fuse=max_fuse, ks=ks)
    path, obj, solve_time, mip_gap, status, used = model.solve(time_limit=time_limit, gap=gap, solver=solver)
    milp_plan = model.plan_from_path(path)
    milp_sim = simulated_latency(gm, milp_plan, cluster, cost)
    cands: list[tuple[Candidate, Plan | None]] = [(Candidate("milp", milp_sim), milp_plan)]
    if refine_s > 0 and any(s.kind == "split" for s in milp_plan.stages):
        rp, rl = refine_slices(gm, milp_plan, cluster, cost, refine_s)
        cands.append((Candidate("milp+refine", rl), rp))
    for name, entry in (warm_start or {}).items():
        cands.append(_warm_candidate(gm, cluster, cost, f"warm:{name}", entry))
    best, best_plan = min(((c, p) for c, p in cands if c.error is None),
                          key=lambda cp: (cp[0].latency, cp[0].name != "milp"))
    plan = Plan(best_plan.stages, "ofpm", chosen=best.name, candidates=[c for c, _ in cands])
    return OFPMResult(plan, best.latency, obj, milp_sim, solve_time, model.build_time,
                      time.perf_counter() - t0, mip_gap, status, used, model.n_vars, model.n_constraints)


def plan_ofpm(gm: fx.GraphModule, cluster: Cluster, warm_start: Mapping[str, Plan | Planner] | None = None) -> Plan:
    """``strategy="ofpm"``: the MILP plan, or a better warm-start plan by exact simulation (see solve_ofpm)."""
    return solve_ofpm(gm, cluster, warm_start=warm_start).plan
