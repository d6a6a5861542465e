"""Memory of the online calibration and of the testbed's planning, several models in one process.

Resident memory (VmRSS) of this process before each step, its peak during it (VmHWM, reset at the start
of the step through /proc/self/clear_refs) and after it. Nothing here is a timing measurement: the
calibration times with small budgets on CPU 0 and the numbers it returns are not used.

- ``calibrate`` (default): ``calibrate(model, ..., backend=B)`` for each model in turn, each ``--repeat``
  times, as ``benchmarks/testbed.py`` calibrates before each cell;
- ``testbed``: ``benchmarks/testbed.py``'s ``run()`` for each model and band (its calibration, plans,
  predictions and bundles), each chosen strategy deployed to local unemulated workers and run on two
  requests in place of the emulated measurement (a step: one cell).

``--limit-gb``: the process stops, naming the step, once its RSS passes this (a run that grows without
bound on a shared host). Prints a markdown table; ``--json`` saves the rows.

    python benchmarks/calibration_memory.py --models vgg16 resnet18 yolov2_tiny mobilenet_v2 --repeat 2
    python benchmarks/calibration_memory.py --mode testbed --models vgg16 resnet18 --limit-gb 10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edgepart import models  # noqa: E402
from edgepart.compiler.cost.calibration import calibrate  # noqa: E402
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe  # noqa: E402

SIZES = {"vgg16": 160, "resnet18": 224, "yolov2_tiny": 256, "mobilenet_v2": 224, "se_resnet": 224}
PROFILES = {"torch": ROOT / "profiles" / "host.json", "onnxruntime": ROOT / "profiles" / "host_ort.json"}
CPUSET = [0]      # away from CPU 1, where measurements run


def memory_gb() -> dict[str, float]:
    """{"rss", "peak"}: this process's VmRSS and VmHWM in GB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "peak"] = int(line.split()[1]) / 1e6
    return out


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Steps:
    """Rows of (step, RSS before, peak during, RSS after), printed as they come; a guard thread stops the
    process once RSS passes ``limit_gb``."""

    def __init__(self, limit_gb: float | None):
        self.rows: list[dict] = []
        self.current = "start"
        self.before = memory_gb()["rss"]
        print("| step | RSS before (GB) | peak during (GB) | RSS after (GB) |\n|---|---|---|---|", flush=True)
        if limit_gb:
            threading.Thread(target=self._guard, args=(limit_gb,), daemon=True).start()

    def _guard(self, limit_gb: float) -> None:
        while True:
            m = memory_gb()
            if m["rss"] > limit_gb:
                print(f"| {self.current} | {self.before:.2f} | > {limit_gb:g} (stopped: RSS {m['rss']:.2f} GB) | — |",
                      flush=True)
                os._exit(3)
            time.sleep(0.02)

    def start(self, name: str) -> None:
        self.current = name
        reset_peak()
        self.before = memory_gb()["rss"]

    def end(self) -> None:
        m = memory_gb()
        row = {"step": self.current, "before": self.before, "peak": m["peak"], "after": m["rss"]}
        self.rows.append(row)
        print(f"| {row['step']} | {row['before']:.2f} | {row['peak']:.2f} | {row['after']:.2f} |", flush=True)


def run_calibrations(names: list[str], repeat: int, backend: str, steps: Steps) -> None:
    probe = HostSpeedProbe(PROFILES["torch"], CPUSET)
    for name in names:
        model, (x,) = models.get(name, input_size=SIZES[name])
        for i in range(repeat):
            steps.start(f"{name} calibration {i + 1}")
            calibrate(model, (x,), probe, budget_s=0.3, rounds=3, family_budget_s=0.3, layer_budget_s=0.3,
                      backend=backend, profile=PROFILES[backend])
            steps.end()
        del model


def run_testbed(names: list[str], bands: list[float], backend: str, steps: Steps) -> None:
    import testbed
    from edgepart.testbed.local import LocalCluster

    real_calibrate = testbed.calibrate

    def calibrate_cell(model, inputs, *a, **kw):
        # a cell starts with its calibration: the previous cell's step ends here
        if steps.current != "start":
            steps.end()
        steps.start(f"{type(model).__name__} cell {sum(1 for r in steps.rows if 'cell' in r['step']) + 1}")
        return real_calibrate(model, inputs, *a, **kw)

    def deploy_and_run(bundle_dir: Path, inputs, refs, warmup, emu) -> dict:
        with LocalCluster(bundle_dir, cpuset=CPUSET) as c:
            for x in inputs[:2]:
                c.infer(x)
        return {"latencies": [1.0], "median": 1.0, "min": 1.0, "max": 1.0, "worst_rel_error": 0.0,
                "time_scale": 1.0, "host_speed": 1.0, "host_speeds": [1.0], "memory_speeds": [],
                "host_speed_start": 1.0, "emulation": "", "devices": {}, "startup_s": 0.0, "wall_s": 0.0}
    testbed.calibrate = calibrate_cell
    testbed.measure = deploy_and_run
    emu = {"probe": HostSpeedProbe(PROFILES["torch"], CPUSET), "cpuset": CPUSET, "backend": backend,
           "stage_start_s": testbed.workers_stage_start(backend), "host_speed": 1.0,
           "model_timing": "cold" if backend != "torch" else "warm"}
    testbed.run(names, bands, 2, 0, emu, 5.0, 0, rounds=1, log=lambda *a, **k: None)
    steps.end()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["calibrate", "testbed"], default="calibrate")
    ap.add_argument("--models", nargs="*", default=["vgg16", "resnet18", "yolov2_tiny", "mobilenet_v2"],
                    choices=list(SIZES))
    ap.add_argument("--repeat", type=int, default=2, help="calibrations per model (mode calibrate)")
    ap.add_argument("--bands", nargs="*", type=float, default=[100, 1000], help="Mbit/s (mode testbed)")
    ap.add_argument("--backend", default="onnxruntime", choices=list(PROFILES))
    ap.add_argument("--limit-gb", type=float, default=None, help="stop once RSS passes this")
    ap.add_argument("--json", default=None, help="save the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    steps = Steps(args.limit_gb)
    t = time.perf_counter()
    if args.mode == "calibrate":
        run_calibrations(args.models, args.repeat, args.backend, steps)
    else:
        run_testbed(args.models, args.bands, args.backend, steps)
    print(f"\n{args.mode} on {args.backend}: peak {max(r['peak'] for r in steps.rows):.2f} GB, "
          f"RSS at the end {memory_gb()['rss']:.2f} GB, {time.perf_counter() - t:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "rows": steps.rows},
                                              indent=1))


if __name__ == "__main__":
    main()
