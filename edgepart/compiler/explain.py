"""Explain a plan: per stage its devices, rows, compute and transfer times, and the critical path;
and a Gantt chart of the simulated schedule.

    from edgepart.compiler.explain import explain, gantt
    print(explain(bundle))                      # a freshly compiled bundle (has .graph, .schedule)
    gantt(bundle, None, "plan.png")

Times come from the simulator (edgepart.compiler.cost.simulator), i.e. from the one cost model.
"""
from __future__ import annotations

import io

from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.cost.simulator import SimResult, simulate
from edgepart.compiler.inspect import choice_lines, fmt_bytes


def _resolve(obj, cluster: Cluster | None, gm=None):
    """(schedule, cluster, gm) from a fresh Bundle or a Schedule (then gm= is needed)."""
    if hasattr(obj, "schedule") and hasattr(obj, "manifest"):
        if obj.schedule is None or obj.graph is None:
            raise ValueError("explain needs a freshly compiled bundle (edgepart.compile), not a loaded one")
        return obj.schedule, cluster or obj.cluster, obj.graph
    if cluster is None or gm is None:
        raise ValueError("explain(schedule, cluster, gm=...) needs the cluster and the analysed graph")
    return obj, cluster, gm


def _fmt_t(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def explain(bundle_or_schedule, cluster: Cluster | None = None, gm=None, cost: CostModel | None = None,
            sim: SimResult | None = None) -> str:
    """A text report: latency; per stage the devices with their rows, compute time, bytes and time of
    the transfers it receives, start/end; per device compute and idle; the critical path."""
    schedule, cluster, gm = _resolve(bundle_or_schedule, cluster, gm)
    cost = cost or CostModel(cluster)
    sim = sim or simulate(schedule, cluster, cost, gm=gm)
    plan = schedule.plan
    out = io.StringIO()
    w = out.write
    w(f"plan '{plan.strategy}': {len(plan.stages)} stages on {len(plan.devices())} of {len(cluster)} devices; "
      f"source {schedule.source}; {'shared medium' if cluster.shared_medium else 'switched links'}\n")
    for line in choice_lines(plan.to_dict()):
        w(line + "\n")
    w(f"predicted latency {_fmt_t(sim.latency)}; {len(sim.transfers)} transfers, "
      f"{fmt_bytes(sum(t.nbytes for t in sim.transfers))} moved\n\n")
    runs = {(r.stage, r.device): r for r in sim.runs}
    nodes_meta = {n.name: n for n in gm.graph.nodes}
    by_stage: dict[int, list] = {}
    for t in sim.transfers:
        by_stage.setdefault(t.stage, []).append(t)
    for si, st in enumerate(plan.stages):
        nodes = st.nodes
        label = nodes[0] if len(nodes) == 1 else f"{nodes[0]} … {nodes[-1]} ({len(nodes)} nodes)"
        ins = by_stage.get(si, [])
        w(f"stage {si} [{st.kind}] {label}\n")
        if ins:
            w(f"  receives {len(ins)} pieces, {fmt_bytes(sum(t.nbytes for t in ins))}, "
              f"network time {_fmt_t(sum(t.arrival - t.start for t in ins))}\n")
        devs = [(st.device, 0, None)] if st.kind == "whole" else st.slices
        for d, a, b in devs:
            r = runs.get((si, d))
            if r is None:
                continue
            anchor = nodes[-1] if st.kind == "split" else None
            rows = f"rows [{a}, {b}) of {anchor}" if anchor else "whole"
            halo = ""
            if st.kind == "split":
                R = nodes_meta[anchor].meta["rows"]
                computed = sum(e[1] - e[0] for e in r.rows.values())
                share = sum(nodes_meta[n].meta["rows"] * (b - a) / R for n in r.rows)
                halo = f" (+{100 * (computed / max(share, 1e-9) - 1):.0f}% halo rows)"
            w(f"  {d:>8s}: {rows}{halo}; compute {_fmt_t(r.end - r.start)}, "
              f"{_fmt_t(r.start)} → {_fmt_t(r.end)}\n")
    final = by_stage.get(len(plan.stages), [])
    if final:
        w(f"output to {schedule.source}: {len(final)} pieces, {fmt_bytes(sum(t.nbytes for t in final))}, "
          f"arrives {_fmt_t(max(t.arrival for t in final))}\n")
    w("\ndevices:\n")
    for d, v in sim.devices.items():
        if v["compute"] == 0 and v["sent_bytes"] == 0:
            continue
        w(f"  {d:>8s}: compute {_fmt_t(v['compute'])} ({100 * v['compute'] / max(sim.latency, 1e-12):.0f}%), "
          f"idle {_fmt_t(v['idle'])}, sent {fmt_bytes(v['sent_bytes'])} in {_fmt_t(v['send_time'])}\n")
    w("\ncritical path:\n")
    for p in sim.critical_path:
        if p["kind"] == "run":
            w(f"  {_fmt_t(p['start']):>12s} → {_fmt_t(p['end']):>12s}  run   stage {p['stage']} on {p['device']}\n")
        else:
            q = f" (queued {_fmt_t(p['queued'])})" if p["queued"] > 0 else ""
            w(f"  {_fmt_t(p['start']):>12s} → {_fmt_t(p['end']):>12s}  send  {p['tensor']} rows "
              f"[{p['rows'][0]}, {p['rows'][1]}) {p['src']}→{p['dst']} {fmt_bytes(p['nbytes'])}{q}\n")
    return out.getvalue()


def gantt(bundle_or_schedule, cluster: Cluster | None, path, gm=None, cost: CostModel | None = None,
          sim: SimResult | None = None) -> str:
    """Draw the simulated schedule: one lane per device (compute bars labelled by stage) and one lane
    per sending NIC (transfer bars); the critical path outlined. Writes ``path`` (PNG/SVG/PDF)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule, cluster, gm = _resolve(bundle_or_schedule, cluster, gm)
    cost = cost or CostModel(cluster)
    sim = sim or simulate(schedule, cluster, cost, gm=gm)
    devs = [d for d in cluster.names if d in schedule.actions]
    lanes = {}
    for d in devs:
        lanes[("cpu", d)] = len(lanes)
        lanes[("net", d)] = len(lanes)
    crit_runs = {(p["device"], p["stage"]) for p in sim.critical_path if p["kind"] == "run"}
    crit_tr = {(p["src"], p["dst"], p["tensor"], *p["rows"]) for p in sim.critical_path if p["kind"] == "transfer"}
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(lanes) + 1.5))
    scale = 1e3
    for r in sim.runs:
        if r.end <= r.start:
            continue
        y = lanes[("cpu", r.device)]
        crit = (r.device, r.stage) in crit_runs
        ax.barh(y, (r.end - r.start) * scale, left=r.start * scale, height=0.8, color=cmap(r.stage % 20),
                edgecolor="black" if crit else "none", linewidth=1.2 if crit else 0)
        if (r.end - r.start) > 0.04 * max(sim.latency, 1e-12):
            ax.text((r.start + r.end) / 2 * scale, y, f"s{r.stage}", ha="center", va="center", fontsize=6)
    for t in sim.transfers:
        y = lanes[("net", t.src)]
        crit = (t.src, t.dst, t.tensor, t.a, t.b) in crit_tr
        ax.barh(y, (t.arrival - t.start) * scale, left=t.start * scale, height=0.5,
                color="tab:red" if crit else "tab:gray", alpha=0.8)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{d} {'compute' if k == 'cpu' else 'send'}" for k, d in lanes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(f"plan '{schedule.plan.strategy}': predicted {sim.latency * 1e3:.2f} ms "
                 "(outlined / red: critical path)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
