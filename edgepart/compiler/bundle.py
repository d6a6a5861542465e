"""Compile a model into a bundle, save and load bundles, and run one in-process.

A bundle directory holds ``manifest.json`` and, per device, ``devices/<name>.py``
(its generated program) and ``devices/<name>.safetensors`` (only the weights it
uses). The manifest has the schema version, the plan, every tensor's dtype, shape
and row owners, each device's ordered actions and row tables, and the sha256 of
every file; loading checks all of it and refuses anything tampered or missing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import save_file

from edgepart.cluster import Cluster
from edgepart.compiler.codegen import generate
from edgepart.compiler.planning.plan import Plan
from edgepart.compiler.planning.registry import make_plan
from edgepart.compiler.schedule import Schedule, build_schedule
from edgepart.compiler.trace import COMPUTE_OPS, trace
from edgepart.errors import BundleError, EdgepartError, InputShapeError
from edgepart.passes import analyse
from edgepart.passes.shapes import _fetch_attr, dtype_name
from edgepart.runtime.program import DTYPES, DeviceProgram, RowStore, load_weights, sha256_file, verify_file

SCHEMA_VERSION = 1
VERSION = "0.1.0"
MANIFEST = "manifest.json"


def _output_structure(arg: Any) -> dict:
    if isinstance(arg, fx.Node):
        return {"tensor": arg.name}
    if isinstance(arg, tuple):
        return {"tuple": [_output_structure(a) for a in arg]}
    if isinstance(arg, list):
        return {"list": [_output_structure(a) for a in arg]}
    if isinstance(arg, dict):
        return {"dict": {str(k): _output_structure(v) for k, v in arg.items()}}
    if arg is None or isinstance(arg, (int, float, str, bool)):
        return {"const": arg}
    raise EdgepartError(f"model output contains {type(arg).__name__}, which a bundle cannot return")


def compile_report(gm: fx.GraphModule) -> dict:
    whole, unknown = [], []
    for n in gm.graph.nodes:
        if n.op not in COMPUTE_OPS or n.meta.get("splittable"):
            continue
        entry = {"node": n.name, "op": n.meta["op"].label or str(n.target), "why": n.meta.get("why_whole", "")}
        whole.append(entry)
        if "not known" in entry["why"]:
            unknown.append(entry)
    return {"macs": sum(n.meta.get("macs", 0) for n in gm.graph.nodes),
            "flops": sum(n.meta.get("flops", 0) for n in gm.graph.nodes),
            "nodes": sum(1 for n in gm.graph.nodes if n.op in COMPUTE_OPS),
            "whole_nodes": whole, "unknown_ops": unknown}


class Bundle:
    """A compiled model: manifest + per-device program sources + per-device weights."""

    def __init__(self, manifest: dict, sources: dict[str, str], weights: dict[str, dict[str, torch.Tensor]],
                 directory: Path | None = None, graph: fx.GraphModule | None = None,
                 schedule: Schedule | None = None):
        self.manifest = manifest
        self.sources = sources
        self.weights = weights
        self.dir = directory
        self.graph = graph          # the annotated fx graph (only for a freshly compiled bundle)
        self.schedule = schedule
        self._programs: dict[str, DeviceProgram] | None = None

    # --- views ---------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.manifest["plan"])

    @property
    def report(self) -> dict:
        return self.manifest["report"]

    @property
    def devices(self) -> list[str]:
        return list(self.manifest["devices"])

    @property
    def cluster(self) -> Cluster:
        return Cluster.from_dict(self.manifest["cluster"])

    # --- save / load -----------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "devices").mkdir(exist_ok=True)
        files = {}
        for dev, spec in self.manifest["devices"].items():
            prog = directory / spec["program"]
            prog.write_text(self.sources[dev])
            files[spec["program"]] = sha256_file(prog)
            wpath = directory / spec["weights"]
            save_file({k: v.contiguous() for k, v in self.weights[dev].items()}, str(wpath),
                      metadata={"device": dev, "edgepart": VERSION})
            files[spec["weights"]] = sha256_file(wpath)
        self.manifest["files"] = files
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        tmp.replace(directory / MANIFEST)
        self.dir = directory
        return directory

    # --- running -----------------------------------------------------------------
    def programs(self) -> dict[str, DeviceProgram]:
        if self._programs is None:
            self._programs = {d: DeviceProgram(self.manifest, d, self.sources[d], self.weights[d])
                              for d in self.devices}
        return self._programs

    def check_inputs(self, inputs: tuple) -> tuple:
        return check_inputs(self.manifest, inputs)

    def run_local(self, *inputs):
        """Reference executor: every device's program in this process, moving exactly the manifest's pieces."""
        return run_reference(self.programs(), self.manifest, check_inputs(self.manifest, inputs))

    def summary(self) -> str:
        from edgepart.compiler.inspect import plan_table
        return plan_table(self.manifest)


def check_inputs(manifest: dict, inputs: tuple) -> tuple:
    specs = manifest["inputs"]
    if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)) and len(specs) > 1:
        inputs = tuple(inputs[0])
    if len(inputs) != len(specs):
        raise InputShapeError(f"the bundle takes {len(specs)} input(s) "
                              f"({', '.join(s['name'] for s in specs)}), got {len(inputs)}")
    out = []
    for x, s in zip(inputs, specs):
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"input {s['name']!r} must be a torch.Tensor of shape {tuple(s['shape'])}, "
                                  f"got {type(x).__name__}")
        if tuple(x.shape) != tuple(s["shape"]):
            raise InputShapeError(f"input {s['name']!r} has shape {tuple(x.shape)} but the bundle was compiled for "
                                  f"shape {tuple(s['shape'])}; resize the input or compile again for this shape")
        if dtype_name(x.dtype) != s["dtype"]:
            raise InputShapeError(f"input {s['name']!r} has dtype {dtype_name(x.dtype)} but the bundle expects "
                                  f"{s['dtype']}")
        out.append(x)
    return tuple(out)


def run_reference(programs: dict[str, DeviceProgram], manifest: dict, inputs: tuple):
    """Step every device's action list; a recv waits for its piece. Detects deadlock."""
    names = [s["name"] for s in manifest["inputs"]]
    stores = {d: p.new_store() for d, p in programs.items()}
    pc = {d: 0 for d in programs}
    mailbox: dict[tuple, torch.Tensor] = {}
    result = None
    while True:
        progressed = False
        for dev, prog in programs.items():
            acts = prog.actions
            while pc[dev] < len(acts):
                act = acts[pc[dev]]
                op = act["op"]
                if op == "input":
                    x = inputs[names.index(act["tensor"])]
                    stores[dev].put(act["tensor"], 0, manifest["tensors"][act["tensor"]]["rows"], x)
                elif op == "recv":
                    key = (act["from"], dev, act["tensor"], *act["rows"])
                    if key not in mailbox:
                        break
                    stores[dev].put(act["tensor"], *act["rows"], mailbox.pop(key))
                elif op == "run":
                    try:
                        prog.run_stage(act["stage"], stores[dev])
                    except EdgepartError:
                        raise
                    except Exception as e:
                        raise EdgepartError(f"device {dev!r}, stage {act['stage']}: {type(e).__name__}: {e}") from e
                elif op == "send":
                    a, b = act["rows"]
                    piece = stores[dev].get(act["tensor"], a, b)
                    mailbox[(dev, act["to"], act["tensor"], a, b)] = piece.contiguous().clone()
                elif op == "output":
                    result = prog.make_output(stores[dev])
                else:
                    raise BundleError(f"device {dev!r}: unknown action {op!r}")
                pc[dev] += 1
                progressed = True
        if all(pc[d] == len(p.actions) for d, p in programs.items()):
            return result
        if not progressed:
            waiting = {d: programs[d].actions[pc[d]] for d in programs if pc[d] < len(programs[d].actions)}
            raise BundleError(f"the bundle's actions deadlock; devices waiting: {waiting}")


def compile(model: torch.nn.Module, example_inputs, cluster: Cluster, strategy="ofpm",
            name: str | None = None) -> Bundle:
    """Trace, analyse, plan, schedule and generate code: returns an in-memory Bundle.

    ``strategy`` is a strategy name (default ``"ofpm"``, the MILP; ``single``, ``even``,
    ``proportional`` and the baselines ``neurosurgeon``, ``dads``, ``modnn``, ``deepthings``,
    ``aofl``, ``edgeld``), a :class:`Plan`, or a plan dict."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    gm = trace(model, tuple(example_inputs))
    analyse(gm, cluster)
    _warn_unknown_calibrated_nodes(gm, cluster)
    plan = make_plan(gm, cluster, strategy)
    return compile_plan(gm, plan, cluster, name or type(model).__name__)


def _warn_unknown_calibrated_nodes(gm: fx.GraphModule, cluster: Cluster) -> None:
    """A device's ``node_calibration`` measured for another model (or a typo) would silently not apply."""
    names = {n.name for n in gm.graph.nodes}
    for d in cluster.devices:
        unknown = sorted(node for node, _ in d.node_calibration if node not in names)
        if unknown:
            warnings.warn(f"device {d.name!r}: node_calibration names {len(unknown)} node(s) this model does not "
                          f"have ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); they are ignored — "
                          "measure it on this model (emulate.measure_node_calibration)", stacklevel=3)


def compile_plan(gm: fx.GraphModule, plan: Plan, cluster: Cluster, model_name: str) -> Bundle:
    schedule = build_schedule(gm, plan, cluster)
    programs = generate(gm, schedule, model_name, VERSION)
    nodes = {n.name: n for n in gm.graph.nodes}
    devices, sources, weights = {}, {}, {}
    for dev in schedule.devices():
        consts = {c: nodes[c].target for c in sorted(schedule.constants.get(dev, ()))}
        keys = sorted(programs[dev]["weight_keys"] | set(consts.values()))
        weights[dev] = {k: _fetch_attr(gm, k).detach().contiguous().clone() for k in keys}
        sources[dev] = programs[dev]["source"]
        devices[dev] = {"program": f"devices/{dev}.py", "weights": f"devices/{dev}.safetensors",
                        "files": [f"devices/{dev}.py", f"devices/{dev}.safetensors"],
                        "actions": schedule.actions[dev],
                        "rows": {str(k): v for k, v in schedule.rows[dev].items()},
                        "constants": consts}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "edgepart_version": VERSION,
        "model": model_name,
        "source_device": schedule.source,
        "inputs": [{"name": p.name, "dtype": p.meta["dtype"], "shape": list(p.meta["shape"])} for p in placeholders],
        "output": _output_structure(output.args[0]),
        "cluster": cluster.to_dict(),
        "plan": plan.to_dict(),
        "tensors": schedule.tensors,
        "owners": {t: [list(o) for o in os_] for t, os_ in schedule.owners.items()},
        "transfers": [[t.tensor, t.a, t.b, t.src, t.dst, t.nbytes, t.stage] for t in schedule.transfers],
        "node_costs": {n.name: {"macs": n.meta.get("macs", 0), "flops": n.meta.get("flops", 0),
                                "rows": n.meta["rows"]} for n in gm.graph.nodes if n.op in COMPUTE_OPS},
        "devices": devices,
        "report": compile_report(gm),
        "files": {},
    }
    return Bundle(manifest, sources, weights, graph=gm, schedule=schedule)


REQUIRED_KEYS = ("schema_version", "source_device", "inputs", "output", "cluster", "plan", "tensors",
                 "devices", "files")


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json here; is {directory} a bundle directory (edgepart compile --out)?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); the bundle is corrupted, compile it again") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}; not an edgepart bundle or a damaged one")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {manifest['schema_version']!r}, this edgepart reads "
                          f"version {SCHEMA_VERSION}; compile the bundle again with this version")
    for dev, spec in manifest["devices"].items():
        for key in ("program", "weights", "files", "actions", "rows"):
            if key not in spec:
                raise BundleError(f"{path}: device {dev!r} lacks {key!r}")
        for rel in spec["files"]:
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"{path}: device {dev!r} names file {rel!r} outside the bundle")
    return manifest


def load_bundle(directory: str | os.PathLike) -> Bundle:
    directory = Path(directory)
    manifest = read_manifest(directory)
    sources, weights = {}, {}
    for dev, spec in manifest["devices"].items():
        for rel in spec["files"]:
            verify_file(directory, rel, manifest)
        sources[dev] = (directory / spec["program"]).read_text()
        weights[dev] = load_weights(directory / spec["weights"])
    return Bundle(manifest, sources, weights, directory=directory)
