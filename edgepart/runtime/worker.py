"""The worker: a long-running process on one device that runs its part of a bundle.

    edgepart worker --listen HOST:PORT --key-file FILE [--deploy-pubkey FILE] [--threads N] [--workdir DIR]

A :class:`Worker` is a :class:`~edgepart.runtime.server.Server` (the listening socket, its
connections, dispatch by frame kind) with two parts that register their frames on it: the
:class:`~edgepart.runtime.deploy.Deployer` (a client deploys the device's files, checked against
the manifest's sha256, and the other workers' addresses) and the
:class:`~edgepart.runtime.execution.Executor` (requests: the device's action list, run event by
event; pieces go to the peers through :mod:`edgepart.runtime.transport`). Several requests are in
flight at once. A frame that fails any check is refused with a logged reason and its connection
is closed; the worker stays up.

The runtime knows nothing of profiling or emulation: whatever builds a full worker process
(``edgepart worker``: :mod:`edgepart.worker_main`) registers more frame handlers on
``worker.server`` and passes the test bed's hooks (``link_shaper``, ``stage_clock``).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch

from edgepart.errors import EdgepartError
from edgepart.ir.manifest import BACKENDS
from edgepart.runtime.allocator import keep_freed_memory
from edgepart.runtime.deploy import Deployer
from edgepart.runtime.execution import Executor, StageClock
from edgepart.runtime.protocol import DEFAULT_MAX_PAYLOAD, MIN_KEY_BYTES, read_key
from edgepart.runtime.server import Server
from edgepart.runtime.signing import load_public_key
from edgepart.runtime.transport import LinkShaperFactory

log = logging.getLogger("edgepart.worker")


class Worker:
    """One device's worker: listens on ``listen`` (port 0: any free port) for connections that know ``key``.

    ``threads``: torch threads for compute; ``pin_cpu``: the compute thread's CPU (None: not pinned); ``workdir``: where deployed bundles are kept (default: a
    temp dir of its own, removed by :meth:`stop`); ``request_timeout``: a request idle this long (s)
    fails; ``deploy_pubkey``: an Ed25519 public key (runtime/signing.py): only deploys signed by its
    private key are taken (None: any holder of ``key`` may deploy); ``server_options``: the
    :class:`~edgepart.runtime.server.Server`'s limits (tests use small ones). Test bed hooks: ``link_shaper`` shapes the traffic to each peer
    (:data:`~edgepart.runtime.transport.LinkShaperFactory`), ``stage_clock`` how long a compute stage
    lasts (:class:`~edgepart.runtime.execution.StageClock`); None: real links, real CPU.
    ``backend``: ``torch`` or ``onnxruntime`` for every program deployed here (None: each bundle's
    choice for the device; ONNX Runtime sessions run one intra-op thread whatever ``threads``).
    """

    def __init__(self, listen: str = "127.0.0.1:0", key: bytes = b"", threads: int = 1,
                 workdir: str | os.PathLike | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 request_timeout: float = 120.0, link_shaper: LinkShaperFactory | None = None,
                 stage_clock: StageClock | None = None, deploy_pubkey=None, server_options: dict | None = None,
                 backend: str | None = None, pin_cpu: int | None = None):
        if len(key) < MIN_KEY_BYTES:
            raise EdgepartError(f"the worker needs a shared key of at least {MIN_KEY_BYTES} bytes (--key-file)")
        self.key = key
        self.threads = threads
        self.link_shaper = link_shaper
        self._own_workdir = not workdir          # a temp dir of its own: removed by stop()
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgepart-worker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stats: collections.Counter = collections.Counter()
        self.stop_event = threading.Event()
        if pin_cpu is not None and hasattr(os, "sched_getaffinity") and pin_cpu not in os.sched_getaffinity(0):
            raise EdgepartError(f"--pin-cpu {pin_cpu}: this worker may only use CPUs {sorted(os.sched_getaffinity(0))}")
        self.executor = Executor(self.stats, self.stop_event, threads, request_timeout, stage_clock, pin_cpu=pin_cpu)
        self.server = Server(listen, key, self._hello, self.stats, self.stop_event, max_payload,
                             **(server_options or {}))
        self.deployer = Deployer(self.workdir, self.executor, key, max_payload, lambda: self.server.address,
                                 link_shaper, deploy_pubkey, backend)
        self.executor.register(self.server)
        self.deployer.register(self.server)

    @property
    def address(self) -> str | None:
        """``host:port`` listened on, once started."""
        return self.server.address

    @property
    def device(self) -> str | None:
        """The device this worker was deployed as (None before the first deploy)."""
        return self.executor.device

    def _hello(self) -> dict:
        active = self.executor.active
        return {"role": "worker", "name": active.device if active else "",
                "bundle": active.bundle_id if active else None}

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> str:
        torch.set_num_threads(max(1, self.threads))
        address = self.server.start()
        self.executor.start()
        log.info("listening on %s (workdir %s, %d torch thread(s))", address, self.workdir, self.threads)
        return address

    def serve_forever(self) -> None:
        if self.server.sock is None:
            self.start()
        self.stop_event.wait()

    def stop(self) -> None:
        self.stop_event.set()
        self.executor.stop()
        self.server.close()
        if self._own_workdir:       # deployed bundles (a VGG-16 device's part: hundreds of MB) go with it
            shutil.rmtree(self.workdir, ignore_errors=True)


def serve(listen: str, key: bytes, threads: int = 1, workdir=None, **kw) -> Worker:
    """Start a worker in this process (background threads); returns it. ``w.stop()`` stops it."""
    w = Worker(listen, key, threads, workdir, **kw)
    w.start()
    return w


# --- command line ------------------------------------------------------------------------
def build_parser(prog: str = "edgepart worker") -> argparse.ArgumentParser:
    """The worker's options (a full worker process adds its own: :mod:`edgepart.worker_main`)."""
    p = argparse.ArgumentParser(prog=prog, description="Run an edgepart worker on this device.")
    p.add_argument("--listen", default="127.0.0.1:7700", help="HOST:PORT to listen on (port 0: any free port)")
    p.add_argument("--key-file", required=True,
                   help="file holding the shared run key (32+ random bytes, raw or hex: edgepart keygen --run)")
    p.add_argument("--deploy-pubkey", help="take only deploys signed by this Ed25519 key's private half "
                                           "(PEM, from edgepart keygen --deploy; see docs/security.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for compute (default 1)")
    p.add_argument("--pin-cpu", type=int, default=None,
                   help="pin the compute thread to this CPU (its times then repeat, as the FCPM's pinned timings do)")
    p.add_argument("--workdir", help="where deployed bundles are kept (default: a new temp dir)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="run deployed programs on torch or onnxruntime (default: the bundle's choice for the device)")
    p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD, help="largest frame payload accepted")
    p.add_argument("--request-timeout", type=float, default=120.0, help="drop a request idle this long (s)")
    p.add_argument("--exit-with-parent", type=int, help="exit when the process with this pid is gone")
    p.add_argument("--log-level", default="INFO")
    return p


def setup_process(args: argparse.Namespace) -> None:
    """What a worker process sets up before it builds its worker: logging, the GIL's switch interval, malloc."""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    sys.setswitchinterval(2e-4)     # hand the GIL over promptly between reader, compute and sender threads
    if not keep_freed_memory():
        log.info("could not tune malloc (not glibc): tensors may be page-faulted in on every request")


def worker_options(args: argparse.Namespace) -> dict:
    """Worker(...) keyword arguments from the options of :func:`build_parser`."""
    return {"listen": args.listen, "key": read_key(args.key_file), "threads": args.threads, "workdir": args.workdir,
            "pin_cpu": args.pin_cpu,
            "max_payload": args.max_payload, "request_timeout": args.request_timeout, "backend": args.backend,
            "deploy_pubkey": load_public_key(args.deploy_pubkey) if args.deploy_pubkey else None}


def run(w: Worker, exit_with_parent: int | None = None) -> int:
    """Start ``w``, announce ``edgepart worker listening on ADDR`` on stdout (LocalCluster waits for
    that line), and serve until SIGTERM / SIGINT or until process ``exit_with_parent`` is gone."""
    addr = w.start()
    print(f"edgepart worker listening on {addr}", flush=True)

    def on_signal(signum, frame):
        w.stop_event.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if exit_with_parent:
        def watch():
            while not w.stop_event.wait(0.5):
                try:
                    os.kill(exit_with_parent, 0)
                except ProcessLookupError:
                    log.warning("parent process %d is gone; exiting", exit_with_parent)
                    w.stop_event.set()
        threading.Thread(target=watch, daemon=True).start()
    w.stop_event.wait()
    w.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """A bare worker: requests and deploys only (``edgepart worker`` adds profiling, probes, emulation)."""
    args = build_parser().parse_args(argv)
    setup_process(args)
    return run(Worker(**worker_options(args)), args.exit_with_parent)


if __name__ == "__main__":
    sys.exit(main())
