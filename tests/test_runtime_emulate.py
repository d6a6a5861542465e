"""Testbed emulation: cgroup CPU quotas and tc-shaped veth links (root), or the in-process limiter (no root)."""
from __future__ import annotations

import os
import statistics
import subprocess
import time

import pytest
import torch

import edgepart
from edgepart import models as zoo
from edgepart.testbed.emulator import netns_available
from tests.conftest import assert_close

pytestmark = pytest.mark.timeout(120)
BW = 20.0          # Mbit/s on every link: transfers dominate the request time


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model, (x,) = zoo.get("tinynet", input_size=96)
    cl = edgepart.Cluster.from_dict({
        "devices": [{"name": "a", "speed": 1.0}, {"name": "b", "speed": 0.5}],
        "links": {"default": {"bandwidth_mbps": BW, "latency_ms": 2.0}}})
    d = tmp_path_factory.mktemp("emu")
    b = edgepart.compile(model, (x,), cl, strategy="even")
    b.save(d)
    return model.eval(), x, d, b.manifest


def link_bound_s(manifest, scale):
    """A lower bound on one request's time: the bytes its busiest link carries / the link's (scaled) bandwidth."""
    per_link = {}
    for t in manifest.transfers:
        k = (t.src, t.dst)                   # links are full duplex: each direction is shaped on its own
        per_link[k] = per_link.get(k, 0) + t.nbytes
    return max(per_link.values()) * 8 / (BW * scale * 1e6)


def measure(c, x, n=5):
    c.infer(x)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.infer(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout


@pytest.mark.root
@pytest.mark.skipif(not netns_available()[0], reason=f"netns emulation unavailable: {netns_available()[1]}")
def test_netns_cgroup_testbed_shapes_and_cleans_up(bundle):
    model, x, d, manifest = bundle
    with edgepart.LocalCluster(d, emulate=True) as c:
        emu = c.emulator
        assert emu.mode == "netns"
        s = c.time_scale
        for dev, pid in c.pids.items():            # each worker in its own cgroup with a quota from its speed
            cg = emu.cgroups[dev]
            assert str(pid) in open(os.path.join(cg, "cgroup.procs")).read().split()
            quota = int(open(os.path.join(cg, "cpu.cfs_quota_us")).read())
            period = int(open(os.path.join(cg, "cpu.cfs_period_us")).read())
            assert quota == round(emu.speed[dev] * s * period) and quota >= 1000
            assert f"/proc/{pid}/ns/net" and os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert "tbf" in sh(f"ip netns exec {emu.ns[dev]} tc qdisc show")
            # not pinned: the kernel's default packet steering is left alone
            assert emu.net_cpus == [] and set(sh(f"ip netns exec {emu.ns[dev]} sh -c "
                                                 "'cat /sys/class/net/*/queues/rx-*/rps_cpus'").split()) <= {"0", "00"}
        y = c.infer(x)
        with torch.no_grad():
            assert_close(y, model(x))
        t = measure(c, x)
        bound = link_bound_s(manifest, s)
        print(f"netns: {t * 1e3:.1f} ms, link bound {bound * 1e3:.1f} ms")
        assert t >= 0.8 * bound, f"request took {t * 1e3:.1f} ms, below the link bound {bound * 1e3:.1f} ms"
        assert t <= 3 * bound + 0.2, f"request took {t * 1e3:.1f} ms, link bound {bound * 1e3:.1f} ms"
        names = list(emu.ns.values())
        cgs = list(emu.cgroups.values())
    left = sh("ip netns list")
    assert not any(n in left for n in names), left
    assert not any(os.path.exists(p) for p in cgs)
    assert f"ep{emu.tag}" not in sh("ip link show")


@pytest.mark.timing
def test_inprocess_limiter_without_root(bundle):
    model, x, d, manifest = bundle
    with pytest.warns(RuntimeWarning, match="CPU speeds are NOT emulated"):
        c = edgepart.LocalCluster(d, emulate="inprocess")
    with c:
        assert c.emulator.mode == "inprocess" and c.time_scale == 1.0
        a, b = c.devices
        assert c.emulator.links_config(a)["peers"][b]["nic_mbps"] == BW    # the sender's NIC (testbed.links.SenderNic)
        y = c.infer(x)
        with torch.no_grad():
            assert_close(y, model(x))
        t = measure(c, x)
        bound = link_bound_s(manifest, 1.0)
        print(f"inprocess: {t * 1e3:.1f} ms, link bound {bound * 1e3:.1f} ms")
        assert 0.8 * bound <= t <= 3 * bound + 0.2, (t, bound)


@pytest.mark.root
@pytest.mark.skipif(not netns_available()[0], reason=f"netns emulation unavailable: {netns_available()[1]}")
def test_dilated_cpu_shares_pinning_and_host_speed(bundle):
    """cpu="dilate": no quota; each worker reads its share (speed × s ÷ host_speed) from a file the
    emulator rewrites when the host speed changes; workers pinned by taskset; outputs exact."""
    model, x, d, manifest = bundle
    with edgepart.LocalCluster(d, emulate=True, cpu="dilate", cpuset=[0], host_speed=0.8) as c:
        emu = c.emulator
        s = c.time_scale
        assert s == pytest.approx(min(1.0, 0.8 / 1.0, 0.9 * 1 * 0.8 / 1.5))
        for dev, pid in c.pids.items():
            cg = emu.cgroups[dev]
            assert int(open(os.path.join(cg, "cpu.cfs_quota_us")).read()) == -1
            share = float(open(emu.share_file(dev)).read())
            assert share == pytest.approx(emu.speed[dev] * s / 0.8)
            assert os.sched_getaffinity(pid) == {0}
            assert emu.links_config(dev)["cpu"]["share_file"] == emu.share_file(dev)
            other = next(o for o in c.pids if o != dev)
            assert emu.links_config(dev)["peers"][other]["nic_mbps"] == pytest.approx(BW * s)
            # the links' packets are received on the other CPUs (RPS), not charged to the pinned workers
            others = sorted(set(range(os.cpu_count())) - {0})
            assert emu.net_cpus == others
            masks = sh(f"ip netns exec {emu.ns[dev]} sh -c 'cat /sys/class/net/*/queues/rx-*/rps_cpus'").split()
            assert masks and {int(m.replace(",", ""), 16) for m in masks} == {sum(1 << c for c in others)}
        with torch.no_grad():
            ref = model(x)
        assert_close(c.infer(x), ref)
        emu.set_host_speed(0.5)
        for dev in c.pids:
            assert float(open(emu.share_file(dev)).read()) == pytest.approx(emu.speed[dev] * s / 0.5)
        assert_close(c.infer(x), ref)
        stats = c.stats()[c.devices[0]]
        assert stats["compute_us"] > 0
        assert any(k.startswith("stage_preempted:") for k in stats)   # per stage, for the testbed's table
        sharedir = emu.sharedir
    assert not os.path.exists(sharedir)


def test_cpu_dilation_reads_and_follows_the_share_file(tmp_path):
    from edgepart.testbed.cpu import CpuDilation
    f = tmp_path / "share"
    f.write_text("0.25")
    dil = CpuDilation(str(f))
    assert dil.current() == 0.25
    os.utime(f, ns=(1, 1))
    f.write_text("0.5")
    assert dil.current() == 0.5
    f.write_text("7")                 # out of range: refused, the last good share stays
    os.utime(f, ns=(2, 2))
    assert dil.current() == 0.5


def test_sender_nic_sends_one_message_at_a_time_in_the_order_sent():
    """A device's messages to all its peers share its NIC, FIFO, each holding it for latency + bytes ÷
    bandwidth — the simulator's switched links — so a scatter to several peers is not sent in parallel."""
    from edgepart.testbed.links import SenderNic, Shaper
    nic = SenderNic()
    to_b = Shaper(None, latency_ms=500.0, nic=nic, nic_mbps=8e-3)        # 1000 bytes/s, 0.5 s latency
    to_c = Shaper(None, latency_ms=250.0, nic=nic, nic_mbps=16e-3)       # 2000 bytes/s
    assert to_b.release_time(10.0, 1000) == pytest.approx(10.5)          # NIC busy 10.0 .. 11.5
    assert to_c.release_time(10.2, 1000) == pytest.approx(11.75)         # waits for it: 11.5 + 0.25; busy to 12.25
    assert to_b.release_time(13.0, 0) == pytest.approx(13.5)             # idle NIC: only the latency
    alone = Shaper(None, latency_ms=500.0)                                # no NIC: the delay line only
    assert alone.release_time(10.0, 10**9) == pytest.approx(10.5)


RECEIVER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 5301)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20); n = 0; last = 0.0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    n += len(b)
    if time.monotonic() - last > 0.05:         # (a full stdout pipe would stop the reader: few lines)
        last = time.monotonic()
        print(last, n, flush=True)
"""
SENDER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5301), timeout=20); buf = b"x" * (256 << 10); t0 = time.monotonic()
while time.monotonic() - t0 < float(sys.argv[2]):
    s.sendall(buf)
"""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not netns_available()[0], reason=f"netns emulation unavailable: {netns_available()[1]}")
def test_a_link_slowed_while_it_is_busy_keeps_carrying_data(bundle):
    """set_link from a fast to a slow rate under a bulk transfer: data goes on at the new rate. (With
    ``tc qdisc change`` the 64 KB offload packets queued under the fast rate never fit the slow rate's
    16 KB bucket, and the link carried nothing at all.)"""
    model, x, d, manifest = bundle
    with edgepart.LocalCluster(d, emulate=True) as c:
        emu, s = c.emulator, c.time_scale
        emu.set_link("a", "b", 2000.0)
        ip_b = emu.pair_ip[("a", "b")]
        rx = subprocess.Popen(["ip", "netns", "exec", emu.ns["b"], "python3", "-c", RECEIVER, ip_b],
                              stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        tx = subprocess.Popen(["ip", "netns", "exec", emu.ns["a"], "python3", "-c", SENDER, ip_b, "5"])
        try:
            time.sleep(1.5)
            t_change = time.monotonic()
            emu.set_link("a", "b", BW)
            assert tx.wait(timeout=30) == 0
            out, _ = rx.communicate(timeout=30)
        finally:
            for p in (tx, rx):
                if p.poll() is None:
                    p.kill()
        samples = [tuple(map(float, line.split())) for line in out.splitlines()]
        assert samples and samples[-1][1] > 0
        lo, hi = t_change + 0.5, t_change + 3.0
        got = [n for t, n in samples if lo <= t <= hi]
        moved = (max(got) - min(got)) if len(got) >= 2 else 0
        expected = BW * s * 1e6 / 8 * (hi - lo)
        assert moved >= 0.3 * expected, f"{moved} bytes in {hi - lo:.1f} s after the change, expected ~{expected:.0f}"
        assert "tbf" in sh(f"ip netns exec {emu.ns['a']} tc qdisc show")
