"""The online phase: plan versions swapped while serving (no request lost, duplicated or answered by
a mix of plans), failover with resubmission, a stopped worker detected, the controller's hysteresis."""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest
import torch

import edgepart
from edgepart import models as zoo
from edgepart.cluster import Cluster
from edgepart.online import AdaptiveSession, ControllerConfig
from edgepart.online.state import LiveState
from edgepart.runtime.client import Session
from tests.conftest import assert_close

pytestmark = pytest.mark.timeout(120)

STRATEGIES = ["even", "single", "proportional"]


@pytest.fixture(scope="module")
def tiny():
    model, (x,) = zoo.get("tinynet")
    return model.eval(), x


@pytest.fixture(scope="module")
def plans(tiny, tmp_path_factory):
    """Three different plans of the same model for the same 3 devices."""
    model, x = tiny
    cluster = Cluster.heterogeneous([1.0, 0.7, 0.5])
    out = {}
    for s in STRATEGIES:
        d = tmp_path_factory.mktemp(f"plan-{s}")
        edgepart.compile(model, (x,), cluster, strategy=s).save(d)
        out[s] = d
    return out


def stream(submit, model, n_clients: int, per_client: int, seed: int = 0):
    """``n_clients`` threads each submitting ``per_client`` requests (up to 4 in flight each) with inputs of
    their own; every answer checked against the model's output for that request's input. Returns
    (answers per request id, failures, wall times of answers)."""
    answers: collections.Counter = collections.Counter()
    failures: list = []
    times: list[float] = []
    lock = threading.Lock()

    def client(c):
        g = torch.Generator().manual_seed(seed * 1000 + c)
        inflight = collections.deque()

        def drain_one():
            i, xi, fut = inflight.popleft()
            try:
                y = fut.result(60)
                assert_close(y, model(xi))
                with lock:
                    answers[(c, i)] += 1
                    times.append(time.monotonic())
            except Exception as e:  # noqa: BLE001
                with lock:
                    failures.append(((c, i), repr(e)))
        for i in range(per_client):
            xi = torch.randn(1, 3, 32, 32, generator=g)
            inflight.append((i, xi, submit(xi)))
            if len(inflight) >= 4:
                drain_one()
        while inflight:
            drain_one()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    return threads, answers, failures, times


@pytest.fixture(scope="module")
def workers(plans):
    """3 workers (one LocalCluster for the tests that leave them running)."""
    with edgepart.LocalCluster(plans["even"]) as c:
        yield c


def test_plan_swaps_under_load_lose_nothing(tiny, plans, workers):
    """4 clients stream requests while the session swaps plans 5 times: every request is answered exactly
    once, correctly (its own input), and workers never fail a request because of a deploy."""
    model, x = tiny
    c = workers
    if True:
        s = Session(plans["even"], c.endpoints, c.key, resubmit=True, timeout=60)
        try:
            with torch.no_grad():
                threads, answers, failures, _ = stream(s.submit, model, 4, 60)
                order = ["single", "proportional", "even", "single", "proportional"]
                shipped = []
                for name in order:
                    time.sleep(0.15)
                    s.switch(s.deploy_plan(plans[name]))
                    shipped.append(s.counts["files_shipped"])
                for t in threads:
                    t.join(90)
            assert not failures, failures[:3]
            assert len(answers) == 240 and set(answers.values()) == {1}
            assert s.counts["switches"] == len(order)
            assert s.counts["answered"] == 240 and s.counts["failed"] == 0
            stats = s.stats()
            assert sum(st.get("failed", 0) for st in stats.values()) == 0, stats
            # single: d0's 2 files, proportional: 3 devices x 2, less any a worker already held (same
            # sha256 in another bundle); deploying a plan the workers hold again ships nothing
            assert 0 < shipped[1] <= 8 and shipped[1] == shipped[-1], shipped
        finally:
            s.close()


def test_untagged_old_session_keeps_working_after_another_deploy(tiny, plans, workers):
    """A session keeps running its plan when another client deploys a different one to the same workers."""
    model, x = tiny
    c = workers
    if True:
        other = Session(plans["proportional"], c.endpoints, c.key)
        try:
            assert_close(other.infer(x), model(x))
            assert_close(c.infer(x), model(x))       # c's session: the even plan, still loaded
            assert_close(other.infer(x), model(x))
        finally:
            other.close()


def test_failover_resubmits_in_flight_requests(tiny, plans, workers):
    """A worker killed mid-stream: the controller re-plans without it, requests in flight are sent again;
    every request is answered once and correctly; the longest gap between answers stays bounded.
    (The 1,000-request version across plan swaps and a failover: benchmarks/dynamic.py.)"""
    model, x = tiny
    cfg = ControllerConfig(hold_s=0.5, interval=0.2, probe_every=0, proc_load=False)
    with AdaptiveSession(plans["even"], workers.endpoints, workers.key, model, (x,), config=cfg,
                         dead_after=1.0, heartbeat=0.25, timeout=60) as s:
        c = _Adaptive(workers, s)
        with torch.no_grad():
            threads, answers, failures, times = stream(c.submit, model, 4, 50)
            time.sleep(0.5)
            t_kill = time.monotonic()
            c.kill("d2")
            for t in threads:
                t.join(90)
        assert not failures, failures[:3]
        assert len(answers) == 200 and set(answers.values()) == {1}
        kinds = [e["event"] for e in c.events]
        assert "failover" in kinds, c.events
        assert "d2" not in s.plan.devices
        after = sorted(t for t in times if t > t_kill)
        gaps = [b - a for a, b in zip([t_kill] + after, after)]
        assert max(gaps) < 3.0 + 5.0, max(gaps)     # dead_after + compile (a few s on a loaded CI machine)
        # the worker comes back: it rejoins through a re-plan (or at least is connected again)
        c.restart("d2")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not s.session.links["d2"].alive:
            time.sleep(0.1)
        assert s.session.links["d2"].alive
        assert "device_up" in [e["event"] for e in c.events]
        assert_close(c.infer(x, timeout=30), model(x))


def test_sigstopped_worker_detected_within_timeout(tiny, plans, workers):
    """A worker that stops answering (SIGSTOP) is declared down within dead_after (+ a heartbeat)."""
    model, x = tiny
    c = workers
    if True:
        down = threading.Event()
        seen = {}

        def on_event(kind, info):
            if kind == "device_down":
                seen.update(info)
                down.set()
        s = Session(plans["even"], c.endpoints, c.key, resubmit=True, timeout=30, heartbeat=0.25,
                    dead_after=1.0, on_event=on_event)
        try:
            assert_close(s.infer(x), model(x))
            assert s.oldest_pending(s.plan) == (0.0, 0)
            t0 = time.monotonic()
            os.killpg(c.procs["d1"].pid, signal.SIGSTOP)
            fut = s.submit(x)
            time.sleep(0.5)
            age, n = s.oldest_pending(s.plan)               # the request stuck on it shows its age
            assert n == 1 and 0.4 <= age <= 1.5, (age, n)
            assert down.wait(5.0)
            assert seen["device"] == "d1"
            assert time.monotonic() - t0 <= 1.0 + 2 * 0.25 + 0.5     # dead_after + two heartbeats + slack
        finally:
            os.killpg(c.procs["d1"].pid, signal.SIGCONT)
            s.close()
        del fut


class _Adaptive:
    """The module's workers driven by an adaptive session (kill / restart from the LocalCluster)."""

    def __init__(self, cluster, session):
        self.c, self.s = cluster, session
        self.submit, self.infer = session.submit, session.infer

    @property
    def events(self):
        return self.s.events

    def kill(self, d):
        self.c.kill(d)

    def restart(self, d):
        self.c.restart(d)


def test_live_state_load_from_stage_ratio():
    cl = Cluster.heterogeneous([1.0, 0.5])
    st = LiveState(cl, alpha=1.0, proc_load=False, base_samples=1)
    st.stage_ratio("d0", 1.2)
    assert st.loads()["d0"] == 0.0
    st.stage_ratio("d0", 2.4)                 # twice as slow as its no-load base: half its budget is taken
    assert st.loads()["d0"] == pytest.approx(0.5)
    st.link("d0", "d1", bandwidth_mbps=20.0, latency_ms=2.0)
    live = st.cluster(bake_load=True)
    assert live.link("d0", "d1")["bandwidth_mbps"] == 20.0
    assert live.device("d0").speed == pytest.approx(0.5 / 1.2)      # ÷ its calibration (base ratio), × (1 - load)
    assert st.cluster(["d1"]).names == ["d1"]


class _FakeSession:
    """Just what Controller._decide touches: the current plan, liveness, deploy and switch."""

    def __init__(self, plan_dir):
        from edgepart.runtime.client import PlanVersion
        import collections as _c
        self.plan = PlanVersion.load(plan_dir, 1)
        self.links = {d: type("L", (), {"alive": True})() for d in ["d0", "d1", "d2"]}
        self.counts = _c.Counter()
        self.switched = []

    def servable(self, plan=None):
        return True

    def oldest_pending(self, plan):
        return (0.0, 0)                    # answers keep coming: no stall bound

    def deploy_plan(self, d):
        from edgepart.runtime.client import PlanVersion
        return PlanVersion.load(d, 2)

    def switch(self, pv):
        self.switched.append(pv)
        self.plan = pv


@pytest.mark.parametrize("gain,expect_swap", [(0.3, True), (0.05, False)])
def test_controller_hysteresis(tiny, plans, tmp_path, gain, expect_swap):
    """A candidate predicted ``gain`` faster swaps only if gain >= min_gain, and only after hold_s."""
    from edgepart.online.controller import Candidate, Controller
    model, x = tiny
    cl = Cluster.heterogeneous([1.0, 0.7, 0.5])
    ctl = Controller(model, (x,), cl, ControllerConfig(min_gain=0.1, hold_s=1.0), workdir=tmp_path)
    ctl.session = _FakeSession(plans["even"])
    cand = edgepart.compile(model, (x,), cl, strategy="single")
    ctl._cand = Candidate(cand.plan, cand, time.monotonic(), 0.0, "d0")      # as the background compiler leaves it
    ctl._moved_from = ctl._signature()
    ctl._asked_at = time.monotonic()
    ctl.predict = lambda plan, **kw: (1 - gain) if plan.devices() == ["d0"] else 1.0
    t = time.monotonic()
    ctl._decide(t)
    assert not ctl.session.switched                       # better, but not yet for hold_s
    ctl._decide(t + 0.5)
    assert not ctl.session.switched
    ctl._decide(t + 1.2)
    assert bool(ctl.session.switched) == expect_swap
    if expect_swap:
        e = [e for e in ctl.events if e["event"] == "replan"][-1]
        assert e["gain"] == pytest.approx(gain) and "faster" in e["reason"]


def test_serve_endpoint_answers_plain_clients(tiny, plans, workers):
    """`edgepart serve`'s endpoint: a plain Session (deploy=False) pointed at it as the source device gets
    the model's answers; the adaptive session behind it serves them."""
    from edgepart.online.serve import Endpoint
    from edgepart.runtime.protocol import as_key
    model, x = tiny
    cfg = ControllerConfig(replan=False, probe_every=0, proc_load=False)
    with AdaptiveSession(plans["even"], workers.endpoints, workers.key, model, (x,), config=cfg) as s:
        ep = Endpoint(s, "127.0.0.1:0", as_key(workers.key))
        addr = ep.start()
        try:
            client = Session(plans["even"], {"d0": addr}, workers.key, deploy=False)
            try:
                with torch.no_grad():
                    xs = [torch.randn(1, 3, 32, 32) for _ in range(6)]
                    for xi, y in zip(xs, client.infer_many(xs)):
                        assert_close(y, model(xi))
            finally:
                client.close()
        finally:
            ep.stop()


def test_hold_runs_while_the_candidate_compiles(tiny, plans, tmp_path):
    """The hysteresis is judged on the live states of the rounds before a candidate arrived: one that
    would have been min_gain faster in every round of the last hold_s swaps as soon as it is compiled
    (the hold does not add to the compile time); one that would not have been waits for hold_s."""
    from edgepart.online.controller import Candidate, Controller
    model, x = tiny
    cl = Cluster.heterogeneous([1.0, 0.7, 0.5])
    ctl = Controller(model, (x,), cl, ControllerConfig(min_gain=0.1, hold_s=1.0, interval=0.25), workdir=tmp_path)
    ctl.session = _FakeSession(plans["even"])
    ctl._request_candidate = lambda *a: None          # no background compilers here
    slow = {"link": False}
    # the current plan (3 devices) is predicted 1.0 while the link is fast, 2.0 once it "dropped"
    ctl.predict = lambda plan, cluster=None, **kw: (0.95 if plan.devices() == ["d0"] else
                                                    (2.0 if (cluster.link("d0", "d1")["bandwidth_mbps"] < 50
                                                             if cluster is not None else slow["link"]) else 1.0))
    t = time.monotonic()
    for k in range(4):                                 # 4 rounds (1 s) with the link fast
        ctl._decide(t + 0.25 * k)
    ctl.state.link("d0", "d1", bandwidth_mbps=20.0)
    slow["link"] = True
    for k in range(4, 9):                              # then 5 rounds (1.25 s) with it slow
        ctl._decide(t + 0.25 * k)
    cand = edgepart.compile(model, (x,), cl, strategy="single")
    ctl._ready.put((Candidate(cand.plan, cand, time.monotonic(), 0.0, "d0"), ctl._signature(), "state moved"))
    ctl._decide(t + 0.25 * 9)
    assert ctl.session.switched, ctl.events              # better in each of the last 1.25 s: swapped at once
    e = [e for e in ctl.events if e["event"] == "candidate"][-1]
    assert e["better_since_s"] >= 1.0
    # another candidate, a state that moved just now: it waits for its hold
    ctl2 = Controller(model, (x,), cl, ControllerConfig(min_gain=0.1, hold_s=1.0, interval=0.25), workdir=tmp_path)
    ctl2.session = _FakeSession(plans["even"])
    ctl2._request_candidate = lambda *a: None
    ctl2.predict = ctl.predict
    slow["link"] = False
    for k in range(4):
        ctl2._decide(t + 0.25 * k)
    ctl2.state.link("d0", "d1", bandwidth_mbps=20.0)
    slow["link"] = True
    ctl2._decide(t + 1.0)
    ctl2._ready.put((Candidate(cand.plan, cand, time.monotonic(), 0.0, "d0"), ctl2._signature(), "state moved"))
    ctl2._decide(t + 1.25)
    assert not ctl2.session.switched
    ctl2._decide(t + 2.1)
    assert ctl2.session.switched


@pytest.mark.slow
def test_links_from_real_transfers(tiny):
    """Workers time the pieces they receive and report each link's rate and latency (``rx_mbps:P``,
    ``link_lat_us:P``); the controller turns them into the live links. Emulated in the sender (no root
    needed): 20 Mbit/s, 2 ms."""
    from edgepart.online.controller import Controller
    model, _ = zoo.get("tinynet", input_size=128)
    model.eval()
    x = torch.randn(1, 3, 128, 128)
    cl = Cluster.heterogeneous([1.0, 0.7, 0.5], bandwidth_mbps=20.0, latency_ms=2.0)
    b = edgepart.compile(model, (x,), cl, strategy="even")
    with edgepart.LocalCluster(b, emulate="inprocess") as c:
        for _ in range(6):
            c.infer(x)
        stats = c.session.stats()
    ts = c.time_scale
    rates = {(src, d): v / ts for d, st in stats.items() for k, v in st.items() if k.startswith("rx_mbps:")
             for src in [k.split(":", 1)[1]]}
    assert rates, stats
    for (src, d), mbps in rates.items():
        assert 14 <= mbps <= 26, (src, d, mbps)                   # 20 Mbit/s
    lat = [v / 1e3 * ts for st in stats.values() for k, v in st.items() if k.startswith("link_lat_us:")]
    assert lat and all(1.6 <= v <= 3.0 for v in lat), lat          # 2 ms one way
    sent = {k for st in stats.values() for k in st if k.startswith("tx_acked:")}      # the senders' side too
    assert sent and all(st["t_us"] > 0 for st in stats.values()), stats
    ctl = Controller(model, (x,), Cluster.heterogeneous([1.0, 0.7, 0.5]), ControllerConfig(time_scale=ts))
    for d, st in stats.items():
        ctl._links_seen(d, st, {}, time.monotonic())
    (src, d), mbps = next(iter(rates.items()))
    assert ctl.state.link_values(src, d)["bandwidth_mbps"] == pytest.approx(mbps, rel=0.5)
    assert not ctl.state.link_idle(src, d, 3.0)                    # busy: measured, not probed
    snap = ctl.state.snapshot()["links"]
    assert any(v["from"] == "transfers" for v in snap.values()), snap


def test_dead_source_fails_over_and_comes_back(tiny, plans, workers):
    """The source (where inputs go) is killed mid-stream: the controller moves the inputs to another
    device, every request is answered once and correctly; when the source is back, the plan moves
    back to it."""
    model, x = tiny
    cfg = ControllerConfig(hold_s=0.5, interval=0.2, probe_every=0, proc_load=False)
    with AdaptiveSession(plans["even"], workers.endpoints, workers.key, model, (x,), config=cfg,
                         dead_after=1.0, heartbeat=0.25, timeout=60) as s:
        assert s.plan.source == "d0"
        with torch.no_grad():
            threads, answers, failures, times = stream(s.submit, model, 3, 40)
            time.sleep(0.3)
            workers.kill("d0")
            for t in threads:
                t.join(90)
        assert not failures, failures[:3]
        assert len(answers) == 120 and set(answers.values()) == {1}
        fo = [e for e in s.events if e["event"] == "failover"]
        assert fo and fo[0]["source"] != "d0" and "was the source" in fo[0]["reason"], s.events
        assert s.plan.source != "d0"
        workers.restart("d0")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and s.plan.source != "d0":
            s.infer(x, timeout=30)
            time.sleep(0.1)
        assert s.plan.source == "d0", s.events
        assert any("is back" in str(e.get("reason")) for e in s.events if e["event"] == "replan"), s.events
        assert_close(s.infer(x, timeout=30), model(x))


def test_dead_source_without_replanning_gives_a_clear_error(tiny, plans, workers):
    """A session that cannot re-plan (a static plan): requests while its source is down end at their
    deadline with an error naming the source, never a hang."""
    model, x = tiny
    s = Session(plans["even"], workers.endpoints, workers.key, resubmit=True, timeout=2.0, heartbeat=0.25,
                dead_after=1.0)
    try:
        assert_close(s.infer(x), model(x))
        workers.kill("d0")
        t0 = time.monotonic()
        with pytest.raises(edgepart.EdgepartError, match=r"'d0' \(the source, where inputs go\) down"):
            s.infer(x, timeout=10)
        assert time.monotonic() - t0 < 2.0 + 1.0
    finally:
        s.close()
        workers.restart("d0")


def test_piece_arrival_is_timed_without_its_latency():
    """Channel.rx_span: the bytes of a payload that were still on the way when its header was read and
    how long they took — a link that delivers half a piece, then the rest 0.3 s later, shows 0.3 s for
    the late half; bytes already waiting are not counted (they say nothing of the link)."""
    import socket
    from edgepart.runtime.protocol import Channel
    key_a, key_b = os.urandom(32), os.urandom(32)
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    tx, rx = Channel(a1, key_a, key_b), Channel(b2, key_b, key_a)
    x = torch.randn(64, 1024)                                       # 256 KiB
    got = []

    def drain():
        while chunk := a2.recv(1 << 20):
            got.append(chunk)
    d = threading.Thread(target=drain)
    d.start()
    tx.send({"kind": "piece"}, [x])
    a1.shutdown(socket.SHUT_WR)
    d.join(10)
    wire = b"".join(got)
    expect = lambda h: [("float32", (64, 1024))]                  # noqa: E731
    half = len(wire) // 2

    def relay():
        b1.sendall(wire[:half])
        time.sleep(0.3)
        b1.sendall(wire[half:])
    t = threading.Thread(target=relay)
    t.start()
    f = rx.recv(expect)
    t.join()
    assert torch.equal(f.parts[0], x)
    nbytes, span = rx.rx_span
    assert 0.28 <= span <= 0.6, span
    assert len(wire) - half - 100 <= nbytes <= len(wire) - half + 100    # the late half only
    rx2 = Channel(b2, key_b, key_a)            # the same frame again, all of it here before the header is read
    threading.Thread(target=b1.sendall, args=(wire,), daemon=True).start()
    time.sleep(0.2)
    assert torch.equal(rx2.recv(expect).parts[0], x)
    # what the socket buffer held was not counted; the little that did not fit came at once
    assert rx2.rx_span is None or (rx2.rx_span[0] < len(wire) // 2 and rx2.rx_span[1] < 0.05), rx2.rx_span
    for s in (a1, a2, b1, b2):
        s.close()


def _tx(t_s, acked, queued, conns="1"):
    return {"t_us": int(t_s * 1e6), "tx_acked:d1": acked, "tx_queued:d1": queued, "tx_conns:d1": conns}


def test_a_link_that_stops_delivering_is_measured_slow(tiny, tmp_path):
    """The sender's side of a link (``tx_acked`` / ``tx_queued`` from the kernel): a link that was busy
    between two snapshots (64 KB or more waiting at the first, not all of it acknowledged by the second)
    is measured at the rate it delivered — one that delivered nothing as slower than a segment per
    interval; a link that drained what waited says nothing of its rate, nor do readings of other
    connections."""
    from edgepart.online.controller import Controller
    model, x = tiny
    cl = Cluster.heterogeneous([1.0, 0.7, 0.5], bandwidth_mbps=1000.0)
    ctl = Controller(model, (x,), cl, ControllerConfig(time_scale=0.5), workdir=tmp_path)
    bw = lambda: ctl.state.link_values("d0", "d1")["bandwidth_mbps"]    # noqa: E731
    ctl._links_seen("d0", _tx(1.0, 3_000_000, 500_000), _tx(0.5, 0, 2_000_000), 0.0)     # drained: nothing
    assert bw() == 1000.0 and ctl.state.link_idle("d0", "d1", 3.0, now=0.0)
    ctl._links_seen("d0", _tx(1.0, 1_000, 900_000, "2"), _tx(0.5, 0, 900_000, "1"), 0.0)  # other connection
    assert bw() == 1000.0
    ctl._links_seen("d0", _tx(1.5, 1_250_000, 2_000_000), _tx(1.0, 0, 3_000_000), 0.0)    # busy: 20 Mbit/s wall
    assert bw() == pytest.approx(20.0 / 0.5)                                             # ÷ time_scale
    assert not ctl.state.link_idle("d0", "d1", 3.0, now=0.0)
    ctl._links_seen("d0", _tx(2.0, 1_250_000, 2_000_000), _tx(1.5, 1_250_000, 2_000_000), 0.0)   # stuck
    assert bw() == pytest.approx(8 * 1448 / 0.5 / 1e6 / 0.5)


class _StuckSession:
    def __init__(self, plan, age, n):
        self.plan, self.age, self.n = plan, age, n

    def oldest_pending(self, plan):
        return (self.age, self.n) if plan is self.plan else (0.0, 0)


def test_a_plan_whose_answers_stop_counts_as_slow(tiny, tmp_path):
    """The oldest attempt in flight bounds the plan's latency from below (age / attempts in flight), once
    that is over twice the prediction; logged once per plan as ``stall``."""
    from edgepart.online.controller import Controller
    model, x = tiny
    ctl = Controller(model, (x,), Cluster.heterogeneous([1.0, 0.5]), ControllerConfig(time_scale=0.5),
                     workdir=tmp_path)
    plan = type("PV", (), {"version": 3})()
    ctl.session = _StuckSession(plan, age=0.9, n=1)
    assert ctl._stalled(plan, 0.010) == 0.0                  # under 2 intervals old: not yet
    ctl.session = _StuckSession(plan, age=4.0, n=4)
    assert ctl._stalled(plan, 0.600) == 0.0                  # 4 in flight, 4 s: 0.5 s each, within 2 x 0.6
    assert ctl._stalled(plan, 0.050) == pytest.approx(4.0 * 0.5 / 4)
    assert ctl._stalled(plan, 0.050) == pytest.approx(0.5)
    assert [e["event"] for e in ctl.events].count("stall") == 1
