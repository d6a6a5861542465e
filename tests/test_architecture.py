"""The direction of dependencies inside the ``edgepart`` package (docs/design.md), checked on the source.

The import graph is read with ``ast`` from the files under ``edgepart/``, without importing
anything: module-level and function-local imports, relative imports resolved against the
importing module's package. ``import a.b`` and ``from a import b`` (where ``a.b`` is a
module) both count as importing ``a.b``; ``from a import name`` (a name defined in ``a``)
counts as importing ``a``. Importing ``a.b`` does not count as importing the package ``a``
(Python runs ``a/__init__.py`` first, but that is an edge of ``a``'s own, not of the
importer's design).

Rules:

* no cycle between modules (function-local imports included: a lazy import hides a
  cycle from Python, not from the design);
* ``edgepart.runtime.*`` imports only ``edgepart.runtime``, ``edgepart.ir`` and
  ``edgepart.errors`` (so never the compiler, passes, fcpm or testbed);
* the leaves import nothing else from edgepart: ``edgepart.errors`` nothing,
  ``edgepart.cluster`` only ``edgepart.errors``, ``edgepart.ir.*`` only ``edgepart.ir``
  and ``edgepart.errors``;
* a function-local import of edgepart (``from edgepart... import``, ``import edgepart...``,
  or a relative import) has a comment containing ``why:`` on its line, on the line above
  it, or on any line of a multi-line import statement.
"""
from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = "edgepart"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

RUNTIME_MAY_IMPORT = ("edgepart.runtime", "edgepart.ir", "edgepart.errors")
LEAVES_MAY_IMPORT = {              # leaf (a module, or a package and everything in it) -> what it may import
    "edgepart.errors": (),
    "edgepart.cluster": ("edgepart.errors",),
    "edgepart.ir": ("edgepart.ir", "edgepart.errors"),
}
# The layers between the leaves and the API: each may import only what lies below it.
LAYERS_MAY_IMPORT = {
    "edgepart.passes": ("edgepart.passes", "edgepart.ir", "edgepart.errors", "edgepart.cluster"),
    "edgepart.testbed": ("edgepart.testbed", "edgepart.runtime", "edgepart.ir", "edgepart.errors", "edgepart.cluster"),
    "edgepart.fcpm": ("edgepart.fcpm", "edgepart.runtime", "edgepart.ir", "edgepart.errors", "edgepart.cluster",
                      "edgepart.passes"),
    "edgepart.models": ("edgepart.models",),
}
WHY = "why:"


@dataclass(frozen=True)
class Import:
    """One edge of the import graph: ``source`` imports ``target`` at ``path:line``."""

    source: str            # importing module, dotted
    target: str            # imported edgepart module, dotted (resolved; may not exist, see missing_modules)
    path: str              # importing file, relative to the repository root
    line: int
    end_line: int
    local: bool            # inside a function (def, async def, lambda), at any depth
    text: str              # the statement as written, for messages

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(root: Path, file: Path, package: str) -> str:
    rel = file.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(module: str, prefix: str) -> bool:
    """``module`` is ``prefix`` or inside it (``edgepart.ir.dtypes`` is within ``edgepart.ir``)."""
    return module == prefix or module.startswith(prefix + ".")


def _comment_lines(source: str) -> dict[int, str]:
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    return comments


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: set[str], package: str, path: str):
        self.module, self.is_package, self.modules, self.package, self.path = module, is_package, modules, package, path
        self.depth = 0                                 # > 0: inside a function
        self.imports: list[Import] = []
        self._seen: set[tuple[int, str]] = set()

    def _add(self, node: ast.stmt, target: str) -> None:
        if within(target, self.package) and (node.lineno, target) not in self._seen:  # one edge per statement
            self._seen.add((node.lineno, target))
            self.imports.append(Import(self.module, target, self.path, node.lineno, node.end_lineno or node.lineno,
                                       self.depth > 0, ast.unparse(node)))

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            if node.level > 1:
                base = base[:-(node.level - 1)]
            base_name = ".".join(base + ([node.module] if node.module else []))
        else:
            base_name = node.module or ""
        for alias in node.names:
            sub = f"{base_name}.{alias.name}"
            self._add(node, sub if alias.name != "*" and sub in self.modules else base_name)


@lru_cache(maxsize=None)
def import_graph(root: Path = SOURCE, package: str = PACKAGE) -> tuple[frozenset[str], tuple[Import, ...]]:
    """Every module of the package under ``root`` and every import of a module of the package."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, f, package) for f in files}
    imports: list[Import] = []
    for f in files:
        rel = str(f.relative_to(root.parent))
        c = _Collector(module_name(root, f, package), f.name == "__init__.py", modules, package, rel)
        c.visit(ast.parse(f.read_text(), filename=str(f)))
        imports += c.imports
    return frozenset(modules), tuple(imports)


def find_cycles(modules, imports) -> list[list[Import]]:
    """For every strongly connected component of the graph: the shortest cycle through each of
    its modules, each cycle once (so every module on a cycle appears in the report)."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.target in modules:
            edges[imp.source].setdefault(imp.target, imp)     # the first import of a pair stands for it
    # Tarjan's strongly connected components, iteratively (no recursion limit on a long chain)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in edges[node]:
                    components.append(sorted(comp))
    cycles: list[list[Import]] = []
    seen: set[frozenset] = set()
    for comp in components:
        members = set(comp)
        for m in comp:                                     # shortest cycle through m: BFS back to m
            parent: dict[str, str] = {}
            frontier, found = [m], False
            while frontier and not found:
                nxt_frontier = []
                for u in frontier:
                    for v in sorted(edges[u]):
                        if v not in members:
                            continue
                        if v == m:
                            parent[m], found = u, True
                            break
                        if v not in parent:
                            parent[v] = u
                            nxt_frontier.append(v)
                    if found:
                        break
                frontier = nxt_frontier
            path, v = [m], parent[m]
            while v != m:
                path.append(v)
                v = parent[v]
            path = [m] + path[1:][::-1]                    # m -> ... -> (back to m)
            key = frozenset(zip(path, path[1:] + path[:1]))
            if key not in seen:
                seen.add(key)
                cycles.append([edges[a][b] for a, b in zip(path, path[1:] + path[:1])])
    return cycles


def format_cycle(cycle: list[Import]) -> str:
    chain = " -> ".join(imp.source for imp in cycle) + f" -> {cycle[0].source}"
    steps = "\n".join(f"      {imp.where()}: {imp.source} imports {imp.target}"
                      f"{' (function-local)' if imp.local else ''}: {imp.text}" for imp in cycle)
    return f"  {chain}\n{steps}"


def describe(imp: Import) -> str:
    return f"  {imp.where()}: {imp.source} imports {imp.target}{' (function-local)' if imp.local else ''}: {imp.text}"


def why_missing(imports, root: Path = SOURCE) -> list[Import]:
    """Function-local edgepart imports without a ``why:`` comment on the line, the line above, or within."""
    comments: dict[str, dict[int, str]] = {}
    bad = []
    for imp in imports:
        if not imp.local:
            continue
        if imp.path not in comments:
            comments[imp.path] = _comment_lines((root.parent / imp.path).read_text())
        lines = comments[imp.path]
        if not any(WHY in lines.get(n, "") for n in range(imp.line - 1, imp.end_line + 1)):
            bad.append(imp)
    return sorted(set(bad), key=lambda i: (i.path, i.line))


# --- the checks on edgepart -------------------------------------------------------------------

def test_every_imported_edgepart_module_exists():
    modules, imports = import_graph()
    missing = [imp for imp in imports if imp.target not in modules]
    if missing:
        pytest.fail("imports of edgepart modules that do not exist:\n" + "\n".join(map(describe, missing)),
                    pytrace=False)


def test_no_import_cycles():
    cycles = find_cycles(*import_graph())
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) between edgepart modules (function-local imports count); "
                    "under each cycle, the import that makes each step:\n" + "\n".join(map(format_cycle, cycles)),
                    pytrace=False)


def test_runtime_imports_only_ir_and_errors():
    _, imports = import_graph()
    bad = [imp for imp in imports if within(imp.source, "edgepart.runtime")
           and not any(within(imp.target, allowed) for allowed in RUNTIME_MAY_IMPORT)]
    if bad:
        pytest.fail(f"edgepart.runtime may import only {', '.join(RUNTIME_MAY_IMPORT)} (never the compiler, passes, "
                    f"fcpm, testbed or the API); {len(bad)} import(s) break that:\n" + "\n".join(map(describe, bad)),
                    pytrace=False)


def test_leaves_import_only_errors():
    _, imports = import_graph()
    bad = [(leaf, allowed, imp) for imp in imports for leaf, allowed in LEAVES_MAY_IMPORT.items()
           if within(imp.source, leaf) and not any(within(imp.target, a) for a in allowed)]
    if bad:
        pytest.fail("the leaves import nothing else from edgepart (edgepart.errors: nothing; edgepart.cluster: errors; "
                    f"edgepart.ir: ir, errors); {len(bad)} import(s) break that:\n"
                    + "\n".join(f"{describe(imp)}   [{leaf} may import: {', '.join(allowed) or 'nothing'}]"
                                for leaf, allowed, imp in bad), pytrace=False)


def test_middle_layers_import_only_what_lies_below():
    _, imports = import_graph()
    bad = [(layer, allowed, imp) for imp in imports for layer, allowed in LAYERS_MAY_IMPORT.items()
           if within(imp.source, layer) and not any(within(imp.target, a) for a in allowed)]
    if bad:
        pytest.fail(f"{len(bad)} import(s) point upward (docs/design.md):\n"
                    + "\n".join(f"{describe(imp)}   [{layer} may import: {', '.join(allowed)}]"
                                for layer, allowed, imp in bad), pytrace=False)


def test_function_local_edgepart_imports_say_why():
    _, imports = import_graph()
    bad = why_missing(imports)
    if bad:
        pytest.fail(f"{len(bad)} function-local edgepart import(s) without a '# why: ...' comment (on the line, the "
                    "line above, or inside the statement); import at module level, or say why not (e.g. a heavy "
                    "optional dependency):\n" + "\n".join(map(describe, bad)), pytrace=False)


# --- the checker itself, on a small package ------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_checker_resolves_imports_and_finds_cycles(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "import os\nimport pkg.sub.b\nthing = 1\n",
        "sub/__init__.py": "from . import b\nfrom .b import name\n",
        "sub/b.py": ("def f():\n"
                     "    # why: heavy\n"
                     "    from ..a import thing\n"
                     "    from pkg import sub\n"
                     "    import pkg.c as c  # why: optional\n"
                     "name = 2\n"),
        "c.py": "from pkg.sub import name\nfrom pkg import *\n",
    })
    modules, imports = import_graph.__wrapped__(pkg, "pkg")
    assert modules == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.c"}
    edges = {(i.source, i.target, i.local) for i in imports}
    assert edges == {("pkg", "pkg.a", False), ("pkg.a", "pkg.sub.b", False), ("pkg.sub", "pkg.sub.b", False),
                     ("pkg.sub.b", "pkg.a", True), ("pkg.sub.b", "pkg.sub", True), ("pkg.sub.b", "pkg.c", True),
                     ("pkg.c", "pkg.sub", False), ("pkg.c", "pkg", False)}
    assert [(i.source, i.line) for i in why_missing(imports, pkg)] == [("pkg.sub.b", 4)]
    cycles = find_cycles(modules, imports)
    found = {tuple(sorted(imp.source for imp in c)) for c in cycles}
    assert ("pkg.a", "pkg.sub.b") in found and ("pkg.sub", "pkg.sub.b") in found
    assert all(c[i].target == c[(i + 1) % len(c)].source for c in cycles for i in range(len(c)))
    assert "pkg.a -> pkg.sub.b -> pkg.a" in format_cycle(next(c for c in cycles if len(c) == 2
                                                                and c[0].source == "pkg.a"))
