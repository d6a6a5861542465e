"""A/B of the transport against an older commit, same machine, same minutes, alternating runs.

    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/transport_ab.py --old 1bd272c [--rounds 3]

Each measurement runs in a fresh process whose ``edgepart`` is either this working tree or
``git archive <old>`` unpacked in a temp dir, with the same measuring code for both:
piece-frame throughput sender → receiver process on loopback (64 KiB, 1 MiB, 16 MiB tensors),
and the median latency of ``LocalCluster.infer`` on the trivial model (one 1x1 conv,
1x4x8x8 input) with one and two workers. Writes benchmarks/results/transport_ab.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, socket, statistics, sys, tempfile, time
root, what = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
os.chdir(root)
import torch
import edgepart
from edgepart.runtime import protocol as P
assert edgepart.__file__.startswith(root)
torch.set_num_threads(1)
K = b"k" * 32
if what == "recv":
    port, count, kib = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    s = socket.create_connection(("127.0.0.1", port))
    ch = P.Channel.server_handshake(s, K, {"role": "worker"})
    spec = [("float32", (1, 1, kib * 256 // 256, 256))]
    for _ in range(count):
        ch.recv(lambda h: spec)
    ch.send({"kind": "done"})
elif what == "tp":
    kib = int(sys.argv[3])
    count = max(4, (256 << 10) // kib)
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    p = __import__("subprocess").Popen([sys.executable, "-c", sys.argv[-1], root, "recv", str(ls.getsockname()[1]),
                                        str(count), str(kib), sys.argv[-1]])
    s, _ = ls.accept()
    ch = P.Channel.client_handshake(s, K, {"role": "peer"})
    t = torch.randn(1, 1, kib * 256 // 256, 256)
    t0 = time.perf_counter()
    for i in range(count):
        ch.send({"kind": "piece", "req": f"b:{i}", "tensor": "x", "rows": [0, t.shape[2]], "from": "d0"}, [t])
    ch.recv(lambda h: None)
    dt = time.perf_counter() - t0
    p.wait()
    print(json.dumps({"gbps": count * kib * 1024 / dt / 1e9}))
else:
    ndev = int(sys.argv[3])
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 4, 8, 8)
    b = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(ndev), strategy="single" if ndev == 1 else "even")
    d = b.save(tempfile.mkdtemp())
    with edgepart.LocalCluster(d) as c:
        for _ in range(200):
            c.infer(x)
        ts = []
        for _ in range(500):
            t0 = time.perf_counter(); c.infer(x); ts.append(time.perf_counter() - t0)
    print(json.dumps({"ms": statistics.median(ts) * 1e3}))
'''


def run(root: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, root, *args, CHILD], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transport_ab.md"))
    args = p.parse_args(argv)
    old_dir = tempfile.mkdtemp(prefix="edgepart-ab-")
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.old], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", old_dir], input=arch, check=True)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.old], capture_output=True,
                         text=True).stdout.strip()
    trees = {f"old ({rev})": old_dir, "new (working tree)": str(ROOT)}
    tests = [("tp", "64"), ("tp", "1024"), ("tp", "16384"), ("lat", "1"), ("lat", "2")]
    res: dict = {(t, a, name): [] for t, a in tests for name in trees}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for t, a in tests:
            for name, root in trees.items():                    # alternate old / new
                r = run(root, t, a)
                res[(t, a, name)].append(r["gbps"] if t == "tp" else r["ms"])
    load1 = os.getloadavg()[0]
    names = list(trees)
    lines = ["# Transport A/B", "",
             f"`benchmarks/transport_ab.py --old {args.old}`: {args.rounds} rounds, old and new alternating, the "
             f"same measuring code for both (see the script); median of rounds. Load average {load0:.2f} before, "
             f"{load1:.2f} after.", "",
             f"| measurement | {names[0]} | {names[1]} | new / old |", "|---|---|---|---|"]
    for t, a in tests:
        o, n = (statistics.median(res[(t, a, k)]) for k in names)
        label = (f"piece frames {int(a)} KiB, loopback GB/s" if t == "tp"
                 else f"trivial model, {a} worker(s), infer median ms")
        lines.append(f"| {label} | {o:.3f} | {n:.3f} | {n / o:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
