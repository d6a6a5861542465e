"""An emulated end | edge | cloud testbed on which many tasks' plans run at once (MCIA, docs/mcia.md).

    bed = TieredTestbed(cluster, time_scale=0.1, cpuset=[1])       # a tiered cluster (tier: end|edge|cloud)
    slot = bed.add_task("cam0", "phone0", bundle_dir, edge_share=3/8, up_share=2/8)
    y = slot.session.infer(x)
    bed.set_shares("cam0", edge_share=4/8, up_share=2/8)            # no redeploy
    bed.set_link("phone0", 2.0)                                     # the uplink drops to 2 Mbit/s (cluster units)
    bed.replace_task("cam0", other_bundle_dir, edge_share=1/8, up_share=2/8)    # make before break
    bed.remove_task("cam0"); bed.close()

Needs root, cgroup v1 and network namespaces (:func:`edgepart.testbed.emulator.netns_available`).

**Network.** One network namespace per *physical* device of the cluster (each end device, the edge
server, the cloud), as in :mod:`edgepart.testbed.emulator`; but the links follow the tiers: one veth
pair per end device to the edge server (its uplink) and one from the edge server to the cloud (the
WAN). The edge namespace forwards, so an end device reaches the cloud through it (its packets cross
the uplink, then the WAN). Every shaped veth end has a ``tc htb`` root with one class per task
(rate = ceil = the task's share of the link × time scale: a task never borrows another's idle
share, as the MILP's latency assumes); a task's packets are classified by its workers' ports
(``u32`` on source or destination port), so its uplink share is its own htb class in both
directions. The WAN is not shared in the MCIA model (the cloud side is elastic), so each task's WAN
class gets the whole WAN rate. GSO is limited to one segment per packet on every veth, so htb sees
MTU-sized packets (a 64 KB GSO packet would pass a class's bucket at once). Link latency is added by
the sending worker (netem is not available), per peer: uplink, WAN, or both for end <-> cloud.

**Compute.** Every task gets a worker process of its own on each device its plan uses, in that
device's namespace: on the edge server, one per task, each dilated to *its* compute share
(:class:`edgepart.testbed.cpu.CpuDilation`: a stage lasts CPU time ÷ share). Why one per task and
not one worker with a scheduler: the runtime's worker advances one request at a time on one compute
thread, so tasks sharing one process would queue behind each other (first come, first served)
instead of each running at its share of the edge server in parallel, which is what the MILP's
latency ``edge time ÷ share`` models; a share-aware scheduler inside the worker would have to
preempt a running torch op. A process per task with its own dilation share is exact per stage and a
share changes by rewriting one file (no redeploy). End devices run each task's prefix at the device's
full speed and the cloud each suffix at its full speed (the model: end devices do not share, the
cloud is elastic). A process of speed ``v`` gets ``v × time_scale ÷ host_speed`` of a CPU; choose
``time_scale`` (:func:`fit_time_scale`) so that all of them fit. All processes are in one cgroup
with 8× an ordinary process's CPU weight and, with ``cpuset``, pinned.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgepart.cluster import Cluster
from edgepart.errors import EdgepartError
from edgepart.runtime.client import Session
from edgepart.runtime.program import read_manifest
from edgepart.testbed.emulator import CGROOT, TESTBED_SHARES, _rmdir_cgroup, _run, netns_available
from edgepart.testbed.processes import start_worker, stop_process_groups, worker_env

log = logging.getLogger("edgepart.emulate")
BASE_PORT = 21000
CONTROL_CLASS = 9999            # htb class of packets no task's port matches (none expected)


def fit_time_scale(speeds: list[float], cpus: int, host_speed: float = 1.0, headroom: float = 0.9) -> float:
    """The largest time scale (≤ 1) at which processes of these ``speeds`` together need at most
    ``headroom × cpus`` CPUs and none more than one."""
    if not speeds:
        return 1.0
    return min(1.0, host_speed / max(speeds), headroom * cpus * host_speed / sum(speeds))


@dataclass
class TaskSlot:
    """One task's workers on the testbed: a process per device its bundle uses, their ports, its session."""
    name: str
    end: str
    index: int                                      # slot number: ports and htb class ids
    bundle_dir: Path
    devices: list[str]                              # physical devices its bundle uses (end first)
    edge_share: float | None                        # fraction of the edge server, None if unused
    up_share: float | None                          # fraction of its uplink, None if unused
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    session: Session | None = None

    @property
    def classid(self) -> str:
        return f"1:{10 + self.index}"


class TieredTestbed:
    """The namespaces, links and CPU of a tiered cluster, and a worker set per task (module docstring).

    ``time_scale``: every emulated duration is the target ÷ it (measured × time_scale = emulated time);
    ``host_speed``: this CPU now ÷ the one the devices' speeds refer to; ``cpuset``: CPUs the workers
    are pinned to (the kernel's packet work goes to the others)."""

    def __init__(self, cluster: Cluster, time_scale: float, host_speed: float = 1.0,
                 cpuset: list[int] | None = None, startup_timeout: float = 60.0, key: bytes | None = None):
        ok, why = netns_available()
        if not ok:
            raise EdgepartError(f"the tiered testbed needs root, cgroup v1 and network namespaces: {why}")
        if not 0 < time_scale <= 1:
            raise ValueError(f"time_scale must be in (0, 1], got {time_scale}")
        self.cluster = cluster
        self.ends = [d.name for d in cluster.tier("end")]
        edges, clouds = cluster.tier("edge"), cluster.tier("cloud")
        if len(edges) != 1 or len(clouds) > 1 or not self.ends:
            raise EdgepartError("the tiered testbed needs end devices, exactly one edge server and at most one "
                                "cloud (tier: end | edge | cloud in the cluster file)")
        self.edge = edges[0].name
        self.cloud = clouds[0].name if clouds else None
        self.devices = [*self.ends, self.edge] + ([self.cloud] if self.cloud else [])
        self.time_scale = float(time_scale)
        self.host_speed = float(host_speed)
        self.cpuset = sorted(set(cpuset)) if cpuset else None
        self.startup_timeout = startup_timeout
        self.key = key or os.urandom(32)
        self.tmp = Path(tempfile.mkdtemp(prefix="edgepart-tiered-"))
        self.key_file = self.tmp / "key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.key.hex())
        self.tag = f"{os.getpid() % 0xFFFF:04x}"
        self.net = 10 + os.getpid() % 200
        self.ns: dict[str, str] = {}
        self.client_ip: dict[str, str] = {}
        self.ip: dict[tuple[str, str], str] = {}       # (device, link peer) -> its address on that link
        self.shaped: list[tuple[str, str, str]] = []   # (namespace, interface, link: end name or "wan")
        self.slots: dict[str, TaskSlot] = {}
        self.rates: dict[str, float] = {}              # link -> cluster Mbit/s now, where set_link changed it
        self.next_index = 0
        self.cgroup: str | None = None
        self.closed = False
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- the network ---------------------------------------------------------------------------
    def link_rate(self, link: str) -> float:
        """Mbit/s of an uplink (its end device's name) or of the WAN ("wan"), at the time scale."""
        if link in self.rates:
            return self.rates[link] * self.time_scale
        a, b = (self.edge, self.cloud) if link == "wan" else (link, self.edge)
        return float(self.cluster.link(a, b)["bandwidth_mbps"]) * self.time_scale

    def set_link(self, link: str, bandwidth_mbps: float) -> None:
        """Re-shape a running link — an uplink (its end device's name) or the WAN ("wan") — to ``bandwidth_mbps``
        (cluster units), in both directions: its parent htb class and every task's class on it (a share of
        the new rate) change in place. What the physical link does, not what a planner believes: the
        cluster the plan was made for is unchanged. htb classes can be changed under traffic (GSO is one
        segment here, so no queued packet is larger than a new bucket; a tbf would have to be replaced)."""
        if link != "wan" and link not in self.ends or link == "wan" and not self.cloud:
            raise EdgepartError(f"no link {link!r} on this testbed: an end device's uplink "
                                f"({', '.join(self.ends)}) or 'wan'")
        if not bandwidth_mbps > 0:
            raise ValueError(f"link {link!r}: bandwidth_mbps must be > 0, got {bandwidth_mbps}")
        self.rates[link] = float(bandwidth_mbps)
        total = self.link_rate(link) * (1 if link != "wan" else 256)
        for ns, dev, lk in self.shaped:
            if lk != link:
                continue
            _run("ip", "netns", "exec", ns, "tc", "class", "change", "dev", dev, "parent", "1:", "classid", "1:1",
                 "htb", *_rate(total, total))
            _run("ip", "netns", "exec", ns, "tc", "class", "change", "dev", dev, "parent", "1:1", "classid",
                 f"1:{CONTROL_CLASS}", "htb", *_rate(max(total * 0.01, 0.01), total))
        for slot in self.slots.values():
            if link == "wan" and self.cloud in slot.devices or link == slot.end and slot.up_share:
                self._task_classes(slot, add=False, only=link)

    def _build(self) -> None:
        t = self.tag
        for i, d in enumerate(self.devices):
            ns = self.ns[d] = f"mc{t}-{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            host, peer = f"mc{t}c{i}", f"mc{t}C{i}"
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            base = f"10.193.{self.net}.{4 * i}"
            _run("ip", "addr", "add", f"{_addr(base, 1)}/30", "dev", host)
            _run("ip", "link", "set", host, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{_addr(base, 2)}/30", "dev", peer)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            self.client_ip[d] = _addr(base, 2)
        _run("ip", "netns", "exec", self.ns[self.edge], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        wan_base = f"10.194.{self.net}.0"
        for i, e in enumerate(self.ends):
            base = f"10.195.{self.net}.{4 * i}"
            self._pair(e, self.edge, f"mc{t}u{i}e", f"mc{t}u{i}s", _addr(base, 1), _addr(base, 2), e)
            if self.cloud:          # the end device reaches the cloud through the edge server
                _run("ip", "netns", "exec", self.ns[e], "ip", "route", "add", f"{wan_base}/30", "via",
                     self.ip[(self.edge, e)])
        if self.cloud:
            self._pair(self.edge, self.cloud, f"mc{t}w0", f"mc{t}w1", _addr(wan_base, 1), _addr(wan_base, 2), "wan")
            for i, e in enumerate(self.ends):
                _run("ip", "netns", "exec", self.ns[self.cloud], "ip", "route", "add",
                     f"10.195.{self.net}.{4 * i}/30", "via", self.ip[(self.edge, self.cloud)])
        self._steer_network()
        self.cgroup = os.path.join(CGROOT, f"edgepart-tiered-{t}")
        os.makedirs(self.cgroup, exist_ok=True)
        with open(os.path.join(self.cgroup, "cpu.shares"), "w") as f:
            f.write(str(TESTBED_SHARES))

    def _pair(self, a: str, b: str, va: str, vb: str, ia: str, ib: str, link: str) -> None:
        _run("ip", "link", "add", va, "netns", self.ns[a], "type", "veth", "peer", "name", vb, "netns", self.ns[b])
        # the WAN's parent class is never the bottleneck: each task's class has the whole WAN (not shared)
        total = self.link_rate(link) * (1 if link != "wan" else 256)
        for dev, ns, ip in ((va, self.ns[a], ia), (vb, self.ns[b], ib)):
            _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "gso_max_size", "1500", "gso_max_segs", "1")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/30", "dev", dev)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                 "default", str(CONTROL_CLASS))
            _run("ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
                 "htb", *_rate(total, total))
            _run("ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:1", "classid",
                 f"1:{CONTROL_CLASS}", "htb", *_rate(max(total * 0.01, 0.01), total))
            self.shaped.append((ns, dev, link))
        self.ip[(a, b)], self.ip[(b, a)] = ia, ib

    def _steer_network(self) -> None:
        """The kernel's packet work on the CPUs the workers are not pinned to (see Emulator._steer_network)."""
        if not self.cpuset:
            return
        rest = sorted(set(range(os.cpu_count() or 1)) - set(self.cpuset))
        if not rest:
            return
        mask = format(sum(1 << c for c in rest), "x")
        for d in self.devices:
            _run("ip", "netns", "exec", self.ns[d], "sh", "-c",
                 f"for q in /sys/class/net/*/queues/rx-*; do echo {mask} > $q/rps_cpus; done")

    def _task_classes(self, slot: TaskSlot, add: bool, only: str | None = None) -> None:
        """The task's htb class on every shaped link it crosses (its uplink, the WAN; ``only``: that one),
        with its port filters."""
        for ns, dev, link in self.shaped:
            if only is not None and link != only:
                continue
            if link == "wan":
                if self.cloud not in slot.devices:
                    continue
                rate = self.link_rate("wan")
            elif link == slot.end and slot.up_share:
                rate = self.link_rate(link) * slot.up_share
            else:
                continue
            _run("ip", "netns", "exec", ns, "tc", "class", "add" if add else "change", "dev", dev, "parent", "1:1",
                 "classid", slot.classid, "htb", *_rate(rate, rate))
            if not add:
                continue
            for port in slot.ports.values():
                for what in ("sport", "dport"):
                    _run("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", dev, "parent", "1:", "protocol",
                         "ip", "prio", "1", "u32", "match", "ip", what, str(port), "0xffff", "flowid", slot.classid)

    # --- CPU -----------------------------------------------------------------------------------
    def speed(self, slot: TaskSlot, device: str) -> float:
        """The emulated speed of a task's process on ``device`` (the edge server's × the task's share)."""
        v = self.cluster.device(device).speed
        return v * (slot.edge_share or 0.0) if device == self.edge else v

    def cores(self, slot: TaskSlot, device: str) -> float:
        c = self.speed(slot, device) * self.time_scale / self.host_speed
        if not 0 < c <= 1:
            raise EdgepartError(f"task {slot.name!r} on {device!r}: needs {c:.3g} of a CPU at time scale "
                                f"{self.time_scale:.3g}; use a smaller time_scale")
        return c

    def _share_file(self, slot: TaskSlot, device: str) -> Path:
        return self.tmp / "cpu" / f"{slot.index}-{device}.share"

    def _write_share(self, slot: TaskSlot, device: str, share: float) -> None:
        path = self._share_file(slot, device)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(repr(share))
        os.replace(tmp, path)               # a worker never reads a half-written file

    # --- tasks -----------------------------------------------------------------------------------
    def add_task(self, name: str, end: str, bundle_dir, edge_share: float | None = None,
                 up_share: float | None = None, **session_kw) -> TaskSlot:
        """Start workers for a task's bundle (devices named as the cluster's physical devices, source = ``end``),
        deploy it at full speed, then give each process its emulated CPU share; returns the slot."""
        if name in self.slots:
            raise EdgepartError(f"task {name!r} is already on the testbed")
        if end not in self.ends:
            raise EdgepartError(f"task {name!r}: {end!r} is not an end device of the cluster ({self.ends})")
        manifest = read_manifest(Path(bundle_dir))
        if manifest.source_device != end:
            raise EdgepartError(f"task {name!r}: its bundle's source is {manifest.source_device!r}, not {end!r}")
        unknown = set(manifest.devices) - set(self.devices)
        if unknown:
            raise EdgepartError(f"task {name!r}: its bundle uses devices {sorted(unknown)} this testbed lacks")
        devices = [end] + [d for d in (self.edge, self.cloud) if d and d in manifest.devices]
        if self.edge in devices and not edge_share:
            raise EdgepartError(f"task {name!r}: its plan computes on the edge server but has no edge share")
        if len(devices) > 1 and not up_share:
            raise EdgepartError(f"task {name!r}: its plan leaves the end device but has no uplink share")
        slot = TaskSlot(name, end, self.next_index, Path(bundle_dir), devices, edge_share if self.edge in devices
                        else None, up_share if len(devices) > 1 else None)
        self.next_index += 1
        slot.ports = {d: BASE_PORT + 3 * slot.index + i for i, d in enumerate((end, self.edge, self.cloud))
                      if d in devices}
        self.slots[name] = slot
        try:
            for d in devices:
                self.cores(slot, d)             # fails before anything starts if a share cannot be emulated
            if len(devices) > 1:
                self._task_classes(slot, add=True)
            for d in devices:
                self._write_share(slot, d, 1.0)
                self._spawn(slot, d)
            endpoints = {d: f"{self.client_ip[d]}:{slot.ports[d]}" for d in devices}
            peers = {a: {b: (endpoints[a] if a == b else f"{self._address_from(a, b)}:{slot.ports[b]}")
                         for b in devices} for a in devices}
            slot.session = Session(slot.bundle_dir, endpoints, self.key, peer_endpoints=peers, **session_kw)
            for d in devices:
                self._write_share(slot, d, self.cores(slot, d))
        except BaseException:
            self.remove_task(name)
            raise
        return slot

    def _address_from(self, a: str, b: str) -> str:
        """The address worker on ``a`` dials to reach ``b``: b's address on their link, or on the WAN / uplink
        (routed through the edge server) for end <-> cloud."""
        if (b, a) in self.ip:
            return self.ip[(b, a)]
        if b == self.cloud:
            return self.ip[(self.cloud, self.edge)]
        return self.ip[(b, self.edge)]          # the cloud dials an end device on its uplink address

    def _latency_ms(self, a: str, b: str) -> float:
        if self.cloud in (a, b) and self.edge not in (a, b):      # end <-> cloud: uplink + WAN
            end = a if b == self.cloud else b
            return (float(self.cluster.link(end, self.edge)["latency_ms"])
                    + float(self.cluster.link(self.edge, self.cloud)["latency_ms"]))
        return float(self.cluster.link(a, b)["latency_ms"])

    def _spawn(self, slot: TaskSlot, device: str) -> None:
        links = {"peers": {p: {"bandwidth_mbps": None, "latency_ms": self._latency_ms(device, p) / self.time_scale,
                               "nic_mbps": None} for p in slot.devices if p != device},
                 "cpu": {"share_file": str(self._share_file(slot, device))}}
        work = self.tmp / "work" / f"{slot.index}-{device}"
        cmd = [sys.executable, "-m", "edgepart.worker_main", "--listen", f"0.0.0.0:{slot.ports[device]}",
               "--key-file", str(self.key_file), "--workdir", str(work), "--threads", "1",
               "--exit-with-parent", str(os.getpid()), "--links", json.dumps(links)]
        cmd = ["ip", "netns", "exec", self.ns[device]] + cmd
        if self.cpuset:
            cmd = ["taskset", "-c", ",".join(map(str, self.cpuset))] + cmd
        logf = self.tmp / "logs" / f"{slot.name}-{device}.log"
        logf.parent.mkdir(exist_ok=True)

        def confine(proc):
            slot.procs[device] = proc
            with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))
        start_worker(cmd, logf, worker_env(1), self.startup_timeout, f"task {slot.name!r}: worker on {device!r}",
                     on_spawn=confine)

    def replace_task(self, name: str, bundle_dir, edge_share: float | None = None, up_share: float | None = None,
                     swap=None, **session_kw) -> TaskSlot:
        """Redeploy a running task with another bundle, make before break: the new workers start and deploy
        beside the old ones (new ports, new htb classes), then the slot is switched — inside ``swap`` (a
        context manager, e.g. the lock its requests hold, so none is in flight on the old workers) when
        given — and only then the old workers stop. Its requests wait at most for the switch, not the start."""
        if name not in self.slots:
            raise EdgepartError(f"task {name!r} is not on the testbed")
        temp = f"{name}~{self.next_index}"
        self.add_task(temp, self.slots[name].end, bundle_dir, edge_share, up_share, **session_kw)
        new = self.slots.pop(temp)
        new.name = name
        if swap is None:
            old, self.slots[name] = self.slots[name], new
        else:
            with swap:
                old, self.slots[name] = self.slots[name], new
        self.slots[temp] = old              # stopped by remove_task like any slot
        self.remove_task(temp)
        return new

    def set_shares(self, name: str, edge_share: float | None = None, up_share: float | None = None) -> None:
        """Change a running task's edge compute share (its edge process's dilation) and uplink share (its htb
        class), between requests; nothing is redeployed."""
        slot = self.slots[name]
        if edge_share is not None and slot.edge_share is not None:
            slot.edge_share = edge_share
            self._write_share(slot, self.edge, self.cores(slot, self.edge))
        if up_share is not None and slot.up_share is not None:
            slot.up_share = up_share
            self._task_classes(slot, add=False)

    def remove_task(self, name: str) -> None:
        """Stop a task's session and workers. Its htb classes stay (no packet matches their ports any more:
        ports are never reused)."""
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        if slot.session is not None:
            try:
                slot.session.close()
            except Exception:  # noqa: BLE001 — stopping anyway
                pass
        stop_process_groups(list(slot.procs.values()))

    # --- teardown ----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for name in list(self.slots):
            self.remove_task(name)
        if self.cgroup:
            _rmdir_cgroup(self.cgroup)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)     # removes its veths
        for i in range(len(self.ns)):
            subprocess.run(["ip", "link", "del", f"mc{self.tag}c{i}"], capture_output=True)
        self.ns.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _rate(rate_mbps: float, ceil_mbps: float) -> list[str]:
    # one MTU of burst: a task's message waits for its share from its first packet (htb's default burst
    # would let a small tensor through at once); quantum one MTU, as rates here are far below r2q's range
    return ["rate", f"{rate_mbps:.6f}mbit", "ceil", f"{ceil_mbps:.6f}mbit", "burst", "1600", "cburst", "1600",
            "quantum", "1514"]


def _addr(base: str, n: int) -> str:
    a, b, c, d = base.split(".")
    return f"{a}.{b}.{c}.{int(d) + n}"
