"""Issue #22's findings, checked with only the API the pre-fix code had, so the same script runs
against a checkout before the fixes and after them (the regression tests in
tests/test_hardening.py use the new limits' knobs and cannot run on the old code).

    cd <checkout> && PYTHONPATH=. .venv/bin/python <this file>

Prints one line per finding: what was observed. Used for the before/after table in the report
of the hardening branch; it sends traffic only to workers it starts on loopback.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import edgepart
from edgepart import models
from edgepart.runtime import deploy as deploy_mod
from edgepart.runtime import protocol as P
from edgepart.runtime import server as server_mod
from edgepart.runtime.client import Session
from edgepart.runtime.worker import Worker

KEY = os.urandom(32)


def worker() -> Worker:
    w = Worker("127.0.0.1:0", KEY)
    w.start()
    return w


def sock_from(host, address):
    s = socket.socket()
    s.bind((host, 0))
    s.settimeout(5)
    s.connect(P.parse_address(address))
    return s


def hello_bytes():
    hj = json.dumps({"role": "client", "name": "c", "kind": "hello", "nonce": os.urandom(16).hex()}).encode()
    signed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 0) + hj
    return signed + hmac.new(P._kdf(KEY, b"hello-c"), bytes(8) + signed, hashlib.sha256).digest()


def ping(w, timeout=5.0):
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "x"}, timeout=timeout)
    ch.send({"kind": "ping", "t": 1})
    ch.sock.settimeout(timeout)
    f = ch.recv(lambda h: None)
    ch.close()
    return f.kind


def closed_within(s, t):
    s.settimeout(t)
    try:
        return s.recv(100) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def report(name, text):
    print(f"{name}: {text}", flush=True)


def main():
    model, (x,) = models.get("tinynet")
    d = Path(tempfile.mkdtemp()) / "b"
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even").save(d)

    # 1a: threads for silent connections
    w = worker()
    held = [sock_from(f"127.0.0.{2 + i % 20}", w.address) for i in range(200)]
    time.sleep(0.5)
    n = sum(1 for t in threading.enumerate() if t.name.startswith("conn-"))
    report("1a handshake threads for 200 silent connections from 20 addresses", n)
    for s in held:
        s.close()
    # 1b: one byte every second
    s = sock_from("127.0.0.2", w.address)
    hb = hello_bytes()
    t0 = time.monotonic()
    closed = None
    for i in range(9):
        try:
            s.send(hb[i:i + 1])
        except OSError:
            closed = time.monotonic() - t0
            break
        if closed_within(s, 1.0):
            closed = time.monotonic() - t0
            break
    report("1b a hello sent one byte a second", f"closed after {closed:.1f} s" if closed else
           f"still open after {time.monotonic() - t0:.1f} s")
    s.close()
    # 1c: a thread that cannot start
    real = threading.Thread
    fails = [0]

    class Failing(real):
        def start(self):
            if self.name.startswith("conn-") and fails[0] < 3:
                fails[0] += 1
                raise RuntimeError("can't start new thread")
            return super().start()
    threading.Thread = Failing
    for _ in range(3):
        try:
            socket.create_connection(P.parse_address(w.address), timeout=2).close()
        except OSError:
            pass
    time.sleep(0.3)
    threading.Thread = real
    try:
        report("1c after 3 thread start failures, a client", f"is served ({ping(w, 3)})")
    except Exception as e:  # noqa: BLE001
        report("1c after 3 thread start failures, a client", f"is not served: {type(e).__name__}: {e}"[:160])
    w.stop()

    # 2a: replayed hellos
    w = worker()
    hb = hello_bytes()
    reps = [sock_from("127.0.0.3", w.address) for _ in range(10)]
    for s in reps:
        s.sendall(hb)
    time.sleep(7.0)
    report("2a 10 replays of one recorded hello, 7 s later", f"{len(w.server.conns)} authenticated connections")
    for s in reps:
        s.close()
    # 2c: busy vs wrong key
    server_mod.MAX_CONNECTIONS = 1
    if hasattr(w.server, "max_connections"):
        w.server.max_connections = 1
    a = P.Channel.connect(w.address, KEY, {"role": "client", "name": "a"})
    time.sleep(0.3)
    try:
        b = P.Channel.connect(w.address, KEY, {"role": "client", "name": "b"})
        b.send({"kind": "ping", "t": 1})
        b.sock.settimeout(2)
        b.recv(lambda h: None)
        report("2c a second client when the limit is 1", "served")
    except Exception as e:  # noqa: BLE001
        report("2c a second client when the limit is 1", f"{type(e).__name__}: {e}"[:200])
    a.close()
    server_mod.MAX_CONNECTIONS = 256
    w.stop()

    # 3a: 8 concurrent deploys of one bundle + requests
    ws = [worker(), worker()]
    eps = {"d0": ws[0].address, "d1": ws[1].address}
    errs = []
    bar = threading.Barrier(8)

    def client():
        try:
            bar.wait()
            with Session(d, eps, KEY) as s:
                for _ in range(5):
                    s.infer(x, timeout=20)
        except Exception as e:  # noqa: BLE001
            errs.append(f"{type(e).__name__}: {e}"[:150])
    ts = [threading.Thread(target=client) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    report("3a 8 clients deploying one bundle at once, 5 requests each", f"{len(errs)} of 8 failed"
           + (f" (first: {errs[0]})" if errs else ""))
    for w in ws:
        w.stop()
    # 3b: a full disk
    ws = [worker(), worker()]
    real_mk = deploy_mod.tempfile.mkstemp

    def nospace(*a, **kw):
        if str(kw.get("prefix", "")).startswith("manifest"):
            return real_mk(*a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret")
    deploy_mod.tempfile.mkstemp = nospace
    try:
        Session(d, {"d0": ws[0].address, "d1": ws[1].address}, KEY, connect_timeout=5).close()
        report("3b deploy onto a full disk", "succeeded?")
    except Exception as e:  # noqa: BLE001
        report("3b deploy onto a full disk", f"{type(e).__name__}: {e}"[:200])
    deploy_mod.tempfile.mkstemp = real_mk
    for w in ws:
        w.stop()

    # 4: unlisted file
    w = worker()
    mb = (d / "manifest.json").read_bytes()
    bid = hashlib.sha256(mb).hexdigest()
    p = w.workdir / "bundles" / bid / "devices" / "extra.py"
    p.parent.mkdir(parents=True)
    p.write_text("x = 1\n")
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "c"})
    ch.sock.settimeout(10)
    ch.send({"kind": "deploy", "device": "d0", "bundle": bid, "peers": {"d1": "127.0.0.1:1"}}, [mb])
    h = ch.recv(lambda h: None).header
    for rel in h.get("files", []):
        ch.send({"kind": "file", "path": rel}, [(d / rel).read_bytes()])
        ch.recv(lambda h: None)
    ch.send({"kind": "commit"})
    h = ch.recv(lambda h: None).header
    report("4 an unlisted file in the worker's bundle directory", f"deploy_ok says unlisted={h.get('unlisted')}")
    ch.close()

    # 5: a 64 MiB manifest claimed
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "big"})
    seq = ch._seq_send
    ch._seq_send += 1
    hj = json.dumps({"kind": "deploy", "device": "d0", "bundle": "0" * 64, "peers": {}}).encode()
    fixed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 64 << 20)
    ch.sock.sendall(fixed + hj + P.mac(ch._k_send, b"h\x00\x00\x00" + seq.to_bytes(8, "big"), fixed + hj))
    ch.sock.settimeout(3)
    try:
        f = ch.recv(lambda h: None)
        report("5 a deploy frame claiming a 64 MiB manifest", f"answered {f.kind}: {f.get('reason')}"[:160])
    except Exception as e:  # noqa: BLE001
        report("5 a deploy frame claiming a 64 MiB manifest", f"accepted: the worker waits for the 64 MiB "
               f"({type(e).__name__})")
    ch.close()

    # 6a: a probe towards any host and port
    from edgepart.fcpm import probe
    probe.register(w)
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "p"})
    ch.sock.settimeout(15)
    ch.send({"kind": "probe", "self": "d0", "peer": "d1", "address": "127.0.0.1:22", "options": {"pings": 1}})
    f = ch.recv(lambda h: None)
    report("6a probe of 127.0.0.1:22 (not a peer)", f"{f.kind}: {f.get('message')}"[:220])
    ch.close()
    w.stop()
    # 6b: weak key files
    for content in (b"a" * 16, bytes(32), b"a" * 64):
        kp = Path(tempfile.mkdtemp()) / "k"
        kp.write_bytes(content)
        try:
            P.read_key(kp)
            report(f"6b key file {content[:8]!r}... ({len(content)} bytes)", "accepted")
        except Exception as e:  # noqa: BLE001
            report(f"6b key file {content[:8]!r}... ({len(content)} bytes)", f"refused: {e}"[:120])
    # 6c: cluster typos
    for desc in ({"devices": [{"name": "a"}], "links": {"default": {"bandwith_mbps": 5}}},
                 {"devices": [{"name": "a", "speed": float("inf")}]},
                 {"devices": [{"name": "a", "speed": "fast"}]}):
        try:
            edgepart.Cluster.from_dict(desc)
            report(f"6c cluster {json.dumps(desc)[:70]}", "accepted")
        except Exception as e:  # noqa: BLE001
            report(f"6c cluster {json.dumps(desc)[:70]}", f"{type(e).__name__}: {e}"[:140])


if __name__ == "__main__":
    main()
