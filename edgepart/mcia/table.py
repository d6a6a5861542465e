"""Per-task cost tables and the one latency/objective evaluation every strategy is judged by.

A :class:`TaskTable` is what the optimiser needs of a task, nothing more: per version its accuracy
and, at each *legal cut* k = 0..K-1 of its graph (cut 0 = before the first node, cut K-1 = after
the last), prefix sums of compute seconds on the task's end device, the edge server and the cloud
at full share, prefix sums of weight bytes, and the bytes crossing the cut (cut 0: the input, cut
K-1: the output). Tables are built from a version set by :func:`build_table`, or written by hand.

A :class:`Choice` is (version, k1, k2, edge share, uplink share): nodes before cut k1 run on the end
device, between k1 and k2 on the edge server, after k2 in the cloud. Shares are integer levels out
of ``levels`` (level 0 only when the resource is unused).

Latency (seconds) of a choice, :func:`latency`::

    end_s[k1]                                         end prefix (the end device runs it alone)
  + up_lat + bytes[k1]·8 / (up_bw · b/L)              uplink, if anything runs off the end device
  + (edge_s[k2] − edge_s[k1]) / (a/L)                 edge middle at share a/L of the edge server
  + wan_lat + bytes[k2]·8 / wan_bw                    WAN, if a cloud suffix exists
  + cloud_s[K-1] − cloud_s[k2]                        cloud suffix
  + the output's way back over the same links (latency + bytes at the same shares)

Queueing is not in the latency; instead every choice must keep each resource stable: rate ×
service time < 1 on the task's edge share and uplink share, and Σ rate × end time ≤ 1 per end device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgepart.mcia.scenario import Task, Tiers


@dataclass(frozen=True)
class VersionCosts:
    name: str
    accuracy: float
    end_s: tuple[float, ...]        # prefix compute seconds at each legal cut, on the task's end device
    edge_s: tuple[float, ...]       # ... on the whole edge server
    cloud_s: tuple[float, ...]      # ... in the cloud
    cut_bytes: tuple[int, ...]      # bytes crossing each cut (cut 0: the input, last: the output)
    param_bytes: tuple[int, ...]    # prefix weight bytes at each cut
    cuts: tuple[str, ...] = ()      # label of each cut (the node it follows), for printing

    def __post_init__(self):
        k = len(self.cut_bytes)
        if k < 2 or any(len(a) != k for a in (self.end_s, self.edge_s, self.cloud_s, self.param_bytes)):
            raise ValueError(f"version {self.name!r}: end_s, edge_s, cloud_s, cut_bytes, param_bytes must all "
                             f"have one entry per cut (>= 2)")

    @property
    def last(self) -> int:
        return len(self.cut_bytes) - 1


@dataclass(frozen=True)
class TaskTable:
    task: Task
    versions: tuple[VersionCosts, ...]
    reference_s: float              # latency normaliser: the largest version, all on the end device

    def __post_init__(self):
        if not self.versions:
            raise ValueError(f"task {self.task.name!r}: no versions")
        if not self.reference_s > 0:
            raise ValueError(f"task {self.task.name!r}: reference_s must be > 0")


@dataclass(frozen=True)
class Choice:
    version: int
    k1: int
    k2: int
    edge_share: int                 # level out of L (0: the edge computes nothing for this task)
    up_share: int                   # level out of L (0: nothing leaves the end device)


@dataclass(frozen=True)
class Outcome:
    """A choice evaluated: latency in seconds, its parts, accuracy, objective term, resource use."""
    latency_s: float
    accuracy: float
    objective: float
    end_s: float
    up_s: float
    edge_s: float
    wan_s: float
    cloud_s: float
    end_bytes: int                  # weights on the end device
    edge_bytes: int                 # weights on the edge server


def reference_latency(v: VersionCosts) -> float:
    return v.end_s[-1]


def uses(v: VersionCosts, k1: int, k2: int) -> tuple[bool, bool, bool]:
    """(uplink used, edge computes, cloud used) for cuts k1 <= k2."""
    return k1 < v.last, k2 > k1, k2 < v.last


def evaluate(table: TaskTable, tiers: Tiers, c: Choice, levels: int) -> Outcome:
    """Latency, accuracy and objective term of one task's choice; raises ValueError on an ill-formed choice."""
    v = table.versions[c.version]
    if not 0 <= c.k1 <= c.k2 <= v.last:
        raise ValueError(f"task {table.task.name!r}: cuts must satisfy 0 <= k1 <= k2 <= {v.last}, got {c.k1}, {c.k2}")
    up, edge, cloud = uses(v, c.k1, c.k2)
    if cloud and tiers.wan is None:
        raise ValueError(f"task {table.task.name!r}: a cloud suffix but the cluster has no cloud")
    if (edge and not 0 < c.edge_share <= levels) or (up and not 0 < c.up_share <= levels):
        raise ValueError(f"task {table.task.name!r}: shares must be levels 1..{levels} where used, got {c}")
    out_bytes = v.cut_bytes[-1]
    link = tiers.uplinks[table.task.source]
    up_s = wan_s = 0.0
    if up:
        bw = link.bandwidth_mbps * 1e6 * c.up_share / levels
        up_s = 2 * link.latency_ms / 1e3 + (v.cut_bytes[c.k1] + out_bytes) * 8 / bw
    if cloud:
        wan_s = 2 * tiers.wan.latency_ms / 1e3 + (v.cut_bytes[c.k2] + out_bytes) * 8 / (tiers.wan.bandwidth_mbps * 1e6)
    end_s = v.end_s[c.k1]
    edge_s = (v.edge_s[c.k2] - v.edge_s[c.k1]) * levels / c.edge_share if edge else 0.0
    cloud_s = v.cloud_s[-1] - v.cloud_s[c.k2] if cloud else 0.0
    lat = end_s + up_s + edge_s + wan_s + cloud_s
    t = table.task
    obj = t.w_acc * v.accuracy - t.w_lat * lat / table.reference_s
    return Outcome(lat, v.accuracy, obj, end_s, up_s, edge_s, wan_s, cloud_s,
                   v.param_bytes[c.k1], v.param_bytes[c.k2] - v.param_bytes[c.k1])


def own_violations(table: TaskTable, o: Outcome) -> list[str]:
    """What one task's choice breaks on its own: accuracy minimum, deadline, stability of its shares."""
    t, bad = table.task, []
    if t.min_accuracy is not None and o.accuracy < t.min_accuracy - 1e-12:
        bad.append(f"{t.name}: accuracy {o.accuracy:.3f} < min_accuracy {t.min_accuracy:.3f}")
    if t.deadline_ms is not None and o.latency_s * 1e3 > t.deadline_ms + 1e-9:
        bad.append(f"{t.name}: latency {o.latency_s * 1e3:.2f} ms > deadline_ms {t.deadline_ms:g}")
    for what, s in (("edge share", o.edge_s), ("uplink share", o.up_s)):
        if t.rate * s >= 1.0:
            bad.append(f"{t.name}: rate {t.rate:g}/s × {what} service {s * 1e3:.2f} ms >= 1 (unstable)")
    return bad


def violations(tables: list[TaskTable], tiers: Tiers, choices: list[Choice], levels: int) -> list[str]:
    """Every constraint a whole plan breaks (empty: feasible)."""
    bad: list[str] = []
    edge_share, edge_mem = 0, 0
    medium: dict[str, int] = {}
    end_mem: dict[str, int] = {}
    end_util: dict[str, float] = {}
    for tb, c in zip(tables, choices):
        o = evaluate(tb, tiers, c, levels)
        bad += own_violations(tb, o)
        src = tb.task.source
        edge_share += c.edge_share
        edge_mem += o.edge_bytes
        m = tiers.medium(src)
        medium[m] = medium.get(m, 0) + c.up_share
        end_mem[src] = end_mem.get(src, 0) + o.end_bytes
        end_util[src] = end_util.get(src, 0.0) + tb.task.rate * o.end_s
    if edge_share > levels:
        bad.append(f"edge compute shares sum to {edge_share}/{levels} > 1")
    if edge_mem > tiers.edge.memory_mb * 2 ** 20:
        bad.append(f"edge weights {edge_mem / 2 ** 20:.1f} MiB > memory_mb {tiers.edge.memory_mb:g}")
    for m, s in medium.items():
        if s > levels:
            bad.append(f"uplink {m}: bandwidth shares sum to {s}/{levels} > 1")
    mem = {d.name: d.memory_mb for d in tiers.ends}
    for e, b in end_mem.items():
        if b > mem[e] * 2 ** 20:
            bad.append(f"end device {e}: weights {b / 2 ** 20:.1f} MiB > memory_mb {mem[e]:g}")
    for e, u in end_util.items():
        if u > 1.0 + 1e-12:
            bad.append(f"end device {e}: Σ rate × compute = {u:.2f} > 1 (unstable)")
    return bad


def objective(tables: list[TaskTable], tiers: Tiers, choices: list[Choice], levels: int) -> float:
    return sum(evaluate(tb, tiers, c, levels).objective for tb, c in zip(tables, choices))


def rescale(table: TaskTable, end: float = 1.0, edge: float = 1.0, cloud: float = 1.0) -> TaskTable:
    """The table with compute seconds × ``end`` on the task's end device, × ``edge`` on the edge server, ×
    ``cloud`` in the cloud: a device whose speed went from ``s`` to ``s'`` takes ``s / s'``, exactly as a
    rebuilt table would (the cost model divides every node's time by the device's speed). The
    normaliser ``reference_s`` stays: the objective's unit does not move with the live state."""
    vs = tuple(dataclasses.replace(v, end_s=tuple(t * end for t in v.end_s), edge_s=tuple(t * edge for t in v.edge_s),
                                   cloud_s=tuple(t * cloud for t in v.cloud_s)) for v in table.versions)
    return TaskTable(table.task, vs, table.reference_s)
