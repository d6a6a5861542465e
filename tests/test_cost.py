"""The cost model: a device's profile ÷ its speed (speed relative to the profiled machine); FLOPs fallback."""
from pathlib import Path

import pytest

from edgepart import models
from edgepart.cluster import Cluster
from edgepart.compiler.cost import REFERENCE_FLOPS, CostModel, node_info
from edgepart.compiler.plan import Plan, Stage, compute_nodes
from edgepart.compiler.simulator import simulate_plan
from edgepart.compiler.trace import trace
from edgepart.fcpm import DeviceProfile
from edgepart.passes import analyse

HOST = Path(__file__).resolve().parents[1] / "profiles" / "host.json"


@pytest.fixture(scope="module")
def tiny():
    model, (x,) = models.get("tinynet")
    return analyse(trace(model, (x,)))


@pytest.fixture(scope="module")
def host():
    return DeviceProfile.load(HOST)


def _cluster(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    return Cluster.from_file(tmp_path / "c.yaml")


def test_profile_time_is_divided_by_speed(tiny, host, tmp_path):
    cl = _cluster(tmp_path, f"devices:\n  - {{name: ref, profile: {HOST}}}\n"
                            f"  - {{name: half, speed: 0.5, profile: {HOST}}}\n"
                            f"  - {{name: fast, speed: 2.5, profile: {HOST}}}\n")
    cm = CostModel(cl)
    assert cm.profiles["ref"] is cm.profiles["half"] is cm.profiles["fast"]     # one profile, loaded once
    conv = next(n for n in compute_nodes(tiny) if n.meta["op"].kind == "conv2d")
    H = conv.meta["rows"]
    for rows in (None, 1, H // 2, H):
        p = host.predict(node_info(conv), rows)
        assert cm.compute_time(conv, "ref", rows) == p                          # speed 1.0: the profiled machine
        assert cm.compute_time(conv, "half", rows) == p / 0.5
        assert cm.compute_time(conv, "fast", rows) == p / 2.5
    # pinned numbers: the committed host profile's prediction for tinynet's first conv, all rows
    assert cm.compute_time(conv, "ref") == pytest.approx(host.predict(node_info(conv), H), rel=0, abs=0)
    assert cm.compute_time(conv, "half") == 2 * cm.compute_time(conv, "ref")


def test_fallback_is_flops_over_speed(tiny):
    cl = Cluster.heterogeneous([1.0, 0.5])
    cm = CostModel(cl)
    for n in compute_nodes(tiny):
        f = n.meta.get("flops", 0)
        assert cm.compute_time(n, "d0") == f / REFERENCE_FLOPS
        assert cm.compute_time(n, "d1") == f / (0.5 * REFERENCE_FLOPS)


def test_simulated_single_device_latency_is_profile_sum_over_speed(tiny, host, tmp_path):
    cl = _cluster(tmp_path, f"devices:\n  - {{name: a, speed: 0.4, profile: {HOST}}}\n")
    plan = Plan([Stage("whole", [n.name for n in compute_nodes(tiny)], device="a")], "single")
    sim = simulate_plan(tiny, plan, cl, CostModel(cl))
    expect = sum(host.predict(node_info(n), None) for n in compute_nodes(tiny)) / 0.4
    assert sim.latency == pytest.approx(expect, rel=1e-12)


class _StubProfile:
    """1 ms per output row, whatever the node: exact numbers to pin the scaling."""

    def predict(self, info, rows, load=0.0):
        return 1e-3 * (info["rows"] if rows is None else rows)


def test_exact_values_with_a_stub_profile(tiny):
    cl = Cluster.from_dict({"devices": [{"name": "a", "speed": 1.0}, {"name": "b", "speed": 0.25},
                                        {"name": "c", "speed": 0.5}]})
    cm = CostModel(cl, profiles={"a": _StubProfile(), "b": _StubProfile()})
    conv = next(n for n in compute_nodes(tiny) if n.meta["op"].kind == "conv2d")
    assert conv.meta["rows"] == 32
    assert cm.compute_time(conv, "a") == 0.032
    assert cm.compute_time(conv, "a", 5) == 0.005
    assert cm.compute_time(conv, "b", 5) == 0.020          # 5 ms on the profiled machine ÷ 0.25
    assert cm.compute_time(conv, "b", 0) == 0.0
    with pytest.warns(UserWarning, match="no FCPM profile"):
        assert cm.compute_time(conv, "c", 32) == conv.meta["flops"] / (0.5 * REFERENCE_FLOPS)   # no profile
