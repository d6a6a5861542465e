"""Analysis passes: node.meta holds only metadata (no example tensors), its exact values,
shape-constant folding, and the passes' import direction (issue #15)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import edgepart
from edgepart import models as zoo
from edgepart.compiler.planning.ofpm import param_bytes
from edgepart.passes.trace import trace
from edgepart.errors import TraceError
from edgepart.passes import analyse
from edgepart.passes.graph import COMPUTE_OPS
from tests.conftest import assert_close

PACKAGE = Path(edgepart.__file__).resolve().parent


def tensors_in(v, path: str = "") -> list[str]:
    """Paths of the tensors reachable from ``v`` through containers and dataclasses (not other nodes)."""
    if isinstance(v, torch.Tensor):
        return [path]
    if isinstance(v, fx.Node):
        return []
    if isinstance(v, dict):
        return [p for k, x in v.items() for p in tensors_in(x, f"{path}[{k!r}]")]
    if isinstance(v, (tuple, list, set, frozenset)):
        return [p for i, x in enumerate(v) for p in tensors_in(x, f"{path}[{i}]")]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return [p for f in dataclasses.fields(v) for p in tensors_in(getattr(v, f.name), f"{path}.{f.name}")]
    return []


class FunctionalConv(nn.Module):
    """A get_attr weight, a tuple-valued node and a non-4-D tail."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        a, b = torch.split(y, 2, dim=1)
        return torch.flatten(a + b, 1)


class ShapeArithmetic(nn.Module):
    """Sizes read from the tensor and used in arithmetic: all folded at trace time."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y = F.interpolate(y, size=(y.size(2) * 2, y.shape[3] + 4), mode="nearest")
        n, c, h, w = y.shape
        return y.reshape(n, c * h, w) * (h // 4)


@pytest.mark.parametrize("name", zoo.names())
def test_meta_of_zoo_models_holds_no_tensor(name):
    model, (x,) = zoo.get(name, input_size=zoo.min_input_size(name))
    gm = analyse(trace(model, (x,)))
    found = [f"{n.name}.meta{p}" for n in gm.graph.nodes for p in tensors_in(n.meta)]
    assert found == []


@pytest.mark.parametrize("module", [FunctionalConv, ShapeArithmetic])
def test_meta_of_small_graphs_holds_no_tensor(module):
    gm = analyse(trace(module().eval(), (torch.randn(1, 3, 8, 6),)))
    assert [f"{n.name}.meta{p}" for n in gm.graph.nodes for p in tensors_in(n.meta)] == []


def test_meta_values_are_exact():
    gm = analyse(trace(FunctionalConv().eval(), (torch.randn(1, 3, 8, 6),)))
    meta = {n.name: {k: n.meta[k] for k in ("shape", "dtype", "bytes", "rows")}
            for n in gm.graph.nodes if n.op != "output"}
    assert meta == {
        "x": dict(shape=(1, 3, 8, 6), dtype="float32", bytes=3 * 8 * 6 * 4, rows=8),
        "weight": dict(shape=(4, 3, 3, 3), dtype="float32", bytes=4 * 27 * 4, rows=3),
        "bias": dict(shape=(4,), dtype="float32", bytes=16, rows=1),
        "conv2d": dict(shape=(1, 4, 8, 6), dtype="float32", bytes=4 * 8 * 6 * 4, rows=8),
        "split": dict(shape=None, dtype=None, bytes=4 * 8 * 6 * 4, rows=1),   # a tuple of two tensors
        "getitem": dict(shape=(1, 2, 8, 6), dtype="float32", bytes=2 * 8 * 6 * 4, rows=8),
        "getitem_1": dict(shape=(1, 2, 8, 6), dtype="float32", bytes=2 * 8 * 6 * 4, rows=8),
        "add": dict(shape=(1, 2, 8, 6), dtype="float32", bytes=2 * 8 * 6 * 4, rows=8),
        "flatten": dict(shape=(1, 96), dtype="float32", bytes=96 * 4, rows=1),
    }
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    assert conv.meta["op"].kind == "conv2d" and conv.meta["splittable"]
    assert param_bytes(gm, conv) == 4 * 27 * 4 + 16     # from the get_attr nodes' recorded bytes
    assert all("constant" not in n.meta for n in gm.graph.nodes)


def test_shape_arithmetic_is_folded_and_exact():
    model, x = ShapeArithmetic().eval(), torch.randn(1, 3, 8, 6)
    gm = analyse(trace(model, (x,)))
    compute = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    assert [n.meta["op"].kind for n in compute][:2] == ["conv2d", "interpolate"]
    assert all(n.meta["shape"] is not None for n in compute)       # only tensor-valued nodes remain
    assert all("constant" not in n.meta for n in gm.graph.nodes)
    interp = compute[1]
    assert interp.meta["op"].params["size"] == [16, 10] and interp.meta["shape"] == (1, 4, 16, 10)
    assert compute[-1].meta["shape"] == (1, 64, 10)
    with torch.no_grad():
        assert_close(gm(x), model(x))
    bundle = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even")
    with torch.no_grad():
        assert_close(bundle.run_local(x), model(x))


def test_analyse_needs_a_traced_graph():
    with pytest.raises(TraceError, match="run compiler.trace first"):
        analyse(fx.symbolic_trace(ShapeArithmetic().eval()))


def _edgepart_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n == "edgepart" or n.startswith("edgepart.")]


@pytest.mark.parametrize("path", sorted((PACKAGE / "passes").glob("*.py")), ids=lambda p: p.name)
def test_passes_import_neither_compiler_nor_runtime(path):
    bad = [m for m in _edgepart_imports(path) if m.split(".")[:2] in (["edgepart", "compiler"], ["edgepart", "runtime"])]
    assert bad == [], f"{path.name} imports {bad}"


def test_ir_rows_is_a_leaf():
    assert _edgepart_imports(PACKAGE / "ir" / "rows.py") == []
