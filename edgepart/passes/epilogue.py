"""Pass: which batch norms and one-input pointwise ops are a convolution's *epilogue*.

A node is the epilogue of convolution ``c`` when it reads nothing but the output of ``c`` — or of a
batch norm that is itself ``c``'s epilogue — and is that tensor's only reader: conv → BN, conv →
act, conv → BN → act. A backend that computes such a chain as one kernel (ONNX Runtime: the exporter
folds an eval-mode BN into the convolution's weights, ORT fuses the activation into the convolution)
runs the epilogue at no cost of its own; which epilogues a backend fuses, and what that does to
their cost, is the cost model's rule (``compiler.cost.model.fused_into``). This pass records only
the structure, the same for every backend.

Writes ``node.meta["epilogue_of"]``: the convolution's node name, on epilogue nodes only.
"""
from __future__ import annotations

import torch.fx as fx

EPILOGUE = "epilogue_of"
_KINDS = ("batch_norm", "activation", "pointwise")


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a.op != "get_attr" and a.meta.get("shape") is not None]


def annotate_epilogues(gm: fx.GraphModule) -> fx.GraphModule:
    """Mark every convolution epilogue (see the module docstring) with the convolution it follows."""
    for n in gm.graph.nodes:
        n.meta.pop(EPILOGUE, None)
        spec = n.meta.get("op")
        if spec is None or spec.kind not in _KINDS:
            continue
        inputs = _tensor_inputs(n)
        if len(inputs) != 1 or len(inputs[0].users) != 1:
            continue
        p = inputs[0]
        pspec = p.meta.get("op")
        if pspec is None:
            continue
        if pspec.kind == "conv2d":
            n.meta[EPILOGUE] = p.name
        elif pspec.kind == "batch_norm" and spec.kind != "batch_norm" and p.meta.get(EPILOGUE):
            n.meta[EPILOGUE] = p.meta[EPILOGUE]
    return gm
