"""Dynamic testbed: a static plan vs the online controller while the cluster changes under a constant load.

    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/dynamic.py            # needs root (netns, tc)
    flock /tmp/edgepart-bench.lock .venv/bin/python benchmarks/dynamic.py --quick    # shorter phases

The testbed of benchmarks/testbed.py (phone 0.4 — the source —, board 0.5, laptop 0.7, edge 1.0;
FCPM profile profiles/host.json; 1000 Mbit/s, 0.5 ms links; ``LocalCluster(emulate=True,
cpu="dilate", cpuset=[1])``), YOLOv2-tiny at 256×256, the first plan compiled with ofpm. Both runs
use the same session machinery (plan versions, resubmission); the *static* run's controller has
``replan=False`` (it only redeploys its one plan to a device that comes back), the *adaptive*
run's re-plans. Scripted timeline (seconds after the load starts, ``--phase`` s apart):

1. steady;
2. 50 % background CPU load on the fastest device (edge): its emulated CPU share is halved;
3. the link carrying most bytes of the then-current plan drops from 1000 to 20 Mbit/s (tc);
4. a device of the then-current plan (not the source) is killed (SIGKILL);
5. it comes back (a new worker on the same address).

Load: ``--clients`` closed-loop clients (one request in flight each), each with inputs of its own;
every answer is checked against the model's output for that request's input. Latency is in the
emulated devices' time (wall × time_scale). Reported: latency over time (plot), per phase the
median latency and the plan predictions, the time from each change to the first request within 15 %
of the prediction of the plan the controller switched to, re-plan/swap/failover events, lost /
duplicated / wrong answers, and the longest gap between answers around the kill.

Writes benchmarks/results/dynamic.{json,md,png}.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edgepart import models  # noqa: E402
from edgepart.compiler.bundle import compile as compile_model  # noqa: E402
from edgepart.online import AdaptiveLocalCluster, ControllerConfig  # noqa: E402

from testbed import make_cluster  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL, SIZE = "yolov2_tiny", 256
TOLERANCE = 0.15


def set_share(emu, device: str, factor: float) -> None:
    """The device's emulated CPU share × ``factor`` (1 - background load), read by its CpuDilation."""
    path = emu.share_file(device)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(repr(emu.cores(device) * factor))
    os.replace(tmp, path)


def busiest_link(manifest, alive) -> tuple[str, str]:
    load = collections.Counter()
    for t in manifest.transfers:
        if t.src != t.dst and t.src in alive and t.dst in alive:
            load[tuple(sorted((t.src, t.dst)))] += t.nbytes
    return load.most_common(1)[0][0] if load else ("phone", "edge")


def victim_of(manifest, source: str) -> str:
    """The device of the plan (not the source) with the most rows of work."""
    work = collections.Counter()
    for d, spec in manifest.devices.items():
        if d != source:
            work[d] += len(spec.actions)
    return work.most_common(1)[0][0] if work else "edge"


def run(kind: str, bundle_dir: Path, model, example, args, script: dict | None) -> dict:
    """One run (static or adaptive) of the timeline; returns per-request records, events, what was changed."""
    cfg = ControllerConfig(replan=(kind == "adaptive"), hold_s=args.hold, min_gain=args.min_gain,
                           proc_load=False)
    workdir = tempfile.mkdtemp(prefix=f"edgepart-dyn-{kind}-")
    records: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    with AdaptiveLocalCluster(bundle_dir, model, example, config=cfg, emulate=True, cpu="dilate", cpuset=[1],
                              adaptive_kw={"timeout": 60, "dead_after": 1.5, "heartbeat": 0.25,
                                           "workdir": workdir}) as c:
        emu, ts = c.emulator, c.time_scale
        s = c.session
        for _ in range(3):                                  # warm-up
            c.infer(example[0], timeout=60)
        t_start = time.monotonic()

        def client(k):
            g = torch.Generator().manual_seed(1000 * k + 7)
            i = 0
            # --requests: each client sends exactly that many, however long the timeline lasts
            while (i < args.requests) if args.requests is not None else not stop.is_set():
                x = torch.randn(*example[0].shape, generator=g)
                t0 = time.monotonic()
                try:
                    y = c.submit(x).result(90)
                    err = None
                except Exception as e:  # noqa: BLE001
                    y, err = None, repr(e)
                t1 = time.monotonic()
                with lock:
                    records.append({"client": k, "i": i, "t": t1 - t_start, "t0": t0 - t_start,
                                    "latency_ms": (t1 - t0) * ts * 1e3, "x": x, "y": y, "error": err,
                                    "plan": s.plan.version})
                i += 1
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        changes = []
        P = args.phase
        used = script or {}

        def at(t):
            while time.monotonic() - t_start < t:
                time.sleep(0.05)
        at(P)
        fastest = "edge"
        set_share(emu, fastest, 0.5)
        changes.append({"t": time.monotonic() - t_start, "change": f"50% CPU load on {fastest}"})
        at(2 * P)
        a, b = used.get("link") or busiest_link(s.plan.manifest, s.session.alive_devices())
        emu.set_link(a, b, 20.0)
        changes.append({"t": time.monotonic() - t_start, "change": f"link {a}-{b} 1000 -> 20 Mbit/s"})
        at(3 * P)
        victim = used.get("victim") or victim_of(s.plan.manifest, s.plan.source)
        c.kill(victim)
        changes.append({"t": time.monotonic() - t_start, "change": f"{victim} killed"})
        at(4 * P)
        c.restart(victim)
        changes.append({"t": time.monotonic() - t_start, "change": f"{victim} back"})
        at(5 * P)
        stop.set()
        for t in threads:
            t.join(600)
        events = s.events
        counts = dict(s.counts)
        predicted_now = s.controller.predicted
        offset = t_start - s.controller.t0
        history = [(t - offset, p * 1e3) for t, p in s.controller.history if p != float("inf")]
    return {"kind": kind, "records": records, "events": events, "changes": changes, "time_scale": ts,
            "counts": counts, "link": [a, b], "victim": victim, "predicted_end_ms": (predicted_now or 0) * 1e3,
            "offset": offset, "history": history}


def check(records, model) -> dict:
    """Lost (an error instead of an answer), duplicated (two answers for one request id — the client
    cannot see two, the session sets a future once: counted from the session's counters), wrong."""
    wrong = lost = 0
    seen = collections.Counter()
    with torch.no_grad():
        for r in records:
            seen[(r["client"], r["i"])] += 1
            if r["error"] is not None:
                lost += 1
                continue
            ref = model(r["x"])
            scale = max(float(ref.abs().max()), 1e-12)
            if float((r["y"] - ref).abs().max()) > 1e-4 * scale:
                wrong += 1
    return {"requests": len(records), "lost": lost, "wrong": wrong, "duplicated": sum(v - 1 for v in seen.values())}


def recovery(result) -> list[dict]:
    """Per change: the median latency over the phase's second half; the prediction of the plan in use at
    the phase's end (the plan the controller switched to, under the state it measured); and how long
    after the change requests were back within 15 % of it (the first request from which a run of 5
    consecutive ones has its median within 15 %)."""
    out = []
    recs = sorted((r for r in result["records"] if r["error"] is None), key=lambda r: r["t"])
    hist = result["history"]
    for i, ch in enumerate(result["changes"] + [{"t": -1e9, "change": "steady"}]):
        if ch["change"] == "steady":
            ch = {"t": 0.0, "change": "steady"}
            t_end = result["changes"][0]["t"]
        else:
            t_end = result["changes"][i + 1]["t"] if i + 1 < len(result["changes"]) else float("inf")
        in_phase = [r for r in recs if ch["t"] <= r["t0"] and r["t"] < t_end]
        tail = in_phase[len(in_phase) // 2:]
        preds = [p for t, p in hist if ch["t"] <= t < min(t_end, 1e12)]
        pred = statistics.median(preds[len(preds) * 3 // 4:]) if preds else None
        back = None
        if pred:
            lat = [r["latency_ms"] for r in in_phase]
            for k in range(len(lat) - 4):
                if statistics.median(lat[k:k + 5]) <= (1 + TOLERANCE) * pred:
                    back = round(in_phase[k]["t"] - ch["t"], 1)
                    break
        out.append({"change": ch["change"], "t": round(ch["t"], 1),
                    "median_ms_second_half": round(statistics.median([r["latency_ms"] for r in tail]), 1)
                    if tail else None,
                    "predicted_ms_end": round(pred, 1) if pred else None, "back_within_15pct_s": back})
    return out[-1:] + out[:-1]


def gap_around(records, t_change: float, t_next: float) -> float:
    ts = sorted(r["t"] for r in records if r["error"] is None and t_change - 5 <= r["t"] <= t_next)
    pts = [t_change] + [t for t in ts if t >= t_change]
    return max((b - a for a, b in zip(pts, pts[1:])), default=float("nan"))


def plot(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for res, color in zip(results, ("tab:red", "tab:blue")):
        pts = sorted((r["t"], r["latency_ms"]) for r in res["records"] if r["error"] is None)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color=color, label=res["kind"], alpha=0.6)
        for e in res["events"]:
            if res["kind"] == "adaptive" and e["event"] in ("replan", "failover", "rejoin"):
                ax.axvline(e["t_rel"], color=color, lw=0.8, ls=":")
    for ch in results[0]["changes"]:
        ax.axvline(ch["t"], color="k", lw=0.8)
        ax.text(ch["t"], ax.get_ylim()[1] * 0.95, " " + ch["change"], rotation=90, va="top", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("latency per request (ms, emulated time)")
    ax.set_title(f"{MODEL} on 4 emulated devices: static plan vs online re-planning (dotted: swaps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", type=float, default=20.0, help="s between scripted changes")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=None, help="per client (default: until the timeline ends)")
    p.add_argument("--hold", type=float, default=2.0)
    p.add_argument("--min-gain", type=float, default=0.10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["static", "adaptive"])
    p.add_argument("--log", default="/tmp/edgepart-dynamic.log", help="the controller's log")
    p.add_argument("--out", default="dynamic", help="results/<out>.{json,md,png}")
    args = p.parse_args(argv)
    if args.quick:
        args.phase = 14.0
    warnings.simplefilter("ignore")
    import logging
    logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.sched_setaffinity(0, {0})            # the client and controller off the workers' CPU
    torch.set_num_threads(1)
    model, example = models.get(MODEL, input_size=SIZE)
    model.eval()
    cluster = make_cluster(1000)
    bdir = Path(tempfile.mkdtemp(prefix="edgepart-dyn-bundle-"))
    t = time.perf_counter()
    compile_model(model, example, cluster, "ofpm", MODEL).save(bdir)
    compile_s = time.perf_counter() - t
    results = []
    script = None
    for kind in (["adaptive", "static"] if args.only is None else [args.only]):
        print(f"--- {kind} run", flush=True)
        res = run(kind, bdir, model, example, args, script)
        script = {"link": res["link"], "victim": res["victim"]}
        for e in res["events"]:
            e["t_rel"] = e["t"] - res["offset"]
        res["check"] = check(res["records"], model)
        res["phases"] = recovery(res)
        kill = next(ch for ch in res["changes"] if "killed" in ch["change"])
        back = next(ch for ch in res["changes"] if "back" in ch["change"])
        res["max_gap_after_kill_s"] = round(gap_around(res["records"], kill["t"], float("inf")), 2)
        del back
        print(json.dumps({k: res[k] for k in ("check", "phases", "max_gap_after_kill_s", "counts")}, indent=1),
              flush=True)
        results.append(res)
    write(results, compile_s, args)
    return 0


def write(results, compile_s: float, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "records"} | {
        "records": [{k: v for k, v in rec.items() if k not in ("x", "y")} for rec in r["records"]]} for r in results]
    out = args.out
    (RESULTS / f"{out}.json").write_text(json.dumps({"compile_s": compile_s, "args": vars(args), "runs": slim},
                                                    indent=1, default=str))
    plot(results, RESULTS / f"{out}.png")
    lines = [f"# Dynamic testbed: static plan vs online re-planning ({MODEL}, 4 emulated devices)", "",
             "Written by `benchmarks/dynamic.py " + " ".join(sys.argv[1:]) + "` (see its docstring for the set-up and "
             f"timeline): {args.clients} closed-loop client(s), phases {args.phase:g} s apart"
             + (f", {args.requests} requests per client" if args.requests else "") + ". Latency in the "
             "emulated devices' time.", "",
             f"First compile (ofpm): {compile_s:.1f} s on this machine.", ""]
    lines += ["| run | requests | lost | duplicated | wrong | swaps | resubmitted | longest gap after the kill (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["check"]
        swaps = sum(1 for e in r["events"] if e["event"] in ("replan", "failover", "rejoin"))
        lines.append(f"| {r['kind']} | {c['requests']} | {c['lost']} | {c['duplicated']} | {c['wrong']} | {swaps} | "
                     f"{r['counts'].get('resubmitted', 0)} | {r['max_gap_after_kill_s']} |")
    lines += ["", "Per phase: median latency over its second half, the prediction of the plan in use at its end "
              "(under the live state the controller measured), and the time from the change until requests were "
              "within 15 % of that prediction (a run of 5 with its median within):", "",
              "| phase (from) | " + " | ".join(f"{r['kind']} median ms | {r['kind']} predicted ms | "
                                               f"{r['kind']} back within 15 % (s)" for r in results) + " |",
              "|---|" + "---|" * (3 * len(results))]
    for i, ph in enumerate(results[0]["phases"]):
        cells = []
        for r in results:
            q = r["phases"][i]
            cells += [str(q["median_ms_second_half"]), str(q["predicted_ms_end"]), str(q["back_within_15pct_s"])]
        lines.append(f"| {ph['change']} (t={ph['t']} s) | " + " | ".join(cells) + " |")
    for r in results:
        lines += ["", f"Events of the {r['kind']} run:", ""]
        for e in r["events"]:
            if e["event"] in ("start", "replan", "failover", "rejoin", "device_down", "device_up", "candidate",
                              "replan_failed", "failover_failed"):
                keep = {k: e.get(k) for k in ("predicted_before_ms", "predicted_ms", "gain", "devices", "deploy_s",
                                              "files_shipped", "device") if e.get(k) is not None}
                lines.append(f"- t={e['t_rel']:.1f} s **{e['event']}** {json.dumps(keep)}"
                             + (f" — {str(e.get('reason'))[:160]}" if e.get("reason") else ""))
    lines += ["", f"![latency over time]({out}.png)", ""]
    (RESULTS / f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
