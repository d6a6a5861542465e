"""FCPM accuracy with the timing harness: layers timed in context, accuracy judged against re-timing.

    /work/bin/measure .venv/bin/python benchmarks/fcpm_accuracy.py              # ~25 min of timing (--minutes)
    .venv/bin/python benchmarks/fcpm_accuracy.py --quick --minutes 2           # for development

Every timing goes through the harness (edgepart/fcpm/harness.py): one thread pinned to one core
(the background load's process on the other core), each job after the same predecessor in every
pass, interleaved passes, repeated until the median's relative standard error is at
``--target-rse`` or the phase's share of ``--minutes`` is spent. Everything is timed in two
rounds (A, then B) at every load level; the share of jobs whose A and B estimates agree within
±10 % is the set's *re-timing agreement*, the harness's repeatability and the ceiling for any
model. Every harness run also times a reference kernel every 0.2 s; agreement is reported raw and
drift-corrected (each run scaled by the reference's typical time ÷ its median in that run), and a
job's measured time is the geometric mean of its drift-corrected A and B.

Test sets, **in context** (each layer inside its stage, a timer around it, after its real predecessor):

* *zoo layers*: every non-view node of the zoo models, each model run node by node;
* *row slices*: the layers of row-sliced regions (2..6 consecutive row-local zoo layers, each
  computing the rows the next needs, halos and explicit border padding as device code has them);
* *regions* (whole and row-sliced): the sum of their layers' times;
* *whole models*: the sum of the model's layers' times.

**Isolated** (the second table; each job alone, warm): held-out sweep configurations, distinct
zoo layers and row slices of them.

The FCPM: the isolated part fitted on 70 % of the sweep's configurations; the in-network part
(DeviceProfile.fit_context) on random synthetic CNNs timed layer by layer in context — no zoo model
in either. FLOPs baseline: latency linear in FLOPs per op type and load (Neurosurgeon).
Writes benchmarks/results/fcpm_accuracy.{md,json,png} and fcpm_measurements.json (raw, for
``--refit``); a profile only with ``--profile-out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart import models  # noqa: E402
from edgepart.fcpm.context import chain_reuse, chain_rows, chain_stage, graph_stage, with_reuse  # noqa: E402
from edgepart.fcpm.features import clean_info, features  # noqa: E402
from edgepart.fcpm.harness import (Estimate, Harness, Isolated, agreement, drift_corrected,  # noqa: E402
                                   pinned_thread, reference_drift)
from edgepart.fcpm.load import BackgroundLoad  # noqa: E402
from edgepart.fcpm.model import CANDIDATES, CONTEXT_TERMS, MIN_CONTEXT_SCALE, DeviceProfile, metrics  # noqa: E402
from edgepart.fcpm.ops import Runner, geometry  # noqa: E402
from edgepart.fcpm.profiler import COUNTS, design_nets, design_sweep, device_meta  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.passes.info import node_info  # noqa: E402
from edgepart.passes.trace import COMPUTE_OPS, trace  # noqa: E402

from results_notes import write_keeping_analysis  # noqa: E402

ROW_LOCAL = {"conv2d", "max_pool2d", "avg_pool2d", "batch_norm", "activation", "pointwise", "interpolate", "pad"}
ZOO = ["resnet18", "mobilenet_v2", "alexnet", "inception", "yolov2_tiny", "se_resnet", "unet", "tinynet", "resnet50",
       "vgg16"]
# share of each (load, round)'s time per phase
PHASES = {"sweep": 0.30, "isolated zoo": 0.22, "models": 0.28, "regions": 0.10, "nets": 0.10}


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



# --------------------------------------------------------------------------- units

def nbytes_of(info, rows=None):
    g = geometry(info, rows)
    return int(4 * (g.weight_elems + g.in_elems + g.out_elems))


def build_units(configs, test_cids, layers, slices, regions, graphs, nets, region_runs=10):
    """{phase: [harness units]}; every key a tuple of plain values (JSON-able). ``region_runs``: timed runs of a
    region per visit at most (a sample is their median; 1: every sample one run, so a total's mean is the
    mean run's)."""
    u = {p: [] for p in PHASES}
    for c in configs:
        for r in c["rows"]:
            u["sweep"].append(Isolated(("sweep", c["cid"], r), (lambda c=c, r=r: Runner(c["info"], r, seed=c["cid"])),
                                       nbytes_of(c["info"], r)))
    for i, info in enumerate(layers):
        u["isolated zoo"].append(Isolated(("layer", i), (lambda info=info, i=i: Runner(info, None, seed=1000 + i)),
                                          nbytes_of(info)))
    for i, (info, r) in enumerate(slices):
        u["isolated zoo"].append(Isolated(("slice", i), (lambda info=info, r=r, i=i: Runner(info, r, seed=3000 + i)),
                                          nbytes_of(info, r)))
    for name, (_, x, gm) in graphs.items():
        u["models"].append(graph_stage(gm, (x,), f"model:{name}")[0])
    for i, reg in enumerate(regions):
        st = chain_stage(reg["infos"], reg["rows"], f"region:{i}", seed=5000 + 10 * i)[0]
        st.max_runs = region_runs
        u["regions"].append(st)
    for i, (net, x) in enumerate(nets):
        u["nets"].append(graph_stage(analyse(trace(net, (x,))), (x,), f"net:{i}")[0])
    rng = np.random.default_rng(7)             # one fixed order, the same in every pass and round
    for p in u:
        order = rng.permutation(len(u[p]))
        u[p] = [u[p][j] for j in order]
    return u


def measure_all(units, loads, minutes, target_rse, rounds=("A", "B"), progress=True, phases=None, share="time",
                heap_shuffle=True):
    """{round: {load: {key: Estimate as JSON}}}, every phase (of ``phases``) timed in every round at every load.
    ``share="time"``: each phase's time shared out equally among its units, no sample cap (short jobs take more
    samples); ``"samples"``: one sample of every unit per pass, at most 40 (the runs of 2026-12-04/05).
    ``heap_shuffle``: a new heap layout before every visit (Harness.shuffle_heap; off in the runs before
    2026-12-05 07:00 UTC)."""
    out = {r: {} for r in rounds}
    phases = {p: PHASES[p] / sum(PHASES[q] for q in phases or PHASES) for p in (phases or PHASES)}
    per = minutes * 60.0 / (len(loads) * len(rounds))
    with pinned_thread() as core:
        for L in loads:
            with BackgroundLoad(L, avoid_cpu=core):
                for rd in rounds:
                    est = {}
                    for phase, part in phases.items():
                        t0 = time.perf_counter()
                        h = Harness(target_rse=target_rse, min_samples=5, budget_s=per * part, sample_s=0.003,
                                    reference=True, max_samples=None if share == "time" else 40,
                                    time_share=share == "time", shuffle_heap=heap_shuffle)
                        got = h.run(units[phase])
                        est.update({k: e.to_json() for k, e in got.items()})
                        for what, err in h.failures:
                            print(f"  load {L:.0%} round {rd} {phase}: left out {what}: {err}", flush=True)
                        if progress:
                            conv = np.mean([e.converged for e in got.values()]) if got else float("nan")
                            print(f"  load {L:.0%} round {rd} {phase:<13} {len(got):5d} jobs in "
                                  f"{time.perf_counter() - t0:5.0f} s, {conv:.0%} at the target RSE", flush=True)
                    out[rd][L] = est
    return out, core


# --------------------------------------------------------------------------- evaluation

SETS_CONTEXT = ("zoo layers", "row slices", "regions (whole)", "regions (row slices)", "whole models")
SETS_ISOLATED = ("held-out sweep configs", "zoo layers (isolated)", "zoo row slices (isolated)")


def combine(meas, loads, kind_of=None, level="run"):
    """Per load, raw and drift-corrected: {key: geometric mean of the rounds' estimates} and {key: (A, B)}.

    Drift-corrected (harness.drift_corrected, ``level``): per phase (one harness run per round), each
    round's estimates × (the reference's typical time over the rounds ÷ its median in that round's run),
    the reference ``kind_of(key)`` (default: the compute kernel for every job). Estimates without
    reference timings (older files) stay raw."""
    rounds = list(meas)
    out = {"raw": ({}, {}), "corrected": ({}, {})}
    for L in loads:
        keys = sorted(set.intersection(*(set(meas[r][L]) for r in rounds)), key=repr)   # a fixed order: refits repeat
        runs = [{k: Estimate.from_json(meas[r][L][k]) for k in keys} for r in rounds]
        corr = [{} for _ in rounds]
        for phase in sorted({_phase(k) for k in keys}):
            part = drift_corrected([{k: e for k, e in run.items() if _phase(k) == phase} for run in runs],
                                   kind_of or (lambda k: "compute"), level=level)
            for c, p in zip(corr, part):
                c.update(p)
        for label, per_round in (("raw", [{k: e.t for k, e in run.items()} for run in runs]), ("corrected", corr)):
            both, pairs = out[label][0].setdefault(L, {}), out[label][1].setdefault(L, {})
            for k in keys:
                ts = [run[k] for run in per_round]
                both[k] = float(np.exp(np.mean(np.log(ts))))
                if len(ts) >= 2:
                    pairs[k] = (ts[0], ts[1])
    return out


def drift_table(meas, loads, sets_of, pairs_by):
    """Per load: the references' B ÷ A (the host-wide drift removed) and, per test set, the median job's B ÷ A
    raw and drift-corrected."""
    rows = {}
    for L in loads:
        rounds = list(meas)
        runs = [{k: Estimate.from_json(e) for k, e in meas[r][L].items()} for r in rounds]
        ref = reference_drift(runs) if len(runs) >= 2 else {}
        per_set = {}
        for name, keys in sets_of(L).items():
            med = {}
            for label in ("raw", "corrected"):
                pairs = pairs_by[label][L]
                r = [pairs[k][1] / pairs[k][0] for k in keys if k in pairs]
                med[label] = float(np.median(r)) if r else float("nan")
            per_set[name] = med
        rows[L] = {"reference": {k: v[-1] for k, v in ref.items()}, "sets": per_set}
    return rows


def evaluate(times, pairs, loads, configs, test_cids, layers, slices, regions, graphs, nets, stored, meta, seed,
             raw=None, terms=CONTEXT_TERMS, min_scale=MIN_CONTEXT_SCALE):
    """Fit on the training data in ``times`` (drift-corrected) and score every test set per load; ``raw``:
    (times, pairs) as timed, for the raw re-timing agreement and the accuracy against raw times."""
    recs = [{"cid": k[1], "family": configs[k[1]]["family"], "rows": k[2], "load": L, "t": t}
            for L in loads for k, t in times[L].items() if k[0] == "sweep"]
    train = [r for r in recs if r["cid"] not in test_cids]
    prof = DeviceProfile.fit(stored, train, dict(meta, split="train (70% of sweep configs)"), seed=seed,
                             keep_measurements=False)
    net_info = [with_reuse(analyse(trace(net, (x,)))) for net, x in nets]
    ctx = [{"info": net_info[int(k[0].split(":")[1])][k[1]], "rows": None, "load": L, "t": t,
            "net": int(k[0].split(":")[1]), "name": k[1]}
           for L in loads for k, t in times[L].items()
           if isinstance(k[0], str) and k[0].startswith("net:") and k[1] != "total"]
    ctx_fit = prof.fit_context(ctx, terms=terms, min_scale=min_scale)
    stages = training_stages(times, loads, nets, net_info)
    stage_fit = prof.fit_stage_load(stages)
    model_info = {name: with_reuse(gm) for name, (_, _, gm) in graphs.items()}
    region_r = [chain_rows(reg["infos"], reg["rows"]) for reg in regions]
    region_i = [chain_reuse(reg["infos"], r) for reg, r in zip(regions, region_r)]

    def pred(info, rows, L, ctx_="sequence"):
        return (prof.predict(info, rows, L, context=ctx_), prof.predict(info, rows, L, which="baseline"))

    def layer_sum(info, rows, L):       # without the stage's share at load (fit_stage_load)
        return prof.predict(info, rows, L, context="layer")

    results = {}
    for L in loads:
        sets = {s: [] for s in SETS_CONTEXT + SETS_ISOLATED}
        models_tab = {}
        model_sum = {}
        region_sum = {}
        for k, t in times[L].items():
            tag = k[0]
            if tag == "sweep" and k[1] in test_cids:
                sets["held-out sweep configs"].append((k, *pred(configs[k[1]]["info"], k[2], L, "isolated"), t))
            elif tag == "layer":
                sets["zoo layers (isolated)"].append((k, *pred(layers[k[1]], None, L, "isolated"), t))
            elif tag == "slice":
                info, r = slices[k[1]]
                sets["zoo row slices (isolated)"].append((k, *pred(info, r, L, "isolated"), t))
            elif isinstance(tag, str) and tag.startswith("model:"):
                name = tag.split(":", 1)[1]
                if k[1] == "total":
                    continue
                p, b = pred(model_info[name][k[1]], None, L)
                q = layer_sum(model_info[name][k[1]], None, L)
                sets["zoo layers"].append((k, q, b, t))          # a layer: its typical time in context
                s = model_sum.setdefault(name, [0.0, 0.0, 0.0])
                s[0] += p
                s[1] += b
                s[2] += q
            elif isinstance(tag, str) and tag.startswith("region:"):
                i = int(tag.split(":")[1])
                if k[1] == "total":
                    continue
                reg = regions[i]
                p, b = pred(region_i[i][k[1]], region_r[i][k[1]], L)
                q = layer_sum(region_i[i][k[1]], region_r[i][k[1]], L)
                whole = reg["rows"] == reg["infos"][-1]["rows"]
                if not whole:
                    sets["row slices"].append((k, q, b, t))
                s = region_sum.setdefault(i, [0.0, 0.0, 0.0])
                s[0] += p
                s[1] += b
                s[2] += q
        layer_only = {}                  # stage sets: {key: the sum of the layers' typical times}
        for name, (p, b, q) in model_sum.items():
            k = (f"model:{name}", "total")
            if k in times[L]:
                sets["whole models"].append((k, p, b, times[L][k]))
                layer_only[k] = q
                models_tab[name] = {"measured_ms": times[L][k] * 1e3, "fcpm_ms": p * 1e3, "baseline_ms": b * 1e3,
                                    "layers_ms": q * 1e3}
        for i, (p, b, q) in region_sum.items():
            k = (f"region:{i}", "total")
            if k in times[L]:
                whole = regions[i]["rows"] == regions[i]["infos"][-1]["rows"]
                sets["regions (whole)" if whole else "regions (row slices)"].append((k, p, b, times[L][k]))
                layer_only[k] = q
        results[L] = {"models": models_tab}
        for name, rows in sets.items():
            if not rows:
                continue
            keys = [r[0] for r in rows]
            p, b, t = (np.array(v, float) for v in list(zip(*rows))[1:])
            rt_pairs = raw[1] if raw else pairs
            results[L][name] = {"fcpm": metrics(p, t), "baseline": metrics(b, t),
                                "retiming": agreement({k: pairs[L][k][0] for k in keys if k in pairs[L]},
                                                      {k: pairs[L][k][1] for k in keys if k in pairs[L]}),
                                "retiming_raw": agreement({k: rt_pairs[L][k][0] for k in keys if k in rt_pairs[L]},
                                                          {k: rt_pairs[L][k][1] for k in keys if k in rt_pairs[L]}),
                                "fcpm_raw": metrics(p, [raw[0][L][k] for k in keys]) if raw else None,
                                "fcpm_layers_only": (metrics([layer_only[k] for k in keys], t)
                                                     if all(k in layer_only for k in keys) else None),
                                "keys": [list(k) for k in keys],
                                "points": [[float(x), float(y), float(z)] for x, y, z in zip(p, b, t)]}
    variants = fit_variants(prof, ctx, terms, stages, times, loads, model_info, regions, region_i, region_r, nets,
                            net_info, min_scale)
    return prof, results, dict(ctx_fit, stage_load=stage_fit, variants=variants), recs, ctx, stages


VARIANTS = ("layers", "layers + stage share", "layers, windows, totals + stage share")


def fit_variants(prof, ctx, terms, stages, times, loads, model_info, regions, region_i, region_r, nets, net_info,
                 min_scale=MIN_CONTEXT_SCALE):
    """The in-context part fitted three ways on the same training networks, scored on the stage test sets
    ({variant: {load: {set: acc±10%}}}): on layers alone without a stage's share at load (the 2026-12-05 form);
    with it (the default); and jointly on layers, windows of 2, 3, 4 and 6 consecutive layers and the networks'
    totals (fit_context(sums=...), weight 1), with it. The per-layer sets do not depend on the share."""
    import copy
    pos = {}                       # (load, net, node name) -> index into ctx
    for j, c in enumerate(ctx):
        pos[(c["load"], c["net"], c["name"])] = j
    sums = []
    for L in loads:
        for i in range(len(nets)):
            members = [pos[(L, i, name)] for name in net_info[i] if (L, i, name) in pos]
            for w in (2, 3, 4, 6):
                for s0 in range(len(members) - w + 1):
                    win = members[s0:s0 + w]
                    sums.append({"members": win, "t": sum(ctx[j]["t"] for j in win)})
            k = (f"net:{i}", "total")
            if k in times[L] and members:
                sums.append({"members": members, "t": times[L][k]})
    out = {}
    for name in VARIANTS:
        p = copy.deepcopy(prof)
        p.fit_context(ctx, terms=terms, sums=sums if "windows" in name else None, min_scale=min_scale)
        if "stage share" in name:
            p.fit_stage_load(stages)
        per = {}
        for L in loads:
            got = {"regions (whole)": [], "regions (row slices)": [], "whole models": [], "zoo layers": []}
            for mname, infos in model_info.items():
                k = (f"model:{mname}", "total")
                if k in times[L]:
                    got["whole models"].append((sum(p.predict(i, None, L) for n, i in infos.items()
                                                    if (f"model:{mname}", n) in times[L]), times[L][k]))
                    got["zoo layers"] += [(p.predict(i, None, L, context="layer"), times[L][(f"model:{mname}", n)])
                                          for n, i in infos.items() if (f"model:{mname}", n) in times[L]]
            for i, reg in enumerate(regions):
                k = (f"region:{i}", "total")
                if k in times[L]:
                    whole = reg["rows"] == reg["infos"][-1]["rows"]
                    got["regions (whole)" if whole else "regions (row slices)"].append(
                        (sum(p.predict(region_i[i][j], region_r[i][j], L) for j in range(len(reg["infos"]))),
                         times[L][k]))
            per[L] = {s: metrics(*(np.array(v, float) for v in zip(*rows)))["acc10"] for s, rows in got.items() if rows}
        out[name] = per
    return out


def training_stages(times, loads, nets, net_info):
    """The synthetic networks' totals as stages ({infos, load, t}) for DeviceProfile.fit_stage_load."""
    out = []
    for L in loads:
        for i in range(len(nets)):
            k = (f"net:{i}", "total")
            if k in times[L]:
                out.append({"infos": [info for name, info in net_info[i].items() if (f"net:{i}", name) in times[L]],
                            "load": L, "t": times[L][k]})
    return out


# --------------------------------------------------------------------------- main

def sizes(a) -> dict:
    """What decides the jobs (saved with the measurements: a re-fit must rebuild the same ones)."""
    return {"quick": bool(a.quick), "models": a.models, "scale": a.scale, "layers": a.layers,
            "slices_per_layer": a.slices_per_layer, "regions": a.regions, "nets": a.nets, "seed": a.seed}


def test_sets(a):
    """(configs, held-out cids, zoo graphs, zoo layers, slices, regions, synthetic nets, stored configs) for the
    sizes in ``a`` — deterministic in them."""
    rng = np.random.default_rng(a.seed)
    names = a.models.split(",")
    if a.quick:
        names = [n for n in names if n in ("tinynet", "resnet18", "mobilenet_v2")]
    counts = {k: max(2, int(round(v * (a.scale / 6 if a.quick else a.scale)))) for k, v in COUNTS.items()}
    configs = design_sweep(seed=a.seed, counts=counts)
    by_fam = {}
    for c in configs:
        by_fam.setdefault(c["family"], []).append(c["cid"])
    test_cids = set()
    for fam, cids in by_fam.items():
        k = int(round(0.3 * len(cids)))
        test_cids |= set(rng.choice(cids, size=k, replace=False).tolist()) if k else set()
    graphs = zoo_graphs(names)
    layers, slices = zoo_layers(graphs, rng, 30 if a.quick else a.layers, a.slices_per_layer)
    regions = zoo_regions(graphs, rng, 8 if a.quick else a.regions)
    nets = design_nets(3 if a.quick else a.nets, a.seed)
    stored = [{"cid": c["cid"], "family": c["family"], "info": clean_info(c["info"]), "rows": c["rows"]}
              for c in configs]
    return configs, test_cids, graphs, layers, slices, regions, nets, stored


def load_measurements(raw_path: Path, a):
    """The saved rounds ({round: {load: {key: estimate JSON}}}), timing seconds and core; refuses a file measured
    with other sizes than ``a``'s (its jobs would not be the ones rebuilt here)."""
    saved = json.loads(raw_path.read_text())
    want, got = sizes(a), saved.get("sizes")
    if got is not None and got != want:
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        raise SystemExit(f"{raw_path} was measured with other sizes {diff} (saved, asked): pass the saved ones")
    meas = {rd: {float(L): {_key(k): e for k, e in rows} for L, rows in by_load.items()}
            for rd, by_load in saved["measurements"].items()}
    return meas, saved["seconds"], saved.get("timing_cpu"), saved

def _key(k):
    return tuple(k)


def _phase(k) -> str:
    """The phase a job key belongs to."""
    tag = str(k[0])
    return {"sweep": "sweep", "layer": "isolated zoo", "slice": "isolated zoo"}.get(tag) or \
        {"model": "models", "region": "regions", "net": "nets"}[tag.split(":")[0]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="three small models, a small sweep (development)")
    ap.add_argument("--loads", default="0,0.5")
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--minutes", type=float, default=24.0, help="timing budget over all loads and both rounds")
    ap.add_argument("--scale", type=float, default=0.5, help="sweep size relative to the profiler's default design")
    ap.add_argument("--layers", type=int, default=250, help="distinct zoo layers timed isolated (at most)")
    ap.add_argument("--slices-per-layer", type=int, default=1)
    ap.add_argument("--regions", type=int, default=60, help="zoo regions (each also row-sliced)")
    ap.add_argument("--nets", type=int, default=12, help="synthetic networks the in-network part is fitted on")
    ap.add_argument("--target-rse", type=float, default=0.01)
    ap.add_argument("--min-scale", type=float, default=MIN_CONTEXT_SCALE,
                    help="floor on each group's scale a in the in-network part (0: none, the 2026-12-05 00:43 form)")
    ap.add_argument("--region-runs", type=int, default=10,
                    help="timed runs of a region per visit at most (1: one run per sample; see build_units)")
    ap.add_argument("--share", choices=("time", "samples"), default="time",
                    help="how a phase's time is divided among its jobs: equal time, no sample cap (default), or one "
                         "sample per job per pass up to 40 (the runs of 2026-12-04/05)")
    ap.add_argument("--no-heap-shuffle", action="store_true",
                    help="keep the heap as the jobs before left it (the runs before 2026-12-05 07:00 UTC) instead of a "
                         "new layout before every visit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--profile-out", default=None, help="also write the FCPM fitted on the whole sweep here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--refit", action="store_true", help="re-fit and re-report from the saved measurements")
    ap.add_argument("--phases", default=None,
                    help=f"time only these phases (of {','.join(PHASES)}) and replace their jobs in the saved "
                         "measurements, keeping the others")
    ap.add_argument("--measure-only", action="store_true",
                    help="time and save the raw measurements, then stop (fit and report later with --refit, "
                         "outside the measurement lock)")
    ap.add_argument("--context-terms", default=",".join(CONTEXT_TERMS),
                    help="terms of the in-network part (edgepart.fcpm.model.context_terms); 'node,weights,inputs' "
                         "is the 2026-12-04 form")
    a = ap.parse_args(argv)
    terms = tuple(t for t in a.context_terms.split(",") if t)
    torch.set_num_threads(1)
    loads = [float(v) for v in a.loads.split(",")]
    configs, test_cids, graphs, layers, slices, regions, nets, stored = test_sets(a)
    sfx = "_quick" if a.quick else ""
    raw_path = Path(a.out) / f"fcpm_measurements{sfx}.json"
    print(f"{len(configs)} sweep configs ({len(test_cids)} held out), {len(layers)} zoo layers and {len(slices)} "
          f"slices isolated, {len(graphs)} models and {len(regions)} regions in context, {len(nets)} training "
          f"networks; loads {loads}, two rounds, {a.minutes:g} min", flush=True)
    if a.refit:
        meas, t_meas, core, _ = load_measurements(raw_path, a)
    else:
        units = build_units(configs, test_cids, layers, slices, regions, graphs, nets, a.region_runs)
        t0 = time.time()
        phases = a.phases.split(",") if a.phases else None
        meas, core = measure_all(units, loads, a.minutes, a.target_rse, progress=not a.no_progress, phases=phases,
                                 share=a.share, heap_shuffle=not a.no_heap_shuffle)
        t_meas = time.time() - t0
        if phases:                  # the other phases' jobs as saved before
            saved = json.loads(raw_path.read_text())
            for rd, by_load in saved["measurements"].items():
                for L, rows in by_load.items():
                    mine = meas.setdefault(rd, {}).setdefault(float(L), {})
                    for k, e in rows:
                        if _phase(_key(k)) not in phases or float(L) not in loads:   # not re-timed now
                            mine[_key(k)] = e
            t_meas += saved["seconds"]
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps({"seconds": t_meas, "timing_cpu": core, "sizes": sizes(a), "share": a.share,
                                        "heap_shuffle": not a.no_heap_shuffle, "measurements": {
            rd: {str(L): [[list(k), e] for k, e in est.items()] for L, est in by_load.items()}
            for rd, by_load in meas.items()}}))
        if a.measure_only:
            print(f"wrote {raw_path} ({t_meas / 60:.1f} min of timing)")
            return 0
    loads = sorted({L for by_load in meas.values() for L in by_load})
    meta = device_meta("host")
    meta.update(loads=loads, timing_cpu=core, target_rse=a.target_rse, note="fitted by benchmarks/fcpm_accuracy.py")
    both = combine(meas, loads)
    times, pairs = both["corrected"]
    prof, results, ctx_fit, recs, ctx, stages = evaluate(times, pairs, loads, configs, test_cids, layers, slices, regions,
                                                 graphs, nets, stored, meta, a.seed, raw=both["raw"], terms=terms,
                                                 min_scale=a.min_scale)
    drift = drift_table(meas, loads, lambda L: {name: [tuple(k) for k in v["keys"]]
                                                for name, v in results[L].items() if name != "models"},
                        {label: both[label][1] for label in both})
    harness_stats = repeatability(meas, loads)
    short = short_layers(meas, loads, {label: both[label][1] for label in both})
    if a.profile_out:
        prof_all = DeviceProfile.fit(stored, recs, dict(meta, split="all sweep configs"), seed=a.seed)
        prof_all.fit_context(ctx, terms=terms, min_scale=a.min_scale)
        prof_all.fit_stage_load(stages)
        prof_all.save(a.profile_out)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(results, loads, prof, meta, a, len(configs), len(test_cids), len(layers), len(slices), len(regions),
                len(graphs), len(nets), t_meas, ctx_fit, harness_stats, drift, short, saved_harness(raw_path))
    print(md)
    write_keeping_analysis(out / f"fcpm_accuracy{sfx}.md", md)
    (out / f"fcpm_accuracy{sfx}.json").write_text(json.dumps(
        {"meta": meta, "loads": loads, "chosen_models": prof.summary(), "context_fit": ctx_fit,
         "harness": {str(L): v for L, v in harness_stats.items()},
         "short_layers": {str(L): v for L, v in short.items()},
         "drift": {str(L): v for L, v in drift.items()},
         "results": {str(L): v for L, v in results.items()}}, indent=1))
    plot(results, loads, out / f"fcpm_accuracy{sfx}.png")
    return 0


SHORT_BINS = ((0.0, 50e-6, "< 50 µs"), (50e-6, 200e-6, "50–200 µs"), (200e-6, 1e-3, "0.2–1 ms"),
              (1e-3, math.inf, "≥ 1 ms"))


def short_layers(meas, loads, pairs_by):
    """Zoo layers timed in context, by their time: per load and bin, jobs, median samples and RSE (both rounds),
    share at the target RSE, re-timing agreement raw and drift-corrected — do short layers repeat?"""
    out = {}
    rounds = list(meas)
    for L in loads:
        keys = [k for k in set.intersection(*(set(meas[r][L]) for r in rounds))
                if str(k[0]).startswith("model:") and k[1] != "total"]
        rows = []
        for lo, hi, label in SHORT_BINS:
            ks = [k for k in keys if lo <= pairs_by["raw"][L][k][0] < hi]
            es = [meas[r][L][k] for r in rounds for k in ks]
            if not ks:
                continue
            rse = [e["rse"] for e in es if e.get("rse") is not None]
            rows.append({"bin": label, "n": len(ks), "median_samples": float(np.median([e["n"] for e in es])),
                         "median_rse": float(np.median(rse)) if rse else float("nan"),
                         "converged": float(np.mean([bool(e["converged"]) for e in es])),
                         "agreement_raw": agreement(*({k: pairs_by["raw"][L][k][j] for k in ks} for j in (0, 1))),
                         "agreement": agreement(*({k: pairs_by["corrected"][L][k][j] for k in ks} for j in (0, 1)))})
        out[L] = rows
    return out


def repeatability(meas, loads):
    """Per load: the harness's own figures — jobs, share at the target RSE, median RSE, median samples."""
    out = {}
    for L in loads:
        es = [e for rd in meas for e in meas[rd].get(L, {}).values()]
        rse = [e["rse"] for e in es if e.get("rse") is not None]
        out[L] = {"estimates": len(es), "converged": float(np.mean([bool(e["converged"]) for e in es])) if es else 0,
                  "median_rse": float(np.median(rse)) if rse else float("nan"),
                  "p90_rse": float(np.percentile(rse, 90)) if rse else float("nan"),
                  "median_samples": float(np.median([e["n"] for e in es])) if es else 0}
    return out


# --------------------------------------------------------------------------- report

HEAD = ["| test set | load | n | re-timing agreement ±10%: raw | drift-corrected | FCPM acc±10% | FCPM ÷ agreement | "
        "FCPM acc±10% vs raw times | without the stage share | baseline acc±10% | FCPM RMSPE | baseline RMSPE | "
        "FCPM ρ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def table_rows(results, loads, sets):
    rows = []
    for L in loads:
        for name in sets:
            v = results[L].get(name)
            if not v:
                continue
            fc, bl, rt = v["fcpm"], v["baseline"], v["retiming"]
            rr = v.get("retiming_raw", rt)
            fr = (v.get("fcpm_raw") or {}).get("acc10", float("nan"))
            share = fc["acc10"] / rt if rt and not math.isnan(rt) else float("nan")

            def pct(x):
                return "–" if x is None or math.isnan(x) else f"{x:.0%}"
            lo = (v.get("fcpm_layers_only") or {}).get("acc10")
            rows.append(f"| {name} | {L:.0%} | {fc['n']} | {pct(rr)} | {pct(rt)} | "
                        f"**{fc['acc10']:.0%}** | {pct(share)} | {pct(fr)} | {pct(lo)} | {bl['acc10']:.0%} | "
                        f"{fc['rmspe']:.1%} | {bl['rmspe']:.1%} | {fc['spearman']:.3f} |")
    return rows


def saved_harness(raw_path) -> dict:
    """How the saved measurements were taken: {"share": how each phase's time was divided ("samples": the
    40-sample cap, files before --share), "heap_shuffle": a new heap layout before every visit (False in files
    before it)}."""
    try:
        saved = json.loads(Path(raw_path).read_text())
        return {"share": saved.get("share", "samples"), "heap_shuffle": bool(saved.get("heap_shuffle", False))}
    except (OSError, ValueError):
        return {"share": "?", "heap_shuffle": None}


def report(results, loads, prof, meta, a, n_cfg, n_test, n_layers, n_slices, n_regions, n_models, n_nets, t_meas,
           ctx_fit, hstats, drift, short=None, harness=None):
    harness = harness or {"share": "time", "heap_shuffle": True}
    share = harness["share"]
    lines = ["# FCPM accuracy", "",
             f"Measured on this host ({os.cpu_count()} cores, {meta['processor'] or meta['machine']}, torch "
             f"{meta['torch']}) on {time.strftime('%Y-%m-%d')}, {t_meas / 60:.1f} min of timing in all "
             f"(sizes `--scale {a.scale:g} --layers {a.layers} --regions {a.regions} --nets {a.nets} "
             f"--loads {','.join(f'{L:g}' for L in loads)}`{' --quick' if a.quick else ''}; timed under "
             "`/work/bin/measure`).", "",
             "**The harness** (`edgepart/fcpm/harness.py`): one torch thread pinned to CPU "
             f"{meta.get('timing_cpu')}, the background load's process pinned to the other core; every job visited "
             "in the same order in every pass (an isolated job after untimed warm calls of itself, a layer in "
             "context after its stage's previous layer), passes interleaved, each job repeated until its "
             f"median's relative standard error is ≤ {a.target_rse:.0%} (at least 5 samples) or its phase's "
             "time share is spent — "
             + ("the phase's time shared out equally among its units (a unit that has taken more than its share "
                "sits out passes; no sample cap: short jobs take more samples; `--share time`). "
                if share == "time" else "one sample of every unit per pass, at most 40 (`--share samples`). ")
             + ("A new heap layout before every visit (`HeapShuffle`: half of a pool of 64 untouched blocks of "
                "random size up to 4 MiB given back and taken again), so the tensors a visit allocates land "
                "elsewhere each time and an estimate is a median over layouts. "
                if harness.get("heap_shuffle") else "The heap as the jobs before left it (`--no-heap-shuffle`). ")
             + "Everything was timed in two rounds (A then B) at each load; "
             "**re-timing agreement** = share of a set's jobs whose A and B estimates agree within ±10 % — the "
             "harness's repeatability, and the ceiling of any model's ±10 % accuracy against them. Measured "
             "time = geometric mean of A and B.", "",
             "**Drift correction** (the host's speed taken out): throughout every harness run (one per phase, "
             "round and load) the harness times two reference kernels every 0.2 s — a 3×3 convolution whose "
             "data fit the core's L2 (*compute*) and a 4 MiB element-wise add (*memory*). *Drift-corrected* "
             "estimates are the raw ones × (the compute reference's typical time over both rounds ÷ its median "
             "in that run): a shift of the whole host between the rounds is removed, nothing else. The memory "
             "reference is recorded but not used: it moved by 12–24 % between rounds on its own while the jobs "
             "did not (corrected against it, the in-context zoo layers' agreement fell from 74 % to 3 %), and "
             "per-sample correction added the reference's noise to every job. The FCPM is fitted and scored on "
             "drift-corrected times; the column *vs raw times* scores the same predictions against the raw "
             "ones.", "",
             f"FCPM: isolated part fitted on 70 % of {n_cfg} sweep configurations, in-network part "
             f"(`DeviceProfile.fit_context`) on {n_nets} random synthetic CNNs timed layer by layer in context; "
             f"no zoo model in either. Tested on {n_models} zoo models run node by node (every non-view layer "
             f"in context), {n_regions} zoo regions (2–6 consecutive row-local layers) whole and row-sliced "
             f"(each layer in context on the rows the next needs), and isolated: the other {n_test} sweep "
             f"configurations, {n_layers} distinct zoo layers and {n_slices} row slices of them. "
             "Baseline: latency linear in FLOPs per op type and load (Neurosurgeon), fitted on the same "
             "isolated sweep. acc±10% = share of predictions within ±10 % of measured; *FCPM ÷ agreement* = "
             "that share as a fraction of the set's re-timing agreement.", "",
             "## Layers, slices, regions and models timed in context", "",
             *HEAD, *table_rows(results, loads, SETS_CONTEXT), "",
             "## Isolated timings (each job alone, warm)", "",
             *HEAD, *table_rows(results, loads, SETS_ISOLATED), "",
             "## The harness's repeatability", "",
             "| load | estimates (both rounds) | at the target RSE | median RSE | 90th pct RSE | median samples |",
             "|---|---|---|---|---|---|"]
    for L in loads:
        h = hstats[L]
        lines.append(f"| {L:.0%} | {h['estimates']} | {h['converged']:.0%} | {h['median_rse']:.2%} | "
                     f"{h['p90_rse']:.2%} | {h['median_samples']:.0f} |")
    if short:
        lines += ["", "Zoo layers timed in context, by their time (samples and RSE over both rounds' estimates):", "",
                  "| load | layer time | n | median samples | median RSE | at the target RSE | "
                  "re-timing agreement: raw | drift-corrected |", "|---|---|---|---|---|---|---|---|"]
        for L in loads:
            for r in short.get(L, []):
                lines.append(f"| {L:.0%} | {r['bin']} | {r['n']} | {r['median_samples']:.0f} | {r['median_rse']:.2%} | "
                             f"{r['converged']:.0%} | {r['agreement_raw']:.0%} | {r['agreement']:.0%} |")
    lines += ["", "## The host's drift between the rounds", "",
              "Round B ÷ round A: the reference kernels' median time (the drift the correction removes: 1.05 = the "
              "host was 5 % slower in round B), and the median job's estimate, raw and drift-corrected.", "",
              "| load | reference: compute | memory |", "|---|---|---|"]
    for L in loads:
        ref = drift.get(L, {}).get("reference", {})
        lines.append(f"| {L:.0%} | {ref.get('compute', float('nan')):.3f} | {ref.get('memory', float('nan')):.3f} |")
    lines += ["", "| test set | " + " | ".join(f"{L:.0%}: raw | corrected" for L in loads) + " |",
              "|---|" + "---|---|" * len(loads)]
    for n in SETS_CONTEXT + SETS_ISOLATED:
        cells = []
        for L in loads:
            v = drift.get(L, {}).get("sets", {}).get(n)
            cells += ["–", "–"] if not v else [f"{v['raw']:.3f}", f"{v['corrected']:.3f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    terms = ctx_fit.get("terms", [])
    lines += ["", "## The in-network part (fitted on the synthetic networks' layers in context)", "",
              f"Time in context = a·(isolated prediction) + Σ coefficient × term, terms {', '.join(terms[1:])} "
              f"(`edgepart/fcpm/model.py` context_terms; L2 = {ctx_fit.get('l2_bytes', 0) / 2**20:g} MiB), per group "
              f"(the op type, 1×1 convolutions apart; ≥ 12 samples, else the fit over all with a = 1; a ≥ "
              f"{ctx_fit.get('min_scale', 0):g}, `--min-scale`). On its own "
              f"{ctx_fit.get('n', 0)} training samples: RMSPE {ctx_fit.get('rmspe_isolated', float('nan')):.1%} isolated → "
              f"{ctx_fit.get('rmspe_corrected', float('nan')):.1%} corrected; within ±10 % "
              f"{ctx_fit.get('acc10_isolated', float('nan')):.0%} → {ctx_fit.get('acc10_corrected', float('nan')):.0%}.",
              "", "| group | a | " + " | ".join(f"{t} ({'µs' if t == 'node' else 'ns/KB'})" for t in terms[1:]) + " |",
              "|---|---|" + "---|" * (len(terms) - 1)]
    for g, c in sorted((ctx_fit.get("groups") or {}).items()) + [("(all)", ctx_fit.get("global", [0] * len(terms)))]:
        cells = [f"{v * 1e6:.2f}" if t == "node" else f"{v * 1e9 * 1024:.3f}" for t, v in zip(terms[1:], c[1:])]
        lines.append(f"| {g} | {c[0]:.3f} | " + " | ".join(cells) + " |")
    sl = ctx_fit.get("stage_load") or {}
    if sl:
        lines += ["", "**A stage's share at load** (`DeviceProfile.fit_stage_load`, fitted on the synthetic networks' "
                  f"{sl['n']} totals after the in-network part): stage time = (1 + s) × Σ its layers' typical times in "
                  "context + d × its layers, per load; `predict(context=\"sequence\")` (what the cost model sums) "
                  "includes each node's share, `context=\"layer\"` (what the per-layer rows above are scored with) "
                  "does not; the column *without the stage share* scores the stage sets on the layers' typical times "
                  f"summed. On the networks: RMSPE {sl['rmspe_before']:.1%} → {sl['rmspe_after']:.1%}.", "",
                  "| load | s | d (µs per layer) |", "|---|---|---|"]
        for L, sc, nd in zip(sl["loads"], sl["scale"], sl["node"]):
            lines.append(f"| {L:.0%} | {sc:+.3f} | {nd * 1e6:.2f} |")
    var = ctx_fit.get("variants") or {}
    if var:
        sets = ("zoo layers", "regions (whole)", "regions (row slices)", "whole models")
        lines += ["", "**The in-network part fitted three ways** (same training networks; acc±10% on the test sets in "
                  "context; the default is the second):", "",
                  "| fitted on | " + " | ".join(f"{s_} {L:.0%}" for L in loads for s_ in sets) + " |",
                  "|---|" + "---|" * (len(sets) * len(loads))]
        for name, per in var.items():
            cells = [f"{per[L][s_]:.0%}" if s_ in per.get(L, {}) else "–" for L in loads for s_ in sets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Whole models (sum of their layers in context)", "",
              "| model | load | measured ms | FCPM ms | error | layers' typical times summed | error | baseline ms | "
              "error |", "|---|---|---|---|---|---|---|---|---|"]
    for L in loads:
        for name, v in sorted(results[L].get("models", {}).items()):
            e1 = v["fcpm_ms"] / v["measured_ms"] - 1
            e2 = v["baseline_ms"] / v["measured_ms"] - 1
            lm = v.get("layers_ms", v["fcpm_ms"])
            lines.append(f"| {name} | {L:.0%} | {v['measured_ms']:.2f} | {v['fcpm_ms']:.2f} | {e1:+.1%} | "
                         f"{lm:.2f} | {lm / v['measured_ms'] - 1:+.1%} | {v['baseline_ms']:.2f} | {e2:+.1%} |")
    lines += ["", "## Model chosen per op type (on a validation split of the training configurations)", "",
              "| op type | chosen | validation acc±10% (" + " / ".join(CANDIDATES) + ") |", "|---|---|---|"]
    for fam, m in sorted(prof.families.items()):
        v = m.validation
        accs = " / ".join(f"{v[k]['acc10']:.0%}" if k in v else "–" for k in CANDIDATES)
        lines.append(f"| {fam} | {v.get('chosen', m.chosen.type)} | {accs} |")
    return "\n".join(lines) + "\n"


def plot(results, loads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = ["zoo layers", "row slices", "regions (whole)", "regions (row slices)", "zoo layers (isolated)"]
    fig, axes = plt.subplots(1, len(loads), figsize=(4.6 * len(loads), 4.4), squeeze=False)
    for ax, L in zip(axes[0], loads):
        for s, mk in zip(sets, "o^vsx"):
            if s not in results[L]:
                continue
            pts = np.array(results[L][s]["points"])
            ax.scatter(pts[:, 2] * 1e3, pts[:, 0] * 1e3, s=7, marker=mk, label=s, alpha=0.5)
        xs = np.array([1e-3, 1e3])
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="gray", alpha=0.25, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*xs)
        ax.set_ylim(*xs)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("FCPM predicted ms")
        ax.set_title(f"background load {L:.0%}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
