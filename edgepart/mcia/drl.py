"""The DRL strategy's policy: a plain torch module, saved as safetensors weights + a JSON spec, and the
planner that runs it (``plan(..., "drl")``).

A policy is two files: ``NAME.json`` (the spec: format and encoding version, observation size,
action layout, layer sizes, activation, the weights file's name and sha256, how it was trained) and
the weights in safetensors (``pi.0.weight``, ``pi.0.bias``, … of an MLP ``Linear → tanh → … →
Linear`` whose output is the concatenated logits of the action heads). Loading parses JSON and
reads tensors: no code runs, unlike stable-baselines3's own zip (cloudpickle), which is only ever
written and read inside ``edgepart mcia train`` and never loaded from elsewhere. A spec or weights
file that is malformed, too large, of another encoding, of the wrong shapes, non-finite, or whose
sha256 differs from the spec's is refused with an EdgepartError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgepart.errors import EdgepartError
from edgepart.mcia.env import NVEC, OBS_DIM, Planner, task_options
from edgepart.mcia.scenario import Tiers
from edgepart.mcia.solve import Solution, solution
from edgepart.mcia.table import TaskTable, violations

FORMAT = "edgepart-mcia-policy"
ENCODING = "mcia-env-v1"        # the observation/action encoding of edgepart/mcia/env.py
MAX_SPEC_BYTES = 64 * 1024
MAX_WEIGHT_BYTES = 8 * 2 ** 20
DEFAULT_POLICY = Path(__file__).parent / "policies" / "drl.json"
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
ROLLOUTS = 9                    # task orders planned by default (plan_drl): the given one + 8 seeded random


@dataclass
class Policy:
    """A deterministic policy: observation → action (argmax of each head's logits)."""
    net: nn.Sequential
    hidden: list[int]
    activation: str
    name: str = ""
    sha256: str = ""
    training: dict = field(default_factory=dict)

    @classmethod
    def build(cls, hidden: list[int], activation: str = "tanh", **kw) -> "Policy":
        layers: list[nn.Module] = []
        width = OBS_DIM
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, sum(NVEC)))
        return cls(nn.Sequential(*layers).eval(), list(hidden), activation, **kw)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        logits = self.net(torch.as_tensor(obs, dtype=torch.float32).reshape(-1, OBS_DIM))
        heads = torch.split(logits, list(NVEC), dim=1)
        return torch.stack([h.argmax(dim=1) for h in heads], dim=1).numpy()[0]

    def save(self, spec_path: str | Path, training: dict | None = None) -> Path:
        """Write NAME.safetensors and NAME.json (the spec, with the weights' sha256)."""
        spec_path = Path(spec_path)
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        weights = spec_path.with_suffix(".safetensors")
        save_file({f"pi.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(weights))
        self.sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.training = training if training is not None else self.training
        spec = {"format": FORMAT, "version": 1, "encoding": ENCODING, "obs_dim": OBS_DIM, "nvec": list(NVEC),
                "hidden": self.hidden, "activation": self.activation,
                "weights": {"file": weights.name, "sha256": self.sha256}, "training": self.training}
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")
        self.name = spec_path.name
        return spec_path


def _refuse(path: Path, why: str) -> EdgepartError:
    return EdgepartError(f"DRL policy {path}: {why}; retrain it with `edgepart mcia train` or use the default policy")


def load_policy(spec_path: str | Path | None = None) -> Policy:
    """Load a policy from its JSON spec (default: the one shipped with edgepart), checking everything."""
    path = Path(spec_path) if spec_path is not None else DEFAULT_POLICY
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise _refuse(path, f"spec larger than {MAX_SPEC_BYTES} bytes")
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(path, f"cannot read the JSON spec ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != 1:
        raise _refuse(path, f"not a policy spec (expected format {FORMAT!r}, version 1)")
    if spec.get("encoding") != ENCODING or spec.get("obs_dim") != OBS_DIM or spec.get("nvec") != list(NVEC):
        raise _refuse(path, f"made for another observation/action encoding ({spec.get('encoding')!r}, "
                            f"obs_dim {spec.get('obs_dim')!r}, nvec {spec.get('nvec')!r}; this edgepart: "
                            f"{ENCODING!r}, {OBS_DIM}, {list(NVEC)})")
    hidden, act, w = spec.get("hidden"), spec.get("activation"), spec.get("weights")
    if (not isinstance(hidden, list) or not 1 <= len(hidden) <= 4
            or not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 1024 for h in hidden)):
        raise _refuse(path, f"'hidden' must be 1-4 layer widths in 1..1024, got {hidden!r}")
    if act not in ACTIVATIONS:
        raise _refuse(path, f"'activation' must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if (not isinstance(w, dict) or not isinstance(w.get("file"), str) or not isinstance(w.get("sha256"), str)
            or Path(w["file"]).name != w["file"] or not w["file"].endswith(".safetensors")):
        raise _refuse(path, "'weights' must be {file: NAME.safetensors beside the spec, sha256: HEX}")
    wpath = path.parent / w["file"]
    try:
        if wpath.stat().st_size > MAX_WEIGHT_BYTES:
            raise _refuse(wpath, f"weights larger than {MAX_WEIGHT_BYTES} bytes")
        data = wpath.read_bytes()
    except OSError as e:
        raise _refuse(wpath, f"cannot read the weights ({e})") from e
    sha = hashlib.sha256(data).hexdigest()
    if sha != w["sha256"]:
        raise _refuse(wpath, f"sha256 {sha[:16]}… differs from the spec's {w['sha256'][:16]}… (altered or "
                             "not this spec's weights)")
    policy = Policy.build(hidden, act, name=path.name, sha256=sha,
                          training=spec.get("training") if isinstance(spec.get("training"), dict) else {})
    expected = {f"pi.{k}": v.shape for k, v in policy.net.state_dict().items()}
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise _refuse(wpath, f"not a safetensors file ({e})") from e
    if set(tensors) != set(expected):
        raise _refuse(wpath, f"tensors {sorted(tensors)} do not match the spec's layers {sorted(expected)}")
    for k, v in tensors.items():
        if v.dtype != torch.float32 or tuple(v.shape) != tuple(expected[k]):
            raise _refuse(wpath, f"tensor {k} is {v.dtype} {tuple(v.shape)}, expected float32 {tuple(expected[k])}")
        if not torch.isfinite(v).all():
            raise _refuse(wpath, f"tensor {k} has non-finite values")
    policy.net.load_state_dict({k[len("pi."):]: v for k, v in tensors.items()})
    return policy


def plan_drl(tables: list[TaskTable], tiers: Tiers, levels: int, policy: Policy | str | Path | None = None,
             rollouts: int = ROLLOUTS) -> Solution:
    """The DRL policy's plan, evaluated like every strategy's. With ``rollouts`` > 1 the policy plans the
    tasks in that many orders (the given one, then seeded random permutations) and the plan with the fewest
    broken constraints, then the highest objective, is kept; ``Solution.status`` says which rollout won,
    how many actions were repaired and how many tasks fit nowhere. ``Solution.solver`` names the policy and
    its sha256; ``solve_time`` is the decision loops alone (fallbacks, observations, the network, decoding),
    without building the tasks' options. Broken constraints are in ``Solution.violations``, as for a baseline."""
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    if rollouts < 1:
        raise EdgepartError(f"rollouts must be >= 1, got {rollouts}")
    options = [task_options(t, tiers, levels) for t in tables]
    rng = np.random.default_rng(0)
    best = None
    t0 = time.perf_counter()
    for r in range(rollouts):
        order = list(range(len(tables))) if r == 0 else [int(i) for i in rng.permutation(len(tables))]
        planner = Planner(tables, tiers, levels, options, order)
        while not planner.done:
            planner.step(policy.act(planner.observe()))
        key = (-len(violations(tables, tiers, planner.choices, levels)), sum(planner.terms))
        if best is None or key > best[0]:
            best = (key, r, planner)
    seconds = time.perf_counter() - t0
    _, won, planner = best
    status = (f"{planner.repaired} actions repaired, {len(planner.infeasible)} tasks fit nowhere"
              + (f", rollout {won + 1} of {rollouts} won (1: the tasks' order)" if rollouts > 1 else ""))
    return solution("drl", tables, tiers, planner.choices, levels, solve_time=seconds, status=status,
                    solver=f"policy {policy.name} (sha256 {policy.sha256[:12]})", n_vars=len(tables))


def per_decision_ms(sol: Solution) -> float:
    return 1e3 * sol.solve_time / max(1, len(sol.choices)) if math.isfinite(sol.solve_time) else float("nan")
