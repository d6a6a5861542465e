"""Stage start: what a device pays to start a stage after waiting for its input pieces.

    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/stage_start.py
    .venv/bin/python benchmarks/stage_start.py --backend onnxruntime --cache /tmp/ss --prepare   # compile only
    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/stage_start.py --backend onnxruntime --cache /tmp/ss

The FCPM profile times layers back to back, caches warm. A device of a partitioned plan runs a
stage, then waits for the next stage's pieces (network, other devices); meanwhile its core sleeps
or runs something else, and the next stage starts with cold caches and branch predictors. For
each model this compiles a plan with many short stages (``modnn``: every layer split across four
devices, one stage per layer), runs every device's program in one process (``Bundle.run_local``,
one torch thread, pinned to one CPU) and times each (device, stage) run by thread CPU time, in
two interleaved modes: back to back (warm), and after a ``--wait`` ms sleep before each stage
(as after a wait for pieces). The difference per run, converted to the profiled machine's time
with the host speed (``HostSpeedProbe``), is the stage-start cost; its median over all
runs is what the cost model charges per (device, stage) (``cost.RUNTIME_STAGE_S``).

With root (``--workers``, the default when network namespaces are available) the same bundle
also runs on the emulated testbed (``LocalCluster(emulate=True)``, four workers of speed 1.0
sharing one pinned CPU, as ``testbed.py`` runs them) and each (device, stage)'s thread CPU
there (the workers' ``stage_cpu_us:S``) is compared with the warm in-process run: the cold start
plus what the emulation adds (the other workers run on the same core between two stages of one),
reported, not charged beyond the cold start (a real device has its core to itself).

``--backend onnxruntime``: every device runs its stages as ONNX Runtime sessions (each stage one
exported graph, one thread), and the figure is what the cost model charges an ORT stage on top of
the profile's session call (``cost.ORT_STAGE_S``); the emulated-worker figure is what
``testbed.py --backend onnxruntime`` charges. Exporting a ``modnn`` plan's hundreds of stages takes
minutes: ``--cache DIR --prepare`` compiles the bundles into DIR without timing anything (outside the
measurement lock), ``--cache DIR`` then times the bundles found there.

Writes benchmarks/results/stage_start.{json,md} (``--backend onnxruntime``: stage_start_ort.{json,md}).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster  # noqa: E402
from edgepart.compiler.planning import baselines  # noqa: E402,F401 — registers modnn
from edgepart.compiler.bundle import compile_plan, load_bundle  # noqa: E402
from edgepart.compiler.cost.model import ORT_STAGE_S, RUNTIME_STAGE_S  # noqa: E402
from edgepart.compiler.planning.registry import STRATEGIES  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe  # noqa: E402
from edgepart.runtime.program import DeviceProgram  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROFILE = ROOT / "profiles" / "host.json"
MODELS = [("resnet18", 224), ("mobilenet_v2", 224), ("yolov2_tiny", 256), ("vgg16", 160)]


def time_stages(bundle, x, rounds: int, wait_s: float) -> dict[str, dict[tuple, list[float]]]:
    """{mode: {(device, stage): [thread CPU seconds per run]}}, warm and cold runs interleaved."""
    times: dict[str, dict[tuple, list[float]]] = {"warm": {}, "cold": {}}
    mode = {"now": "warm"}
    run_stage = DeviceProgram.run_stage

    def timed(self, stage, store):
        if mode["now"] == "cold":
            time.sleep(wait_s)
        c = time.thread_time()
        run_stage(self, stage, store)
        times[mode["now"]].setdefault((self.device, stage), []).append(time.thread_time() - c)
    DeviceProgram.run_stage = timed
    try:
        with torch.no_grad():
            bundle.run_local(x)
            for m in ["warm", "cold"] * rounds:
                mode["now"] = m
                bundle.run_local(x)
    finally:
        DeviceProgram.run_stage = run_stage
    return times


def time_in_workers(bundle, x, requests: int, cpu: int, host_speed: float) -> dict[tuple, float]:
    """{(device, stage): thread CPU seconds per request} in emulated workers sharing CPU ``cpu``."""
    import tempfile

    from edgepart.testbed.local import LocalCluster
    ts = min(1.0, 0.9 * 0.8 * host_speed / len(bundle.devices))   # every device's share fits the one CPU
    with tempfile.TemporaryDirectory(prefix="edgepart-stage-start-") as tmp:
        bundle.save(tmp)
        with LocalCluster(tmp, emulate=True, cpuset=[cpu], host_speed=host_speed, time_scale=ts, cpu="dilate") as c:
            for _ in range(3):
                c.infer(x)
            before = c.stats()
            for _ in range(requests):
                c.infer(x)
            after = c.stats()
    out = {}
    for dev, st in after.items():
        for k, v in st.items():
            if k.startswith("stage_cpu_us:"):
                out[(dev, int(k.split(":")[1]))] = (v - before[dev].get(k, 0)) * 1e-6 / requests
    return out


def bundle_for(name: str, model, x, backend: str, cache: str | None):
    """The ``modnn`` bundle of ``model`` for four devices on ``backend``: loaded from ``cache`` if it was
    compiled there, else compiled (and saved there)."""
    where = Path(cache) / f"{name}-{backend}" if cache else None
    if where is not None and (where / "manifest.json").exists():
        return load_bundle(where)
    cl = Cluster.from_dict({"source": "a", "devices": [{"name": n, "backend": backend} for n in "abcd"],
                            "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.5}}})
    gm = analyse(trace(model, (x,)), cl)
    b = compile_plan(gm, STRATEGIES["modnn"](gm, cl), cl, name)
    if where is not None:
        b.save(where)
    return b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--wait", type=float, default=2.0, help="ms of idle before each stage in the cold mode")
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None,
                    help="1: also time the stages in emulated workers (default: when netns is available), 0: not")
    ap.add_argument("--requests", type=int, default=10, help="requests timed in the workers")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                    help="what the devices run their stages on (onnxruntime: results/stage_start_ort.*)")
    ap.add_argument("--cache", default=None, help="directory of the compiled bundles (reused if there)")
    ap.add_argument("--prepare", action="store_true", help="with --cache: only compile the bundles into it")
    ap.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(m for m, _ in MODELS)}")
    args = ap.parse_args(argv)
    out_name = "stage_start" if args.backend == "torch" else "stage_start_ort"
    charged = RUNTIME_STAGE_S if args.backend == "torch" else ORT_STAGE_S
    const_name = "RUNTIME_STAGE_S" if args.backend == "torch" else "ORT_STAGE_S"
    todo = [(m, s) for m, s in MODELS if not args.models or m in args.models]
    if args.prepare:
        if not args.cache:
            ap.error("--prepare needs --cache")
        for name, size in todo:
            model, (x,) = models.get(name, input_size=size)
            t = time.perf_counter()
            bundle_for(name, model, x, args.backend, args.cache)
            print(f"{name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        return
    if args.workers is None:
        from edgepart.testbed.emulator import netns_available
        args.workers = int(netns_available()[0])
    warnings.filterwarnings("ignore")
    os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    probe = HostSpeedProbe(PROFILE, [args.cpu])
    rows, all_extra = [], []
    t_start = time.perf_counter()
    for name, size in todo:
        model, (x,) = models.get(name, input_size=size)
        b = bundle_for(name, model, x, args.backend, args.cache)
        hs = probe.measure(1.0)["host_speed"]
        times = time_stages(b, x, args.rounds, args.wait * 1e-3)
        hs = (hs + probe.measure(1.0)["host_speed"]) / 2
        extra = [(statistics.median(times["cold"][k]) - statistics.median(times["warm"][k])) * hs
                 for k in times["warm"]]
        warm = [statistics.median(v) * hs for v in times["warm"].values()]
        all_extra += extra
        in_workers = []
        if args.workers:
            wk = time_in_workers(b, x, args.requests, args.cpu, hs)
            in_workers = [(wk[k] - statistics.median(times["warm"][k])) * hs for k in times["warm"] if k in wk]
        r = {"model": name, "input": size, "stages": len(b.plan.stages), "runs": len(extra),
             "warm_median_s": statistics.median(warm), "extra_median_s": statistics.median(extra),
             "extra_p25_s": statistics.quantiles(extra, n=4)[0], "extra_p75_s": statistics.quantiles(extra, n=4)[2],
             "host_speed": hs,
             "workers_extra_median_s": statistics.median(in_workers) if in_workers else None,
             "workers_extra_rel_median": statistics.median(e / w for e, w in zip(in_workers, warm)) if in_workers else None}
        rows.append(r)
        print(f"{name:13s} stages {r['stages']:3d} runs {r['runs']:4d}  warm median {r['warm_median_s'] * 1e3:6.3f} ms  "
              f"start cost median {r['extra_median_s'] * 1e3:6.3f} ms (IQR {r['extra_p25_s'] * 1e3:.3f}–"
              f"{r['extra_p75_s'] * 1e3:.3f})  host_speed {hs:.3f}"
              + (f"  in workers +{r['workers_extra_median_s'] * 1e3:.3f} ms ({r['workers_extra_rel_median'] * 100:+.0f}%)"
                 if in_workers else ""), flush=True)
    per_stage = statistics.median(all_extra)
    out = {"per_stage_s": per_stage, "wait_ms": args.wait, "models": rows, "seconds": time.perf_counter() - t_start,
           "backend": args.backend}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(out, indent=1))
    on = "" if args.backend == "torch" else " — every stage an ONNX Runtime session"
    lines = [f"# Stage start: cost of starting a stage after a wait{on}", "",
             f"Generated by `benchmarks/stage_start.py` on {time.strftime('%Y-%m-%d %H:%M')}: `modnn` plans (one "
             f"stage per layer, 4 devices) run in one process (one thread, pinned to CPU {args.cpu}; stages on "
             f"{args.backend}); each "
             f"(device, stage) run timed by thread CPU, back to back (warm) and after {args.wait:g} ms idle (cold), "
             f"{args.rounds} interleaved rounds, medians; converted to the profiled machine with the host speed.", "",
             f"Median over all {len(all_extra)} (device, stage) runs: **{per_stage * 1e6:.0f} µs per stage start** "
             f"(the cost model charges {charged * 1e6:.0f} µs, `cost.{const_name}`"
             + (", on top of the profile's session call `stage_start_s`" if args.backend != "torch" else "") + ").", "",
             ("Emulated workers (four of speed 1.0 on one pinned CPU, dilated, as `testbed.py` runs them; "
              f"{args.requests} requests after 3 warm-up): thread CPU of each (device, stage) minus its warm "
              "in-process time — the cold start plus what sharing one core with the other workers adds; "
              "reported, not charged." if args.workers else
              "Emulated workers: not measured (no network namespaces / root)."), "",
             "| model | stages | runs | warm run median ms | start cost median ms | IQR ms | in workers: extra median ms "
             "| in workers: extra ÷ warm |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wx = (f"{r['workers_extra_median_s'] * 1e3:.3f} | {r['workers_extra_rel_median'] * 100:+.0f}%"
              if r["workers_extra_median_s"] is not None else "– | –")
        lines.append(f"| {r['model']}@{r['input']} | {r['stages']} | {r['runs']} | {r['warm_median_s'] * 1e3:.3f} | "
                     f"{r['extra_median_s'] * 1e3:.3f} | {r['extra_p25_s'] * 1e3:.3f}–{r['extra_p75_s'] * 1e3:.3f} | {wx} |")
    (RESULTS / f"{out_name}.md").write_text("\n".join(lines) + "\n")
    print(f"per stage start {per_stage * 1e6:.0f} us; wrote {RESULTS}/{out_name}.*")


if __name__ == "__main__":
    main()
