"""Compile a model into a bundle, save and load bundles, and run one in-process.

A bundle directory holds ``manifest.json`` and, per device, ``devices/<name>.py``
(its generated program), ``devices/<name>.safetensors`` (only the weights it
uses) and, for a device that runs on ONNX Runtime, ``devices/<name>.stage<k>.onnx``
per stage exported (:mod:`edgepart.compiler.export_onnx`). The manifest has the schema version, the plan, every tensor's dtype, shape
and row owners, each device's ordered actions and row tables, and the sha256 of
every file; loading checks all of it and refuses anything tampered or missing.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import save_file

from edgepart.cluster import Cluster
from edgepart.compiler.backends import BackendChoice, choose_backends
from edgepart.compiler.codegen import generate
from edgepart.compiler.export_onnx import DeviceExport, example_inputs, export_devices
from edgepart.compiler.inspect import plan_table
from edgepart.compiler.planning.plan import Plan
from edgepart.compiler.planning.registry import make_plan
from edgepart.compiler.schedule import Schedule, build_schedule
from edgepart.passes.trace import trace
from edgepart.errors import EdgepartError
from edgepart.ir.hashing import sha256_file, verify_file
from edgepart.ir.manifest import MANIFEST, DeviceSpec, InputSpec, Manifest, NodeCost
from edgepart.passes import analyse
from edgepart.passes.graph import COMPUTE_OPS
from edgepart.runtime.interpreter import run_reference
from edgepart.runtime.program import DeviceProgram, check_inputs, load_weights, read_manifest

VERSION = "0.1.0"


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


def _state_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter, buffer or tensor attribute ``target`` (a dotted path) of the graph module."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    """A compiled model: its manifest, the source of each device's program and each device's weights.

    A freshly compiled bundle also holds the annotated graph and the schedule (for simulation and
    ``--explain``); a loaded one does not."""

    def __init__(self, manifest: Manifest, sources: dict[str, str], weights: dict[str, dict[str, torch.Tensor]],
                 directory: Path | None = None, graph: fx.GraphModule | None = None,
                 schedule: Schedule | None = None, onnx: dict[str, dict[int, bytes]] | None = None):
        self.manifest = manifest
        self.sources = sources
        self.weights = weights
        self.onnx = onnx or {}      # device -> stage -> ONNX model bytes (the manifest's DeviceSpec.onnx)
        self.dir = directory
        self.graph = graph          # the annotated fx graph (only for a freshly compiled bundle)
        self.schedule = schedule
        self._programs: dict[str | None, dict[str, DeviceProgram]] | None = None

    # --- views ---------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.manifest.plan)

    @property
    def report(self) -> dict:
        return self.manifest.report

    @property
    def devices(self) -> list[str]:
        return list(self.manifest.devices)

    @property
    def cluster(self) -> Cluster:
        return Cluster.from_dict(self.manifest.cluster)

    # --- save / load -----------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle to ``directory`` (created if needed): each device's program and weights, then
        the manifest with their sha256, written last and atomically. Device files of an earlier bundle
        in the same directory that this one does not list are removed."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise EdgepartError(f"{directory}: exists and is not a directory; choose another --out")
        (directory / "devices").mkdir(parents=True, exist_ok=True)
        files = {}
        for dev, spec in self.manifest.devices.items():
            prog = directory / spec.program
            prog.write_text(self.sources[dev])
            files[spec.program] = sha256_file(prog)
            wpath = directory / spec.weights
            save_file({k: v.contiguous() for k, v in self.weights[dev].items()}, str(wpath),
                      metadata={"device": dev, "edgepart": VERSION})
            files[spec.weights] = sha256_file(wpath)
            for stage, rel in spec.onnx.items():
                (directory / rel).write_bytes(self.onnx[dev][stage])
                files[rel] = sha256_file(directory / rel)
        for stale in (directory / "devices").iterdir():
            if f"devices/{stale.name}" not in files and stale.is_file():
                stale.unlink()
        self.manifest = self.manifest.with_files(files)
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(self.manifest.to_json())
        tmp.replace(directory / MANIFEST)
        self.dir = directory
        return directory

    # --- running -----------------------------------------------------------------
    def programs(self, backend: str | None = None) -> dict[str, DeviceProgram]:
        """Every device's program, loaded in this process (once per backend; None: each device's own)."""
        if self._programs is None:
            self._programs = {}
        if backend not in self._programs:
            self._programs[backend] = {d: DeviceProgram(self.manifest, d, self.sources[d], self.weights[d],
                                                        self.onnx.get(d), backend) for d in self.devices}
        return self._programs[backend]

    def release_programs(self) -> None:
        """Drop the programs :meth:`programs` loaded (modules, ONNX Runtime sessions); the next call loads them
        again. :func:`compile_plan` loads every program once to check it and then releases it, so a compiled
        bundle holds its sources and weights, not a second copy of them in loaded form."""
        self._programs = None

    def check_inputs(self, inputs: tuple) -> tuple:
        return check_inputs(self.manifest, inputs)

    def run_local(self, *inputs, backend: str | None = None):
        """Reference executor: every device's program in this process, moving exactly the manifest's pieces.
        ``backend`` runs every device on that backend (None: each on the one it was compiled for)."""
        xs = check_inputs(self.manifest, inputs)
        return run_reference(self.programs(backend), {s.name: x for s, x in zip(self.manifest.inputs, xs)})

    def summary(self) -> str:
        return plan_table(self.manifest)


def compile(model, example_inputs, cluster: Cluster, strategy="ofpm",
            name: str | None = None, version: dict | None = None, onnx: bool = False) -> Bundle:
    """Trace, analyse, plan, schedule and generate code: returns an in-memory Bundle.

    ``model`` is a torch.nn.Module, or an ONNX model (an ``onnx.ModelProto`` or the path of a
    ``.onnx`` file; :mod:`edgepart.compiler.onnx_import`). ``strategy`` is a strategy name (default
    ``"ofpm"``, the MILP; ``single``, ``even``, ``proportional`` and the baselines ``neurosurgeon``,
    ``dads``, ``modnn``, ``deepthings``, ``aofl``, ``edgeld``), a :class:`Plan`, or a plan dict.
    ``version`` (a JSON-able dict: the model version's name, scale, accuracy; see edgepart.versions)
    goes into the manifest as is. Each device runs on its ``backend`` (:mod:`edgepart.compiler.backends`
    chooses where the cluster does not say); ``onnx=True`` exports ONNX graphs for every device, so
    that any of them can be switched to ONNX Runtime when deployed."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if not isinstance(model, torch.nn.Module):
        model, name = _import_onnx(model, tuple(example_inputs), name)
    gm = trace(model, tuple(example_inputs))
    analyse(gm, cluster)
    _warn_unknown_calibrated_nodes(gm, cluster)
    cluster, backends = choose_backends(gm, cluster)
    plan = make_plan(gm, cluster, strategy)
    return compile_plan(gm, plan, cluster, name or type(model).__name__, version, backends=backends, onnx=onnx,
                        inputs=tuple(example_inputs))


def _import_onnx(model, inputs: tuple, name: str | None) -> tuple[torch.nn.Module, str]:
    # why: onnx2torch (a converter per ONNX op, registered at import) loads only for an ONNX model
    from edgepart.compiler.onnx_import import import_onnx
    gm, model_name = import_onnx(model, inputs)
    return gm, name or model_name


def _warn_unknown_calibrated_nodes(gm: fx.GraphModule, cluster: Cluster) -> None:
    """A device's ``node_calibration`` measured for another model (or a typo) would silently not apply."""
    names = {n.name for n in gm.graph.nodes}
    for d in cluster.devices:
        unknown = sorted(node for node, _ in d.node_calibration if node not in names)
        if unknown:
            warnings.warn(f"device {d.name!r}: node_calibration names {len(unknown)} node(s) this model does not "
                          f"have ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); they are ignored — "
                          "measure it on this model (edgepart.compiler.cost.calibration.layers.measure_node_calibration)", stacklevel=3)


def compile_plan(gm: fx.GraphModule, plan: Plan, cluster: Cluster, model_name: str,
                 version: dict | None = None, backends: dict[str, BackendChoice] | None = None,
                 onnx: bool = False, inputs: tuple | None = None) -> Bundle:
    """The bundle of ``plan``. ``version``: the model version's record for the manifest;
    ``backends``: each device's backend and why (None: chosen here, :func:`choose_backends`);
    ``onnx``: export every device's stages, not only those of devices on ONNX Runtime; ``inputs``:
    the example inputs the exported stages are checked on (None: seeded random ones)."""
    if backends is None:
        cluster, backends = choose_backends(gm, cluster)
    schedule = build_schedule(gm, plan, cluster)
    programs = generate(gm, schedule, model_name, VERSION)
    nodes = {n.name: n for n in gm.graph.nodes}
    devices, sources, weights = {}, {}, {}
    for dev in schedule.devices():
        consts = {c: nodes[c].target for c in sorted(schedule.constants.get(dev, ()))}
        keys = sorted(programs[dev]["weight_keys"] | set(consts.values()))
        weights[dev] = {k: _state_tensor(gm, k).detach().contiguous().clone() for k in keys}
        sources[dev] = programs[dev]["source"]
        devices[dev] = DeviceSpec(program=f"devices/{dev}.py", weights=f"devices/{dev}.safetensors",
                                  files=(f"devices/{dev}.py", f"devices/{dev}.safetensors"),
                                  actions=tuple(schedule.actions[dev]), rows=dict(schedule.rows[dev]),
                                  constants=consts)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    manifest = Manifest(
        model=model_name,
        source_device=schedule.source,
        inputs=tuple(InputSpec(p.name, p.meta["dtype"], tuple(p.meta["shape"])) for p in placeholders),
        output=_output_structure(output.args[0]),
        cluster=cluster.to_dict(),
        plan=plan.to_dict(),
        tensors=dict(schedule.tensors),
        owners={t: tuple(os_) for t, os_ in schedule.owners.items()},
        transfers=tuple(schedule.transfers),
        node_costs={n.name: NodeCost(n.meta.get("macs", 0), n.meta.get("flops", 0), n.meta["rows"])
                    for n in gm.graph.nodes if n.op in COMPUTE_OPS},
        devices=devices,
        report={**compile_report(gm), "backends": _backend_report(backends, {})},
        version=version,
        edgepart_version=VERSION,
    )
    bundle = Bundle(manifest, sources, weights, graph=gm, schedule=schedule)
    programs = bundle.programs()  # (all on torch so far) every program loads here, or the compile fails naming the device
    exporting = {d for d in devices if onnx or backends[d].backend == "onnxruntime"}
    if exporting:
        example = ({s.name: x for s, x in zip(manifest.inputs, inputs)} if inputs is not None
                   else example_inputs(manifest))
        bundle = _with_onnx(bundle, export_devices(programs, exporting, example), backends)
        bundle.programs()         # the ONNX graphs load too
    del programs
    bundle.release_programs()     # checked, not kept: loaded, they hold every weight a second time
    return bundle


def _backend_report(backends: dict[str, BackendChoice], exports: dict[str, DeviceExport]) -> dict:
    out = {}
    for dev, c in backends.items():
        e = {"backend": c.backend, "why": c.why}
        if dev in exports:
            e["onnx_stages"] = sorted(exports[dev].graphs)
            e["torch_stages"] = {str(s): why for s, why in sorted(exports[dev].torch_stages.items())}
        out[dev] = e
    return out


def _with_onnx(bundle: Bundle, exports: dict[str, DeviceExport], backends: dict[str, BackendChoice]) -> Bundle:
    """``bundle`` with the exported stages among its devices' files; a device on ONNX Runtime none
    of whose stages exported runs on torch, and the report says so."""
    m = bundle.manifest
    backends = dict(backends)
    devices = {}
    for dev, spec in m.devices.items():
        graphs = exports[dev].graphs if dev in exports else {}
        onnx = {s: f"devices/{dev}.stage{s}.onnx" for s in sorted(graphs)}
        backend = backends[dev].backend
        if backend == "onnxruntime" and spec.rows and not graphs:
            backend = "torch"
            backends[dev] = BackendChoice("torch", backends[dev].why + "; but no stage exported to ONNX")
        devices[dev] = dataclasses.replace(spec, backend=backend, onnx=onnx, files=spec.files + tuple(onnx.values()))
    report = {**m.report, "backends": _backend_report(backends, exports)}
    manifest = dataclasses.replace(m, devices=devices, report=report)
    return Bundle(manifest, bundle.sources, bundle.weights, graph=bundle.graph, schedule=bundle.schedule,
                  onnx={d: dict(e.graphs) for d, e in exports.items()})


def load_bundle(directory: str | os.PathLike) -> Bundle:
    """The bundle saved in ``directory``, every file checked against the manifest's sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    sources, weights, onnx = {}, {}, {}
    for dev, spec in manifest.devices.items():
        for rel in spec.files:
            verify_file(directory, rel, manifest.files)
        sources[dev] = (directory / spec.program).read_text()
        weights[dev] = load_weights(directory / spec.weights)
        onnx[dev] = {stage: (directory / rel).read_bytes() for stage, rel in spec.onnx.items()}
    return Bundle(manifest, sources, weights, directory=directory, onnx=onnx)
