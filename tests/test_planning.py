"""The planning package: one direction of imports, every strategy records how its plan was chosen,
plans round-trip through dicts (old ones too), and inspect / explain show the choice."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import edgepart
from edgepart import models
from edgepart.cluster import Cluster
from edgepart.compiler.explain import explain
from edgepart.compiler.inspect import plan_table
from edgepart.compiler.planning.plan import Candidate, Plan, Stage
from edgepart.compiler.planning.registry import STRATEGIES, make_plan
from edgepart.passes.trace import trace
from edgepart.passes import analyse

PLANNING = Path(edgepart.__file__).parent / "compiler" / "planning"
PACKAGE = "edgepart.compiler.planning"


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported module, at module top level?) for every import statement of a module."""
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]    # `from pkg import module` too
            out += [(node.module, id(node) in top)] + [(n, id(node) in top) for n in names]
    return out


def test_planning_imports_run_one_way():
    """No planning module imports the registry (only the API above the package does); no
    function-local edgepart imports; the imports between planning modules have no cycle."""
    modules = {p.stem: ast.parse(p.read_text()) for p in sorted(PLANNING.glob("*.py"))}
    assert {"registry", "primitives", "simple", "baselines", "ofpm", "plan"} <= set(modules)
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        imports = _imports(tree)
        local = [m for m, at_top in imports if not at_top and m.split(".")[0] == "edgepart"]
        assert not local, f"planning/{name}.py imports {local} inside a function"
        within = {m[len(PACKAGE) + 1:].split(".")[0] for m, _ in imports if m.startswith(PACKAGE + ".")}
        graph[name] = within & set(modules)
        if name != "registry":
            assert "registry" not in graph[name], f"planning/{name}.py imports the registry"
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' → '.join(path + (name,))}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, path + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_explain_and_inspect_have_no_function_local_edgepart_imports():
    for path in [PLANNING.parent / "explain.py", PLANNING.parent / "inspect.py"]:
        local = [m for m, at_top in _imports(ast.parse(path.read_text()))
                 if not at_top and m.split(".")[0] == "edgepart"]
        assert not local, f"{path.name} imports {local} inside a function"


@pytest.fixture(scope="module")
def tinynet():
    m, (x,) = models.get("tinynet")
    gm = trace(m, (x,))
    analyse(gm)
    return m, x, gm


def test_every_strategy_records_its_choice(tinynet):
    _, _, gm = tinynet
    cl = Cluster.heterogeneous([1.0, 3.0, 2.0], bandwidth_mbps=10000, latency_ms=0.01)
    for name in STRATEGIES:
        plan = make_plan(gm, cl, name)
        assert plan.strategy == name
        if name == "ofpm":
            assert plan.chosen in [c.name for c in plan.candidates]
        else:
            assert plan.chosen == name and plan.candidates == []
        assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_dict_without_choice_still_reads():
    old = {"strategy": "ofpm", "stages": [{"kind": "whole", "nodes": ["a"], "device": "d0"}]}
    plan = Plan.from_dict(old)
    assert plan == Plan([Stage("whole", ["a"], device="d0")], "ofpm")
    assert plan.chosen is None and plan.candidates == []
    back = Plan.from_dict(plan.to_dict())
    assert back == plan


def test_candidate_round_trip():
    plan = Plan([Stage("whole", ["a"], device="d0")], "ofpm", chosen="milp",
                candidates=[Candidate("milp", 1e-3), Candidate("warm:x", None, "RuntimeError: boom")])
    d = plan.to_dict()
    assert d["chosen"] == "milp"
    assert d["candidates"][1] == {"name": "warm:x", "latency": None, "error": "RuntimeError: boom"}
    assert Plan.from_dict(d) == plan


def test_inspect_and_explain_show_the_winner(tinynet):
    m, x, _ = tinynet
    cl = Cluster.heterogeneous([1.0, 3.0], bandwidth_mbps=10000, latency_ms=0.01)
    bundle = edgepart.compile(m, (x,), cl, strategy="ofpm")
    chosen = bundle.plan.chosen
    assert chosen
    table = plan_table(bundle.manifest)
    assert f"chosen: {chosen}, the fastest of {len(bundle.plan.candidates)} candidates" in table
    assert "warm:neurosurgeon" in table
    assert f"chosen: {chosen}" in explain(bundle)
    single = edgepart.compile(m, (x,), cl, strategy="single")
    assert "chosen: single" in plan_table(single.manifest)
    # a manifest written before plans recorded their choice shows no such line
    old = dataclasses.replace(single.manifest, plan={k: v for k, v in single.manifest.plan.items() if k != "chosen"})
    assert "chosen:" not in plan_table(old)
