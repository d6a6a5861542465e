"""Human-readable views of a bundle's plan (``edgepart inspect``)."""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from edgepart.ir.manifest import Manifest


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def choice_lines(plan: dict) -> list[str]:
    """How a plan was chosen, from its dict (``Plan.to_dict``, ``manifest["plan"]``): the winning
    candidate, and every candidate the strategy compared with its predicted latency or error. No lines
    for a plan not made by a strategy, or saved before plans recorded their choice."""
    chosen = plan.get("chosen")
    if not chosen:
        return []
    candidates = plan.get("candidates") or []
    if not candidates:
        return [f"chosen: {chosen}"]
    parts = [f"{c['name']} failed ({c['error']})" if c.get("error") else f"{c['name']} {c['latency'] * 1e3:.3f} ms"
             for c in candidates]
    return [f"chosen: {chosen}, the fastest of {len(candidates)} candidates", "candidates: " + ", ".join(parts)]


def stage_rows(manifest: Manifest) -> list[dict]:
    """Per stage: kind, devices with their rows, MACs, bytes received by the stage."""
    costs = manifest.node_costs
    moved: dict[int, int] = {}
    for t in manifest.transfers:
        moved[t.stage] = moved.get(t.stage, 0) + t.nbytes
    out = []
    for i, st in enumerate(manifest.plan["stages"]):
        macs = sum(costs[n].macs for n in st["nodes"] if n in costs)
        if st["kind"] == "whole":
            where = st["device"]
        else:
            where = " ".join(f"{d}[{a}:{b})" for d, a, b in st["slices"])
        nodes = st["nodes"]
        label = nodes[0] if len(nodes) == 1 else f"{nodes[0]} … {nodes[-1]} ({len(nodes)})"
        out.append({"stage": i, "kind": st["kind"], "nodes": label, "devices": where, "macs": macs,
                    "bytes_in": moved.get(i, 0)})
    return out


def plan_table(manifest: Manifest) -> str:
    table = Table(title=f"{manifest.model}: plan '{manifest.plan.get('strategy')}' on "
                        f"{len(manifest.cluster['devices'])} devices (source {manifest.source_device})")
    for col in ("stage", "kind", "nodes", "devices / rows", "MMACs", "bytes in"):
        table.add_column(col, justify="right" if col in ("stage", "MMACs", "bytes in") else "left")
    for r in stage_rows(manifest):
        table.add_row(str(r["stage"]), r["kind"], r["nodes"], r["devices"], f"{r['macs'] / 1e6:.1f}",
                      fmt_bytes(r["bytes_in"]))
    final = sum(t.nbytes for t in manifest.transfers if t.stage == manifest.stage_count)
    total = sum(t.nbytes for t in manifest.transfers)
    buf = io.StringIO()
    console = Console(file=buf, width=140, force_terminal=False)
    console.print(table)
    rep = manifest.report
    console.print(f"total {rep.get('macs', 0) / 1e9:.3f} GMACs; {len(manifest.transfers)} transfers, "
                  f"{fmt_bytes(total)} moved ({fmt_bytes(final)} to return the output)")
    for line in choice_lines(manifest.plan):
        console.print(line, highlight=False, markup=False)   # errors may hold "[a, b)"
    for u in rep.get("unknown_ops", []):
        console.print(f"note: {u['node']} ({u['op']}) is not known to edgepart: runs whole on one device")
    return buf.getvalue()
