"""Wire format: round trips, and every malformed or unauthentic frame refused before allocation."""
import hashlib
import io
import json
import os
import socket
import threading

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from edgepart.runtime import protocol as P

KEY = b"k" * 32

pytestmark = pytest.mark.timeout(30)


def channel_pair(key_c=KEY, key_s=KEY, max_payload=P.DEFAULT_MAX_PAYLOAD):
    a, b = socket.socketpair()
    out = {}

    def server():
        try:
            out["s"] = P.Channel.server_handshake(b, key_s, {"role": "worker", "name": "w"}, max_payload=max_payload)
        except Exception as e:  # noqa: BLE001
            out["err"] = e
            b.close()
    t = threading.Thread(target=server)
    t.start()
    try:
        c = P.Channel.client_handshake(a, key_c, {"role": "client", "name": "c"})
    finally:
        t.join()
    if "err" in out:
        raise out["err"]
    return c, out["s"]


def mac(key, nonce, data) -> bytes:
    """MAC(k, n, m) computed independently of the protocol module: ChaCha20-Poly1305, empty plaintext, m as AAD."""
    return ChaCha20Poly1305(key).encrypt(nonce, b"", bytes(data))


def payload_tag(key, seq, parts) -> bytes:
    """The payload tag of docs/wire-format.md: every part cut into 256 KiB chunks, a tag per chunk, a tag over those."""
    n8 = seq.to_bytes(8, "big")
    tags = []
    for part in parts:
        for i in range(0, len(part), 256 << 10):
            tags.append(mac(key, b"c" + len(tags).to_bytes(3, "big") + n8, part[i:i + (256 << 10)]))
    return mac(key, b"p\x00\x00\x00" + n8, b"".join(tags))


def raw_frame(key, seq, header: dict, payload: bytes, plen=None, magic=P.MAGIC, version=P.VERSION,
              bad_mac=False, bad_header_mac=False):
    """A session frame built from the spec in docs/wire-format.md (not with the protocol module's code)."""
    hj = json.dumps(header).encode()
    fixed = P.FIXED.pack(magic, version, 0, 0, len(hj), len(payload) if plen is None else plen)
    hm = mac(key, b"h\x00\x00\x00" + seq.to_bytes(8, "big"), fixed + hj)
    pm = payload_tag(key, seq, [payload]) if payload else b""
    if bad_header_mac:
        hm = bytes(16)
    if bad_mac:
        pm = bytes(16)
    return fixed + hj + hm + payload + pm


def spec_expect(specs):
    return lambda h: specs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
                                   torch.bool])
def test_roundtrip_dtypes(dtype):
    c, s = channel_pair()
    x = (torch.randn(1, 3, 5, 7) * 10).to(dtype)
    c.send({"kind": "piece", "req": "r1", "tensor": "t"}, [x])
    f = s.recv(spec_expect([(P.dtype_name(dtype), (1, 3, 5, 7))]))
    assert f.kind == "piece" and f.get("req") == "r1"
    assert f.parts[0].dtype == dtype and torch.equal(f.parts[0], x)


def test_roundtrip_many_parts_both_directions_and_noncontiguous():
    c, s = channel_pair()
    a = torch.randn(1, 4, 8, 8)[:, :, 2:5]          # a row slice: not contiguous
    b = torch.arange(10)
    e = torch.zeros(1, 4, 0, 8)                     # empty piece
    c.send({"kind": "x"}, [a, b, e])
    f = s.recv(spec_expect([("float32", (1, 4, 3, 8)), ("int64", (10,)), ("float32", (1, 4, 0, 8))]))
    assert torch.equal(f.parts[0], a) and torch.equal(f.parts[1], b) and f.parts[2].shape == (1, 4, 0, 8)
    s.send({"kind": "y", "n": 1})
    assert c.recv(lambda h: None).get("n") == 1
    for i in range(20):                              # sequence numbers advance in step
        c.send({"kind": "z", "i": i}, [b])
        assert s.recv(spec_expect([("int64", (10,))])).get("i") == i


def test_large_payload_and_raw_bytes_and_file_sink(tmp_path):
    c, s = channel_pair()
    big = torch.randn(1, 64, 256, 256)              # 16 MiB: several receive chunks
    t = threading.Thread(target=lambda: c.send({"kind": "piece"}, [big]))
    t.start()
    f = s.recv(spec_expect([("float32", tuple(big.shape))]))
    t.join()
    assert torch.equal(f.parts[0], big)
    c.send({"kind": "blob"}, [b"hello world"])
    assert s.recv(lambda h: 100).parts[0] == b"hello world"
    data = os.urandom(100_000)
    c.send({"kind": "file"}, [data])
    buf = io.BytesIO()
    sink = P.FileSink(buf, 1 << 20)
    s.recv(lambda h: sink)
    assert buf.getvalue() == data and sink.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


def test_wrong_key_refused_in_hello():
    with pytest.raises(P.ProtocolError):
        channel_pair(key_c=b"x" * 32)


def refused(frame_bytes, expect=None, match=None, max_payload=P.DEFAULT_MAX_PAYLOAD, close=False):
    c, s = channel_pair(max_payload=max_payload)
    c.sock.sendall(frame_bytes)
    if close:
        c.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(P.ProtocolError, match=match):
        s.recv(expect or (lambda h: None))


def test_refusals():
    k = None
    c, s = channel_pair()
    k = c._k_send
    # bad magic / version / header length / payload bound (checked from the fixed header: nothing allocated)
    c.sock.sendall(raw_frame(k, 2, {"kind": "x"}, b"", magic=b"HTTP"))
    with pytest.raises(P.ProtocolError, match="magic"):
        s.recv(lambda h: None)

    def fresh(header, payload=b"", **kw):
        c, s = channel_pair(max_payload=kw.pop("max_payload", P.DEFAULT_MAX_PAYLOAD))
        c.sock.sendall(raw_frame(c._k_send, 2, header, payload, **kw))
        c.sock.shutdown(socket.SHUT_WR)
        return s

    with pytest.raises(P.ProtocolError, match="version"):
        fresh({"kind": "x"}, version=9).recv(lambda h: None)
    with pytest.raises(P.ProtocolError, match="limit"):
        fresh({"kind": "piece"}, plen=100 * 10**9).recv(lambda h: None)          # 100 GB claimed
    with pytest.raises(P.AuthError):
        fresh({"kind": "x"}, bad_header_mac=True).recv(lambda h: None)
    with pytest.raises(P.AuthError, match="frame MAC"):
        fresh({"kind": "b"}, b"abc", bad_mac=True).recv(lambda h: 10)
    # authentic headers that do not match what the receiver expects
    spec = [("float32", (1, 2, 3, 4))]
    good = torch.zeros(1, 2, 3, 4)
    hdr = {"kind": "piece", "parts": [["float32", [1, 2, 3, 4]]]}
    with pytest.raises(P.ProtocolError, match="expected"):
        fresh({**hdr, "parts": [["float64", [1, 2, 3, 4]]]}, bytes(192)).recv(spec_expect(spec))
    with pytest.raises(P.ProtocolError, match="expected"):
        fresh({**hdr, "parts": [["float32", [1, 2, 30, 4]]]}, bytes(960)).recv(spec_expect(spec))
    with pytest.raises(P.ProtocolError, match="not allowed"):
        fresh({**hdr, "parts": [["object", [1]]]}, bytes(8)).recv(spec_expect(spec))
    with pytest.raises(P.ProtocolError, match="payload length"):
        fresh(hdr, bytes(95), plen=10**6).recv(spec_expect(spec))                 # more than the spec implies
    with pytest.raises(P.ProtocolError, match="truncated"):
        fresh(hdr, P.tensor_bytes(good).tobytes()[:50], plen=96).recv(spec_expect(spec))
    with pytest.raises(P.ProtocolError, match="must not carry"):
        fresh({"kind": "ping"}, b"xx").recv(lambda h: None)
    with pytest.raises(P.ProtocolError, match="bound"):
        fresh({"kind": "blob"}, bytes(200)).recv(lambda h: 100)
    with pytest.raises(P.ProtocolError, match="JSON"):
        fresh({"kind": "x"})
        # a header that is authentic but not JSON
        c3, s3 = channel_pair()
        hj = b"\xff\xfe not json"
        fixed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 0)
        c3.sock.sendall(fixed + hj + mac(c3._k_send, b"h\x00\x00\x00" + (2).to_bytes(8, "big"), fixed + hj))
        s3.recv(lambda h: None)


def test_replayed_frame_refused():
    c, s = channel_pair()
    frame = raw_frame(c._k_send, 2, {"kind": "a"}, b"")
    c.sock.sendall(frame)
    s.recv(lambda h: None)
    c.sock.sendall(frame)                            # same bytes again: seq 2 is used up
    with pytest.raises(P.AuthError):
        s.recv(lambda h: None)


def test_truncated_fixed_header_and_eof():
    c, s = channel_pair()
    c.sock.sendall(b"EPR")
    c.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(P.ProtocolError, match="truncated"):
        s.recv(lambda h: None)
    c, s = channel_pair()
    c.close()
    with pytest.raises(P.PeerClosed):
        s.recv(lambda h: None)


def test_parse_address_and_keys(tmp_path):
    assert P.parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    with pytest.raises(ValueError):
        P.parse_address("nohost")
    f = tmp_path / "k"
    key = os.urandom(32)
    f.write_text(key.hex())
    assert P.read_key(f) == key
    f.write_text("ab" * 32)                          # hex, but one byte value repeated: not a random key
    with pytest.raises(Exception, match="not random"):
        P.read_key(f)
    with pytest.raises(Exception):
        P.as_key(b"short")


def read_raw_frame(sock, payload=True):
    """Read one session frame's raw fields off a socket (fixed, json, header tag, payload, payload tag)."""
    fixed = P._recv_exact(sock, P.FIXED.size)
    _, _, _, _, hlen, plen = P.FIXED.unpack(fixed)
    hj = bytes(P._recv_exact(sock, hlen))
    htag = bytes(P._recv_exact(sock, 16))
    body = bytes(P._recv_exact(sock, plen))
    ptag = bytes(P._recv_exact(sock, 16)) if plen else b""
    return bytes(fixed), hj, htag, body, ptag


@pytest.mark.parametrize("shape,extra", [((1, 2, 3, 4), False), ((1, 16, 32, 32), False), ((1, 2, 3, 4), True),
                                         ((1, 64, 64, 64), False), ((1, 3, 100, 1000), True)])
def test_frames_on_the_wire_match_the_spec(shape, extra):
    """What Channel.send writes verifies with an independent computation of the documented tags
    (one chunk, several chunks, several parts)."""
    c, s = channel_pair()
    x = torch.randn(*shape)
    parts = [x, torch.arange(3)] if extra else [x]
    descr = [["float32", list(shape)]] + ([["int64", [3]]] if extra else [])
    for seq in (2, 3):                               # seq 1 was the client's key confirmation
        t = threading.Thread(target=lambda: c.send({"kind": "piece", "n": seq}, parts))
        t.start()
        fixed, hj, htag, body, ptag = read_raw_frame(s.sock)
        t.join()
        assert htag == mac(s._k_recv, b"h\x00\x00\x00" + seq.to_bytes(8, "big"), fixed + hj)
        assert ptag == payload_tag(s._k_recv, seq, [body[:x.numel() * 4], body[x.numel() * 4:]])
        assert json.loads(hj)["parts"] == descr
        assert body[:x.numel() * 4] == P.tensor_bytes(x).tobytes()
    c.send({"kind": "ping"})                         # no payload: no payload tag
    fixed, hj, htag, body, ptag = read_raw_frame(s.sock)
    assert P.FIXED.unpack(fixed)[5] == 0 and body == ptag == b""
    assert htag == mac(s._k_recv, b"h\x00\x00\x00" + (4).to_bytes(8, "big"), fixed + hj)


def test_reordered_reflected_and_spliced_frames_refused():
    # reordered: frame 2 arrives first
    c, s = channel_pair()
    f1 = raw_frame(c._k_send, 2, {"kind": "a"}, b"x" * 10)
    f2 = raw_frame(c._k_send, 3, {"kind": "b"}, b"y" * 10)
    c.sock.sendall(f2 + f1)
    with pytest.raises(P.AuthError, match="header MAC"):
        s.recv(lambda h: 10)
    # reflected: a frame the server sent, played back to it
    c, s = channel_pair()
    s.send({"kind": "a"}, [b"hello"])
    frame = c.sock.recv(1000)
    c.sock.sendall(frame)
    with pytest.raises(P.AuthError):
        s.recv(lambda h: 10)
    # spliced: an authentic header with the payload (and tag) of another frame of the same size
    c, s = channel_pair()
    f1 = raw_frame(c._k_send, 2, {"kind": "a"}, b"1" * 10)
    f2 = raw_frame(c._k_send, 3, {"kind": "a"}, b"2" * 10)
    hlen = len(f1) - 10 - 16
    c.sock.sendall(f1[:hlen] + f2[hlen:])
    with pytest.raises(P.AuthError, match="frame MAC"):
        s.recv(lambda h: 10)


def test_tampered_large_payload_refused_after_receipt():
    """A flipped byte deep inside a chunked (multi-chunk) payload fails the payload tag."""
    c, s = channel_pair()
    x = torch.randn(1, 8, 128, 128)                  # 512 KiB: two chunks
    tshape = list(x.shape)
    body = bytearray(P.tensor_bytes(x).tobytes())
    frame = bytearray(raw_frame(c._k_send, 2, {"kind": "piece", "parts": [["float32", tshape]]}, bytes(body)))
    frame[-16 - 300_000] ^= 1
    t = threading.Thread(target=lambda: c.sock.sendall(frame))
    t.start()
    with pytest.raises(P.AuthError, match="frame MAC"):
        s.recv(spec_expect([("float32", tuple(tshape))]))
    t.join()


def test_back_to_back_frames_and_staging():
    """Many small and large frames written in one go are split correctly (staging buffer, direct receives)."""
    c, s = channel_pair()
    sizes = [0, 1, 7, 1000, 5000, 9000, 70_000, 300_000, 3, 0, 16_384]
    blobs = [os.urandom(n) for n in sizes]
    t = threading.Thread(target=lambda: [c.send({"kind": "b", "i": i, "pad": "p" * (i * 1500)}, [b])
                                         for i, b in enumerate(blobs)])
    t.start()
    for i, b in enumerate(blobs):
        f = s.recv(lambda h: 1 << 20)
        assert f.get("i") == i and f.parts[0] == b
    t.join()


def test_idle_waits_but_a_stalled_frame_times_out(monkeypatch):
    """Between frames a channel waits indefinitely; a gap inside a frame longer than FRAME_TIMEOUT is refused.

    A timeout the caller sets on the socket surfaces as TimeoutError while idle (remote profiling relies on it)."""
    monkeypatch.setattr(P, "FRAME_TIMEOUT", 1.0)
    c, s = channel_pair()
    got = []
    t = threading.Thread(target=lambda: got.append(s.recv(lambda h: None)))
    t.start()
    t.join(2.5)                                       # idle for longer than FRAME_TIMEOUT: still waiting
    assert t.is_alive() and not got
    c.send({"kind": "late"})
    t.join(10)
    assert got and got[0].kind == "late"
    frame = raw_frame(c._k_send, 3, {"kind": "stalled"}, b"")
    c.sock.sendall(frame[:30])                        # a frame that stops half way, connection left open
    with pytest.raises(P.ProtocolError, match="truncated"):
        s.recv(lambda h: None)
    c, s = channel_pair()
    s.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        s.recv(lambda h: None)


def test_send_nowait_never_blocks_and_keeps_frame_order():
    """A frame the socket takes only part of is finished later, before any other frame: order and bytes intact."""
    c, s = channel_pair()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    blobs = [os.urandom(40_000) for _ in range(6)]
    committed = []
    for i, b in enumerate(blobs):                     # the peer is not reading: the buffer fills up
        if c.send_nowait({"kind": "b", "i": i}, [b]):
            committed.append(i)
        else:
            break
    assert committed and c.tail_pending              # part of the last committed frame is still unsent
    assert not c.send_nowait({"kind": "b", "i": 99}, [b"x"])    # refused, nothing consumed
    rest = [i for i in range(len(blobs)) if i not in committed]
    t = threading.Thread(target=lambda: [c.send({"kind": "b", "i": i}, [blobs[i]]) for i in rest] + [c.flush()])
    t.start()
    for i in range(len(blobs)):
        f = s.recv(lambda h: 1 << 20)
        assert f.get("i") == i and f.parts[0] == blobs[i]
    t.join()
    assert not c.tail_pending
