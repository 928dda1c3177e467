"""xenstored's unix-socket side: the sans-IO :class:`XenstoreServer` behind a listening socket.

Clients on the socket are domain 0 (privileged), as with Xen's C xenstored; Debian's
``xenstore-utils`` (``xenstore-read`` etc., via ``XENSTORED_PATH``) and pyxs speak to it
unchanged. One thread runs a ``selectors`` loop: it reads requests, hands each to its
connection, and writes every connection's queued replies and watch events (a request on one
connection can fire watches on others). State is kept in a JSON snapshot (written atomically
after each request that may change the store) and reloaded at start, so the store survives a
restart.

Who calls: ``pyxen xenstored`` (CLI) or tests; :meth:`serve_forever` on one thread,
:meth:`stop` from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
from pathlib import Path

from pyxen.xenstore.server import Connection, XenstoreServer
from pyxen.xenstore.store import Store
from pyxen.xenstore.wire import (XS_INTRODUCE, XS_MKDIR, XS_RELEASE, XS_RM, XS_SET_PERMS,
                                 XS_TRANSACTION_END, XS_WRITE, MessageParser, ProtocolError,
                                 pack)

log = logging.getLogger("pyxen.xenstored")

DEFAULT_SOCKET = "/run/xenstored/socket"
_MUTATING = {XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS, XS_TRANSACTION_END, XS_INTRODUCE,
             XS_RELEASE}


class _Client:
    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.parser = MessageParser()
        self.out = bytearray()


class XenstoredDaemon:
    """Serves ``server`` (a new one, or loaded from ``state_path``) on ``socket_path``."""

    def __init__(self, socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
                 state_path: str | os.PathLike[str] | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.state_path = Path(state_path) if state_path else None
        store = None
        if self.state_path and self.state_path.is_file():
            store = Store.from_dict(json.loads(self.state_path.read_text()))
            log.info("xenstored: state loaded from %s", self.state_path)
        self.server = XenstoreServer(store)
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self._stop_r, self._stop_w = os.pipe()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)          # dom0 only: root, as xenstored does
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        self.ready = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        self.ready.set()
        try:
            while True:
                for key, events in self.sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "listen":
                        self._accept()
                    else:
                        client = key.data
                        if events & selectors.EVENT_READ:
                            self._read(client)
                        if events & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                            self._write(client)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (any thread; a no-op once stopped)."""
        with self._stop_lock:
            if not self._stopped:
                os.write(self._stop_w, b"x")

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        client = _Client(sock, self.server.connect(0))
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        try:
            msgs = client.parser.feed(data)
        except ProtocolError as e:
            log.info("xenstored: dropping a client: %s", e)
            self._drop(client)
            return
        changed = False
        for m in msgs:
            client.conn.handle(m)
            changed |= m.type in _MUTATING
        self._flush_all()
        if changed:
            self._snapshot()

    def _flush_all(self) -> None:
        """Move every connection's queued messages to its socket buffer (watch events)."""
        for c in list(self.clients.values()):
            for m in c.conn.outgoing():
                c.out += pack(m)
            if c.out:
                self._write(c)

    def _write(self, client: _Client) -> None:
        try:
            n = client.sock.send(client.out)
            del client.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        self.sel.modify(client.sock, mask, client)

    def _drop(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        self.server.disconnect(client.conn)
        client.sock.close()

    def _snapshot(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        with self.server.lock:
            data = json.dumps(self.server.store.to_dict())
        tmp.write_text(data)
        os.replace(tmp, self.state_path)

    def _shutdown(self) -> None:
        for c in list(self.clients.values()):
            self._drop(c)
        self.sel.close()
        self.listener.close()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        with self._stop_lock:
            self._stopped = True
            os.close(self._stop_r)
            os.close(self._stop_w)
