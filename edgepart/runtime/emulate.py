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
    it, then sleeps the rest: ``worker.CpuDilation``), exact per stage, and a piece arriving
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
  sends them (``worker.SenderNic``), as the cost model's switched links assume; and the
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
from collections.abc import Callable
from contextlib import contextmanager

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
    def __init__(self, manifest: dict, time_scale: float | None = None, mode: str | None = None,
                 cpus: int | None = None, period_us: int | None = None, cpuset: list[int] | None = None,
                 host_speed: float | None = None, defer_limits: bool = False, cpu: str = "quota",
                 net_cpus: list[int] | str | None = "auto"):
        cl = manifest["cluster"]
        self.devices = [d["name"] for d in cl["devices"] if d["name"] in manifest["devices"]]
        self.speed = {d["name"]: float(d.get("speed", 1.0)) for d in cl["devices"]}
        links = cl.get("links", {}) or {}
        default = {"bandwidth_mbps": 100.0, "latency_ms": 1.0, **(links.get("default") or {})}
        self.link = {}
        for i, a in enumerate(self.devices):
            for b in self.devices[i + 1:]:
                self.link[frozenset((a, b))] = dict(default)
        for o in links.get("overrides", []) or []:
            k = frozenset((o["a"], o["b"]))
            if k in self.link:
                self.link[k].update({x: float(o[x]) for x in ("bandwidth_mbps", "latency_ms") if x in o})
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
        s = self.time_scale
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
                bw = self.link[frozenset((a, b))]["bandwidth_mbps"] * s
                for dev, ns, ip in ((va, self.ns[a], ia), (vb, self.ns[b], ib)):
                    _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/30", "dev", dev)
                    _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
                    rate_bps = bw * 1e6
                    burst = max(16 * 1024, int(rate_bps / 8 * 0.004))
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", f"{bw:.6f}mbit", "burst", str(burst), "latency", "500ms")
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
            # nic_mbps: the sender's NIC sends one message at a time, as the cost model assumes (worker.SenderNic)
            if self.mode == "netns":      # bandwidth is shaped by tc; the sender adds the latency
                peers[other] = {"bandwidth_mbps": None, "latency_ms": ln["latency_ms"] / self.time_scale,
                                "nic_mbps": ln["bandwidth_mbps"] * self.time_scale}
            else:
                peers[other] = {"bandwidth_mbps": ln["bandwidth_mbps"], "latency_ms": ln["latency_ms"],
                                "nic_mbps": ln["bandwidth_mbps"]}
        if self.mode == "netns" and self.cpu == "dilate":    # compute stages dilated (worker.CpuDilation)
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



# Zoo networks the host profile predicts within about ±1 % of their measured time (benchmarks/results/
# fcpm_accuracy.md, whole models at load 0) and that the testbed benchmark does not run.
REFERENCE_NETWORKS = ("inception", "unet", "alexnet")


class HostSpeedProbe:
    """How fast one CPU of this machine is *now*, relative to the machine an FCPM ``profile`` describes.

    ``kind="networks"`` (default): whole forward passes of :data:`REFERENCE_NETWORKS` (one torch
    thread, thread CPU time, pinned to ``cpuset`` if given — where the pinned workers run); the speed
    is Σ profile prediction / Σ measured. Like a device program, a network runs its layers in
    sequence with its weights coming from memory, so memory and cache contention by other programs
    count as they do for the workers. ``kind="layers"``: a sample of the profile's own recorded layer
    timings re-timed (hot caches; on this 2-vCPU VM it reads about 7 % faster than networks while
    another program runs on the other vCPU). Another program on the sibling core of a small VM, a
    different CPU clock or a noisy neighbour all show up; pass the value to
    ``LocalCluster(..., host_speed=...)`` (or :meth:`Emulator.set_host_speed`).
    """

    def __init__(self, profile, cpuset: list[int] | None = None, kind: str = "networks",
                 networks=REFERENCE_NETWORKS, seed: int = 0):
        from edgepart.fcpm import DeviceProfile
        if kind not in ("networks", "layers"):
            raise ValueError(f"kind must be 'networks' or 'layers', not {kind!r}")
        self.profile = profile if isinstance(profile, DeviceProfile) else DeviceProfile.load(profile)
        self.cpuset = cpuset
        self.kind = kind
        self.seed = seed
        self.nets: list[tuple] = []
        # memory: the profile's biggest recorded linear layer (weights streamed from DRAM) re-timed
        ref = self.profile.streaming_reference() if hasattr(self.profile, "streaming_reference") else None
        self.stream_ref = None
        if ref is not None:
            from edgepart.fcpm.ops import Runner
            self.stream_ref = (Runner(ref[0]), ref[1])
        if kind == "networks":
            import torch

            from edgepart import models
            from edgepart.compiler.cost import node_info
            from edgepart.compiler.plan import compute_nodes
            from edgepart.compiler.trace import trace
            from edgepart.passes import analyse
            for name in networks:
                model, (x,) = models.get(name)
                gm = analyse(trace(model, (x,)))
                pred = sum(self.profile.predict(node_info(n), None) for n in compute_nodes(gm))
                self.nets.append((name, model, x, pred))
            with torch.no_grad():
                for _, model, x, _ in self.nets:
                    model(x)

    def measure(self, budget_s: float = 1.0) -> dict:
        """{"host_speed", "memory_speed", "seconds", "per": {network or family: speed}}: one measurement.

        ``memory_speed``: the profile's recorded time of its largest linear layer ÷ its time now (how
        fast weights stream from memory, relative to profiling; None if the profile has no such
        record). Relative to the CPU speed, ``memory_speed / host_speed``, it is what a cost model
        of an emulated device needs (``CostModel(memory_speed=...)``): the emulator scales CPU time
        by host_speed, so only the part of memory-bound layers that drifted apart stays unmodelled."""
        import time

        import torch
        t0 = time.perf_counter()
        with _pinned_one_thread(self.cpuset):
            if self.kind == "layers":
                r = _layer_speed(self.profile, budget_s, self.seed)
            else:
                per, pred_sum, meas_sum = {}, 0.0, 0.0
                rounds = 0
                with torch.no_grad():
                    while True:
                        for name, model, x, pred in self.nets:
                            c = time.thread_time()
                            model(x)
                            dt = time.thread_time() - c
                            per.setdefault(name, []).append(dt)
                        rounds += 1
                        if time.perf_counter() - t0 >= budget_s or rounds >= 20:
                            break
                for name, model, x, pred in self.nets:
                    m = sorted(per[name])[len(per[name]) // 2]      # median over the rounds
                    pred_sum += pred
                    meas_sum += m
                    per[name] = pred / m
                r = {"host_speed": pred_sum / meas_sum, "per": per, "rounds": rounds}
            r["memory_speed"] = None
            if self.stream_ref is not None:
                runner, recorded = self.stream_ref
                with torch.no_grad():
                    runner()
                    ts = []
                    for _ in range(5):
                        c = time.thread_time()
                        runner()
                        ts.append(time.thread_time() - c)
                r["memory_speed"] = recorded / sorted(ts)[len(ts) // 2]
        r["seconds"] = time.perf_counter() - t0
        return r

    def calibrate(self, budget_s: float = 2.0, rounds: int = 3, family_budget_s: float = 3.0,
                  nodes: list[dict] | None = None, forward: "Callable[[], object] | ProgramTimer | None" = None,
                  program: bool = False) -> dict:
        """The online calibration of an emulated device's cost model, measured now: {"host_speed",
        "memory_speed" and "calibration" (per op type), both relative to host_speed — the emulator
        already scales CPU time by it} (the cluster's device keys ``memory_speed``, ``calibration``).

        In ``rounds`` rounds, each measuring the host speed and right after it the op types relative
        to it (``budget_s`` and ``family_budget_s`` split over the rounds); every value is the median
        over the rounds, so one round that another program slowed down part-way (the op types read
        0.6x of the host speed it had just measured, say) does not skew the plan. ``nodes``: the
        node infos of the model to plan, timed instead of the profile's records
        (:func:`measure_family_speeds`).

        ``forward`` (with ``nodes``): the model's whole forward pass on one thread. Its layers timed
        one by one miss what running them in sequence does (caches warm from the layer before, or
        cold after it; the per-layer in-network correction of the profile is fitted on synthetic
        networks and misses zoo models by 5–25 %, either way depending on the host's state when it
        was profiled — MobileNetV2 +17 % with one profile of this VM, −23 % with the next), so each round also times the model whole and scales every op type of it by
        ``model_speed`` = (the cost model's prediction of that pass with these calibrations) ÷
        (its measured time × host speed): the device's calibrated prediction of the whole model is
        then what was measured, and the op types keep the proportions their own layers showed.
        ``forward`` may be a :class:`ProgramTimer` (the program timed in a worker), and ``program=True`` says a
        callable ``forward`` runs the device program (:func:`program_forward`; see :func:`model_speed`)."""
        import statistics
        per_round = []
        for _ in range(max(1, rounds)):
            m = self.measure(budget_s / max(1, rounds))
            hs = m["host_speed"]
            ms = m["memory_speed"] / hs if m.get("memory_speed") else 1.0
            cal = measure_family_speeds(self.profile, cpuset=self.cpuset, relative_to=hs,
                                        budget_s=family_budget_s / max(1, rounds), nodes=nodes)
            k = None
            if forward is not None and nodes:
                k = model_speed(self.profile, nodes, cal, ms, forward, hs, cpuset=self.cpuset,
                                budget_s=family_budget_s / max(1, rounds), program=program)
            per_round.append((hs, ms, cal, k))
        families = sorted({f for _, _, cal, _ in per_round for f in cal})
        calibration = {f: statistics.median(cal[f] for _, _, cal, _ in per_round if f in cal) for f in families}
        ks = [k for *_, k in per_round if k is not None]
        k = statistics.median(ks) if ks else None
        if k is not None:
            from edgepart.fcpm.ops import family
            for f in {family(n) for n in nodes} - {"trivial"}:
                calibration[f] = calibration.get(f, 1.0) * k
        return {"host_speed": statistics.median(r[0] for r in per_round),
                "memory_speed": round(statistics.median(r[1] for r in per_round), 3),
                "calibration": {f: round(v, 3) for f, v in sorted(calibration.items())},
                "model_speed": None if k is None else round(k, 3),
                "rounds": [{"host_speed": hs, "memory_speed": ms, "calibration": cal, "model_speed": k}
                           for hs, ms, cal, k in per_round]}


@contextmanager
def _pinned_one_thread(cpuset: list[int] | None):
    """One torch thread, pinned to ``cpuset`` if given (where the testbed's workers run); restored after."""
    import torch
    old_threads = torch.get_num_threads()
    old_aff = os.sched_getaffinity(0) if cpuset else None
    try:
        torch.set_num_threads(1)
        if cpuset:
            os.sched_setaffinity(0, set(cpuset))
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_aff is not None:
            os.sched_setaffinity(0, old_aff)


def _retime(configs: dict, records: list[dict], budget_s: float) -> dict[str, list[float]]:
    """recorded / now for each of the profile's ``records`` re-timed (thread CPU time), per family."""
    import time

    from edgepart.fcpm.ops import Runner, time_callable
    ratios: dict[str, list[float]] = {}
    for r in records:
        m = time_callable(Runner(configs[r["cid"]]["info"], r["rows"], seed=int(r["cid"])),
                          target_s=budget_s / max(1, len(records)) * 0.7, min_repeats=3, clock=time.thread_time)
        ratios.setdefault(r["family"], []).append(r["t"] / max(m["t"], 1e-9))
    return ratios


def measure_family_speeds(profile, per_family: int = 3, budget_s: float = 3.0, cpuset: list[int] | None = None,
                          relative_to: float = 1.0, nodes: list[dict] | None = None) -> dict[str, float]:
    """How fast each op type of an FCPM profile runs now, relative to when it was profiled.

    Without ``nodes``: for every family (op type) of the profile, ``per_family`` of its recorded
    layers at load 0 (50 µs – 30 ms; spread over the upper half of their times) are re-timed; the
    family's speed is median(recorded / now). With ``nodes`` (node infos, ``cost.node_info``, of the
    model about to be planned — what DCFP's online step knows): those layers are timed whole, and a
    family's speed is Σ predicted ÷ Σ measured over its nodes, weighted by time like the plan is — one
    op type's layers drift apart by size (on this VM 3×3 convolutions with small weights ran 1.2–1.4×
    faster than profiled while one with 38 MB of weights ran 0.9×), so a few random records can
    mislead the layers a model spends its time in. Timing: thread CPU, one torch thread, pinned to
    ``cpuset``; the result is divided by ``relative_to``. Pass the host speed an emulator normalises by
    as ``relative_to``: what is left is how much more one op type drifted than the CPU as a whole.
    The result is a device's ``calibration`` in a cluster description (``CostModel`` divides that
    family's predictions by it). ``linear`` is left out: weight streaming is ``memory_speed``'s job.
    """
    import numpy as np

    prof = profile if hasattr(profile, "measurements") else _load_profile(profile)
    if nodes is not None:
        with _pinned_one_thread(cpuset):
            sums = _retime_nodes(prof, nodes, budget_s)
        ratios = {fam: [p / m] for fam, (p, m) in sums.items() if m > 0}
    else:
        meas = prof.measurements or {}
        configs = {c["cid"]: c for c in meas.get("configs", [])}
        by_family: dict[str, list[dict]] = {}
        for r in meas.get("records", []):
            if r.get("load", 0.0) == 0.0 and 50e-6 <= r["t"] <= 30e-3 and r["cid"] in configs \
                    and r["family"] not in ("linear", "trivial"):
                by_family.setdefault(r["family"], []).append(r)
        if not by_family:
            raise ValueError("the profile holds no recorded timings at load 0 (fitted without measurements?)")
        picks = []
        for v in by_family.values():   # spread over sizes: the upper half, where time is spent
            v = sorted(v, key=lambda r: r["t"])
            qs = [0.5 + 0.45 * i / max(1, per_family - 1) for i in range(per_family)] if per_family > 1 else [0.75]
            picks += {id(r): r for r in (v[min(len(v) - 1, int(q * len(v)))] for q in qs)}.values()
        with _pinned_one_thread(cpuset):
            ratios = _retime(configs, picks, budget_s)
    # clamped: one odd timing must not make a family look 10x off
    return {fam: round(min(5.0, max(0.2, float(np.median(v)) / relative_to)), 3)
            for fam, v in sorted(ratios.items())}


def model_speed(profile, nodes: list[dict], calibration: dict[str, float], memory_speed: float,
                forward: "Callable[[], object] | ProgramTimer", relative_to: float = 1.0, cpuset: list[int] | None = None,
                budget_s: float = 1.0, bounds: tuple[float, float] = (0.5, 2.0), program: bool = False) -> float:
    """How fast a whole model runs now relative to its calibrated prediction: Σ over ``nodes`` of the
    profile's in-network prediction as calibrated (``cost.calibrated_prediction``, what
    ``CostModel.compute_time`` charges before the runtime's own overhead) ÷ (``forward()``'s thread CPU time ×
    ``relative_to``). Clamped to ``bounds`` (0.5–2): one disturbed timing must not halve every prediction.

    ``forward`` is timed here (thread CPU, pinned to ``cpuset``), or, a :class:`ProgramTimer`, in its worker.
    ``program=True`` (implied by a ``ProgramTimer``): ``forward`` runs edgepart's device program of the
    whole model (:func:`program_forward`), what a device really runs, and the cost model's own charge for
    the program (``cost.program_overhead`` of every node) is taken off its time first, so the calibrated prediction *with* that charge is what
    was measured. Timing the eager model instead leaves the charge unchecked: its fit (13.6 µs per node +
    0.21 ns per padded byte, ``results/runtime_overhead.md``) says 5.3 ms for MobileNetV2 at 224 where
    the program measured 1.5 ms more than the eager model, and the testbed's MobileNetV2 stages ran
    0.76–0.79× their prediction."""
    import time

    from edgepart.compiler.cost import calibrated_prediction, program_overhead
    from edgepart.fcpm.ops import family, time_callable
    predicted = sum(calibrated_prediction(profile, info, None, 0.0, calibration, memory_speed)
                    for info in nodes if family(info) != "trivial")
    program = program or isinstance(forward, ProgramTimer)
    overhead = sum(program_overhead(info, max(1, int(info.get("rows", 1) or 1))) for info in nodes) if program else 0.0
    if isinstance(forward, ProgramTimer):
        measured = forward.time(budget_s)
    else:
        with _pinned_one_thread(cpuset):
            measured = time_callable(forward, target_s=budget_s, min_repeats=3, max_repeats=20,
                                     clock=time.thread_time)["t"]
    # at least half of the measured time is the layers': a charge that large is the fit's error, not the program's
    layers = max(measured * relative_to - overhead, 0.5 * measured * relative_to)
    return min(bounds[1], max(bounds[0], predicted / max(layers, 1e-9)))


def _one_device_bundle(model, example_inputs: tuple):
    """``model`` compiled for a cluster of one device named ``device`` (its whole device program)."""
    import warnings

    from edgepart.cluster import Cluster
    from edgepart.compiler.bundle import compile as compile_model
    one = Cluster.from_dict({"source": "device", "devices": [{"name": "device", "speed": 1.0}], "links": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # no profile: the plan is one device whatever the costs say
        return compile_model(model, example_inputs, one, strategy="single")


def program_forward(model, example_inputs) -> Callable[[], object]:
    """A callable that runs ``model``'s edgepart device program on ``example_inputs`` in this process:
    the model compiled for one device (strategy ``single``) and run by the reference executor, as a
    worker runs it. For timing the model as the runtime executes it (:func:`model_speed` with
    ``program=True``)."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    bundle = _one_device_bundle(model, inputs)
    return lambda: bundle.run_local(*inputs)


class ProgramTimer:
    """Times a model's device program as a worker runs it: the model compiled for one device, deployed
    to one local worker process (unemulated, pinned to ``cpuset``) and the worker's thread CPU time in
    its stages (``stage_cpu_us`` of its stats) read per request. For :func:`model_speed`: the devices
    are such workers, and timed in the planning process instead the same program read far less
    steadily (MobileNetV2 on this VM: model speed 0.88–1.33 between rounds of one calibration there,
    1.15–1.28 in a worker).

        with ProgramTimer(model, (x,), cpuset=[1]) as timer:
            seconds = timer.time(budget_s=1.0)
    """

    def __init__(self, model, example_inputs, cpuset: list[int] | None = None):
        from edgepart.runtime.local import LocalCluster
        self.inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.cluster = LocalCluster(_one_device_bundle(model, self.inputs), cpuset=cpuset)
        try:
            self.cluster.infer(*self.inputs)     # deployed and warm
        except BaseException:
            self.cluster.close()                 # no worker left behind by a failed first request
            raise

    def _stage_cpu_s(self) -> float:
        stats = self.cluster.stats()["device"]
        return sum(v for k, v in stats.items() if k.startswith("stage_cpu_us:")) / 1e6

    def time(self, budget_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 20) -> float:
        """Median thread CPU seconds of the worker's stages per request, over requests sent for about ``budget_s``."""
        import statistics
        import time
        t0, per = time.perf_counter(), []
        while len(per) < max_repeats and (len(per) < min_repeats or time.perf_counter() - t0 < budget_s):
            before = self._stage_cpu_s()
            self.cluster.infer(*self.inputs)
            per.append(self._stage_cpu_s() - before)
        return statistics.median(per)

    def close(self) -> None:
        self.cluster.close()

    def __enter__(self) -> "ProgramTimer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def row_points(total: int, max_points: int = 10) -> list[int]:
    """Row counts at which a node of ``total`` output rows is timed: every count up to ``max_points``
    rows, else 1, 2, 3 and a geometric series up to ``total`` (the thin slices, where the time per
    row bends, densest)."""
    if total <= max_points:
        return list(range(1, total + 1))
    pts = {1, 2, 3, total}
    k = max_points - len(pts)
    for i in range(1, k + 1):
        pts.add(int(round(3 * (total / 3) ** (i / (k + 1)))))
    return sorted(p for p in pts if 1 <= p <= total)


def smooth_slice_factors(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Each slice size's factor → the median of it and its two neighbours; the end points kept.

    A planner picks the slice sizes that look cheapest, so one low reading among a layer's points is
    the one a plan ends up on: YOLOv2-tiny's 1024→1024 convolution at 3 of 8 rows read 0.66 in one
    calibration where its neighbours and other runs read 0.8–1.0, the plan gave a device those 3
    rows, and its stage ran 1.32× the prediction. The whole layer's factor is the op type's
    reference (and timed longest), and the first point has one neighbour only: both stay."""
    if len(points) < 3:
        return list(points)
    vals = [v for _, v in points]
    middle = [(points[i][0], sorted(vals[i - 1:i + 2])[1]) for i in range(1, len(points) - 1)]
    return [points[0]] + middle + [points[-1]]


def measure_node_calibration(profile, nodes: list[dict], budget_s: float = 4.0, cpuset: list[int] | None = None,
                             bounds: tuple[float, float] = (0.33, 3.0)) -> dict[str, list]:
    """How each layer of a model runs now — whole and as slices of its rows — relative to its op type.

    The op-type calibration (:func:`measure_family_speeds`, × :func:`model_speed`) sets one factor per
    op type, time-weighted over the model's layers; the layers of one type drift apart by size around
    it (MobileNetV2's first layers, large activations and few channels, ran 0.56–0.9× the time its
    conv / bn / act factors predict on this machine while its late 1×1 convolutions ran 1.0–1.2×),
    and the FCPM is least accurate for thin slices of layers with large weights (VGG-16's
    512-channel 3×3 convolutions at 1–3 of 10 rows ran 1.3–2.5× their prediction, the whole layer
    within 10 %: the weights are read whole however few rows are computed). DCFP's online step
    knows the model: each of its layers (``nodes``, ``cost.node_info``; not linear layers, whose
    weight streaming is ``memory_speed``'s) is timed whole and, if it has several rows, at the row
    counts :func:`row_points` picks; its factor at r rows is

        factor(r) = (measured(r) ÷ predicted(r)) ÷ (Σ measured ÷ Σ predicted over its op type's layers, whole),

    the profile's isolated prediction throughout. The level of an op type stays the op-type
    calibration's (a factor's time-weighted mean over an op type's layers whole is 1), so this
    only redistributes time between layers and rows. Returns {node name: [[rows, factor], ...]}
    (factors clamped to ``bounds``), a device's ``node_calibration`` (``CostModel`` interpolates
    between the points). Measured time never falls as a slice grows (running max), so noise does not
    make a planner prefer a bigger slice, and one low reading does not make it prefer that slice size
    (:func:`smooth_slice_factors`). Timing: thread CPU, one torch thread, pinned to ``cpuset``,
    medians of ≥ 7 calls (3 left a 1024→1024 convolution's slices ±20–30 % apart between runs)."""
    import time

    from edgepart.fcpm.ops import Runner, family, time_callable
    prof = profile if hasattr(profile, "predict") else _load_profile(profile)
    todo = [(info, row_points(int(info.get("rows", 1) or 1))) for info in nodes
            if info.get("name") and family(info) not in ("linear", "trivial")]
    n_points = sum(len(p) for _, p in todo) or 1
    ratios: dict[str, dict[int, float]] = {}
    sums: dict[str, list[float]] = {}          # op type -> [Σ predicted, Σ measured] of whole layers
    with _pinned_one_thread(cpuset):
        for info, pts in todo:
            measured: dict[int, float] = {}
            for r in pts:
                try:
                    run = Runner(info, r)
                except Exception:   # noqa: BLE001 — a node the profiler cannot build alone keeps its op type's
                    measured = {}
                    break
                measured[r] = time_callable(run, target_s=budget_s / n_points, min_repeats=7, max_repeats=30,
                                            warmup_s=0.002, clock=time.thread_time)["t"]
            total = pts[-1]
            if total not in measured:
                continue
            ratio, peak = {}, 0.0
            for r in sorted(measured):
                peak = max(peak, measured[r])
                ratio[r] = peak / max(prof.predict(info, r, context="isolated"), 1e-9)
            ratios[info["name"]] = dict(smooth_slice_factors(sorted(ratio.items())))
            acc = sums.setdefault(family(info), [0.0, 0.0])
            acc[0] += prof.predict(info, None, context="isolated")
            acc[1] += peak                     # the whole node's time, as its factor uses it
    fam_of = {info["name"]: family(info) for info, _ in todo}
    out = {}
    for name, ratio in ratios.items():
        p, m = sums[fam_of[name]]
        level = m / p if p > 0 else 1.0
        out[name] = [[r, round(min(bounds[1], max(bounds[0], v / level)), 3)] for r, v in sorted(ratio.items())]
    return out


def _retime_nodes(prof, nodes: list[dict], budget_s: float) -> dict[str, tuple[float, float]]:
    """{family: (Σ isolated prediction, Σ measured thread CPU)} over ``nodes`` timed whole."""
    import time

    from edgepart.fcpm.ops import Runner, family, time_callable
    todo = [n for n in nodes if family(n) not in ("linear", "trivial")]
    sums: dict[str, tuple[float, float]] = {}
    for info in todo:
        try:
            run = Runner(info)
        except Exception:   # noqa: BLE001 — a node the profiler cannot build alone is not timed
            continue
        m = time_callable(run, target_s=budget_s / max(1, len(todo)), min_repeats=3, max_repeats=20,
                          clock=time.thread_time)["t"]
        p = prof.predict(info, None, context="isolated")
        fam = family(info)
        a, b = sums.get(fam, (0.0, 0.0))
        sums[fam] = (a + p, b + m)
    return sums


def _load_profile(path):
    from edgepart.fcpm import DeviceProfile
    return DeviceProfile.load(path)


def measure_host_speed(profile, budget_s: float = 2.0, cpuset: list[int] | None = None,
                       kind: str = "networks") -> dict:
    """One-shot :class:`HostSpeedProbe` measurement (see there)."""
    return HostSpeedProbe(profile, cpuset, kind).measure(budget_s)


def _layer_speed(prof, budget_s: float, seed: int, families: dict[str, int] | None = None) -> dict:
    """median(recorded / now) over a sample of the profile's recorded layer timings at load 0 (1–30 ms each)."""
    import numpy as np

    meas = prof.measurements or {}
    configs = {c["cid"]: c for c in meas.get("configs", [])}
    recs = [r for r in meas.get("records", []) if r.get("load", 0.0) == 0.0 and 1e-3 <= r["t"] <= 30e-3
            and r["cid"] in configs]
    if not recs:
        raise ValueError("the profile holds no recorded timings at load 0 (fitted without measurements?)")
    want = families or {"conv": 10, "linear": 3, "maxpool": 3}
    rng = np.random.default_rng(seed)
    pick = []
    for fam, n in want.items():
        pool = [r for r in recs if r["family"] == fam]
        if pool:
            pick += [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    ratios = _retime(configs, pick, budget_s)
    allr = [x for v in ratios.values() for x in v]
    return {"host_speed": float(np.median(allr)), "n": len(allr),
            "per": {f: float(np.median(v)) for f, v in ratios.items()}}
