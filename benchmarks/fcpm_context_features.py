"""What explains a layer's time in context: the FCPM's in-network part fitted with one term set after another.

    .venv/bin/python benchmarks/fcpm_context_features.py            # after fcpm_accuracy.py; no timing

Reads the measurements `benchmarks/fcpm_accuracy.py` saved (``fcpm_measurements.json``; pass the sizes it was
measured with, as for ``--refit``) and, per load, fits the isolated part once on the training sweep, then
the in-network part (`DeviceProfile.fit_context`) with each term set of :data:`TERM_SETS` in turn, and
reports the share of in-context jobs within ±10 %:

* *zoo layers, nets → zoo*: fitted on the synthetic networks' layers (as the benchmark does), tested on
  every zoo model's layers in context;
* *zoo layers, leave one model out*: fitted on the synthetic networks plus all zoo models but one, tested on
  that one, for each zoo model in turn;
* *row slices* and *regions* (the sum of their layers): fitted on the networks.

Also the ceiling from the data themselves: the share of groups of identical layers (same op, shapes and
parameters, same model) whose times in context agree within ±10 % of their median — what no model that
sees only a layer's own features can beat. Times are drift-corrected where the file has reference
timings (`fcpm_accuracy.combine`). Writes benchmarks/results/fcpm_context_features.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fcpm_accuracy as fa  # noqa: E402
from edgepart.fcpm.context import chain_reuse, chain_rows, with_reuse  # noqa: E402
from edgepart.fcpm.model import DeviceProfile  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402

# cumulative: each adds to the one before (the split replaces the input bytes)
TERM_SETS = {
    "a·isolated + b (per group)": ("node",),
    "+ weight bytes": ("node", "weights"),
    "+ input bytes (the 2026-12-04 form; default)": ("node", "weights", "inputs"),
    "inputs split near / written by a conv / far": ("node", "weights", "in_near", "in_written", "in_far"),
    "+ output bytes": ("node", "weights", "in_near", "in_written", "in_far", "output"),
}


def within(p, t) -> list[bool]:
    return [abs(a / b - 1) <= 0.10 for a, b in zip(p, t)]


def identical_groups(samples_by_model) -> float:
    """Share of layers (in groups of ≥ 2 identical layers of one model) within ±10 % of their group's median."""
    hits = []
    for model, rows in samples_by_model.items():
        groups: dict[str, list[float]] = {}
        for s in rows:
            i = s["info"]
            key = json.dumps([i.get("kind"), i.get("label"), i.get("shape"), i.get("in_shapes"), i.get("params")],
                             sort_keys=True, default=str)
            groups.setdefault(key, []).append(s["t"])
        for ts in groups.values():
            if len(ts) >= 2:
                m = float(np.median(ts))
                hits += [abs(t / m - 1) <= 0.10 for t in ts]
    return float(np.mean(hits)) if hits else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--models", ",".join(fa.ZOO)), ("--scale", 0.5), ("--layers", 250), ("--regions", 60),
                          ("--nets", 12), ("--seed", 0), ("--slices-per-layer", 1)):
        ap.add_argument(flag, type=type(default), default=default)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    configs, test_cids, graphs, layers, slices, regions, nets, stored = fa.test_sets(a)
    raw_path = Path(a.out) / f"fcpm_measurements{'_quick' if a.quick else ''}.json"
    meas, _, _, _ = fa.load_measurements(raw_path, a)
    loads = sorted({L for by in meas.values() for L in by})
    times = fa.combine(meas, loads)["corrected"][0]
    net_info = [with_reuse(analyse(trace(net, (x,)))) for net, x in nets]
    model_info = {name: with_reuse(gm) for name, (_, _, gm) in graphs.items()}
    region_r = [chain_rows(reg["infos"], reg["rows"]) for reg in regions]
    region_i = [chain_reuse(reg["infos"], r) for reg, r in zip(regions, region_r)]
    out = {}
    for L in loads:
        recs = [{"cid": k[1], "family": configs[k[1]]["family"], "rows": k[2], "load": L, "t": t}
                for k, t in times[L].items() if k[0] == "sweep"]
        iso = DeviceProfile.fit(stored, [r for r in recs if r["cid"] not in test_cids], {}, seed=a.seed,
                                keep_measurements=False)
        ctx = [{"info": net_info[int(k[0].split(":")[1])][k[1]], "rows": None, "load": L, "t": t}
               for k, t in times[L].items() if str(k[0]).startswith("net:") and k[1] != "total"]
        zoo = {}
        for k, t in times[L].items():
            if str(k[0]).startswith("model:") and k[1] != "total":
                name = k[0].split(":", 1)[1]
                zoo.setdefault(name, []).append({"info": model_info[name][k[1]], "rows": None, "load": L, "t": t})
        sl, reg = [], {}
        for k, t in times[L].items():
            if str(k[0]).startswith("region:") and k[1] != "total":
                i = int(k[0].split(":")[1])
                s = {"info": region_i[i][k[1]], "rows": region_r[i][k[1]], "load": L, "t": t}
                if regions[i]["rows"] != regions[i]["infos"][-1]["rows"]:
                    sl.append(s)
                reg.setdefault(i, []).append(s)
        reg_t = {i: times[L].get((f"region:{i}", "total")) for i in reg}
        res = {"identical layers agree": identical_groups(zoo), "n": {
            "nets layers": len(ctx), "zoo layers": sum(map(len, zoo.values())), "row slices": len(sl),
            "regions": sum(1 for v in reg_t.values() if v)}}

        def pred(prof, s):
            return prof.predict(s["info"], s["rows"], L)
        rows = {"isolated prediction only": None, **TERM_SETS}
        for label, terms in rows.items():
            prof = DeviceProfile(iso.families, {})
            if terms:
                prof.fit_context(ctx, terms=terms)
            flat = [s for v in zoo.values() for s in v]
            r = {"nets own": np.mean(within([pred(prof, s) for s in ctx], [s["t"] for s in ctx])),
                 "nets → zoo": np.mean(within([pred(prof, s) for s in flat], [s["t"] for s in flat])),
                 "row slices": np.mean(within([pred(prof, s) for s in sl], [s["t"] for s in sl])),
                 "regions": np.mean(within([sum(pred(prof, s) for s in v) for i, v in reg.items() if reg_t[i]],
                                           [reg_t[i] for i in reg if reg_t[i]]))}
            if terms:
                hits = []
                for name in zoo:
                    p2 = DeviceProfile(iso.families, {})
                    p2.fit_context(ctx + [s for n, v in zoo.items() if n != name for s in v], terms=terms)
                    hits += within([pred(p2, s) for s in zoo[name]], [s["t"] for s in zoo[name]])
                r["zoo, leave one model out"] = float(np.mean(hits))
            res[label] = {k: float(v) for k, v in r.items()}
        out[L] = res
    md = report(out, loads, a, raw_path)
    print(md)
    (Path(a.out) / f"fcpm_context_features{'_quick' if a.quick else ''}.md").write_text(md)
    return 0


def report(out, loads, a, raw_path) -> str:
    cols = ["nets own", "nets → zoo", "zoo, leave one model out", "row slices", "regions"]
    lines = ["# What explains a layer's time in context", "",
             f"From `{raw_path.name}` (sizes `--scale {a.scale:g} --layers {a.layers} --regions {a.regions} "
             f"--nets {a.nets}`), {time.strftime('%Y-%m-%d %H:%M')}; `benchmarks/fcpm_context_features.py`, no "
             "timing. Share of in-context jobs whose FCPM prediction is within ±10 % of the measured "
             "(drift-corrected) time, with the in-network part fitted with each term set in turn (each row adds to "
             "the one before, the split replacing the input bytes; `edgepart/fcpm/model.py` context_terms). Groups: the op type, 1×1 convolutions "
             "apart. A stage that fits the L2 is predicted as timed alone in every row.", ""]
    for L in loads:
        r = out[L]
        n = r["n"]
        lines += [f"## Load {L:.0%}", "",
                  f"{n['nets layers']} synthetic-network layers, {n['zoo layers']} zoo layers, {n['row slices']} row "
                  f"slices, {n['regions']} regions. **Ceiling from the data**: of the zoo layers that have identical "
                  f"twins in their model, {r['identical layers agree']:.0%} lie within ±10 % of their twins' median "
                  "time in context.", "",
                  "| in-network terms | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for label in ["isolated prediction only", *TERM_SETS]:
            v = r[label]
            lines.append(f"| {label} | " + " | ".join("–" if c not in v else f"{v[c]:.0%}" for c in cols) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
