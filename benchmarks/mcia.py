"""MCIA: the MILP against the baselines over a grid of synthetic scenarios.

    python benchmarks/mcia.py [--quick]     -> benchmarks/results/mcia.md

Grid: {5, 10, 20, 50} tasks × uplink {1, 10, 100} Mbit/s × property mix {accuracy, latency, mixed}.
Synthetic cost tables (seeded): a CNN of 8 legal cuts, versions at scales 1, 0.75, 0.5, 0.25 (compute ∝
scale², weights ∝ scale², accuracy 0.92 / 0.91 / 0.88 / 0.80); 200 ms on an end device at full scale
(±30 % per task), the edge server 8× faster, the cloud 32×; a 150 kB input, feature maps shrinking
along the network, a 40 B output; 10 end devices (tasks round-robin), each with its own uplink to the
edge; WAN 50 Mbit/s, 30 ms; 8 share levels. Accuracy-sensitive tasks: w_acc 1, w_lat 0.1, min accuracy
0.91 (scale ≥ 0.75: ~110 ms or more on the end device); latency-sensitive: w_acc 0.1, w_lat 1, min
accuracy 0.88 (scale ≥ 0.5), deadline 80 ms; rate 2/s each. The MILP is asked for a gap ≤ 1 %.
Reported per strategy: objective, mean accuracy, mean and p95 latency, deadline misses, other
violations (shares, memory, end-device load, accuracy minimums), planning seconds (MILP: build + solve, and its MIP gap).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepart.cluster import Cluster  # noqa: E402
from edgepart.mcia import STRATEGIES, Task, TaskTable, Tiers, VersionCosts, plan  # noqa: E402

SCALES = ((1.0, 0.92), (0.75, 0.91), (0.5, 0.88), (0.25, 0.80))
LEVELS = 8


def scenario_cluster(uplink_mbps: float, n_ends: int = 10) -> Cluster:
    devs = [{"name": f"end{i}", "speed": 1.0, "tier": "end", "memory_mb": 512} for i in range(n_ends)]
    devs += [{"name": "edge", "speed": 8.0, "tier": "edge", "memory_mb": 2048},
             {"name": "cloud", "speed": 32.0, "tier": "cloud"}]
    return Cluster.from_dict({"devices": devs, "links": {
        "default": {"bandwidth_mbps": uplink_mbps, "latency_ms": 2.0},
        "overrides": [{"a": "edge", "b": "cloud", "bandwidth_mbps": 50.0, "latency_ms": 30.0}]}})


def synthetic_table(rng: random.Random, task: Task, n_cuts: int = 8) -> TaskTable:
    full_s = 0.2 * rng.uniform(0.7, 1.3)
    share = [rng.uniform(0.5, 1.5) for _ in range(n_cuts - 1)]
    share = [s / sum(share) for s in share]
    fmap = [150_000] + [int(600_000 * 0.55 ** i * rng.uniform(0.7, 1.3)) for i in range(1, n_cuts - 1)] + [40]
    params = [rng.uniform(0.2, 1.0) * 2 ** (i / 2) for i in range(n_cuts - 1)]
    params = [p / sum(params) * 40 * 2 ** 20 for p in params]       # 40 MiB of weights at full scale
    versions = []
    for scale, acc in SCALES:
        t = [0.0]
        w = [0]
        for s, p in zip(share, params):
            t.append(t[-1] + full_s * s * scale ** 2)
            w.append(w[-1] + int(p * scale ** 2))
        b = [fmap[0]] + [int(f * scale) for f in fmap[1:-1]] + [fmap[-1]]
        versions.append(VersionCosts(f"scale-{scale:.2f}", acc, tuple(t), tuple(x / 8 for x in t),
                                     tuple(x / 32 for x in t), tuple(b), tuple(w)))
    return TaskTable(task, tuple(versions), versions[0].end_s[-1])


def make_tasks(n: int, mix: str, seed: int) -> list[TaskTable]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lat = mix == "latency" or (mix == "mixed" and i % 2 == 1)
        t = Task(f"t{i}", f"end{i % 10}", w_acc=0.1 if lat else 1.0, w_lat=1.0 if lat else 0.1,
                 min_accuracy=0.88 if lat else 0.91, deadline_ms=80.0 if lat else None, rate=2.0)
        out.append(synthetic_table(rng, t))
    return out


def row(sol, tables, seconds: float) -> dict:
    lats = sorted(o.latency_s * 1e3 for o in sol.outcomes)
    misses = sum(1 for t, o in zip(tables, sol.outcomes)
                 if t.task.deadline_ms is not None and o.latency_s * 1e3 > t.task.deadline_ms + 1e-9)
    other = len(sol.violations) - misses      # shares, memory, end-device load, accuracy minimums
    return {"objective": sol.objective, "accuracy": statistics.mean(o.accuracy for o in sol.outcomes),
            "mean_ms": statistics.mean(lats), "p95_ms": lats[min(len(lats) - 1, int(0.95 * len(lats)))],
            "misses": misses, "other": other, "seconds": seconds, "gap": sol.gap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 and 10 tasks only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mcia.md"))
    args = ap.parse_args(argv)
    sizes = (5, 10) if args.quick else (5, 10, 20, 50)
    feasible: dict[str, int] = {}
    margins: dict[str, list[float]] = {}
    milp_gaps, milp_seconds, body = [], [], []
    lines = ["# MCIA: MILP vs baselines on synthetic scenarios", "",
             f"`python benchmarks/mcia.py` ({time.strftime('%Y-%m-%d')}); scenario in the script's docstring. "
             "objective = Σ w_acc·accuracy − w_lat·latency/reference (higher is better); misses = tasks over "
             "their deadline; other = every other broken constraint (shares or memory over the limit, an end device "
             "loaded over 1, an accuracy below the task's minimum); a plan with misses or other > 0 is not "
             "feasible; "
             "seconds = planning time (MILP: candidates + model + HiGHS).", ""]
    for n in sizes:
        for bw in (1.0, 10.0, 100.0):
            for mix in ("accuracy", "latency", "mixed"):
                tiers = Tiers.from_cluster(scenario_cluster(bw))
                tables = make_tasks(n, mix, seed=n * 1000 + int(bw) + len(mix))
                milp = None
                body += [f"## {n} tasks, uplink {bw:g} Mbit/s, {mix}-sensitive", "",
                          "| strategy | objective | mean acc | mean ms | p95 ms | misses | other | seconds | gap |",
                          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
                for s in STRATEGIES:
                    t0 = time.perf_counter()
                    try:
                        sol = plan(tables, tiers, LEVELS, s, time_limit=60.0, gap=1e-2 if s == "milp" else 1e-4)
                    except Exception as e:   # noqa: BLE001 — an infeasible MILP is a result, not a crash
                        body.append(f"| {s} | {type(e).__name__}: {e} | | | | | | | |")
                        continue
                    r = row(sol, tables, time.perf_counter() - t0)
                    gap = f"{r['gap']:.2%}" if s == "milp" else ""
                    ok = not sol.violations
                    if s == "milp":
                        milp = r["objective"]
                        milp_gaps.append(r["gap"])
                        milp_seconds.append((r["seconds"], n))
                    else:
                        feasible[s] = feasible.get(s, 0) + ok
                        if ok and milp is not None:
                            margins.setdefault(s, []).append((milp - r["objective"]) / abs(milp))
                    body.append(f"| {s} | {r['objective']:.3f} | {r['accuracy']:.3f} | {r['mean_ms']:.1f} | "
                                 f"{r['p95_ms']:.1f} | {r['misses']} | {r['other']} | {r['seconds']:.2f} | {gap} |")
                body.append("")
                print(f"{n} tasks, {bw:g} Mbit/s, {mix}: done", file=sys.stderr, flush=True)
    total = len(sizes) * 9
    lines += ["## Summary", "",
              f"MILP: {len(milp_gaps)}/{total} instances solved, largest gap {max(milp_gaps):.2%}, slowest "
              f"{max(milp_seconds)[0]:.1f} s ({max(milp_seconds)[1]} tasks; candidates + model + HiGHS).", "",
              "| baseline | feasible instances | MILP's margin over it where feasible: mean | min |",
              "|---|---:|---:|---:|"]
    for s in STRATEGIES[1:]:
        m = margins.get(s, [])
        lines.append(f"| {s} | {feasible.get(s, 0)}/{total} | "
                     + (f"{100 * sum(m) / len(m):.1f} % | {100 * min(m):.2f} % |" if m else "– | – |"))
    lines += [""] + body
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
