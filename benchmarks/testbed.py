"""Testbed: predicted (simulator) vs measured latency on the emulated testbed, side by side.

    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/testbed.py            # 4 models x 100/1000 Mbit/s
    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/testbed.py --quick    # vgg16 at 1000 Mbit/s

A subset of the partition-quality grid runs for real: each model is compiled for four
heterogeneous devices (phone 0.4, board 0.5, laptop 0.7, edge 1.0 — the demo's) whose compute
is the host's FCPM profile (``profiles/host.json``, one core of this machine) ÷ speed, with
100 and 1000 Mbit/s links (0.5 ms latency). Strategies: ``ofpm``, ``single`` (the whole model
on the fastest device; the input still arrives at the phone) and the best baseline by simulation.
Each plan's latency is predicted by the simulator with the same cost model the planner used,
then the bundle runs on ``LocalCluster(emulate=True)``: every worker in a cgroup with a CPU
quota of its speed, all pinned to one CPU (``--cpuset``; workers never run at the same time
as each other, as devices of a real cluster would not share a core), links shaped with tbf.
Before each run the host's current speed relative to the profile is measured
(``HostSpeedProbe``: whole forward passes of reference networks, or ``--probe layers``: a sample
of the profile's recorded layers re-timed) and the
quotas are scaled by it, so an emulated device really has the speed the cluster declares
even when other programs slow this machine's cores down. Measured = median over
``--rounds`` × ``--requests`` sequential requests after warm-up, × time_scale (the emulated
devices' time); each round deploys and runs every strategy of a cell once, in an order rotated
from round to round, so the strategies are compared side by side rather than minutes apart.

``--backend onnxruntime``: every device runs its stages in ONNX Runtime (#19); plans are costed
with the ONNX Runtime profile (``profiles/host_ort.json``), the online calibration times the model's
layers and its device program as ONNX Runtime runs them, and each cell also runs the single-device
plan on torch, so the table reports ofpm on ONNX Runtime against ONNX Runtime *and* torch on the
fastest device. ``--pools-before`` (#21) also runs the ofpm plan of the compiler without
``passes.pools`` (global pools whole), side by side with the ofpm plan of the compiler as it is.

Writes benchmarks/results/testbed.{json,md,png} (``--out`` to name them otherwise).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster  # noqa: E402
from edgepart.compiler.planning import baselines  # noqa: E402,F401
from edgepart.compiler.backends import choose_backends  # noqa: E402
from edgepart.compiler.bundle import compile_plan  # noqa: E402
from edgepart.compiler.schedule import build_schedule  # noqa: E402
from edgepart.compiler.cost.calibration import Calibration, calibrate  # noqa: E402
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe  # noqa: E402
from edgepart.compiler.cost.model import CostModel, StageOverhead, ort_stage_start, whole_model_bytes  # noqa: E402
from edgepart.fcpm.model import DeviceProfile as FittedProfile  # noqa: E402
from edgepart.compiler.planning.ofpm import solve_ofpm  # noqa: E402
from edgepart.compiler.planning.registry import STRATEGIES  # noqa: E402
from edgepart.compiler.cost.simulator import simulate  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.runtime.allocator import release_memory  # noqa: E402

from results_notes import write_keeping_analysis  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROFILE = ROOT / "profiles" / "host.json"
PROFILES = {"torch": PROFILE, "onnxruntime": ROOT / "profiles" / "host_ort.json"}
MODELS = {"vgg16": 160, "resnet18": 224, "yolov2_tiny": 256, "mobilenet_v2": 224, "se_resnet": 224}
DEFAULT_MODELS = ["vgg16", "resnet18", "yolov2_tiny", "mobilenet_v2"]
TORCH_SINGLE = "single on torch"       # the extra strategy of --backend onnxruntime
BEFORE_POOLS = "ofpm before pools"     # the extra strategy of --pools-before
DEVICES = [("phone", 0.4), ("board", 0.5), ("laptop", 0.7), ("edge", 1.0)]
BASELINES = ["neurosurgeon", "dads", "modnn", "deepthings", "aofl", "edgeld"]
BANDS = [100, 1000]
TOLERANCE = 0.15


def make_cluster(mbps: float, profile: Path = PROFILE, calibration: Calibration | None = None,
                 stage_start_s: float | None = None, backend: str | None = None,
                 stage_io_s_per_byte: float | None = None, stage_weights_s_per_byte: float | None = None) -> Cluster:
    """The testbed's cluster; ``calibration``: the online calibration of the model on this host
    (``edgepart.compiler.cost.calibration.calibrate``; every device is this host), None: the profile as
    it is; ``stage_start_s``: seconds of the profiled machine a stage start costs (each device's
    ``stage_start_ms`` is it ÷ speed; None: the cost model's constant). ``backend``: every device runs
    on it (with the ONNX Runtime profile for ``onnxruntime``); None: no ``backend:`` key (torch, as
    the compiler chooses without an ONNX Runtime profile). ``stage_io_s_per_byte``: seconds of the profiled
    machine per byte a stage reads from outside it and leaves for after it (each device's
    ``stage_io_us_per_mb`` is it ÷ speed; None: the cost model's constant); ``stage_weights_s_per_byte``:
    the same per byte of weights a stage's layers read (``stage_weights_us_per_mb``; None: not charged)."""
    extra = StageOverhead(stage_start_s, stage_io_s_per_byte, stage_weights_s_per_byte).device_keys
    on = {} if backend is None else {"backend": backend, "profiles": {"onnxruntime": str(PROFILES["onnxruntime"])}}
    description = {
        "source": "phone",
        "devices": [{"name": n, "speed": s, "profile": str(profile), **on, **extra(s)} for n, s in DEVICES],
        "links": {"default": {"bandwidth_mbps": mbps, "latency_ms": 0.5}}}
    return Cluster.from_dict(description if calibration is None else calibration.apply(description))


def workers_stage_start(backend: str = "torch") -> float | None:
    """What a stage start costs inside the emulated workers on ``backend`` (profiled-machine seconds): the
    median over models of benchmarks/stage_start.py's in-worker excess over warm (``stage_start.json``;
    ``stage_start_ort.json`` on ONNX Runtime, where the profile's session call is added, as
    ``cost.ort_stage_start`` adds it); None if not measured."""
    name = "stage_start.json" if backend == "torch" else "stage_start_ort.json"
    try:
        rows = json.loads((RESULTS / name).read_text())["models"]
        vals = [r["workers_extra_median_s"] for r in rows if r.get("workers_extra_median_s") is not None]
    except (OSError, ValueError, KeyError):
        return None
    if not vals:
        return None
    extra = statistics.median(vals)
    return extra if backend == "torch" else ort_stage_start(FittedProfile.load(PROFILES[backend]), extra)


def workers_stage_overhead() -> tuple[float, float, float] | None:
    """(seconds per stage, per byte in and out of a stage, per byte of weights its layers read), profiled
    machine, of a stage on ONNX Runtime inside the emulated workers, as benchmarks/stage_overhead.py fitted
    them on the testbed's own plans (``stage_overhead.json``: the layers' calibrated prediction + a + b ×
    bytes + c × weight bytes, its non-negative three-term fit); None if not measured."""
    try:
        f = json.loads((RESULTS / "stage_overhead.json").read_text())["fits"]["workers_s"]
        a, b, c = (float(v) for v in f["fit3"])
        return a, b, c
    except (OSError, ValueError, KeyError, TypeError):
        return None


def max_rel_error(y, ref) -> float:
    if isinstance(ref, (tuple, list)):
        return max(max_rel_error(a, b) for a, b in zip(y, ref))
    return float((y - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def plan_schedule(gm, plan, cl: Cluster):
    """The schedule ``compile_plan(gm, plan, cl, ...)`` builds, without compiling the bundle (its
    weights, ONNX graphs and sessions): what the simulator predicts a plan from."""
    return build_schedule(gm, plan, choose_backends(gm, cl)[0])


def host_speed_now(emu: dict, budget_s: float) -> float:
    return emu["probe"].measure(budget_s)["host_speed"]


def measure(bundle_dir: Path, inputs, refs, warmup: int, emu: dict) -> dict:
    """Run the bundle on the emulated testbed: per-request latency × time_scale, per-device compute.

    host_speed "auto": measured before the run (2 s) to fix the time scale (with 20 % headroom
    for drift: every device's quota must fit the pinned CPUs), then re-measured (about 1 s) before
    every request and the quotas re-scaled to it (``Emulator.set_host_speed``), so drift of this
    machine's speed between and during runs does not bias one strategy against another."""
    from edgepart.testbed.local import LocalCluster
    auto = emu.get("host_speed") == "auto"
    hs0 = host_speed_now(emu, 2.0) if auto else float(emu.get("host_speed") or 1.0)
    ncpu = len(emu["cpuset"]) if emu.get("cpuset") else (os.cpu_count() or 1)
    speeds = [s for _, s in DEVICES]
    ts = emu.get("time_scale") or min(1.0, 0.8 * hs0 / max(speeds), 0.9 * ncpu * 0.8 * hs0 / sum(speeds))
    hss, mss = [], []
    t_start = time.perf_counter()
    with LocalCluster(bundle_dir, emulate=True, cpuset=emu.get("cpuset"), cpu_period_us=emu.get("period_us"),
                      host_speed=hs0, time_scale=ts, cpu=emu.get("cpu", "dilate")) as c:
        started = time.perf_counter() - t_start

        def one(x):
            if auto:
                m = emu["probe"].measure(0.6)
                hs = m["host_speed"]
                c.emulator.set_host_speed(hs)
                hss.append(hs)
                if m.get("memory_speed"):
                    mss.append(m["memory_speed"] / hs)
            t = time.perf_counter()
            y = c.infer(x)
            return y, time.perf_counter() - t
        for i in range(warmup):
            one(inputs[i % len(inputs)])
        hss.clear()
        mss.clear()
        s0, cpu0 = c.stats(), c.emulator.cpu_stat()
        lat, worst = [], 0.0
        for x, ref in zip(inputs, refs):
            y, dt = one(x)
            lat.append(dt)
            worst = max(worst, max_rel_error(y, ref))
        s1, cpu1 = c.stats(), c.emulator.cpu_stat()
        scale, desc = c.time_scale, c.emulation
        cores = {d: c.emulator.cores(d) for d in s1}
    n = len(inputs)
    per_dev = {}
    for d in s1:
        a, b = s0.get(d, {}), s1[d]
        th, th0 = cpu1.get(d, {}), cpu0.get(d, {})
        per_dev[d] = {"compute_s": (b.get("compute_us", 0) - a.get("compute_us", 0)) * 1e-6 * scale / n,
                      "bytes_sent": (b.get("bytes_sent", 0) - a.get("bytes_sent", 0)) / n,
                      "throttled_periods": (th.get("nr_throttled", 0) - th0.get("nr_throttled", 0)) / n,
                      # minor page faults in the worker's stages: what the workers' malloc settings keep at ~0
                      "page_faults": sum(v - a.get(k, 0) for k, v in b.items() if k.startswith("stage_faults:")) / n,
                      # per stage, per request: wall time (emulated device's time) and raw CPU time of this host
                      "stages": {k.split(":", 1)[1]: {"wall_s": (v - a.get(k, 0)) * 1e-6 * scale / n,
                                                      "cpu_s": (b.get("stage_cpu_us:" + k.split(":", 1)[1], 0)
                                                                - a.get("stage_cpu_us:" + k.split(":", 1)[1], 0)) * 1e-6 / n,
                                                      "preempted": (b.get("stage_preempted:" + k.split(":", 1)[1], 0)
                                                                    - a.get("stage_preempted:" + k.split(":", 1)[1], 0)) / n}
                                 for k, v in b.items() if k.startswith("stage_us:")},
                      "cores": cores.get(d)}
    lat_s = [t * scale for t in lat]
    return {"latencies": lat_s, "median": statistics.median(lat_s), "min": min(lat_s), "max": max(lat_s),
            "worst_rel_error": worst, "time_scale": scale, "host_speed": statistics.median(hss) if hss else hs0,
            "host_speeds": hss, "memory_speeds": mss, "host_speed_start": hs0, "emulation": desc, "devices": per_dev,
            "startup_s": started, "wall_s": time.perf_counter() - t_start}


def preempted(device_run: dict) -> float | None:
    """Times per request a device's compute thread was preempted mid-stage (None: not recorded)."""
    got = [st["preempted"] for st in device_run.get("stages", {}).values() if "preempted" in st]
    return sum(got) if got else None


def merge_rounds(runs: list[dict]) -> dict:
    """One strategy's measurements over several rounds (each a :func:`measure` result) as one:
    latencies pooled, per-device figures averaged per request, each round's median kept."""
    lat = [t for r in runs for t in r["latencies"]]
    hss = [h for r in runs for h in r["host_speeds"]] or [r["host_speed"] for r in runs]
    devices: dict[str, dict] = {}
    for r in runs:
        for d, v in r["devices"].items():
            acc = devices.setdefault(d, {})
            w = len(r["latencies"]) / len(lat)
            for k, x in v.items():
                if k == "stages":
                    for st, fig in x.items():
                        a = acc.setdefault("stages", {}).setdefault(st, {f: 0.0 for f in fig})
                        for f, y in fig.items():
                            a[f] += y * w
                elif x is not None:
                    acc[k] = acc.get(k, 0.0) + x * w
    return {"latencies": lat, "median": statistics.median(lat), "min": min(lat), "max": max(lat),
            "round_medians": [r["median"] for r in runs],
            "worst_rel_error": max(r["worst_rel_error"] for r in runs),
            "time_scale": statistics.median(r["time_scale"] for r in runs),
            "time_scales": [r["time_scale"] for r in runs],
            "host_speed": statistics.median(hss), "host_speeds": hss,
            "memory_speeds": [m for r in runs for m in r["memory_speeds"]],
            "host_speed_start": runs[0]["host_speed_start"], "emulation": runs[0]["emulation"],
            "devices": devices, "startup_s": sum(r["startup_s"] for r in runs),
            "wall_s": sum(r["wall_s"] for r in runs)}


def run(model_names, bands, n_requests, warmup, emu, time_limit, n_baselines, rounds=1, log=print):
    cells = []
    for name in model_names:
        size = MODELS[name]
        model, (x0,) = models.get(name, input_size=size)
        g = torch.Generator().manual_seed(1)
        inputs = [torch.randn(x0.shape, generator=g) for _ in range(n_requests)]
        with torch.no_grad():
            refs = [model(x) for x in inputs]
        for mbps in bands:
            # online calibration (DCFP), measured now, planned and predicted with: memory bandwidth and each
            # op type's speed relative to the CPU speed the emulator normalises away, on the model's own
            # layers and the model whole as a device runs it (its device program in a worker, stopped
            # before the testbed's workers start), then each layer whole and sliced
            backend = emu.get("backend") or "torch"
            cal = None
            if emu.get("probe") is not None and not emu.get("no_memory"):
                # the model whole timed as the testbed runs it: a host-speed probe before every request
                # (it evicts the caches: +25 % on MobileNetV2 on ONNX Runtime, +5 % on torch)
                cold = emu.get("model_timing", "cold" if backend != "torch" else "warm") == "cold"
                between = (lambda: emu["probe"].measure(0.1)) if cold else None
                # what the cost model will charge the model's one stage beyond its layers (stage overhead fitted
                # on ONNX Runtime: start + the input and output bytes) is taken off the model timed whole
                charge = 0.0
                if emu.get("stage_io_s_per_byte") is not None:
                    charge = StageOverhead(emu["stage_start_s"], emu["stage_io_s_per_byte"],
                                           emu.get("stage_weights_s_per_byte")).whole_model_s(
                        *whole_model_bytes(model, (x0,), refs[0]))
                cal = calibrate(model, (x0,), emu["probe"], time_model=not emu.get("no_model_speed"),
                                time_layers=not emu.get("no_node_calibration"), backend=backend,
                                profile=PROFILES[backend], between=between, stage_charge_s=charge)
                if "layers" in cal.measured:
                    log(f"{name} {mbps:g} Mb/s: {len(cal.node_calibration)} layers calibrated on {backend} in "
                        f"{cal.layer_seconds:.1f} s", flush=True)
            cl = make_cluster(mbps, calibration=cal, stage_start_s=emu.get("stage_start_s"),
                              stage_io_s_per_byte=emu.get("stage_io_s_per_byte"),
                              stage_weights_s_per_byte=emu.get("stage_weights_s_per_byte"),
                              backend=None if backend == "torch" else backend)
            gm = trace(model, (x0,))
            analyse(gm, cl)
            cost = CostModel(cl)
            plans, pred = {}, {}
            for s in ["single"] + BASELINES:
                plans[s] = STRATEGIES[s](gm, cl)
            t = time.perf_counter()
            res = solve_ofpm(gm, cl, cost, time_limit=time_limit, warm_start={k: v for k, v in plans.items()})
            solve_s = time.perf_counter() - t
            plans["ofpm"] = res.plan
            # every plan predicted from its schedule; only the strategies run are compiled, one at a time, when
            # saved for the run (a compiled bundle holds its weights, on ONNX Runtime also its graphs and loaded
            # sessions: VGG-16's nine bundles of a cell held over 15 GB at once, results/calibration_memory.md)
            compilers = {}
            for s, plan in plans.items():
                pred[s] = simulate(plan_schedule(gm, plan, cl), cl, cost, gm=gm)
                compilers[s] = functools.partial(compile_plan, gm, plan, cl, name)
            ranked = sorted(BASELINES, key=lambda s: pred[s].latency)
            distinct = [s for s in ranked if all(plans[s].to_dict()["stages"] != plans[o].to_dict()["stages"]
                                                 for o in ("ofpm", "single"))]
            chosen = ["ofpm", "single"] + distinct[:n_baselines]
            extra_source = {}
            if backend != "torch":
                # the same single-device plan on torch, as a user without edgepart's ORT backend runs it:
                # measured side by side; predicted with the torch profile as it is (not calibrated here)
                cl_t = make_cluster(mbps, stage_start_s=emu.get("stage_start_s"), backend="torch")
                gm_t = analyse(trace(model, (x0,)), cl_t)
                plans[TORCH_SINGLE] = STRATEGIES["single"](gm_t, cl_t)
                compilers[TORCH_SINGLE] = functools.partial(compile_plan, gm_t, plans[TORCH_SINGLE], cl_t, name)
                pred[TORCH_SINGLE] = simulate(plan_schedule(gm_t, plans[TORCH_SINGLE], cl_t), cl_t, CostModel(cl_t),
                                              gm=gm_t)
                chosen.append(TORCH_SINGLE)
            if emu.get("pools_before"):
                # the compiler without passes.pools (#21): global pools whole, end of the split stage
                gm_b = analyse(trace(model, (x0,)), cl, split_pools=False)
                warm_b = {"single": STRATEGIES["single"](gm_b, cl)}
                res_b = solve_ofpm(gm_b, cl, CostModel(cl), time_limit=time_limit, warm_start=warm_b)
                plans[BEFORE_POOLS] = res_b.plan
                compilers[BEFORE_POOLS] = functools.partial(compile_plan, gm_b, res_b.plan, cl, name)
                pred[BEFORE_POOLS] = simulate(plan_schedule(gm_b, res_b.plan, cl), cl, cost, gm=gm_b)
                extra_source[BEFORE_POOLS] = res_b.source
                chosen.append(BEFORE_POOLS)
            cell = {"model": name, "input": size, "mbps": mbps, "backend": backend, "ofpm_source": res.source,
                    "solve_s": solve_s, "sources": extra_source,
                    "memory_speed": cal.memory_speed if cal else 1.0, "calibration": cal.calibration if cal else {},
                    "model_speed": cal.model_speed if cal else None,
                    "node_calibration": cal.node_calibration if cal else {},
                    "predicted_all": {s: p.latency for s, p in pred.items()}, "runs": {}}
            cell["same_plan_as_single"] = plans["ofpm"].to_dict()["stages"] == plans["single"].to_dict()["stages"]
            with tempfile.TemporaryDirectory(prefix="edgepart-testbed-") as tmp:
                for s in chosen:
                    compilers[s]().save(Path(tmp) / s)
                release_memory()     # the compiles' buffers, before the workers start
                # Rounds: every strategy runs once per round, in an order rotated each round, so a
                # drift of this shared machine's speed lands on all of them alike (side by side)
                # instead of on whichever ran during it.
                by_round: dict[str, list[dict]] = {s: [] for s in chosen}
                for r in range(rounds):
                    k = r % len(chosen)
                    for s in chosen[k:] + chosen[:k]:
                        by_round[s].append(measure(Path(tmp) / s, inputs, refs, warmup, emu))
                for s in chosen:
                    m = merge_rounds(by_round[s])
                    sim = pred[s]
                    m["predicted"] = sim.latency
                    m["error"] = m["median"] / sim.latency - 1.0
                    m["calibrated"] = s != TORCH_SINGLE
                    for dev, v in m["devices"].items():
                        v["predicted_compute_s"] = sim.devices.get(dev, {}).get("compute", 0.0)
                        for r in sim.runs:
                            if r.device == dev and str(r.stage) in v.get("stages", {}):
                                # how long other devices compute while this stage runs (simulated): on the
                                # testbed they share one core with it
                                v["stages"][str(r.stage)].update(
                                    predicted_s=r.end - r.start,
                                    co_running_s=sum(max(0.0, min(r.end, o.end) - max(r.start, o.start))
                                                     for o in sim.runs if o.device != dev))
                    m["stages"] = len(plans[s].stages)
                    m["devices_used"] = sorted(plans[s].devices())
                    cell["runs"][s] = m
                    comp = ", ".join(f"{dv} {v['compute_s'] * 1e3:.0f}/{v['predicted_compute_s'] * 1e3:.0f}"
                                     for dv, v in m["devices"].items() if v["predicted_compute_s"] or v["compute_s"] > 1e-3)
                    log(f"{name:13s} {mbps:5g} Mb/s {s:13s} predicted {sim.latency * 1e3:7.1f} ms  measured "
                        f"{m['median'] * 1e3:7.1f} ms ({m['error'] * 100:+6.1f}%)  host_speed {m['host_speed']:.3f} "
                        f"ts {m['time_scale']:.3f}  compute meas/pred ms: {comp}  [{m['wall_s']:.0f} s]", flush=True)
            single = cell["runs"]["single"]
            cell["speedup_measured"] = single["median"] / cell["runs"]["ofpm"]["median"]
            # the same ratio within each round (measured minutes apart, not across the whole cell)
            cell["speedup_rounds"] = [a / b for a, b in zip(single["round_medians"], cell["runs"]["ofpm"]["round_medians"])]
            cell["speedup_predicted"] = single["predicted"] / cell["runs"]["ofpm"]["predicted"]
            if TORCH_SINGLE in cell["runs"]:
                ts_ = cell["runs"][TORCH_SINGLE]
                cell["speedup_vs_torch_single"] = ts_["median"] / cell["runs"]["ofpm"]["median"]
                cell["speedup_vs_torch_single_rounds"] = [
                    a / b for a, b in zip(ts_["round_medians"], cell["runs"]["ofpm"]["round_medians"])]
            if BEFORE_POOLS in cell["runs"]:
                bp = cell["runs"][BEFORE_POOLS]
                cell["speedup_before_pools"] = single["median"] / bp["median"]
                cell["speedup_before_pools_rounds"] = [a / b for a, b in zip(single["round_medians"], bp["round_medians"])]
                cell["speedup_before_pools_predicted"] = single["predicted"] / bp["predicted"]
                # (the two plans are of different graphs: one stage on the fastest device is the single plan)
                cell["same_plan_before_as_single"] = (len(plans[BEFORE_POOLS].stages) == 1
                                                      and plans[BEFORE_POOLS].devices() == plans["single"].devices())
            cells.append(cell)
    return cells


# how a run timed the model whole (its json's emulation "model_speed_of"), for the markdown
MODEL_SPEED_OF = {
    None: "(its calibrated prediction ÷ its forward pass, `whole_model.model_speed`) — ",
    "program": "(its calibrated prediction, with the cost model's charge for the device program, ÷ its device "
               "program run whole in the planning process, `whole_model.model_speed(program=True)`) — ",
    "program in a worker": "(its calibrated prediction, with the cost model's charge for the device program, ÷ its "
                           "device program run whole in a worker, `program.ProgramTimer`) — ",
}


def summary_tables(cells) -> list[str]:
    """The ONNX Runtime table (#19) and the before/after-pools table (#21), where the cells have them."""
    out: list[str] = []
    ort = [c for c in cells if c.get("speedup_vs_torch_single") is not None]
    if ort:
        split = [c for c in ort if len(c["runs"]["ofpm"]["devices_used"]) > 1]
        other = [c for c in ort if not c.get("same_plan_as_single") and c not in split]
        out += ["## ofpm on ONNX Runtime against the fastest single device (ms, emulated devices' time)", "",
                f"ofpm faster than ONNX Runtime on the fastest single device (measured) in **"
                f"{sum(1 for c in split if c['speedup_measured'] > 1.0)} of {len(split)}** cells where its plan "
                f"splits"
                + (f", and in **{sum(1 for c in other if c['speedup_measured'] > 1.0)} of {len(other)}** where it "
                   "runs the whole model on another device (the source: no input to send)" if other else "")
                + f"; prediction within ±{TOLERANCE:.0%} in **"
                f"{sum(1 for c in ort if abs(c['runs']['ofpm']['error']) <= TOLERANCE)} of {len(ort)}** cells. "
                "Speed-ups are ratios of medians measured in the same rounds (per round in brackets).", "",
                "| model | Mbit/s | ofpm plan | ORT single: measured | ofpm on ORT: predicted | measured | error | "
                "×ORT single measured (per round) | ×ORT single predicted | torch single: measured | "
                "×torch single measured (per round) |", "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for c in ort:
            o, s1, t1 = c["runs"]["ofpm"], c["runs"]["single"], c["runs"][TORCH_SINGLE]
            plan = ("single device (= ORT single's plan)" if c.get("same_plan_as_single")
                    else f"whole model on {o['devices_used'][0]} (no split)" if len(o["devices_used"]) == 1
                    else f"{o['stages']} stages on {', '.join(o['devices_used'])}")
            rnd = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
            out.append(f"| {c['model']}@{c['input']} | {c['mbps']:g} | {plan} | {s1['median'] * 1e3:.1f} | "
                       f"{o['predicted'] * 1e3:.1f} | {o['median'] * 1e3:.1f} | {o['error'] * 100:+.1f}%"
                       f"{'' if abs(o['error']) <= TOLERANCE else ' ⚠'} | **{c['speedup_measured']:.2f}×** "
                       f"({rnd(c['speedup_rounds'])}) | {c['speedup_predicted']:.2f}× | {t1['median'] * 1e3:.1f} | "
                       f"**{c['speedup_vs_torch_single']:.2f}×** ({rnd(c['speedup_vs_torch_single_rounds'])}) |")
        out.append("")
    pools = [c for c in cells if c.get("speedup_before_pools") is not None]
    if pools:
        out += ["## Before and after the global-pool split (`passes.pools`, #21)", "",
                f"*{BEFORE_POOLS}*: ofpm's plan from the compiler without `passes.pools` (each global pool whole, "
                "ending its split stage), measured in the same rounds as ofpm with the pass and the fastest single "
                "device.", "",
                "| model | Mbit/s | single: measured | ofpm before: predicted | measured | ×single measured (per round) | "
                "ofpm after: predicted | measured | ×single measured (per round) | stages before → after |",
                "|---|---:|---:|---:|---:|---|---:|---:|---|---|"]
        for c in pools:
            b, a, s1 = c["runs"][BEFORE_POOLS], c["runs"]["ofpm"], c["runs"]["single"]
            rnd = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
            out.append(f"| {c['model']}@{c['input']} | {c['mbps']:g} | {s1['median'] * 1e3:.1f} | "
                       f"{b['predicted'] * 1e3:.1f} | {b['median'] * 1e3:.1f} | **{c['speedup_before_pools']:.2f}×** "
                       f"({rnd(c['speedup_before_pools_rounds'])}) | {a['predicted'] * 1e3:.1f} | "
                       f"{a['median'] * 1e3:.1f} | **{c['speedup_measured']:.2f}×** ({rnd(c['speedup_rounds'])}) | "
                       f"{b['stages']}{' (single)' if c.get('same_plan_before_as_single') else ''} → {a['stages']}"
                       f"{' (single)' if c.get('same_plan_as_single') else ''} |")
        out.append("")
    return out


def write_markdown(cells, path: Path, argv: str, emu: dict, n_requests: int, warmup: int, rounds: int = 1,
                   generated: str | None = None) -> None:
    ofpm_err = [c["runs"]["ofpm"]["error"] for c in cells]
    all_err = [r["error"] for c in cells for r in c["runs"].values() if r.get("calibrated", True)]
    inside = sum(1 for e in ofpm_err if abs(e) <= TOLERANCE)
    beats = sum(1 for c in cells if c["speedup_measured"] > 1.0)
    same = [c for c in cells if c.get("same_plan_as_single")]
    split = [c for c in cells if not c.get("same_plan_as_single")]
    beats_split = sum(1 for c in split if c["speedup_measured"] > 1.0)
    hs = [r["host_speed"] for c in cells for r in c["runs"].values()]
    ts = [r["time_scale"] for c in cells for r in c["runs"].values()]
    desc = cells[0]["runs"]["ofpm"]["emulation"] if cells else ""
    backend = (cells[0].get("backend") if cells else None) or "torch"
    on_ort = backend != "torch"
    lines = ["# Testbed: predicted vs measured latency" + (" — every device on ONNX Runtime" if on_ort else ""), "",
             f"Generated by `benchmarks/testbed.py {argv}` on {generated or time.strftime('%Y-%m-%d %H:%M')}. Devices "
             f"{', '.join(f'{n} {s}' for n, s in DEVICES)} (phone is the source); compute = FCPM profile of this "
             f"machine's core (`profiles/{PROFILES[backend].name}`, {backend}) ÷ speed; links 0.5 ms + bandwidth, "
             "sender-NIC contention. "
             + (f"Every device runs its stages in ONNX Runtime (one thread); the online calibration below timed the "
                f"model's layers (each exported alone, whole and sliced) and its device program in ONNX Runtime "
                f"sessions, against the ONNX Runtime profile, the program timed whole after a host-speed probe before "
                f"each request as the testbed runs it (`--model-timing {emu.get('model_timing', 'cold')}`); the "
                f"host speed is the CPU's, measured with torch networks against `profiles/host.json` as for torch. "
                "A batch norm or activation that ONNX Runtime computes inside the convolution before it (`cost.fused_into`) "
                f"costs nothing and is not timed alone. *{TORCH_SINGLE}*: the single-device plan "
                "with the edge running torch, measured in the same rounds; its prediction is the torch profile "
                "uncalibrated, so it is left out of the error figures. " if on_ort else "")
             + 
             "Predicted = the simulator on the exact schedule with the planner's cost model. Measured = median of "
             f"{n_requests * rounds} sequential requests per strategy ({rounds} round{'s' if rounds > 1 else ''} of "
             f"{n_requests}; each round deploys and runs every strategy of the cell once, after {warmup} warm-up, "
             "in an order rotated each round, so the machine's drift lands on all alike), × time_scale, "
             "on `LocalCluster(emulate=True)` "
             f"(CPU share enforced by {'dilating each stage to CPU time ÷ share' if emu.get('cpu') == 'dilate' else 'cgroup quota'}, "
             f"cgroup period {emu.get('period_us') or 'default'} µs, workers pinned to CPU "
             f"{emu.get('cpuset')}, quotas ÷ host_speed measured before each run; tbf-shaped veth links). "
             f"host_speed over the runs: {min(hs):.2f}–{max(hs):.2f}; time_scale {min(ts):.3f}–{max(ts):.3f}. "
             "Online calibration before planning each cell (DCFP's online step; the cluster's `memory_speed` and "
             "`calibration`; medians of 3 rounds): memory speed = the profile's largest linear layer re-timed ÷ host_speed; "
             "per op type Σ predicted ÷ Σ measured over the model's own layers timed whole, ÷ host_speed "
             "(`op_types.measure_family_speeds(nodes=...)`), then all of them × the model's speed timed whole "
             + MODEL_SPEED_OF.get(emu.get("model_speed_of"), MODEL_SPEED_OF[None])
             + "memory speed / model speed / conv / dwconv / bn / act:relu per cell: "
             + "; ".join(f"{c['model']}@{c['mbps']:g} {c.get('memory_speed', 1.0):.2f} / "
                         f"{c['model_speed'] if c.get('model_speed') is not None else '–'} / "
                         + " / ".join(f"{c.get('calibration', {}).get(f, 1.0):.2f}" for f in ("conv", "dwconv", "bn", "act:relu"))
                         for c in cells) + ". "
             + (f"Stage overhead: {emu['stage_start_s'] * 1e6:.0f} µs per (device, stage) + "
                f"{emu['stage_io_s_per_byte'] * 1e12:.0f} µs per MB it reads from outside and leaves for after it"
                + (f" + {emu['stage_weights_s_per_byte'] * 1e12:.0f} µs per MB of weights its layers read"
                   if emu.get("stage_weights_s_per_byte") is not None else "")
                + ", of the profiled machine ÷ speed (each device's `stage_start_ms`, `stage_io_us_per_mb`, "
                "`stage_weights_us_per_mb`), as "
                "`stage_overhead.py` fitted them inside the emulated workers on the testbed's own plans "
                "(`stage_overhead.md`). "
                if emu.get("stage_io_s_per_byte") is not None else
                f"Stage start: {emu['stage_start_s'] * 1e6:.0f} µs of the profiled machine ÷ speed per (device, stage) "
                "(each device's `stage_start_ms`), as `stage_start.py` measured it inside the emulated workers"
                + (" on ONNX Runtime (`stage_start_ort.md`; with the profile's session call). "
                   if emu.get("backend", "torch") != "torch" else ". ")
                if emu.get("stage_start_s") is not None else "Stage start: the cost model's constant. ")
             + ("Per layer (each device's `node_calibration`, `layers.measure_node_calibration`, measured per cell "
                "right after the op types): every layer of the model but linear ones timed whole and at up to 10 slice "
                "sizes, its time ÷ the profile's prediction relative to its op type's (so a layer and a slice of it "
                "cost what they measured, the op type keeping its level) — layers / range of the whole-layer factors "
                "per cell: "
                + "; ".join(f"{c['model']}@{c['mbps']:g} {len(c['node_calibration'])} / "
                            f"{min(p[-1][1] for p in c['node_calibration'].values()):.2f}–"
                            f"{max(p[-1][1] for p in c['node_calibration'].values()):.2f}"
                            for c in cells if c.get("node_calibration")) + ". "
                if any(c.get("node_calibration") for c in cells) else "Per layer: the op type's calibration. ")
             + "Every output matched the original model.", "",
             f"Emulation of the first run: `{desc}`", "",
             "## Headline", "",
             f"- ofpm measured within ±{TOLERANCE:.0%} of its prediction in **{inside} of {len(cells)}** cells "
             f"(errors {', '.join(f'{e * 100:+.0f}%' for e in ofpm_err)})",
             f"- all runs: median |error| {statistics.median(abs(e) for e in all_err) * 100:.1f}%, "
             f"max {max(abs(e) for e in all_err) * 100:.1f}%",
             f"- ofpm faster than single (measured) in **{beats} of {len(cells)}** cells"
             + (f" — **{beats_split} of {len(split)}** where its plan is not the single-device plan; in "
                f"{', '.join(c['model'] + '@' + format(c['mbps'], 'g') for c in same)} ofpm chose that plan itself "
                "(no split pays for its transfers), so the two runs measure one plan twice"
                if same else "") + "; measured speed-up "
             f"geomean {math.exp(statistics.mean(math.log(c['speedup_measured']) for c in cells)):.2f}× "
             f"(predicted {math.exp(statistics.mean(math.log(c['speedup_predicted']) for c in cells)):.2f}×)", "",
             *summary_tables(cells),
             "## Predicted vs measured (ms, emulated devices' time)", "",
             "| model | Mbit/s | strategy | predicted | measured (median) | error | min–max | ×single measured | "
             "×single per round | ×single predicted | stages | devices |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        single = c["runs"]["single"]
        for s, r in c["runs"].items():
            err = r["error"] * 100
            mark = ("" if abs(r["error"]) <= TOLERANCE else " ⚠") if r.get("calibrated", True) else " (uncalibrated)"
            per_round = [a / b for a, b in zip(single.get("round_medians", []), r.get("round_medians", []))]
            per_round_txt = " / ".join(f"{x:.2f}" for x in per_round) if len(per_round) > 1 else "–"
            same_mark = " (= single's plan)" if s == "ofpm" and c.get("same_plan_as_single") else ""
            lines.append(f"| {c['model']}@{c['input']} | {c['mbps']:g} | {s}{' (' + c['ofpm_source'] + ')' if s == 'ofpm' else ''} | "
                         f"{r['predicted'] * 1e3:.1f} | {r['median'] * 1e3:.1f} | {err:+.1f}%{mark} | "
                         f"{r['min'] * 1e3:.0f}–{r['max'] * 1e3:.0f} | {single['median'] / r['median']:.2f}{same_mark} | "
                         f"{per_round_txt} | "
                         f"{single['predicted'] / r['predicted']:.2f} | {r['stages']} | {','.join(r['devices_used'])} |")
    lines += ["", "## Per-device compute (ms per request: measured / predicted)", "",
              "Measured = the worker's time inside `run` actions (quota stalls included) × time_scale; "
              "predicted = the simulator's compute time of that device. *thr* = cgroup periods throttled "
              "per request; *pf* = minor page faults per request in the device's stages; *pre* = times per "
              "request its compute thread was preempted mid-stage (by another worker, a socket thread or "
              "another program on the shared CPU).", "",
              "| model | Mbit/s | strategy | " + " | ".join(n for n, _ in DEVICES) + " | host_speed |",
              "|---|---|---|" + "---|" * len(DEVICES) + "---|"]
    for c in cells:
        for s, r in c["runs"].items():
            row = []
            for n, _ in DEVICES:
                v = r["devices"].get(n)
                if not v or (v["predicted_compute_s"] == 0 and v["compute_s"] < 1e-3):
                    row.append("–")
                else:
                    row.append(f"{v['compute_s'] * 1e3:.1f} / {v['predicted_compute_s'] * 1e3:.1f} "
                               f"(thr {v['throttled_periods']:.0f}, pf {v.get('page_faults', 0):.0f}"
                               + (f", pre {pre:.0f}" if (pre := preempted(v)) is not None else "") + ")")
            lines.append(f"| {c['model']} | {c['mbps']:g} | {s} | " + " | ".join(row) + f" | {r['host_speed']:.3f} |")
    lines += ["", "## Per stage of the ofpm plan (measured ÷ predicted)", "",
              "Each (device, stage) run: the worker's time inside that stage (`stage_us:S`) × time_scale ÷ the "
              "simulator's time of that run; in brackets the share of it during which other devices compute "
              "too (simulated; on the testbed they share one core).", "",
              "| model | Mbit/s | stage: device ratio (co-running) |", "|---|---|---|"]
    for c in cells:
        r = c["runs"]["ofpm"]
        per_stage: dict[int, list[str]] = {}
        for n, _ in DEVICES:
            for st, f in (r["devices"].get(n) or {}).get("stages", {}).items():
                if f.get("predicted_s"):
                    per_stage.setdefault(int(st), []).append(
                        f"{n} {f['wall_s'] / f['predicted_s']:.2f} ({min(1.0, f['co_running_s'] / f['predicted_s']):.0%})")
        if per_stage:
            lines.append(f"| {c['model']} | {c['mbps']:g} | "
                         + "; ".join(f"{st}: {', '.join(v)}" for st, v in sorted(per_stage.items())) + " |")
    write_keeping_analysis(path, "\n".join(lines) + "\n")


def plot(cells, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    pts = [(c, s, r) for c in cells for s, r in c["runs"].items() if r.get("calibrated", True)]
    lo = min(min(r["predicted"], r["median"]) for _, _, r in pts) * 1e3 * 0.8
    hi = max(max(r["predicted"], r["median"]) for _, _, r in pts) * 1e3 * 1.2
    xs = [lo, hi]
    ax.plot(xs, xs, color="k", lw=0.8)
    ax.fill_between(xs, [x * (1 - TOLERANCE) for x in xs], [x * (1 + TOLERANCE) for x in xs], color="0.85",
                    label=f"±{TOLERANCE:.0%}")
    markers = {"ofpm": "o", "single": "s"}
    colors = {m: f"C{i}" for i, m in enumerate(MODELS)}
    for c, s, r in pts:
        ax.scatter(r["predicted"] * 1e3, r["median"] * 1e3, marker=markers.get(s, "^"), color=colors[c["model"]],
                   facecolors="none" if c["mbps"] == 100 else colors[c["model"]], s=40)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in MODELS
               if any(c["model"] == m for c in cells)]
    handles += [Line2D([], [], color="k", marker=mk, ls="", label=s) for s, mk in markers.items()]
    handles += [Line2D([], [], color="k", marker="^", ls="", label="best baseline"),
                Line2D([], [], color="k", marker="o", ls="", markerfacecolor="none", label="100 Mbit/s (hollow)")]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted latency (ms, simulator)")
    ax.set_ylabel("measured latency (ms, median × time_scale)")
    ax.set_title("emulated testbed: predicted vs measured", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vgg16 at 1000 Mbit/s only")
    ap.add_argument("--models", nargs="*", choices=list(MODELS),
                    help=f"default: {' '.join(DEFAULT_MODELS)}")
    ap.add_argument("--backend", default="torch", choices=list(PROFILES),
                    help="what every device runs its stages on; onnxruntime also runs the single-device plan on "
                         "torch (default out: testbed_ort)")
    ap.add_argument("--model-timing", choices=["cold", "warm"], default=None,
                    help="time the model whole for the calibration after a host-speed probe each request, as "
                         "the testbed runs it (cold; default for onnxruntime), or back to back (warm; default "
                         "for torch, as results/testbed.md was measured)")
    ap.add_argument("--pools-before", action="store_true",
                    help="also run ofpm's plan from the compiler without passes.pools (global pools whole)")
    ap.add_argument("--bands", nargs="*", type=float)
    ap.add_argument("--requests", type=int, default=5, help="requests per strategy per round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per cell; each runs every strategy once, in an order rotated each round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--baselines", type=int, default=1, help="how many of the best baselines to run too")
    ap.add_argument("--time-limit", type=float, default=10.0, help="MILP time limit (s)")
    ap.add_argument("--cpuset", default="1", help="CPUs the workers are pinned to ('' = not pinned)")
    ap.add_argument("--cpu", default="dilate", choices=["dilate", "quota"],
                    help="how a device's CPU share is enforced (see edgepart/testbed/emulator.py)")
    ap.add_argument("--period-us", type=int, default=None, help="cgroup cfs period (default: the emulator's)")
    ap.add_argument("--host-speed", default="auto", help="'auto' (measure before each run) or a number")
    ap.add_argument("--probe", default="networks", choices=["networks", "layers"],
                    help="host-speed probe (HostSpeedProbe)")
    ap.add_argument("--time-scale", type=float, default=None)
    ap.add_argument("--no-model-speed", action="store_true",
                    help="calibrate op types on the model's layers only, without timing the model whole")
    ap.add_argument("--no-node-calibration", action="store_true",
                    help="calibrate per op type only (no online timing of each of the model's layers whole and "
                         "at slice sizes, measure_node_calibration)")
    ap.add_argument("--no-memory", action="store_true",
                    help="plan and predict with the profile as it is (no online memory speed / op-type calibration)")
    ap.add_argument("--stage-start", default="workers", choices=["workers", "constant"],
                    help="cost of a stage start: as measured inside the emulated workers — on torch by "
                         "stage_start.py (results/stage_start.json; four workers share one core), on onnxruntime "
                         "by stage_overhead.py (results/stage_overhead.json: per stage and per byte in and out of "
                         "it, fitted on the testbed's own plans; stage_start_ort.json's constant if absent) — or "
                         "the cost model's constants")
    ap.add_argument("--out", default=None, help="results/<out>.{json,md,png} (default testbed, or testbed_ort)")
    ap.add_argument("--from-json", action="store_true",
                    help="re-render results/<out>.md and .png from results/<out>.json without running anything")
    args = ap.parse_args(argv)
    args.out = args.out or ("testbed" if args.backend == "torch" else "testbed_ort")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FCPM profile has no model")
    if args.from_json:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())
        write_markdown(saved["cells"], RESULTS / f"{args.out}.md", saved.get("argv", ""), saved["emulation"],
                       saved.get("requests", args.requests), saved.get("warmup", args.warmup),
                       saved.get("rounds", args.rounds), saved.get("generated"))
        plot(saved["cells"], RESULTS / f"{args.out}.png")
        print(f"re-rendered {RESULTS / args.out}.{{md,png}}")
        return
    model_names = args.models or (["vgg16"] if args.quick else DEFAULT_MODELS)
    bands = args.bands or ([1000] if args.quick else BANDS)
    emu = {"probe": None, "cpuset": [int(c) for c in args.cpuset.split(",")] if args.cpuset else None,
           "period_us": args.period_us, "cpu": args.cpu, "time_scale": args.time_scale, "no_memory": args.no_memory,
           "no_model_speed": args.no_model_speed, "no_node_calibration": args.no_node_calibration,
           "host_speed": args.host_speed if args.host_speed == "auto" else float(args.host_speed),
           "stage_start_s": workers_stage_start(args.backend) if args.stage_start == "workers" else None,
           "stage_io_s_per_byte": None, "stage_weights_s_per_byte": None,
           "model_speed_of": "program in a worker", "backend": args.backend, "pools_before": args.pools_before,
           "model_timing": args.model_timing or ("warm" if args.backend == "torch" else "cold")}
    overhead = workers_stage_overhead() if args.backend != "torch" and args.stage_start == "workers" else None
    if overhead is not None:
        emu["stage_start_s"], emu["stage_io_s_per_byte"], emu["stage_weights_s_per_byte"] = overhead
    if emu["host_speed"] == "auto":
        emu["probe"] = HostSpeedProbe(PROFILE, emu["cpuset"], kind=args.probe)
    t = time.perf_counter()
    cells = run(model_names, bands, args.requests, args.warmup, emu, args.time_limit, args.baselines,
                rounds=max(1, args.rounds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    generated = time.strftime('%Y-%m-%d %H:%M')
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"emulation": {k: v for k, v in emu.items() if k != "probe"},
                                                         "argv": " ".join(sys.argv[1:] if argv is None else argv),
                                                         "requests": args.requests, "warmup": args.warmup,
                                                         "rounds": max(1, args.rounds), "generated": generated,
                                                         "cells": cells}, indent=1))
    write_markdown(cells, RESULTS / f"{args.out}.md", " ".join(sys.argv[1:] if argv is None else argv), emu,
                   args.requests, args.warmup, max(1, args.rounds), generated)
    plot(cells, RESULTS / f"{args.out}.png")
    print(f"done in {time.perf_counter() - t:.0f} s; wrote {RESULTS / args.out}.{{json,md,png}}")


if __name__ == "__main__":
    main()
