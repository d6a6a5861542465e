"""What an emulated worker process gets from its ``--links`` option (written by :meth:`Emulator.links_config`).

    --links '{"peers": {DEVICE: {"bandwidth_mbps": B|null, "latency_ms": L, "nic_mbps": N|null}},
              "cpu": {"share_file": PATH},          (optional: compute stages dilated, see cpu.py)
              "cpu_cores": C}                        (optional: the worker's CPU quota in cores)

:func:`parse_links` turns it into the runtime's hooks (``link_shaper``, ``stage_clock``) and the
CPU quota remote profiling reports (the worker cannot read its cgroup itself: ``ip netns exec``
hides /sys/fs/cgroup).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from edgepart.testbed.cpu import CpuDilation
from edgepart.testbed.links import LinkConfig, LinkEmulation


@dataclass(frozen=True)
class WorkerEmulation:
    link_shaper: LinkEmulation
    stage_clock: CpuDilation | None = None
    cpu_cores: float | None = None


def parse_links(text: str) -> WorkerEmulation:
    """The hooks of ``--links`` JSON text; ValueError (with the reason) if it is malformed."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("--links must be a JSON object")
    peers = {}
    for device, cfg in (data.get("peers") or {}).items():
        if not cfg:
            continue                      # no emulation on this link
        if not isinstance(cfg, dict):
            raise ValueError(f"--links: peer {device!r} needs an object {{bandwidth_mbps, latency_ms, nic_mbps}}")
        peers[str(device)] = LinkConfig(bandwidth_mbps=cfg.get("bandwidth_mbps"),
                                        latency_ms=float(cfg.get("latency_ms") or 0.0), nic_mbps=cfg.get("nic_mbps"))
    share_file = (data.get("cpu") or {}).get("share_file")
    cores = data.get("cpu_cores")
    return WorkerEmulation(link_shaper=LinkEmulation(peers),
                           stage_clock=CpuDilation(str(share_file)) if share_file else None,
                           cpu_cores=float(cores) if cores is not None else None)
