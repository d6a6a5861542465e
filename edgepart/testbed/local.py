"""A cluster of worker processes on this machine (loopback), the embedded default.

    with edgepart.LocalCluster(bundle) as c:        # one worker process per device, deployed
        y = c.infer(x)
        ys = c.infer_many(xs)
        c.pids                                       # {device: pid}

Every worker runs in its own process group and watches this process, so nothing
outlives the cluster: ``close()`` (also called on error, at exit, and by ``with``)
terminates the groups, and a worker whose parent vanished exits by itself.
``emulate=True`` shapes CPU and links from the manifest's cluster (see testbed/emulator.py; ``time_scale``,
``cpu`` ("quota" or "dilate"), ``cpu_period_us``, ``cpuset`` and ``host_speed`` are the Emulator's knobs).
``backend="torch"`` or ``"onnxruntime"`` runs every worker's program on that backend (``edgepart worker
--backend``); None (default): each device on the backend the bundle was compiled for.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from edgepart.errors import EdgepartError
from edgepart.runtime.client import Session, bundle_dir_of
from edgepart.runtime.program import read_manifest
from edgepart.runtime.protocol import as_key
from edgepart.testbed.emulator import Emulator
from edgepart.testbed.processes import start_worker, stop_process_groups, worker_env

_live: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


class _DevicesView:
    """What the Emulator reads of a manifest (its cluster and which devices get workers), for ``all_devices``."""

    def __init__(self, manifest, devices: list[str]):
        self.cluster = manifest.cluster
        self.devices = set(devices)


@atexit.register
def _close_all() -> None:
    for c in list(_live):
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass


class LocalCluster:
    def __init__(self, bundle_or_dir, emulate: bool | str = False, key=None, threads: int = 1,
                 startup_timeout: float = 60.0, log_dir: str | os.PathLike | None = None,
                 time_scale: float | None = None, cpu_period_us: int | None = None,
                 cpuset: list[int] | None = None, host_speed: float | None = None, cpu: str = "quota",
                 backend: str | None = None, all_devices: bool = False, **session_kw):
        self.dir, self._tmp_bundle = bundle_dir_of(bundle_or_dir)
        self.manifest = read_manifest(self.dir)
        # all_devices: a worker for every device of the manifest's cluster, not only those the plan uses
        # (an online controller may re-plan onto the others: edgepart.online.AdaptiveLocalCluster)
        self.devices = ([d["name"] for d in self.manifest.cluster["devices"]] if all_devices
                        else list(self.manifest.devices))
        self.key = as_key(key) if key is not None else os.urandom(32)
        self.threads = threads
        self.backend = backend
        self.startup_timeout = startup_timeout
        self.session_kw = session_kw
        self.tmp = Path(tempfile.mkdtemp(prefix="edgepart-local-"))
        self.log_dir = Path(log_dir) if log_dir else self.tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.key_file = self.tmp / "key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.key.hex())
        self.procs: dict[str, subprocess.Popen] = {}
        self.endpoints: dict[str, str] = {}
        self.session: Session | None = None
        self.emulator = None
        self.closed = False
        _live.add(self)
        try:
            if emulate:
                self.emulator = Emulator(_DevicesView(self.manifest, self.devices), time_scale=time_scale,
                                         mode=emulate if isinstance(emulate, str) else None,
                                         period_us=cpu_period_us, cpuset=cpuset, host_speed=host_speed,
                                         defer_limits=True, cpu=cpu)
            for d in self.devices:
                self._spawn(d, 0)
            self.session = self.connect()
            if self.emulator is not None and self.emulator.mode == "netns":
                self.emulator.limit()      # workers started and deployed at full speed; from now on, emulated
        except BaseException:
            self.close()
            raise

    # --- processes -----------------------------------------------------------------------
    def _spawn(self, device: str, port: int) -> None:
        host = self.emulator.host(device) if self.emulator else "127.0.0.1"
        cmd = [sys.executable, "-m", "edgepart.worker_main", "--listen", f"{host}:{port}",
               "--key-file", str(self.key_file), "--workdir", str(self.tmp / "work" / device),
               "--threads", str(self.threads), "--exit-with-parent", str(os.getpid())]
        if self.backend:
            cmd += ["--backend", self.backend]
        if self.emulator:
            cmd = self.emulator.wrap(device, cmd)

        def register(proc):          # before it is ready: a worker that fails to start is stopped by close()
            self.procs[device] = proc
            if self.emulator:
                self.emulator.attach(device, proc.pid)
        _, addr = start_worker(cmd, self.log_dir / f"{device}.log", worker_env(self.threads), self.startup_timeout,
                               f"worker for device {device!r}", on_spawn=register)
        self.endpoints[device] = self.emulator.client_endpoint(device, addr) if self.emulator else addr

    @property
    def time_scale(self) -> float:
        """Emulated durations are target durations / time_scale (1.0 without emulation)."""
        return self.emulator.time_scale if self.emulator else 1.0

    @property
    def emulation(self) -> str:
        return self.emulator.describe() if self.emulator else "none"

    @property
    def pids(self) -> dict[str, int]:
        return {d: p.pid for d, p in self.procs.items()}

    def connect(self, **kw) -> Session:
        """A new session (client) to this cluster's workers; deploys idempotently."""
        peer = self.emulator.peer_endpoints(self.endpoints) if self.emulator else None
        return Session(self.dir, self.endpoints, self.key, peer_endpoints=peer, **{**self.session_kw, **kw})

    def kill(self, device: str, sig: int = signal.SIGKILL) -> None:
        """Kill one device's worker (for failure tests)."""
        proc = self.procs[device]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def restart(self, device: str) -> None:
        """Start the device's worker again on the same address (the session redeploys it on its next request)."""
        proc = self.procs.get(device)
        if proc is not None and proc.poll() is None:
            self.kill(device)
        port = int(self.endpoints[device].rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while True:
            try:
                self._spawn(device, port)
                return
            except EdgepartError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # --- requests --------------------------------------------------------------------------
    def infer(self, *inputs, **kw):
        return self.session.infer(*inputs, **kw)

    def infer_many(self, xs, **kw):
        return self.session.infer_many(xs, **kw)

    def submit(self, *inputs):
        return self.session.submit(*inputs)

    def stats(self) -> dict:
        return self.session.stats()

    # --- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.session is not None:
            try:
                self.session.close()
            except Exception:  # noqa: BLE001
                pass
        stop_process_groups(list(self.procs.values()))
        if self.emulator is not None:
            self.emulator.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._tmp_bundle:
            shutil.rmtree(self._tmp_bundle, ignore_errors=True)
        _live.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
