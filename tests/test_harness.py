"""The timing harness (#20): pinning, fixed predecessors, interleaved passes to a target RSE within a
bounded time, layers timed in context, the in-network part fitted on them."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from edgepart import models
from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.context import chain_stage, graph_stage, timed_nodes
from edgepart.fcpm.harness import (Harness, Isolated, Stage, agreement, median, pinned_thread, rse_of_median,
                                   timing_core)
from edgepart.fcpm.load import BackgroundLoad
from edgepart.fcpm.profiler import conv_info, eltwise_info, pool_info
from edgepart.fcpm.remote import check_measurements
from edgepart.errors import EdgepartError
from edgepart.passes import analyse
from edgepart.passes.trace import trace

ROOT = Path(__file__).resolve().parents[1]
linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")


def test_median_and_rse():
    assert median([3, 1, 2]) == 2 and median([1, 2, 3, 4]) == 2.5
    assert rse_of_median([1.0, 1.0]) == math.inf              # too few samples to say
    assert rse_of_median([1.0] * 9) == 0.0
    spread = rse_of_median([0.9, 1.0, 1.1, 0.95, 1.05])
    assert 0.01 < spread < 0.1
    assert rse_of_median([0.9, 1.0, 1.1, 0.95, 1.05] * 4) < spread     # more samples, smaller error


@linux
def test_pinned_thread_pins_one_core_and_restores():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with pinned_thread() as cpu:
        assert cpu == timing_core() == max(before)
        assert os.sched_getaffinity(0) == {cpu}
        assert torch.get_num_threads() == 1
    assert os.sched_getaffinity(0) == before and torch.get_num_threads() == threads
    with pinned_thread(cpuset=[min(before)]) as cpu:
        assert os.sched_getaffinity(0) == {min(before)}


@linux
def test_timing_core_from_the_environment(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("EDGEPART_TIMING_CPU", str(cpus[0]))
    assert timing_core() == cpus[0]
    monkeypatch.setenv("EDGEPART_TIMING_CPU", "9999")
    with pytest.raises(ValueError, match="9999"):
        timing_core()


def _fake_clock():
    """A clock that advances by what the job says it took (deterministic timings)."""
    state = {"now": 0.0}
    return state, (lambda: state["now"])


def test_harness_repeats_to_the_target_and_records_the_predecessor():
    state, clock = _fake_clock()
    calls = {"a": 0, "b": 0}
    noise = iter([1.0, 1.3, 0.8, 1.1, 0.9] * 400)

    def job(name, t):
        def run():
            calls[name] += 1
            state["now"] += t * (next(noise) if name == "b" else 1.0)
        return run
    units = [Isolated("a", lambda: job("a", 1e-3)), Isolated("b", lambda: job("b", 1e-3))]
    est = Harness(target_rse=0.02, min_samples=5, max_samples=200, budget_s=60, clock=clock).run(units)
    assert est["a"].t == pytest.approx(1e-3) and est["a"].converged and est["a"].n == 5   # steady: the minimum
    assert est["b"].n > est["a"].n and est["b"].rse <= 0.02 and est["b"].converged    # noisy: repeated until there
    assert est["a"].pred == "itself (warm)"
    assert agreement(est, {"a": 1.05e-3, "b": 2e-3}) == 0.5


def test_harness_stops_at_its_time_budget():
    """A job that never converges: the run ends near its budget (wall time), estimate marked not converged."""
    import random
    rnd = random.Random(0)

    def make():
        def run():
            time.sleep(rnd.choice([0.0002, 0.002]))
        return run
    t0 = time.perf_counter()
    est = Harness(target_rse=1e-6, min_samples=3, max_samples=10_000, budget_s=0.5, sample_s=0.001).run(
        [Isolated("x", make)])
    assert time.perf_counter() - t0 < 1.5
    assert est["x"].n >= 3 and not est["x"].converged


def _short_and_long(state, noise_seed=0):
    """Two jobs that never reach a 1e-6 RSE: ``short`` takes 1 ms a call, ``long`` 10 ms (fake clock)."""
    import random
    rnd = random.Random(noise_seed)

    def job(t):
        def run():
            state["now"] += t * rnd.uniform(0.8, 1.2)
        return run
    return [Isolated("short", lambda: job(1e-3), max_burst=1), Isolated("long", lambda: job(1e-2), max_burst=1)]


def test_time_share_gives_short_jobs_more_samples_in_the_same_time():
    """Sharing out time instead of samples: the 1 ms job takes about 10× the samples of the 10 ms one, and
    each job's unit is charged about the same time. Visiting each once per pass (the default), both get the
    same number of samples."""
    state, clock = _fake_clock()
    est = Harness(target_rse=1e-6, min_samples=3, max_samples=None, budget_s=0.3, time_share=True,
                  clock=clock, sample_s=0.0).run(_short_and_long(state))
    s, lg = est["short"], est["long"]
    assert not s.converged and not lg.converged
    assert 8 <= s.n / lg.n <= 12
    assert s.spent == pytest.approx(lg.spent, rel=0.15)
    assert s.mean == pytest.approx(sum(s.samples) / s.n)
    state, clock = _fake_clock()
    est = Harness(target_rse=1e-6, min_samples=3, max_samples=None, budget_s=0.3, clock=clock,
                  sample_s=0.0).run(_short_and_long(state))
    assert abs(est["short"].n - est["long"].n) <= 1


def test_time_share_gives_a_finished_jobs_time_to_the_others():
    """A job at its target stops; the time it did not use goes to the jobs still short of theirs, and the
    minimum samples are taken from every job first."""
    state, clock = _fake_clock()
    units = _short_and_long(state) + [Isolated("steady", lambda: (lambda: state.__setitem__("now", state["now"] + 1e-3)),
                                               max_burst=1)]
    est = Harness(target_rse=0.001, min_samples=5, max_samples=None, budget_s=0.3, time_share=True,
                  clock=clock, sample_s=0.0).run(units)
    assert est["steady"].converged and est["steady"].n == 5
    assert est["long"].n >= 5 and 8 <= est["short"].n / est["long"].n <= 12


def test_estimates_keep_mean_and_spent_through_json():
    from edgepart.fcpm.harness import Estimate
    e = Estimate(1.0, 0.01, 5, 0.9, "x", True, mean=1.1, spent=0.5)
    assert Estimate.from_json(e.to_json()).mean == 1.1 and Estimate.from_json(e.to_json()).spent == 0.5
    old = {"t": 1.0, "rse": 0.01, "n": 5, "t_min": 0.9, "pred": "x", "converged": True}   # written before
    assert Estimate.from_json(old).mean is None


def test_harness_interleaves_passes_in_a_fixed_order():
    order = []

    class U(Isolated):
        def visit(self, clock, target_s):
            order.append(self.keys[0])
            return {self.keys[0]: 1.0}
    units = [U(k, lambda: (lambda: None)) for k in "xyz"]
    Harness(min_samples=3, budget_s=10).run(units)
    assert order == list("xyz") * 3          # pass after pass, not x x x y y y z z z


def test_harness_chunks_by_memory_and_skips_unbuildable_units():
    built = []

    def make(k):
        def f():
            built.append(k)
            if k == "bad":
                raise RuntimeError("cannot build")
            return lambda: None
        return f
    units = [Isolated(k, make(k), nbytes=600) for k in ("p", "bad", "q")]
    h = Harness(min_samples=3, budget_s=5, max_bytes=1000)
    assert [len(c) for c in h.chunks(units)] == [1, 1, 1]
    est = h.run(units)
    assert set(est) == {"p", "q"}
    assert h.failures == [("bad", "cannot build: RuntimeError: cannot build")]


def test_graph_stage_runs_the_model_layer_by_layer():
    m, (x,) = models.get("tinynet")
    gm = analyse(trace(m, (x,)))
    stage, infos = graph_stage(gm, (x,), "tinynet")
    assert stage.layer_keys == [("tinynet", n.name) for n in timed_nodes(gm)] and set(infos) == set(stage.layer_keys)
    stage.build()
    with torch.inference_mode():
        sample = stage.visit(time.perf_counter, 0.001)
        assert torch.allclose(stage.last, m(x), rtol=1e-5, atol=1e-6)     # the stage computes the model
    assert all(v > 0 for v in sample.values())
    assert sample[("tinynet", "total")] == pytest.approx(sum(sample[k] for k in stage.layer_keys), rel=0.5)
    first, second = stage.layer_keys[:2]
    assert stage.preds[second] == first[1]                                  # its real predecessor
    assert "previous run" in stage.preds[first]


def test_chain_stage_slices_compute_the_rows_the_next_layer_needs():
    infos = [conv_info(16, 16, 32, 32, 3, 1), eltwise_info("activation", 16, 32, 32, "ReLU()", 1, 1,
                                                           params={"template": "F.relu({x})"}),
             pool_info("max_pool2d", 16, 32, 32, 2, 2)]
    stage, rows = chain_stage(infos, 5, "r")
    assert rows == [10, 10, 5]
    est = Harness(min_samples=3, budget_s=5).run([stage])
    assert set(est) == {("r", 0), ("r", 1), ("r", 2), ("r", "total")}
    assert stage.preds[("r", 1)].startswith("0:")
    with pytest.raises(ValueError, match="keys"):
        Stage([("r", 9)], lambda: ([("l0", ("r", 0), lambda env: (lambda: 1, (), {}))], None)).build()


@linux
def test_background_load_goes_to_the_other_cores():
    cpus = sorted(os.sched_getaffinity(0))
    bg = BackgroundLoad(0.5, avoid_cpu=cpus[-1])
    where = bg.placement(3)
    if len(cpus) > 1:
        assert where[0] != str(cpus[-1]) and str(cpus[-1]) in where    # others first, then the timing core
    assert BackgroundLoad(0.5).placement(2) == ["", ""]
    with BackgroundLoad(0.5, avoid_cpu=cpus[-1], settle_s=0.05) as b:
        for p, want in zip(b.procs, b.placement(len(b.procs))):
            time.sleep(0.05)
            assert os.sched_getaffinity(p.pid) == {int(want)}


def test_fit_context_recovers_a_relation_and_old_profiles_still_load():
    prof = DeviceProfile.load(ROOT / "profiles" / "host.json")      # written before fit_context: still loads
    info = conv_info(64, 64, 28, 28, 3)
    old = prof.predict(info, None, 0.0)
    assert old > 0 and prof.sequence and "families" not in prof.sequence
    layers = [conv_info(c, c, h, h, k) for c in (16, 32, 64) for h in (14, 28, 56) for k in (1, 3)]
    layers += [eltwise_info("batch_norm", c, h, h, "BatchNorm2d", 2, params={"eps": 1e-5})
               for c in (16, 32, 64, 128) for h in (14, 28, 56, 112)]
    samples = [{"info": i, "rows": None, "load": 0.0,
                "t": 1.5 * prof.predict(i, None, 0.0, context="isolated") + 20e-6} for i in layers]
    fit = prof.fit_context(samples, min_family=6)      # 9 3×3 and 9 1×1 convolutions: two groups
    assert fit["acc10_corrected"] == 1.0 and fit["rmspe_corrected"] < 0.01
    assert fit["groups"]["conv"][0] == pytest.approx(1.5, rel=0.02)
    for s in samples:
        assert prof.predict(s["info"], None, 0.0) == pytest.approx(s["t"], rel=0.02)
    again = DeviceProfile.from_json(json.loads(json.dumps(prof.to_json())))
    assert again.predict(info, 7, 0.0) == pytest.approx(prof.predict(info, 7, 0.0), rel=1e-12)


def test_measurements_with_layer_timings_are_checked():
    m = {"format": "edgepart-fcpm-measurements/1", "meta": {}, "configs": [], "records": [],
         "nets": {"infos": [[{}, {}]], "records": [{"net": 0, "load": 0.0, "t": 0.01, "layers": [[1, 0.004]]}]}}
    check_measurements(m)
    for bad in ([[2, 0.004]], [[0, -1.0]], [["0", 0.1]], "x"):
        m["nets"]["records"][0]["layers"] = bad
        with pytest.raises(EdgepartError, match="layer timings"):
            check_measurements(m)


def test_worker_pin_cpu_option():
    from edgepart.runtime import worker
    args = worker.build_parser().parse_args(["--key-file", "k", "--pin-cpu", "0"])
    assert args.pin_cpu == 0
    if hasattr(os, "sched_getaffinity"):
        with pytest.raises(EdgepartError, match="pin-cpu 9999"):
            worker.Worker(key=b"k" * 32, pin_cpu=9999)


def test_reference_takes_the_hosts_drift_out_of_a_re_timing():
    """Round B runs on a host 12 % slower (and drifting within the round): raw timings disagree beyond
    ±10 %, the timings relative to the reference timed around them agree exactly."""
    from edgepart.fcpm.harness import Reference, drift_corrected, reference_drift
    state, clock = _fake_clock()

    def run_round(speed_of_time):
        def job(t):
            def run():
                state["now"] += t * speed_of_time(state["now"])
            return run
        ref = Reference(reps=1, kernels={"compute": job(1e-3), "memory": job(2e-3)})
        units = [Isolated(k, (lambda t=t: job(t))) for k, t in (("a", 1e-4), ("b", 5e-4), ("c", 3e-3))]
        h = Harness(min_samples=5, budget_s=1e9, clock=clock, reference=ref, ref_every_s=0.0)
        return h.run(units), h

    a, ha = run_round(lambda now: 1.0)
    t1 = state["now"]
    b, hb = run_round(lambda now: 1.12 + 0.01 * (now - t1))     # slower, and slowing down during the round
    assert agreement(a, b) == 0.0                                  # raw: every job 12-13 % slower
    assert a["b"].rel["compute"] == pytest.approx(0.5) and a["b"].rel["memory"] == pytest.approx(0.25)
    assert a["b"].ref == {"compute": pytest.approx(1e-3), "memory": pytest.approx(2e-3)}
    ca, cb = drift_corrected([a, b], kind_of=lambda k: "memory" if k == "c" else "compute", level="sample")
    assert agreement(ca, cb) == 1.0
    assert ca["b"] == pytest.approx(cb["b"], rel=1e-3)
    scale = math.sqrt(1e-3 * b["a"].ref["compute"])                # one common scale: the references' typical time
    assert ca["a"] == pytest.approx(0.1 * scale, rel=1e-3)
    ra, rb = drift_corrected([a, b])                                 # per run, the compute reference: the shift
    assert agreement(ra, rb) == 1.0
    m_a, m_b = (median([e.ref["compute"] for e in run.values()]) for run in (a, b))
    assert ra["a"] == pytest.approx(a["a"].t * math.sqrt(m_b / m_a), rel=1e-9)   # × typical ÷ this run's reference
    with pytest.raises(ValueError, match="level"):
        drift_corrected([a, b], level="job")
    drift = reference_drift([a, b])
    assert drift["compute"][0] == 1.0 and 1.12 < drift["compute"][1] < 1.14
    assert len(ha.reference_log) >= 15                              # timed before every visit (ref_every_s=0)
    js = json.loads(json.dumps(a["a"].to_json()))
    assert set(js["rel"]) == {"compute", "memory"}
    from edgepart.fcpm.harness import Estimate
    assert Estimate.from_json(js).rel == a["a"].rel


def test_reference_kernels():
    from edgepart.fcpm.harness import Reference
    r = Reference()
    s = r.sample(time.perf_counter)
    assert set(s) == {"compute", "memory"} and all(v > 0 for v in s.values())
    est = Harness(min_samples=3, budget_s=5, reference=True, ref_every_s=0.0).run(
        [Isolated("x", lambda: (lambda: sum(range(100))))])
    assert est["x"].rel and est["x"].rel["compute"] > 0


def _residual_net():
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.r, self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x):
            return self.c2(self.r(self.c1(x))) + x
    return Block().eval(), torch.randn(1, 4, 8, 8)


def test_stage_reuse_says_where_each_input_is():
    """Exact bytes on a tiny residual block: 4×8×8 floats = 1 KiB per activation, weights 576 B and 64 B."""
    from edgepart.fcpm.context import stage_bytes, stage_reuse, with_reuse
    net, x = _residual_net()
    gm = analyse(trace(net, (x,)))
    reuse = stage_reuse(gm)
    total = 4 * 1024 + 576 + 64                     # four outputs of 1 KiB + the two convolutions' weights
    assert stage_bytes(gm) == total
    names = [n.name for n in timed_nodes(gm)]
    c1, relu, c2, add = names
    assert reuse[c1] == [[1024.0, float(total), None]]                  # the stage's input: a whole run ago
    assert reuse[relu] == [[1024.0, 0.0, "conv"]]                        # just written by the convolution
    assert reuse[c2] == [[1024.0, 0.0, "act:relu"]]
    assert sorted(reuse[add]) == sorted([[1024.0, 0.0, "conv"], [1024.0, float(total), None]])
    infos = with_reuse(gm)
    assert infos[add]["stage_bytes"] == total and json.loads(json.dumps(infos[add])) == infos[add]


def test_context_terms_exact_and_a_stage_in_l2_is_predicted_as_timed_alone():
    from edgepart.fcpm.context import chain_reuse
    from edgepart.fcpm.model import context_group, context_terms, input_mix
    relu = eltwise_info("activation", 4, 8, 8, "ReLU()", 1, 1, params={"template": "F.relu({x})"})
    info = dict(relu, reuse=[[512.0, 0.0, "conv"], [256.0, 4096.0, "bn"], [256.0, 0.0, "bn"]])
    assert input_mix(info, 2048).tolist() == [256.0, 512.0, 256.0]      # near, written by a conv, far (> L2 ago)
    x = context_terms(info, None, ("node", "in_near", "in_written", "in_far", "output"), 2048.0)
    assert x.tolist() == [1.0, 256.0, 512.0, 256.0, 1024.0]          # the input's 1 KiB split as its entries say
    # without reuse (the cost model's nodes): the group's average split from fitting
    y = context_terms(relu, None, ("in_near", "in_written", "in_far"), 2048.0, mix=[0.5, 0.5, 0.0])
    assert y.tolist() == [512.0, 512.0, 0.0]
    assert context_group(conv_info(8, 8, 8, 8, 1)) == "conv:1x1" and context_group(conv_info(8, 8, 8, 8, 3)) == "conv"

    prof = DeviceProfile.load(ROOT / "profiles" / "host.json")
    big = [conv_info(c, c, h, h, k) for c in (16, 32, 64) for h in (28, 56) for k in (1, 3)]
    samples = [{"info": dict(i, reuse=[[4.0 * c * h * h, 0.0, "act:relu"]], stage_bytes=64e6), "rows": None,
                "load": 0.0, "t": 2.0 * prof.predict(i, None, 0.0, context="isolated")}
               for i, (c, h) in zip(big, [(c, h) for c in (16, 32, 64) for h in (28, 56) for _ in (1, 3)])]
    prof.fit_context(samples, min_family=3, l2=2 << 20)
    one = samples[0]["info"]
    assert prof.predict(one, None, 0.0) == pytest.approx(samples[0]["t"], rel=0.05)   # a large stage: twice alone
    # the same layers in a two-layer chain of a few rows: the whole stage stays in L2 from run to run
    chain = chain_reuse([conv_info(16, 16, 28, 28, 3), relu], [4, 4])
    assert chain[0]["stage_bytes"] < 2 << 20 and chain[1]["reuse"][0][1:] == [0.0, "conv"]
    assert prof.predict(chain[0], 4, 0.0) == prof.predict(chain[0], 4, 0.0, context="isolated")
    assert prof.predict(dict(chain[0], stage_bytes=64e6), 4, 0.0) > 1.5 * prof.predict(chain[0], 4, 0.0)


def test_a_profile_with_the_2026_12_04_in_context_part_predicts_as_it_did():
    prof = DeviceProfile.load(ROOT / "profiles" / "host.json")
    info = conv_info(64, 64, 28, 28, 3)
    iso = prof.predict(info, None, 0.0, context="isolated")
    prof.sequence = {"kind": "context", "families": {"conv": [1.2, 1e-5, 0.0, 0.0]}, "global": [1.0, 0.0, 0.0, 0.0],
                     "coef": [0.0, 0.0, 0.0]}
    prof._cache.clear()
    assert prof.predict(info, None, 0.0) == pytest.approx(1.2 * iso + 1e-5, rel=1e-9)


def test_remote_measurements_with_bad_input_reuse_are_refused():
    m = {"format": "edgepart-fcpm-measurements/1", "meta": {}, "configs": [], "records": [],
         "nets": {"infos": [[{"reuse": [[1024.0, 0.0, "conv"]]}]], "records": []}}
    check_measurements(m)
    for bad in ([[1.0, -1.0, None]], [["x", 0.0, None]], [[1.0, 0.0, 7]], "x", [[1.0, 0.0]] ):
        m["nets"]["infos"][0][0]["reuse"] = bad
        with pytest.raises(EdgepartError, match="reuse"):
            check_measurements(m)


def test_a_long_stage_also_counts_its_opening_run_after_the_first_layer():
    """Fake layers taking 10 ms each: the opening run (30 ms ≥ long_s) is timed too, except its first layer."""
    state, clock = _fake_clock()
    calls = []

    def make():
        def step(i):
            def prep(env):
                def f():
                    calls.append(i)
                    state["now"] += 0.010 * (1 + 0.5 * (len(calls) <= 3))     # the opening run is 1.5× slower
                    return i
                return f, (), {}
            return (f"l{i}", ("s", i), prep)
        return [step(0), step(1), step(2)], None
    st = Stage([("s", 0), ("s", 1), ("s", 2)], make, total_key=("s", "total"), long_s=0.02)
    st.build()
    got = st.visit(clock, target_s=0.001)                       # one timed run after the opening run
    assert len(calls) == 6
    assert got[("s", 0)] == pytest.approx(0.010)                # the first layer: the timed run only
    assert got[("s", 1)] == pytest.approx(0.0125)               # median (mean) of the opening and the timed run
    assert got[("s", "total")] == pytest.approx(0.030)          # the total: timed runs only
    short = Stage([("s", 0), ("s", 1), ("s", 2)], make, long_s=1.0)
    short.build()
    calls.clear()
    assert short.visit(clock, target_s=0.001)[("s", 1)] == pytest.approx(0.010)


class _Allocates(Isolated):
    """A job whose every call allocates a fresh 64 KiB activation; records where each visit's landed."""

    def __init__(self):
        super().__init__("alloc", lambda: (lambda: torch.empty(16384)), max_burst=1)
        self.addresses = []

    def visit(self, clock, target_s):
        self.addresses.append(torch.empty(16384).data_ptr())
        return super().visit(clock, target_s)


def test_heap_shuffle_moves_what_each_visit_allocates():
    from edgepart.fcpm.harness import HeapShuffle
    fixed, shuffled = _Allocates(), _Allocates()
    Harness(target_rse=1e-9, min_samples=30, max_samples=30, budget_s=5, shuffle_heap=False).run([fixed])
    Harness(target_rse=1e-9, min_samples=30, max_samples=30, budget_s=5).run([shuffled])
    assert len(fixed.addresses) == len(shuffled.addresses) == 30
    # left alone, the heap hands each visit's activation one of a few chunks again; shuffled, somewhere else
    assert len(set(shuffled.addresses)) >= 10 > len(set(fixed.addresses[5:]))
    a, b = HeapShuffle(blocks=8, max_bytes=1 << 16, seed=3), HeapShuffle(blocks=8, max_bytes=1 << 16, seed=3)
    sizes = []
    for h in (a, b):
        h()
        h()
        sizes.append(sorted(t.numel() for t in h._pool))
        assert 0 < h.held_bytes() <= 8 << 16
        h.close()
        assert h.held_bytes() == 0
    assert sizes[0] == sizes[1]                        # deterministic in its seed
    with pytest.raises(ValueError, match="block"):
        HeapShuffle(blocks=0)
