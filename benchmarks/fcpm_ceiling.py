"""How well can any per-layer model predict a zoo layer's time in context? (#20; no timing)

    .venv/bin/python benchmarks/fcpm_ceiling.py        # ~2 min, on results/fcpm_measurements.json

On the saved measurements of ``fcpm_accuracy.py`` (drift-corrected, as that benchmark scores them), per load:

* **twins in the same model**: zoo layers with the same op, shapes (the FCPM's features) and input writers
  as another layer of the same model — share within ±10 % of their group's median;
* **twins in other models**: a layer predicted by the median of its identical layers in *other* zoo models —
  what a lookup of the exact layer would give a model the layer is new to;
* **a boosted model on all in-context data**: scikit-learn's gradient boosting on the log ratio of a layer's
  time in context to the FCPM's isolated prediction, trained on the synthetic networks' layers and the other
  zoo models' layers (leave one model out); features: op group, isolated prediction, input, output and weight
  bytes, where its inputs are (``input_mix``), its stage's bytes, load — and, second row, the previous layer's
  footprint (weights + input + output bytes) and op group; third row, for the layers also timed isolated, that
  measured isolated time in place of the prediction.

Writes benchmarks/results/fcpm_ceiling.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fcpm_accuracy as fa  # noqa: E402
from edgepart.fcpm.context import with_reuse  # noqa: E402
from edgepart.fcpm.features import clean_info, features  # noqa: E402
from edgepart.fcpm.model import DeviceProfile, context_group, input_mix  # noqa: E402
from edgepart.fcpm.ops import geometry  # noqa: E402
from edgepart.fcpm.profiler import device_meta  # noqa: E402
from edgepart.passes import analyse  # noqa: E402
from edgepart.passes.trace import trace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
L2 = 2 * 2 ** 20


def feature_key(info: dict) -> tuple:
    fam, x, _ = features(clean_info(info), None, 0.0)
    return fam, tuple(round(v, 6) for v in x)


def footprint(info: dict) -> float:
    g = geometry(info, None)
    return 4.0 * (g.weight_elems + g.in_elems + g.out_elems)


def previous(infos: dict) -> dict:
    """{node: its previous timed node's info} (the first: the stage's last, its previous run)."""
    names = list(infos)
    return {n: infos[names[i - 1]] for i, n in enumerate(names)}


def within(p, t) -> float:
    p, t = np.asarray(p, float), np.asarray(t, float)
    return float(np.mean(np.abs(p / t - 1) <= 0.10)) if len(t) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measurements", default=str(RESULTS / "fcpm_measurements.json"))
    a = ap.parse_args(argv)
    from sklearn.ensemble import HistGradientBoostingRegressor
    saved = json.loads(Path(a.measurements).read_text())
    sizes = argparse.Namespace(**saved["sizes"])
    configs, test_cids, graphs, layers, _, _, nets, stored = fa.test_sets(sizes)
    meas, *_ = fa.load_measurements(Path(a.measurements), sizes)
    loads = sorted({L for by_load in meas.values() for L in by_load})
    times, pairs = fa.combine(meas, loads)["corrected"]
    train = [{"cid": k[1], "family": configs[k[1]]["family"], "rows": k[2], "load": L, "t": t}
             for L in loads for k, t in times[L].items() if k[0] == "sweep" and k[1] not in test_cids]
    prof = DeviceProfile.fit(stored, train, device_meta("host"), seed=sizes.seed, keep_measurements=False)
    model_info = {name: with_reuse(gm) for name, (_, _, gm) in graphs.items()}
    net_info = [with_reuse(analyse(trace(net, (x,)))) for net, x in nets]
    prev = {f"model:{m}": previous(i) for m, i in model_info.items()}
    prev.update({f"net:{j}": previous(i) for j, i in enumerate(net_info)})
    isolated_of = {feature_key(info): i for i, info in enumerate(layers)}
    groups = sorted({context_group(i) for infos in [*model_info.values(), *net_info] for i in infos.values()})

    rows = []     # (stage tag, load, info, t, isolated prediction, measured isolated or None, features)
    for L in loads:
        for k, t in times[L].items():
            tag = str(k[0])
            if k[1] == "total" or not (tag.startswith("model:") or tag.startswith("net:")):
                continue
            info = model_info[tag[6:]][k[1]] if tag.startswith("model:") else net_info[int(tag[4:])][k[1]]
            iso = prof.predict(info, None, L, context="isolated")
            j = isolated_of.get(feature_key(info)) if tag.startswith("model:") else None
            measured_iso = times[L].get(("layer", j)) if j is not None else None
            g = geometry(info, None)
            mix = input_mix(info, L2)
            p = prev[tag][k[1]]
            base = [groups.index(context_group(info)), np.log(iso), np.log1p(4.0 * g.in_elems),
                    np.log1p(4.0 * g.out_elems), np.log1p(4.0 * g.weight_elems), *(mix / max(mix.sum(), 1e-9)),
                    np.log1p(float(info.get("stage_bytes") or 0.0)), L]
            rows.append((tag, L, info, t, iso, measured_iso, base,
                         [np.log1p(footprint(p)), groups.index(context_group(p))]))

    out = ["# How well can a per-layer model predict a layer in context? (#20)", "",
           f"`benchmarks/fcpm_ceiling.py` on `{Path(a.measurements).name}` (sizes {saved['sizes']}; drift-corrected "
           "times, as `fcpm_accuracy.md` scores them). Share of zoo layers in context within ±10 %.", "",
           "| what predicts a zoo layer | " + " | ".join(f"{L:.0%} load" for L in loads) + " |",
           "|---|" + "---|" * len(loads)]

    def zoo(L):
        return [r for r in rows if r[0].startswith("model:") and r[1] == L]

    same, other = [], []
    for L in loads:
        within_model, across = {}, {}
        for r in zoo(L):
            key = (feature_key(r[2]), tuple(e[2] for e in r[2].get("reuse") or ()))
            within_model.setdefault((r[0], key), []).append(r[3])
            across.setdefault(key, {}).setdefault(r[0], []).append(r[3])
        ins = [abs(t / np.median(ts) - 1) <= 0.10 for ts in within_model.values() if len(ts) >= 2 for t in ts]
        hits = [abs(np.median([u for tag2, us in per_model.items() if tag2 != tag for u in us]) / t - 1) <= 0.10
                for per_model in across.values() if len(per_model) >= 2
                for tag, ts in per_model.items() for t in ts]
        same.append(f"{np.mean(ins):.0%} of {len(ins)}" if ins else "–")
        other.append(f"{np.mean(hits):.0%} of {len(hits)}" if hits else "–")
    out.append("| twins in the same model (the group's median) | " + " | ".join(same) + " |")
    out.append("| twins in other models (their median) | " + " | ".join(other) + " |")

    def boosted(with_prev: bool, measured: bool) -> list[str]:
        usable = [r for r in rows if not measured or not r[0].startswith("model:") or r[5] is not None]
        base = np.array([r[5] if measured and r[5] is not None else r[4] for r in usable])
        X = np.array([r[6] + (r[7] if with_prev else []) for r in usable])
        if measured:
            X[:, 1] = np.log(base)
        y = np.log(np.array([r[3] for r in usable]) / base)
        tags = np.array([r[0] for r in usable])
        cat = np.zeros(X.shape[1], bool)
        cat[0] = True
        if with_prev:
            cat[-1] = True
        pred = np.full(len(usable), np.nan)
        for tag in sorted({t for t in tags if t.startswith("model:")}):
            test = tags == tag
            gbm = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=10,
                                                categorical_features=cat, random_state=0)
            gbm.fit(X[~test], y[~test])
            pred[test] = base[test] * np.exp(gbm.predict(X[test]))
        res = []
        for L in loads:
            sel = np.array([t.startswith("model:") for t in tags]) & (X[:, 9] == L)
            res.append(f"{within(pred[sel], np.array([r[3] for r in usable])[sel]):.0%} of {int(sel.sum())}")
        return res
    out.append("| boosted model, leave one zoo model out | " + " | ".join(boosted(False, False)) + " |")
    out.append("| … with the previous layer's footprint | " + " | ".join(boosted(True, False)) + " |")
    out.append("| … and the layer's measured isolated time (layers timed both ways) | "
               + " | ".join(boosted(True, True)) + " |")
    iso = []
    for L in loads:
        z = zoo(L)
        iso.append(f"{within([r[4] for r in z], [r[3] for r in z]):.0%}")
    out.append("| the FCPM's isolated prediction alone | " + " | ".join(iso) + " |")
    md = "\n".join(out) + "\n"
    (RESULTS / "fcpm_ceiling.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
