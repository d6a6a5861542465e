"""ONNX Runtime as a device backend (#19): measured single-device latency and simulated partitioning.

    .venv/bin/python benchmarks/ort.py            # every zoo model at its default input size
    .venv/bin/python benchmarks/ort.py --quick    # three models, fewer repeats

Part 1, measured on this machine, one thread, the process pinned to one core
(``os.sched_setaffinity``), per zoo model: the eager torch model, the whole model exported to
ONNX in one ONNX Runtime session, and edgepart's device program of a one-device bundle on each
backend (``torch``: the generated Python program, node by node; ``onnxruntime``: its stages as
exported ONNX graphs). Median of repeated runs after warm-up; runs alternate between the
executors so that the machine's drift touches all of them alike.

Part 2, simulated with the one cost model: on a cluster of heterogeneous devices whose profiles
are ``profiles/host.json`` (torch) and ``profiles/host_ort.json`` (ONNX Runtime), the latency of
ofpm's plan with every device on ONNX Runtime against ONNX Runtime on the fastest single device
(and the same two on torch).

Part 3 (``--testbed MODEL:SIZE:MBPS,...``, root): the same comparison on the emulated testbed of
benchmarks/testbed.py — worker processes in network namespaces with tc links and dilated compute
stages — parts 1 and 2 kept from the last run.

Writes benchmarks/results/ort.{json,md}.
"""
from __future__ import annotations

import argparse
import io
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

import edgepart  # noqa: E402
from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster, Device  # noqa: E402
from edgepart.compiler.backends import choose_backends  # noqa: E402
from edgepart.compiler.cost.model import CostModel  # noqa: E402
from edgepart.compiler.cost.simulator import simulate_plan  # noqa: E402
from edgepart.compiler.planning.registry import make_plan  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes.graph import COMPUTE_OPS  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.runtime.interpreter import run_reference  # noqa: E402
from edgepart.runtime.ort import new_session  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROFILES = {"torch": str(ROOT / "profiles" / "host.json"), "onnxruntime": str(ROOT / "profiles" / "host_ort.json")}
SPEEDS = [1.0, 2.0, 1.5, 1.0]          # d1 is the fastest
MBPS = [100.0, 1000.0]


def export(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    model.eval()
    return buf.getvalue()


def measure(calls: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each zero-argument callable, interleaved run by run."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def single_device(name: str, repeats: int) -> dict:
    model, (x,) = models.get(name)
    session = new_session(export(model, x))
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.numpy())}
    bundle = edgepart.compile(model, (x,), Cluster([Device("d0", backend="onnxruntime")]), strategy="single")
    on_ort, on_torch = bundle.programs(), bundle.programs("torch")
    torch_stages = bundle.report["backends"]["d0"].get("torch_stages", {})
    inputs = {bundle.manifest.inputs[0].name: x}
    with torch.no_grad():
        t = measure({"torch_eager": lambda: model(x),
                     "ort_session": lambda: session.run(None, feed),
                     "program_torch": lambda: run_reference(on_torch, inputs),
                     "program_ort": lambda: run_reference(on_ort, inputs)},
                    repeats)
    return {"model": name, "input": list(x.shape), **{k: v * 1e3 for k, v in t.items()},
            "stages_on_torch": torch_stages}


def simulated(name: str) -> dict:
    model, (x,) = models.get(name)
    row = {"model": name}
    for mbps in MBPS:
        for backend in ("torch", "onnxruntime"):
            cluster = Cluster([Device(f"d{i}", s, backend=backend, profile=PROFILES["torch"],
                                      profiles=(("onnxruntime", PROFILES["onnxruntime"]),))
                               for i, s in enumerate(SPEEDS)], {"bandwidth_mbps": mbps, "latency_ms": 1.0})
            gm = trace(model, (x,))
            analyse(gm, cluster)
            cost = CostModel(cluster)
            ofpm = simulate_plan(gm, make_plan(gm, cluster, "ofpm"), cluster, cost).latency
            single = simulate_plan(gm, make_plan(gm, cluster, "single"), cluster, cost).latency
            row[f"{backend}@{mbps:g}"] = {"ofpm_ms": ofpm * 1e3, "single_ms": single * 1e3}
            # the profile's prediction of the whole model on one device of speed 1, to set beside part 1
            row[f"predicted_{backend}_ms"] = 1e3 * (cost.stage_start_time("d0") + sum(
                cost.compute_time(n, "d0") for n in gm.graph.nodes if n.op in COMPUTE_OPS))
    # the compiler's own choice for a device with both profiles and no backend: key
    both = Cluster([Device("d0", 1.0, profile=PROFILES["torch"], profiles=(("onnxruntime", PROFILES["onnxruntime"]),))])
    gm = analyse(trace(model, (x,)), both)
    row["auto"] = choose_backends(gm, both)[1]["d0"].backend
    return row


def write(rows1: list[dict], rows2: list[dict], meta: dict, testbed: list[dict] | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    if testbed is None and (RESULTS / "ort.json").exists():      # parts 1-2 again: keep part 3
        testbed = json.loads((RESULTS / "ort.json").read_text()).get("testbed")
    (RESULTS / "ort.json").write_text(json.dumps({"meta": meta, "single_device": rows1, "simulated": rows2,
                                                  "testbed": testbed or []}, indent=1))
    md = ["# ONNX Runtime as a device backend (#19)", "",
          f"`benchmarks/ort.py{' --quick' if meta['quick'] else ''}`, {meta['date']}; {meta['note']}"
          + (f"; part 2 simulated again {meta['simulated']} (`--reuse-measured`)" if meta.get("simulated") else ""),
          "",
          "## Measured: one device, one thread, pinned to one core (median ms)", "",
          "| model | input | torch eager | ORT session | program on torch | program on ORT | ORT ÷ eager | "
          "program ORT ÷ program torch | stages left on torch |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows1:
        md.append(f"| {r['model']} | {r['input'][2]} | {r['torch_eager']:.1f} | {r['ort_session']:.1f} | "
                  f"{r['program_torch']:.1f} | {r['program_ort']:.1f} | {r['ort_session'] / r['torch_eager']:.2f} | "
                  f"{r['program_ort'] / r['program_torch']:.2f} | "
                  f"{'; '.join(f'{s}: {w}' for s, w in r['stages_on_torch'].items()) or '—'} |")
    md += ["", "## Simulated: ofpm vs the fastest single device (ms)", "",
           f"Devices of speeds {SPEEDS} (d1 fastest), links 1 ms latency; each device costed with its backend's "
           "profile (`profiles/host.json` for torch, `profiles/host_ort.json` for ONNX Runtime).", "",
           "| model | Mbit/s | ORT: single | ORT: ofpm | ORT speed-up | torch: single | torch: ofpm | torch speed-up |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows2:
        for mbps in MBPS:
            o, t = r[f"onnxruntime@{mbps:g}"], r[f"torch@{mbps:g}"]
            md.append(f"| {r['model']} | {mbps:g} | {o['single_ms']:.1f} | {o['ofpm_ms']:.1f} | "
                      f"{o['single_ms'] / o['ofpm_ms']:.2f}× | {t['single_ms']:.1f} | {t['ofpm_ms']:.1f} | "
                      f"{t['single_ms'] / t['ofpm_ms']:.2f}× |")
    measured = {r["model"]: r for r in rows1}
    md += ["", "## The profiles against part 1 (one device of speed 1, whole model, ms)", "",
           "What the planner believes: each backend's profile predicts the whole model on one device; "
           "part 1 measured the device program. `host.json` is a full torch sweep on a quiet host (4 load "
           "levels, 2026-12-02); `host_ort.json` an ONNX Runtime sweep of half the full design at load 0 "
           "(401 configurations, 2 passes, 16 synthetic networks), pinned to one core under the measurement "
           "lock (2026-12-04 21:15 UTC, see profiles/README.md). Part 1 ran on a loaded host, so its absolute "
           "times are above both profiles' alike; the ratio ORT ÷ torch is what the compiler's automatic "
           "choice (no `backend:` key) rests on, and *auto* is what it picks for a device of speed 1 with "
           "both profiles.", "",
           "| model | torch: predicted | torch: measured | ORT: predicted | ORT: measured | "
           "predicted ORT ÷ torch | measured ORT ÷ torch | auto |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows2:
        m = measured.get(r["model"])
        if m is None:
            continue
        pt, po = r["predicted_torch_ms"], r["predicted_onnxruntime_ms"]
        md.append(f"| {r['model']} | {pt:.1f} | {m['program_torch']:.1f} | {po:.1f} | {m['program_ort']:.1f} | "
                  f"{po / pt:.2f} | {m['program_ort'] / m['program_torch']:.2f} | {r.get('auto', '–')} |")
    if testbed:
        md += ["", f"## Emulated testbed, uncalibrated: ofpm vs the fastest single device (median ms, "
               f"{meta.get('testbed', '')})", "",
               "Superseded by `benchmarks/testbed.py --backend onnxruntime` (results/testbed_ort.md: calibrated "
               "online on ONNX Runtime, measured against predicted, ORT and torch single side by side). "
               "`benchmarks/ort.py --testbed ...`: the four devices of benchmarks/testbed.py (phone 0.4 — the "
               "source —, board 0.5, laptop 0.7, edge 1.0) as worker processes in network namespaces with tc "
               "links, compute stages dilated to each device's speed (host speed taken as 1.0), 5 requests "
               "after 2 warm-up; latency in the emulated devices' time. Every device on one backend.", "",
               "| model | input | Mbit/s | ORT: single | ORT: ofpm | ORT speed-up | torch: single | torch: ofpm | "
               "torch speed-up | worst rel. error |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in testbed:
            o1, o2, t1, t2 = (c[k]["median_ms"] for k in ("onnxruntime/single", "onnxruntime/ofpm", "torch/single",
                                                          "torch/ofpm"))
            err = max(c[k]["worst_rel_error"] for k in c if "/" in k)
            md.append(f"| {c['model']} | {c['input']} | {c['mbps']:g} | {o1:.1f} | {o2:.1f} | {o1 / o2:.2f}× | "
                      f"{t1:.1f} | {t2:.1f} | {t1 / t2:.2f}× | {err:.1e} |")
    (RESULTS / "ort.md").write_text("\n".join(md) + "\n")


def testbed_cell(name: str, size: int, mbps: float, requests: int = 5) -> dict:
    """Part 3: ofpm and the fastest single device, each backend, on the emulated testbed of
    benchmarks/testbed.py (its four devices; network namespaces and tc need root; CPU stages dilated
    on CPU 1, host speed taken as 1.0): median request latency in the emulated devices' time."""
    import testbed  # benchmarks/testbed.py: its devices and its measurement on LocalCluster(emulate=True)
    model, (x0,) = models.get(name, input_size=size)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(x0.shape, generator=g) for _ in range(requests)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
    emu = {"probe": None, "cpuset": [1], "period_us": None, "cpu": "dilate", "time_scale": None, "host_speed": 1.0}
    cell = {"model": name, "input": size, "mbps": mbps}
    for backend in ("onnxruntime", "torch"):
        cluster = Cluster.from_dict({
            "source": testbed.DEVICES[0][0], "links": {"default": {"bandwidth_mbps": mbps, "latency_ms": 0.5}},
            "devices": [{"name": n, "speed": s, "backend": backend, "profile": PROFILES["torch"],
                         "profiles": {"onnxruntime": PROFILES["onnxruntime"]}} for n, s in testbed.DEVICES]})
        for strategy in ("ofpm", "single"):
            bundle = edgepart.compile(model, (x0,), cluster, strategy=strategy, name=name)
            with tempfile.TemporaryDirectory(prefix="edgepart-ort-") as tmp:
                bundle.save(Path(tmp) / "b")
                r = testbed.measure(Path(tmp) / "b", inputs, refs, 2, emu)
            cell[f"{backend}/{strategy}"] = {"median_ms": r["median"] * 1e3, "worst_rel_error": r["worst_rel_error"],
                                             "emulation": r["emulation"]}
            print(name, backend, strategy, f"{r['median'] * 1e3:.1f} ms", flush=True)
    return cell


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None, help="comma-separated zoo names (default: all, quick: three)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--core", type=int, default=None, help="the core to pin to (default: the last one allowed)")
    ap.add_argument("--reuse-measured", action="store_true",
                    help="keep part 1 from results/ort.json (e.g. after a new profile), run part 2 only")
    ap.add_argument("--testbed", default=None,
                    help="part 3 only (root): MODEL:SIZE:MBPS,... on the emulated testbed, parts 1-2 kept from "
                         "results/ort.json")
    a = ap.parse_args()
    if a.testbed:
        previous = json.loads((RESULTS / "ort.json").read_text())
        cells = [testbed_cell(m, int(size), float(mbps)) for m, size, mbps in
                 (c.split(":") for c in a.testbed.split(","))]
        previous["meta"]["testbed"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write(previous["single_device"], previous["simulated"], previous["meta"], cells)
        print(f"wrote {RESULTS / 'ort.md'}")
        return 0
    names = a.models.split(",") if a.models else (
        ["resnet18", "mobilenet_v2", "yolov2_tiny"] if a.quick else models.names())
    core = a.core if a.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    repeats = a.repeats or (5 if a.quick else 15)
    rows1 = []
    if a.reuse_measured:
        previous = json.loads((RESULTS / "ort.json").read_text())
        rows1, meta1 = previous["single_device"], previous["meta"]
    for n in names if not a.reuse_measured else ():
        rows1.append(single_device(n, repeats))
        print(json.dumps(rows1[-1]), flush=True)
    rows2 = []
    for n in names:
        rows2.append(simulated(n))
        print(json.dumps(rows2[-1]), flush=True)
    load = os.getloadavg()[0]
    if a.reuse_measured:
        meta1["simulated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write(rows1, rows2, meta1)
        print(f"wrote {RESULTS / 'ort.md'}")
        return 0
    meta = {"quick": a.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "core": core,
            "repeats": repeats, "loadavg_1min": load,
            "note": f"pinned to core {core}; load average {load:.1f} on {os.cpu_count()} cores while measuring "
                    "(a shared machine: absolute times are noisy, the ratios of interleaved runs less so)"}
    write(rows1, rows2, meta)
    print(f"wrote {RESULTS / 'ort.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
