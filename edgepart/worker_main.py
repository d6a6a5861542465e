"""A full worker process: the runtime's worker, remote profiling and link probes, and test bed emulation.

    edgepart worker --listen HOST:PORT --key-file FILE [--deploy-pubkey FILE [--allow-measuring]]
                    [--threads N] [--workdir DIR] [--links JSON]

The runtime (:mod:`edgepart.runtime.worker`) runs requests and deploys; this adds the
``profile`` and ``probe`` frames (:mod:`edgepart.fcpm.remote`, :mod:`edgepart.fcpm.probe`) and,
with ``--links``, the emulated links and CPU a test bed gives the worker
(:mod:`edgepart.testbed.worker_hooks`). ``edgepart worker`` and LocalCluster's worker processes
(``python -m edgepart.worker_main``) run this.

A worker that takes only signed deploys (``--deploy-pubkey``) leaves the run key nothing but
requests (docs/security.md), so it does not take ``profile`` and ``probe`` frames either —
a profile burns CPU for up to an hour, a probe opens connections — unless ``--allow-measuring``.
"""
from __future__ import annotations

import sys

from edgepart.fcpm import probe, remote
from edgepart.runtime import worker
from edgepart.testbed.worker_hooks import WorkerEmulation, parse_links


def build_parser():
    p = worker.build_parser()
    p.add_argument("--links", help="emulation: JSON {peers: {device: {bandwidth_mbps, latency_ms, nic_mbps}}} shaped "
                                    "in the sender, and optionally cpu: {share_file: PATH} (compute stages dilated) "
                                    "and cpu_cores (see edgepart.testbed.worker_hooks)")
    p.add_argument("--allow-measuring", action="store_true",
                   help="with --deploy-pubkey: still take remote profile and probe requests from run-key holders")
    return p


def measuring_allowed(args) -> bool:
    """Whether run-key holders may ask this worker for profiles and probes (see the module docstring)."""
    return not args.deploy_pubkey or args.allow_measuring


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    emulation: WorkerEmulation | None = None
    if args.links:
        try:
            emulation = parse_links(args.links)
        except ValueError as e:
            p.error(f"--links: {e}")
    worker.setup_process(args)
    hooks = {"link_shaper": emulation.link_shaper, "stage_clock": emulation.stage_clock} if emulation else {}
    w = worker.Worker(**worker.worker_options(args), **hooks)
    if measuring_allowed(args):
        remote.register(w, cpu_cores=emulation.cpu_cores if emulation else None)
        probe.register(w)
    return worker.run(w, args.exit_with_parent)


if __name__ == "__main__":
    sys.exit(main())
