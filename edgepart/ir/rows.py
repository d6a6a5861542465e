"""Row arithmetic of interpolation, shared by the compiler's row maps and the runtime's kernels.

Pure functions of an input height and an interpolation spec (the dict the ops pass
records: size, scale_factor, mode, align_corners, recompute_scale_factor), so the
planner's row windows and the rows a device computes come from the same numbers.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def _height_kwargs(spec: dict) -> dict:
    """F.interpolate arguments that resize the height as ``spec`` does and leave a width of 1 alone."""
    size, scale = spec.get("size"), spec.get("scale_factor")
    kw = dict(mode=spec["mode"])
    if spec["mode"] in ("bilinear", "bicubic"):
        kw["align_corners"] = spec.get("align_corners")
    if size is not None:
        hw = size if isinstance(size, (list, tuple)) else (size, size)
        kw["size"] = (hw[0], 1)
    else:
        sh = scale[0] if isinstance(scale, (list, tuple)) else scale
        kw["scale_factor"] = (float(sh), 1.0)
        kw["recompute_scale_factor"] = spec.get("recompute_scale_factor")
    return kw


@lru_cache(maxsize=256)
def _interp_matrix_cached(in_rows: int, key: tuple) -> torch.Tensor:
    spec = dict(key)
    eye = torch.eye(in_rows, dtype=torch.float32).reshape(1, in_rows, in_rows, 1)
    out = F.interpolate(eye, **_height_kwargs(spec))
    return out[0, :, :, 0].contiguous()     # [in_rows, out_rows]: weight of input row r in output row i


def _spec_key(spec: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items()))


def interp_matrix(in_rows: int, spec: dict) -> torch.Tensor:
    """The height part of an interpolation as a matrix, computed by PyTorch itself.

    Interpolating an identity matrix gives each output row's weights over input rows
    exactly as F.interpolate computes them, for any mode, size or scale factor.
    The result is cached and shared: callers must not modify it.
    """
    return _interp_matrix_cached(in_rows, _spec_key(spec))


def interp_row_ranges(in_rows: int, spec: dict) -> list[tuple[int, int]]:
    """For every output row, the range [lo, hi) of input rows with a non-zero weight."""
    m = interp_matrix(in_rows, spec)
    ranges = []
    for i in range(m.shape[1]):
        nz = torch.nonzero(m[:, i]).flatten()
        ranges.append((int(nz.min()), int(nz.max()) + 1) if len(nz) else (0, 0))
    return ranges
