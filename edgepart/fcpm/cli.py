"""``edgepart profile``: profile this device, or a running worker, and write its FCPM as JSON.

    edgepart profile --out profiles/NAME.json [--quick] [--backend torch|onnxruntime]
    edgepart profile --endpoint HOST:PORT --key-file KEY --out profiles/NAME.json

The command sits above both halves of profiling: the local sweep (:mod:`edgepart.fcpm.profiler`)
and the remote one (:mod:`edgepart.fcpm.remote`, which itself runs the profiler's sweep inside the
worker), so neither imports the other's caller.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgepart.fcpm.profiler import COUNTS, DEFAULT_LOADS, profile
from edgepart.fcpm.remote import check_profile_options, profile_remote
from edgepart.runtime.protocol import read_key


def _parse_counts(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        fam, _, n = item.partition("=")
        if fam.strip() not in COUNTS or not n.strip().isdigit():
            raise ValueError(f"--counts wants FAMILY=N,... with families {sorted(COUNTS)}; got {item!r}")
        out[fam.strip()] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    """``edgepart profile``: profile this device (or a running worker) and write its FCPM as JSON."""
    ap = argparse.ArgumentParser(prog="edgepart profile", description=__doc__.split("\n\n")[0].strip("`"))
    ap.add_argument("--out", required=True, help="where to write the profile JSON (e.g. profiles/NAME.json)")
    ap.add_argument("--endpoint", help="HOST:PORT of a running worker: profile it (in its own CPU share) instead "
                                       "of this machine; the client fits the model")
    ap.add_argument("--key-file", help="the worker's shared key (with --endpoint)")
    ap.add_argument("--quick", action="store_true", help="a small sweep for tests (< 30 s)")
    ap.add_argument("--loads", default=None, help="background load levels, e.g. 0,0.25,0.5,0.75 (default)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing at most (default 480, quick 20)")
    ap.add_argument("--counts", default=None, help="configurations per op family, e.g. conv=60,bn=12 "
                                                   "(default: the full design; --quick takes a sixth)")
    ap.add_argument("--nets", type=int, default=None, help="synthetic networks for the in-network correction "
                                                           "(default 16, quick 4; 0: none)")
    ap.add_argument("--sustained", choices=("auto", "on", "off"), default="auto",
                    help="rate-limited timing (CPU quota): auto-detect (default), force on or off")
    ap.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                    help="time layers as the torch device program runs them (default) or as ONNX Runtime sessions")
    ap.add_argument("--name", default=None, help="device name stored in the profile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    loads = tuple(float(v) for v in a.loads.split(",")) if a.loads else ((0.0, 0.5) if a.quick else DEFAULT_LOADS)
    if any(not 0 <= L < 1 for L in loads):
        ap.error("--loads must be fractions in [0, 1)")
    try:
        counts = _parse_counts(a.counts)
    except ValueError as e:
        ap.error(str(e))
    sustained = {"auto": "auto", "on": True, "off": False}[a.sustained]
    if a.endpoint:
        if a.backend != "torch":
            ap.error("--backend onnxruntime profiles this machine only (not yet a worker: --endpoint)")
        if not a.key_file:
            ap.error("--endpoint needs --key-file")
        opts = {"quick": a.quick, "loads": list(loads), "seed": a.seed, "budget": a.budget, "counts": counts,
                "nets": a.nets, "sustained": sustained}
        try:
            check_profile_options(opts)
        except ValueError as e:
            ap.error(str(e))
        shown = [0.0]

        def show(h):
            if a.no_progress or time.monotonic() - shown[0] < 5:
                return
            shown[0] = time.monotonic()
            print(f"  {a.endpoint}: {h.get('phase')}: {h.get('done')}/{h.get('total')}", flush=True)
        prof = profile_remote(a.endpoint, read_key(a.key_file), opts, name=a.name, on_progress=show,
                              default_name=Path(a.out).stem)
    else:
        prof = profile(quick=a.quick, loads=loads, seed=a.seed, budget_s=a.budget, progress=not a.no_progress,
                       name=a.name or Path(a.out).stem, counts=counts, nets=a.nets, sustained=sustained,
                       backend=a.backend)
    path = prof.save(a.out)
    share = prof.meta.get("cpu_share")
    print(f"wrote {path}: {prof.meta['n_measurements']} measurements in {prof.meta['profile_seconds']} s"
          + (f" (rate-limited: {share:.2f} of a core sustained)" if prof.meta.get("rate_limited") and share else "")
          + f"; models: {', '.join(f'{k}={v}' for k, v in prof.summary().items())}")
    return 0



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
