"""Testbed emulation on one machine, from the manifest's cluster (device speeds, link bandwidths/latencies).

With root, cgroup v1 and network namespaces (``mode == "netns"``):

* **CPU**: each worker runs in its own cgroup under ``/sys/fs/cgroup/cpu`` with
  ``cpu.cfs_quota_us = speed × s × cpu.cfs_period_us`` and one torch thread.
* **Links**: each worker runs in its own network namespace; every pair of devices
  is joined by its own veth pair whose two ends are shaped with ``tc qdisc ... tbf``
  at the pair's bandwidth × s. ``netem`` is not available here, so the link latency
  (÷ s) is added by the sender (a delay line in the worker's peer queue). The
  client reaches each worker over an extra, unshaped veth pair.

``s`` (``time_scale``, ≤ 1) slows the whole testbed down uniformly so it fits this
machine: a device of speed 1.0 is one core of this machine, and a cluster whose
devices would need more cores than there are, or a device faster than one core
(a worker has one thread), is emulated in dilated time. Every emulated duration
is then the target duration ÷ s, so ratios (speed-ups) are unaffected and
``measured × s`` is the target's time.

Without root or without cgroup/netns (``mode == "inprocess"``): the sender's
token bucket limits each link's bandwidth and adds its latency, there is no CPU
emulation, and a warning says so. Everything created is removed by ``close()``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import warnings

log = logging.getLogger("edgepart.emulate")
CGROOT = "/sys/fs/cgroup/cpu"
PERIOD_US = 100_000


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
                 cpus: int | None = None):
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
        cpus = cpus or os.cpu_count() or 1
        if self.mode == "netns":
            fit = min(1.0 / max(self.speed[d] for d in self.devices),
                      0.9 * cpus / sum(self.speed[d] for d in self.devices))
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
        self.cgparent = os.path.join(CGROOT, f"edgepart-{self.tag}")
        os.makedirs(self.cgparent, exist_ok=True)
        for d in self.devices:
            path = os.path.join(self.cgparent, d)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
                f.write(str(PERIOD_US))
            quota = max(1000, int(self.speed[d] * s * PERIOD_US))
            with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(quota))
            self.cgroups[d] = path
        log.info("emulated testbed: %s", self.describe())

    # --- hooks used by LocalCluster ----------------------------------------------------------
    def host(self, device: str) -> str:
        return "0.0.0.0" if self.mode == "netns" else "127.0.0.1"

    def wrap(self, device: str, cmd: list[str]) -> list[str]:
        cmd = cmd + ["--links", json.dumps(self.links_config(device))]
        if self.mode == "netns":
            return ["ip", "netns", "exec", self.ns[device]] + cmd
        return cmd

    def links_config(self, device: str) -> dict:
        peers = {}
        for other in self.devices:
            if other == device:
                continue
            ln = self.link[frozenset((device, other))]
            if self.mode == "netns":      # bandwidth is shaped by tc; the sender adds the latency
                peers[other] = {"bandwidth_mbps": None, "latency_ms": ln["latency_ms"] / self.time_scale}
            else:
                peers[other] = {"bandwidth_mbps": ln["bandwidth_mbps"], "latency_ms": ln["latency_ms"]}
        if self.mode == "netns":
            # the worker's cgroup CPU quota in cores, for remote profiling (edgepart.fcpm): the worker cannot
            # read it itself, `ip netns exec` hides /sys/fs/cgroup
            return {"peers": peers, "cpu_cores": round(self.speed[device] * self.time_scale, 6)}
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
            parts.append("cpu " + ", ".join(f"{d}={self.speed[d] * s:.2f} core" for d in self.devices))
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
