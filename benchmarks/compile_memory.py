"""Peak memory of ``edgepart compile``, and the tensor bytes a fresh Bundle's graph meta holds.

    .venv/bin/python benchmarks/compile_memory.py [MODEL ...] [--devices 4] [--runs 2]

Each run is ``python -m edgepart.cli compile MODEL --devices N --out TMP`` in a fresh
process; its peak RSS comes from os.wait4's rusage for that one child (ru_maxrss is
in KiB on Linux). Then the model is compiled once in this process and the tensors
reachable from ``bundle.graph``'s node.meta are summed (issue #15: meta holds only
metadata, so this should be 0). Prints a markdown table; the before/after numbers
are kept by hand in benchmarks/results/compile_memory.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgepart  # noqa: E402
from edgepart import models  # noqa: E402


def peak_rss_mib(model: str, devices: int) -> float:
    """Peak RSS of one ``edgepart compile`` process, in MiB."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "edgepart.cli", "compile", model, "--devices", str(devices), "--out", out]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}   # this checkout's edgepart, not an installed one
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024


def tensor_bytes(v, seen: set[int]) -> int:
    """Bytes of the distinct tensors reachable from ``v`` (containers and dataclasses; not other nodes)."""
    if isinstance(v, torch.Tensor):
        if id(v) in seen:
            return 0
        seen.add(id(v))
        return v.numel() * v.element_size()
    if isinstance(v, fx.Node):
        return 0
    if isinstance(v, dict):
        return sum(tensor_bytes(x, seen) for x in v.values())
    if isinstance(v, (tuple, list, set)):
        return sum(tensor_bytes(x, seen) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return sum(tensor_bytes(getattr(v, f.name), seen) for f in dataclasses.fields(v))
    return 0


def meta_tensor_mib(model: str, devices: int) -> float:
    m, inputs = models.get(model)
    bundle = edgepart.compile(m, inputs, edgepart.Cluster.homogeneous(devices), name=model)
    seen: set[int] = set()
    return sum(tensor_bytes(n.meta, seen) for n in bundle.graph.graph.nodes) / 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def loaded_programs_mib(model: str, devices: int, backend: str) -> tuple[float, float]:
    """(RSS after compiling ``model`` with ONNX exports, MiB; what loading its programs on ``backend`` then adds):
    what a compiled bundle held when it kept the programs it loaded to check itself."""
    import gc
    from edgepart.runtime.allocator import release_memory
    m, inputs = models.get(model)
    bundle = edgepart.compile(m, inputs, edgepart.Cluster.homogeneous(devices), strategy="even", name=model, onnx=True)
    gc.collect()
    release_memory()
    before = rss_mib()
    bundle.programs(None if backend == "torch" else backend)
    gc.collect()
    return before, rss_mib() - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["vgg16"])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--loaded", action="store_true",
                    help="instead: what a compiled bundle's programs hold once loaded, on torch and on ONNX Runtime")
    args = ap.parse_args()
    if args.loaded:
        print("| model | RSS after compile (MiB) | loaded programs, torch (MiB) | loaded programs, onnxruntime (MiB) |")
        print("|---|---|---|---|")
        for model in args.models:
            base, torch_mib = loaded_programs_mib(model, args.devices, "torch")
            _, ort_mib = loaded_programs_mib(model, args.devices, "onnxruntime")
            print(f"| {model} | {base:.0f} | +{torch_mib:.0f} | +{ort_mib:.0f} |", flush=True)
        return
    print("| model | peak RSS per run (MiB) | tensors in bundle.graph meta (MiB) |")
    print("|---|---|---|")
    for model in args.models:
        peaks = [peak_rss_mib(model, args.devices) for _ in range(args.runs)]
        print(f"| {model} | {', '.join(f'{p:.0f}' for p in peaks)} | {meta_tensor_mib(model, args.devices):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
