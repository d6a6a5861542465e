"""Training and evaluation on CPU: deterministic in the seed, a few minutes for a small zoo model on MNIST.

AdamW with a cosine learning-rate decay, mini-batches drawn by a permutation from a local generator and
random shifts of up to ``shift`` pixels (zero padding) as the only augmentation; the global torch RNG is
never used, so the same seed gives the same weights on the same machine and thread count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgepart.datasets import Split


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    lr: float = 2e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    shift: int = 2            # random translation, pixels
    seed: int = 0

    def record(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "weight_decay": self.weight_decay, "shift": self.shift, "seed": self.seed}


def _shifted(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Every image moved by its own (dy, dx) in [-shift, shift], filled with the background value."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    background = float(x.min())
    padded = F.pad(x, (shift, shift, shift, shift), value=background)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def train(model: nn.Module, data: Split, config: TrainConfig = TrainConfig(), log=None) -> nn.Module:
    """Train ``model`` in place on ``data`` for ``config.epochs`` epochs; returns it in eval mode.

    ``log(epoch, loss, seconds)`` is called after every epoch when given."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = max(config.epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    for epoch in range(config.epochs):
        t0, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(len(data), generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * config.batch_size:(k + 1) * config.batch_size]
            x = _shifted(data.x[idx], config.shift, gen)
            loss = F.cross_entropy(model(x), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        if log is not None:
            log(epoch, loss_sum / len(data), time.perf_counter() - t0)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class predictions (N,) of ``model`` in eval mode."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, data: Split) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly."""
    return float((predict(model, data.x) == data.y).float().mean())
