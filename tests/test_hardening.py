"""Issue #22: a worker under floods, replays, concurrent deploys, hostile bundles and fuzzed frames.

One test (or more) per finding of the issue; each says which. Workers run in this process (their
limits made small through ``server_options``) unless a test measures a worker's memory.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

import edgepart
from edgepart import models as zoo
from edgepart.errors import BundleError, EdgepartError
from edgepart.runtime import deploy as deploy_mod
from edgepart.runtime import protocol as P
from edgepart.runtime.allocator import release_memory
from edgepart.runtime.client import Session
from edgepart.runtime.signing import generate_deploy_key, load_private_key, load_public_key, sign_deploy
from edgepart.runtime.worker import Worker
from tests.conftest import assert_close
from tests.test_protocol import raw_frame

pytestmark = pytest.mark.timeout(60)

KEY = os.urandom(32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, (x,) = zoo.get("tinynet")
    d = tmp_path_factory.mktemp("tiny2")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even").save(d)
    return model.eval(), x, d


def start(n=1, **opts) -> list[Worker]:
    """``n`` workers in this process; ``opts``: Server limits, or ``deploy_pubkey``."""
    pub = opts.pop("deploy_pubkey", None)
    ws = [Worker("127.0.0.1:0", KEY, server_options=opts, deploy_pubkey=pub) for _ in range(n)]
    for w in ws:
        w.start()
    return ws


@pytest.fixture
def workers():
    made: list[Worker] = []

    def make(n=1, **opts):
        ws = start(n, **opts)
        made.extend(ws)
        return ws
    yield make
    for w in made:
        w.stop()


def sock_from(host: str, address: str) -> socket.socket:
    """A TCP connection to ``address`` from loopback address ``host`` (127.0.0.x: a distinct peer)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.settimeout(5)
    s.connect(P.parse_address(address))
    return s


def client_hello(key=KEY, role="client") -> bytes:
    """A client hello frame as docs/wire-format.md specifies it (what an eavesdropper records)."""
    hj = json.dumps({"role": role, "name": "c", "kind": "hello", "nonce": os.urandom(16).hex()}).encode()
    signed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 0) + hj
    return signed + hmac.new(P._kdf(key, b"hello-c"), bytes(8) + signed, hashlib.sha256).digest()


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """Whether the other end closes ``s`` within ``within`` seconds (reading and dropping what it sends)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        r, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
        if r:
            try:
                if not s.recv(65536):
                    return True
            except OSError:
                return True
    return False


def ping(w: Worker, timeout=5.0) -> float:
    """Seconds a fresh client takes to connect and get a pong."""
    t0 = time.perf_counter()
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "legit"}, timeout=timeout)
    try:
        ch.send({"kind": "ping", "t": 1})
        ch.sock.settimeout(timeout)
        assert ch.recv(lambda h: None).kind == "pong"
    finally:
        ch.close()
    return time.perf_counter() - t0


def conn_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("conn-"))


# --- finding 1: pre-authentication floods -----------------------------------------------------------------

def test_handshakes_are_capped_in_total_and_per_peer_and_a_client_is_served(workers):
    (w,) = workers(max_pending=8, max_pending_per_peer=4, handshake_timeout=3.0)
    held = [sock_from(f"127.0.0.{2 + i % 4}", w.address) for i in range(40)]   # 4 addresses, silent
    try:
        time.sleep(0.5)
        assert conn_threads() <= 8 + 1, f"{conn_threads()} handshake threads for 40 silent connections"
        assert w.server.n_pending <= 8
        assert ping(w) < 2.0                                           # from 127.0.0.1: a slot of its own
    finally:
        for s in held:
            s.close()


def test_the_whole_hello_has_one_deadline(workers):
    """Old: the 5 s limit was per read; one byte every 3 s kept a connection for ever."""
    (w,) = workers(handshake_timeout=1.0)
    s = sock_from("127.0.0.2", w.address)
    hello = client_hello()
    t0 = time.monotonic()
    closed_at = None
    for i in range(len(hello)):                 # a byte every 0.3 s: each read is quick, the whole is not
        try:
            s.send(hello[i:i + 1])
        except OSError:
            closed_at = time.monotonic() - t0
            break
        if closed_by_peer(s, 0.3):
            closed_at = time.monotonic() - t0
            break
        if time.monotonic() - t0 > 4:
            break
    s.close()
    assert closed_at is not None and closed_at < 2.5, f"slow hello still open after {time.monotonic() - t0:.1f} s"


def test_a_thread_that_cannot_start_does_not_end_the_accept_loop(workers, monkeypatch):
    """Old: the accept loop's uncaught RuntimeError ended it for good (279 one-byte connections)."""
    (w,) = workers()
    real = threading.Thread
    failures = [0]

    class Failing(real):
        def start(self):
            if self.name.startswith("conn-") and failures[0] < 5:
                failures[0] += 1
                raise RuntimeError("can't start new thread")
            return super().start()
    monkeypatch.setattr(threading, "Thread", Failing)
    refused = []
    for _ in range(5):
        s = socket.create_connection(P.parse_address(w.address), timeout=5)
        refused.append(closed_by_peer(s, 2.0))          # closed at once, not left hanging
        s.close()
    monkeypatch.setattr(threading, "Thread", real)
    assert failures[0] == 5 and all(refused)
    assert ping(w) < 5.0


# --- finding 2: replayed hellos, idle connections, "wrong key" for busy ----------------------------------------

def test_a_replayed_hello_never_completes_nor_fills_the_slots(workers):
    (w,) = workers(max_connections=4, handshake_timeout=1.0)
    recorded = client_hello()                                   # one genuine hello, recorded
    replays = [sock_from("127.0.0.2", w.address) for _ in range(12)]
    for s in replays:
        s.sendall(recorded)
    time.sleep(0.3)
    assert len(w.server.conns) == 0, "a replayed hello was taken as an authenticated connection"
    assert all(closed_by_peer(s, 3.0) for s in replays), "a replayed hello was not closed at the deadline"
    for s in replays:
        s.close()
    assert ping(w) < 2.0


def test_an_idle_authenticated_connection_is_closed(workers):
    (w,) = workers(idle_timeout=1.0)
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "idle"})
    ch.sock.settimeout(5.0)
    t0 = time.monotonic()
    with pytest.raises((P.PeerClosed, OSError, P.ProtocolError)):
        ch.recv(lambda h: None)
    assert time.monotonic() - t0 < 4.0
    assert w.server.stats["idle_closed"] == 1
    # a connection that keeps talking stays
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "busy"})
    ch.sock.settimeout(2.0)
    for _ in range(6):
        ch.send({"kind": "ping", "t": 0})
        assert ch.recv(lambda h: None).kind == "pong"
        time.sleep(0.4)
    ch.close()



def test_an_idle_peer_link_is_closed_without_reporting_the_peer_down(workers):
    """A worker closes a peer worker's idle link with a ``bye`` first: the sending side drops the link and
    reconnects on its next frame, and neither side takes the close for the other device going down (a
    false failover of a healthy device in a long online run)."""
    from edgepart.runtime.transport import PeerLink
    (w,) = workers(idle_timeout=1.0)
    downs, failed = [], []
    link = PeerLink("w", w.address, KEY, {"role": "peer", "name": "other"}, None,
                    lambda req, f: failed.append(f), lambda d, why: downs.append((d, why)))
    peer_downs = []
    w.executor.peer_down = lambda name, why: peer_downs.append((name, why))
    try:
        link.put({"kind": "ping", "t": 0})
        deadline = time.monotonic() + 6.0
        while w.server.stats["idle_closed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert w.server.stats["idle_closed"] == 1
        time.sleep(0.5)
        assert link.writer.ch is None                      # dropped: the next frame reconnects
        assert not downs and not failed and not peer_downs, (downs, failed, peer_downs)
        link.put({"kind": "ping", "t": 0})
        deadline = time.monotonic() + 3.0
        while not w.server.conns and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.server.conns and not downs
    finally:
        link.close()

def test_refusals_say_busy_wrong_key_or_unreachable(workers):
    (w,) = workers(max_connections=1)
    first = P.Channel.connect(w.address, KEY, {"role": "client", "name": "a"})
    for _ in range(100):                                # the worker counts it once the confirmation arrived
        if w.server.conns:
            break
        time.sleep(0.02)
    try:
        with pytest.raises(P.WorkerBusy, match="busy") as e:
            P.Channel.connect(w.address, KEY, {"role": "client", "name": "b"})
        assert "wrong key" not in str(e.value)
    finally:
        first.close()
    with pytest.raises(P.AuthError, match="wrong key"):
        P.Channel.connect(w.address, os.urandom(32), {"role": "client", "name": "c"})
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(OSError):                        # the client turns this into "cannot reach ... unreachable"
        P.Channel.connect(f"127.0.0.1:{port}", KEY, {"role": "client", "name": "d"})


# --- finding 3: concurrent deploys -------------------------------------------------------------------------

def test_concurrent_deploys_of_one_bundle_all_succeed_and_keep_serving(workers, tiny):
    model, x, d = tiny
    ws = workers(2)
    endpoints = {"d0": ws[0].address, "d1": ws[1].address}
    ref = edgepart.load_bundle(d).run_local(x)
    errors, go = [], threading.Barrier(8)

    def client():
        try:
            go.wait()
            with Session(d, endpoints, KEY) as s:
                for _ in range(5):                  # other clients' commits must not fail these
                    assert_close(s.infer(x, timeout=20), ref, rel=1e-6)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_disk_errors_are_deploy_errors_naming_the_file(workers, tiny, monkeypatch):
    model, x, d = tiny
    ws = workers(2)

    real = deploy_mod.tempfile.mkstemp

    def no_space(*a, **kw):                     # the manifest is written; the device's files are not
        if kw.get("prefix", "").startswith("manifest.json"):
            return real(*a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret/worker/path")
    monkeypatch.setattr(deploy_mod.tempfile, "mkstemp", no_space)
    with pytest.raises(BundleError) as e:
        Session(d, {"d0": ws[0].address, "d1": ws[1].address}, KEY).close()
    msg = str(e.value)
    assert "No space left on device" in msg and "devices/d" in msg, msg
    assert "/srv/secret" not in msg and str(ws[0].workdir) not in msg and str(ws[1].workdir) not in msg
    monkeypatch.undo()
    with Session(d, {"d0": ws[0].address, "d1": ws[1].address}, KEY) as s:   # the connection and worker are fine
        s.infer(x)


# --- finding 4: paths outside the bundle, unlisted files, what errors reveal ------------------------------------

def raw_deploy(address, d: Path, device: str, peers: dict, manifest_bytes: bytes | None = None,
               signature=None, key=KEY) -> dict:
    """Deploy one device over a bare channel; the last header the worker answered with."""
    mb = manifest_bytes if manifest_bytes is not None else (d / "manifest.json").read_bytes()
    ch = P.Channel.connect(address, key, {"role": "client", "name": "raw"})
    ch.sock.settimeout(20)
    try:
        hdr = {"kind": "deploy", "device": device, "bundle": hashlib.sha256(mb).hexdigest(), "peers": peers}
        if signature is not None:
            hdr["signature"] = signature
        ch.send(hdr, [mb])
        h = ch.recv(lambda h: None).header
        if h["kind"] != "deploy_need":
            return h
        for rel in h["files"]:
            ch.send({"kind": "file", "path": rel}, [(d / rel).read_bytes()])
            h = ch.recv(lambda h: None).header
            if h["kind"] != "file_ok":
                return h
        ch.send({"kind": "commit"})
        return ch.recv(lambda h: None).header
    finally:
        ch.close()


def edited_manifest(d: Path, edit) -> bytes:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    return json.dumps(m).encode()


def test_manifest_paths_outside_the_bundle_are_refused_without_revealing_files(workers, tiny):
    _, _, d = tiny
    (w,) = workers()
    peers = {"d1": "127.0.0.1:1"}
    answers = {}
    for name, path in [("exists", "/etc/hostname"), ("absent", "/nonexistent/x"), ("dotdot", "../../etc/hostname")]:
        def edit(m, path=path):
            m["devices"]["d0"]["program"] = path
            m["devices"]["d0"]["files"][0] = path
            m["files"][path] = m["files"].pop("devices/d0.py")
        h = raw_deploy(w.address, d, "d0", peers, edited_manifest(d, edit))
        assert h["kind"] == "deploy_error", h
        answers[name] = h["message"].replace(path, "<path>")
    assert answers["exists"] == answers["absent"], answers          # nothing says whether the file exists
    assert str(w.workdir) not in " ".join(answers.values())
    assert w.server.sock is not None and ping(w) < 5


def test_unlisted_files_in_the_bundle_directory_are_reported(workers, tiny):
    _, _, d = tiny
    (w,) = workers()
    bid = hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
    planted = w.workdir / "bundles" / bid / "devices" / "sitecustomize.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("raise SystemExit('never loaded')\n")
    h = raw_deploy(w.address, d, "d0", {"d1": "127.0.0.1:1"})
    assert h["kind"] == "deploy_ok" and h.get("unlisted") == ["devices/sitecustomize.py"], h


# --- finding 5: memory ------------------------------------------------------------------------------------

def test_a_large_manifest_is_refused_before_it_is_read(workers):
    (w,) = workers()
    ch = P.Channel.connect(w.address, KEY, {"role": "client", "name": "big"})
    seq = ch._seq_send
    ch._seq_send += 1
    hj = json.dumps({"kind": "deploy", "device": "d0", "bundle": "0" * 64, "peers": {}}).encode()
    fixed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 64 << 20)          # 64 MiB claimed, none sent
    ch.sock.sendall(fixed + hj + P.mac(ch._k_send, b"h\x00\x00\x00" + seq.to_bytes(8, "big"), fixed + hj))
    ch.sock.settimeout(3)
    f = ch.recv(lambda h: None)
    assert f.kind == "refused" and "bound" in f.get("reason"), f.header
    assert deploy_mod.MAX_MANIFEST <= 8 << 20
    ch.close()


def test_release_memory_hands_memory_back():
    assert release_memory() in (True, False)            # no error off glibc; on glibc it ran


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_flood_leaves_memory_flat_and_a_client_served(tmp_path):
    """A bare worker process: 150 silent connections and 40 replayed hellos from other addresses,
    held open; a client is served meanwhile, and the worker's RSS afterwards is within a few MB of
    where it was. (benchmarks/flood.py runs the issue's 1,000 + 300.)"""
    import subprocess
    import sys
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())
    proc = subprocess.Popen([sys.executable, "-m", "edgepart.runtime.worker", "--listen", "127.0.0.1:0",
                             "--key-file", str(key_file), "--log-level", "ERROR"],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        addr = line.split()[-1]

        class W:
            address = addr
        ping(W)
        time.sleep(0.3)
        before = rss_kb(proc.pid)
        recorded_hello = client_hello(KEY)
        held = []
        for i in range(120):
            held.append(sock_from(f"127.0.0.{2 + i % 50}", addr))
        for i in range(40):
            s = sock_from(f"127.0.1.{2 + i % 20}", addr)
            s.sendall(recorded_hello)
            held.append(s)
        served = ping(W)
        for s in held:
            s.close()
        time.sleep(1.5)                                # the worker trims once the handshakes are gone
        after = rss_kb(proc.pid)
        assert served < 5.0, f"served after {served:.2f} s"
        assert after - before < 20 * 1024, f"RSS {before} -> {after} kB"
    finally:
        proc.terminate()
        proc.wait(10)


# --- finding 6: deep JSON, probes, key files -------------------------------------------------------------------

def test_deeply_nested_manifest_json_is_a_deploy_error(workers):
    (w,) = workers()
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000          # 0.6 MB: under the manifest limit
    h = raw_deploy(w.address, Path("/nonexistent"), "d0", {}, manifest_bytes=deep)
    assert h["kind"] == "deploy_error", h
    assert ping(w) < 5


def test_probes_go_only_to_the_bundles_peers_and_are_limited(workers, tiny):
    from edgepart.fcpm import probe
    _, _, d = tiny
    ws = workers(2)
    for w in ws:
        probe.register(w)
    with Session(d, {"d0": ws[0].address, "d1": ws[1].address}, KEY):
        ch = P.Channel.connect(ws[0].address, KEY, {"role": "client", "name": "p"})
        ch.sock.settimeout(10)
        ch.send({"kind": "probe", "self": "d0", "peer": "d1", "address": "127.0.0.1:22", "options": {"pings": 1}})
        f = ch.recv(lambda h: None)
        assert f.kind == "probe_error" and "not the address of a peer" in f.get("message"), f.header
        ch.close()


@pytest.mark.parametrize("content", [b"a" * 16, b"a" * 64, bytes(32), b"0" * 64, b"correct horse battery staple!!!!!"])
def test_weak_key_files_are_refused(tmp_path, content):
    p = tmp_path / "key"
    p.write_bytes(content)
    with pytest.raises(EdgepartError, match="key"):
        P.read_key(p)


def test_a_random_key_file_is_taken(tmp_path):
    from edgepart.runtime.signing import generate_run_key
    p = generate_run_key(tmp_path / "run.key")
    assert len(P.read_key(p)) == 32 and (p.stat().st_mode & 0o777) == 0o600


# --- trust model: deploy keys ------------------------------------------------------------------------------

def test_only_deploys_signed_with_the_deploy_key_are_taken(workers, tiny, tmp_path):
    model, x, d = tiny
    priv, pub = generate_deploy_key(tmp_path / "deploy.key")
    other, _ = generate_deploy_key(tmp_path / "other.key")
    ws = workers(2, deploy_pubkey=load_public_key(pub))
    endpoints = {"d0": ws[0].address, "d1": ws[1].address}
    # the run key alone cannot deploy
    with pytest.raises(BundleError, match="unsigned"):
        Session(d, endpoints, KEY).close()
    # another deploy key's signature is refused
    with pytest.raises(BundleError, match="signed with another key"):
        Session(d, endpoints, KEY, sign_key=load_private_key(other)).close()
    # a signature for other peers is refused (the worker would send its pieces elsewhere)
    key = load_private_key(priv)
    h = raw_deploy(ws[0].address, d, "d0", {"d1": "10.9.9.9:7700"},
                   signature=sign_deploy(key, hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest(), "d0",
                                         {"d1": ws[1].address}))
    assert h["kind"] == "deploy_error" and "signed with another key" in h["message"]
    # the right key: deployed and serving; run-key holders then run requests
    with Session(d, endpoints, KEY, sign_key=key) as s:
        assert_close(s.infer(x), edgepart.load_bundle(d).run_local(x), rel=1e-6)
    with Session(d, endpoints, KEY, deploy=False) as s:
        s.infer(x)


# --- fuzz: the worker stays up and keeps serving --------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@pytest.fixture(scope="module")
def fuzz_worker():
    (w,) = start(1, handshake_timeout=0.5)
    yield w
    w.stop()


def _send_and_close(address, data: bytes, authed: bool) -> None:
    if authed:
        ch = P.Channel.connect(address, KEY, {"role": "client", "name": "fuzz"})
        s = ch.sock
    else:
        s = socket.create_connection(P.parse_address(address), timeout=2)
    try:
        s.settimeout(0.5)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.recv(4096)
    except OSError:
        pass
    finally:
        s.close()


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.binary(max_size=2048), authed=st.booleans())
def test_fuzz_random_bytes(fuzz_worker, data, authed):
    _send_and_close(fuzz_worker.address, data, authed)


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(hlen=st.integers(0, 2 ** 32 - 1), plen=st.integers(0, 2 ** 64 - 1), version=st.integers(0, 255),
                  flags=st.integers(0, 255), authed=st.booleans())
def test_fuzz_fixed_headers_with_huge_lengths(fuzz_worker, hlen, plen, version, flags, authed):
    fixed = P.FIXED.pack(P.MAGIC, version, flags, 0, hlen, plen)
    _send_and_close(fuzz_worker.address, fixed + os.urandom(64), authed)


@hypothesis.settings(max_examples=80, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(kind=st.sampled_from(["ping", "deploy", "file", "commit", "input", "piece", "begin", "cancel",
                                        "fail", "stats", "bye", "probe", "nonsense"]),
                  flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(1, 255)), max_size=4),
                  cut=st.integers(0, 4096), payload=st.binary(max_size=512), valid_mac=st.booleans())
def test_fuzz_mutated_valid_frames(fuzz_worker, kind, flips, cut, payload, valid_mac):
    ch = P.Channel.connect(fuzz_worker.address, KEY, {"role": "client", "name": "fuzz"})
    frame = bytearray(raw_frame(ch._k_send, 2, {"kind": kind, "req": "x:1", "path": "devices/d0.py",
                                                "parts": [["float32", [1, 2]]]}, payload))
    if not valid_mac:
        for at, x in flips:
            frame[at % len(frame)] ^= x
    frame = frame[:max(1, cut)] if cut < len(frame) else frame
    try:
        ch.sock.settimeout(0.5)
        ch.sock.sendall(bytes(frame))
        ch.sock.shutdown(socket.SHUT_WR)
        ch.sock.recv(4096)
    except OSError:
        pass
    ch.close()


def test_fuzzed_worker_is_alive_and_serving(fuzz_worker):
    """Runs after the fuzz tests above (same module worker)."""
    assert ping(fuzz_worker) < 5
    assert any(t.name == "accept" for t in threading.enumerate())



# --- finding 6: what users type ---------------------------------------------------------------------------------

@pytest.mark.parametrize("desc, match", [
    ({"devices": [{"name": "a", "speed": "fast"}]}, r"devices\[0\] \(device 'a'\): speed must be a number, got 'fast'"),
    ({"devices": [{"name": "a", "speed": float("inf")}]}, r"devices\[0\].*speed must be a finite number"),
    ({"devices": [{"name": "a"}], "links": {"default": {"bandwidth_mbps": "100Mbps"}}},
     r"links\.default: bandwidth_mbps must be a number, got '100Mbps'"),
    ({"devices": [{"name": "a"}], "links": {"default": {"bandwith_mbps": 100}}},
     r"links\.default: unknown key 'bandwith_mbps' \(did you mean 'bandwidth_mbps'\?\)"),
    ({"devices": [{"name": "a"}, {"name": "b"}], "links": {"overrides": [{"a": "a", "b": "b", "latency_ms": -1}]}},
     r"links\.overrides\[0\]: latency_ms must be >= 0, got -1"),
    ({"devices": [{"name": "a"}], "colour": "red"}, r"top level: unknown key 'colour'"),
    ({"devices": [{"name": "a", "memory_mb": True}]}, r"memory_mb must be a number"),
])
def test_cluster_descriptions_are_checked_naming_the_key(desc, match):
    with pytest.raises(edgepart.ClusterError, match=match):
        edgepart.Cluster.from_dict(desc)


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from edgepart.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raises.py").write_text("def f():\n    raise RuntimeError('boom')\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "conv.py").write_text("import torch\ndef f():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    (tmp_path / "c.yaml").write_text("devices:\n  - {name: a, speed: fast}\n")
    (tmp_path / "afile").write_text("")
    cases = [(["compile", "raises.py:f", "--out", "o"], "the factory raised RuntimeError: boom"),
             (["compile", "broken.py:f", "--out", "o"], "broken.py, line 1: syntax error"),
             (["compile", "conv.py:f", "--input-shape", "a,b", "--out", "o"], "--input-shape 'a,b'"),
             (["compile", "tinynet", "--out", "afile"], "--out afile: is a file"),
             (["compile", "tinynet", "--cluster", "c.yaml", "--out", "o"], "speed must be a number, got 'fast'"),
             (["compile", "tinynet", "--cluster", "none.yaml", "--out", "o"], "none.yaml"),
             (["worker", "--key-file", "afile"], "key file afile is empty"),
             (["keygen"], "give --run FILE")]
    for args, message in cases:
        code = main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
    with pytest.raises(EdgepartError, match="boom"):                  # --debug: the exception, traceback and all
        main(["--debug", "compile", "raises.py:f", "--out", "o"])


def test_cli_keygen_then_a_signed_deploy(tmp_path, tiny, workers, capsys):
    from edgepart.cli import main
    _, x, d = tiny
    assert main(["keygen", "--run", str(tmp_path / "run.key")]) == 0
    assert main(["keygen", "--deploy", str(tmp_path / "deploy.key")]) == 0
    run_key = P.read_key(tmp_path / "run.key")
    ws = [Worker("127.0.0.1:0", run_key, deploy_pubkey=load_public_key(tmp_path / "deploy.key.pub"))
          for _ in range(2)]
    try:
        for w in ws:
            w.start()
        (tmp_path / "ep.yaml").write_text(f"d0: {ws[0].address}\nd1: {ws[1].address}\n")
        base = ["deploy", str(d), "--endpoints", str(tmp_path / "ep.yaml"), "--key-file", str(tmp_path / "run.key")]
        assert main(base) == 2 and "unsigned" in capsys.readouterr().err
        assert main(base + ["--sign-key", str(tmp_path / "deploy.key")]) == 0
        assert ws[0].device == "d0" and ws[1].device == "d1"
    finally:
        for w in ws:
            w.stop()


def test_an_infeasible_memory_limit_names_memory_and_the_shortfall():
    model, (x,) = zoo.get("tinynet")
    cl = edgepart.Cluster.from_dict({"devices": [{"name": "a", "memory_mb": 0.01}, {"name": "b", "memory_mb": 0.01}]})
    with pytest.raises(edgepart.PlanError, match=r"no plan fits the devices' memory.*MiB short"):
        edgepart.compile(model, (x,), cl, strategy="ofpm")


def test_cluster_file_errors_give_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("devices:\n  - {name: a, speed: 1}\n  - name: b\n    speed: fast\nlinks:\n  default:\n"
                 "    bandwith_mbps: 100\n")
    with pytest.raises(edgepart.ClusterError, match=r"c\.yaml, line 4: devices\[1\] \(device 'b'\): speed"):
        edgepart.Cluster.from_file(p)
    p.write_text("devices:\n  - {name: a}\nlinks:\n  default:\n    bandwith_mbps: 100\n")
    with pytest.raises(edgepart.ClusterError, match=r"c\.yaml, line 5: links\.default: unknown key 'bandwith_mbps'"):
        edgepart.Cluster.from_file(p)


def test_a_worker_taking_only_signed_deploys_takes_no_measuring_requests_unless_allowed():
    from edgepart import worker_main
    p = worker_main.build_parser()
    assert worker_main.measuring_allowed(p.parse_args(["--key-file", "k"]))
    assert not worker_main.measuring_allowed(p.parse_args(["--key-file", "k", "--deploy-pubkey", "d.pub"]))
    assert worker_main.measuring_allowed(p.parse_args(["--key-file", "k", "--deploy-pubkey", "d.pub",
                                                       "--allow-measuring"]))


def test_a_slow_program_load_does_not_silence_the_worker(tiny, workers, monkeypatch, tmp_path):
    """Loading a deployed program takes seconds on a slow device; meanwhile the worker answers pings on the
    deploying connection, so a client with a short ``dead_after`` does not take it for dead (an online
    run failed over from a healthy device that was loading a candidate plan)."""
    from edgepart.runtime import deploy as deploy_module
    model, x, d = tiny
    other = tmp_path / "other"
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="single").save(other)
    ws = workers(2)
    downs = []
    with Session(d, {"d0": ws[0].address, "d1": ws[1].address}, KEY, resubmit=True, heartbeat=0.2,
                 dead_after=0.8, on_event=lambda kind, info: downs.append(info) if kind == "device_down" else None) as s:
        assert_close(s.infer(x, timeout=30), model(x))
        real = deploy_module.DeviceProgram.from_bundle

        def slow(*a, **kw):
            time.sleep(2.0)
            return real(*a, **kw)
        monkeypatch.setattr(deploy_module.DeviceProgram, "from_bundle", staticmethod(slow))
        t0 = time.monotonic()
        pv = s.deploy_plan(other)                               # while the heartbeats go on
        assert time.monotonic() - t0 >= 2.0                     # the load was slow ...
        s.switch(pv)
        assert_close(s.infer(x, timeout=30), model(x))
        assert not downs, downs                                 # ... and no device was taken for dead
