"""Stage overhead on ONNX Runtime: what a stage of a real plan costs beyond its layers' calibrated prediction.

    /work/bin/measure .venv/bin/python benchmarks/stage_overhead.py                  # resnet18, mobilenet_v2, yolov2_tiny
    /work/bin/measure .venv/bin/python benchmarks/stage_overhead.py --models resnet18 --requests 6

``stage_start.py`` times the start of one-layer stages (``modnn``) warm and after a wait. A stage of the
plans the testbed runs holds many layers, and ONNX Runtime pays at its boundary what the profile's
layers and a model run whole pay once: the session reorders each input into its blocked (NCHWc)
layout and each output back, and the program copies the feeds. This benchmark takes the testbed's
cells as they are planned (the testbed's four devices, 1000 Mbit/s, the model calibrated online as
``testbed.py --backend onnxruntime`` calibrates it), compiles the distinct plans of ofpm and the
baselines on ONNX Runtime, and times every (device, stage) run by thread CPU:

- *in process*: every device's program in this process (``Bundle.run_local``, one thread, pinned);
- *in workers*: the bundle on the emulated testbed (``LocalCluster(emulate=True)``, dilated, pinned to
  one CPU, a host-speed probe before every request as ``testbed.py`` runs them).

Each run's time × the host speed (profiled-machine seconds) minus its layers' prediction — the
simulator's stage time with no stage start and no boundary charge, × the device's speed — is its
overhead; a least-squares fit ``overhead = a + b × bytes``, bytes = what the stage reads from outside
it and leaves for after it (``simulator.stage_io_bytes``), gives the per-stage start ``a`` and the per-byte
``b``. The in-process fit is what the cost model charges a device on ONNX Runtime
(``cost.ORT_STAGE_S``, ``cost.ORT_STAGE_IO_S_PER_BYTE``); the in-worker fit is what ``testbed.py
--backend onnxruntime`` charges its emulated devices (``stage_start_ms``, ``stage_io_us_per_mb``).
Both are checked leave-one-model-out against the constant the cost model charged before.

Writes benchmarks/results/stage_overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edgepart import models  # noqa: E402
from edgepart.compiler.bundle import compile_plan  # noqa: E402
from edgepart.compiler.cost.calibration import calibrate  # noqa: E402
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe  # noqa: E402
from edgepart.compiler.cost.model import CostModel  # noqa: E402
from edgepart.compiler.cost.simulator import simulate, stage_io_bytes, stage_weight_bytes  # noqa: E402
from edgepart.compiler.planning import baselines  # noqa: E402,F401 — registers the baselines
from edgepart.compiler.planning.ofpm import solve_ofpm  # noqa: E402
from edgepart.compiler.planning.registry import STRATEGIES  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.runtime.program import DeviceProgram  # noqa: E402

from results_notes import write_keeping_analysis  # noqa: E402
from testbed import DEVICES, MODELS, PROFILE, PROFILES, make_cluster  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STRATEGY_NAMES = ["single", "neurosurgeon", "dads", "deepthings", "aofl", "edgeld"]
BACKEND = "onnxruntime"


def time_in_process(bundle, x, rounds: int) -> dict[tuple, float]:
    """{(device, stage): median thread CPU seconds} over ``rounds`` reference runs (after one untimed)."""
    times: dict[tuple, list[float]] = {}
    run_stage = DeviceProgram.run_stage

    def timed(self, stage, store):
        c = time.thread_time()
        run_stage(self, stage, store)
        times.setdefault((self.device, stage), []).append(time.thread_time() - c)
    with torch.no_grad():
        bundle.run_local(x)
        times.clear()
        DeviceProgram.run_stage = timed
        try:
            for _ in range(rounds):
                bundle.run_local(x)
        finally:
            DeviceProgram.run_stage = run_stage
    return {k: statistics.median(v) for k, v in times.items()}


def time_in_workers(bundle, x, requests: int, cpu: int, probe, host_speed: float) -> dict[tuple, float]:
    """{(device, stage): thread CPU seconds per request} on the emulated testbed (speeds as declared,
    dilated, pinned to ``cpu``), a 0.6 s host-speed probe before every request as testbed.py runs them."""
    from edgepart.testbed.local import LocalCluster
    speeds = [s for _, s in DEVICES]
    ts = min(1.0, 0.8 * host_speed / max(speeds), 0.9 * 0.8 * host_speed / sum(speeds))
    with tempfile.TemporaryDirectory(prefix="edgepart-stage-overhead-") as tmp:
        bundle.save(tmp)
        with LocalCluster(tmp, emulate=True, cpuset=[cpu], host_speed=host_speed, time_scale=ts, cpu="dilate") as c:
            for _ in range(2):
                c.infer(x)
            before = c.stats()
            for _ in range(requests):
                c.emulator.set_host_speed(probe.measure(0.6)["host_speed"])
                c.infer(x)
            after = c.stats()
    out = {}
    for dev, st in after.items():
        for k, v in st.items():
            if k.startswith("stage_cpu_us:"):
                out[(dev, int(k.split(":")[1]))] = (v - before[dev].get(k, 0)) * 1e-6 / requests
    return out


def plan_sums(rows: list[dict], key: str, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per plan (model, strategy): x = [runs, Σ column ...] ÷ its measured sum, y = (measured − Σ layers) ÷ it —
    the least-squares system of a plan's relative error (``columns``: per-run byte counts)."""
    plans: dict[tuple, list[dict]] = {}
    for r in rows:
        plans.setdefault((r["model"], r["plan"]), []).append(r)
    x, y = [], []
    for sub in plans.values():
        m = sum(r[key] for r in sub)
        x.append([len(sub) / m] + [sum(r.get(c, 0.0) for r in sub) / m for c in columns])
        y.append((m - sum(r["layers_s"] for r in sub)) / m)
    return np.array(x), np.array(y)


def fit3(rows: list[dict], key: str) -> list[float]:
    """``overhead = a + b × io bytes + c × weight bytes`` (the bytes of the weights the stage's layers read),
    fitted like :func:`fit` on the plans' sums with every coefficient >= 0 (scipy's non-negative least
    squares). Reported next to the two-term fit, not charged."""
    from scipy.optimize import nnls
    x, y = plan_sums(rows, key, ["io_bytes", "weight_bytes"])
    scale = np.maximum(x.max(axis=0), 1e-30)          # columns of µs and of bytes: solve on comparable scales
    coef, _ = nnls(x / scale, y)
    return [float(v) for v in coef / scale]


def fit(rows: list[dict], key: str, a_fixed: float | None = None) -> tuple[float, float]:
    """``overhead = a + b × bytes`` per run, fitted on whole plans: least squares of each plan's relative
    error (Σ layers + a × runs + b × Σ bytes against its runs' measured sum) — what the planner weighs
    is a plan's time, and a plan of hundreds of one-layer stages must not outweigh the plans of a few
    large ones. a, b >= 0 (a negative one is the noise of the layers' prediction; the other is refitted
    alone). ``a_fixed``: a is given (measured elsewhere), only b is fitted."""
    x, y = plan_sums(rows, key, ["io_bytes"])
    if a_fixed is not None:
        y = y - a_fixed * x[:, 0]
        return a_fixed, max(0.0, float((x[:, 1] @ y) / max(x[:, 1] @ x[:, 1], 1e-30)))
    a, b = np.linalg.lstsq(x, y, rcond=None)[0]
    if a >= 0 and b >= 0:
        return float(a), float(b)
    a_only = max(0.0, float((x[:, 0] @ y) / max(x[:, 0] @ x[:, 0], 1e-30)))
    b_only = max(0.0, float((x[:, 1] @ y) / max(x[:, 1] @ x[:, 1], 1e-30)))
    res = lambda a_, b_: float(np.sum((x @ np.array([a_, b_]) - y) ** 2))  # noqa: E731
    return (a_only, 0.0) if res(a_only, 0.0) <= res(0.0, b_only) else (0.0, b_only)


def in_process_start() -> float:
    """What the cost model charges an ONNX Runtime stage start (profiled machine): the profile's session
    call + ``cost.ORT_STAGE_S``, measured on its own by stage_start.py; the in-process fit keeps it."""
    from edgepart.compiler.cost.model import ort_stage_start
    from edgepart.fcpm.model import DeviceProfile
    return ort_stage_start(DeviceProfile.load(PROFILES[BACKEND]))


def within(rows: list[dict], key: str, a: float, b: float, tol: float) -> float:
    ok = [abs((r["layers_s"] + a + b * r["io_bytes"]) / r[key] - 1) <= tol for r in rows]
    return sum(ok) / max(1, len(ok))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2", "yolov2_tiny"], choices=list(MODELS))
    ap.add_argument("--mbps", type=float, default=1000.0)
    ap.add_argument("--rounds", type=int, default=7, help="reference runs timed in process")
    ap.add_argument("--requests", type=int, default=8, help="requests timed in the workers")
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="1: also time in emulated workers (default: with netns)")
    ap.add_argument("--from-json", action="store_true", help="re-render the md from results/stage_overhead.json")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads((RESULTS / "stage_overhead.json").read_text())
        render(saved, args)
        return
    if args.workers is None:
        from edgepart.testbed.emulator import netns_available
        args.workers = int(netns_available()[0])
    warnings.filterwarnings("ignore")
    os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    probe = HostSpeedProbe(PROFILE, [args.cpu])
    speed = dict(DEVICES)
    rows: list[dict] = []
    plans_done: list[dict] = []
    t_start = time.perf_counter()
    for name in args.models:
        size = MODELS[name]
        model, (x,) = models.get(name, input_size=size)
        cal = calibrate(model, (x,), probe, time_model=True, time_layers=True, backend=BACKEND,
                        profile=PROFILES[BACKEND], between=lambda: probe.measure(0.1))
        # the layers alone: no stage start, no boundary charge
        cl = make_cluster(args.mbps, calibration=cal, stage_start_s=0.0, stage_io_s_per_byte=0.0, backend=BACKEND)
        gm = analyse(trace(model, (x,)), cl)
        cost = CostModel(cl)
        plans = {s: STRATEGIES[s](gm, cl) for s in STRATEGY_NAMES}
        plans["ofpm"] = solve_ofpm(gm, cl, cost, time_limit=10.0, warm_start=dict(plans)).plan
        seen: list = []
        for s, plan in plans.items():
            key = plan.to_dict()["stages"]
            if key in seen:
                continue
            seen.append(key)
            b = compile_plan(gm, plan, cl, name)
            sim = simulate(b.schedule, cl, cost, gm=gm)
            io = stage_io_bytes(b.schedule)
            weights = stage_weight_bytes(gm, b.schedule)
            hs = probe.measure(1.0)["host_speed"]
            inproc = time_in_process(b, x, args.rounds)
            hs = (hs + probe.measure(1.0)["host_speed"]) / 2
            wk = time_in_workers(b, x, args.requests, args.cpu, probe, hs) if args.workers else {}
            n = 0
            for r in sim.runs:
                k = (r.device, r.stage)
                if r.end <= r.start or k not in inproc:
                    continue
                row = {"model": name, "plan": s, "device": r.device, "stage": r.stage,
                       "layers_s": (r.end - r.start) * speed[r.device], "io_bytes": io.get(k, 0.0),
                       "weight_bytes": weights.get(k, 0.0),
                       "in_process_s": inproc[k] * hs, "host_speed": hs}
                if k in wk:
                    row["workers_s"] = wk[k] * hs
                rows.append(row)
                n += 1
            plans_done.append({"model": name, "plan": s, "stages": len(plan.stages), "runs": n})
            print(f"{name:13s} {s:13s} {len(plan.stages)} stages, {n} runs  host_speed {hs:.3f}  "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
    out = {"argv": " ".join(sys.argv[1:]), "generated": time.strftime("%Y-%m-%d %H:%M"), "mbps": args.mbps,
           "plans": plans_done, "rows": rows, "fits": {}, "seconds": time.perf_counter() - t_start,
           "rounds": args.rounds, "requests": args.requests, "cpu": args.cpu}
    render(out, args)


def render(out: dict, args) -> None:
    """Fit, check and write results/stage_overhead.{json,md} from the measured ``out`` (rows, plans)."""
    rows = out["rows"]
    args.mbps, args.cpu = out.get("mbps", args.mbps), out.get("cpu", args.cpu)
    args.rounds, args.requests = out.get("rounds", args.rounds), out.get("requests", args.requests)
    out["fits"] = {}
    lines = ["# Stage overhead on ONNX Runtime: a stage's time beyond its layers", "",
             f"Generated by `benchmarks/stage_overhead.py {out['argv']}` on {out['generated']} "
             f"({out['seconds'] / 60:.1f} min): the testbed's cells at {args.mbps:g} Mbit/s, each model calibrated "
             "online as `testbed.py --backend onnxruntime` does; the distinct plans of ofpm and the baselines "
             "compiled on ONNX Runtime; every (device, stage) run timed by thread CPU in process (one thread, "
             f"pinned to CPU {args.cpu}, medians of {args.rounds} runs) and in emulated workers (dilated, pinned, "
             f"a host-speed probe before each of {args.requests} requests); × host speed = profiled-machine time. "
             "Overhead = that − the layers' calibrated prediction (× the device's speed); fit "
             "`overhead = a + b × bytes` per run (bytes the stage reads from outside and leaves for after it) on the "
             "plans' sums, each plan's relative error weighted alike (`fit`); in process a is kept at the cost model's "
             "ONNX Runtime stage start (the profile's session call + `cost.ORT_STAGE_S`, measured by `stage_start.py`) "
             "and only b fitted. The first table checks it per run.", "",
             "| where | runs | a: per stage (µs) | b: per MB (µs) | within ±10 %: layers + 112 µs | "
             "fitted | leave-one-model-out | within ±15 %: layers + 112 µs | fitted | leave-one-model-out |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in [("in_process_s", "in process"), ("workers_s", "in workers")]:
        sub = [r for r in rows if key in r]
        if len(sub) < 3:
            continue
        a_fixed = in_process_start() if key == "in_process_s" else None
        a, b = fit(sub, key, a_fixed)
        loo = {}
        for tol in (0.10, 0.15):
            hits = 0
            for m in {r["model"] for r in sub}:
                train = [r for r in sub if r["model"] != m]
                test = [r for r in sub if r["model"] == m]
                aa, bb = fit(train, key, a_fixed) if len(train) >= 3 else (a, b)
                hits += within(test, key, aa, bb, tol) * len(test)
            loo[tol] = hits / len(sub)
        out["fits"][key] = {"a_s": a, "b_s_per_byte": b, "runs": len(sub),
                            "within10_constant": within(sub, key, 112e-6, 0.0, 0.10),
                            "within10_fit": within(sub, key, a, b, 0.10), "within10_loo": loo[0.10],
                            "within15_constant": within(sub, key, 112e-6, 0.0, 0.15),
                            "within15_fit": within(sub, key, a, b, 0.15), "within15_loo": loo[0.15]}
        f = out["fits"][key]
        f["fit3"] = fit3(sub, key)
        lines.append(f"| {label} | {len(sub)} | {a * 1e6:.0f} | {b * 1e12:.0f} | {f['within10_constant']:.0%} | "
                     f"{f['within10_fit']:.0%} | {f['within10_loo']:.0%} | {f['within15_constant']:.0%} | "
                     f"{f['within15_fit']:.0%} | {f['within15_loo']:.0%} |")
    lines += ["", "## Per plan: its runs' time summed (profiled-machine ms)", "",
              "What the planner weighs: a plan's total compute over its devices. *constant*: the layers + 112 µs "
              "per stage (what the testbed charged before); *fitted*: the layers + a + b × bytes of this file's fit.", "",
              "| model | plan | runs | in workers | constant | error | fitted | error | in process | fitted | error |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fw, fp = out["fits"].get("workers_s"), out["fits"].get("in_process_s")
    for p in out["plans"]:
        sub = [r for r in rows if r["model"] == p["model"] and r["plan"] == p["plan"]]
        if not sub or fp is None:
            continue
        ip = sum(r["in_process_s"] for r in sub)
        ip_fit = sum(r["layers_s"] + fp["a_s"] + fp["b_s_per_byte"] * r["io_bytes"] for r in sub)
        cells = ["–"] * 5
        if fw is not None and all("workers_s" in r for r in sub):
            wk = sum(r["workers_s"] for r in sub)
            const = sum(r["layers_s"] + 112e-6 for r in sub)
            fit_w = sum(r["layers_s"] + fw["a_s"] + fw["b_s_per_byte"] * r["io_bytes"] for r in sub)
            cells = [f"{wk * 1e3:.2f}", f"{const * 1e3:.2f}", f"{(const / wk - 1) * 100:+.0f}%",
                     f"{fit_w * 1e3:.2f}", f"{(fit_w / wk - 1) * 100:+.0f}%"]
        lines.append(f"| {p['model']} | {p['plan']} | {len(sub)} | " + " | ".join(cells)
                     + f" | {ip * 1e3:.2f} | {ip_fit * 1e3:.2f} | {(ip_fit / ip - 1) * 100:+.0f}% |")
    lines += ["", "## A third term: the weights a stage reads (reported, not charged)", "",
              "`overhead = a + b × bytes in and out + c × bytes of the weights its layers read`, fitted on the same "
              "plan sums with a, b, c >= 0 (`fit3`); plan sums' errors with it.", ""]
    for key, label in [("in_process_s", "in process"), ("workers_s", "in workers")]:
        f = out["fits"].get(key)
        if not f:
            continue
        a3, b3, c3 = f["fit3"]
        errs = []
        for p in out["plans"]:
            sub = [r for r in rows if r["model"] == p["model"] and r["plan"] == p["plan"] and key in r]
            if sub:
                m = sum(r[key] for r in sub)
                pr = sum(r["layers_s"] + a3 + b3 * r["io_bytes"] + c3 * r.get("weight_bytes", 0.0) for r in sub)
                errs.append(f"{p['model']} {p['plan']} {(pr / m - 1) * 100:+.0f}%")
        lines.append(f"- {label}: a = {a3 * 1e6:.0f} µs, b = {b3 * 1e12:.0f} µs per MB, c = {c3 * 1e12:.0f} µs per MB of "
                     f"weights — " + ", ".join(errs))
    lines += ["", "## Every run (profiled-machine µs)", "",
              "| model | plan | device | stage | KB in+out | layers | in process | in workers |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        w = f"{r['workers_s'] * 1e6:.0f}" if "workers_s" in r else "–"
        lines.append(f"| {r['model']} | {r['plan']} | {r['device']} | {r['stage']} | {r['io_bytes'] / 1e3:.0f} | "
                     f"{r['layers_s'] * 1e6:.0f} | {r['in_process_s'] * 1e6:.0f} | {w} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stage_overhead.json").write_text(json.dumps(out, indent=1))
    write_keeping_analysis(RESULTS / "stage_overhead.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
