"""A small 4-level U-Net (3 down-samplings, base width 16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ConvBNAct


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(ConvBNAct(cin, cout, 3, act=nn.ReLU()),
                         ConvBNAct(cout, cout, 3, act=nn.ReLU()))


class UNet(nn.Module):
    """Input H and W must be multiples of 8 (= 2 ** number of down-samplings)."""

    def __init__(self, n_classes: int = 2, base: int = 16):
        super().__init__()
        b = base
        self.enc1 = DoubleConv(3, b)
        self.enc2 = DoubleConv(b, 2 * b)
        self.enc3 = DoubleConv(2 * b, 4 * b)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(4 * b, 8 * b)
        self.up3 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec3 = DoubleConv(8 * b + 4 * b, 4 * b)
        self.dec2 = DoubleConv(4 * b + 2 * b, 2 * b)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = DoubleConv(2 * b + b, b)
        self.head = nn.Conv2d(b, n_classes, 1)

    def forward(self, x):
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        x = self.bottleneck(self.pool(s3))
        x = self.dec3(torch.cat([s3, self.up3(x)], dim=1))
        x = self.dec2(torch.cat([s2, F.interpolate(x, scale_factor=2, mode="nearest")], dim=1))
        x = self.dec1(torch.cat([s1, self.up1(x)], dim=1))
        return self.head(x)
