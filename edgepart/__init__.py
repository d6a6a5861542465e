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
from edgepart.runtime.client import connect
from edgepart.testbed.local import LocalCluster

__version__ = "0.1.0"

__all__ = ["Cluster", "Device", "Bundle", "compile", "load_bundle", "Plan", "Stage", "connect", "LocalCluster",
           "EdgepartError", "BundleError", "ClusterError", "InputShapeError", "PlanError", "TraceError",
           "UnsupportedOpError"]
