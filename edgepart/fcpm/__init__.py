"""FCPM: per-device latency models fitted from offline profiling (the offline phase of DCFP).

    from edgepart.fcpm import DeviceProfile
    prof = DeviceProfile.load("profiles/laptop.json")
    seconds = prof.predict(node_info(node), rows=20, load=0.5)

``edgepart profile --out profiles/NAME.json`` (:func:`edgepart.fcpm.cli.main`) makes one.
"""
from edgepart.fcpm.model import DeviceProfile, metrics

__all__ = ["DeviceProfile", "metrics", "load_profiles"]


def load_profiles(paths: dict[str, str]) -> dict[str, DeviceProfile]:
    """{device: profile path} → {device: DeviceProfile}, for CostModel(cluster, profiles=...)."""
    return {dev: DeviceProfile.load(p) for dev, p in paths.items()}
