"""Emulated links in the sender: per-peer delay line and token bucket, and the device's one NIC.

Under the test bed's emulation (:mod:`edgepart.testbed.emulator`) a worker shapes what it sends
to each peer: the link's latency (netem is not available, so the sender delays each message),
its bandwidth when tc does not shape it (``inprocess`` mode), and the device's one network
interface that all its links share. These are the runtime's ``link_shaper`` hook
(:data:`edgepart.runtime.transport.LinkShaperFactory`); :class:`LinkEmulation` builds them from
the ``peers`` part of a worker's ``--links``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


class SenderNic:
    """An emulated device's one network interface, shared by its links to every peer.

    The cost model's switched links (``simulator``: "each device's outgoing NIC serialises the
    messages it sends, FIFO") send one message at a time: a message holds the NIC for its link's
    latency + bytes ÷ bandwidth, and the next one, to whichever peer, starts after it. The
    emulated links are one veth pair per pair of devices, each shaped on its own, so without this
    a device scattering pieces to three peers sent them at three times its bandwidth (MobileNetV2
    split four ways at 1000 Mbit/s measured 18 % under its prediction, and 8 % under the same
    plan simulated with parallel sends). Reservations are made in the order the device sends
    (its action list), before the pieces queue on their links."""

    def __init__(self):
        self.free = 0.0                    # monotonic time the NIC is next free
        self.lock = threading.Lock()

    def reserve(self, now: float, hold_s: float) -> float:
        """Take the NIC for ``hold_s`` seconds from ``now`` or when it frees up; the start time."""
        with self.lock:
            start = max(now, self.free)
            self.free = start + hold_s
        return start


class Shaper:
    """Per-peer emulated link in the sender: a token bucket for bandwidth and a delay line for latency,
    and the device's :class:`SenderNic` (``nic_mbps``: the link's bandwidth there) if it has one."""

    def __init__(self, bandwidth_mbps: float | None, latency_ms: float, nic: SenderNic | None = None,
                 nic_mbps: float | None = None):
        self.rate = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else None   # bytes / s
        self.latency = latency_ms / 1e3
        self.burst = 16 * 1024
        self.tokens = float(self.burst)
        self.t = time.monotonic()
        self.nic = nic if nic_mbps else None
        self.nic_rate = nic_mbps * 1e6 / 8 if nic_mbps else None

    def release_time(self, enqueued: float, nbytes: int = 0) -> float:
        """When a message of ``nbytes`` queued at ``enqueued`` may be written: after the link's latency,
        and after the messages the device sent before it have held its NIC."""
        if self.nic is None:
            return enqueued + self.latency
        return self.nic.reserve(enqueued, self.latency + nbytes / self.nic_rate) + self.latency

    def consume(self, nbytes: int) -> float | None:
        """Take ``nbytes`` from the token bucket, sleeping while it is empty; the frame's emulated time on the
        link (``nbytes`` ÷ rate: its bytes then leave at once), None if the link is not shaped here."""
        if self.rate is None:
            return None
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= nbytes
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)
        return nbytes / self.rate


@dataclass(frozen=True)
class LinkConfig:
    """One emulated link as a worker's ``--links`` gives it: ``bandwidth_mbps`` shaped in the sender (None:
    tc shapes it, or unlimited), ``latency_ms`` added by the sender, ``nic_mbps`` the rate of the device's
    NIC on that link (None: no shared NIC)."""

    bandwidth_mbps: float | None = None
    latency_ms: float = 0.0
    nic_mbps: float | None = None


class LinkEmulation:
    """The ``link_shaper`` hook of a worker: the shaping of its traffic to each peer, from ``--links``.

    Pieces (``nic=True``) to every peer share one :class:`SenderNic` if any link has ``nic_mbps``;
    a link probe (``nic=False``) gets the link's delay line and token bucket alone.
    """

    def __init__(self, peers: dict[str, LinkConfig]):
        self.peers = peers
        self.nic = SenderNic() if any(c.nic_mbps for c in peers.values()) else None

    def __call__(self, peer: str, nic: bool) -> Shaper | None:
        cfg = self.peers.get(peer)
        if cfg is None:
            return None
        if not nic:
            return Shaper(cfg.bandwidth_mbps, cfg.latency_ms)
        return Shaper(cfg.bandwidth_mbps, cfg.latency_ms, self.nic, cfg.nic_mbps)
