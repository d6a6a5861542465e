"""Partitioned == single-device, for random layer stacks / small DAGs and random plans.

Hypothesis draws the network (convs with any kernel/stride/padding/dilation/groups,
pools with ceil_mode and count_include_pad, batch-norm, activations, residual adds,
channel concats, asymmetric zero-padding, nearest and bilinear upsampling) and then
a random legal plan: random stage cuts, random devices, random slice heights
including 1-row slices and slices thinner than the halo.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings, strategies as st

import edgepart
from edgepart.compiler.bundle import compile_plan
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.passes.trace import trace
from edgepart.passes import analyse
from tests.conftest import assert_close


class Stack(nn.Module):
    """A small DAG: each step applies an op to earlier values (by index)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.mods = nn.ModuleList([m for kind, m, _ in steps if m is not None])

    def forward(self, x):
        vals = [x]
        mods = iter(self.mods)
        for kind, m, a in self.steps:
            if kind == "mod":
                vals.append(next(mods)(vals[a[0]]))
            elif kind == "add":
                vals.append(vals[a[0]] + vals[a[1]])
            elif kind == "mul":
                vals.append(vals[a[0]] * torch.sigmoid(vals[a[1]]))
            elif kind == "cat":
                vals.append(torch.cat([vals[a[0]], vals[a[1]]], dim=1))
            elif kind == "interp":
                vals.append(F.interpolate(vals[a[0]], **a[1]))
        return vals[-1]


def _randomise_bn(bn: nn.BatchNorm2d, g: torch.Generator):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


@st.composite
def networks(draw):
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    c = draw(st.integers(1, 4))
    h = draw(st.integers(5, 40))
    w = draw(st.integers(3, 12))
    x = torch.randn(1, c, h, w, generator=g)
    vals = [x]
    steps = []
    n_steps = draw(st.integers(1, 7))
    for _ in range(n_steps):
        src = draw(st.integers(max(0, len(vals) - 3), len(vals) - 1))
        v = vals[src]
        cin, hin, win = v.shape[1], v.shape[2], v.shape[3]
        kind = draw(st.sampled_from(["conv", "conv", "conv", "maxpool", "avgpool", "bn", "act", "add", "cat",
                                     "mul", "pad", "up"]))
        m, spec = None, None
        if kind == "conv":
            k = draw(st.integers(1, 7))
            d = draw(st.integers(1, 3))
            s = draw(st.integers(1, 3))
            p = draw(st.integers(0, 3))
            groups = draw(st.sampled_from([gg for gg in (1, 2, cin) if cin % gg == 0]))
            cout = groups * draw(st.integers(1, 3))
            if hin + 2 * p < d * (k - 1) + 1 or win + 2 * p < d * (k - 1) + 1:
                continue
            m = nn.Conv2d(cin, cout, k, s, p, d, groups, bias=draw(st.booleans()))
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.integers(1, 4))
            s = draw(st.integers(1, 3))
            p = draw(st.integers(0, k // 2))
            ceil = draw(st.booleans())
            if hin + 2 * p < k or win + 2 * p < k:
                continue
            if kind == "maxpool":
                d = draw(st.integers(1, 2))
                if hin + 2 * p < d * (k - 1) + 1 or win + 2 * p < d * (k - 1) + 1:
                    continue
                m = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
            else:
                m = nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=draw(st.booleans()),
                                 divisor_override=draw(st.sampled_from([None, None, 3])))
        elif kind == "bn":
            m = nn.BatchNorm2d(cin)
            _randomise_bn(m, g)
        elif kind == "act":
            m = draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1), nn.ReLU6(), nn.Sigmoid(), nn.Hardswish()]))
        elif kind == "pad":
            m = nn.ZeroPad2d(tuple(draw(st.integers(0, 2)) for _ in range(4)))
        elif kind in ("add", "cat", "mul"):
            partners = [i for i, u in enumerate(vals) if u.shape[2:] == v.shape[2:] and
                        (kind == "cat" or u.shape == v.shape)]
            if kind == "mul":   # SE-style: multiply by a broadcast (N, C, 1, 1) gate of an earlier value
                steps.append(("mod", nn.AdaptiveAvgPool2d(1), (src,)))
                vals.append(F.adaptive_avg_pool2d(v, 1))
                partners = [len(vals) - 1]
                spec = (src, partners[0])
            else:
                spec = (draw(st.sampled_from(partners)), src)
        elif kind == "up":
            mode = draw(st.sampled_from(["nearest", "bilinear"]))
            if draw(st.booleans()):
                kw = dict(scale_factor=draw(st.sampled_from([2, 3, 1.5])), mode=mode)
            else:
                kw = dict(size=(draw(st.integers(hin, 2 * hin + 3)), draw(st.integers(1, 2 * win))), mode=mode)
            if mode == "bilinear":
                kw["align_corners"] = draw(st.booleans())
            spec = (src, kw)
        if m is not None:
            steps.append(("mod", m, (src,)))
        elif kind == "up":
            steps.append(("interp", None, spec))
        else:
            steps.append((kind, None, spec))
        net = Stack(steps).eval()
        with torch.no_grad():
            out = net(x)
        if not torch.isfinite(out).all():   # e.g. a dilated max-pool window lying wholly in its padding
            steps.pop()
            continue
        vals.append(out)
        if out.shape[2] < 1 or out.numel() > 200_000:
            break
    net = Stack(steps).eval()
    return net, x


def random_plan(draw, gm, cluster) -> Plan:
    nodes = compute_nodes(gm)
    n = len(nodes)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n - 1))) if n > 1 else []
    bounds = [0] + [c for c in cuts if c < n] + [n]
    stages = []
    groups = []
    for lo, hi in zip(bounds, bounds[1:]):   # then cut each group where splittability changes
        run = []
        for x in nodes[lo:hi]:
            if run and run[-1].meta["splittable"] != x.meta["splittable"]:
                groups.append(run)
                run = []
            run.append(x)
        if run:
            groups.append(run)
    for group in groups:
        names = [x.name for x in group]
        rows = group[-1].meta["rows"]
        if all(x.meta["splittable"] for x in group) and rows >= 2 and draw(st.integers(0, 4)) > 0:
            k = draw(st.integers(2, min(len(cluster), rows)))
            inner = sorted(draw(st.sets(st.integers(1, rows - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
            edges = [0] + inner + [rows]
            devs = draw(st.permutations(cluster.names))[:k]
            stages.append(Stage("split", names, slices=[(d, a, b) for d, a, b in zip(devs, edges, edges[1:])]))
        else:
            stages.append(Stage("whole", names, device=draw(st.sampled_from(cluster.names))))
    return Plan(stages, "random")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net_x=networks(), n_devices=st.integers(2, 4), data=st.data())
def test_random_network_random_plan_is_exact(net_x, n_devices, data):
    net, x = net_x
    with torch.no_grad():
        ref = net(x)
    cluster = edgepart.Cluster.homogeneous(n_devices)
    gm = trace(net, (x,))
    analyse(gm)
    plan = random_plan(data.draw, gm, cluster)
    event(f"split stages: {min(3, sum(s.kind == 'split' for s in plan.stages))}+")
    bundle = compile_plan(gm, plan, cluster, "Stack")
    assert_close(bundle.run_local(x), ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(2, 30), k=st.integers(1, 7), s=st.integers(1, 3), p=st.integers(0, 3), d=st.integers(1, 3),
       data=st.data())
def test_single_conv_every_one_row_slicing(h, k, s, p, d, data):
    """Every output row on its own device-slice: the thinnest slices, far thinner than the halo."""
    if h + 2 * p < d * (k - 1) + 1:
        return
    torch.manual_seed(h * 7 + k)
    conv = nn.Conv2d(2, 3, k, s, p, d).eval()
    x = torch.randn(1, 2, h, d * (k - 1) + 2)
    ref = conv(x)
    rows = ref.shape[2]
    cluster = edgepart.Cluster.homogeneous(max(2, rows))
    gm = trace(conv, (x,))
    analyse(gm)
    name = compute_nodes(gm)[0].name
    if rows >= 2:
        plan = Plan([Stage("split", [name], slices=[(f"d{i}", i, i + 1) for i in range(rows)])])
    else:
        plan = Plan([Stage("whole", [name], device="d1")])
    assert_close(compile_plan(gm, plan, cluster, "conv").run_local(x), ref)
