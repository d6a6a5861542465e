"""Discrete-event simulation of a Schedule: the latency of one inference as the runtime executes it.

The simulator executes exactly the per-device action lists of ``build_schedule``
(input / recv / run / send / output), with times from the one ``CostModel``:

- ``run`` of stage s on device d lasts Σ compute_time(node, d, b − a) over the
  rows [a, b) of every node d computes in that stage (halo rows included);
- ``send`` never blocks the device (the runtime sends asynchronously); the piece
  is queued on the network and occupies it for transfer_time(nbytes, src, dst)
  (per-message latency + bytes / bandwidth); it arrives at the end of that time;
- ``recv`` blocks the device until the piece has arrived;
- ``input`` and ``output`` take no time; latency = when ``output`` completes.

Network contention (documented choice):
- switched links (default): each device's **outgoing NIC** serialises the messages
  it sends, in the order it sends them (FIFO); a device receives any number of
  messages at once. Scatter from one device is therefore sequential, gather into
  one device is parallel (a full-duplex switch port of the receiver is assumed
  not to be the bottleneck).
- ``cluster.shared_medium`` (one Wi-Fi): every message of every device shares one
  medium, FIFO in the order messages become ready.

Events are processed in time order (the device with the earliest clock moves
next), so FIFO order on a queue is the order in which messages became ready.
Cost: O(actions · log devices); 64 devices and hundreds of stages take milliseconds.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from edgepart.cluster import Cluster
from edgepart.compiler.cost.model import CostModel
from edgepart.compiler.schedule import Schedule, build_schedule
from edgepart.ir.dtypes import DTYPES
from edgepart.ir.manifest import EmitOutput, NodeRows, Recv, Run, Send


@dataclass
class TransferTiming:
    tensor: str
    a: int
    b: int
    src: str
    dst: str
    nbytes: int
    stage: int
    ready: float      # when the sender issued the send
    start: float      # when the piece started to occupy the network
    arrival: float    # when it was fully received


@dataclass
class RunTiming:
    device: str
    stage: int
    start: float
    end: float
    rows: dict[str, tuple[int, int]]


@dataclass
class SimResult:
    latency: float
    devices: dict[str, dict[str, float]]        # dev -> busy, compute, idle, finish
    runs: list[RunTiming] = field(default_factory=list)
    transfers: list[TransferTiming] = field(default_factory=list)
    critical_path: list[dict] = field(default_factory=list)   # from input to output, each step with start/end

    def stage_times(self) -> dict[int, tuple[float, float]]:
        """stage -> (earliest start, latest end) over its devices."""
        out: dict[int, tuple[float, float]] = {}
        for r in self.runs:
            s, e = out.get(r.stage, (r.start, r.end))
            out[r.stage] = (min(s, r.start), max(e, r.end))
        return out

    def summary(self) -> dict:
        return {"latency_s": self.latency, "compute_s": {d: v["compute"] for d, v in self.devices.items()},
                "bytes_moved": sum(t.nbytes for t in self.transfers), "transfers": len(self.transfers)}


def stage_compute_time(cost: CostModel, nodes: dict[str, fx.Node], device: str, table: dict[str, NodeRows],
                       io_bytes: float = 0.0, weight_bytes: float = 0.0) -> float:
    """Compute time of one device's part of one stage (its rows of each node, halo included),
    with the cost of starting the stage, of its ``io_bytes`` (:func:`stage_io_bytes`) crossing its
    boundary (:meth:`CostModel.stage_io_time`) and of the ``weight_bytes`` its layers read
    (:meth:`CostModel.stage_weights_time`)."""
    total = 0.0
    for name, entry in table.items():
        a, b = entry.out
        if b > a:
            total += cost.compute_time(nodes[name], device, b - a, stage=table)
    if total <= 0:
        return 0.0
    return (total + cost.stage_start_time(device) + cost.stage_io_time(device, io_bytes)
            + cost.stage_weights_time(device, weight_bytes))


def param_bytes(gm: fx.GraphModule, node: fx.Node) -> int:
    """Bytes of the weights ``node`` reads: its module's parameters and buffers, and get_attr inputs."""
    total = 0
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for t in list(mod.parameters()) + list(mod.buffers()):
            total += t.numel() * t.element_size()
    for p in node.all_input_nodes:
        if p.op == "get_attr":
            total += p.meta["bytes"]
    return total


def stage_weight_bytes(gm: fx.GraphModule, schedule: Schedule) -> dict[tuple[str, int], float]:
    """(device, stage) -> bytes of the weights its nodes read (each slice of a node reads all of them)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return {(dev, si): float(sum(param_bytes(gm, nodes[n]) for n in table if n in nodes))
            for dev, stages in schedule.rows.items() for si, table in stages.items()}


def _bytes_per_row(spec) -> float:
    if spec is None or spec.shape is None:
        return 0.0
    n = torch.empty((), dtype=DTYPES.get(spec.dtype, torch.float32)).element_size()
    for d in spec.shape:
        n *= d
    return n / max(1, spec.rows)


def stage_io_bytes(schedule: Schedule) -> dict[tuple[str, int], float]:
    """(device, stage) -> bytes the stage reads from outside it plus bytes it leaves for after it.

    Read: the union of the windows of every producer its nodes read that it does not compute (a
    constant excepted). Left: the rows of each node it computes that the device reads in another stage,
    sends, or that nothing reads (the model's output). The same sets as an exported stage graph's
    inputs and outputs (runtime.ort.stage_io), without the manifest the schedule becomes."""
    bpr = {name: _bytes_per_row(spec) for name, spec in schedule.tensors.items()}
    read_anywhere: set[str] = set()
    for stages in schedule.rows.values():
        for table in stages.values():
            for entry in table.values():
                read_anywhere.update(entry.inputs)
    out: dict[tuple[str, int], float] = {}
    for dev, stages in schedule.rows.items():
        constants = schedule.constants.get(dev, set())
        sent = {a.tensor for a in schedule.actions.get(dev, []) if isinstance(a, Send)}
        for si, table in stages.items():
            later = set(sent)
            for sj, other in stages.items():
                if sj != si:
                    for entry in other.values():
                        later.update(entry.inputs)
            windows: dict[str, tuple[int, int]] = {}
            for entry in table.values():
                for p, w in entry.inputs.items():
                    if p in table or p in constants or w.hi <= w.lo:
                        continue
                    lo, hi = windows.get(p, (w.lo, w.hi))
                    windows[p] = (min(lo, w.lo), max(hi, w.hi))
            nbytes = sum((hi - lo) * bpr.get(p, 0.0) for p, (lo, hi) in windows.items())
            for name, entry in table.items():
                a, b = entry.out
                if b > a and (name in later or name not in read_anywhere):
                    nbytes += (b - a) * bpr.get(name, 0.0)
            out[(dev, si)] = nbytes
    return out


def simulate(schedule: Schedule, cluster: Cluster, cost: CostModel | None = None,
             gm: fx.GraphModule | None = None, node_info: dict | None = None) -> SimResult:
    """Simulate ``schedule`` on ``cluster``. ``gm`` (the analysed graph) or ``node_info``
    (name -> node info dict, e.g. a manifest's node entries) gives the cost model its nodes."""
    cost = cost or CostModel(cluster)
    if gm is not None:
        nodes = {n.name: n for n in gm.graph.nodes}
    elif node_info is not None:
        nodes = dict(node_info)
    else:
        raise ValueError("simulate needs gm= (the analysed graph) or node_info=")
    shared = cluster.shared_medium
    actions = schedule.actions
    devs = list(actions)
    pc = {d: 0 for d in devs}
    clock = {d: 0.0 for d in devs}
    cause: dict[str, tuple | None] = {d: None for d in devs}       # what the device's clock last waited for
    compute = {d: 0.0 for d in devs}
    nic_free: dict[str, float] = {}
    nic_last: dict[str, int | None] = {}
    arrivals: dict[tuple, int] = {}          # message key -> index in timings
    waiting: dict[tuple, str] = {}           # message key -> device blocked on it
    timings: list[TransferTiming] = []
    tcause: list[tuple] = []                 # per transfer: ("run"/"nic"/..., ref)
    runs: list[RunTiming] = []
    rcause: list[tuple] = []
    latency = 0.0
    out_cause: tuple | None = None
    heap = [(0.0, i, d) for i, d in enumerate(devs)]
    heapq.heapify(heap)
    order = {d: i for i, d in enumerate(devs)}
    blocked: set[str] = set()
    nbytes_of = {(tr.tensor, tr.a, tr.b): tr.nbytes for tr in schedule.transfers}
    io_bytes = stage_io_bytes(schedule) if cost.charges_stage_io() else {}
    # the weights are known from the graph only (a manifest's node entries do not carry them)
    weight_bytes = stage_weight_bytes(gm, schedule) if gm is not None and cost.charges_stage_weights() else {}

    while heap:
        t, _, dev = heapq.heappop(heap)
        if dev in blocked or t != clock[dev]:
            continue
        acts = actions[dev]
        while pc[dev] < len(acts):
            act = acts[pc[dev]]
            if isinstance(act, Recv):
                key = (act.src, dev, act.tensor, act.a, act.b)
                if key not in arrivals:
                    waiting[key] = dev
                    blocked.add(dev)
                    break
                tt = timings[arrivals[key]]
                if tt.arrival > clock[dev]:
                    clock[dev] = tt.arrival
                    cause[dev] = ("transfer", arrivals[key])
                    pc[dev] += 1
                    heapq.heappush(heap, (clock[dev], order[dev], dev))   # keep global time order
                    break
            elif isinstance(act, Run):
                si = act.stage
                table = schedule.rows[dev][si]
                dur = stage_compute_time(cost, nodes, dev, table, io_bytes.get((dev, si), 0.0),
                                         weight_bytes.get((dev, si), 0.0))
                start = clock[dev]
                runs.append(RunTiming(dev, si, start, start + dur, {n: e.out for n, e in table.items()}))
                rcause.append(cause[dev])
                clock[dev] = start + dur
                compute[dev] += dur
                cause[dev] = ("run", len(runs) - 1)
                if dur > 0:
                    pc[dev] += 1
                    heapq.heappush(heap, (clock[dev], order[dev], dev))
                    break
            elif isinstance(act, Send):
                a, b, dst = act.a, act.b, act.dst
                nbytes = nbytes_of[(act.tensor, a, b)]
                q = "medium" if shared else dev
                ready = clock[dev]
                start = max(ready, nic_free.get(q, 0.0))
                dur = cost.transfer_time(nbytes, dev, dst)
                arrival = start + dur
                nic_free[q] = arrival
                key = (dev, dst, act.tensor, a, b)
                timings.append(TransferTiming(act.tensor, a, b, dev, dst, nbytes, -1, ready, start, arrival))
                if start > ready and nic_last.get(q) is not None:
                    tcause.append(("transfer", nic_last[q]))
                else:
                    tcause.append(cause[dev])
                nic_last[q] = len(timings) - 1
                arrivals[key] = len(timings) - 1
                if key in waiting:
                    w = waiting.pop(key)
                    blocked.discard(w)
                    heapq.heappush(heap, (clock[w], order[w], w))
            elif isinstance(act, EmitOutput):
                latency = clock[dev]
                out_cause = cause[dev]
            pc[dev] += 1
    stuck = [d for d in devs if pc[d] < len(actions[d])]
    if stuck:
        raise RuntimeError(f"simulation deadlock: devices {stuck} wait for messages never sent")
    stage_of = {(t.tensor, t.a, t.b, t.src, t.dst): t.stage for t in schedule.transfers}
    for tt in timings:
        tt.stage = stage_of.get((tt.tensor, tt.a, tt.b, tt.src, tt.dst), -1)
    finish = {d: clock[d] for d in devs}
    devices = {}
    for d in cluster.names:
        c = compute.get(d, 0.0)
        devices[d] = {"compute": c, "busy": c, "idle": max(0.0, latency - c) if d in compute else latency,
                      "finish": finish.get(d, 0.0),
                      "sent_bytes": float(sum(t.nbytes for t in timings if t.src == d)),
                      "send_time": sum(t.arrival - t.start for t in timings if t.src == d)}
    path = _critical_path(out_cause, runs, rcause, timings, tcause)
    return SimResult(latency, devices, runs, timings, path)


def _critical_path(out_cause, runs, rcause, timings, tcause) -> list[dict]:
    path = []
    c = out_cause
    seen = 0
    while c is not None and seen < 100000:
        kind, i = c
        if kind == "run":
            r = runs[i]
            path.append({"kind": "run", "device": r.device, "stage": r.stage, "start": r.start, "end": r.end})
            c = rcause[i]
        else:
            t = timings[i]
            path.append({"kind": "transfer", "src": t.src, "dst": t.dst, "tensor": t.tensor, "rows": (t.a, t.b),
                         "stage": t.stage, "nbytes": t.nbytes, "start": t.start, "end": t.arrival,
                         "queued": t.start - t.ready})
            c = tcause[i]
        seen += 1
    path.reverse()
    return path


def simulate_plan(gm: fx.GraphModule, plan, cluster: Cluster, cost: CostModel | None = None) -> SimResult:
    """build_schedule + simulate."""
    return simulate(build_schedule(gm, plan, cluster), cluster, cost, gm=gm)


def simulate_bundle(bundle, cost: CostModel | None = None) -> SimResult:
    """Simulate a compiled (fresh) bundle: its schedule on its cluster."""
    cluster = bundle.cluster
    if bundle.schedule is not None and bundle.graph is not None:
        return simulate(bundle.schedule, cluster, cost, gm=bundle.graph)
    raise ValueError("simulate_bundle needs a freshly compiled bundle (with .schedule and .graph)")
