"""The worker's side of a deploy: ``deploy`` (manifest and peers), ``file`` (each file it lacks), ``commit``.

A client sends the manifest, with its sha256 as the bundle id and the addresses of the other
workers; the worker answers with the files it does not already hold with the manifest's sha256
(``deploy_need``), receives each of them to disk (checked against the manifest as it arrives),
and on ``commit`` loads the device's program — every file checked again — and activates it:
requests of the previous bundle fail and links to the new bundle's peers are opened on demand.
Deploying the bundle that is already active, with the same peers, is a no-op. Any refusal is a
``deploy_error`` frame (code ``deploy_failed``) and ends that deploy, not the connection.
The client side is deploy_client.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
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
from edgepart.runtime.transport import LinkShaperFactory, PeerLink

log = logging.getLogger("edgepart.worker")

MAX_MANIFEST = 64 << 20


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
    ``address()``: this worker's address, for messages.
    """

    def __init__(self, workdir: Path, executor: Executor, key: bytes, max_payload: int,
                 address: Callable[[], str | None], link_shaper: LinkShaperFactory | None = None):
        self.workdir = workdir
        self.executor = executor
        self.key = key
        self.max_payload = max_payload
        self.address = address
        self.link_shaper = link_shaper
        self.uploads: dict[Conn, Upload | None] = {}
        self._sha_cache: dict[tuple, str] = {}

    def register(self, server: Server) -> None:
        server.register("deploy", self._on_deploy, lambda conn, h: MAX_MANIFEST)
        server.register("file", self._on_file, self._expect_file)
        server.register("commit", self._on_commit)
        server.on_disconnect(lambda conn, reason: self._drop(conn))

    def _refuse(self, conn: Conn, device, message: str) -> None:
        """Answer ``deploy_error`` for the device being deployed and forget the connection's deploy."""
        log.warning("refused deploy from %s: %s", conn.label(), message)
        self._drop(conn)
        device = device[:64] if isinstance(device, str) else None
        conn.out.put({"kind": "deploy_error", **Failure(ErrorCode.DEPLOY_FAILED, device, message).fields()})

    def _on_deploy(self, conn: Conn, frame: Frame) -> None:
        h, manifest_bytes = frame.header, frame.parts[0]
        device, bid, peers = h.get("device"), h.get("bundle"), h.get("peers")
        self._drop(conn)
        try:
            if hashlib.sha256(manifest_bytes).hexdigest() != bid:
                raise EdgepartError("the manifest's sha256 does not match the bundle id it was sent with")
            manifest = Manifest.from_json(manifest_bytes, "the deployed manifest")
            if device not in manifest.devices:
                raise EdgepartError(f"device {device!r} is not in this bundle")
            if not isinstance(peers, dict) or not all(isinstance(v, str) for v in peers.values()):
                raise EdgepartError("deploy needs peers {device: 'host:port'}")
            for d in manifest.devices:
                if d != device and d not in peers:
                    raise EdgepartError(f"deploy gives no address for peer device {d!r}")
            active = self.executor.active
            if active is not None and (active.bundle_id, active.device, active.peers) == (bid, device, peers):
                conn.out.put({"kind": "deploy_ok", "device": device, "already": True})
                return
            bdir = self.workdir / "bundles" / bid
            bdir.mkdir(parents=True, exist_ok=True)
            (bdir / "manifest.json").write_bytes(manifest_bytes)
            need = []
            for rel in manifest.devices[device].files:     # each inside the bundle (checked when parsed)
                if rel not in manifest.files:
                    raise EdgepartError(f"bundle file {rel!r} is not in the manifest's file list")
                p = bdir / rel
                if not (p.is_file() and not p.is_symlink() and sha256_file(p) == manifest.files[rel]):
                    if not self._reuse(bdir, rel, manifest.files[rel]):
                        need.append(rel)
            self.uploads[conn] = Upload(bid, device, peers, manifest, bdir, set(need))
            conn.out.put({"kind": "deploy_need", "files": need})
        except (EdgepartError, ValueError, KeyError, TypeError, OSError) as e:
            self._refuse(conn, device, f"deploy refused by worker {self.address()}: {e}")

    def _reuse(self, bdir: Path, rel: str, sha: str) -> bool:
        """Copy ``rel`` from another bundle this worker holds if it has the same sha256 there (a new plan
        of the same model often keeps a device's program or weights): only changed files are shipped."""
        for other in (self.workdir / "bundles").iterdir():
            q = other / rel
            if other == bdir or not q.is_file() or q.is_symlink() or self._sha256(q) != sha:
                continue
            (bdir / rel).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=(bdir / rel).parent, prefix=q.name + ".", suffix=".part")
            os.close(fd)
            shutil.copyfile(q, tmp)
            os.replace(tmp, bdir / rel)
            return True
        return False

    def _sha256(self, path: Path) -> str:
        """sha256 of a file of an earlier bundle, remembered by (path, size, mtime) (they are hashed again
        for every deploy otherwise)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        h = self._sha_cache.get(key)
        if h is None:
            h = self._sha_cache[key] = sha256_file(path)
        return h

    def _expect_file(self, conn: Conn, h: dict) -> FileSink:
        up = self.uploads.get(conn)
        rel = h.get("path")
        if up is None or rel not in up.need:
            raise ProtocolError(f"file {str(rel)[:100]!r} was not asked for by a deploy on this connection")
        target = up.dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name of its own: two connections may deploy the same file at once
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
        tmp = Path(tmp_name)
        sink = FileSink(os.fdopen(fd, "wb"), self.max_payload)
        up.sink = (rel, tmp, sink)
        return sink

    def _on_file(self, conn: Conn, frame: Frame) -> None:
        up = self.uploads[conn]
        rel, tmp, sink = up.sink
        up.sink = None
        sink.f.close()
        want = up.manifest.files[rel]
        if sink.sha256.hexdigest() != want:
            tmp.unlink(missing_ok=True)
            self._refuse(conn, up.device, f"bundle file {rel!r}: sha256 {sink.sha256.hexdigest()[:16]}… does not "
                                          f"match the manifest ({want[:16]}…); the file was modified or corrupted "
                                          f"— refused")
            return
        os.replace(tmp, up.dir / rel)
        up.need.discard(rel)
        conn.out.put({"kind": "file_ok", "path": rel})

    def _on_commit(self, conn: Conn, frame: Frame) -> None:
        up = self.uploads.pop(conn, None)
        try:
            if up is None:
                raise EdgepartError("commit without a deploy in progress (an earlier step was refused)")
            if up.need:
                raise EdgepartError(f"commit before all files arrived; missing {sorted(up.need)}")
            prog = DeviceProgram.from_bundle(up.dir, up.device, up.manifest)
            self._activate(prog, up.bundle_id, up.peers)
            log.info("deployed bundle %s as device %r (%s)", up.bundle_id[:12], up.device, up.manifest.model)
            conn.out.put({"kind": "deploy_ok", "device": up.device})
        except Exception as e:  # noqa: BLE001 — any load failure is reported to the deployer
            self._refuse(conn, up and up.device, f"worker {self.address()}: {type(e).__name__}: {e}")

    def _drop(self, conn: Conn) -> None:
        """Forget the connection's deploy, removing a file it was receiving."""
        up = self.uploads.pop(conn, None)
        if up is not None and up.sink is not None:
            _, tmp, sink = up.sink
            up.sink = None
            try:
                sink.f.close()
                tmp.unlink()
            except OSError:
                pass

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
