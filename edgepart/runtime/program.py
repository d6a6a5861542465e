"""One device's part of a bundle: its generated program, weights and actions.

The generated module defines ``stage_<i>(ctx, W, M)`` functions. ``ctx`` hands
each node the rows of its inputs the manifest says it needs (border padding
included) and stores the rows it computes; the row numbers come from the
manifest, so a new plan changes data, not code.
"""
from __future__ import annotations

import importlib
import os
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edgepart.errors import BundleError, InputShapeError
from edgepart.ir import output as output_tree
from edgepart.ir.dtypes import DTYPES, dtype_name
from edgepart.ir.hashing import verify_file
from edgepart.ir.manifest import BACKENDS, MANIFEST, EmitOutput, Manifest, NodeRows, Run, Send, TensorSpec
from edgepart.runtime.ort import OrtStage, stage_io
from edgepart.runtime.rowops import pad_rows


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A device's weights from its safetensors file, copied into this process's own memory.

    ``safetensors`` maps the file and returns tensors backed by the mapping (the page cache). They
    are copied because (1) on the emulated testbed VGG-16's classifier stage (277 MB of weights) ran
    26–39 ms of CPU per request from the mapping and 21–27 ms copied, the same stage in one process
    20–25 ms — the online calibration and the FCPM profile time weights in process memory; (2) a
    file changed on disk after loading must not change a running program: a private mapping's pages
    that were never written show such changes."""
    try:
        mapped = load_file(str(path))
    except Exception as e:  # noqa: BLE001 — safetensors raises several types
        raise BundleError(f"{path}: not a readable safetensors file: {e}") from e
    return {name: t.clone() for name, t in mapped.items()}


class RowStore:
    """Row intervals of tensors one device holds for one request."""

    def __init__(self, device: str = "?"):
        self.device = device
        self._chunks: dict[str, list[tuple[int, int, Any]]] = {}

    def put(self, tensor: str, a: int, b: int, value: Any) -> None:
        self._chunks.setdefault(tensor, []).append((a, b, value))

    def has(self, tensor: str) -> bool:
        return tensor in self._chunks

    def get(self, tensor: str, a: int, b: int) -> Any:
        """Rows [a, b) of ``tensor`` (a view when one chunk holds them all)."""
        chunks = self._chunks.get(tensor)
        if not chunks:
            raise KeyError(f"device {self.device!r} holds no rows of {tensor!r} (wanted [{a}, {b}))")
        for ca, cb, v in chunks:
            if ca <= a and b <= cb:
                if not isinstance(v, torch.Tensor) or v.dim() != 4 or (ca == a and cb == b):
                    return v         # (the whole chunk: no slice, which an exported ONNX graph would copy)
                return v[:, :, a - ca:b - ca]
        pieces, at = [], a
        for ca, cb, v in sorted(chunks, key=lambda c: (c[0], -c[1])):
            if ca <= at < cb:
                hi = min(b, cb)
                pieces.append(v[:, :, at - ca:hi - ca])
                at = hi
                if at >= b:
                    break
        if at < b:
            held = sorted((ca, cb) for ca, cb, _ in chunks)
            raise KeyError(f"device {self.device!r} holds rows {held} of {tensor!r}, not all of [{a}, {b})")
        return torch.cat(pieces, dim=2)

    def drop(self, tensor: str) -> None:
        self._chunks.pop(tensor, None)


class StageContext:
    """What a generated stage function sees: its rows of each node, via the store."""

    def __init__(self, table: dict[str, NodeRows], store: RowStore, tensors: dict[str, TensorSpec]):
        self.table = table
        self.store = store
        self.tensors = tensors

    def _get(self, producer: str, lo: int, hi: int):
        if hi <= lo:   # a window entirely in the border padding: no real rows at all
            meta = self.tensors[producer]
            shape = list(meta.shape)
            shape[2] = 0
            return torch.zeros(shape, dtype=DTYPES[meta.dtype])
        return self.store.get(producer, lo, hi)

    def rows(self, node: str, producer: str, fill: float | None = None):
        w = self.table[node].inputs[producer]
        x = self._get(producer, w.lo, w.hi)
        if w.top or w.bottom:
            if fill is None:
                raise RuntimeError(f"node {node!r}: window of {producer!r} needs {w.top}+{w.bottom} padding rows "
                                   "but the op has no padding value")
            x = pad_rows(x, w.top, w.bottom, fill)
        return x

    def window(self, node: str, producer: str):
        """The real rows of ``producer`` that ``node`` needs, without border padding."""
        w = self.table[node].inputs[producer]
        return self._get(producer, w.lo, w.hi)

    def nrows(self, node: str) -> int:
        a, b = self.table[node].out
        return b - a

    def border(self, node: str, producer: str) -> tuple[int, int]:
        w = self.table[node].inputs[producer]
        return w.top, w.bottom

    def span(self, node: str, producer: str) -> tuple[int, int]:
        w = self.table[node].inputs[producer]
        return w.lo, w.hi

    def out(self, node: str) -> tuple[int, int]:
        return self.table[node].out

    def put(self, node: str, value) -> None:
        a, b = self.table[node].out
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] != b - a:
            raise RuntimeError(f"node {node!r} produced {value.shape[2]} rows, expected rows [{a}, {b})")
        self.store.put(node, a, b, value)


# The libraries whose nn.Module classes a device program may rebuild from class path and constructor
# arguments (docs/compatibility.md): importing and constructing them is the code a worker runs besides
# the program itself.
REBUILD_LIBRARIES = ("torch.nn",)


def build_module(class_path: str, kwargs: dict) -> torch.nn.Module:
    """Rebuild a module edgepart has no kernel for from its class and constructor arguments; only classes
    of ``REBUILD_LIBRARIES`` are built."""
    module_name, _, cls_name = class_path.rpartition(".")
    if not any(module_name == lib or module_name.startswith(lib + ".") for lib in REBUILD_LIBRARIES):
        raise BundleError(f"refusing to build {class_path}: only classes of {', '.join(REBUILD_LIBRARIES)} are "
                          "rebuilt from a manifest")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)


class DeviceProgram:
    """A device's generated program loaded and ready: its stage code, weights and actions.

    Loading executes the program's source (see docs/security.md: a bundle is code) and rebuilds the
    torch.nn modules it names; it raises BundleError naming the device if any of that fails.

    ``backend`` (default: the one the compiler chose, ``spec.backend``): with ``"onnxruntime"`` each
    stage that has an ONNX graph in ``onnx`` (stage -> model bytes) runs in ONNX Runtime, the others
    run the Python program; with ``"torch"`` every stage runs the Python program."""

    def __init__(self, manifest: Manifest, device: str, source: str, weights: dict[str, torch.Tensor],
                 onnx: dict[int, bytes] | None = None, backend: str | None = None):
        self.manifest = manifest
        self.device = device
        self.spec = manifest.device(device)
        self.backend = backend or self.spec.backend
        if self.backend not in BACKENDS:
            raise BundleError(f"device {device!r}: unknown backend {self.backend!r} (one of {list(BACKENDS)})")
        self.actions = self.spec.actions
        self.weights = weights
        self.module = types.ModuleType(f"edgepart_device_{device}")
        self.module.__file__ = f"<bundle:{device}.py>"
        try:
            exec(compile(source, self.module.__file__, "exec"), self.module.__dict__)
            self.modules: dict[str, torch.nn.Module] = {}
            for name, (class_path, kwargs, keys) in getattr(self.module, "MODULES", {}).items():
                m = build_module(class_path, kwargs)
                m.load_state_dict({k.split(name + ".", 1)[1]: weights[k] for k in keys}, strict=True)
                self.modules[name] = m.eval()
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 — any failure to load is the bundle's, named by device
            raise BundleError(f"device {device!r}: its program does not load: {type(e).__name__}: {e}") from e
        self.nodes = getattr(self.module, "NODES", {})
        missing = sorted({key for key in self.spec.constants.values() if key not in weights})
        if missing:
            raise BundleError(f"device {device!r}: constants {missing} are not in its weights file")
        self.constants = {name: weights[key] for name, key in self.spec.constants.items()}
        self.free_after = free_after(self.actions, self.spec.rows, manifest.output)
        self.ort_stages: dict[int, OrtStage] = {}
        if self.backend == "onnxruntime":
            if self.spec.rows and not onnx:
                raise BundleError(f"device {device!r}: backend onnxruntime, but the bundle has no ONNX graphs for "
                                  "it; compile with the device's backend set to onnxruntime (or --onnx)")
            for stage, model in (onnx or {}).items():
                try:
                    self.ort_stages[stage] = OrtStage(model, stage_io(self.spec, stage, manifest.output))
                except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types
                    raise BundleError(f"device {device!r}, stage {stage}: its ONNX graph does not load: {e}") from e

    @classmethod
    def from_bundle(cls, bundle_dir, device: str, manifest: Manifest | None = None,
                    backend: str | None = None) -> "DeviceProgram":
        bundle_dir = Path(bundle_dir)
        if manifest is None:
            manifest = read_manifest(bundle_dir)
        spec = manifest.device(device)
        for rel in spec.files:
            verify_file(bundle_dir, rel, manifest.files)
        source = (bundle_dir / spec.program).read_text()
        weights = load_weights(bundle_dir / spec.weights) if spec.weights else {}
        onnx = {stage: (bundle_dir / rel).read_bytes() for stage, rel in spec.onnx.items()}
        return cls(manifest, device, source, weights, onnx, backend)

    def new_store(self) -> RowStore:
        store = RowStore(self.device)
        for name, value in self.constants.items():
            store.put(name, 0, value.shape[2] if value.dim() == 4 else 1, value)
        return store

    def run_stage(self, stage: int, store: RowStore) -> None:
        """Compute this device's rows of ``stage`` from ``store`` into it, on the program's backend."""
        ort_stage = self.ort_stages.get(stage)
        if ort_stage is None:
            self.run_torch_stage(stage, store)
            return
        ort_stage.run(store)
        for node in self.spec.rows[stage]:
            for t in self.free_after.get((stage, node), ()):
                store.drop(t)

    def run_torch_stage(self, stage: int, store: RowStore) -> None:
        """Run ``stage``'s generated Python functions node by node (the ONNX exporter traces this)."""
        table = self.spec.rows.get(stage)
        if table is None:
            raise BundleError(f"device {self.device!r} has no part in stage {stage}")
        ctx = StageContext(table, store, self.manifest.tensors)
        with torch.no_grad():
            for node in table:               # the manifest lists a stage's nodes in execution order
                fn = self.nodes.get(node)
                if fn is None:
                    raise BundleError(f"device {self.device!r} has no code for node {node!r} (stage {stage}); "
                                      "this plan needs a new deploy")
                fn(ctx, self.weights, self.modules)
                for t in self.free_after.get((stage, node), ()):
                    store.drop(t)            # its last reader on this device: let the allocator reuse it

    def piece_spec(self, tensor: str, a: int, b: int) -> tuple[torch.dtype, tuple[int, ...]]:
        meta = self.manifest.tensors.get(tensor)
        if meta is None or meta.shape is None:
            raise KeyError(f"unknown tensor {tensor!r}")
        return DTYPES[meta.dtype], meta.piece_shape(a, b)

    def make_output(self, store: RowStore):
        tensors = self.manifest.tensors

        def leaf(t: str):
            return store.get(t, 0, tensors[t].rows).contiguous() if t in tensors else store.get(t, 0, 1)
        return output_tree.walk(self.manifest.output, leaf)


def free_after(actions, rows_by_stage: dict[int, dict[str, NodeRows]], output: dict) -> dict[tuple[int, str], list[str]]:
    """(stage, node) -> the tensors whose last reader on this device is that node.

    A request's store would otherwise hold every intermediate tensor until the request ends, so
    every layer would write fresh memory (page faults, cold caches): memory-bound layers (batch
    norm, activations, depthwise convolutions on large maps) ran 2-4x slower than in the eager
    model. Tensors a later ``send`` or the output reads are kept."""
    last: dict[str, tuple] = {}
    for act in actions:
        if isinstance(act, Run):
            for node, entry in rows_by_stage.get(act.stage, {}).items():
                for producer in entry.inputs:
                    last[producer] = (act.stage, node)
        elif isinstance(act, Send):
            last[act.tensor] = ("send",)
        elif isinstance(act, EmitOutput):
            for t in output_tree.leaves(output):
                last[t] = ("output",)
    out: dict[tuple[int, str], list[str]] = {}
    for t, where in last.items():
        if len(where) == 2:
            out.setdefault(where, []).append(t)
    return out


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The typed manifest of the bundle in ``directory`` (BundleError naming the file if it is not one)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json here; is {directory} a bundle directory (edgepart compile --out)?")
    return Manifest.from_json(path.read_bytes(), str(path))


def check_inputs(manifest: Manifest, inputs: tuple) -> tuple:
    """``inputs`` as the bundle takes them (one tuple or list of them is unpacked), each checked
    against the manifest's inputs; InputShapeError naming the input and what to do otherwise."""
    specs = manifest.inputs
    if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)) and len(specs) > 1:
        inputs = tuple(inputs[0])
    if len(inputs) != len(specs):
        raise InputShapeError(f"the bundle takes {len(specs)} input(s) "
                              f"({', '.join(s.name for s in specs)}), got {len(inputs)}")
    for x, s in zip(inputs, specs):
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"input {s.name!r} must be a torch.Tensor of shape {s.shape}, "
                                  f"got {type(x).__name__}")
        if tuple(x.shape) != s.shape:
            raise InputShapeError(f"input {s.name!r} has shape {tuple(x.shape)} but the bundle was compiled for "
                                  f"shape {s.shape}; resize the input or compile again for this shape")
        if dtype_name(x.dtype) != s.dtype:
            raise InputShapeError(f"input {s.name!r} has dtype {dtype_name(x.dtype)} but the bundle expects "
                                  f"{s.dtype}")
    return tuple(inputs)
