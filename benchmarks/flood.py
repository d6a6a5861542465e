"""A worker under a connection flood: is a legitimate client still served, and does its memory come back?

    .venv/bin/python benchmarks/flood.py [--unauth 1000] [--replays 300] [--seconds 20] [--trials 10] [--write]

One worker process (``python -m edgepart.worker_main``, the full ``edgepart worker``) runs
TinyNet on one device. A flooder process then holds ``--unauth`` TCP connections that never
send a byte (from 200 loopback addresses, 127.0.0.2-201) and ``--replays`` connections that
send a recorded, genuine client hello (from 50 more, 127.0.1.x) and nothing after it, and
re-opens each one the worker closes, for ``--seconds``. Meanwhile a legitimate client (from
127.0.0.1) connects afresh ``--trials`` times — hello, key confirmation, one request — and the
time from connect to result is recorded. The worker's RSS is read before the flood, at its
peak (VmHWM minus the pre-flood peak), and 3 s after the flood stopped.
Prints a markdown table; ``--write`` also writes benchmarks/results/flood.md.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgepart  # noqa: E402
from edgepart import models  # noqa: E402
from edgepart.runtime import protocol as P  # noqa: E402
from edgepart.runtime.client import Session  # noqa: E402


def status_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def recorded_hello(key: bytes) -> bytes:
    """A genuine client hello, as an eavesdropper would have recorded it."""
    hj = json.dumps({"role": "client", "name": "client", "kind": "hello", "nonce": os.urandom(16).hex()}).encode()
    signed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 0) + hj
    return signed + hmac.new(P._kdf(key, b"hello-c"), bytes(8) + signed, hashlib.sha256).digest()


# --- the flooder (a process of its own, so the client's timing does not share its GIL) ------------------

def flood(address: str, unauth: int, replays: int, seconds: float, hello_hex: str) -> None:
    host, port = P.parse_address(address)
    hello = bytes.fromhex(hello_hex)
    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "closed_by_worker": 0, "connect_failed": 0}

    def open_one(i: int) -> None:
        replay = i >= unauth
        src = f"127.0.1.{2 + i % 50}" if replay else f"127.0.0.{2 + i % 200}"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((src, 0))
            err = s.connect_ex((host, port))
        except OSError:
            s.close()
            stats["connect_failed"] += 1
            return
        if err not in (0, errno.EINPROGRESS):
            s.close()
            stats["connect_failed"] += 1
            return
        stats["opened"] += 1
        sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ, (i, replay, False))

    for i in range(unauth + replays):
        open_one(i)
    print("holding", flush=True)
    end = time.monotonic() + seconds
    reopen: list[int] = []
    while time.monotonic() < end:
        for key, ev in sel.select(timeout=0.05):
            s, (i, replay, sent) = key.fileobj, key.data
            if ev & selectors.EVENT_WRITE and not sent:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    sel.unregister(s)
                    s.close()
                    reopen.append(i)
                    continue
                if replay:
                    try:
                        s.send(hello)
                    except OSError:
                        pass
                sel.modify(s, selectors.EVENT_READ, (i, replay, True))
                continue
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    s.close()
                    stats["closed_by_worker"] += 1
                    reopen.append(i)
        for i in reopen:
            open_one(i)
        reopen = []
    print(json.dumps(stats), flush=True)


# --- the measurement ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unauth", type=int, default=1000)
    ap.add_argument("--replays", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--flooder", nargs=3, metavar=("ADDRESS", "SECONDS", "HELLO_HEX"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.flooder:
        flood(args.flooder[0], args.unauth, args.replays, float(args.flooder[1]), args.flooder[2])
        return 0

    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.unauth + args.replays + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    tmp = Path(tempfile.mkdtemp(prefix="edgepart-flood-"))
    model, (x,) = models.get("tinynet")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(1), strategy="single").save(tmp / "bundle")
    key = os.urandom(32)
    (tmp / "key").write_text(key.hex())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-m", "edgepart.worker_main", "--listen", "127.0.0.1:0",
                               "--key-file", str(tmp / "key"), "--workdir", str(tmp / "work"), "--log-level",
                               "WARNING"], stdout=subprocess.PIPE, stderr=open(tmp / "worker.log", "w"), text=True,
                              env=env, cwd=ROOT)
    flooder = None
    try:
        addr = worker.stdout.readline().split()[-1]
        endpoints = {"d0": addr}
        with Session(tmp / "bundle", endpoints, key) as s:                 # deploy, warm up
            for _ in range(20):
                s.infer(x)

        attempts = [0]
        real_handshake = P.Channel.client_handshake.__func__

        def counting(cls, *a, **kw):
            attempts[0] += 1
            return real_handshake(cls, *a, **kw)
        P.Channel.client_handshake = classmethod(counting)

        def legit() -> float:
            t0 = time.perf_counter()
            with Session(tmp / "bundle", endpoints, key, deploy=False, connect_timeout=10) as s:
                s.infer(x, timeout=10)
            return time.perf_counter() - t0
        calm = [legit() for _ in range(args.trials)]
        time.sleep(1.0)
        before, hwm_before = status_kb(worker.pid, "VmRSS"), status_kb(worker.pid, "VmHWM")
        flooder = subprocess.Popen([sys.executable, __file__, "--unauth", str(args.unauth), "--replays",
                                    str(args.replays), "--flooder", addr, str(args.seconds),
                                    recorded_hello(key).hex()], stdout=subprocess.PIPE, text=True, env=env)
        assert flooder.stdout.readline().strip() == "holding"
        time.sleep(1.0)
        during, failures = [], []
        attempts[0] = 0
        for _ in range(args.trials):
            try:
                during.append(legit())
            except Exception as e:  # noqa: BLE001 — a refused client is the result being measured
                failures.append(f"{type(e).__name__}: {e}")
            time.sleep(0.3)
        rss_during = status_kb(worker.pid, "VmRSS")
        tries = attempts[0]
        flooder.wait(args.seconds + 30)
        fstats = json.loads(flooder.stdout.readline())
        time.sleep(3.0)
        after, hwm = status_kb(worker.pid, "VmRSS"), status_kb(worker.pid, "VmHWM")
        alive = worker.poll() is None
        after_ok = legit() if alive else float("nan")
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
        worker.terminate()
        worker.wait(10)
    ms = lambda v: f"{v * 1e3:.0f}"                                        # noqa: E731
    rows = [
        ("flood", f"{args.unauth} silent + {args.replays} replayed hellos held for {args.seconds:.0f} s, each re-opened "
                  f"when the worker closed it"),
        ("connections opened by the flooder", str(fstats["opened"])),
        ("closed by the worker", str(fstats["closed_by_worker"])),
        ("legit client, connect + request, calm (median / max ms)", f"{ms(statistics.median(calm))} / {ms(max(calm))}"),
        ("legit client, connect + request, during the flood (median / max ms)",
         f"{ms(statistics.median(during))} / {ms(max(during))}" if during else "—"),
        ("hellos the legit client sent during the flood (one per trial if none was dropped)",
         f"{tries} for {args.trials} trials"),
        ("legit client refused during the flood", f"{len(failures)} of {args.trials}" +
         (f" ({failures[0][:120]})" if failures else "")),
        ("worker RSS before / during / 3 s after (MB)",
         f"{before / 1024:.1f} / {rss_during / 1024:.1f} / {after / 1024:.1f}"),
        ("RSS after − before (MB)", f"{(after - before) / 1024:+.1f}"),
        ("peak RSS above the pre-flood peak (MB)", f"{max(0, hwm - hwm_before) / 1024:.1f}"),
        ("worker alive and serving after", f"{alive} ({ms(after_ok)} ms)"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "flood.md"
        out.write_text(f"# Connection flood against one worker\n\n`{' '.join(['benchmarks/flood.py'] + (argv or sys.argv[1:]))}`"
                       f" on {time.strftime('%Y-%m-%d')} (2 shared cores; the flooder, the worker and the client "
                       f"on one host over loopback)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
