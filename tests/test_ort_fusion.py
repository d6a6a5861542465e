"""Convolution epilogues on ONNX Runtime (#19): a batch norm or activation that ORT computes inside the
convolution before it costs nothing on an ORT device — in the planner's and simulator's cost model and in
the online calibration — and its own cost on torch; and the rule agrees with what ORT really fuses in
the stage graphs the exporter emits (the optimised model ORT saves, at the runtime's optimisation level).
"""
from __future__ import annotations

import collections
import glob
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import edgepart
from edgepart.cluster import Cluster, Device
from edgepart.compiler.cost.calibration.whole_model import predicted_model_time
from edgepart.compiler.cost.model import CostModel, fused_into
from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.ops import family
from edgepart.passes import analyse
from edgepart.passes.info import node_info
from edgepart.passes.trace import trace
from edgepart.runtime.ort import session_options

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
BOTH = dict(profile=str(PROFILES / "host.json"), profiles=(("onnxruntime", str(PROFILES / "host_ort.json")),))


class Tiny(nn.Module):
    """conv → BN → ReLU; max pool → BN → ReLU (no convolution before them); conv → ReLU → BN; conv → SiLU;
    conv whose output two nodes read → ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.pool, self.bn2, self.relu2 = nn.MaxPool2d(2), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.relu3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16)
        self.conv3, self.silu = nn.Conv2d(16, 16, 3, padding=1), nn.SiLU()
        self.conv4, self.relu4 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()

    def forward(self, x):
        x = self.relu2(self.bn2(self.pool(self.relu1(self.bn1(self.conv1(x))))))
        x = self.silu(self.conv3(self.bn3(self.relu3(self.conv2(x)))))
        y = self.conv4(x)
        return self.relu4(y) + y


def tiny_graph():
    model = Tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = analyse(trace(model, (x,)))
    return gm, {n.name: n for n in gm.graph.nodes}


def test_epilogue_pass_marks_what_reads_a_convolution_alone():
    _, n = tiny_graph()
    marked = {k: v.meta["epilogue_of"] for k, v in n.items() if v.meta.get("epilogue_of")}
    # relu3 → bn3: a batch norm after an activation is not folded; relu4: conv4's output is read twice
    assert marked == {"bn1": "conv1", "relu1": "conv1", "relu3": "conv2", "silu": "conv3"}
    assert node_info(n["relu1"])["epilogue_of"] == "conv1" and node_info(n["bn2"])["epilogue_of"] is None


def test_rule_fuses_bn_and_the_activations_ort_fuses_on_ort_only():
    _, n = tiny_graph()
    info = {k: node_info(v) for k, v in n.items() if k in ("bn1", "relu1", "relu3", "silu", "bn2", "conv1")}
    assert {k: fused_into(i, "onnxruntime") for k, i in info.items()} == {
        "bn1": "conv1", "relu1": "conv1", "relu3": "conv2", "silu": None, "bn2": None, "conv1": None}
    assert all(fused_into(i, "torch") is None for i in info.values())


def test_a_fused_epilogue_costs_nothing_on_an_ort_device_and_its_own_time_on_torch():
    gm, n = tiny_graph()
    cost = CostModel(Cluster([Device("t", backend="torch", **BOTH), Device("o", backend="onnxruntime", **BOTH)]))
    for name in ("bn1", "relu1", "relu3"):
        assert cost.compute_time(n[name], "o") == 0.0
        assert cost.compute_time(n[name], "o", rows=5) == 0.0
        assert cost.compute_time(n[name], "t") > 0.0
    for name in ("bn2", "relu2", "bn3", "silu", "relu4", "conv1"):     # not fused: charged on ORT too
        assert cost.compute_time(n[name], "o") > 0.0
    # the simulator gives the nodes of the device's stage: with the convolution in another stage the
    # epilogue is an op of its own there
    assert cost.compute_time(n["bn1"], "o", stage={"conv1", "bn1", "relu1"}) == 0.0
    assert cost.compute_time(n["bn1"], "o", stage={"bn1", "relu1"}) > 0.0


def test_the_simulator_charges_an_epilogue_cut_from_its_convolution():
    """Whole stages on one ORT device: conv1 | bn1 relu1 ... — bn1 and relu1 are charged in stage 1;
    with conv1 in their stage they are not."""
    from edgepart.compiler.cost.simulator import stage_compute_time
    from edgepart.ir.manifest import NodeRows
    gm, n = tiny_graph()
    cost = CostModel(Cluster([Device("o", backend="onnxruntime", **BOTH)]))
    rows = lambda k: NodeRows(out=(0, n[k].meta["rows"]), inputs={})  # noqa: E731
    start = cost.stage_start_time("o")
    together = stage_compute_time(cost, n, "o", {k: rows(k) for k in ("conv1", "bn1", "relu1")})
    conv_only = stage_compute_time(cost, n, "o", {"conv1": rows("conv1")})
    apart = stage_compute_time(cost, n, "o", {k: rows(k) for k in ("bn1", "relu1")})
    assert together == pytest.approx(conv_only)
    assert apart > start and apart == pytest.approx(start + cost.compute_time(n["bn1"], "o", stage={"bn1"})
                                                     + cost.compute_time(n["relu1"], "o", stage={"relu1"}))


def test_calibration_predicts_the_model_without_the_fused_epilogues_on_ort():
    gm, n = tiny_graph()
    prof = DeviceProfile.load(PROFILES / "host_ort.json")
    infos = [node_info(v) for v in n.values() if v.op in ("call_module", "call_function", "call_method")]
    on_ort = predicted_model_time(prof, infos, {}, 1.0, "onnxruntime")
    on_torch = predicted_model_time(prof, infos, {}, 1.0, "torch")
    fused = sum(prof.predict(i, None) for i in infos if i["name"] in ("bn1", "relu1", "relu3"))
    assert fused > 0 and on_ort == pytest.approx(on_torch - fused)


# --- the rule against ONNX Runtime itself -------------------------------------------------------------

def _block(act: nn.Module | None, bn: bool) -> nn.Module:
    layers = [nn.Conv2d(3, 16, 3, padding=1)] + ([nn.BatchNorm2d(16)] if bn else []) + ([act] if act else [])
    layers += [nn.Conv2d(16, 16, 3, padding=1)] + ([nn.BatchNorm2d(16)] if bn else []) + ([act] if act else [])
    m = nn.Sequential(*layers)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):     # not the identity BN of a fresh module
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return m.eval()


CASES = {"bn_relu": (nn.ReLU(), True), "bn_leaky": (nn.LeakyReLU(0.1), True), "relu6": (nn.ReLU6(), False),
         "bn_sigmoid": (nn.Sigmoid(), True), "tanh": (nn.Tanh(), False), "bn_silu": (nn.SiLU(), True),
         "bn_only": (None, True)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("devices", [1, 2])
def test_the_rule_is_what_onnxruntime_fuses_in_exported_stages(case, devices, tmp_path):
    """Each exported stage graph (whole, or row slices with halo rows and border padding), optimised by ORT
    as the runtime's sessions optimise it: no batch norm is left, and the activations the rule fuses are
    exactly those ORT made part of a convolution (a Conv with an ``activation`` attribute)."""
    torch.manual_seed(0)
    model = _block(*CASES[case])
    x = torch.randn(1, 3, 24, 24)
    names = "ab"[:devices]
    cl = Cluster([Device(d, backend="onnxruntime") for d in names])
    gm = analyse(trace(model, (x,)))
    infos = [node_info(v) for v in gm.graph.nodes if v.op == "call_module"]
    acts = [i for i in infos if family(i).startswith("act:")]
    convs = sum(1 for i in infos if family(i) == "conv")
    want_fused = sum(1 for i in acts if fused_into(i, "onnxruntime"))
    assert want_fused in (0, convs)           # both convolutions of a case are alike
    bundle = edgepart.compile(model, (x,), cl, strategy="single" if devices == 1 else "proportional")
    bundle.save(tmp_path / "b")
    graphs = sorted(glob.glob(str(tmp_path / "b" / "devices" / "*.onnx")))
    assert graphs, "no stage was exported to ONNX"
    ops: collections.Counter = collections.Counter()
    fused = raw_convs = 0
    for i, path in enumerate(graphs):
        raw_convs += sum(1 for node in onnx.load(path).graph.node if node.op_type == "Conv")
        so = session_options()
        so.optimized_model_filepath = str(tmp_path / f"opt{i}.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for node in onnx.load(so.optimized_model_filepath).graph.node:
            ops[node.op_type] += 1
            fused += any(a.name == "activation" for a in node.attribute)
    assert ops["BatchNormalization"] == 0
    assert fused == (raw_convs if want_fused else 0), (case, dict(ops))   # each device's slice: a Conv of its own
    unfused = [i for i in acts if not fused_into(i, "onnxruntime")]
    left = sum(v for k, v in ops.items() if k not in ("Conv", "ReorderInput", "ReorderOutput", "Pad", "Slice",
                                                       "Concat", "Identity"))
    assert (left > 0) == bool(unfused), (case, dict(ops))
