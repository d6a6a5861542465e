"""FCPM: quick profile → fit → JSON round trip → predictions; baseline comparison; CostModel wiring."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import CostModel
from edgepart.passes.info import node_info
from edgepart.passes.trace import COMPUTE_OPS, trace
from edgepart.fcpm import DeviceProfile, metrics
from edgepart.fcpm.load import BackgroundLoad, plan_load
from edgepart.fcpm.ops import Runner, family, time_callable
from edgepart.fcpm.cli import main as profile_main
from edgepart.fcpm.profiler import conv_info, design_sweep, measure_sweep
from edgepart.passes import analyse


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick profile for the whole module (loads 0 and 0.5)."""
    path = tmp_path_factory.mktemp("fcpm") / "quick.json"
    assert profile_main(["--out", str(path), "--quick", "--loads", "0,0.5", "--no-progress", "--budget", "12"]) == 0
    return path


@pytest.mark.slow
def test_profile_json_round_trip_no_pickle(quick):
    raw = quick.read_bytes()
    assert not raw.startswith(b"\x80")            # not a pickle
    d = json.loads(raw)                           # plain JSON
    assert d["format"] == "edgepart-fcpm/1"
    assert d["measurements"]["records"] and d["models"]
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)
    prof = DeviceProfile.load(quick)
    again = DeviceProfile.from_json(json.loads(json.dumps(prof.to_json())))
    info = conv_info(64, 64, 56, 56, 3, 1)
    for rows in (1, 7, 56):
        for load in (0.0, 0.25, 0.5):
            assert prof.predict(info, rows, load) == pytest.approx(again.predict(info, rows, load), rel=1e-12)


@pytest.mark.slow
def test_in_network_correction_fitted_and_saved(quick):
    prof = DeviceProfile.load(quick)
    assert prof.sequence is not None and prof.sequence["kind"] == "context"     # fitted on layers in context
    assert all(c >= 0 for c in prof.sequence["global"])
    assert all(c >= 0 for cs in prof.sequence["groups"].values() for c in cs)
    assert prof.sequence["version"] == 2 and prof.sequence["l2_bytes"] > 0
    nets = json.loads(quick.read_text())["measurements"]["nets"]
    recs = nets["records"]
    assert recs and all(r["layers"] for r in recs)
    assert any(i.get("reuse") for infos in nets["infos"] for i in infos)     # where each layer's inputs are
    info = conv_info(64, 64, 28, 28, 3)
    assert prof.predict(info, 10, 0.0) > 0
    assert prof.predict(info, 10, 0.0) != prof.predict(info, 10, 0.0, context="isolated")
    sl = prof.sequence["stage_load"]           # a stage's share beyond its layers' medians, per load (#20)
    assert sl["loads"] == [0.0, 0.5] and sl["n"] == len(recs)
    assert all(v >= 0 for v in sl["scale"] + sl["node"])


@pytest.mark.slow
def test_predictions_positive_and_monotone(quick):
    prof = DeviceProfile.load(quick)
    for info in (conv_info(32, 64, 56, 56, 3, 1), conv_info(64, 64, 28, 28, 3, 1, groups=64),
                 conv_info(128, 256, 28, 28, 1, 2)):
        ts = [prof.predict(info, r, 0.0) for r in range(1, info["rows"] + 1)]
        assert all(t > 0 for t in ts)
        assert all(b >= a for a, b in zip(ts, ts[1:])), "prediction must not fall as a slice grows"
        base = [prof.predict_baseline(info, r, 0.0) for r in range(1, info["rows"] + 1)]
        assert all(b >= a for a, b in zip(base, base[1:]))
    # more FLOPs (more channels, same shape) → longer, for the FLOPs baseline by construction
    small, big = conv_info(16, 16, 28, 28, 3), conv_info(256, 256, 28, 28, 3)
    assert prof.predict(big) > prof.predict(small)
    assert prof.predict_baseline(big) > prof.predict_baseline(small)


HOST_PROFILE = __import__("pathlib").Path(__file__).resolve().parents[1] / "profiles" / "host.json"


@pytest.mark.slow
def test_fcpm_beats_or_equals_flops_baseline_on_held_out():
    # The committed full sweep of this machine, not a fresh quick one: a 12-second sweep taken
    # while other tests run is too noisy to decide which model is better, and the test pins the
    # fitting and model selection, which are deterministic given the measurements.
    d = json.loads(HOST_PROFILE.read_text())
    configs, records = d["measurements"]["configs"], d["measurements"]["records"]
    records = [r for r in records if r["load"] in (0.0, 0.5)]      # two load levels keep the fit quick
    rng = np.random.default_rng(3)
    cids = sorted({c["cid"] for c in configs})
    test = set(rng.choice(cids, size=len(cids) // 4, replace=False).tolist())
    prof = DeviceProfile.fit(configs, [r for r in records if r["cid"] not in test], seed=0)
    infos = {c["cid"]: c["info"] for c in configs}
    held = [r for r in records if r["cid"] in test and family(infos[r["cid"]]) != "trivial"]
    assert len(held) >= 10
    t = [r["t"] for r in held]
    fc = metrics([prof.predict(infos[r["cid"]], r["rows"], r["load"]) for r in held], t)
    bl = metrics([prof.predict_baseline(infos[r["cid"]], r["rows"], r["load"]) for r in held], t)
    # the chosen model won on a validation split, so on fresh held-out data it is at least as good
    assert fc["mape"] <= bl["mape"], (fc, bl)


@pytest.mark.slow
def test_cost_model_uses_profile(quick, tmp_path):
    prof = DeviceProfile.load(quick)
    model, (x,) = __import__("edgepart.models", fromlist=["get"]).get("tinynet")
    gm = analyse(trace(model, (x,)))
    conv = next(n for n in gm.graph.nodes if n.op in COMPUTE_OPS and n.meta["op"].kind == "conv2d")
    cluster = Cluster.homogeneous(2)
    cm = CostModel(cluster, profiles={"d0": prof}, loads={"d0": 0.5})
    H = conv.meta["rows"]
    # the profile's prediction plus the device program's own per-node overhead (both profiled-machine time)
    overhead = cm.runtime_overhead(node_info(conv), H // 2)
    assert 0 < overhead < 1e-3
    assert cm.compute_time(conv, "d0", H // 2) == pytest.approx(
        prof.predict(node_info(conv), H // 2, 0.5) + overhead)
    with pytest.warns(UserWarning, match="no FCPM profile"):
        fallback = cm.compute_time(conv, "d1", H // 2)
    assert fallback > 0
    # the cluster description can name each device's profile (relative to the file)
    (tmp_path / "p.json").write_text(quick.read_text())
    (tmp_path / "c.yaml").write_text("devices:\n  - {name: a, profile: p.json}\n  - {name: b}\n")
    c2 = Cluster.from_file(tmp_path / "c.yaml")
    cm2 = CostModel(c2)
    assert "a" in cm2.profiles and "b" not in cm2.profiles
    assert cm2.compute_time(conv, "a", H) == pytest.approx(
        prof.predict(node_info(conv), H, 0.0) + cm2.runtime_overhead(node_info(conv), H))
    assert c2.to_dict()["devices"][0]["profile"].endswith("p.json")


def test_runners_compute_slices_of_zoo_layers():
    from edgepart import models
    model, (x,) = models.get("tinynet")
    gm = analyse(trace(model, (x,)))
    for n in gm.graph.nodes:
        if n.op not in COMPUTE_OPS or n.meta.get("shape") is None:
            continue
        info = node_info(n)
        shape = info["shape"]
        for rows in {info["rows"], max(1, info["rows"] // 3)}:
            with torch.inference_mode():
                y = Runner(info, rows)()
            if len(shape) == 4 and info["kind"] not in ("adaptive_avg_pool2d",):
                assert tuple(y.shape) == (shape[0], shape[1], rows, shape[3]), (n.name, y.shape, rows)


def test_background_load_plan_and_cleanup():
    assert plan_load(0.0, 2) == (0, 0.0)
    assert plan_load(0.25, 2) == (1, 0.5)
    assert plan_load(0.5, 2) == (1, 1.0)
    assert plan_load(0.75, 2) == (2, 0.75)
    with BackgroundLoad(0.25, cores=2, settle_s=0.05) as bg:
        procs = list(bg.procs)
        assert len(procs) == 1 and procs[0].poll() is None
    assert all(p.poll() is not None for p in procs)


def test_sweep_design_covers_op_types_and_slices():
    cfgs = design_sweep()
    fams = {c["family"] for c in cfgs}
    for f in ("conv", "dwconv", "maxpool", "avgpool", "bn", "act:relu", "binary", "cat", "linear", "upsample"):
        assert f in fams
    assert any(c["info"]["params"].get("groups", 1) not in (1, c["info"]["params"].get("in_channels"))
               for c in cfgs if c["family"] == "conv"), "grouped convolutions"
    assert sum(len(c["rows"]) > 1 for c in cfgs) > len(cfgs) // 2, "row slices"
    recs = measure_sweep(design_sweep(quick=True)[:3], loads=[0.0], target_s=0.002, min_repeats=2,
                         progress=False, passes=1)
    assert recs and all(r["t"] > 0 for r in recs)
    assert time_callable(lambda: None, target_s=0.001)["t"] >= 0


_FAULTS_PER_CALL = """
import resource, sys, torch, torch.nn.functional as F
from edgepart.fcpm.ops import time_callable
torch.set_num_threads(1)
out = []
for kb in (64, 120, 200, 500, 1000, 4000, 16000, 40000):     # ReLU outputs of these sizes, in this order
    x = torch.randn(kb * 256)
    fn = lambda: F.relu(x)
    if sys.argv[1] == "timed":
        time_callable(fn, target_s=0.001, min_repeats=3, max_repeats=3, warmup_s=0)
    else:
        for _ in range(3): fn()
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt      # this thread's: the one calling fn
    for _ in range(20): fn()
    out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / 20)
print(max(out))
"""


@pytest.mark.slow
def test_timing_uses_the_workers_malloc_settings_so_outputs_are_not_page_faulted_in_per_call():
    """A worker keeps freed memory (runtime.allocator); the profiler must time kernels the same way.
    With glibc's defaults this sequence of ReLUs page-faults its output in on every call at one size
    in some runs of it and not in others (seen here: 37.5 faults per call in 3 of 5 fresh
    processes), and always for the 40 MB output (above glibc's largest mmap threshold, 32 MiB);
    after time_callable, never."""
    import subprocess
    import sys
    run = lambda mode: float(subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, mode], capture_output=True,  # noqa: E731
                                            text=True, check=True).stdout)
    assert any(run("plain") >= 5 for _ in range(10)), \
        "glibc's defaults never faulted here in 10 runs: this test cannot tell the difference"
    # an output page-faulted in per call costs >= 16 faults (64 KB, the smallest); stray faults of a busy
    # host (CI once read > 0.5 per call) or a heap settling once in its first calls (44 in 20, seen with
    # every thread on the main heap) are not that
    assert all(run("timed") < 8 for _ in range(3))


_ARENA_FAULTS = r"""
import resource, sys, threading
import torch
torch.set_num_threads(1)
if sys.argv[1] == "worker":
    from edgepart.runtime.allocator import keep_freed_memory
    assert keep_freed_memory()
conv = torch.nn.Conv2d(1024, 1024, 3, padding=1).eval()   # YOLOv2-tiny's: 38 MB of reordered weights per call
x = torch.randn(1, 1024, 13, 13)
out = []
def compute():                           # a worker's compute thread, holding 30 MB of its stage
    held = torch.ones(30 << 18)
    with torch.no_grad():
        for _ in range(8):
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            y = conv(x)
            del y
            out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
t = threading.Thread(target=compute)
t.start()
t.join()
print(max(out[2:]))
"""


@pytest.mark.slow
def test_a_workers_compute_thread_reuses_a_buffer_larger_than_what_its_own_heap_has_left():
    """A 1024→1024 3×3 convolution reorders its 38 MB of weights into a fresh buffer on every call.
    With glibc's defaults (mmap above the threshold, trimming, a heap per thread's arena) a compute
    thread page-faulted that buffer in on every call (≈ 9,700 faults, the `aofl` YOLOv2-tiny edge stage's
    9,217 per request); under the worker's settings (runtime.allocator) it is reused after the first calls.
    (A bare ``torch.ones`` loop is not a stand-in: torch allocates with 64-byte ``posix_memalign``, and
    whether glibc can reuse a freed chunk of exactly that size depends on the heap's layout at start.)"""
    import subprocess
    import sys
    run = lambda mode: int(subprocess.run([sys.executable, "-c", _ARENA_FAULTS, mode], capture_output=True,  # noqa: E731
                                          text=True, check=True).stdout)
    assert run("plain") > 2000, "the case this test pins no longer faults here: it cannot tell"
    # 38 MB is 9,728 pages; the 692 KB output (169 pages) now and then lands on pages not touched before
    assert all(run("worker") < 1000 for _ in range(3))


def test_a_row_mean_costs_what_the_global_pool_of_its_rows_costs():
    """passes.pools splits a squeeze-excite pool into per-row means; the torch profile (fitted before
    that pass, on global pools only) must price them as the pools they replace — it once priced one
    56-row mean at 140 ms and the whole SE-ResNet at 10× the model without the split."""
    from edgepart import models
    prof = DeviceProfile.load(HOST_PROFILE)
    model, (x,) = models.get("se_resnet", input_size=64)
    total = {}
    for split in (True, False):
        gm = analyse(trace(model, (x,)), split_pools=split)
        infos = [node_info(n) for n in gm.graph.nodes if n.op in COMPUTE_OPS]
        assert split == any(i.get("kind") == "row_mean" for i in infos)
        total[split] = sum(prof.predict(i) for i in infos)
    assert total[True] == pytest.approx(total[False], rel=0.2), total
