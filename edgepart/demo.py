"""The main job (``make demo``): compile a zoo model for a 4-device heterogeneous cluster,
run it on a local cluster of worker processes (emulated devices and links where this
machine allows), check every output against the original model, and print the plan,
per-device work, bytes moved, predicted and measured latency and the speed-up over the
fastest single device running the whole model under the same emulation.

The devices are described relative to this machine: each names the FCPM profile of one of
its cores (``profiles/host.json``) and its speed is a fraction of that core, so the cost model
the planner optimises is the one the emulated testbed realises. The testbed (root) pins the
workers to one CPU, stretches every compute stage to its device's speed (``cpu="dilate"``)
and scales the shares by the host's speed measured just before each request
(``HostSpeedProbe``), so other programs slowing this machine down do not change
the emulated devices' speeds.

Each device also names the ONNX Runtime profile of that core (``profiles/host_ort.json``); without
``--backend`` the compiler runs every device on whichever backend the profiles predict faster
(``edgepart.compiler.backends``), the online calibration times the model as that backend runs it, and
the report sets the plan's speed-up over the fastest single device on ONNX Runtime next to its
speed-up over that device on torch (both single-device runs measured under the same emulation).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import edgepart
from edgepart import models
from edgepart.compiler.backends import choose_backends
from edgepart.compiler.cost.calibration import Calibration, calibrate
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe
from edgepart.compiler.cost.model import ORT_WORKER_STAGE, StageOverhead, whole_model_bytes
from edgepart.compiler.cost.simulator import simulate_bundle
from edgepart.compiler.inspect import plan_table
from edgepart.passes import analyse
from edgepart.passes.trace import trace
from edgepart.testbed.emulator import netns_available
from edgepart.testbed.local import LocalCluster

DEMO_CLUSTER = {
    "source": "phone",
    "devices": [
        {"name": "phone", "speed": 0.4},
        {"name": "board", "speed": 0.5},
        {"name": "laptop", "speed": 0.7},
        {"name": "edge", "speed": 1.0},
    ],
    "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.5}},
}
HOST_PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "host.json"
HOST_ORT_PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "host_ort.json"
BACKENDS = ("torch", "onnxruntime")


def demo_cluster(profile: Path | None, calibration: Calibration | None = None, backend: str | None = None,
                 ort_profile: Path | None = None, stage: StageOverhead | None = None) -> dict:
    """The demo cluster; with a profile, every device's speed is relative to the profiled core, and
    with a calibration (measured just before) so are its memory speed, op types and layers.
    ``ort_profile``: every device's ONNX Runtime profile too; ``backend``: every device runs on it
    (None: no ``backend:`` key, the compiler chooses); ``stage``: what each device spends per stage beyond
    its layers (None: the cost model's defaults)."""
    if profile is None:
        devices = DEMO_CLUSTER["devices"]
    else:
        devices = [{**d, "profile": str(profile)} for d in DEMO_CLUSTER["devices"]]
    if stage is not None:
        devices = [{**d, **stage.device_keys(d["speed"])} for d in devices]
    if ort_profile is not None:
        devices = [{**d, "profiles": {"onnxruntime": str(ort_profile)}} for d in devices]
    if backend is not None:
        devices = [{**d, "backend": backend} for d in devices]
    described = {**DEMO_CLUSTER, "devices": devices}
    return described if calibration is None else calibration.apply(described)


def chosen_backend(model, x0, cluster_description: dict) -> str:
    """The backend the compiler would choose for the fastest device of the (uncalibrated) cluster."""
    cluster = edgepart.Cluster.from_dict(cluster_description)
    _, choice = choose_backends(analyse(trace(model, (x0,)), cluster), cluster)
    return choice[cluster.fastest()].backend


def _max_rel_error(y, ref) -> float:
    if isinstance(ref, (tuple, list)):
        return max(_max_rel_error(a, b) for a, b in zip(y, ref))
    return float((y - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def _measure(bundle_dir: Path, inputs: list[torch.Tensor], refs: list, emulate: bool, label: str,
             probe=None, cpuset=None) -> dict:
    latencies, worst, speeds, mems = [], 0.0, [], []

    def sample(budget_s: float) -> None:          # host speed, and memory speed relative to it
        m = probe.measure(budget_s)
        speeds.append(m["host_speed"])
        mems.append((m.get("memory_speed") or m["host_speed"]) / m["host_speed"])
    kw = {}
    if probe is not None:                         # devices relative to the profiled core: follow the host's speed
        sample(2.0)
        kw = {"cpu": "dilate", "cpuset": cpuset, "host_speed": speeds[0],
              # headroom: the quotas of all devices must still fit the pinned CPU if the host slows down
              "time_scale": min(1.0, 0.9 * 0.8 * speeds[0] / sum(d["speed"] for d in DEMO_CLUSTER["devices"]))}
    with LocalCluster(bundle_dir, emulate=emulate, **kw) as c:
        c.infer(inputs[0])                         # warm-up: first request loads and JIT-warms everything
        s0 = c.stats()
        for x, ref in zip(inputs, refs):
            if probe is not None and c.emulator is not None and c.emulator.mode == "netns":
                sample(0.6)
                c.emulator.set_host_speed(speeds[-1])
            t = time.perf_counter()
            y = c.infer(x)
            latencies.append(time.perf_counter() - t)
            worst = max(worst, _max_rel_error(y, ref))
            if worst > 1e-4:
                raise SystemExit(f"{label}: output differs from the model (relative error {worst:.3g})")
        s1 = c.stats()
        scale, emulation = c.time_scale, c.emulation
    stats = {d: {k: v - s0.get(d, {}).get(k, 0) for k, v in st.items() if isinstance(v, (int, float))}
             for d, st in s1.items()}
    # Emulation may dilate time uniformly to fit this machine (see testbed/emulator.py):
    # measured × time_scale is the emulated devices' own time.
    return {"latencies": [t * scale for t in latencies], "worst": worst, "stats": stats,
            "scale": scale, "emulation": emulation, "host_speeds": speeds,
            "memory_speeds": mems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgepart.demo", description=__doc__)
    ap.add_argument("--model", default="vgg16", help=f"zoo model ({', '.join(models.names())})")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--strategy", default=None, help="default: ofpm (the MILP)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--no-emulate", action="store_true", help="run workers at full speed, links unshaped")
    ap.add_argument("--no-profile", action="store_true",
                    help="plan with FLOPs ÷ speed instead of the host's FCPM profile ÷ speed")
    ap.add_argument("--backend", choices=BACKENDS, default=None,
                    help="run every device on this backend (default: the faster on the profiles)")
    ap.add_argument("--out", default=None, help="bundle directory (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    strategy = args.strategy or "ofpm"
    size = args.input_size or {"vgg16": 160, "yolov2_tiny": 256}.get(args.model, models.default_input_size(args.model))
    model, (x0,) = models.get(args.model, input_size=size)
    profile = HOST_PROFILE if HOST_PROFILE.is_file() and not args.no_profile else None
    ort_profile = HOST_ORT_PROFILE if profile is not None and HOST_ORT_PROFILE.is_file() else None
    backend = args.backend or (chosen_backend(model, x0, demo_cluster(profile, ort_profile=ort_profile))
                               if ort_profile is not None else "torch")
    emulate = not args.no_emulate
    probe, cpuset, calibration = None, None, None
    if emulate and profile is not None and netns_available()[0]:
        cpuset = [max(os.sched_getaffinity(0))] if len(os.sched_getaffinity(0)) > 1 else None
        probe = HostSpeedProbe(profile, cpuset)
        # Online step of DCFP: the emulator keeps each device's CPU speed as declared whatever the
        # host's speed now, but memory bandwidth drifts on its own, op types drift apart (memory-bound
        # ones slow down most when others share the caches), the model run whole as a device runs it
        # (its device program, in a worker) is not its layers timed one by one, and layers of one type
        # drift apart by size (thin slices of layers with large weights cost far more than their share
        # of the rows): measure all of it on this model now and plan with it.
        # the model whole timed as the demo runs it, a host-speed probe before each request (it evicts
        # the caches; an ONNX Runtime program is 1.2x slower after it, see calibration.program)
        # on ONNX Runtime each device is charged what a worker's stage costs beyond its layers (the testbed's
        # in-worker fit), and the model timed whole has its one stage's share of that taken off
        stage = ORT_WORKER_STAGE if backend == "onnxruntime" else None
        with torch.no_grad():
            stage_bytes = whole_model_bytes(model, (x0,), model(x0))
        calibration = calibrate(model, (x0,), probe, backend=backend,
                                profile=ort_profile if backend == "onnxruntime" else None,
                                between=(lambda: probe.measure(0.1)) if backend == "onnxruntime" else None,
                                stage_charge_s=stage.whole_model_s(*stage_bytes)
                                if stage else 0.0)
    else:
        stage = None
    cluster = edgepart.Cluster.from_dict(demo_cluster(profile, calibration, backend, ort_profile, stage))
    # the fastest device alone on the other backend, to compare with (its profile as it is: not calibrated)
    other = "torch" if backend == "onnxruntime" else "onnxruntime"
    other_cluster = edgepart.Cluster.from_dict(demo_cluster(profile, None, other, ort_profile)) \
        if other == "torch" or ort_profile is not None or profile is None else None
    print(f"model {args.model} at {size}x{size}; cluster: {cluster}; strategy {strategy}; every device on {backend}"
          + ("" if args.backend else " (the faster on the profiles)"))
    if calibration is not None:
        print(f"online calibration (speed now ÷ profiled, relative to the CPU's): memory {calibration.memory_speed:.2f}; "
              f"model whole {calibration.model_speed:.2f}; op types (× model) "
              + ", ".join(f"{f} {v:.2f}" for f, v in calibration.calibration.items())
              + f"; {len(calibration.node_calibration)} layers calibrated one by one, whole and sliced")
    if stage is not None:
        print(f"each stage a device runs is charged, beyond its layers: {stage.start_s * 1e6:.0f} µs + "
              f"{stage.io_s_per_byte * 1e12:.0f} µs per MB in and out + {stage.weights_s_per_byte * 1e12:.0f} µs per "
              "MB of weights its layers read, ÷ speed (ONNX Runtime in a worker, benchmarks/results/stage_overhead.md)")
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(x0.shape, generator=g) for _ in range(args.requests)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]

    # the bundles (VGG-16: about 1 GB) live in a temporary directory unless --out keeps them
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="edgepart-demo-")
    try:
        return _compile_run_report(Path(args.out or tmp.name), args, model, x0, cluster, strategy, inputs, refs,
                                   emulate, probe, cpuset, profile, backend, other_cluster)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _compile_run_report(work: Path, args, model, x0, cluster, strategy, inputs, refs, emulate, probe, cpuset,
                        profile, backend: str = "torch", other_cluster=None) -> int:
    """Compile the plan and the single-device baselines (``backend``'s, and with ``other_cluster`` the
    fastest device on the other backend) into ``work``, run them, print the report."""
    t = time.perf_counter()
    bundle = edgepart.compile(model, (x0,), cluster, strategy=strategy, name=args.model)
    bundle.save(work / "plan")
    single = edgepart.compile(model, (x0,), cluster, strategy="single", name=args.model)
    single.save(work / "single")
    other = None
    if other_cluster is not None:
        other = edgepart.compile(model, (x0,), other_cluster, strategy="single", name=args.model)
        other.save(work / "single_other")
    other_backend = "torch" if backend == "onnxruntime" else "onnxruntime"
    print(f"compiled in {time.perf_counter() - t:.1f} s → {work}")
    print(plan_table(bundle.manifest))
    local_err = _max_rel_error(edgepart.load_bundle(work / "plan").run_local(inputs[0]), refs[0])
    print(f"reference executor: relative error {local_err:.2g}")

    pred_part, pred_single = simulate_bundle(bundle), simulate_bundle(single)
    part = _measure(work / "plan", inputs, refs, emulate, strategy, probe, cpuset)
    base = _measure(work / "single", inputs, refs, emulate, "single", probe, cpuset)
    alt = _measure(work / "single_other", inputs, refs, emulate, f"single on {other_backend}", probe, cpuset) \
        if other is not None else None
    p50, b50 = statistics.median(part["latencies"]), statistics.median(base["latencies"])
    print()
    print(f"emulation: {part['emulation']}")
    if part["host_speeds"]:
        hs = part["host_speeds"] + base["host_speeds"]
        print(f"host speed (this CPU now ÷ the profiled core), measured before each request: "
              f"{min(hs):.2f}–{max(hs):.2f}; memory speed (÷ CPU speed): "
              f"{min(part['memory_speeds'] + base['memory_speeds']):.2f}–"
              f"{max(part['memory_speeds'] + base['memory_speeds']):.2f}")
    shown = HOST_ORT_PROFILE if backend == "onnxruntime" and profile else profile
    print(f"cost model: {'FCPM profile ' + str(shown.name) + ' ÷ speed' if shown else 'FLOPs ÷ speed'}"
          f"{', calibrated online (memory speed, op types, layers)' if probe is not None else ''}")
    print("| run | requests | predicted (ms) | median latency (ms) | error | min (ms) | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {strategy} on {len(cluster)} devices | {len(inputs)} | {pred_part.latency * 1e3:.1f} | {p50 * 1e3:.1f} | "
          f"{(p50 / pred_part.latency - 1) * 100:+.1f}% | {min(part['latencies']) * 1e3:.1f} | {part['worst']:.1g} |")
    print(f"| single ({cluster.fastest()}, {backend}) | {len(inputs)} | {pred_single.latency * 1e3:.1f} | "
          f"{b50 * 1e3:.1f} | {(b50 / pred_single.latency - 1) * 100:+.1f}% | {min(base['latencies']) * 1e3:.1f} | "
          f"{base['worst']:.1g} |")
    if alt is not None:
        a50 = statistics.median(alt["latencies"])
        print(f"| single ({cluster.fastest()}, {other_backend}; profile not calibrated) | {len(inputs)} | "
              f"{simulate_bundle(other).latency * 1e3:.1f} | {a50 * 1e3:.1f} | – | {min(alt['latencies']) * 1e3:.1f} | "
              f"{alt['worst']:.1g} |")
    if part["stats"]:
        print()
        print("| device | compute (ms/request) | predicted | bytes sent/request | bytes received/request |")
        print("|---|---|---|---|---|")
        for dev, s in part["stats"].items():
            n = max(1, s.get("requests", len(inputs)))
            print(f"| {dev} | {s.get('compute_us', 0) * part['scale'] / n / 1e3:.1f} | "
                  f"{pred_part.devices.get(dev, {}).get('compute', 0) * 1e3:.1f} | "
                  f"{s.get('bytes_sent', 0) / n:,.0f} | {s.get('bytes_received', 0) / n:,.0f} |")
    print()
    print(f"latency per request (ms), {strategy}: " + " ".join(f"{t * 1e3:.1f}" for t in part["latencies"]))
    print("latency per request (ms), single: " + " ".join(f"{t * 1e3:.1f}" for t in base["latencies"]))
    moved = sum(t.nbytes for t in bundle.manifest.transfers)
    print(f"\nbytes moved per request (plan): {moved:,}")
    print(f"speed-up over the fastest single device ({cluster.fastest()}) on {backend}: {b50 / p50:.2f}x measured, "
          f"{pred_single.latency / pred_part.latency:.2f}x predicted")
    if alt is not None:
        print(f"speed-up over the fastest single device ({cluster.fastest()}) on {other_backend}: "
              f"{statistics.median(alt['latencies']) / p50:.2f}x measured")
    print("all outputs match the original model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
