"""MCIA (ACM TECS 2023): per task, the model version, the end | edge | cloud cuts and the task's share of
the edge server's compute and of its uplink, chosen jointly for many tasks (docs/mcia.md).

    tiers = Tiers.from_cluster(Cluster.from_file("cluster.yaml"))
    tasks, levels = load_tasks("tasks.yaml", tiers)
    tables = [build_table(t, cluster, tiers) for t in tasks]      # or TaskTable(...) written by hand
    sol = plan(tables, tiers, levels, "milp")                      # or a baseline name

Modules: scenario (tiers, tasks.yaml), table (cost tables, the one latency/objective evaluation),
build (a table from a version set), solve (the MILP, brute force), baselines, env (the scenario as a
gymnasium environment), drl (the trained policy: safetensors + JSON, and its planner), train (PPO),
synthetic (random scenarios).
"""
from __future__ import annotations

from edgepart.errors import EdgepartError
from edgepart.mcia.baselines import BASELINES
from edgepart.mcia.scenario import Link, Task, Tiers, load_tasks, parse_tasks
from edgepart.mcia.solve import Solution, solution, solve_milp
from edgepart.mcia.table import Choice, TaskTable, VersionCosts

STRATEGIES = ("milp", "drl", *BASELINES)


def plan(tables: list[TaskTable], tiers: Tiers, levels: int, strategy: str = "milp",
         time_limit: float = 60.0, gap: float = 1e-4, policy=None, rollouts: int | None = None) -> Solution:
    """The plan of ``strategy`` (milp, drl or a baseline), evaluated; the broken constraints of a baseline's
    or the DRL policy's plan are in ``Solution.violations`` (the MILP's are always empty). ``policy``: the
    DRL policy (a :class:`edgepart.mcia.drl.Policy` or its JSON spec's path; default: the shipped one);
    ``rollouts``: how many task orders it plans, the best kept (default ``drl.ROLLOUTS``)."""
    if strategy == "milp":
        return solve_milp(tables, tiers, levels, time_limit=time_limit, gap=gap)
    if strategy == "drl":
        from edgepart.mcia.drl import plan_drl  # why: torch and the policy file are loaded only for this strategy
        return plan_drl(tables, tiers, levels, policy, **({} if rollouts is None else {"rollouts": rollouts}))
    if strategy not in BASELINES:
        raise EdgepartError(f"unknown MCIA strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return solution(strategy, tables, tiers, BASELINES[strategy](tables, tiers, levels), levels)


__all__ = ["plan", "STRATEGIES", "Tiers", "Task", "Link", "load_tasks", "parse_tasks", "TaskTable",
           "VersionCosts", "Choice", "Solution"]
