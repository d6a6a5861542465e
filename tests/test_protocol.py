"""Wire format: round trips, and every malformed or unauthentic frame refused before allocation."""
import hashlib
import hmac
import io
import json
import os
import socket
import threading

import pytest
import torch

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


def raw_frame(key, seq, header: dict, payload: bytes, plen=None, magic=P.MAGIC, version=P.VERSION,
              bad_mac=False, bad_header_mac=False):
    hj = json.dumps(header).encode()
    fixed = P.FIXED.pack(magic, version, 0, 0, len(hj), len(payload) if plen is None else plen)
    h = hmac.new(key, seq.to_bytes(8, "big"), hashlib.sha256)
    h.update(fixed)
    h.update(hj)
    hm = h.copy().digest()
    h.update(payload)
    mac = h.digest()
    if bad_header_mac:
        hm = bytes(32)
    if bad_mac:
        mac = bytes(32)
    return fixed + hj + hm + payload + mac


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
    c.sock.sendall(raw_frame(k, 1, {"kind": "x"}, b"", magic=b"HTTP"))
    with pytest.raises(P.ProtocolError, match="magic"):
        s.recv(lambda h: None)

    def fresh(header, payload=b"", **kw):
        c, s = channel_pair(max_payload=kw.pop("max_payload", P.DEFAULT_MAX_PAYLOAD))
        c.sock.sendall(raw_frame(c._k_send, 1, header, payload, **kw))
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
        s2 = fresh({"kind": "x"})
        # a header that is authentic but not JSON
        c3, s3 = channel_pair()
        hj = b"\xff\xfe not json"
        fixed = P.FIXED.pack(P.MAGIC, P.VERSION, 0, 0, len(hj), 0)
        h = hmac.new(c3._k_send, (1).to_bytes(8, "big"), hashlib.sha256)
        h.update(fixed)
        h.update(hj)
        c3.sock.sendall(fixed + hj + h.copy().digest() + h.digest())
        s3.recv(lambda h: None)


def test_replayed_frame_refused():
    c, s = channel_pair()
    frame = raw_frame(c._k_send, 1, {"kind": "a"}, b"")
    c.sock.sendall(frame)
    s.recv(lambda h: None)
    c.sock.sendall(frame)                            # same bytes again: seq 1 is used up
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
    f.write_text("ab" * 32)
    assert P.read_key(f) == bytes.fromhex("ab" * 32)
    with pytest.raises(Exception):
        P.as_key(b"short")
