"""The discrete-event simulator: hand-checked timings, contention models, scale."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from edgepart import models
from edgepart.cluster import Cluster, Device
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.compiler.planning.simple import plan_proportional
from edgepart.compiler.schedule import build_schedule
from edgepart.compiler.cost.simulator import simulate, simulate_plan
from edgepart.passes.trace import trace
from edgepart.passes import analyse


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    m = Chain().eval()
    x = torch.randn(1, 3, 16, 16)
    gm = trace(m, (x,))
    analyse(gm)
    return gm


def names(gm):
    return [n.name for n in compute_nodes(gm)]


def nbytes(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name).meta["bytes"]


def test_single_device_is_sum_of_compute(chain):
    cl = Cluster.homogeneous(2, bandwidth_mbps=10)
    cost = CostModel(cl)
    plan = Plan([Stage("whole", names(chain), device="d0")])
    r = simulate_plan(chain, plan, cl, cost)
    expect = sum(cost.compute_time(n, "d0") for n in compute_nodes(chain))
    assert r.latency == pytest.approx(expect, rel=1e-12)
    assert r.transfers == []
    assert r.devices["d0"]["compute"] == pytest.approx(expect)


def test_offload_adds_two_transfers(chain):
    cl = Cluster.heterogeneous([1.0, 4.0], bandwidth_mbps=100, latency_ms=2)
    cost = CostModel(cl)
    plan = Plan([Stage("whole", names(chain), device="d1")])
    r = simulate_plan(chain, plan, cl, cost)
    x = next(n for n in chain.graph.nodes if n.op == "placeholder")
    out = compute_nodes(chain)[-1]
    expect = (cost.transfer_time(x.meta["bytes"], "d0", "d1")
              + sum(cost.compute_time(n, "d1") for n in compute_nodes(chain))
              + cost.transfer_time(out.meta["bytes"], "d1", "d0"))
    assert r.latency == pytest.approx(expect, rel=1e-12)
    assert [p["kind"] for p in r.critical_path] == ["transfer", "run", "transfer"]
    assert r.critical_path[-1]["end"] == pytest.approx(r.latency)


def test_scatter_serialises_on_sender_nic_and_shared_medium(chain):
    ns = names(chain)
    for shared in (False, True):
        cl = Cluster([Device(f"d{i}") for i in range(3)], {"bandwidth_mbps": 10, "latency_ms": 1},
                     shared_medium=shared)
        cost = CostModel(cl)
        plan = Plan([Stage("split", ns[:1], slices=[("d1", 0, 8), ("d2", 8, 16)]),
                     Stage("whole", ns[1:], device="d0")])
        sched = build_schedule(chain, plan, cl)
        r = simulate(sched, cl, cost, gm=chain)
        scatter = sorted((t for t in r.transfers if t.src == "d0"), key=lambda t: t.start)
        assert len(scatter) == 2
        # the second piece waits for the first on d0's NIC (and on the medium)
        assert scatter[1].start == pytest.approx(scatter[0].arrival)
        gather = [t for t in r.transfers if t.dst == "d0"]
        assert len(gather) == 2
        if shared:   # the medium carries one message at a time
            spans = sorted((t.start, t.arrival) for t in r.transfers)
            assert all(b[0] >= a[1] - 1e-12 for a, b in zip(spans, spans[1:]))
        # latency = last gathered piece + d0's compute of the rest
        rest = sum(cost.compute_time(n, "d0") for n in compute_nodes(chain)[1:])
        assert r.latency == pytest.approx(max(t.arrival for t in gather) + rest)


def test_split_halo_rows_are_charged(chain):
    """Three 3×3 convolutions split in halves of 16 rows: by hand, c3's 8 rows need 9 rows of c2
    (and of the ReLU between), which need 10 rows of c1 (and its ReLU) — on each side."""
    cl = Cluster.homogeneous(2, bandwidth_mbps=1000, latency_ms=0)
    cost = CostModel(cl)
    ns = names(chain)
    assert ns == ["c1", "relu", "c2", "relu_1", "c3"]
    by_hand = {"d0": {"c1": (0, 10), "relu": (0, 10), "c2": (0, 9), "relu_1": (0, 9), "c3": (0, 8)},
               "d1": {"c1": (6, 16), "relu": (6, 16), "c2": (7, 16), "relu_1": (7, 16), "c3": (8, 16)}}
    plan = Plan([Stage("split", ns, slices=[("d0", 0, 8), ("d1", 8, 16)])])
    sched = build_schedule(chain, plan, cl)
    assert {d: {n: e.out for n, e in sched.rows[d][0].items()} for d in by_hand} == by_hand
    r = simulate(sched, cl, cost, gm=chain)
    nodes = {n.name: n for n in chain.graph.nodes}
    for dev, rows in by_hand.items():
        expect = sum(cost.compute_time(nodes[n], dev, b - a) for n, (a, b) in rows.items())
        assert r.devices[dev]["compute"] == pytest.approx(expect)
        assert expect > sum(cost.compute_time(nodes[n], dev) for n in ns) / 2   # halo recomputed


def test_64_devices_simulate():
    """64 devices simulate to a consistent result (how fast: benchmarks/solver_scaling.py)."""
    m, (x,) = models.get("tinynet")
    gm = trace(m, (x,))
    analyse(gm)
    cl = Cluster.heterogeneous([1 + (i % 4) for i in range(64)], bandwidth_mbps=100)
    plan = plan_proportional(gm, cl)
    sched = build_schedule(gm, plan, cl)
    r = simulate(sched, cl, gm=gm)
    assert r.latency > 0
    for d, v in r.devices.items():
        assert v["compute"] <= r.latency + 1e-12
    # the critical path is contiguous in time and ends at the latency
    assert r.critical_path[-1]["end"] == pytest.approx(r.latency)
    for a, b in zip(r.critical_path, r.critical_path[1:]):
        assert b["start"] >= a["end"] - 1e-12
