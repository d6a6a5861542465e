"""Remote profiling (`edgepart profile --endpoint`) and the network probe (`edgepart probe`) against real workers.

One emulated LocalCluster for the module: device ``fast`` (speed 1.0: one core) and ``slow`` (speed
0.25: a 25 % CPU quota), every link 100 Mbit/s + 2 ms, time scale 1. With root it is the netns/cgroup
testbed; without root the in-process limiter (links only, no CPU emulation): the quota test skips then.
"""
from __future__ import annotations

import json
import warnings

import pytest
import yaml

import edgepart
from edgepart import models as zoo
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.passes.trace import trace
from edgepart.errors import EdgepartError
from edgepart.fcpm import DeviceProfile
from edgepart.fcpm.load import cpu_quota_cores, plan_load
from edgepart.fcpm.probe import main as probe_main
from edgepart.fcpm.cli import main as profile_main
from edgepart.fcpm.profiler import design_sweep, net_infos
from edgepart.fcpm.remote import check_profile_options, profile_remote, request
from edgepart.passes import analyse

pytestmark = pytest.mark.timeout(240)
BW, LAT = 100.0, 2.0
COUNTS = "conv=24,dwconv=12,bn=12,act=12"            # --quick takes a sixth: 10 configurations
QUICK = ["--quick", "--counts", COUNTS, "--nets", "1", "--budget", "60", "--no-progress"]


def infos_of(name: str) -> list[dict]:
    model, (x,) = zoo.get(name, input_size=64)
    return net_infos(model, x)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    model, (x,) = zoo.get("tinynet", input_size=64)
    cl = edgepart.Cluster.from_dict({
        "devices": [{"name": "fast", "speed": 1.0}, {"name": "slow", "speed": 0.25}],
        "links": {"default": {"bandwidth_mbps": BW, "latency_ms": LAT}}})
    names = [n.name for n in compute_nodes(analyse(trace(model, (x,))))]
    plan = Plan([Stage("whole", names[:1], device="fast"), Stage("whole", names[1:], device="slow")])
    d = tmp_path_factory.mktemp("fcpm-remote")
    edgepart.compile(model, (x,), cl, strategy=plan).save(d / "bundle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # no root: the in-process limiter warns
        c = edgepart.LocalCluster(d / "bundle", emulate=True, time_scale=1.0)
    with c:
        yield c, model, x, d


@pytest.mark.slow
def test_remote_profile_has_the_shape_of_a_local_one(emu, tmp_path):
    c, *_ = emu
    remote, local = tmp_path / "remote.json", tmp_path / "local.json"
    assert profile_main(["--endpoint", c.endpoints["fast"], "--key-file", str(c.key_file), "--out", str(remote),
                         "--loads", "0,0.5", *QUICK]) == 0
    r = json.loads(remote.read_text())
    # the same sweep here, timed the way the worker chose (under the netns testbed its 1-core quota on a
    # 2-core machine makes it rate-limited; without root it is not)
    mode = "on" if r["meta"]["rate_limited"] else "off"
    assert profile_main(["--out", str(local), "--loads", "0,0.5", "--sustained", mode, *QUICK]) == 0
    l_ = json.loads(local.read_text())
    assert set(r) == set(l_)
    assert set(r["meta"]) - {"remote"} == set(l_["meta"])
    assert r["meta"]["device"] == "fast" and r["meta"]["remote"]["endpoint"] == c.endpoints["fast"]
    if c.emulator.mode == "netns":
        assert r["meta"]["cpu_quota_cores"] == 1.0                # told by the testbed: it cannot see its cgroup
    rm, lm = r["measurements"], l_["measurements"]
    assert rm["configs"] == lm["configs"]                      # same design, shipped as JSON intact
    key = lambda rec: (rec["cid"], rec["rows"], rec["load"])  # noqa: E731
    assert sorted(map(key, rm["records"])) == sorted(map(key, lm["records"]))
    assert {frozenset(x) for x in rm["records"]} == {frozenset(x) for x in lm["records"]}
    assert rm["nets"]["infos"] == lm["nets"]["infos"] and len(rm["nets"]["records"]) == len(lm["nets"]["records"])
    assert set(r["models"]) == set(l_["models"])
    assert (r["sequence"] is None) == (l_["sequence"] is None)
    prof = DeviceProfile.load(remote)
    assert all(prof.predict(i) > 0 for i in infos_of("tinynet"))


@pytest.mark.root
def test_profile_of_a_25_percent_worker_predicts_its_times_not_the_hosts(emu):
    c, model, x, d = emu
    if c.emulator.mode != "netns":
        pytest.skip(f"needs the netns/cgroup testbed (root, cgroup v1): {c.emulator.why}")
    counts = {"conv": 144, "dwconv": 36, "maxpool": 36, "bn": 36, "act": 36}
    # nets=0: no in-network correction (fitted from one or two networks it is ill-posed and noisy)
    opts = {"quick": True, "loads": [0.0], "budget": 60, "nets": 0, "counts": counts}
    profs = {dev: profile_remote(c.endpoints[dev], c.key, opts) for dev in ("fast", "slow")}
    slow, fast = profs["slow"], profs["fast"]
    assert slow.meta["rate_limited"] and slow.meta["cpu_quota_cores"] == 0.25
    # many configurations: a fresh draw of the sweep's design (another seed), every slice height
    held = [(c_["info"], r) for c_ in design_sweep(quick=True, seed=11, counts=counts) for r in c_["rows"]]
    ratio = sum(slow.predict(i, r) for i, r in held) / sum(fast.predict(i, r) for i, r in held)
    zoo_infos = [i for name in ("tinynet", "resnet18", "mobilenet_v2") for i in infos_of(name)]
    zoo_ratio = sum(slow.predict(i) for i in zoo_infos) / sum(fast.predict(i) for i in zoo_infos)
    # what the slow worker really spends per request on its stage when kept busy (pipelined requests),
    # against both predictions: reported, not asserted
    c.infer_many([x] * 4)
    before = c.stats()["slow"]
    n = 24
    c.infer_many([x] * n, window=8)
    measured = (c.stats()["slow"]["compute_us"] - before["compute_us"]) / n / 1e6
    stage = net_infos(model, x)[1:]
    print(f"\n25 % quota: predicted {ratio:.2f}x the 1-core worker over {len(held)} configurations "
          f"({zoo_ratio:.2f}x over {len(zoo_infos)} zoo nodes); sustained share {slow.meta['cpu_share']:.3f} "
          f"of a core; slow worker's stage, busy: measured {measured * 1e3:.2f} ms per request, its profile "
          f"predicts {sum(slow.predict(i) for i in stage) * 1e3:.2f} ms, the 1-core profile "
          f"{sum(fast.predict(i) for i in stage) * 1e3:.2f} ms")
    # 4x from the quota, times what a throttled core loses per CPU-second on this VM (caches cold after
    # every stall: 1.15-1.5x more CPU time per op, measured outside edgepart), plus quick-fit noise and
    # a shared host's drift between the two profiles (CI once read 7.1). The lower bound is the check:
    # the host's own times would read ~1x; the upper one catches the quota counted twice (16x).
    assert 2.5 <= ratio <= 10.0, ratio


def test_probe_measures_links_and_writes_a_cluster_file(emu, tmp_path):
    c, *_ = emu
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(yaml.safe_dump({"endpoints": c.endpoints,
                                   "peer_endpoints": c.emulator.peer_endpoints(c.endpoints)}))
    cin = tmp_path / "in.yaml"
    cin.write_text(yaml.safe_dump({"source": "slow", "devices": [{"name": "fast", "speed": 1.0, "memory_mb": 512},
                                                                 {"name": "slow", "speed": 0.25}]}))
    out = tmp_path / "cluster.yaml"
    assert probe_main(["--endpoints", str(eps), "--key-file", str(c.key_file), "--cluster", str(cin),
                       "--out", str(out), "--repeats", "2", "--seconds", "0.3"]) == 0
    cl = edgepart.Cluster.from_file(out)
    assert cl.names == ["fast", "slow"] and cl.source == "slow"
    assert cl.device("fast").memory_mb == 512 and cl.device("slow").speed == 0.25
    link = cl.link("fast", "slow")
    data = yaml.safe_load(out.read_text())
    dirs = data["probe"]["directions"]
    print(f"\nprobe ({c.emulator.mode}, configured {BW:g} Mbit/s + {LAT:g} ms): cluster link "
          f"{link['bandwidth_mbps']:.1f} Mbit/s, {link['latency_ms']:.3f} ms; " +
          "; ".join(f"{x['from']}->{x['to']} {x['bandwidth_mbps']:.1f} Mbit/s rtt {x['rtt_ms']:.2f} ms "
                    f"msg {x['overhead_us']:.0f} us" for x in dirs))
    assert {(x["from"], x["to"]) for x in dirs} == {("fast", "slow"), ("slow", "fast")}
    # the shaped 100 Mbit/s, not loopback's Gbit/s; the lower bound leaves room for a busy shared host
    assert 45 <= link["bandwidth_mbps"] <= 120
    assert all(45 <= x["bandwidth_mbps"] <= 120 for x in dirs)
    assert data["links"]["overrides"] == [{"a": "fast", "b": "slow", "bandwidth_mbps": link["bandwidth_mbps"],
                                           "latency_ms": link["latency_ms"]}]


@pytest.mark.parametrize("options, reason", [
    ({"loads": [2.0]}, "'loads' must be"),
    ({"loads": []}, "'loads' must be"),
    ({"loads": [0.0, 0.0]}, "repeats a level"),
    ({"quick": "yes"}, "'quick' must be"),
    ({"budget": -1}, "'budget' must be"),
    ({"budget": float("nan")}, "'budget' must be"),
    ({"seed": True}, "'seed' must be"),
    ({"counts": {"conv": 10 ** 9}}, "each count"),
    ({"counts": {"rm -rf": 1}}, "unknown families"),
    ({"nets": 1000}, "'nets' must be"),
    ({"sustained": "maybe"}, "'sustained' must be"),
    ({"bogus": 1}, "unknown profile option"),
    ("quick", "must be a JSON object"),
])
def test_bad_profile_options_refused_with_reason(options, reason):
    with pytest.raises(ValueError, match=reason):
        check_profile_options(options)


def test_worker_refuses_bad_requests_and_keeps_serving(emu):
    c, model, x, _ = emu
    ep = c.endpoints["fast"]
    bad = [({"kind": "profile", "options": {"loads": [5]}}, "'loads' must be"),
           ({"kind": "profile", "options": {"budget": "forever"}}, "'budget' must be"),
           ({"kind": "probe", "self": "fast", "peer": "fast", "address": "127.0.0.1:1"}, "does not probe itself"),
           ({"kind": "probe", "self": "fast", "peer": "slow", "address": "nowhere"}, "HOST:PORT"),
           ({"kind": "probe", "self": "fast", "peer": "slow", "address": "127.0.0.1:1",
             "options": {"max_bytes": 1 << 40}}, "'max_bytes' must be"),
           ({"kind": "probe_ping"}, "only on a probe connection")]
    for header, reason in bad:
        with pytest.raises(EdgepartError, match=reason):
            request(ep, c.key, header, ("profile_result", "probe_result"), ("profile_error", "probe_error"),
                    idle_timeout=30)
    # a probe towards a worker that is not there fails with a reason; the worker carries on
    with pytest.raises(EdgepartError, match="probing 'slow'"):
        request(ep, c.key, {"kind": "probe", "self": "fast", "peer": "slow", "address": "127.0.0.1:1"},
                ("probe_result",), ("probe_error",), idle_timeout=30)
    with pytest.raises(EdgepartError, match="refused the hello|wrong key|cannot reach"):
        profile_remote(ep, b"x" * 32, {"quick": True})
    y = c.infer(x)
    assert y.shape == model(x).shape


def test_load_plans_and_quota_reading(tmp_path):
    assert plan_load(0.5, 0.25, "cpu") == (1, 0.125)
    n, duty = plan_load(0.75, 1.0, "cpu")
    assert n == 3 and duty == pytest.approx(0.25)      # none asks more than its fair share next to the profiler
    assert plan_load(0.5, 2) == (1, 1.0)                # the host's meaning is unchanged
    root = tmp_path / "cg"
    (root / "cpu" / "a" / "b").mkdir(parents=True)
    for path, q in ((root / "cpu", -1), (root / "cpu" / "a", 50_000), (root / "cpu" / "a" / "b", 80_000)):
        (path / "cpu.cfs_quota_us").write_text(f"{q}\n")
        (path / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("3:memory:/x\n2:cpu:/a/b\n1:cpuacct:/a/b\n")
    assert cpu_quota_cores(str(proc), str(root)) == 0.5          # the tightest of the group and its ancestors
    (root / "v2" / "k").mkdir(parents=True)
    (root / "v2" / "k" / "cpu.max").write_text("25000 100000\n")
    proc.write_text("0::/k\n")
    assert cpu_quota_cores(str(proc), str(root / "v2")) == 0.25
    (root / "v2" / "k" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(str(proc), str(root / "v2")) is None
    assert cpu_quota_cores(str(tmp_path / "missing"), str(root)) is None
