"""One device's part of a bundle: its generated program, weights and actions.

The generated module defines ``stage_<i>(ctx, W, M)`` functions. ``ctx`` hands
each node the rows of its inputs the manifest says it needs (border padding
included) and stores the rows it computes; the row numbers come from the
manifest, so a new plan changes data, not code.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edgepart.errors import BundleError
from edgepart.runtime.rowops import pad_rows

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
          "int8": torch.int8, "bool": torch.bool}


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
                if not isinstance(v, torch.Tensor) or v.dim() != 4:
                    return v
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

    def __init__(self, table: dict[str, dict], store: RowStore, tensors: dict[str, dict]):
        self.table = table
        self.store = store
        self.tensors = tensors

    def _get(self, producer: str, lo: int, hi: int):
        if hi <= lo:   # a window entirely in the border padding: no real rows at all
            meta = self.tensors[producer]
            shape = list(meta["shape"])
            shape[2] = 0
            return torch.zeros(shape, dtype=DTYPES[meta["dtype"]])
        return self.store.get(producer, lo, hi)

    def rows(self, node: str, producer: str, fill: float | None = None):
        lo, hi, top, bottom = self.table[node]["in"][producer]
        x = self._get(producer, lo, hi)
        if top or bottom:
            if fill is None:
                raise RuntimeError(f"node {node!r}: window of {producer!r} needs {top}+{bottom} padding rows "
                                   "but the op has no padding value")
            x = pad_rows(x, top, bottom, fill)
        return x

    def window(self, node: str, producer: str):
        """The real rows of ``producer`` that ``node`` needs, without border padding."""
        lo, hi, _, _ = self.table[node]["in"][producer]
        return self._get(producer, lo, hi)

    def nrows(self, node: str) -> int:
        a, b = self.table[node]["out"]
        return b - a

    def border(self, node: str, producer: str) -> tuple[int, int]:
        _, _, top, bottom = self.table[node]["in"][producer]
        return top, bottom

    def span(self, node: str, producer: str) -> tuple[int, int]:
        lo, hi, _, _ = self.table[node]["in"][producer]
        return lo, hi

    def out(self, node: str) -> tuple[int, int]:
        a, b = self.table[node]["out"]
        return a, b

    def put(self, node: str, value) -> None:
        a, b = self.table[node]["out"]
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] != b - a:
            raise RuntimeError(f"node {node!r} produced {value.shape[2]} rows, expected rows [{a}, {b})")
        self.store.put(node, a, b, value)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_module(class_path: str, kwargs: dict) -> torch.nn.Module:
    """Rebuild a torch.nn module edgepart has no kernel for, from its class and settings."""
    module_name, _, cls_name = class_path.rpartition(".")
    if not module_name.startswith("torch.nn"):
        raise BundleError(f"refusing to build {class_path}: only torch.nn modules are rebuilt from a manifest")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)


class DeviceProgram:
    def __init__(self, manifest: dict, device: str, source: str, weights: dict[str, torch.Tensor]):
        if device not in manifest["devices"]:
            raise BundleError(f"device {device!r} is not in this bundle (devices: {list(manifest['devices'])})")
        self.manifest = manifest
        self.device = device
        self.spec = manifest["devices"][device]
        self.actions: list[dict] = self.spec["actions"]
        self.rows_by_stage = {int(k): v for k, v in self.spec["rows"].items()}
        self.weights = weights
        self.module = types.ModuleType(f"edgepart_device_{device}")
        self.module.__file__ = f"<bundle:{device}.py>"
        exec(compile(source, self.module.__file__, "exec"), self.module.__dict__)
        self.modules: dict[str, torch.nn.Module] = {}
        for name, (class_path, kwargs, keys) in getattr(self.module, "MODULES", {}).items():
            m = build_module(class_path, kwargs)
            m.load_state_dict({k.split(name + ".", 1)[1]: weights[k] for k in keys}, strict=True)
            self.modules[name] = m.eval()
        self.nodes = getattr(self.module, "NODES", {})
        self.constants = {name: weights[key] for name, key in self.spec.get("constants", {}).items()}
        self.free_after = free_after(self.actions, self.rows_by_stage, manifest.get("output", {}))

    @classmethod
    def from_bundle(cls, bundle_dir, device: str, manifest: dict | None = None) -> "DeviceProgram":
        bundle_dir = Path(bundle_dir)
        if manifest is None:
            from edgepart.compiler.bundle import read_manifest
            manifest = read_manifest(bundle_dir)
        if device not in manifest["devices"]:
            raise BundleError(f"{bundle_dir}: no device {device!r} in manifest (devices: {list(manifest['devices'])})")
        files = manifest["devices"][device]["files"]
        for rel in files:
            verify_file(bundle_dir, rel, manifest)
        prog_rel, weights_rel = manifest["devices"][device]["program"], manifest["devices"][device]["weights"]
        source = (bundle_dir / prog_rel).read_text()
        weights = load_weights(bundle_dir / weights_rel) if weights_rel else {}
        return cls(manifest, device, source, weights)

    def new_store(self) -> RowStore:
        store = RowStore(self.device)
        for name, value in self.constants.items():
            store.put(name, 0, value.shape[2] if value.dim() == 4 else 1, value)
        return store

    def run_stage(self, stage: int, store: RowStore) -> None:
        table = self.rows_by_stage.get(stage)
        if table is None:
            raise BundleError(f"device {self.device!r} has no part in stage {stage}")
        ctx = StageContext(table, store, self.manifest["tensors"])
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
        meta = self.manifest["tensors"].get(tensor)
        if meta is None or meta["shape"] is None:
            raise KeyError(f"unknown tensor {tensor!r}")
        shape = list(meta["shape"])
        if len(shape) == 4:
            shape[2] = b - a
        return DTYPES[meta["dtype"]], tuple(shape)

    def make_output(self, store: RowStore):
        tensors = self.manifest["tensors"]

        def leaf(t: str):
            return store.get(t, 0, tensors[t]["rows"]).contiguous() if t in tensors else store.get(t, 0, 1)
        return build_output(self.manifest["output"], leaf)


def free_after(actions: list[dict], rows_by_stage: dict, output: dict) -> dict[tuple[int, str], list[str]]:
    """(stage, node) -> the tensors whose last reader on this device is that node.

    A request's store would otherwise hold every intermediate tensor until the request ends, so
    every layer would write fresh memory (page faults, cold caches): memory-bound layers (batch
    norm, activations, depthwise convolutions on large maps) ran 2-4x slower than in the eager
    model. Tensors a later ``send`` or the output reads are kept."""
    last: dict[str, tuple] = {}
    for act in actions:
        op = act.get("op")
        if op == "run":
            table = rows_by_stage.get(int(act["stage"]), {})
            for node, entry in table.items():
                for producer in (entry.get("in") or {}):
                    last[producer] = (int(act["stage"]), node)
        elif op == "send":
            last[act["tensor"]] = ("send",)
        elif op == "output":
            for t in _output_tensors(output):
                last[t] = ("output",)
    out: dict[tuple[int, str], list[str]] = {}
    for t, where in last.items():
        if len(where) == 2:
            out.setdefault(where, []).append(t)
    return out


def _output_tensors(structure: dict) -> list[str]:
    out: list[str] = []
    build_output(structure, out.append) if structure else None
    return out


def build_output(structure: dict, leaf):
    """The model's output from the manifest's output structure (tensors nested in tuples, lists,
    dicts, constants), ``leaf(tensor_name)`` giving each tensor in order of appearance."""
    if "tensor" in structure:
        return leaf(structure["tensor"])
    if "tuple" in structure:
        return tuple(build_output(x, leaf) for x in structure["tuple"])
    if "list" in structure:
        return [build_output(x, leaf) for x in structure["list"]]
    if "dict" in structure:
        return {k: build_output(v, leaf) for k, v in structure["dict"].items()}
    return structure.get("const")


def verify_file(bundle_dir: Path, rel: str, manifest: dict) -> None:
    path = Path(bundle_dir) / rel
    expected = manifest["files"].get(rel)
    if expected is None:
        raise BundleError(f"{path}: not listed in manifest.json; the bundle is inconsistent, compile it again")
    if not path.is_file():
        raise BundleError(f"{path}: missing; the bundle is incomplete, copy it again or compile it again")
    if sha256_file(path) != expected:
        raise BundleError(f"{path}: sha256 does not match manifest.json; the file was modified or corrupted — "
                          "refusing to load it (recompile or copy the bundle again)")


def manifest_json(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=False)
