"""Real-world blocks written from their papers (issue #21): models edgepart's zoo does not hold.

``CORPUS`` maps a name to (factory, input side); :func:`get` returns the model in eval mode with
deterministic random weights (batch-norm statistics included, so no normalisation is an identity)
and one input of shape (1, 3, side, side).
"""
from __future__ import annotations

import torch
from torch import nn

from tests.corpus.dense import DeepLabV3Tiny, FPNTiny
from tests.corpus.mobile import EfficientNetTiny, MobileNetV3Tiny, ShuffleNetV2Tiny, SqueezeNetTiny
from tests.corpus.transformers import ConvNeXtTiny, SwinTiny, ViTTiny

CORPUS = {   # name -> (factory taking the input side, default side)
    "efficientnet": (lambda side: EfficientNetTiny(), 64),
    "mobilenet_v3": (lambda side: MobileNetV3Tiny(), 64),
    "shufflenet_v2": (lambda side: ShuffleNetV2Tiny(), 64),
    "squeezenet": (lambda side: SqueezeNetTiny(), 57),      # odd sizes: the ceil-mode pools keep a partial window
    "deeplab_v3": (lambda side: DeepLabV3Tiny(), 48),
    "fpn": (lambda side: FPNTiny(), 64),
    "convnext": (lambda side: ConvNeXtTiny(), 64),
    "swin": (lambda side: SwinTiny(), 64),
    "vit": (lambda side: ViTTiny(image_size=side), 64),     # the position embedding has one entry per patch
}


def get(name: str, seed: int = 0, side: int | None = None) -> tuple[nn.Module, tuple[torch.Tensor]]:
    factory, default_side = CORPUS[name]
    side = side or default_side
    torch.manual_seed(seed)
    model = factory(side)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
    return model.eval(), (torch.randn(1, 3, side, side, generator=g),)
