"""The main job (``make demo``): compile a zoo model for a 4-device heterogeneous cluster,
run it on a local cluster of worker processes (emulated devices and links where this
machine allows), check every output against the original model, and print the plan,
per-device work, bytes moved, latency and the speed-up over the fastest single device
running the whole model under the same emulation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import edgepart
from edgepart import models
from edgepart.compiler.inspect import plan_table

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


def _max_rel_error(y, ref) -> float:
    if isinstance(ref, (tuple, list)):
        return max(_max_rel_error(a, b) for a, b in zip(y, ref))
    return float((y - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def _measure(bundle_dir: Path, inputs: list[torch.Tensor], refs: list, emulate: bool, label: str) -> dict:
    from edgepart.runtime.local import LocalCluster
    latencies, worst = [], 0.0
    with LocalCluster(bundle_dir, emulate=emulate) as c:
        c.infer(inputs[0])                         # warm-up: first request loads and JIT-warms everything
        for x, ref in zip(inputs, refs):
            t = time.perf_counter()
            y = c.infer(x)
            latencies.append(time.perf_counter() - t)
            worst = max(worst, _max_rel_error(y, ref))
            if worst > 1e-4:
                raise SystemExit(f"{label}: output differs from the model (relative error {worst:.3g})")
        stats = c.stats()
        scale, emulation = c.time_scale, c.emulation
    # Emulation may dilate time uniformly to fit this machine (see runtime/emulate.py):
    # measured × time_scale is the emulated devices' own time.
    return {"latencies": [t * scale for t in latencies], "worst": worst, "stats": stats,
            "scale": scale, "emulation": emulation}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgepart.demo", description=__doc__)
    ap.add_argument("--model", default="vgg16", help=f"zoo model ({', '.join(models.names())})")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--strategy", default=None, help="default: ofpm (the MILP)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--no-emulate", action="store_true", help="run workers at full speed, links unshaped")
    ap.add_argument("--out", default=None, help="bundle directory (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    strategy = args.strategy or "ofpm"
    size = args.input_size or {"vgg16": 160, "yolov2_tiny": 256}.get(args.model, models.default_input_size(args.model))
    model, (x0,) = models.get(args.model, input_size=size)
    cluster = edgepart.Cluster.from_dict(DEMO_CLUSTER)
    print(f"model {args.model} at {size}x{size}; cluster: {cluster}; strategy {strategy}")
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(x0.shape, generator=g) for _ in range(args.requests)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]

    work = Path(args.out or tempfile.mkdtemp(prefix="edgepart-demo-"))
    t = time.perf_counter()
    bundle = edgepart.compile(model, (x0,), cluster, strategy=strategy, name=args.model)
    bundle.save(work / "plan")
    single = edgepart.compile(model, (x0,), cluster, strategy="single", name=args.model)
    single.save(work / "single")
    print(f"compiled in {time.perf_counter() - t:.1f} s → {work}")
    print(plan_table(bundle.manifest))
    local_err = _max_rel_error(edgepart.load_bundle(work / "plan").run_local(inputs[0]), refs[0])
    print(f"reference executor: relative error {local_err:.2g}")

    emulate = not args.no_emulate
    part = _measure(work / "plan", inputs, refs, emulate, strategy)
    base = _measure(work / "single", inputs, refs, emulate, "single")
    p50, b50 = statistics.median(part["latencies"]), statistics.median(base["latencies"])
    print()
    print(f"emulation: {part['emulation']}")
    print(f"| run | requests | median latency (ms) | min (ms) | max rel. error |")
    print(f"|---|---|---|---|---|")
    print(f"| {strategy} on {len(cluster)} devices | {len(inputs)} | {p50 * 1e3:.1f} | "
          f"{min(part['latencies']) * 1e3:.1f} | {part['worst']:.1g} |")
    print(f"| single ({cluster.fastest()}) | {len(inputs)} | {b50 * 1e3:.1f} | "
          f"{min(base['latencies']) * 1e3:.1f} | {base['worst']:.1g} |")
    if part["stats"]:
        print()
        print("| device | compute (ms/request) | bytes sent/request | bytes received/request |")
        print("|---|---|---|---|")
        for dev, s in part["stats"].items():
            n = max(1, s.get("requests", len(inputs) + 1))
            print(f"| {dev} | {s.get('compute_us', 0) * part['scale'] / n / 1e3:.1f} | "
                  f"{s.get('bytes_sent', 0) / n:,.0f} | {s.get('bytes_received', 0) / n:,.0f} |")
    moved = sum(t[5] for t in bundle.manifest["transfers"])
    print(f"\nbytes moved per request (plan): {moved:,}")
    print(f"speed-up over the fastest single device ({cluster.fastest()}): {b50 / p50:.2f}x")
    print("all outputs match the original model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
