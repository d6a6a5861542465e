"""Layers timed in context: the harness's :class:`~edgepart.fcpm.harness.Stage` units for a traced
network (every node, after its real predecessor) and for a chain of row slices (each layer computing
the rows the next one needs, as a split stage's device does).

A layer's time inside its stage is not its time alone: alone and repeated, its weights and input
sit in cache and the previous call left the core in the state it needs; inside the stage it
follows another layer (a ReLU right after a large convolution took 5× its warm time, issue #20).
The planner costs stages, so the FCPM's in-network part is fitted on these timings
(:meth:`edgepart.fcpm.model.DeviceProfile.fit_context`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.node import map_arg

from edgepart.fcpm.features import clean_info
from edgepart.fcpm.harness import Stage
from edgepart.fcpm.ops import Runner, family, geometry
from edgepart.passes.graph import COMPUTE_OPS
from edgepart.passes.info import node_info


def _nbytes(module: torch.nn.Module, x) -> int:
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    n += sum(b.numel() * b.element_size() for b in module.buffers())
    return int(n + (x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0))


def timed_nodes(gm) -> list:
    """The nodes of an analysed graph a stage times: compute nodes that are not views (flatten, size, ...)."""
    return [n for n in gm.graph.nodes if n.op in COMPUTE_OPS and family(clean_info(node_info(n))) != "trivial"]


def graph_stage(gm, inputs: tuple, prefix: Any, total: bool = True) -> tuple[Stage, dict]:
    """A :class:`Stage` running the analysed graph ``gm`` node by node on ``inputs``, a timer around each
    compute node that is not a view. Keys ``(prefix, node name)``; the whole pass under ``(prefix, "total")``
    (if ``total``). Returns (stage, {key: node info})."""
    nodes = list(gm.graph.nodes)
    timed = {n.name for n in timed_nodes(gm)}
    keys = [(prefix, n.name) for n in nodes if n.name in timed]
    infos = {(prefix, n.name): clean_info(node_info(n)) for n in nodes if n.name in timed}

    last_use: dict[str, str] = {}          # value -> the last node reading it: freed after that node, as the runtime does
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a.name] = n.name
    frees: dict[str, list[str]] = {}
    for v, n in last_use.items():
        frees.setdefault(n, []).append(v)

    def make():
        steps = []
        it = iter(inputs)
        for n in nodes:
            if n.op == "placeholder":
                v = next(it)
                steps.append((n.name, None, lambda env, v=v: (lambda: v, (), {})))
            elif n.op == "get_attr":
                obj = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                steps.append((n.name, None, lambda env, obj=obj: (lambda: obj, (), {})))
            elif n.op == "output":
                continue
            else:
                kwargs = dict(n.kwargs)
                if n.op == "call_module":
                    mod = gm.get_submodule(str(n.target))
                    if getattr(mod, "inplace", False):
                        mod.inplace = False        # device code never computes in place (codegen turns it off)
                    fn = mod.forward               # a function call per node, as device code makes, not Module.__call__
                elif n.op == "call_function":
                    fn = n.target
                    if kwargs.get("inplace"):
                        kwargs["inplace"] = False
                else:   # call_method
                    fn = (lambda name: lambda self, *a, **k: getattr(self, name)(*a, **k))(str(n.target))
                key = (prefix, n.name) if n.name in timed else None

                def prep(env, fn=fn, args=n.args, kwargs=kwargs, dead=tuple(frees.get(n.name, ()))):
                    call = (fn, map_arg(args, lambda a: env[a.name]), map_arg(kwargs, lambda a: env[a.name]))
                    for v in dead:              # their last reader is this node: the allocator may reuse them
                        env.pop(v, None)
                    return call
                steps.append((n.name, key, prep))
        return steps, None
    names = [k[1] for k in keys]
    stage = Stage(keys, make, nbytes=_nbytes(gm, inputs[0] if inputs else None),
                  total_key=(prefix, "total") if total else None, names=names)
    return stage, infos


def _bytes_of(node) -> float:
    shape = node.meta.get("shape")
    return 4.0 * math.prod(shape) if shape else 0.0


def stage_reuse(gm) -> dict[str, list[list]]:
    """Where each timed node's inputs are when a stage runs the graph ``gm`` in order, request after request:
    {node name: [[input bytes, bytes touched since that input was written, the writer's op type], ...]}, one
    entry per tensor input (writer None: the stage's input).

    *Bytes touched* counts what every compute node in between wrote (its output) and read of its own
    (its weights); a view passes on its producer's data. The input a node's predecessor just wrote has
    distance 0; a residual branch's input has the bytes of the branch in between; the stage's input
    (and a weight-like ``get_attr``) was last touched one whole run ago (the bytes of the whole stage).
    What the distance means for cache hits depends on the cache's size: :func:`~edgepart.fcpm.model
    .sequence_terms` compares it with the profile's L2."""
    nodes = list(gm.graph.nodes)
    timed = {n.name for n in timed_nodes(gm)}
    origin: dict[str, str | None] = {}     # value -> the compute node that wrote its data (None: stage input)
    pos: dict[str | None, float] = {}      # compute node -> bytes touched when it finished
    cum = 0.0
    weights = {}
    for n in nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            weights[n.name] = 4.0 * sum(p.numel() for p in mod.parameters()) + \
                4.0 * sum(b.numel() for b in mod.buffers())
    for n in nodes:
        if n.op in ("placeholder", "get_attr"):
            origin[n.name] = None
        elif n.name in timed:
            origin[n.name] = n.name
            cum += _bytes_of(n) + weights.get(n.name, 0.0)
            pos[n.name] = cum
        elif n.op != "output":
            ins = [a for a in n.all_input_nodes if a.name in origin]
            origin[n.name] = origin[ins[0].name] if ins else None
    total = cum
    fam = {n.name: family(clean_info(node_info(n))) for n in nodes if n.name in timed}
    out: dict[str, list[list]] = {}
    cum = 0.0
    for n in nodes:
        if n.name not in timed:
            continue
        entries = []
        for a in n.all_input_nodes:
            if a.meta.get("shape") is None or a.op == "get_attr":
                continue
            src = origin.get(a.name)
            dist = total if src is None or src not in pos else cum - pos[src]
            entries.append([_bytes_of(a), max(0.0, dist), fam.get(src)])
        out[n.name] = entries
        cum = pos[n.name]
    return out


def with_reuse(gm) -> dict[str, dict]:
    """{node name: its JSON-safe info with ``"reuse"`` (:func:`stage_reuse`)} for the timed nodes of ``gm``: the
    infos the in-context model is fitted on and predicts for."""
    reuse = stage_reuse(gm)
    nodes = timed_nodes(gm)
    total = stage_bytes(gm)
    return {n.name: dict(clean_info(node_info(n)), reuse=reuse[n.name], stage_bytes=total) for n in nodes}


def stage_bytes(gm) -> float:
    """Bytes a run of the stage ``gm`` touches: its timed nodes' outputs and weights (what comes between two
    uses of a layer's weights when the stage runs request after request)."""
    total = 0.0
    for n in timed_nodes(gm):
        total += _bytes_of(n)
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            total += 4.0 * (sum(p.numel() for p in mod.parameters()) + sum(b.numel() for b in mod.buffers()))
    return total


def chain_reuse(infos: list[dict], rows: list[int]) -> list[dict]:
    """The infos of a chain of row slices (:func:`chain_stage`, ``rows`` per layer) with ``"reuse"``: each layer
    reads what the previous one just wrote (distance 0); the first reads the stage's input, last touched a
    whole run ago."""
    out, prev = [], None
    total = sum(4.0 * (geometry(i, r).out_elems + geometry(i, r).weight_elems) for i, r in zip(infos, rows))
    for info, r in zip(infos, rows):
        b = 4.0 * geometry(info, r).in_elems
        out.append(dict(info, reuse=[[b, total if prev is None else 0.0, prev]], stage_bytes=total))
        prev = family(info)
    return out


def chain_rows(infos: list[dict], rows_out: int) -> list[int]:
    """Rows each layer of a chain computes so that the last one yields ``rows_out`` rows (halos included)."""
    rows = [rows_out]
    for info in reversed(infos[1:]):
        g = geometry(info, rows[0])
        need = g.in_rows if g.family in ("conv", "dwconv", "maxpool", "avgpool", "upsample") else g.rows
        prev_total = info["in_shape"][2] if info.get("in_shape") else g.rows
        rows.insert(0, max(1, min(need, prev_total)))
    return rows


def _fit(x: torch.Tensor, want: tuple) -> torch.Tensor:
    """The previous layer's output shaped as the next runner's input (rows cut or zero-padded)."""
    if x.shape[2] > want[2]:
        return x[:, :, : want[2]]
    if x.shape[2] < want[2]:
        return F.pad(x, (0, 0, 0, want[2] - x.shape[2]))
    return x


def chain_stage(infos: list[dict], rows_out: int, prefix: Any, seed: int = 0) -> tuple[Stage, list[int]]:
    """A :class:`Stage` computing ``rows_out`` rows of the last of a chain of row-local layers, each layer
    on the rows the next needs (its :class:`~edgepart.fcpm.ops.Runner`: explicit border padding, halo
    rows, as device code runs a slice). Keys ``(prefix, i)`` per layer and ``(prefix, "total")``.
    Returns (stage, rows per layer)."""
    rows = chain_rows(infos, rows_out)
    keys = [(prefix, i) for i in range(len(infos))]
    nbytes = 0
    for info, r in zip(infos, rows):
        g = geometry(info, r)
        nbytes += int(4 * (g.weight_elems + g.in_elems + g.out_elems))

    def make():
        runners = [Runner(info, r, seed=seed + i) for i, (info, r) in enumerate(zip(infos, rows))]
        steps = []
        for i, rn in enumerate(runners):
            want = tuple(rn.input_shape())
            prev = f"l{i - 1}" if i else None

            def prep(env, rn=rn, want=want, prev=prev, first=(i == 0)):
                x = env.pop(prev, None) if not first else None     # read once: freed for reuse, as the runtime does
                if x is None or not isinstance(x, torch.Tensor) or x.dim() != 4 or len(want) != 4 \
                        or x.shape[1] != want[1] or x.shape[3] != want[3]:
                    x = rn._x
                else:
                    x = _fit(x, want)
                return rn.call, (x,), {}
            steps.append((f"l{i}", keys[i], prep))
        return steps, None
    names = [f"{i}:{info.get('label') or info.get('kind')}" for i, info in enumerate(infos)]
    return Stage(keys, make, nbytes=nbytes, total_key=(prefix, "total"), names=names), rows


def model_bytes_estimate(infos: list[dict]) -> int:
    """About how many bytes a network of these nodes holds (weights and outputs), for chunking."""
    return int(sum(4 * (geometry(i).weight_elems + geometry(i).out_elems) for i in infos)) or 1



