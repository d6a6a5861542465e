"""OFPM MILP solve time vs cluster size (2–64 heterogeneous devices), ResNet-50 and VGG-16 at 224.

    .venv/bin/python benchmarks/solver_scaling.py

Reports per size: arcs (binary variables), time to build the model (cost of every arc),
HiGHS solve time (through PuLP, 10 s limit), MIP gap, and the simulated latency of the plan.
Writes benchmarks/results/partition_solver_scaling.{json,md,png}.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster  # noqa: E402
from edgepart.compiler.cost.model import CostModel  # noqa: E402
from edgepart.compiler.planning.ofpm import OFPMModel, simulated_latency  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes import analyse  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SPEEDS = [1.0, 2.0, 4.0, 1.5, 3.0, 2.5, 1.0, 5.0]


def main():
    torch.set_num_threads(1)
    rows = []
    for name in ("resnet50", "vgg16"):
        m, (x,) = models.get(name)
        gm = trace(m, (x,))
        analyse(gm)
        for n in (2, 4, 8, 16, 32, 64):
            cl = Cluster.heterogeneous([SPEEDS[i % len(SPEEDS)] for i in range(n)], bandwidth_mbps=1000)
            t = time.perf_counter()
            model = OFPMModel(gm, cl, CostModel(cl))
            build = time.perf_counter() - t
            path, obj, solve, gap, status, solver = model.solve(time_limit=10)
            plan = model.plan_from_path(path)
            lat = simulated_latency(gm, plan, cl, model.cost)
            r = {"model": name, "devices": n, "arcs": len(model.arcs), "build_s": build, "solve_s": solve,
                 "gap": gap, "status": status, "objective": obj, "simulated": lat,
                 "devices_used": len(plan.devices())}
            rows.append(r)
            print(r, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "partition_solver_scaling.json").write_text(json.dumps(rows, indent=1))
    lines = ["# OFPM MILP scaling (1000 Mbit/s, heterogeneous speeds cycling " + str(SPEEDS) + ")", "",
             "| model | devices | arcs (binaries) | build s | solve s | gap | objective ms | simulated ms | used |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['devices']} | {r['arcs']} | {r['build_s']:.2f} | {r['solve_s']:.2f} | "
                     f"{r['gap']:.0e} | {r['objective'] * 1e3:.1f} | {r['simulated'] * 1e3:.1f} | {r['devices_used']} |")
    (RESULTS / "partition_solver_scaling.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == name]
        ax.plot([r["devices"] for r in sub], [r["solve_s"] for r in sub], "o-", label=f"{name}: HiGHS solve")
        ax.plot([r["devices"] for r in sub], [r["build_s"] for r in sub], "x--", label=f"{name}: build arcs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax.set_title("OFPM MILP time vs cluster size", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "partition_solver_scaling.png", dpi=120)


if __name__ == "__main__":
    main()
