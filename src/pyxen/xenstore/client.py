"""A blocking xenstore client over xenstored's unix socket (libxenstore's role for pyxen).

Used by the toolstack and the VMM processes; tests use it as a reference client next to
Debian's ``xenstore-utils`` and pyxs. Requests are synchronous (one in flight, as libxenstore
without threads); watch events that arrive meanwhile are queued for :meth:`read_watch`.
Errors come back as :class:`XenstoreError` with Xen's error name (``ENOENT`` ...), the same
type the in-process :class:`~pyxen.xenstore.server.XenstoreServer` API raises, so code such as
:func:`~pyxen.xenstore.server.populate_domain` runs against either.

:meth:`introduce` may attach file descriptors (SCM_RIGHTS): pyxen's xenstored maps a domain's
store page and signals its event channel through them (see ``daemon``). The migration helpers
(:meth:`export_domain`, :meth:`thaw_domain`, :meth:`import_domain`) are pyxen's XS_CONTROL
extensions; their JSON document travels in a memfd sent along with the request.

Not thread-safe: one owner per client.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections import deque
from collections.abc import Iterable, Sequence

from pyxen.xenstore.store import XenstoreError
from pyxen.xenstore.wire import (XS_CONTROL, XS_DIRECTORY, XS_ERROR, XS_GET_PERMS, XS_INTRODUCE,
                                 XS_IS_DOMAIN_INTRODUCED, XS_MKDIR, XS_READ, XS_RELEASE, XS_RM,
                                 XS_SET_PERMS, XS_TRANSACTION_END, XS_TRANSACTION_START,
                                 XS_UNWATCH, XS_WATCH, XS_WATCH_EVENT, XS_WRITE, XSD_ERRORS,
                                 Message, MessageParser, join_strings, pack, split_strings)

DEFAULT_SOCKET = "/run/xenstored/socket"


def socket_path() -> str:
    """The xenstored socket clients use: ``$XENSTORED_PATH`` (as libxenstore) or Xen's path."""
    return os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET


class XenstoreClient:
    """One connection to xenstored as domain 0. ``timeout`` (s) bounds each reply."""

    def __init__(self, path: str | None = None, timeout: float | None = 10.0) -> None:
        self.path = path or socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise
        self._parser = MessageParser()
        self._ready: deque[Message] = deque()
        self._events: deque[tuple[str, str]] = deque()
        self._req_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XenstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- transport

    def request(self, typ: int, payload: bytes, tx: int = 0,
                fds: Sequence[int] = ()) -> bytes:
        """Send one request and return its reply payload; raises XenstoreError on XS_ERROR,
        ConnectionError if xenstored goes away."""
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        data = pack(Message(typ, self._req_id, tx, payload))
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
        else:
            self.sock.sendall(data)
        while True:
            msg = self._next()
            if msg.type == XS_WATCH_EVENT:
                self._queue_event(msg)
                continue
            if msg.req_id != self._req_id:
                continue                           # a stale reply (should not happen)
            if msg.type == XS_ERROR:
                name = msg.payload.rstrip(b"\0").decode("ascii", "replace")
                raise XenstoreError(name if name in XSD_ERRORS else "EIO", name)
            return msg.payload

    def _next(self) -> Message:
        while not self._ready:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"xenstored at {self.path} closed the connection")
            self._ready.extend(self._parser.feed(data))
        return self._ready.popleft()

    def _queue_event(self, msg: Message) -> None:
        parts = split_strings(msg.payload)
        if len(parts) >= 2:
            self._events.append((parts[0].decode("ascii", "replace"),
                                 parts[1].decode("ascii", "replace")))

    # ----------------------------------------------------------------- operations

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(XS_READ, join_strings(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        self.request(XS_WRITE, path.encode() + b"\0" + v, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(XS_MKDIR, join_strings(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(XS_RM, join_strings(path), tx)

    def try_read(self, path: str, tx: int = 0) -> bytes | None:
        """The value, or None if the node does not exist."""
        try:
            return self.read(path, tx)
        except XenstoreError as e:
            if e.name == "ENOENT":
                return None
            raise

    def exists(self, path: str) -> bool:
        return self.try_read(path) is not None

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return [p.decode() for p in split_strings(self.request(XS_DIRECTORY,
                                                               join_strings(path), tx))]

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return [p.decode() for p in split_strings(self.request(XS_GET_PERMS,
                                                               join_strings(path), tx))]

    def set_perms(self, path: str, perms: Iterable[str], tx: int = 0) -> None:
        self.request(XS_SET_PERMS, join_strings(path, *perms), tx)

    def transaction_start(self) -> int:
        return int(self.request(XS_TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        """Raises XenstoreError("EAGAIN") when the transaction conflicted."""
        self.request(XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def watch(self, path: str, token: str) -> None:
        self.request(XS_WATCH, join_strings(path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.request(XS_UNWATCH, join_strings(path, token))

    def read_watch(self) -> tuple[str, str]:
        """The next watch event ``(path, token)``; blocks up to the socket timeout."""
        while not self._events:
            msg = self._next()
            if msg.type == XS_WATCH_EVENT:
                self._queue_event(msg)
        return self._events.popleft()

    def introduce(self, domid: int, mfn: int, port: int, fds: Sequence[int] = ()) -> None:
        """XS_INTRODUCE. With pyxen's xenstored, ``fds`` = (memfd, guest-notify eventfd,
        xenstored-notify eventfd) and ``mfn`` = the store page's index in that memfd."""
        self.request(XS_INTRODUCE, join_strings(str(domid), str(mfn), str(port)), fds=fds)

    def release(self, domid: int) -> None:
        self.request(XS_RELEASE, join_strings(str(domid)))

    def is_introduced(self, domid: int) -> bool:
        return self.request(XS_IS_DOMAIN_INTRODUCED, join_strings(str(domid))) == b"T\0"

    # ----------------------------------------------------------------- migration (pyxen)

    def export_domain(self, domid: int, roots: Iterable[str]) -> dict:
        """Freeze ``domid``'s store ring on this xenstored and return its migration document
        (nodes under ``roots``, absolute paths, plus the ring connection's state; format in
        :func:`pyxen.xenstore.server.migration_document`). The ring stays frozen until
        :meth:`thaw_domain` or XS_RELEASE. XenstoreError: EINVAL, ENOENT (no ring here)."""
        fd = os.memfd_create("pyxen-xs-export", os.MFD_CLOEXEC)
        try:
            self.request(XS_CONTROL, join_strings("pyxen-export", str(domid), *roots),
                         fds=(fd,))
            data = bytearray()
            while chunk := os.pread(fd, 1 << 20, len(data)):
                data += chunk
        finally:
            os.close(fd)
        return json.loads(data)

    def thaw_domain(self, domid: int) -> None:
        """Undo :meth:`export_domain`'s freeze (the migration failed): xenstored serves the
        ring again, including everything the guest sent meanwhile."""
        self.request(XS_CONTROL, join_strings("pyxen-thaw", str(domid)))

    def import_domain(self, domid: int, state: dict) -> None:
        """Load a document from :meth:`export_domain` into this xenstored: its nodes are
        written now, its connection state is taken up by ``domid``'s next :meth:`introduce`
        with descriptors. XenstoreError EINVAL (nothing changed) for a bad document, EEXIST
        if the domain's ring is served here."""
        fd = os.memfd_create("pyxen-xs-import", os.MFD_CLOEXEC)
        try:
            data = memoryview(json.dumps(state, separators=(",", ":")).encode())
            while data:
                data = data[os.write(fd, data):]
            self.request(XS_CONTROL, join_strings("pyxen-import", str(domid)), fds=(fd,))
        finally:
            os.close(fd)
