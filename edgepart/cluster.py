"""The group of devices a model is compiled for: devices, links, and the source device.

A cluster is a complete networkx graph: nodes are devices (speed, memory, address),
edges are links (bandwidth in Mbit/s, latency in ms). The *source* device is where
requests arrive and results are returned (usually the end device holding the camera).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from edgepart.errors import ClusterError

DEFAULT_LINK = {"bandwidth_mbps": 100.0, "latency_ms": 1.0}
BACKENDS = ("torch", "onnxruntime")   # how a device runs its stages (edgepart.ir.manifest.BACKENDS)
TIERS = ("end", "edge", "cloud")       # where a device sits for MCIA (edgepart.mcia)

# What a cluster description may hold (Cluster.from_dict checks every key against these)
TOP_KEYS = {"devices", "links", "source", "shared_medium", "probe"}
DEVICE_KEYS = {"name", "speed", "memory_mb", "address", "profile", "memory_speed", "calibration", "stage_start_ms",
               "stage_io_us_per_mb", "stage_weights_us_per_mb", "node_calibration", "backend", "profiles", "tier"}
LINKS_KEYS = {"default", "overrides"}
LINK_KEYS = {"bandwidth_mbps", "latency_ms"}
OVERRIDE_KEYS = LINK_KEYS | {"a", "b"}
# key -> lowest value allowed and whether it is allowed itself (> 0 or >= 0)
RANGES = {"speed": (0.0, False), "memory_mb": (0.0, False), "memory_speed": (0.0, False),
          "stage_start_ms": (0.0, True), "stage_io_us_per_mb": (0.0, True),
          "stage_weights_us_per_mb": (0.0, True), "bandwidth_mbps": (0.0, False), "latency_ms": (0.0, True)}


def _where(path: str, name=None) -> str:
    return f"{path} (device {name!r})" if name is not None else path


def _fail(path: tuple, message: str) -> ClusterError:
    """A ClusterError about the value at ``path`` in the description (``from_file`` adds its line)."""
    e = ClusterError(message)
    e.path = path
    return e


def _check_keys(obj: dict, allowed: set, where: str, path: tuple = ()) -> None:
    for k in obj:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            raise _fail(path + (k,), f"{where}: unknown key {str(k)!r}" + (
                f" (did you mean {near[0]!r}?)" if near else f"; allowed: {sorted(allowed)}"))


def _check_number(obj: dict, key: str, where: str, path: tuple = ()) -> None:
    """``obj[key]``, if present and not null, is a finite number in its range (RANGES)."""
    v = obj.get(key)
    if v is None and key not in ("speed", "memory_mb", "bandwidth_mbps"):
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path + (key,), f"{where}: {key} must be a number, got {v!r}")
    lo, inclusive = RANGES[key]
    if not math.isfinite(v):
        raise _fail(path + (key,), f"{where}: {key} must be a finite number, got {v!r}")
    if v < lo or (v == lo and not inclusive):
        raise _fail(path + (key,), f"{where}: {key} must be {'>=' if inclusive else '>'} {lo:g}, got {v!r}")


def _line_of(path: Path, where: tuple | None) -> int | None:
    """The 1-based line in YAML file ``path`` of the value at ``where`` (keys and list indices), if found."""
    if not where:
        return None
    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for step in where:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if str(k.value) == str(step)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return line


def validate_description(d: Any) -> None:
    """Check a cluster description's structure, types, ranges and keys before it is read; every
    error names the key and where it is (``devices[1] (device 'b'): speed must be a number, got
    'fast'``; ``links.default: unknown key 'bandwith_mbps' (did you mean 'bandwidth_mbps'?)``)."""
    if not isinstance(d, dict) or "devices" not in d:
        raise ClusterError("a cluster description needs a 'devices' list, e.g. "
                           "{devices: [{name: a, speed: 1.0}], links: {default: {bandwidth_mbps: 100}}}")
    _check_keys(d, TOP_KEYS, "top level")
    if not isinstance(d["devices"], list) or not d["devices"]:
        raise ClusterError("devices: must be a non-empty list of devices")
    for i, dev in enumerate(d["devices"]):
        if not isinstance(dev, dict) or "name" not in dev:
            raise _fail(("devices", i), f"devices[{i}] needs a 'name'")
        name = dev["name"]
        where = _where(f"devices[{i}]", name)
        if not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name):
            raise _fail(("devices", i, "name"), f"devices[{i}]: name must be a non-empty string, got {name!r}")
        _check_keys(dev, DEVICE_KEYS, where, ("devices", i))
        for key in ("speed", "memory_mb", "memory_speed", "stage_start_ms", "stage_io_us_per_mb",
                    "stage_weights_us_per_mb"):
            if key in dev:
                _check_number(dev, key, where, ("devices", i))
        for key in ("address", "profile"):
            if dev.get(key) is not None and not isinstance(dev[key], str):
                raise _fail(("devices", i, key), f"{where}: {key} must be a string, got {dev[key]!r}")
        cal = dev.get("calibration")
        if cal is not None:
            if not isinstance(cal, dict):
                raise _fail(("devices", i, "calibration"), f"{where}: calibration must map op types to speeds, e.g. {{conv: 1.1}}")
            for fam, v in cal.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                    raise _fail(("devices", i, "calibration", fam), f"{where}: calibration.{fam} must be a finite number > 0, got {v!r}")
    if "source" in d and d["source"] is not None and not isinstance(d["source"], str):
        raise ClusterError(f"source: must be a device name, got {d['source']!r}")
    if "shared_medium" in d and not isinstance(d["shared_medium"], bool):
        raise ClusterError(f"shared_medium: must be true or false, got {d['shared_medium']!r}")
    links = d.get("links")
    if links is None:
        return
    if not isinstance(links, dict):
        raise ClusterError(f"links: must be a mapping with 'default' and 'overrides', got {links!r}")
    _check_keys(links, LINKS_KEYS, "links", ("links",))
    default = links.get("default")
    if default is not None:
        if not isinstance(default, dict):
            raise ClusterError(f"links.default: must be a mapping {{bandwidth_mbps, latency_ms}}, got {default!r}")
        _check_keys(default, LINK_KEYS, "links.default", ("links", "default"))
        for key in LINK_KEYS:
            if key in default:
                _check_number(default, key, "links.default", ("links", "default"))
    overrides = links.get("overrides")
    if overrides is not None:
        if not isinstance(overrides, list):
            raise ClusterError("links.overrides: must be a list of {a, b, bandwidth_mbps, latency_ms}")
        for i, o in enumerate(overrides):
            where = f"links.overrides[{i}]"
            if not isinstance(o, dict):
                raise ClusterError(f"{where}: must be a mapping {{a, b, bandwidth_mbps, latency_ms}}, got {o!r}")
            _check_keys(o, OVERRIDE_KEYS, where, ("links", "overrides", i))
            for key in LINK_KEYS:
                if key in o:
                    _check_number(o, key, where, ("links", "overrides", i))


@dataclass(frozen=True)
class Device:
    name: str
    speed: float = 1.0          # relative compute speed (1.0 = this machine, one thread)
    memory_mb: float = 4096.0
    address: str | None = None  # host:port of its worker, if known
    profile: str | None = None  # path of its FCPM profile JSON (edgepart profile), if any
    # how fast it streams weights from memory now ÷ when its profile was taken (measured online,
    # e.g. calibration.host_speed.HostSpeedProbe); the cost model divides memory-bound layers' time by it
    memory_speed: float = 1.0
    # per op type (FCPM family): how fast it runs now ÷ when profiled, beyond ``speed``
    # (calibration.op_types.measure_family_speeds); a missing family is 1.0
    calibration: tuple[tuple[str, float], ...] = ()
    # ms this device loses each time it starts a stage (cold caches after waiting for its pieces),
    # in its own time; None: the runtime's measured constant (cost.RUNTIME_STAGE_S) ÷ speed on a
    # profiled device, 0 without a profile
    stage_start_ms: float | None = None
    # µs (its own time) per MB a stage reads from outside it and leaves for after it (ONNX Runtime's
    # layout reorders at a session's inputs and outputs, the feeds' copies); None: the runtime's
    # measured constant (cost.ORT_STAGE_IO_S_PER_BYTE) ÷ speed on a profiled ONNX Runtime device, 0 otherwise
    stage_io_us_per_mb: float | None = None
    # µs (its own time) per MB of weights the layers of a stage read (a stage after a wait streams them
    # from memory; every device of a split stage reads each layer's whole); None: 0
    stage_weights_us_per_mb: float | None = None
    # per node of the model being planned: how it runs at r output rows now ÷ the profile's prediction,
    # relative to its op type's ``calibration`` ((rows, factor), ...), measured at a few row counts and
    # the whole node (calibration.layers.measure_node_calibration); a node without one keeps its op type's
    node_calibration: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()
    # how it runs its stages (one of BACKENDS); None: the compiler chooses the faster on its profiles
    backend: str | None = None
    # FCPM profiles of other backends than torch ((backend, path), ...); ``profile`` is torch's
    profiles: tuple[tuple[str, str], ...] = ()

    def profile_for(self, backend: str) -> str | None:
        """The path of this device's FCPM profile for ``backend``, if it has one."""
        return self.profile if backend == "torch" else dict(self.profiles).get(backend)
    # where it sits in an end–edge–cloud hierarchy (MCIA, edgepart.mcia): "end" | "edge" | "cloud", or None
    # when the cluster is flat. An edge server's capacity is its speed and memory_mb, shared by the tasks of
    # the end devices; an end device's uplink is its link to the edge, the WAN the edge–cloud link.
    tier: str | None = None


def _node_calibration(dev: dict) -> tuple:
    shapes = dev.get("node_calibration") or {}
    hint = "node_calibration must map node names to [[rows, factor], ...] with rows ascending from 1 and factors > 0"
    if not isinstance(shapes, dict):
        raise ClusterError(f"device {dev['name']!r}: {hint}")
    out = []
    for node, pts in sorted(shapes.items()):
        try:
            pts = tuple((int(r), float(f)) for r, f in pts)
        except (TypeError, ValueError):
            raise ClusterError(f"device {dev['name']!r}, node {node!r}: {hint}") from None
        if not pts or any(r < 1 or not f > 0 for r, f in pts) or any(a[0] >= b[0] for a, b in zip(pts, pts[1:])):
            raise ClusterError(f"device {dev['name']!r}, node {node!r}: {hint}; got {list(pts)}")
        out.append((str(node), pts))
    return tuple(out)


def _calibration(dev: dict) -> tuple[tuple[str, float], ...]:
    cal = dev.get("calibration") or {}
    if not isinstance(cal, dict):
        raise ClusterError(f"device {dev['name']!r}: calibration must map op types to speeds, e.g. "
                           "{conv: 1.1, dwconv: 0.6}")
    try:
        return tuple(sorted((str(f), float(v)) for f, v in cal.items()))
    except (TypeError, ValueError):
        raise ClusterError(f"device {dev['name']!r}: calibration of {cal} must be numbers > 0") from None


def _backend(dev: dict) -> str | None:
    b = dev.get("backend")
    if b is not None and b not in BACKENDS:
        raise ClusterError(f"device {dev['name']!r}: backend must be one of {list(BACKENDS)}, got {b!r}")
    return b


def _profiles(dev: dict) -> tuple[tuple[str, str], ...]:
    p = dev.get("profiles") or {}
    if not isinstance(p, dict) or not all(k in BACKENDS and k != "torch" and isinstance(v, str) for k, v in p.items()):
        raise ClusterError(f"device {dev['name']!r}: profiles must map a backend other than torch to an FCPM "
                           f"profile path, e.g. {{onnxruntime: profiles/host_ort.json}}; got {p!r}")
    return tuple(sorted(p.items()))


def _number_or_none(dev: dict, key: str) -> float | None:
    v = dev.get(key)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ClusterError(f"device {dev['name']!r}: {key} must be a number, got {v!r}") from None


class Cluster:
    def __init__(self, devices: list[Device], default_link: dict | None = None,
                 overrides: list[dict] | None = None, source: str | None = None,
                 shared_medium: bool = False):
        if not devices:
            raise ClusterError("a cluster needs at least one device")
        names = [d.name for d in devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ClusterError(f"device names must be unique; repeated: {sorted(dup)}")
        for d in devices:
            if not (d.speed > 0 and math.isfinite(d.speed)):
                raise ClusterError(f"device {d.name!r}: speed must be > 0 and finite, got {d.speed}")
            if not d.memory_speed > 0:
                raise ClusterError(f"device {d.name!r}: memory_speed must be > 0, got {d.memory_speed}")
            bad = [f for f, v in d.calibration if not (isinstance(v, (int, float)) and v > 0)]
            if bad:
                raise ClusterError(f"device {d.name!r}: calibration of {bad} must be numbers > 0")
            if d.stage_start_ms is not None and not d.stage_start_ms >= 0:
                raise ClusterError(f"device {d.name!r}: stage_start_ms must be a number >= 0, "
                                   f"got {d.stage_start_ms}")
            for key in ("stage_io_us_per_mb", "stage_weights_us_per_mb"):
                v = getattr(d, key)
                if v is not None and not v >= 0:
                    raise ClusterError(f"device {d.name!r}: {key} must be a number >= 0, got {v}")
            if d.tier is not None and d.tier not in TIERS:
                raise ClusterError(f"device {d.name!r}: tier must be one of {list(TIERS)}, got {d.tier!r}")
        self.devices = list(devices)
        self.default_link = {**DEFAULT_LINK, **(default_link or {})}
        self.overrides = [dict(o) for o in (overrides or [])]
        self.source = source or devices[0].name
        if self.source not in names:
            raise ClusterError(f"source device {self.source!r} is not one of the devices {names}")
        self.shared_medium = bool(shared_medium)
        self.graph = nx.Graph()
        for d in devices:
            self.graph.add_node(d.name, device=d)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                self.graph.add_edge(a, b, **self.default_link)
        for o in self.overrides:
            a, b = o.get("a"), o.get("b")
            if a not in names or b not in names or a == b:
                raise ClusterError(f"link override {o} must name two different devices of {names}")
            for key in ("bandwidth_mbps", "latency_ms"):
                if key in o:
                    self.graph.edges[a, b][key] = float(o[key])
        for a, b, attrs in self.graph.edges(data=True):
            if not attrs["bandwidth_mbps"] > 0:
                raise ClusterError(f"link {a}-{b}: bandwidth_mbps must be > 0")
            if not (attrs["latency_ms"] >= 0 and math.isfinite(attrs["latency_ms"])):
                raise ClusterError(f"link {a}-{b}: latency_ms must be >= 0 and finite, got {attrs['latency_ms']}")

    # --- construction ------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cluster":
        """A cluster from its description (the README's YAML format), checked first by
        :func:`validate_description` (types, ranges, unknown keys, each error naming its key)."""
        validate_description(d)
        devices = []
        for i, dev in enumerate(d["devices"]):
            if not isinstance(dev, dict) or "name" not in dev:
                raise ClusterError(f"devices[{i}] needs a 'name'")
            unknown = set(dev) - {"name", "speed", "memory_mb", "address", "profile", "memory_speed", "calibration",
                                  "stage_start_ms", "stage_io_us_per_mb", "stage_weights_us_per_mb", "node_calibration",
                                  "backend", "profiles", "tier"}
            if unknown:
                raise ClusterError(f"device {dev['name']!r}: unknown keys {sorted(unknown)}")
            devices.append(Device(name=str(dev["name"]), speed=float(dev.get("speed", 1.0)),
                                  memory_mb=float(dev.get("memory_mb", 4096.0)), address=dev.get("address"),
                                  profile=str(dev["profile"]) if dev.get("profile") else None,
                                  memory_speed=float(dev.get("memory_speed", 1.0)),
                                  calibration=_calibration(dev),
                                  stage_start_ms=_number_or_none(dev, "stage_start_ms"),
                                  stage_io_us_per_mb=_number_or_none(dev, "stage_io_us_per_mb"),
                                  stage_weights_us_per_mb=_number_or_none(dev, "stage_weights_us_per_mb"),
                                  node_calibration=_node_calibration(dev), backend=_backend(dev),
                                  profiles=_profiles(dev),
                                  tier=str(dev["tier"]) if dev.get("tier") is not None else None))
        links = d.get("links", {}) or {}
        return cls(devices, links.get("default"), links.get("overrides"), d.get("source"),
                   d.get("shared_medium", False))

    @classmethod
    def from_file(cls, path: str | Path) -> "Cluster":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ClusterError(f"cannot read cluster file {path}: {e}") from e
        try:
            cluster = cls.from_dict(data)
        except ClusterError as e:
            line = _line_of(path, getattr(e, "path", None))
            raise ClusterError(f"{path}{f', line {line}' if line else ''}: {e}") from e
        # a relative FCPM profile path is relative to the cluster file
        def rel(p: str | None) -> str | None:
            return p if not p or Path(p).is_absolute() else str(path.parent / p)
        cluster.devices = [dataclasses.replace(d, profile=rel(d.profile), profiles=tuple((b, rel(p)) for b, p in d.profiles))
                           for d in cluster.devices]
        for d in cluster.devices:
            cluster.graph.nodes[d.name]["device"] = d
        return cluster

    @classmethod
    def homogeneous(cls, n: int, bandwidth_mbps: float = 100.0, latency_ms: float = 1.0,
                    speed: float = 1.0) -> "Cluster":
        return cls([Device(f"d{i}", speed) for i in range(n)],
                   {"bandwidth_mbps": bandwidth_mbps, "latency_ms": latency_ms})

    @classmethod
    def heterogeneous(cls, speeds: list[float], bandwidth_mbps: float = 100.0,
                      latency_ms: float = 1.0) -> "Cluster":
        return cls([Device(f"d{i}", s) for i, s in enumerate(speeds)],
                   {"bandwidth_mbps": bandwidth_mbps, "latency_ms": latency_ms})

    def to_dict(self) -> dict:
        devs = []
        for d in self.devices:
            e = {"name": d.name, "speed": d.speed, "memory_mb": d.memory_mb}
            if d.address:
                e["address"] = d.address
            if d.profile:
                e["profile"] = d.profile
            if d.memory_speed != 1.0:
                e["memory_speed"] = d.memory_speed
            if d.calibration:
                e["calibration"] = dict(d.calibration)
            if d.stage_start_ms is not None:
                e["stage_start_ms"] = d.stage_start_ms
            if d.stage_io_us_per_mb is not None:
                e["stage_io_us_per_mb"] = d.stage_io_us_per_mb
            if d.stage_weights_us_per_mb is not None:
                e["stage_weights_us_per_mb"] = d.stage_weights_us_per_mb
            if d.node_calibration:
                e["node_calibration"] = {node: [list(p) for p in pts] for node, pts in d.node_calibration}
            if d.backend:
                e["backend"] = d.backend
            if d.profiles:
                e["profiles"] = dict(d.profiles)
            if d.tier is not None:
                e["tier"] = d.tier
            devs.append(e)
        return {"source": self.source, "shared_medium": self.shared_medium, "devices": devs,
                "links": {"default": dict(self.default_link), "overrides": copy.deepcopy(self.overrides)}}

    # --- queries -----------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise ClusterError(f"no device named {name!r}; devices are {self.names}")

    def tier(self, tier: str) -> list[Device]:
        """The devices of one tier ("end", "edge", "cloud"), in file order."""
        if tier not in TIERS:
            raise ClusterError(f"tier must be one of {list(TIERS)}, got {tier!r}")
        return [d for d in self.devices if d.tier == tier]

    def fastest(self) -> str:
        return max(self.devices, key=lambda d: d.speed).name

    def link(self, a: str, b: str) -> dict:
        if a == b:
            return {"bandwidth_mbps": float("inf"), "latency_ms": 0.0}
        return self.graph.edges[a, b]

    def __len__(self) -> int:
        return len(self.devices)

    def __repr__(self) -> str:
        return f"Cluster({', '.join(f'{d.name}×{d.speed:g}' for d in self.devices)}, source={self.source})"
