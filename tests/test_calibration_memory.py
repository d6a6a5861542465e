"""Memory of the online calibration on ONNX Runtime: what it frees is handed back, so a process that
calibrates model after model (benchmarks/testbed.py, the demo, a planner on a small board) does not grow."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Calibrates a model whose linear layer holds 64 MiB of weights on ONNX Runtime twice, in a fresh process
# (the malloc settings the timing applies are process-wide), and prints its RSS in MB: before (onnxruntime
# and the exporter loaded, freed memory handed back), after the first calibration, after the second.
CHILD = r"""
import json, sys, warnings
from pathlib import Path
import torch
warnings.filterwarnings("ignore")
from edgepart.compiler.cost.calibration import calibrate
from edgepart.compiler.cost.calibration.host_speed import HostSpeedProbe
from edgepart.fcpm.ort_timing import session_call_s
from edgepart.runtime.allocator import release_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e3 for line in f if line.startswith("VmRSS:"))

root = Path(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 16 * 16, 8192)).eval()
x = torch.randn(1, 3, 16, 16)
profile = root / "profiles" / "host_ort.json"
probe = HostSpeedProbe(profile, [0], kind="layers")
session_call_s(0.01)
probe.measure(0.05)
release_memory()
out = [rss_mb()]
for _ in range(2):
    calibrate(model, (x,), probe, budget_s=0.05, rounds=1, family_budget_s=0.05, time_model=False,
              time_layers=False, backend="onnxruntime", profile=profile)
    out.append(rss_mb())
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="reads /proc/self/status; glibc's malloc_trim")
def test_calibrating_twice_on_onnxruntime_keeps_no_memory():
    """After two calibrations of a model with a 64 MiB linear layer on ONNX Runtime, the process holds
    less than those 64 MiB more than before. The timing keeps freed memory in the heap (the workers'
    malloc settings, process-wide), and each layer timed there — its torch weights, the exporter's
    copies, the session's copy and prepacked weights — left 14–16 times the layer's weights behind
    (0.9–1.0 GB after two calibrations), growing with each calibration; calibrate now hands it back."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before, first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second - before < 64, f"RSS {before:.0f} MB -> {first:.0f} -> {second:.0f} MB after two calibrations"
