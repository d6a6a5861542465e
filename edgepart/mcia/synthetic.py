"""Synthetic MCIA scenarios: cost tables of a CNN-like task and random scenarios drawn from distributions.

:func:`synthetic_table` is the benchmark's task model (benchmarks/mcia.py): a CNN of ``n_cuts`` legal
cuts, versions at scales 1, 0.75, 0.5, 0.25 (compute and weights ∝ scale², accuracy 0.92 / 0.91 / 0.88 /
0.80), ``0.2 s × U(0.7, 1.3)`` on a speed-1 device at full scale, a 150 kB input, feature maps shrinking
along the network, a 40 B output, 40 MiB of weights at full scale. A device of speed s computes in
1/s of the speed-1 time.

:func:`draw_scenario` draws a whole scenario (cluster and tasks) from :class:`Distribution`: the DRL
agent is trained on such draws and judged on the benchmark's grid, which it never sees.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from edgepart.cluster import Cluster
from edgepart.mcia.scenario import Task, Tiers
from edgepart.mcia.table import TaskTable, VersionCosts

SCALES = ((1.0, 0.92), (0.75, 0.91), (0.5, 0.88), (0.25, 0.80))


def synthetic_table(rng: random.Random, task: Task, n_cuts: int = 8, end_speed: float = 1.0,
                    edge_speed: float = 8.0, cloud_speed: float = 32.0) -> TaskTable:
    """One task's cost table (draws from ``rng`` in a fixed order: the same seed gives the same table)."""
    full_s = 0.2 * rng.uniform(0.7, 1.3)
    share = [rng.uniform(0.5, 1.5) for _ in range(n_cuts - 1)]
    share = [s / sum(share) for s in share]
    fmap = [150_000] + [int(600_000 * 0.55 ** i * rng.uniform(0.7, 1.3)) for i in range(1, n_cuts - 1)] + [40]
    params = [rng.uniform(0.2, 1.0) * 2 ** (i / 2) for i in range(n_cuts - 1)]
    params = [p / sum(params) * 40 * 2 ** 20 for p in params]       # 40 MiB of weights at full scale
    versions = []
    for scale, acc in SCALES:
        t = [0.0]
        w = [0]
        for s, p in zip(share, params):
            t.append(t[-1] + full_s * s * scale ** 2)
            w.append(w[-1] + int(p * scale ** 2))
        b = [fmap[0]] + [int(f * scale) for f in fmap[1:-1]] + [fmap[-1]]
        versions.append(VersionCosts(f"scale-{scale:.2f}", acc, tuple(x / end_speed for x in t),
                                     tuple(x / edge_speed for x in t), tuple(x / cloud_speed for x in t),
                                     tuple(b), tuple(w)))
    return TaskTable(task, tuple(versions), versions[0].end_s[-1])


def tiered_cluster(uplink_mbps: float | list[float], n_ends: int = 10, edge_speed: float = 8.0,
                   edge_memory_mb: float = 2048.0, wan_mbps: float = 50.0, wan_ms: float = 30.0,
                   end_speeds: list[float] | None = None, shared_medium: bool = False) -> Cluster:
    """end0..end{n-1} (512 MB each), one edge server, a cloud (speed 32); uplinks 2 ms, one bandwidth or one each."""
    ups = uplink_mbps if isinstance(uplink_mbps, list) else [uplink_mbps] * n_ends
    speeds = end_speeds or [1.0] * n_ends
    devs = [{"name": f"end{i}", "speed": speeds[i], "tier": "end", "memory_mb": 512} for i in range(n_ends)]
    devs += [{"name": "edge", "speed": edge_speed, "tier": "edge", "memory_mb": edge_memory_mb},
             {"name": "cloud", "speed": 32.0, "tier": "cloud"}]
    over = [{"a": "edge", "b": "cloud", "bandwidth_mbps": wan_mbps, "latency_ms": wan_ms}]
    over += [{"a": f"end{i}", "b": "edge", "bandwidth_mbps": ups[i], "latency_ms": 2.0} for i in range(n_ends)]
    return Cluster.from_dict({"devices": devs, "shared_medium": shared_medium, "links": {
        "default": {"bandwidth_mbps": ups[0], "latency_ms": 2.0}, "overrides": over}})


def benchmark_task(i: int, latency_sensitive: bool, n_ends: int = 10, rate: float = 2.0,
                   deadline_ms: float = 80.0) -> Task:
    """The benchmark's task i: accuracy-sensitive (w_acc 1, w_lat 0.1, min accuracy 0.91) or
    latency-sensitive (w_acc 0.1, w_lat 1, min accuracy 0.88, a deadline), on end device i mod n_ends."""
    lat = latency_sensitive
    return Task(f"t{i}", f"end{i % n_ends}", w_acc=0.1 if lat else 1.0, w_lat=1.0 if lat else 0.1,
                min_accuracy=0.88 if lat else 0.91, deadline_ms=deadline_ms if lat else None, rate=rate)


@dataclass(frozen=True)
class Distribution:
    """Where training scenarios come from; each field a range sampled uniformly (bandwidth log-uniformly)."""
    n_tasks: tuple[int, int] = (3, 50)
    uplink_mbps: tuple[float, float] = (0.5, 200.0)     # per end device, log-uniform around a scenario-wide level
    end_speed: tuple[float, float] = (0.5, 2.0)         # per end device
    edge_speed: tuple[float, float] = (4.0, 16.0)
    wan_mbps: tuple[float, float] = (20.0, 100.0)
    wan_ms: tuple[float, float] = (10.0, 50.0)
    rates: tuple[float, ...] = (1.0, 2.0, 3.0)
    deadlines_ms: tuple[float, ...] = (60.0, 80.0, 120.0)
    shared_medium_p: float = 0.2


def draw_scenario(rng: random.Random, dist: Distribution = Distribution(),
                  n_tasks: int | None = None) -> tuple[list[TaskTable], Tiers]:
    """A random scenario: 10 end devices of mixed speeds, a bandwidth level (log-uniform) with per-device
    spread, an edge server, a WAN, and tasks of a random accuracy/latency mix (per-scenario fraction)."""
    n = n_tasks if n_tasks is not None else rng.randint(*dist.n_tasks)
    n_ends = 10
    lo, hi = (math.log(x) for x in dist.uplink_mbps)
    level = rng.uniform(lo, hi)
    ups = [math.exp(min(hi, max(lo, level + rng.uniform(-0.5, 0.5)))) for _ in range(n_ends)]
    if rng.random() < 0.5:
        ups = [math.exp(level)] * n_ends                # half the scenarios: one bandwidth for all
    speeds = [rng.uniform(*dist.end_speed) if rng.random() < 0.5 else 1.0 for _ in range(n_ends)]
    edge_speed = rng.uniform(*dist.edge_speed)
    cluster = tiered_cluster(ups, n_ends, edge_speed=edge_speed, wan_mbps=rng.uniform(*dist.wan_mbps),
                             wan_ms=rng.uniform(*dist.wan_ms), end_speeds=speeds,
                             shared_medium=rng.random() < dist.shared_medium_p)
    tiers = Tiers.from_cluster(cluster)
    p_lat = rng.choice([0.0, 1.0, 0.5, rng.random()])
    rate, deadline = rng.choice(dist.rates), rng.choice(dist.deadlines_ms)
    tables = []
    for i in range(n):
        task = benchmark_task(i, rng.random() < p_lat, n_ends, rate=rate, deadline_ms=deadline)
        tables.append(synthetic_table(rng, task, end_speed=speeds[i % n_ends], edge_speed=edge_speed))
    return tables, tiers
