"""int8 post-training static quantisation (torch.ao.quantization, FX graph mode) and its safetensors form.

:func:`quantize` fuses conv-BN-ReLU, observes activations on calibration images and converts to int8
(per-channel weights, the ``x86`` backend's default qconfig). The result is a ``GraphModule`` of
quantised ops (``quantized::conv2d_relu``, ``quantized::add_relu``, ...) that edgepart's compiler does
not know: a quantised version runs only whole, in-process (``VersionSet.model`` gives it; compiling it
raises ``UnsupportedOpError``).

safetensors has no quantised dtypes, so :func:`to_tensors` stores each quantised tensor as its int8
values plus its scales and zero points (``KEY``, ``KEY::scales``, ``KEY::zero_points``; the axis in the
metadata) and a packed Linear's (weight, bias) tuple as ``KEY::0``, ``KEY::1``; :func:`from_tensors`
rebuilds the state dict. :func:`rebuild` prepares and converts a fresh module
of the same spec (the graph is a function of the architecture alone) and loads those tensors into it.
"""
from __future__ import annotations

import json
from collections import OrderedDict
import warnings

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from edgepart.models.compact import from_spec

BACKEND = "x86"
_SCALES, _ZEROS = "::scales", "::zero_points"


def _convert(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, batch_size: int = 256):
    torch.backends.quantized.engine = BACKEND
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.ao.quantization's deprecation notices
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping(BACKEND), (example,))
        with torch.no_grad():
            for i in range(0, len(calibration), batch_size):
                prepared(calibration[i:i + batch_size])
        return convert_fx(prepared)


def quantize(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` (fp32, eval) quantised to int8 with activation ranges observed on ``calibration``."""
    return _convert(model, example, calibration)


def _put(tensors: dict, layout: dict, k: str, v) -> None:
    if isinstance(v, torch.dtype):                       # a packed Linear's weight dtype
        layout[k] = {"kind": "dtype", "dtype": str(v)}
    elif isinstance(v, tuple):                           # a packed Linear's (int8 weight, float bias)
        layout[k] = {"kind": "tuple", "items": len(v)}
        for i, item in enumerate(v):
            _put(tensors, layout, f"{k}::{i}", item)
    elif not isinstance(v, torch.Tensor):
        raise TypeError(f"{k}: cannot store a {type(v).__name__} from a quantised state dict")
    elif v is None:
        layout[k] = {"kind": "none"}
    elif v.is_quantized:
        tensors[k] = v.int_repr().contiguous()
        if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[k + _SCALES] = v.q_per_channel_scales().contiguous()
            tensors[k + _ZEROS] = v.q_per_channel_zero_points().contiguous()
            layout[k] = {"kind": "qtensor", "axis": v.q_per_channel_axis(), "dtype": str(v.dtype)}
        else:
            tensors[k + _SCALES] = torch.tensor([v.q_scale()], dtype=torch.float64)
            tensors[k + _ZEROS] = torch.tensor([v.q_zero_point()], dtype=torch.int64)
            layout[k] = {"kind": "qtensor", "axis": None, "dtype": str(v.dtype)}
    else:
        tensors[k] = v.detach().contiguous()
        layout[k] = {"kind": "tensor"}


def to_tensors(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The quantised state dict as plain tensors, and the metadata (``quantized``: a JSON layout of every
    entry — tensor, quantised tensor with its axis, dtype, tuple) that :func:`from_tensors` reads."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for k, v in qmodel.state_dict().items():
        _put(tensors, layout, k, v)
    return tensors, {"quantized": json.dumps(layout), "top": json.dumps(list(qmodel.state_dict()))}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _get(tensors: dict, layout: dict, k: str):
    entry = layout[k]
    kind = entry["kind"]
    if kind == "dtype":
        return _dtype(entry["dtype"])
    if kind == "tuple":
        return tuple(_get(tensors, layout, f"{k}::{i}") for i in range(entry["items"]))
    if kind == "none":
        return None
    if kind == "tensor":
        return tensors[k]
    scales, zeros = tensors[k + _SCALES], tensors[k + _ZEROS]
    if entry["axis"] is None:
        q = torch._make_per_tensor_quantized_tensor(tensors[k], float(scales[0]), int(zeros[0]))
    else:
        q = torch._make_per_channel_quantized_tensor(tensors[k], scales, zeros, entry["axis"])
    if q.dtype != _dtype(entry["dtype"]):
        raise ValueError(f"{k}: rebuilt as {q.dtype}, stored as {entry['dtype']}")
    return q


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The quantised state dict that :func:`to_tensors` stored."""
    layout = json.loads(metadata["quantized"])
    return {k: _get(tensors, layout, k) for k in json.loads(metadata["top"])}


def rebuild(spec: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
            example: torch.Tensor) -> torch.fx.GraphModule:
    """The int8 module of architecture ``spec`` with the stored quantised weights and activation ranges."""
    with torch.random.fork_rng(devices=[]):                 # the fresh module's init leaves the global RNG alone
        qmodel = _convert(from_spec(spec), example, example)    # structure only: every value is overwritten below
    state = OrderedDict(from_tensors(tensors, metadata))
    # quantised modules read their state-dict format version from _metadata (Linear's packed params
    # moved between versions); the freshly converted module has the same modules, so the same versions
    state._metadata = qmodel.state_dict()._metadata
    qmodel.load_state_dict(state, strict=True)
    return qmodel.eval()


def quantized_bytes(qmodel: nn.Module) -> int:
    """Bytes of the int8 model's state as stored: int8 weights, their scales and zero points, float biases."""
    return sum(t.numel() * t.element_size() for t in to_tensors(qmodel)[0].values())
