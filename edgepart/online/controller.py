"""The online controller: watch the cluster while serving, re-plan when it pays, swap plans, fail over.

A background thread (never on a request's path) runs every ``interval`` seconds (details and the
defaults: docs/online.md):

1. **monitor** — asks every worker for its counters (``stats``): per-stage compute times (the
   devices' loads), and the links as the requests' own pieces show them (how fast each peer's
   pieces arrived, the kernel's round-trip times); a link no piece crossed lately is *idle* and
   gets a light probe now and then (``edgepart.fcpm.probe``). Updates the
   :class:`~edgepart.online.state.LiveState` (EWMAs with a confidence);
2. **predict** — the current plan's latency under the live state: its schedule on the live
   cluster, simulated (``compiler.cost.simulator.simulate``) with the FCPM cost model;
3. **re-plan** — when the live state moved (devices up/down, a load or a link bandwidth changed
   noticeably) or every ``recheck_s``, two background threads compile candidates for the devices
   that answer (their speeds × (1 − load), the live links): a quick one (no MILP, under a second)
   and one of the strategy (``ofpm``, seconds), each predicted the same way. **Hysteresis**: swap
   only when the candidate is predicted at least ``min_gain`` faster than the current plan
   continuously for ``hold_s`` seconds — judged on the live states of the rounds since the change
   too, so the hold runs while the candidate compiles; a candidate that qualifies is deployed
   while it is held;
4. **swap** — deploys it if not done yet (workers receive only the files they do not hold with the
   same sha256) and switches the session at a request boundary (:meth:`Session.switch`:
   in-flight requests finish on their plan);
5. **failover** — when a device of the current plan stops answering (the session's heartbeat:
   ``dead_after``) it switches at once (no hysteresis) to a plan without it (a standby plan
   prepared in the background, or a quick one); the requests that were in flight on it were
   parked by the session and are sent again on the new plan. If it was the source, the new plan
   takes the inputs on another device, and the plan moves back when the source is back. A device
   that answers again rejoins through the ordinary re-plan (hysteresis applies).

With ``replan=False`` (a static plan) it only monitors, and redeploys the same plan to a
device that comes back.

Every event (``replan``, ``swap``, ``stall``, ``failover``, ``device_down``, ``device_up``, ``rejoin``) is logged
(logger ``edgepart.online``) with its reason and predicted gain and kept in :attr:`Controller.events`.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import queue
import shutil
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
from edgepart.online.state import LiveState, link_readings
from edgepart.passes import analyse
from edgepart.runtime.client import PlanVersion, Session

log = logging.getLogger("edgepart.online")

IDLE_S = 3.0                            # a link no timed piece crossed for this long is idle: probed instead
REPROBE_S = 2.0                         # an idle link is probed again at most this often ...
SLOW_MBPS, SLOW_PROBE_S = 100.0, 10.0   # ... and one slower than this (cluster Mbit/s) at most this often
SETTLE_S = 1.0                          # s after a swap before stage times count again (the old plan drains)
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
    probe_every: float = 0.5      # s between light probes of idle links (0: never; busy links: their own pieces)
    alpha: float = 0.4            # EWMA weight of a new sample
    load_step: float = 0.1        # a load change this large makes a new candidate
    bandwidth_step: float = 0.25  # a bandwidth change this large (relative) makes a new candidate
    proc_load: bool = True        # idle devices: follow the worker's /proc/stat load
    suspect_s: float = 10.0       # a device another worker reports down is left out this long
    min_compile_gap: float = 2.0  # s between the starts of two candidate compiles of the strategy (quick ones: interval)
    standby: bool = True          # prepare (compile and deploy) a failover plan per device in the background
    quick_first: bool = True      # on a state change, a quick candidate (no MILP), compiled alongside the strategy's
    predeploy: bool = True        # deploy a candidate predicted min_gain faster while it is held (the swap: a switch)
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
        self.gm_bg = analyse(trace(model, self.example_inputs), cluster)    # the background compilers' own
        self.gm_full = analyse(trace(model, self.example_inputs), cluster)
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
        self._cand: Candidate | None = None
        self._cand_sig = None
        self._better_since: float | None = None
        self._next_probe = 0.0
        self._rounds: collections.deque = collections.deque()   # (t, live cluster, current plan's prediction)
        self._moved_from: tuple | None = None   # the live state (signature) candidates were last requested for
        self._asked_at = -math.inf
        self._settle_until = -math.inf         # stage times are not read before (see _monitor)
        self._stall_logged: int | None = None   # the plan version a ``stall`` event was logged for
        self._suspect: dict[str, float] = {}
        self.predicted: float | None = None      # the current plan's predicted latency (cluster s)
        self.history: list[tuple[float, float]] = []   # (t, predicted latency of the current plan) per round
        self._bg_wake = threading.Event()
        self._full_wake = threading.Event()
        # the background compilers' inboxes, the newest request wins: (usable, signature, why)
        self._want_quick = None
        self._want_candidate = None
        self._want_deploy: Candidate | None = None    # a held candidate to deploy ahead of its swap
        self._ready: queue.Queue = queue.Queue()   # what they compiled: (Candidate, signature, why)
        self._compiling = False
        self._last_compile = -math.inf
        self._want_standby = True
        self._standby: dict[str, tuple[PlanVersion, Plan]] = {}
        self._bg: threading.Thread | None = None
        self._full: threading.Thread | None = None

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
            self._bg = threading.Thread(target=self._bg_loop, name="online-quick", daemon=True)
            self._bg.start()
            self._full = threading.Thread(target=self._full_loop, name="online-compiler", daemon=True)
            self._full.start()
            self._bg_wake.set()

    def on_event(self, kind: str, info: dict) -> None:
        """The session's events (from its threads): handled in the controller's thread."""
        self.inbox.put((kind, dict(info)))
        self.wake.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self._bg_wake.set()
        self._full_wake.set()
        for t in (self.thread, self._bg, self._full):
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

    def predict(self, plan: Plan, loads: dict[str, float] | None = None, gm=None, cluster: Cluster | None = None,
                source: str | None = None) -> float:
        """Predicted latency (cluster s) of ``plan`` under the live state (or ``cluster``: a live state of an
        earlier round) with inputs at ``source`` (default: the live state's); inf if it uses a device that is down."""
        alive = set(self._usable())
        used = set(_plan_devices(plan))
        if not used <= alive:
            return math.inf
        # The load estimated from stage times is a slowdown (stages run 1 / (1 - load) times as long), so
        # it is applied as speed x (1 - load), exactly as the planner sees it; the FCPM's own load input
        # (``loads``: contention as /proc/stat measures it, with the slowdown the profile fitted for it)
        # is for loads measured that way.
        cluster = cluster if cluster is not None else self.state.cluster(bake_load=True)
        if source is not None and source != cluster.source and source in cluster.names:
            cluster = Cluster(cluster.devices, cluster.default_link, cluster.overrides, source, cluster.shared_medium)
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
            self._links_seen(d, st, prev or {}, now)
            # right after a swap the workers' stage counters (keyed by stage number) still count the old
            # plan's requests finishing: their times say nothing of the new plan's stages
            if prev is None or now < self._settle_until:
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

    def _links_seen(self, d: str, st: dict, prev: dict, now: float) -> None:
        """The links as ``d``'s real transfers show them (:func:`~edgepart.online.state.link_readings`:
        its peers' pieces arriving, its own sends acknowledged while a link stayed busy, the kernel's
        round-trip times); wall units × ``time_scale``."""
        ts = self.cfg.time_scale
        for r in link_readings(st, prev):
            if r.peer not in self.state.devices or r.peer == d:
                continue
            if r.kind == "rx":
                self.state.link(r.peer, d, bandwidth_mbps=r.value / ts, now=now)
            elif r.kind == "tx":
                self.state.link(d, r.peer, bandwidth_mbps=r.value / ts, now=now)
            else:
                self.state.link(d, r.peer, latency_ms=r.value * ts, now=now)

    def _probe_one(self) -> None:
        """Probe one idle link lightly (no piece crossed it for ``IDLE_S``: a link a re-plan might use is known
        too), the one probed longest ago; a link is probed again after ``REPROBE_S``, a slow one after
        ``SLOW_PROBE_S`` (a probe moves >= 1.25 MB — fcpm.probe's bounds —, 1.4 s of a 20 Mbit/s link).
        Busy links are measured on their own pieces (:meth:`_links_seen`)."""
        alive = self._usable()
        now = time.monotonic()

        def due(pair):
            ls = self.state.links.get(frozenset(pair))
            if ls is None or ls.bandwidth_mbps.value is None:
                return True
            return now - ls.probed >= (SLOW_PROBE_S if ls.bandwidth_mbps.value < SLOW_MBPS else REPROBE_S)
        pairs = [(a, b) for i, a in enumerate(alive) for b in alive[i + 1:]
                 if self.state.link_idle(a, b, IDLE_S, now) and due((a, b))]
        if not pairs:
            return
        a, b = min(pairs, key=lambda p: getattr(self.state.links.get(frozenset(p)), "probed", -math.inf))
        s = self.session
        try:
            r = probe({a: s.endpoints[a], b: s.endpoints[b]}, s.key, s.peer_endpoints, pairs=[(a, b)],
                      options=LIGHT_PROBE, idle_timeout=5.0)[0]
        except Exception as e:  # noqa: BLE001 — a failed probe leaves the link's state as it was
            log.info("link probe %s-%s failed: %s: %s", a, b, type(e).__name__, e)
            self.state.link(a, b, now=time.monotonic(), probe=True)      # not again at once
            return
        ts = self.cfg.time_scale
        self.state.link(a, b, r["bandwidth_mbps"] / ts, r["rtt_ms"] / 2 * ts, probe=True)
        log.info("idle link %s-%s probed: %.1f Mbit/s, rtt %.2f ms (cluster units)", a, b, r["bandwidth_mbps"] / ts,
                 r["rtt_ms"] * ts)

    def _signature(self) -> tuple:
        """What the candidates were made for: the devices, their loads and the links' bandwidths."""
        links = {k: self.state.link_values(*sorted(k))["bandwidth_mbps"] for k in self.state.links}
        return (tuple(self._usable()), self.state.loads(), links)

    def _moved(self, sig, old) -> bool:
        """The live state moved from ``old`` (a signature) enough for a new candidate: another set of
        devices, a load by ``load_step``, a link's bandwidth by ``bandwidth_step`` (relative). Measured
        from the state the last candidate was made for, so noise around a threshold does not make
        candidates each round."""
        if old is None or sig[0] != old[0]:
            return True
        if any(abs(sig[1][d] - old[1].get(d, 0.0)) >= self.cfg.load_step for d in sig[1]):
            return True
        for k, v in sig[2].items():
            was = old[2].get(k)
            if was is None:
                was = self.nominal.link(*sorted(k))["bandwidth_mbps"]
            if max(v / was, was / v) >= 1 + self.cfg.bandwidth_step:
                return True
        return False

    def _decide(self, now: float) -> None:
        s = self.session
        cur = s.plan
        usable = self._usable()
        live = self.state.cluster(bake_load=True)
        cur_pred = self.predict(self._plan_of(cur), cluster=live, source=cur.source)
        cur_pred = max(cur_pred, self._stalled(cur, cur_pred))
        self.predicted = cur_pred
        self.history.append((round(now - self.t0, 3), cur_pred))
        self._rounds.append((now, live, cur_pred))
        while self._rounds and now - self._rounds[0][0] > self.cfg.hold_s + 2 * self.cfg.interval:
            self._rounds.popleft()
        broken = not set(cur.devices) <= set(usable)
        if not self.cfg.replan:
            if not s.servable(cur) and set(cur.devices) <= set(usable):
                self._swap(cur, None, "rejoin", f"redeploy {cur.describe()} to devices that came back", cur_pred, cur_pred)
            return
        if not usable:
            return
        if broken:
            self._failover(cur, usable, cur_pred)
            return
        sig = self._signature()
        while True:                            # candidates the background threads compiled
            try:
                cand, csig, why = self._ready.get_nowait()
            except queue.Empty:
                break
            self._offer(cand, csig, why, cur, cur_pred, now)
        if self._cand is None or self._moved(sig, self._moved_from) or now - self._asked_at > self.cfg.recheck_s:
            why = "first" if self._cand is None else ("state moved" if self._moved(sig, self._moved_from)
                                                      else "periodic")
            self._request_candidate(usable, sig, why, now)
        if not s.servable(cur):           # e.g. a device of the plan restarted: redeploy the plan it needs
            self._swap(cur, None, "rejoin", f"{cur.describe()} is not deployed on every device", cur_pred, cur_pred)
            return
        cand = self._cand
        if cand is None or not set(_plan_devices(cand.plan)) <= set(usable):
            self._better_since = None
            return
        if _same_plan(cand.plan, cur.manifest.plan) and cand.source == cur.source:
            self._better_since = None
            return
        cand_pred = self.predict(cand.plan, cluster=live, source=cand.source)
        gain = 1 - cand_pred / cur_pred if cur_pred > 0 else 0.0
        home = self._going_home(cur, cand)
        if gain >= self.cfg.min_gain or home:
            if self._better_since is None:
                self._better_since = now
                self._event("candidate", gain=round(gain, 3), predicted_ms=_ms(cand_pred), current_ms=_ms(cur_pred),
                            devices=_plan_devices(cand.plan), source=cand.source, state=self.state.snapshot())
                if cand.pv is None and self.cfg.predeploy:      # deploy it while it is held
                    self._want_deploy = cand
                    self._bg_wake.set()
            if now - self._better_since >= self.cfg.hold_s:
                why = (f"the source {cand.source!r} is back: inputs go there again" if home else
                       f"predicted {gain:.0%} faster for {now - self._better_since:.1f} s")
                self._swap(cand.pv, cand.bundle, "replan", f"{why} (live state {json.dumps(self.state.snapshot())})",
                           cur_pred, cand_pred)
        else:
            self._better_since = None

    def _stalled(self, cur: PlanVersion, predicted: float) -> float:
        """A lower bound (cluster s) on the current plan's latency from its requests in flight: with ``n`` in
        flight, served in order at least one at a time, the oldest (sent ``age`` ago) shows a request takes
        at least ``age / n``. 0 unless that is over twice the prediction (logged once per plan as ``stall``):
        a plan whose answers stopped counts as slow as it is, whatever the live state predicts for it."""
        age, n = self.session.oldest_pending(cur)
        bound = age * self.cfg.time_scale / n if n else 0.0
        if not (bound > 2 * predicted and age > 2 * self.cfg.interval):
            return 0.0
        if self._stall_logged != cur.version:
            self._stall_logged = cur.version
            self._event("stall", plan=cur.version, oldest_s=round(age, 2), in_flight=n, bound_ms=_ms(bound),
                        predicted_ms=_ms(predicted), state=self.state.snapshot())
        return bound

    def _going_home(self, cur: PlanVersion, cand: "Candidate") -> bool:
        """``cur`` sends inputs to a substitute source (the nominal one was down) and ``cand`` to the nominal
        one: swap back whatever the predicted gain (the input arrives there)."""
        home = self.nominal.source
        return cur.source != home and cand.source == home and home in self._usable()

    def _offer(self, cand: "Candidate", sig, why: str, cur: PlanVersion, cur_pred: float, now: float) -> None:
        """A compiled candidate: it replaces the one held if that is gone or predicted no faster now. Its
        hold counts from the earliest of the last rounds since which it would have been ``min_gain``
        faster in every one (the live states of those rounds are kept): the hysteresis runs while it
        compiles, not after."""
        pred = self.predict(cand.plan, source=cand.source)
        old = self._cand
        self._event("evaluated", why=why, current_ms=_ms(cur_pred), candidate_ms=_ms(pred),
                    same=_same_plan(cand.plan, cur.manifest.plan) and cand.source == cur.source,
                    devices=_plan_devices(cand.plan), source=cand.source, compile_s=round(cand.compile_s, 2),
                    state=self.state.snapshot())
        if old is not None and set(_plan_devices(old.plan)) <= set(self._usable()) and \
                self.predict(old.plan, source=old.source) <= pred and not self._going_home(cur, cand):
            return
        if old is not None and old.bundle.dir is not None:
            self._discard(old.bundle.dir, cur)
        self._cand = cand
        self._cand_sig = sig
        since = None
        home = self._going_home(cur, cand)
        for t, cl, p_cur in reversed(self._rounds):
            if home:                           # the source must have been back that long
                if t < self.state.devices[cand.source].up_since:
                    break
            elif not (p_cur > 0 and 1 - self.predict(cand.plan, cluster=cl, source=cand.source) / p_cur
                      >= self.cfg.min_gain):
                break
            since = t
        self._better_since = since
        if since is not None:
            gain = 1 - pred / cur_pred if cur_pred > 0 else 0.0
            self._event("candidate", gain=round(gain, 3), predicted_ms=_ms(pred), current_ms=_ms(cur_pred),
                        devices=_plan_devices(cand.plan), source=cand.source, better_since_s=round(now - since, 2),
                        state=self.state.snapshot())

    # --- failover and the background compilers ----------------------------------------------------
    def _failover(self, cur: PlanVersion, usable: list[str], cur_pred: float) -> None:
        """Switch away from a plan that lost a device: to the standby plan prepared for that device if there
        is one (compiled and deployed in the background), else to the best quick plan compiled now (no
        MILP: a compile of seconds would be seconds without answers). The ordinary re-plan (ofpm,
        hysteresis) improves on it afterwards. A plan that lost its source gets another one (the
        fastest device left): the session sends the inputs there until the source is back."""
        down = sorted(set(cur.devices) - set(usable))
        reason = f"device(s) {down} of {cur.describe()} down"
        if cur.source in down:
            reason += f"; {cur.source!r} was the source: inputs go to another device until it is back"
        standby = self._standby.get(down[0]) if len(down) == 1 else None
        if standby is not None and set(standby[0].devices) <= set(usable):
            self._swap(standby[0], None, "failover", reason + " (standby plan)", cur_pred,
                       self.predict(standby[1], source=standby[0].source))
        else:
            quick = self._compile(usable, quick=True)
            if quick is None:
                return
            self._swap(None, quick.bundle, "failover", reason, cur_pred, self.predict(quick.plan, source=quick.source))
        self._cand = None

    def _request_candidate(self, usable: list[str], sig, why: str, now: float) -> None:
        """Ask the background threads for candidates for the live state: a quick one (unless one is being
        compiled) and, at most every ``min_compile_gap``, one of the strategy."""
        asked = False
        if self.cfg.quick_first and self._want_quick is None:
            self._want_quick = (list(usable), sig, why)
            self._bg_wake.set()
            asked = True
        if self._want_candidate is None and not self._compiling and now - self._last_compile >= self.cfg.min_compile_gap:
            self._want_candidate = (list(usable), sig, why)
            self._last_compile = now
            self._full_wake.set()
            asked = True
        if asked:
            self._moved_from = sig
            self._asked_at = now

    def _deliver(self, cand: "Candidate", sig, why: str, gm) -> None:
        """Hand a compiled candidate to the controller; saved (and, if it is predicted ``min_gain`` faster
        than the current plan now, deployed: the swap is then a switch) first."""
        s = self.session
        cur = s.plan
        if self.cfg.predeploy and not self.stop_event.is_set():
            p_cur = self.predict(self._plan_of(cur), gm=gm, source=cur.source)
            p = self.predict(cand.plan, gm=gm, source=cand.source)
            if (p_cur > 0 and 1 - p / p_cur >= self.cfg.min_gain) or self._going_home(cur, cand):
                cand.bundle.save(self.workdir / f"cand-{time.monotonic_ns()}")
                try:
                    cand.pv = s.deploy_plan(cand.bundle.dir)
                except EdgepartError as e:
                    log.info("candidate not deployed ahead: %s", e)
        self._ready.put((cand, sig, why))
        self.wake.set()

    def _bg_loop(self) -> None:
        """The quick compiler: quick candidates (the failover strategies, about a second) when the state
        moved, and, when idle, standby plans (one per device of the current plan: the best quick plan
        without it, compiled, saved and deployed, so a failover is a switch)."""
        while not self.stop_event.is_set():
            self._bg_wake.wait(0.5)
            self._bg_wake.clear()
            try:
                if self._want_quick is not None:
                    usable, sig, why = self._want_quick
                    try:
                        quick = self._compile(usable, quick=True, gm=self.gm_bg)
                        if quick is not None:
                            self._deliver(quick, sig, why + ", quick", self.gm_bg)
                    finally:
                        self._want_quick = None
                elif self._want_deploy is not None:
                    cand, self._want_deploy = self._want_deploy, None
                    if cand is self._cand and cand.pv is None:
                        if cand.bundle.dir is None:
                            cand.bundle.save(self.workdir / f"cand-{time.monotonic_ns()}")
                        try:
                            cand.pv = self.session.deploy_plan(cand.bundle.dir)
                        except EdgepartError as e:
                            log.info("candidate not deployed ahead: %s", e)
                elif self._want_standby and self.cfg.standby:
                    self._want_standby = False
                    self._prepare_standby()
            except Exception:  # noqa: BLE001 — the compiler thread must outlive a failed compile
                log.exception("background compile failed")

    def _full_loop(self) -> None:
        """The strategy's compiler (ofpm: several seconds), its own thread so that a compile under way does
        not hold up the quick candidate of a state that moved meanwhile."""
        while not self.stop_event.is_set():
            self._full_wake.wait(0.5)
            self._full_wake.clear()
            if self._want_candidate is None:
                continue
            usable, sig, why = self._want_candidate
            self._compiling = True
            try:
                res = self._compile(usable, gm=self.gm_full)
                if res is not None:
                    self._deliver(res, sig, why, self.gm_full)
            except Exception:  # noqa: BLE001
                log.exception("background compile failed")
            finally:
                self._compiling = False
                self._want_candidate = None

    def _prepare_standby(self) -> None:
        s = self.session
        pv = s.plan
        for d in pv.devices:
            if self._want_quick is not None or self._want_standby or self.stop_event.is_set():
                continue
            usable = [u for u in self._usable() if u != d]
            if not usable:
                continue
            res = self._compile(usable, quick=True, gm=self.gm_bg)
            if res is None:
                continue
            path = self.workdir / f"standby-{len(self.events)}-{d}"
            res.bundle.save(path)
            try:
                standby = s.deploy_plan(path)
            except EdgepartError as e:
                log.info("standby plan without %s not deployed: %s", d, e)
                continue
            if s.plan is pv:
                self._standby[d] = (standby, res.plan)
        log.info("standby plans ready for %s", sorted(self._standby))

    def _compile(self, usable: list[str], quick: bool = False, gm=None) -> "Candidate | None":
        """A candidate for the devices ``usable`` under the live state: with the configured strategy, or
        ``quick``: the best by prediction of the strategies without a MILP (ofpm's warm starts)."""
        t0 = time.perf_counter()
        gm = gm if gm is not None else self.gm
        cluster = self.state.cluster(usable, bake_load=True)
        name = type(self.model).__name__
        try:
            if quick:
                # each quick strategy on the devices, and on the devices less one (not the source): a
                # device behind a link that dropped is best left out, which these strategies never do
                best = None
                subsets = [cluster] + [self.state.cluster([u for u in usable if u != d], bake_load=True)
                                       for d in usable if d != cluster.source and len(usable) > 2]
                for sub in subsets:
                    for strategy in QUICK:
                        try:
                            p = make_plan(gm, sub, strategy)
                        except Exception:  # noqa: BLE001 — a baseline that cannot plan this cluster is skipped
                            continue
                        t = self.predict(p, gm=gm, source=cluster.source)
                        if best is None or t < best[0]:
                            best = (t, p, sub)
                if best is None:
                    raise EdgepartError("no quick strategy could plan the devices left")
                _, plan, cluster = best
            else:
                plan = make_plan(gm, cluster, self.cfg.strategy)
            bundle = compile_plan(gm, plan, cluster, name)
        except EdgepartError as e:
            self._event("replan_failed", reason=str(e)[:300])
            return None
        return Candidate(plan, bundle, time.monotonic(), time.perf_counter() - t0, cluster.source)

    def _discard(self, path, keep: PlanVersion) -> None:
        """Remove a bundle this controller saved (under its workdir) unless it is ``keep``'s: a long-running
        session compiles many (tens of MB each); the workers keep the ones deployed by sha256."""
        path = Path(path)
        try:
            if path.resolve() != Path(keep.dir).resolve() and path.resolve().is_relative_to(self.workdir.resolve()):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass

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
                pv = s.deploy_plan(pv.dir)      # deployed ahead: a handshake (again, if a worker unloaded it)
        except EdgepartError as e:
            self._event(f"{kind}_failed", reason=str(e)[:300])
            return
        old = s.plan
        s.switch(pv)
        for _, (spv, _) in self._standby.items():      # bundles saved for the old plan: not needed any more
            self._discard(spv.dir, pv)
        self._discard(old.dir, pv)
        self._stage_pred = self._stage_times(pv)
        self._prev_stats = {}                      # counters of the old plan's stages: start over
        self._settle_until = time.monotonic() + SETTLE_S
        self._better_since = None
        self._rounds.clear()                       # the held candidates were measured against the old plan
        self.predicted = after
        self._standby = {}
        self._want_standby = True               # standby plans for the new plan's devices
        self._bg_wake.set()
        gain = 1 - after / before if before not in (0, math.inf) else None
        self._event(kind, reason=reason, frm=old.version, to=pv.version, devices=pv.devices, source=pv.source,
                    predicted_before_ms=_ms(before), predicted_ms=_ms(after),
                    gain=None if gain is None else round(gain, 3), deploy_s=round(time.perf_counter() - t0, 3),
                    files_shipped=s.counts["files_shipped"] - files0)


@dataclass
class Candidate:
    """A plan the background compilers made: ``source`` — where its inputs go; ``pv`` — set if it was
    deployed ahead of the swap."""

    plan: Plan
    bundle: Any
    when: float                 # monotonic time it was compiled
    compile_s: float
    source: str
    pv: PlanVersion | None = None


def _plan_devices(plan: Plan) -> list[str]:
    return plan.devices()


def _same_plan(plan: Plan, other: dict) -> bool:
    return plan.to_dict()["stages"] == other.get("stages")


def _ms(x: float | None):
    return None if x is None or math.isinf(x) else round(x * 1e3, 3)


