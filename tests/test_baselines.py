"""Every strategy (simple planners, the published baselines, ofpm) plans a model whose bundle
runs exactly (output == the model's), on zoo models with small inputs and 2/3/4 devices."""
from __future__ import annotations

import pytest
import torch

import edgepart
from edgepart import models
from edgepart.cluster import Cluster
from edgepart.compiler.planning.baselines import plan_dads, plan_neurosurgeon
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.planning.ofpm import simulated_latency
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.passes.trace import trace
from edgepart.passes import analyse
from tests.conftest import assert_close

STRATEGIES = ["single", "neurosurgeon", "dads", "modnn", "deepthings", "aofl", "edgeld", "ofpm"]
CASES = [("tinynet", None), ("resnet18", 32), ("mobilenet_v2", 32), ("inception", 32), ("yolov2_tiny", 64)]


@pytest.fixture(scope="module")
def zoo():
    out = {}
    for name, size in CASES:
        m, (x,) = models.get(name, input_size=size)
        with torch.no_grad():
            out[name] = (m, x, m(x))
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)])
def test_every_strategy_runs_exactly(zoo, name, n):
    m, x, ref = zoo[name]
    speeds = [1.0, 3.0, 2.0, 4.0][:n]
    # a fast network so that the split strategies really split
    cl = Cluster.heterogeneous(speeds, bandwidth_mbps=10000, latency_ms=0.01)
    for strategy in STRATEGIES:
        b = edgepart.compile(m, (x,), cl, strategy=strategy)
        with torch.no_grad():
            y = b.run_local(x)
        assert_close(y, ref)


def test_neurosurgeon_is_the_best_single_cut():
    m, (x,) = models.get("tinynet")
    gm = trace(m, (x,))
    analyse(gm)
    cl = Cluster.heterogeneous([1.0, 8.0], bandwidth_mbps=50, latency_ms=0.5)
    cost = CostModel(cl)
    names = [n.name for n in compute_nodes(gm)]
    best = min(simulated_latency(gm, Plan([s for s in (Stage("whole", names[:c], device="d0") if c else None,
                                                         Stage("whole", names[c:], device="d1") if c < len(names)
                                                         else None) if s]), cl, cost)
               for c in range(len(names) + 1))
    assert simulated_latency(gm, plan_neurosurgeon(gm, cl), cl, cost) == pytest.approx(best, rel=1e-9)


def test_dads_never_worse_than_neurosurgeon_on_chains():
    m, (x,) = models.get("tinynet")
    gm = trace(m, (x,))
    analyse(gm)
    for bw in (1, 10, 100, 1000):
        cl = Cluster.heterogeneous([1.0, 8.0], bandwidth_mbps=bw, latency_ms=0.0)
        cost = CostModel(cl)
        assert (simulated_latency(gm, plan_dads(gm, cl), cl, cost)
                <= simulated_latency(gm, plan_neurosurgeon(gm, cl), cl, cost) * 1.0 + 2e-3)
