"""Bad input to real worker processes: every kind refused with a logged reason; the worker stays up, memory flat."""
from __future__ import annotations

import copy
import os
import socket
import time

import pytest
import torch

import edgepart
from edgepart import models as zoo
from edgepart.ir.manifest import Recv
from edgepart.runtime import protocol as P
from edgepart.runtime.client import Session
from tests.conftest import assert_close
from tests.test_protocol import raw_frame

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, (x,) = zoo.get("tinynet")
    d = tmp_path_factory.mktemp("tiny3")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(3), strategy="even").save(d)
    with edgepart.LocalCluster(d) as c:
        yield model.eval(), x, d, c


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def addr(c, dev):
    return P.parse_address(c.endpoints[dev])


def raw_send(c, dev, data: bytes, close=True):
    s = socket.create_connection(addr(c, dev), timeout=5)
    try:
        s.sendall(data)
    except OSError:
        pass
    if close:
        s.close()
    return s


def authed(c, dev, name="d0", role="peer"):
    return P.Channel.connect(c.endpoints[dev], c.key, {"role": role, "name": name})


def send_raw_authed(ch, header, payload, **kw):
    seq = ch._seq_send
    ch._seq_send += 1
    try:
        ch.sock.sendall(raw_frame(ch._k_send, seq, header, payload, **kw))
    except OSError:
        pass


def wait_closed(ch, timeout=5.0):
    """The worker closes a connection whose frame it refused (after an optional 'refused' notice)."""
    ch.sock.settimeout(timeout)
    try:
        while ch.sock.recv(65536):
            pass
    except OSError:
        pass
    ch.close()


def attacks(c, manifest):
    """One round of every kind of bad input; yields a label per attack."""
    # 1. random bytes
    raw_send(c, "d1", os.urandom(65536))
    yield "random bytes"
    # 2. truncated frame (a fixed header promising more than is sent)
    raw_send(c, "d1", P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, 500, 0) + b'{"kind":')
    yield "truncated"
    # 3. unauthenticated header claiming a 100 GB payload
    raw_send(c, "d1", P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, 20, 100 * 10**9) + b"x" * 60)
    yield "100 GB unauthenticated"
    # 4. wrong key (a deploy or anything else): refused at the hello
    with pytest.raises(P.ProtocolError):
        P.Channel.connect(c.endpoints["d1"], b"w" * 32, {"role": "client", "name": "mallory"})
    yield "wrong key"
    # authenticated frames that do not fit the deployed bundle
    act = next(a for a in manifest.devices["d1"].actions if isinstance(a, Recv))
    a, b = act.a, act.b
    tshape = list(manifest.tensors[act.tensor].piece_shape(a, b))
    good = {"kind": "piece", "req": "evil:1", "tensor": act.tensor, "rows": [a, b], "from": act.src}
    nbytes = 4 * int(torch.tensor(tshape).prod())
    # 5. authenticated header claiming 100 GB
    ch = authed(c, "d1", act.src)
    send_raw_authed(ch, {**good, "parts": [["float32", tshape]]}, b"", plen=100 * 10**9)
    wait_closed(ch)
    yield "100 GB authenticated"
    # 6. wrong dtype
    ch = authed(c, "d1", act.src)
    send_raw_authed(ch, {**good, "parts": [["float64", tshape]]}, bytes(2 * nbytes))
    wait_closed(ch)
    yield "wrong dtype"
    # 7. wrong shape (more rows than the piece has)
    ch = authed(c, "d1", act.src)
    bigger = list(tshape)
    bigger[2] += 5
    send_raw_authed(ch, {**good, "parts": [["float32", bigger]]}, bytes(4 * int(torch.tensor(bigger).prod())))
    wait_closed(ch)
    yield "wrong shape"
    # 8. a piece the device never receives
    ch = authed(c, "d1", act.src)
    send_raw_authed(ch, {**good, "tensor": "nonexistent", "parts": [["float32", tshape]]}, bytes(nbytes))
    wait_closed(ch)
    yield "unexpected piece"
    # 9. bad MAC (payload altered in transit)
    ch = authed(c, "d1", act.src)
    send_raw_authed(ch, {**good, "req": "evil:2", "parts": [["float32", tshape]]}, bytes(nbytes), bad_mac=True)
    wait_closed(ch)
    yield "bad MAC"
    # 10. input of the wrong shape straight to the source worker
    ch = authed(c, "d0", "client", role="client")
    send_raw_authed(ch, {"kind": "input", "req": "evil:3", "parts": [["float32", [1, 3, 64, 64]]]},
                    bytes(4 * 3 * 64 * 64))
    wait_closed(ch)
    yield "wrong input shape"
    # 11. unknown frame kind, and a deploy whose manifest does not match its id
    ch = authed(c, "d1", "client", role="client")
    send_raw_authed(ch, {"kind": "exec", "code": "import os"}, b"")
    wait_closed(ch)
    ch = authed(c, "d1", "client", role="client")
    ch.send({"kind": "deploy", "device": "d1", "bundle": "0" * 64, "peers": {}}, [b'{"devices": {}}'])
    assert ch.recv(lambda h: None).kind == "deploy_error"
    ch.close()
    yield "bad deploy"


@pytest.mark.timeout(180)
def test_every_bad_input_refused_worker_stays_up_memory_flat(setup):
    model, x, d, c = setup
    manifest = c.manifest
    labels = list(attacks(c, manifest))                 # warm-up round (first-use allocations)
    time.sleep(0.5)
    before = {dev: rss_kb(pid) for dev, pid in c.pids.items()}
    for _ in range(15):
        for _ in attacks(c, manifest):
            pass
    time.sleep(0.5)
    after = {dev: rss_kb(pid) for dev, pid in c.pids.items()}
    assert all(p.poll() is None for p in c.procs.values()), "a worker died"
    for dev in before:
        assert after[dev] - before[dev] < 16 * 1024, f"{dev}: RSS grew {before[dev]} -> {after[dev]} kB"
    # still serving, correctly
    y = c.infer(x)
    with torch.no_grad():
        assert_close(y, model(x))
    log = (c.log_dir / "d1.log").read_text()
    for reason in ["bad magic", "truncated", "above the", "hello refused", "expected", "expects no piece",
                   "bad frame MAC", "unknown frame kind", "refused deploy"]:
        assert reason in log, f"no logged reason {reason!r} for {labels}"
    assert "input" in (c.log_dir / "d0.log").read_text()


def test_tampered_file_refused_worker_keeps_old_bundle(setup, tmp_path):
    model, x, d, c = setup
    bad = tmp_path / "bad"
    # other weights: a worker copies a file it holds in another bundle with the manifest's sha256 instead
    # of asking for it (runtime.deploy.Deployer._reuse), so only a file it holds nowhere is sent, and checked
    other = copy.deepcopy(model)
    with torch.no_grad():
        for q in other.parameters():
            q.add_(0.01)
    edgepart.compile(other, (x,), edgepart.Cluster.homogeneous(3, bandwidth_mbps=77.0), strategy="even").save(bad)
    p = bad / "devices" / "d2.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(data)
    with pytest.raises(edgepart.BundleError, match=r"d2\.safetensors.*sha256"):
        Session(bad, c.endpoints, c.key)
    assert "d2.safetensors" in (c.log_dir / "d2.log").read_text()
    y = c.infer(x)           # the running bundle is untouched
    with torch.no_grad():
        assert_close(y, model(x))
