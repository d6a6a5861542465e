"""Requests on a worker: their state, the scheduler that advances them, and how they fail.

Every request is the device's action list, run event by event: a piece that arrives goes to the
request's mailbox, a request whose next action is waiting for it is queued, and one request is
advanced at a time, the oldest runnable first — by the compute thread, or (see :meth:`Executor._kick`)
by the reader thread that made it runnable when nothing is computing and this device's recent
requests computed in under 5 ms, which saves a thread wake-up on small requests. Sends go to the
peers' :class:`~edgepart.runtime.transport.PeerLink` (worker to worker, never through the client).

A request that fails anywhere fails everywhere: a non-source device tells the source (``fail``),
the source tells the client (``error``) and cancels it on every other device. Both frames carry
the failure's code, the device it is about and a message (:class:`~edgepart.runtime.protocol.Failure`).
A request idle longer than the request timeout is failed by the reaper.

**Plan versions.** A worker keeps several deployments (bundles) at once, keyed by bundle id: the
newest deploy is the *active* one, and older ones stay loaded while requests of theirs are in
flight (and a few more, :data:`KEEP_OLD`, so that a piece of a request that started elsewhere on an
older plan still finds its bundle here). Every request frame may name its bundle (``"bundle"``:
its id); a request runs entirely on the bundle it started on, and its pieces, results and
``begin`` frames carry that id on. A frame without one means the active bundle (older clients).
So a client swaps plans at a request boundary by tagging new requests with the new bundle id:
requests in flight finish on the old plan, none is failed by the deploy.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgepart.errors import EdgepartError, ErrorCode
from edgepart.ir import output as output_tree
from edgepart.ir.manifest import Manifest, Recv, Run, Send, TakeInput
from edgepart.runtime.interpreter import StageError, advance
from edgepart.runtime.monitor import LoadMeter
from edgepart.runtime.program import DeviceProgram
from edgepart.runtime.protocol import Failure, Frame, ProtocolError
from edgepart.runtime.server import Conn, Server
from edgepart.runtime.transport import PeerLink, Writer

log = logging.getLogger("edgepart.worker")

MAX_INFLIGHT = 4096
MAX_FINISHED = 8192            # ids of finished requests remembered, so their late pieces are dropped
REQ_ID_MAX = 80
INLINE_COMPUTE_S = 0.005       # a reader thread runs a request itself only if recent ones computed this briefly
RX_WINDOW_S = 1.0              # per sending peer, the arrival rates of the pieces of the last this many s are reported
RX_SAMPLES = 64
KEEP_OLD = 8                   # older deployments kept loaded besides the active one (more while requests use them;
                               # an online controller keeps a standby plan per device deployed)


class StageClock(Protocol):
    """How long a compute stage lasts (a test bed's hook: an emulated slower CPU; None: as it ran)."""

    def stretch(self, t0: float, c0: float) -> float:
        """Called right after a stage begun at wall time ``t0`` (perf_counter) and thread CPU time ``c0``
        ended; may sleep; returns the stage's duration in seconds."""


@dataclass
class Deployment:
    """The bundle a worker runs, as a commit activated it (see deploy.py); read by every request."""

    program: DeviceProgram
    bundle_id: str
    peers: dict[str, str]                  # device -> host:port this worker dials
    links: dict[str, PeerLink]             # device -> the link to it (every other device of the bundle)
    recv_specs: dict[tuple, tuple]         # (from, tensor, a, b) -> (dtype, shape) of a piece it receives
    input_specs: list[tuple]               # (dtype, shape) of the bundle's inputs
    partners: set[str]                     # devices whose going down fails this device's requests
    begin_targets: list[str]               # devices the source starts with a ``begin`` frame

    @property
    def device(self) -> str:
        return self.program.device

    @property
    def manifest(self) -> Manifest:
        return self.program.manifest

    @property
    def source(self) -> str:
        return self.program.manifest.source_device


class Req:
    __slots__ = ("id", "seq", "dep", "program", "pc", "store", "mailbox", "got", "waiting", "client", "inputs",
                 "created", "touched", "cancelled", "queued", "compute_s")

    def __init__(self, rid: str, seq: int, dep: Deployment):
        self.id = rid
        self.seq = seq
        self.dep = dep                      # the bundle (plan version) this request runs on, start to end
        program = self.program = dep.program
        self.pc = 0
        self.store = program.new_store()
        self.mailbox: dict[tuple, torch.Tensor] = {}
        self.got: set[tuple] = set()
        self.waiting: Any = None
        self.client: Writer | None = None
        self.inputs: dict | None = None
        self.created = self.touched = time.monotonic()
        self.cancelled = False
        self.queued = False
        self.compute_s = 0.0


def req_id(h: dict) -> str:
    rid = h.get("req")
    if not isinstance(rid, str) or not 0 < len(rid) <= REQ_ID_MAX:
        raise ProtocolError("frame needs a request id (string of at most 80 chars)")
    return rid


class Executor:
    """The requests in flight on one worker and the threads that advance them (compute, reaper).

    ``stats``: the worker's counters; ``stage_clock``: see :class:`StageClock`. Register its frame
    handlers on a server with :meth:`register`; a deploy hands it the bundle with :meth:`activate`.
    """

    def __init__(self, stats: collections.Counter, stop_event: threading.Event, threads: int = 1,
                 request_timeout: float = 120.0, stage_clock: StageClock | None = None,
                 load_meter: "LoadMeter | None" = None, pin_cpu: int | None = None):
        self.stats = stats
        self.pin_cpu = pin_cpu            # the compute thread's core (None: wherever the scheduler puts it)
        self.stop_event = stop_event
        self.threads = threads
        self.request_timeout = request_timeout
        self.stage_clock = stage_clock
        # how busy other work keeps this worker's CPUs (reported in stats; None: not measured)
        self.load_meter = load_meter if load_meter is not None else LoadMeter()
        self.lock = threading.RLock()
        self.active: Deployment | None = None
        self.deployments: collections.OrderedDict[str, Deployment] = collections.OrderedDict()  # oldest first
        self.reqs: dict[str, Req] = {}
        self.finished: collections.OrderedDict = collections.OrderedDict()
        self.runq: list = []
        self.runq_cv = threading.Condition(self.lock)
        self.computing = False               # a request is being advanced (by the compute or a reader thread)
        self.recent_compute: collections.deque = collections.deque(maxlen=16)   # s per finished request
        self.seq = itertools.count()
        # per sending peer: (monotonic time, bytes, s) of the pieces whose arrival was timed (link monitoring)
        self.rx: dict[str, collections.deque] = {}

    @property
    def device(self) -> str | None:
        """The device this worker was deployed as (None before the first deploy)."""
        active = self.active
        return active.device if active is not None else None

    # --- lifecycle --------------------------------------------------------------------------
    def register(self, server: Server) -> None:
        """Take the request frames on ``server`` and hear of its connections closing."""
        server.register("input", self._on_input, self._expect_input)
        server.register("piece", self._on_piece, self._expect_piece)
        server.register("begin", self._on_begin, self._expect_deployed)
        server.register("cancel", self._on_cancel)
        server.register("fail", self._on_fail)
        server.register("stats", lambda conn, f: conn.out.put({"kind": "stats", "device": self.device,
                                                               "stats": self.stats_snapshot()}))
        server.on_disconnect(self._on_disconnect)

    def start(self) -> None:
        for target, name in [(self._compute_loop, "compute"), (self._reaper_loop, "reaper")]:
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        """Wake the compute thread (to see the stop event) and close the links to the peers."""
        with self.lock:
            self.runq_cv.notify_all()
            deps = list(self.deployments.values())
        for dep in deps:
            for link in dep.links.values():
                link.close()

    def stats_snapshot(self) -> dict:
        """The counters, plus what a monitoring client wants now: requests in flight, bundles loaded, and
        ``cpu_load`` (the share of this worker's CPUs other work took lately; see runtime.monitor)."""
        with self.lock:
            out = dict(self.stats)
            out["inflight"] = len(self.reqs)
            out["bundles"] = len(self.deployments)
        if self.load_meter is not None:
            out["cpu_load"] = round(self.load_meter.load(), 4)
        out.update(self.link_stats())
        return out

    def link_stats(self) -> dict:
        """What real transfers show of each link (see docs/online.md): ``rx_mbps:P`` — the rate (wall
        Mbit/s) at which the pieces from peer P arrived over the last :data:`RX_WINDOW_S` s, the upper
        quartile of the pieces' own rates (a reader thread descheduled mid-piece only makes one piece
        look slower); ``rx_frames:P`` counts the pieces timed so far (a monitor sees whether any
        arrived since it last asked); ``link_lat_us:P`` — the one-way latency to P, from the kernel's
        round-trip times of the connection the pieces go on (``PeerLink.latency``); ``tx_acked:P`` /
        ``tx_queued:P`` — bytes P acknowledged so far and bytes waiting unacknowledged, summed over this
        worker's connections to P (``PeerLink.tx_state``), ``tx_conns:P`` which connections those are, at
        ``t_us`` (this worker's monotonic clock, µs): two snapshots give the rate a busy link delivered,
        also when it delivered nothing."""
        now = time.monotonic()
        out: dict = {"t_us": int(now * 1e6)}
        with self.lock:
            rx = {d: list(q) for d, q in self.rx.items()}
            links: dict[str, list] = {}
            for dep in self.deployments.values():
                for d, link in dep.links.items():
                    links.setdefault(d, []).append(link)
        for d, samples in rx.items():
            out[f"rx_frames:{d}"] = self.stats.get(f"rx_frames:{d}", 0)
            rates = sorted(8 * b / t / 1e6 for (when, b, t) in samples if now - when <= RX_WINDOW_S and t > 0)
            if rates:
                out[f"rx_mbps:{d}"] = round(rates[(3 * len(rates)) // 4 if len(rates) > 1 else 0], 3)
        for d, ls in links.items():
            lat = [x for x in (link.latency() for link in ls) if x is not None]
            if lat:
                out[f"link_lat_us:{d}"] = round(min(lat) * 1e6, 1)
            tx = [x for x in (link.tx_state() for link in ls) if x is not None]
            if tx:
                out[f"tx_acked:{d}"] = sum(a for _, a, _ in tx)
                out[f"tx_queued:{d}"] = sum(q for _, _, q in tx)
                out[f"tx_conns:{d}"] = ",".join(str(n) for n in sorted(n for n, _, _ in tx))
        return out

    def _timed_arrival(self, conn: Conn, h: dict, nbytes: int) -> None:
        """Record how long a piece took to arrive (Channel.rx_span, plus the time an emulated link's
        shaper held it in the sender: ``held_us``)."""
        src = h.get("from")
        span = conn.ch.rx_span
        held = h.get("held_us")
        held_s = held / 1e6 if type(held) is int and 0 <= held < 600_000_000 else 0.0
        if held_s > 0:
            sample = (nbytes, held_s + (span[1] if span else 0.0))
        elif span is not None:
            sample = span
        else:
            return
        if not isinstance(src, str) or sample[1] <= 0:
            return
        with self.lock:
            q = self.rx.get(src)
            if q is None:
                if len(self.rx) >= 256:
                    return
                q = self.rx[src] = collections.deque(maxlen=RX_SAMPLES)
            q.append((time.monotonic(), sample[0], sample[1]))
            self.stats[f"rx_frames:{src}"] += 1

    def activate(self, dep: Deployment) -> None:
        """Run ``dep`` for new untagged requests from now on, and for requests that name its bundle id.
        Requests of older bundles go on on theirs (see the module docstring); an older bundle is
        unloaded, its links closed, once it is beyond the :data:`KEEP_OLD` newest and idle."""
        with self.lock:
            replaced = self.deployments.pop(dep.bundle_id, None)
            self.deployments[dep.bundle_id] = dep
            self.active = dep
            self.recent_compute.clear()
            in_use = {id(r.dep) for r in self.reqs.values()}
        if replaced is not None and id(replaced) not in in_use:
            self._close_links(replaced)
        self._retire()

    def _retire(self) -> None:
        """Unload old deployments beyond the KEEP_OLD newest that no request in flight runs on."""
        with self.lock:
            in_use = {id(r.dep) for r in self.reqs.values()}
            old = [d for d in self.deployments.values() if d is not self.active]
            drop = [d for d in old[:max(0, len(old) - KEEP_OLD)] if id(d) not in in_use]
            for d in drop:
                del self.deployments[d.bundle_id]
        for d in drop:
            log.info("unloaded bundle %s (plan replaced, its requests drained)", d.bundle_id[:12])
            self._close_links(d)

    @staticmethod
    def _close_links(dep: Deployment) -> None:
        for link in dep.links.values():
            link.close()

    # --- frames -----------------------------------------------------------------------------
    def _expect_deployed(self, conn: Conn, h: dict) -> Deployment:
        req_id(h)
        return self._deployment(h)

    def _deployment(self, h: dict) -> Deployment:
        """The deployment a frame names (``bundle``), else the active one; ProtocolError if it is not here."""
        bid = h.get("bundle")
        if bid is None:
            active = self.active
            if active is None:
                raise ProtocolError(f"{h['kind']!r} frame but no bundle is deployed on this worker")
            return active
        dep = self.deployments.get(bid) if isinstance(bid, str) else None
        if dep is None:
            raise ProtocolError(f"{h['kind']!r} frame for bundle {str(bid)[:12]!r}, which is not deployed on "
                                f"this worker (deploy it first)")
        return dep

    def _expect_input(self, conn: Conn, h: dict):
        active = self._expect_deployed(conn, h)
        if active.device != active.source:
            raise ProtocolError(f"inputs go to the source device {active.source!r}, this is {active.device!r}")
        return active.input_specs

    def _expect_piece(self, conn: Conn, h: dict):
        active = self._expect_deployed(conn, h)
        rows = h.get("rows")
        if not (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows)):
            raise ProtocolError("piece frame needs rows [a, b]")
        key = (h.get("from"), h.get("tensor"), rows[0], rows[1])
        spec = active.recv_specs.get(key)
        if spec is None:
            raise ProtocolError(f"device {active.device!r} expects no piece {key[1]!r} rows {rows} from "
                                f"{key[0]!r} in bundle {active.bundle_id[:12]}")
        return [spec]

    def _on_input(self, conn: Conn, frame: Frame) -> None:
        rid = req_id(frame.header)
        with self.lock:
            dep = self._deployment(frame.header)
            if rid in self.reqs:
                raise ProtocolError(f"request id {rid!r} is already in flight")
            self.finished.pop(rid, None)
            req = self._get_req(rid, dep)
            req.client = conn.out
            req.inputs = {s.name: x for s, x in zip(dep.manifest.inputs, frame.parts)}
            if req.waiting == ("input",):
                req.waiting = None
                self._schedule(req)
        self._kick()

    def _on_piece(self, conn: Conn, frame: Frame) -> None:
        h, value = frame.header, frame.parts[0]
        n = value.numel() * value.element_size()
        self.stats["bytes_received"] += n
        self._timed_arrival(conn, h, n)
        rid = h["req"]
        key = (h["from"], h["tensor"], h["rows"][0], h["rows"][1])
        with self.lock:
            req = self._get_req(rid, self._deployment(h))
            if req is None:
                return                      # late piece of a finished or cancelled request
            if key in req.got:
                raise ProtocolError(f"duplicate piece {key} for request {rid!r}")
            req.got.add(key)
            req.mailbox[key] = value
            req.touched = time.monotonic()
            if req.waiting == key:
                req.waiting = None
                self._schedule(req)
        self._kick()

    def _on_begin(self, conn: Conn, frame: Frame) -> None:
        with self.lock:
            self._get_req(req_id(frame.header), self._deployment(frame.header))
        self._kick()

    def _on_cancel(self, conn: Conn, frame: Frame) -> None:
        rid = req_id(frame.header)
        with self.lock:
            req = self.reqs.pop(rid, None)
            self._remember(rid)
            if req is not None:
                req.cancelled = True

    def _on_fail(self, conn: Conn, frame: Frame) -> None:
        rid = req_id(frame.header)
        failure = Failure.from_header(frame.header)
        with self.lock:
            req = self.reqs.get(rid)
        if req is not None:
            self.fail(req, failure)

    def _on_disconnect(self, conn: Conn, reason: str | None) -> None:
        if conn.role == "peer" and reason is not None and conn.name and not self.stop_event.is_set():
            self.peer_down(conn.name, reason)
        if conn.role == "client":
            with self.lock:
                orphans = [r for r in self.reqs.values() if r.client is conn.out]
            for r in orphans:
                self.fail(r, Failure(ErrorCode.CLIENT_GONE, self.device, "the client disconnected"))

    # --- scheduling -------------------------------------------------------------------------
    def _get_req(self, rid: str, dep: Deployment) -> Req | None:
        """The request's state, created on ``dep`` (and queued once) on first mention. Caller holds the lock."""
        req = self.reqs.get(rid)
        if req is None:
            if rid in self.finished:
                return None
            if len(self.reqs) >= MAX_INFLIGHT:
                raise ProtocolError(f"{MAX_INFLIGHT} requests already in flight")
            req = Req(rid, next(self.seq), dep)
            self.reqs[rid] = req
            for d in dep.begin_targets:
                link = dep.links.get(d)
                if link:
                    link.put({"kind": "begin", "req": rid, "bundle": dep.bundle_id})
            self._schedule(req)
        return req

    def _schedule(self, req: Req) -> None:
        """Queue a runnable request (caller holds the lock; the reader that called it then calls _kick)."""
        if not req.queued:
            req.queued = True
            heapq.heappush(self.runq, (req.seq, req.id, req))

    def _kick(self) -> None:
        """After a reader made a request runnable: if nothing is computing and this device's recent
        requests computed briefly, advance the oldest runnable request right here, in the reader
        thread (which saves waking the compute thread, a large share of a small request's latency);
        otherwise wake the compute thread. Either way one request is advanced at a time, oldest first.
        A reader computes for a few ms at most, so the frames behind it on its connection (pings)
        wait no longer than that."""
        with self.lock:
            if self.computing or not self.runq:
                return
            rc = self.recent_compute
            if len(rc) < 4 or max(rc) > INLINE_COMPUTE_S:
                self.runq_cv.notify()
                return
            req = self._pop_runnable()
        self._run(req)

    def _pop_runnable(self) -> Req:
        _, _, req = heapq.heappop(self.runq)
        req.queued = False
        self.computing = True
        return req

    def _compute_loop(self) -> None:
        torch.set_num_threads(max(1, self.threads))
        if self.pin_cpu is not None:
            # why pinned: an unpinned thread migrates between cores and finds its caches cold after each
            # move; pinned, a stage's time repeats (and matches the FCPM, whose timings are pinned too).
            # Linux affinity is per thread: the socket threads stay free to run on the other cores.
            os.sched_setaffinity(0, {self.pin_cpu})
        while not self.stop_event.is_set():
            with self.lock:
                while (not self.runq or self.computing) and not self.stop_event.is_set():
                    self.runq_cv.wait(1.0)
                if self.stop_event.is_set():
                    return
                req = self._pop_runnable()
            self._run(req)

    def _run(self, req: Req) -> None:
        device = self.device
        try:
            self._advance(req)
        except _Cancelled:
            pass
        except StageError as e:
            log.exception("request %s failed", req.id)
            self.fail(req, Failure(ErrorCode.STAGE_FAILED, device, f"device {device!r}: {e}"))
        except Exception as e:  # noqa: BLE001 — a failing request must not stop the worker
            log.exception("request %s failed", req.id)
            self.fail(req, Failure(ErrorCode.INTERNAL, device, f"device {device!r}: {type(e).__name__}: {e}"))
        finally:
            with self.lock:
                self.computing = False
                if self.runq:
                    self.runq_cv.notify()

    # --- one request's actions, from req.pc until it must wait or is done (runtime.interpreter) ---
    def _advance(self, req: Req) -> None:
        if req.cancelled:
            return
        req.pc, waiting = advance(req.program, req.store, req.pc, _RequestHost(self, req))
        req.touched = time.monotonic()
        if waiting is None:
            self._finish(req)

    def _timed_stage(self, req: Req, act: Run, run) -> None:
        t0 = time.perf_counter()
        c0 = time.thread_time()
        f0, s0 = _thread_usage()
        run()
        f1, s1 = _thread_usage()
        cpu, faults = time.thread_time() - c0, f1 - f0
        dt = self.stage_clock.stretch(t0, c0) if self.stage_clock else time.perf_counter() - t0
        req.compute_s += dt
        self.stats["compute_us"] += int(dt * 1e6)
        # per stage, so a testbed can compare each stage with its prediction
        self.stats[f"stage_us:{act.stage}"] += int(dt * 1e6)
        self.stats[f"stage_runs:{act.stage}"] += 1        # with stage_us: a monitor's mean stage time
        self.stats[f"stage_cpu_us:{act.stage}"] += int(cpu * 1e6)
        self.stats[f"stage_faults:{act.stage}"] += faults
        # preempted mid-stage (by another worker or this one's socket threads on a shared CPU)
        self.stats[f"stage_preempted:{act.stage}"] += s1 - s0

    # --- ending requests ----------------------------------------------------------------------
    def _finish(self, req: Req) -> None:
        with self.lock:
            self.reqs.pop(req.id, None)
            self._remember(req.id)
            self.stats["requests"] += 1
            if req.dep is self.active:
                self.recent_compute.append(req.compute_s)

    def _remember(self, rid: str) -> None:
        self.finished[rid] = None
        while len(self.finished) > MAX_FINISHED:
            self.finished.popitem(last=False)

    def fail(self, req: Req, failure: Failure) -> None:
        """Fail a request everywhere: the source tells its client and cancels it on the other devices,
        another device tells the source. Once per request; later calls do nothing."""
        with self.lock:
            if self.reqs.get(req.id) is not req:
                return
            del self.reqs[req.id]
            self._remember(req.id)
            req.cancelled = True
            self.stats["failed"] += 1
            dep = req.dep
        log.info("request %s failed (%s): %s", req.id, failure.code.value, failure.message)
        links = dict(dep.links)
        source = dep.source
        if dep.device == source:
            if req.client is not None:
                req.client.put({"kind": "error", "req": req.id, "bundle": dep.bundle_id, **failure.fields()})
            for link in links.values():
                link.put({"kind": "cancel", "req": req.id, "reason": failure.message[:300]})
        elif source in links:
            links[source].put({"kind": "fail", "req": req.id, "bundle": dep.bundle_id, **failure.fields()})

    def peer_down(self, device: str, reason: str) -> None:
        """A peer's connection went away: fail every request in flight if this device works with it."""
        with self.lock:
            victims = [r for r in self.reqs.values() if device in r.dep.partners]
        if victims:
            log.warning("peer device %r is down (%s); failing %d request(s)", device, reason, len(victims))
        for r in victims:
            self.fail(r, Failure(ErrorCode.PEER_DOWN, device, f"device {device!r} is down: {reason}"))

    def _reaper_loop(self) -> None:
        while not self.stop_event.wait(1.0):
            self._retire()
            now = time.monotonic()
            with self.lock:
                stale = [r for r in self.reqs.values() if now - r.touched > self.request_timeout]
            for r in stale:
                self.fail(r, Failure(ErrorCode.TIMEOUT, self.device,
                                     f"device {self.device!r}: request timed out after {self.request_timeout:.0f} s "
                                     f"waiting for {r.waiting}"))


class _Cancelled(Exception):
    """The request was cancelled while it ran: stop advancing it."""


class _RequestHost:
    """What :func:`runtime.interpreter.advance` needs for one request on this worker: inputs from the
    client's frame, pieces from the request's mailbox, stages timed (and dilated), pieces to peers."""

    def __init__(self, executor: "Executor", req: Req):
        self.ex = executor
        self.req = req

    def take_input(self, act: TakeInput):
        with self.ex.lock:
            if self.req.inputs is None:
                self.req.waiting = ("input",)
                return None
        return self.req.inputs[act.tensor]

    def take_piece(self, act: Recv):
        with self.ex.lock:
            v = self.req.mailbox.pop(act.key, None)
            if v is None:
                self.req.waiting = act.key
        return v

    def run_stage(self, act: Run, run) -> None:
        if self.req.cancelled:
            raise _Cancelled
        self.ex._timed_stage(self.req, act, run)

    def send_piece(self, act: Send, piece) -> None:
        dep = self.req.dep
        link = dep.links.get(act.dst)
        if link is None:
            raise EdgepartError(f"no link to device {act.dst!r}")
        link.put({"kind": "piece", "req": self.req.id, "tensor": act.tensor, "rows": [act.a, act.b],
                  "from": self.req.program.device, "bundle": dep.bundle_id}, [piece], self.req)

    def emit_output(self, value) -> None:
        values, parts = [], []
        for leaf in output_tree.flatten(value, self.req.program.manifest.output):
            if isinstance(leaf, torch.Tensor):      # tensors go as parts, anything else as a JSON value
                values.append(None)
                parts.append(leaf.contiguous())
            else:
                values.append(leaf if isinstance(leaf, (int, float, bool, str)) or leaf is None else str(leaf))
        if self.req.client is not None:
            self.req.client.put({"kind": "result", "req": self.req.id, "bundle": self.req.dep.bundle_id,
                                 "values": values,
                                 "compute_ms": round(self.req.compute_s * 1e3, 3)}, parts)


_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)     # Linux only


def _thread_usage() -> tuple[int, int]:
    """(minor page faults, involuntary context switches) of the calling thread so far ((0, 0) where the
    OS does not count them per thread)."""
    if _RUSAGE_THREAD is None:
        return 0, 0
    u = resource.getrusage(_RUSAGE_THREAD)
    return u.ru_minflt, u.ru_nivcsw
