"""The strategies by name, and ``make_plan``: the planning package's entry point.

The only module of the package that imports the strategy modules; none of them imports it
(dependencies run one way: primitives ← simple / ofpm ← baselines ← registry). ofpm's warm
start — the plans its MILP plan is compared against — is every other strategy, passed in here.
"""
from __future__ import annotations

import functools

import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.planning.baselines import BASELINES
from edgepart.compiler.planning.ofpm import plan_ofpm
from edgepart.compiler.planning.plan import Plan, Planner
from edgepart.compiler.planning.simple import SIMPLE
from edgepart.errors import PlanError

# The order is ofpm's warm-start order, which breaks ties between equally fast candidates.
WARM_START: dict[str, Planner] = {**SIMPLE, **BASELINES}
STRATEGIES: dict[str, Planner] = {**WARM_START, "ofpm": functools.partial(plan_ofpm, warm_start=WARM_START)}


def make_plan(gm: fx.GraphModule, cluster: Cluster, strategy: str | Plan | dict) -> Plan:
    """``strategy``: a name in STRATEGIES, a Plan (returned as is) or a plan dict (``Plan.from_dict``)."""
    if isinstance(strategy, Plan):
        return strategy
    if isinstance(strategy, dict):
        return Plan.from_dict(strategy)
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)} or pass a Plan")
    return STRATEGIES[strategy](gm, cluster)
