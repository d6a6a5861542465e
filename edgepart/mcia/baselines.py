"""Baselines for MCIA, each a function (tables, tiers, levels) -> list[Choice], judged by table.evaluate.

"Equal shares": every task gets ⌊L / n⌋ levels (at least 1) of the edge server (n tasks) and
⌊L / n_m⌋ of its uplink medium (n_m tasks on it), used or not; with more tasks than levels the shares
overflow and the plan is reported as violating capacity. "The full version" is the one with the most weight bytes (the table's reference).

- ``end-only``      all on the end device; per task the most accurate version meeting its own
                    constraints (deadline, min accuracy, load), else the fastest version.
- ``edge-only``     the input goes up, the full version runs wholly on the edge, equal shares.
- ``cloud-only``    the input goes up and over the WAN, the full version runs in the cloud, equal uplink shares.
- ``neurosurgeon``  Kang et al. (ASPLOS 2017) extended to three tiers: the full version, equal shares, each
                    task the (k1, k2) of least latency (two cuts over the legal cuts).
- ``greedy``        equal shares; each task alone picks the version and cuts maximising its own objective
                    term among those meeting its own constraints (no coordination of shares or memory).
- ``random``        equal shares; each task a uniformly random version and cuts (seeded).
"""
from __future__ import annotations

import random as _random
from collections.abc import Callable

from edgepart.mcia.scenario import Tiers
from edgepart.mcia.table import Choice, TaskTable, evaluate, own_violations, uses


def full_version(table: TaskTable) -> int:
    return max(range(len(table.versions)), key=lambda i: table.versions[i].param_bytes[-1])


def equal_shares(tables: list[TaskTable], tiers: Tiers, levels: int) -> list[tuple[int, int]]:
    """Per task (edge level, uplink level): ⌊L / n⌋ of the edge over all n tasks, ⌊L / n_m⌋ of its uplink
    medium over the n_m tasks on it (at least 1 level: with more tasks than levels the plan overflows)."""
    n_medium: dict[str, int] = {}
    for t in tables:
        m = tiers.medium(t.task.source)
        n_medium[m] = n_medium.get(m, 0) + 1
    return [(max(1, levels // len(tables)), max(1, levels // n_medium[tiers.medium(t.task.source)]))
            for t in tables]


def _with_equal_shares(tables: list[TaskTable], tiers: Tiers, levels: int,
                       picks: list[tuple[int, int, int]]) -> list[Choice]:
    out = []
    for t, (v, k1, k2), (a, b) in zip(tables, picks, equal_shares(tables, tiers, levels)):
        up, edge, _ = uses(t.versions[v], k1, k2)
        out.append(Choice(v, k1, k2, a if edge else 0, b if up else 0))
    return out


def _cut_pairs(table: TaskTable, v: int, tiers: Tiers):
    last = table.versions[v].last
    for k1 in range(last + 1):
        for k2 in range(k1, last + 1):
            if k2 < last and tiers.wan is None:
                continue
            yield k1, k2


def end_only(tables, tiers, levels):
    out = []
    for t in tables:
        def ok(v):
            o = evaluate(t, tiers, Choice(v, t.versions[v].last, t.versions[v].last, 0, 0), levels)
            return not own_violations(t, o) and t.task.rate * o.end_s <= 1.0
        good = [v for v in range(len(t.versions)) if ok(v)]
        v = (max(good, key=lambda v: t.versions[v].accuracy) if good
             else min(range(len(t.versions)), key=lambda v: t.versions[v].end_s[-1]))
        last = t.versions[v].last
        out.append(Choice(v, last, last, 0, 0))
    return out


def edge_only(tables, tiers, levels):
    picks = [(full_version(t), 0, t.versions[full_version(t)].last) for t in tables]
    return _with_equal_shares(tables, tiers, levels, picks)


def cloud_only(tables, tiers, levels):
    if tiers.wan is None:
        return edge_only(tables, tiers, levels)
    return _with_equal_shares(tables, tiers, levels, [(full_version(t), 0, 0) for t in tables])


def _best_per_task(tables, tiers, levels, versions_of, key) -> list[Choice]:
    """Equal shares; each task alone the (version, cuts) of the highest ``key(table, outcome)``."""
    out = []
    for t, (a, b) in zip(tables, equal_shares(tables, tiers, levels)):
        best = None
        for v in versions_of(t):
            for k1, k2 in _cut_pairs(t, v, tiers):
                up, edge, _ = uses(t.versions[v], k1, k2)
                c = Choice(v, k1, k2, a if edge else 0, b if up else 0)
                score = key(t, evaluate(t, tiers, c, levels))
                if best is None or score > best[0]:
                    best = (score, c)
        out.append(best[1])
    return out


def neurosurgeon(tables, tiers, levels):
    return _best_per_task(tables, tiers, levels, lambda t: [full_version(t)], lambda t, o: -o.latency_s)


def greedy(tables, tiers, levels):
    def key(t, o):
        return (not own_violations(t, o), o.objective)
    return _best_per_task(tables, tiers, levels, lambda t: range(len(t.versions)), key)


def random_plan(tables, tiers, levels, seed: int = 0):
    rng = _random.Random(seed)
    picks = []
    for t in tables:
        v = rng.randrange(len(t.versions))
        picks.append((v, *rng.choice(list(_cut_pairs(t, v, tiers)))))
    return _with_equal_shares(tables, tiers, levels, picks)


BASELINES: dict[str, Callable] = {"end-only": end_only, "edge-only": edge_only, "cloud-only": cloud_only,
                                  "neurosurgeon": neurosurgeon, "greedy": greedy, "random": random_plan}
