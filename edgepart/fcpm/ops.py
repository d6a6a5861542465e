"""What a device actually runs for rows of one node, built from a node's info dict.

The profiler, the accuracy benchmark and the tests all time these runners, so the
FCPM learns the kernels generated device code calls: a convolution slice is
``F.conv2d`` on a window of ``(rows-1)*stride + dilation*(k-1) + 1`` input rows
with no H padding (border rows padded explicitly with ``F.pad``), average pooling
and interpolation go through ``edgepart.runtime.rowops``, and so on.

``info`` is the dict :func:`edgepart.compiler.cost.model.node_info` returns (kind,
params, shape, in_shape, flops, rows, ...), so a zoo model's node and a
synthetic sweep configuration are built the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from edgepart.ir.rows import interp_row_ranges
from edgepart.runtime import rowops
from edgepart.runtime.allocator import keep_freed_memory

# Activation cost classes: 0 = compare/select (ReLU family), 1 = needs exp/tanh/erf.
CHEAP_ACTS = ("relu", "relu6", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "clamp", "abs", "neg",
              "maximum", "minimum", "dropout", "contiguous")
ACT_CALLS: dict[str, Callable] = {
    "relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "hardtanh": F.hardtanh,
    "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "silu": F.silu, "gelu": F.gelu, "elu": F.elu, "mish": F.mish, "softplus": F.softplus, "exp": torch.exp,
}
VIEW_LIKE = ("view", "flatten", "reshape", "contiguous", "squeeze", "unsqueeze", "size", "permute", "transpose")
BINARY_NAMES = ("add", "sub", "mul", "div", "truediv", "maximum", "minimum", "iadd", "imul", "isub")


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) >= 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def act_name(info: dict) -> str | None:
    """The activation function an activation / unary pointwise node computes, if known."""
    text = str(info.get("params", {}).get("template") or info.get("label") or "").lower()
    for name in sorted(ACT_CALLS, key=len, reverse=True):
        if name in text:
            return name
    return None


def family(info: dict) -> str:
    """The op type an FCPM sub-model is fitted for."""
    kind = info.get("kind", "generic")
    p = info.get("params", {}) or {}
    if kind == "conv2d":
        g = int(p.get("groups", 1))
        if g > 1 and g == int(p.get("in_channels", 0)) and int(p.get("out_channels", 0)) % g == 0:
            return "dwconv"
        return "conv"
    if kind in ("max_pool2d", "avg_pool2d", "batch_norm", "linear", "interpolate", "adaptive_avg_pool2d", "pad",
                "row_mean"):
        return {"max_pool2d": "maxpool", "avg_pool2d": "avgpool", "batch_norm": "bn", "linear": "linear",
                "interpolate": "upsample", "adaptive_avg_pool2d": "gap", "pad": "pad", "row_mean": "gap"}[kind]
    if kind == "activation":
        return f"act:{act_name(info) or 'other'}"
    if kind in ("identity", "flatten"):
        return "trivial"
    label = str(info.get("label", "")).lower()
    if kind.startswith("generic") and any(v in label for v in VIEW_LIKE):
        return "trivial"
    if kind.startswith("generic") and ("mean" in label or "adaptive_avg_pool" in label):
        return "gap"
    if kind == "pointwise":
        label = str(info.get("label", "")).lower()
        if label.startswith("cat"):
            return "cat"
        if act_name(info) is not None and int(info.get("n_inputs", 1)) <= 1:
            return f"act:{act_name(info)}"
        if int(info.get("n_inputs", 2)) <= 1 and not any(b in label for b in BINARY_NAMES):
            return "act:other"
        return "binary"
    return "generic"


@dataclass
class Geometry:
    """Sizes of the work for ``rows`` output rows of a node (batch 1 unless the shape says otherwise)."""
    family: str
    rows: int                 # output rows computed
    total_rows: int
    in_rows: int              # input window rows read (padding rows included)
    cin: int
    cout: int
    w_in: int
    w_out: int
    kh: int = 1
    kw: int = 1
    sh: int = 1
    sw: int = 1
    dh: int = 1
    groups: int = 1
    batch: int = 1
    flops: float = 0.0        # FLOPs of the slice
    in_elems: float = 0.0
    out_elems: float = 0.0
    weight_elems: float = 0.0
    n_inputs: int = 1
    act_class: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def geometry(info: dict, rows: int | None = None) -> Geometry:
    fam = family(info)
    p = info.get("params", {}) or {}
    shape = tuple(info.get("shape") or ())
    in_shape = tuple(info.get("in_shape") or shape or ())
    total = max(1, int(info.get("rows", shape[2] if len(shape) == 4 else 1) or 1))
    r = total if rows is None else max(1, min(int(rows), total))
    frac = r / total
    n = int(shape[0]) if shape else 1
    if len(shape) == 4:
        cout, w_out = int(shape[1]), int(shape[3])
    else:
        cout, w_out = int(math.prod(shape[1:])) if len(shape) > 1 else 1, 1
    if len(in_shape) == 4:
        cin, h_in, w_in = int(in_shape[1]), int(in_shape[2]), int(in_shape[3])
    else:
        cin, h_in, w_in = (int(math.prod(in_shape[1:])) if len(in_shape) > 1 else 1), 1, 1
    g = Geometry(fam, r, total, r, cin, cout, w_in, w_out, batch=n, flops=float(info.get("flops", 0)) * frac,
                 n_inputs=int(info.get("n_inputs", 1) or 1))
    if fam in ("conv", "dwconv", "maxpool", "avgpool"):
        g.kh, g.kw = _pair(p.get("kernel", 1))
        g.sh, g.sw = _pair(p.get("stride", 1))
        g.dh = _pair(p.get("dilation", 1))[0]
        g.groups = int(p.get("groups", 1))
        if fam in ("conv", "dwconv"):
            pt, pb, pl, pr = (tuple(p["pad"]) + (0, 0, 0, 0))[:4] if "pad" in p else (0, 0, 0, 0)
        else:
            ph, pw = _pair(p.get("padding", 0))
            pt, pb, pl, pr = ph, ph, pw, pw
        g.in_rows = min((r - 1) * g.sh + g.dh * (g.kh - 1) + 1, h_in + pt + pb)
        g.extra["pad"] = (pt, pb, pl, pr)
        g.extra["h_in"] = h_in
        if r == total and fam != "avgpool":
            g.extra["padrows"] = max(0, g.in_rows - h_in)
    elif fam == "upsample":
        g.in_rows = max(1, min(h_in, math.ceil(r * h_in / total) + 1))
    elif len(shape) != 4:
        g.in_rows = 1
    g.in_elems = float(n * cin * g.in_rows * w_in) if len(in_shape) == 4 else float(n * cin)
    g.out_elems = float(n * cout * r * w_out) if len(shape) == 4 else float(n * cout)
    if fam in ("binary", "cat"):   # every input is read: the inputs' sizes relative to the output
        shapes = [tuple(s) for s in (info.get("in_shapes") or []) if s]
        out_numel = max(1, math.prod(shape)) if shape else 1
        ratio = sum(math.prod(s) for s in shapes) / out_numel if shapes else (2.0 if fam == "binary" else 1.0)
        g.in_elems = g.out_elems * ratio
    if fam in ("conv", "dwconv"):
        g.weight_elems = float(cout * (cin // max(1, g.groups)) * g.kh * g.kw)
    elif fam == "linear":
        g.weight_elems = float(int(p.get("in_features", cin)) * int(p.get("out_features", cout)))
        g.cin, g.cout = int(p.get("in_features", cin)), int(p.get("out_features", cout))
    if fam.startswith("act") or fam in ("binary", "generic"):
        a = act_name(info)
        g.act_class = 0 if (a is None or a in CHEAP_ACTS) else 1
    if fam == "upsample":
        g.act_class = 0 if str(p.get("mode", "nearest")).startswith("nearest") else 1
    if g.flops <= 0 and fam not in ("trivial", "pad"):
        g.flops = g.out_elems
    return g


# --------------------------------------------------------------------------- runners

class Runner:
    """A zero-argument callable computing rows of one node, with its inputs prepared."""

    def __init__(self, info: dict, rows: int | None = None, seed: int = 0):
        self.info = info
        self.geom = g = geometry(info, rows)
        gen = torch.Generator().manual_seed(seed)
        self._gen = gen
        self.fn = self._build(info, g)

    def _rand(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self._gen)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of the main input a chained caller must hand to :meth:`call` (None: not 4-D)."""
        return self._in_shape

    def __call__(self):
        return self.fn(self._x)

    def call(self, x):
        return self.fn(x)

    def _build(self, info: dict, g: Geometry):
        p = info.get("params", {}) or {}
        fam = g.family
        n = g.batch
        shape = tuple(info.get("shape") or ())
        in_shape = tuple(info.get("in_shape") or shape or ())
        four_d = len(in_shape) == 4
        if four_d:
            self._in_shape = (n, g.cin, g.in_rows, g.w_in)
        else:
            self._in_shape = tuple(in_shape) if in_shape else (n, g.cin)
        self._x = self._rand(*self._in_shape)

        if fam in ("conv", "dwconv"):
            pt, pb, pl, pr = g.extra["pad"]
            wt = self._rand(g.cout, g.cin // g.groups, g.kh, g.kw) * 0.1
            b = self._rand(g.cout) if p.get("bias") or p.get("bias_node") is not None else None
            stride, dil, groups = _pair(p.get("stride", 1)), _pair(p.get("dilation", 1)), g.groups
            # border rows come from explicit padding: the window's real rows + F.pad (as ctx.rows does)
            real = min(g.in_rows, g.extra["h_in"])
            top = min(pt, g.in_rows - real) if g.rows == g.total_rows else 0
            bottom = g.in_rows - real - top
            if g.rows < g.total_rows:
                top, bottom = 0, 0
                real = g.in_rows
            self._in_shape = (n, g.cin, real, g.w_in)
            self._x = self._rand(*self._in_shape)
            if pl != pr:
                def conv(x):
                    x = rowops.pad_rows(x, top, bottom, 0.0)
                    return F.conv2d(F.pad(x, (pl, pr)), wt, b, stride, (0, 0), dil, groups)
            else:
                def conv(x):
                    return F.conv2d(rowops.pad_rows(x, top, bottom, 0.0), wt, b, stride, (0, pl), dil, groups)
            return conv
        if fam == "maxpool":
            k, s, d = _pair(p.get("kernel", 2)), _pair(p.get("stride", 2)), _pair(p.get("dilation", 1))
            pw = _pair(p.get("padding", 0))[1]
            ceil = bool(p.get("ceil_mode", False))
            pt = g.extra["pad"][0]
            real = min(g.in_rows, g.extra["h_in"])
            top = min(pt, g.in_rows - real) if g.rows == g.total_rows else 0
            bottom = g.in_rows - real - top if g.rows == g.total_rows else 0
            if g.rows < g.total_rows:
                real = g.in_rows
            self._in_shape = (n, g.cin, real, g.w_in)
            self._x = self._rand(*self._in_shape)
            r = g.rows

            def maxpool(x):
                y = F.max_pool2d(rowops.pad_rows(x, top, bottom, -math.inf), k, s, (0, pw), d, ceil_mode=ceil)
                return y[:, :, :r] if ceil else y
            return maxpool
        if fam == "avgpool":
            k, s, pad = _pair(p.get("kernel", 2)), _pair(p.get("stride", 2)), _pair(p.get("padding", 0))
            full = g.rows == g.total_rows
            real = min(g.in_rows, g.extra["h_in"])
            top = pad[0] if full else 0
            bottom = max(0, g.in_rows - real - top) if full else 0
            if not full:
                real = g.in_rows
            self._in_shape = (n, g.cin, real, g.w_in)
            self._x = self._rand(*self._in_shape)
            kw = dict(kernel=k, stride=s, padding=pad, ceil_mode=bool(p.get("ceil_mode", False)),
                      count_include_pad=bool(p.get("count_include_pad", True)),
                      divisor_override=p.get("divisor_override"), in_rows=g.extra["h_in"], out_width=g.w_out)
            return lambda x: rowops.avg_pool2d_rows(x, top, bottom, **kw)
        if fam == "bn":
            c = g.cin
            mean, var, w, b = self._rand(c), self._rand(c).abs() + 0.5, self._rand(c), self._rand(c)
            eps = float(p.get("eps", 1e-5))
            return lambda x: F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        if fam.startswith("act"):
            f = ACT_CALLS.get(act_name(info) or "relu", F.relu)
            return f
        if fam == "binary":
            label = str(info.get("label", "add")).lower()
            other_shape = self._in_shape
            shapes = sorted((tuple(s) for s in (info.get("in_shapes") or []) if s), key=math.prod)
            if len(shapes) >= 2 and len(shapes[0]) == len(self._in_shape):
                other_shape = shapes[0]
            y = self._rand(*other_shape)
            if len(other_shape) == 4 and other_shape[2] > 1:
                y = self._rand(*other_shape[:2], self._in_shape[2] if len(self._in_shape) == 4 else 1,
                               *other_shape[3:])
            op = torch.mul if "mul" in label else torch.sub if "sub" in label else torch.div if "div" in label \
                else torch.add
            return lambda x: op(x, y)
        if fam == "cat":
            parts = max(2, g.n_inputs)
            cs = [g.cout // parts] * parts
            cs[-1] += g.cout - sum(cs)
            self._in_shape = (n, cs[0], g.rows, g.w_out)
            self._x = self._rand(*self._in_shape)
            others = [self._rand(n, c, g.rows, g.w_out) for c in cs[1:]]
            return lambda x: torch.cat([x, *others], 1)
        if fam == "linear":
            fi, fo = int(p.get("in_features", g.cin)), int(p.get("out_features", g.cout))
            lead = tuple(in_shape[:-1]) if in_shape else (n,)
            self._in_shape = (*lead, fi)
            self._x = self._rand(*self._in_shape)
            wt = self._rand(fo, fi) * 0.01
            b = self._rand(fo) if p.get("bias") or p.get("bias_node") is not None else None
            return lambda x: F.linear(x, wt, b)
        if fam == "upsample":
            spec = {k: p.get(k) for k in ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")}
            spec["mode"] = spec["mode"] or "nearest"
            h_in = int(in_shape[2])
            ranges = interp_row_ranges(h_in, spec)
            a, b_ = 0, g.rows
            if g.rows < g.total_rows:
                a = (g.total_rows - g.rows) // 2
                b_ = a + g.rows
            lo = min(r[0] for r in ranges[a:b_])
            hi = max(r[1] for r in ranges[a:b_])
            self._in_shape = (n, g.cin, hi - lo, g.w_in)
            self._x = self._rand(*self._in_shape)
            ow = g.w_out
            return lambda x: rowops.interpolate_rows(x, lo, hi, a, b_, h_in, ow, spec)
        if fam == "gap":
            if info.get("kind") == "row_mean":     # a global pool's row-local half (passes.pools)
                return lambda x: x.mean(3, keepdim=True)
            out = p.get("output_size", 1) if info.get("kind") == "adaptive_avg_pool2d" else 1
            return lambda x: F.adaptive_avg_pool2d(x, out)
        if fam == "pad":
            padv = tuple(p.get("pad", (1, 1, 0, 0)))
            l, r_ = int(padv[0]), int(padv[1])
            val = float(p.get("value", 0.0))
            return lambda x: F.pad(x, (l, r_, 0, 0), value=val)
        if fam == "trivial":
            if info.get("kind") == "flatten":
                sd, ed = int(p.get("start_dim", 1)), int(p.get("end_dim", -1))
                return lambda x: torch.flatten(x, sd, ed)
            if len(shape) == 2 and len(self._in_shape) == 4:
                return lambda x: torch.flatten(x, 1)
            return lambda x: x
        # generic: a memory-bound stand-in (one pass over the output)
        return lambda x: x * 1.0


def time_callable(fn: Callable[[], Any], target_s: float = 0.1, min_repeats: int = 5, max_repeats: int = 50,
                  warmup_s: float = 0.02, clock: Callable[[], float] | None = None) -> dict:
    """Median time of ``fn()`` after warm-up: repeats sized to about ``target_s`` in total.

    Times under the malloc settings workers run with (:func:`keep_freed_memory`, applied to this
    process once): with glibc's defaults a kernel whose output exceeds the dynamic mmap threshold
    page-faults it in on every call or not, depending on what was freed before (measured here: a
    zoo ReLU took 182–382 µs over eight fresh instances with the defaults, 163–216 µs with the
    worker's settings), and a worker never does.

    ``clock``: wall time (``time.perf_counter``, the default) or e.g. ``time.thread_time`` — the CPU
    time this thread spent, for a rate-limited device (see :mod:`edgepart.fcpm.load`).
    """
    import time
    keep_freed_memory()
    clock = clock or time.perf_counter
    with torch.inference_mode():
        t0 = clock()
        fn()
        first = clock() - t0
        spent, w = first, 1
        while spent < warmup_s and w < 20:
            t0 = clock()
            fn()
            spent += clock() - t0
            w += 1
        est = max(spent / w, 1e-7)
        n = int(min(max_repeats, max(min_repeats, target_s / est)))
        ts = []
        for _ in range(n):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    ts.sort()
    med = ts[len(ts) // 2] if len(ts) % 2 else 0.5 * (ts[len(ts) // 2 - 1] + ts[len(ts) // 2])
    q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
    return {"t": med, "t_min": ts[0], "iqr": q3 - q1, "n": n}
