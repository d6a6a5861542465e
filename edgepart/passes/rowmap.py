"""Pass: exact row maps, and which nodes can be split by rows.

For a row-local node, ``input_windows(node, a, b)`` says which rows of each input
rows [a, b) of its output need, and how many rows of border padding the op adds
above and below them. For a conv or pool with kernel k, stride s, top padding p,
dilation d: input rows [a*s - p, (b-1)*s - p + d*(k-1) + 1), clipped to the
tensor; what falls outside is padding. Anything not row-local needs its inputs whole.

node.meta["splittable"]  True when the node may be part of a split stage
node.meta["why_whole"]   for the others, the reason (shown in the compile report)
"""
from __future__ import annotations

import torch.fx as fx

from edgepart.ir.rows import interp_row_ranges
from edgepart.passes.graph import COMPUTE_OPS

Window = tuple[int, int, int, int]   # (lo, hi, pad_top, pad_bottom)


def geometry(spec) -> tuple[int, int, int] | None:
    """(effective kernel height, stride, top padding) of a windowed op along rows."""
    p = spec.params
    if spec.kind == "conv2d":
        return p["dilation"][0] * (p["kernel"][0] - 1) + 1, p["stride"][0], p["pad"][0]
    if spec.kind == "max_pool2d":
        return p["dilation"][0] * (p["kernel"][0] - 1) + 1, p["stride"][0], p["padding"][0]
    if spec.kind == "avg_pool2d":
        return p["kernel"][0], p["stride"][0], p["padding"][0]
    if spec.kind == "pad":
        return 1, 1, p["pad"][2]
    return None


def clip_window(start: int, end: int, rows: int) -> Window:
    """The part of [start, end) inside [0, rows), and how much lies above and below it."""
    lo = min(max(start, 0), rows)
    hi = max(min(end, rows), lo)
    pad_top = max(0, min(end, 0) - start)
    pad_bottom = max(0, end - max(start, rows))
    return lo, hi, pad_top, pad_bottom


def _interp_ranges(node: fx.Node) -> list[tuple[int, int]]:
    if "interp_ranges" not in node.meta:
        spec = node.meta["op"]
        node.meta["interp_ranges"] = interp_row_ranges(spec.input.meta["rows"], spec.params)
    return node.meta["interp_ranges"]


def input_windows(node: fx.Node, a: int, b: int) -> dict[str, Window]:
    """Rows of every input that rows [a, b) of ``node`` need (whole inputs when not row-local)."""
    spec = node.meta["op"]
    out: dict[str, Window] = {}
    for p in node.all_input_nodes:
        rows = p.meta["rows"]
        if not spec.row_local or b <= a:
            out[p.name] = (0, rows, 0, 0) if b > a else (0, 0, 0, 0)
            continue
        if p is spec.input and spec.kind == "interpolate":
            ranges = _interp_ranges(node)[a:b]
            out[p.name] = (min(r[0] for r in ranges), max(r[1] for r in ranges), 0, 0)
        elif p is spec.input and geometry(spec) is not None:
            k_eff, s, top = geometry(spec)
            out[p.name] = clip_window(a * s - top, (b - 1) * s - top + k_eff, rows)
        elif (spec.kind == "pointwise" or p is spec.input) and _same_rows(p, node):
            out[p.name] = (a, b, 0, 0)
        else:   # broadcast operand (one row, e.g. an SE scale of shape (N, C, 1, 1))
            out[p.name] = (0, rows, 0, 0)
    return out


def _same_rows(p: fx.Node, node: fx.Node) -> bool:
    ps, ns = p.meta.get("shape"), node.meta.get("shape")
    return ps is not None and ns is not None and len(ps) == 4 and len(ns) == 4 and ps[2] == ns[2]


def _broadcasts_over_rows(p: fx.Node, node: fx.Node) -> bool:
    ps = p.meta.get("shape")
    return ps is not None and (len(ps) < 2 or ps[-2] == 1)


def _why_not_splittable(node: fx.Node) -> str:
    spec = node.meta["op"]
    if not spec.row_local:
        return spec.why_whole
    shape = node.meta.get("shape")
    if shape is None or len(shape) != 4:
        return "output is not a 4-D (N, C, H, W) tensor"
    if shape[2] < 2:
        return "output has a single row"
    for p in node.all_input_nodes:
        if spec.input is p and spec.kind in ("interpolate", "conv2d", "max_pool2d", "avg_pool2d", "pad"):
            if p.meta.get("shape") is None or len(p.meta["shape"]) != 4:
                return f"input {p.name!r} is not a 4-D tensor"
        elif spec.kind == "pointwise" and not (_same_rows(p, node) or _broadcasts_over_rows(p, node)):
            return f"input {p.name!r} has shape {p.meta.get('shape')} which neither matches nor broadcasts over rows"
    return ""


def annotate_rowmaps(gm: fx.GraphModule) -> fx.GraphModule:
    for n in gm.graph.nodes:
        if n.op not in COMPUTE_OPS:
            continue
        why = _why_not_splittable(n)
        spec = n.meta["op"]
        if why and spec.row_local and not _row_local_inputs_ok(n):
            spec.row_local = False          # inputs the row maps cannot describe: treat as whole
            spec.why_whole = why
        n.meta["splittable"] = not why
        n.meta["why_whole"] = why
    return gm


def _row_local_inputs_ok(node: fx.Node) -> bool:
    spec = node.meta["op"]
    for p in node.all_input_nodes:
        if spec.input is p and spec.kind != "pointwise":
            if p.meta.get("shape") is None or len(p.meta["shape"]) != 4:
                return False
        elif spec.kind == "pointwise" and not (_same_rows(p, node) or _broadcasts_over_rows(p, node) or p.meta.get("rows") == 1):
            return False
    return True
