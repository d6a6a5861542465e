"""Corpus and SE models: how much of each model runs split, and ofpm's simulated latency, with global
pools split into row means + combine (passes.pools, issue #21) and without (the compiler before).

    .venv/bin/python benchmarks/corpus.py            # writes benchmarks/results/corpus.md

For each model (the corpus in tests/corpus at 224 px, ViT at 64 px; the zoo's SE-ResNet-18 at 224 px)
on 4 unequal devices (speeds 0.4, 0.5, 0.7, 1.0; source d0) at 100 and 1000 Mbit/s (1 ms per
message): the share of MACs in split stages of the ``even`` plan (everything the row maps let split)
and of the ``ofpm`` plan, and ofpm's simulated latency, each before and after. "Before" is the same
compiler with the pass replaced by the identity, so only the global pools differ.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.cluster import Cluster  # noqa: E402
from edgepart.compiler.cost.simulator import simulate_plan  # noqa: E402
from edgepart.compiler.planning.ofpm import solve_ofpm  # noqa: E402
from edgepart.compiler.planning.registry import WARM_START, make_plan  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from tests import corpus  # noqa: E402

SPEEDS = [0.4, 0.5, 0.7, 1.0]
MBPS = [100.0, 1000.0]
RESULTS = ROOT / "benchmarks" / "results"
TIME_LIMIT, REFINE_S = 120.0, 5.0


def cases():
    for name in corpus.CORPUS:
        yield name, *corpus.get(name, side=64 if name == "vit" else 224)
    model, inputs = models.get("se_resnet", input_size=224)
    yield "se_resnet (zoo)", model, inputs


def split_share(gm, plan) -> float:
    macs = {n.name: n.meta.get("macs", 0) for n in gm.graph.nodes}
    split = sum(macs[n] for s in plan.stages if s.kind == "split" for n in s.nodes)
    return split / max(1, sum(macs.values()))


def measure(model, inputs, split_pools: bool) -> dict:
    with torch.no_grad():
        if split_pools:
            gm = analyse(trace(model, inputs))
        else:
            with mock.patch("edgepart.passes.split_global_pools", lambda gm: gm):
                gm = analyse(trace(model, inputs))
    out = {"macs": sum(n.meta.get("macs", 0) for n in gm.graph.nodes)}
    for mbps in MBPS:
        cluster = Cluster.heterogeneous(SPEEDS, bandwidth_mbps=mbps)
        even = make_plan(gm, cluster, "even")
        # a generous solver and refinement budget: the default 10 s / 1 s make results depend on host load
        res = solve_ofpm(gm, cluster, warm_start=WARM_START, time_limit=TIME_LIMIT, refine_s=REFINE_S)
        ofpm = res.plan
        single = make_plan(gm, cluster, "single")
        out[mbps] = {"even_share": split_share(gm, even), "ofpm_share": split_share(gm, ofpm),
                     "even_ms": simulate_plan(gm, even, cluster).latency * 1e3,
                     "ofpm_ms": simulate_plan(gm, ofpm, cluster).latency * 1e3,
                     "single_ms": simulate_plan(gm, single, cluster).latency * 1e3, "chosen": ofpm.chosen,
                     "status": f"{res.status}, gap {res.gap:.1g}"}
    return out


def main() -> None:
    t0 = time.time()
    rows = []
    for name, model, inputs in cases():
        before, after = measure(model, inputs, False), measure(model, inputs, True)
        rows.append((name, inputs[0].shape[-1], before, after))
        print(name, {m: (round(before[m]["ofpm_ms"], 2), round(after[m]["ofpm_ms"], 2)) for m in MBPS}, flush=True)
    lines = [
        "# Corpus: split through global pools (issue #21)",
        "",
        f"`benchmarks/corpus.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t0:.0f} s. "
        f"4 unequal devices (speeds {', '.join(map(str, SPEEDS))}; source d0), 1 ms per message, FLOPs ÷ speed "
        "cost model, simulated (no FCPM profile). *before*: global pools whole (the compiler without "
        "`passes.pools`); *after*: each global pool is a row-local mean over each row, kept in the split stage, "
        "and a squeeze-excite MLP after it runs on every device of the split stage after an all-gather of the row "
        "means (`passes.pools`). MACs in split stages: `even` = what the row maps let split, "
        "`ofpm` = what the optimiser chooses to split. Latencies are simulated, in ms: ofpm's, and `even`'s (every "
        "splittable block split over all devices: it shows the pass where ofpm keeps a small model on one device) "
        "(`fastest alone` = the whole model on the fastest device, the input moved there, for scale); in brackets "
        f"the candidate ofpm chose after, and its MILP's status. ofpm ran with a {TIME_LIMIT:.0f} s solver limit and "
        f"{REFINE_S:.0f} s of slice refinement (the defaults, 10 s and 1 s, make the result depend on the host's load).",
        "",
        "| model | px | MMACs | even split MACs before → after | ofpm split MACs 100 Mbit/s before → after | "
        "ofpm ms 100 Mbit/s before → after | ofpm split MACs 1000 Mbit/s before → after | "
        "ofpm ms 1000 Mbit/s before → after | even ms 100 / 1000 Mbit/s before → after | "
        "fastest alone ms (100 / 1000) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, side, b, a in rows:
        cells = [name, str(side), f"{a['macs'] / 1e6:.1f}",
                 f"{100 * b[100.0]['even_share']:.1f} % → {100 * a[100.0]['even_share']:.1f} %"]
        for m in MBPS:
            cells.append(f"{100 * b[m]['ofpm_share']:.1f} % → {100 * a[m]['ofpm_share']:.1f} %")
            cells.append(f"{b[m]['ofpm_ms']:.2f} → {a[m]['ofpm_ms']:.2f} ({a[m]['chosen']}; {a[m]['status']})")
        cells.append(" / ".join(f"{b[m]['even_ms']:.1f} → {a[m]['even_ms']:.1f}" for m in MBPS))
        cells.append(f"{a[100.0]['single_ms']:.1f} / {a[1000.0]['single_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / "corpus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
