"""Export each device's stages as static-shape ONNX graphs, checked against the Python program.

A stage is exported by tracing the loaded :class:`DeviceProgram` itself: a small module feeds the
stage's input windows (:func:`edgepart.runtime.ort.stage_io`) into a row store, runs the stage's
generated node functions and returns the rows read after the stage. The row numbers, the explicit
border padding and the halo rows are Python constants of that code, so the trace is a graph with
static shapes for this device's slice. torch's TorchScript exporter (``dynamo=False``) is used: the
dynamo exporter needs onnxscript and re-traces through ``ctx``'s dict lookups without gain.

Each exported stage is run in ONNX Runtime on the stage inputs of a reference run of the whole
bundle and compared with the Python program's outputs (:data:`RTOL`); a stage that does not export
(a tuple-valued input or output, an op the exporter does not know) or does not match keeps the
Python program, with the reason, and the compile report lists it. Never an error.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.onnx import symbolic_helper

from edgepart.ir.manifest import Manifest, Recv, Run, Send, TakeInput
from edgepart.runtime.interpreter import advance
from edgepart.runtime.ort import StageIO, new_session, stage_io
from edgepart.runtime.program import DeviceProgram, RowStore

OPSET = 17
RTOL = 1e-4     # relative to the largest magnitude of the output, like the exactness tests


@dataclass
class DeviceExport:
    """One device's exported stages (stage -> ONNX model bytes) and the stages left to torch (stage -> why)."""
    graphs: dict[int, bytes] = field(default_factory=dict)
    torch_stages: dict[int, str] = field(default_factory=dict)


class _Stage(torch.nn.Module):
    """A device's stage as a module of its input windows, for the exporter to trace."""

    def __init__(self, program: DeviceProgram, stage: int, io_: StageIO):
        super().__init__()
        self.program, self.stage, self.io = program, stage, io_

    def forward(self, *windows: torch.Tensor):
        store = self.program.new_store()
        for (producer, lo, hi), x in zip(self.io.inputs, windows):
            store.put(producer, lo, hi, x)
        self.program.run_torch_stage(self.stage, store)
        return tuple(store.get(node, a, b) for node, a, b in self.io.outputs)


def _constant_pad(g, x, pad, mode, value):
    """``aten::pad`` with constant pads as one ONNX Pad whose pads are a constant.

    torch's own symbolic computes the pads with a subgraph (ConstantOfShape, Concat, Reshape, ...)
    that ONNX shape inference cannot see through: every shape after the first border padding is
    unknown, and ops whose export needs the input's size (adaptive pooling) then fail to export."""
    pads = symbolic_helper._parse_arg(pad, "is")
    if symbolic_helper._parse_arg(mode, "s") != "constant":
        raise ValueError("only constant padding is exported with static pads")
    rank = symbolic_helper._get_tensor_rank(x) or 4
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):          # torch lists (begin, end) from the last dimension back
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    fill = 0.0 if symbolic_helper._is_none(value) else symbolic_helper._parse_arg(value, "f")
    return g.op("Pad", x, g.op("Constant", value_t=torch.tensor(begin + end, dtype=torch.int64)),
                g.op("Constant", value_t=torch.tensor(fill, dtype=torch.float32)), mode_s="constant")


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages the inputs of adaptive pooling's window i, [⌊i·n/m⌋, ⌈(i+1)·n/m⌉)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _adaptive_avg_pool2d(g, x, output_size):
    """``aten::adaptive_avg_pool2d`` of a static-shape input to any output size.

    torch's own symbolic exports only an output that divides the input (one AveragePool); VGG-16's
    head pools 5×5 to 7×7 at 160 px, and its stage then stayed on torch. Windows of unequal or
    overlapping size are a row and a column averaging matrix: ``A_h · x · A_wᵀ`` (two MatMuls with
    constant matrices), the same sums as torch's to float rounding."""
    sizes = symbolic_helper._get_tensor_sizes(x)
    out = symbolic_helper._parse_arg(output_size, "is")
    if not sizes or len(sizes) != 4 or any(not isinstance(v, int) for v in sizes[2:]):
        raise ValueError("adaptive_avg_pool2d is exported for inputs of static height and width only")
    (h, w), (oh, ow) = sizes[2:], [sizes[2 + i] if v is None else v for i, v in enumerate(out)]
    if h % oh == 0 and w % ow == 0:
        return g.op("AveragePool", x, kernel_shape_i=[h // oh, w // ow], strides_i=[h // oh, w // ow])
    rows = g.op("MatMul", g.op("Constant", value_t=_pool_matrix(h, oh)), x)
    return g.op("MatMul", rows, g.op("Constant", value_t=_pool_matrix(w, ow).t().contiguous()))


_SYMBOLICS = {"aten::pad": _constant_pad, "aten::adaptive_avg_pool2d": _adaptive_avg_pool2d}


@contextlib.contextmanager
def _static_pads():
    """:data:`_SYMBOLICS` (constant pads, adaptive pooling of static shapes) as the exporter's for the
    duration of one export only."""
    for name, fn in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def export_stage(program: DeviceProgram, stage: int, windows: list[torch.Tensor]) -> bytes:
    """The ONNX model of ``stage`` on ``program``'s device, traced with the example ``windows``."""
    io_ = stage_io(program.spec, stage, program.manifest.output)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _static_pads():
        warnings.simplefilter("ignore")      # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_Stage(program, stage, io_).eval(), tuple(windows), buf, dynamo=False, opset_version=OPSET,
                          input_names=[f"i{k}" for k in range(len(io_.inputs))],
                          output_names=[f"o{k}" for k in range(len(io_.outputs))], do_constant_folding=True)
    return buf.getvalue()


def _mismatch(got: Any, want: Any) -> str | None:
    """Why ``got`` (from ONNX Runtime) is not ``want`` (from the Python program), or None."""
    if not isinstance(want, torch.Tensor):
        return f"a {type(want).__name__} output"
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    if want.dtype.is_floating_point:
        scale = want.abs().max().item() if want.numel() else 0.0
        err = (got.to(want.dtype) - want).abs().max().item() if want.numel() else 0.0
        if not err <= RTOL * max(scale, 1e-30):
            return f"differs by {err:.3g} (largest magnitude {scale:.3g})"
    elif not torch.equal(got.to(want.dtype), want):
        return "differs"
    return None


def _try_stage(program: DeviceProgram, stage: int, store: RowStore, run) -> tuple[bytes | None, str]:
    """Export ``stage`` given the ``store`` before it runs, then ``run()`` it in torch and compare."""
    io_ = stage_io(program.spec, stage, program.manifest.output)
    tensors = program.manifest.tensors
    reason = ""
    for node, _, _ in io_.outputs:
        if tensors.get(node) is not None and tensors[node].shape is None:
            reason = f"node {node!r} is tuple-valued"
    for producer, _, _ in io_.inputs:
        if tensors.get(producer) is not None and tensors[producer].shape is None:
            reason = f"input {producer!r} is tuple-valued"
    if not io_.outputs:
        reason = "the stage has no outputs read after it"
    model, windows = None, []
    if not reason:
        try:
            windows = [store.get(p, lo, hi) for p, lo, hi in io_.inputs]
            if any(not isinstance(w, torch.Tensor) for w in windows):
                raise TypeError("an input window is not a tensor")
            windows = [w.contiguous().clone() for w in windows]
            model = export_stage(program, stage, windows)
        except Exception as e:  # noqa: BLE001 — the exporter raises many types; the stage stays on torch
            reason = f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    run()
    if model is None:
        return None, reason
    try:
        session = new_session(model)
        names = {i.name for i in session.get_inputs()}
        feeds = {f"i{k}": w.numpy() for k, w in enumerate(windows) if f"i{k}" in names}
        got = session.run([f"o{k}" for k in range(len(io_.outputs))], feeds)
    except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types
        return None, f"onnxruntime cannot run it: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for (node, a, b), value in zip(io_.outputs, got):
        why = _mismatch(value, store.get(node, a, b))
        if why:
            return None, f"node {node!r}: onnxruntime's output {why}"
    return model, ""


class _ExportHost:
    """An interpreter host (edgepart.runtime.interpreter.Host) that runs the whole bundle in this
    process like the reference executor, exporting each stage of the chosen devices as it runs."""

    def __init__(self, programs: dict[str, DeviceProgram], stores: dict[str, RowStore],
                 inputs: dict[str, torch.Tensor], devices: set[str]):
        self.programs, self.stores, self.inputs, self.devices = programs, stores, inputs, devices
        self.pieces: dict[tuple, torch.Tensor] = {}
        self.device = ""
        self.exports = {d: DeviceExport() for d in devices}

    def take_input(self, act: TakeInput) -> torch.Tensor:
        return self.inputs[act.tensor]

    def take_piece(self, act: Recv) -> torch.Tensor | None:
        return self.pieces.pop((act.src, self.device, act.tensor, act.a, act.b), None)

    def run_stage(self, act: Run, run) -> None:
        if self.device not in self.devices:
            run()
            return
        model, why = _try_stage(self.programs[self.device], act.stage, self.stores[self.device], run)
        if model is None:
            self.exports[self.device].torch_stages[act.stage] = why
        else:
            self.exports[self.device].graphs[act.stage] = model

    def send_piece(self, act: Send, piece: torch.Tensor) -> None:
        self.pieces[(self.device, act.dst, act.tensor, act.a, act.b)] = piece.clone()

    def emit_output(self, value: Any) -> None:
        pass


def example_inputs(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Inputs of the bundle's shapes and dtypes to export and check with (seeded: a compile is reproducible)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for s in manifest.inputs:
        dtype = getattr(torch, s.dtype)
        out[s.name] = (torch.randn(s.shape, generator=g).to(dtype) if dtype.is_floating_point
                       else torch.zeros(s.shape, dtype=dtype))
    return out


def export_devices(programs: dict[str, DeviceProgram], devices: set[str],
                   inputs: dict[str, torch.Tensor]) -> dict[str, DeviceExport]:
    """Per device in ``devices``: its stages exported and checked on one reference run of ``inputs``."""
    stores = {d: p.new_store() for d, p in programs.items()}
    host = _ExportHost(programs, stores, inputs, devices)
    pcs = {d: 0 for d in programs}
    while not all(pcs[d] == len(p.actions) for d, p in programs.items()):
        progressed = False
        for dev, prog in programs.items():
            host.device = dev
            pc, _ = advance(prog, stores[dev], pcs[dev], host)
            progressed |= pc != pcs[dev]
            pcs[dev] = pc
        if not progressed:
            raise RuntimeError("the bundle's actions deadlock")   # run_reference refused it before us
    return host.exports

