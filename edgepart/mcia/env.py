"""The MCIA scenario as a sequential decision problem: a gymnasium environment, and the planner it wraps.

One episode plans one scenario, one task per step (in the scenario's order; training shuffles it).
The costs are the MILP's: every option of a task is one of its own-feasible candidates from
:func:`edgepart.mcia.solve.candidates` (each evaluated by ``table.evaluate``), and the exact reward of
a step is that candidate's objective term, so an episode's return is the plan's objective.

**Action** (``MultiDiscrete([4, 9, 9])``), per task: a *version budget* s (0: any version, s: one of the
versions ranked s or below by size, rank 0 the largest; with more than 4 versions the ranks are
grouped into 4 slots), an *edge-share budget* ja and an *uplink-share budget* jb in eighths (0 = do
not use the resource; a task's level a of L counts as ⌈8a/L⌉ eighths). The step takes the candidate of
highest objective term among those within the three budgets that fit what is left (below); its version,
cuts (k1, k2) and shares are the task's choice. So the policy sets the discrete/continuous resource
split and the version class; the cut pair, a discrete choice with an exact per-task optimum given
those, is found by enumeration.

**Fit and repair.** Every undecided task reserves the resources of its *fallback*: going through the
tasks once, each takes the candidate of least footprint that fits beside the fallbacks before it
(shares, load and weights, each divided by what is left of it; usually a small version on the end
device alone, an offloaded one where the end device is full). A candidate *fits* when, after taking it, the edge share, the task's
uplink medium, edge memory, and its end device's memory and load still hold the fallbacks of all later
tasks — so when the fallbacks fit together at the start, every step has an option and the plan meets
every shared constraint. If nothing within the budgets fits, the version budget
is dropped, then the share budgets (a *repair*, counted in ``info["repaired"]``); if nothing fits even
without reserving for later tasks, the task takes the candidate of highest term regardless, and the
plan's broken constraints are reported (``info["infeasible"]``, ``Solution.violations``), never hidden.

**Observation** (float32, :data:`OBS_DIM`): for the current task, the best objective term reachable
within every (version budget, edge budget, uplink budget) among the fitting candidates, as a squashed
gap below the task's best own term (:func:`squash`; −1.5 where nothing fits); the task's weights,
rate, deadline and minimum accuracy; what is left of the edge share, its uplink medium, edge memory,
its end device's memory and load (before and after the reservation for later tasks); how many tasks
are left (all, on its medium, on its end device); and the mean over the later tasks (all, and those
on its medium) of their own value grids — how much each eighth of edge and uplink is worth to them.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from edgepart.errors import EdgepartError
from edgepart.mcia.scenario import Tiers
from edgepart.mcia.solve import candidates
from edgepart.mcia.table import Choice, TaskTable

V_SLOTS = 4                 # version budgets
P = 8                       # share budgets are in eighths
G = P + 1                   # 0..8
EMPTY = -1.5                # grid value where no candidate fits
NVEC = (V_SLOTS, G, G)
TASK_FEATURES = 8
RESOURCE_FEATURES = 12
FUTURE_SCALARS = 5
OBS_DIM = V_SLOTS * G * G + TASK_FEATURES + RESOURCE_FEATURES + FUTURE_SCALARS + 2 * G * G


def squash(gap: np.ndarray | float) -> np.ndarray | float:
    """A term's gap below the task's best (≤ 0, objective units) mapped to [−1.2, 0]: log-spaced so that
    0.005 and 1.0 of objective are both visible."""
    return np.maximum(-np.log1p(-np.minimum(gap, 0.0) / 0.005) / math.log1p(200.0), -1.2)


@dataclass
class TaskOptions:
    """One task's own-feasible candidates as arrays (the MILP's candidates, pruned the same way)."""
    choices: list[Choice]
    slot: np.ndarray        # version slot of each candidate (0: the largest versions)
    ga: np.ndarray          # edge share in eighths, rounded up
    gb: np.ndarray          # uplink share in eighths, rounded up
    a: np.ndarray           # edge share level of L
    b: np.ndarray           # uplink share level of L
    term: np.ndarray        # objective term (table.evaluate)
    end_bytes: np.ndarray
    edge_bytes: np.ndarray
    load: np.ndarray        # rate × end seconds
    best: float             # the highest term of the task on its own
    grid: np.ndarray        # G×G squashed best term within each share budget, on its own (no other task)



def version_slots(table: TaskTable) -> list[int]:
    """Slot of each version: its rank by total weight bytes (0 = largest), grouped into V_SLOTS slots."""
    n = len(table.versions)
    order = sorted(range(n), key=lambda v: (-table.versions[v].param_bytes[-1], v))
    slots = [0] * n
    for rank, v in enumerate(order):
        slots[v] = rank if n <= V_SLOTS else rank * V_SLOTS // n
    return slots


def eighths(level: np.ndarray, levels: int) -> np.ndarray:
    return -((-level * P) // levels)            # ⌈level · 8 / L⌉


def _budget_grid(slot, ga, gb, term, best, mask) -> np.ndarray:
    """V_SLOTS×G×G: best squashed term with slot ≥ s, ga ≤ ja, gb ≤ jb among ``mask``."""
    grid = np.full((V_SLOTS, G, G), -np.inf)
    if mask.any():
        np.maximum.at(grid, (slot[mask], ga[mask], gb[mask]), term[mask])
        grid = np.maximum.accumulate(grid[::-1], axis=0)[::-1]
        grid = np.maximum.accumulate(np.maximum.accumulate(grid, axis=1), axis=2)
    return np.where(np.isfinite(grid), squash(grid - best), EMPTY)


def task_options(table: TaskTable, tiers: Tiers, levels: int) -> TaskOptions:
    """The task's options; raises EdgepartError (naming the task) when it has none, like the MILP."""
    cs = candidates(table, tiers, levels)
    if not cs:
        raise EdgepartError(f"task {table.task.name!r}: no version/cut/share meets its min_accuracy, deadline_ms "
                            "and rate on its own; relax them")
    slots = version_slots(table)
    a = np.array([c.choice.edge_share for c in cs])
    b = np.array([c.choice.up_share for c in cs])
    term = np.array([c.outcome.objective for c in cs])
    opts = TaskOptions([c.choice for c in cs], np.array([slots[c.choice.version] for c in cs]),
                       eighths(a, levels), eighths(b, levels), a, b, term,
                       np.array([float(c.outcome.end_bytes) for c in cs]),
                       np.array([float(c.outcome.edge_bytes) for c in cs]),
                       np.array([c.end_load for c in cs]), float(term.max()), np.zeros((G, G)))
    opts.grid = _budget_grid(opts.slot, opts.ga, opts.gb, term, opts.best, np.ones(len(cs), bool))[0]
    return opts


class Planner:
    """Plans one scenario task by task: observe, then step with an action (or a given choice).

    ``order`` is the order the tasks are decided in (default: as given). After the last step,
    ``choices`` holds one Choice per task in the scenario's order."""

    def __init__(self, tables: list[TaskTable], tiers: Tiers, levels: int, options: list[TaskOptions] | None = None,
                 order: list[int] | None = None):
        self.tables, self.tiers, self.levels = tables, tiers, levels
        self.options = options if options is not None else [task_options(t, tiers, levels) for t in tables]
        self.order = list(order) if order is not None else list(range(len(tables)))
        ends = [d.name for d in tiers.ends]
        mediums = sorted({tiers.medium(e) for e in ends})
        self._end = [ends.index(t.task.source) for t in tables]
        self._medium = [mediums.index(tiers.medium(t.task.source)) for t in tables]
        self.edge_left = levels
        self.medium_left = np.full(len(mediums), levels)
        self.edge_mem_left = tiers.edge.memory_mb * 2.0 ** 20
        self.end_mem_left = np.array([d.memory_mb * 2.0 ** 20 for d in tiers.ends])
        self.end_load_left = np.ones(len(ends))
        # what the undecided tasks (after the current one) need at least, per resource
        self.r_edge, self.r_medium, self.r_edge_mem = 0, np.zeros(len(mediums), int), 0.0
        self.r_end_mem, self.r_load = np.zeros(len(ends)), np.zeros(len(ends))
        self.f_grid = np.zeros((G, G))
        self.f_medium_grid = np.zeros((len(mediums), G, G))
        self.f_n, self.f_medium_n, self.f_end_n = 0, np.zeros(len(mediums), int), np.zeros(len(ends), int)
        self.fallback = self._fallbacks()
        for i in self.order:
            self._reserve(i, +1)
        self.pos = 0
        self.choices: list[Choice | None] = [None] * len(tables)
        self.terms = [0.0] * len(tables)
        self.repaired = 0
        self.infeasible: list[str] = []
        if self.order:
            self._reserve(self.order[0], -1)

    def _fallbacks(self, rounds: int = 12) -> list[int]:
        """Each task's fallback. Going through the tasks, each takes the candidate that fits beside the
        fallbacks before it with the least footprint: Σ price × use / what is left, over the edge share, its
        medium, edge memory, its end device's memory and load (of equal footprint the higher term). While a
        resource overflows in the end, its price doubles and the pass is redone; if one still overflows, a
        local search (:meth:`_repair_fallbacks`). Tried in the scenario's order, then the tasks that need
        the most end-device load first, then reversed; the first that fits is kept."""
        n = len(self.options)
        heavy = sorted(range(n), key=lambda i: -float(self.options[i].load.min()))
        best: list[int] = []
        for order in (list(range(n)), heavy, list(reversed(range(n)))):
            out = self._priced_pass(order, rounds)
            if not self.fallbacks_fit:
                out = self._repair_fallbacks(out)
            if not best:
                best = out
            if self.fallbacks_fit:
                return out
        return best

    def _priced_pass(self, order: list[int], rounds: int) -> list[int]:
        L, n_m, n_e = self.levels, len(self.medium_left), len(self.end_load_left)
        self.fallbacks_fit = False
        price = {"edge": 1.0, "emem": 1.0, "medium": np.ones(n_m), "nmem": np.ones(n_e), "load": np.ones(n_e)}
        out = [0] * len(self.options)
        for _ in range(rounds):
            edge, medium, emem = 0, np.zeros(n_m), 0.0
            nmem, load = np.zeros(n_e), np.zeros(n_e)
            for i in order:
                o = self.options[i]
                m, e = self._medium[i], self._end[i]
                left = (L - edge, L - medium[m], self.edge_mem_left - emem, self.end_mem_left[e] - nmem[e],
                        1.0 - load[e])
                fit = ((o.a <= left[0]) & (o.b <= left[1]) & (o.edge_bytes <= left[2]) & (o.end_bytes <= left[3])
                       & (o.load <= left[4] + 1e-12))
                fp = (price["edge"] * o.a / max(left[0], 0.5) + price["medium"][m] * o.b / max(left[1], 0.5)
                      + price["emem"] * o.edge_bytes / max(left[2], 1.0)
                      + price["nmem"][e] * o.end_bytes / max(left[3], 1.0)
                      + price["load"][e] * o.load / max(left[4], 1e-3))
                k = int(np.lexsort((-o.term, np.where(fit, fp, fp + 1e12)))[0])
                edge += o.a[k]
                medium[m] += o.b[k]
                emem += o.edge_bytes[k]
                nmem[e] += o.end_bytes[k]
                load[e] += o.load[k]
                out[i] = k
            over = {"edge": edge > L, "medium": medium > L, "emem": emem > self.edge_mem_left,
                    "nmem": nmem > self.end_mem_left, "load": load > 1.0 + 1e-12}
            self.fallbacks_fit = not any(np.any(v) for v in over.values())
            if self.fallbacks_fit:
                break
            for r, v in over.items():
                price[r] = price[r] * np.where(v, 2.0, 1.0)
        return out

    def _repair_fallbacks(self, out: list[int]) -> list[int]:
        """Local search when pricing left an overflow: move the one task's fallback to the candidate that
        lowers the total relative overflow Σ max(0, use − capacity) / capacity the most, until nothing
        overflows or no move lowers it."""
        n_m, n_e = len(self.medium_left), len(self.end_load_left)
        cap = np.concatenate([[self.levels], np.full(n_m, self.levels), [self.edge_mem_left], self.end_mem_left,
                              np.ones(n_e) + 1e-12]).astype(float)
        col = [np.array([0, 1 + self._medium[i], 1 + n_m, 2 + n_m + self._end[i], 2 + n_m + n_e + self._end[i]])
               for i in range(len(self.options))]
        use = [np.stack([o.a, o.b, o.edge_bytes, o.end_bytes, o.load], axis=1).astype(float) for o in self.options]
        total = np.zeros(len(cap))
        for i, k in enumerate(out):
            np.add.at(total, col[i], use[i][k])
        out = list(out)
        for _ in range(4 * len(out) + 10):
            if np.all(total <= cap):
                self.fallbacks_fit = True
                break
            best = (0.0, -1, -1)
            for i, k in enumerate(out):
                c = col[i]
                if np.all(total[c] <= cap[c]):
                    continue
                before = np.maximum(total[c] - cap[c], 0) / cap[c]
                after = np.maximum(total[c] - use[i][k] + use[i] - cap[c], 0) / cap[c]
                gain = before.sum() - after.sum(axis=1)
                j = int(np.argmax(gain))
                if gain[j] > best[0] + 1e-15:
                    best = (float(gain[j]), i, j)
            if best[1] < 0:
                break
            _, i, j = best
            np.add.at(total, col[i], use[i][j] - use[i][out[i]])
            out[i] = j
        return out

    def _reserve(self, i: int, sign: int) -> None:
        o, k = self.options[i], self.fallback[i]
        a, b, eb, nb, load = int(o.a[k]), int(o.b[k]), float(o.edge_bytes[k]), float(o.end_bytes[k]), float(o.load[k])
        m, e = self._medium[i], self._end[i]
        self.r_edge += sign * a
        self.r_medium[m] += sign * b
        self.r_edge_mem += sign * eb
        self.r_end_mem[e] += sign * nb
        self.r_load[e] += sign * load
        self.f_grid += sign * self.options[i].grid
        self.f_medium_grid[m] += sign * self.options[i].grid
        self.f_n += sign
        self.f_medium_n[m] += sign
        self.f_end_n[e] += sign

    @property
    def done(self) -> bool:
        return self.pos >= len(self.order)

    @property
    def current(self) -> int:
        return self.order[self.pos]

    def _fits(self, i: int, reserve: bool) -> np.ndarray:
        o, m, e = self.options[i], self._medium[i], self._end[i]
        k = 1.0 if reserve else 0.0
        return ((o.a <= self.edge_left - k * self.r_edge)
                & (o.b <= self.medium_left[m] - k * self.r_medium[m])
                & (o.edge_bytes <= self.edge_mem_left - k * self.r_edge_mem)
                & (o.end_bytes <= self.end_mem_left[e] - k * self.r_end_mem[e])
                & (o.load <= self.end_load_left[e] - k * self.r_load[e] + 1e-12))

    def observe(self) -> np.ndarray:
        """The observation of the current task (zeros when done)."""
        if self.done:
            return np.zeros(OBS_DIM, np.float32)
        i = self.current
        o, t, m, e = self.options[i], self.tables[i].task, self._medium[i], self._end[i]
        fit = self._fits(i, True)
        grid = _budget_grid(o.slot, o.ga, o.gb, o.term, o.best, fit)
        L = self.levels
        mem_e = self.tiers.edge.memory_mb * 2.0 ** 20
        mem_n = self.tiers.ends[e].memory_mb * 2.0 ** 20
        task = [t.w_acc, t.w_lat, min(t.rate, 10.0) / 4, float(t.deadline_ms is not None),
                (t.min_accuracy or 0.0), float(np.clip(o.best, -5, 5)) / 2, fit.mean(),
                float(self._fits(i, False).any() and not fit.any())]
        res = [self.edge_left / L, self.medium_left[m] / L, self.edge_mem_left / mem_e, self.end_mem_left[e] / mem_n,
               self.end_load_left[e],
               (self.edge_left - self.r_edge) / L, (self.medium_left[m] - self.r_medium[m]) / L,
               (self.edge_mem_left - self.r_edge_mem) / mem_e, (self.end_mem_left[e] - self.r_end_mem[e]) / mem_n,
               self.end_load_left[e] - self.r_load[e], self.levels / 16, float(self.tiers.shared_medium)]
        fut = [self.f_n / 50, self.f_medium_n[m] / 50, self.f_end_n[e] / 10, self.pos / 50,
               (len(self.order) - self.pos) / 50]
        fg = self.f_grid / self.f_n if self.f_n else np.zeros((G, G))
        fmg = self.f_medium_grid[m] / self.f_medium_n[m] if self.f_medium_n[m] else np.zeros((G, G))
        obs = np.concatenate([grid.ravel(), task, res, fut, fg.ravel(), fmg.ravel()])
        return np.clip(obs, -2.0, 2.0).astype(np.float32)

    def decode(self, action) -> tuple[int, bool, bool]:
        """(candidate index, repaired, fits) of an action (s, ja, jb) for the current task."""
        i = self.current
        o = self.options[i]
        s, ja, jb = (int(x) for x in action)
        pool = self._fits(i, True)
        fits = True
        if not pool.any():
            pool = self._fits(i, False)
            if not pool.any():
                pool, fits = np.ones(len(o.term), bool), False
        budget = pool & (o.ga <= ja) & (o.gb <= jb)
        for mask, repaired in ((budget & (o.slot >= s), False), (budget, True), (pool, True)):
            if mask.any():
                idx = np.flatnonzero(mask)
                return int(idx[np.argmax(o.term[idx])]), repaired, fits
        raise AssertionError("unreachable: the pool is never empty")

    def step(self, action=None, index: int | None = None) -> float:
        """Decide the current task by ``action`` (or take its candidate ``index`` verbatim); returns its
        objective term. Counts repairs; records a task that fit nowhere in ``infeasible``."""
        i = self.current
        if index is None:
            index, repaired, fits = self.decode(action)
            self.repaired += repaired
        else:
            fits = bool(self._fits(i, False)[index])
        if not fits:
            self.infeasible.append(self.tables[i].task.name)
        o, m, e = self.options[i], self._medium[i], self._end[i]
        self.edge_left -= int(o.a[index])
        self.medium_left[m] -= int(o.b[index])
        self.edge_mem_left -= o.edge_bytes[index]
        self.end_mem_left[e] -= o.end_bytes[index]
        self.end_load_left[e] -= o.load[index]
        self.choices[i] = o.choices[index]
        self.terms[i] = float(o.term[index])
        self.pos += 1
        if not self.done:
            self._reserve(self.current, -1)
        return self.terms[i]

    def index_of(self, choice: Choice) -> int:
        """The current task's candidate index of ``choice`` (a KeyError if it is not one of them)."""
        try:
            return self.options[self.current].choices.index(choice)
        except ValueError:
            raise KeyError(f"{choice} is not a candidate of task {self.tables[self.current].task.name!r}") from None


Scenario = tuple[list[TaskTable], Tiers, int]


class MciaEnv(gym.Env):
    """gymnasium environment: each episode one scenario from ``scenarios(rng)`` (tables, tiers, levels),
    or one of a fixed list (``options``: their tasks' options, computed once and shared), its tasks decided
    one per step; ``subsample=(lo, hi)``: each episode a random subset of lo..hi of the scenario's tasks.

    ``reward="objective"``: each step's reward is the task's objective term, so the return is the plan's
    objective (table.objective). ``reward="regret"`` (training): the term minus the task's best own term
    (a per-scenario constant apart, the same optimum), floored at −2, and −2 more for a task that fit
    nowhere. ``shuffle``: decide the tasks in a random order."""

    metadata = {"render_modes": []}

    def __init__(self, scenarios: Callable[[random.Random], Scenario] | list[Scenario], reward: str = "objective",
                 shuffle: bool = False, subsample: tuple[int, int] | None = None, seed: int = 0,
                 options: list[list[TaskOptions]] | None = None):
        if reward not in ("objective", "regret"):
            raise ValueError(f"reward must be 'objective' or 'regret', got {reward!r}")
        self.scenarios, self.reward_mode, self.shuffle, self.subsample = scenarios, reward, shuffle, subsample
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete(list(NVEC))
        self._rng = random.Random(seed)
        self._options: dict[int, list[TaskOptions]] = dict(enumerate(options)) if options is not None else {}
        self.planner: Planner | None = None

    def _scenario(self) -> tuple[list[TaskTable], Tiers, int, list[TaskOptions]]:
        if callable(self.scenarios):
            tables, tiers, levels = self.scenarios(self._rng)
            return tables, tiers, levels, [task_options(t, tiers, levels) for t in tables]
        k = self._rng.randrange(len(self.scenarios))
        tables, tiers, levels = self.scenarios[k]
        if k not in self._options:
            self._options[k] = [task_options(t, tiers, levels) for t in tables]
        return tables, tiers, levels, self._options[k]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = random.Random(seed)
        tables, tiers, levels, opts = self._scenario()
        keep = list(range(len(tables)))
        if self.subsample:
            n = self._rng.randint(*self.subsample)
            keep = sorted(self._rng.sample(keep, min(n, len(keep))))
        tables, opts = [tables[i] for i in keep], [opts[i] for i in keep]
        order = list(range(len(tables)))
        if self.shuffle:
            self._rng.shuffle(order)
        self.planner = Planner(tables, tiers, levels, opts, order)
        return self.planner.observe(), {}

    def step(self, action):
        p = self.planner
        i = p.current
        term = p.step(action)
        if self.reward_mode == "objective":
            reward = term
        else:
            reward = max(term - p.options[i].best, -2.0) - (2.0 if p.infeasible and p.infeasible[-1] ==
                                                             p.tables[i].task.name else 0.0)
        info = {"term": term, "repaired": p.repaired, "infeasible": list(p.infeasible)}
        return p.observe(), float(reward), p.done, False, info
