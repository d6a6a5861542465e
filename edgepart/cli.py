"""The ``edgepart`` command.

    edgepart compile MODEL --cluster FILE [--strategy S] --out DIR [--input-size N]
    edgepart inspect DIR
    edgepart train MODEL --dataset mnist --out DIR
    edgepart versions MODEL --scales 1,0.75,0.5,0.25 --dataset mnist --out DIR | edgepart versions show DIR
    edgepart mcia plan CLUSTER TASKS [--strategy milp|drl|end-only|...|all] [--explain]
    edgepart mcia run CLUSTER TASKS [--requests N] [--cpuset 1]   (the plan on the emulated testbed; root)
    edgepart mcia train --out POLICY.json [--steps N] [--seed S]   (the DRL policy)
    edgepart worker / deploy / run / profile / probe   (runtime and profiling)
    edgepart keygen --run FILE | --deploy FILE          (keys: docs/security.md)

A mistake in what was given (a file, an option, a model, a cluster) prints one line,
``edgepart: error: ...``, and exits 2; ``--debug`` (anywhere on the line) prints the traceback
instead. Anything else is a bug: one line saying so, exit 1 (``--debug``: the traceback).

MODEL is a zoo name (``edgepart models`` lists them), ``path/to/file.py:factory``
where ``factory()`` returns ``(model, example_inputs)`` or just a model (then give
``--input-shape``), or ``path/to/model.onnx`` (its input shape from the file, or ``--input-shape``).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import onnx
import torch
import yaml

from edgepart import models
from edgepart.cluster import Cluster
from edgepart.compiler.bundle import compile as compile_model
from edgepart.compiler.bundle import load_bundle
from edgepart.compiler.explain import explain, gantt
from edgepart.compiler.inspect import plan_table
from edgepart.errors import EdgepartError
from edgepart.runtime.ort import new_session
from edgepart.runtime.program import read_manifest


def _onnx_inputs(path: str, input_shape: str | None) -> tuple:
    """Example inputs of an ONNX model: its (static) input shapes, or ``--input-shape`` for the first."""
    graph = onnx.load(path, load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    inputs = []
    for k, vi in enumerate(v for v in graph.input if v.name not in init):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if k == 0 and input_shape:
            dims = [int(v) for v in input_shape.split(",")]
        if any(d is None for d in dims):
            raise EdgepartError(f"{path}: input {vi.name!r} has a dynamic shape {dims}; pass --input-shape 1,3,224,224")
        inputs.append(torch.randn(*dims))
    return tuple(inputs)


def load_model(spec: str, input_size: int | None = None, input_shape: str | None = None):
    """A zoo name, path/to/file.py:factory or path/to/model.onnx → (model, example_inputs, name);
    the model of an ONNX file is its path (edgepart.compile imports it)."""
    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            raise EdgepartError(f"model file {spec} does not exist")
        return spec, _onnx_inputs(spec, input_shape), Path(spec).stem
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, factory = spec.split(":", 1)
        if not Path(path).is_file():
            raise EdgepartError(f"model file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise EdgepartError(f"{path}, line {e.lineno}: syntax error: {e.msg}") from e
        except Exception as e:  # noqa: BLE001 — the user's module: report it, do not crash on it
            raise EdgepartError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
        if not hasattr(module, factory):
            raise EdgepartError(f"{path} has no function {factory!r}")
        try:
            made = getattr(module, factory)()
        except Exception as e:  # noqa: BLE001
            raise EdgepartError(f"{spec}: the factory raised {type(e).__name__}: {e}") from e
        if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
            model, inputs = made
        else:
            model = made
            if not input_shape:
                raise EdgepartError(f"{spec} returned a model without example inputs; pass --input-shape 1,3,224,224")
            inputs = (torch.randn(*parse_shape(input_shape)),)
        if not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        return model.eval(), tuple(inputs), Path(path).stem
    try:
        model, inputs = models.get(spec, input_size=input_size)
    except KeyError as e:
        raise EdgepartError(str(e).strip("'\"")) from e
    return model, inputs, spec


def parse_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 1,3,224,224`` -> (1, 3, 224, 224); EdgepartError naming the option otherwise."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v <= 0 for v in shape):
        raise EdgepartError(f"--input-shape {text!r}: expected positive integers separated by commas, "
                            "e.g. 1,3,224,224")
    return shape


def cmd_compile(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EdgepartError(f"--out {args.out}: is a file; give a directory to write the bundle into")
    model, inputs, name = load_model(args.model, args.input_size, args.input_shape)
    cluster = Cluster.from_file(args.cluster) if args.cluster else Cluster.homogeneous(args.devices)
    bundle = compile_model(model, inputs, cluster, strategy=args.strategy, name=name, onnx=args.onnx)
    out = bundle.save(args.out)
    print(plan_table(bundle.manifest))
    for dev, b in bundle.report.get("backends", {}).items():
        stages = b.get("torch_stages") or {}
        print(f"{dev}: {b['backend']} ({b['why']})" + "".join(f"\n  stage {s} on torch: {why}" for s, why in stages.items()))
    if args.check:
        with torch.no_grad():
            ref = _onnx_reference(model, inputs) if isinstance(model, str) else model(*inputs)
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


def _onnx_reference(path: str, inputs: tuple) -> torch.Tensor:
    session = new_session(Path(path).read_bytes())
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])


def cmd_inspect(args) -> int:
    manifest = read_manifest(args.dir)
    print(plan_table(manifest))
    return 0


def cmd_keygen(args) -> int:
    # why: a function-local import keeps signing (cryptography) off the compile path's import time
    from edgepart.runtime.signing import generate_deploy_key, generate_run_key
    if bool(args.run) == bool(args.deploy):
        raise EdgepartError("keygen: give --run FILE (the shared run key) or --deploy FILE (a deploy signing key)")
    if args.run:
        path = generate_run_key(args.run)
        print(f"run key written to {path} (mode 0600): give it to workers and clients as --key-file")
    else:
        priv, pub = generate_deploy_key(args.deploy)
        print(f"deploy key written to {priv} (mode 0600; keep it off the workers) and its public key to {pub}: "
              f"start workers with --deploy-pubkey {pub}, deploy with --sign-key {priv}")
    return 0


def cmd_models(args) -> int:
    for n in models.names():
        print(f"{n:14s} default input {models.default_input_size(n)}")
    return 0


def cmd_train(args) -> int:
    # why: the training stack (datasets, torch-pruning) is loaded only by the commands that use it
    from edgepart.versions import TrainConfig, train_model
    torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    try:
        record = train_model(args.model, args.out, args.dataset, args.input_size, config, args.split_seed)
    except KeyError as e:
        raise EdgepartError(str(e).strip("'\"")) from e
    print(f"{args.model} on {args.dataset}: test accuracy {100 * record['test_accuracy']:.2f} % "
          f"({record['split_sizes']['test']} images), validation {100 * record['val_accuracy']:.2f} %, "
          f"{record['train_seconds']:.0f} s; written to {args.out}")
    return 0


def cmd_versions(args) -> int:
    from rich.console import Console

    # why: the training stack (datasets, torch-pruning) is loaded only by the commands that use it
    from edgepart.versions import TrainConfig, VersionSet, build_version_set
    from edgepart.versions.table import rich_table  # why: as above
    if args.target == "show":
        if not args.dir:
            raise EdgepartError("usage: edgepart versions show DIR")
        Console(width=None if sys.stdout.isatty() else 120).print(rich_table(VersionSet.load(args.dir)))
        return 0
    if not args.out:
        raise EdgepartError("edgepart versions MODEL needs --out DIR")
    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",")]
    if any(not 0 < s <= 1 for s in scales):
        raise EdgepartError(f"--scales {args.scales}: every scale must be in (0, 1]")
    try:
        vs = build_version_set(args.target, args.out, scales, args.dataset, args.input_size,
                               TrainConfig(epochs=args.epochs, seed=args.seed), int8=not args.no_int8,
                               split_seed=args.split_seed)
    except KeyError as e:
        raise EdgepartError(str(e).strip("'\"")) from e
    Console(width=None if sys.stdout.isatty() else 120).print(rich_table(vs))
    print(f"version set written to {args.out} in {vs.info['build_seconds']:.0f} s")
    return 0


def cmd_mcia(args) -> int:
    # why: the MCIA stack (version sets, PuLP) is loaded only by the command that uses it
    from edgepart.mcia import STRATEGIES, Tiers, load_tasks, plan
    from edgepart.mcia.build import build_table  # why: as above
    if args.action == "train":
        from edgepart.mcia.train import train  # why: as above (and stable-baselines3 only for training)
        train(args.out, steps=args.steps, seed=args.seed, pool=args.pool)
        return 0
    if args.tasks is None:
        raise EdgepartError(f"edgepart mcia {args.action} needs CLUSTER.yaml and TASKS.yaml")
    cluster = Cluster.from_file(args.cluster)
    tiers = Tiers.from_cluster(cluster)
    tasks, levels = load_tasks(args.tasks, tiers)
    if args.action == "run":
        return _mcia_run(args, cluster, tasks, levels)
    tables = [build_table(t, cluster, tiers) for t in tasks]
    names = STRATEGIES if args.strategy == "all" else [args.strategy]
    for name in names:
        sol = plan(tables, tiers, levels, name, time_limit=args.time_limit, policy=args.policy, rollouts=args.rollouts)
        info = f", {sol.solver} {sol.status}, gap {sol.gap:.2%}, {sol.solve_time:.2f} s" if name == "milp" else ""
        if name == "drl":
            info = f", {sol.solver}, {sol.status}, {1e3 * sol.solve_time / len(tables):.2f} ms per decision"
        print(f"{name}: objective {sol.objective:.4f}{info}")
        print(f"  {'task':12s} {'version':12s} {'end | edge | cloud cut after':34s} {'edge':>5s} {'uplink':>6s} "
              f"{'latency ms':>10s} {'accuracy':>8s}")
        for tb, c, o in zip(tables, sol.choices, sol.outcomes):
            v = tb.versions[c.version]
            label = (lambda k: v.cuts[k] if v.cuts else str(k))
            print(f"  {tb.task.name:12s} {v.name:12s} {label(c.k1) + ' | ' + label(c.k2):34s} "
                  f"{c.edge_share:>2d}/{levels:<2d} {c.up_share:>3d}/{levels:<2d} {o.latency_s * 1e3:10.2f} "
                  f"{o.accuracy:8.3f}")
            if args.explain:
                print(f"      end {o.end_s * 1e3:.2f} + uplink {o.up_s * 1e3:.2f} + edge {o.edge_s * 1e3:.2f} + "
                      f"WAN {o.wan_s * 1e3:.2f} + cloud {o.cloud_s * 1e3:.2f} ms; objective term {o.objective:.4f} "
                      f"(reference {tb.reference_s * 1e3:.2f} ms); weights end {o.end_bytes / 2 ** 20:.2f} MiB, "
                      f"edge {o.edge_bytes / 2 ** 20:.2f} MiB")
        for v in sol.violations:
            print(f"  violates: {v}")
    return 0


def _mcia_run(args, cluster, tasks, levels) -> int:
    from edgepart.mcia.run import MciaRun  # why: the testbed is loaded only by `mcia run`
    strategy = "milp" if args.strategy == "all" else args.strategy
    cpuset = [int(c) for c in args.cpuset.split(",")] if args.cpuset else None
    with MciaRun(cluster, tasks, levels, strategy, time_scale=args.time_scale, cpuset=cpuset,
                 time_limit=args.time_limit, calibrate=args.calibrate, log=print) as run:
        report = run.measure(requests=args.requests)
    print(report.table())
    print(f"time scale {report.time_scale:.3g}; median over tasks of (measured / predicted - 1): "
          f"{report.median_error * 100:+.1f} %; every output equals its version's: {report.all_exact}")
    return 0 if report.all_exact else 1


def _training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--input-size", type=int, default=32, help="images are resized to this side (default 32)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="weights and batch order")
    p.add_argument("--split-seed", type=int, default=0, help="the train/validation/test split")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


# Commands with their own argument parsers: `edgepart worker --listen ...` hands everything
# after the command name to the module, so its --help and options work unchanged.
DELEGATED = {
    "worker": ("edgepart.worker_main", "main", "run a worker on a device"),
    "deploy": ("edgepart.runtime.deploy_client", "main", "deploy a bundle to running workers"),
    "run": ("edgepart.runtime.client", "run_main", "run an input through deployed workers"),
    "profile": ("edgepart.fcpm.cli", "main", "profile this device (or a worker) for the FCPM"),
    "probe": ("edgepart.fcpm.probe", "main", "measure links between workers into a cluster file"),
    "serve": ("edgepart.online.serve", "main", "serve inference with online re-planning, plan swaps and failover"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepart", description="Compile and run CNNs across edge devices.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model for a cluster into a bundle directory")
    c.add_argument("model", help="zoo name, path/to/file.py:factory or path/to/model.onnx")
    c.add_argument("--cluster", help="cluster YAML (default: --devices homogeneous devices)")
    c.add_argument("--devices", type=int, default=2, help="number of equal devices when no --cluster is given")
    c.add_argument("--strategy", default="ofpm",
                   help="ofpm (default, the MILP) | single | even | proportional | neurosurgeon | dads | "
                        "modnn | deepthings | aofl | edgeld")
    c.add_argument("--out", required=True, help="bundle directory to write")
    c.add_argument("--input-size", type=int, help="input height/width for a zoo model")
    c.add_argument("--input-shape", help="example input shape for a file model, e.g. 1,3,224,224")
    c.add_argument("--onnx", action="store_true",
                   help="export every device's stages to ONNX (so any device can run on onnxruntime), not only "
                        "those of devices whose backend is onnxruntime")
    c.add_argument("--check", action="store_true", help="run the saved bundle locally and compare with the model")
    c.add_argument("--explain", action="store_true", help="print per-stage times and the critical path")
    c.add_argument("--gantt", help="draw the schedule to this PNG")
    c.set_defaults(func=cmd_compile)
    i = sub.add_parser("inspect", help="print a saved bundle's plan")
    i.add_argument("dir")
    i.set_defaults(func=cmd_inspect)
    m = sub.add_parser("models", help="list the model zoo")
    m.set_defaults(func=cmd_models)
    t = sub.add_parser("train", help="train a small zoo model on a data set (weights, spec, metadata)")
    t.add_argument("model", help="vgg_small | resnet_small | mobilenet_v2_small")
    t.add_argument("--out", required=True, help="directory for weights.safetensors, arch.json, meta.json")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=32)
    _training_arguments(t)
    t.set_defaults(func=cmd_train)
    v = sub.add_parser("versions", help="build a model's version set (pruned scales, int8), or show one",
                       description="edgepart versions MODEL --scales 1,0.75,0.5,0.25 --out DIR | "
                                   "edgepart versions show DIR")
    v.add_argument("target", help="a model to build versions of, or 'show'")
    v.add_argument("dir", nargs="?", help="with 'show': the version set directory")
    v.add_argument("--scales", default="1,0.75,0.5,0.25", help="fractions of channels kept")
    v.add_argument("--out", help="version set directory to write")
    v.add_argument("--no-int8", action="store_true", help="no int8 version")
    _training_arguments(v)
    v.set_defaults(func=cmd_versions)
    k = sub.add_parser("keygen", help="make a run key or a deploy signing key (docs/security.md)")
    k.add_argument("--run", help="write a new shared run key (32 random bytes, hex) to this file")
    k.add_argument("--deploy", help="write a new Ed25519 deploy key to this file and its public key to FILE.pub")
    k.set_defaults(func=cmd_keygen)
    mc = sub.add_parser("mcia", help="MCIA: version, end|edge|cloud cuts and shares for many tasks",
                        description="edgepart mcia plan|run CLUSTER.yaml TASKS.yaml [--strategy S] [--explain]; "
                                    "edgepart mcia train --out POLICY.json (docs/mcia.md)")
    mc.add_argument("action", choices=["plan", "run", "train"], help="plan: print the plan; run: run it on the "
                    "tiered emulated testbed (root) and compare latency with the prediction; train: the DRL policy")
    mc.add_argument("cluster", nargs="?", help="tiered cluster YAML (tier: end | edge | cloud per device)")
    mc.add_argument("tasks", nargs="?", help="tasks YAML")
    mc.add_argument("--strategy", default="milp",
                    help="milp (default) | drl | end-only | edge-only | cloud-only | neurosurgeon | greedy | random "
                         "| all")
    mc.add_argument("--policy", help="drl: the policy's JSON spec (default: the one shipped with edgepart)")
    mc.add_argument("--rollouts", type=int, help="drl: task orders to plan, the best kept (default: see docs/mcia.md)")
    mc.add_argument("--out", default="drl.json", help="train: the policy's JSON spec to write (weights beside it)")
    mc.add_argument("--steps", type=int, default=300_000, help="train: PPO environment steps")
    mc.add_argument("--seed", type=int, default=0, help="train: the seed (scenarios, PPO)")
    mc.add_argument("--pool", type=int, default=24, help="train: scenarios of 50 tasks drawn for training")
    mc.add_argument("--time-limit", type=float, default=60.0, help="MILP time limit in seconds")
    mc.add_argument("--explain", action="store_true", help="latency parts, objective terms, weights per task")
    mc.add_argument("--requests", type=int, default=10, help="run: requests per task (default 10)")
    mc.add_argument("--cpuset", help="run: CPUs the workers are pinned to, e.g. 1")
    mc.add_argument("--time-scale", type=float, help="run: emulated time ÷ wall time (default: fit the CPUs)")
    mc.add_argument("--calibrate", action="store_true", help="run: scale each version's compute times to its run "
                    "measured on this host (when the devices' profiles describe this host)")
    mc.set_defaults(func=cmd_mcia)
    for name, (_, _, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return p


# what a user's mistake raises outside edgepart's own errors (a missing or unreadable file, a bad value)
USER_ERRORS = (EdgepartError, OSError, yaml.YAMLError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else None
    try:
        if command in DELEGATED:
            module, func, _ = DELEGATED[command]
            return getattr(importlib.import_module(module), func)(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"edgepart: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — a bug: say so in one line, the traceback with --debug
        if debug:
            raise
        print(f"edgepart: internal error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
