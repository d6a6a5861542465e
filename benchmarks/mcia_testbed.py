"""MCIA on the emulated testbed: 10 tasks from 4 end devices, one edge server and a cloud, all at once.

    python benchmarks/mcia_testbed.py [--requests 10] [--cpuset 1] [--versions DIR]
        -> benchmarks/results/mcia_testbed.md (+ .json)      (root: network namespaces, tc, cgroups)

Scenario. A version set of ``vgg_small`` on MNIST (scales 1.0, 0.5, 0.25; built into ``--versions`` if
missing: 6 epochs, 2 epochs of fine-tuning per pruned version; the set records it). Devices are priced
by the FCPM host profile (profiles/host.json) with each version's compute times calibrated to its run
measured on the workers' CPU now (``MciaRun(calibrate=True)``), so speed 1.0 is one CPU here: four
slow end devices (speeds 0.005, 0.01, 0.04, 0.02; uplinks 20, 6, 3, 10 Mbit/s with 2–4 ms), an edge
server (speed 0.4, its compute shared by its tasks) and a cloud (speed 1.0) behind a 50 Mbit/s, 10 ms
WAN. Ten tasks round-robin over the end devices, alternating accuracy-sensitive
(w_acc 1, w_lat 0.1, min accuracy: the middle version's), latency-sensitive (w_acc 0.1, w_lat 1) and
balanced (w_acc 1, w_lat 1), rate 1/s; 8 share levels. The MILP plans them (edgepart.mcia), then every
task's chosen version and cuts are compiled and deployed on the tiered testbed
(edgepart.testbed.tiered: a worker per task per device it uses, the edge process dilated to the task's
compute share, the task's uplink share its own htb class) and every task sends its requests — MNIST
test images — one at a time, all tasks at once.

Reported per task: the plan (version, nodes on end/edge/cloud, shares), predicted latency (the MILP's
cost model) against the measured median (emulated time), the largest difference of any output from its
version's single-device output, the version's test accuracy, and the share of answers that were right.
Asked (issue #17): every output equal; the median over tasks of the per-task error within ±15 %.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from edgepart.cluster import Cluster  # noqa: E402
from edgepart.mcia.run import MciaRun  # noqa: E402
from edgepart.mcia.scenario import Task  # noqa: E402
from edgepart.versions import TrainConfig, VersionSet, build_version_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
PROFILE = str(ROOT / "profiles" / "host.json")
ENDS = [("phone0", 0.005, 20.0, 2.0), ("phone1", 0.01, 6.0, 3.0), ("board0", 0.04, 3.0, 4.0),
        ("board1", 0.02, 10.0, 2.0)]          # (name, speed, uplink Mbit/s, uplink ms)
EDGE, CLOUD, WAN = 0.4, 1.0, (50.0, 10.0)
LEVELS = 8


def cluster() -> Cluster:
    devs = [{"name": n, "tier": "end", "speed": v, "memory_mb": 512, "profile": PROFILE} for n, v, _, _ in ENDS]
    devs += [{"name": "edge", "tier": "edge", "speed": EDGE, "memory_mb": 2048, "profile": PROFILE},
             {"name": "cloud", "tier": "cloud", "speed": CLOUD, "memory_mb": 16384, "profile": PROFILE}]
    over = [{"a": n, "b": "edge", "bandwidth_mbps": bw, "latency_ms": lat} for n, _, bw, lat in ENDS]
    over.append({"a": "edge", "b": "cloud", "bandwidth_mbps": WAN[0], "latency_ms": WAN[1]})
    return Cluster.from_dict({"devices": devs, "links": {"default": {"bandwidth_mbps": 100.0, "latency_ms": 1.0},
                                                          "overrides": over}})


def tasks(vs: VersionSet) -> list[Task]:
    accs = sorted(vs.records[n].accuracy for n in vs.names if vs.records[n].partitionable)
    middle = accs[len(accs) // 2]
    kinds = [dict(w_acc=1.0, w_lat=0.1, min_accuracy=middle), dict(w_acc=0.1, w_lat=1.0),
             dict(w_acc=1.0, w_lat=1.0)]
    return [Task(f"task{i}", ENDS[i % len(ENDS)][0], versions=vs.dir, rate=1.0, **kinds[i % 3]) for i in range(10)]


def version_set(path: Path) -> VersionSet:
    """The benchmark's version set, built if missing (a shorter training than benchmarks/versions.py's; the set
    records it)."""
    if not (path / "versionset.json").is_file():
        print(f"building the version set in {path} (vgg_small on MNIST, 6 epochs)")
        build_version_set("vgg_small", path, scales=(1.0, 0.5, 0.25), config=TrainConfig(epochs=6),
                          finetune=TrainConfig(epochs=2, lr=1e-3), int8=False, repeats=0)
    return VersionSet.load(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--cpuset", default="1")
    p.add_argument("--time-scale", type=float, default=0.25,
                   help="emulated ÷ wall time (default 0.25: the runtime's own per-hop costs shrink with it)")
    p.add_argument("--versions", default=str(Path.home() / ".cache" / "edgepart" / "mcia-vgg_small"),
                   help="version set directory (built there if missing)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cpuset = [int(c) for c in args.cpuset.split(",")] if args.cpuset else None
    vs = version_set(Path(args.versions))
    t0 = time.perf_counter()
    with MciaRun(cluster(), tasks(vs), LEVELS, cpuset=cpuset, calibrate=True, time_scale=args.time_scale,
                 log=print) as run:
        setup_s = time.perf_counter() - t0
        report = run.measure(requests=args.requests, warmup=2)
        sol = run.solution
        factors = {v: f for (_, v), f in run.factors.items()}
        # tasks leave and arrive: re-solve, change only what differs, measure again
        new = [t for t in tasks(vs) if t.name not in ("task8", "task9")]
        new.append(Task("task10", "board1", versions=vs.dir, w_acc=1.0, w_lat=1.0))
        t1 = time.perf_counter()
        up = run.update(new)
        update_s = time.perf_counter() - t1
        report2 = run.measure(requests=max(3, args.requests // 2), warmup=1)
    print(report.table())
    errs = [r.error for r in report.results]
    summary = (f"median over tasks of (measured / predicted − 1): **{report.median_error * 100:+.1f} %** "
               f"(asked: within ±15 %); per task from {min(errs) * 100:+.1f} % to {max(errs) * 100:+.1f} %; "
               f"every output equal to its version's single-device output (≤ 1e-4 of its scale): "
               f"**{report.all_exact}** (largest {max(r.max_rel_diff for r in report.results):.1e})")
    print(summary)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    md = ["# MCIA on the emulated testbed: 10 tasks, 4 end devices, an edge server, a cloud",
          "",
          f"Generated by `benchmarks/mcia_testbed.py --requests {args.requests} --cpuset {args.cpuset} --time-scale "
          f"{args.time_scale:g}` on {now} UTC "
          f"(commit {commit}; a shared 2-core VM, other jobs running). Scenario: the script's docstring. "
          f"Version set: `{vs.model_name}` on {vs.info['data']['dataset']} "
          f"({', '.join(f'{n} {vs.records[n].accuracy * 100:.1f} %' for n in vs.names)} test accuracy). "
          f"Plan: MILP (HiGHS) objective {sol.objective:.4f}, gap {sol.gap:.2%}. Testbed: time scale "
          f"{report.time_scale:.3g} (every emulated duration ÷ it on the wall clock), "
          f"workers pinned to CPU {args.cpuset}; setup (plan, compile, 10 deployments) {setup_s:.0f} s. Each task: "
          f"2 warm-up + {args.requests} requests, one in flight, all ten tasks at once; latency = median of its "
          f"requests, wall time × time scale.",
          "",
          "Cost tables calibrated (`MciaRun(calibrate=True)`): each version's compute times × (the CPU time of its "
          "whole-version stage in a worker on the workers' CPU ÷ the FCPM profile's prediction of it): "
          + ", ".join(f"{v} × {f:.2f}" for v, f in sorted(factors.items())) + ".",
          "",
          report.table(),
          "",
          summary + ".",
          "",
          f"**Tasks leave and arrive** (`MciaRun.update`): task8 and task9 leave, task10 (board1, balanced) "
          f"arrives; re-solved (objective {up.solution.objective:.4f}, gap {up.solution.gap:.2%}) and applied in "
          f"{update_s:.0f} s: removed {', '.join(up.removed) or '—'}; added {', '.join(up.added) or '—'}; "
          f"redeployed (version or cuts changed) {', '.join(up.redeployed) or '—'}; shares changed in place "
          f"{', '.join(up.reshared) or '—'}; unchanged {', '.join(up.unchanged) or '—'}. Then "
          f"1 warm-up + {max(3, args.requests // 2)} requests per task:",
          "",
          report2.table(),
          "",
          f"After the update: median error **{report2.median_error * 100:+.1f} %**, every output equal: "
          f"**{report2.all_exact}**.",
          "",
          "Columns: *nodes end/edge/cloud* = compute nodes of the version run on the task's end device, the edge "
          "server and the cloud; shares are levels of 8 (— = resource unused); *predicted* = the MILP's latency "
          "(docs/mcia.md); *error* = measured / predicted − 1; *max rel diff* = largest |output − the version's "
          "own single-device output| ÷ max |that output| over the task's requests; *test accuracy* = the "
          "version's top-1 on the data set's test split (version set record); *answers correct* = top-1 of the "
          "answers this run got (requests in parentheses)."]
    (OUT / "mcia_testbed.md").write_text("\n".join(md) + "\n")
    (OUT / "mcia_testbed.json").write_text(json.dumps({
        "time_scale": report.time_scale, "calibration": factors, "median_error": report.median_error,
        "all_exact": report.all_exact, "objective": sol.objective, "gap": sol.gap,
        "tasks": [{k: v for k, v in r.__dict__.items()} for r in report.results],
        "update": {"removed": up.removed, "added": up.added, "redeployed": up.redeployed, "reshared": up.reshared,
                   "unchanged": up.unchanged, "seconds": update_s, "median_error": report2.median_error,
                   "all_exact": report2.all_exact,
                   "tasks": [{k: v for k, v in r.__dict__.items()} for r in report2.results]}}, indent=1) + "\n")
    print(f"written {OUT / 'mcia_testbed.md'}; median error {statistics.median(errs) * 100:+.1f} %")
    return 0 if report.all_exact and report2.all_exact and abs(report.median_error) <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
