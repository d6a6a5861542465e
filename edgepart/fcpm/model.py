"""The FCPM: per-device, per-op-type latency models fitted from profiling, saved as JSON.

For every op family (conv, dwconv, maxpool, bn, act, binary, cat, linear, ...)
three candidates are fitted and the one with the most held-out predictions within
±10 % is kept (ties: lower RMSPE):

* ``flops``      — the published baseline (Neurosurgeon): latency = a + b·FLOPs,
                   one fit per profiled load level, linear in between;
* ``loglinear``  — log latency = ridge regression on log FLOPs, log bytes in/out,
                   log weights, log rows, log width, channels, kernel, stride,
                   groups, activation class, load and load interactions;
* ``gbm``        — the log-linear model plus gradient-boosted trees (scikit-learn)
                   on its log residual; the trees are written to JSON here (arrays of
                   children, features, thresholds, leaf values), never pickled.

Predictions for a load between two profiled levels interpolate the predictions at
those levels; beyond the highest level the time grows like 1 / (1 - load).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgepart.fcpm.features import FEATURES, design_row, features
from edgepart.fcpm.ops import CHEAP_ACTS, geometry
from edgepart.fcpm.ops import family as family_of

FORMAT = "edgepart-fcpm/1"
# A family with no fitted model borrows one of these, in order.
FALLBACKS = {"dwconv": ["conv"], "avgpool": ["maxpool", "bn"], "maxpool": ["avgpool", "bn"],
             "gap": ["bn", "act:relu"], "cat": ["binary", "act:relu"], "binary": ["act:relu", "bn"],
             "bn": ["act:relu", "binary"], "pad": ["cat", "act:relu"], "upsample": ["binary", "act:relu"],
             "generic": ["binary", "act:relu", "bn"], "trivial": [], "linear": ["conv"], "conv": ["dwconv"]}
TRIVIAL_TIME = 2e-6


# --------------------------------------------------------------------------- metrics

def metrics(pred: Iterable[float], meas: Iterable[float]) -> dict[str, float]:
    """±10 % accuracy (share of predictions within 10 % of measured), RMSPE, Spearman ρ, mean |err|."""
    p, m = np.asarray(list(pred), float), np.asarray(list(meas), float)
    if len(p) == 0:
        return {"n": 0, "acc10": float("nan"), "rmspe": float("nan"), "spearman": float("nan"), "mape": float("nan")}
    rel = (p - m) / m
    out = {"n": int(len(p)), "acc10": float(np.mean(np.abs(rel) <= 0.10)), "rmspe": float(np.sqrt(np.mean(rel ** 2))),
           "mape": float(np.mean(np.abs(rel)))}
    if len(p) > 2 and np.ptp(m) > 0 and np.ptp(p) > 0:
        from scipy.stats import spearmanr
        out["spearman"] = float(spearmanr(p, m).statistic)
    else:
        out["spearman"] = float("nan")
    return out


# --------------------------------------------------------------------------- candidate models

_LOAD = FEATURES.index("load")


KNOTS = (1 << 20, 8 << 20, 32 << 20)   # bytes: about L2, a quarter of L3 and L3 of a laptop/edge CPU
_BASE_COLS = 3                          # [1, FLOPs, padded FLOPs], then weight bytes, then bytes moved


def _spline(v: np.ndarray, knots=KNOTS) -> list[np.ndarray]:
    """Piecewise-linear basis of a byte count: slopes may change at the cache-size knots."""
    out, lo = [], 0.0
    for k in knots:
        out.append(np.clip(v - lo, 0, k - lo))
        lo = k
    out.append(np.maximum(v - lo, 0))
    return out


def _raw(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.atleast_2d(X)
    ex = lambda k: np.exp(X[:, FEATURES.index(k)])  # noqa: E731
    base = np.stack([np.ones(len(X)), ex("lflops"), ex("lpflops")], 1)
    return base, ex("lwgt") - 1.0, ex("lin") + ex("lout")


def _quantities(X: np.ndarray, wknots=KNOTS, ioknots=KNOTS) -> np.ndarray:
    """Columns [1, FLOPs, padded FLOPs, weight bytes (pieces), bytes moved (pieces)] from the log features."""
    base, w, io = _raw(X)
    return np.column_stack([base, *_spline(w, wknots), *_spline(io, ioknots)])


def _supported_knots(v: np.ndarray, min_beyond: int = 6) -> list[float]:
    """The knots with enough data beyond them to fit the slope there (else that slope stays the last one)."""
    return [k for k in KNOTS if int(np.sum(v > k)) >= min_beyond]


class _PerLevel:
    """A linear model of latency in some columns of ``_quantities``, one fit per profiled load level."""
    type = "?"
    cols: tuple[int, ...] = ()

    def __init__(self, levels: dict[float, list[float]]):
        self.levels = dict(sorted(levels.items()))
        self._lv = np.asarray(list(self.levels))
        self._coef = np.asarray(list(self.levels.values()), float)

    @classmethod
    def _fit_level(cls, Q: np.ndarray, t: np.ndarray) -> list[float]:
        raise NotImplementedError

    @classmethod
    def fit(cls, X: np.ndarray, t: np.ndarray):
        Q = _quantities(X)[:, cls.cols]
        loads = np.round(X[:, _LOAD], 4)
        return cls({float(L): cls._fit_level(Q[loads == L], t[loads == L]) for L in np.unique(loads)})

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        Q = _quantities(X)[:, self.cols]
        li = np.abs(X[:, _LOAD][:, None] - self._lv[None, :]).argmin(1)
        return np.log(np.maximum((Q * self._coef[li]).sum(1), 1e-7))

    def to_json(self) -> dict:
        return {"type": self.type, "levels": [[L, *c] for L, c in self.levels.items()]}

    @classmethod
    def from_json(cls, d: dict):
        return cls({float(r[0]): [float(v) for v in r[1:]] for r in d["levels"]})


def _nnls_relative(Q: np.ndarray, t: np.ndarray) -> list[float]:
    """Non-negative least squares on relative error (rows weighted by 1/t), columns rescaled."""
    from scipy.optimize import nnls
    if len(t) == 0:
        return [0.0] * Q.shape[1]
    scale = np.abs(Q).max(0)
    scale[scale <= 0] = 1.0
    w = 1.0 / t
    c, _ = nnls((Q / scale) * w[:, None], t * w)
    c = c / scale
    if not np.any(c > 0):
        c[0] = float(np.median(t))
    return c.tolist()


class FlopsModel(_PerLevel):
    """The baseline: latency = a + b × FLOPs per load level (Neurosurgeon's linear model per layer type)."""
    type = "flops"
    cols = (0, 1)

    @classmethod
    def _fit_level(cls, Q, t):
        return _nnls_relative(Q, t)


class AdditiveModel:
    """latency = a + b·FLOPs + c·padded FLOPs + piecewise-linear(weight bytes) + piecewise-linear(bytes in+out),
    all coefficients non-negative, one fit per load level; a knot (cache size) is used only where the
    profile has data beyond it, so the slopes never extrapolate from nothing."""
    type = "additive"

    def __init__(self, levels: dict[float, list[float]], wknots, ioknots):
        self.levels = dict(sorted(levels.items()))
        self.wknots, self.ioknots = [float(k) for k in wknots], [float(k) for k in ioknots]
        self._lv = np.asarray(list(self.levels))
        self._coef = np.asarray(list(self.levels.values()), float)

    @classmethod
    def fit(cls, X: np.ndarray, t: np.ndarray) -> "AdditiveModel":
        _, w, io = _raw(X)
        wk, ik = _supported_knots(w), _supported_knots(io)
        Q = _quantities(X, wk, ik)
        loads = np.round(X[:, _LOAD], 4)
        return cls({float(L): _nnls_relative(Q[loads == L], t[loads == L]) for L in np.unique(loads)}, wk, ik)

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        Q = _quantities(X, self.wknots, self.ioknots)
        li = np.abs(X[:, _LOAD][:, None] - self._lv[None, :]).argmin(1)
        return np.log(np.maximum((Q * self._coef[li]).sum(1), 1e-7))

    def to_json(self) -> dict:
        return {"type": self.type, "wknots": self.wknots, "ioknots": self.ioknots,
                "levels": [[L, *c] for L, c in self.levels.items()]}

    @classmethod
    def from_json(cls, d: dict) -> "AdditiveModel":
        return cls({float(r[0]): [float(v) for v in r[1:]] for r in d["levels"]}, d["wknots"], d["ioknots"])


class LogLinearModel:
    """log latency = ridge regression on standardised log features and load interactions."""
    type = "loglinear"

    def __init__(self, mean, scale, coef, intercept):
        self.mean, self.scale = np.asarray(mean, float), np.asarray(scale, float)
        self.coef, self.intercept = np.asarray(coef, float), float(intercept)

    @classmethod
    def fit(cls, X: np.ndarray, t: np.ndarray, alpha: float = 1e-2) -> "LogLinearModel":
        Z = design_row(X)
        mean, scale = Z.mean(0), Z.std(0)
        scale[scale < 1e-9] = 1.0
        Zs = (Z - mean) / scale
        y = np.log(t)
        ym = y.mean()
        A = Zs.T @ Zs + alpha * len(y) * 1e-3 * np.eye(Zs.shape[1])
        coef = np.linalg.solve(A, Zs.T @ (y - ym))
        return cls(mean, scale, coef, ym)

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        Z = (design_row(np.atleast_2d(X)) - self.mean) / self.scale
        return Z @ self.coef + self.intercept

    def to_json(self) -> dict:
        return {"type": self.type, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept}

    @classmethod
    def from_json(cls, d: dict) -> "LogLinearModel":
        return cls(d["mean"], d["scale"], d["coef"], d["intercept"])


class Forest:
    """Sum of regression trees stored as flat arrays; evaluates all trees at once with numpy."""

    def __init__(self, trees: list[dict], learning_rate: float, init: float):
        self.trees = trees
        self.learning_rate = float(learning_rate)
        self.init = float(init)
        left, right, feat, thr, val, roots = [], [], [], [], [], []
        off = 0
        for tr in trees:
            n = len(tr["feature"])
            roots.append(off)
            left += [c + off if c >= 0 else -1 for c in tr["left"]]
            right += [c + off if c >= 0 else -1 for c in tr["right"]]
            feat += tr["feature"]
            thr += tr["threshold"]
            val += tr["value"]
            off += n
        self._left, self._right = np.asarray(left, np.int64), np.asarray(right, np.int64)
        self._feat = np.maximum(np.asarray(feat, np.int64), 0)
        self._leaf = np.asarray(left, np.int64) < 0
        self._thr, self._val = np.asarray(thr, float), np.asarray(val, float)
        self._roots = np.asarray(roots, np.int64)
        self._depth = max((tr.get("depth", 32) for tr in trees), default=0)

    @classmethod
    def from_sklearn(cls, gbm) -> "Forest":
        trees = []
        for est in gbm.estimators_[:, 0]:
            t = est.tree_
            trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(),
                          "feature": t.feature.tolist(), "threshold": t.threshold.tolist(),
                          "value": t.value[:, 0, 0].tolist(), "depth": int(t.max_depth)})
        init = float(np.ravel(gbm.init_.constant_)[0]) if hasattr(gbm.init_, "constant_") else 0.0
        return cls(trees, gbm.learning_rate, init)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, float)).astype(np.float32).astype(float)  # sklearn compares in float32
        rows = np.arange(len(X))[:, None]
        idx = np.broadcast_to(self._roots, (len(X), len(self._roots))).copy()
        for _ in range(self._depth + 1):
            leaf = self._leaf[idx]
            if leaf.all():
                break
            go_left = X[rows, self._feat[idx]] <= self._thr[idx]
            idx = np.where(leaf, idx, np.where(go_left, self._left[idx], self._right[idx]))
        return self.init + self.learning_rate * self._val[idx].sum(1)

    def to_json(self) -> dict:
        return {"learning_rate": self.learning_rate, "init": self.init, "trees": self.trees}

    @classmethod
    def from_json(cls, d: dict) -> "Forest":
        return cls(d["trees"], d["learning_rate"], d["init"])


class GBMModel:
    """A base model (log-linear or additive) times exp(gradient-boosted trees on its log residual)."""
    type = "gbm"

    def __init__(self, base, forest: Forest):
        self.base, self.forest = base, forest

    @classmethod
    def fit(cls, X: np.ndarray, t: np.ndarray, base: str = "loglinear", seed: int = 0, n_estimators: int = 300,
            max_depth: int = 4, learning_rate: float = 0.05) -> "GBMModel":
        from sklearn.ensemble import GradientBoostingRegressor
        b = (AdditiveModel if base == "additive" else LogLinearModel).fit(X, t)
        resid = np.log(t) - b.predict_log(X)
        gbm = GradientBoostingRegressor(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                                        subsample=0.8, min_samples_leaf=3, random_state=seed)
        gbm.fit(X, resid)
        forest = Forest.from_sklearn(gbm)
        check = forest.predict(X[: min(len(X), 20)])
        assert np.allclose(check, gbm.predict(X[: len(check)]), atol=1e-6), "tree export does not match sklearn"
        return cls(b, forest)

    @property
    def name(self) -> str:
        return f"{self.base.type}+gbm"

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        return self.base.predict_log(X) + self.forest.predict(X)

    def to_json(self) -> dict:
        return {"type": self.type, "base": self.base.to_json(), "forest": self.forest.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "GBMModel":
        return cls(model_from_json(d["base"]), Forest.from_json(d["forest"]))


MODEL_TYPES = {m.type: m for m in (FlopsModel, AdditiveModel, LogLinearModel, GBMModel)}


def model_from_json(d: dict):
    return MODEL_TYPES[d["type"]].from_json(d)


def model_name(m) -> str:
    return m.name if isinstance(m, GBMModel) else m.type


# --------------------------------------------------------------------------- family models

class FamilyModel:
    """The chosen model of one op family plus the FLOPs baseline, both fitted on the same data."""

    def __init__(self, family: str, chosen, baseline: FlopsModel, levels: list[float], validation: dict | None = None):
        self.family, self.chosen, self.baseline = family, chosen, baseline
        self.levels = sorted(levels)
        self.validation = validation or {}

    def _at(self, X: np.ndarray, level: float, which: str) -> np.ndarray:
        m = self.baseline if which == "baseline" else self.chosen
        X = np.array(X, float, ndmin=2)
        X[:, _LOAD] = level
        return np.exp(m.predict_log(X))

    def predict(self, X, load: float, which: str = "fcpm") -> np.ndarray:
        """Seconds for each feature row of ``X`` at background ``load`` (interpolating between levels)."""
        levels = self.levels
        load = max(0.0, float(load))
        if load <= levels[0]:
            return self._at(X, levels[0], which)
        if load >= levels[-1]:
            t = self._at(X, levels[-1], which)
            return t * (1 - min(levels[-1], 0.95)) / (1 - min(load, 0.95)) if load > levels[-1] else t
        hi = next(i for i, L in enumerate(levels) if L >= load)
        L0, L1 = levels[hi - 1], levels[hi]
        if L1 == load:
            return self._at(X, L1, which)
        w = (load - L0) / (L1 - L0)
        return (1 - w) * self._at(X, L0, which) + w * self._at(X, L1, which)

    def to_json(self) -> dict:
        return {"chosen": self.chosen.to_json(), "baseline": self.baseline.to_json(), "levels": self.levels,
                "validation": self.validation}

    @classmethod
    def from_json(cls, family: str, d: dict) -> "FamilyModel":
        return cls(family, model_from_json(d["chosen"]), FlopsModel.from_json(d["baseline"]), d["levels"],
                   d.get("validation"))


CANDIDATES = ("flops", "additive", "loglinear", "additive+gbm", "loglinear+gbm")


def _fit_candidate(name: str, X: np.ndarray, t: np.ndarray, seed: int = 0):
    if name == "flops":
        return FlopsModel.fit(X, t)
    if name == "additive":
        return AdditiveModel.fit(X, t)
    if name == "loglinear":
        return LogLinearModel.fit(X, t)
    return GBMModel.fit(X, t, base=name.split("+")[0], seed=seed)


def _usable(name: str, n: int) -> bool:
    return name in ("flops", "additive") or (name == "loglinear" and n >= 12) or n >= 40


def fit_family(family: str, X: np.ndarray, t: np.ndarray, groups: np.ndarray, seed: int = 0,
               val_share: float = 0.25, candidates=CANDIDATES) -> FamilyModel:
    """Fit the candidates on part of the configurations, keep the best on the rest, refit it on all."""
    levels = sorted({round(float(L), 4) for L in X[:, _LOAD]})
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    validation: dict[str, Any] = {}
    best = "additive"
    if len(uniq) >= 6:
        val_groups = set(rng.choice(uniq, size=max(2, int(round(val_share * len(uniq)))), replace=False).tolist())
        val = np.array([g in val_groups for g in groups])
        tr = ~val
        scores = {}
        for name in candidates:
            if not _usable(name, int(tr.sum())):
                continue
            m = _fit_candidate(name, X[tr], t[tr], seed)
            met = metrics(np.exp(m.predict_log(X[val])), t[val])
            validation[name] = met
            scores[name] = (round(met["acc10"], 6), -met["rmspe"])
        best = max(scores, key=lambda k: scores[k])
    chosen = _fit_candidate(best, X, t, seed)
    validation["chosen"] = best
    return FamilyModel(family, chosen, FlopsModel.fit(X, t), levels, validation)


# --------------------------------------------------------------------------- the device profile

def sequence_terms(info: dict, rows: int | None) -> np.ndarray:
    """[1, weight bytes, input bytes] of a node's rows: what running it inside a network adds to.

    Timed alone and repeatedly, a layer finds its weights and input in cache if they fit in the
    last-level cache; inside a network it fetches them cold. Data larger than that cache came from
    memory in the isolated timing already, so it adds nothing here.
    """
    g = geometry(info, rows)
    w, x = g.weight_elems * 4.0, g.in_elems * 4.0
    llc = KNOTS[-1]
    return np.asarray([1.0, w if w <= llc else 0.0, x if x <= llc else 0.0])


CONTEXT_TERM_NAMES = ("node", "weights", "inputs", "in_near", "in_written", "in_far", "output")
# fit_context's default: of the term sets benchmarks/fcpm_context_features.py compares, the split of the inputs by
# where they are and the output bytes bought nothing on layers of models it was not fitted on
CONTEXT_TERMS = ("node", "weights", "inputs")
# the least share of its isolated time a layer takes in its stage (fit_context's floor on a group's scale a).
# Without one, a group's fit on the synthetic networks' small layers can trade its scale for a constant
# (linear: a = 0, 40 µs per layer, its weights term counting only weights that fit the LLC), and a layer far
# larger than any it was fitted on is predicted at that constant: AlexNet's 151 MB classifier layer at 0.2 ms
# against 10 ms measured (2026-12-05). Beyond the LLC a layer streams its data alone as well, so its isolated
# time is the floor.
MIN_CONTEXT_SCALE = 1.0
WRITERS = ("conv", "dwconv", "linear")      # op types whose output the next layer finds as if cold (see context_terms)


def l2_bytes(default: float = 1 << 20) -> float:
    """The L2 cache of the CPU this process runs on, in bytes (``/sys/devices/system/cpu``), else ``default``."""
    import os
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    base = Path(f"/sys/devices/system/cpu/cpu{cpus[-1] if cpus else 0}/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == "2" and (idx / "type").read_text().strip() in ("Unified", "Data"):
                v = (idx / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[-1:], 1)
                return float(int(v.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return float(default)


def in_l2(info: dict, l2: float) -> bool:
    """True when the node's stage touches no more than the L2 per run (``info["stage_bytes"]``, as
    :mod:`edgepart.fcpm.context` records it): run after run, its weights and inputs stay in the core's
    L2 as in the isolated timing, and the node is predicted as timed alone (row-sliced regions of 2–6
    layers: RMSPE 87 % → 35 % against adding what a large stage adds). Unknown (the cost model's
    nodes): False."""
    sb = info.get("stage_bytes")
    return sb is not None and float(sb) <= l2


def context_group(info: dict) -> str:
    """What the in-context model fits one set of coefficients for: the op type, with 1×1 convolutions (run as
    a plain GEMM, 1.3–1.9× their isolated time in context where 3×3 ones take about 1×) apart."""
    fam = family_of(info)
    if fam == "conv":
        g = geometry(info)
        if g.kh * g.kw == 1:
            return "conv:1x1"
    return fam


def input_mix(info: dict, l2: float) -> np.ndarray:
    """Shares of a node's input bytes [near, written, far] from its ``reuse`` entries ([bytes, bytes touched
    since written, writer op type]): *near* — written by a layer that is not a convolution or linear layer
    and at most an L2 of traffic ago; *written* — as near, but written by a convolution / linear layer;
    *far* — more than an L2 of traffic ago (or the stage's input). Zeros without entries."""
    v = np.zeros(3)
    for b, dist, writer in info.get("reuse") or ():
        b, dist = float(b), float(dist)
        if dist + b > l2:
            v[2] += b
        elif writer in WRITERS:
            v[1] += b
        else:
            v[0] += b
    return v


def context_terms(info: dict, rows: int | None, terms: tuple[str, ...], l2: float,
                  mix: list[float] | None = None) -> np.ndarray:
    """The in-context terms of ``rows`` rows of a node (all bytes of those rows):

    * ``node``: 1 (a cost per layer); ``weights``: weight bytes if they fit the last-level cache (timed alone,
      they sit in cache; in a stage, every other layer has run since) — as in the 2026-12-04 form;
      ``inputs``: all input bytes if they fit the LLC (the 2026-12-04 form); ``output``: output bytes;
    * ``in_near`` / ``in_written`` / ``in_far``: the input bytes split by where they are (:func:`input_mix`
      of the info's ``reuse``; a node without it — the cost model's — takes its group's average ``mix``
      from fitting, and without that, all *near*).
    """
    g = geometry(info, rows)
    w, x, o = g.weight_elems * 4.0, g.in_elems * 4.0, g.out_elems * 4.0
    llc = KNOTS[-1]
    split = None
    out = []
    for name in terms:
        if name == "node":
            out.append(1.0)
        elif name == "weights":
            out.append(w if w <= llc else 0.0)
        elif name == "inputs":
            out.append(x if x <= llc else 0.0)
        elif name == "output":
            out.append(o)
        elif name in ("in_near", "in_written", "in_far"):
            if split is None:
                m = input_mix(info, l2)
                if m.sum() <= 0:
                    m = np.asarray(mix if mix is not None else [1.0, 0.0, 0.0], float)
                split = x * m / max(m.sum(), 1e-12)
            out.append(float(split[("in_near", "in_written", "in_far").index(name)]))
        else:
            raise ValueError(f"unknown in-context term {name!r}")
    return np.asarray(out, float)


class DeviceProfile:
    """A device's fitted FCPM: ``predict(info, rows, load)`` → seconds for those rows of the node."""

    def __init__(self, families: dict[str, FamilyModel], meta: dict | None = None,
                 measurements: dict | None = None):
        self.families = families
        self.meta = dict(meta or {})
        self.measurements = measurements
        self.sequence: dict | None = None    # per-node correction when nodes run in sequence (see fit_sequences)
        self._cache: dict = {}
        self._warned: set[str] = set()

    # -- fitting ----------------------------------------------------------
    @classmethod
    def fit(cls, configs: list[dict], records: list[dict], meta: dict | None = None, seed: int = 0,
            keep_measurements: bool = True, families: Iterable[str] | None = None) -> "DeviceProfile":
        """Fit from profiler output: ``configs`` [{cid, info}], ``records`` [{cid, rows, load, t}]."""
        infos = {c["cid"]: c["info"] for c in configs}
        data: dict[str, list] = {}
        for r in records:
            info = infos[r["cid"]]
            fam, x, fl = features(info, r["rows"], r["load"])
            if families is not None and fam not in families:
                continue
            data.setdefault(fam, []).append((x, r["t"], r["cid"]))
        fams = {}
        for fam, rows in sorted(data.items()):
            if fam == "trivial":
                continue
            X = np.asarray([r[0] for r in rows], float)
            t = np.asarray([r[1] for r in rows], float)
            g = np.asarray([r[2] for r in rows])
            fams[fam] = fit_family(fam, X, t, g, seed=seed)
        meas = {"configs": configs, "records": records} if keep_measurements else None
        return cls(fams, meta, meas)

    # -- prediction -------------------------------------------------------
    def _family_model(self, fam: str) -> FamilyModel | None:
        if fam in self.families:
            return self.families[fam]
        alts = list(FALLBACKS.get(fam, []))
        if fam.startswith("act"):
            alts = ["act:relu" if fam.split(":")[-1] in CHEAP_ACTS else "act:sigmoid", "act:relu",
                    *sorted(f for f in self.families if f.startswith("act:")), "binary", "bn"]
        for alt in alts:
            if alt in self.families:
                if fam not in self._warned:
                    self._warned.add(fam)
                    warnings.warn(f"FCPM profile has no model for op type {fam!r}; using the {alt!r} model",
                                  stacklevel=3)
                return self.families[alt]
        return None

    def predict(self, info: dict, rows: int | None = None, load: float = 0.0, which: str = "fcpm",
                context: str = "sequence") -> float:
        """Seconds to compute ``rows`` output rows of the node ``info`` under background ``load`` (0..1).

        ``context="sequence"`` (the default, what a device program does, and what the cost model sums
        over a stage) adds the per-node cost of running inside a network — weights and inputs no
        longer hot in cache, the call overhead — fitted from whole synthetic networks
        (:meth:`fit_context`), and, with :meth:`fit_stage_load`, the node's share of what a whole stage
        takes beyond its layers' typical times at this load; ``"layer"`` is the layer's typical (median)
        time in its stage, without that share; ``"isolated"`` is the layer alone, timed repeatedly. ``which="baseline"`` gives the FLOPs-only model's prediction instead
        (never corrected). For a node with several rows the predictions for 1..H rows are
        computed once (cached) and made non-decreasing in rows, so a planner never sees a
        slice that gets cheaper as it grows.
        """
        if context not in ("sequence", "layer", "isolated"):
            raise ValueError(f"context must be 'sequence', 'layer' or 'isolated', not {context!r}")
        t = self._predict_isolated(info, rows, load, which)
        if context != "isolated" and which == "fcpm" and self.sequence:
            fams = self.sequence.get("families")
            if self.sequence.get("version") == 2:     # fit_context: groups, terms, the L2 it was fitted with
                sq = self.sequence
                if t == TRIVIAL_TIME:
                    return t
                if not in_l2(info, sq["l2_bytes"]):
                    g = context_group(info)
                    c = sq["groups"].get(g, sq["global"])
                    x = context_terms(info, rows, tuple(sq["terms"][1:]), sq["l2_bytes"], sq["input_mix"].get(g))
                    t = c[0] * t + float(np.dot(c[1:], x))
                sl = sq.get("stage_load")
                if context == "sequence" and sl and sl.get("loads"):   # fit_stage_load: a stage's share at load
                    t = t * (1.0 + float(np.interp(load, sl["loads"], sl["scale"]))) + \
                        float(np.interp(load, sl["loads"], sl["node"]))
                return t
            if fams is not None and t == TRIVIAL_TIME:
                return t
            if fams is not None:      # profiles of 2026-12-04: per op type, [a, b, weight bytes, input bytes]
                c = fams.get(family_of(info), self.sequence["global"])
                t = c[0] * t + float(np.dot(c[1:], sequence_terms(info, rows)))
            else:                     # older profiles: fitted on whole networks (fit_sequences)
                t += float(np.dot(self.sequence["coef"], sequence_terms(info, rows)))
        return t

    def _predict_isolated(self, info: dict, rows: int | None, load: float, which: str) -> float:
        total = max(1, int(info.get("rows", 1) or 1))
        r = total if rows is None else max(1, min(int(rows), total))
        fam, x_full, _ = features(info, total, load)
        if fam == "trivial":
            return TRIVIAL_TIME
        key = (fam, tuple(x_full), float(load), which, total)
        curve = self._cache.get(key)
        if curve is None:
            curve = self._curve(info, fam, total, load, which)
            if len(self._cache) > 20_000:
                self._cache.clear()
            self._cache[key] = curve
        return float(curve[r - 1])

    def _curve(self, info: dict, fam: str, total: int, load: float, which: str) -> np.ndarray:
        m = self._family_model(fam)
        if total == 1:
            rows_list = [1]
        else:
            rows_list = list(range(1, total + 1))
        X = np.asarray([features(info, rr, load)[1] for rr in rows_list], float)
        if m is None:
            fl = np.exp(X[:, FEATURES.index("lflops")])
            raw = fl / self.meta.get("conv_flops_per_s", 5e10) + TRIVIAL_TIME
        else:
            raw = m.predict(X, load, which)
        raw = np.maximum(raw, 1e-7)
        if len(raw) > 1:   # monotone envelope: mean of the running max from below and running min from above
            raw = 0.5 * (np.maximum.accumulate(raw) + np.minimum.accumulate(raw[::-1])[::-1])
        return raw

    def streaming_reference(self) -> tuple[dict, float] | None:
        """(info, seconds) of the recorded layer that streams the most weight bytes from memory:
        the largest linear layer timed at load 0 (its weights exceed any cache; batch 1 makes it
        bound by memory bandwidth). None when the profile kept no such measurement."""
        if not hasattr(self, "_stream_ref"):     # computed once (not in _cache: that is cleared when full)
            meas = self.measurements or {}
            infos = {c["cid"]: c["info"] for c in meas.get("configs", [])}
            best = None
            for r in meas.get("records", []):
                info = infos.get(r["cid"])
                if info is None or info.get("kind") != "linear" or r.get("load", 0.0) != 0.0:
                    continue
                w = geometry(info).weight_elems
                if best is None or w > best[0] or (w == best[0] and r["t"] < best[2]):
                    best = (w, info, r["t"])
            self._stream_ref = None if best is None else (best[1], best[2])
        return self._stream_ref

    def stream_bandwidth(self) -> float | None:
        """Bytes/s at which the profiled machine streamed weights from memory (see streaming_reference)."""
        ref = self.streaming_reference()
        return None if ref is None else geometry(ref[0]).weight_elems * 4.0 / ref[1]

    def memory_bound_fraction(self, info: dict, rows: int | None, seconds: float) -> float:
        """Share of ``seconds`` (a prediction for these rows) spent streaming the node's weights from
        memory at the profiled bandwidth: 1 for a large fully connected layer, about 0 for a conv."""
        bw = self.stream_bandwidth()
        if not bw or seconds <= 0:
            return 0.0
        return min(1.0, geometry(info, rows).weight_elems * 4.0 / bw / seconds)

    def predict_baseline(self, info: dict, rows: int | None = None, load: float = 0.0) -> float:
        return self.predict(info, rows, load, which="baseline")

    def fit_sequences(self, sequences: list[dict]) -> dict:
        """Fit the in-network correction from whole networks timed end to end.

        ``sequences``: [{"infos": [node info, ...], "load": L, "t": seconds}]. The correction per
        node is c0 + c1 × weight bytes + c2 × input bytes (non-negative), chosen so that the sum of
        isolated predictions plus corrections matches the networks' measured times (relative error).
        """
        if not sequences:
            return {}
        self.sequence = None
        A, b, before = [], [], []
        for sq in sequences:
            iso = sum(self.predict(i, None, sq["load"], context="isolated") for i in sq["infos"])
            terms = np.sum([sequence_terms(i, None) for i in sq["infos"]], axis=0)
            A.append(terms / sq["t"])
            b.append((sq["t"] - iso) / sq["t"])
            before.append(iso / sq["t"] - 1)
        A, b = np.asarray(A), np.asarray(b)
        scale = np.abs(A).max(0)
        scale[scale <= 0] = 1.0
        from scipy.optimize import nnls
        coef, _ = nnls(A / scale, b)
        coef = coef / scale
        after = A @ coef - b
        self.sequence = {"coef": coef.tolist(), "terms": ["per node", "weight bytes", "input bytes"],
                         "n": len(sequences), "rmspe_isolated": float(np.sqrt(np.mean(np.square(before)))),
                         "rmspe_corrected": float(np.sqrt(np.mean(np.square(after))))}
        self._cache.clear()
        return self.sequence

    def fit_context(self, samples: list[dict], min_family: int = 12, terms: tuple[str, ...] = CONTEXT_TERMS,
                    l2: float | None = None, sums: list[dict] | None = None, sum_weight: float = 1.0,
                    min_scale: float = MIN_CONTEXT_SCALE) -> dict:
        """Fit the in-network part on layers timed in context (each inside its stage, after its real
        predecessor: :mod:`edgepart.fcpm.context`).

        ``samples``: [{"info", "rows" (None: whole), "load", "t": seconds in context}]; an info may carry
        ``"reuse"`` (:func:`edgepart.fcpm.context.stage_reuse`: where its inputs are). Per group
        (:func:`context_group`: the op type, 1×1 convolutions apart from the others; a group with fewer
        than ``min_family`` samples uses the fit over all of them, with a = 1) the time in context is
        a·(isolated prediction) + the ``terms`` (:func:`context_terms`) — non-negative, least squares on
        relative error, deterministic. ``l2``: the core's L2 in bytes (default: this machine's,
        :func:`l2_bytes`), kept in the profile. Returns (and keeps in ``self.sequence``) the coefficients
        and the fit's check on the samples themselves: RMSPE and share within ±10 %, isolated vs corrected.

        ``sums``: [{"members": [indices into ``samples``], "t": seconds}] — times of runs of consecutive layers
        (a stage's total, a window of its layers; :func:`windows`) the fit should match as well: each adds the
        relative error of its members' summed prediction, weighted ``sum_weight`` against one layer's. The
        planner costs a stage as the sum of its layers, so a short layer's relative error should not weigh as
        much as a long one's; with sums the groups' coefficients are fitted jointly (without, each group's
        fit is its own, as before). The check then also reports ``rmspe_sums`` / ``acc10_sums``.

        ``min_scale``: the least a group's ``a`` may be — a layer in its stage takes at least that share of its
        isolated time (see :data:`MIN_CONTEXT_SCALE`).
        """
        if not samples:
            return {}
        from scipy.optimize import nnls
        unknown = set(terms) - set(CONTEXT_TERM_NAMES)
        if unknown:
            raise ValueError(f"unknown in-context terms {sorted(unknown)}; known: {', '.join(CONTEXT_TERM_NAMES)}")
        l2 = float(l2 or l2_bytes())
        self.sequence = None
        self._cache.clear()
        by_group: dict[str, list] = {}
        mix_sum: dict[str, np.ndarray] = {}
        for s in samples:
            info, rows = s["info"], s.get("rows")
            g = context_group(info)
            if info.get("reuse"):
                mix_sum[g] = mix_sum.get(g, np.zeros(3)) + input_mix(info, l2)
        mix = {g: (v / max(v.sum(), 1e-12)).tolist() for g, v in mix_sum.items()}
        fixed: dict[int, float] = {}     # sample index -> prediction not fitted (a stage within the L2)
        where: dict[int, tuple] = {}     # sample index -> (group, index in the group)
        for j, s in enumerate(samples):
            info, rows = s["info"], s.get("rows")
            iso = self.predict(info, rows, s["load"], context="isolated")
            if in_l2(info, l2):          # predicted as isolated (see in_l2): nothing to fit
                fixed[j] = iso
                continue
            g = context_group(info)
            x = context_terms(info, rows, terms, l2, mix.get(g))
            where[j] = (g, len(by_group.get(g, ())))
            by_group.setdefault(g, []).append((np.concatenate([[iso], x]), float(s["t"])))

        def fit(rows, a_fixed=None):
            A = np.asarray([r[0] / r[1] for r in rows])
            b = np.ones(len(rows))
            if a_fixed is not None:      # the isolated prediction kept as it is: only what context adds is fitted
                b = b - a_fixed * A[:, 0]
                A = A[:, 1:]
                if A.shape[1] == 0:      # no terms besides the scale (nnls aborts on an empty matrix)
                    return [float(a_fixed)]
            else:                        # a = min_scale + a non-negative rest
                b = b - min_scale * A[:, 0]
            scale = np.abs(A).max(0)
            scale[scale <= 0] = 1.0
            coef, _ = nnls(A / scale, b)
            coef = (coef / scale).tolist()
            if a_fixed is None:
                coef[0] += min_scale
            return coef if a_fixed is None else [float(a_fixed), *coef]
        everything = [r for rows in by_group.values() for r in rows]
        # a group without enough samples of its own keeps its isolated prediction plus what context adds
        # on average (a per-node cost, cold weights and inputs): never a scale fitted on other op types
        glob = fit(everything, a_fixed=1.0)
        groups = {g: fit(rows) for g, rows in sorted(by_group.items()) if len(rows) >= min_family}
        if sums and groups:
            groups = self._fit_joint(by_group, groups, glob, where, fixed, sums, sum_weight, min_scale)

        def predicted(j):
            if j in fixed:
                return fixed[j]
            g, i = where[j]
            return float(np.dot(groups.get(g, glob), by_group[g][i][0]))
        sum_rel = [sum(predicted(j) for j in sm["members"]) / float(sm["t"]) - 1 for sm in sums or ()]

        rel_iso, rel = [], []
        for g, rows in by_group.items():
            c = np.asarray(groups.get(g, glob))
            for x, t in rows:
                rel.append(float(np.dot(c, x)) / t - 1)
                rel_iso.append(x[0] / t - 1)
        self.sequence = {"kind": "context", "version": 2, "terms": ["isolated prediction", *terms],
                         "groups": groups, "global": glob, "l2_bytes": l2, "input_mix": mix, "min_scale": min_scale,
                         "n": len(samples),
                         "rmspe_isolated": float(np.sqrt(np.mean(np.square(rel_iso)))),
                         "rmspe_corrected": float(np.sqrt(np.mean(np.square(rel)))),
                         "acc10_isolated": float(np.mean(np.abs(rel_iso) <= 0.10)),
                         "acc10_corrected": float(np.mean(np.abs(rel) <= 0.10))}
        if sums:
            self.sequence.update(n_sums=len(sums), sum_weight=float(sum_weight),
                                 rmspe_sums=float(np.sqrt(np.mean(np.square(sum_rel)))),
                                 acc10_sums=float(np.mean(np.abs(sum_rel) <= 0.10)))
        self._cache.clear()
        return self.sequence

    def fit_stage_load(self, stages: list[dict]) -> dict:
        """What a stage takes beyond the sum of its layers' typical times in context, per load level — fitted
        on stages timed whole (the profiler's synthetic networks) after :meth:`fit_context`.

        A layer's time in context is the median of its samples; a stage's time is the median of its runs'
        totals. Under background load the two part: the other work's interference lands on a few layers of
        each run, missing from every layer's median but in every run's total (2026-12-05, 50 % load: the
        zoo models' totals 1.0–1.6× the sum of their layers' medians). Per load level L, a stage's time =
        (1 + s_L) × Σ its layers' ``context="layer"`` predictions + d_L × its layers (s, d ≥ 0; non-negative
        least squares on relative error); between and beyond the levels fitted, s and d are interpolated
        linearly and held at the ends. ``predict(context="sequence")`` then gives each node its share.

        ``stages``: [{"infos": [node info], "rows": [rows per node] (optional, default whole), "load": L,
        "t": seconds}]. Needs a fitted in-context part (version 2). Returns (and keeps in
        ``self.sequence["stage_load"]``) the coefficients and their check on the stages: RMSPE before/after."""
        if not self.sequence or self.sequence.get("version") != 2:
            raise ValueError("fit_stage_load needs the in-context part: call fit_context first")
        from scipy.optimize import nnls
        self.sequence.pop("stage_load", None)
        self._cache.clear()
        if not stages:
            return {}
        by_load: dict[float, list] = {}
        for st in stages:
            rows = st.get("rows") or [None] * len(st["infos"])
            L = float(st["load"])
            p = sum(self.predict(i, r, L, context="layer") for i, r in zip(st["infos"], rows))
            by_load.setdefault(L, []).append((p, float(len(st["infos"])), float(st["t"])))
        loads, scale, node, before, after = [], [], [], [], []
        for L in sorted(by_load):
            P, n, t = (np.asarray(v) for v in zip(*by_load[L]))
            A = np.stack([P / t, n / t], axis=1)
            b = (t - P) / t
            sc = np.abs(A).max(0)
            sc[sc <= 0] = 1.0
            c, _ = nnls(A / sc, b)
            c = c / sc
            loads.append(L)
            scale.append(float(c[0]))
            node.append(float(c[1]))
            before += (P / t - 1).tolist()
            after += ((P * (1 + c[0]) + n * c[1]) / t - 1).tolist()
        out = {"loads": loads, "scale": scale, "node": node, "n": len(stages),
               "rmspe_before": float(np.sqrt(np.mean(np.square(before)))),
               "rmspe_after": float(np.sqrt(np.mean(np.square(after))))}
        self.sequence["stage_load"] = out
        self._cache.clear()
        return out

    @staticmethod
    def _fit_joint(by_group, groups, glob, where, fixed, sums, weight, min_scale=0.0) -> dict:
        """The groups' coefficients fitted together on their layers and on ``sums`` (see fit_context):
        non-negative least squares on relative errors, a sum's row weighted √weight. Groups fitted with the
        global coefficients (too few samples) and stages within the L2 enter the sums as fixed predictions."""
        from scipy.optimize import nnls
        names = sorted(groups)
        width = len(glob)
        col = {g: i * width for i, g in enumerate(names)}
        A, b = [], []
        for g in names:
            for x, t in by_group[g]:
                row = np.zeros(width * len(names))
                row[col[g]:col[g] + width] = x / t
                A.append(row)
                b.append(1.0)
        w = math.sqrt(max(float(weight), 0.0))
        for sm in sums:
            t = float(sm["t"])
            row, rest = np.zeros(width * len(names)), 0.0
            for j in sm["members"]:
                if j in fixed:
                    rest += fixed[j]
                    continue
                g, i = where[j]
                x = by_group[g][i][0]
                if g in col:
                    row[col[g]:col[g] + width] += x
                else:
                    rest += float(np.dot(glob, x))
            A.append(w * row / t)
            b.append(w * (1.0 - rest / t))
        A, b = np.asarray(A), np.asarray(b)
        a_cols = [col[g] for g in names]
        b = b - min_scale * A[:, a_cols].sum(1)          # each group's a = min_scale + a non-negative rest
        scale = np.abs(A).max(0)
        scale[scale <= 0] = 1.0
        coef, _ = nnls(A / scale, b)
        coef = coef / scale
        coef[a_cols] += min_scale
        return {g: coef[col[g]:col[g] + width].tolist() for g in names}

    # -- persistence ------------------------------------------------------
    def to_json(self) -> dict:
        d = {"format": FORMAT, "meta": self.meta, "features": FEATURES,
             "models": {f: m.to_json() for f, m in self.families.items()}, "sequence": self.sequence}
        if self.measurements is not None:
            d["measurements"] = self.measurements
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        return path

    @classmethod
    def from_json(cls, d: dict) -> "DeviceProfile":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an FCPM profile (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("features") != FEATURES:
            raise ValueError("FCPM profile was written with a different feature set; re-run `edgepart profile`")
        fams = {f: FamilyModel.from_json(f, m) for f, m in d["models"].items()}
        prof = cls(fams, d.get("meta"), d.get("measurements"))
        prof.sequence = d.get("sequence")
        return prof

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read FCPM profile {path}: {e}") from e
        return cls.from_json(d)

    def summary(self) -> dict[str, str]:
        return {f: m.validation.get("chosen", model_name(m.chosen)) for f, m in sorted(self.families.items())}

    def __repr__(self) -> str:
        return f"DeviceProfile({self.meta.get('device', '?')}: {self.summary()})"
