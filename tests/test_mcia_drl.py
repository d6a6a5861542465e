"""MCIA's DRL strategy: the environment's return is the MILP's objective, the policy file round-trips and
refuses tampering, and a plan that breaks a constraint says so."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from edgepart.cluster import Cluster
from edgepart.errors import EdgepartError
from edgepart.mcia import Task, Tiers, plan
from edgepart.mcia.drl import DEFAULT_POLICY, Policy, load_policy, plan_drl
from edgepart.mcia.env import NVEC, OBS_DIM, MciaEnv, Planner
from edgepart.mcia.solve import brute_force, solve_milp
from edgepart.mcia.synthetic import Distribution, draw_scenario, synthetic_table
from edgepart.mcia.table import objective


def tiered(ends=2, edge_mem=4096.0, end_mem=512.0, cloud=True, uplink=10.0) -> Cluster:
    devs = [{"name": f"e{i}", "speed": 1.0, "tier": "end", "memory_mb": end_mem} for i in range(ends)]
    devs.append({"name": "edge", "speed": 8.0, "tier": "edge", "memory_mb": edge_mem})
    over = []
    if cloud:
        devs.append({"name": "cloud", "speed": 32.0, "tier": "cloud"})
        over = [{"a": "edge", "b": "cloud", "bandwidth_mbps": 50.0, "latency_ms": 20.0}]
    return Cluster.from_dict({"devices": devs, "links": {"default": {"bandwidth_mbps": uplink, "latency_ms": 2.0},
                                                         "overrides": over}})


def tiny(seed: int, n: int = 3, levels: int = 2, **kw):
    rng = random.Random(seed)
    tiers = Tiers.from_cluster(tiered(**kw))
    tables = []
    for i in range(n):
        lat = rng.random() < 0.5
        t = Task(f"t{i}", f"e{i % 2}", w_acc=0.1 if lat else 1.0, w_lat=1.0 if lat else 0.1,
                 deadline_ms=150.0 if lat else None, rate=rng.choice([1.0, 4.0]))
        tables.append(synthetic_table(rng, t, n_cuts=3))
    return tables, tiers, levels


def action_for(planner: Planner, index: int):
    """An action that decodes to the current task's candidate ``index`` (None if there is none)."""
    for a in itertools.product(*(range(k) for k in NVEC)):
        if planner.decode(a)[0] == index:
            return a
    return None


@pytest.mark.parametrize("seed", range(4))
def test_env_return_equals_the_milp_objective_for_the_milp_plan(seed):
    tables, tiers, levels = tiny(seed)
    milp = solve_milp(tables, tiers, levels)
    assert milp.objective == pytest.approx(brute_force(tables, tiers, levels).objective, abs=1e-9)
    env = MciaEnv([(tables, tiers, levels)])
    env.reset(seed=0)
    total, done, reached = 0.0, False, 0
    while not done:
        p = env.planner
        i = p.current
        a = action_for(p, p.index_of(milp.choices[i]))
        if a is None:               # the MILP's choice is not the best within any budget: take it verbatim
            total += p.step(index=p.index_of(milp.choices[i]))
            done = p.done
            continue
        reached += 1
        _, r, done, _, info = env.step(np.array(a))
        assert r == info["term"] == milp.outcomes[i].objective        # exact: the same evaluate
        total += r
    assert env.planner.choices == milp.choices
    assert total == sum(o.objective for o in milp.outcomes)
    assert reached >= 1


@pytest.mark.parametrize("seed", range(3))
def test_env_return_is_the_plan_objective_for_any_actions(seed):
    tables, tiers, levels = tiny(10 + seed, n=4, levels=4)
    rng = np.random.default_rng(seed)
    env = MciaEnv([(tables, tiers, levels)], shuffle=True, seed=seed)
    env.reset()
    total, done = 0.0, False
    while not done:
        _, r, done, _, _ = env.step(np.array([rng.integers(k) for k in NVEC]))
        total += r
    p = env.planner
    assert total == pytest.approx(objective(p.tables, p.tiers, p.choices, p.levels), abs=1e-12)
    assert p.infeasible == []                    # the fallbacks fit at the start: every step had an option


def test_env_passes_the_gymnasium_checker():
    from gymnasium.utils.env_checker import check_env
    env = MciaEnv(lambda rng: (*draw_scenario(rng, Distribution(n_tasks=(2, 4), deadlines_ms=(400.0,))), 4))
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.float32


def _random_policy(seed=0) -> Policy:
    torch.manual_seed(seed)
    return Policy.build([16, 8])


def test_policy_save_load_round_trip_gives_identical_actions(tmp_path):
    p = _random_policy()
    spec = p.save(tmp_path / "pol.json", {"note": "test"})
    q = load_policy(spec)
    assert q.sha256 == p.sha256 and q.training == {"note": "test"}
    tables, tiers, levels = tiny(1, n=4, levels=4)
    planner = Planner(tables, tiers, levels)
    while not planner.done:
        obs = planner.observe()
        a = p.act(obs)
        assert np.array_equal(a, q.act(obs))
        planner.step(a)
    assert plan_drl(tables, tiers, levels, p).choices == plan_drl(tables, tiers, levels, spec).choices


def test_loading_refuses_tampered_or_malformed_files(tmp_path):
    spec = _random_policy().save(tmp_path / "pol.json")
    weights = tmp_path / "pol.safetensors"
    good_spec, good_weights = spec.read_text(), weights.read_bytes()

    def refused(match):
        with pytest.raises(EdgepartError, match=match):
            load_policy(spec)
        spec.write_text(good_spec)
        weights.write_bytes(good_weights)

    data = bytearray(good_weights)
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    refused("sha256")
    spec.write_text("{not json")
    refused("cannot read the JSON spec")
    spec.write_text(json.dumps({**json.loads(good_spec), "obs_dim": 12}))
    refused("another observation/action encoding")
    spec.write_text(json.dumps({**json.loads(good_spec), "weights": {"file": "../pol.safetensors", "sha256": "0"}}))
    refused("beside the spec")
    spec.write_text(json.dumps({**json.loads(good_spec), "hidden": [32, 8]}))      # right sha, wrong shapes
    refused("expected float32")
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")             # not safetensors, sha patched
    import hashlib
    spec.write_text(json.dumps({**json.loads(good_spec), "weights": {
        "file": "pol.safetensors", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}))
    refused("not a safetensors file")
    with pytest.raises(EdgepartError, match="cannot read"):
        load_policy(tmp_path / "missing.json")


def test_shipped_policy_loads_and_plans_with_its_label():
    p = load_policy()
    assert p.name == DEFAULT_POLICY.name and len(p.sha256) == 64
    assert DEFAULT_POLICY.with_suffix(".safetensors").stat().st_size < 400 * 1024
    tables, tiers, levels = tiny(2, n=4, levels=8)
    sol = plan(tables, tiers, levels, "drl")
    assert sol.strategy == "drl" and p.sha256[:12] in sol.solver
    assert sol.violations == []
    assert sol.objective <= solve_milp(tables, tiers, levels).objective + 1e-9


def test_a_drl_plan_that_breaks_constraints_reports_them():
    # no cloud, and no memory anywhere for any version's weights: no feasible plan exists (the MILP says so)
    tables, tiers, levels = tiny(3, n=2, levels=2, edge_mem=1.0, end_mem=1.0, cloud=False)
    with pytest.raises(EdgepartError, match="no plan meets"):
        solve_milp(tables, tiers, levels)
    sol = plan_drl(tables, tiers, levels, _random_policy())
    assert sol.violations and any("memory_mb" in v for v in sol.violations)
    assert "2 tasks fit nowhere" in sol.status


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed_and_exports_a_loadable_policy(tmp_path):
    from edgepart.mcia.train import train
    a = train(tmp_path / "a.json", steps=1024, pool=1, n_val=1, eval_every=512, log=lambda s: None)
    b = train(tmp_path / "b.json", steps=1024, pool=1, n_val=1, eval_every=512, log=lambda s: None)
    pa, pb = load_policy(a), load_policy(b)
    assert pa.sha256 == pb.sha256
    assert pa.training["algorithm"].startswith("PPO") and pa.training["seed"] == 0


def test_rollouts_keep_the_best_order_and_say_which_won():
    tables, tiers, levels = tiny(5, n=6, levels=8)
    one = plan_drl(tables, tiers, levels, rollouts=1)
    many = plan_drl(tables, tiers, levels, rollouts=5)
    assert "rollout" not in one.status and "of 5 won" in many.status
    assert many.objective >= one.objective and not many.violations
    with pytest.raises(EdgepartError, match="rollouts"):
        plan_drl(tables, tiers, levels, rollouts=0)
