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
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edgepart.runtime.protocol import (DEFAULT_MAX_PAYLOAD, Channel, Frame, PeerClosed, ProtocolError,
                                       parse_address)
from edgepart.runtime.transport import Writer

log = logging.getLogger("edgepart.worker")

MAX_CONNECTIONS = 256
# what makes a frame refused (and its connection closed) rather than a bug in the worker
REFUSED = (ProtocolError, ValueError, KeyError, TypeError)


class Conn:
    """One accepted, authenticated connection: its channel, its writer and who is on the other end."""

    def __init__(self, ch: Channel, out: Writer):
        self.ch = ch
        self.out = out
        self.role = str(ch.peer.get("role", "?"))[:16]
        self.name = str(ch.peer.get("name", ""))[:64]
        self.clean = False                   # the other end said bye: its going away is not a failure

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
                 stop_event: threading.Event, max_payload: int = DEFAULT_MAX_PAYLOAD):
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
        s.listen(128)
        self.sock = s
        host, port = s.getsockname()[:2]
        self.address = f"{host}:{port}"
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
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
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.05)
                continue
            with self.lock:
                too_many = len(self.conns) >= MAX_CONNECTIONS
            if too_many:
                log.warning("refused connection from %s: %d connections already open", addr, MAX_CONNECTIONS)
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, addr), name=f"conn-{addr[1]}", daemon=True).start()

    def _serve(self, sock: socket.socket, addr) -> None:
        where = "%s:%s" % addr[:2]
        try:
            ch = Channel.server_handshake(sock, self.key, self.hello(), max_payload=self.max_payload)
        except PeerClosed:
            sock.close()
            return
        except (ProtocolError, OSError, ValueError) as e:
            self.stats["refused"] += 1
            log.warning("refused connection from %s: %s", where, e)
            sock.close()
            return
        conn = Conn(ch, Writer(f"out-{where}", ch))
        with self.lock:
            self.conns.add(conn)
        reason = None
        try:
            while not self.stop_event.is_set():
                frame = ch.recv(lambda h: self._expect(conn, h))
                self.handlers[frame.kind].handle(conn, frame)
                if conn.clean:
                    break
        except PeerClosed:
            reason = "closed the connection"
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
        for callback in self.disconnect_callbacks:
            callback(conn, None if conn.clean else reason)

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
