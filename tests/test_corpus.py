"""Models written elsewhere (issue #21): the corpus of real-world blocks in tests/corpus compiles under
every strategy on 3 unequal devices and runs exact; call targets are named by importable module paths;
torch.nn modules edgepart has no kernel for are rebuilt from class, constructor arguments and weights."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgepart
from edgepart import models as zoo
from edgepart.compiler.bundle import compile_plan
from edgepart.compiler.codegen import rebuild_recipe
from edgepart.compiler.cost.simulator import simulate_plan
from edgepart.compiler.planning.registry import STRATEGIES, make_plan
from edgepart.passes.trace import trace
from edgepart.passes import analyse, ops, pools
from edgepart.runtime.program import DeviceProgram, build_module
from tests import corpus
from tests.conftest import assert_close

CLUSTER = edgepart.Cluster.heterogeneous([0.5, 1.0, 2.0])
SD = "tests.corpus.ops.stochastic_depth.stochastic_depth"


@pytest.mark.parametrize("name", list(corpus.CORPUS))
def test_corpus_every_strategy_is_exact_and_every_saved_program_loads(name, tmp_path):
    model, (x,) = corpus.get(name)
    with torch.no_grad():
        ref = model(x)
    gm = analyse(trace(model, (x,)), CLUSTER)
    for strategy in STRATEGIES:
        bundle = compile_plan(gm, make_plan(gm, CLUSTER, strategy), CLUSTER, name)
        assert_close(bundle.run_local(x), ref)
        out = bundle.save(tmp_path / strategy)
        for dev in bundle.devices:     # each program as a worker loads it: from the saved files
            DeviceProgram.from_bundle(out, dev)
        assert_close(edgepart.load_bundle(out).run_local(x), ref)


def test_a_call_into_another_librarys_ops_package_is_imported_by_its_module_path():
    model, (x,) = corpus.get("efficientnet")
    bundle = edgepart.compile(model, (x,), CLUSTER, strategy="even")
    src = "".join(bundle.sources.values())
    # tests.corpus.ops.stochastic_depth is the function, not the module: attribute access would fail
    assert "from tests.corpus.ops.stochastic_depth import stochastic_depth as ext_stochastic_depth" in src
    assert_close(bundle.run_local(x), model(x))
    whole = {e["node"]: e["why"] for e in bundle.report["whole_nodes"]}
    assert SD in whole["stochastic_depth_1"]
    single = edgepart.compile(model, (x,), CLUSTER, strategy="single")     # d0 only moves the input
    assert "ext_stochastic_depth" in single.sources["d2"] and "import" not in single.sources["d0"].split("rowops")[1]


def test_an_eval_mode_identity_is_inlined_and_splits(monkeypatch):
    monkeypatch.setitem(ops.EVAL_IDENTITY_FUNCTIONS, SD, ("training", 3, True))
    model, (x,) = corpus.get("convnext")
    bundle = edgepart.compile(model, (x,), CLUSTER, strategy="even")
    assert "import stochastic_depth" not in "".join(bundle.sources.values())
    sd = [n for n in bundle.graph.graph.nodes if n.name.startswith("stochastic_depth")]
    assert sd and all(n.meta["op"].kind == "identity" and n.meta["splittable"] for n in sd)
    assert_close(bundle.run_local(x), model(x))


def test_a_call_target_without_an_importable_name_fails_the_compile_naming_node_and_target():
    def double(t):      # a nested function: no module path names it
        return t * 2

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace(net, (x,))
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    with gm.graph.inserting_after(relu):
        call = gm.graph.call_function(double, (relu,))
    relu.replace_all_uses_with(call)
    call.args = (relu,)
    call.meta = dict(relu.meta)
    gm.recompile()
    analyse(gm, CLUSTER)
    with pytest.raises(edgepart.UnsupportedOpError, match=r"node 'double'.*double"):
        compile_plan(gm, make_plan(gm, CLUSTER, "single"), CLUSTER, "net")


def _node(target: str):
    return types.SimpleNamespace(name=target.replace(".", "_"), target=target)


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True),
                                    dict(kdim=6, vdim=10, batch_first=True)])
def test_multihead_attention_is_rebuilt_from_attributes_and_a_search_of_flags(kwargs):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, **kwargs).eval()
    path, args = rebuild_recipe(_node("attn"), m)
    rebuilt = build_module(path, args)
    rebuilt.load_state_dict(m.state_dict(), strict=True)
    q = torch.randn(5, 1, 8)
    k, v = torch.randn(5, 1, m.kdim), torch.randn(5, 1, m.vdim)
    if m.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    assert torch.equal(rebuilt.eval()(q, k, v)[0], m(q, k, v)[0])


def test_only_allow_listed_libraries_are_rebuilt():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(edgepart.UnsupportedOpError, match="only classes from torch.nn"):
        rebuild_recipe(_node("custom"), Custom())
    with pytest.raises(edgepart.BundleError, match="refusing to build"):
        build_module("os.system", {})


def test_the_report_names_modules_run_whole_and_why():
    model, (x,) = corpus.get("vit")
    bundle = edgepart.compile(model, (x,), CLUSTER, strategy="proportional")
    whole = {e["node"]: e["why"] for e in bundle.report["whole_nodes"]}
    assert "MultiheadAttention" in whole["layers_0_self_attention"]
    assert "rebuilt on the device" in whole["layers_0_self_attention"]


class Pools(nn.Module):
    """Every spelling of a global average pool passes.pools rewrites, each feeding back into the rows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.fc(self.gap(x)))                      # module
        x = x + F.adaptive_avg_pool2d(x, (1, 1))                         # function
        x = x * x.mean((2, 3), keepdim=True)                             # method, keepdim
        x = x - torch.mean(x, dim=[-2, -1]).view(1, 8, 1, 1)             # torch.mean, negative dims
        return torch.cat([x.mean([2, 3]), F.adaptive_avg_pool2d(x, 2).flatten(1)], 1)   # the last stays whole


def test_global_pools_split_into_row_means_and_a_combine():
    net, x = Pools().eval(), torch.randn(1, 3, 16, 12)
    gm = analyse(trace(net, (x,)))
    row_means = [n for n in gm.graph.nodes if n.name.endswith(pools.ROW_MEAN_SUFFIX)]
    assert len(row_means) == 5
    for n in row_means:
        assert n.meta["op"].kind == "row_mean" and n.meta["splittable"] and n.meta["shape"] == (1, 8, 16, 1)
        combine = next(iter(n.users))
        assert combine.target == "mean"
        # a combine whose value goes back into the rows is replicated; the last one feeds the output
        assert combine.meta.get("replicated", False) == (n is not row_means[-1])
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    assert fc.meta["replicated"] and fc.meta["splittable"]
    assert any(n.op == "call_function" and n.target is F.adaptive_avg_pool2d for n in gm.graph.nodes)  # size 2
    with torch.no_grad():
        ref = net(x)
    for strategy in ("even", "proportional", "ofpm"):
        assert_close(edgepart.compile(net, (x,), CLUSTER, strategy=strategy).run_local(x), ref)


def test_analyse_without_the_pool_split_leaves_global_pools_whole():
    """analyse(split_pools=False), the compiler before passes.pools (benchmarks/testbed.py --pools-before):
    no row means, nothing replicated, and its plans still run exact."""
    net, x = Pools().eval(), torch.randn(1, 3, 16, 12)
    gm = analyse(trace(net, (x,)), CLUSTER, split_pools=False)
    assert not [n for n in gm.graph.nodes if n.name.endswith(pools.ROW_MEAN_SUFFIX)]
    assert not [n for n in gm.graph.nodes if n.meta.get("replicated")]
    with torch.no_grad():
        ref = net(x)
    plan = make_plan(gm, CLUSTER, "even")
    assert_close(compile_plan(gm, plan, CLUSTER, "pools").run_local(x), ref)


def test_an_se_block_no_longer_gathers_its_input(monkeypatch):
    """The even plan of SE-ResNet-18: before passes.pools every SE pooled a gathered activation; now each
    device pools its own rows, the row means are all-gathered and every device runs the SE MLP."""
    model, (x,) = zoo.get("se_resnet", input_size=64)

    def even():
        gm = analyse(trace(model, (x,)))
        plan = make_plan(gm, CLUSTER, "even")
        return gm, plan, simulate_plan(gm, plan, CLUSTER)

    gm, plan, after = even()
    mlp = {n.name for n in gm.graph.nodes if n.meta.get("replicated")}
    assert mlp and all(s.kind == "split" for s in plan.stages if mlp & set(s.nodes))
    bundle = compile_plan(gm, plan, CLUSTER, "se_resnet")
    assert_close(bundle.run_local(x), model(x))
    monkeypatch.setattr(edgepart.passes, "split_global_pools", lambda gm: gm)
    _, _, before = even()
    # 3 devices, 100 Mbit/s: 476 -> 333 kB moved (the rest is halo rows), simulated latency 79 -> 64 ms
    assert after.summary()["bytes_moved"] < 0.8 * before.summary()["bytes_moved"]
    assert after.latency < 0.9 * before.latency


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corpus_over_sockets(tmp_path):
    """Worker processes import the call targets (the ops stand-in), rebuild nn.MultiheadAttention and run
    the all-gather of an SE block's row means: equal to run_local and to the model."""
    for name in ("efficientnet", "vit", "deeplab_v3"):
        model, (x,) = corpus.get(name)
        bundle = edgepart.compile(model, (x,), CLUSTER, strategy="proportional")
        out = bundle.save(tmp_path / name)
        with edgepart.LocalCluster(out) as cluster:
            y = cluster.infer(x)
        with torch.no_grad():
            assert_close(y, model(x))
        assert_close(y, bundle.run_local(x), rel=1e-6)
