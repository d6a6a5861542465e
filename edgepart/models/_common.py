"""Shared building blocks and the deterministic weight initialisation of the zoo."""
from __future__ import annotations

import torch
from torch import nn

RESIDUAL_BN_GAIN = 0.35


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + activation (``act=None`` for none)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1,
                 act: nn.Module | None = None, eps: float = 1e-5):
        if padding is None:
            padding = k // 2
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if act is not None:
            layers.append(act)
        super().__init__(*layers)


def init_weights(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """(Re)initialise every parameter and buffer of ``model`` from ``generator``.

    The walk order is ``model.named_modules()`` order, so the result is a pure
    function of the architecture and the generator's seed.

    * Conv2d: kaiming-normal with ``mode="fan_in"`` (fan_in = in/groups*kh*kw).
      fan_in rather than fan_out keeps the variance of depthwise convolutions
      (MobileNetV2) from collapsing, since eval-mode BatchNorm with random
      statistics does not renormalise activations.  Bias N(0, 0.01).
    * Linear: N(0, 0.01) weights, zero bias.
    * BatchNorm2d: weight U(0.5, 1.5), bias N(0, 0.1), running_mean N(0, 0.1),
      running_var U(0.5, 1.5), so BN is never an identity.
    * Residual blocks that name their last BatchNorm in a class attribute
      ``_residual_bn`` get that BN's weight multiplied by ``RESIDUAL_BN_GAIN``
      (a mild version of "zero-init residual"): eval-mode BN with random
      statistics does not renormalise, so without it every residual add
      roughly doubles the activation variance (ResNet-50 logits ~1e4).

    Raises ``TypeError`` on a module type with parameters that it does not
    know, so no tensor is ever left uninitialised (models are built on the
    meta device and materialised with ``to_empty``).
    """
    g = generator
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.01, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.num_batches_tracked.zero_()
            elif any(True for _ in m.parameters(recurse=False)) or any(
                    True for _ in m.buffers(recurse=False)):
                raise TypeError(f"init_weights: no rule for {type(m).__name__} at {name!r}")
        for m in model.modules():
            bn_name = getattr(type(m), "_residual_bn", None)
            if bn_name is not None:
                getattr(m, bn_name).weight.mul_(RESIDUAL_BN_GAIN)
    return model

