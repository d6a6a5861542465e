"""Pass: recognise what each node computes.

node.meta["op"] = OpSpec: the operation in a normalised form that the row-map,
FLOPs and codegen passes all read, so each op is parsed from its module or
arguments exactly once. An op edgepart does not know gets kind "generic": it
still compiles, runs whole on one device, and is named in the compile report.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from edgepart.passes.graph import COMPUTE_OPS
from edgepart.passes.pools import COMBINE

# Row-local elementwise functions: output row i depends only on row i of each input
# (inputs with a single row broadcast and are needed whole).
POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.sigmoid,
    torch.tanh, torch.clamp, torch.exp, torch.abs, torch.maximum, torch.minimum,
    F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.sigmoid, F.silu, F.gelu, F.hardswish,
    F.hardsigmoid, F.elu, F.mish, F.tanh, F.softplus, F.dropout, F.dropout2d,
}
POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "add", "sub", "mul", "div", "clamp", "neg", "exp", "abs",
    "contiguous", "relu_", "sigmoid_", "add_", "sub_", "mul_", "div_", "clamp_",
}
# In-place variants are emitted out of place: generated code reads windows that are
# views of tensors other stages still need.
INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                     operator.imul: operator.mul, operator.itruediv: operator.truediv}

ACTIVATION_MODULES = {
    nn.ReLU: "F.relu({x})",
    nn.ReLU6: "F.relu6({x})",
    nn.Sigmoid: "torch.sigmoid({x})",
    nn.Tanh: "torch.tanh({x})",
    nn.SiLU: "F.silu({x})",
    nn.Hardswish: "F.hardswish({x})",
    nn.Hardsigmoid: "F.hardsigmoid({x})",
    nn.Mish: "F.mish({x})",
}
# Functions of other libraries that are the identity of their first argument when the named argument
# (at the given position, with the given default) is False — stochastic depth / drop path in eval mode.
# Keyed by module + qualified name, so nothing is imported to recognise them; written as the identity.
EVAL_IDENTITY_FUNCTIONS: dict[str, tuple[str, int, bool]] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": ("training", 3, True),
    "timm.layers.drop.drop_path": ("training", 2, False),
    "timm.models.layers.drop.drop_path": ("training", 2, False),
}
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
INTERP_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
INTERP_MODES = {"nearest", "nearest-exact", "bilinear", "bicubic"}


@dataclass
class OpSpec:
    kind: str                      # conv2d | max_pool2d | avg_pool2d | pad | batch_norm | activation |
                                   # identity | interpolate | pointwise | row_mean | linear | generic
    params: dict[str, Any] = field(default_factory=dict)
    input: fx.Node | None = None   # the input whose rows the op maps geometrically
    row_local: bool = False
    why_whole: str = ""            # for a non-row-local op: why it must run on whole tensors
    label: str = ""                # human-readable description for reports and comments


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def _submodule(gm: fx.GraphModule, target: str) -> nn.Module:
    return gm.get_submodule(target)


def _conv_padding(padding, kernel, dilation) -> tuple[int, int, int, int]:
    (kh, kw), (dh, dw) = kernel, dilation
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        th, tw = dh * (kh - 1), dw * (kw - 1)   # "same": PyTorch puts the odd extra row/column at the end
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def _functional_conv_spec(n: fx.Node, a: dict) -> OpSpec:
    weight, bias = a["weight"], a.get("bias")
    wshape = weight.meta.get("shape") if isinstance(weight, fx.Node) else None
    if wshape is None or len(wshape) != 4 or (bias is not None and not isinstance(bias, fx.Node)):
        return OpSpec("generic_function", {}, None, False, "conv2d with unusual arguments", "conv2d")
    kernel, stride, dilation = (wshape[2], wshape[3]), _pair(a.get("stride", 1)), _pair(a.get("dilation", 1))
    groups = int(a.get("groups", 1))
    params = dict(weight=None, bias=None, weight_node=weight, bias_node=bias, kernel=kernel, stride=stride,
                  dilation=dilation, groups=groups, pad=_conv_padding(a.get("padding", 0), kernel, dilation),
                  in_channels=wshape[1] * groups, out_channels=wshape[0])
    return OpSpec("conv2d", params, a["input"], True, label=f"conv2d(kernel={kernel}, stride={stride})")


def _conv_spec(n: fx.Node, m: nn.Conv2d) -> OpSpec:
    params = dict(weight=f"{n.target}.weight", bias=f"{n.target}.bias" if m.bias is not None else None,
                  kernel=tuple(m.kernel_size), stride=tuple(m.stride), dilation=tuple(m.dilation), groups=m.groups,
                  pad=_conv_padding(m.padding, m.kernel_size, m.dilation), in_channels=m.in_channels,
                  out_channels=m.out_channels)
    if m.padding_mode != "zeros":
        return OpSpec("generic", {"module": n.target}, n.args[0], False,
                      f"Conv2d with padding_mode={m.padding_mode!r} is not row-sliced", repr(m))
    return OpSpec("conv2d", params, n.args[0], True, label=repr(m))


def _pool_params(kernel, stride, padding, dilation=1):
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, ()) else kernel
    return kernel, stride, _pair(padding), _pair(dilation)


def _interp_spec(x: fx.Node, size, scale_factor, mode, align_corners, recompute) -> OpSpec:
    spec = dict(size=list(size) if isinstance(size, (tuple, list)) else size,
                scale_factor=list(scale_factor) if isinstance(scale_factor, (tuple, list)) else scale_factor,
                mode=mode, align_corners=align_corners, recompute_scale_factor=recompute)
    label = f"interpolate({', '.join(f'{k}={v!r}' for k, v in spec.items() if v is not None)})"
    if mode not in INTERP_MODES:
        return OpSpec("generic_interpolate", spec, x, False, f"interpolation mode {mode!r} is not row-sliced", label)
    return OpSpec("interpolate", spec, x, True, label=label)


CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _bind(gm: fx.GraphModule, n: fx.Node, target) -> dict:
    """Arguments of a functional call by name ({} when they cannot be matched)."""
    if target is F.conv2d:   # a builtin with two schemas: fx cannot normalise it
        if len(n.args) > len(CONV2D_ARGS):
            return {}
        return {**dict(zip(CONV2D_ARGS, n.args)), **n.kwargs}
    try:
        kw = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 — unmatched schemas: treat the call as generic
        return {}
    return dict(kw.kwargs) if kw is not None else {}


def _qualified(target) -> str:
    return f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', repr(target))}"


def _eval_identity(n: fx.Node, target) -> OpSpec | None:
    """An identity OpSpec when ``target`` is in EVAL_IDENTITY_FUNCTIONS and its switch is literally False."""
    entry = EVAL_IDENTITY_FUNCTIONS.get(_qualified(target))
    if entry is None or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    arg, position, default = entry
    switch = n.kwargs.get(arg, n.args[position] if len(n.args) > position else default)
    if switch is not False:
        return None
    return OpSpec("identity", {}, n.args[0], True, label=f"{target.__name__} (the identity with {arg}=False)")


def _is_row_mean(n: fx.Node) -> bool:
    """``x.mean(3, keepdim=True)`` of a 4-D x (passes.pools writes global pools so): row i needs row i."""
    x = n.args[0] if n.args else None
    shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return (shape is not None and len(shape) == 4 and dim in (3, -1) and len(n.args) <= 2
            and n.kwargs.get("keepdim", False) is True and set(n.kwargs) <= {"dim", "keepdim"})


def recognise(gm: fx.GraphModule, n: fx.Node) -> OpSpec:
    if n.op == "call_module":
        m = _submodule(gm, n.target)
        t = type(m)
        if t is nn.Conv2d:
            return _conv_spec(n, m)
        if t is nn.MaxPool2d and not m.return_indices:
            k, s, p, d = _pool_params(m.kernel_size, m.stride, m.padding, m.dilation)
            return OpSpec("max_pool2d", dict(kernel=k, stride=s, padding=p, dilation=d, ceil_mode=m.ceil_mode),
                          n.args[0], True, label=repr(m))
        if t is nn.AvgPool2d:
            k, s, p, _ = _pool_params(m.kernel_size, m.stride, m.padding)
            return OpSpec("avg_pool2d", dict(kernel=k, stride=s, padding=p, ceil_mode=m.ceil_mode,
                                             count_include_pad=m.count_include_pad,
                                             divisor_override=m.divisor_override), n.args[0], True, label=repr(m))
        if t in (nn.ZeroPad2d, nn.ConstantPad2d):
            return OpSpec("pad", dict(pad=tuple(int(v) for v in m.padding), value=float(m.value)),
                          n.args[0], True, label=repr(m))
        if t is nn.BatchNorm2d and not m.training and m.running_mean is not None:
            return OpSpec("batch_norm", dict(mean=f"{n.target}.running_mean", var=f"{n.target}.running_var",
                                             weight=f"{n.target}.weight" if m.affine else None,
                                             bias=f"{n.target}.bias" if m.affine else None, eps=m.eps),
                          n.args[0], True, label=repr(m))
        if t in ACTIVATION_MODULES:
            return OpSpec("activation", dict(template=ACTIVATION_MODULES[t]), n.args[0], True, label=repr(m))
        if t is nn.LeakyReLU:
            return OpSpec("activation", dict(template=f"F.leaky_relu({{x}}, {m.negative_slope!r})"),
                          n.args[0], True, label=repr(m))
        if t is nn.ELU:
            return OpSpec("activation", dict(template=f"F.elu({{x}}, {m.alpha!r})"), n.args[0], True, label=repr(m))
        if t is nn.GELU:
            return OpSpec("activation", dict(template=f"F.gelu({{x}}, approximate={m.approximate!r})"),
                          n.args[0], True, label=repr(m))
        if t is nn.Hardtanh:
            return OpSpec("activation", dict(template=f"F.hardtanh({{x}}, {m.min_val!r}, {m.max_val!r})"),
                          n.args[0], True, label=repr(m))
        if isinstance(m, IDENTITY_MODULES):
            return OpSpec("identity", {}, n.args[0], True, label=repr(m))
        if t in INTERP_MODULES:
            mode = m.mode
            align = m.align_corners
            if t is nn.UpsamplingBilinear2d:
                align = True
            return _interp_spec(n.args[0], m.size, m.scale_factor, mode, align,
                                getattr(m, "recompute_scale_factor", None))
        if t is nn.Linear:
            return OpSpec("linear", dict(weight=f"{n.target}.weight",
                                         bias=f"{n.target}.bias" if m.bias is not None else None,
                                         in_features=m.in_features, out_features=m.out_features),
                          n.args[0], False, "Linear mixes all rows", repr(m))
        if t is nn.Flatten:
            return OpSpec("flatten", dict(start_dim=m.start_dim, end_dim=m.end_dim), n.args[0], False,
                          "Flatten merges rows", repr(m))
        if t is nn.AdaptiveAvgPool2d:
            return OpSpec("adaptive_avg_pool2d", dict(output_size=m.output_size), n.args[0], False,
                          "adaptive pooling windows depend on the whole height", repr(m))
        return OpSpec("generic", {"module": n.target}, n.args[0] if n.args else None, False,
                      f"module type {t.__module__}.{t.__qualname__} is not known to edgepart: it runs whole, "
                      "rebuilt on the device from its class, constructor arguments and weights", repr(m))

    if n.op == "call_function":
        target = INPLACE_FUNCTIONS.get(n.target, n.target)
        if target in (F.max_pool2d, F.avg_pool2d, F.interpolate, F.pad, F.conv2d):
            a = _bind(gm, n, target)
            if target is F.conv2d and a:
                return _functional_conv_spec(n, a)
            if target is F.max_pool2d and a and not a.get("return_indices"):
                k, s, p, d = _pool_params(a["kernel_size"], a.get("stride"), a.get("padding", 0), a.get("dilation", 1))
                return OpSpec("max_pool2d", dict(kernel=k, stride=s, padding=p, dilation=d,
                                                 ceil_mode=bool(a.get("ceil_mode", False))),
                              a["input"], True, label=f"max_pool2d(kernel={k}, stride={s}, padding={p})")
            if target is F.avg_pool2d and a:
                k, s, p, _ = _pool_params(a["kernel_size"], a.get("stride"), a.get("padding", 0))
                return OpSpec("avg_pool2d", dict(kernel=k, stride=s, padding=p,
                                                 ceil_mode=bool(a.get("ceil_mode", False)),
                                                 count_include_pad=bool(a.get("count_include_pad", True)),
                                                 divisor_override=a.get("divisor_override")),
                              a["input"], True, label=f"avg_pool2d(kernel={k}, stride={s}, padding={p})")
            if target is F.interpolate and a and not a.get("antialias"):
                return _interp_spec(a["input"], a.get("size"), a.get("scale_factor"), a.get("mode", "nearest"),
                                    a.get("align_corners"), a.get("recompute_scale_factor"))
            if target is F.pad and a and a.get("mode", "constant") == "constant" and len(a["pad"]) in (2, 4):
                pad = tuple(int(v) for v in a["pad"]) + (0, 0) * (2 - len(a["pad"]) // 2)
                return OpSpec("pad", dict(pad=pad, value=float(a.get("value") or 0.0)), a["input"], True,
                              label=f"pad({pad})")
        if target is torch.cat:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            shape = n.meta.get("shape")
            if shape is not None and len(shape) == 4 and dim in (1, -3):
                return OpSpec("pointwise", {}, None, True, label="cat(dim=1)")
            return OpSpec("generic_function", {}, None, False, f"cat along dim {dim} is not row-local", "cat")
        if target in POINTWISE_FUNCTIONS:
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else False) \
                if target in (F.dropout, F.dropout2d) else False
            if training is True:
                return OpSpec("generic_function", {}, None, False, "dropout in training mode", "dropout")
            return OpSpec("pointwise", {}, None, True, label=getattr(target, "__name__", str(target)))
        identity = _eval_identity(n, target)
        if identity is not None:
            return identity
        if target is torch.flatten:
            return OpSpec("generic_function", {}, None, False, "flatten merges rows", "flatten")
        if target is F.adaptive_avg_pool2d:
            return OpSpec("generic_function", {}, None, False,
                          "adaptive pooling windows depend on the whole height", "adaptive_avg_pool2d")
        name = getattr(target, "__name__", repr(target))
        return OpSpec("generic_function", {}, None, False,
                      f"function {_qualified(target)} is not known to be row-local", name)

    if n.op == "call_method":
        if n.target == "mean" and _is_row_mean(n):
            return OpSpec("row_mean", {}, n.args[0], True, label="mean over each row (a global pool's first half)")
        if n.meta.get(COMBINE):
            return OpSpec("generic_method", {}, None, False, "adaptive pooling windows depend on the whole height; "
                          "the row means before it stay split", "mean over the rows (a global pool's second half)")
        if n.target in POINTWISE_METHODS:
            return OpSpec("pointwise", {}, None, True, label=f".{n.target}()")
        known = {"view", "reshape", "flatten", "mean", "sum", "permute", "transpose", "squeeze", "unsqueeze", "size"}
        why = f"method .{n.target}() " + ("mixes rows" if n.target in known else "is not known to be row-local")
        return OpSpec("generic_method", {}, None, False, why, f".{n.target}()")
    raise AssertionError(n.op)


def annotate_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Set node.meta['op'] for every compute node."""
    for n in gm.graph.nodes:
        if n.op in COMPUTE_OPS:
            n.meta["op"] = recognise(gm, n)
    return gm
