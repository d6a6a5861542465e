"""An adaptive session: a resubmit-mode Session with the online Controller re-planning its plans.

    s = edgepart.connect(bundle, endpoints, key, adaptive=True, model=model, example_inputs=(x,))
    y = s.infer(x)          # as a Session; plans change underneath, requests are never lost
    s.events                # re-plans, swaps, failovers, with reasons and predicted gains
    s.close()

The controller needs the model (and example inputs) to compile new plans, and the cluster the
first plan was made for (default: the one in the bundle's manifest, i.e. every device the first
compile was given — not only those the first plan uses; every one of them needs an endpoint).
"""
from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import torch

from edgepart.cluster import Cluster
from edgepart.errors import EdgepartError
from edgepart.online.controller import Controller, ControllerConfig
from edgepart.runtime.client import PlanVersion, Session


class AdaptiveSession:
    """``Session`` + ``Controller``; ``config``: :class:`ControllerConfig`; ``session_kw``: Session options
    (``timeout`` — every request's deadline —, ``dead_after``, ``heartbeat``, ``peer_endpoints``, ...)."""

    def __init__(self, bundle_or_dir, endpoints, key, model: torch.nn.Module, example_inputs,
                 cluster: Cluster | None = None, config: ControllerConfig | None = None,
                 workdir: str | Path | None = None, event_log: str | Path | None = None, **session_kw):
        if model is None or example_inputs is None:
            raise EdgepartError("adaptive=True needs model= and example_inputs= (the controller recompiles the model)")
        first = PlanVersion.load(bundle_or_dir, 0)
        cluster = cluster or Cluster.from_dict(first.manifest.cluster)
        self.controller = Controller(model, example_inputs, cluster, config, workdir, event_log)
        session_kw.setdefault("dead_after", 2.0)
        session_kw.setdefault("heartbeat", 0.5)
        self.session = Session(first.dir, endpoints, key, resubmit=True, all_endpoints=True,
                               on_event=self.controller.on_event, **session_kw)
        self.controller.attach(self.session)

    # --- requests (as Session) ---------------------------------------------------------------------
    def submit(self, *inputs) -> cf.Future:
        return self.session.submit(*inputs)

    def infer(self, *inputs, timeout: float | None = None):
        return self.session.infer(*inputs, timeout=timeout)

    def infer_many(self, xs, **kw) -> list:
        return self.session.infer_many(xs, **kw)

    def stats(self) -> dict:
        return self.session.stats()

    @property
    def events(self) -> list[dict]:
        return list(self.controller.events)

    @property
    def plan(self) -> PlanVersion:
        return self.session.plan

    @property
    def counts(self):
        return self.session.counts

    def close(self) -> None:
        self.controller.stop()
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
