"""The exact MCIA optimiser: one MILP over version × cuts × edge share × uplink share for all tasks.

With discrete share levels (a/L, b/L with a, b in 1..L) every (version, k1, k2, a, b) of a task has a
fixed latency, so the problem is a choice of one *candidate* per task (binary x) under linear
resource constraints — exact, no linearisation error:

    max  Σ_i Σ_c obj_ic · x_ic          obj = w_acc·accuracy − w_lat·latency / reference   (table.evaluate)
    s.t. Σ_c x_ic = 1                   each task one candidate
         Σ a_c · x_ic ≤ L               edge compute shares
         Σ b_c · x_ic ≤ L               per uplink medium (per end device, or one shared medium)
         Σ weight bytes on the edge ≤ edge memory; per end device Σ its tasks' weight bytes ≤ its memory
         per end device Σ rate · end seconds ≤ 1
    candidates failing a task's own constraints (min accuracy, deadline, share stability) are left out.

A candidate is dropped when another of the same task with the same shares has an objective at
least as high and uses no more of every other resource (end/edge weight bytes, end-device load):
dominance pruning, exact. Solved by HiGHS through PuLP (CBC fallback); the relative MIP gap is reported.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import pulp

from edgepart.errors import EdgepartError
from edgepart.mcia.scenario import Tiers
from edgepart.mcia.table import Choice, Outcome, TaskTable, evaluate, own_violations, uses, violations


@dataclass(frozen=True)
class Candidate:
    choice: Choice
    outcome: Outcome
    end_load: float                 # rate × end seconds


def candidates(table: TaskTable, tiers: Tiers, levels: int, prune: bool = True) -> list[Candidate]:
    """Every choice of one task that meets its own constraints (dominated ones dropped if ``prune``)."""
    out = []
    shares = range(1, levels + 1)
    for vi, v in enumerate(table.versions):
        for k1 in range(v.last + 1):
            for k2 in range(k1, v.last + 1):
                up, edge, cloud = uses(v, k1, k2)
                if cloud and tiers.wan is None:
                    continue
                for a in shares if edge else (0,):
                    for b in shares if up else (0,):
                        c = Choice(vi, k1, k2, a, b)
                        o = evaluate(table, tiers, c, levels)
                        load = table.task.rate * o.end_s
                        if load > 1.0 + 1e-12 or own_violations(table, o):
                            continue
                        out.append(Candidate(c, o, load))
    if not prune:
        return out
    groups: dict[tuple[int, int], list[Candidate]] = {}
    for c in sorted(out, key=lambda c: -c.outcome.objective):
        kept = groups.setdefault((c.choice.edge_share, c.choice.up_share), [])
        key = (c.outcome.end_bytes, c.outcome.edge_bytes, c.end_load)
        if not any(all(x <= y for x, y in zip((k.outcome.end_bytes, k.outcome.edge_bytes, k.end_load), key))
                   for k in kept):
            kept.append(c)
    return [c for g in groups.values() for c in g]


@dataclass
class Solution:
    strategy: str
    choices: list[Choice]
    outcomes: list[Outcome]
    objective: float
    violations: list[str]
    solve_time: float = 0.0
    gap: float = 0.0
    status: str = ""
    solver: str = ""
    n_vars: int = 0


def solution(strategy: str, tables: list[TaskTable], tiers: Tiers, choices: list[Choice], levels: int,
             **info) -> Solution:
    outs = [evaluate(t, tiers, c, levels) for t, c in zip(tables, choices)]
    return Solution(strategy, list(choices), outs, sum(o.objective for o in outs),
                    violations(tables, tiers, choices, levels), **info)


def solve_milp(tables: list[TaskTable], tiers: Tiers, levels: int, time_limit: float = 60.0,
               gap: float = 1e-4, msg: bool = False) -> Solution:
    """The optimal plan (to ``gap``); raises EdgepartError naming a task with no feasible candidate,
    or when no plan meets the shared constraints."""
    t0 = time.perf_counter()
    cands = []
    for t in tables:
        cs = candidates(t, tiers, levels)
        if not cs:
            raise EdgepartError(f"task {t.task.name!r}: no version/cut/share meets its min_accuracy, deadline_ms "
                                "and rate on its own; relax them")
        cands.append(cs)
    prob = pulp.LpProblem("mcia", pulp.LpMaximize)
    add = getattr(prob, "add_variable", None)    # PuLP >= 3.3 deprecates constructing LpVariable directly
    x = [[add(f"x_{i}_{j}", cat="Binary") if add else pulp.LpVariable(f"x_{i}_{j}", cat="Binary")
          for j in range(len(cs))] for i, cs in enumerate(cands)]
    prob += pulp.lpSum(c.outcome.objective * v for cs, xs in zip(cands, x) for c, v in zip(cs, xs))
    for i, xs in enumerate(x):
        prob += pulp.lpSum(xs) == 1, f"one_{i}"
    flat = [(tb, c, v) for tb, cs, xs in zip(tables, cands, x) for c, v in zip(cs, xs)]
    prob += pulp.lpSum(c.choice.edge_share * v for _, c, v in flat) <= levels, "edge_share"
    prob += (pulp.lpSum(c.outcome.edge_bytes / 2 ** 20 * v for _, c, v in flat) <= tiers.edge.memory_mb,
             "edge_memory")
    for m in sorted({tiers.medium(tb.task.source) for tb in tables}):
        prob += (pulp.lpSum(c.choice.up_share * v for tb, c, v in flat if tiers.medium(tb.task.source) == m)
                 <= levels, f"uplink_{m}")
    for d in tiers.ends:
        mine = [(c, v) for tb, c, v in flat if tb.task.source == d.name]
        if mine:
            prob += pulp.lpSum(c.outcome.end_bytes / 2 ** 20 * v for c, v in mine) <= d.memory_mb, f"mem_{d.name}"
            prob += pulp.lpSum(c.end_load * v for c, v in mine) <= 1.0, f"load_{d.name}"
    build = time.perf_counter() - t0
    used, status = None, "not solved"
    for name, make in (("HiGHS", lambda: pulp.HiGHS(msg=msg, timeLimit=time_limit, gapRel=gap)),
                       ("HiGHS_CMD", lambda: pulp.HiGHS_CMD(msg=msg, timeLimit=time_limit, gapRel=gap)),
                       ("CBC", lambda: pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, gapRel=gap))):
        try:
            s = make()
            if not s.available():
                continue
            prob.solve(s)
            used, status = name, pulp.LpStatus[prob.status]
            break
        except Exception:   # noqa: BLE001 — try the next solver
            continue
    solve_time = time.perf_counter() - t0 - build
    if used is None or status == "Infeasible" or prob.sol_status not in (1, 2):
        raise EdgepartError(f"MCIA MILP: no plan meets the shared constraints (edge share, uplink share, memory, "
                            f"end-device load) together; status {status}")
    choices = []
    for i, (cs, xs) in enumerate(zip(cands, x)):
        j = max(range(len(xs)), key=lambda j: xs[j].value() or 0.0)
        choices.append(cs[j].choice)
    obj = pulp.value(prob.objective)
    return solution("milp", tables, tiers, choices, levels, solve_time=solve_time, gap=_mip_gap(prob, obj),
                    status=status, solver=used, n_vars=sum(len(cs) for cs in cands))


def _mip_gap(prob, obj: float) -> float:
    """Relative MIP gap from HiGHS when it reports one, else 0 for 'Optimal'."""
    try:
        info = prob.solverModel.getInfo()
        g = getattr(info, "mip_gap", None)
        if g is not None and g == g and g < 1e30:
            return float(g)
    except Exception:   # noqa: BLE001 — not HiGHS' API: fall back to the status
        pass
    return 0.0 if pulp.LpStatus[prob.status] == "Optimal" else float("nan")


def brute_force(tables: list[TaskTable], tiers: Tiers, levels: int) -> Solution | None:
    """Every combination of every task's unpruned candidates (tiny instances only); None if none is feasible."""
    best = None
    for combo in itertools.product(*[candidates(t, tiers, levels, prune=False) for t in tables]):
        choices = [c.choice for c in combo]
        if violations(tables, tiers, choices, levels):
            continue
        obj = sum(c.outcome.objective for c in combo)
        if best is None or obj > best[0]:
            best = (obj, choices)
    return None if best is None else solution("brute-force", tables, tiers, best[1], levels)
