"""YOLOv2-tiny (VOC: 5 anchors x (5 + 20 classes) = 125 output channels) trunk + head."""
from __future__ import annotations

from torch import nn

from ._common import ConvBNAct


def _conv(cin: int, cout: int) -> nn.Module:
    return ConvBNAct(cin, cout, 3, act=nn.LeakyReLU(0.1))


class YOLOv2Tiny(nn.Module):
    def __init__(self, num_anchors: int = 5, num_classes: int = 20):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (16, 32, 64, 128, 256):
            layers += [_conv(cin, cout), nn.MaxPool2d(2, 2)]
            cin = cout
        layers += [
            _conv(256, 512),
            nn.ZeroPad2d((0, 1, 0, 1)),   # darknet's "size=2 stride=1" maxpool
            nn.MaxPool2d(2, 1),
            _conv(512, 1024),
            _conv(1024, 1024),
            nn.Conv2d(1024, num_anchors * (5 + num_classes), 1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
