"""The wire format: authenticated, length-prefixed frames carrying raw tensor bytes.

One frame (see docs/wire-format.md for the full description)::

    fixed header   20 bytes  "!4sBBHIQ": magic b"EPRT", version, flags, reserved, header_len, payload_len
    JSON header    header_len bytes (UTF-8, a JSON object with at least "kind")
    header MAC     32 bytes  HMAC-SHA256(k_dir, seq || fixed || json)
    payload        payload_len bytes: the frame's parts, back to back (raw tensor bytes or a file)
    frame MAC      32 bytes  HMAC-SHA256(k_dir, seq || fixed || json || payload)

``k_dir`` is a per-connection, per-direction key derived in the hello exchange from
the shared key and two fresh nonces; ``seq`` counts frames per direction, so a frame
cannot be replayed, reordered, reflected or moved to another connection. The header
MAC lets a receiver authenticate the sizes a frame claims *before* it allocates
anything; the frame MAC then covers the payload. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from edgepart.errors import EdgepartError

MAGIC = b"EPRT"
VERSION = 1
FIXED = struct.Struct("!4sBBHIQ")
MAC_LEN = 32
MAX_HEADER = 64 * 1024                 # bytes of JSON header
DEFAULT_MAX_PAYLOAD = 1 << 30          # 1 GiB: no frame is ever larger, whatever it claims
HANDSHAKE_TIMEOUT = 5.0
FRAME_TIMEOUT = 30.0                    # once a frame has started, the rest must arrive within this
CHUNK = 4 << 20                         # payload is received and hashed in chunks of this size

# dtype names allowed on the wire (an allow-list: anything else is refused)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8


class ProtocolError(EdgepartError):
    """A frame was refused: malformed, too large, unexpected, or not authentic."""


class AuthError(ProtocolError):
    """A MAC did not verify (wrong key, tampering, replay)."""


class PeerClosed(ConnectionError):
    """The other end closed the connection (cleanly, between frames)."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent (allowed: {sorted(DTYPES)})") from None


def part_nbytes(dtype: str, shape: Sequence[int]) -> int:
    n = DTYPES[dtype].itemsize
    for s in shape:
        n *= s
    return n


def check_part(p: Any) -> tuple[str, tuple[int, ...]]:
    """Validate one ``[dtype, shape]`` entry of a header (shape of non-negative ints, dtype allowed)."""
    if not (isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)):
        raise ProtocolError(f"malformed part {str(p)[:80]!r}: expected [dtype, [shape...]]")
    dtype, shape = p
    if dtype not in DTYPES:
        raise ProtocolError(f"dtype {dtype[:20]!r} is not allowed (allowed: {sorted(DTYPES)})")
    if len(shape) > MAX_DIMS or not all(type(s) is int and 0 <= s < (1 << 40) for s in shape):
        raise ProtocolError(f"bad shape {str(shape)[:80]}: at most {MAX_DIMS} non-negative ints")
    return dtype, tuple(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous tensor (any allowed dtype)."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class FileSink:
    """Payload destination that streams to an open binary file instead of memory."""

    def __init__(self, f, max_bytes: int):
        self.f = f
        self.max_bytes = max_bytes
        self.sha256 = hashlib.sha256()
        self.written = 0


@dataclass
class Frame:
    header: dict
    parts: list                      # list of torch.Tensor, or [bytes], or [] (FileSink: written to file)

    @property
    def kind(self) -> str:
        return self.header["kind"]

    def get(self, key, default=None):
        return self.header.get(key, default)


def _kdf(key: bytes, *items: bytes) -> bytes:
    return hmac.new(key, b"edgepart-v1|" + b"|".join(items), hashlib.sha256).digest()


def _send_all(sock: socket.socket, bufs: list) -> None:
    """sendmsg a list of buffers without joining them, resuming after partial sends."""
    bufs = [memoryview(b).cast("B") if not isinstance(b, memoryview) else b.cast("B") for b in bufs if len(b)]
    while bufs:
        n = sock.sendmsg(bufs[:512])
        while n:
            if n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0


def _recv_exact_into(sock: socket.socket, mv: memoryview) -> None:
    got, n = 0, len(mv)
    while got < n:
        r = sock.recv_into(mv[got:], n - got)
        if r == 0:
            raise ProtocolError(f"connection closed mid-frame (truncated: got {got} of {n} bytes)")
        got += r


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_exact_into(sock, memoryview(buf))
    return buf


# expect(header) tells the receiver what payload an (authenticated) header may carry:
#   None or []                -> no payload
#   [(dtype, shape), ...]     -> exactly these tensor parts (header "parts" must match)
#   int n                     -> raw bytes, at most n
#   FileSink                  -> raw bytes streamed to a file, at most sink.max_bytes
Expect = Callable[[dict], Any]


class Channel:
    """One authenticated connection. ``send`` is thread-safe; ``recv`` must be called from one thread."""

    def __init__(self, sock: socket.socket, k_send: bytes, k_recv: bytes, peer_hello: dict,
                 max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.sock = sock
        self._k_send = k_send
        self._k_recv = k_recv
        self._seq_send = 1
        self._seq_recv = 1
        self.peer = peer_hello            # the other side's hello header (name, role, ...)
        self.max_payload = max_payload
        self._send_lock = threading.Lock()
        self.closed = False
        try:
            pn = sock.getpeername()
            self.peer_addr = "%s:%s" % pn[:2] if isinstance(pn, tuple) else str(pn or "local")
        except OSError:
            self.peer_addr = "?"

    # --- handshake --------------------------------------------------------------
    @classmethod
    def connect(cls, address: str | tuple, key: bytes, hello: dict, timeout: float = HANDSHAKE_TIMEOUT,
                max_payload: int = DEFAULT_MAX_PAYLOAD) -> "Channel":
        host, port = parse_address(address) if isinstance(address, str) else address
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            return cls.client_handshake(sock, key, hello, timeout, max_payload)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def client_handshake(cls, sock, key: bytes, hello: dict, timeout: float = HANDSHAKE_TIMEOUT,
                         max_payload: int = DEFAULT_MAX_PAYLOAD) -> "Channel":
        _tune(sock)
        sock.settimeout(timeout)
        cn = os.urandom(16)
        _send_frame(sock, _kdf(key, b"hello-c"), 0, {**hello, "kind": "hello", "nonce": cn.hex()}, [])
        try:
            reply = _recv_frame(sock, _kdf(key, b"hello-s", cn), 0, lambda h: None, MAX_HEADER, first_timeout=timeout)
        except (PeerClosed, ProtocolError, socket.timeout, ConnectionError) as e:
            raise AuthError(f"the worker refused the hello ({e or 'no answer'}): wrong key, "
                            "or not an edgepart worker") from None
        sn = _nonce(reply.header)
        session = _kdf(key, b"session", cn, sn)
        sock.settimeout(None)
        return cls(sock, _kdf(session, b"c2s"), _kdf(session, b"s2c"), reply.header, max_payload)

    @classmethod
    def server_handshake(cls, sock, key: bytes, hello: dict, timeout: float = HANDSHAKE_TIMEOUT,
                         max_payload: int = DEFAULT_MAX_PAYLOAD) -> "Channel":
        _tune(sock)
        sock.settimeout(timeout)
        try:
            h = _recv_frame(sock, _kdf(key, b"hello-c"), 0, lambda h: None, MAX_HEADER, first_timeout=timeout)
        except AuthError as e:
            raise AuthError(f"hello refused: {e} (wrong key?)") from None
        if h.kind != "hello":
            raise ProtocolError(f"expected a hello frame, got {h.kind!r}")
        cn = _nonce(h.header)
        sn = os.urandom(16)
        _send_frame(sock, _kdf(key, b"hello-s", cn), 0, {**hello, "kind": "hello", "nonce": sn.hex()}, [])
        session = _kdf(key, b"session", cn, sn)
        sock.settimeout(None)
        return cls(sock, _kdf(session, b"s2c"), _kdf(session, b"c2s"), h.header, max_payload)

    # --- frames -----------------------------------------------------------------
    def send(self, header: dict, parts: Sequence = ()) -> None:
        with self._send_lock:
            if self.closed:
                raise PeerClosed("channel is closed")
            seq = self._seq_send
            self._seq_send += 1
            _send_frame(self.sock, self._k_send, seq, header, parts)

    def recv(self, expect: Expect) -> Frame:
        seq = self._seq_recv
        self._seq_recv += 1
        return _recv_frame(self.sock, self._k_recv, seq, expect, self.max_payload, first_timeout=None)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _nonce(header: dict) -> bytes:
    try:
        n = bytes.fromhex(header["nonce"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("hello without a valid nonce") from None
    if len(n) != 16:
        raise ProtocolError("hello nonce must be 16 bytes")
    return n


def _tune(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def encode_parts(parts: Sequence) -> tuple[list, list[memoryview], int]:
    """Describe tensor parts for the header and give their byte views."""
    descr, views, total = [], [], 0
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach()
            if p.device.type != "cpu":
                p = p.cpu()
            descr.append([dtype_name(p.dtype), list(p.shape)])
            v = tensor_bytes(p)
        else:
            v = memoryview(p).cast("B")
        views.append(v)
        total += len(v)
    return descr, views, total


def _send_frame(sock, key: bytes, seq: int, header: dict, parts: Sequence) -> None:
    descr, views, total = encode_parts(parts)
    if any(isinstance(p, torch.Tensor) for p in parts):
        header = {**header, "parts": descr}
    hj = json.dumps(header, separators=(",", ":")).encode()
    if len(hj) > MAX_HEADER:
        raise ProtocolError(f"frame header of {len(hj)} bytes exceeds {MAX_HEADER}")
    fixed = FIXED.pack(MAGIC, VERSION, 0, 0, len(hj), total)
    h = hmac.new(key, seq.to_bytes(8, "big"), hashlib.sha256)
    h.update(fixed)
    h.update(hj)
    hmac_header = h.copy().digest()
    for v in views:
        h.update(v)
    _send_all(sock, [fixed, hj, hmac_header, *views, h.digest()])


def _recv_frame(sock, key: bytes, seq: int, expect: Expect, max_payload: int, first_timeout) -> Frame:
    fixed = bytearray(FIXED.size)
    mv = memoryview(fixed)
    # wait (possibly forever) for the first byte of a frame; the rest must follow promptly
    r = sock.recv_into(mv, FIXED.size)
    if r == 0:
        raise PeerClosed("connection closed")
    old_timeout = sock.gettimeout()
    if old_timeout is None:
        sock.settimeout(FRAME_TIMEOUT)
    try:
        try:
            _recv_exact_into(sock, mv[r:])
        except socket.timeout:
            raise ProtocolError(f"truncated frame: fixed header incomplete after {FRAME_TIMEOUT:.0f} s") from None
        magic, version, _flags, _res, hlen, plen = FIXED.unpack(fixed)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r} (not an edgepart frame)")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
        if not 2 <= hlen <= MAX_HEADER:
            raise ProtocolError(f"header length {hlen} out of bounds [2, {MAX_HEADER}]")
        if plen > max_payload:
            raise ProtocolError(f"frame claims a {plen}-byte payload, above the {max_payload}-byte limit")
        try:
            hj = _recv_exact(sock, hlen)
            hmac_header = _recv_exact(sock, MAC_LEN)
        except socket.timeout:
            raise ProtocolError("truncated frame: header incomplete") from None
        h = hmac.new(key, seq.to_bytes(8, "big"), hashlib.sha256)
        h.update(fixed)
        h.update(hj)
        if not hmac.compare_digest(h.copy().digest(), bytes(hmac_header)):
            raise AuthError("bad header MAC (wrong key, tampered, replayed or out-of-order frame)")
        try:
            header = json.loads(hj.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("header is not valid UTF-8 JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
            raise ProtocolError("header must be a JSON object with a string 'kind'")
        want = expect(header)
        parts: list = []
        try:
            if want is None or (isinstance(want, list) and not want):
                if plen:
                    raise ProtocolError(f"{header['kind']!r} frame must not carry a payload (claims {plen} bytes)")
            elif isinstance(want, list):
                got = [check_part(p) for p in header.get("parts", [])] if isinstance(header.get("parts"), list) \
                    else None
                want = [(d, tuple(s)) for d, s in want]
                if got != want:
                    raise ProtocolError(f"{header['kind']!r} frame carries parts {str(got)[:200]}, "
                                        f"expected {str(want)[:200]}")
                need = sum(part_nbytes(d, s) for d, s in want)
                if plen != need:
                    raise ProtocolError(f"payload length {plen} != {need} bytes implied by the parts")
                for d, s in want:
                    n = part_nbytes(d, s)
                    buf = torch.empty(n, dtype=torch.uint8)
                    if n:
                        _recv_hashed(sock, memoryview(buf.numpy()), h)
                    parts.append(buf.view(DTYPES[d]).reshape(s) if n else torch.empty(s, dtype=DTYPES[d]))
            elif isinstance(want, int):
                if plen > want:
                    raise ProtocolError(f"{header['kind']!r} payload of {plen} bytes exceeds its {want}-byte bound")
                buf = bytearray(plen)
                _recv_hashed(sock, memoryview(buf), h)
                parts.append(bytes(buf))
            elif isinstance(want, FileSink):
                if plen > want.max_bytes:
                    raise ProtocolError(f"{header['kind']!r} payload of {plen} bytes exceeds its "
                                        f"{want.max_bytes}-byte bound")
                buf = bytearray(min(CHUNK, max(plen, 1)))
                left = plen
                while left:
                    n = min(left, len(buf))
                    mvb = memoryview(buf)[:n]
                    _recv_exact_into(sock, mvb)
                    h.update(mvb)
                    want.sha256.update(mvb)
                    want.f.write(mvb)
                    want.written += n
                    left -= n
            else:
                raise ProtocolError(f"internal: bad expectation {want!r}")
            mac = _recv_exact(sock, MAC_LEN)
        except socket.timeout:
            raise ProtocolError("truncated frame: payload incomplete") from None
        if not hmac.compare_digest(h.digest(), bytes(mac)):
            raise AuthError("bad frame MAC (payload tampered or wrong key)")
        return Frame(header, parts)
    finally:
        if old_timeout is None:
            try:
                sock.settimeout(None)
            except OSError:
                pass


def _recv_hashed(sock, mv: memoryview, h) -> None:
    """Receive straight into ``mv`` and feed the MAC as the bytes arrive."""
    n = len(mv)
    at = 0
    while at < n:
        end = min(n, at + CHUNK)
        _recv_exact_into(sock, mv[at:end])
        h.update(mv[at:end])
        at = end


# --- helpers ------------------------------------------------------------------------
def parse_address(addr: str) -> tuple[str, int]:
    if not isinstance(addr, str) or ":" not in addr:
        raise ValueError(f"address {addr!r} must be HOST:PORT")
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"address {addr!r}: port {port!r} is not a number") from None
    if not 0 <= p < 65536:
        raise ValueError(f"address {addr!r}: port out of range")
    return host, p


def read_key(path) -> bytes:
    """A shared key from a file: the raw bytes, or hex if the file holds only hex digits."""
    data = open(path, "rb").read().strip()
    if not data:
        raise EdgepartError(f"key file {path} is empty")
    try:
        text = data.decode("ascii")
        if len(text) >= 32 and all(c in "0123456789abcdefABCDEF" for c in text):
            return bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        pass
    return bytes(data)


def as_key(key) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        if len(key) < 16:
            raise EdgepartError("the shared key must be at least 16 bytes")
        return bytes(key)
    if isinstance(key, str):
        if os.path.isfile(key):
            return read_key(key)
        k = key.encode()
        if len(k) < 16:
            raise EdgepartError("the shared key must be at least 16 bytes (or a key file path)")
        return k
    raise EdgepartError("key must be bytes, a string, or a key file path")


def tensor_spec(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return dtype_name(t.dtype), tuple(t.shape)


def iter_leaves(spec: dict) -> Iterable[str]:
    """Tensor names in a manifest output structure, depth first."""
    if "tensor" in spec:
        yield spec["tensor"]
    elif "tuple" in spec or "list" in spec:
        for s in spec.get("tuple", spec.get("list")):
            yield from iter_leaves(s)
    elif "dict" in spec:
        for s in spec["dict"].values():
            yield from iter_leaves(s)
