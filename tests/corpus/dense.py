"""Dense-prediction networks written from their papers: DeepLabV3 (dilated backbone, ASPP with an
image-pooling branch, a segmentation head interpolated back to the input size) and an FPN
(lateral 1x1 convolutions, top-down nearest upsampling + add, 3x3 smoothing, a strided-pool level).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tests.corpus.mobile import conv_bn_act


class DilatedBlock(nn.Module):
    """A ResNet basic block whose 3x3 convolutions are dilated instead of strided (Yu & Koltun, 2016):
    DeepLab keeps the feature map at output stride 8 or 16 this way."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride, dilation=dilation)
        self.conv2 = conv_bn_act(cout, cout, 3, 1, dilation=dilation, act=None)
        self.down = None if stride == 1 and cin == cout else conv_bn_act(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ASPPPooling(nn.Sequential):
    """The image-level branch of ASPP: global average pool, 1x1 conv, BN, ReLU, upsampled back."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (2017): parallel 1x1 and
    dilated 3x3 convolutions plus image pooling, concatenated and projected."""

    def __init__(self, cin: int, rates=(2, 4, 6), cout: int = 32):
        super().__init__()
        branches = [conv_bn_act(cin, cout, 1)] + [conv_bn_act(cin, cout, 3, dilation=r) for r in rates]
        self.convs = nn.ModuleList(branches + [ASPPPooling(cin, cout)])
        self.project = nn.Sequential(conv_bn_act(cout * len(self.convs), cout, 1), nn.Dropout(0.5))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabV3Tiny(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn_act(3, 16, 3, 2), DilatedBlock(16, 24, 2), DilatedBlock(24, 32, 1, 2),
                                      DilatedBlock(32, 32, 1, 4))
        self.head = nn.Sequential(ASPP(32), conv_bn_act(32, 32, 3), nn.Conv2d(32, classes, 1))

    def forward(self, x):
        size = x.shape[-2:]
        out = self.head(self.backbone(x))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


class FPNTiny(nn.Module):
    """Lin et al., "Feature Pyramid Networks for Object Detection" (2017) over a small strided backbone;
    returns the pyramid as an ordered dict, as torchvision's FeaturePyramidNetwork does."""

    def __init__(self, width: int = 24):
        super().__init__()
        chans = [16, 24, 32, 48]
        self.stem = conv_bn_act(3, 16, 3, 2)
        self.body = nn.ModuleList([DilatedBlock(a, b, 2) for a, b in zip([16] + chans[:-1], chans)])
        self.inner = nn.ModuleList([nn.Conv2d(c, width, 1) for c in chans])
        self.layer = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in chans])

    def forward(self, x):
        feats, x = [], self.stem(x)
        for block in self.body:
            x = block(x)
            feats.append(x)
        last = self.inner[-1](feats[-1])
        results = [self.layer[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner[i](feats[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer[i](last))
        results.append(F.max_pool2d(results[-1], 1, 2, 0))
        return OrderedDict((f"p{i + 2}", r) for i, r in enumerate(results))
