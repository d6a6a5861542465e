"""Offline profiling: time a designed sweep of layer configurations under controlled CPU load.

``edgepart profile --out profiles/NAME.json [--quick] [--loads 0,0.25,0.5,0.75]``
calls :func:`main`; with ``--endpoint HOST:PORT --key-file FILE`` it profiles a running
worker instead, in the worker's process and CPU share (:mod:`edgepart.fcpm.remote`).

The sweep covers the op types generated code runs (dense, grouped and depthwise
convolutions, max/avg pooling, batch norm, activations, add/mul, concat, linear,
upsampling, global pooling, padding), with channel counts, kernel sizes, strides
and input sizes drawn like the stages of real CNNs, and for row-local ops several
*row-slice heights* of the kind partitioning produces. Each (configuration, rows)
is timed at every background load level (made by :class:`BackgroundLoad`) through the timing
harness (:mod:`edgepart.fcpm.harness`: one pinned core, a fixed predecessor, interleaved passes
until the median's relative standard error is 1 % or the budget is spent), and the synthetic
networks layer by layer in context (:mod:`edgepart.fcpm.context`), which the FCPM's in-network
part is fitted on. The JSON holds the raw measurements and the fitted
model (:class:`DeviceProfile`).

**Rate-limited devices.** Under a CPU quota (an emulated slow worker's cgroup, a
container) a short kernel runs at full speed until the period's quota is spent,
then the whole group stalls: the median of repeated short timings sees only the
full-speed runs and would predict the *host's* times (measured here: 0.40 ms per
call median, 1.54 ms per call on average under a 25 % quota). There each job's
median is taken in thread CPU time and divided by the share of a core the
profiling thread sustained over the whole load level (CPU time / wall time while
it was always busy) — the device's average speed, stalls included.

Torch runs one thread, as the runtime's workers do. ``--backend onnxruntime`` times the same
layers and networks exported to ONNX, in one-thread ONNX Runtime sessions
(:mod:`edgepart.fcpm.ort_timing`); that profile costs devices that run their stages there.
"""
from __future__ import annotations

import math
import platform
import time
from typing import Callable

import numpy as np
import torch

from edgepart.fcpm.context import graph_stage, with_reuse
from edgepart.fcpm.features import clean_info
from edgepart.fcpm.harness import Harness, Isolated, pinned_thread
from edgepart.fcpm.load import BackgroundLoad, cpu_count, cpu_quota_cores, sustained_share
from edgepart.fcpm.model import DeviceProfile
from edgepart.fcpm.ops import Runner, family, geometry
from edgepart.fcpm.ort_timing import ort_net, ort_runner_factory, session_call_s
from edgepart.passes import analyse
from edgepart.passes.info import node_info
from edgepart.passes.trace import COMPUTE_OPS, trace

DEFAULT_LOADS = (0.0, 0.25, 0.5, 0.75)
STAGES_H = [(224, 416), (112, 208), (56, 104), (28, 52), (14, 26), (7, 13)]
CHANNELS = [3, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 480, 512, 576, 768, 832,
            960, 1024, 1280, 2048]


# --------------------------------------------------------------------------- info builders

def _out(h: int, k: int, s: int, p0: int, p1: int, d: int = 1, ceil: bool = False) -> int:
    num = h + p0 + p1 - d * (k - 1) - 1
    return (-(-num // s) if ceil else num // s) + 1


def conv_info(cin, cout, h, w, k=3, s=1, groups=1, dilation=1, bias=True, pad=None) -> dict:
    p = (dilation * (k - 1)) // 2 if pad is None else pad
    ho, wo = _out(h, k, s, p, p, dilation), _out(w, k, s, p, p, dilation)
    out = cout * ho * wo
    macs = out * (cin // groups) * k * k
    return {"kind": "conv2d", "label": f"Conv2d({cin}, {cout}, k={k}, s={s}, g={groups})",
            "params": {"kernel": [k, k], "stride": [s, s], "dilation": [dilation, dilation], "groups": groups,
                       "pad": [p, p, p, p], "in_channels": cin, "out_channels": cout, "bias": bias},
            "macs": macs, "flops": 2 * macs + (out if bias else 0), "rows": ho, "shape": [1, cout, ho, wo],
            "in_shape": [1, cin, h, w], "bytes": 4 * out, "n_inputs": 1, "in_shapes": [[1, cin, h, w]]}


def pool_info(kind, c, h, w, k=2, s=2, p=0, ceil=False) -> dict:
    ho, wo = _out(h, k, s, p, p, 1, ceil), _out(w, k, s, p, p, 1, ceil)
    out = c * ho * wo
    params = {"kernel": [k, k], "stride": [s, s], "padding": [p, p], "ceil_mode": ceil}
    if kind == "max_pool2d":
        params["dilation"] = [1, 1]
    else:
        params.update(count_include_pad=True, divisor_override=None)
    return {"kind": kind, "label": f"{kind}(k={k}, s={s}, p={p})", "params": params, "macs": 0,
            "flops": out * k * k, "rows": ho, "shape": [1, c, ho, wo], "in_shape": [1, c, h, w], "bytes": 4 * out,
            "n_inputs": 1, "in_shapes": [[1, c, h, w]]}


def eltwise_info(kind, c, h, w, label="", flops_per=1, n_inputs=1, in_shapes=None, params=None) -> dict:
    out = c * h * w
    return {"kind": kind, "label": label, "params": params or {}, "macs": 0, "flops": flops_per * out, "rows": h,
            "shape": [1, c, h, w], "in_shape": [1, c, h, w] if kind != "pointwise" else None, "bytes": 4 * out,
            "n_inputs": n_inputs, "in_shapes": in_shapes or [[1, c, h, w]] * n_inputs}


def linear_info(fi, fo, bias=True) -> dict:
    return {"kind": "linear", "label": f"Linear({fi}, {fo})",
            "params": {"in_features": fi, "out_features": fo, "bias": bias}, "macs": fi * fo,
            "flops": 2 * fi * fo + (fo if bias else 0), "rows": 1, "shape": [1, fo], "in_shape": [1, fi],
            "bytes": 4 * fo, "n_inputs": 1, "in_shapes": [[1, fi]]}


def upsample_info(c, h, w, scale=2, mode="nearest") -> dict:
    ho, wo = h * scale, w * scale
    out = c * ho * wo
    return {"kind": "interpolate", "label": f"interpolate(scale={scale}, mode={mode})",
            "params": {"size": None, "scale_factor": float(scale), "mode": mode,
                       "align_corners": False if mode == "bilinear" else None, "recompute_scale_factor": None},
            "macs": 0, "flops": out * (1 if mode == "nearest" else 4), "rows": ho, "shape": [1, c, ho, wo],
            "in_shape": [1, c, h, w], "bytes": 4 * out, "n_inputs": 1, "in_shapes": [[1, c, h, w]]}


def gap_info(c, h, w) -> dict:
    return {"kind": "adaptive_avg_pool2d", "label": "AdaptiveAvgPool2d(1)", "params": {"output_size": [1, 1]},
            "macs": 0, "flops": c * h * w, "rows": 1, "shape": [1, c, 1, 1], "in_shape": [1, c, h, w],
            "bytes": 4 * c, "n_inputs": 1, "in_shapes": [[1, c, h, w]]}


def pad_info(c, h, w, p=1) -> dict:
    return {"kind": "pad", "label": f"pad({p})", "params": {"pad": [p, p, 0, 0], "value": 0.0}, "macs": 0,
            "flops": 0, "rows": h, "shape": [1, c, h, w + 2 * p], "in_shape": [1, c, h, w],
            "bytes": 4 * c * h * (w + 2 * p), "n_inputs": 1, "in_shapes": [[1, c, h, w]]}


# --------------------------------------------------------------------------- the sweep

ACTS = ["ReLU()", "ReLU()", "ReLU()", "ReLU6()", "LeakyReLU(0.1)", "Sigmoid()", "SiLU()", "Hardswish()", "Tanh()",
        "GELU()"]
ACT_TEMPLATES = {"ReLU()": "F.relu({x})", "ReLU6()": "F.relu6({x})", "LeakyReLU(0.1)": "F.leaky_relu({x}, 0.1)",
                 "Sigmoid()": "torch.sigmoid({x})", "SiLU()": "F.silu({x})", "Hardswish()": "F.hardswish({x})",
                 "Tanh()": "torch.tanh({x})", "GELU()": "F.gelu({x}, approximate='none')"}

# configurations per family in the default sweep (quick: about a sixth)
COUNTS = {"conv": 380, "gconv": 24, "dwconv": 60, "maxpool": 40, "avgpool": 24, "bn": 40, "act": 90, "binary": 40,
          "cat": 20, "linear": 30, "upsample": 24, "gap": 16, "pad": 10, "trivial": 3}
MAX_FLOPS = 3.5e9
TARGET_RSE = 0.01          # the harness repeats a job until its median's relative standard error is this
RATE_LIMITED_SHARE = 0.7   # sustaining less of a core than this: a CPU quota; time rate-limited


def _stage(rng) -> tuple[int, int]:
    """(H, typical channels) of a random CNN stage."""
    s = int(rng.integers(0, len(STAGES_H)))
    base = STAGES_H[s][int(rng.random() < 0.15)]
    h = max(3, int(round(base * float(rng.choice([1.0, 1.0, 1.0, 0.9, 0.75, 1.15])))))
    c = 16 * 2 ** s * float(rng.choice([0.25, 0.5, 1, 1, 2, 4]))
    c = min(CHANNELS[1:], key=lambda v: abs(math.log(v / c)))
    return h, c


def _channels_like(rng, c):
    return min(CHANNELS[1:], key=lambda v: abs(math.log(v / (c * float(rng.choice([0.25, 0.5, 1, 1, 1, 2, 4]))))))


def _slices(rng, total: int, n: int) -> list[int]:
    """Full height plus ``n`` row-slice heights like 2..8 devices (and their halos) produce."""
    cand = sorted({max(1, math.ceil(total / d) + int(rng.integers(0, 3))) for d in (2, 3, 4, 5, 6, 8)}
                  | {max(1, int(rng.integers(1, total + 1)))})
    cand = [c for c in cand if c < total]
    picks = list(rng.choice(cand, size=min(n, len(cand)), replace=False)) if cand else []
    return [total] + sorted(int(p) for p in picks)


def design_sweep(quick: bool = False, seed: int = 0, counts: dict[str, int] | None = None) -> list[dict]:
    """The sweep: a list of {cid, info, rows: [output-row heights to time]}."""
    rng = np.random.default_rng(seed)
    counts = dict(counts or COUNTS)
    if quick:
        counts = {k: max(2, v // 6) for k, v in counts.items()}
    n_slices = 1 if quick else 2
    configs = []

    def add(info, slices=True):
        rows = _slices(rng, info["rows"], n_slices) if slices and info["rows"] > 1 else [info["rows"]]
        configs.append({"cid": len(configs), "info": info, "rows": rows})

    for _ in range(counts.get("conv", 0)):
        while True:
            h, c = _stage(rng)
            if h >= 56 and rng.random() < 0.12:   # a stem: RGB in, large kernel
                cin, cout = 3, int(rng.choice([16, 24, 32, 48, 64, 96]))
                k = int(rng.choice([3, 3, 5, 7, 7, 11]))
                s = int(rng.choice([1, 2, 2] + ([4] if k >= 7 else [])))
            else:
                cin, cout = c, _channels_like(rng, c)
                k = int(rng.choice([1, 1, 1, 3, 3, 3, 3, 5] + ([7] if cin <= 128 else [])))
                s = int(rng.choice([1, 1, 1, 1, 2]))
            d = 2 if (k == 3 and rng.random() < 0.05) else 1
            info = conv_info(cin, cout, h, h, k, s, 1, d, bias=bool(rng.random() < 0.6))
            if info["flops"] <= (MAX_FLOPS if not quick else 1e8) and info["rows"] >= 2:
                break
        add(info)
    for _ in range(counts.get("gconv", 0)):
        while True:
            h, c = _stage(rng)
            g = int(rng.choice([2, 4, 8, 32]))
            c = max(g * 4, (c // g) * g)
            k = int(rng.choice([1, 3, 3]))
            info = conv_info(c, c, h, h, k, int(rng.choice([1, 1, 2])), g, 1, bool(rng.random() < 0.5))
            if info["flops"] <= (MAX_FLOPS if not quick else 1e8):
                break
        add(info)
    for _ in range(counts.get("dwconv", 0)):
        h, c = _stage(rng)
        c = max(16, c)
        k = int(rng.choice([3, 3, 3, 5, 7]))
        add(conv_info(c, c, h, h, k, int(rng.choice([1, 1, 2])), c, 1, bool(rng.random() < 0.3)))
    for kind in ("maxpool", "avgpool"):
        for _ in range(counts.get(kind, 0)):
            h, c = _stage(rng)
            k = int(rng.choice([2, 3, 3]))
            s = int(rng.choice([2, 2, 1])) if k == 3 else 2
            p = int(k == 3 and rng.random() < 0.5)
            add(pool_info("max_pool2d" if kind == "maxpool" else "avg_pool2d", c, h, h, k, s, p,
                          ceil=bool(rng.random() < 0.15)))
    for _ in range(counts.get("bn", 0)):
        h, c = _stage(rng)
        add(eltwise_info("batch_norm", c, h, h, "BatchNorm2d", 2, params={"eps": 1e-5}))
    for _ in range(counts.get("act", 0)):
        h, c = _stage(rng)
        a = str(rng.choice(ACTS))
        if rng.random() < 0.15:   # squeeze-and-excitation style: one value per channel
            h, c = 1, _channels_like(rng, c * 2)
        if rng.random() < 0.3:   # a function call (pointwise node) rather than a module
            add(eltwise_info("pointwise", c, h, h, ACT_TEMPLATES[a].split("(")[0].split(".")[-1], 1, 1))
        else:
            add(eltwise_info("activation", c, h, h, a, 1, 1, params={"template": ACT_TEMPLATES[a]}))
    for _ in range(counts.get("binary", 0)):
        h, c = _stage(rng)
        op = str(rng.choice(["add", "add", "add", "mul"]))
        shapes = [[1, c, h, h], [1, c, 1, 1]] if op == "mul" and rng.random() < 0.5 else [[1, c, h, h]] * 2
        add(eltwise_info("pointwise", c, h, h, op, 1, 2, shapes))
    for _ in range(counts.get("cat", 0)):
        h, c = _stage(rng)
        parts = int(rng.choice([2, 2, 3, 4]))
        add(eltwise_info("pointwise", c * parts, h, h, "cat(dim=1)", 1, parts, [[1, c, h, h]] * parts))
    for _ in range(counts.get("linear", 0)):
        fi = int(rng.choice([64, 128, 256, 512, 512, 1024, 1280, 2048, 4096, 4096, 9216, 25088]))
        fo = int(rng.choice([2, 10, 100, 128, 512, 1000, 1000, 4096, 4096]))
        while fi * fo > 1.1e8:
            fo //= 2
        add(linear_info(fi, fo), slices=False)
    for _ in range(counts.get("upsample", 0)):
        h, c = _stage(rng)
        h = max(4, h // 2)
        add(upsample_info(c, h, h, 2, str(rng.choice(["nearest", "bilinear"]))))
    for _ in range(counts.get("gap", 0)):
        h, c = _stage(rng)
        add(gap_info(_channels_like(rng, c * 4), min(h, 56), min(h, 56)), slices=False)
    for _ in range(counts.get("pad", 0)):
        h, c = _stage(rng)
        add(pad_info(c, h, h, int(rng.choice([1, 1, 2]))))
    for _ in range(counts.get("trivial", 0)):
        h, c = _stage(rng)
        add(eltwise_info("identity", c, h, h, "Identity()", 0, 1))
    for cfg in configs:
        cfg["family"] = family(cfg["info"])
    return configs


# --------------------------------------------------------------------------- measuring

def measure_sweep(configs: list[dict], loads=DEFAULT_LOADS, target_s: float = 0.03, min_repeats: int = 5,
                  budget_s: float | None = None, progress: bool = True, seed: int = 0, passes: int = 2,
                  on_load: Callable[[float], None] | None = None, sustained: bool = False,
                  load_cores: float | None = None, on_progress: Callable[[int, int, str], None] | None = None,
                  stats: dict | None = None, make_runner: Callable[[dict, int, int], Callable] | None = None,
                  target_rse: float = TARGET_RSE, cpu: int | None = None) -> list[dict]:
    """Time every (configuration, rows) at every load level with the timing harness; returns records.

    The timing thread is pinned to one core (``cpu``, else :func:`edgepart.fcpm.harness.timing_core`),
    the background load's processes to the other cores first. Per load level the jobs are visited
    in interleaved passes, always in the same order, each visit one sample (warm-up calls, then a
    burst of about ``target_s / min_repeats`` seconds; its median), until every job's median has a
    relative standard error of at most ``target_rse`` with at least ``max(3, passes + 1)`` samples, or
    the level's share of ``budget_s`` is spent. Records: {cid, family, rows, load, t (the median),
    t_min, n and passes (samples), rse, converged}.

    ``sustained`` (a rate-limited device, see :mod:`edgepart.fcpm.load`): the samples are taken in
    thread CPU time and divided by the share of a core the thread sustained over the level, stalls
    included; background load then lives in the same CPU budget (``load_cores``: the device's share;
    default: the share measured at the first level).
    ``on_progress(done, total, phase)`` is called after every visit (it may raise to abort);
    ``stats`` (a dict) receives {"share": {load: share of a core sustained at that level}}.
    ``make_runner(info, rows, seed)``: the callable to time (default :class:`Runner`, torch); a job
    it cannot make (e.g. a layer the ONNX exporter refuses) is left out.
    """
    make_runner = make_runner or (lambda info, rows, seed: Runner(info, rows, seed=seed))
    jobs = [(c, r) for c in configs for r in c["rows"]]
    order = list(np.random.default_rng(seed + 1).permutation(len(jobs)))   # no drift aligned with one family
    records: list[dict] = []
    loads = list(loads)
    per_load = budget_s / len(loads) if budget_s else 3600.0
    clock = time.thread_time if sustained else time.perf_counter
    shares: dict[float, float] = {}
    min_samples = max(3, passes + 1)
    total = len(jobs) * len(loads) * min_samples
    done = [0]
    with pinned_thread(cpu) as core, _progress(progress) as bar:
        task = bar.add_task("profiling", total=total) if bar else None
        for L in loads:
            if on_load:
                on_load(L)
            if sustained:
                cores = load_cores or shares.get(0.0) or sustained_share()
                bg = BackgroundLoad(L, cores=cores, clock="cpu")
            else:
                bg = BackgroundLoad(L, avoid_cpu=core)

            def on_pass(visits, n_units, L=L):
                done[0] += 1
                if bar:
                    bar.update(task, completed=min(done[0], total), description=f"load {L:.0%}")
                if on_progress:
                    on_progress(min(done[0], total), total, f"sweep at load {L:g}")
            units = []
            for j in order:
                cfg, rows = jobs[j]
                g = geometry(cfg["info"], rows)
                units.append(Isolated(j, (lambda cfg=cfg, rows=rows: make_runner(cfg["info"], rows, int(cfg["cid"]))),
                                      nbytes=int(4 * (g.weight_elems + g.in_elems + g.out_elems))))
            harness = Harness(target_rse=target_rse, min_samples=min_samples, budget_s=per_load,
                              sample_s=target_s / max(1, min_repeats), clock=clock, on_pass=on_pass)
            with bg:
                t_start = time.perf_counter()
                c_start = time.thread_time()
                est = harness.run(units)
                share = (time.thread_time() - c_start) / max(1e-9, time.perf_counter() - t_start)
            shares[L] = share
            scale = 1.0 / max(share, 1e-3) if sustained else 1.0
            for j in sorted(est):
                e = est[j]
                cfg, rows = jobs[j]
                rec = {"cid": cfg["cid"], "family": cfg["family"], "rows": int(rows), "load": float(L),
                       "t": e.t * scale, "t_min": e.t_min * scale, "n": e.n, "passes": e.n,
                       "rse": e.rse if math.isfinite(e.rse) else None, "converged": e.converged}
                if sustained:
                    rec["t_cpu"] = float(e.t)
                records.append(rec)
    if stats is not None:
        stats["share"] = shares
        stats["timing_cpu"] = core
    return records


def design_nets(n: int, seed: int = 0, max_flops: float = 4e9) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Small random CNNs (conv/BN/ReLU stages, depthwise blocks, pooling, a classifier) timed end to end,
    to fit how much more a layer costs inside a network than alone (cold caches, call overhead)."""
    from torch import nn
    rng = np.random.default_rng(seed + 99)
    nets = []
    while len(nets) < n:
        h = int(rng.choice([64, 96, 128, 160, 224]))
        width = int(rng.choice([16, 24, 32, 48]))
        layers, cin = [], 3
        for s in range(int(rng.integers(3, 6))):
            cout = min(512, width * 2 ** s)
            for _ in range(int(rng.integers(1, 4))):
                if s > 0 and rng.random() < 0.35:
                    mid = cin * int(rng.choice([1, 4, 6]))
                    layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                               nn.Conv2d(mid, mid, 3, 1, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                               nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
                else:
                    k = int(rng.choice([3, 3, 3, 1, 5]))
                    layers += [nn.Conv2d(cin, cout, k, 1, k // 2), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
            layers.append(nn.MaxPool2d(2) if rng.random() < 0.7 else nn.AvgPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, int(rng.choice([10, 100, 1000])))]
        g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        net = nn.Sequential(*layers).eval()
        with torch.no_grad():
            for prm in net.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
        x = torch.randn(1, 3, h, h, generator=g)
        if sum(i.get("flops", 0) for i in net_infos(net, x)) <= max_flops:
            nets.append((net, x))
    return nets


def net_infos(net, x) -> list[dict]:
    """The compute nodes' infos of a synthetic network; those a stage times carry ``"reuse"`` (where their
    inputs are: :func:`edgepart.fcpm.context.stage_reuse`)."""
    gm = analyse(trace(net, (x,)))
    timed = with_reuse(gm)
    return [timed.get(n.name) or clean_info(node_info(n)) for n in gm.graph.nodes if n.op in COMPUTE_OPS]


def measure_nets(nets, loads, target_s: float = 0.3, passes: int = 2, progress: bool = False,
                 sustained: bool = False, load_cores: float | None = None,
                 on_progress: Callable[[int, int, str], None] | None = None,
                 make_call: Callable[[torch.nn.Module, torch.Tensor], Callable] | None = None,
                 budget_s: float | None = None, target_rse: float = TARGET_RSE, cpu: int | None = None) -> list[dict]:
    """``nets`` timed at each load: [{net, load, t, layers}], one torch thread pinned to one core.

    Default: *layers in context* — each network runs node by node as a stage runs it, a timer around
    each layer (:func:`edgepart.fcpm.context.graph_stage`), in the harness's interleaved passes to
    ``target_rse`` within ``budget_s`` (per load level); ``t`` is the sum of its layers and
    ``layers`` [[index into :func:`net_infos`, seconds in context], ...] what the FCPM's in-network
    part is fitted on. ``make_call(net, x)`` (e.g. an ONNX Runtime session): the network timed end to
    end as one call (no ``layers``). ``sustained``: as in :func:`measure_sweep`."""
    out = []
    clock = time.thread_time if sustained else time.perf_counter
    min_samples = max(3, passes + 1)
    total, done = len(nets) * len(loads) * min_samples, [0]
    units, index = [], {}
    for i, (net, x) in enumerate(nets):
        if make_call is not None:
            units.append(Isolated(("net", i), (lambda net=net, x=x: make_call(net, x))))
            continue
        gm = analyse(trace(net, (x,)))
        names = [n.name for n in gm.graph.nodes if n.op in COMPUTE_OPS]
        index[i] = {name: j for j, name in enumerate(names)}
        stage, _ = graph_stage(gm, (x,), i)
        units.append(stage)
    with pinned_thread(cpu) as core:
        for L in loads:
            bg = (BackgroundLoad(L, cores=load_cores or sustained_share(), clock="cpu") if sustained
                  else BackgroundLoad(L, avoid_cpu=core))

            def on_pass(visits, n_units, L=L):
                done[0] += 1
                if on_progress:
                    on_progress(min(done[0], total), total, f"networks at load {L:g}")
            harness = Harness(target_rse=target_rse, min_samples=min_samples,
                              budget_s=(budget_s or 60.0 * len(nets)) / len(loads),
                              sample_s=target_s / 5, clock=clock, on_pass=on_pass)
            with bg:
                t_start, c_start = time.perf_counter(), time.thread_time()
                est = harness.run(units)
                share = (time.thread_time() - c_start) / max(1e-9, time.perf_counter() - t_start)
            scale = 1.0 / max(share, 1e-3) if sustained else 1.0
            for i in range(len(nets)):
                if make_call is not None:
                    if ("net", i) in est:
                        out.append({"net": i, "load": float(L), "t": est[("net", i)].t * scale})
                    continue
                if (i, "total") not in est:
                    continue
                layers = [[index[i][k[1]], e.t * scale] for k, e in est.items() if k[0] == i and k[1] != "total"]
                out.append({"net": i, "load": float(L), "t": est[(i, "total")].t * scale, "layers": sorted(layers)})
    return out


def _progress(enabled: bool):
    if not enabled:
        import contextlib
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


def device_meta(name: str | None = None, cpu_share: float | None = None) -> dict:
    return {"device": name or platform.node() or "device", "machine": platform.machine(),
            "processor": platform.processor() or "", "cores": cpu_count(), "torch": torch.__version__,
            "torch_threads": 1, "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **({"cpu_share": cpu_share} if cpu_share is not None else {})}


MEASUREMENTS_FORMAT = "edgepart-fcpm-measurements/1"


def measure(quick: bool = False, loads=DEFAULT_LOADS, seed: int = 0, budget_s: float | None = None,
            progress: bool = True, name: str | None = None, counts: dict | None = None, nets: int | None = None,
            sustained: str | bool = "auto", cpu_cores: float | None = None,
            on_progress: Callable[[int, int, str], None] | None = None, backend: str = "torch",
            cpu: int | None = None) -> dict:
    """Run the sweep on this machine (this process, its CPU share): the raw measurements as plain JSON data.

    ``sustained`` — time rate-limited (see :func:`measure_sweep`): "auto" (default) does so when this
    process has a CPU quota below the machine's cores (its cgroup's, or ``cpu_cores`` when the caller
    knows it, e.g. an emulated worker that cannot see its cgroup), or, with no quota information,
    when it sustains less than 70 % of a core; True/False force it. In that mode background load
    L means L of the device's CPU budget (quota, else the measured share) taken by other work.
    :func:`fit_profile` turns the result into a :class:`DeviceProfile`; ``edgepart profile --endpoint``
    runs this inside a worker and fits on the client.

    ``cpu``: the core the timing thread is pinned to (default :func:`edgepart.fcpm.harness.timing_core`;
    a worker passes its compute thread's ``--pin-cpu``).

    ``backend="onnxruntime"``: every layer and network runs as an ONNX Runtime session; each layer's
    time is net of the session's own cost per run, stored as ``meta["stage_start_s"]``.
    """
    if backend not in ("torch", "onnxruntime"):
        raise ValueError(f"backend must be torch or onnxruntime, got {backend!r}")
    on_ort = backend == "onnxruntime"
    configs = design_sweep(quick=quick, seed=seed, counts=counts)
    if budget_s is None:
        budget_s = 20.0 if quick else 480.0
    loads = [float(v) for v in loads]
    t0 = time.perf_counter()
    cores = cpu_count()
    quota = float(cpu_cores) if cpu_cores else cpu_quota_cores()
    share0 = None
    if sustained == "auto":
        if quota is not None:
            sustained = quota < cores - 1e-6
        else:
            share0 = sustained_share(0.3)
            if share0 < RATE_LIMITED_SHARE:               # a second, longer look before calling it a quota
                share0 = max(share0, sustained_share(0.6))
            sustained = share0 < RATE_LIMITED_SHARE
    sustained = bool(sustained)
    capacity = None                                       # cores of CPU budget the background load is a share of
    if sustained:
        capacity = min(quota, cores) if quota is not None else (share0 or sustained_share(0.6))
    stats: dict = {}
    records = measure_sweep(configs, loads, target_s=0.005 if quick else 0.03, min_repeats=3 if quick else 5,
                            budget_s=budget_s, progress=progress, seed=seed, passes=1 if quick else 2,
                            sustained=sustained, load_cores=capacity, on_progress=on_progress, stats=stats,
                            make_runner=ort_runner_factory() if on_ort else None, cpu=cpu)
    call_s = session_call_s() if on_ort else 0.0
    for rec in records if on_ort else ():   # a stage pays the session's own cost once, not once per layer: charged per stage
        rec["t"] = max(rec["t"] - call_s, 0.05 * rec["t"])
    shares = stats["share"]
    base = shares.get(0.0, share0)                      # the share of a core with no background load
    n_nets = (4 if quick else 16) if nets is None else int(nets)
    net_list = design_nets(n_nets, seed) if n_nets else []
    net_recs = measure_nets(net_list, loads, target_s=0.02 if quick else 0.1, passes=1 if quick else 2,
                            sustained=sustained, load_cores=capacity, on_progress=on_progress,
                            make_call=ort_net if on_ort else None, budget_s=0.15 * budget_s,
                            cpu=stats.get("timing_cpu")) if net_list else []
    infos = [net_infos(n, x) for n, x in net_list]
    meta = device_meta(name, cpu_share=round(base, 4) if base is not None else None)
    meta.update(loads=loads, quick=quick, seed=seed, profile_seconds=round(time.perf_counter() - t0, 1),
                n_configs=len(configs), n_measurements=len(records), rate_limited=sustained,
                cpu_quota_cores=quota, cpu_share_by_load={f"{L:g}": round(v, 4) for L, v in shares.items()},
                backend=backend, timing_cpu=stats.get("timing_cpu"), target_rse=TARGET_RSE,
                converged_share=round(sum(bool(r.get("converged")) for r in records) / max(1, len(records)), 3))
    if on_ort:
        meta["stage_start_s"] = call_s
    if sustained and base:                  # the load the profiled thread really saw, relative to no load
        meta["realized_load"] = {f"{L:g}": round(1 - v / base, 3) for L, v in shares.items()}
    stored = [{"cid": c["cid"], "family": c["family"], "info": clean_info(c["info"]), "rows": c["rows"]}
              for c in configs]
    return {"format": MEASUREMENTS_FORMAT, "meta": meta, "configs": stored, "records": records,
            "nets": {"infos": infos, "records": net_recs}}


def fit_profile(m: dict, name: str | None = None) -> DeviceProfile:
    """Fit the FCPM from :func:`measure`'s output (here, or on the client for a remote profile)."""
    if m.get("format") != MEASUREMENTS_FORMAT:
        raise ValueError(f"not profiler measurements (format {m.get('format')!r}, expected {MEASUREMENTS_FORMAT!r})")
    meta = dict(m["meta"])
    if name:
        meta["device"] = name
    prof = DeviceProfile.fit(m["configs"], m["records"], meta, seed=int(meta.get("seed", 0)))
    nets = m.get("nets") or {"infos": [], "records": []}
    in_context = [{"info": nets["infos"][r["net"]][j], "rows": None, "load": r["load"], "t": t}
                  for r in nets["records"] for j, t in r.get("layers") or []]
    if in_context:           # layers timed in their stages: the in-network part fitted on those
        prof.fit_context(in_context)
        prof.fit_stage_load([{"infos": [nets["infos"][r["net"]][j] for j, _ in r["layers"]], "load": r["load"],
                              "t": r["t"]} for r in nets["records"] if r.get("layers")])
    elif nets["records"]:    # older measurements: whole networks timed end to end
        prof.fit_sequences([{"infos": nets["infos"][r["net"]], "load": r["load"], "t": r["t"]}
                            for r in nets["records"]])
    if prof.measurements is not None:
        prof.measurements["nets"] = nets
    return prof


def profile(quick: bool = False, loads=DEFAULT_LOADS, seed: int = 0, budget_s: float | None = None,
            progress: bool = True, name: str | None = None, counts: dict | None = None, nets: int | None = None,
            sustained: str | bool = "auto", cpu_cores: float | None = None, backend: str = "torch") -> DeviceProfile:
    """Run the sweep on this machine and fit the FCPM. Default: under 10 minutes; quick: under 30 s
    (onnxruntime: plus the export of each layer)."""
    return fit_profile(measure(quick, loads, seed, budget_s, progress, name, counts, nets, sustained, cpu_cores,
                               backend=backend))
