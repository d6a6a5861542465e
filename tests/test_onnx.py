"""ONNX in and out (#19): models imported from ONNX, device stages exported to ONNX Runtime.

Every zoo model is exported to ONNX by torch, imported by edgepart, split by rows over two devices
(a fused prefix of row-splittable layers, halo rows and border padding included, the rest whole)
and run with each device on torch and on ONNX Runtime: all exact against the original model.
"""
from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgepart
from edgepart import models
from edgepart.cluster import Cluster, Device
from edgepart.compiler.bundle import compile_plan, load_bundle
from edgepart.compiler.onnx_import import import_onnx
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.passes.trace import trace
from edgepart.errors import BundleError, ClusterError
from edgepart.passes import analyse
from tests.conftest import assert_close

BACKENDS = (None, "torch", "onnxruntime")   # None: each device on its own (a: onnxruntime, b: torch)


def to_onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17)
    return buf.getvalue()


def cluster() -> Cluster:
    return Cluster([Device("a", backend="onnxruntime"), Device("b")])


def prefix_plan(gm, devices=("a", "b")) -> Plan:
    """The longest prefix of row-splittable nodes (in graph order) that all feed its last node, a node
    with rows, capped at two thirds of the nodes, split by rows over ``devices``; the rest whole on the first."""
    nodes = compute_nodes(gm)
    best = 0
    seen: set = set()
    for i, n in enumerate(nodes[: max(1, 2 * len(nodes) // 3)]):
        if not n.meta.get("splittable"):
            break
        seen.add(n)
        ancestors, todo = set(), [n]
        while todo:
            for p in todo.pop().all_input_nodes:
                if p in seen and p not in ancestors:
                    ancestors.add(p)
                    todo.append(p)
        if ancestors | {n} == seen and n.meta["rows"] >= 2:      # a prefix ending in a node with rows to split
            best = i + 1
    rows = nodes[best - 1].meta["rows"]
    cut = [0, rows // 2, rows] if best else None
    stages = []
    if best and cut:
        stages.append(Stage("split", [n.name for n in nodes[:best]],
                            slices=[(d, a, b) for d, a, b in zip(devices, cut, cut[1:])]))
        rest = nodes[best:]
    else:
        rest = nodes
    if rest:
        stages.append(Stage("whole", [n.name for n in rest], device=devices[0]))
    return Plan(stages, "prefix")


def check_partitioned(model: nn.Module, x: torch.Tensor, name: str = "m"):
    """Export ``model`` to ONNX, import it, split it, run it on every backend: exact."""
    with torch.no_grad():
        ref = model(x)
    gm, _ = import_onnx(to_onnx(model, x), (x,))
    gm = trace(gm, (x,))
    cl = cluster()
    analyse(gm, cl)
    plan = prefix_plan(gm)
    assert plan.stages[0].kind == "split", "the test plan splits nothing"
    bundle = compile_plan(gm, plan, cl, name, onnx=True, inputs=(x,))
    for backend in BACKENDS:
        assert_close(bundle.run_local(x, backend=backend), ref)
    return bundle


FAST_ZOO = ["tinynet", "resnet18", "mobilenet_v2", "inception", "yolov2_tiny", "se_resnet", "unet"]


@pytest.mark.parametrize("name", FAST_ZOO)
def test_zoo_model_from_onnx_runs_partitioned_exactly(name):
    model, (x,) = models.get(name, input_size=max(32, models.min_input_size(name)))
    bundle = check_partitioned(model, x, name)
    assert bundle.report["backends"]["a"]["onnx_stages"], bundle.report["backends"]["a"]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet50", 64), ("vgg16", 224), ("alexnet", 224)])
def test_large_zoo_model_from_onnx_runs_partitioned_exactly(name, size):
    # vgg16 and alexnet: their adaptive pooling to 7×7 at sizes it does not divide (export_onnx._adaptive_avg_pool2d)
    model, (x,) = models.get(name, input_size=size)
    check_partitioned(model, x, name)


# --- common blocks made here --------------------------------------------------------------------------
class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        return self.pw(F.relu6(self.bn(self.dw(x))))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return F.relu(self.conv(x) * s + y)


class ConcatUpsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.out = nn.Conv2d(16, 4, 3, 1, 1)

    def forward(self, x):
        up = F.interpolate(F.relu(self.a(x)), scale_factor=2, mode="nearest")
        bil = F.interpolate(F.max_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(torch.cat([up + bil, self.b(x)], dim=1))


@pytest.mark.parametrize("block", [Depthwise, SqueezeExcite, ConcatUpsample])
def test_common_block_from_onnx_runs_partitioned_exactly(block):
    torch.manual_seed(0)
    model = block().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    check_partitioned(model, torch.randn(1, 8, 22, 18))


def test_compile_takes_an_onnx_model_and_names_what_runs_whole():
    class Transposed(nn.Module):     # Transpose of H and W: not row-local, runs whole
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return y - y.transpose(2, 3)

    model, x = Transposed().eval(), torch.randn(1, 3, 16, 16)
    bundle = edgepart.compile(onnx.load_from_string(to_onnx(model, x)), (x,), cluster(), strategy="even")
    assert_close(bundle.run_local(x), model(x))
    assert any("permute" in w["op"] or "transpose" in w["op"] for w in bundle.report["whole_nodes"]), \
        bundle.report["whole_nodes"]


def test_stage_that_does_not_export_stays_on_torch_and_the_report_says_why():
    class Odd(nn.Module):        # adaptive max pooling to a size that does not divide the input: no ONNX export
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.adaptive_max_pool2d(F.relu(self.conv(x)), 3)

    model, x = Odd().eval(), torch.randn(1, 3, 10, 10)
    plan = Plan([Stage("whole", ["conv", "relu"], device="a"), Stage("whole", ["adaptive_max_pool2d"], device="a")])
    bundle = edgepart.compile(model, (x,), Cluster([Device("a", backend="onnxruntime")]), strategy=plan)
    report = bundle.report["backends"]["a"]
    assert report["backend"] == "onnxruntime" and report["onnx_stages"] == [0]
    assert "export failed" in report["torch_stages"]["1"], report
    assert_close(bundle.run_local(x), model(x))


def test_bundle_stores_onnx_graphs_hashed(tmp_path):
    model, (x,) = models.get("tinynet")
    bundle = edgepart.compile(model, (x,), cluster(), strategy="even", onnx=True)
    bundle.save(tmp_path)
    spec = bundle.manifest.devices["a"]
    assert spec.backend == "onnxruntime" and spec.onnx
    assert all(rel in bundle.manifest.files for rel in spec.onnx.values())
    loaded = load_bundle(tmp_path)
    assert_close(loaded.run_local(x), model(x))
    assert_close(loaded.run_local(x, backend="onnxruntime"), model(x))
    rel = next(iter(spec.onnx.values()))
    (tmp_path / rel).write_bytes((tmp_path / rel).read_bytes() + b"\0")
    with pytest.raises(BundleError):
        load_bundle(tmp_path)


def test_onnxruntime_needs_exported_graphs():
    model, (x,) = models.get("tinynet")
    bundle = edgepart.compile(model, (x,), Cluster([Device("a")]), strategy="single")
    assert bundle.manifest.devices["a"].backend == "torch"
    assert bundle.report["backends"]["a"]["why"].startswith("no onnxruntime profile")
    with pytest.raises(BundleError, match="no ONNX graphs"):
        bundle.run_local(x, backend="onnxruntime")


def test_cluster_backend_keys():
    c = Cluster.from_dict({"devices": [{"name": "a", "backend": "onnxruntime",
                                        "profiles": {"onnxruntime": "/p/ort.json"}}, {"name": "b"}]})
    assert c.device("a").backend == "onnxruntime" and c.device("a").profile_for("onnxruntime") == "/p/ort.json"
    assert c.device("b").backend is None
    assert Cluster.from_dict(c.to_dict()).device("a").profiles == c.device("a").profiles
    with pytest.raises(ClusterError, match="backend"):
        Cluster.from_dict({"devices": [{"name": "a", "backend": "tensorrt"}]})


def _local_cluster_exact(backend, log_dir):
    model, (x,) = models.get("tinynet")
    bundle = edgepart.compile(model, (x,), cluster(), strategy="even", onnx=True)
    with edgepart.LocalCluster(bundle, backend=backend, log_dir=log_dir) as c:
        assert_close(c.infer(x), model(x))


def test_local_cluster_on_onnxruntime(tmp_path):
    """Worker processes (edgepart worker --backend onnxruntime) receive the ONNX graphs with the deploy and run them."""
    _local_cluster_exact("onnxruntime", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [None, "torch"])
def test_local_cluster_on_each_backend(backend, tmp_path):
    _local_cluster_exact(backend, tmp_path)


def test_an_onnx_op_without_a_converter_is_named():
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("MaxRoiPool", ["x", "rois"], ["y"], pooled_shape=[2, 2])
    rois = helper.make_tensor("rois", TensorProto.FLOAT, [1, 5], [0, 0, 0, 4, 4])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [rois]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(edgepart.UnsupportedOpError, match="MaxRoiPool"):
        edgepart.compile(model, (torch.randn(1, 3, 8, 8),), cluster())


def test_border_padding_exports_with_static_shapes():
    """The exporter writes a border padding's pads as a constant, so later ops that need their input's
    size (adaptive pooling, as in VGG-16's and AlexNet's heads) export too."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.flatten(F.adaptive_avg_pool2d(F.max_pool2d(F.relu(self.conv(x)), 3, 1, 1), (7, 7)), 1)

    model, x = Head().eval(), torch.randn(1, 3, 14, 14)
    bundle = edgepart.compile(model, (x,), Cluster([Device("a", backend="onnxruntime")]), strategy="single")
    assert bundle.report["backends"]["a"]["torch_stages"] == {}
    assert_close(bundle.run_local(x), model(x))


@pytest.mark.parametrize("size,out", [((5, 5), (7, 7)), ((10, 10), 3), ((7, 9), (2, 4)), ((8, 8), (4, 4)), ((6, 6), 1)])
def test_adaptive_average_pooling_to_any_size_runs_on_onnxruntime(size, out):
    """torch exports adaptive average pooling only to a size that divides the input; VGG-16's head at
    160 px pools 5×5 to 7×7, and its stage stayed on torch though costed as ONNX Runtime. Exported as
    averaging matrices, it runs in ONNX Runtime, exact."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.adaptive_avg_pool2d(F.relu(self.conv(x)), out)

    model, x = Head().eval(), torch.randn(1, 3, *size)
    bundle = edgepart.compile(model, (x,), Cluster([Device("a", backend="onnxruntime")]), strategy="single")
    report = bundle.report["backends"]["a"]
    assert report["onnx_stages"] == [0] and report["torch_stages"] == {}, report
    assert_close(bundle.run_local(x), model(x))


def test_each_device_is_costed_with_its_backends_profile():
    from pathlib import Path

    from edgepart.compiler.backends import choose_backends
    from edgepart.compiler.cost.model import ORT_STAGE_S, CostModel
    profiles = Path(__file__).resolve().parents[1] / "profiles"
    both = dict(profile=str(profiles / "host.json"), profiles=(("onnxruntime", str(profiles / "host_ort.json")),))
    cl = Cluster([Device("auto", **both), Device("ort", backend="onnxruntime", **both), Device("plain")])
    model, (x,) = models.get("tinynet")
    gm = trace(model, (x,))
    analyse(gm, cl)
    resolved, choice = choose_backends(gm, cl)
    assert choice["auto"].why.startswith("faster on its profiles") and choice["auto"].backend in ("torch", "onnxruntime")
    assert choice["ort"].backend == "onnxruntime" and choice["plain"].backend == "torch"
    cost = CostModel(resolved)
    assert cost.profiles["ort"].meta["backend"] == "onnxruntime"
    assert cost.stage_start_time("ort") == pytest.approx(cost.profiles["ort"].meta["stage_start_s"] + ORT_STAGE_S)
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and "conv" in n.name)
    torch_cost = CostModel(Cluster([Device("t", **both)]))
    assert cost.compute_time(conv, "ort") != torch_cost.compute_time(conv, "t")


def test_the_ort_sweep_keeps_exported_graphs_within_its_cap():
    """ort_runner_factory: a session per call (dropped by the caller after timing), its exported graph
    kept for the next pass only while the kept graphs fit the cap (a full sweep's sessions, all kept,
    once filled the 24 GB host)."""
    from edgepart.fcpm import ort_timing
    from edgepart.fcpm.profiler import conv_info
    info = conv_info(8, 8, 12, 12)
    calls = []
    real = ort_timing._export

    def counting(fn, x):
        calls.append(1)
        return real(fn, x)
    import unittest.mock as mock
    built = []
    real_runner = ort_timing.Runner

    def counting_runner(*a, **k):
        built.append(1)
        return real_runner(*a, **k)
    with mock.patch.object(ort_timing, "_export", counting), mock.patch.object(ort_timing, "Runner", counting_runner):
        keep = ort_timing.ort_runner_factory()
        a, b = keep(info, 4, 1), keep(info, 4, 1)
        assert len(calls) == 1 and a is not b and a.model == b.model
        assert len(built) == 1                  # a kept job builds no torch layer (nor its weights) again
        none = ort_timing.ort_runner_factory(cache_bytes=0)
        none(info, 4, 1)
        none(info, 4, 1)
        assert len(calls) == 3
    import numpy as np
    np.testing.assert_allclose(a()[0], b()[0])


def test_a_layer_the_exporter_refuses_raises_without_dumping_its_graph_on_stdout(capfd):
    """Timing a layer on ONNX Runtime exports it alone; an op the exporter cannot write at that size (an
    adaptive pool to a size that does not divide its input) raises — and the exporter's C++ graph dump,
    which `make demo` used to print, stays off the terminal. A layer that exports is unaffected."""
    from edgepart.fcpm.ort_timing import _export
    print("before", flush=True)
    with pytest.raises(Exception):
        _export(lambda x: F.adaptive_avg_pool2d(x, (7, 7)), torch.randn(1, 8, 7, 5))
    assert _export(torch.relu, torch.randn(1, 8, 7, 5))
    out, err = capfd.readouterr()
    assert "before" in out
    assert "Torch IR graph" not in out + err


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_stage_io_bytes_are_the_exported_stage_graphs_inputs_and_outputs(name):
    """What the cost model charges a stage's boundary for (simulator.stage_io_bytes, from the schedule)
    is what each exported ONNX Runtime stage graph takes in and gives back."""
    from edgepart.compiler.cost.simulator import stage_io_bytes
    from edgepart.runtime.ort import stage_io
    model, (x,) = models.get(name, input_size=64)
    cl = Cluster([Device(d, backend="onnxruntime") for d in "abc"])
    gm = analyse(trace(model, (x,)), cl)
    nodes = compute_nodes(gm)
    cut = len(nodes) // 2
    rows = nodes[cut - 1].meta["rows"]
    plan = Plan([Stage("split", [n.name for n in nodes[:cut]], slices=[("a", 0, rows // 3), ("b", rows // 3, rows)]),
                 Stage("whole", [n.name for n in nodes[cut:]], device="c")], "t")
    bundle = compile_plan(gm, plan, cl, name)
    got = stage_io_bytes(bundle.schedule)
    manifest = bundle.manifest
    expected = {}
    for dev, spec in manifest.devices.items():
        for stage in spec.rows:
            io_ = stage_io(spec, stage, manifest.output)
            n = 0
            for tensor, lo, hi in (*io_.inputs, *io_.outputs):
                t = manifest.tensors[tensor]
                n += (hi - lo) * 4 * int(torch.tensor(t.shape).prod()) // t.rows
            expected[(dev, stage)] = n
    assert expected and all(v > 0 for v in expected.values())
    assert got == pytest.approx(expected)
