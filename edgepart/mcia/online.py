"""Online re-planning for MCIA: watch the tiers while tasks are served, re-solve when they moved, apply a
plan only when it pays for long enough (docs/mcia.md, "Re-planning while serving").

    ctl = MciaController.for_run(run)          # run: an MciaRun serving its tasks
    ctl.start()                                # a background thread; requests go on as before
    ...                                        # an uplink drops, the edge server gets loaded ...
    ctl.stop(); ctl.events                     # every decision, with its reason and predicted gain

Every ``interval`` seconds the controller's thread (never on a request's path):

1. **monitor** — asks every task's workers for their counters (``stats``, the same the single-model
   controller reads, :mod:`edgepart.online.controller`): per-stage times give each device's *load*
   (measured ÷ predicted stage time, relative to the first rounds' ratio: ``LiveState.stage_ratio``);
   the pieces a task's workers received (``rx_mbps:P``) and the rate their sends were acknowledged
   at while the link stayed busy (``tx_acked:P`` / ``tx_queued:P`` / ``t_us``) give the links. A task
   moves on its uplink at its share ``b/L`` of it (its own htb class), so its rate ÷ ``b/L`` is the
   uplink's; the WAN is not shared; pieces between an end device and the cloud cross both and count
   for the uplink when slower than the WAN. Wall units × the testbed's ``time_scale``. Kept in a
   :class:`~edgepart.online.state.LiveState` (EWMA, a 2× jump replaces the value; no ``/proc/stat``
   load: in a network namespace it is the host's);
2. **evaluate** — the *live* cluster (each device's speed × (1 − load), the measured links, capped
   at the cluster file's) and the tasks' cost tables rescaled to it (:func:`edgepart.mcia.table.rescale`),
   the current choices' objective under it (``table.evaluate``: the one objective every strategy is
   judged by);
3. **re-solve** — when the live state moved (a load by ``load_step``, a link by ``bandwidth_step``
   relative, from the state of the last solve) or every ``recheck_s``, a second thread solves the
   MCIA problem for the live state (``strategy``: milp by default);
4. **hysteresis** — the candidate's objective under the live state of *every* round must beat the
   current plan's by ``min_gain`` × Σ(w_acc + w_lat) of the tasks it changes (the objective's scale:
   each task's term is at most w_acc and its latency term is in units of w_lat) for ``hold_s`` s; the
   rounds during the solve count (their live states are kept), so the hold runs while it solves;
5. **apply** — ``apply(solution, cluster)`` (for a run: ``MciaRun.update(tasks, cluster=...,
   solution=...)``: tasks whose version or cuts changed get new workers, make before break; shares
   change in place).

Events (``start``, ``solved``, ``candidate``, ``dropped``, ``apply``, ``apply_failed``) are logged
(logger ``edgepart.mcia.online``) with the reason, the objectives and the predicted gain, and kept in
:attr:`MciaController.events`. Every wait has a timeout (stats: ``stats_timeout`` per worker; the
solver: ``time_limit``; ``stop``: ``join_timeout``).
"""
from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgepart.cluster import Cluster
from edgepart.errors import EdgepartError
from edgepart.mcia import plan as solve_plan
from edgepart.mcia.scenario import Tiers
from edgepart.mcia.solve import Solution
from edgepart.mcia.table import Choice, TaskTable, evaluate, rescale, uses, violations
from edgepart.online.state import LiveState, link_readings

log = logging.getLogger("edgepart.mcia.online")

BASE_SAMPLES = 3        # rounds whose network excess is the task's fixed overhead (per choice)
NOISE_S = 0.003         # cluster s: a request's network time off the model by less is noise ...
NOISE_SHARE = 0.1       # ... or by less than this share of its predicted latency

# {task: {device: the worker's stats}}
Stats = dict[str, dict[str, dict]]


@dataclass
class MciaControllerConfig:
    """Knobs of the MCIA controller (docs/mcia.md gives the defaults' reasons)."""

    replan: bool = True            # False: only monitor and log (a static plan)
    strategy: str = "milp"         # edgepart.mcia.plan strategy for re-solves
    min_gain: float = 0.02         # apply when the objective gains ≥ this × Σ(w_acc + w_lat) of the changed tasks ...
    hold_s: float = 3.0            # ... under the live state of every round for this long
    interval: float = 0.5          # s between monitor rounds
    recheck_s: float = 30.0        # re-solve at least this often, even if nothing moved
    alpha: float = 0.4             # EWMA weight of a new sample
    load_step: float = 0.1         # a load change this large makes a re-solve
    bandwidth_step: float = 0.25   # a bandwidth change this large (relative) makes a re-solve
    settle_s: float = 1.0          # s after an apply before stage times count again
    stats_timeout: float = 2.0     # s to wait for a worker's counters
    time_limit: float = 20.0       # s the solver may take
    join_timeout: float = 30.0     # s stop() waits for the threads
    time_scale: float = 1.0        # cluster time = wall time × time_scale (the testbed's)


@dataclass
class LiveView:
    """One round's view: the live cluster, its tiers, the tasks' tables for it, the current plan's objective."""

    t: float
    cluster: Cluster
    tiers: Tiers
    tables: list[TaskTable]
    objective: float
    violations: list[str]


@dataclass
class _Candidate:
    solution: Solution
    cluster: Cluster               # the live cluster it was solved for (applied with it)
    why: str
    solve_s: float


class MciaController:
    """Re-solves and applies an MCIA plan while it serves (module docstring).

    ``cluster``: the nominal cluster (the tables' and the first plan's); ``current()``: the tasks' cost
    tables for ``cluster`` and their current choices; ``apply(solution, cluster)``: deploys a solution
    solved for ``cluster`` (returns a report or None); ``stats()``: every task's workers' counters."""

    def __init__(self, cluster: Cluster, levels: int, current: Callable[[], tuple[list[TaskTable], list[Choice]]],
                 apply: Callable[[Solution, Cluster], object], stats: Callable[[], Stats],
                 config: MciaControllerConfig | None = None, event_log: str | Path | None = None,
                 requests: Callable[[], dict[str, tuple[int, float]]] | None = None):
        self.cfg = config or MciaControllerConfig()
        self.nominal = cluster
        self.tiers = Tiers.from_cluster(cluster)
        self.levels = levels
        self.current = current
        self.apply_fn = apply
        self.stats_fn = stats
        self.requests_fn = requests
        self._req_prev: dict[str, tuple[int, float]] = {}
        self._excess: dict[str, tuple[Choice, list[float]]] = {}   # task -> (its choice, first network excesses)
        self.event_log = Path(event_log) if event_log else None
        self.state = LiveState(cluster, self.cfg.alpha, proc_load=False)
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.stop_event = threading.Event()
        self._solve_wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._solver: threading.Thread | None = None
        self._prev: dict[tuple[str, str], dict] = {}
        self._settle_until = -math.inf
        self._rounds: collections.deque[LiveView] = collections.deque()
        self._want: tuple | None = None          # (live cluster, tables, signature, why) for the solver
        self._ready: list[_Candidate] = []
        self._cand: _Candidate | None = None
        self._better_since: float | None = None
        self._solved_for = None                  # the signature of the last solve asked
        self._asked_at = -math.inf
        self.applied: list[dict] = []            # the apply events

    @classmethod
    def for_run(cls, run, config: MciaControllerConfig | None = None, event_log=None) -> "MciaController":
        """A controller for an :class:`edgepart.mcia.run.MciaRun` (its testbed's time scale unless set)."""
        cfg = config or MciaControllerConfig()
        if cfg.time_scale == 1.0 and run.bed is not None:
            cfg.time_scale = run.bed.time_scale
        return cls(run.nominal, run.levels,
                   current=lambda: (run.base_tables(), list(run.solution.choices)),
                   apply=lambda sol, cluster: run.update(run.tasks, cluster=cluster, solution=sol),
                   stats=lambda: run.stats(cfg.stats_timeout), config=cfg, event_log=event_log,
                   requests=run.request_stats)

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "MciaController":
        self._event("start", tasks=len(self.current()[0]), replan=self.cfg.replan, min_gain=self.cfg.min_gain,
                    hold_s=self.cfg.hold_s)
        self._thread = threading.Thread(target=self._loop, name="mcia-controller", daemon=True)
        self._thread.start()
        if self.cfg.replan:
            self._solver = threading.Thread(target=self._solve_loop, name="mcia-solver", daemon=True)
            self._solver.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self._solve_wake.set()
        for t in (self._thread, self._solver):
            if t is not None:
                t.join(self.cfg.join_timeout)
                if t.is_alive():
                    log.warning("%s did not stop within %.0f s", t.name, self.cfg.join_timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _event(self, kind: str, **info) -> dict:
        e = {"t": round(time.monotonic() - self.t0, 3), "event": kind, **info}
        with self.lock:
            self.events.append(e)
        log.info("%s %s", kind, json.dumps({k: v for k, v in e.items() if k != "event"}, default=str))
        if self.event_log is not None:
            with open(self.event_log, "a") as f:
                f.write(json.dumps(e, default=str) + "\n")
        return e

    def _loop(self) -> None:
        while not self.stop_event.wait(self.cfg.interval):
            try:
                self.step()
            except Exception:  # noqa: BLE001 — the controller must outlive any one bad round
                log.exception("MCIA controller round failed")

    def _solve_loop(self) -> None:
        while not self.stop_event.is_set():
            self._solve_wake.wait(0.5)
            self._solve_wake.clear()
            want, self._want = self._want, None
            if want is not None:
                self._solve(*want)

    # --- one round -----------------------------------------------------------------------------------
    def step(self, now: float | None = None) -> LiveView:
        """One round: read the workers' counters, update the live state, decide. Without the threads
        (:meth:`start` not called) a re-solve runs here, at once (tests drive it with their own ``now``)."""
        now = time.monotonic() if now is None else now
        tables, choices = self.current()
        self.ingest(self.stats_fn(), tables, choices, now, self.requests_fn() if self.requests_fn else None)
        return self.decide(tables, choices, now)

    def ingest(self, stats: Stats, tables: list[TaskTable], choices: list[Choice], now: float,
               requests: dict[str, tuple[int, float]] | None = None) -> None:
        """The workers' counters into the live state: per device one stage-time ratio (all its tasks'
        measured ÷ predicted compute), per link the rates its tasks' pieces showed; with ``requests``
        (per task: requests answered, their total wall seconds, cumulative) each task's uplink from the
        part of its requests' latency its compute does not explain (:meth:`_uplink_from_latency`)."""
        ts = self.cfg.time_scale
        meas: dict[str, float] = collections.defaultdict(float)
        pred: dict[str, float] = collections.defaultdict(float)
        settled = now >= self._settle_until
        by_name = {tb.task.name: (tb, c) for tb, c in zip(tables, choices)}
        for task, devices in stats.items():
            if task not in by_name:
                continue
            tb, c = by_name[task]
            o = evaluate(tb, self.tiers, c, self.levels)        # the nominal cluster: no load
            share = c.up_share / self.levels if c.up_share else None
            per_req = {tb.task.source: o.end_s, self.tiers.edge.name: o.edge_s}
            if self.tiers.cloud is not None:
                per_req[self.tiers.cloud.name] = o.cloud_s
            comp, timed = 0.0, set()               # measured compute per request (cluster s), devices timed
            for d, st in devices.items():
                prev = self._prev.get((task, d))
                self._prev[(task, d)] = st
                if prev is None or st.get("t_us", 0) < prev.get("t_us", 0):     # new workers: start over
                    continue
                self._links(tb.task.source, d, st, prev, share, now, uplinks=requests is None)
                if not settled or per_req.get(d, 0.0) <= 0:
                    continue
                stages = [k[len("stage_runs:"):] for k in st if k.startswith("stage_runs:")]
                for s in stages:
                    runs = st.get(f"stage_runs:{s}", 0) - prev.get(f"stage_runs:{s}", 0)
                    us = st.get(f"stage_us:{s}", 0) - prev.get(f"stage_us:{s}", 0)
                    if runs > 0 and us > 0:
                        meas[d] += us / 1e6 * ts
                        pred[d] += runs * per_req[d] / len(stages)
                        comp += us / 1e6 * ts / runs
                        timed.add(d)
            if requests is not None and task in requests:
                n, secs = requests[task]
                n0, secs0 = self._req_prev.get(task, (n, secs))
                self._req_prev[task] = (n, secs)
                used = {d for d, p in per_req.items() if p > 0}
                if settled and n > n0 and share and used <= timed:
                    self._uplink_from_latency(tb, c, (secs - secs0) / (n - n0) * ts - comp, now)
        for d, p in pred.items():
            if p > 0 and d in self.state.devices:
                self.state.stage_ratio(d, meas[d] / p, now)

    def _uplink_from_latency(self, tb: TaskTable, c: Choice, network_s: float, now: float) -> None:
        """One task's uplink from the time its requests spent outside compute this round (``network_s``,
        cluster s): the network part the model predicts under the live state plus the task's own fixed
        excess (runtime overheads: the median of its first :data:`BASE_SAMPLES` rounds on this choice,
        learnt against the live state of then) is what the uplink should take; what is left over
        beyond :data:`NOISE_S` (or ``NOISE_SHARE`` of the request) is the uplink's transfer taking
        longer: bandwidth = its bytes ÷ (share × time). Pieces under 32 KB are never timed by the
        workers (protocol.RX_SPAN_MIN), and an MCIA task's input often is one: this sees them."""
        live = self.state.cluster(bake_load=True, calibrated=False)
        tiers = Tiers.from_cluster(live)
        o = evaluate(tb, tiers, c, self.levels)
        excess = network_s - (o.up_s + o.wan_s)
        base = self._excess.get(tb.task.name)
        if base is None or base[0] != c:
            base = self._excess[tb.task.name] = (c, [])
        if len(base[1]) < BASE_SAMPLES:
            base[1].append(excess)
            return
        extra = excess - sorted(base[1])[len(base[1]) // 2]
        end, edge = tb.task.source, self.tiers.edge.name
        v = tb.versions[c.version]
        bits = (v.cut_bytes[c.k1] + v.cut_bytes[-1]) * 8
        share = c.up_share / self.levels
        link = tiers.uplinks[end]
        transfer = bits / (link.bandwidth_mbps * 1e6 * share) + extra      # what this round's uplink took
        nominal = self.nominal.link(end, edge)["bandwidth_mbps"]
        if abs(extra) < max(NOISE_S, NOISE_SHARE * o.latency_s):
            return                                      # as the live state has it
        transfer = max(transfer, bits / (nominal * 1e6 * share))     # faster than the cluster file says: a burst
        self.state.link(end, edge, bandwidth_mbps=bits / (transfer * share) / 1e6, now=now)

    def _links(self, end: str, d: str, st: dict, prev: dict, share: float | None, now: float,
               uplinks: bool = True) -> None:
        """The links one task's worker on ``d`` saw since the last round (cluster Mbit/s); ``uplinks``: the
        uplinks too (else they come from the requests' latency)."""
        ts = self.cfg.time_scale
        seen = [(r.peer, r.value / ts) for r in link_readings(st, prev) if r.kind in ("rx", "tx")]
        edge = self.tiers.edge.name
        cloud = self.tiers.cloud.name if self.tiers.cloud else None
        for peer, mbps in seen:
            pair = {d, peer}
            if pair == {end, edge} and share and uplinks:
                self.state.link(end, edge, bandwidth_mbps=mbps / share, now=now)
            elif cloud is not None and pair == {edge, cloud}:
                self.state.link(edge, cloud, bandwidth_mbps=mbps, now=now)
            elif cloud is not None and pair == {end, cloud} and share and uplinks:
                # uplink then WAN: the slower of the task's uplink class and the WAN; the uplink if below the WAN
                if mbps < 0.8 * self.state.link_values(edge, cloud)["bandwidth_mbps"]:
                    self.state.link(end, edge, bandwidth_mbps=mbps / share, now=now)

    # --- the live view and the decision ----------------------------------------------------------------
    def live(self, tables: list[TaskTable], choices: list[Choice], now: float) -> LiveView:
        """The live cluster (speeds × (1 − load), measured links), the tables rescaled to it, and the current
        choices' objective and broken constraints under it."""
        cluster = self.state.cluster(bake_load=True, calibrated=False)
        tiers = Tiers.from_cluster(cluster)
        live_tables = [self._rescale(tb, cluster) for tb in tables]
        obj = sum(evaluate(tb, tiers, c, self.levels).objective for tb, c in zip(live_tables, choices))
        return LiveView(now, cluster, tiers, live_tables, obj, violations(live_tables, tiers, choices, self.levels))

    def _rescale(self, tb: TaskTable, cluster: Cluster) -> TaskTable:
        f = {d: self.nominal.device(d).speed / cluster.device(d).speed for d in self.nominal.names}
        return rescale(tb, f[tb.task.source], f[self.tiers.edge.name],
                       f[self.tiers.cloud.name] if self.tiers.cloud else 1.0)

    def _signature(self, view: LiveView) -> tuple:
        loads = self.state.loads()
        links = {k: self.state.link_values(*sorted(k))["bandwidth_mbps"] for k in self.state.links}
        return loads, links

    def _moved(self, sig, old) -> bool:
        if old is None:
            return True
        if any(abs(sig[0][d] - old[0].get(d, 0.0)) >= self.cfg.load_step for d in sig[0]):
            return True
        for k, v in sig[1].items():
            was = old[1].get(k, self.nominal.link(*sorted(k))["bandwidth_mbps"])
            if max(v / was, was / v) >= 1 + self.cfg.bandwidth_step:
                return True
        return False

    def gain(self, sol: Solution, choices: list[Choice], view: LiveView) -> float:
        """How much better ``sol`` is than ``choices`` under ``view``, in units of Σ(w_acc + w_lat) of the tasks
        whose choice it changes (a re-plan that moves one task of fifty is judged by that task's scale,
        not drowned in the others')."""
        obj = sum(evaluate(tb, view.tiers, c, self.levels).objective for tb, c in zip(view.tables, sol.choices))
        scale = sum(tb.task.w_acc + tb.task.w_lat for tb, a, b in zip(view.tables, choices, sol.choices) if a != b)
        return (obj - view.objective) / (scale or 1.0)

    def decide(self, tables: list[TaskTable], choices: list[Choice], now: float) -> LiveView:
        view = self.live(tables, choices, now)
        self._rounds.append(view)
        while self._rounds and now - self._rounds[0].t > self.cfg.hold_s + 2 * self.cfg.interval + 1.0:
            self._rounds.popleft()
        if not self.cfg.replan:
            return view
        sig = self._signature(view)
        moved = self._moved(sig, self._solved_for)
        if moved or now - self._asked_at > self.cfg.recheck_s:
            self._solved_for, self._asked_at = sig, now
            want = (view.cluster, view.tables, "state moved" if moved else "periodic", now)
            if self._solver is None:
                self._solve(*want)
            else:
                self._want = want
                self._solve_wake.set()
        with self.lock:
            ready, self._ready = self._ready, []
        for cand in ready:
            self._offer(cand, choices, view)
        cand = self._cand
        if cand is None:
            return view
        if len(cand.solution.choices) != len(choices) or cand.solution.choices == list(choices):
            if self._better_since is not None:
                self._event("dropped", reason="re-solved for the live state: the current plan is best again",
                            state=self.state.snapshot())
            self._better_since = None
            return view
        g = self.gain(cand.solution, choices, view)
        if g < self.cfg.min_gain:
            if self._better_since is not None:
                self._event("dropped", reason=f"predicted gain {g:.3f} < min_gain {self.cfg.min_gain} after "
                            f"{now - self._better_since:.1f} s of hold", gain=round(g, 4), state=self.state.snapshot())
            self._better_since = None
            return view
        if self._better_since is None:
            self._better_since = now
            self._event("candidate", gain=round(g, 4), objective=round(view.objective, 4),
                        changes=self._changes(choices, cand.solution.choices, tables), state=self.state.snapshot())
        if now - self._better_since >= self.cfg.hold_s:
            self._apply(cand, choices, tables, view, g, now)
        return view

    def _offer(self, cand: _Candidate, choices: list[Choice], view: LiveView) -> None:
        """A solved candidate replaces the one held; its hold counts from the earliest of the kept rounds since
        which it beat the current plan by ``min_gain`` in every one (the hold runs while it solves)."""
        old = self._cand
        if old is not None and old.solution.choices == cand.solution.choices:
            return
        self._cand = cand
        since = None
        for v in reversed(self._rounds):
            if self.gain(cand.solution, choices, v) < self.cfg.min_gain:
                break
            since = v.t
        if since is None and self._better_since is not None:
            self._event("dropped", reason=f"re-solved ({cand.why}): the held plan is no longer ahead after "
                        f"{view.t - self._better_since:.1f} s of hold", state=self.state.snapshot())
        self._better_since = since
        if since is not None:
            self._event("candidate", gain=round(self.gain(cand.solution, choices, view), 4),
                        objective=round(view.objective, 4), held_since_s=round(view.t - since, 2), why=cand.why,
                        changes=self._changes(choices, cand.solution.choices, view.tables),
                        state=self.state.snapshot())

    def _solve(self, cluster: Cluster, tables: list[TaskTable], why: str, asked: float) -> None:
        t0 = time.perf_counter()
        tiers = Tiers.from_cluster(cluster)
        try:
            sol = solve_plan(tables, tiers, self.levels, self.cfg.strategy, time_limit=self.cfg.time_limit)
            if sol.violations:
                raise EdgepartError(f"the {self.cfg.strategy} plan breaks constraints: {'; '.join(sol.violations)}")
        except EdgepartError as e:
            self._event("solve_failed", why=why, reason=str(e)[:300])
            return
        dt = time.perf_counter() - t0
        self._event("solved", why=why, objective=round(sol.objective, 4), solve_s=round(dt, 3), gap=sol.gap,
                    links={"-".join(sorted(k)): round(self.state.link_values(*sorted(k))["bandwidth_mbps"], 3)
                           for k in self.state.links},
                    loads={d: round(v, 3) for d, v in self.state.loads().items() if v})
        with self.lock:
            self._ready.append(_Candidate(sol, cluster, why, dt))

    def _changes(self, old: list[Choice], new: list[Choice], tables: list[TaskTable]) -> dict:
        out = {}
        for tb, a, b in zip(tables, old, new):
            if a != b:
                va, vb = tb.versions[a.version], tb.versions[b.version]
                out[tb.task.name] = f"{_describe(va, a)} -> {_describe(vb, b)}"
        return out

    def _apply(self, cand: _Candidate, choices: list[Choice], tables: list[TaskTable], view: LiveView, g: float,
               now: float) -> None:
        changes = self._changes(choices, cand.solution.choices, tables)
        t0 = time.perf_counter()
        try:
            report = self.apply_fn(cand.solution, cand.cluster)
        except EdgepartError as e:
            self._event("apply_failed", reason=str(e)[:300], changes=changes)
            self._better_since = None
            return
        new_obj = sum(evaluate(tb, view.tiers, c, self.levels).objective
                      for tb, c in zip(view.tables, cand.solution.choices))
        info = {}
        for k in ("redeployed", "reshared", "unchanged"):
            if hasattr(report, k):
                info[k] = getattr(report, k)
        e = self._event("apply", reason=f"predicted objective {new_obj:.4f} vs {view.objective:.4f} under the live "
                        f"state (gain {g:.3f} of the changed tasks' Σ weights ≥ {self.cfg.min_gain}) for "
                        f"{now - self._better_since:.1f} s", gain=round(g, 4), objective_before=round(view.objective, 4),
                        objective_after=round(new_obj, 4), violations_before=view.violations, changes=changes,
                        apply_s=round(time.perf_counter() - t0, 2), state=self.state.snapshot(), **info)
        self.applied.append(e)
        self._cand, self._better_since = None, None
        self._rounds.clear()
        self._prev.clear()
        self._settle_until = now + self.cfg.settle_s


def _describe(v, c: Choice) -> str:
    up, edge, cloud = uses(v, c.k1, c.k2)
    where = "/".join(w for w, u in (("end", c.k1 > 0), ("edge", edge), ("cloud", cloud)) if u)
    return f"{v.name} {where} cuts {c.k1},{c.k2} shares {c.edge_share},{c.up_share}"
