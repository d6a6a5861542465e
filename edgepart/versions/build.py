"""Train a zoo architecture on a data set, and build a model's version set from scratch.

:func:`train_model` trains one architecture and writes its weights, spec and metadata record.
:func:`build_version_set` trains the full-width model, prunes a copy to every scale (weight-magnitude
channel importance, torch-pruning), fine-tunes each pruned copy briefly, quantises the full-width model
to int8 (post-training, calibrated on training images), and writes every version with its test
accuracy and its costs (edgepart.versions.measure).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgepart import datasets, models
from edgepart.datasets import Dataset
from edgepart.models.compact import ARCHS
from edgepart.versions import pruning, quantize
from edgepart.versions.measure import HOST_PROFILE, measure
from edgepart.versions.store import (FORMAT, VersionRecord, VersionSet, save_version, version_name,
                                     write_record)
from edgepart.versions.training import TrainConfig, accuracy, train

META = "meta.json"
FINETUNE = TrainConfig(epochs=3, lr=1e-3)       # after pruning: short, from the pruned weights
CALIBRATION_IMAGES = 512       # the first training images observe the int8 activation ranges


def _check_arch(model_name: str) -> None:
    if model_name not in ARCHS:
        raise KeyError(f"{model_name!r} has no architecture spec to rebuild pruned versions from; "
                       f"trainable models: {', '.join(ARCHS)}")


def trained(model_name: str, data: Dataset, config: TrainConfig, log: Callable = print) -> tuple[nn.Module, dict]:
    """A freshly built zoo model (weights from ``config.seed``) trained on ``data.train``, and the record
    of its training: data set and split, config, seconds, accuracies."""
    _check_arch(model_name)
    model = models.build(model_name, seed=config.seed).train()
    t0 = time.perf_counter()
    train(model, data.train, config, log=lambda e, loss, s: log(f"  {model_name} epoch {e + 1}/{config.epochs}: "
                                                                  f"loss {loss:.4f} ({s:.1f} s)"))
    record = {**data.record(), "model": model_name, "train": config.record(),
              "train_seconds": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads(),
              "val_accuracy": accuracy(model, data.val), "test_accuracy": accuracy(model, data.test)}
    return model, record


def train_model(model_name: str, out: str | Path, dataset: str = "mnist", input_size: int = 32,
                config: TrainConfig = TrainConfig(), split_seed: int = 0, log: Callable = print) -> dict:
    """Train ``model_name`` and write ``out/weights.safetensors``, ``out/arch.json`` and ``out/meta.json``
    (data set, split, seed, epochs, accuracies); returns the metadata record."""
    data = datasets.load(dataset, input_size, split_seed)
    model, record = trained(model_name, data, config, log)
    out = Path(out)
    record["weights_sha256"] = save_version(out, model.spec(), model.state_dict(), {"model": model_name})
    (out / META).write_text(json.dumps(record, indent=1) + "\n")
    return record


def build_version_set(model_name: str, out: str | Path, scales=(1.0, 0.75, 0.5, 0.25), dataset: str = "mnist",
                      input_size: int = 32, config: TrainConfig = TrainConfig(),
                      finetune: TrainConfig = FINETUNE, int8: bool = True, split_seed: int = 0,
                      data: Dataset | None = None, profile: Path | None = HOST_PROFILE, repeats: int = 20,
                      log: Callable = print) -> VersionSet:
    """Build the version set of ``model_name`` in ``out`` from scratch and return it.

    ``data`` replaces loading ``dataset`` (tests pass a small one); ``repeats=0`` skips the latency
    measurements. Scale 1.0 is always built (every other version derives from it)."""
    t_start = time.perf_counter()
    if data is None:
        data = datasets.load(dataset, input_size, split_seed)
    scales = sorted({1.0, *(float(s) for s in scales)}, reverse=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, base_record = trained(model_name, data, config, log)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, data.input_size, data.input_size, generator=gen)
    vs = VersionSet(out, {"format": FORMAT, "model": model_name, "data": data.record(), "base": base_record,
                          "finetune": finetune.record(), "profile": str(profile) if profile else None}, {})

    def add(name: str, scale: float, model: nn.Module, training: dict, source: str | None) -> None:
        spec = model.spec()
        sha = save_version(out / name, spec, model.state_dict(), {"model": model_name, "version": name})
        costs = measure(model, example, profile=profile, repeats=repeats)
        vs.records[name] = VersionRecord(
            name=name, scale=scale, quantized=False, accuracy=accuracy(model, data.test),
            val_accuracy=accuracy(model, data.val), partitionable=True, weights_sha256=sha, source=source,
            training=training, **dataclasses.asdict(costs))
        write_record(out / name, vs.records[name])
        log(f"  {name}: test accuracy {vs.records[name].accuracy:.4f}, {costs.macs / 1e6:.2f} MMACs")

    for scale in scales:
        name = version_name(scale)
        if scale == 1.0:
            add(name, scale, base, {"config": config.record(), "seconds": base_record["train_seconds"]}, None)
            continue
        pruned = pruning.prune(base, scale, example)
        before = accuracy(pruned, data.test)
        log(f"  {name}: pruned (test accuracy {before:.4f} before fine-tuning); fine-tuning")
        t0 = time.perf_counter()
        train(pruned, data.train, finetune)
        add(name, scale, pruned, {"config": finetune.record(), "seconds": round(time.perf_counter() - t0, 2),
                                  "accuracy_before_finetune": before}, version_name(1.0))

    if int8:
        name = version_name(1.0, quantized=True)
        q = quantize.quantize(base, example, data.train.x[:CALIBRATION_IMAGES])
        tensors, metadata = quantize.to_tensors(q)
        sha = save_version(out / name, base.spec(), tensors, {**metadata, "model": model_name, "version": name})
        full = vs.records[version_name(1.0)]
        costs = measure(q, example, compiled=False, macs=full.macs, params=full.params,
                        nbytes=quantize.quantized_bytes(q), profile=profile, repeats=repeats)
        vs.records[name] = VersionRecord(
            name=name, scale=1.0, quantized=True, accuracy=accuracy(q, data.test), val_accuracy=accuracy(q, data.val),
            partitionable=False, weights_sha256=sha, source=version_name(1.0),
            training={"calibration_images": min(CALIBRATION_IMAGES, len(data.train)), "backend": quantize.BACKEND},
            note="int8 ops (quantized::conv2d_relu, ...) are not in edgepart's compiler: runs only whole, in-process",
            **dataclasses.asdict(costs))
        write_record(out / name, vs.records[name])
        log(f"  {name}: test accuracy {vs.records[name].accuracy:.4f}")
    vs.info["build_seconds"] = round(time.perf_counter() - t_start, 1)
    vs.save_info()
    return vs
