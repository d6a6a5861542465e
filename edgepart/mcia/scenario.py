"""An MCIA scenario: end devices sharing one edge server, a cloud behind a WAN, and the tasks.

The cluster file gives the tiers (``tier: end | edge | cloud`` per device, edgepart.cluster): exactly
one edge server (its ``speed`` and ``memory_mb`` are the capacity its tasks share), at most one cloud,
one or more end devices. Each end device's uplink is its link to the edge server (``links`` as
usual); with ``shared_medium: true`` all uplinks are one medium (one Wi-Fi cell) whose bandwidth the
tasks of every end device share, otherwise each end device's uplink is shared by its own tasks.
The WAN is the edge–cloud link (its bandwidth and its own latency); it is not shared (the cloud
side is elastic).

``tasks.yaml``::

    share_levels: 8                 # shares are k/8, k = 1..8 (optional, default 8)
    tasks:
      - name: cam0
        source: phone0              # an end device of the cluster
        versions: versions/resnet   # a version set directory (edgepart versions), relative to this file
        w_acc: 1.0                  # weight of accuracy (0..1) in the objective
        w_lat: 0.5                  # weight of normalised latency
        min_accuracy: 0.9           # optional
        deadline_ms: 80             # optional
        rate: 5                     # requests per second (optional, default 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgepart.cluster import Cluster, Device
from edgepart.errors import ClusterError, EdgepartError

TASK_KEYS = {"name", "source", "versions", "w_acc", "w_lat", "min_accuracy", "deadline_ms", "rate"}


@dataclass(frozen=True)
class Link:
    bandwidth_mbps: float
    latency_ms: float


@dataclass(frozen=True)
class Task:
    """One inference task. ``versions`` is the version set directory (None for hand-written cost tables)."""
    name: str
    source: str
    w_acc: float = 1.0
    w_lat: float = 1.0
    min_accuracy: float | None = None
    deadline_ms: float | None = None
    rate: float = 1.0
    versions: Path | None = None


@dataclass(frozen=True)
class Tiers:
    """The hierarchy read from a tiered cluster: end devices, the edge server, the cloud (or None)."""
    ends: tuple[Device, ...]
    edge: Device
    cloud: Device | None
    uplinks: dict[str, Link]          # end device -> its link to the edge server
    wan: Link | None                  # edge -> cloud
    shared_medium: bool               # all uplinks are one medium

    def medium(self, end: str) -> str:
        """The name of the uplink medium an end device's traffic shares ("uplink" when shared)."""
        return "uplink" if self.shared_medium else end

    @classmethod
    def from_cluster(cls, cluster: Cluster) -> "Tiers":
        untiered = [d.name for d in cluster.devices if d.tier is None]
        if untiered:
            raise ClusterError(f"MCIA needs a tier for every device (tier: end | edge | cloud); none for {untiered}")
        ends, edges, clouds = cluster.tier("end"), cluster.tier("edge"), cluster.tier("cloud")
        if len(edges) != 1:
            raise ClusterError(f"MCIA needs exactly one device with tier: edge, got {[d.name for d in edges]}")
        if len(clouds) > 1:
            raise ClusterError(f"MCIA takes at most one device with tier: cloud, got {[d.name for d in clouds]}")
        if not ends:
            raise ClusterError("MCIA needs at least one device with tier: end")
        edge = edges[0]

        def link(a: str, b: str) -> Link:
            lk = cluster.link(a, b)
            return Link(float(lk["bandwidth_mbps"]), float(lk["latency_ms"]))
        cloud = clouds[0] if clouds else None
        return cls(tuple(ends), edge, cloud, {e.name: link(e.name, edge.name) for e in ends},
                   link(edge.name, cloud.name) if cloud else None, cluster.shared_medium)


def _number(where: str, d: dict, key: str, default: Any, lo: float | None = 0.0, hi: float | None = None,
            positive: bool = False) -> Any:
    v = d.get(key, default)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise EdgepartError(f"{where}: {key} must be a number, got {v!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi) or (positive and not v > 0):
        rng = f"> {lo:g}" if positive else f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise EdgepartError(f"{where}: {key} must be {rng}, got {v:g}")
    return v


def parse_tasks(data: Any, tiers: Tiers, base: Path | None = None, where: str = "tasks") -> tuple[list[Task], int]:
    """Tasks and share levels from a parsed tasks.yaml; raises EdgepartError naming the file, task and key."""
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise EdgepartError(f"{where}: needs a non-empty 'tasks' list, e.g. tasks: [{{name: t0, source: phone0, "
                            "versions: DIR, w_acc: 1, w_lat: 1}]")
    unknown = set(data) - {"tasks", "share_levels"}
    if unknown:
        raise EdgepartError(f"{where}: unknown keys {sorted(unknown)} (known: tasks, share_levels)")
    levels = data.get("share_levels", 8)
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= 64:
        raise EdgepartError(f"{where}: share_levels must be an integer in [1, 64], got {levels!r}")
    ends = {d.name for d in tiers.ends}
    tasks, names = [], set()
    for i, t in enumerate(data["tasks"]):
        at = f"{where}: tasks[{i}]"
        if not isinstance(t, dict) or "name" not in t:
            raise EdgepartError(f"{at}: needs a 'name'")
        at = f"{at} ({t['name']!r})"
        unknown = set(t) - TASK_KEYS
        if unknown:
            raise EdgepartError(f"{at}: unknown keys {sorted(unknown)} (known: {sorted(TASK_KEYS)})")
        name = str(t["name"])
        if name in names:
            raise EdgepartError(f"{at}: name {name!r} is repeated")
        names.add(name)
        if t.get("source") not in ends:
            raise EdgepartError(f"{at}: source must be an end device of the cluster ({sorted(ends)}), "
                                f"got {t.get('source')!r}")
        versions = t.get("versions")
        if versions is not None:
            versions = Path(str(versions))
            if base is not None and not versions.is_absolute():
                versions = base / versions
        tasks.append(Task(name=name, source=str(t["source"]), versions=versions,
                          w_acc=_number(at, t, "w_acc", 1.0), w_lat=_number(at, t, "w_lat", 1.0),
                          min_accuracy=_number(at, t, "min_accuracy", None, 0.0, 1.0),
                          deadline_ms=_number(at, t, "deadline_ms", None, positive=True),
                          rate=_number(at, t, "rate", 1.0, positive=True)))
    return tasks, levels


def load_tasks(path: str | Path, tiers: Tiers) -> tuple[list[Task], int]:
    """Read tasks.yaml; version set paths are relative to it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EdgepartError(f"cannot read tasks file {path}: {e}") from e
    return parse_tasks(data, tiers, path.parent, str(path))
