"""Partition quality: simulated latency of every strategy, models × clusters × bandwidths.

    .venv/bin/python benchmarks/partition_quality.py            # full grid (≈15 min on 1 core)
    .venv/bin/python benchmarks/partition_quality.py --quick    # 2 models, 2/4 devices

For every cell (model, homogeneous|heterogeneous, devices, Mbit/s) every strategy plans the
model, and the exact schedule of its plan is simulated with the one cost model (FLOPs ÷ speed
unless the cluster names FCPM profiles). ofpm solves its MILP (HiGHS, 10 s limit) and is then
compared by simulation with its own slice refinement and with the baselines' plans given as
warm-start candidates; the table says which candidate won (``milp`` = the MILP's plan,
``milp+refine`` = its slices refined on the simulator, ``warm:<name>`` = a baseline's plan),
so the MILP's own contribution stays visible.

Writes benchmarks/results/partition_quality.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster  # noqa: E402
from edgepart.compiler.planning import baselines  # noqa: E402,F401
from edgepart.compiler.cost.model import CostModel  # noqa: E402
from edgepart.compiler.planning.ofpm import solve_ofpm  # noqa: E402
from edgepart.compiler.planning.registry import STRATEGIES  # noqa: E402
from edgepart.compiler.schedule import build_schedule  # noqa: E402
from edgepart.compiler.cost.simulator import simulate  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes import analyse  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["vgg16", "resnet50", "mobilenet_v2", "yolov2_tiny", "inception"]
BASELINES = ["single", "neurosurgeon", "dads", "modnn", "deepthings", "aofl", "edgeld"]
HETERO = [1.0, 2.0, 4.0, 1.5, 3.0, 2.5, 1.0, 5.0]   # d0 (the source, e.g. the camera) is a weak device


def make_cluster(kind: str, n: int, mbps: float) -> Cluster:
    if kind == "homo":
        return Cluster.homogeneous(n, bandwidth_mbps=mbps, latency_ms=1.0)
    return Cluster.heterogeneous(HETERO[:n], bandwidth_mbps=mbps, latency_ms=1.0)


def halo_overhead(gm, schedule) -> float:
    """FLOPs computed by all devices / FLOPs of the model − 1 (rows recomputed as halo)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    total = sum(n.meta.get("flops", 0) for n in nodes.values())
    done = 0.0
    for dev, stages in schedule.rows.items():
        for table in stages.values():
            for name, e in table.items():
                a, b = e.out
                n = nodes[name]
                done += n.meta.get("flops", 0) * (b - a) / max(1, n.meta["rows"])
    return done / max(total, 1) - 1.0


def geomean(xs):
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def run(models_, kinds, sizes, bands, time_limit):
    cells = []
    for name in models_:
        model, (x,) = models.get(name)
        gm = trace(model, (x,))
        analyse(gm)
        for kind in kinds:
            for n in sizes:
                for mbps in bands:
                    cl = make_cluster(kind, n, mbps)
                    cost = CostModel(cl)
                    cell = {"model": name, "cluster": kind, "devices": n, "mbps": mbps, "strategies": {}}
                    plans = {}
                    for s in BASELINES:
                        t = time.perf_counter()
                        plan = STRATEGIES[s](gm, cl)
                        plan_t = time.perf_counter() - t
                        sched = build_schedule(gm, plan, cl)
                        lat = simulate(sched, cl, cost, gm=gm).latency
                        plans[s] = plan
                        cell["strategies"][s] = {"latency": lat, "plan_s": plan_t, "stages": len(plan.stages)}
                    t = time.perf_counter()
                    res = solve_ofpm(gm, cl, cost, time_limit=time_limit, warm_start=plans)
                    plan_t = time.perf_counter() - t
                    sched = build_schedule(gm, res.plan, cl)
                    lat = simulate(sched, cl, cost, gm=gm).latency
                    cell["strategies"]["ofpm"] = {
                        "latency": lat, "plan_s": plan_t, "stages": len(res.plan.stages),
                        "objective": res.objective, "milp_simulated": res.milp_simulated,
                        "milp_refined": res.candidates.get("milp+refine", res.milp_simulated),
                        "solve_s": res.solve_time, "build_s": res.build_time, "gap": res.gap,
                        "status": res.status, "won_by": res.source, "halo": halo_overhead(gm, sched),
                        "devices_used": len(res.plan.devices())}
                    best_b = min(BASELINES[1:], key=lambda s: cell["strategies"][s]["latency"])
                    cell["best_baseline"] = best_b
                    cell["speedup_single"] = cell["strategies"]["single"]["latency"] / lat
                    cell["speedup_best"] = cell["strategies"][best_b]["latency"] / lat
                    milp_own = min(res.milp_simulated, cell["strategies"]["ofpm"]["milp_refined"])
                    cell["milp_speedup_best"] = cell["strategies"][best_b]["latency"] / milp_own
                    cells.append(cell)
                    o = cell["strategies"]["ofpm"]
                    print(f"{name:13s} {kind:6s} n={n} {mbps:6g} Mb/s  ofpm {lat * 1e3:8.2f} ms "
                          f"({o['won_by']}, solve {o['solve_s']:.2f}s gap {o['gap']:.1e})  single "
                          f"{cell['strategies']['single']['latency'] * 1e3:8.2f}  best baseline {best_b} "
                          f"{cell['strategies'][best_b]['latency'] * 1e3:8.2f}  ×{cell['speedup_best']:.2f}",
                          flush=True)
    return cells


def write_markdown(cells, path: Path, argv: str) -> None:
    strategies = BASELINES + ["ofpm"]
    lines = ["# Partition quality (simulated latency, ms)", "",
             f"Generated by `benchmarks/partition_quality.py {argv}`. Cost model: FLOPs ÷ (speed × 20 GFLOP/s) "
             "(no FCPM profile), 1 ms per-message latency, sender-NIC contention (switched links). "
             f"Heterogeneous speeds: {HETERO} (d0 is the source). ofpm = best by simulation of the MILP plan, its "
             "refinement and the baselines' plans (column *won by*); *MILP ×best* is the speed-up of the MILP's own "
             "plan (MILP or MILP+refine) over the best baseline, i.e. without the warm start.", ""]
    sp_single = [c["speedup_single"] for c in cells]
    sp_best = [c["speedup_best"] for c in cells]
    sp_milp = [c["milp_speedup_best"] for c in cells]
    worst = min(cells, key=lambda c: c["speedup_best"])
    won = {}
    for c in cells:
        k = c["strategies"]["ofpm"]["won_by"]
        k = "warm" if k.startswith("warm") else k
        won[k] = won.get(k, 0) + 1
    lines += ["## Headline", "",
              f"- cells: {len(cells)}",
              f"- geometric-mean speed-up of ofpm over `single`: **{geomean(sp_single):.2f}×** "
              f"(max {max(sp_single):.2f}×)",
              f"- geometric-mean speed-up of ofpm over the best baseline per cell: **{geomean(sp_best):.2f}×** "
              f"(max {max(sp_best):.2f}×, min {min(sp_best):.3f}× in {worst['model']} {worst['cluster']} "
              f"n={worst['devices']} {worst['mbps']:g} Mb/s)",
              f"- MILP plan alone (no warm start) over the best baseline: geomean {geomean(sp_milp):.2f}×, "
              f"min {min(sp_milp):.3f}×, slower than the best baseline in "
              f"{sum(1 for s in sp_milp if s < 1 - 1e-9)} of {len(cells)} cells",
              f"- ofpm candidate that won: {won}",
              f"- MILP solve time: median {sorted(c['strategies']['ofpm']['solve_s'] for c in cells)[len(cells) // 2]:.2f} s, "
              f"max {max(c['strategies']['ofpm']['solve_s'] for c in cells):.2f} s; max gap "
              f"{max(c['strategies']['ofpm']['gap'] for c in cells):.1e}",
              f"- MILP objective vs simulated latency of the MILP plan: median ratio "
              f"{sorted(c['strategies']['ofpm']['objective'] / c['strategies']['ofpm']['milp_simulated'] for c in cells)[len(cells) // 2]:.3f}",
              ""]
    head = ["model", "cluster", "n", "Mb/s"] + strategies + ["×single", "×best", "best baseline", "won by",
                                                              "MILP ×best", "solve s", "gap", "halo"]
    lines += ["## All cells", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        o = c["strategies"]["ofpm"]
        row = [c["model"], c["cluster"], str(c["devices"]), f"{c['mbps']:g}"]
        best = min(c["strategies"][s]["latency"] for s in strategies)
        for s in strategies:
            v = c["strategies"][s]["latency"] * 1e3
            row.append(f"**{v:.1f}**" if c["strategies"][s]["latency"] <= best + 1e-12 else f"{v:.1f}")
        row += [f"{c['speedup_single']:.2f}", f"{c['speedup_best']:.2f}", c["best_baseline"], o["won_by"],
                f"{c['milp_speedup_best']:.2f}", f"{o['solve_s']:.2f}", f"{o['gap']:.0e}", f"{o['halo'] * 100:.1f}%"]
        lines.append("| " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(cells, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models_ = list(dict.fromkeys(c["model"] for c in cells))
    kinds = list(dict.fromkeys(c["cluster"] for c in cells))
    fig, axes = plt.subplots(len(kinds), len(models_), figsize=(3.2 * len(models_), 3.0 * len(kinds)),
                             squeeze=False, sharey=True)
    strategies = BASELINES + ["ofpm"]
    for r, kind in enumerate(kinds):
        for col, m in enumerate(models_):
            ax = axes[r][col]
            sub = [c for c in cells if c["model"] == m and c["cluster"] == kind]
            labels = [f"{c['devices']}/{c['mbps']:g}" for c in sub]
            for s in strategies:
                ys = [c["strategies"]["single"]["latency"] / c["strategies"][s]["latency"] for c in sub]
                ax.plot(range(len(sub)), ys, marker="o" if s == "ofpm" else ".", lw=2.2 if s == "ofpm" else 0.8,
                        label=s)
            ax.set_yscale("log")
            ax.set_xticks(range(len(sub)))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_title(f"{m} ({kind})", fontsize=8)
            if col == 0:
                ax.set_ylabel("speed-up over single")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("simulated speed-up over the fastest single device (x: devices / Mbit/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--out", default="partition_quality")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        models_, kinds, sizes, bands = ["resnet50", "yolov2_tiny"], ["homo", "hetero"], [2, 4], [10, 100, 1000]
    else:
        models_, kinds, sizes, bands = MODELS, ["homo", "hetero"], [2, 4, 8], [10, 100, 1000]
    if args.models:
        models_ = args.models
    t = time.perf_counter()
    cells = run(models_, kinds, sizes, bands, args.time_limit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(cells, indent=1))
    write_markdown(cells, RESULTS / f"{args.out}.md", " ".join(sys.argv[1:]))
    plot(cells, RESULTS / f"{args.out}.png")
    print(f"done in {time.perf_counter() - t:.0f} s; wrote {RESULTS / args.out}.{{json,md,png}}")


if __name__ == "__main__":
    main()
