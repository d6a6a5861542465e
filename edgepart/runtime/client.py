"""The client: deploy a bundle to workers and run requests through them.

    session = edgepart.connect("out/", {"d0": "10.0.0.2:7700", "d1": "10.0.0.3:7700"}, key=b"...")
    y = session.infer(x)                 # one request
    ys = session.infer_many(xs)          # pipelined: many requests in flight, results in input order
    session.close()

The session keeps one authenticated connection to every worker: it deploys over
it, pings it every second, and sends inputs to the source device, which returns
the result. When a worker's connection drops or it stops answering, every request
in flight fails at once with :class:`WorkerDied` naming the device, and the next
request first tries to reconnect and redeploy it (so the session works again once
the worker is back).

Online mode (``resubmit=True``, used by ``edgepart.online``): plans are versioned — each request
is tagged with the bundle id of the plan current when it was sent and runs on that plan from
start to end, so a new plan can be deployed and switched to while requests are in flight; a
request whose plan lost a device is sent again (exactly one answer per request, each from one
plan), and dead workers are reconnected in the background. See :class:`Session`.

CLI: ``edgepart run DIR --endpoints FILE --key-file FILE --input x.npy --output y.npy``.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import itertools
import logging
import mmap
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from edgepart.errors import BundleError, EdgepartError, ErrorCode, WorkerDied, error_for
from edgepart.ir import output as output_tree
from edgepart.ir.manifest import MANIFEST, Manifest
from edgepart.runtime.program import check_inputs
from edgepart.runtime.signing import sign_deploy
from edgepart.runtime.protocol import Channel, PeerClosed, ProtocolError, as_key, read_key

log = logging.getLogger("edgepart.client")


def load_endpoints(endpoints) -> dict[str, str]:
    """``{device: "host:port"}`` from a dict or a YAML/JSON file holding that mapping (or ``endpoints:`` key)."""
    if isinstance(endpoints, (str, os.PathLike)):
        import yaml
        path = Path(endpoints)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise EdgepartError(f"cannot read endpoints file {path}: {e}") from e
        if isinstance(data, dict) and isinstance(data.get("endpoints"), dict):
            data = data["endpoints"]
        endpoints = data
    if not isinstance(endpoints, dict) or not all(isinstance(v, str) and ":" in v for v in endpoints.values()):
        raise EdgepartError("endpoints must map each device name to 'host:port', e.g. {d0: '127.0.0.1:7700'}")
    return {str(k): v for k, v in endpoints.items()}


def bundle_dir_of(bundle_or_dir) -> tuple[Path, Any]:
    """The on-disk directory of a bundle: a directory as given, or a compiled bundle's (anything with
    ``dir`` and ``save(directory)``; one not saved yet is saved to a temporary directory, returned
    second so that the caller removes it)."""
    if hasattr(bundle_or_dir, "save") and hasattr(bundle_or_dir, "dir"):
        if bundle_or_dir.dir is None:
            tmp = tempfile.mkdtemp(prefix="edgepart-bundle-")
            bundle_or_dir.save(tmp)
            bundle_or_dir.dir = None          # the temp copy is ours (removed on close), not the bundle's home
            return Path(tmp), tmp
        return Path(bundle_or_dir.dir), None
    return Path(bundle_or_dir), None


@dataclass
class PlanVersion:
    """One deployable plan: a bundle directory and its manifest. ``version`` counts the plans a session
    used (1 = the first); ``bundle_id`` (the manifest's sha256) is what requests are tagged with."""

    version: int
    dir: Path
    manifest_bytes: bytes
    manifest: Manifest
    bundle_id: str
    tmp: Any = None                   # a temporary copy of an in-memory bundle, removed on close

    @classmethod
    def load(cls, bundle_or_dir, version: int) -> "PlanVersion":
        d, tmp = bundle_dir_of(bundle_or_dir)
        path = d / MANIFEST
        if not path.is_file():
            raise BundleError(f"{path}: no manifest.json here; is {d} a bundle directory?")
        data = path.read_bytes()
        return cls(version, d, data, Manifest.from_json(data, str(path)), hashlib.sha256(data).hexdigest(), tmp)

    @property
    def devices(self) -> list[str]:
        return list(self.manifest.devices)

    @property
    def source(self) -> str:
        return self.manifest.source_device

    def describe(self) -> str:
        return f"plan v{self.version} ({self.bundle_id[:8]}, devices {'+'.join(self.devices)})"


class _Link:
    """The session's connection to one worker."""

    def __init__(self, device: str, address: str):
        self.device = device
        self.address = address
        self.ch: Channel | None = None
        self.alive = False
        self.last_seen = 0.0
        # When the oldest ping still without any frame in reply was sent. A worker is judged by
        # its silence since then, not since its last frame: a link that simply had nothing to
        # say (e.g. while the other workers were still deploying) is not dead.
        self.unanswered_since: float | None = None
        self.next_ping = 0.0                    # when the heartbeat loop pings it next (monotonic s)
        self.ctrl: queue.Queue = queue.Queue()
        self.ctrl_lock = threading.Lock()       # one control exchange (deploy, stats) at a time
        self.bundles: set[str] = set()          # bundle ids deployed on this connection
        self.rtt: float | None = None           # last ping round trip (s)
        self.reason = ""
        self.refused = ""
        self.down_since: float | None = None
        self.next_retry = 0.0
        self.retrying = False


class _Request:
    """One request of the caller: answered once, whatever attempts (plans) it took."""

    __slots__ = ("fut", "inputs", "t0", "deadline", "plan", "attempt", "aid", "base", "tries", "not_before", "sent")

    def __init__(self, fut: cf.Future, inputs: list, base: str, deadline: float):
        self.fut = fut
        self.inputs = inputs
        self.t0 = time.perf_counter()
        self.deadline = deadline
        self.plan: PlanVersion | None = None
        self.attempt = 0
        self.aid = ""
        self.base = base
        self.tries: list[str] = []      # why earlier attempts ended
        self.not_before = 0.0           # parked: not sent again on the plan it failed on before this (backoff)
        self.sent = self.t0             # when its current attempt was sent (perf_counter)


# how often the heartbeat loop checks for silent workers and late requests (s; it pings every `heartbeat`)
HEARTBEAT_TICK_S = 0.25

# error codes after which a request may run again, on another plan (nothing of it was answered)
RETRIABLE = {ErrorCode.PEER_DOWN.value, ErrorCode.REDEPLOYED.value, ErrorCode.TIMEOUT.value,
             ErrorCode.CLIENT_GONE.value}


class Session:
    """Requests through a set of workers running a plan.

    ``resubmit=False`` (default): one plan; a worker that dies fails every request in flight with
    :class:`WorkerDied` and the next request reconnects and redeploys it.

    ``resubmit=True`` (the online mode, ``edgepart.online``): plans are versioned and swapped while
    serving (:meth:`deploy_plan`, :meth:`switch`); each request runs entirely on the plan that was
    current when it was sent (tagged with its bundle id) and a swap affects only requests sent
    after it. A request whose attempt fails for a reason that is not its own (a device of its plan
    died or stopped answering: ``peer_down``, ``timeout``) is *parked* and sent again, with a new
    attempt id, as soon as the current plan is servable (all its devices alive and deployed) —
    typically after the controller switched to a plan without the dead device. Its future is set
    once: a late answer of an abandoned attempt is dropped. Every request has a deadline
    (``timeout`` s after submit); dead workers are reconnected in the background every
    ``retry_every`` s, without a deploy (``on_event`` hears ``device_up``, ``device_down``).
    ``all_endpoints``: connect to every device of ``endpoints``, not only the plan's.
    """

    def __init__(self, bundle_or_dir, endpoints, key, deploy: bool = True, timeout: float = 300.0,
                 heartbeat: float = 1.0, dead_after: float = 3.5, peer_endpoints: dict | None = None,
                 connect_timeout: float = 5.0, resubmit: bool = False, all_endpoints: bool = False,
                 on_event: Callable[[str, dict], None] | None = None, retry_every: float = 1.0, sign_key=None):
        self.sign_key = sign_key       # Ed25519PrivateKey: deploys are signed (workers with --deploy-pubkey)
        self.versions = itertools.count(1)
        self.plan = PlanVersion.load(bundle_or_dir, next(self.versions))
        self.plans: dict[str, PlanVersion] = {self.plan.bundle_id: self.plan}
        self.key = as_key(key)
        self.endpoints = load_endpoints(endpoints)
        if deploy:
            self._check_endpoints(self.plan)
        elif self.plan.source not in self.endpoints:
            raise EdgepartError(f"no endpoint for the source device {self.plan.source!r}")
        # without a deploy only the devices given matter (e.g. just the source: an `edgepart serve` endpoint)
        devices = list(self.endpoints) if all_endpoints else [d for d in self.plan.devices if d in self.endpoints]
        # what each worker should dial to reach each peer (differs from ours under netns emulation)
        self.peer_endpoints = peer_endpoints or {d: dict(self.endpoints) for d in devices}
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.connect_timeout = connect_timeout
        self.resubmit = resubmit
        self.on_event = on_event
        self.retry_every = retry_every
        self.links = {d: _Link(d, self.endpoints[d]) for d in devices}
        self.lock = threading.RLock()
        self.revive_lock = threading.Lock()
        self.pending: dict[str, _Request] = {}
        self.parked: collections.deque[_Request] = collections.deque()
        self.sid = os.urandom(6).hex()
        self.counter = itertools.count()
        self.closed = False
        self.timings: list[float] = []
        self.counts: collections.Counter = collections.Counter()   # answered, resubmitted, failed, ...
        self._stop = threading.Event()
        errors = {}

        def open_one(d):
            try:
                self._open(self.links[d], deploy and d in self.plan.manifest.devices)
            except Exception as e:  # noqa: BLE001
                errors[d] = e
        threads = [threading.Thread(target=open_one, args=(d,)) for d in self.links]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            d, e = next(iter(errors.items()))
            if isinstance(e, EdgepartError):
                raise e
            raise WorkerDied(d, f"cannot reach device {d!r} at {self.endpoints[d]}: {e}") from e
        self._hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb.start()

    # the current plan's (what a one-plan session always had)
    @property
    def dir(self) -> Path:
        return self.plan.dir

    @property
    def manifest(self) -> Manifest:
        return self.plan.manifest

    @property
    def manifest_bytes(self) -> bytes:
        return self.plan.manifest_bytes

    @property
    def bundle_id(self) -> str:
        return self.plan.bundle_id

    @property
    def source(self) -> str:
        return self.plan.source

    def _check_endpoints(self, plan: PlanVersion) -> None:
        missing = [d for d in plan.manifest.devices if d not in self.endpoints]
        if missing:
            raise EdgepartError(f"no endpoint for device(s) {missing}; endpoints given: {sorted(self.endpoints)}")

    def _event(self, kind: str, **info) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, info)
            except Exception:  # noqa: BLE001 — a listener's bug must not break the session
                log.exception("event listener failed on %s", kind)

    # --- connections and deploy -------------------------------------------------------
    def _open(self, link: _Link, deploy: bool) -> None:
        try:
            ch = Channel.connect(link.address, self.key, {"role": "client", "name": "client"},
                                 timeout=self.connect_timeout)
        except OSError as e:
            raise WorkerDied(link.device, f"cannot reach device {link.device!r} at {link.address}: {e}") from None
        except ProtocolError as e:
            raise EdgepartError(f"device {link.device!r} at {link.address}: {e}") from None
        link.ch = ch
        link.ctrl = queue.Queue()
        link.bundles = set()
        link.last_seen = time.monotonic()
        link.unanswered_since = None
        link.refused = ""
        link.down_since = None
        link.alive = True
        threading.Thread(target=self._reader, args=(link, ch), name=f"client-{link.device}", daemon=True).start()
        if deploy:
            self._deploy(link, self.plan)

    def _ctrl(self, link: _Link, kinds: tuple, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = link.ctrl.get(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if not link.alive:
                    raise WorkerDied(link.device, f"device {link.device!r} at {link.address} died during deploy: "
                                     f"{link.reason}{'; ' + link.refused if link.refused else ''}") from None
                if time.monotonic() > deadline:
                    raise EdgepartError(f"device {link.device!r} at {link.address}: no answer within {timeout:.0f} s")
                continue
            if h["kind"] == "deploy_error":          # code deploy_failed: a BundleError
                raise error_for(h.get("code"), h.get("device") or link.device,
                                f"device {link.device!r}: {h.get('message')}")
            if h["kind"] in kinds:
                return h

    def _deploy(self, link: _Link, plan: PlanVersion) -> None:
        """Deploy ``plan`` to ``link``'s worker; the files it already holds (same sha256) are not sent."""
        d = link.device
        with link.ctrl_lock:
            hdr = {"kind": "deploy", "device": d, "bundle": plan.bundle_id, "peers": self.peer_endpoints[d]}
            if self.sign_key is not None:
                hdr["signature"] = sign_deploy(self.sign_key, plan.bundle_id, d, self.peer_endpoints[d])
            link.ch.send(hdr, [plan.manifest_bytes])
            h = self._ctrl(link, ("deploy_need", "deploy_ok"))
            if h["kind"] != "deploy_ok":
                for rel in h.get("files", []):
                    self._send_file(link, plan.dir, rel)
                    self._ctrl(link, ("file_ok",))
                    self.counts["files_shipped"] += 1
                link.ch.send({"kind": "commit"})
                self._ctrl(link, ("deploy_ok",))
        link.bundles.add(plan.bundle_id)

    @staticmethod
    def _send_file(link: _Link, root: Path, rel: str) -> None:
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{path}: missing; the bundle is incomplete")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    mv = memoryview(m)
                    try:
                        link.ch.send({"kind": "file", "path": rel}, [mv])
                    finally:
                        mv.release()
            else:
                link.ch.send({"kind": "file", "path": rel}, [b""])

    # --- plan versions (resubmit mode) ---------------------------------------------------------
    def deploy_plan(self, bundle_or_dir) -> PlanVersion:
        """Deploy another plan to its devices (in parallel; only the files a worker lacks are sent) without
        using it yet; :meth:`switch` makes it current. Raises (naming the device) if a deploy fails."""
        plan = PlanVersion.load(bundle_or_dir, next(self.versions))
        self._check_endpoints(plan)
        known = self.plans.get(plan.bundle_id)
        if known is not None:                      # the same plan again: keep its version number
            if plan.tmp:
                shutil.rmtree(plan.tmp, ignore_errors=True)
            elif not (known.dir / MANIFEST).is_file():   # its first copy was removed: files come from this one
                known.dir = plan.dir
            plan = known
        unknown = [d for d in plan.devices if d not in self.links]
        if unknown:
            raise EdgepartError(f"{plan.describe()} uses device(s) {unknown} this session is not connected to")
        errors: dict[str, Exception] = {}

        def one(d):
            link = self.links[d]
            try:
                if not link.alive:
                    raise WorkerDied(d, f"device {d!r} is down ({link.reason})")
                self._deploy(link, plan)
            except Exception as e:  # noqa: BLE001
                errors[d] = e
        threads = [threading.Thread(target=one, args=(d,)) for d in plan.devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            d, e = next(iter(errors.items()))
            raise e if isinstance(e, EdgepartError) else EdgepartError(f"deploying to {d!r}: {e}")
        self.plans[plan.bundle_id] = plan
        return plan

    def switch(self, plan: PlanVersion) -> None:
        """Make ``plan`` (deployed by :meth:`deploy_plan`) current: requests sent from now on run on it,
        those in flight finish on theirs; parked requests are sent again on it."""
        with self.lock:
            old, self.plan = self.plan, plan
        if old is not plan:
            self.counts["switches"] += 1
            log.info("switched %s -> %s", old.describe(), plan.describe())
        self._pump()

    def servable(self, plan: PlanVersion | None = None) -> bool:
        """Every device of ``plan`` (default: the current one) is connected and holds it."""
        plan = plan or self.plan
        return all(d in self.links and self.links[d].alive and plan.bundle_id in self.links[d].bundles
                   for d in plan.devices)

    def alive_devices(self) -> list[str]:
        return [d for d, link in self.links.items() if link.alive]

    def _pump(self) -> None:
        """Send parked requests again if the current plan can serve them (one that failed on this very
        plan only after its backoff: a link between two workers may be down while both answer us)."""
        if not self.parked or self.closed or not self.servable():
            return
        now = time.monotonic()
        with self.lock:
            plan = self.plan
            ready = [r for r in self.parked if r.plan is not plan or now >= r.not_before]
            if not ready:
                return
            ids = {id(r) for r in ready}
            self.parked = collections.deque(r for r in self.parked if id(r) not in ids)
        for r in ready:
            if not r.fut.done():
                self.counts["resubmitted"] += 1
                self._send(r)

    def _park(self, r: _Request, why: str) -> None:
        r.tries.append(why)
        r.not_before = time.monotonic() + min(2.0, 0.1 * 2 ** len(r.tries))
        with self.lock:
            self.parked.append(r)

    # --- frames from the workers ------------------------------------------------------------
    def _plan_of(self, h: dict) -> PlanVersion:
        return self.plans.get(h.get("bundle")) or self.plan

    def _expect(self, h: dict):
        if h["kind"] != "result":
            return None
        manifest = self._plan_of(h).manifest
        values = h.get("values")
        leaves = output_tree.leaves(manifest.output)
        if not isinstance(values, list) or len(values) != len(leaves):
            raise ProtocolError("result frame: 'values' does not match the bundle's outputs")
        specs = []
        for leaf, v in zip(leaves, values):
            if v is None:
                meta = manifest.tensors.get(leaf)
                if meta is None or meta.shape is None:
                    raise ProtocolError(f"result frame: output {leaf!r} has no known shape")
                specs.append((meta.dtype, meta.shape))
        return specs

    def _reader(self, link: _Link, ch: Channel) -> None:
        reason = "connection closed"
        try:
            while True:
                frame = ch.recv(self._expect)
                link.last_seen = time.monotonic()
                link.unanswered_since = None
                kind = frame.kind
                if kind in ("result", "error"):
                    rid = frame.get("req")
                    with self.lock:
                        r = self.pending.pop(rid, None)
                    if r is None:
                        continue                 # an abandoned attempt's late answer
                    if kind == "result":
                        self.timings.append(time.perf_counter() - r.t0)
                        self.counts["answered"] += 1
                        r.fut.set_result(self._rebuild(r.plan, frame.header["values"], frame.parts))
                    elif self.resubmit and frame.get("code") in RETRIABLE and time.monotonic() < r.deadline:
                        self._park(r, f"{frame.get('code')} on {r.plan.describe()}: {frame.get('message')}")
                        if frame.get("code") == ErrorCode.PEER_DOWN.value:
                            self._event("peer_down", device=frame.get("device"), plan=r.plan.version,
                                        reason=str(frame.get("message"))[:200])
                    else:
                        self.counts["failed"] += 1
                        r.fut.set_exception(self._remote_error(frame.header))
                elif kind == "pong":
                    t = frame.get("t")
                    if isinstance(t, (int, float)):
                        link.rtt = time.monotonic() - t
                elif kind == "refused":
                    link.refused = f"worker refused a frame: {frame.get('reason')}"
                    log.warning("device %r: %s", link.device, link.refused)
                else:
                    link.ctrl.put(frame.header)
        except PeerClosed:
            reason = "its worker closed the connection"
        except (OSError, ProtocolError) as e:
            reason = f"connection lost ({e})"
        if link.ch is ch:
            self._dead(link, reason)

    @staticmethod
    def _remote_error(h: dict) -> EdgepartError:
        """The exception for an ``error`` frame, by its code (errors.ERROR_CLASSES): WorkerDied naming the
        device that is down for ``peer_down``, else a RemoteError."""
        return error_for(h.get("code"), h.get("device"), f"request failed: {h.get('message', 'failed')}")

    @staticmethod
    def _rebuild(plan: PlanVersion, values: list, parts: list):
        it_v, it_p = iter(values), iter(parts)

        def leaf(_name):    # a value sent inline in the header, else the next raw tensor part
            v = next(it_v)
            return next(it_p) if v is None else v
        return output_tree.walk(plan.manifest.output, leaf)

    def _dead(self, link: _Link, reason: str) -> None:
        with self.lock:
            if not link.alive:
                return
            link.alive = False
            link.reason = reason
            link.down_since = time.monotonic()
            link.next_retry = link.down_since + self.retry_every
            if self.resubmit:        # only the requests whose plan needs the device
                victims = [(a, r) for a, r in self.pending.items() if link.device in r.plan.manifest.devices]
            else:
                victims = list(self.pending.items())
            for a, _ in victims:
                del self.pending[a]
        if link.ch is not None:
            link.ch.close()
        if self.closed:
            return
        msg = f"device {link.device!r} at {link.address} died: {reason}"
        log.warning(msg)
        for rid, r in victims:
            if r.fut.done():
                continue
            if self.resubmit and time.monotonic() < r.deadline:
                self._park(r, msg)
            else:
                self.counts["failed"] += 1
                r.fut.set_exception(WorkerDied(link.device, msg))
        for other in self.links.values():
            if other.alive and other is not link:
                for rid, _ in victims:
                    try:
                        other.ch.send({"kind": "cancel", "req": rid, "reason": msg})
                    except (OSError, PeerClosed, AttributeError):
                        pass
        self._event("device_down", device=link.device, reason=reason, parked=len(victims))

    def _heartbeat_loop(self) -> None:
        """Every ``heartbeat`` s a ping to each live worker; a worker whose oldest unanswered ping is more than
        ``dead_after`` s old is declared dead. The loop looks more often than it pings (every
        :data:`HEARTBEAT_TICK_S` at most), so a silent worker is found within ``heartbeat + dead_after +``
        that tick, not up to a whole extra heartbeat later."""
        tick = min(self.heartbeat, HEARTBEAT_TICK_S)
        while not self._stop.wait(tick):
            now = time.monotonic()
            for link in list(self.links.values()):
                if not link.alive:
                    if self.resubmit and now >= link.next_retry and not link.retrying:
                        link.retrying = True       # in a thread of its own: a stopped worker's hello hangs
                        threading.Thread(target=self._retry, args=(link,), name=f"retry-{link.device}",
                                         daemon=True).start()
                    continue
                if link.unanswered_since is not None and now - link.unanswered_since > self.dead_after:
                    self._dead(link, f"no answer for {now - link.unanswered_since:.1f} s")
                    continue
                if now < link.next_ping:
                    continue
                link.next_ping = now + self.heartbeat
                try:
                    if link.unanswered_since is None:
                        link.unanswered_since = now
                    link.ch.send({"kind": "ping", "t": now})
                except (OSError, PeerClosed) as e:
                    self._dead(link, f"connection lost ({e})")
            if self.resubmit:
                self._expire(now)
                self._pump()

    def _retry(self, link: _Link) -> None:
        """Try to reconnect a dead worker (no deploy: the controller deploys the plan it chooses)."""
        try:
            with self.revive_lock:
                if link.alive or self.closed:
                    return
                old_timeout, self.connect_timeout = self.connect_timeout, min(1.0, self.connect_timeout)
                try:
                    self._open(link, deploy=False)
                finally:
                    self.connect_timeout = old_timeout
        except EdgepartError:
            return
        finally:
            link.next_retry = time.monotonic() + self.retry_every
            link.retrying = False
        log.info("device %r is back at %s", link.device, link.address)
        self._event("device_up", device=link.device)

    def _expire(self, now: float) -> None:
        """Fail requests past their deadline (in flight or parked): every request has a timeout."""
        with self.lock:
            late = [(a, r) for a, r in self.pending.items() if now > r.deadline]
            for a, _ in late:
                del self.pending[a]
            late_parked = [r for r in self.parked if now > r.deadline]
            if late_parked:
                self.parked = collections.deque(r for r in self.parked if now <= r.deadline)
        for r in [r for _, r in late] + late_parked:
            if not r.fut.done():
                self.counts["failed"] += 1
                r.fut.set_exception(EdgepartError(
                    f"request {r.base} timed out after {self.timeout:.0f} s" + self._why_stuck(r)
                    + (f" (earlier attempts: {'; '.join(r.tries)[:300]})" if r.tries else "")))

    def _why_stuck(self, r: _Request) -> str:
        """Why a request could not be answered: the devices of the plan it waits for that are down (the
        source named as such: nothing runs without it unless a controller moves the inputs elsewhere)."""
        plan = self.plan
        down = [d for d in plan.devices if d in self.links and not self.links[d].alive]
        if not down:
            return ""
        what = ", ".join(f"{d!r}{' (the source, where inputs go)' if d == plan.source else ''} down since "
                         f"{time.monotonic() - (self.links[d].down_since or time.monotonic()):.0f} s: "
                         f"{self.links[d].reason}" for d in down)
        return f": {plan.describe()} cannot run, device {what}; restart it or re-plan without it"

    def _revive(self) -> None:
        """Reconnect (and redeploy to) any worker found dead; raise WorkerDied if one is still unreachable."""
        dead = [l for l in self.links.values() if not l.alive]
        if not dead:
            return
        with self.revive_lock:
            for link in [l for l in self.links.values() if not l.alive]:
                try:
                    old_timeout = self.connect_timeout
                    self.connect_timeout = 1.0
                    try:
                        self._open(link, deploy=link.device in self.plan.manifest.devices)
                    finally:
                        self.connect_timeout = old_timeout
                    log.info("device %r is back at %s; redeployed", link.device, link.address)
                except Exception as e:  # noqa: BLE001
                    link.alive = False
                    if link.ch is not None:
                        link.ch.close()
                    raise WorkerDied(link.device, f"device {link.device!r} at {link.address} is down "
                                     f"({link.reason}); reconnecting failed: {e}") from None

    # --- requests -----------------------------------------------------------------------
    def submit(self, *inputs) -> cf.Future:
        """Send one request; the future resolves to its output (or raises WorkerDied / RemoteError).
        In resubmit mode it never raises here: a request that cannot be sent now waits (parked)."""
        if self.closed:
            raise EdgepartError("the session is closed")
        xs = [x.contiguous() for x in check_inputs(self.manifest, inputs)]
        if not self.resubmit:
            self._revive()
        fut: cf.Future = cf.Future()
        r = _Request(fut, xs, f"{self.sid}:{next(self.counter)}", time.monotonic() + self.timeout)
        self._send(r)
        return fut

    def _send(self, r: _Request) -> None:
        """Send an attempt of ``r`` on the current plan (resubmit mode: park it if that plan cannot serve)."""
        with self.lock:
            plan = self.plan
            if self.resubmit and not self.servable(plan):
                self.parked.append(r)
                return
            r.plan = plan
            r.sent = time.perf_counter()
            r.attempt += 1
            r.aid = r.base if r.attempt == 1 else f"{r.base}.{r.attempt}"
            self.pending[r.aid] = r
        link = self.links[plan.source]
        try:
            link.ch.send({"kind": "input", "req": r.aid, "bundle": plan.bundle_id}, r.inputs)
        except (OSError, PeerClosed, AttributeError) as e:
            if self.resubmit:
                self._dead(link, f"connection lost ({e})")      # parks r with the other victims
                return
            with self.lock:
                self.pending.pop(r.aid, None)
            self._dead(link, f"connection lost ({e})")
            raise WorkerDied(plan.source, f"device {plan.source!r} at {link.address} died: {e}") from None

    def infer(self, *inputs, timeout: float | None = None):
        fut = self.submit(*inputs)
        return self._wait(fut, timeout)

    def _wait(self, fut: cf.Future, timeout: float | None):
        try:
            return fut.result(timeout if timeout is not None else self.timeout)
        except cf.TimeoutError:
            raise EdgepartError(f"request timed out after {timeout or self.timeout:.0f} s") from None

    def infer_many(self, xs, window: int = 32, timeout: float | None = None) -> list:
        """Run many requests with up to ``window`` in flight; results come back in the order of ``xs``."""
        xs = list(xs)
        futs: list[cf.Future] = []
        results = []
        for i, x in enumerate(xs):
            if len(futs) - len(results) >= window:
                results.append(self._wait(futs[len(results)], timeout))
            futs.append(self.submit(*(x if isinstance(x, (tuple, list)) else (x,))))
        while len(results) < len(futs):
            results.append(self._wait(futs[len(results)], timeout))
        return results

    def oldest_pending(self, plan: "PlanVersion") -> tuple[float, int]:
        """(age in s of the oldest attempt in flight on ``plan``, how many are in flight on it); (0, 0) if none.
        A plan whose requests stop coming back shows here before anything else measures it."""
        now = time.perf_counter()
        with self.lock:
            t0s = [r.sent for r in self.pending.values() if r.plan is plan]
        return (now - min(t0s), len(t0s)) if t0s else (0.0, 0)

    def stats(self, timeout: float = 5.0) -> dict[str, dict]:
        """Per-device counters from the workers: compute_us, bytes_sent, bytes_received, requests, failed,
        stage_us:S / stage_runs:S, inflight, cpu_load. A device that does not answer is left out."""
        out = {}
        for d, link in list(self.links.items()):
            if not link.alive:
                continue
            if not link.ctrl_lock.acquire(timeout=timeout):
                continue                                # a deploy is using the control channel
            try:
                link.ch.send({"kind": "stats"})
                out[d] = self._ctrl(link, ("stats",), timeout).get("stats", {})
            except (EdgepartError, OSError, PeerClosed, AttributeError):
                continue
            finally:
                link.ctrl_lock.release()
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self.lock:
            victims = [r for r in self.pending.values()] + list(self.parked)
            self.pending.clear()
            self.parked.clear()
        for r in victims:
            if not r.fut.done():
                r.fut.set_exception(EdgepartError("the session was closed"))
        for link in self.links.values():
            if link.ch is not None:
                link.alive = False
                try:
                    link.ch.send({"kind": "bye"})
                except (OSError, PeerClosed):
                    pass
                link.ch.close()
        for plan in self.plans.values():
            if plan.tmp:
                shutil.rmtree(plan.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(bundle_or_dir, endpoints, key, deploy: bool = True, **kw) -> Session:
    """Connect to running workers (``endpoints``: {device: "host:port"} or a YAML/JSON file), deploy, return a Session."""
    return Session(bundle_or_dir, endpoints, key, deploy=deploy, **kw)


# --- command line --------------------------------------------------------------------------
def _save_output(y, path: str) -> None:
    import numpy as np
    if isinstance(y, torch.Tensor):
        np.save(path, y.numpy(), allow_pickle=False)
        return
    flat = {}

    def walk(o, name):
        if isinstance(o, torch.Tensor):
            flat[name] = o.numpy()
        elif isinstance(o, (tuple, list)):
            for i, v in enumerate(o):
                walk(v, f"{name}_{i}")
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}_{k}")
    walk(y, "out")
    np.savez(path, **flat)


def run_main(argv: list[str] | None = None) -> int:
    """``edgepart run DIR --endpoints FILE --key-file FILE --input x.npy [--output y.npy]``."""
    import numpy as np
    p = argparse.ArgumentParser(prog="edgepart run", description="Run inputs through deployed workers.")
    p.add_argument("dir", help="bundle directory")
    p.add_argument("--endpoints", required=True, help="YAML/JSON file mapping device name to host:port")
    p.add_argument("--key-file", required=True)
    p.add_argument("--input", required=True, action="append", help=".npy file (repeat for several inputs)")
    p.add_argument("--output", help=".npy (or .npz for several outputs) to write")
    p.add_argument("--repeat", type=int, default=1, help="run the input this many times (pipelined); "
                                                         "prints latency")
    p.add_argument("--no-deploy", action="store_true", help="assume the bundle is already deployed")
    args = p.parse_args(argv)
    xs = tuple(torch.from_numpy(np.load(f, allow_pickle=False)) for f in args.input)
    with connect(args.dir, args.endpoints, read_key(args.key_file), deploy=not args.no_deploy) as s:
        t0 = time.perf_counter()
        ys = s.infer_many([xs] * args.repeat)
        dt = time.perf_counter() - t0
        lat = sorted(s.timings)
        print(f"{args.repeat} request(s) in {dt * 1e3:.1f} ms; latency median {lat[len(lat) // 2] * 1e3:.2f} ms")
    if args.output:
        _save_output(ys[0], args.output)
        print(f"output written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main())
