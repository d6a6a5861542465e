"""edgepart: compile a PyTorch CNN for a group of edge devices and run it across them.

    import edgepart
    cluster = edgepart.Cluster.from_file("cluster.yaml")
    bundle = edgepart.compile(model, (x,), cluster, strategy="ofpm")
    bundle.save("out/")
    y = edgepart.load_bundle("out/").run_local(x)      # == model(x)
"""
from edgepart.cluster import Cluster, Device
from edgepart.compiler.bundle import Bundle, compile, load_bundle
from edgepart.compiler.planning.plan import Plan, Stage
from edgepart.errors import (BundleError, ClusterError, EdgepartError, InputShapeError, PlanError, TraceError,
                             UnsupportedOpError)
from edgepart.online import AdaptiveLocalCluster, AdaptiveSession
from edgepart.runtime.client import Session
from edgepart.runtime.client import connect as _connect
from edgepart.testbed.local import LocalCluster

__version__ = "0.1.0"


def connect(bundle_or_dir, endpoints, key, deploy: bool = True, adaptive: bool = False, model=None,
            example_inputs=None, **kw) -> "Session | AdaptiveSession":
    """Connect to running workers (``endpoints``: {device: "host:port"} or a YAML/JSON file), deploy, return a
    Session. ``adaptive=True``: an :class:`~edgepart.online.AdaptiveSession` — the online controller watches
    load and links while serving, re-plans, swaps plans without losing a request and fails over a dead
    device; it needs ``model`` and ``example_inputs`` (to recompile) and an endpoint for every device of
    the bundle's cluster (``config=ControllerConfig(...)``, ``cluster=``, ``event_log=`` and Session options
    go in ``kw``)."""
    if adaptive:
        return AdaptiveSession(bundle_or_dir, endpoints, key, model, example_inputs, **kw)
    return _connect(bundle_or_dir, endpoints, key, deploy=deploy, **kw)

__all__ = ["Cluster", "Device", "Bundle", "compile", "load_bundle", "Plan", "Stage", "connect", "LocalCluster",
           "AdaptiveLocalCluster", "AdaptiveSession",
           "EdgepartError", "BundleError", "ClusterError", "InputShapeError", "PlanError", "TraceError",
           "UnsupportedOpError"]
