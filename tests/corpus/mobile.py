"""Mobile CNNs written from their papers: EfficientNet's MBConv, MobileNetV3, ShuffleNetV2, SqueezeNet.

Small widths and depths (inputs of 32-64 px) — the blocks are what matters: squeeze-excite,
stochastic-depth residuals, inverted residuals with hardswish, channel split and shuffle, ceil-mode
pools.
"""
from __future__ import annotations

import torch
from torch import nn

from tests.corpus.ops import StochasticDepth


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU, dilation: int = 1):
    layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation=dilation, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Hu et al., "Squeeze-and-Excitation Networks" (2018), with 1x1 convolutions as torchvision has it:
    scale = gate(fc2(act(fc1(avgpool(x))))); return x * scale."""

    def __init__(self, channels: int, squeeze: int, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """Tan & Le, "EfficientNet" (2019): expand 1x1, depthwise kxk, squeeze-excite (input channels / 4),
    project 1x1; a stochastic-depth residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, drop: float):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [conv_bn_act(cin, mid, 1, act=nn.SiLU)]
        layers += [conv_bn_act(mid, mid, k, stride, groups=mid, act=nn.SiLU),
                   SqueezeExcitation(mid, max(1, cin // 4), act=nn.SiLU),
                   conv_bn_act(mid, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop, "row")

    def forward(self, x):
        out = self.block(x)
        if self.use_res:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetTiny(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        cfg = [(16, 16, 1, 3, 1), (16, 24, 4, 3, 2), (24, 24, 4, 3, 1), (24, 40, 4, 5, 2), (40, 40, 4, 5, 1)]
        self.features = nn.Sequential(
            conv_bn_act(3, 16, 3, 2, act=nn.SiLU),
            *[MBConv(*c, drop=0.2 * i / len(cfg)) for i, c in enumerate(cfg)],
            conv_bn_act(40, 64, 1, act=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class InvertedResidualV3(nn.Module):
    """Howard et al., "Searching for MobileNetV3" (2019): inverted residual with hardswish or ReLU and an
    optional squeeze-excite gated by hardsigmoid (squeeze = expanded channels / 4)."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se: bool, hs: bool):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers = [] if mid == cin else [conv_bn_act(cin, mid, 1, act=act)]
        layers.append(conv_bn_act(mid, mid, k, stride, groups=mid, act=act))
        if se:
            layers.append(SqueezeExcitation(mid, max(8, mid // 4), gate=nn.Hardsigmoid))
        layers.append(conv_bn_act(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


class MobileNetV3Tiny(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        cfg = [(16, 16, 16, 3, 2, True, False), (16, 64, 24, 3, 2, False, False), (24, 72, 24, 3, 1, False, False),
               (24, 96, 40, 5, 2, True, True), (40, 120, 40, 5, 1, True, True)]
        self.features = nn.Sequential(conv_bn_act(3, 16, 3, 2, act=nn.Hardswish),
                                      *[InvertedResidualV3(*c) for c in cfg],
                                      conv_bn_act(40, 96, 1, act=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Zhang et al., "ShuffleNet" (2018): interleave the channels of ``groups`` groups."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """Ma et al., "ShuffleNet V2" (2018): a basic unit splits the channels in two and transforms one half;
    a downsampling unit transforms two copies; both concatenate and shuffle."""

    def __init__(self, cin: int, cout: int, stride: int, shuffle_module: bool = False):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn_act(cin, cin, 3, stride, groups=cin, act=None),
                                         conv_bn_act(cin, half, 1))
        b2in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(conv_bn_act(b2in, half, 1), conv_bn_act(half, half, 3, stride, groups=half,
                                                                              act=None), conv_bn_act(half, half, 1))
        self.shuffle = nn.ChannelShuffle(2) if shuffle_module else None

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out) if self.shuffle is not None else channel_shuffle(out, 2)


class ShuffleNetV2Tiny(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn_act(3, 24, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 48, 1, True),
                                    ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.conv5 = conv_bn_act(96, 128, 1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


class Fire(nn.Module):
    """Iandola et al., "SqueezeNet" (2016): squeeze 1x1, then expand 1x1 and 3x3 concatenated."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.squeeze(x))
        return torch.cat([self.act(self.expand1x1(x)), self.act(self.expand3x3(x))], 1)


class SqueezeNetTiny(nn.Module):
    """SqueezeNet 1.1 layout: every max pool in ceil mode, a 1x1-conv classifier and a global average pool."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 8, 16, 16), Fire(32, 8, 16, 16), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 12, 24, 24), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(48, 16, 32, 32))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(64, classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)
