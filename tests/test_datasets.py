"""Data sets that ship inside installed packages: shapes, deterministic stratified splits."""
import numpy as np
import pytest
import torch

from edgepart import datasets


@pytest.fixture(scope="module")
def mnist():
    return datasets.load("mnist", 32)


def test_mnist_sizes_shapes_and_at_least_1000_test_images(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    assert mnist.train.x.shape == (3500, 3, 32, 32) and mnist.train.x.dtype == torch.float32
    assert mnist.test.y.dtype == torch.int64 and mnist.num_classes == 10
    assert torch.equal(mnist.test.x[:, 0], mnist.test.x[:, 2])           # the grey channel, replicated
    assert torch.bincount(mnist.test.y).tolist() == [100] * 10            # stratified: 20 % of every class


def test_splits_are_deterministic_disjoint_and_cover_everything(mnist):
    again = datasets.load("mnist", 32)
    for name in ("train", "val", "test"):
        assert torch.equal(mnist.split(name).x, again.split(name).x)
        assert torch.equal(mnist.split(name).y, again.split(name).y)
    labels = np.repeat(np.arange(10), 50)
    tr, va, te = datasets.split_indices(labels, seed=0)
    assert len(set(tr) | set(va) | set(te)) == 500 and len(tr) + len(va) + len(te) == 500
    other = datasets.split_indices(labels, seed=1)
    assert not np.array_equal(te, other[2])                               # the seed moves the split
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), datasets.split_indices(labels, seed=0)))


def test_digits_resized_and_recorded():
    d = datasets.load("digits", 16, split_seed=3)
    assert d.train.x.shape[1:] == (3, 16, 16)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    rec = d.record()
    assert rec["dataset"] == "digits" and rec["split_seed"] == 3 and rec["input_size"] == 16
    assert rec["split_sizes"] == {"train": len(d.train), "val": len(d.val), "test": len(d.test)}


def test_unknown_dataset_and_split_are_refused():
    with pytest.raises(KeyError, match="mnist"):
        datasets.load("cifar")
    with pytest.raises(KeyError):
        datasets.load("digits", 8).split("holdout")
