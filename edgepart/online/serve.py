"""``edgepart serve``: a long-running inference endpoint in front of the workers, with the online controller.

    edgepart serve MODEL --endpoints FILE --key-file FILE [--bundle DIR | --cluster YAML]
                   [--listen HOST:PORT] [--replan on|off] [--events FILE] [--min-gain 0.1] [--hold 2]

It connects to every worker of the cluster (``--endpoints``), deploys the first plan (``--bundle``,
or compiles one with ofpm for ``--cluster``), and listens on ``--listen`` for clients speaking the
worker protocol: a client sends ``input`` frames as it would to the source device and gets
``result`` (or ``error``) frames back — ``edgepart.connect(bundle, {SOURCE: "HOST:PORT"}, key,
deploy=False)`` is such a client. Behind it the controller re-plans, swaps plans and fails over
(``--replan off``: the first plan stays; it is only redeployed to a device that comes back).
Every event (re-plan, swap, failover, device down/up) is logged with its reason and predicted gain,
on stderr and, with ``--events``, as JSON lines.
"""
from __future__ import annotations

import argparse
import collections
import logging
import signal
import sys
import threading
from pathlib import Path

import torch

from edgepart.cli import load_model
from edgepart.cluster import Cluster
from edgepart.compiler.bundle import compile as compile_model
from edgepart.errors import EdgepartError
from edgepart.ir import output as output_tree
from edgepart.online.controller import ControllerConfig
from edgepart.online.session import AdaptiveSession
from edgepart.runtime.execution import req_id
from edgepart.runtime.protocol import ProtocolError, read_key
from edgepart.runtime.server import Conn, Server

log = logging.getLogger("edgepart.online")

MAX_PENDING = 1024


class Endpoint:
    """The listening side of ``serve``: input frames in, answers of the adaptive session out."""

    def __init__(self, session: AdaptiveSession, listen: str, key: bytes):
        self.session = session
        self.stop_event = threading.Event()
        self.stats: collections.Counter = collections.Counter()
        self.pending = 0
        self.lock = threading.Lock()
        self.server = Server(listen, key, lambda: {"role": "worker", "name": "serve", "bundle": None},
                             self.stats, self.stop_event)
        self.server.register("input", self._on_input, self._expect_input, roles=("client",))
        self.server.register("stats", lambda conn, f: conn.out.put({"kind": "stats", "device": "serve",
                                                                    "stats": dict(self.stats)}))

    def _expect_input(self, conn: Conn, h: dict):
        req_id(h)
        return [(s.dtype, s.shape) for s in self.session.plan.manifest.inputs]

    def _on_input(self, conn: Conn, frame) -> None:
        rid = req_id(frame.header)
        with self.lock:
            if self.pending >= MAX_PENDING:
                raise ProtocolError(f"{MAX_PENDING} requests already pending")
            self.pending += 1
        fut = self.session.submit(*frame.parts)
        fut.add_done_callback(lambda f: self._answer(conn, rid, f))

    def _answer(self, conn: Conn, rid: str, fut) -> None:
        with self.lock:
            self.pending -= 1
        try:
            y = fut.result()
        except EdgepartError as e:
            self.stats["failed"] += 1
            conn.out.put({"kind": "error", "req": rid, "code": "internal", "device": getattr(e, "device", None),
                          "message": str(e)[:1000]})
            return
        values, parts = [], []
        for leaf in output_tree.flatten(y, self.session.plan.manifest.output):
            if isinstance(leaf, torch.Tensor):
                values.append(None)
                parts.append(leaf.contiguous())
            else:
                values.append(leaf)
        self.stats["requests"] += 1
        conn.out.put({"kind": "result", "req": rid, "values": values}, parts)

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgepart serve", description="Serve inference with online re-planning.")
    p.add_argument("model", help="zoo name or path/to/file.py:factory (the controller recompiles it)")
    p.add_argument("--endpoints", required=True, help="YAML/JSON file mapping every device to host:port")
    p.add_argument("--key-file", required=True)
    p.add_argument("--bundle", help="the first plan (a bundle directory compiled for the cluster)")
    p.add_argument("--cluster", help="cluster YAML (default: the bundle's); without --bundle, compiled with ofpm")
    p.add_argument("--input-size", type=int)
    p.add_argument("--input-shape")
    p.add_argument("--listen", default="127.0.0.1:7800", help="HOST:PORT clients send inputs to")
    p.add_argument("--replan", choices=["on", "off"], default="on")
    p.add_argument("--min-gain", type=float, default=ControllerConfig.min_gain)
    p.add_argument("--hold", type=float, default=ControllerConfig.hold_s, help="s a candidate must stay better")
    p.add_argument("--interval", type=float, default=ControllerConfig.interval)
    p.add_argument("--probe-every", type=float, default=ControllerConfig.probe_every)
    p.add_argument("--dead-after", type=float, default=2.0, help="s of silence after which a device is down")
    p.add_argument("--timeout", type=float, default=60.0, help="every request's deadline (s)")
    p.add_argument("--workdir", help="where re-planned bundles are written")
    p.add_argument("--events", help="append every controller event here as a JSON line")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s serve %(levelname)s %(name)s %(message)s")
    model, inputs, name = load_model(args.model, args.input_size, args.input_shape)
    cluster = Cluster.from_file(args.cluster) if args.cluster else None
    bundle = args.bundle
    if bundle is None:
        if cluster is None:
            raise EdgepartError("serve needs --bundle or --cluster")
        workdir = Path(args.workdir or "edgepart-serve")
        bundle = compile_model(model, inputs, cluster, "ofpm", name).save(workdir / "plan0")
    cfg = ControllerConfig(replan=args.replan == "on", min_gain=args.min_gain, hold_s=args.hold,
                           interval=args.interval, probe_every=args.probe_every)
    session = AdaptiveSession(bundle, args.endpoints, read_key(args.key_file), model, inputs, cluster=cluster,
                              config=cfg, workdir=args.workdir, event_log=args.events,
                              dead_after=args.dead_after, timeout=args.timeout)
    ep = Endpoint(session, args.listen, read_key(args.key_file))
    addr = ep.start()
    print(f"edgepart serve listening on {addr} (replan {args.replan}; plan {session.plan.describe()})", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    done.wait()
    ep.stop()
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
