"""A worker's listening socket and its connections: accept, authenticate, read frames, dispatch them by kind.

Every frame kind a worker takes is registered with :meth:`Server.register` by the part of the
worker that handles it — requests (``input``, ``piece``, ``begin``, ``cancel``, ``fail``,
``stats``: execution.py), deploys (``deploy``, ``file``, ``commit``: deploy.py), and whatever a
full worker process adds (remote profiling and link probes: ``edgepart.fcpm``). The server
itself answers ``ping`` and takes ``pong`` and ``bye``. A frame's header is checked against its
kind's rules — the connection roles it may come on, what its payload may be (``expect``, see
``Channel.recv``) — before any of its payload is read. A frame of a kind nobody registered, or
that fails any check, is refused: logged with the reason, answered with a ``refused`` frame
(unless its MAC was wrong) and its connection closed; the worker stays up.

Connections before they authenticated cost the worker a thread and a few KiB each, and anyone who
can reach the port can open them, so they are bounded (docs/security.md, "Floods"): at most
``MAX_PENDING`` in their handshake at once and ``MAX_PENDING_PER_PEER`` from one address; one over
either limit makes room by closing the handshake least far along (:meth:`_Pending.worth`: a
verified hello not confirmed within ``CONFIRM_GRACE`` — a replay —, then one that sent nothing,
then one that sent something; among equals from the address with the most, then the oldest), so a
client whose hello and confirmation come promptly gets through a flood; connections the kernel
queued are accepted in batches and those closed again within the batch never get a thread; the
whole hello and confirmation must complete within ``HANDSHAKE_TIMEOUT``; a thread that cannot
start closes its socket and the loop goes on. Authenticated connections
number at most ``MAX_CONNECTIONS`` (one more is answered ``busy``) and close after
``IDLE_TIMEOUT`` seconds without a frame either way (clients ping every second). After a burst
of failed handshakes and after deploys the worker hands freed memory back to the OS
(allocator.release_memory).
"""
from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edgepart.runtime.allocator import release_memory
from edgepart.runtime.protocol import (DEFAULT_MAX_PAYLOAD, HANDSHAKE_TIMEOUT, Channel, Frame, PeerClosed,
                                       ProtocolError, WorkerBusy, parse_address)
from edgepart.runtime.transport import Writer

log = logging.getLogger("edgepart.worker")

MAX_CONNECTIONS = 256          # authenticated connections
MAX_PENDING = 128              # connections still in their handshake, in total
MAX_PENDING_PER_PEER = 8       # ... and from one peer address
CONFIRM_GRACE = 0.25           # s from a verified hello to its key confirmation before it counts as a replay
ACCEPT_BATCH = 256             # connections accepted before any of them gets a thread
LISTEN_BACKLOG = 4096          # connections the kernel queues for accept (capped by net.core.somaxconn): a
                               # short queue drops a client's SYN under a flood and TCP retries after 1, 3, 7 s
IDLE_TIMEOUT = 120.0           # s without a frame in either direction: an authenticated connection is closed
BYE_GRACE_S = 0.5              # s between the idle bye to a peer worker and the close
LOG_BURST, LOG_WINDOW = 20, 10.0  # refused handshakes logged one by one, then counted
TRIM_INTERVAL = 2.0            # s: memory is handed back at most this often after failed handshakes
# what makes a frame refused (and its connection closed) rather than a bug in the worker
REFUSED = (ProtocolError, ValueError, KeyError, TypeError)


@dataclass(eq=False)
class _Pending:
    """A connection in its handshake: since when, from where, and whether its thread runs yet."""

    t: float
    sock: socket.socket
    host: str
    level: int = 0               # how far along: 0 silent, 1 sent something, 2 its hello verified
    started: bool = False
    evicted: bool = False

    verified_at: float = 0.0

    def worth(self, now: float) -> int:
        """How much keeping it is worth: a hello that verified but got no key confirmation within
        CONFIRM_GRACE (a replay: a client confirms within one round trip) least, then one that has
        sent nothing, then one that sent something, then a verified hello still within its grace."""
        if self.level == 2 and now - self.verified_at > CONFIRM_GRACE:
            return -1
        return self.level


class Conn:
    """One accepted, authenticated connection: its channel, its writer and who is on the other end."""

    def __init__(self, ch: Channel, out: Writer):
        self.ch = ch
        self.out = out
        self.role = str(ch.peer.get("role", "?"))[:16]
        self.name = str(ch.peer.get("name", ""))[:64]
        self.clean = False                   # the other end said bye: its going away is not a failure
        self.idle = 0.0                      # when the worker began closing it for sending nothing for too long

    def label(self) -> str:
        return f"{self.role} {self.name or '?'} at {self.ch.peer_addr}"


@dataclass(frozen=True)
class Handler:
    """How a server takes one frame kind.

    ``handle(conn, frame)`` runs in the connection's reader thread (raising one of ``REFUSED``
    refuses the frame); ``expect(conn, header)`` says what the payload may be (None: no payload;
    it may raise ProtocolError to refuse the frame before its payload is read); ``roles``: the
    hello roles of the connections it may come on (None: any).
    """

    handle: Callable[[Conn, Frame], None]
    expect: Callable[[Conn, dict], Any] | None = None
    roles: tuple[str, ...] | None = None


class Server:
    """Accepts connections on ``listen`` (port 0: any free port) and dispatches their frames.

    ``hello()`` is the header this end answers a hello with (it names the device and bundle, which
    change with deploys); ``stats`` is the worker's counter (``refused`` frames are counted here).
    Callbacks registered with :meth:`on_disconnect` hear of every connection that ended, after it
    was closed: ``callback(conn, reason)`` (reason None for a clean close).
    """

    def __init__(self, listen: str, key: bytes, hello: Callable[[], dict], stats: collections.Counter,
                 stop_event: threading.Event, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 idle_timeout: float = IDLE_TIMEOUT, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_pending: int = MAX_PENDING, max_pending_per_peer: int = MAX_PENDING_PER_PEER,
                 max_connections: int = MAX_CONNECTIONS):
        self.key = key
        self.listen_addr = parse_address(listen)
        self.hello = hello
        self.stats = stats
        self.stop_event = stop_event
        self.max_payload = max_payload
        self.handlers: dict[str, Handler] = {}
        self.disconnect_callbacks: list[Callable[[Conn, str | None], None]] = []
        self.lock = threading.Lock()
        self.conns: set[Conn] = set()
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.max_connections = max_connections
        # sockets in their handshake, per peer address, oldest first (guarded by self.lock)
        self.pending: dict[str, collections.deque] = {}
        self.by_sock: dict[socket.socket, _Pending] = {}
        self.silent: dict[_Pending, None] = {}        # pending that sent nothing yet, oldest first
        self.verified: dict[_Pending, None] = {}      # pending whose hello verified, oldest first
        self.n_pending = 0
        self._trim_wanted = False
        self._log_window, self._log_count, self._log_dropped = 0.0, 0, 0
        self.sock: socket.socket | None = None
        self.address: str | None = None
        self.register("ping", lambda conn, f: conn.out.put({"kind": "pong", "t": f.get("t")}))
        self.register("pong", lambda conn, f: None)
        self.register("bye", self._on_bye)

    def register(self, kind: str, handle: Callable[[Conn, Frame], None],
                 expect: Callable[[Conn, dict], Any] | None = None, roles: tuple[str, ...] | None = None) -> None:
        """Take frames of ``kind`` (see :class:`Handler`); a kind is registered once."""
        if kind in self.handlers:
            raise ValueError(f"frame kind {kind!r} is already registered")
        self.handlers[kind] = Handler(handle, expect, roles)

    def on_disconnect(self, callback: Callable[[Conn, str | None], None]) -> None:
        self.disconnect_callbacks.append(callback)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> str:
        """Bind, listen and start accepting; the address listened on (``host:port``)."""
        host = self.listen_addr[0]
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.listen_addr)
        s.listen(LISTEN_BACKLOG)
        self.sock = s
        host, port = s.getsockname()[:2]
        self.address = f"{host}:{port}"
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
        threading.Thread(target=self._janitor_loop, name="janitor", daemon=True).start()
        return self.address

    def close(self) -> None:
        """Stop accepting and close every connection (the stop event is the caller's to set)."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.ch.close()

    # --- connections ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self.stop_event.is_set():
            batch = []
            try:
                batch.append(self.sock.accept())
                # take what else is queued at once: under a flood most of it is closed again before any
                # thread starts for it (only the handshakes furthest along survive the limits)
                self.sock.setblocking(False)
                try:
                    while len(batch) < ACCEPT_BATCH:
                        sock, addr = self.sock.accept()
                        sock.setblocking(True)
                        batch.append((sock, addr))
                except BlockingIOError:
                    pass
                finally:
                    self.sock.setblocking(True)
            except (OSError, ValueError):
                if self.stop_event.is_set():
                    for sock, _ in batch:
                        _close_quietly(sock)
                    return
                if not batch:
                    time.sleep(0.05)        # e.g. out of file descriptors: handshakes end within seconds
                    continue
            try:
                self._admit_batch(batch)
            except Exception:  # noqa: BLE001 — nothing may end the accept loop
                log.exception("accepting %d connection(s) failed", len(batch))
                for sock, _ in batch:
                    self._unpend(sock)
                    _close_quietly(sock)

    def _admit_batch(self, batch: list) -> None:
        """Enter each new connection among the pending handshakes (making room: see the module
        docstring), then start a handshake thread for each that is still there."""
        victims = []
        entries = []
        poll = select.poll()
        for sock, _ in batch:
            poll.register(sock, select.POLLIN)
        has_data = {fd for fd, _ in poll.poll(0)}
        with self.lock:
            for sock, addr in batch:
                host = str(addr[0])
                if len(self.pending.get(host, ())) >= self.max_pending_per_peer:
                    now = time.monotonic()
                    victims.append(self._evict(min(self.pending[host], key=lambda e: (e.worth(now), e.t))))
                if self.n_pending >= self.max_pending:
                    victims.append(self._evict(self._least_worth()))
                e = _Pending(time.monotonic(), sock, host, level=1 if sock.fileno() in has_data else 0)
                self.pending.setdefault(host, collections.deque()).append(e)
                self.by_sock[sock] = e
                if e.level == 0:
                    self.silent[e] = None
                self.n_pending += 1
                entries.append((e, addr))
        for v in victims:
            if v is None:
                continue
            self.stats["evicted"] += 1
            if v.started:
                try:
                    v.sock.shutdown(socket.SHUT_RDWR)      # wakes its handshake thread, which closes it
                except OSError:
                    pass
            else:
                _close_quietly(v.sock)                     # evicted by a newer one of the same batch
        for e, addr in entries:
            with self.lock:
                if e.evicted:
                    continue
                e.started = True
            try:
                threading.Thread(target=self._serve, args=(e.sock, addr), name=f"conn-{addr[1]}",
                                 daemon=True).start()
            except RuntimeError as err:                    # can't start new thread: refuse this one, keep accepting
                log.warning("refused connection from %s: cannot start a thread (%s)", e.host, err)
                self._unpend(e.sock)
                _close_quietly(e.sock)

    def _least_worth(self) -> "_Pending":
        """The pending handshake to close first (lock held): the least far along (see
        :meth:`_Pending.worth`; among equals, from the address with the most, then the oldest).
        The two common cases — a replayed hello past its grace, a connection that sent nothing —
        are found in O(1): the oldest verified hello, the oldest silent connection."""
        now = time.monotonic()
        oldest_verified = next(iter(self.verified), None)
        if oldest_verified is not None and oldest_verified.worth(now) < 0:
            return oldest_verified
        if self.silent:
            return next(iter(self.silent))
        return min((e for q in self.pending.values() for e in q),
                   key=lambda e: (e.worth(now), -len(self.pending[e.host]), e.t))

    def _evict(self, v: "_Pending") -> "_Pending":
        """Take ``v`` off the pending lists (lock held)."""
        q = self.pending[v.host]
        q.remove(v)
        self.by_sock.pop(v.sock, None)
        self.silent.pop(v, None)
        self.verified.pop(v, None)
        v.evicted = True
        self.n_pending -= 1
        if not q:
            del self.pending[v.host]
        return v

    def _hello_verified(self, sock: socket.socket) -> None:
        with self.lock:
            e = self.by_sock.get(sock)
            if e is not None:
                e.level, e.verified_at = 2, time.monotonic()
                self.silent.pop(e, None)
                self.verified[e] = None

    def _unpend(self, sock: socket.socket) -> None:
        with self.lock:
            e = self.by_sock.get(sock)
            if e is not None:                           # else: evicted meanwhile
                self._evict(e)

    def _admit(self) -> str | None:
        """Room for one more authenticated connection? None, else why not (answered ``busy``)."""
        with self.lock:
            if len(self.conns) >= self.max_connections:
                return f"{self.max_connections} connections already open"
        return None

    def _serve(self, sock: socket.socket, addr) -> None:
        where = "%s:%s" % addr[:2]
        try:
            def admit():
                self._hello_verified(sock)
                return self._admit()
            ch = Channel.server_handshake(sock, self.key, self.hello(), timeout=self.handshake_timeout,
                                          max_payload=self.max_payload, admit=admit)
        except PeerClosed:
            self._unpend(sock)
            _close_quietly(sock)
            self._trim_wanted = True
            return
        except WorkerBusy as e:
            self._unpend(sock)
            self.stats["busy"] += 1
            log.warning("refused connection from %s: busy (%s)", where, e)
            _close_quietly(sock)
            return
        except (ProtocolError, OSError, ValueError) as e:
            self._unpend(sock)
            self.stats["refused"] += 1
            self._log_refusal(where, e)
            _close_quietly(sock)
            self._trim_wanted = True
            return
        except BaseException:
            self._unpend(sock)
            _close_quietly(sock)
            raise
        self._unpend(sock)
        conn = Conn(ch, Writer(f"out-{where}", ch))
        with self.lock:
            self.conns.add(conn)
        reason = None
        try:
            while not self.stop_event.is_set():
                frame = ch.recv(lambda h: self._expect(conn, h))
                self.handlers[frame.kind].handle(conn, frame)
                frame = None                    # its buffers are free before the next frame arrives
                if conn.clean:
                    break
        except PeerClosed:
            reason = "idle: closed by the worker" if getattr(conn, "idle", False) else "closed the connection"
        except REFUSED as e:
            self.stats["refused"] += 1
            reason = f"refused frame: {e}"
            log.warning("refused frame from %s: %s; closing the connection", conn.label(), e)
            if not isinstance(e, ProtocolError) or "MAC" not in str(e):
                try:
                    ch.send({"kind": "refused", "reason": str(e)[:500]})
                except (OSError, PeerClosed, ProtocolError):
                    pass
        except OSError as e:
            reason = f"connection lost ({e})"
        finally:
            conn.out.close()
            conn.out.join(timeout=1.0)
            ch.close()
            with self.lock:
                self.conns.discard(conn)
        if not conn.clean and reason is None:
            reason = "connection lost"
        if conn.idle and conn.role == "peer":
            conn.clean = True         # closed here for idleness: the peer worker is not down for that
        for callback in self.disconnect_callbacks:
            callback(conn, None if conn.clean else reason)

    def request_trim(self) -> None:
        """Hand freed memory back to the OS soon (after a deploy or a profile; see allocator.release_memory)."""
        self._trim_wanted = True

    def _log_refusal(self, where: str, e: Exception) -> None:
        """Log a refused handshake; under a flood, at most LOG_BURST lines per LOG_WINDOW s (then a count)."""
        now = time.monotonic()
        with self.lock:
            if now - self._log_window > LOG_WINDOW:
                if self._log_dropped:
                    log.warning("... and %d more refused connections in the last %.0f s", self._log_dropped,
                                LOG_WINDOW)
                self._log_window, self._log_count, self._log_dropped = now, 0, 0
            self._log_count += 1
            quiet = self._log_count > LOG_BURST
            if quiet:
                self._log_dropped += 1
        if not quiet:
            log.warning("refused connection from %s: %s", where, e)

    def _janitor_loop(self) -> None:
        """Close idle authenticated connections; hand memory back after a burst of failed handshakes."""
        last_trim = 0.0
        tick = min(0.5, self.idle_timeout / 4)
        while not self.stop_event.wait(tick):
            now = time.monotonic()
            with self.lock:
                idle = [c for c in self.conns if c.idle or now - c.ch.last_activity > self.idle_timeout]
                quiet = self.n_pending == 0
            for c in idle:
                if c.role == "peer" and not c.idle:
                    # a peer worker's link reconnects on its next frame: told why, it does not take the
                    # close for the device going down (a failover); closed for good after BYE_GRACE_S
                    log.info("closing %s: no frame for %.0f s (bye)", c.label(), self.idle_timeout)
                    c.idle = now
                    self.stats["idle_closed"] += 1
                    c.out.put({"kind": "bye", "reason": "idle"})
                    continue
                if c.idle and now - c.idle < BYE_GRACE_S:
                    continue
                if not c.idle:
                    log.info("closing %s: no frame for %.0f s", c.label(), self.idle_timeout)
                    c.idle = now
                    self.stats["idle_closed"] += 1
                try:
                    c.ch.sock.shutdown(socket.SHUT_RDWR)     # its reader sees the end and cleans up
                except OSError:
                    pass
            if self._trim_wanted and quiet and now - last_trim > TRIM_INTERVAL:
                self._trim_wanted = False
                last_trim = now
                release_memory()

    def _expect(self, conn: Conn, h: dict):
        kind = h["kind"]
        handler = self.handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown frame kind {kind[:40]!r}")
        if handler.roles is not None and conn.role not in handler.roles:
            raise ProtocolError(f"{kind!r} frames come only on a {' or '.join(handler.roles)} connection, "
                                f"not a {conn.role!r} one")
        return handler.expect(conn, h) if handler.expect is not None else None

    def _on_bye(self, conn: Conn, frame: Frame) -> None:
        conn.clean = True


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

