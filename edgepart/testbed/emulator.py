"""Testbed emulation on one machine, from the manifest's cluster (device speeds, link bandwidths/latencies).

With root, cgroup v1 and network namespaces (``mode == "netns"``):

* **CPU**: a device of speed ``v`` gets the share ``q = v × s ÷ host_speed`` of one CPU of
  this machine (one torch thread), enforced in one of two ways (``cpu=``):

  - ``"quota"`` (default): the worker's cgroup gets ``cpu.cfs_quota_us = q × cpu.cfs_period_us``
    (``period_us``, default 10 ms; a share too small for the kernel's 1 ms minimum quota gets a
    longer period). Everything the worker does is slowed down, message handling included, and
    remote profiling (``edgepart.fcpm``) of a worker sees its quota. But the kernel enforces a
    quota at scheduler ticks (4 ms at HZ=250), so a busy worker runs in bursts of about 4 ms of
    CPU and then stalls for 4 ms × (1/q − 1): in the emulated device's own time, bursts of about
    4 ms × host_speed ÷ v whatever the period or time scale (phone 0.4 at host_speed 0.6: 6 ms),
    and a piece that arrives during a stall waits for the next burst. On the testbed benchmark
    (vgg16, 9 split stages) that costs about 1 ms per hop and +15–25 % on a chain of short
    stages; a 100 ms period instead lets a slow device start each request with a whole period's
    quota at full speed (faster than its speed).
  - ``"dilate"``: every compute stage lasts its CPU time ÷ q on the wall clock (the worker runs
    it, then sleeps the rest: ``testbed.cpu.CpuDilation``), exact per stage, and a piece arriving
    meanwhile is received at once. Message handling (framing, MACs, copies) is not slowed down,
    only compute stages; workers are not rate-limited (no quota).

  Every worker runs in its own cgroup; their parent has 8× an ordinary process's CPU weight, so
  another program on the same CPU does not take the devices' shares. ``cpuset`` pins every
  worker to those CPUs (``taskset``): workers on one CPU never run at the same time as each
  other, so they do not slow each other down through the shared core / caches / memory the way
  two busy vCPUs of one VM do. ``host_speed`` (default 1.0) is how fast one CPU of this machine
  is *now* relative to the machine the devices' speeds refer to (the one their FCPM profile was
  fitted on; :class:`HostSpeedProbe` measures it): with 0.6, a device of speed 1.0 gets 1/0.6 of
  a CPU, so that it really runs at speed 1.0. :meth:`Emulator.set_host_speed` re-scales the
  shares of a running testbed.
* **Links**: each worker runs in its own network namespace; every pair of devices
  is joined by its own veth pair whose two ends are shaped with ``tc qdisc ... tbf``
  at the pair's bandwidth × s. ``netem`` is not available here, so the link latency
  (÷ s) is added by the sender (a delay line in the worker's peer queue). A worker's
  messages to all its peers share its one NIC, one message at a time in the order it
  sends them (``testbed.links.SenderNic``), as the cost model's switched links assume; and the
  packets are processed on the CPUs outside ``cpuset`` (RPS), not charged to the workers.
  The client reaches each worker over an extra, unshaped veth pair.

``s`` (``time_scale``, ≤ 1) slows the whole testbed down uniformly so it fits this
machine: a device of speed 1.0 is one core of this machine (÷ host_speed), and a
cluster whose devices would need more than 90 % of the cores there are (of the
cpuset, if pinned), or a device faster than one core (a worker has one thread),
is emulated in dilated time. Every emulated duration
is then the target duration ÷ s, so ratios (speed-ups) are unaffected and
``measured × s`` is the target's time.

Without root or without cgroup/netns (``mode == "inprocess"``): the sender's
token bucket limits each link's bandwidth and adds its latency, there is no CPU
emulation, and a warning says so. Everything created is removed by ``close()``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import warnings

from edgepart.cluster import Cluster
from edgepart.ir.manifest import Manifest

log = logging.getLogger("edgepart.emulate")
CGROOT = "/sys/fs/cgroup/cpu"
PERIOD_US = 10_000        # cfs period of a quota (cpu="quota")
MIN_QUOTA_US = 1000       # the kernel's smallest quota
TESTBED_SHARES = 8192     # cpu.shares of the testbed's parent cgroup (an ordinary process: 1024)


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")


def netns_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"no `{tool}` command"
    if not os.path.isfile(os.path.join(CGROOT, "cpu.cfs_quota_us")):
        return False, f"no cgroup v1 cpu controller at {CGROOT}"
    probe = f"epprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except RuntimeError as e:
        return False, f"cannot create network namespaces ({e})"
    return True, ""


class Emulator:
    def __init__(self, manifest: Manifest, time_scale: float | None = None, mode: str | None = None,
                 cpus: int | None = None, period_us: int | None = None, cpuset: list[int] | None = None,
                 host_speed: float | None = None, defer_limits: bool = False, cpu: str = "quota",
                 net_cpus: list[int] | str | None = "auto"):
        cluster = Cluster.from_dict(manifest.cluster)
        self.devices = [d for d in cluster.names if d in manifest.devices]
        self.speed = {d.name: float(d.speed) for d in cluster.devices}
        self.link = {}
        for i, a in enumerate(self.devices):
            for b in self.devices[i + 1:]:
                link = cluster.link(a, b)
                self.link[frozenset((a, b))] = {"bandwidth_mbps": float(link["bandwidth_mbps"]),
                                                "latency_ms": float(link["latency_ms"])}
        ok, why = netns_available() if mode in (None, "netns") else (False, "in-process emulation requested")
        if mode == "netns" and not ok:
            raise RuntimeError(f"netns emulation unavailable: {why}")
        self.mode = "netns" if ok else "inprocess"
        self.why = why
        if cpu not in ("dilate", "quota"):
            raise ValueError(f"cpu must be 'dilate' or 'quota', not {cpu!r}")
        self.cpu = cpu
        self.sharedir: str | None = None
        self.defer_limits = bool(defer_limits)
        self.limited = False
        self.period_us = int(period_us or PERIOD_US)
        self.cpuset = sorted({int(c) for c in cpuset}) if cpuset else None
        if net_cpus == "auto":          # the CPUs the workers are not pinned to (none if not pinned)
            net_cpus = sorted(set(range(os.cpu_count() or 1)) - set(self.cpuset)) if self.cpuset else []
        self.net_cpus = sorted({int(c) for c in net_cpus}) if net_cpus else []
        self.host_speed = float(host_speed or 1.0)
        if not self.host_speed > 0:
            raise ValueError(f"host_speed must be > 0, got {host_speed}")
        cpus = len(self.cpuset) if self.cpuset else (cpus or os.cpu_count() or 1)
        if self.mode == "netns":
            hs = self.host_speed
            fit = min(hs / max(self.speed[d] for d in self.devices),
                      0.9 * cpus * hs / sum(self.speed[d] for d in self.devices))
            self.time_scale = float(time_scale) if time_scale else min(1.0, fit)
        else:
            self.time_scale = 1.0
            warnings.warn(f"edgepart emulation without root/cgroups/netns ({why}): link bandwidth and latency are "
                          "emulated in the sender (token bucket); CPU speeds are NOT emulated", RuntimeWarning,
                          stacklevel=3)
        self.tag = f"{os.getpid() % 0xFFFF:04x}"
        self.net = 10 + os.getpid() % 200         # 10.197.<net>.x /30 per pair, 10.198.<net>.x per client link
        self.ns: dict[str, str] = {}
        self.pair_ip: dict[tuple[str, str], str] = {}   # (a, b) -> address of b on the a-b link
        self.client_ip: dict[str, str] = {}
        self.cgroups: dict[str, str] = {}
        self.cgparent: str | None = None
        self.closed = False
        if self.mode == "netns":
            try:
                self._build()
            except Exception:
                self.close()
                raise

    # --- setup ---------------------------------------------------------------------------
    def _build(self) -> None:
        for i, d in enumerate(self.devices):
            ns = f"ep{self.tag}-{i}"
            _run("ip", "netns", "add", ns)
            self.ns[d] = ns
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            # client link (unshaped): root <-> ns
            host, peer = f"ep{self.tag}c{i}", f"ep{self.tag}C{i}"
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            base = f"10.198.{self.net}.{4 * i}"
            a1, a2 = _addr(base, 1), _addr(base, 2)
            _run("ip", "addr", "add", f"{a1}/30", "dev", host)
            _run("ip", "link", "set", host, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{a2}/30", "dev", peer)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            self.client_ip[d] = a2
        k = 0
        for i, a in enumerate(self.devices):
            for j, b in enumerate(self.devices):
                if j <= i:
                    continue
                va, vb = f"ep{self.tag}{i}x{j}", f"ep{self.tag}{j}x{i}"
                _run("ip", "link", "add", va, "netns", self.ns[a], "type", "veth", "peer", "name", vb,
                     "netns", self.ns[b])
                base = f"10.197.{self.net}.{4 * k}"
                ia, ib = _addr(base, 1), _addr(base, 2)
                k += 1
                for dev, ns, ip in ((va, self.ns[a], ia), (vb, self.ns[b], ib)):
                    _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/30", "dev", dev)
                    _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
                self._shape(a, b, self.link[frozenset((a, b))]["bandwidth_mbps"], replace=False)
                self.pair_ip[(a, b)] = ib
                self.pair_ip[(b, a)] = ia
        self._steer_network()
        self.cgparent = os.path.join(CGROOT, f"edgepart-{self.tag}")
        os.makedirs(self.cgparent, exist_ok=True)
        # the testbed as a whole outweighs an ordinary process on a shared CPU, so another program
        # does not eat the devices' shares (their quotas still cap them; the rest of the CPU stays free)
        with open(os.path.join(self.cgparent, "cpu.shares"), "w") as f:
            f.write(str(TESTBED_SHARES))
        for d in self.devices:
            path = os.path.join(self.cgparent, d)
            os.makedirs(path, exist_ok=True)
            self.cgroups[d] = path
        if self.cpu == "dilate":
            import tempfile
            self.sharedir = tempfile.mkdtemp(prefix="edgepart-cpu-")
            for d in self.devices:
                with open(self.share_file(d), "w") as f:
                    f.write("1.0")
        if not self.defer_limits:
            self.limit()
        log.info("emulated testbed: %s", self.describe())

    def _steer_network(self) -> None:
        """Process the emulated links' packets on the CPUs the workers are not pinned to (RPS).

        Without it the kernel receives a veth packet on the CPU that sent it, in a softirq, and a
        kernel without ``IRQ_TIME_ACCOUNTING`` (this one) charges softirq time to whichever thread it
        interrupts: a worker's compute thread on the pinned CPU can be charged for other devices'
        traffic and, dilated, its stage lasts that much longer. ``net_cpus`` (default: the CPUs
        outside ``cpuset``) take it instead (YOLOv2-tiny's 4-device plan at 1000 Mbit/s: NET_RX
        softirqs on the workers' CPU per run 2,020 → 800); nothing to do when the workers are not
        pinned or use every CPU."""
        if not self.net_cpus:
            return
        mask = format(sum(1 << c for c in self.net_cpus), "x")
        for i, d in enumerate(self.devices):
            script = f"for q in /sys/class/net/*/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
            _run("ip", "netns", "exec", self.ns[d], "sh", "-c", script)
            path = f"/sys/class/net/ep{self.tag}c{i}/queues/rx-0/rps_cpus"    # the client link's root end
            if os.path.exists(path):
                with open(path, "w") as f:
                    f.write(mask)

    def _veths(self, a: str, b: str) -> list[tuple[str, str]]:
        """The (veth, namespace) ends of the a-b link."""
        i, j = sorted((self.devices.index(a), self.devices.index(b)))
        da, db = self.devices[i], self.devices[j]
        return [(f"ep{self.tag}{i}x{j}", self.ns[da]), (f"ep{self.tag}{j}x{i}", self.ns[db])]

    def _shape(self, a: str, b: str, mbps: float, replace: bool) -> None:
        bw = mbps * self.time_scale
        burst = max(16 * 1024, int(bw * 1e6 / 8 * 0.004))
        for dev, ns in self._veths(a, b):
            if replace:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{bw:.6f}mbit", "burst", str(burst), "latency", "500ms")

    def set_link(self, a: str, b: str, mbps: float) -> None:
        """Re-shape the running a-b link to ``mbps`` (cluster units; both directions).

        The qdisc is replaced, not changed in place (``tc qdisc change``): packets queued under a
        fast rate include segmentation-offload packets up to 64 KB, which a fast link's bucket
        passes whole; after a change to a slow rate the bucket (16 KB) can never hold the packet
        at the queue's head, and tbf then sends nothing at all, on any connection, for as long as
        it stays queued. Replacing drops the queue; TCP sends it again through the new qdisc,
        which segments what it cannot pass whole."""
        if self.mode != "netns":
            raise RuntimeError("set_link needs the netns testbed (root); in-process links are shaped by the sender")
        self._shape(a, b, mbps, replace=True)
        self.link[frozenset((a, b))] = {**self.link[frozenset((a, b))], "bandwidth_mbps": mbps}

    def share_file(self, device: str) -> str:
        return os.path.join(self.sharedir, f"{device}.share")

    def limit(self) -> None:
        """Give every worker its CPU share (dilation share file or cgroup quota). With ``defer_limits``
        the workers start, import and take their deploy at full speed (none of that is emulated
        device time) and LocalCluster calls this once they are deployed."""
        if self.cpu == "dilate":
            for d in self.devices:
                tmp = self.share_file(d) + ".tmp"
                with open(tmp, "w") as f:
                    f.write(repr(self.cores(d)))
                os.replace(tmp, self.share_file(d))       # a worker never reads a half-written file
            self.limited = True
            return
        for d, path in self.cgroups.items():
            # a share too small for the kernel's minimum quota in one period gets a longer period
            period = max(self.period_us, math.ceil(MIN_QUOTA_US / self.cores(d)))
            with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
                f.write(str(period))
            with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(int(round(self.cores(d) * period))))
        self.limited = True

    def set_host_speed(self, host_speed: float) -> None:
        """Re-scale the quotas to a newly measured host speed (time_scale stays): for a testbed on a
        machine whose speed drifts with other programs' load, call between requests."""
        if not host_speed > 0:
            raise ValueError(f"host_speed must be > 0, got {host_speed}")
        self.host_speed = float(host_speed)
        if self.limited:
            self.limit()

    def cores(self, device: str) -> float:
        """The CPU share (cores of this machine) the device's worker gets (at most one: one thread)."""
        return min(1.0, self.speed[device] * self.time_scale / self.host_speed)

    def cpu_stat(self) -> dict[str, dict[str, int]]:
        """Per device: the cgroup's cpu.stat (nr_periods, nr_throttled, throttled_time ns, ...)."""
        out = {}
        for d, path in self.cgroups.items():
            try:
                text = open(os.path.join(path, "cpu.stat")).read()
            except OSError:
                continue
            out[d] = {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}
        return out

    # --- hooks used by LocalCluster ----------------------------------------------------------
    def host(self, device: str) -> str:
        return "0.0.0.0" if self.mode == "netns" else "127.0.0.1"

    def wrap(self, device: str, cmd: list[str]) -> list[str]:
        cmd = cmd + ["--links", json.dumps(self.links_config(device))]
        if self.mode == "netns":
            cmd = ["ip", "netns", "exec", self.ns[device]] + cmd
            if self.cpuset:     # affinity is inherited through exec and by every thread the worker starts
                cmd = ["taskset", "-c", ",".join(map(str, self.cpuset))] + cmd
        return cmd

    def links_config(self, device: str) -> dict:
        peers = {}
        for other in self.devices:
            if other == device:
                continue
            ln = self.link[frozenset((device, other))]
            # nic_mbps: the sender's NIC sends one message at a time, as the cost model assumes (links.SenderNic)
            if self.mode == "netns":      # bandwidth is shaped by tc; the sender adds the latency
                peers[other] = {"bandwidth_mbps": None, "latency_ms": ln["latency_ms"] / self.time_scale,
                                "nic_mbps": ln["bandwidth_mbps"] * self.time_scale}
            else:
                peers[other] = {"bandwidth_mbps": ln["bandwidth_mbps"], "latency_ms": ln["latency_ms"],
                                "nic_mbps": ln["bandwidth_mbps"]}
        if self.mode == "netns" and self.cpu == "dilate":    # compute stages dilated (testbed.cpu.CpuDilation)
            return {"peers": peers, "cpu": {"share_file": self.share_file(device)}}
        if self.mode == "netns":
            # the worker's cgroup CPU quota in cores, for remote profiling (edgepart.fcpm): the worker cannot
            # read it itself, `ip netns exec` hides /sys/fs/cgroup
            return {"peers": peers, "cpu_cores": round(self.cores(device), 6)}
        return {"peers": peers}

    def attach(self, device: str, pid: int) -> None:
        if device in self.cgroups:
            with open(os.path.join(self.cgroups[device], "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def client_endpoint(self, device: str, address: str) -> str:
        port = address.rsplit(":", 1)[1]
        return f"{self.client_ip[device]}:{port}" if self.mode == "netns" else address

    def peer_endpoints(self, endpoints: dict[str, str]) -> dict[str, dict[str, str]]:
        if self.mode != "netns":
            return {d: dict(endpoints) for d in self.devices}
        ports = {d: endpoints[d].rsplit(":", 1)[1] for d in self.devices}
        return {a: {b: (f"{self.pair_ip[(a, b)]}:{ports[b]}" if a != b else endpoints[a]) for b in self.devices}
                for a in self.devices}

    def describe(self) -> str:
        s = self.time_scale
        parts = [f"mode={self.mode}" + (f" ({self.why})" if self.why else ""), f"time_scale={s:.3g}"]
        if self.mode == "netns":
            parts.append("cpu " + ", ".join(f"{d}={self.cores(d):.3f} core" for d in self.devices)
                         + (" (dilated stages" if self.cpu == "dilate" else f" (quota, period {self.period_us / 1000:g} ms")
                         + (f", host_speed {self.host_speed:.3g}" if self.host_speed != 1.0 else "")
                         + (f", pinned to CPU {','.join(map(str, self.cpuset))}" if self.cpuset else "")
                         + (f", packets on CPU {','.join(map(str, self.net_cpus))}" if self.net_cpus else "") + ")")
        links = ", ".join(f"{'-'.join(sorted(k))}: {v['bandwidth_mbps'] * s:.3g} Mbit/s + "
                          f"{v['latency_ms'] / s:.3g} ms" for k, v in self.link.items())
        return "; ".join(parts + [links])

    # --- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for d, path in list(self.cgroups.items()):
            _rmdir_cgroup(path)
        if self.cgparent:
            _rmdir_cgroup(self.cgparent)
        for d, ns in list(self.ns.items()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)   # removes its veths (both ends)
        for i, d in enumerate(self.devices):
            subprocess.run(["ip", "link", "del", f"ep{self.tag}c{i}"], capture_output=True)
        self.ns.clear()
        self.cgroups.clear()
        if self.sharedir:
            shutil.rmtree(self.sharedir, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _addr(base: str, n: int) -> str:
    a, b, c, d = base.split(".")
    return f"{a}.{b}.{c}.{int(d) + n}"


def _rmdir_cgroup(path: str) -> None:
    if not os.path.isdir(path):
        return
    try:
        procs = open(os.path.join(path, "cgroup.procs")).read().split()
        for pid in procs:                      # any leftover process goes back to the root group
            try:
                with open(os.path.join(CGROOT, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass
        os.rmdir(path)
    except OSError as e:
        log.warning("could not remove cgroup %s: %s", path, e)


