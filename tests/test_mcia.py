"""MCIA: scenario validation, the MILP equals brute force on tiny instances, beats every baseline, keeps constraints."""
from __future__ import annotations

import random

import pytest
import torch

from edgepart.cluster import Cluster
from edgepart.errors import ClusterError, EdgepartError
from edgepart.mcia import STRATEGIES, Choice, Task, TaskTable, Tiers, VersionCosts, parse_tasks, plan
from edgepart.mcia.build import legal_cuts, version_costs
from edgepart.mcia.solve import brute_force, solve_milp
from edgepart.mcia.table import evaluate, violations


def tiered(uplink_mbps=10.0, wan_mbps=50.0, shared=False, edge_mem=4096.0, ends=2) -> Cluster:
    devs = [{"name": f"e{i}", "speed": 0.5, "tier": "end"} for i in range(ends)]
    devs += [{"name": "edge", "speed": 4.0, "tier": "edge", "memory_mb": edge_mem},
             {"name": "cloud", "speed": 16.0, "tier": "cloud"}]
    return Cluster.from_dict({"devices": devs, "shared_medium": shared, "links": {
        "default": {"bandwidth_mbps": uplink_mbps, "latency_ms": 2.0},
        "overrides": [{"a": "edge", "b": "cloud", "bandwidth_mbps": wan_mbps, "latency_ms": 20.0}]}})


def random_table(rng: random.Random, task: Task, n_versions=2, n_cuts=3) -> TaskTable:
    versions = []
    for v in range(n_versions):
        scale = 1.0 / (v + 1)
        node = [rng.uniform(0.005, 0.03) * scale for _ in range(n_cuts - 1)]
        pre = [0.0]
        for t in node:
            pre.append(pre[-1] + t)
        params = [0]
        for _ in node:
            params.append(params[-1] + int(rng.uniform(0.2, 2.0) * scale * 2 ** 20))
        cut_bytes = [3 * 32 * 32 * 4] + [int(rng.uniform(1e3, 4e4)) for _ in range(n_cuts - 2)] + [40]
        versions.append(VersionCosts(f"v{v}", 0.95 - 0.1 * v, tuple(pre), tuple(p / 8 for p in pre),
                                     tuple(p / 32 for p in pre), tuple(cut_bytes), tuple(params)))
    return TaskTable(task, tuple(versions), versions[0].end_s[-1])


def instance(seed: int, n_tasks: int, **kw):
    rng = random.Random(seed)
    cluster = tiered(**kw)
    tiers = Tiers.from_cluster(cluster)
    tasks = [Task(f"t{i}", f"e{i % 2}", w_acc=rng.choice([1.0, 0.2]), w_lat=rng.choice([0.2, 1.0]),
                  deadline_ms=rng.choice([None, 60.0]), rate=rng.choice([1.0, 10.0])) for i in range(n_tasks)]
    return [random_table(rng, t) for t in tasks], tiers


@pytest.mark.parametrize("seed", range(6))
def test_milp_equals_brute_force_on_tiny_instances(seed):
    tables, tiers = instance(seed, 2 + seed % 2, shared=seed % 3 == 0, edge_mem=2.0 if seed == 4 else 4096.0)
    levels = 2
    bf = brute_force(tables, tiers, levels)
    assert bf is not None
    sol = solve_milp(tables, tiers, levels)
    assert sol.objective == pytest.approx(bf.objective, abs=1e-6)
    assert sol.violations == []
    assert sol.gap <= 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_milp_is_at_least_every_feasible_baseline_and_respects_constraints(seed):
    tables, tiers = instance(100 + seed, 4, uplink_mbps=5.0)
    levels = 4
    best = plan(tables, tiers, levels, "milp")
    assert best.violations == []
    assert sum(c.edge_share for c in best.choices) <= levels
    for t, o in zip(tables, best.outcomes):
        if t.task.deadline_ms is not None:
            assert o.latency_s * 1e3 <= t.task.deadline_ms + 1e-9
    for s in STRATEGIES[1:]:
        base = plan(tables, tiers, levels, s)
        assert len(base.choices) == len(tables)
        if not base.violations:
            assert best.objective >= base.objective - 1e-9, s


def test_latency_follows_the_formula():
    tables, tiers = instance(7, 1)
    v = tables[0].versions[0]
    o = evaluate(tables[0], tiers, Choice(0, 1, 2, 1, 2), levels=2)   # end prefix, edge rest at half share
    up = tiers.uplinks["e0"]
    expect = (v.end_s[1] + 2 * up.latency_ms / 1e3 + (v.cut_bytes[1] + v.cut_bytes[2]) * 8 / (up.bandwidth_mbps * 1e6)
              + (v.edge_s[2] - v.edge_s[1]) * 2)
    assert o.latency_s == pytest.approx(expect)
    assert o.edge_bytes == v.param_bytes[2] - v.param_bytes[1]


def test_shares_over_capacity_and_min_accuracy_are_reported():
    tables, tiers = instance(3, 2)
    tables = [TaskTable(Task(t.task.name, t.task.source, min_accuracy=0.9), t.versions, t.reference_s)
              for t in tables]
    bad = violations(tables, tiers, [Choice(1, 0, 2, 2, 2), Choice(0, 0, 2, 1, 2)], levels=2)
    assert any("edge compute shares" in b for b in bad)
    assert any("min_accuracy" in b and "t0" in b for b in bad)


def test_a_task_that_cannot_meet_its_deadline_is_named():
    tables, tiers = instance(3, 2)
    t = tables[1]
    tables[1] = TaskTable(Task("slow", "e1", deadline_ms=0.001), t.versions, t.reference_s)
    with pytest.raises(EdgepartError, match="'slow'"):
        solve_milp(tables, tiers, 2)


def test_cluster_tier_is_validated_and_round_trips():
    c = tiered()
    assert [d.name for d in c.tier("end")] == ["e0", "e1"]
    assert Cluster.from_dict(c.to_dict()).device("edge").tier == "edge"
    with pytest.raises(ClusterError, match="tier"):
        Cluster.from_dict({"devices": [{"name": "a", "tier": "fog"}]})
    with pytest.raises(ClusterError, match="exactly one device with tier: edge"):
        Tiers.from_cluster(Cluster.from_dict({"devices": [{"name": "a", "tier": "end"}]}))
    assert Cluster.from_dict({"devices": [{"name": "a"}]}).device("a").tier is None   # flat clusters unchanged


@pytest.mark.parametrize("task, key", [
    ({"name": "t", "source": "nowhere"}, "source"),
    ({"name": "t", "source": "e0", "w_acc": "high"}, "w_acc"),
    ({"name": "t", "source": "e0", "w_lat": -1}, "w_lat"),
    ({"name": "t", "source": "e0", "min_accuracy": 1.5}, "min_accuracy"),
    ({"name": "t", "source": "e0", "deadline_ms": 0}, "deadline_ms"),
    ({"name": "t", "source": "e0", "rate": 0}, "rate"),
    ({"name": "t", "source": "e0", "colour": 1}, "colour"),
    ({"source": "e0"}, "name"),
])
def test_tasks_validation_names_the_key(task, key):
    tiers = Tiers.from_cluster(tiered())
    with pytest.raises(EdgepartError, match=key):
        parse_tasks({"tasks": [task]}, tiers, where="tasks.yaml")


def test_tasks_parse_and_share_levels():
    tiers = Tiers.from_cluster(tiered())
    tasks, levels = parse_tasks({"share_levels": 4, "tasks": [
        {"name": "a", "source": "e0", "versions": "vs", "w_acc": 1, "w_lat": 0.5, "deadline_ms": 50, "rate": 3}]},
        tiers, base=None)
    assert levels == 4 and tasks[0].deadline_ms == 50.0 and tasks[0].rate == 3.0 and str(tasks[0].versions) == "vs"
    with pytest.raises(EdgepartError, match="share_levels"):
        parse_tasks({"share_levels": 0, "tasks": [{"name": "a", "source": "e0"}]}, tiers)


def test_cost_table_of_a_traced_model_has_legal_cuts_with_their_bytes():
    from edgepart.passes.trace import trace
    from edgepart.compiler.cost.model import CostModel
    from edgepart.passes import analyse
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(2 * 64, 5))
    cluster = tiered()
    gm = trace(model.eval(), (torch.randn(1, 3, 8, 8),))
    analyse(gm, cluster)
    cuts = legal_cuts(gm)
    assert cuts[0][1] == 3 * 8 * 8 * 4 and cuts[-1][1] == 5 * 4
    assert len(cuts) == 6                      # a chain: every node boundary is legal
    v = version_costs(gm, CostModel(cluster), "e0", "edge", "cloud", "full", 0.9)
    assert v.end_s[-1] == pytest.approx(8 * v.edge_s[-1]) and v.end_s[0] == 0.0
    assert v.param_bytes[-1] == sum(p.numel() * 4 for p in model.parameters())


# --- a version set on disk, without training: two widths of VGGSmall, made-up accuracies ------------------


def tiny_version_set(path):
    import json

    from edgepart.models.compact import VGGSmall
    from edgepart.versions.store import FORMAT, SET_FILE, VersionRecord, save_version, write_record
    torch.manual_seed(0)
    names = []
    for name, widths, acc in (("scale-1.00", (8, 8, 16, 16), 0.95), ("scale-0.50", (4, 4, 8, 8), 0.9)):
        model = VGGSmall(widths, hidden=16).eval()
        sha = save_version(path / name, model.spec(), model.state_dict(), {"model": "vgg_small", "version": name})
        n = sum(p.numel() for p in model.parameters())
        write_record(path / name, VersionRecord(name, 1.0 if acc > 0.9 else 0.5, False, acc, acc, 0, n, 4 * n,
                                                None, None, None, True, sha))
        names.append(name)
    (path / SET_FILE).write_text(json.dumps({"format": FORMAT, "model": "vgg_small", "versions": names,
                                             "data": {"input_size": 16}}))


def test_cli_mcia_plan_from_files(tmp_path, capsys):
    import yaml

    from edgepart.cli import main
    tiny_version_set(tmp_path / "vs")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(tiered(uplink_mbps=20.0).to_dict()))
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"share_levels": 4, "tasks": [
        {"name": "acc", "source": "e0", "versions": "vs", "w_acc": 1.0, "w_lat": 0.1},
        {"name": "fast", "source": "e1", "versions": "vs", "w_acc": 0.1, "w_lat": 1.0, "deadline_ms": 500}]}))
    assert main(["mcia", "plan", str(tmp_path / "cluster.yaml"), str(tmp_path / "tasks.yaml"), "--explain",
                 "--strategy", "all"]) == 0
    out = capsys.readouterr().out
    for s in STRATEGIES:
        assert f"{s}: objective" in out
    assert "scale-" in out and "uplink" in out
    assert main(["mcia", "plan", str(tmp_path / "cluster.yaml"), str(tmp_path / "tasks.yaml"),
                 "--strategy", "nope"]) == 2
    assert "unknown MCIA strategy" in capsys.readouterr().err


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.c = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(self.b(y) + y)


def test_no_legal_cut_inside_a_residual_block():
    from edgepart.passes.trace import trace
    from edgepart.passes import analyse
    gm = trace(_Residual().eval(), (torch.randn(1, 3, 8, 8),))
    analyse(gm, tiered())
    labels = [label for _, _, label in legal_cuts(gm)]
    assert "b" not in labels                     # after b both b's output and y cross
    assert labels[0] == "input" and labels[-1] == "output" and "a" in labels
