"""ONNX in: an ONNX model as a torch.fx graph of the torch ops edgepart's passes know.

Three steps:

1. ONNX Runtime's basic graph optimisations (constant folding, redundant nodes) rewrite the model:
   shapes, pads and scales computed by subgraphs of constants (``Shape -> Gather -> Concat`` as
   exporters write them) become initializers.
2. onnx2torch converts the model to a ``torch.fx.GraphModule``. It leaves many ONNX ops as its own
   modules (``OnnxBinaryMathOperation``, ``OnnxConcat``, ``OnnxResize``, ``OnnxReshape``, ...) whose
   arguments are tensors even where ONNX means a constant shape; edgepart rebuilds only torch.nn
   modules on a device and recognises ops by their torch functions.
3. Our own pass (:func:`lower`, written for edgepart): the graph runs once on example inputs; every
   node that depends on no model input is folded into its value; every onnx2torch module that does
   is replaced by its own ``forward`` traced with the folded arguments as constants (so ``Add``
   becomes ``torch.add``, ``Resize`` ``F.interpolate`` with a constant scale, ``Reshape``
   ``torch.reshape`` with a constant shape), except a few rewritten directly (:data:`_DIRECT`).

What remains unknown to edgepart's passes (``torch.mean`` of a ``ReduceMean``, a ``Gather``) runs whole on
one device, and the compile report names it like any op it does not know.
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F

from edgepart.errors import TraceError, UnsupportedOpError


def _onnx2torch():
    """onnx2torch, imported without torchvision.

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and RoiAlign
    converters; torchvision matching this torch is not installed (PyPI's build does not load beside
    torch's CPU wheel). A stand-in is in ``sys.modules`` during the import only: those two ONNX ops
    fail to convert (they are not row-local CNN layers anyway), everything else is unaffected."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    try:
        import torchvision  # noqa: F401 — a working torchvision needs no stand-in
    except Exception:  # noqa: BLE001 — missing, or installed but not loadable beside this torch
        stand_in, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.roi_align = ops.nms = ops.box_convert = None
        stand_in.ops = ops
        sys.modules.update({"torchvision": stand_in, "torchvision.ops": ops})
    try:
        import onnx2torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return onnx2torch


def load(model: onnx.ModelProto | str | os.PathLike | bytes) -> tuple[onnx.ModelProto, str]:
    """The model (a ModelProto, a path or serialized bytes) and its name."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "onnx_model"
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
        return proto, proto.graph.name or "onnx_model"
    path = Path(model)
    try:
        return onnx.load(str(path)), path.stem
    except Exception as e:  # noqa: BLE001 — onnx raises protobuf's errors
        raise TraceError(f"{path}: not a readable ONNX model: {type(e).__name__}: {e}") from e


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after ONNX Runtime's basic (semantics-preserving) graph optimisations."""
    # why not at the top: importing onnxruntime starts a native thread (see runtime.ort._ort)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="edgepart-onnx-") as d:
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types
            raise TraceError(f"ONNX Runtime cannot load the model: {type(e).__name__}: {e}") from e
        return onnx.load(so.optimized_model_filepath)


# --- lowering onnx2torch's modules to torch ops ----------------------------------------------------
def _is_torch_nn(m: torch.nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn")


def _global_average_pool(low: "_Lowering", n: fx.Node, m) -> fx.Node:
    return low.graph.call_function(F.adaptive_avg_pool2d, (low.arg(n.args[0], n.name), 1))


def _concat(low: "_Lowering", n: fx.Node, m) -> fx.Node:
    return low.graph.call_function(torch.cat, (list(low.arg(n.args, n.name)), m.axis))


def _copy_identity(low: "_Lowering", n: fx.Node, m) -> Any:
    return low.arg(n.args[0], n.name)


_RESIZE_MODES = {"nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}


def _resize(low: "_Lowering", n: fx.Node, m) -> fx.Node:
    """ONNX Resize of a 4-d tensor with constant scales or sizes: F.interpolate (onnx2torch's forward
    branches on the input's rank, which fx cannot trace)."""
    bound = dict(zip(("input_tensor", "roi", "scales", "sizes"), n.args)) | dict(n.kwargs)
    given = {k: low.values[a] if isinstance(a, fx.Node) else a for k, a in bound.items()}
    x, roi, scales, sizes = (given.get(k) for k in ("input_tensor", "roi", "scales", "sizes"))
    if any(isinstance(a, fx.Node) and a in low.live for k, a in bound.items() if k != "input_tensor"):
        raise UnsupportedOpError(f"ONNX node {n.name!r}: Resize with scales or sizes computed from the input")
    if x.dim() != 4 or m.onnx_mode not in _RESIZE_MODES or (
            not m.ignore_roi and roi is not None and roi.nelement()):
        raise UnsupportedOpError(f"ONNX node {n.name!r}: Resize of a {x.dim()}-d tensor in mode {m.onnx_mode!r} "
                                 "with a region of interest is not supported")
    size = scale = None
    if sizes is not None and sizes.nelement():
        size = [int(v) for v in sizes.tolist()[2:]]
    elif scales is not None and scales.nelement():
        scale = [float(v) for v in scales.tolist()[2:]]
    return low.graph.call_function(F.interpolate, (low.arg(bound["input_tensor"], n.name),), {
        "size": size, "scale_factor": scale, "mode": _RESIZE_MODES[m.onnx_mode], "align_corners": m.align_corners})


def _pad(low: "_Lowering", n: fx.Node, m) -> fx.Node:
    """ONNX Pad with constant pads: F.pad over the last dimensions only, as torch's pad list runs
    from the last dimension back (edgepart recognises a pad of H and W; onnx2torch lists all four)."""
    if type(m).__name__ == "OnnxPadStatic":
        pads, value = list(m.pads), m.constant_value
    else:
        bound = dict(zip(("input_tensor", "pads", "constant_value"), n.args)) | dict(n.kwargs)
        if any(isinstance(a, fx.Node) and a in low.live for k, a in bound.items() if k != "input_tensor"):
            raise UnsupportedOpError(f"ONNX node {n.name!r}: Pad with pads computed from the input")
        pad_mod = sys.modules[type(m).__module__]
        raw = low.values[bound["pads"]] if isinstance(bound["pads"], fx.Node) else bound["pads"]
        pads = pad_mod._torch_padding_to_mode_format(pad_mod._onnx_padding_to_torch(raw.tolist()), m.mode)
        value = bound.get("constant_value", 0.0)
        value = low.values[value] if isinstance(value, fx.Node) else value
    pads = [int(p) for p in pads]
    while len(pads) > 2 and pads[-2:] == [0, 0]:
        pads = pads[:-2]
    value = 0.0 if value is None else float(torch.as_tensor(value).item())
    return low.graph.call_function(F.pad, (low.arg(n.args[0], n.name), tuple(pads)),
                                   {"mode": m.mode, "value": value})


# onnx2torch module class name -> how to write it in torch ops (the lowering, the node, the module)
_DIRECT = {
    "OnnxGlobalAveragePoolWithKnownInputShape": _global_average_pool,
    "OnnxGlobalAveragePool": _global_average_pool,
    "OnnxConcat": _concat,
    "OnnxCopyIdentity": _copy_identity,
    "OnnxResize": _resize,
    "OnnxPadStatic": _pad,
    "OnnxPadDynamic": _pad,
}


class _Inliner(fx.Tracer):
    """Traces an onnx2torch module's forward; torch.nn modules inside it stay calls."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return _is_torch_nn(m)


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, Any] = {}       # old node -> new node or folded constant
        self.values: dict[fx.Node, Any] = {}    # old node -> its value on the example inputs
        self.live: set[fx.Node] = set()         # old nodes that depend on a model input
        self._names: set[str] = set()

    def _attr(self, base: str, value: Any) -> str:
        name = base.replace(".", "_")
        i = 0
        while name in self._names:
            i += 1
            name = f"{base.replace('.', '_')}_{i}"
        self._names.add(name)
        if isinstance(value, torch.nn.Module):
            self.root.add_module(name, value)
        elif isinstance(value, torch.nn.Parameter):
            self.root.register_parameter(name, value)
        else:
            self.root.register_buffer(name, value)
        return name

    def arg(self, a: Any, owner: str) -> Any:
        """An argument of a live node in the new graph: a new node, or a folded constant (a tensor
        constant as a buffer of the new module)."""
        def one(x):
            if not isinstance(x, fx.Node):
                return x
            v = self.env[x]
            if isinstance(v, torch.Tensor):
                return self.graph.get_attr(self._attr(f"{owner}_const", v))
            return v
        return fx.node.map_aggregate(a, one)

    def run(self, inputs: tuple) -> fx.GraphModule:
        interp = fx.Interpreter(self.gm)
        placeholders = iter(inputs)
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.values[n] = next(placeholders)
                self.live.add(n)
                self.env[n] = self.graph.placeholder(n.name)
                continue
            if n.op == "output":
                self.graph.output(self.arg(n.args[0], "output"))
                break
            args = fx.node.map_arg(n.args, self.values.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, self.values.__getitem__)
            try:
                self.values[n] = getattr(interp, n.op)(n.target, args, kwargs)
            except Exception as e:  # noqa: BLE001 — name the ONNX node, not a frame inside onnx2torch
                raise TraceError(f"ONNX node {n.name!r} ({n.format_node()}) failed on the example input: "
                                 f"{type(e).__name__}: {e}") from e
            if not any(p in self.live for p in n.all_input_nodes):
                self.env[n] = self.values[n]           # a constant: folded
                continue
            self.live.add(n)
            self.env[n] = self._lower(n)
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxModel")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm

    def _lower(self, n: fx.Node) -> Any:
        if n.op in ("call_function", "call_method"):
            return self.graph.create_node(n.op, n.target, self.arg(n.args, n.name), self.arg(n.kwargs, n.name),
                                          name=n.name)
        if n.op != "call_module":
            raise UnsupportedOpError(f"ONNX node {n.name!r}: unexpected {n.op!r} depending on the input")
        m = self.gm.get_submodule(n.target)
        if _is_torch_nn(m):
            return self.graph.call_module(self._attr(n.target, m), self.arg(n.args, n.name),
                                          self.arg(n.kwargs, n.name))
        direct = _DIRECT.get(type(m).__name__)
        if direct is not None:
            return direct(self, n, m)
        return self._inline(n, m)

    def _inline(self, n: fx.Node, m: torch.nn.Module) -> Any:
        """``m``'s forward traced with the arguments that are constants baked in, copied into the graph."""
        params = list(inspect.signature(m.forward).parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise UnsupportedOpError(f"ONNX node {n.name!r}: {type(m).__name__} takes variable arguments; "
                                     "edgepart has no rewrite for it")
        bound = dict(zip([p.name for p in params], n.args)) | dict(n.kwargs)
        concrete, live_args = {}, {}
        for p in params:
            if p.name not in bound:
                concrete[p.name] = p.default
            elif isinstance(bound[p.name], fx.Node) and bound[p.name] in self.live:
                live_args[p.name] = bound[p.name]
            else:
                concrete[p.name] = fx.node.map_arg(bound[p.name], self.values.__getitem__)
        try:
            with warnings.catch_warnings():   # fx notes it cannot assert the concrete arguments: they are constants
                warnings.simplefilter("ignore")
                sub = fx.GraphModule(m, _Inliner().trace(m, concrete_args=concrete))
        except Exception as e:  # noqa: BLE001 — its forward depends on values fx cannot trace
            raise UnsupportedOpError(f"ONNX node {n.name!r}: edgepart cannot lower onnx2torch's {type(m).__name__} "
                                     f"({type(e).__name__}: {e})") from e
        val_map = {}
        for s in sub.graph.nodes:
            if s.op == "placeholder":
                if s.target in live_args:
                    val_map[s] = self.env[live_args[s.target]]
                else:            # a concrete argument fx keeps as a placeholder
                    v = concrete.get(s.target.lstrip("*"), s.args[0] if s.args else None)
                    val_map[s] = (self.graph.get_attr(self._attr(f"{n.name}_const", v)) if isinstance(v, torch.Tensor)
                                  else v)
            elif s.op in ("get_attr", "call_module"):
                s.target = self._attr(f"{n.name}.{s.target}", _resolve(sub, s.target))
        return self.graph.graph_copy(sub.graph, val_map)


def _resolve(module: torch.nn.Module, target: str) -> Any:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def lower(gm: fx.GraphModule, inputs: tuple) -> fx.GraphModule:
    """onnx2torch's graph as one of torch ops and torch.nn modules, its constants folded on ``inputs``."""
    with torch.no_grad():
        return _Lowering(gm).run(tuple(inputs))


def import_onnx(model: onnx.ModelProto | str | os.PathLike | bytes, inputs: tuple) -> tuple[fx.GraphModule, str]:
    """The ONNX ``model`` as an fx GraphModule of torch ops (eval mode) and its name, for inputs like ``inputs``."""
    proto, name = load(model)
    try:
        converted = _onnx2torch().convert(optimize(proto))
    except NotImplementedError as e:      # onnx2torch has no converter for an op (or this version of it)
        raise UnsupportedOpError(f"ONNX model {name!r}: {e}") from e
    gm = lower(converted, inputs)
    return gm.eval(), name
