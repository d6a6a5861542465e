"""The manifest: everything a bundle's devices need to know, as typed records.

``manifest.json`` is :meth:`Manifest.to_dict` as JSON. :meth:`Manifest.from_dict` is the one
place that reads it, from disk or from a deploy frame: it checks every field's type and refuses
anything malformed with a :class:`BundleError` that names the field. Actions are what each device
does, in order (:data:`Action`); a :class:`Transfer` is the one kind of communication, "rows
[a, b) of tensor T, from device X to device Y".

Schema versions: 1 (edgepart 0.1, untyped; transfers as positional lists) is refused with a message
naming both versions — recompiling is cheap and a plan cannot be recovered from a version-1 file
without the model anyway. 2 is this one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Union

from edgepart.errors import BundleError
from edgepart.ir import output as output_tree
from edgepart.ir.dtypes import DTYPES
from edgepart.ir.hashing import check_relative

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
# How a device runs its stages: its generated Python program (torch ops one by one), or per stage an
# ONNX graph in ONNX Runtime where the compiler could export one (edgepart.runtime.ort).
BACKENDS = ("torch", "onnxruntime")


# --- actions -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TakeInput:
    """The source device takes model input ``tensor`` (all its rows) from the request."""
    tensor: str


@dataclass(frozen=True, slots=True)
class Recv:
    """Wait for rows [a, b) of ``tensor`` from device ``src``."""
    tensor: str
    a: int
    b: int
    src: str

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.src, self.tensor, self.a, self.b


@dataclass(frozen=True, slots=True)
class Run:
    """Compute this device's rows of every node of stage ``stage``."""
    stage: int


@dataclass(frozen=True, slots=True)
class Send:
    """Send rows [a, b) of ``tensor`` to device ``dst``."""
    tensor: str
    a: int
    b: int
    dst: str


@dataclass(frozen=True, slots=True)
class EmitOutput:
    """The source device assembles the model's output and answers the request."""


Action = Union[TakeInput, Recv, Run, Send, EmitOutput]


def action_to_dict(act: Action) -> dict:
    if isinstance(act, TakeInput):
        return {"op": "input", "tensor": act.tensor}
    if isinstance(act, Recv):
        return {"op": "recv", "tensor": act.tensor, "rows": [act.a, act.b], "from": act.src}
    if isinstance(act, Run):
        return {"op": "run", "stage": act.stage}
    if isinstance(act, Send):
        return {"op": "send", "tensor": act.tensor, "rows": [act.a, act.b], "to": act.dst}
    return {"op": "output"}


def action_from_dict(d: Any, where: str) -> Action:
    r = _Reader(d, where)
    op = r.str("op")
    if op == "input":
        return TakeInput(r.str("tensor"))
    if op == "recv":
        a, b = r.interval("rows")
        return Recv(r.str("tensor"), a, b, r.str("from"))
    if op == "run":
        return Run(r.int("stage"))
    if op == "send":
        a, b = r.interval("rows")
        return Send(r.str("tensor"), a, b, r.str("to"))
    if op == "output":
        return EmitOutput()
    raise BundleError(f"{where}.op: unknown action {op[:40]!r} (input, recv, run, send, output)")


# --- records -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Transfer:
    """Rows [a, b) of ``tensor`` from ``src`` to ``dst``: ``nbytes`` bytes, consumed by stage ``stage``
    (the number of stages for the model's output), produced by ``producer_stage`` (-1: a model input)."""
    tensor: str
    a: int
    b: int
    src: str
    dst: str
    nbytes: int
    stage: int
    producer_stage: int

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "rows": [self.a, self.b], "src": self.src, "dst": self.dst,
                "nbytes": self.nbytes, "stage": self.stage, "producer_stage": self.producer_stage}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Transfer":
        r = _Reader(d, where)
        a, b = r.interval("rows")
        return cls(r.str("tensor"), a, b, r.str("src"), r.str("dst"), r.int("nbytes"), r.int("stage"),
                   r.int("producer_stage"))


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A node's value: dtype, shape (None for a tuple-valued node) and rows (H of an NCHW tensor, else 1)."""
    dtype: str
    shape: tuple[int, ...] | None
    rows: int

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": None if self.shape is None else list(self.shape), "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TensorSpec":
        r = _Reader(d, where)
        shape = r.get("shape")
        return cls(r.opt_str("dtype"), None if shape is None else r.shape("shape"), r.int("rows"))

    def piece_shape(self, a: int, b: int) -> tuple[int, ...]:
        """The shape of rows [a, b) of this tensor (the whole value when it has no rows axis)."""
        if self.shape is None:
            raise KeyError("a tuple-valued node has no rows to move")
        shape = list(self.shape)
        if len(shape) == 4:
            shape[2] = b - a
        return tuple(shape)


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "InputSpec":
        r = _Reader(d, where)
        return cls(r.str("name"), r.dtype("dtype"), r.shape("shape"))


@dataclass(frozen=True, slots=True)
class Window:
    """The rows [lo, hi) of a producer that a node's rows need, and the ``top``/``bottom`` border
    padding rows applied explicitly (the part of the window outside the tensor)."""
    lo: int
    hi: int
    top: int
    bottom: int


@dataclass(frozen=True, slots=True)
class NodeRows:
    """One device's part of one node in one stage: the output rows it computes and the input windows."""
    out: tuple[int, int]
    inputs: dict[str, Window]

    def to_dict(self) -> dict:
        return {"out": list(self.out), "in": {p: [w.lo, w.hi, w.top, w.bottom] for p, w in self.inputs.items()}}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "NodeRows":
        r = _Reader(d, where)
        windows = {}
        for p, w in r.obj("in").items():
            if not (isinstance(w, list) and len(w) == 4 and all(type(v) is int for v in w)):
                raise BundleError(f"{where}.in[{p!r}]: expected [lo, hi, top, bottom] of ints")
            windows[p] = Window(*w)
        return cls(r.interval("out"), windows)


@dataclass(frozen=True, slots=True)
class NodeCost:
    macs: int
    flops: int
    rows: int


@dataclass(frozen=True)
class DeviceSpec:
    """One device's part: its files (relative to the bundle), its actions in order, per stage the
    rows of each node it computes (in execution order), and the constants it reads (node -> weight key).
    ``backend`` (one of :data:`BACKENDS`) is how the compiler chose to run it; ``onnx`` maps the stages
    exported as ONNX graphs to their files (among ``files``, so hashed like the program)."""
    program: str
    weights: str
    files: tuple[str, ...]
    actions: tuple[Action, ...]
    rows: dict[int, dict[str, NodeRows]]
    constants: dict[str, str] = field(default_factory=dict)
    backend: str = "torch"
    onnx: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"program": self.program, "weights": self.weights, "files": list(self.files),
             "actions": [action_to_dict(a) for a in self.actions],
             "rows": {str(s): {n: nr.to_dict() for n, nr in table.items()} for s, table in self.rows.items()},
             "constants": dict(self.constants), "backend": self.backend}
        if self.onnx:
            d["onnx"] = {str(s): rel for s, rel in sorted(self.onnx.items())}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "DeviceSpec":
        r = _Reader(d, where)
        files = tuple(r.str_list("files"))
        program, weights = r.str("program"), r.str("weights")
        for rel in files:
            check_relative(rel, where)
        for key, rel in (("program", program), ("weights", weights)):
            if rel not in files:
                raise BundleError(f"{where}.{key}: {rel!r} is not among the device's files {list(files)}")
        actions = tuple(action_from_dict(a, f"{where}.actions[{i}]") for i, a in enumerate(r.list("actions")))
        rows = {}
        for s, table in r.obj("rows").items():
            if not s.lstrip("-").isdigit():
                raise BundleError(f"{where}.rows: stage key {s[:20]!r} is not an integer")
            if not isinstance(table, dict):
                raise BundleError(f"{where}.rows[{s}]: must be an object")
            rows[int(s)] = {n: NodeRows.from_dict(e, f"{where}.rows[{s}][{n!r}]") for n, e in table.items()}
        constants = r.obj("constants") if "constants" in d else {}
        if not all(isinstance(v, str) for v in constants.values()):
            raise BundleError(f"{where}.constants: values must be weight names")
        backend = r.opt_str("backend") or "torch"
        if backend not in BACKENDS:
            raise BundleError(f"{where}.backend: {backend[:20]!r} is not one of {list(BACKENDS)}")
        onnx = {}
        for s, rel in (r.obj("onnx") if "onnx" in d else {}).items():
            if not s.isdigit() or int(s) not in rows:
                raise BundleError(f"{where}.onnx: {s[:20]!r} is not one of the device's stages {sorted(rows)}")
            if not isinstance(rel, str) or rel not in files:
                raise BundleError(f"{where}.onnx[{s}]: {str(rel)[:60]!r} is not among the device's files")
            onnx[int(s)] = rel
        return cls(program, weights, files, actions, rows, dict(constants), backend, onnx)

    @property
    def partners(self) -> set[str]:
        """The devices this one receives from or sends to."""
        return {a.src for a in self.actions if isinstance(a, Recv)} | {
            a.dst for a in self.actions if isinstance(a, Send)}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest. ``cluster`` and ``plan`` are kept as the JSON the compiler wrote
    (:meth:`edgepart.cluster.Cluster.from_dict` and the planner's ``Plan.from_dict`` read them);
    ``report`` is the compile report (what ran whole and why) for people."""
    model: str
    source_device: str
    inputs: tuple[InputSpec, ...]
    output: dict
    cluster: dict
    plan: dict
    tensors: dict[str, TensorSpec]
    owners: dict[str, tuple[tuple[str, int, int], ...]]
    transfers: tuple[Transfer, ...]
    node_costs: dict[str, NodeCost]
    devices: dict[str, DeviceSpec]
    report: dict
    files: dict[str, str] = field(default_factory=dict)
    version: dict | None = None          # the model version (name, scale, accuracy) when it is one
    edgepart_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # --- views -------------------------------------------------------------------------------------
    @property
    def stage_count(self) -> int:
        return len(self.plan.get("stages", []))

    def with_files(self, files: dict[str, str]) -> "Manifest":
        return replace(self, files=dict(files))

    def device(self, name: str) -> DeviceSpec:
        try:
            return self.devices[name]
        except KeyError:
            raise BundleError(f"device {name!r} is not in this bundle (devices: {list(self.devices)})") from None

    # --- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "edgepart_version": self.edgepart_version,
            "model": self.model,
            "version": self.version,
            "source_device": self.source_device,
            "inputs": [s.to_dict() for s in self.inputs],
            "output": self.output,
            "cluster": self.cluster,
            "plan": self.plan,
            "tensors": {t: s.to_dict() for t, s in self.tensors.items()},
            "owners": {t: [list(o) for o in os_] for t, os_ in self.owners.items()},
            "transfers": [t.to_dict() for t in self.transfers],
            "node_costs": {n: {"macs": c.macs, "flops": c.flops, "rows": c.rows} for n, c in self.node_costs.items()},
            "devices": {d: s.to_dict() for d, s in self.devices.items()},
            "report": self.report,
            "files": dict(self.files),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST) -> "Manifest":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{where}: not valid JSON ({e}); the bundle is corrupted, compile it again") from e
        except RecursionError:
            raise BundleError(f"{where}: JSON nested too deeply") from None
        return cls.from_dict(d, where)

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must hold a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{where}: schema version {version!r}, this edgepart reads schema version "
                              f"{SCHEMA_VERSION}; compile the bundle again with this edgepart")
        r = _Reader(d, where)
        try:
            output_tree.validate(r.obj("output"), f"{where}.output")
            tensors = {t: TensorSpec.from_dict(s, f"{where}.tensors[{t!r}]") for t, s in r.obj("tensors").items()}
            owners = {}
            for t, os_ in r.obj("owners").items():
                if not (isinstance(os_, list) and all(isinstance(o, list) and len(o) == 3 and isinstance(o[0], str)
                                                      and type(o[1]) is int and type(o[2]) is int for o in os_)):
                    raise BundleError(f"{where}.owners[{t!r}]: expected [[device, a, b], ...]")
                owners[t] = tuple((o[0], o[1], o[2]) for o in os_)
            costs = {}
            for n, c in (r.obj("node_costs") if "node_costs" in d else {}).items():
                cr = _Reader(c, f"{where}.node_costs[{n!r}]")
                costs[n] = NodeCost(cr.num("macs"), cr.num("flops"), cr.int("rows"))
            devices = {dev: DeviceSpec.from_dict(s, f"{where}.devices[{dev!r}]") for dev, s in r.obj("devices").items()}
            files = r.obj("files")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
                raise BundleError(f"{where}.files: expected {{relative path: sha256}}")
            source = r.str("source_device")
            if devices and source not in devices:
                raise BundleError(f"{where}.source_device: {source!r} is not one of the devices {list(devices)}")
            m = cls(model=r.opt_str("model") or "", source_device=source,
                    inputs=tuple(InputSpec.from_dict(s, f"{where}.inputs[{i}]") for i, s in enumerate(r.list("inputs"))),
                    output=d["output"], cluster=r.obj("cluster"), plan=r.obj("plan"), tensors=tensors, owners=owners,
                    transfers=tuple(Transfer.from_dict(t, f"{where}.transfers[{i}]")
                                    for i, t in enumerate(r.list("transfers"))),
                    node_costs=costs, devices=devices, report=r.obj("report") if "report" in d else {},
                    files=dict(files), version=d.get("version"),
                    edgepart_version=r.opt_str("edgepart_version") or "", schema_version=version)
        except RecursionError:
            raise BundleError(f"{where}: nested too deeply") from None
        m._check_references(where)
        return m

    def _check_references(self, where: str) -> None:
        """Every tensor an action or an output names is described in ``tensors``."""
        known = set(self.tensors)
        for dev, spec in self.devices.items():
            for i, act in enumerate(spec.actions):
                t = getattr(act, "tensor", None)
                if t is not None and t not in known and t not in spec.constants:
                    raise BundleError(f"{where}.devices[{dev!r}].actions[{i}]: unknown tensor {t!r}")
                for peer in (getattr(act, "src", None), getattr(act, "dst", None)):
                    if peer is not None and peer not in self.devices:
                        raise BundleError(f"{where}.devices[{dev!r}].actions[{i}]: unknown device {peer!r}")


# --- a reader that names the field it refuses ---------------------------------------------------------
class _Reader:
    def __init__(self, d: Any, where: str):
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must be a JSON object, got {type(d).__name__}")
        self.d = d
        self.where = where

    def get(self, key: str) -> Any:
        if key not in self.d:
            raise BundleError(f"{self.where}: missing {key!r}; not an edgepart bundle or a damaged one")
        return self.d[key]

    def _typed(self, key: str, ok, what: str) -> Any:
        v = self.get(key)
        if not ok(v):
            raise BundleError(f"{self.where}.{key}: must be {what}, got {str(v)[:60]!r}")
        return v

    def str(self, key: str) -> str:
        return self._typed(key, lambda v: isinstance(v, str), "a string")

    def opt_str(self, key: str) -> str | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, str):
            raise BundleError(f"{self.where}.{key}: must be a string or null")
        return v

    def int(self, key: str) -> int:
        return self._typed(key, lambda v: type(v) is int, "an integer")

    def num(self, key: str) -> int | float:
        return self._typed(key, lambda v: type(v) in (int, float), "a number")

    def obj(self, key: str) -> dict:
        return self._typed(key, lambda v: isinstance(v, dict), "an object")

    def list(self, key: str) -> list:
        return self._typed(key, lambda v: isinstance(v, list), "a list")

    def str_list(self, key: str) -> list[str]:
        v = self.list(key)
        if not all(isinstance(x, str) for x in v):
            raise BundleError(f"{self.where}.{key}: must be a list of strings")
        return v

    def interval(self, key: str) -> tuple[int, int]:
        v = self.get(key)
        if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) and 0 <= v[0] <= v[1]):
            raise BundleError(f"{self.where}.{key}: must be [a, b] with 0 <= a <= b, got {str(v)[:60]!r}")
        return v[0], v[1]

    def shape(self, key: str) -> tuple[int, ...]:
        v = self.get(key)
        if not (isinstance(v, list) and len(v) <= 8 and all(type(x) is int and 0 <= x < (1 << 40) for x in v)):
            raise BundleError(f"{self.where}.{key}: must be a list of at most 8 non-negative ints")
        return tuple(v)

    def dtype(self, key: str) -> str:
        v = self.str(key)
        if v not in DTYPES:
            raise BundleError(f"{self.where}.{key}: dtype {v[:20]!r} is not one of {sorted(DTYPES)}")
        return v
