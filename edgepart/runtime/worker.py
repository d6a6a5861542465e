"""The worker: a long-running process on one device that runs its part of a bundle.

    edgepart worker --listen HOST:PORT --key-file FILE [--threads N] [--workdir DIR]

A client deploys the device's files (checked against the manifest's sha256) and
the addresses of the other workers; then every request is the device's action
list, run event by event: a piece that arrives goes to the request's mailbox, a
request whose next action is waiting for it is queued for the compute thread,
which runs stages and hands the pieces it sends to one sender thread per peer
(worker to worker, never through the client). Several requests are in flight at
once; one is advanced at a time, the oldest runnable first. Two shortcuts save
thread wake-ups on small requests: a connection's reader advances a request itself
when nothing is computing and this device's recent requests computed in under
5 ms, and small frames (results, pieces, pongs) are written by the thread that
produced them when nothing is queued, with a non-blocking write. A frame that
fails any check is refused with a logged reason and its connection is closed;
the worker stays up.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import heapq
import itertools
import json
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from edgepart.errors import EdgepartError
from edgepart.runtime.allocator import keep_freed_memory
from edgepart.runtime.protocol import (DEFAULT_MAX_PAYLOAD, Channel, FileSink, PeerClosed, ProtocolError,
                                       dtype_name, iter_leaves, parse_address, read_key)

log = logging.getLogger("edgepart.worker")

MAX_MANIFEST = 64 << 20
MAX_CONNECTIONS = 256
MAX_INFLIGHT = 4096
REQ_ID_MAX = 80
INLINE_COMPUTE_S = 0.005       # a reader thread runs a request itself only if recent ones computed this briefly
FCPM_KINDS = ("profile", "probe", "probe_ping", "probe_data")


class SenderNic:
    """An emulated device's one network interface, shared by its links to every peer.

    The cost model's switched links (``simulator``: "each device's outgoing NIC serialises the
    messages it sends, FIFO") send one message at a time: a message holds the NIC for its link's
    latency + bytes ÷ bandwidth, and the next one, to whichever peer, starts after it. The
    emulated links are one veth pair per pair of devices, each shaped on its own, so without this
    a device scattering pieces to three peers sent them at three times its bandwidth (MobileNetV2
    split four ways at 1000 Mbit/s measured 18 % under its prediction, and 8 % under the same
    plan simulated with parallel sends). Reservations are made in the order the device sends
    (its action list), before the pieces queue on their links."""

    def __init__(self):
        self.free = 0.0                    # monotonic time the NIC is next free
        self.lock = threading.Lock()

    def reserve(self, now: float, hold_s: float) -> float:
        """Take the NIC for ``hold_s`` seconds from ``now`` or when it frees up; the start time."""
        with self.lock:
            start = max(now, self.free)
            self.free = start + hold_s
        return start


class Shaper:
    """Per-peer emulated link in the sender: a token bucket for bandwidth and a delay line for latency,
    and the device's :class:`SenderNic` (``nic_mbps``: the link's bandwidth there) if it has one."""

    def __init__(self, bandwidth_mbps: float | None, latency_ms: float, nic: SenderNic | None = None,
                 nic_mbps: float | None = None):
        self.rate = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else None   # bytes / s
        self.latency = latency_ms / 1e3
        self.burst = 16 * 1024
        self.tokens = float(self.burst)
        self.t = time.monotonic()
        self.nic = nic if nic_mbps else None
        self.nic_rate = nic_mbps * 1e6 / 8 if nic_mbps else None

    def release_time(self, enqueued: float, nbytes: int = 0) -> float:
        """When a message of ``nbytes`` queued at ``enqueued`` may be written: after the link's latency,
        and after the messages the device sent before it have held its NIC."""
        if self.nic is None:
            return enqueued + self.latency
        return self.nic.reserve(enqueued, self.latency + nbytes / self.nic_rate) + self.latency

    def consume(self, nbytes: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= nbytes
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


INLINE_MAX = 64 << 10          # frames up to this size are written by the calling thread when nothing is queued
_FLUSH = object()              # queue marker: finish writing a frame that send_nowait only partly wrote


def _nbytes(parts) -> int:
    n = 0
    for p in parts:
        n += p.numel() * p.element_size() if isinstance(p, torch.Tensor) else len(p)
    return n


class OutQueue:
    """Frames for one channel, written in order; no reader or compute thread ever blocks on the socket.

    When nothing is queued, a small frame is written by the calling thread with a non-blocking
    write (``Channel.send_nowait``), which saves a thread wake-up per frame; anything else — large
    frames, frames behind others, the rest of a frame the socket took only part of — is written
    by the queue's own thread.
    """

    def __init__(self, channel: Channel, name: str, on_error=None):
        self.ch = channel
        self.q: collections.deque = collections.deque()
        self.cv = threading.Condition(threading.Lock())
        self.busy = False                  # the thread is writing
        self.on_error = on_error
        self.dead = False
        self.t = threading.Thread(target=self._run, name=f"out-{name}", daemon=True)
        self.t.start()

    def put(self, header: dict, parts=()) -> None:
        err = None
        with self.cv:
            if self.dead:
                return
            if not self.q and not self.busy and _nbytes(parts) <= INLINE_MAX:
                try:
                    if self.ch.send_nowait(header, parts):
                        if self.ch.tail_pending:
                            self.q.append(_FLUSH)
                            self.cv.notify()
                        return
                except (OSError, PeerClosed, ProtocolError) as e:
                    self.dead = True
                    err = e
            if err is None:
                self.q.append((header, parts))
                self.cv.notify()
                return
        if self.on_error:
            self.on_error(err)

    def close(self) -> None:
        with self.cv:
            self.q.append(None)
            self.cv.notify()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.q:
                    self.cv.wait()
                item = self.q.popleft()
                if item is None:
                    return
                if self.dead:
                    continue
                self.busy = True
            err = None
            try:
                if item is _FLUSH:
                    self.ch.flush()
                else:
                    self.ch.send(*item)
            except (OSError, PeerClosed, ProtocolError) as e:
                err = e
            with self.cv:
                self.busy = False
                if err is not None:
                    self.dead = True
            if err is not None and self.on_error:
                self.on_error(err)


class PeerLink:
    """This worker's outgoing connection to one peer device: a FIFO, a sender thread, a watcher for EOF.

    Like OutQueue, a small piece is written straight from the compute thread when the link is
    connected, unshaped and idle; the sender thread handles the rest (and connecting, shaping).
    """

    def __init__(self, worker: "Worker", device: str, address: str, shaper: Shaper | None):
        self.w = worker
        self.device = device
        self.address = address
        self.shaper = shaper
        self.q: collections.deque = collections.deque()
        self.cv = threading.Condition(threading.Lock())
        self.busy = False
        self.ch: Channel | None = None
        self.closed = False
        self.t = threading.Thread(target=self._run, name=f"peer-{device}", daemon=True)
        self.t.start()

    def put(self, header: dict, parts=(), req: "Req | None" = None) -> None:
        err = None
        with self.cv:
            ch = self.ch
            if (ch is not None and self.shaper is None and not self.q and not self.busy and not self.closed
                    and (req is None or not req.cancelled)):
                n = _nbytes(parts)
                if n <= INLINE_MAX:
                    try:
                        if ch.send_nowait(header, parts):
                            self.w.stats["bytes_sent"] += n
                            if ch.tail_pending:
                                self.q.append(_FLUSH)
                                self.cv.notify()
                            return
                    except (OSError, PeerClosed, ProtocolError) as e:
                        err = e
            if err is None:
                now = time.monotonic()
                # the NIC is reserved here, in the order the device sends, not when the link's thread gets to it
                release = self.shaper.release_time(now, _nbytes(parts)) if self.shaper is not None else now
                self.q.append((release, header, parts, req))
                self.cv.notify()
                return
        self._failed(ch, err, req)

    def close(self) -> None:
        self.closed = True
        with self.cv:
            self.q.append(None)
            self.cv.notify()

    def _connect(self) -> Channel:
        ch = Channel.connect(self.address, self.w.key, {"role": "peer", "name": self.w.device or "",
                                                        "bundle": self.w.bundle_id}, timeout=2.0)
        threading.Thread(target=self._watch, args=(ch,), name=f"watch-{self.device}", daemon=True).start()
        return ch

    def _watch(self, ch: Channel) -> None:
        try:
            while True:
                ch.recv(lambda h: None)          # the peer sends nothing on this connection but a bye
        except PeerClosed:
            reason = "closed the connection"
        except (OSError, ProtocolError) as e:
            reason = f"connection lost ({e})"
        if self.ch is ch:
            self.ch = None
        if not self.closed and not ch.closed:
            self.w._peer_down(self.device, reason)

    def _failed(self, ch: Channel | None, e: Exception, req: "Req | None") -> None:
        if ch is not None:
            ch.close()
            if self.ch is ch:
                self.ch = None
        reason = f"unreachable at {self.address} ({e})"
        if req is not None:
            self.w._fail(req, f"device {self.device!r} {reason}")
        self.w._peer_down(self.device, reason)

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.q:
                    self.cv.wait()
                item = self.q.popleft()
                self.busy = item is not None
            if item is None:
                ch = self.ch            # read once: the watch thread clears self.ch when the peer hangs up
                if ch is not None:
                    try:
                        ch.send({"kind": "bye"})
                    except (OSError, PeerClosed):
                        pass
                    ch.close()
                return
            try:
                self._send(item)
            finally:
                with self.cv:
                    self.busy = False

    def _send(self, item) -> None:
        ch = self.ch
        if item is _FLUSH:
            try:
                if ch is not None:
                    ch.flush()
            except (OSError, PeerClosed, ProtocolError) as e:
                self._failed(ch, e, None)
            return
        release, header, parts, req = item
        if req is not None and req.cancelled:
            return
        try:
            if self.shaper is not None:
                delay = release - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.shaper.consume(_nbytes(parts) + 200)
            if ch is None:
                ch = self.ch = self._connect()
            ch.send(header, parts)
            self.w.stats["bytes_sent"] += _nbytes(parts)
        except (OSError, PeerClosed, ProtocolError) as e:
            self._failed(ch, e, req)


class Req:
    __slots__ = ("id", "seq", "program", "pc", "store", "mailbox", "got", "waiting", "client", "inputs",
                 "created", "touched", "cancelled", "queued", "compute_s")

    def __init__(self, rid: str, seq: int, program):
        self.id = rid
        self.seq = seq
        self.program = program
        self.pc = 0
        self.store = program.new_store()
        self.mailbox: dict[tuple, torch.Tensor] = {}
        self.got: set[tuple] = set()
        self.waiting: Any = None
        self.client: OutQueue | None = None
        self.inputs: dict | None = None
        self.created = self.touched = time.monotonic()
        self.cancelled = False
        self.queued = False
        self.compute_s = 0.0


class Conn:
    def __init__(self, ch: Channel, out: OutQueue):
        self.ch = ch
        self.out = out
        self.role = str(ch.peer.get("role", "?"))[:16]
        self.name = str(ch.peer.get("name", ""))[:64]
        self.deploy: dict | None = None
        self.sink: tuple | None = None       # (rel, tmp path, FileSink) while a file frame is being received
        self.clean = False

    def label(self) -> str:
        return f"{self.role} {self.name or '?'} at {self.ch.peer_addr}"


class CpuDilation:
    """Emulation of a slower device: a compute stage lasts its CPU time ÷ share (wall clock).

    The share (0 < share ≤ 1, the fraction of this CPU the emulated device is) is read from a
    file the emulator writes and may rewrite (re-read when its mtime changes), so the testbed can
    follow a drifting host speed between requests. The stage runs at full speed, then the compute
    thread sleeps until CPU time ÷ share has passed since it started: time lost waiting for the CPU
    counts towards that, and pieces that arrive meanwhile are received at once — unlike a CFS
    quota, which enforces the share only in bursts of the scheduler tick (4 ms of CPU here), i.e.
    several milliseconds of device time per burst for a slow device.
    """

    def __init__(self, path: str):
        self.path = path
        self.mtime: int | None = None
        self.share = 1.0

    def current(self) -> float:
        try:
            m = os.stat(self.path).st_mtime_ns
            if m != self.mtime:
                v = float(Path(self.path).read_text().strip())
                if not 0 < v <= 1:
                    raise ValueError(f"share {v} not in (0, 1]")
                self.mtime, self.share = m, v
        except (OSError, ValueError) as e:
            log.warning("cpu share file %s: %s; keeping share %.3g", self.path, e, self.share)
        return self.share

    def stretch(self, t0: float, c0: float) -> float:
        """Sleep until the stage begun at wall t0 / thread CPU c0 has lasted CPU ÷ share; its duration."""
        target = (time.thread_time() - c0) / self.current()
        left = target - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return time.perf_counter() - t0


class Worker:
    def __init__(self, listen: str = "127.0.0.1:0", key: bytes = b"", threads: int = 1,
                 workdir: str | os.PathLike | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 request_timeout: float = 120.0, links: dict | None = None):
        if len(key) < 16:
            raise EdgepartError("the worker needs a shared key of at least 16 bytes (--key-file)")
        self.key = key
        self.listen_addr = parse_address(listen)
        self.threads = threads
        self._own_workdir = not workdir          # a temp dir of its own: removed by stop()
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgepart-worker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.max_payload = max_payload
        self.request_timeout = request_timeout
        self.links_cfg = links or {}          # emulation: {"peers": {dev: {"bandwidth_mbps", "latency_ms", "nic_mbps"}}}
        cpu_cfg = self.links_cfg.get("cpu") or {}    # emulation: {"cpu": {"share_file": path}}
        self.dilation = CpuDilation(str(cpu_cfg["share_file"])) if cpu_cfg.get("share_file") else None
        self.lock = threading.RLock()
        self.device: str | None = None
        self.bundle_id: str | None = None
        self.program = None
        self.manifest: dict | None = None
        self.peers: dict[str, str] = {}
        self.links: dict[str, PeerLink] = {}
        self.recv_specs: dict[tuple, tuple] = {}
        self.input_specs: list[tuple] = []
        self.partners: set[str] = set()
        self.begin_targets: list[str] = []
        self.reqs: dict[str, Req] = {}
        self.finished: collections.OrderedDict = collections.OrderedDict()
        self.runq: list = []
        self.runq_cv = threading.Condition(self.lock)
        self.computing = False               # a request is being advanced (by the compute or a reader thread)
        self.recent_compute: collections.deque = collections.deque(maxlen=16)   # s per finished request
        self.seq = itertools.count()
        self.conns: set[Conn] = set()
        self.stats = collections.Counter()
        self.stop_event = threading.Event()
        self.sock: socket.socket | None = None
        self.address: str | None = None

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> str:
        torch.set_num_threads(max(1, self.threads))
        s = socket.socket(socket.AF_INET6 if ":" in self.listen_addr[0] else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.listen_addr)
        s.listen(128)
        self.sock = s
        host, port = s.getsockname()[:2]
        self.address = f"{host}:{port}"
        for target, name in [(self._accept_loop, "accept"), (self._compute_loop, "compute"),
                             (self._reaper_loop, "reaper")]:
            threading.Thread(target=target, name=name, daemon=True).start()
        log.info("listening on %s (workdir %s, %d torch thread(s))", self.address, self.workdir, self.threads)
        return self.address

    def serve_forever(self) -> None:
        if self.sock is None:
            self.start()
        self.stop_event.wait()

    def stop(self) -> None:
        self.stop_event.set()
        with self.lock:
            self.runq_cv.notify_all()
            links = list(self.links.values())
            self.links = {}
            conns = list(self.conns)
        for link in links:
            link.close()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        for c in conns:
            c.ch.close()
        if self._own_workdir:       # deployed bundles (a VGG-16 device's part: hundreds of MB) go with it
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- connections --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.05)
                continue
            with self.lock:
                too_many = len(self.conns) >= MAX_CONNECTIONS
            if too_many:
                log.warning("refused connection from %s: %d connections already open", addr, MAX_CONNECTIONS)
                sock.close()
                continue
            threading.Thread(target=self._serve_conn, args=(sock, addr), name=f"conn-{addr[1]}",
                             daemon=True).start()

    def _serve_conn(self, sock: socket.socket, addr) -> None:
        where = "%s:%s" % addr[:2]
        try:
            ch = Channel.server_handshake(sock, self.key, {"role": "worker", "name": self.device or "",
                                                           "bundle": self.bundle_id}, max_payload=self.max_payload)
        except PeerClosed:
            sock.close()
            return
        except (ProtocolError, OSError, ValueError) as e:
            self.stats["refused"] += 1
            log.warning("refused connection from %s: %s", where, e)
            sock.close()
            return
        conn = Conn(ch, None)
        conn.out = OutQueue(ch, where)
        with self.lock:
            self.conns.add(conn)
        reason = None
        try:
            while not self.stop_event.is_set():
                frame = ch.recv(lambda h: self._expect(conn, h))
                self._dispatch(conn, frame)
                if conn.clean:
                    break
        except PeerClosed:
            reason = "closed the connection"
        except (ProtocolError, ValueError, KeyError, TypeError) as e:
            self.stats["refused"] += 1
            reason = f"refused frame: {e}"
            log.warning("refused frame from %s: %s; closing the connection", conn.label(), e)
            if not isinstance(e, ProtocolError) or "MAC" not in str(e):
                try:
                    ch.send({"kind": "refused", "reason": str(e)[:500]})
                except (OSError, PeerClosed, ProtocolError):
                    pass
        except OSError as e:
            reason = f"connection lost ({e})"
        finally:
            self._drop_sink(conn)
            conn.out.close()
            conn.out.t.join(timeout=1.0)
            ch.close()
            with self.lock:
                self.conns.discard(conn)
        if conn.role == "peer" and not conn.clean and conn.name and not self.stop_event.is_set():
            self._peer_down(conn.name, reason or "connection lost")
        if conn.role == "client":
            with self.lock:
                orphans = [r for r in self.reqs.values() if r.client is conn.out]
            for r in orphans:
                self._fail(r, "the client disconnected")

    def _expect(self, conn: Conn, h: dict):
        kind = h["kind"]
        if kind in ("ping", "pong", "bye", "commit", "cancel", "fail", "begin", "stats"):
            return None
        if kind == "deploy":
            return MAX_MANIFEST
        if kind == "file":
            d = conn.deploy
            rel = h.get("path")
            if d is None or rel not in d["need"]:
                raise ProtocolError(f"file {str(rel)[:100]!r} was not asked for by a deploy on this connection")
            target = d["dir"] / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".part{os.getpid()}")
            f = open(tmp, "wb")
            sink = FileSink(f, self.max_payload)
            conn.sink = (rel, tmp, sink)
            return sink
        if kind in FCPM_KINDS:               # remote profiling and link probes: edgepart/fcpm/remote.py
            from edgepart.fcpm import remote
            return remote.expect(self, conn, h)
        prog = self.program
        if prog is None:
            raise ProtocolError(f"{kind!r} frame but no bundle is deployed on this worker")
        if kind == "input":
            _req_id(h)
            if self.device != self.manifest["source_device"]:
                raise ProtocolError(f"inputs go to the source device {self.manifest['source_device']!r}, "
                                    f"this is {self.device!r}")
            return self.input_specs
        if kind == "piece":
            _req_id(h)
            rows = h.get("rows")
            if not (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows)):
                raise ProtocolError("piece frame needs rows [a, b]")
            key = (h.get("from"), h.get("tensor"), rows[0], rows[1])
            spec = self.recv_specs.get(key)
            if spec is None:
                raise ProtocolError(f"device {self.device!r} expects no piece {key[1]!r} rows {rows} from "
                                    f"{key[0]!r} in bundle {str(self.bundle_id)[:12]}")
            return [spec]
        raise ProtocolError(f"unknown frame kind {kind[:40]!r}")

    def _dispatch(self, conn: Conn, frame) -> None:
        kind = frame.kind
        h = frame.header
        if kind == "ping":
            conn.out.put({"kind": "pong", "t": h.get("t")})
        elif kind == "bye":
            conn.clean = True
        elif kind == "piece":
            self.stats["bytes_received"] += frame.parts[0].numel() * frame.parts[0].element_size()
            self._on_piece(h, frame.parts[0])
            self._kick()
        elif kind == "input":
            self._on_input(conn, h, frame.parts)
            self._kick()
        elif kind == "cancel":
            self._cancel(_req_id(h), str(h.get("reason", "cancelled"))[:300])
        elif kind == "fail":
            with self.lock:
                req = self.reqs.get(_req_id(h))
            if req is not None:
                self._fail(req, str(h.get("error", "failed"))[:2000])
        elif kind == "begin":
            with self.lock:
                self._get_req(_req_id(h))
            self._kick()
        elif kind == "stats":
            conn.out.put({"kind": "stats", "device": self.device, "stats": dict(self.stats)})
        elif kind == "deploy":
            self._deploy_begin(conn, h, frame.parts[0])
        elif kind == "file":
            self._deploy_file(conn)
        elif kind == "commit":
            self._deploy_commit(conn)
        elif kind == "pong":
            pass
        elif kind in FCPM_KINDS:
            from edgepart.fcpm import remote
            remote.dispatch(self, conn, frame)

    # --- deploy ----------------------------------------------------------------------------
    def _deploy_begin(self, conn: Conn, h: dict, manifest_bytes: bytes) -> None:
        device, bid, peers = h.get("device"), h.get("bundle"), h.get("peers")
        try:
            if hashlib.sha256(manifest_bytes).hexdigest() != bid:
                raise EdgepartError("the manifest's sha256 does not match the bundle id it was sent with")
            manifest = json.loads(manifest_bytes)
            if not isinstance(manifest, dict) or device not in manifest.get("devices", {}):
                raise EdgepartError(f"device {device!r} is not in this bundle")
            if not isinstance(peers, dict) or not all(isinstance(v, str) for v in peers.values()):
                raise EdgepartError("deploy needs peers {device: 'host:port'}")
            for d in manifest["devices"]:
                if d != device and d not in peers:
                    raise EdgepartError(f"deploy gives no address for peer device {d!r}")
            with self.lock:
                if self.bundle_id == bid and self.device == device and self.peers == peers:
                    conn.out.put({"kind": "deploy_ok", "device": device, "already": True})
                    return
            bdir = self.workdir / "bundles" / bid
            bdir.mkdir(parents=True, exist_ok=True)
            (bdir / "manifest.json").write_bytes(manifest_bytes)
            files = manifest["devices"][device]["files"]
            need = []
            for rel in files:
                if Path(rel).is_absolute() or ".." in Path(rel).parts or rel not in manifest.get("files", {}):
                    raise EdgepartError(f"bundle file {rel!r} is outside the bundle or not in its file list")
                p = bdir / rel
                if not (p.is_file() and _sha256(p) == manifest["files"][rel]):
                    need.append(rel)
            conn.deploy = {"bid": bid, "device": device, "peers": peers, "manifest": manifest, "dir": bdir,
                           "need": set(need)}
            conn.out.put({"kind": "deploy_need", "files": need})
        except (EdgepartError, ValueError, KeyError, TypeError, OSError) as e:
            log.warning("refused deploy from %s: %s", conn.label(), e)
            conn.deploy = None
            conn.out.put({"kind": "deploy_error", "error": f"deploy refused by worker {self.address}: {e}"})

    def _drop_sink(self, conn: Conn) -> None:
        if conn.sink is not None:
            _, tmp, sink = conn.sink
            conn.sink = None
            try:
                sink.f.close()
                tmp.unlink()
            except OSError:
                pass

    def _deploy_file(self, conn: Conn) -> None:
        rel, tmp, sink = conn.sink
        conn.sink = None
        sink.f.close()
        d = conn.deploy
        want = d["manifest"]["files"][rel]
        if sink.sha256.hexdigest() != want:
            tmp.unlink(missing_ok=True)
            msg = (f"bundle file {rel!r}: sha256 {sink.sha256.hexdigest()[:16]}… does not match the manifest "
                   f"({want[:16]}…); the file was modified or corrupted — refused")
            log.warning("refused deploy from %s: %s", conn.label(), msg)
            conn.deploy = None
            conn.out.put({"kind": "deploy_error", "error": msg})
            return
        os.replace(tmp, d["dir"] / rel)
        d["need"].discard(rel)
        conn.out.put({"kind": "file_ok", "path": rel})

    def _deploy_commit(self, conn: Conn) -> None:
        d = conn.deploy
        conn.deploy = None
        try:
            if d is None:
                raise EdgepartError("commit without a deploy in progress (an earlier step was refused)")
            if d["need"]:
                raise EdgepartError(f"commit before all files arrived; missing {sorted(d['need'])}")
            from edgepart.runtime.program import DeviceProgram
            prog = DeviceProgram.from_bundle(d["dir"], d["device"])
            self._activate(prog, d["bid"], d["peers"])
            log.info("deployed bundle %s as device %r (%s)", d["bid"][:12], d["device"], d["manifest"].get("model"))
            conn.out.put({"kind": "deploy_ok", "device": d["device"]})
        except Exception as e:  # noqa: BLE001 — any load failure is reported to the deployer
            log.warning("refused deploy from %s: %s", conn.label(), e)
            conn.out.put({"kind": "deploy_error", "error": f"worker {self.address}: {type(e).__name__}: {e}"})

    def _activate(self, prog, bid: str, peers: dict) -> None:
        manifest = prog.manifest
        device = prog.device
        recv_specs = {}
        for act in prog.actions:
            if act["op"] == "recv":
                a, b = act["rows"]
                dt, shape = prog.piece_spec(act["tensor"], a, b)
                recv_specs[(act["from"], act["tensor"], a, b)] = (dtype_name(dt), tuple(shape))
        partners = {act.get("from") or act.get("to") for act in prog.actions if act["op"] in ("recv", "send")}
        begin = []
        if device == manifest["source_device"]:
            for d, spec in manifest["devices"].items():
                if d != device and spec["actions"] and spec["actions"][0]["op"] != "recv":
                    begin.append(d)
        with self.lock:
            old = list(self.reqs.values())
            old_links = list(self.links.values())
            self.program, self.manifest, self.device, self.bundle_id = prog, manifest, device, bid
            self.recent_compute.clear()
            self.peers = dict(peers)
            self.recv_specs = recv_specs
            self.input_specs = [(s["dtype"], tuple(s["shape"])) for s in manifest["inputs"]]
            self.partners = partners | ({manifest["source_device"]} - {device}) | set(begin)
            self.begin_targets = begin
            peer_cfg = self.links_cfg.get("peers", {})
            nic = SenderNic() if any((c or {}).get("nic_mbps") for c in peer_cfg.values()) else None
            self.links = {}
            for d, addr in peers.items():
                if d == device or d not in manifest["devices"]:
                    continue
                cfg = peer_cfg.get(d)
                shaper = (Shaper(cfg.get("bandwidth_mbps"), cfg.get("latency_ms", 0.0), nic, cfg.get("nic_mbps"))
                          if cfg else None)
                self.links[d] = PeerLink(self, d, addr, shaper)
        for link in old_links:
            link.close()
        for r in old:
            self._fail(r, f"device {device!r} was redeployed")

    # --- requests ---------------------------------------------------------------------------
    def _get_req(self, rid: str) -> Req | None:
        """The request's state, created (and queued once) on first mention. Caller holds the lock."""
        req = self.reqs.get(rid)
        if req is None:
            if rid in self.finished:
                return None
            if len(self.reqs) >= MAX_INFLIGHT:
                raise ProtocolError(f"{MAX_INFLIGHT} requests already in flight")
            req = Req(rid, next(self.seq), self.program)
            self.reqs[rid] = req
            for d in self.begin_targets:
                link = self.links.get(d)
                if link:
                    link.put({"kind": "begin", "req": rid})
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

    def _run(self, req: Req) -> None:
        try:
            self._advance(req)
        except Exception as e:  # noqa: BLE001 — a failing request must not stop the worker
            log.exception("request %s failed", req.id)
            self._fail(req, f"device {self.device!r}: {type(e).__name__}: {e}")
        finally:
            with self.lock:
                self.computing = False
                if self.runq:
                    self.runq_cv.notify()

    def _on_input(self, conn: Conn, h: dict, parts: list) -> None:
        rid = _req_id(h)
        with self.lock:
            if rid in self.reqs:
                raise ProtocolError(f"request id {rid!r} is already in flight")
            self.finished.pop(rid, None)
            req = self._get_req(rid)
            req.client = conn.out
            req.inputs = {s["name"]: x for s, x in zip(self.manifest["inputs"], parts)}
            if req.waiting == ("input",):
                req.waiting = None
                self._schedule(req)

    def _on_piece(self, h: dict, value: torch.Tensor) -> None:
        rid = h["req"]
        key = (h["from"], h["tensor"], h["rows"][0], h["rows"][1])
        with self.lock:
            req = self._get_req(rid)
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

    def _compute_loop(self) -> None:
        torch.set_num_threads(max(1, self.threads))
        while not self.stop_event.is_set():
            with self.lock:
                while (not self.runq or self.computing) and not self.stop_event.is_set():
                    self.runq_cv.wait(1.0)
                if self.stop_event.is_set():
                    return
                req = self._pop_runnable()
            self._run(req)

    def _advance(self, req: Req) -> None:
        prog = req.program
        acts = prog.actions
        store = req.store
        while not req.cancelled:
            if req.pc >= len(acts):
                self._finish(req)
                return
            act = acts[req.pc]
            op = act["op"]
            if op == "input":
                with self.lock:
                    if req.inputs is None:
                        req.waiting = ("input",)
                        return
                t = act["tensor"]
                store.put(t, 0, prog.manifest["tensors"][t]["rows"], req.inputs[t])
            elif op == "recv":
                a, b = act["rows"]
                key = (act["from"], act["tensor"], a, b)
                with self.lock:
                    v = req.mailbox.pop(key, None)
                    if v is None:
                        req.waiting = key
                        return
                store.put(act["tensor"], a, b, v)
            elif op == "run":
                t0 = time.perf_counter()
                c0 = time.thread_time()
                f0, s0 = _thread_usage()
                try:
                    prog.run_stage(act["stage"], store)
                except Exception as e:  # noqa: BLE001
                    raise EdgepartError(f"stage {act['stage']}: {type(e).__name__}: {e}") from e
                f1, s1 = _thread_usage()
                cpu, faults = time.thread_time() - c0, f1 - f0
                dt = self.dilation.stretch(t0, c0) if self.dilation else time.perf_counter() - t0
                req.compute_s += dt
                self.stats["compute_us"] += int(dt * 1e6)
                # per stage, so a testbed can compare each stage with its prediction
                self.stats[f"stage_us:{act['stage']}"] += int(dt * 1e6)
                self.stats[f"stage_cpu_us:{act['stage']}"] += int(cpu * 1e6)
                self.stats[f"stage_faults:{act['stage']}"] += faults
                # preempted mid-stage (by another worker or this one's socket threads on a shared CPU)
                self.stats[f"stage_preempted:{act['stage']}"] += s1 - s0
            elif op == "send":
                a, b = act["rows"]
                piece = store.get(act["tensor"], a, b)
                piece = piece.contiguous() if isinstance(piece, torch.Tensor) else torch.as_tensor(piece)
                link = self.links.get(act["to"])
                if link is None:
                    raise EdgepartError(f"no link to device {act['to']!r}")
                link.put({"kind": "piece", "req": req.id, "tensor": act["tensor"], "rows": [a, b],
                          "from": self.device}, [piece], req)
            elif op == "output":
                out = prog.make_output(store)
                values, parts = _flatten_output(out, prog.manifest["output"])
                if req.client is not None:
                    req.client.put({"kind": "result", "req": req.id, "values": values,
                                    "compute_ms": round(req.compute_s * 1e3, 3)}, parts)
            else:
                raise EdgepartError(f"unknown action {op!r}")
            req.pc += 1
            req.touched = time.monotonic()

    def _finish(self, req: Req) -> None:
        with self.lock:
            self.reqs.pop(req.id, None)
            self._remember(req.id)
            self.stats["requests"] += 1
            if req.program is self.program:
                self.recent_compute.append(req.compute_s)

    def _remember(self, rid: str) -> None:
        self.finished[rid] = None
        while len(self.finished) > 8192:
            self.finished.popitem(last=False)

    def _fail(self, req: Req, reason: str) -> None:
        with self.lock:
            if self.reqs.get(req.id) is not req:
                return
            del self.reqs[req.id]
            self._remember(req.id)
            req.cancelled = True
            self.stats["failed"] += 1
            links = dict(self.links)
            source = self.manifest["source_device"] if self.manifest else None
        log.info("request %s failed: %s", req.id, reason)
        if self.device == source:
            if req.client is not None:
                req.client.put({"kind": "error", "req": req.id, "device": self.device, "error": reason})
            for d, link in links.items():
                link.put({"kind": "cancel", "req": req.id, "reason": reason})
        elif source in links:
            links[source].put({"kind": "fail", "req": req.id, "error": reason})

    def _cancel(self, rid: str, reason: str) -> None:
        with self.lock:
            req = self.reqs.pop(rid, None)
            self._remember(rid)
            if req is not None:
                req.cancelled = True

    def _peer_down(self, device: str, reason: str) -> None:
        with self.lock:
            victims = list(self.reqs.values()) if device in self.partners else []
        if victims:
            log.warning("peer device %r is down (%s); failing %d request(s)", device, reason, len(victims))
        for r in victims:
            self._fail(r, f"device {device!r} is down: {reason}")

    def _reaper_loop(self) -> None:
        while not self.stop_event.wait(1.0):
            now = time.monotonic()
            with self.lock:
                stale = [r for r in self.reqs.values() if now - r.touched > self.request_timeout]
            for r in stale:
                self._fail(r, f"device {self.device!r}: request timed out after {self.request_timeout:.0f} s "
                              f"waiting for {r.waiting}")


def _req_id(h: dict) -> str:
    rid = h.get("req")
    if not isinstance(rid, str) or not 0 < len(rid) <= REQ_ID_MAX:
        raise ProtocolError("frame needs a request id (string of at most 80 chars)")
    return rid


def _flatten_output(out, spec: dict) -> tuple[list, list]:
    """Leaves of the output in the manifest's order: tensors go as parts, anything else as a JSON value."""
    values, parts = [], []

    def walk(o, s):
        if "tensor" in s:
            if isinstance(o, torch.Tensor):
                values.append(None)
                parts.append(o.contiguous())
            else:
                values.append(o if isinstance(o, (int, float, bool, str)) or o is None else str(o))
        elif "tuple" in s or "list" in s:
            for x, ss in zip(o, s.get("tuple", s.get("list"))):
                walk(x, ss)
        elif "dict" in s:
            for k, ss in s["dict"].items():
                walk(o[k], ss)
    walk(out, spec)
    assert len(values) == len(list(iter_leaves(spec)))
    return values, parts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- command line ------------------------------------------------------------------------
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)     # Linux only


def _thread_usage() -> tuple[int, int]:
    """(minor page faults, involuntary context switches) of the calling thread so far ((0, 0) where the
    OS does not count them per thread)."""
    if _RUSAGE_THREAD is None:
        return 0, 0
    u = resource.getrusage(_RUSAGE_THREAD)
    return u.ru_minflt, u.ru_nivcsw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepart worker", description="Run an edgepart worker on this device.")
    p.add_argument("--listen", default="127.0.0.1:7700", help="HOST:PORT to listen on (port 0: any free port)")
    p.add_argument("--key-file", required=True, help="file holding the shared key (raw bytes or hex)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for compute (default 1)")
    p.add_argument("--workdir", help="where deployed bundles are kept (default: a new temp dir)")
    p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD, help="largest frame payload accepted")
    p.add_argument("--request-timeout", type=float, default=120.0, help="drop a request idle this long (s)")
    p.add_argument("--links", help="emulation: JSON {peers: {device: {bandwidth_mbps, latency_ms}}} shaped in "
                                    "the sender, and optionally cpu: {share_file: PATH} (see CpuDilation)")
    p.add_argument("--exit-with-parent", type=int, help="exit when the process with this pid is gone")
    p.add_argument("--log-level", default="INFO")
    return p


def serve(listen: str, key: bytes, threads: int = 1, workdir=None, **kw) -> Worker:
    """Start a worker in this process (background threads); returns it. ``w.stop()`` stops it."""
    w = Worker(listen, key, threads, workdir, **kw)
    w.start()
    return w


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    key = read_key(args.key_file)
    sys.setswitchinterval(2e-4)     # hand the GIL over promptly between reader, compute and sender threads
    if not keep_freed_memory():
        log.info("could not tune malloc (not glibc): tensors may be page-faulted in on every request")
    links = json.loads(args.links) if args.links else None
    w = Worker(args.listen, key, args.threads, args.workdir, max_payload=args.max_payload,
               request_timeout=args.request_timeout, links=links)
    addr = w.start()
    print(f"edgepart worker listening on {addr}", flush=True)

    def on_signal(signum, frame):
        w.stop_event.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_with_parent:
        parent = args.exit_with_parent

        def watch():
            while not w.stop_event.wait(0.5):
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    log.warning("parent process %d is gone; exiting", parent)
                    w.stop_event.set()
        threading.Thread(target=watch, daemon=True).start()
    w.stop_event.wait()
    w.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
