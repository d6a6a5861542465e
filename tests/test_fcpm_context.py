"""The FCPM's in-context part fitted for what the planner uses it for (#20): sums of consecutive layers, and a
stage's time beyond its layers' medians under background load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.profiler import conv_info, eltwise_info

ROOT = Path(__file__).resolve().parents[1]


def _profile_with_layers_as_isolated():
    """The host profile with an in-context part that predicts every layer as timed alone (exactly)."""
    prof = DeviceProfile.load(ROOT / "profiles" / "host.json")
    prof.sequence = {"kind": "context", "version": 2, "terms": ["isolated prediction", "node", "weights", "inputs"],
                     "groups": {}, "global": [1.0, 0.0, 0.0, 0.0], "l2_bytes": float(2 << 20), "input_mix": {}}
    prof._cache.clear()
    return prof


def _stage(c):
    return [conv_info(c, c, 28, 28, 3), eltwise_info("batch_norm", c, 28, 28, "BatchNorm2d", 2, params={"eps": 1e-5}),
            conv_info(c, c, 28, 28, 1)]


def test_stage_load_exact_on_a_tiny_case():
    """Stages 1.0× their layers' sum at no load, 1.5× at 50 %, + 10 µs per layer at 75 %: recovered exactly;
    the node's share is in the default prediction (what the cost model sums), not in ``context="layer"``."""
    prof = _profile_with_layers_as_isolated()
    stages = [_stage(16), _stage(64)[:2], _stage(32) + _stage(48)]

    def layers(infos, L):
        return sum(prof.predict(i, None, L, context="layer") for i in infos)
    recs = [{"infos": s, "load": 0.0, "t": layers(s, 0.0)} for s in stages]
    recs += [{"infos": s, "load": 0.5, "t": 1.5 * layers(s, 0.5)} for s in stages]
    recs += [{"infos": s, "load": 0.75, "t": layers(s, 0.75) + 10e-6 * len(s)} for s in stages]
    fit = prof.fit_stage_load(recs)
    assert fit["loads"] == [0.0, 0.5, 0.75]
    assert fit["scale"] == pytest.approx([0.0, 0.5, 0.0], abs=1e-9)
    assert fit["node"] == pytest.approx([0.0, 0.0, 10e-6], abs=1e-12)
    assert fit["rmspe_after"] < 1e-9 < fit["rmspe_before"]
    info = stages[0][0]
    lay = prof.predict(info, None, 0.5, context="layer")
    assert lay == pytest.approx(prof.predict(info, None, 0.5, context="isolated"), rel=1e-12)
    assert prof.predict(info, None, 0.5) == pytest.approx(1.5 * lay, rel=1e-9)
    assert prof.predict(info, None, 0.25) == pytest.approx(1.25 * prof.predict(info, None, 0.25, context="layer"))
    assert prof.predict(info, None, 1.0) == pytest.approx(prof.predict(info, None, 1.0, context="layer") + 10e-6)
    # a whole stage at 50 %: the sum of the default predictions is its time, the layers' medians fall short
    assert sum(prof.predict(i, None, 0.5) for i in stages[2]) == pytest.approx(recs[5]["t"], rel=1e-9)
    again = DeviceProfile.from_json(json.loads(json.dumps(prof.to_json())))
    assert again.predict(info, 7, 0.5) == pytest.approx(prof.predict(info, 7, 0.5), rel=1e-12)
    assert prof.fit_stage_load([]) == {} and "stage_load" not in prof.sequence      # nothing to fit: no share
    assert prof.predict(info, None, 0.5) == lay
    with pytest.raises(ValueError, match="context must be"):
        prof.predict(info, None, 0.0, context="stage")


def test_old_profiles_predict_as_before_and_need_fit_context_for_stage_load():
    prof = DeviceProfile.load(ROOT / "profiles" / "host.json")          # no stage_load in it
    info = conv_info(64, 64, 28, 28, 3)
    assert prof.predict(info, None, 0.5) == prof.predict(info, None, 0.5, context="layer")
    with pytest.raises(ValueError, match="fit_context first"):
        prof.fit_stage_load([{"infos": [info], "load": 0.0, "t": 1e-3}])


def test_fit_context_on_sums_weighs_a_stage_by_its_time():
    """One group whose long layers take 2× their isolated time and short ones 4×: fitted per layer, the
    relative error of the many short layers pulls the scale up and every stage total comes out long; fitted on
    the stages' totals as well, the totals are matched. With no sums, or weight 0, the fit is the per-layer one."""
    prof = _profile_with_layers_as_isolated()
    prof.sequence = None
    longs = [conv_info(c, c, h, h, 3) for c in (32, 48, 64) for h in (28, 56)]
    shorts = [conv_info(c, c, 4, 4, 3) for c in (4, 6, 8, 10, 12, 14)] * 2
    samples = [{"info": dict(i, stage_bytes=64e6), "rows": None, "load": 0.0,
                "t": (2.0 if i in longs else 4.0) * prof.predict(i, None, 0.0, context="isolated")}
               for i in longs + shorts]
    stages = [{"members": [j, 6 + 2 * j, 7 + 2 * j], "t": None} for j in range(6)]    # a long layer and two short
    for st in stages:
        st["t"] = sum(samples[j]["t"] for j in st["members"])
    per_layer = dict(prof.fit_context(samples, min_family=6, terms=()))
    sums_eval = [sum(prof.predict(samples[j]["info"], None, 0.0) for j in st["members"]) / st["t"] - 1 for st in stages]
    joint = prof.fit_context(samples, min_family=6, terms=(), sums=stages, sum_weight=100.0)
    sums_joint = [sum(prof.predict(samples[j]["info"], None, 0.0) for j in st["members"]) / st["t"] - 1
                  for st in stages]
    assert max(np.abs(sums_eval)) > 0.10            # per layer: the totals are off by more than 10 %
    assert max(np.abs(sums_joint)) < 0.5 * max(np.abs(sums_eval))
    assert joint["rmspe_sums"] == pytest.approx(float(np.sqrt(np.mean(np.square(sums_joint)))), rel=1e-9)
    zero = prof.fit_context(samples, min_family=6, terms=(), sums=stages, sum_weight=0.0)
    assert zero["groups"]["conv"] == pytest.approx(per_layer["groups"]["conv"], rel=1e-6, abs=1e-12)


def test_a_layer_far_larger_than_any_fitted_keeps_at_least_its_isolated_time():
    """Small layers whose time in context is a constant (the scale a would fit 0 and the constant take it all):
    with the floor (the default) a stays 1, so a layer 100× larger than any fitted is predicted at no less than
    its isolated time; without it (min_scale=0, the 2026-12-05 00:43 fit) it would be predicted at the constant."""
    prof = _profile_with_layers_as_isolated()
    prof.sequence = None
    small = [conv_info(c, c, h, h, 3) for c in (4, 6, 8) for h in (4, 6, 8, 10)]
    samples = [{"info": dict(i, stage_bytes=64e6), "rows": None, "load": 0.0, "t": 30e-6} for i in small]
    big = dict(conv_info(256, 256, 56, 56, 3), stage_bytes=64e6)
    iso = prof.predict(big, None, 0.0, context="isolated")
    assert iso > 1e-3
    fit = prof.fit_context(samples, min_family=6, terms=("node",))
    assert fit["groups"]["conv"][0] == 1.0 and fit["min_scale"] == 1.0
    assert prof.predict(big, None, 0.0) >= iso
    free = prof.fit_context(samples, min_family=6, terms=("node",), min_scale=0.0)
    assert free["groups"]["conv"][0] < 0.5
    assert prof.predict(big, None, 0.0) < 0.5 * iso
