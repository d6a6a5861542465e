"""Runtime overhead: what edgepart's device program adds to a model's eager forward pass.

    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/runtime_overhead.py

The FCPM profile predicts the layers (fitted on layers and eager networks); a device program
runs each node through generated code: a row window from the request's store
(``StageContext.rows``: lookups, a ``torch.cat`` of pieces, explicit border-row padding — a copy
of the input of every row-padded convolution or pooling), the kernel, and a put back. For each
zoo model this times, in one process pinned to one CPU with one torch thread, interleaved, the
eager forward and the whole model as one stage of a single-device bundle (thread CPU time,
median of repeats, median over rounds), converts the difference to the profiled machine's time
with the host speed (``HostSpeedProbe``, measured each round), and fits
``overhead = a × nodes + b × bytes of row-padded inputs`` (non-negative least squares). The
cost model uses the result (``cost.RUNTIME_NODE_S``, ``cost.RUNTIME_PAD_BYTE_S``).

Writes benchmarks/results/runtime_overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster  # noqa: E402
from edgepart.compiler.bundle import compile_plan  # noqa: E402
from edgepart.compiler.cost.model import padded_input_bytes  # noqa: E402
from edgepart.passes.info import node_info  # noqa: E402
from edgepart.compiler.planning.plan import compute_nodes  # noqa: E402
from edgepart.compiler.planning.registry import STRATEGIES  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROFILE = ROOT / "profiles" / "host.json"
MODELS = [("vgg16", 160), ("resnet18", 224), ("yolov2_tiny", 256), ("mobilenet_v2", 224), ("inception", 224),
          ("unet", 128), ("alexnet", 224), ("resnet50", 224), ("se_resnet", 224)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=1)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    probe = HostSpeedProbe(PROFILE, [args.cpu])
    cl = Cluster.from_dict({"devices": [{"name": "h"}]})
    rows = []
    t_start = time.perf_counter()
    for name, size in MODELS:
        model, (x,) = models.get(name, input_size=size)
        gm = analyse(trace(model, (x,)), cl)
        nodes = list(compute_nodes(gm))
        padded = sum(padded_input_bytes(node_info(n), None) for n in nodes)
        b = compile_plan(gm, STRATEGIES["single"](gm, cl), cl, name)
        prog = b.programs()["h"]
        stage = next(iter(prog.spec.rows))
        inp = b.manifest.inputs[0].name

        def program():
            s = prog.new_store()
            s.put(inp, 0, x.shape[2], x)
            prog.run_stage(stage, s)
        diffs, ratios, speeds = [], [], []
        with torch.no_grad():
            model(x)
            program()
            for _ in range(args.rounds):
                speeds.append(probe.measure(0.5)["host_speed"])
                e, p = [], []
                for _ in range(args.repeats):
                    c = time.thread_time()
                    model(x)
                    e.append(time.thread_time() - c)
                    c = time.thread_time()
                    program()
                    p.append(time.thread_time() - c)
                me, mp = statistics.median(e), statistics.median(p)
                diffs.append((mp - me) * speeds[-1])
                ratios.append(mp / me - 1)
        r = {"model": name, "input": size, "nodes": len(nodes), "padded_bytes": padded,
             "overhead_s": statistics.median(diffs), "overhead_rel": statistics.median(ratios),
             "host_speed": statistics.median(speeds), "rounds_s": diffs}
        rows.append(r)
        print(f"{name:13s} nodes {len(nodes):4d} padded {padded / 1e6:6.2f} MB  overhead {r['overhead_s'] * 1e3:6.2f} ms "
              f"(profiled machine) = {r['overhead_rel'] * 100:+5.1f}% of eager  host_speed {r['host_speed']:.3f}",
              flush=True)
    from scipy.optimize import nnls
    A = np.array([[r["nodes"], r["padded_bytes"]] for r in rows], float)
    y = np.array([r["overhead_s"] for r in rows])
    scale = A.max(0)
    coef, _ = nnls(A / scale, y)
    coef = coef / scale
    fit = A @ coef
    for r, f in zip(rows, fit):
        r["fit_s"] = float(f)
    out = {"per_node_s": float(coef[0]), "per_padded_byte_s": float(coef[1]), "models": rows,
           "seconds": time.perf_counter() - t_start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_overhead.json").write_text(json.dumps(out, indent=1))
    lines = ["# Runtime overhead of the device program over the eager model", "",
             f"Generated by `benchmarks/runtime_overhead.py` on {time.strftime('%Y-%m-%d %H:%M')} (one torch thread, "
             f"pinned to CPU {args.cpu}, thread CPU time, {args.rounds} rounds × {args.repeats} interleaved repeats; "
             "times converted to the profiled machine with the host speed measured each round). The machine is "
             "shared with other jobs: a model's overhead varies by a few ms between runs.", "",
             f"Fit: **{coef[0] * 1e6:.2f} µs per node + {coef[1] * 1e9:.3f} ns per byte of row-padded input** "
             "(convolutions and poolings whose rows are padded copy their input window).", "",
             "| model | nodes | row-padded input MB | overhead ms | % of eager | fit ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']}@{r['input']} | {r['nodes']} | {r['padded_bytes'] / 1e6:.2f} | "
                     f"{r['overhead_s'] * 1e3:.2f} | {r['overhead_rel'] * 100:+.1f}% | {r['fit_s'] * 1e3:.2f} |")
    (RESULTS / "runtime_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"per node {coef[0] * 1e6:.2f} us, per padded byte {coef[1] * 1e9:.3f} ns; wrote {RESULTS}/runtime_overhead.*")


if __name__ == "__main__":
    main()
