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

CLI: ``edgepart run DIR --endpoints FILE --key-file FILE --input x.npy --output y.npy``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import itertools
import logging
import mmap
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from edgepart.errors import BundleError, EdgepartError, WorkerDied, error_for
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
        self.ctrl: queue.Queue = queue.Queue()
        self.reason = ""
        self.refused = ""


class Session:
    def __init__(self, bundle_or_dir, endpoints, key, deploy: bool = True, timeout: float = 300.0,
                 heartbeat: float = 1.0, dead_after: float = 3.5, peer_endpoints: dict | None = None,
                 connect_timeout: float = 5.0, sign_key=None):
        self.sign_key = sign_key       # Ed25519PrivateKey: deploys are signed (workers with --deploy-pubkey)
        self.dir, self._tmp = bundle_dir_of(bundle_or_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise BundleError(f"{path}: no manifest.json here; is {self.dir} a bundle directory?")
        self.manifest_bytes = path.read_bytes()
        self.manifest = Manifest.from_json(self.manifest_bytes, str(path))
        self.bundle_id = hashlib.sha256(self.manifest_bytes).hexdigest()
        self.key = as_key(key)
        self.endpoints = load_endpoints(endpoints)
        missing = [d for d in self.manifest.devices if d not in self.endpoints]
        if missing:
            raise EdgepartError(f"no endpoint for device(s) {missing}; endpoints given: {sorted(self.endpoints)}")
        # what each worker should dial to reach each peer (differs from ours under netns emulation)
        self.peer_endpoints = peer_endpoints or {d: dict(self.endpoints) for d in self.manifest.devices}
        self.source = self.manifest.source_device
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.connect_timeout = connect_timeout
        self.links = {d: _Link(d, self.endpoints[d]) for d in self.manifest.devices}
        self.lock = threading.RLock()
        self.revive_lock = threading.Lock()
        self.pending: dict[str, tuple[cf.Future, float]] = {}
        self.sid = os.urandom(6).hex()
        self.counter = itertools.count()
        self.closed = False
        self.timings: list[float] = []
        self._stop = threading.Event()
        errors = {}

        def open_one(d):
            try:
                self._open(self.links[d], deploy)
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
        link.last_seen = time.monotonic()
        link.unanswered_since = None
        link.alive = True
        link.refused = ""
        threading.Thread(target=self._reader, args=(link, ch), name=f"client-{link.device}", daemon=True).start()
        if deploy:
            self._deploy(link)

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

    def _deploy(self, link: _Link) -> None:
        d = link.device
        hdr = {"kind": "deploy", "device": d, "bundle": self.bundle_id, "peers": self.peer_endpoints[d]}
        if self.sign_key is not None:
            hdr["signature"] = sign_deploy(self.sign_key, self.bundle_id, d, self.peer_endpoints[d])
        link.ch.send(hdr, [self.manifest_bytes])
        h = self._ctrl(link, ("deploy_need", "deploy_ok"))
        if h["kind"] == "deploy_ok":
            return
        for rel in h.get("files", []):
            path = self.dir / rel
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
            self._ctrl(link, ("file_ok",))
        link.ch.send({"kind": "commit"})
        self._ctrl(link, ("deploy_ok",))

    def _expect(self, h: dict):
        if h["kind"] != "result":
            return None
        values = h.get("values")
        leaves = output_tree.leaves(self.manifest.output)
        if not isinstance(values, list) or len(values) != len(leaves):
            raise ProtocolError("result frame: 'values' does not match the bundle's outputs")
        specs = []
        for leaf, v in zip(leaves, values):
            if v is None:
                meta = self.manifest.tensors.get(leaf)
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
                        entry = self.pending.pop(rid, None)
                    if entry is None:
                        continue
                    fut, t0 = entry
                    if kind == "result":
                        self.timings.append(time.perf_counter() - t0)
                        fut.set_result(self._rebuild(frame.header["values"], frame.parts))
                    else:
                        fut.set_exception(self._remote_error(frame.header))
                elif kind == "refused":
                    link.refused = f"worker refused a frame: {frame.get('reason')}"
                    log.warning("device %r: %s", link.device, link.refused)
                elif kind != "pong":
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

    def _rebuild(self, values: list, parts: list):
        it_v, it_p = iter(values), iter(parts)

        def leaf(_name):    # a value sent inline in the header, else the next raw tensor part
            v = next(it_v)
            return next(it_p) if v is None else v
        return output_tree.walk(self.manifest.output, leaf)

    def _dead(self, link: _Link, reason: str) -> None:
        with self.lock:
            if not link.alive:
                return
            link.alive = False
            link.reason = reason
            victims = list(self.pending.items())
            self.pending.clear()
        if link.ch is not None:
            link.ch.close()
        if self.closed:
            return
        msg = f"device {link.device!r} at {link.address} died: {reason}"
        log.warning(msg)
        for rid, (fut, _) in victims:
            if not fut.done():
                fut.set_exception(WorkerDied(link.device, msg))
        for other in self.links.values():
            if other.alive and other is not link:
                for rid, _ in victims:
                    try:
                        other.ch.send({"kind": "cancel", "req": rid, "reason": msg})
                    except (OSError, PeerClosed):
                        pass

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            now = time.monotonic()
            for link in list(self.links.values()):
                if not link.alive:
                    continue
                if link.unanswered_since is not None and now - link.unanswered_since > self.dead_after:
                    self._dead(link, f"no answer for {now - link.unanswered_since:.1f} s")
                    continue
                try:
                    if link.unanswered_since is None:
                        link.unanswered_since = now
                    link.ch.send({"kind": "ping", "t": now})
                except (OSError, PeerClosed) as e:
                    self._dead(link, f"connection lost ({e})")

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
                        self._open(link, deploy=True)
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
        """Send one request; the future resolves to its output (or raises WorkerDied / RemoteError)."""
        if self.closed:
            raise EdgepartError("the session is closed")
        xs = check_inputs(self.manifest, inputs)
        self._revive()
        rid = f"{self.sid}:{next(self.counter)}"
        fut: cf.Future = cf.Future()
        with self.lock:
            self.pending[rid] = (fut, time.perf_counter())
        link = self.links[self.source]
        try:
            link.ch.send({"kind": "input", "req": rid}, [x.contiguous() for x in xs])
        except (OSError, PeerClosed, AttributeError) as e:
            with self.lock:
                self.pending.pop(rid, None)
            self._dead(link, f"connection lost ({e})")
            raise WorkerDied(self.source, f"device {self.source!r} at {link.address} died: {e}") from None
        return fut

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

    def stats(self, timeout: float = 5.0) -> dict[str, dict]:
        """Per-device counters from the workers: compute_us, bytes_sent, bytes_received, requests, failed."""
        out = {}
        for d, link in self.links.items():
            if not link.alive:
                continue
            link.ch.send({"kind": "stats"})
            out[d] = self._ctrl(link, ("stats",), timeout).get("stats", {})
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self.lock:
            victims = list(self.pending.values())
            self.pending.clear()
        for fut, _ in victims:
            if not fut.done():
                fut.set_exception(EdgepartError("the session was closed"))
        for link in self.links.values():
            if link.ch is not None:
                link.alive = False
                try:
                    link.ch.send({"kind": "bye"})
                except (OSError, PeerClosed):
                    pass
                link.ch.close()
        if self._tmp:
            import shutil
            shutil.rmtree(self._tmp, ignore_errors=True)

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
