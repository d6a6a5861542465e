"""The ``edgepart`` command.

    edgepart compile MODEL --cluster FILE [--strategy S] --out DIR [--input-size N]
    edgepart inspect DIR
    edgepart worker / deploy / run / profile / probe   (runtime and profiling)

MODEL is a zoo name (``edgepart models`` lists them) or ``path/to/file.py:factory``
where ``factory()`` returns ``(model, example_inputs)`` or just a model (then give
``--input-shape``).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from edgepart import models
from edgepart.cluster import Cluster
from edgepart.compiler.bundle import compile as compile_model
from edgepart.compiler.bundle import load_bundle
from edgepart.compiler.explain import explain, gantt
from edgepart.compiler.inspect import plan_table
from edgepart.errors import EdgepartError
from edgepart.runtime.program import read_manifest


def load_model(spec: str, input_size: int | None = None, input_shape: str | None = None):
    """A zoo name or path/to/file.py:factory → (model, example_inputs)."""
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, factory = spec.split(":", 1)
        if not Path(path).is_file():
            raise EdgepartError(f"model file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        if not hasattr(module, factory):
            raise EdgepartError(f"{path} has no function {factory!r}")
        made = getattr(module, factory)()
        if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
            model, inputs = made
        else:
            model = made
            if not input_shape:
                raise EdgepartError(f"{spec} returned a model without example inputs; pass --input-shape 1,3,224,224")
            inputs = (torch.randn(*[int(v) for v in input_shape.split(",")]),)
        if not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        return model.eval(), tuple(inputs), Path(path).stem
    try:
        model, inputs = models.get(spec, input_size=input_size)
    except KeyError as e:
        raise EdgepartError(str(e).strip("'\"")) from e
    return model, inputs, spec


def cmd_compile(args) -> int:
    model, inputs, name = load_model(args.model, args.input_size, args.input_shape)
    cluster = Cluster.from_file(args.cluster) if args.cluster else Cluster.homogeneous(args.devices)
    bundle = compile_model(model, inputs, cluster, strategy=args.strategy, name=name)
    out = bundle.save(args.out)
    print(plan_table(bundle.manifest))
    if args.check:
        with torch.no_grad():
            ref = model(*inputs)
        y = load_bundle(out).run_local(*inputs)
        err = float((y - ref).abs().max()) if isinstance(ref, torch.Tensor) else 0.0
        print(f"check: run_local vs model: max abs error {err:.3g}")
    if args.explain:
        print(explain(bundle))
    if args.gantt:
        gantt(bundle, None, args.gantt)
        print(f"schedule drawn to {args.gantt}")
    print(f"bundle written to {out}")
    return 0


def cmd_inspect(args) -> int:
    manifest = read_manifest(args.dir)
    print(plan_table(manifest))
    return 0


def cmd_models(args) -> int:
    for n in models.names():
        print(f"{n:14s} default input {models.default_input_size(n)}")
    return 0


# Commands with their own argument parsers: `edgepart worker --listen ...` hands everything
# after the command name to the module, so its --help and options work unchanged.
DELEGATED = {
    "worker": ("edgepart.worker_main", "main", "run a worker on a device"),
    "deploy": ("edgepart.runtime.deploy_client", "main", "deploy a bundle to running workers"),
    "run": ("edgepart.runtime.client", "run_main", "run an input through deployed workers"),
    "profile": ("edgepart.fcpm.profiler", "main", "profile this device (or a worker) for the FCPM"),
    "probe": ("edgepart.fcpm.probe", "main", "measure links between workers into a cluster file"),
    "serve": ("edgepart.online.serve", "main", "serve inference with online re-planning, plan swaps and failover"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepart", description="Compile and run CNNs across edge devices.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model for a cluster into a bundle directory")
    c.add_argument("model", help="zoo name or path/to/file.py:factory")
    c.add_argument("--cluster", help="cluster YAML (default: --devices homogeneous devices)")
    c.add_argument("--devices", type=int, default=2, help="number of equal devices when no --cluster is given")
    c.add_argument("--strategy", default="ofpm",
                   help="ofpm (default, the MILP) | single | even | proportional | neurosurgeon | dads | "
                        "modnn | deepthings | aofl | edgeld")
    c.add_argument("--out", required=True, help="bundle directory to write")
    c.add_argument("--input-size", type=int, help="input height/width for a zoo model")
    c.add_argument("--input-shape", help="example input shape for a file model, e.g. 1,3,224,224")
    c.add_argument("--check", action="store_true", help="run the saved bundle locally and compare with the model")
    c.add_argument("--explain", action="store_true", help="print per-stage times and the critical path")
    c.add_argument("--gantt", help="draw the schedule to this PNG")
    c.set_defaults(func=cmd_compile)
    i = sub.add_parser("inspect", help="print a saved bundle's plan")
    i.add_argument("dir")
    i.set_defaults(func=cmd_inspect)
    m = sub.add_parser("models", help="list the model zoo")
    m.set_defaults(func=cmd_models)
    for name, (_, _, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command in DELEGATED:
            module, func, _ = DELEGATED[command]
            return getattr(importlib.import_module(module), func)(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except EdgepartError as e:
        print(f"edgepart: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
