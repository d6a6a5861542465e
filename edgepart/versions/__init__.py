"""Model versions at several compression scales (MCIA): trained, pruned, quantised, measured, on disk.

    vs = build_version_set("resnet_small", "versions/resnet_small", scales=(1.0, 0.75, 0.5, 0.25))
    vs = VersionSet.load("versions/resnet_small")
    model, x = vs.model("scale-0.50")            # a plain nn.Module rebuilt from its spec and weights
    bundle = vs.compile("scale-0.50", cluster)   # the manifest's ``version`` names it

Modules: training (train, evaluate), pruning (torch-pruning, rebuild from a spec), quantize (int8 and
its safetensors form), measure (MACs, bytes, predicted and measured latency), store (the directory
format, VersionSet), build (train_model, build_version_set), table (the rich table).
"""
from edgepart.versions.build import build_version_set, train_model
from edgepart.versions.store import VersionRecord, VersionSet
from edgepart.versions.training import TrainConfig

__all__ = ["build_version_set", "train_model", "VersionRecord", "VersionSet", "TrainConfig"]
