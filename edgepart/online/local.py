"""A LocalCluster whose session is adaptive: workers for every device of the cluster, the online
controller re-planning (the testbed layer cannot import the compiler, so this lives here).

    with AdaptiveLocalCluster(bundle, model=model, example_inputs=(x,), emulate=True) as c:
        y = c.infer(x)
        c.events
"""
from __future__ import annotations

import dataclasses

from edgepart.online.controller import ControllerConfig
from edgepart.online.session import AdaptiveSession
from edgepart.testbed.local import LocalCluster


class AdaptiveLocalCluster(LocalCluster):
    """``LocalCluster(bundle, all_devices=True, ...)`` with an :class:`AdaptiveSession` as its session.
    ``config``: the controller's knobs (its ``time_scale`` is set from the emulator); ``adaptive_kw``:
    more AdaptiveSession options (``event_log``, ``workdir``, ``timeout``, ``dead_after``, ...)."""

    def __init__(self, bundle_or_dir, model, example_inputs, config: ControllerConfig | None = None,
                 adaptive_kw: dict | None = None, **kw):
        super().__init__(bundle_or_dir, all_devices=True, **kw)
        try:
            self.session.close()          # the plain session deployed the first plan; the adaptive one takes over
            cfg = dataclasses.replace(config or ControllerConfig(), time_scale=self.time_scale)
            peer = self.emulator.peer_endpoints(self.endpoints) if self.emulator else None
            self.session = AdaptiveSession(self.dir, self.endpoints, self.key, model, example_inputs, config=cfg,
                                           peer_endpoints=peer, **{**self.session_kw, **(adaptive_kw or {})})
        except BaseException:
            self.close()
            raise

    @property
    def events(self) -> list[dict]:
        return self.session.events

    @property
    def controller(self):
        return self.session.controller
