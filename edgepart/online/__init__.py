"""The online phase of DCFP: watch devices and links while serving, re-plan, swap plans without
losing a request, survive a dead device (docs/online.md).

- :mod:`edgepart.online.state`: the live cluster state (loads, links; EWMA with a confidence);
- :mod:`edgepart.online.controller`: the controller (monitor, predict, re-plan with hysteresis,
  swap, failover), a background thread;
- :mod:`edgepart.online.session`: :class:`AdaptiveSession` (``edgepart.connect(..., adaptive=True)``);
- :mod:`edgepart.online.local`: :class:`AdaptiveLocalCluster` (tests, benchmarks);
- :mod:`edgepart.online.serve`: ``edgepart serve``.

The runtime parts (plan versions, request resubmission, per-worker load and stage-time counters)
are in :mod:`edgepart.runtime` (client.py, execution.py, monitor.py).
"""
from edgepart.online.controller import Controller, ControllerConfig
from edgepart.online.local import AdaptiveLocalCluster
from edgepart.online.session import AdaptiveSession

__all__ = ["Controller", "ControllerConfig", "AdaptiveSession", "AdaptiveLocalCluster"]
