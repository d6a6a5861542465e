"""The cost model: a device's profile ÷ its speed (speed relative to the profiled machine); FLOPs fallback."""
from pathlib import Path

import pytest

from edgepart import models
from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import (REFERENCE_FLOPS, RUNTIME_NODE_S, RUNTIME_PAD_BYTE_S, RUNTIME_STAGE_S, CostModel,
                                   node_info, padded_input_bytes)
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.compiler.cost.simulator import simulate_plan
from edgepart.passes.trace import trace
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
        r = H if rows is None else rows
        p = host.predict(node_info(conv), rows) + cm.runtime_overhead(node_info(conv), r)
        assert cm.compute_time(conv, "ref", rows) == p                          # speed 1.0: the profiled machine
        assert cm.compute_time(conv, "half", rows) == p / 0.5
        assert cm.compute_time(conv, "fast", rows) == p / 2.5
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
    cm = CostModel(cl)
    expect = (sum(host.predict(node_info(n), None) + cm.runtime_overhead(node_info(n), n.meta["rows"])
                  for n in compute_nodes(tiny)) + RUNTIME_STAGE_S) / 0.4       # one stage, started once
    assert sim.latency == pytest.approx(expect, rel=1e-12)


class _StubProfile:
    """1 ms per output row, whatever the node: exact numbers to pin the scaling."""

    def predict(self, info, rows, load=0.0):
        return 1e-3 * (info["rows"] if rows is None else rows)


def test_exact_values_with_a_stub_profile(tiny):
    cl = Cluster.from_dict({"devices": [{"name": "a", "speed": 1.0}, {"name": "b", "speed": 0.25},
                                        {"name": "c", "speed": 0.5}]})
    cm = CostModel(cl, profiles={"a": _StubProfile(), "b": _StubProfile()}, runtime_node_s=0, runtime_pad_byte_s=0)
    conv = next(n for n in compute_nodes(tiny) if n.meta["op"].kind == "conv2d")
    assert conv.meta["rows"] == 32
    assert cm.compute_time(conv, "a") == 0.032
    assert cm.compute_time(conv, "a", 5) == 0.005
    assert cm.compute_time(conv, "b", 5) == 0.020          # 5 ms on the profiled machine ÷ 0.25
    assert cm.compute_time(conv, "b", 0) == 0.0
    with pytest.warns(UserWarning, match="no FCPM profile"):
        assert cm.compute_time(conv, "c", 32) == conv.meta["flops"] / (0.5 * REFERENCE_FLOPS)   # no profile


def test_stage_start_per_profiled_device_and_stage(tiny):
    """Each (device, stage) run pays one stage start ÷ speed, on profiled devices only."""
    cl = Cluster.from_dict({"devices": [{"name": "a", "speed": 0.5}, {"name": "c", "speed": 0.5}]})
    cm = CostModel(cl, profiles={"a": _StubProfile()}, runtime_node_s=0, runtime_pad_byte_s=0)
    assert cm.stage_start_time("a") == RUNTIME_STAGE_S / 0.5
    assert cm.stage_start_time("c") == 0.0
    names = [n.name for n in compute_nodes(tiny)]
    one = Plan([Stage("whole", names, device="a")], "one")
    two = Plan([Stage("whole", names[:3], device="a"), Stage("whole", names[3:], device="a")], "two")
    t1 = simulate_plan(tiny, one, cl, cm).latency
    t2 = simulate_plan(tiny, two, cl, cm).latency
    assert t2 - t1 == pytest.approx(RUNTIME_STAGE_S / 0.5, rel=1e-9)   # same work, one more stage start


def test_stage_start_ms_of_a_device_overrides_the_constant(tiny):
    """A device's measured ``stage_start_ms`` (its own time) replaces RUNTIME_STAGE_S ÷ speed, with or
    without a profile; it round-trips through the cluster description and is checked."""
    from edgepart.errors import ClusterError
    cl = Cluster.from_dict({"devices": [{"name": "a", "speed": 0.5, "stage_start_ms": 0.6},
                                        {"name": "c", "speed": 0.5, "stage_start_ms": 0.25}]})
    cm = CostModel(cl, profiles={"a": _StubProfile()})
    assert cm.stage_start_time("a") == pytest.approx(0.6e-3) and cm.stage_start_time("c") == pytest.approx(0.25e-3)
    assert Cluster.from_dict(cl.to_dict()).device("a").stage_start_ms == 0.6
    with pytest.raises(ClusterError, match="'a'.*stage_start_ms"):
        Cluster.from_dict({"devices": [{"name": "a", "stage_start_ms": -1}]})
    with pytest.raises(ClusterError, match="'a'.*stage_start_ms must be a number"):
        Cluster.from_dict({"devices": [{"name": "a", "stage_start_ms": "soon"}]})


def test_runtime_overhead_per_node_and_padded_window(tiny):
    """The device program's own cost: a constant per node + a copy of a row-padded conv's input window."""
    cl = Cluster.from_dict({"devices": [{"name": "a", "speed": 0.5}]})
    cm = CostModel(cl, profiles={"a": _StubProfile()})
    conv = next(n for n in compute_nodes(tiny) if n.meta["op"].kind == "conv2d")
    info = node_info(conv)
    assert info["params"]["pad"][:2] != (0, 0)
    C, H, W = info["in_shape"][1:]
    assert padded_input_bytes(info, None) == 4 * C * H * W
    assert padded_input_bytes(info, 8) == 4 * C * H * W * 8 / conv.meta["rows"]
    over = RUNTIME_NODE_S + RUNTIME_PAD_BYTE_S * 4 * C * H * W * 8 / conv.meta["rows"]
    assert cm.runtime_overhead(info, 8) == over
    assert cm.compute_time(conv, "a", 8) == pytest.approx((0.008 + over) / 0.5, rel=1e-15)
    relu = next(n for n in compute_nodes(tiny) if n.meta["op"].kind == "activation")
    assert padded_input_bytes(node_info(relu), None) == 0
    assert cm.runtime_overhead(node_info(relu), 3) == RUNTIME_NODE_S


def test_memory_speed_slows_memory_bound_layers_only(host, tmp_path):
    """A large fully connected layer streams its weights from memory: at half the memory speed it takes
    about twice as long; a convolution is compute-bound and barely moves."""
    from edgepart.fcpm.profiler import linear_info
    ref_info, ref_t = host.streaming_reference()
    assert ref_info["kind"] == "linear" and ref_t > 0
    assert 5e9 < host.stream_bandwidth() < 200e9          # bytes/s: a plausible DRAM stream
    cl = _cluster(tmp_path, f"devices:\n  - {{name: now, profile: {HOST}, memory_speed: 0.5}}\n"
                            f"  - {{name: then, profile: {HOST}}}\n")
    assert cl.device("now").memory_speed == 0.5 and "memory_speed" not in cl.to_dict()["devices"][1]
    assert Cluster.from_dict(cl.to_dict()).device("now").memory_speed == 0.5
    cm = CostModel(cl)
    big = linear_info(25088, 4096)
    slow, base = cm.compute_time(big, "now"), cm.compute_time(big, "then")
    over = cm.runtime_overhead(big, None)
    assert (slow - over) == pytest.approx(2 * (base - over), rel=0.02)   # the profile predicts it a hair above pure streaming
    model, (x,) = models.get("vgg16", input_size=64)
    gm = analyse(trace(model, (x,)))
    conv = next(n for n in compute_nodes(gm) if n.meta["op"].kind == "conv2d" and n.meta["rows"] >= 16)
    c_slow, c_base = cm.compute_time(conv, "now"), cm.compute_time(conv, "then")
    assert c_base <= c_slow < 1.1 * c_base
    # an explicit argument overrides the cluster's value
    assert CostModel(cl, memory_speed=1.0).compute_time(big, "now") == pytest.approx(base)
    with pytest.raises(Exception, match="memory_speed"):
        Cluster.from_dict({"devices": [{"name": "a", "memory_speed": 0}]})


def test_calibration_divides_one_op_type(host, tmp_path):
    cl = _cluster(tmp_path, f"devices:\n  - {{name: now, profile: {HOST}, calibration: {{conv: 0.5}}}}\n"
                            f"  - {{name: then, profile: {HOST}}}\n")
    assert dict(cl.device("now").calibration) == {"conv": 0.5}
    assert Cluster.from_dict(cl.to_dict()).device("now").calibration == cl.device("now").calibration
    cm = CostModel(cl)
    model, (x,) = models.get("resnet18", input_size=64)
    gm = analyse(trace(model, (x,)))
    nodes = list(compute_nodes(gm))
    conv = next(n for n in nodes if n.meta["op"].kind == "conv2d")
    bn = next(n for n in nodes if n.meta["op"].kind == "batch_norm")
    over = cm.runtime_overhead(node_info(conv), None)
    assert cm.compute_time(conv, "now") - over == pytest.approx(2 * (cm.compute_time(conv, "then") - over))
    assert cm.compute_time(bn, "now") == pytest.approx(cm.compute_time(bn, "then"))
    with pytest.raises(Exception, match="calibration"):
        Cluster.from_dict({"devices": [{"name": "a", "calibration": {"conv": -1}}]})
    with pytest.raises(Exception, match="calibration"):
        Cluster.from_dict({"devices": [{"name": "a", "calibration": [1, 2]}]})


def test_node_calibration_scales_a_node_whole_and_sliced(tiny):
    """A device's measured node calibration multiplies the prediction of that node at those rows
    (linear between the measured points, the nearest point outside them); other nodes and devices
    keep their op type's."""
    conv, other = [n for n in compute_nodes(tiny) if n.meta["op"].kind == "conv2d"][:2]
    assert conv.meta["rows"] == 32
    cl = Cluster.from_dict({"devices": [
        {"name": "a", "speed": 0.5, "node_calibration": {conv.name: [[2, 3.0], [16, 2.0], [32, 0.8]]}},
        {"name": "b", "speed": 0.5}]})
    cm = CostModel(cl, profiles={"a": _StubProfile(), "b": _StubProfile()}, runtime_node_s=0, runtime_pad_byte_s=0)
    assert cm.compute_time(conv, "a") == pytest.approx(0.032 * 0.8 / 0.5)            # whole: its own level
    assert cm.compute_time(conv, "a", 32) == pytest.approx(0.032 * 0.8 / 0.5)
    assert cm.compute_time(conv, "a", 1) == pytest.approx(0.001 * 3.0 / 0.5)         # below the first point
    assert cm.compute_time(conv, "a", 9) == pytest.approx(0.009 * 2.5 / 0.5)         # halfway from 2 to 16
    assert cm.compute_time(conv, "a", 24) == pytest.approx(0.024 * 1.4 / 0.5)
    assert cm.compute_time(conv, "b", 9) == pytest.approx(0.009 / 0.5)               # b measured none
    assert cm.compute_time(other, "a", 9) == pytest.approx(0.009 / 0.5)              # nor this node


def test_node_calibration_round_trip_and_are_checked():
    from edgepart.errors import ClusterError
    cl = Cluster.from_dict({"devices": [{"name": "a", "node_calibration": {"c1": [[1, 2.0], [4, 1.0]]}}]})
    assert cl.device("a").node_calibration == (("c1", ((1, 2.0), (4, 1.0))),)
    assert Cluster.from_dict(cl.to_dict()).device("a").node_calibration == cl.device("a").node_calibration
    for bad in ([[4, 1.0], [1, 2.0]], [[1, 0.0]], [[0, 1.0]], [], [[1]], "steep"):
        with pytest.raises(ClusterError, match="'a', node 'c1': node_calibration must map"):
            Cluster.from_dict({"devices": [{"name": "a", "node_calibration": {"c1": bad}}]})
    with pytest.raises(ClusterError, match="'a': node_calibration must map"):
        Cluster.from_dict({"devices": [{"name": "a", "node_calibration": [[1, 2.0]]}]})


def test_compile_warns_of_node_calibration_for_another_model():
    """A node calibration naming nodes the model does not have (measured on another model, a typo)
    would silently not apply: compile says so, naming the device and the nodes."""
    import edgepart
    model, (x,) = models.get("tinynet")
    cl = Cluster.from_dict({"devices": [{"name": "a", "node_calibration": {"features_28": [[1, 2.0]]}}]})
    with pytest.warns(UserWarning, match="device 'a': node_calibration names 1 node.*features_28"):
        edgepart.compile(model, (x,), cl, strategy="single")


def test_stage_io_time_per_device_key_else_the_ort_constant_on_profiled_ort_devices(monkeypatch):
    from pathlib import Path

    from edgepart.cluster import Cluster, Device
    from edgepart.compiler.cost import model as cost_model
    profiles = Path(__file__).resolve().parents[1] / "profiles"
    ort = dict(profile=str(profiles / "host.json"), profiles=(("onnxruntime", str(profiles / "host_ort.json")),),
               backend="onnxruntime")
    cl = Cluster([Device("given", speed=0.5, stage_io_us_per_mb=200.0, **ort), Device("ort", speed=0.5, **ort),
                  Device("torch", profile=str(profiles / "host.json")), Device("plain", backend="onnxruntime")])
    monkeypatch.setattr(cost_model, "ORT_STAGE_IO_S_PER_BYTE", 1e-10)
    cost = cost_model.CostModel(cl)
    assert cost.stage_io_time("given", 1e6) == pytest.approx(200e-6)      # its own time: not ÷ speed
    assert cost.stage_io_time("ort", 1e6) == pytest.approx(1e-10 * 1e6 / 0.5)
    assert cost.stage_io_time("torch", 1e6) == 0.0 and cost.stage_io_time("plain", 1e6) == 0.0
    assert cost.charges_stage_io()
    assert Cluster.from_dict(cl.to_dict()).device("given").stage_io_us_per_mb == 200.0


def test_the_weights_a_stage_reads_are_charged_per_device_and_stage_when_the_cluster_says_so():
    """``stage_weights_us_per_mb``: every (device, stage) pays for the weights its nodes read, a split
    stage on each of its devices; the simulator and the OFPM model's arcs both charge it."""
    from edgepart import models
    from edgepart.cluster import Cluster
    from edgepart.compiler.cost.model import CostModel
    from edgepart.compiler.cost.simulator import param_bytes, simulate, stage_weight_bytes
    from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
    from edgepart.compiler.planning.ofpm import OFPMModel
    from edgepart.compiler.schedule import build_schedule
    from edgepart.passes import analyse
    from edgepart.passes.trace import trace
    model, (x,) = models.get("tinynet")

    def cluster(rate):
        extra = {} if rate is None else {"stage_weights_us_per_mb": rate}
        return Cluster.from_dict({"source": "a", "devices": [{"name": "a", **extra}, {"name": "b", **extra}]})
    gm = analyse(trace(model, (x,)), cluster(None))
    nodes = compute_nodes(gm)
    total = sum(param_bytes(gm, n) for n in nodes)
    cut = next(i for i, n in enumerate(nodes) if not n.meta.get("splittable"))
    rows = nodes[cut - 1].meta["rows"]
    plan = Plan([Stage("split", [n.name for n in nodes[:cut]], slices=[("a", 0, rows // 2), ("b", rows // 2, rows)]),
                 Stage("whole", [n.name for n in nodes[cut:]], device="a")], "t")
    schedule = build_schedule(gm, plan, cluster(None))
    weights = stage_weight_bytes(gm, schedule)
    split_w = sum(param_bytes(gm, n) for n in nodes[:cut])
    assert weights[("a", 0)] == weights[("b", 0)] == split_w and weights[("a", 1)] == total - split_w
    base = simulate(schedule, cluster(None), CostModel(cluster(None)), gm=gm)
    charged = simulate(schedule, cluster(1000.0), CostModel(cluster(1000.0)), gm=gm)
    per_run = {(r.device, r.stage): r.end - r.start for r in base.runs}
    for r in charged.runs:
        assert r.end - r.start == pytest.approx(per_run[(r.device, r.stage)] + 1000e-12 * weights[(r.device, r.stage)])
    free, paid = OFPMModel(gm, cluster(None), CostModel(cluster(None))), OFPMModel(gm, cluster(1000.0), CostModel(cluster(1000.0)))
    whole = [(a.c0, a.device, a.cost) for a in free.arcs if a.kind == "whole"]
    whole_paid = [a.cost for a in paid.arcs if a.kind == "whole"]
    assert [c + 1000e-12 * free.unit_params[u] for u, _, c in whole] == pytest.approx(whole_paid)


def test_stage_overhead_as_cluster_keys_charges_exactly_its_figures():
    """StageOverhead (the in-worker fit the demo and the testbed plan with): its device keys, ÷ speed, make the
    cost model charge exactly its start, bytes in and out and weight bytes; a model run whole is charged
    ``whole_model_s`` on the profiled machine."""
    from edgepart.cluster import Cluster
    from edgepart.compiler.cost.model import ORT_WORKER_STAGE, CostModel, StageOverhead
    o = StageOverhead(start_s=200e-6, io_s_per_byte=1e-10, weights_s_per_byte=3e-11)
    assert o.device_keys(0.5) == pytest.approx({"stage_start_ms": 0.4, "stage_io_us_per_mb": 200.0,
                                                "stage_weights_us_per_mb": 60.0})
    cl = Cluster.from_dict({"source": "a", "devices": [{"name": "a", "speed": 0.5, **o.device_keys(0.5)}]})
    cost = CostModel(cl)
    assert cost.stage_start_time("a") == pytest.approx(400e-6)
    assert cost.stage_io_time("a", 1e6) == pytest.approx(1e-10 * 1e6 / 0.5)
    assert cost.stage_weights_time("a", 1e6) == pytest.approx(3e-11 * 1e6 / 0.5)
    assert o.whole_model_s(1e6, 2e6) == pytest.approx(200e-6 + 1e-4 + 6e-5)
    assert StageOverhead(start_s=1e-4).device_keys(0.5) == {"stage_start_ms": 0.2}     # the others: the defaults
    assert StageOverhead(start_s=1e-4).whole_model_s(1e6, 2e6) == pytest.approx(1e-4)
    import torch
    from edgepart.compiler.cost.model import whole_model_bytes
    lin = torch.nn.Linear(3, 2)
    assert whole_model_bytes(lin, (torch.zeros(1, 3),), torch.zeros(1, 2)) == (4 * 5, 4 * 8)
    assert ORT_WORKER_STAGE.io_s_per_byte == 0.0 and ORT_WORKER_STAGE.weights_s_per_byte > 0
