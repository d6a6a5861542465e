"""Tests for the model zoo, edgepart.models."""
import pytest
import torch
import torch.fx
from torch import nn

from edgepart import models

torch.set_num_threads(1)

EXPECTED_NAMES = ["vgg16", "alexnet", "resnet18", "resnet50", "mobilenet_v2", "inception",
                  "yolov2_tiny", "se_resnet", "unet", "tinynet", "vgg_small", "resnet_small", "mobilenet_v2_small"]


def test_names():
    assert models.names() == EXPECTED_NAMES
    for n in EXPECTED_NAMES:
        assert models.min_input_size(n) <= models.default_input_size(n)
        assert models.default_input_size(n) % models.input_multiple(n) == 0


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_model_small_input(name):
    size = models.min_input_size(name)
    rng_before = torch.get_rng_state()
    m1, (x1,) = models.get(name, size)
    m2, (x2,) = models.get(name, size)
    assert torch.equal(torch.get_rng_state(), rng_before), "get() disturbed the global RNG"

    assert isinstance(m1, nn.Module) and not m1.training
    assert all(not mod.training for mod in m1.modules())
    assert x1.shape == (1, 3, size, size)
    assert torch.equal(x1, x2)

    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    # BatchNorm is not an identity.
    for mod in m1.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.running_mean.abs().sum() > 0
            assert not torch.allclose(mod.running_var, torch.ones_like(mod.running_var))
            assert not torch.allclose(mod.weight, torch.ones_like(mod.weight))

    with torch.no_grad():
        y1 = m1(x1)
        y2 = m2(x2)
        y_other = m1(x1.flip(-1) * 0.5 + 0.3)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2)
    assert 1e-3 < y1.abs().max().item() < 1e3
    assert not torch.allclose(y1, y_other), "output does not depend on the input"

    gm = torch.fx.symbolic_trace(m1)
    with torch.no_grad():
        yt = gm(x1)
    torch.testing.assert_close(yt, y1, rtol=0, atol=0)

    if name == "unet":
        assert y1.shape == (1, 2, size, size)
    elif name == "yolov2_tiny":
        assert y1.shape == (1, 125, size // 32, size // 32)
    elif name in ("tinynet", "vgg_small", "resnet_small", "mobilenet_v2_small"):
        assert y1.shape == (1, 10)
    else:
        assert y1.shape == (1, 1000)


def test_seed_changes_weights():
    m0, (x0,) = models.get("tinynet", seed=0)
    m1, (x1,) = models.get("tinynet", seed=1)
    assert not torch.equal(m0.conv1.weight, m1.conv1.weight)
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("name", ["resnet18", "unet", "yolov2_tiny", "tinynet"])
def test_other_sizes(name):
    size = models.min_input_size(name) * 2
    m, (x,) = models.get(name, size)
    with torch.no_grad():
        y = m(x)
    assert torch.isfinite(y).all()


def test_default_input_size():
    m, (x,) = models.get("tinynet")
    assert x.shape == (1, 3, 32, 32)
    assert models.default_input_size("vgg16") == 224
    assert models.default_input_size("yolov2_tiny") == 416
    assert models.default_input_size("unet") == 128


def test_unknown_name():
    with pytest.raises(KeyError) as e:
        models.get("lenet")
    for n in EXPECTED_NAMES:
        assert n in str(e.value)
    with pytest.raises(KeyError):
        models.default_input_size("lenet")


def test_too_small_input():
    for n in ("alexnet", "tinynet", "unet"):
        mn = models.min_input_size(n)
        with pytest.raises(ValueError, match=str(mn)):
            models.get(n, mn - 1)
    with pytest.raises(ValueError, match="multiple"):
        models.get("unet", 36)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total += out.numel() // out.shape[-1] * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("name,expected", [("vgg16", 15.5e9), ("resnet50", 4.1e9)])
def test_macs(name, expected):
    m, (x,) = models.get(name, 224)
    macs = count_macs(m, x)
    assert abs(macs - expected) / expected < 0.03, macs
