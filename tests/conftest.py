import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("EDGEPART_TEST", "1")


def assert_close(y, ref, rel=1e-4):
    """fp32 exactness: max |y - ref| <= rel * max |ref| (element-wise over nested outputs)."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(y, (tuple, list)) and len(y) == len(ref)
        for a, b in zip(y, ref):
            assert_close(a, b, rel)
        return
    if isinstance(ref, dict):
        assert set(y) == set(ref)
        for k in ref:
            assert_close(y[k], ref[k], rel)
        return
    assert y.shape == ref.shape, (y.shape, ref.shape)
    y, ref = y.detach(), ref.detach()
    scale = max(float(ref.abs().max()), 1e-12)
    err = float((y - ref).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture
def close():
    return assert_close
