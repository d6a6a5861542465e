"""Training the DRL strategy: PPO (stable-baselines3) on the MCIA environment, exported to safetensors + JSON.

    edgepart mcia train --out policies/drl.json [--steps 300000] [--seed 0]

Scenarios are drawn from :class:`edgepart.mcia.synthetic.Distribution` (uplink bandwidth 0.5–200 Mbit/s
log-uniform, end-device speeds 0.5–2, edge speed 4–16, WAN 20–100 Mbit/s and 10–50 ms, accuracy- vs
latency-sensitive mixes, rates 1–3/s, deadlines 60–120 ms, 20 % with one shared uplink medium): a
pool of ``pool`` scenarios of 50 tasks, their options built once; each episode takes a random subset
of 3–50 of one scenario's tasks in a random order. Every ``eval_every`` steps the deterministic policy
plans ``n_val`` further draws (validation, never the benchmark's grid); the export is the checkpoint
with the best mean ratio to the MILP's objective there. Deterministic for a seed (one torch thread).
SB3's own zip (cloudpickle) is never written: the actor's weights go straight to safetensors.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgepart.mcia.drl import Policy, plan_drl
from edgepart.mcia.env import MciaEnv, Planner, task_options
from edgepart.mcia.solve import solve_milp
from edgepart.mcia.synthetic import Distribution, draw_scenario

LEVELS = 8


def _draw_pool(rng: random.Random, n: int, n_tasks: int | None, dist: Distribution):
    """n scenarios whose every task has an own-feasible option (tasks without one are dropped) and whose
    tasks' fallbacks fit together (tasks dropped from the end until they do): feasible by construction."""
    pool, options = [], []
    while len(pool) < n:
        tables, tiers = draw_scenario(rng, dist, n_tasks)
        kept, opts = [], []
        for t in tables:
            try:
                opts.append(task_options(t, tiers, LEVELS))
                kept.append(t)
            except Exception:   # noqa: BLE001 — a task that cannot meet its own deadline: not a training case
                continue
        while kept and not Planner(kept, tiers, LEVELS, opts).fallbacks_fit:
            kept, opts = kept[:-1], opts[:-1]
        if kept:
            pool.append((kept, tiers, LEVELS))
            options.append(opts)
    return pool, options


def export(sb3_policy, hidden: list[int], activation: str = "tanh") -> Policy:
    """The actor of an SB3 ActorCriticPolicy (MultiDiscrete, MLP) as a plain :class:`Policy`."""
    p = Policy.build(hidden, activation)
    state = {}
    for j in range(len(hidden)):
        for w in ("weight", "bias"):
            state[f"{2 * j}.{w}"] = getattr(sb3_policy.mlp_extractor.policy_net[2 * j], w).detach().clone()
    for w in ("weight", "bias"):
        state[f"{2 * len(hidden)}.{w}"] = getattr(sb3_policy.action_net, w).detach().clone()
    p.net.load_state_dict(state)
    return p


def validation_score(policy: Policy, val: list, milp: list[float]) -> float:
    """Mean over scenarios of 1 − (MILP − DRL) / |MILP|, an infeasible DRL plan counting 0."""
    scores = []
    for (tables, tiers, levels), best in zip(val, milp):
        sol = plan_drl(tables, tiers, levels, policy)
        scores.append(0.0 if sol.violations else 1.0 - (best - sol.objective) / abs(best))
    return sum(scores) / len(scores)


def train(out: str | Path, steps: int = 300_000, seed: int = 0, pool: int = 24, n_val: int = 12,
          eval_every: int = 25_000, hidden: tuple[int, ...] = (128, 64), dist: Distribution = Distribution(),
          log: Callable[[str], None] = print) -> Path:
    """Train, keep the best validation checkpoint, write OUT (JSON spec) and its safetensors; returns OUT."""
    # why: stable-baselines3 is a training-time dependency; planning with a saved policy never imports it
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rng = random.Random(seed)
    scen, opts = _draw_pool(rng, pool, 50, dist)
    val_rng = random.Random(10_000 + seed)
    val, _ = _draw_pool(val_rng, n_val, None, Distribution(n_tasks=(5, 20)))
    milp = [solve_milp(t, ti, lv, time_limit=30.0, gap=1e-3).objective for t, ti, lv in val]
    log(f"pool of {pool} training scenarios, {n_val} validation scenarios (MILP solved) "
        f"in {time.perf_counter() - t0:.0f} s")
    envs = DummyVecEnv([lambda k=k: MciaEnv(scen, reward="regret", shuffle=True, subsample=(3, 50),
                                            seed=seed * 100 + k, options=opts) for k in range(4)])
    envs.seed(seed)
    model = PPO("MlpPolicy", envs, n_steps=512, batch_size=256, n_epochs=8, gamma=1.0, gae_lambda=0.95,
                learning_rate=3e-4, ent_coef=0.005, clip_range=0.2, seed=seed, device="cpu", verbose=0,
                policy_kwargs={"net_arch": {"pi": list(hidden), "vf": list(hidden)}})
    best: dict = {"score": -float("inf"), "policy": None, "steps": 0}

    class Checkpoint(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = eval_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += eval_every
                self._evaluate()
            return True

        def _evaluate(self):
            p = export(self.model.policy, list(hidden))
            score = validation_score(p, val, milp)
            log(f"  {self.num_timesteps:>7d} steps, {time.perf_counter() - t0:5.0f} s: validation "
                f"{100 * score:.2f} % of the MILP")
            if score > best["score"]:
                best.update(score=score, policy=p, steps=self.num_timesteps)

    cb = Checkpoint()
    model.learn(total_timesteps=steps, callback=cb)
    cb._evaluate()
    policy = best["policy"]
    training = {"algorithm": "PPO (stable-baselines3)", "steps": steps, "seed": seed, "pool": pool,
                "selected_at_steps": best["steps"], "validation_ratio_to_milp": round(best["score"], 5),
                "n_validation": n_val, "distribution": {k: v for k, v in vars(dist).items()},
                "seconds": round(time.perf_counter() - t0, 1), "hidden": list(hidden)}
    path = policy.save(out, training)
    log(f"policy written to {path} ({path.with_suffix('.safetensors').stat().st_size / 1024:.0f} KiB), "
        f"validation {100 * best['score']:.2f} % of the MILP at {best['steps']} steps")
    return path
