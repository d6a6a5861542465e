"""Row-slice kernels called by generated device programs.

Each function computes rows [a, b) of an op's output from exactly the input rows
the row map says it needs, with the op's padding applied explicitly and only at
the tensor's true border, so that any slicing gives the single-device result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgepart.ir.rows import interp_matrix


def pad_rows(x: torch.Tensor, top: int, bottom: int, fill: float) -> torch.Tensor:
    """Add ``top``/``bottom`` rows of ``fill`` along dim 2 (the border padding of a slice)."""
    if top == 0 and bottom == 0:
        return x
    return F.pad(x, (0, 0, top, bottom), value=fill)


def avg_pool2d_rows(x: torch.Tensor, pad_top: int, pad_bottom: int, kernel, stride, padding, ceil_mode: bool,
                    count_include_pad: bool, divisor_override, in_rows: int, out_width: int) -> torch.Tensor:
    """Average pooling of a row window, exact for any slicing.

    ``x`` holds the window's real rows; ``pad_top``/``pad_bottom`` rows lie outside the
    tensor. PyTorch divides each window's sum by a count that depends on where the
    window sits (count_include_pad, ceil_mode overflow), so the count is pooled from a
    0/1 mask with the same geometry instead of being taken from the slice's own size.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    width = x.shape[3]
    right = (out_width - 1) * sw + kw - width - pw        # covers ceil_mode windows; may crop
    xp = F.pad(x, (pw, right, pad_top, pad_bottom))
    total = F.avg_pool2d(xp, (kh, kw), (sh, sw), 0, False, True, 1)  # divisor 1: window sums
    if divisor_override:
        return total / divisor_override
    pad_value = 1.0 if count_include_pad else 0.0
    bottom_in_padding = min(pad_bottom, ph)                 # rows in [H, H + ph): true padding rows
    mh = torch.cat([torch.full((pad_top,), pad_value), torch.ones(x.shape[2]),
                    torch.full((bottom_in_padding,), pad_value),
                    torch.zeros(pad_bottom - bottom_in_padding)])
    right_in_padding = max(0, min(right, pw))
    mw = torch.cat([torch.full((pw,), pad_value), torch.ones(width),
                    torch.full((right_in_padding,), pad_value), torch.zeros(max(0, right - right_in_padding))])
    mw = mw[: xp.shape[3]]
    mask = (mh[:, None] * mw[None, :]).to(x.dtype)[None, None]
    count = F.avg_pool2d(mask, (kh, kw), (sh, sw), 0, False, True, 1)
    return total / count


def interpolate_rows(x: torch.Tensor, lo: int, hi: int, a: int, b: int, in_rows: int, out_width: int,
                     spec: dict) -> torch.Tensor:
    """Rows [a, b) of an interpolation from input rows [lo, hi) held in ``x``."""
    m = interp_matrix(in_rows, spec)[lo:hi, a:b].to(x.dtype)
    if spec["mode"] in ("nearest", "nearest-exact"):
        rows = x.index_select(2, m.argmax(0))
    else:
        rows = torch.einsum("nchw,hk->nckw", x, m)
    kw = dict(mode=spec["mode"])
    if spec["mode"] in ("bilinear", "bicubic"):
        kw["align_corners"] = spec.get("align_corners")
    if spec.get("size") is not None:
        kw["size"] = (b - a, out_width)
    else:
        scale = spec["scale_factor"]
        sw = scale[1] if isinstance(scale, (list, tuple)) else scale
        kw["scale_factor"] = (1.0, float(sw))
        kw["recompute_scale_factor"] = spec.get("recompute_scale_factor")
    if b - a == 0:
        return rows
    return F.interpolate(rows, **kw)
