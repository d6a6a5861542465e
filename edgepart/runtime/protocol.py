"""The wire format: authenticated, length-prefixed frames carrying raw tensor bytes.

One frame (docs/wire-format.md is the full description)::

    fixed header   20 bytes  "!4sBBHIQ": magic b"EPRT", version 2, flags, reserved, header_len, payload_len
    JSON header    header_len bytes (UTF-8, a JSON object with at least "kind")
    header tag     16 bytes  MAC(k_dir, N("h", 0, seq), fixed || json)
    payload        payload_len bytes: the frame's parts, back to back (raw tensor bytes or a file)
    payload tag    16 bytes  MAC(k_dir, N("p", 0, seq), T_0 || T_1 || ...)        (only if payload_len > 0)
                             T_i = MAC(k_dir, N("c", i, seq), chunk i)  -- every part cut into 256 KiB chunks

``MAC(k, n, m)`` is the tag of ChaCha20-Poly1305 with key ``k``, nonce ``n``, an
empty plaintext and ``m`` as associated data (Poly1305 under a one-time key that
ChaCha20 derives from the nonce). It runs at several GB/s with or without AES
hardware (HMAC-SHA256, 1.4-1.8 GB/s here, was the transport's bottleneck), and
each call releases the GIL. ``k_dir`` is a per-connection, per-direction key derived
in the hello exchange from the shared key and two fresh nonces; ``seq`` counts
frames per direction, so no (key, nonce) pair is ever used twice, and a frame cannot
be replayed, reordered, reflected or moved to another connection. The header tag
lets a receiver authenticate the sizes a frame claims *before* it allocates
anything; the payload tag then covers the payload and, through ``seq``, binds it to
its header. Chunk tags are computed while a chunk is in cache (right before it is
sent, right after it is received) and only their 16-byte tags are combined.
The hello frames (one per direction per connection, under keys derived from the
shared key alone) keep HMAC-SHA256, which needs no nonce. Nothing is ever unpickled.

Frames are written with ``sendmsg`` of memoryviews (no concatenation copies); receiving
reads small frames whole with one ``recv`` into a per-connection staging buffer, and
receives payloads straight into the tensor allocated for them, after their header was
authenticated and validated.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import fcntl
import os
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from edgepart.errors import EdgepartError, ErrorCode
from edgepart.ir.dtypes import DTYPE_NAMES, DTYPES

MAGIC = b"EPRT"
VERSION = 3                             # 3: the client confirms the session key (replayed hellos cannot complete)
FIXED = struct.Struct("!4sBBHIQ")
FIXED_LEN = FIXED.size                  # 20
TAG_LEN = 16                            # Poly1305 tag
HELLO_MAC_LEN = 32                      # HMAC-SHA256 (hello frames only)
MAX_HEADER = 64 * 1024                  # bytes of JSON header
DEFAULT_MAX_PAYLOAD = 1 << 30           # 1 GiB: no frame is ever larger, whatever it claims
HANDSHAKE_TIMEOUT = 5.0                 # the whole hello exchange, not each read of it
NOTICE = 0x01                           # flags bit: an unauthenticated notice (busy / wrong key), hellos only
MIN_KEY_BYTES = 32
FRAME_TIMEOUT = 30.0                    # once a frame has started, no gap in it may be longer than this
CHUNK = 256 << 10                       # parts are authenticated (and sent/received) in chunks of this size
STAGE = 8 << 10                         # receive reads of at most this much when the frame's size is unknown
# a payload is timed (Channel.rx_span) if at least this many of its bytes were still on the way when its header
# was read: below it, the time is mostly system calls and scheduling, not the link
RX_SPAN_MIN = 32 << 10
_NONCE_H = b"h\x00\x00\x00"                # nonce = domain byte || 3-byte chunk index || 8-byte seq
_NONCE_P = b"p\x00\x00\x00"
MAX_CHUNKS = 1 << 24
_EMPTY = b""

# dtype names allowed on the wire: the IR's one table (an allow-list: anything else is refused)
MAX_DIMS = 8
# how a received part is allocated: a numpy array (cheaper to create than a torch tensor) that the tensor
# shares; bfloat16, which numpy lacks, is allocated as uint16 and viewed
_ALLOC: dict[str, tuple] = {
    "float32": (np.float32, None), "float16": (np.float16, None), "bfloat16": (np.uint16, torch.bfloat16),
    "float64": (np.float64, None), "int64": (np.int64, None), "int32": (np.int32, None),
    "int16": (np.int16, None), "int8": (np.int8, None), "uint8": (np.uint8, None), "bool": (np.bool_, None),
}
_now = time.monotonic
_json_encode = json.JSONEncoder(separators=(",", ":")).encode
_json_decode = json.JSONDecoder().decode


class ProtocolError(EdgepartError):
    """A frame was refused: malformed, too large, unexpected, or not authentic."""


class AuthError(ProtocolError):
    """A MAC did not verify (wrong key, tampering, replay)."""


class HelloRefused(AuthError):
    """The worker refused the hello with a notice: ``reason`` says why (e.g. ``wrong key``).

    Notices are not authenticated (the worker could not authenticate a client whose key it does
    not share); they are advice for the message shown, never a basis for a decision."""


class HelloDropped(AuthError):
    """The worker closed the connection before answering the hello: busy with handshakes (a flood
    makes it close the handshakes least far along), a wrong key, or not an edgepart worker.
    :meth:`Channel.connect` tries again while its timeout lasts."""


class WorkerBusy(ProtocolError):
    """The worker took the hello (the key is right) but has no room for another connection now."""


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
    """A zero-copy byte view of a CPU tensor's data (copied first only if it is not contiguous)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype is torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def alloc_part(dtype: str, shape: tuple) -> tuple[torch.Tensor, memoryview]:
    """A new, uninitialised tensor of a (validated) part and a writable byte view of its memory."""
    npdt, view = _ALLOC[dtype]
    a = np.empty(shape, npdt)
    t = torch.from_numpy(a)
    return (t.view(view) if view is not None else t), memoryview(a).cast("B")


def mac(key: bytes, nonce: bytes, data) -> bytes:
    """MAC(k, n, m): the 16-byte tag of ChaCha20-Poly1305 with an empty plaintext and ``data`` as associated data."""
    return ChaCha20Poly1305(key).encrypt(nonce, _EMPTY, data)


def chunk_nonce(i: int, sn: bytes) -> bytes:
    return b"c" + i.to_bytes(3, "big") + sn


class _PayloadMac:
    """The payload tag, fed chunk by chunk (each chunk a contiguous buffer of at most CHUNK bytes)."""

    __slots__ = ("aead", "sn", "tags", "i")

    def __init__(self, aead: ChaCha20Poly1305, sn: bytes):
        self.aead, self.sn, self.tags, self.i = aead, sn, [], 0

    def chunk(self, c) -> None:
        if self.i >= MAX_CHUNKS:
            raise ProtocolError(f"payload of more than {MAX_CHUNKS} chunks")
        self.tags.append(self.aead.encrypt(b"c" + self.i.to_bytes(3, "big") + self.sn, _EMPTY, c))
        self.i += 1

    def tag(self) -> bytes:
        return self.aead.encrypt(_NONCE_P + self.sn, _EMPTY, b"".join(self.tags))


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


MAX_MESSAGE = 2000                      # characters of an error frame's message


@dataclass(frozen=True)
class Failure:
    """What an error frame (``error``, ``fail``, ``deploy_error``, ``profile_error``, ``probe_error``)
    says: why (``code``), the device it is about (for ``peer_down`` the device that is down, else the
    one it happened on) and a message for people. Receivers decide by the code, never the message."""

    code: ErrorCode
    device: str | None
    message: str

    def fields(self) -> dict:
        """The frame's header fields ``{code, device, message}``."""
        return {"code": self.code.value, "device": self.device, "message": self.message[:MAX_MESSAGE]}

    @classmethod
    def from_header(cls, h: dict) -> "Failure":
        """Read the fields of a frame a worker received; ProtocolError if they are malformed."""
        device, message = h.get("device"), h.get("message")
        try:
            code = ErrorCode(h.get("code"))
        except ValueError:
            raise ProtocolError(f"unknown error code {str(h.get('code'))[:40]!r}") from None
        if not (device is None or isinstance(device, str) and len(device) <= 64) or not isinstance(message, str):
            raise ProtocolError("error frame needs device (a name or null) and message (a string)")
        return cls(code, device, message[:MAX_MESSAGE])


def _kdf(key: bytes, *items: bytes) -> bytes:
    return hmac.new(key, b"edgepart-v1|" + b"|".join(items), hashlib.sha256).digest()


def _send_all(sock: socket.socket, bufs: list) -> None:
    """sendmsg a list of byte buffers without joining them, resuming after partial sends."""
    n = sock.sendmsg(bufs) if len(bufs) <= 512 else 0
    total = 0
    for b in bufs:
        total += len(b)
    if n == total:
        return
    bufs = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
    while n:                                   # drop what the first call sent
        if n >= len(bufs[0]):
            n -= len(bufs.pop(0))
        else:
            bufs[0] = bufs[0][n:]
            n = 0
    while bufs:
        n = sock.sendmsg(bufs[:512])
        while n:
            if n >= len(bufs[0]):
                n -= len(bufs.pop(0))
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


def _queued(sock: socket.socket) -> int:
    """Bytes received by the kernel on ``sock`` and not read yet (0 where that cannot be asked)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


class Channel:
    """One authenticated connection. ``send`` is thread-safe; ``recv`` must be called from one thread."""

    def __init__(self, sock: socket.socket, k_send: bytes | None = None, k_recv: bytes | None = None,
                 peer_hello: dict | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.sock = sock
        self._seq_send = 1
        self._seq_recv = 1
        self.peer = peer_hello or {}       # the other side's hello header (name, role, ...)
        self.max_payload = max_payload
        self._send_lock = threading.Lock()
        self._tail: list | None = None     # the unwritten rest of a frame started by send_nowait
        self.closed = False
        # received but not yet consumed bytes are self._rb[self._ra:self._rz]
        self._rb = bytearray(2 * STAGE)
        self._rv = memoryview(self._rb)
        self._ra = self._rz = 0
        self._deadline: float | None = None     # monotonic time the handshake must finish by
        self.last_activity = _now()             # a frame was last sent or received (idle connections close)
        # (bytes, seconds) the last received frame's payload took to arrive, counting only the bytes that
        # were not yet here when its header was read; None if it carried under RX_SPAN_MIN such bytes
        self.rx_span: tuple[int, float] | None = None
        if k_send is not None:
            self._set_keys(k_send, k_recv)
        try:
            pn = sock.getpeername()
            self.peer_addr = "%s:%s" % pn[:2] if isinstance(pn, tuple) else str(pn or "local")
        except OSError:
            self.peer_addr = "?"

    def _set_keys(self, k_send: bytes, k_recv: bytes) -> None:
        self._k_send, self._k_recv = k_send, k_recv
        self._g_send, self._g_recv = ChaCha20Poly1305(k_send), ChaCha20Poly1305(k_recv)

    # --- handshake --------------------------------------------------------------
    @classmethod
    def connect(cls, address: str | tuple, key: bytes, hello: dict, timeout: float = HANDSHAKE_TIMEOUT,
                max_payload: int = DEFAULT_MAX_PAYLOAD) -> "Channel":
        """Connect and handshake within ``timeout`` s in all; a hello the worker dropped unanswered
        (:class:`HelloDropped`) is tried again on a new connection while the time lasts."""
        host, port = parse_address(address) if isinstance(address, str) else address
        deadline = _now() + timeout
        while True:
            sock = socket.create_connection((host, port), timeout=max(0.05, deadline - _now()))
            try:
                return cls.client_handshake(sock, key, hello, max(0.05, deadline - _now()), max_payload)
            except HelloDropped:
                sock.close()
                if _now() + 0.05 >= deadline:       # a worker under a handshake flood drops some: try again
                    raise
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    @classmethod
    def client_handshake(cls, sock, key: bytes, hello: dict, timeout: float = HANDSHAKE_TIMEOUT,
                         max_payload: int = DEFAULT_MAX_PAYLOAD) -> "Channel":
        """Send a hello, check the worker's, derive the session keys and confirm them (one frame,
        ``confirm``, under the client's session key: only a holder of the key can send it, so a
        recorded hello replayed to a worker never completes). ``timeout`` bounds the whole exchange.

        Raises :class:`WorkerBusy` (the worker took the key but is full), :class:`HelloRefused` (it
        said the key is wrong), :class:`AuthError` (no or no authentic answer; the message says
        which: closed, silent, wrong key)."""
        _tune(sock)
        sock.settimeout(timeout)
        ch = cls(sock, max_payload=max_payload)
        ch._deadline = _now() + timeout
        cn = os.urandom(16)
        try:
            ch._send_hello(_kdf(key, b"hello-c"), {**hello, "kind": "hello", "nonce": cn.hex()})
            reply = ch._recv_frame(lambda h: None, 0, _kdf(key, b"hello-s", cn), notices=True)
        except HelloRefused:
            raise
        except AuthError:
            raise AuthError("the worker's answer to the hello did not verify: wrong key (or not an edgepart "
                            "worker)") from None
        except (PeerClosed, ConnectionResetError):
            raise HelloDropped("the worker closed the connection without answering the hello: it is busy (too many "
                               "connections in their handshake), or does not share this key, or is not an edgepart "
                               "worker") from None
        except (socket.timeout, TimeoutError):
            raise AuthError(f"no answer to the hello within {timeout:.0f} s: the worker is busy or unreachable"
                            ) from None
        except (ProtocolError, ConnectionError) as e:
            raise AuthError(f"the hello failed ({e}): not an edgepart worker of this protocol version, or the "
                            "connection broke") from None
        if reply.kind == "busy":
            raise WorkerBusy(f"the worker is busy: {str(reply.get('reason'))[:200]}")
        if reply.kind != "hello":
            raise AuthError(f"expected a hello frame, got {reply.kind[:40]!r}")
        sn = _nonce(reply.header)
        session = _kdf(key, b"session", cn, sn)
        ch._set_keys(_kdf(session, b"c2s"), _kdf(session, b"s2c"))
        ch.peer = reply.header
        ch.send({"kind": "confirm"})                     # seq 1 of this direction: the key confirmation
        ch._deadline = None
        _after_handshake(sock)
        return ch

    @classmethod
    def server_handshake(cls, sock, key: bytes, hello: dict, timeout: float = HANDSHAKE_TIMEOUT,
                         max_payload: int = DEFAULT_MAX_PAYLOAD,
                         admit: Callable[[], str | None] | None = None) -> "Channel":
        """Take a hello, answer it, and wait for the client's key confirmation; all within ``timeout``.

        A hello whose MAC does not verify is answered with an unauthenticated ``refused`` notice.
        ``admit()``, called once the client's hello verified, returns None to go on or a reason to
        answer ``busy`` (under the hello key, so the client knows it is genuine) and refuse.
        The returned channel's first received frame was the confirmation (consumed here)."""
        _tune(sock)
        sock.settimeout(timeout)
        ch = cls(sock, max_payload=max_payload)
        ch._deadline = _now() + timeout
        try:
            h = ch._recv_frame(lambda h: None, 0, _kdf(key, b"hello-c"))
        except AuthError:
            ch._send_notice("refused", "hello MAC did not verify: wrong key")
            raise AuthError("hello refused: its MAC did not verify (wrong key, or not an edgepart client)") from None
        except (socket.timeout, TimeoutError):
            raise ProtocolError(f"no complete hello within {timeout:.0f} s") from None
        if h.kind != "hello":
            raise ProtocolError(f"expected a hello frame, got {h.kind[:40]!r}")
        cn = _nonce(h.header)
        reason = admit() if admit is not None else None
        if reason is not None:
            ch._send_hello(_kdf(key, b"hello-s", cn), {"kind": "busy", "reason": reason[:200]})
            raise WorkerBusy(reason)
        sn = os.urandom(16)
        ch._send_hello(_kdf(key, b"hello-s", cn), {**hello, "kind": "hello", "nonce": sn.hex()})
        session = _kdf(key, b"session", cn, sn)
        ch._set_keys(_kdf(session, b"s2c"), _kdf(session, b"c2s"))
        ch.peer = h.header
        try:
            c = ch.recv(lambda h: None)
        except AuthError:
            raise AuthError("the key confirmation did not verify: a replayed hello, or a wrong key") from None
        except (socket.timeout, TimeoutError):
            raise ProtocolError(f"no key confirmation within {timeout:.0f} s of the connection (a replayed "
                                "hello?)") from None
        if c.kind != "confirm":
            raise ProtocolError(f"expected the key confirmation, got {c.kind[:40]!r}")
        ch._deadline = None
        _after_handshake(sock)
        return ch

    def _send_notice(self, kind: str, reason: str) -> None:
        """An unauthenticated hello-sized notice (flags NOTICE, an all-zero tag); best effort."""
        try:
            hj = json.dumps({"kind": kind, "reason": reason}, separators=(",", ":")).encode()
            self.sock.settimeout(0.2)
            _send_all(self.sock, [FIXED.pack(MAGIC, VERSION, NOTICE, 0, len(hj), 0) + hj, bytes(HELLO_MAC_LEN)])
        except OSError:
            pass

    def _send_hello(self, key: bytes, header: dict) -> None:
        hj = json.dumps(header, separators=(",", ":")).encode()
        signed = FIXED.pack(MAGIC, VERSION, 0, 0, len(hj), 0) + hj
        mac = hmac.new(key, bytes(8) + signed, hashlib.sha256).digest()
        _send_all(self.sock, [signed, mac])

    # --- frames -----------------------------------------------------------------
    def _prepare(self, header: dict, parts: Sequence) -> tuple[bytes, list, int]:
        """The fixed header + JSON, and the payload's byte views (no copies), for a frame about to be sent."""
        if parts:
            descr, views, total = encode_parts(parts)
            if descr:
                if len(descr) != len(views):
                    raise ProtocolError("a frame's parts are either all tensors or one raw byte string")
                header = {**header, "parts": descr}
            elif len(views) > 1:                     # raw bytes are one part on the receiving side
                views = [memoryview(b"".join(views))]
        else:
            views, total = [], 0
        hj = _json_encode(header).encode()
        if len(hj) > MAX_HEADER:
            raise ProtocolError(f"frame header of {len(hj)} bytes exceeds {MAX_HEADER}")
        return FIXED.pack(MAGIC, VERSION, 0, 0, len(hj), total) + hj, views, total

    def send(self, header: dict, parts: Sequence = ()) -> None:
        """Write one frame (blocking until the socket took all of it)."""
        signed, views, total = self._prepare(header, parts)
        with self._send_lock:
            if self.closed:
                raise PeerClosed("channel is closed")
            if self._tail:
                self._flush_locked()
            seq = self._seq_send
            self._seq_send = seq + 1
            self.last_activity = _now()
            sn = seq.to_bytes(8, "big")
            g = self._g_send
            htag = g.encrypt(_NONCE_H + sn, _EMPTY, signed)
            if not total:
                _send_all(self.sock, [signed, htag])
                return
            # each part is cut into chunks; a chunk is tagged and written while it is still in cache
            pm = _PayloadMac(g, sn)
            out, pending = [signed, htag], len(signed) + TAG_LEN
            for v in views:
                for i in range(0, len(v), CHUNK):
                    c = v[i:i + CHUNK]
                    pm.chunk(c)
                    out.append(c)
                    pending += len(c)
                    if pending >= CHUNK or len(out) >= 256:
                        _send_all(self.sock, out)
                        out, pending = [], 0
            out.append(pm.tag())
            _send_all(self.sock, out)

    def send_nowait(self, header: dict, parts: Sequence = ()) -> bool:
        """Write a small frame from the calling thread without ever blocking on the socket.

        Returns False, having consumed nothing, if another thread is sending on this channel
        or an earlier frame is not fully written: queue the frame for a sender thread then.
        Returns True once the frame is committed: written, or — if the socket buffer took only
        part of it — with the rest kept in order, to be written by ``flush()`` (or before the
        next frame). Meant for frames of at most a few tens of KiB (all tags are computed first).
        """
        signed, views, total = self._prepare(header, parts)
        if len(views) > 64 or not self._send_lock.acquire(blocking=False):
            return False
        try:
            if self.closed:
                raise PeerClosed("channel is closed")
            if self._tail:
                return False
            seq = self._seq_send
            self._seq_send = seq + 1
            self.last_activity = _now()
            sn = seq.to_bytes(8, "big")
            g = self._g_send
            bufs = [signed, g.encrypt(_NONCE_H + sn, _EMPTY, signed)]
            if total:
                pm = _PayloadMac(g, sn)
                for v in views:
                    for i in range(0, len(v), CHUNK):
                        c = v[i:i + CHUNK]
                        pm.chunk(c)
                        bufs.append(c)
                bufs.append(pm.tag())
            try:
                n = self.sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            want = len(signed) + TAG_LEN + (total + TAG_LEN if total else 0)
            if n < want:
                rest = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
                while n:
                    if n >= len(rest[0]):
                        n -= len(rest.pop(0))
                    else:
                        rest[0] = rest[0][n:]
                        n = 0
                self._tail = rest
            return True
        finally:
            self._send_lock.release()

    @property
    def tail_pending(self) -> bool:
        """Part of a frame written by ``send_nowait`` is still waiting for ``flush()``."""
        return bool(self._tail)

    def flush(self) -> None:
        """Finish writing a frame that ``send_nowait`` could only partly write (blocking)."""
        with self._send_lock:
            if self._tail:
                self._flush_locked()

    def _flush_locked(self) -> None:
        tail, self._tail = self._tail, None
        _send_all(self.sock, tail)

    def recv(self, expect: Expect) -> Frame:
        seq = self._seq_recv
        self._seq_recv = seq + 1
        f = self._recv_frame(expect, seq, None)
        self.last_activity = _now()
        return f

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

    # --- receiving ----------------------------------------------------------------
    def _need(self, n: int, first: bool = False) -> None:
        """Make at least ``n`` unread bytes available in the staging buffer.

        ``first``: this is the start of a frame, which may be waited for indefinitely (or, if the
        caller set a timeout on the socket, raises ``TimeoutError``); any later gap longer than
        FRAME_TIMEOUT, or EOF, means a truncated frame.
        """
        while True:
            have = self._rz - self._ra
            if have >= n:
                return
            if self._ra + n > len(self._rb):                 # no room behind the unread bytes
                if n > len(self._rb):                        # a large header: grow (n <= 20 + 64 KiB + 32)
                    rb = bytearray(n + STAGE)
                    rb[:have] = self._rv[self._ra:self._rz]
                    self._rb, self._rv = rb, memoryview(rb)
                else:
                    self._rb[:have] = self._rb[self._ra:self._rz]
                self._ra, self._rz = 0, have
            want = min(len(self._rb) - self._rz, max(n - have, STAGE))
            if self._deadline is not None:                   # the handshake: one deadline for all its reads
                left = self._deadline - _now()
                if left <= 0:
                    raise socket.timeout("handshake deadline passed")
                self.sock.settimeout(left)
            try:
                r = self.sock.recv_into(self._rv[self._rz:], want)
            except BlockingIOError:                          # SO_RCVTIMEO expired
                if first and not have:
                    continue
                raise ProtocolError(f"truncated frame: no data for {FRAME_TIMEOUT:.0f} s "
                                    f"(got {have} of {n} header bytes)") from None
            except socket.timeout:                           # the caller's own socket timeout
                if (first and not have) or self._deadline is not None:
                    raise
                raise ProtocolError(f"truncated frame: header incomplete (got {have} of {n} bytes)") from None
            if r == 0:
                if first and not have:
                    raise PeerClosed("connection closed")
                raise ProtocolError(f"connection closed mid-frame (truncated: got {have} of {n} header bytes)")
            self._rz += r

    def _fill(self, mv: memoryview) -> None:
        """Fill ``mv`` with the next bytes of the stream: what is staged, then straight from the socket."""
        n = len(mv)
        got = min(self._rz - self._ra, n)
        if got:
            a = self._ra
            mv[:got] = self._rv[a:a + got]
            self._ra = a + got
        while got < n:
            try:
                r = self.sock.recv_into(mv[got:], n - got, socket.MSG_WAITALL)
            except (BlockingIOError, socket.timeout):
                raise ProtocolError(f"truncated frame: payload incomplete (no data for "
                                    f"{FRAME_TIMEOUT:.0f} s)") from None
            if r == 0:
                raise ProtocolError(f"connection closed mid-frame (truncated: payload part got {got} of {n} bytes)")
            got += r

    def _check_payload_tag(self, tag: bytes) -> None:
        if self._rz - self._ra < TAG_LEN:
            self._need(TAG_LEN)
        a = self._ra
        ok = hmac.compare_digest(tag, self._rv[a:a + TAG_LEN])
        self._ra = a + TAG_LEN
        if not ok:
            raise AuthError("bad frame MAC (payload tampered or wrong key)")

    def _recv_payload(self, views: list, sn: bytes) -> None:
        """Receive the parts straight into their memory, tagging each chunk right after it arrived."""
        pm = _PayloadMac(self._g_recv, sn)
        for v in views:
            for i in range(0, len(v), CHUNK):
                c = v[i:i + CHUNK]
                self._fill(c)
                pm.chunk(c)
        self._check_payload_tag(pm.tag())

    def _recv_file(self, sink: FileSink, plen: int, sn: bytes) -> None:
        pm = _PayloadMac(self._g_recv, sn)
        buf = memoryview(bytearray(min(CHUNK, plen)))
        left = plen
        while left:
            c = buf[:min(left, CHUNK)]
            self._fill(c)
            pm.chunk(c)
            sink.sha256.update(c)
            sink.f.write(c)
            sink.written += len(c)
            left -= len(c)
        self._check_payload_tag(pm.tag())

    def _recv_frame(self, expect: Expect, seq: int, hello_key: bytes | None, notices: bool = False) -> Frame:
        # 1. the fixed header: sizes are bounded before anything is allocated
        if self._rz - self._ra < FIXED_LEN:
            self._need(FIXED_LEN, first=True)
        magic, version, flags, _res, hlen, plen = FIXED.unpack_from(self._rb, self._ra)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r} (not an edgepart frame)")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
        if not 2 <= hlen <= MAX_HEADER:
            raise ProtocolError(f"header length {hlen} out of bounds [2, {MAX_HEADER}]")
        if plen > self.max_payload:
            raise ProtocolError(f"frame claims a {plen}-byte payload, above the {self.max_payload}-byte limit")
        # 2. JSON header + its tag, authenticated before the JSON is even parsed
        taglen = HELLO_MAC_LEN if hello_key is not None else TAG_LEN
        end = FIXED_LEN + hlen
        if self._rz - self._ra < end + taglen:
            self._need(end + taglen)
        a = self._ra
        rv = self._rv
        signed = rv[a:a + end]
        sn = seq.to_bytes(8, "big")
        if notices and flags & NOTICE and plen == 0:         # unauthenticated advice from the worker
            try:
                note = json.loads(bytes(rv[a + FIXED_LEN:a + end]).decode("utf-8"))
                reason = str(note.get("reason"))[:200]
            except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
                reason = "unreadable notice"
            raise HelloRefused(f"the worker refused the hello: {reason} (unauthenticated notice)")
        if hello_key is None:
            want_tag = self._g_recv.encrypt(_NONCE_H + sn, _EMPTY, signed)
        else:
            want_tag = hmac.new(hello_key, sn + bytes(signed), hashlib.sha256).digest()
        if not hmac.compare_digest(want_tag, rv[a + end:a + end + taglen]):
            raise AuthError("bad header MAC (wrong key, tampered, replayed or out-of-order frame)")
        hj = bytes(rv[a + FIXED_LEN:a + end])
        self._ra = a + end + taglen
        try:
            header = _json_decode(hj.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("header is not valid UTF-8 JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
            raise ProtocolError("header must be a JSON object with a string 'kind'")
        # 3. what may this frame carry?
        want = expect(header)
        parts: list = []
        if want is None or (isinstance(want, list) and not want):
            if plen:
                raise ProtocolError(f"{header['kind']!r} frame must not carry a payload (claims {plen} bytes)")
            return Frame(header, parts)
        if hello_key is not None:
            raise ProtocolError("a hello frame carries no payload")
        # 4. only now allocate, exactly the validated size, and receive straight into it
        if isinstance(want, list):
            hp = header.get("parts")
            got = [check_part(p) for p in hp] if isinstance(hp, list) else None
            want = [(d, tuple(s)) for d, s in want]
            if got != want:
                raise ProtocolError(f"{header['kind']!r} frame carries parts {str(got)[:200]}, "
                                    f"expected {str(want)[:200]}")
            sizes = [part_nbytes(d, s) for d, s in want]
            if plen != sum(sizes):
                raise ProtocolError(f"payload length {plen} != {sum(sizes)} bytes implied by the parts")
            views = []
            for (d, s), n in zip(want, sizes):
                if n:
                    t, v = alloc_part(d, s)
                    parts.append(t)
                    views.append(v)
                else:
                    parts.append(torch.empty(s, dtype=DTYPES[d]))
            self.rx_span = None
            if plen:
                t0 = time.perf_counter()
                ahead = self._rz - self._ra + _queued(self.sock)
                self._recv_payload(views, sn)
                late = plen - ahead
                if late >= RX_SPAN_MIN:
                    self.rx_span = (late, time.perf_counter() - t0)
        elif isinstance(want, int):
            if plen > want:
                raise ProtocolError(f"{header['kind']!r} payload of {plen} bytes exceeds its {want}-byte bound")
            buf = bytearray(plen)
            if plen:
                self._recv_payload([memoryview(buf)], sn)
            parts.append(bytes(buf))
        elif isinstance(want, FileSink):
            if plen > want.max_bytes:
                raise ProtocolError(f"{header['kind']!r} payload of {plen} bytes exceeds its "
                                    f"{want.max_bytes}-byte bound")
            if plen:
                self._recv_file(want, plen, sn)
        else:
            raise ProtocolError(f"internal: bad expectation {want!r}")
        return Frame(header, parts)


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


def _after_handshake(sock: socket.socket) -> None:
    """Blocking from now on; a gap inside a frame is bounded by SO_RCVTIMEO (no per-frame timeout syscalls)."""
    sock.settimeout(None)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(FRAME_TIMEOUT), 0))
    except OSError:
        pass


def encode_parts(parts: Sequence) -> tuple[list, list[memoryview], int]:
    """Describe tensor parts for the header and give their byte views."""
    descr, views, total = [], [], 0
    for p in parts:
        if isinstance(p, torch.Tensor):
            if not p.is_cpu:
                p = p.detach().cpu()
            descr.append([dtype_name(p.dtype), list(p.shape)])
            v = tensor_bytes(p)
        else:
            v = memoryview(p).cast("B")
        views.append(v)
        total += len(v)
    return descr, views, total


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


def check_key(key: bytes, source: str) -> bytes:
    """Refuse a shared key that is short or visibly not random; ``source`` names where it came from.

    At least MIN_KEY_BYTES (32) bytes; at least 16 distinct byte values (32 random bytes have
    about 30: fewer means a repeated pattern such as 32 × "a" or all zeros); not all printable
    ASCII (a passphrase — guessable offline from one recorded hello — not random bytes; 32 random
    bytes are all printable with probability 1e-14). Make one with ``edgepart keygen --run FILE``."""
    hint = "make one with `edgepart keygen --run FILE` (32 random bytes, as hex)"
    if len(key) < MIN_KEY_BYTES:
        raise EdgepartError(f"{source}: the key is {len(key)} bytes; at least {MIN_KEY_BYTES} random bytes are "
                            f"needed — {hint}")
    if len(set(key)) < 16:
        raise EdgepartError(f"{source}: the key has only {len(set(key))} distinct byte values, so it is not random "
                            f"— {hint}")
    if all(32 <= b < 127 for b in key):
        raise EdgepartError(f"{source}: the key is printable text (a passphrase?), not random bytes — {hint}")
    return key


def read_key(path) -> bytes:
    """A shared key from a file: the raw bytes, or hex if the file holds only hex digits; refused if
    short or visibly not random (:func:`check_key`)."""
    try:
        data = open(path, "rb").read().strip()
    except OSError as e:
        raise EdgepartError(f"key file {path}: {e.strerror}") from None
    if not data:
        raise EdgepartError(f"key file {path} is empty")
    key = bytes(data)
    try:
        text = data.decode("ascii")
        if len(text) >= 32 and len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text):
            key = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        pass
    return check_key(key, f"key file {path}")


def as_key(key) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        if len(key) < MIN_KEY_BYTES:
            raise EdgepartError(f"the shared key must be at least {MIN_KEY_BYTES} bytes")
        return bytes(key)
    if isinstance(key, str):
        if os.path.isfile(key):
            return read_key(key)
        k = key.encode()
        if len(k) < MIN_KEY_BYTES:
            raise EdgepartError(f"the shared key must be at least {MIN_KEY_BYTES} bytes (or a key file path)")
        return k
    raise EdgepartError("key must be bytes, a string, or a key file path")


def tensor_spec(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return dtype_name(t.dtype), tuple(t.shape)
