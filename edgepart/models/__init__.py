"""The edgepart model zoo: well-known CNNs written with plain ``torch.nn``.

Every model is built with deterministic random weights (no pretrained
weights): ``get(name, input_size, seed)`` returns the same weights and the
same example input, bit for bit, for the same arguments, and never touches
the global torch RNG.  All models are ``torch.fx.symbolic_trace``-able.

>>> model, (x,) = get("tinynet")
>>> model(x).shape
torch.Size([1, 10])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ._common import init_weights
from .compact import MobileNetV2Small, ResNetSmall, VGGSmall
from .inception import GoogLeNet
from .mobilenet import MobileNetV2
from .resnet import resnet18, resnet50, se_resnet
from .tinynet import TinyNet
from .unet import UNet
from .vgg import VGG16, AlexNet
from .yolo import YOLOv2Tiny

__all__ = ["names", "get", "build", "default_input_size", "min_input_size",
           "input_multiple", "ModelSpec", "init_weights"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    default_input_size: int
    min_input_size: int
    input_multiple: int = 1     # H = W must be a multiple of this
    description: str = ""


_ZOO: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("vgg16", VGG16, 224, 32, 1, "VGG-16 (config D, no BN), ~15.5 GMACs at 224"),
    ModelSpec("alexnet", AlexNet, 224, 64, 1, "torchvision-style AlexNet"),
    ModelSpec("resnet18", resnet18, 224, 32, 1, "ResNet-18"),
    ModelSpec("resnet50", resnet50, 224, 32, 1, "ResNet-50 (v1.5), ~4.1 GMACs at 224"),
    ModelSpec("mobilenet_v2", MobileNetV2, 224, 32, 1, "MobileNetV2, width 1.0"),
    ModelSpec("inception", GoogLeNet, 224, 32, 1, "GoogLeNet / Inception-v1, no aux heads"),
    ModelSpec("yolov2_tiny", YOLOv2Tiny, 416, 32, 1, "YOLOv2-tiny (VOC head, 125 channels)"),
    ModelSpec("se_resnet", se_resnet, 224, 32, 1, "SE-ResNet-18"),
    ModelSpec("unet", UNet, 128, 32, 8, "small U-Net, base width 16, 2 classes"),
    ModelSpec("tinynet", TinyNet, 32, 16, 1, "tiny CNN with one residual add, 10 classes"),
    ModelSpec("vgg_small", VGGSmall, 32, 8, 1, "VGG-style, 6 convs 32-128 wide, 10 classes (digit images)"),
    ModelSpec("resnet_small", ResNetSmall, 32, 8, 1, "ResNet-8-style, widths 32-128, 10 classes (digit images)"),
    ModelSpec("mobilenet_v2_small", MobileNetV2Small, 32, 8, 1,
              "MobileNetV2-style, 7 inverted residuals, 10 classes (digit images)"),
]}


def names() -> list[str]:
    """The zoo's model names."""
    return list(_ZOO)


def _spec(name: str) -> ModelSpec:
    try:
        return _ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(_ZOO)}") from None


def default_input_size(name: str) -> int:
    """Default square input side (H = W) for ``name``."""
    return _spec(name).default_input_size


def min_input_size(name: str) -> int:
    """Smallest square input side that ``name`` accepts."""
    return _spec(name).min_input_size


def input_multiple(name: str) -> int:
    """The input side must be a multiple of this (1 = any size >= the minimum)."""
    return _spec(name).input_multiple


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` in eval mode with deterministic random weights from ``seed``."""
    spec = _spec(name)
    # Build on the meta device (no allocation, no use of the global RNG), then
    # materialise and initialise every tensor from a local generator.
    with torch.device("meta"):
        model = spec.factory()
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(int(seed))
    init_weights(model, gen)
    return model.eval()


def get(name: str, input_size: int | None = None, seed: int = 0
        ) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(model, (x,))``: ``model`` from :func:`build`, ``x`` of shape (1, 3, H, W).

    ``x`` ~ N(0, 1), deterministic in ``(seed, input_size)``.  Raises
    ``KeyError`` for an unknown name and ``ValueError`` if ``input_size`` is
    below :func:`min_input_size` or not a multiple of :func:`input_multiple`.
    """
    spec = _spec(name)
    size = spec.default_input_size if input_size is None else int(input_size)
    if size < spec.min_input_size:
        raise ValueError(f"{name}: input_size {size} is below the minimum {spec.min_input_size}")
    if size % spec.input_multiple:
        raise ValueError(f"{name}: input_size {size} must be a multiple of {spec.input_multiple}")
    model = build(name, seed)
    gen = torch.Generator().manual_seed(int(seed) + 0x5EED)
    x = torch.randn(1, 3, size, size, generator=gen)
    return model, (x,)
