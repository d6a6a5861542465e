"""The live cluster state while serving: per device its load and whether it answers, per link its
bandwidth and latency — each smoothed (EWMA) with a confidence — and the Cluster views the
controller predicts and plans with.

Units are the cluster's (the emulated devices' time on the testbed): the monitor converts what it
measures (wall seconds, Mbit/s on the wire) with the session's ``time_scale`` before it gets here.

*Load* of a device is the share of its compute budget other work takes (0..1), the FCPM's load
input (:class:`~edgepart.compiler.cost.model.CostModel` ``loads``). It is estimated from the
device's stage times: the controller predicts each stage of the current plan at no load, the
workers report how long their stages took (``stage_us:S`` / ``stage_runs:S``); the ratio measured ÷
predicted, relative to the ratio the device showed when it was first measured (the model's own
error, not load), gives ``load = 1 − base / ratio``. A device the current plan does not use has
no stage times: its load stays as last estimated (its confidence decays), or follows the
worker's ``cpu_load`` reading (``/proc/stat``) when ``proc_load`` is on.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from edgepart.cluster import Cluster

MAX_LOAD = 0.9
LINK_JUMP = 2.0        # a probe 2x off a link's bandwidth replaces it rather than being averaged in
RATIO_JUMP = 1.6       # a stage-time ratio 1.6x off replaces the EWMA (a load that appears is seen at once;
                       # a one-interval spike only starts a candidate compile: the swap needs hold_s)


TX_BUSY_BYTES = 64 << 10     # a link with this much unacknowledged at one snapshot and not all of it
                             # acknowledged by the next was busy throughout: its rate is measured
MIN_SEGMENT = 1448           # bytes: a busy link that delivered nothing is taken as slower than this per interval


@dataclass(frozen=True)
class LinkReading:
    """One link as a worker's counters show it between two snapshots (wall units): ``kind`` ``rx`` (the
    rate pieces from ``peer`` arrived at), ``tx`` (the rate the worker's sends to ``peer`` were
    acknowledged at while the link stayed busy) — both Mbit/s — or ``lat`` (one-way latency to ``peer``, ms)."""

    kind: str
    peer: str
    value: float


def link_readings(st: dict, prev: dict) -> list[LinkReading]:
    """What a worker's stats (runtime.execution ``Executor.link_stats``) say of its links since ``prev``:
    the arrival rate of each peer's pieces if any arrived since; the acknowledged rate of its sends to a
    peer if that link was busy throughout (:data:`TX_BUSY_BYTES` waiting at ``prev``, not all of it
    acknowledged now, on the same connections) — a link that delivered nothing as one segment per
    interval, where no piece arrives to be timed; and the latency from the kernel's round-trip times."""
    dt = (st.get("t_us", 0) - prev.get("t_us", 0)) / 1e6
    out: list[LinkReading] = []
    for key, v in st.items():
        kind, _, peer = key.partition(":")
        if kind == "tx_acked" and dt > 0.1:
            queued_before = prev.get(f"tx_queued:{peer}", 0)
            delivered = v - prev.get(key, v)
            same = st.get(f"tx_conns:{peer}") == prev.get(f"tx_conns:{peer}")     # sums of the same connections
            if same and queued_before >= TX_BUSY_BYTES and 0 <= delivered < queued_before:
                out.append(LinkReading("tx", peer, 8 * max(delivered, MIN_SEGMENT) / dt / 1e6))
        elif kind == "rx_mbps" and st.get(f"rx_frames:{peer}", 0) > prev.get(f"rx_frames:{peer}", 0):
            out.append(LinkReading("rx", peer, float(v)))
        elif kind == "link_lat_us":
            out.append(LinkReading("lat", peer, float(v) / 1e3))
    return out


@dataclass
class Smoothed:
    """An EWMA with a confidence: 0 with no sample, towards 1 as samples agree, decaying with age."""

    value: float | None = None
    updated: float = 0.0
    samples: int = 0
    spread: float = 0.0           # EWMA of |sample − value| / value

    def add(self, x: float, alpha: float, now: float | None = None, jump: float | None = None) -> float:
        """Add a sample; ``jump``: a sample this many times larger or smaller than the value replaces it
        (a link that dropped from 1000 to 20 Mbit/s is not averaged in over a minute of probes)."""
        now = time.monotonic() if now is None else now
        if self.value is None or (jump and self.value > 0 and x > 0 and max(x / self.value, self.value / x) > jump):
            self.value = x
        else:
            self.spread = (1 - alpha) * self.spread + alpha * abs(x - self.value) / max(abs(self.value), 1e-9)
            self.value = (1 - alpha) * self.value + alpha * x
        self.updated = now
        self.samples += 1
        return self.value

    def confidence(self, now: float | None = None, half_life: float = 10.0) -> float:
        if self.value is None:
            return 0.0
        now = time.monotonic() if now is None else now
        age = max(0.0, now - self.updated)
        return (1 - 0.5 ** self.samples) * 0.5 ** (age / half_life) / (1 + 4 * self.spread)


@dataclass
class DeviceState:
    name: str
    alive: bool = True
    ratio: Smoothed = field(default_factory=Smoothed)      # measured ÷ predicted stage time
    base_ratio: float | None = None                        # the ratio at no load (first measurements)
    proc_load: Smoothed = field(default_factory=Smoothed)
    down_since: float | None = None
    up_since: float = -math.inf          # when it last came back (monotonic)

    def load(self, use_proc: bool) -> float:
        if self.ratio.value is not None and self.base_ratio is not None and self.ratio.updated >= self.proc_load.updated - 5:
            return min(MAX_LOAD, max(0.0, 1.0 - self.base_ratio / self.ratio.value))
        if use_proc and self.proc_load.value is not None:
            return min(MAX_LOAD, max(0.0, self.proc_load.value))
        return 0.0


@dataclass
class LinkState:
    """One link: bandwidth and one-way latency, from the pieces real requests moved on it (``observed``:
    when last) or, while it carries none, from light probes (``probed``: when last)."""

    bandwidth_mbps: Smoothed = field(default_factory=Smoothed)
    latency_ms: Smoothed = field(default_factory=Smoothed)
    probed: float = -math.inf
    observed: float = -math.inf


class LiveState:
    """The cluster as it is now, from the nominal ``cluster`` (the one the first plan was compiled for)."""

    def __init__(self, cluster: Cluster, alpha: float = 0.4, proc_load: bool = True, base_samples: int = 3):
        self.nominal = cluster
        self.alpha = alpha
        self.proc_load = proc_load
        self.base_samples = base_samples
        self.devices = {d: DeviceState(d) for d in cluster.names}
        self.links: dict[frozenset, LinkState] = {}
        self._base: dict[str, list[float]] = {d: [] for d in cluster.names}

    # --- updates -----------------------------------------------------------------------------
    def stage_ratio(self, device: str, ratio: float, now: float | None = None) -> None:
        """A new measured ÷ predicted stage-time ratio of ``device`` (its first few set its no-load base)."""
        st = self.devices[device]
        if st.base_ratio is None:
            self._base[device].append(ratio)
            if len(self._base[device]) >= self.base_samples:
                st.base_ratio = sorted(self._base[device])[len(self._base[device]) // 2]
        st.ratio.add(ratio, self.alpha, now, jump=RATIO_JUMP if st.base_ratio is not None else None)

    def cpu_load(self, device: str, load: float, now: float | None = None) -> None:
        self.devices[device].proc_load.add(load, self.alpha, now)

    def link(self, a: str, b: str, bandwidth_mbps: float | None = None, latency_ms: float | None = None,
             now: float | None = None, probe: bool = False) -> None:
        """A measurement of link a-b: from real transfers (default) or from a probe (``probe``)."""
        ls = self.links.setdefault(frozenset((a, b)), LinkState())
        now = time.monotonic() if now is None else now
        if bandwidth_mbps is not None and bandwidth_mbps > 0:
            ls.bandwidth_mbps.add(bandwidth_mbps, self.alpha, now, jump=LINK_JUMP)
            if not probe:
                ls.observed = now
        if latency_ms is not None and latency_ms >= 0:
            ls.latency_ms.add(latency_ms, self.alpha, now)
        if probe:
            ls.probed = now

    def link_idle(self, a: str, b: str, idle_s: float, now: float | None = None) -> bool:
        """No real transfer measured a-b for ``idle_s`` seconds."""
        ls = self.links.get(frozenset((a, b)))
        now = time.monotonic() if now is None else now
        return ls is None or now - ls.observed > idle_s

    def set_alive(self, device: str, alive: bool) -> None:
        st = self.devices[device]
        st.alive = alive
        st.down_since = None if alive else (st.down_since or time.monotonic())
        if alive:                       # back: what it measured before may not hold any more
            st.up_since = time.monotonic()
            st.ratio = Smoothed()
            st.proc_load = Smoothed()

    # --- views -------------------------------------------------------------------------------
    def alive(self) -> list[str]:
        return [d for d, st in self.devices.items() if st.alive]

    def loads(self) -> dict[str, float]:
        return {d: st.load(self.proc_load) for d, st in self.devices.items()}

    def link_values(self, a: str, b: str) -> dict:
        nominal = self.nominal.link(a, b)
        ls = self.links.get(frozenset((a, b)))
        out = {"bandwidth_mbps": nominal["bandwidth_mbps"], "latency_ms": nominal["latency_ms"]}
        if ls is not None:
            if ls.bandwidth_mbps.value is not None:
                # a link is taken at most as fast as the cluster file says: a faster measurement is a burst
                # (a shaper's or NIC's bucket lets a piece through at once), not its sustained rate
                out["bandwidth_mbps"] = min(ls.bandwidth_mbps.value, nominal["bandwidth_mbps"])
            if ls.latency_ms.value is not None:
                out["latency_ms"] = ls.latency_ms.value
        return out

    def calibration(self) -> dict[str, float]:
        """Per device, how much longer its stages ran than predicted at no load (its first ratios): the
        cost model's own error on this device now, divided out of its speed. A device not measured yet
        gets the median of those measured (on one host they share most of it), else 1."""
        known = {d: st.base_ratio for d, st in self.devices.items() if st.base_ratio}
        default = sorted(known.values())[len(known) // 2] if known else 1.0
        return {d: known.get(d, default) for d in self.devices}

    def cluster(self, devices: list[str] | None = None, bake_load: bool = False, calibrated: bool = True) -> Cluster:
        """The nominal cluster with the live links, on ``devices`` (default: all); each device's speed ÷
        its :meth:`calibration` (``calibrated``); ``bake_load``: × (1 − load) too (for planners, which take
        no loads; predictions pass loads to the CostModel instead)."""
        names = [d for d in self.nominal.names if devices is None or d in devices]
        loads = self.loads()
        cal = self.calibration() if calibrated else {}
        devs = [dataclasses.replace(self.nominal.device(d),
                                    speed=self.nominal.device(d).speed / cal.get(d, 1.0)
                                    * (1 - loads[d] if bake_load else 1))
                for d in names]
        overrides = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                overrides.append({"a": a, "b": b, **self.link_values(a, b)})
        source = self.nominal.source if self.nominal.source in names else self.substitute_source(names)
        return Cluster(devs, dict(self.nominal.default_link), overrides, source, self.nominal.shared_medium)

    def substitute_source(self, names: list[str]) -> str:
        """Where inputs go while the nominal source is down: the fastest of ``names`` now (speed ÷
        calibration × (1 − load))."""
        loads, cal = self.loads(), self.calibration()
        return max(names, key=lambda d: (self.nominal.device(d).speed / cal.get(d, 1.0) * (1 - loads[d]), d))

    def snapshot(self) -> dict:
        """A JSON-able view for logs: per device alive, load and confidence; per measured link bandwidth."""
        now = time.monotonic()
        loads = self.loads()
        cal = self.calibration()
        return {"devices": {d: {"alive": st.alive, "load": round(loads[d], 3), "calibration": round(cal[d], 3),
                                "confidence": round(st.ratio.confidence(now), 2)}
                            for d, st in self.devices.items()},
                "links": {"-".join(sorted(k)): {**{kk: round(v, 3) for kk, v in self.link_values(*sorted(k)).items()},
                                                "confidence": round(ls.bandwidth_mbps.confidence(now), 2),
                                                "from": "transfers" if ls.observed >= ls.probed else "probe"}
                          for k, ls in self.links.items()}}
