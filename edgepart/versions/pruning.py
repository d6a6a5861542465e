"""Structured channel pruning with torch-pruning, and rebuilding the result as a plain module.

:func:`prune` keeps ``scale`` of the channels of every prunable layer: torch-pruning's dependency
graph groups the channels that must go together (a residual add ties a stage's outputs; a depthwise
conv ties its input and output to the expansion conv before it) and ranks each group by the L2
magnitude of its weights (``MagnitudeImportance``); the classifier's outputs are kept. The model is
thinned in place; its architecture spec (``model.spec()``, edgepart.models.compact) then describes a
plain module with the same shapes, which :func:`rebuild` constructs and fills with the weights.
torch-pruning is enough for these three architectures; nothing here re-implements it.
"""
from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from edgepart.models.compact import from_spec


def _classifier(model: nn.Module) -> nn.Linear:
    """The last Linear: its outputs are the classes, which are never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune(model: nn.Module, scale: float, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with ``scale`` (0 < scale <= 1) of each layer's channels kept, chosen by weight
    magnitude; ``model`` itself is not changed. Scale 1.0 returns an unpruned copy."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale {scale} is not in (0, 1]")
    model = copy.deepcopy(model).eval()
    if scale == 1.0:
        return model
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=1.0 - scale, ignored_layers=[_classifier(model)])
    pruner.step()
    return model


def rebuild(spec: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The plain module ``spec`` describes with ``state`` loaded (strict: every tensor, matching shapes).
    Built on the meta device and given the loaded tensors: no initialisation, the global RNG untouched."""
    with torch.device("meta"):
        model = from_spec(spec)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
