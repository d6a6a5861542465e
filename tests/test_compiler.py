"""Compiler core: zoo × strategies × device counts exact after save/reload; FLOPs; reports; errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import edgepart
from edgepart import models as zoo
from edgepart.compiler.planning.plan import Plan, Stage
from edgepart.passes.trace import trace
from edgepart.passes import analyse
from edgepart.passes.flops import total_macs
from tests.conftest import assert_close

TEST_SIZE = {"vgg16": 64, "alexnet": 64, "yolov2_tiny": 96, "unet": 64, "tinynet": 32}
SPEEDS = [1.0, 0.5, 2.0, 1.5, 0.7, 1.0, 0.3]


# The fast tier keeps a plain chain, a residual net, depthwise + inverted residuals, squeeze-excite and
# an encoder-decoder with skips; the large and the remaining zoo models run in the slow tier.
SLOW_ZOO = ("vgg16", "resnet50", "alexnet", "yolov2_tiny", "inception")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ZOO else n
                                  for n in zoo.names()])
def test_zoo_every_strategy_and_device_count_is_exact_after_reload(name, tmp_path):
    model, (x,) = zoo.get(name, input_size=TEST_SIZE.get(name, 64))
    with torch.no_grad():
        ref = model(x)
    for strategy in ("single", "even", "proportional"):
        for n in (2, 3, 4, 7):
            cluster = edgepart.Cluster.heterogeneous(SPEEDS[:n])
            bundle = edgepart.compile(model, (x,), cluster, strategy=strategy)
            out = bundle.save(tmp_path / f"{strategy}{n}")
            y = edgepart.load_bundle(out).run_local(x)
            assert_close(y, ref)
            shutil.rmtree(out)      # 12 bundles of VGG-16 would keep 7.6 GB on disk until the run ends
            if strategy != "single":
                assert any(s.kind == "split" for s in bundle.plan.stages)


@pytest.mark.parametrize("name,gmacs", [("vgg16", 15.5), ("resnet50", 4.1)])
def test_macs_match_published_figures(name, gmacs):
    model, inputs = zoo.get(name, input_size=224)
    gm = analyse(trace(model, inputs))
    assert total_macs(gm) / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_flops_of_a_tiny_graph_are_exact():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 5)).eval()
    gm = analyse(trace(net, (torch.randn(1, 3, 8, 8),)))
    macs = {n.name: n.meta["macs"] for n in gm.graph.nodes if "macs" in n.meta}
    assert macs == {"_0": 4 * 8 * 8 * 3 * 9, "_1": 4 * 6 * 6 * 1 * 9, "_2": 0, "_3": 5 * 144}


class Odd(nn.Module):
    """Uses ops edgepart has no row map for: they must run whole and be named in the report."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(3)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        y = self.lrn(self.conv(x))
        y = torch.erf(y) + y.cumsum(dim=3) * 0.01
        return self.conv2(y).softmax(dim=1)


def test_unknown_ops_run_whole_and_are_named_in_the_report(tmp_path):
    torch.manual_seed(0)
    model, x = Odd().eval(), torch.randn(1, 3, 20, 9)
    bundle = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(3), strategy="even")
    named = {u["node"] for u in bundle.report["unknown_ops"]}
    assert {"lrn", "erf", "cumsum"} <= named
    kinds = {n: s.kind for s in bundle.plan.stages for n in s.nodes}
    assert kinds["lrn"] == kinds["erf"] == kinds["cumsum"] == "whole"
    assert kinds["conv"] == "split" and kinds["conv2"] == "split"
    assert_close(edgepart.load_bundle(bundle.save(tmp_path / "b")).run_local(x), model(x))
    assert "lrn" in bundle.summary() and "not known" in bundle.summary()


def test_wrong_input_shape_names_the_expected_shape():
    model, (x,) = zoo.get("tinynet")
    bundle = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2))
    with pytest.raises(edgepart.InputShapeError, match=r"compiled for shape \(1, 3, 32, 32\)"):
        bundle.run_local(torch.randn(1, 3, 48, 48))
    with pytest.raises(edgepart.InputShapeError, match="dtype"):
        bundle.run_local(x.double())


def test_weights_changed_on_disk_after_loading_do_not_change_the_program(tmp_path):
    """Weights are copied out of the safetensors file's mapping (runtime.program.load_weights): the
    file overwritten in place after loading leaves the loaded programs' output as it was."""
    model, (x,) = zoo.get("tinynet")
    out = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even").save(tmp_path / "b")
    loaded = edgepart.load_bundle(out)
    with torch.no_grad():
        ref = model(x)
    for dev in loaded.manifest.devices:
        w = out / "devices" / f"{dev}.safetensors"
        header = 8 + int.from_bytes(w.read_bytes()[:8], "little")
        with open(w, "r+b") as f:                 # same inode, same size: every weight byte zeroed
            f.seek(header)
            f.write(bytes(w.stat().st_size - header))
    assert_close(loaded.run_local(x), ref)


def test_tampered_or_incomplete_bundle_is_refused_naming_the_file(tmp_path):
    model, (x,) = zoo.get("tinynet")
    # "even" so that both devices hold a program (ofpm keeps this tiny net on one device)
    out = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even").save(tmp_path / "b")
    weights = out / "devices" / "d1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(edgepart.BundleError, match=r"d1\.safetensors.*sha256"):
        edgepart.load_bundle(out)
    weights.unlink()
    with pytest.raises(edgepart.BundleError, match=r"d1\.safetensors: missing"):
        edgepart.load_bundle(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(edgepart.BundleError, match="schema version 99"):
        edgepart.load_bundle(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(edgepart.BundleError, match="manifest.json: not valid JSON"):
        edgepart.load_bundle(out)
    with pytest.raises(edgepart.BundleError, match="no manifest.json"):
        edgepart.load_bundle(tmp_path)


def test_illegal_plans_name_the_node_or_device():
    model, (x,) = zoo.get("tinynet")
    cluster = edgepart.Cluster.homogeneous(2)
    gm = analyse(trace(model, (x,)))
    names = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    with pytest.raises(edgepart.PlanError, match="'avgpool' cannot be split by rows: adaptive pooling"):
        edgepart.compile(model, (x,), cluster, strategy=Plan([Stage("split", names, slices=[("d0", 0, 1)])]))
    good = edgepart.compile(model, (x,), cluster, strategy="even").plan
    bad = Plan.from_dict(good.to_dict())
    split = next(s for s in bad.stages if s.kind == "split")
    split.slices = [(split.slices[0][0], 0, 3), (split.slices[1][0], 4, split.slices[1][2])]
    with pytest.raises(edgepart.PlanError, match="contiguous"):
        edgepart.compile(model, (x,), cluster, strategy=bad)
    with pytest.raises(edgepart.PlanError, match="'nowhere' is not in the cluster"):
        edgepart.compile(model, (x,), cluster, strategy=Plan([Stage("whole", names, device="nowhere")]))
    with pytest.raises(edgepart.PlanError, match="not assigned"):
        edgepart.compile(model, (x,), cluster, strategy=Plan([Stage("whole", names[:-1], device="d0")]))
    with pytest.raises(edgepart.PlanError, match="computed later"):
        edgepart.compile(model, (x,), cluster, strategy=Plan([Stage("whole", names[3:], device="d0"),
                                                              Stage("whole", names[:3], device="d1")]))
    with pytest.raises(edgepart.PlanError, match="unknown strategy 'fastest'"):
        edgepart.compile(model, (x,), cluster, strategy="fastest")


def test_plan_is_json_and_a_user_built_plan_runs(tmp_path):
    model, (x,) = zoo.get("tinynet")
    cluster = edgepart.Cluster.homogeneous(3)
    plan = edgepart.compile(model, (x,), cluster, strategy="even").plan
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    for s in again.stages:   # move every whole stage to d2 and reverse the slice owners
        if s.kind == "whole":
            s.device = "d2"
        else:
            devs = [d for d, _, _ in s.slices][::-1]
            s.slices = [(d, a, b) for d, (_, a, b) in zip(devs, s.slices)]
    bundle = edgepart.compile(model, (x,), cluster, strategy=again)
    assert_close(bundle.run_local(x), model(x))


def test_cluster_yaml_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("devices:\n  - {name: a, speed: 1.0}\n  - {name: b, speed: 0.5, memory_mb: 512}\n"
                    "links:\n  default: {bandwidth_mbps: 100, latency_ms: 1}\n"
                    "  overrides:\n    - {a: a, b: b, bandwidth_mbps: 20}\n")
    c = edgepart.Cluster.from_file(path)
    assert c.names == ["a", "b"] and c.link("a", "b")["bandwidth_mbps"] == 20 and c.fastest() == "a"
    assert edgepart.Cluster.from_dict(c.to_dict()).to_dict() == c.to_dict()
    path.write_text("devices:\n  - {name: a, speed: 0}\n")
    with pytest.raises(edgepart.ClusterError, match=r"c\.yaml.*speed must be > 0"):
        edgepart.Cluster.from_file(path)


def test_cli_compile_and_inspect(tmp_path):
    cluster = tmp_path / "c.yaml"
    cluster.write_text("devices: [{name: a, speed: 1.0}, {name: b, speed: 0.5}]\n"
                       "links: {default: {bandwidth_mbps: 100, latency_ms: 1}}\n")
    run = [sys.executable, "-m", "edgepart.cli"]
    r = subprocess.run(run + ["compile", "tinynet", "--cluster", str(cluster), "--strategy", "proportional",
                              "--out", str(tmp_path / "b"), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "max abs error" in r.stdout
    r = subprocess.run(run + ["inspect", str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "split" in r.stdout and "a[0:" in r.stdout
    r = subprocess.run(run + ["compile", "nosuch", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "valid names" in r.stderr and "Traceback" not in r.stderr


def test_file_model_factory(tmp_path):
    src = tmp_path / "mine.py"
    src.write_text("import torch, torch.nn as nn\n"
                   "def make():\n"
                   "    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval(), (torch.randn(1, 3, 10, 10),)\n")
    r = subprocess.run([sys.executable, "-m", "edgepart.cli", "compile", f"{src}:make", "--devices", "3",
                        "--out", str(tmp_path / "b"), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
