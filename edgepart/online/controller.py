"""The online controller: watch the cluster while serving, re-plan when it pays, swap plans, fail over.

A background thread (never on a request's path) runs every ``interval`` seconds:

1. **monitor** — asks every worker for its counters (``stats``: per-stage compute times, CPU
   load) and, every ``probe_every`` seconds, has one pair of workers measure their link with a
   light probe (``edgepart.fcpm.probe``: a few pings and at most ~1 MB); updates the
   :class:`~edgepart.online.state.LiveState`;
2. **predict** — the current plan's latency under the live state: its schedule on the live
   cluster, simulated (``compiler.cost.simulator.simulate``) with the FCPM cost model given each
   device's load (``CostModel(loads=...)``);
3. **re-plan** — when the live state moved (devices up/down, a load or a link bandwidth changed
   noticeably) or every ``recheck_s``, compiles a candidate (``edgepart.compile``, strategy
   ``ofpm``, on the devices that answer, their speeds × (1 − load), the live links) and predicts
   it the same way. **Hysteresis**: it swaps only when the candidate is predicted at least
   ``min_gain`` faster than the current plan continuously for ``hold_s`` seconds;
4. **swap** — saves the candidate, deploys it (workers receive only the files they do not hold
   with the same sha256) and switches the session at a request boundary
   (:meth:`Session.switch`: in-flight requests finish on their plan);
5. **failover** — when a device of the current plan stops answering (the session's heartbeat:
   ``dead_after``) it re-plans at once without it (no hysteresis) and switches; the requests that
   were in flight on it were parked by the session and are sent again on the new plan. A device
   that answers again rejoins through the ordinary re-plan (hysteresis applies).

With ``replan=False`` (a static plan) it only monitors, and redeploys the same plan to a
device that comes back.

Every event (``replan``, ``swap``, ``failover``, ``device_down``, ``device_up``, ``rejoin``) is logged
(logger ``edgepart.online``) with its reason and predicted gain and kept in :attr:`Controller.events`.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgepart.cluster import Cluster
from edgepart.compiler.bundle import compile_plan
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.cost.simulator import simulate
from edgepart.compiler.planning.plan import Plan
from edgepart.compiler.planning.registry import make_plan
from edgepart.compiler.schedule import build_schedule
from edgepart.passes.trace import trace
from edgepart.errors import EdgepartError
from edgepart.fcpm.probe import probe
from edgepart.online.state import LiveState
from edgepart.passes import analyse
from edgepart.runtime.client import PlanVersion, Session

log = logging.getLogger("edgepart.online")

IDLE_EVERY = 4
SLOW_MBPS, SLOW_PROBE_S = 100.0, 10.0   # links slower than this (cluster Mbit/s) are probed at most this often
# failover plans: strategies that plan in milliseconds (the baselines and the MILP take seconds)
QUICK = ("single", "even", "proportional", "modnn")
LIGHT_PROBE = {"pings": 3, "messages": 1, "small_bytes": 64, "piece_bytes": 64 << 10, "max_bytes": 1 << 20,
               "seconds": 0.05, "repeats": 1}


@dataclass
class ControllerConfig:
    """Knobs of the controller (defaults documented in docs/online.md)."""

    replan: bool = True           # False: a static plan (monitor; redeploy it to a device that comes back)
    strategy: str = "ofpm"        # planner for re-plans
    min_gain: float = 0.10        # X: swap when a candidate is predicted at least this much faster ...
    hold_s: float = 2.0           # T: ... continuously for this long
    interval: float = 0.5         # s between monitor rounds
    recheck_s: float = 15.0       # compile a candidate at least this often, even if nothing moved
    probe_every: float = 0.5      # s between light link probes (0: never)
    alpha: float = 0.4            # EWMA weight of a new sample
    load_step: float = 0.1        # a load change this large makes a new candidate
    bandwidth_step: float = 0.25  # a bandwidth change this large (relative) makes a new candidate
    proc_load: bool = True        # idle devices: follow the worker's /proc/stat load
    suspect_s: float = 10.0       # a device another worker reports down is left out this long
    min_compile_gap: float = 2.0  # s between the starts of two candidate compiles
    standby: bool = True          # prepare (compile and deploy) a failover plan per device in the background
    quick_first: bool = True      # on a state change, a quick candidate (no MILP) before the strategy's
    time_scale: float = 1.0       # cluster time = wall time × time_scale (LocalCluster(emulate=True))


class Controller:
    """Re-plans and swaps the plans of ``session`` (a resubmit-mode Session) for ``model``."""

    def __init__(self, model: torch.nn.Module, example_inputs, cluster: Cluster, config: ControllerConfig | None = None,
                 workdir: str | Path | None = None, event_log: str | Path | None = None):
        self.model = model
        self.example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.cfg = config or ControllerConfig()
        self.nominal = cluster
        self.state = LiveState(cluster, self.cfg.alpha, self.cfg.proc_load)
        self.gm = analyse(trace(model, self.example_inputs), cluster)
        self.gm_bg = analyse(trace(model, self.example_inputs), cluster)    # the background compiler's own
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.profiles = CostModel(cluster).profiles          # loaded once
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgepart-online-"))
        self.event_log = Path(event_log) if event_log else None
        self.session: Session | None = None
        self.events: list[dict] = []
        self.inbox: queue.Queue = queue.Queue()
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.t0 = time.monotonic()
        self._prev_stats: dict[str, dict] = {}
        self._stage_pred: dict[tuple[str, int], float] = {}
        self._cand: tuple[Plan, Any, float] | None = None    # (plan, bundle, when compiled)
        self._cand_sig = None
        self._better_since: float | None = None
        self._next_probe = 0.0
        self._probe_i = 0
        self._suspect: dict[str, float] = {}
        self.predicted: float | None = None      # the current plan's predicted latency (cluster s)
        self.history: list[tuple[float, float]] = []   # (t, predicted latency of the current plan) per round
        self._bg_wake = threading.Event()
        self._want_candidate = None            # (usable, signature, why) for the background compiler
        self._cand_ready = None                # what it compiled: ((plan, bundle, when, s), signature, why)
        self._compiling = False
        self._last_compile = -math.inf
        self._want_standby = True
        self._standby: dict[str, tuple[PlanVersion, Plan]] = {}
        self._bg: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        self.session = session
        self._stage_pred = self._stage_times(session.plan)
        self.predicted = self.predict(self._plan_of(session.plan))
        self._event("start", plan=session.plan.version, devices=session.plan.devices,
                    predicted_ms=_ms(self.predicted))
        self.thread = threading.Thread(target=self._loop, name="online-controller", daemon=True)
        self.thread.start()
        if self.cfg.replan:
            self._bg = threading.Thread(target=self._bg_loop, name="online-compiler", daemon=True)
            self._bg.start()
            self._bg_wake.set()

    def on_event(self, kind: str, info: dict) -> None:
        """The session's events (from its threads): handled in the controller's thread."""
        self.inbox.put((kind, dict(info)))
        self.wake.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self._bg_wake.set()
        for t in (self.thread, self._bg):
            if t is not None:
                t.join(10)

    def _event(self, kind: str, **info) -> dict:
        e = {"t": round(time.monotonic() - self.t0, 3), "event": kind, **info}
        with self.lock:
            self.events.append(e)
        log.info("%s %s", kind, json.dumps({k: v for k, v in e.items() if k not in ("event",)}, default=str))
        if self.event_log is not None:
            with open(self.event_log, "a") as f:
                f.write(json.dumps(e, default=str) + "\n")
        return e

    # --- prediction ----------------------------------------------------------------------------
    @staticmethod
    def _plan_of(pv: PlanVersion) -> Plan:
        return Plan.from_dict(pv.manifest.plan)

    def predict(self, plan: Plan, loads: dict[str, float] | None = None, gm=None) -> float:
        """Predicted latency (cluster s) of ``plan`` under the live state; inf if it uses a device that is down."""
        alive = set(self._usable())
        used = set(_plan_devices(plan))
        if not used <= alive:
            return math.inf
        # The load estimated from stage times is a slowdown (stages run 1 / (1 - load) times as long), so
        # it is applied as speed x (1 - load), exactly as the planner sees it; the FCPM's own load input
        # (``loads``: contention as /proc/stat measures it, with the slowdown the profile fitted for it)
        # is for loads measured that way.
        cluster = self.state.cluster(bake_load=True)
        cost = CostModel(cluster, self.profiles, loads=loads or {})
        gm = gm if gm is not None else self.gm
        try:
            return simulate(build_schedule(gm, plan, cluster), cluster, cost, gm=gm).latency
        except EdgepartError as e:
            log.warning("cannot predict plan: %s", e)
            return math.inf

    def _stage_times(self, pv: PlanVersion) -> dict[tuple[str, int], float]:
        """(device, stage) -> predicted compute time (cluster s) at no load, for the stage-time ratio."""
        cluster = self.state.cluster(calibrated=False)
        cost = CostModel(cluster, self.profiles, loads={})
        try:
            res = simulate(build_schedule(self.gm, self._plan_of(pv), cluster), cluster, cost, gm=self.gm)
        except EdgepartError:
            return {}
        out: dict[tuple[str, int], float] = {}
        for r in res.runs:
            out[(r.device, r.stage)] = out.get((r.device, r.stage), 0.0) + (r.end - r.start)
        return out

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self.wake.wait(self.cfg.interval)
            self.wake.clear()
            if self.stop_event.is_set():
                return
            try:
                self._round()
            except Exception:  # noqa: BLE001 — the controller must outlive any one bad round
                log.exception("controller round failed")
                time.sleep(self.cfg.interval)

    def _round(self) -> None:
        s = self.session
        while True:
            try:
                kind, info = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._on_session_event(kind, info)
        now = time.monotonic()
        for d, until in list(self._suspect.items()):
            if now > until and s.links[d].alive:
                del self._suspect[d]
        self._monitor(now)
        if self.cfg.probe_every > 0 and now >= self._next_probe:
            self._probe_one()
            self._next_probe = time.monotonic() + self.cfg.probe_every
        self._decide(time.monotonic())

    def _on_session_event(self, kind: str, info: dict) -> None:
        d = info.get("device")
        if d not in self.state.devices:
            return
        if kind == "device_down":
            self.state.set_alive(d, False)
            self._event("device_down", device=d, reason=info.get("reason"), parked=info.get("parked"))
        elif kind == "device_up":
            self.state.set_alive(d, True)
            self._suspect.pop(d, None)
            self._event("device_up", device=d)
        elif kind == "peer_down" and self.session.links[d].alive and d not in self._suspect:
            self._suspect[d] = time.monotonic() + self.cfg.suspect_s
            self._event("device_suspect", device=d, reason=info.get("reason"))

    def _usable(self) -> list[str]:
        return [d for d in self.state.alive() if d not in self._suspect and self.session.links[d].alive]

    def _monitor(self, now: float) -> None:
        stats = self.session.stats(timeout=2.0)
        ts = self.cfg.time_scale
        for d, st in stats.items():
            if d not in self.state.devices:
                continue
            if "cpu_load" in st:
                self.state.cpu_load(d, float(st["cpu_load"]), now)
            prev = self._prev_stats.get(d)
            self._prev_stats[d] = st
            if prev is None:
                continue
            meas = pred = 0.0
            for (dev, stage), p in self._stage_pred.items():
                if dev != d:
                    continue
                runs = st.get(f"stage_runs:{stage}", 0) - prev.get(f"stage_runs:{stage}", 0)
                us = st.get(f"stage_us:{stage}", 0) - prev.get(f"stage_us:{stage}", 0)
                if runs > 0 and us > 0:
                    meas += us / 1e6 * ts
                    pred += runs * p
            if pred > 0:
                self.state.stage_ratio(d, meas / pred, now)

    def _probe_one(self) -> None:
        """Probe one link: the links the current plan moves pieces on in turn, an idle one every
        ``IDLE_EVERY``-th probe (so a link a re-plan might use is known too)."""
        alive = self._usable()
        used = sorted({tuple(sorted((t.src, t.dst))) for t in self.session.plan.manifest.transfers
                       if t.src != t.dst and t.src in alive and t.dst in alive})
        idle = [(a, b) for i, a in enumerate(alive) for b in alive[i + 1:] if (a, b) not in used]
        self._probe_i += 1
        now = time.monotonic()

        def due(pair):        # a probe moves >= 1.25 MB (fcpm.probe's bounds): a slow link is probed seldom
            ls = self.state.links.get(frozenset(pair))
            if ls is None or ls.bandwidth_mbps.value is None:
                return True
            return now - ls.probed >= (SLOW_PROBE_S if ls.bandwidth_mbps.value < SLOW_MBPS else 0.0)
        used = [p for p in used if due(p)]
        idle = [p for p in idle if due(p)]
        if idle and (not used or self._probe_i % IDLE_EVERY == 0):
            pairs, k = idle, self._probe_i // IDLE_EVERY
        else:
            pairs, k = used, self._probe_i
        if not pairs:
            return
        a, b = pairs[k % len(pairs)]
        s = self.session
        try:
            r = probe({a: s.endpoints[a], b: s.endpoints[b]}, s.key, s.peer_endpoints, pairs=[(a, b)],
                      options=LIGHT_PROBE, idle_timeout=5.0)[0]
        except Exception as e:  # noqa: BLE001 — a failed probe leaves the link's state as it was
            log.info("link probe %s-%s failed: %s: %s", a, b, type(e).__name__, e)
            return
        ts = self.cfg.time_scale
        self.state.link(a, b, r["bandwidth_mbps"] / ts, r["rtt_ms"] / 2 * ts)
        log.info("link %s-%s probed: %.1f Mbit/s, rtt %.2f ms (cluster units)", a, b, r["bandwidth_mbps"] / ts,
                 r["rtt_ms"] * ts)

    def _signature(self) -> tuple:
        loads = self.state.loads()
        step = self.cfg.load_step
        links = []
        for k in sorted(self.state.links, key=sorted):
            v = self.state.link_values(*sorted(k))["bandwidth_mbps"]
            links.append((tuple(sorted(k)), round(math.log(v) / math.log(1 + self.cfg.bandwidth_step))))
        return (tuple(self._usable()), tuple(round(loads[d] / step) for d in sorted(loads)), tuple(links))

    def _decide(self, now: float) -> None:
        s = self.session
        cur = s.plan
        usable = self._usable()
        cur_pred = self.predict(self._plan_of(cur))
        self.predicted = cur_pred
        self.history.append((round(now - self.t0, 3), cur_pred))
        broken = not set(cur.devices) <= set(usable)
        if not self.cfg.replan:
            if not s.servable(cur) and set(cur.devices) <= set(usable):
                self._swap(cur, None, "rejoin", f"redeploy {cur.describe()} to devices that came back", cur_pred, cur_pred)
            return
        if s.plan.source not in usable:
            return                                    # nothing can serve without the source: wait for it
        sig = self._signature()
        holding = self._better_since is not None and sig[0] == self._cand_sig[0]   # same devices: keep the candidate
        if broken:
            self._failover(cur, usable, cur_pred)
            return
        ready, self._cand_ready = self._cand_ready, None
        if ready is not None:                  # a candidate the background thread compiled
            self._cand, self._cand_sig, why = ready
            self._event("evaluated", why=why, current_ms=_ms(cur_pred), candidate_ms=_ms(self.predict(self._cand[0])),
                        same=_same_plan(self._cand[0], cur.manifest.plan), devices=_plan_devices(self._cand[0]),
                        compile_s=round(self._cand[3], 2), state=self.state.snapshot())
        if self._cand is None or (sig != self._cand_sig and not holding) or now - self._cand[2] > self.cfg.recheck_s:
            why = "first" if self._cand is None else ("state moved" if sig != self._cand_sig else "periodic")
            self._request_candidate(usable, sig, why, now)
        if self._cand is None or not set(_plan_devices(self._cand[0])) <= set(usable):
            return
        plan, bundle = self._cand[:2]
        cand_pred = self.predict(plan)
        if not s.servable(cur):           # e.g. a device of the plan restarted: redeploy the plan it needs
            self._swap(cur, None, "rejoin", f"{cur.describe()} is not deployed on every device", cur_pred, cur_pred)
            return
        if _same_plan(plan, cur.manifest.plan):
            self._better_since = None
            return
        gain = 1 - cand_pred / cur_pred if cur_pred > 0 else 0.0
        if gain >= self.cfg.min_gain:
            if self._better_since is None:
                self._better_since = now
                self._event("candidate", gain=round(gain, 3), predicted_ms=_ms(cand_pred), current_ms=_ms(cur_pred),
                            devices=_plan_devices(plan), state=self.state.snapshot())
            if now - self._better_since >= self.cfg.hold_s:
                self._swap(None, bundle, "replan", f"predicted {gain:.0%} faster for {now - self._better_since:.1f} s "
                                                   f"(live state {json.dumps(self.state.snapshot())})",
                           cur_pred, cand_pred)
        else:
            self._better_since = None

    # --- failover and the background compiler ----------------------------------------------------
    def _failover(self, cur: PlanVersion, usable: list[str], cur_pred: float) -> None:
        """Switch away from a plan that lost a device: to the standby plan prepared for that device if there
        is one (compiled and deployed in the background), else to the best quick plan compiled now (no
        MILP: a compile of seconds would be seconds without answers). The ordinary re-plan (ofpm,
        hysteresis) improves on it afterwards."""
        down = sorted(set(cur.devices) - set(usable))
        reason = f"device(s) {down} of {cur.describe()} down"
        standby = self._standby.get(down[0]) if len(down) == 1 else None
        if standby is not None and set(standby[0].devices) <= set(usable):
            self._swap(standby[0], None, "failover", reason + " (standby plan)", cur_pred, self.predict(standby[1]))
        else:
            quick = self._compile(usable, quick=True)
            if quick is None:
                return
            self._swap(None, quick[1], "failover", reason, cur_pred, self.predict(quick[0]))
        self._cand = None

    def _request_candidate(self, usable: list[str], sig, why: str, now: float) -> None:
        if self._want_candidate is None and not self._compiling and now - self._last_compile >= self.cfg.min_compile_gap:
            self._want_candidate = (list(usable), sig, why)
            self._last_compile = now
            self._bg_wake.set()

    def _bg_loop(self) -> None:
        """The background compiler: candidates (ofpm) first, then standby plans (one per device of the
        current plan but the source: the best quick plan without it, compiled, saved and deployed, so
        a failover is a switch)."""
        while not self.stop_event.is_set():
            self._bg_wake.wait(0.5)
            self._bg_wake.clear()
            try:
                if self._want_candidate is not None:      # candidates first: standby plans when idle
                    usable, sig, why = self._want_candidate
                    self._compiling = True
                    try:
                        # first the best quick plan (about a second: the state just moved, and the MILP
                        # takes several), then the configured strategy's; each is a candidate in turn
                        if self.cfg.quick_first:
                            quick = self._compile(usable, quick=True, gm=self.gm_bg)
                            if quick is not None:
                                self._cand_ready = (quick, sig, why + ", quick")
                                self.wake.set()
                        res = self._compile(usable, gm=self.gm_bg)
                    finally:
                        self._compiling = False
                        self._want_candidate = None
                    if res is not None:
                        res[1].save(self.workdir / f"cand-{time.monotonic_ns()}")   # a swap then only deploys
                        self._cand_ready = (res, sig, why)
                        self.wake.set()
                elif self._want_standby and self.cfg.standby:
                    self._want_standby = False
                    self._prepare_standby()
            except Exception:  # noqa: BLE001 — the compiler thread must outlive a failed compile
                log.exception("background compile failed")

    def _prepare_standby(self) -> None:
        s = self.session
        pv = s.plan
        for d in pv.devices:
            if d == pv.source or self._want_candidate is not None or self._want_standby or self.stop_event.is_set():
                continue
            usable = [u for u in self._usable() if u != d]
            res = self._compile(usable, quick=True, gm=self.gm_bg)
            if res is None:
                continue
            path = self.workdir / f"standby-{len(self.events)}-{d}"
            res[1].save(path)
            try:
                standby = s.deploy_plan(path)
            except EdgepartError as e:
                log.info("standby plan without %s not deployed: %s", d, e)
                continue
            if s.plan is pv:
                self._standby[d] = (standby, res[0])
        log.info("standby plans ready for %s", sorted(self._standby))

    def _compile(self, usable: list[str], quick: bool = False, gm=None):
        """(plan, bundle, when, compile s) for the devices ``usable`` under the live state: with the configured
        strategy, or ``quick``: the best by prediction of the strategies without a MILP (ofpm's warm starts)."""
        t0 = time.perf_counter()
        gm = gm if gm is not None else self.gm
        cluster = self.state.cluster(usable, bake_load=True)
        name = type(self.model).__name__
        try:
            if quick:
                best = None
                for strategy in QUICK:
                    try:
                        p = make_plan(gm, cluster, strategy)
                    except Exception:  # noqa: BLE001 — a baseline that cannot plan this cluster is skipped
                        continue
                    t = self.predict(p, gm=gm)
                    if best is None or t < best[0]:
                        best = (t, p)
                if best is None:
                    raise EdgepartError("no quick strategy could plan the devices left")
                plan = best[1]
            else:
                plan = make_plan(gm, cluster, self.cfg.strategy)
            bundle = compile_plan(gm, plan, cluster, name)
        except EdgepartError as e:
            self._event("replan_failed", reason=str(e)[:300])
            return None
        return plan, bundle, time.monotonic(), time.perf_counter() - t0

    def _swap(self, pv: PlanVersion | None, bundle, kind: str, reason: str, before: float, after: float) -> None:
        s = self.session
        t0 = time.perf_counter()
        files0 = s.counts["files_shipped"]
        try:
            if pv is None:
                if bundle.dir is None:
                    bundle.save(self.workdir / f"plan-{time.monotonic_ns()}")
                pv = s.deploy_plan(bundle.dir)
            else:
                pv = s.deploy_plan(pv.dir)
        except EdgepartError as e:
            self._event(f"{kind}_failed", reason=str(e)[:300])
            return
        old = s.plan
        s.switch(pv)
        self._stage_pred = self._stage_times(pv)
        self._prev_stats = {}                      # counters of the old plan's stages: start over
        self._better_since = None
        self.predicted = after
        self._standby = {}
        self._want_standby = True               # standby plans for the new plan's devices
        self._bg_wake.set()
        gain = 1 - after / before if before not in (0, math.inf) else None
        self._event(kind, reason=reason, frm=old.version, to=pv.version, devices=pv.devices,
                    predicted_before_ms=_ms(before), predicted_ms=_ms(after),
                    gain=None if gain is None else round(gain, 3), deploy_s=round(time.perf_counter() - t0, 3),
                    files_shipped=s.counts["files_shipped"] - files0)


def _plan_devices(plan: Plan) -> list[str]:
    return plan.devices()


def _same_plan(plan: Plan, other: dict) -> bool:
    return plan.to_dict()["stages"] == other.get("stages")


def _ms(x: float | None):
    return None if x is None or math.isinf(x) else round(x * 1e3, 3)


