"""Worker processes of a local testbed: start one and wait for its address, stop a group of them.

Shared by :class:`~edgepart.testbed.local.LocalCluster` and :class:`~edgepart.testbed.tiered.TieredTestbed`,
which differ in how they confine a worker (network namespace, cgroup), not in how they launch or end it.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from edgepart.errors import EdgepartError

REPO_ROOT = str(Path(__file__).resolve().parents[2])
READY = "edgepart worker listening on "


def worker_env(threads: int) -> dict[str, str]:
    """This process's environment, with edgepart importable from this checkout and ``threads`` OpenMP threads
    unless the caller's environment already sets them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def start_worker(cmd: list[str], log_path: Path, env: dict[str, str], timeout_s: float, what: str,
                 on_spawn: Callable[[subprocess.Popen], None] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (an ``edgepart.worker_main`` command line) in a session of its own, stderr appended to
    ``log_path``; ``on_spawn(proc)`` runs right after the fork (to confine it before it starts work). Returns
    the process and the address it prints once listening, within ``timeout_s``; otherwise raises an
    EdgepartError naming ``what`` with the tail of its log (the process is left for the caller to stop)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    if on_spawn is not None:
        on_spawn(proc)
    line, deadline = b"", time.monotonic() + timeout_s
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            break
        r, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if r:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            line += chunk
    proc.stdout.close()
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY):
        try:                  # its stdout closing comes a moment before the exit can be reaped
            state = f"exit code {proc.wait(timeout=1.0)}"
        except subprocess.TimeoutExpired:
            state = f"still running after {timeout_s:.0f} s without saying it listens"
        tail = log_path.read_text(errors="replace")[-2000:]
        raise EdgepartError(f"{what} did not start ({state}); its log:\n{tail}")
    return proc, text.rsplit(" ", 1)[1]


def stop_process_groups(procs: list[subprocess.Popen], grace_s: float = 3.0) -> None:
    """SIGTERM every process's group, wait up to ``grace_s`` in all, then SIGKILL the groups still running."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
