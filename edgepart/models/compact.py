"""Small CNNs for 32×32 digit images, built from an architecture spec (per-layer channel counts).

Each class is built from a JSON-able spec (``Class.from_spec(spec)``) and reads its own spec back
(``model.spec()``) from the channel counts its layers have *now*, so a model that structured pruning
has thinned in place (``edgepart.versions.prune``) gives the spec of a plain module with the same
shapes: the pruned version is rebuilt from that spec and its weights, never pickled.

* ``vgg_small``: VGG-style, 3×(conv-BN-ReLU, conv-BN-ReLU, maxpool), global average pool, MLP head.
* ``resnet_small``: ResNet-style (a ResNet-8): 3×3 stem and one basic block per stage.
* ``mobilenet_v2_small``: MobileNetV2-style inverted residuals with depthwise 3×3 convolutions.

Block specs keep their structure explicitly (stride, whether there is a downsample, an expansion
conv, a residual add): pruning changes widths only, and a width that happens to equal another must
not change the structure.
"""
from __future__ import annotations

from torch import nn

from ._common import ConvBNAct


class VGGSmall(nn.Module):
    """Convolutions ``widths`` (two per stage, a 2×2 max-pool after each pair), then
    Linear(widths[-1], hidden), ReLU, Linear(hidden, num_classes)."""

    def __init__(self, widths=(32, 32, 64, 64, 128, 128), hidden: int = 128, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers.append(ConvBNAct(cin, w, 3, act=nn.ReLU()))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2, 2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

    def spec(self) -> dict:
        widths = [m[0].out_channels for m in self.features if isinstance(m, ConvBNAct)]
        return {"arch": "vgg_small", "widths": widths, "hidden": self.classifier[0].out_features,
                "num_classes": self.classifier[2].out_features}

    @classmethod
    def from_spec(cls, spec: dict) -> "VGGSmall":
        return cls(tuple(spec["widths"]), spec["hidden"], spec["num_classes"])


class SmallBasicBlock(nn.Module):
    """conv3×3(cin→inner, stride)-BN-ReLU, conv3×3(inner→out)-BN, + identity or a 1×1 downsample, ReLU."""
    _residual_bn = "bn2"   # scaled down at init, see _common.init_weights

    def __init__(self, cin: int, inner: int, out: int, stride: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                           if downsample else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)

    def spec(self) -> dict:
        return {"inner": self.conv1.out_channels, "out": self.conv2.out_channels,
                "stride": self.conv1.stride[0], "downsample": self.downsample is not None}


_RESNET_BLOCKS = [{"inner": 32, "out": 32, "stride": 1, "downsample": False},
                  {"inner": 64, "out": 64, "stride": 2, "downsample": True},
                  {"inner": 128, "out": 128, "stride": 2, "downsample": True}]


class ResNetSmall(nn.Module):
    """3×3 stem (stride 1), basic blocks as given, global average pool, Linear."""

    def __init__(self, stem: int = 32, blocks=tuple(_RESNET_BLOCKS), num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNAct(3, stem, 3, act=nn.ReLU())
        cin, layers = stem, []
        for b in blocks:
            layers.append(SmallBasicBlock(cin, b["inner"], b["out"], b["stride"], b["downsample"]))
            cin = b["out"]
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1))

    def spec(self) -> dict:
        return {"arch": "resnet_small", "stem": self.stem[0].out_channels,
                "blocks": [b.spec() for b in self.layers], "num_classes": self.fc.out_features}

    @classmethod
    def from_spec(cls, spec: dict) -> "ResNetSmall":
        return cls(spec["stem"], spec["blocks"], spec["num_classes"])


class SmallInvertedResidual(nn.Module):
    """[1×1 expand cin→hidden]-BN-ReLU6, depthwise 3×3 (stride)-BN-ReLU6, 1×1 project hidden→out-BN, [+ x]."""

    def __init__(self, cin: int, hidden: int, out: int, stride: int, expand: bool, residual: bool):
        super().__init__()
        self.use_res = residual
        layers: list[nn.Module] = []
        if expand:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.ReLU6()))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)

    def spec(self) -> dict:
        dw = self.conv[-3][0]
        return {"hidden": dw.out_channels, "out": self.conv[-2].out_channels, "stride": dw.stride[0],
                "expand": len(self.conv) == 4, "residual": self.use_res}


def _mobilenet_blocks() -> list[dict]:
    blocks, cin = [], 16
    # t (expansion), c (channels), n (repeats), s (first stride): MobileNetV2's table, cut for 32×32
    for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 2, 2]]:
        for i in range(n):
            stride = s if i == 0 else 1
            blocks.append({"hidden": cin * t, "out": c, "stride": stride, "expand": t != 1,
                           "residual": stride == 1 and cin == c})
            cin = c
    return blocks


class MobileNetV2Small(nn.Module):
    """3×3 stem (stride 1), inverted residuals as given, 1×1 conv to ``last``, global average pool, Linear."""

    def __init__(self, stem: int = 16, blocks=None, last: int = 256, num_classes: int = 10):
        super().__init__()
        blocks = _mobilenet_blocks() if blocks is None else blocks
        features: list[nn.Module] = [ConvBNAct(3, stem, 3, act=nn.ReLU6())]
        cin = stem
        for b in blocks:
            features.append(SmallInvertedResidual(cin, b["hidden"], b["out"], b["stride"], b["expand"],
                                                  b["residual"]))
            cin = b["out"]
        features.append(ConvBNAct(cin, last, 1, act=nn.ReLU6()))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

    def spec(self) -> dict:
        return {"arch": "mobilenet_v2_small", "stem": self.features[0][0].out_channels,
                "blocks": [b.spec() for b in self.features[1:-1]], "last": self.features[-1][0].out_channels,
                "num_classes": self.classifier.out_features}

    @classmethod
    def from_spec(cls, spec: dict) -> "MobileNetV2Small":
        return cls(spec["stem"], spec["blocks"], spec["last"], spec["num_classes"])


ARCHS = {"vgg_small": VGGSmall, "resnet_small": ResNetSmall, "mobilenet_v2_small": MobileNetV2Small}


def from_spec(spec: dict) -> nn.Module:
    """The module an architecture spec describes (``spec["arch"]`` names the class), untrained weights."""
    try:
        cls = ARCHS[spec["arch"]]
    except KeyError:
        raise KeyError(f"unknown architecture {spec.get('arch')!r}; valid: {', '.join(ARCHS)}") from None
    return cls.from_spec(spec)
