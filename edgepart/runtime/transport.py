"""Frames out of a worker: one queued writer per connection, and the links to peer workers built on it.

No reader or compute thread ever blocks on a socket. A :class:`Writer` writes one connection's
frames in order: when nothing is queued, a small frame is written by the calling thread with a
non-blocking write (``Channel.send_nowait``), which saves a thread wake-up per frame; anything
else — large frames, frames behind others, the rest of a frame the socket took only part of,
shaped frames — is written by the writer's own thread. A :class:`PeerLink` is a writer that
connects to a peer worker on demand (and again after a failure), watches the connection for
EOF and, when a frame cannot be written, fails the request it belongs to and reports the peer down.
"""
from __future__ import annotations

import collections
import fcntl
import itertools
import logging
import socket
import struct
import threading
import time
from typing import Callable, Protocol

import torch

from edgepart.errors import ErrorCode
from edgepart.runtime.protocol import Channel, Failure, PeerClosed, ProtocolError

log = logging.getLogger("edgepart.worker")
INLINE_MAX = 64 << 10          # frames up to this size are written by the calling thread when nothing is queued
FRAME_EXTRA = 200              # bytes a frame adds on the wire besides its payload, as a shaper counts them
CONNECT_TIMEOUT = 2.0          # s for a peer's handshake
_FLUSH = object()              # queue marker: finish writing a frame that send_nowait only partly wrote
_CLOSE = object()              # queue marker: the writer's thread ends here
_WRITE_ERRORS = (OSError, PeerClosed, ProtocolError)
_CONN_NO = itertools.count(1)  # numbers the peer connections this process opens (PeerLink.tx_state)


class LinkShaper(Protocol):
    """An emulated link in the sender (a test bed's hook; real links have none): when a frame may
    leave, and how long its bytes take."""

    def release_time(self, enqueued: float, nbytes: int = 0) -> float:
        """The monotonic time a frame of ``nbytes`` queued at ``enqueued`` may be written."""

    def consume(self, nbytes: int) -> float | None:
        """Account for ``nbytes`` about to be written (sleeping as long as the link's bandwidth asks); the
        seconds it held them (their emulated time on the link, which the receiver cannot see: the bytes
        then leave at once), or None."""

    # optional: ``latency``, the one-way delay (s) the shaper adds to every frame (a delay line the
    # kernel's round-trip time does not see)


# link_shaper(peer, nic): the shaper of this worker's traffic to ``peer`` (None: unshaped). With
# ``nic`` the frames also queue on the device's one sender NIC that all its links share (pieces do;
# a link probe measures the link alone).
LinkShaperFactory = Callable[[str, bool], "LinkShaper | None"]


class Cancellable(Protocol):
    """What a queued frame may belong to: a frame of a cancelled request is not written."""

    cancelled: bool


def nbytes(parts) -> int:
    n = 0
    for p in parts:
        n += p.numel() * p.element_size() if isinstance(p, torch.Tensor) else len(p)
    return n


class Writer:
    """Frames for one channel, written in order by the calling thread (small, idle, unshaped) or by
    the writer's own thread.

    ``channel``: the connection, or None with ``connect`` — a callable that opens it on the first
    frame, and again after a failure. Without ``connect`` a failed write makes the writer dead: later
    frames are dropped. ``shaper`` delays and paces every frame; ``on_error(channel, error, req)`` hears
    of a failed write (``req``: what the frame belonged to); ``on_sent(nbytes)`` counts payload bytes;
    ``bye_on_close``: :meth:`close` sends a ``bye`` and closes the channel after the queued frames.
    """

    def __init__(self, name: str, channel: Channel | None = None, connect: Callable[[], Channel] | None = None,
                 shaper: LinkShaper | None = None,
                 on_error: Callable[[Channel | None, Exception, Cancellable | None], None] | None = None,
                 on_sent: Callable[[int], None] | None = None, bye_on_close: bool = False):
        self.ch = channel
        self.connect = connect
        self.shaper = shaper
        self.on_error = on_error
        self.on_sent = on_sent
        self.bye_on_close = bye_on_close
        self.q: collections.deque = collections.deque()
        self.cv = threading.Condition(threading.Lock())
        self.busy = False                  # the thread is writing
        self.dead = False                  # a write failed and there is no reconnecting
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, header: dict, parts=(), req: Cancellable | None = None) -> None:
        """Queue a frame (or write it right here); never blocks on the socket."""
        err = None
        with self.cv:
            if self.dead or self.closed:
                return
            ch = self.ch
            n = nbytes(parts)
            if (ch is not None and self.shaper is None and not self.q and not self.busy and n <= INLINE_MAX
                    and not (req is not None and req.cancelled)):
                try:
                    if ch.send_nowait(header, parts):
                        self._sent(n)
                        if ch.tail_pending:
                            self.q.append(_FLUSH)
                            self.cv.notify()
                        return
                except _WRITE_ERRORS as e:
                    err = e
            if err is None:
                # an emulated NIC is reserved here, in the order the device sends, not when the thread gets to it
                release = self.shaper.release_time(time.monotonic(), n) if self.shaper is not None else 0.0
                self.q.append((release, header, parts, req))
                self.cv.notify()
                return
        self._failed(ch, err, req)

    def drop(self, ch: Channel) -> None:
        """Forget ``ch`` if it is still the writer's channel (it was closed elsewhere): the next frame reconnects."""
        with self.cv:
            if self.ch is ch:
                self.ch = None

    def close(self) -> None:
        """Write what is queued, then stop (frames put after this are dropped)."""
        with self.cv:
            self.closed = True
            self.q.append(_CLOSE)
            self.cv.notify()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _sent(self, n: int) -> None:
        if self.on_sent is not None:
            self.on_sent(n)

    def _failed(self, ch: Channel | None, e: Exception, req: Cancellable | None) -> None:
        with self.cv:
            if self.connect is None:
                self.dead = True
            elif self.ch is ch:
                self.ch = None
        if self.connect is not None and ch is not None:
            ch.close()
        if self.on_error is not None:
            self.on_error(ch, e, req)

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.q:
                    self.cv.wait()
                item = self.q.popleft()
                if item is _CLOSE:
                    break
                if self.dead:
                    continue
                self.busy = True
            try:
                self._write(item)
            finally:
                with self.cv:
                    self.busy = False
        ch = self.ch                # read once: a peer link's watcher clears it when the peer hangs up
        if self.bye_on_close and ch is not None:
            try:
                ch.send({"kind": "bye"})
            except (OSError, PeerClosed):
                pass
            ch.close()

    def _write(self, item) -> None:
        ch = self.ch
        if item is _FLUSH:
            if ch is not None:
                try:
                    ch.flush()
                except _WRITE_ERRORS as e:
                    self._failed(ch, e, None)
            return
        release, header, parts, req = item
        if req is not None and req.cancelled:
            return
        try:
            n = nbytes(parts)
            if self.shaper is not None:
                delay = release - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                held = self.shaper.consume(n + FRAME_EXTRA)
                if held and n:      # the receiver times the payload's arrival: tell it the emulated part
                    header = {**header, "held_us": int(held * 1e6)}
            if ch is None:
                ch = self.ch = self.connect()
            ch.send(header, parts)
            self._sent(n)
        except _WRITE_ERRORS as e:
            self._failed(ch, e, req)


class PeerLink:
    """This worker's outgoing connection to one peer device, opened on the first frame.

    The peer sends nothing back on it but a ``bye``; a watcher thread notices it going away. A
    frame that cannot be written fails its request (``on_request_failed(req, failure)``, code
    ``peer_down``); either way the peer is reported down (``on_down(device, reason)``).
    """

    def __init__(self, device: str, address: str, key: bytes, hello: dict, shaper: LinkShaper | None,
                 on_request_failed: Callable[[Cancellable, Failure], None], on_down: Callable[[str, str], None],
                 on_sent: Callable[[int], None] | None = None):
        self.device = device
        self.address = address
        self.key = key
        self.hello = hello
        self.on_request_failed = on_request_failed
        self.on_down = on_down
        self.closed = False
        self.writer = Writer(f"peer-{device}", connect=self._connect, shaper=shaper, on_error=self._failed,
                             on_sent=on_sent, bye_on_close=True)

    def put(self, header: dict, parts=(), req: Cancellable | None = None) -> None:
        self.writer.put(header, parts, req)

    def latency(self) -> float | None:
        """The link's one-way latency (s) as the connection's real traffic shows it: half the kernel's
        minimum round-trip time of its TCP segments (the propagation part; the queueing behind a
        slow link is the bandwidth's), plus the delay an emulated link's shaper adds; None before the
        connection carried anything (or where the OS does not say)."""
        ch = self.writer.ch
        if ch is None or ch.closed:
            return None
        rtt = tcp_min_rtt(ch.sock)
        if rtt is None:
            return None
        return rtt / 2 + float(getattr(self.writer.shaper, "latency", 0.0) or 0.0)

    def tx_state(self) -> tuple[int, int, int] | None:
        """(the connection's number, bytes the peer acknowledged on it, bytes written but not acknowledged
        yet) now (:func:`tcp_tx_state`), or None without a connection. A link that delivers nothing while
        bytes wait on it is seen here, where the receiver, timing whole pieces, sees nothing at all. The
        number (one per connection this process opened) tells a monitor whether two readings are of the
        same connection."""
        ch = self.writer.ch
        if ch is None or ch.closed:
            return None
        state = tcp_tx_state(ch.sock)
        return None if state is None else (getattr(ch, "conn_no", 0), *state)

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    def _connect(self) -> Channel:
        ch = Channel.connect(self.address, self.key, self.hello, timeout=CONNECT_TIMEOUT)
        ch.conn_no = next(_CONN_NO)
        threading.Thread(target=self._watch, args=(ch,), name=f"watch-{self.device}", daemon=True).start()
        return ch

    def _watch(self, ch: Channel) -> None:
        reason: str | None = None
        try:
            while True:
                frame = ch.recv(lambda h: None)   # the peer sends nothing on this connection but a bye
                if frame.kind == "bye":           # it closes a link idle too long: the next frame reconnects
                    log.info("peer %s closed the idle link (%s); reconnecting on the next frame", self.device,
                             str(frame.get("reason"))[:40])
                    break
        except PeerClosed:
            reason = "closed the connection"
        except (OSError, ProtocolError) as e:
            reason = f"connection lost ({e})"
        self.writer.drop(ch)
        if reason is None:
            ch.close()
        elif not self.closed and not ch.closed:
            self.on_down(self.device, reason)

    def _failed(self, ch: Channel | None, e: Exception, req: Cancellable | None) -> None:
        reason = f"unreachable at {self.address} ({e})"
        if req is not None:
            self.on_request_failed(req, Failure(ErrorCode.PEER_DOWN, self.device, f"device {self.device!r} {reason}"))
        self.on_down(self.device, reason)


_TCPI_MIN_RTT = 148            # offset of tcpi_min_rtt (u32, µs) in Linux's struct tcp_info (since 4.6)
_TCPI_BYTES_ACKED = 120        # offset of tcpi_bytes_acked (u64) (since 4.1)
_SIOCOUTQ = 0x5411             # ioctl: bytes in the send queue not yet acknowledged (= TIOCOUTQ on Linux)


def tcp_min_rtt(sock: socket.socket) -> float | None:
    """The kernel's minimum round-trip time (s) of ``sock``'s TCP connection over its recent segments
    (Linux; windowed by net.ipv4.tcp_min_rtt_wlen, 300 s by default), or None."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        b = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
    except OSError:
        return None
    if len(b) < _TCPI_MIN_RTT + 4:
        return None
    us = struct.unpack_from("I", b, _TCPI_MIN_RTT)[0]
    return us / 1e6 if 0 < us < 0xFFFFFFFF else None


def tcp_tx_state(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes acknowledged by the peer so far, bytes in the send queue not yet acknowledged) of
    ``sock``'s TCP connection (Linux: ``tcpi_bytes_acked``, ``SIOCOUTQ``), or None."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        b = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
        if len(b) < _TCPI_BYTES_ACKED + 8:
            return None
        acked = struct.unpack_from("Q", b, _TCPI_BYTES_ACKED)[0]
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return None
    return int(acked), max(0, int(queued))
