"""The worker's side of a deploy: ``deploy`` (manifest and peers), ``file`` (each file it lacks), ``commit``.

A client sends the manifest, with its sha256 as the bundle id and the addresses of the other
workers; the worker answers with the files it does not already hold with the manifest's sha256
(``deploy_need``), receives each of them to disk (checked against the manifest as it arrives),
and on ``commit`` loads the device's program — every file checked again — and activates it:
requests of the previous bundle fail and links to the new bundle's peers are opened on demand.
Deploying the bundle that is already active, with the same peers, is a no-op.

Files are also kept by content: every file received is hard-linked as ``workdir/blobs/<sha256>``,
and a later deploy of any bundle that lists a file with a held sha256 links it from there instead
of asking for it, so plans and model versions deployed one after another ship only the files that
changed. A link is a new name for the same bytes; nothing rewrites a file in place (received files
replace their temporary names), and loading checks every sha256 again. Any refusal is a
``deploy_error`` frame (code ``deploy_failed``) and ends that deploy, not the connection.
The client side is deploy_client.py.

Several connections may deploy the same bundle at once: each writes its files under temporary
names of its own and renames them into place, and every step that reads or changes a bundle's
directory (checking what is there, renaming a file in, loading and activating) holds that bundle's
lock. A disk error at any step (a full disk, a read-only work directory) is a ``deploy_error``
naming the bundle file, never a dropped connection. Messages name bundle files by their path in
the bundle, never the worker's own paths. Files in the bundle's directory that the manifest does
not list are reported (logged, and listed in ``deploy_ok`` as ``unlisted``); nothing ever loads
them. A worker given a deploy public key (``--deploy-pubkey``) takes only deploys signed by its
private key (runtime/signing.py; docs/security.md). After a deploy the worker hands freed memory
back to the OS.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgepart.errors import EdgepartError, ErrorCode
from edgepart.ir.hashing import sha256_file
from edgepart.ir.manifest import Manifest, Recv
from edgepart.runtime.execution import Deployment, Executor
from edgepart.runtime.program import DeviceProgram
from edgepart.runtime.protocol import Failure, FileSink, Frame, ProtocolError, dtype_name
from edgepart.runtime.server import Conn, Server
from edgepart.runtime.signing import verify_deploy
from edgepart.runtime.transport import LinkShaperFactory, PeerLink

log = logging.getLogger("edgepart.worker")

MAX_MANIFEST = 4 << 20          # bytes: a ResNet-50 manifest is ~0.3 MB; more is refused before it is read
LOCK_TIMEOUT = 120.0            # s a deploy step waits for another connection's step on the same bundle
BUNDLE_SIDE_FILES = {"manifest.json"}


class _GuardedFile:
    """The file a ``file`` frame streams into: a write error (full disk) is kept, not raised, so the
    frame is still read to its end and the deploy refused with a deploy_error naming the file."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> None:
        if self.error is None:
            try:
                self.f.write(data)
            except OSError as e:
                self.error = e

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as e:
            self.error = self.error or e


class _Discard:
    """Where a file frame goes when its temporary file could not be made (the error is reported)."""

    def __init__(self, error: OSError):
        self.error = error

    def write(self, data) -> None:
        pass

    def close(self) -> None:
        pass


def _oserror(rel: str, what: str, e: OSError) -> str:
    """A deploy_error message for a disk error on bundle file ``rel``, without the worker's paths."""
    return f"bundle file {rel!r}: could not {what} on the worker: {e.strerror or type(e).__name__}"


@dataclass
class Upload:
    """A deploy in progress on one connection, between its ``deploy`` and ``commit`` frames."""

    bundle_id: str
    device: str
    peers: dict[str, str]
    manifest: Manifest
    dir: Path
    need: set[str]                                     # files still to come
    sink: tuple[str, Path, FileSink] | None = None     # (path, temp file, sink) while a file frame is received


class Deployer:
    """Takes deploys into ``workdir``/bundles/<bundle id> and activates them on ``executor``.

    ``link_shaper``: the test bed's shaping of links to peers (see transport.LinkShaperFactory);
    ``address()``: this worker's address, for messages; ``backend``: run every deployed program on
    this backend (``torch`` or ``onnxruntime``; None: the one the compiler chose for the device).
    """

    def __init__(self, workdir: Path, executor: Executor, key: bytes, max_payload: int,
                 address: Callable[[], str | None], link_shaper: LinkShaperFactory | None = None,
                 deploy_pubkey=None, backend: str | None = None):
        self.workdir = workdir
        self.deploy_pubkey = deploy_pubkey             # Ed25519PublicKey: deploys must be signed by it
        self.backend = backend
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.server: Server | None = None
        self.executor = executor
        self.key = key
        self.max_payload = max_payload
        self.address = address
        self.link_shaper = link_shaper
        self.uploads: dict[Conn, Upload | None] = {}

    def _trim(self) -> None:
        if self.server is not None:
            self.server.request_trim()

    def register(self, server: Server) -> None:
        self.server = server
        server.register("deploy", self._on_deploy, lambda conn, h: MAX_MANIFEST)
        server.register("file", self._on_file, self._expect_file)
        server.register("commit", self._on_commit)
        server.on_disconnect(lambda conn, reason: self._drop(conn))

    def _lock(self, bid: str) -> threading.Lock:
        """The lock of bundle ``bid``'s directory (one per bundle; a handful of bundles per worker)."""
        with self._locks_lock:
            return self._locks.setdefault(bid, threading.Lock())

    def _scrub(self, message: str) -> str:
        """A message without the worker's own paths (bundle files are named relative to the bundle)."""
        for root, name in ((str(self.workdir / "bundles"), "<bundles>"), (str(self.workdir), "<workdir>")):
            message = message.replace(root, name)
        return message

    def _refuse(self, conn: Conn, device, message: str) -> None:
        """Answer ``deploy_error`` for the device being deployed and forget the connection's deploy."""
        message = self._scrub(message)
        log.warning("refused deploy from %s: %s", conn.label(), message)
        self._drop(conn)
        device = device[:64] if isinstance(device, str) else None
        conn.out.put({"kind": "deploy_error", **Failure(ErrorCode.DEPLOY_FAILED, device, message).fields()})

    def _on_deploy(self, conn: Conn, frame: Frame) -> None:
        h, manifest_bytes = frame.header, frame.parts[0]
        device, bid, peers = h.get("device"), h.get("bundle"), h.get("peers")
        self._drop(conn)
        try:
            if not isinstance(bid, str) or hashlib.sha256(manifest_bytes).hexdigest() != bid:
                raise EdgepartError("the manifest's sha256 does not match the bundle id it was sent with")
            if not isinstance(peers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in peers.items()):
                raise EdgepartError("deploy needs peers {device: 'host:port'}")
            if self.deploy_pubkey is not None and not (isinstance(device, str) and verify_deploy(
                    self.deploy_pubkey, h.get("signature"), bid, device, peers)):
                raise EdgepartError("this worker takes only deploys signed with its deploy key (edgepart deploy "
                                    "--sign-key FILE); this one is " +
                                    ("unsigned" if h.get("signature") is None else
                                     "signed with another key, or for another bundle, device or peers"))
            manifest = Manifest.from_json(manifest_bytes, "the deployed manifest")
            if device not in manifest.devices:
                raise EdgepartError(f"device {str(device)[:64]!r} is not in this bundle")
            for d in manifest.devices:
                if d != device and d not in peers:
                    raise EdgepartError(f"deploy gives no address for peer device {d!r}")
            if self._already(bid, device, peers):
                conn.out.put({"kind": "deploy_ok", "device": device, "already": True})
                return
            bdir = self.workdir / "bundles" / bid
            need = []
            lock = self._lock(bid)
            if not lock.acquire(timeout=LOCK_TIMEOUT):
                raise EdgepartError(f"another deploy of this bundle held it for {LOCK_TIMEOUT:.0f} s; try again")
            try:
                try:
                    bdir.mkdir(parents=True, exist_ok=True)
                    _write_atomic(bdir / "manifest.json", manifest_bytes)
                except OSError as e:
                    raise EdgepartError(_oserror("manifest.json", "write", e)) from None
                for rel in manifest.devices[device].files:     # each inside the bundle (checked when parsed)
                    if rel not in manifest.files:
                        raise EdgepartError(f"bundle file {rel!r} is not in the manifest's file list")
                    p = bdir / rel
                    try:
                        held = p.is_file() and not p.is_symlink() and sha256_file(p) == manifest.files[rel]
                    except OSError:
                        held = False                            # unreadable: sent again
                    if held:
                        continue
                    if not self._link_held(manifest.files[rel], p):
                        need.append(rel)
            finally:
                lock.release()
            self.uploads[conn] = Upload(bid, device, peers, manifest, bdir, set(need))
            conn.out.put({"kind": "deploy_need", "files": need})
        except (EdgepartError, ValueError, KeyError, TypeError) as e:
            self._refuse(conn, device, f"deploy refused by worker {self.address()}: {e}")
        finally:
            self._trim()

    def _already(self, bid: str, device: str, peers: dict) -> bool:
        active = self.executor.active
        return active is not None and (active.bundle_id, active.device, active.peers) == (bid, device, peers)

    def _expect_file(self, conn: Conn, h: dict) -> FileSink:
        up = self.uploads.get(conn)
        rel = h.get("path")
        if up is None or rel not in up.need:
            raise ProtocolError(f"file {str(rel)[:100]!r} was not asked for by a deploy on this connection")
        target = up.dir / rel
        # a temporary name of its own: two connections may deploy the same file at once
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
            sink = FileSink(_GuardedFile(os.fdopen(fd, "wb")), self.max_payload)
            tmp = Path(tmp_name)
        except OSError as e:                                 # read to its end, then refused naming the file
            sink, tmp = FileSink(_Discard(e), self.max_payload), None
        up.sink = (rel, tmp, sink)
        return sink

    def _on_file(self, conn: Conn, frame: Frame) -> None:
        up = self.uploads[conn]
        rel, tmp, sink = up.sink
        up.sink = None
        sink.f.close()
        if sink.f.error is not None:
            if tmp is not None:
                _unlink_quietly(tmp)
            self._refuse(conn, up.device, _oserror(rel, "write it", sink.f.error))
            return
        want = up.manifest.files[rel]
        if sink.sha256.hexdigest() != want:
            _unlink_quietly(tmp)
            self._refuse(conn, up.device, f"bundle file {rel!r}: sha256 {sink.sha256.hexdigest()[:16]}… does not "
                                          f"match the manifest ({want[:16]}…); the file was modified or corrupted "
                                          f"— refused")
            return
        lock = self._lock(up.bundle_id)
        if not lock.acquire(timeout=LOCK_TIMEOUT):
            _unlink_quietly(tmp)
            self._refuse(conn, up.device, f"another deploy of this bundle held it for {LOCK_TIMEOUT:.0f} s; try again")
            return
        try:
            os.replace(tmp, up.dir / rel)
        except OSError as e:
            _unlink_quietly(tmp)
            self._refuse(conn, up.device, _oserror(rel, "move it into place", e))
            return
        finally:
            lock.release()
        self._hold(up.dir / rel, want)
        up.need.discard(rel)
        conn.out.put({"kind": "file_ok", "path": rel})

    def _blob(self, sha: str) -> Path:
        return self.workdir / "blobs" / sha

    def _hold(self, path: Path, sha: str) -> None:
        """Keep a received file under its sha256 for later deploys (best effort: a failure only costs a resend)."""
        blob = self._blob(sha)
        try:
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f".{sha}.{uuid.uuid4().hex}")
            os.link(path, tmp)
            os.replace(tmp, blob)
        except OSError as e:
            log.warning("could not keep %s by sha256 (it will be sent again next time): %s", path.name,
                        e.strerror or type(e).__name__)

    def _link_held(self, sha: str, target: Path) -> bool:
        """Link a held file with this sha256 to ``target``; False when none is held or it no longer matches."""
        blob = self._blob(sha)
        try:
            if not blob.is_file() or blob.is_symlink() or sha256_file(blob) != sha:
                return False
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            os.link(blob, tmp)
            os.replace(tmp, target)
            return True
        except OSError:
            return False

    def _on_commit(self, conn: Conn, frame: Frame) -> None:
        """Load the uploaded bundle — in a thread of its own: loading a program (imports, weights, an
        ONNX Runtime session) can take seconds on a slow device, and the connection's reader must go on
        answering pings and taking inputs for the plans already running meanwhile (a client judges a
        worker that does not answer its pings as down)."""
        up = self.uploads.pop(conn, None)
        if up is None or up.need:
            self._commit(conn, up)
            return
        threading.Thread(target=self._commit, args=(conn, up), name="deploy-commit", daemon=True).start()

    def _commit(self, conn: Conn, up) -> None:
        try:
            if up is None:
                raise EdgepartError("commit without a deploy in progress (an earlier step was refused)")
            if up.need:
                raise EdgepartError(f"commit before all files arrived; missing {sorted(up.need)}")
            lock = self._lock(up.bundle_id)
            if not lock.acquire(timeout=LOCK_TIMEOUT):
                raise EdgepartError(f"another deploy of this bundle held it for {LOCK_TIMEOUT:.0f} s; try again")
            try:
                if self._already(up.bundle_id, up.device, up.peers):   # another connection just activated it
                    conn.out.put({"kind": "deploy_ok", "device": up.device, "already": True})
                    return
                unlisted = self._unlisted(up)
                prog = DeviceProgram.from_bundle(up.dir, up.device, up.manifest, self.backend)
                self._activate(prog, up.bundle_id, up.peers)
            finally:
                lock.release()
            log.info("deployed bundle %s as device %r (%s)", up.bundle_id[:12], up.device, up.manifest.model)
            conn.out.put({"kind": "deploy_ok", "device": up.device, **({"unlisted": unlisted} if unlisted else {})})
        except OSError as e:
            self._refuse(conn, up and up.device, f"worker {self.address()}: loading the bundle failed: "
                                                 f"{e.strerror or type(e).__name__}"
                                                 + (f" ({Path(e.filename).name})" if e.filename else ""))
        except Exception as e:  # noqa: BLE001 — any load failure is reported to the deployer
            self._refuse(conn, up and up.device, f"worker {self.address()}: {type(e).__name__}: {e}")
        finally:
            self._trim()

    def _unlisted(self, up: Upload) -> list[str]:
        """Files in the bundle's directory the manifest does not list (logged; never loaded)."""
        out = []
        for p in sorted(up.dir.rglob("*")):
            rel = p.relative_to(up.dir).as_posix()
            if p.is_dir() or rel in up.manifest.files or rel in BUNDLE_SIDE_FILES or rel.endswith(".part"):
                continue
            out.append(rel)
            if len(out) >= 20:
                break
        if out:
            log.warning("bundle %s: files the manifest does not list (never loaded): %s", up.bundle_id[:12], out)
        return out

    def _drop(self, conn: Conn) -> None:
        """Forget the connection's deploy, removing a file it was receiving."""
        up = self.uploads.pop(conn, None)
        if up is not None and up.sink is not None:
            _, tmp, sink = up.sink
            up.sink = None
            sink.f.close()
            if tmp is not None:
                _unlink_quietly(tmp)

    def _activate(self, prog: DeviceProgram, bid: str, peers: dict) -> None:
        manifest = prog.manifest
        device = prog.device
        recv_specs = {}
        for act in prog.actions:
            if isinstance(act, Recv):
                dt, shape = prog.piece_spec(act.tensor, act.a, act.b)
                recv_specs[act.key] = (dtype_name(dt), tuple(shape))
        partners = prog.spec.partners
        begin = []
        if device == manifest.source_device:
            for d, spec in manifest.devices.items():
                if d != device and spec.actions and not isinstance(spec.actions[0], Recv):
                    begin.append(d)
        hello = {"role": "peer", "name": device, "bundle": bid}
        links = {}
        for d, addr in peers.items():
            if d == device or d not in manifest.devices:
                continue
            shaper = self.link_shaper(d, True) if self.link_shaper is not None else None
            links[d] = PeerLink(d, addr, self.key, hello, shaper, self.executor.fail, self.executor.peer_down,
                                on_sent=self._count_sent)
        self.executor.activate(Deployment(
            program=prog, bundle_id=bid, peers=dict(peers), links=links, recv_specs=recv_specs,
            input_specs=[(s.dtype, s.shape) for s in manifest.inputs],
            partners=partners | ({manifest.source_device} - {device}) | set(begin), begin_targets=begin))

    def _count_sent(self, n: int) -> None:
        self.executor.stats["bytes_sent"] += n


def _unlink_quietly(p: Path | None) -> None:
    try:
        if p is not None:
            p.unlink()
    except OSError:
        pass


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` under a temporary name of its own and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
