"""FCPM accuracy: predicted vs measured latency, FCPM next to the FLOPs-only baseline, per load level.

    .venv/bin/python benchmarks/fcpm_accuracy.py            # ~15 min on 2 cores
    .venv/bin/python benchmarks/fcpm_accuracy.py --quick    # a minute or so, for development

What is measured, at every background load level (made by edgepart.fcpm.load):

* the profiler's sweep; the FCPM and the baseline are fitted on 70 % of its
  configurations, the other 30 % are the *held-out configurations*;
* *zoo layers*: every distinct layer of the zoo models (never in the sweep), whole;
* *zoo slices*: row-sliced versions of those layers, heights as 2..8 devices give;
* *regions*: 2..6 consecutive row-local layers of zoo models run together as one
  (fused run, measured as one), whole and row-sliced; predicted as the sum of
  the layers' predictions;
* *whole models*: each zoo model's forward pass on this device (one torch thread),
  predicted as the sum of its nodes' predictions.

Metrics: share of predictions within ±10 % of measured (nn-Meter), RMSPE,
Spearman ρ. Writes benchmarks/results/fcpm_accuracy.{md,json,png} and
profiles/host.json (the FCPM fitted on the whole sweep).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.compiler.cost import node_info  # noqa: E402
from edgepart.compiler.trace import COMPUTE_OPS, trace  # noqa: E402
from edgepart.fcpm.features import clean_info, features  # noqa: E402
from edgepart.fcpm.load import BackgroundLoad, cpu_count  # noqa: E402
from edgepart.fcpm.model import DeviceProfile, metrics  # noqa: E402
from edgepart.fcpm.ops import Runner, family, geometry, time_callable  # noqa: E402
from edgepart.fcpm.profiler import design_nets, design_sweep, device_meta, measure_nets, net_infos  # noqa: E402
from edgepart.passes import analyse  # noqa: E402

ROW_LOCAL = {"conv2d", "max_pool2d", "avg_pool2d", "batch_norm", "activation", "pointwise", "interpolate", "pad"}
ZOO = ["resnet18", "mobilenet_v2", "alexnet", "inception", "yolov2_tiny", "se_resnet", "unet", "tinynet", "resnet50",
       "vgg16"]


# --------------------------------------------------------------------------- test sets from the zoo

def zoo_graphs(names):
    out = {}
    for name in names:
        m, (x,) = models.get(name)
        out[name] = (m, x, analyse(trace(m, (x,))))
    return out


def zoo_layers(graphs, rng, max_layers: int, slices_per_layer: int):
    """Distinct zoo layers (whole) and row slices of the row-local ones."""
    seen, layers = set(), []
    for name, (_, _, gm) in graphs.items():
        for n in gm.graph.nodes:
            if n.op not in COMPUTE_OPS:
                continue
            info = clean_info(node_info(n))
            fam, x, _ = features(info, None, 0.0)
            if fam == "trivial":
                continue
            key = (fam, tuple(round(v, 6) for v in x))
            if key in seen:
                continue
            seen.add(key)
            info["model"] = name
            layers.append(info)
    rng.shuffle(layers)
    layers = layers[:max_layers]
    slices = []
    for info in layers:
        H = info["rows"]
        if info["kind"] not in ROW_LOCAL or H < 4:
            continue
        cands = sorted({math.ceil(H / d) + int(rng.integers(0, 3)) for d in (2, 3, 4, 6, 8)} - {H})
        cands = [c for c in cands if 1 <= c < H]
        for r in rng.choice(cands, size=min(slices_per_layer, len(cands)), replace=False):
            slices.append((info, int(r)))
    return layers, slices


def _chain_ok(prev, n) -> bool:
    spec = n.meta.get("op")
    if spec is None or spec.kind not in ROW_LOCAL or n.meta.get("shape") is None or len(n.meta["shape"]) != 4:
        return False
    if spec.input is not None:
        return spec.input is prev
    return prev in n.all_input_nodes


def zoo_regions(graphs, rng, n_regions: int):
    """Runs of 2..6 consecutive row-local nodes, each consuming the previous one."""
    chains = []
    for name, (_, _, gm) in graphs.items():
        nodes = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
        for i, n in enumerate(nodes):
            spec = n.meta.get("op")
            if spec is None or spec.kind != "conv2d":
                continue
            chain = [n]
            for m in nodes[i + 1:]:
                if len(chain) >= 6 or not _chain_ok(chain[-1], m):
                    break
                chain.append(m)
            if len(chain) >= 2:
                k = int(rng.integers(2, len(chain) + 1))
                chains.append((name, [clean_info(node_info(c)) for c in chain[:k]]))
    rng.shuffle(chains)
    chains = chains[:n_regions]
    regions = []
    for name, infos in chains:
        H = infos[-1]["rows"]
        regions.append({"model": name, "infos": infos, "rows": H})
        if H >= 4:
            r = math.ceil(H / int(rng.choice([2, 3, 4]))) + int(rng.integers(0, 2))
            if r < H:
                regions.append({"model": name, "infos": infos, "rows": r})
    return regions


def region_rows(infos, rows_out):
    """Rows each layer of a chain computes so the last one yields ``rows_out`` rows."""
    rows = [rows_out]
    for info in reversed(infos[1:]):
        g = geometry(info, rows[0])
        need = g.in_rows if g.family in ("conv", "dwconv", "maxpool", "avgpool", "upsample") else g.rows
        prev_total = info["in_shape"][2] if info.get("in_shape") else g.rows
        rows.insert(0, max(1, min(need, prev_total)))
    return rows


class RegionRunner:
    def __init__(self, infos, rows_out, seed=0):
        self.rows = region_rows(infos, rows_out)
        self.runners = [Runner(info, r, seed=seed + i) for i, (info, r) in enumerate(zip(infos, self.rows))]

    def __call__(self):
        x = self.runners[0]._x
        for rn in self.runners:
            want = rn._x.shape
            if x.dim() != 4 or x.shape[1] != want[1] or x.shape[3] != want[3]:
                x = rn._x
            elif x.shape[2] > want[2]:
                x = x[:, :, : want[2]]
            elif x.shape[2] < want[2]:
                x = F.pad(x, (0, 0, 0, want[2] - x.shape[2]))
            x = rn.call(x)
        return x


# --------------------------------------------------------------------------- measuring

def measure_all(jobs, loads, target_s, min_repeats, progress=True, passes=2):
    """jobs: list of (key, make_callable, kind). Returns {(key, load): lowest median of ``passes`` passes}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    out = {}
    order = list(np.random.default_rng(7).permutation(len(jobs)))
    torch.set_num_threads(1)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("measuring", total=len(jobs) * len(loads) * passes)
        for L in loads:
            with BackgroundLoad(L):
                for p in range(passes):
                    for j in (order if p % 2 == 0 else order[::-1]):
                        key, make, kind = jobs[j]
                        fn = make()
                        ts = target_s * (8 if kind == "model" else 2 if kind == "region" else 1)
                        m = time_callable(fn, target_s=ts, min_repeats=min_repeats if kind != "model" else 5,
                                          max_repeats=50)
                        out[(key, L)] = min(out.get((key, L), float("inf")), m["t"])
                        del fn
                        bar.update(task, advance=1, description=f"load {L:.0%} · pass {p + 1} · {kind:<7}")
    return out


def model_callable(m, x):
    def run():
        return m(x)
    return run


# --------------------------------------------------------------------------- report

def fmt_row(name, L, fc, bl):
    return (f"| {name} | {L:.0%} | {fc['n']} | **{fc['acc10']:.0%}** | {bl['acc10']:.0%} | {fc['rmspe']:.1%} | "
            f"{bl['rmspe']:.1%} | {fc['spearman']:.3f} | {bl['spearman']:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--loads", default="0,0.25,0.5,0.75")
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--profile-out", default=str(ROOT / "profiles" / "host.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--refit", action="store_true", help="re-fit and re-report from the saved measurements")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    loads = [float(v) for v in a.loads.split(",")]
    rng = np.random.default_rng(a.seed)
    names = a.models.split(",")
    if a.quick:
        names = [n for n in names if n in ("tinynet", "resnet18", "mobilenet_v2")]
    t_start = time.time()

    # the sweep and its split
    configs = design_sweep(quick=a.quick, seed=a.seed)
    by_fam = {}
    for c in configs:
        by_fam.setdefault(c["family"], []).append(c["cid"])
    test_cids = set()
    for fam, cids in by_fam.items():
        k = int(round(0.3 * len(cids)))
        test_cids |= set(rng.choice(cids, size=k, replace=False).tolist()) if k else set()

    graphs = zoo_graphs(names)
    layers, slices = zoo_layers(graphs, rng, 40 if a.quick else 400, 1 if a.quick else 2)
    regions = zoo_regions(graphs, rng, 12 if a.quick else 70)

    jobs = []
    for c in configs:
        for r in c["rows"]:
            jobs.append((("sweep", c["cid"], r), (lambda c=c, r=r: Runner(c["info"], r, seed=c["cid"])), "sweep"))
    for i, info in enumerate(layers):
        jobs.append((("layer", i, info["rows"]), (lambda info=info, i=i: Runner(info, None, seed=1000 + i)), "layer"))
    for i, (info, r) in enumerate(slices):
        jobs.append((("slice", i, r), (lambda info=info, r=r, i=i: Runner(info, r, seed=3000 + i)), "slice"))
    for i, reg in enumerate(regions):
        jobs.append((("region", i, reg["rows"]),
                     (lambda reg=reg, i=i: RegionRunner(reg["infos"], reg["rows"], seed=5000 + 10 * i)), "region"))
    for name, (m, x, _) in graphs.items():
        jobs.append((("model", name, 0), (lambda m=m, x=x: model_callable(m, x)), "model"))
    print(f"{len(configs)} sweep configs ({len(test_cids)} held out), {len(layers)} zoo layers, {len(slices)} slices, "
          f"{len(regions)} regions, {len(graphs)} models; {len(jobs)} jobs × {len(loads)} loads", flush=True)

    raw_path = Path(a.out) / f"fcpm_measurements{'_quick' if a.quick else ''}.json"
    if a.refit:
        saved = json.loads(raw_path.read_text())
        meas = {(tuple(k), float(L)): t for k, L, t in saved["measurements"]}
        t_meas = saved["seconds"]
    else:
        meas = measure_all(jobs, loads, 0.005 if a.quick else 0.03, 3 if a.quick else 5,
                           progress=not a.no_progress, passes=1 if a.quick else 2)
        t_meas = time.time() - t_start
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps({"seconds": t_meas, "loads": loads, "measurements":
                                        [[list(k), L, t] for (k, L), t in meas.items()]}))
    loads = sorted({L for (_, L) in meas})
    nets = design_nets(4 if a.quick else 16, a.seed)
    if not any(k[0] == "net" for (k, _) in meas):   # training networks for the in-network correction
        for r in measure_nets(nets, loads, target_s=0.02 if a.quick else 0.3, passes=1 if a.quick else 2):
            meas[(("net", r["net"], 0), r["load"])] = r["t"]
        raw_path.write_text(json.dumps({"seconds": t_meas, "loads": loads, "measurements":
                                        [[list(k), L, t] for (k, L), t in meas.items()]}))
    net_info_lists = [net_infos(n, x) for n, x in nets]
    net_seqs = [{"infos": net_info_lists[k[1]], "load": L, "t": t} for (k, L), t in meas.items() if k[0] == "net"]

    # fit
    stored = [{"cid": c["cid"], "family": c["family"], "info": clean_info(c["info"]), "rows": c["rows"]}
              for c in configs]
    recs = [{"cid": k[1], "family": configs[k[1]]["family"], "rows": k[2], "load": L, "t": t}
            for (k, L), t in meas.items() if k[0] == "sweep"]
    train = [r for r in recs if r["cid"] not in test_cids]
    meta = device_meta("host")
    meta.update(loads=loads, note="fitted by benchmarks/fcpm_accuracy.py")
    prof = DeviceProfile.fit(stored, train, dict(meta, split="train (70% of sweep configs)"), seed=a.seed,
                             keep_measurements=False)

    seq_fit = prof.fit_sequences(net_seqs)

    def pair(info, rows, L, t):
        return prof.predict(info, rows, L, context="isolated"), prof.predict(info, rows, L, which="baseline"), t

    results = {L: {} for L in loads}
    rows_out = []
    for L in loads:
        sets = {"held-out sweep configs": [], "zoo layers (whole)": [], "zoo layers (row slices)": [],
                "regions (whole)": [], "regions (row slices)": [], "whole models": []}
        for (k, LL), t in meas.items():
            if LL != L:
                continue
            if k[0] == "sweep" and k[1] in test_cids:
                sets["held-out sweep configs"].append(pair(configs[k[1]]["info"], k[2], L, t))
            elif k[0] == "layer":
                sets["zoo layers (whole)"].append(pair(layers[k[1]], None, L, t))
            elif k[0] == "slice":
                sets["zoo layers (row slices)"].append(pair(slices[k[1]][0], k[2], L, t))
            elif k[0] == "region":
                reg = regions[k[1]]
                rr = region_rows(reg["infos"], reg["rows"])
                p = sum(prof.predict(i, r, L, context="isolated") for i, r in zip(reg["infos"], rr))
                b = sum(prof.predict(i, r, L, which="baseline") for i, r in zip(reg["infos"], rr))
                sets["regions (whole)" if reg["rows"] == reg["infos"][-1]["rows"] else "regions (row slices)"].append(
                    (p, b, t))
            elif k[0] == "model":
                gm = graphs[k[1]][2]
                infos = [node_info(n) for n in gm.graph.nodes if n.op in COMPUTE_OPS]
                p = sum(prof.predict(i, None, L) for i in infos)          # in-network correction included
                p_iso = sum(prof.predict(i, None, L, context="isolated") for i in infos)
                b = sum(prof.predict(i, None, L, which="baseline") for i in infos)
                sets["whole models"].append((p, b, t))
                results[L].setdefault("models", {})[k[1]] = {"measured_ms": t * 1e3, "fcpm_ms": p * 1e3,
                                                              "fcpm_isolated_sum_ms": p_iso * 1e3,
                                                              "baseline_ms": b * 1e3}
        for name, trip in sets.items():
            if not trip:
                continue
            p, b, t = (np.array(v) for v in zip(*trip))
            fc, bl = metrics(p, t), metrics(b, t)
            results[L][name] = {"fcpm": fc, "baseline": bl, "points": [[float(x), float(y), float(z)]
                                                                       for x, y, z in zip(p, b, t)]}
            rows_out.append(fmt_row(name, L, fc, bl))

    # final profile on the whole sweep
    prof_all = DeviceProfile.fit(stored, recs, dict(meta, split="all sweep configs"), seed=a.seed)
    prof_all.fit_sequences(net_seqs)
    if not a.quick:
        prof_all.save(a.profile_out)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sfx = "_quick" if a.quick else ""
    md = report(results, loads, prof, rows_out, meta, len(configs), len(test_cids), len(layers), len(slices),
                len(regions), t_meas, seq_fit)
    print(md)
    (out / f"fcpm_accuracy{sfx}.md").write_text(md)
    (out / f"fcpm_accuracy{sfx}.json").write_text(json.dumps(
        {"meta": meta, "loads": loads, "chosen_models": prof.summary(),
         "results": {str(L): v for L, v in results.items()}}, indent=1))
    plot(results, loads, out / f"fcpm_accuracy{sfx}.png")
    return 0


def report(results, loads, prof, rows_out, meta, n_cfg, n_test, n_layers, n_slices, n_regions, t_meas, seq_fit):
    lines = ["# FCPM accuracy", "",
             f"Measured on this host ({meta['cores']} cores, {meta['processor'] or meta['machine']}, torch "
             f"{meta['torch']}, one torch thread) on {time.strftime('%Y-%m-%d')}, {t_meas / 60:.0f} min of timing. "
             "The machine is shared with other engineers' test runs, so the background load is *at least* the "
             "controlled level; every time is the lower of two medians (two passes over all jobs, in opposite orders) of "
             "≥ 5 repeats after warm-up.", "",
             f"Fitted on 70 % of the {n_cfg} sweep configurations (all load levels); tested on the other {n_test} "
             f"configurations, {n_layers} distinct zoo layers (never in the sweep) and {n_slices} row slices of them, "
             f"and {n_regions} fused regions (2–6 consecutive row-local zoo layers run as one, whole and sliced, "
             "predicted as the sum of their layers).", "",
             "acc±10% = share of predictions within ±10 % of measured (nn-Meter's definition). "
             "Baseline = latency linear in FLOPs per layer type and load level (Neurosurgeon style).", "",
             "| test set | load | n | FCPM acc±10% | baseline acc±10% | FCPM RMSPE | baseline RMSPE | FCPM ρ | "
             "baseline ρ |", "|---|---|---|---|---|---|---|---|---|", *rows_out, "",
             "## Whole models (one device, one torch thread)", "",
             "Measured: the model's eager forward pass. FCPM: sum over its nodes of the isolated-layer prediction "
             "plus the in-network correction (per node: c0 + c1·weight bytes + c2·input bytes, non-negative), "
             f"fitted on {seq_fit.get('n', 0)} timings of 16 random synthetic CNNs (not zoo models) — "
             f"coefficients {', '.join(f'{c:.3g}' for c in seq_fit.get('coef', []))}. "
             "'sum of isolated' leaves the correction out.", "",
             "| model | load | measured ms | FCPM ms | error | sum of isolated ms | error | baseline ms | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for L in loads:
        for name, v in sorted(results[L].get("models", {}).items()):
            e1 = v["fcpm_ms"] / v["measured_ms"] - 1
            e0 = v["fcpm_isolated_sum_ms"] / v["measured_ms"] - 1
            e2 = v["baseline_ms"] / v["measured_ms"] - 1
            lines.append(f"| {name} | {L:.0%} | {v['measured_ms']:.1f} | {v['fcpm_ms']:.1f} | {e1:+.1%} | "
                         f"{v['fcpm_isolated_sum_ms']:.1f} | {e0:+.1%} | {v['baseline_ms']:.1f} | {e2:+.1%} |")
    lines += ["", "## Model chosen per op type (on a validation split of the training configurations)", "",
              "| op type | chosen | validation acc±10% (flops / loglinear / gbm) |", "|---|---|---|"]
    for fam, m in sorted(prof.families.items()):
        v = m.validation
        accs = " / ".join(f"{v[k]['acc10']:.0%}" if k in v else "–" for k in ("flops", "loglinear", "gbm"))
        lines.append(f"| {fam} | {v.get('chosen', m.chosen.type)} | {accs} |")
    return "\n".join(lines) + "\n"


def plot(results, loads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = ["held-out sweep configs", "zoo layers (whole)", "zoo layers (row slices)", "regions (whole)",
            "regions (row slices)"]
    fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 4.2), squeeze=False)
    for ax, L in zip(axes[0], loads):
        for s, mk in zip(sets, "o^vsD"):
            if s not in results[L]:
                continue
            pts = np.array(results[L][s]["points"])
            ax.scatter(pts[:, 2] * 1e3, pts[:, 0] * 1e3, s=8, marker=mk, label=s, alpha=0.6)
        lo, hi = 1e-3, 1e3
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="gray", alpha=0.25, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("FCPM predicted ms")
        ax.set_title(f"background load {L:.0%}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
