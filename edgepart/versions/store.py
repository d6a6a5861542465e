"""A version set on disk: one directory per model, one subdirectory per version.

    DIR/versionset.json              the model, the data set record, the version names in order
    DIR/<version>/arch.json          the architecture spec (edgepart.models.compact), JSON
    DIR/<version>/weights.safetensors
    DIR/<version>/record.json        a VersionRecord: scale, accuracy, MACs, params, bytes, latencies, ...

Nothing is pickled: a version is rebuilt from its spec and its weights (an int8 version by converting
a fresh module of the same spec and loading its stored int8 tensors, edgepart.versions.quantize).
The weights' sha256 is in the record and checked on load.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from edgepart.compiler.bundle import Bundle
from edgepart.compiler.bundle import compile as compile_model
from edgepart.errors import EdgepartError
from edgepart.ir.hashing import sha256_file
from edgepart.versions import pruning, quantize

SET_FILE = "versionset.json"
ARCH, WEIGHTS, RECORD = "arch.json", "weights.safetensors", "record.json"
FORMAT = "edgepart-versionset/1"


@dataclass(frozen=True)
class VersionRecord:
    """One version's facts. ``accuracy`` is on the data set's test split, ``val_accuracy`` on validation;
    latencies in ms on one device (``predicted_ms`` from the FCPM profile, ``measured_ms`` the compiled
    single-device bundle run in-process, ``eager_ms`` the module's own forward); ``partitionable`` says
    whether edgepart compiles it (False for int8: it runs only whole, in-process)."""
    name: str
    scale: float
    quantized: bool
    accuracy: float
    val_accuracy: float
    macs: int
    params: int
    bytes: int
    predicted_ms: float | None
    measured_ms: float | None
    eager_ms: float | None
    partitionable: bool
    weights_sha256: str
    source: str | None = None          # the version this one was derived from (pruned / quantised)
    training: dict = field(default_factory=dict)   # how it was trained or fine-tuned (config, seconds)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VersionRecord":
        try:
            return cls(**d)
        except TypeError as e:
            raise EdgepartError(f"version record: {e}") from None

    def manifest_entry(self, model: str) -> dict:
        """What a bundle of this version records in its manifest's ``version`` field."""
        return {"set": model, "name": self.name, "scale": self.scale, "quantized": self.quantized,
                "accuracy": self.accuracy, "weights_sha256": self.weights_sha256}


def version_name(scale: float, quantized: bool = False) -> str:
    return "int8" if quantized else f"scale-{scale:.2f}"


def save_version(directory: Path, spec: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a version's architecture and weights; returns the weights' sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ARCH).write_text(json.dumps(spec, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS), metadata=metadata)
    return sha256_file(directory / WEIGHTS)


def write_record(directory: Path, record: VersionRecord) -> None:
    (directory / RECORD).write_text(json.dumps(record.to_dict(), indent=1) + "\n")


class VersionSet:
    """The versions of one model: ``vs.names``, ``vs.records[name]``, ``vs.model(name)``, ``vs.compile(...)``."""

    def __init__(self, directory: Path, info: dict[str, Any], records: dict[str, VersionRecord]):
        self.dir = Path(directory)
        self.info = info
        self.records = records

    @property
    def model_name(self) -> str:
        return self.info["model"]

    @property
    def names(self) -> list[str]:
        return list(self.records)

    @property
    def input_size(self) -> int:
        return int(self.info["data"]["input_size"])

    @classmethod
    def load(cls, directory: str | Path) -> "VersionSet":
        """The version set in ``directory``; raises EdgepartError naming what is missing or malformed."""
        directory = Path(directory)
        path = directory / SET_FILE
        if not path.is_file():
            raise EdgepartError(f"{directory}: no {SET_FILE}; build one with `edgepart versions MODEL --out DIR`")
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise EdgepartError(f"{path}: format {info.get('format')!r}, this edgepart reads {FORMAT}")
        records = {}
        for name in info["versions"]:
            rec = directory / name / RECORD
            if not rec.is_file():
                raise EdgepartError(f"{directory}: version {name!r} has no {RECORD}")
            records[name] = VersionRecord.from_dict(json.loads(rec.read_text()))
        return cls(directory, info, records)

    def save_info(self) -> None:
        self.info["versions"] = self.names
        (self.dir / SET_FILE).write_text(json.dumps(self.info, indent=1) + "\n")

    def spec(self, name: str) -> dict:
        return json.loads((self.dir / self._known(name) / ARCH).read_text())

    def example_input(self, seed: int = 0) -> torch.Tensor:
        """A deterministic N(0, 1) input of the set's shape (1, 3, S, S): shapes are all compiling needs."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(1, 3, self.input_size, self.input_size, generator=gen)

    def model(self, name: str) -> tuple[nn.Module, torch.Tensor]:
        """``(module, example_input)`` of version ``name``: a plain module built from its spec with its
        weights (checked against the record's sha256), in eval mode; an int8 version is a quantised
        GraphModule that runs only in-process."""
        record = self.records[self._known(name)]
        wpath = self.dir / name / WEIGHTS
        if sha256_file(wpath) != record.weights_sha256:
            raise EdgepartError(f"{wpath}: sha256 differs from its record; the version set was modified")
        x = self.example_input()
        tensors = load_file(str(wpath))
        if record.quantized:
            with safe_open(str(wpath), "pt") as f:
                metadata = f.metadata()
            return quantize.rebuild(self.spec(name), tensors, metadata, x), x
        return pruning.rebuild(self.spec(name), tensors), x

    def compile(self, name: str, cluster, strategy="ofpm") -> Bundle:
        """Version ``name`` compiled for ``cluster``; its manifest records the version."""
        record = self.records[self._known(name)]
        if not record.partitionable:
            raise EdgepartError(f"version {name!r} runs only whole, in-process ({record.note or 'not compilable'})")
        model, x = self.model(name)
        return compile_model(model, (x,), cluster, strategy=strategy, name=f"{self.model_name}:{name}",
                       version=record.manifest_entry(self.model_name))

    def _known(self, name: str) -> str:
        if name not in self.records:
            raise EdgepartError(f"no version {name!r} in {self.dir}; versions: {', '.join(self.records)}")
        return name
