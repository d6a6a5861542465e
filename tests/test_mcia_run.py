"""MCIA plans running on the tiered emulated testbed (edgepart.mcia.run, edgepart.testbed.tiered).

Without root: the plan-to-bundle mapping (cuts -> vertical plan, exact in-process). With root: a tiny
instance end to end — three tasks from two end devices through the edge server and the cloud, every
output equal to its version's single-device output, and a re-solve that changes only what differs.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from edgepart import datasets
from edgepart.cluster import Cluster
from edgepart.mcia import Tiers
from edgepart.mcia.build import build_table
from edgepart.mcia.run import choice_plan, task_cluster
from edgepart.mcia.scenario import Task
from edgepart.mcia.table import Choice
from edgepart.testbed.emulator import netns_available
from edgepart.versions import TrainConfig, VersionSet, build_version_set
from tests.conftest import assert_close

CLUSTER = {
    "devices": [{"name": "p0", "tier": "end", "speed": 0.2, "memory_mb": 512},
                {"name": "p1", "tier": "end", "speed": 0.2, "memory_mb": 512},
                {"name": "edge", "tier": "edge", "speed": 1.0, "memory_mb": 2048},
                {"name": "cloud", "tier": "cloud", "speed": 1.0}],
    "links": {"default": {"bandwidth_mbps": 20, "latency_ms": 2},
              "overrides": [{"a": "edge", "b": "cloud", "bandwidth_mbps": 50, "latency_ms": 10}]}}


def tiny_version_set(tmp_path_factory, name: str):
    """vgg_small at scales 1 and 0.5 on 16-pixel digits, one epoch on 96 images: (VersionSet, test split)."""
    d = datasets.load("digits", 16)
    small = dataclasses.replace(d, train=datasets.Split(d.train.x[:96], d.train.y[:96]))
    root = tmp_path_factory.mktemp(name) / "vgg"
    tiny = TrainConfig(epochs=1, batch_size=32)
    build_version_set("vgg_small", root, (1.0, 0.5), data=small, config=tiny, finetune=tiny, int8=False,
                      repeats=0, log=lambda m: None)
    return VersionSet.load(root), d.test


@pytest.fixture(scope="module")
def vs(tmp_path_factory):
    return tiny_version_set(tmp_path_factory, "mcia-run")


def test_every_choice_compiles_to_an_exact_three_tier_bundle(vs):
    vset, test = vs
    cluster = Cluster.from_dict(CLUSTER)
    tiers = Tiers.from_cluster(cluster)
    table = build_table(Task("t", "p1", versions=vset.dir), cluster, tiers, vset)
    sub = task_cluster(cluster, tiers, "p1")
    assert sub.source == "p1" and sorted(sub.names) == ["cloud", "edge", "p1"]
    x = test.x[:1]
    for vi, v in enumerate(table.versions):
        model, _ = vset.model(v.name)
        for k1, k2 in [(0, 0), (0, v.last), (v.last, v.last), (1, v.last - 1), (2, 2)]:
            plan = choice_plan(model, x, Choice(vi, k1, k2, 1, 1), sub, tiers, "p1")
            assert [s.device for s in plan.stages] == [d for d, n in (("p1", k1 > 0), ("edge", k2 > k1),
                                                                      ("cloud", k2 < v.last)) if n]
            bundle = vset.compile(v.name, sub, strategy=plan)
            assert bundle.manifest.source_device == "p1"
            assert_close(bundle.run_local(x), model(x))


@pytest.mark.root
@pytest.mark.timeout(600)
@pytest.mark.skipif(not netns_available()[0], reason=f"netns emulation unavailable: {netns_available()[1]}")
def test_tiny_instance_runs_exactly_on_the_tiered_testbed_and_resolves(vs):
    from edgepart.mcia.run import MciaRun
    vset, test = vs
    cluster = Cluster.from_dict(CLUSTER)
    tasks = [Task("a", "p0", w_acc=1.0, w_lat=0.2, versions=vset.dir),
             Task("b", "p1", w_acc=0.2, w_lat=1.0, versions=vset.dir),
             Task("c", "p1", w_acc=1.0, w_lat=1.0, versions=vset.dir)]
    with MciaRun(cluster, tasks, levels=4, cpuset=[1] if (os.cpu_count() or 1) > 1 else None) as run:
        ns = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        assert set(run.bed.ns.values()) <= ns
        report = run.measure(test.x, test.y, requests=3, warmup=1)
        assert [r.task for r in report.results] == ["a", "b", "c"]
        for r in report.results:
            assert r.exact, (r.task, r.max_rel_diff)
            assert r.measured_ms > 0 and r.predicted_ms > 0 and 0 <= r.answered_accuracy <= 1
        # a task leaves, another arrives, one changes its property: only what differs is redeployed
        new = [tasks[0], dataclasses.replace(tasks[2], w_lat=0.05), Task("d", "p0", versions=vset.dir)]
        pids = {n: {d: p.pid for d, p in s.procs.items()} for n, s in run.bed.slots.items()}
        up = run.update(new)
        assert up.removed == ["b"] and up.added == ["d"]
        assert sorted(up.unchanged + up.reshared + up.redeployed) == ["a", "c"]
        for n in up.unchanged + up.reshared:          # kept its workers
            assert {d: p.pid for d, p in run.bed.slots[n].procs.items()} == pids[n]
        for n in up.redeployed:
            assert {d: p.pid for d, p in run.bed.slots[n].procs.items()} != pids[n]
        assert set(run.bed.slots) == {"a", "c", "d"}
        again = run.measure(test.x, test.y, requests=2, warmup=1)
        assert all(r.exact for r in again.results)
        bed_ns = list(run.bed.ns.values())
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in left for n in bed_ns)


def test_calibration_scales_each_version_by_one_factor(vs):
    from edgepart.mcia.run import calibrate_table
    vset, _ = vs
    cluster = Cluster.from_dict(CLUSTER)
    tiers = Tiers.from_cluster(cluster)
    table = build_table(Task("t", "p0", versions=vset.dir), cluster, tiers, vset)
    cache = {(str(vset.dir), v.name): 0.5 + i for i, v in enumerate(table.versions)}     # given: nothing timed
    cal = calibrate_table(table, vset, cluster, cache=cache)
    for i, (a, b) in enumerate(zip(table.versions, cal.versions)):
        for old, new in ((a.end_s, b.end_s), (a.edge_s, b.edge_s), (a.cloud_s, b.cloud_s)):
            assert new == pytest.approx(tuple(t * (0.5 + i) for t in old))
        assert (b.cut_bytes, b.param_bytes, b.accuracy) == (a.cut_bytes, a.param_bytes, a.accuracy)
    full = max(range(len(cal.versions)), key=lambda i: cal.versions[i].param_bytes[-1])
    assert cal.reference_s == pytest.approx(cal.versions[full].end_s[-1])
    measured = calibrate_table(table, vset, cluster)          # timed here: a positive factor per version
    assert all(m.end_s[-1] > 0 for m in measured.versions)
