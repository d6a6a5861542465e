"""Features of (node, rows, load) that the FCPM regresses latency on, and JSON-safe node infos."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgepart.fcpm.ops import Geometry, geometry

FEATURES = ["lflops", "lpflops", "lin", "lout", "lwgt", "lrows", "lw", "lcin", "lcout", "lk", "stride", "lgroups",
            "act", "gemm", "padrows", "load"]
SIMD = 16  # channels per vector block of the convolution kernels (AVX-512 fp32); padded FLOPs round up to it
BYTES = 4  # float32


def _log(v: float) -> float:
    return math.log(max(float(v), 1.0))


def features_of_geometry(g: Geometry, load: float) -> list[float]:
    groups = max(1, g.groups)
    pflops = g.flops
    if g.family == "conv":   # work as the kernels do it: channels per group rounded up to whole vector blocks
        ci, co = max(1, g.cin // groups), max(1, g.cout // groups)
        pflops = g.flops * (math.ceil(ci / SIMD) * SIMD / ci) * (math.ceil(co / SIMD) * SIMD / co)
    return [_log(g.flops), _log(pflops), _log(g.in_elems * BYTES), _log(g.out_elems * BYTES), _log(g.weight_elems * BYTES + 1),
            _log(g.rows), _log(g.w_out), _log(g.cin / groups), _log(g.cout / groups), _log(g.kh * g.kw),
            float(g.sh), math.log(groups), float(g.act_class),
            # PyTorch runs a 1x1 stride-1 convolution on one thread as a plain GEMM, not through oneDNN
            float(g.family == "conv" and g.kh * g.kw == 1 and g.sh == 1 and g.dh == 1),
            # border rows padded by an explicit copy (F.pad) before the kernel runs
            float(g.extra.get("padrows", 0)), float(load)]


def features(info: dict, rows: int | None, load: float) -> tuple[str, list[float], float]:
    """(family, feature vector, slice FLOPs) of ``rows`` output rows of the node ``info`` under ``load``."""
    g = geometry(info, rows)
    if info.get("kind") == "row_mean":
        # A global pool's row-local half (passes.pools) over r rows does the work of the global pool of
        # those r rows: present it to the `gap` model with that pool's geometry exactly (one output row
        # of one value per channel, one input row's elements, the r rows' FLOPs), the only inputs the
        # model was fitted on. With its own geometry (r output rows, r input rows) it lay outside them,
        # and the log-linear fit priced one SE pool of a 56-row stage at 140 ms (the global pool: 0.02).
        g.rows, g.w_out = 1, 1
        g.in_elems, g.out_elems = float(g.batch * g.cin * g.w_in), float(g.batch * g.cout)
    return g.family, features_of_geometry(g, load), g.flops


def design_row(x: list[float] | np.ndarray) -> np.ndarray:
    """Terms of the log-linear model: the features plus load interactions."""
    x = np.asarray(x, dtype=float)
    load = x[..., FEATURES.index("load")]
    lflops, lout, lin = (x[..., FEATURES.index(k)] for k in ("lflops", "lout", "lin"))
    extra = np.stack([load * load, load * lflops, load * lout, load * lin, lflops * lflops, lin * lin], axis=-1)
    return np.concatenate([x, extra], axis=-1)


_KEEP_PARAMS = ("kernel", "stride", "dilation", "groups", "pad", "padding", "in_channels", "out_channels",
                "ceil_mode", "count_include_pad", "divisor_override", "mode", "scale_factor", "size", "align_corners",
                "recompute_scale_factor", "in_features", "out_features", "template", "output_size", "eps",
                "start_dim", "end_dim", "value")


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def clean_info(info: dict) -> dict:
    """A JSON-safe copy of a node info with only what the FCPM reads (no fx nodes, no weights)."""
    p = info.get("params", {}) or {}
    params = {k: _plain(p[k]) for k in _KEEP_PARAMS if k in p}
    if p.get("bias") or p.get("bias_node") is not None:
        params["bias"] = True
    out = {k: _plain(info.get(k)) for k in ("name", "kind", "label", "flops", "macs", "rows", "shape", "in_shape",
                                             "bytes", "n_inputs", "in_shapes") if k in info}
    out["params"] = params
    return out
