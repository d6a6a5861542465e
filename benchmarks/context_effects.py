"""Two effects on a layer's time inside its stage that the FCPM harness and model meet (#20).

    /work/bin/measure .venv/bin/python benchmarks/context_effects.py          # ~6 min

1. **Heap layout.** One zoo model run as a stage (:func:`edgepart.fcpm.context.graph_stage`), timed by
   the harness in four rounds of one process: A and B in the heap state the process is in, C and D each
   after the heap was disturbed (blocks of random size taken, half given back). Pairs of rounds are
   compared (share of layers within ±10 %, all layers and those under 50 µs; the stage total's ratio),
   with the harness's heap shuffle off and on (``Harness(shuffle_heap=...)``).
2. **A small op after a layer with large weights.** A 98 KB tensor (512 × 7 × 7) read by a small op (batch
   norm, sum, ReLU, multiply, copy) right after a convolution that wrote it, for convolutions of 1–9 MB of
   weights, against the same op called again warm; and with a gap of busy-waiting in between.

Writes benchmarks/results/context_effects.{md,json}. Timing thread pinned to one core (the harness's).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.fcpm.context import graph_stage  # noqa: E402
from edgepart.fcpm.harness import Harness, median, pinned_thread  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402
from edgepart.runtime.allocator import keep_freed_memory  # noqa: E402

from results_notes import write_keeping_analysis  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAIRS = (("A", "B"), ("A", "C"), ("C", "D"), ("B", "D"))


def disturb(keep: list, seed: int) -> None:
    """Take 50 heap blocks of random size (up to 1.6 MB) and give half of all those kept back."""
    rng = random.Random(seed)
    keep += [torch.empty(rng.randint(1, 400_000)) for _ in range(50)]
    for j in rng.sample(range(len(keep)), len(keep) // 2):
        keep[j] = None


def layout_rounds(name: str, shuffle: bool, budget_s: float) -> dict:
    m, (x,) = models.get(name)
    gm = analyse(trace(m, (x,)))
    keep: list = []
    rounds = {}
    for label, seed in (("A", None), ("B", None), ("C", 1), ("D", 2)):
        if seed is not None:
            disturb(keep, seed)
        stage, _ = graph_stage(gm, (x,), "m")
        h = Harness(target_rse=0.01, min_samples=5, budget_s=budget_s, sample_s=0.003, max_samples=None,
                    time_share=True, shuffle_heap=shuffle)
        rounds[label] = {k: e.t for k, e in h.run([stage]).items()}
    layers = [k for k in rounds["A"] if k[1] != "total"]
    out = {}
    for a, b in PAIRS:
        def agree(keys):
            return float(np.mean([abs(rounds[b][k] / rounds[a][k] - 1) <= 0.10 for k in keys])) if keys else None
        short = [k for k in layers if rounds["A"][k] < 50e-6]
        out[f"{a}-{b}"] = {"all": agree(layers), "short": agree(short), "n": len(layers), "n_short": len(short),
                           "total": rounds[b][("m", "total")] / rounds[a][("m", "total")]}
    return out


def spin(us: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < us * 1e-6:
        pass


def after_large_weights(repeats: int = 100) -> list[dict]:
    x_shape = (1, 512, 7, 7)
    bn = torch.nn.BatchNorm2d(512).eval()
    ops = {"batch norm": bn, "sum": lambda t: t.sum(), "relu": torch.relu, "multiply": lambda t: t * 2.0,
           "copy": lambda t: t.clone()}
    rows = []
    with torch.inference_mode():
        for cin, k in ((512, 3), (256, 3), (128, 3), (512, 1), (64, 3)):
            conv = torch.nn.Conv2d(cin, 512, k, padding=k // 2, bias=False).eval()
            xx = torch.randn(1, cin, *x_shape[2:])
            for _ in range(5):
                y = conv(xx)
            for op, f in ops.items():
                after, warm = [], []
                for _ in range(repeats):
                    y = conv(xx)
                    t0 = time.perf_counter()
                    f(y)
                    after.append(time.perf_counter() - t0)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    f(y)
                    warm.append(time.perf_counter() - t0)
                rows.append({"conv": f"{cin}→512 {k}×{k}", "weights_mb": cin * 512 * k * k * 4 / 2 ** 20, "op": op,
                             "after_us": median(after) * 1e6, "warm_us": median(warm) * 1e6})
        conv = torch.nn.Conv2d(512, 512, 3, padding=1, bias=False).eval()
        xx = torch.randn(x_shape)
        for gap in (0, 20, 100, 1000):
            ts = []
            for _ in range(repeats):
                y = conv(xx)
                spin(gap)
                t0 = time.perf_counter()
                bn(y)
                ts.append(time.perf_counter() - t0)
            rows.append({"conv": "512→512 3×3", "weights_mb": 9.0, "op": f"batch norm, {gap} µs later",
                         "after_us": median(ts) * 1e6, "warm_us": None})
    return rows


def render(out: dict) -> str:
    lines = ["# Context effects on a layer's time (#20)", "",
             f"`benchmarks/context_effects.py` on {out['date']} ({out['seconds'] / 60:.1f} min; timing thread pinned "
             f"to CPU {out['cpu']}, one torch thread).", "",
             "## 1. Heap layout: the same stage re-timed in the same and in another heap state", "",
             f"Harness rounds of {out['budget_s']:g} s each: A and B in the process's heap state as it is; C after the "
             "heap was disturbed (50 blocks of random size up to 1.6 MB taken, half of all kept given back), D after "
             "another disturbance. Share of the stage's layers whose two rounds agree within ±10 % (all layers / "
             "those under 50 µs in round A), and the stage total's ratio.", "",
             "| model | heap shuffle | pair | layers within ±10 % | under 50 µs | total ratio |", "|---|---|---|---|---|---|"]
    for r in out["layout"]:
        for pair, v in r["pairs"].items():
            short = f"{v['short']:.0%} of {v['n_short']}" if v["short"] is not None else "–"
            lines.append(f"| {r['model']} | {'on' if r['shuffle'] else 'off'} | {pair} | {v['all']:.0%} of {v['n']} | "
                         f"{short} | {v['total']:.3f} |")
    lines += ["", "## 2. A small op on a 98 KB tensor right after the convolution that wrote it", "",
              "Median of 100 calls each: right after the convolution, and called again at once (warm). The last rows: "
              "the batch norm after a busy-wait of that long.", "",
              "| convolution | its weights (MB) | op | after it (µs) | warm (µs) |", "|---|---|---|---|---|"]
    for r in out["after_large_weights"]:
        warm = f"{r['warm_us']:.1f}" if r["warm_us"] is not None else "–"
        lines.append(f"| {r['conv']} | {r['weights_mb']:.1f} | {r['op']} | {r['after_us']:.1f} | {warm} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,unet")
    ap.add_argument("--round-s", type=float, default=15.0, help="harness budget per round")
    a = ap.parse_args(argv)
    keep_freed_memory()
    t0 = time.time()
    with pinned_thread() as cpu:
        layout = [{"model": name, "shuffle": sh, "pairs": layout_rounds(name, sh, a.round_s)}
                  for name in a.models.split(",") for sh in (False, True)]
        small = after_large_weights()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.time() - t0, "cpu": cpu,
           "budget_s": a.round_s, "layout": layout, "after_large_weights": small}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "context_effects.json").write_text(json.dumps(out, indent=1))
    md = render(out)
    write_keeping_analysis(RESULTS / "context_effects.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
