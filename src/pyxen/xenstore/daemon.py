"""xenstored's unix-socket side: the sans-IO :class:`XenstoreServer` behind a listening socket.

Clients on the socket are domain 0 (privileged), as with Xen's C xenstored; Debian's
``xenstore-utils`` (``xenstore-read`` etc., via ``XENSTORED_PATH``) and pyxs speak to it
unchanged. One thread runs a ``selectors`` loop: it reads requests, hands each to its
connection, and writes every connection's queued replies and watch events (a request on one
connection can fire watches on others). State is kept in a JSON snapshot (written atomically
after each request that may change the store) and reloaded at start, so the store survives a
restart.

Guest rings: the domain builder (a VMM process) sends XS_INTRODUCE(domid, mfn, port) with
three file descriptors attached (SCM_RIGHTS): the domain's memory memfd, an eventfd the VMM
signals when the guest notifies its store port, and an eventfd xenstored signals to raise
that port. ``mfn`` is the store page's index in the memfd (pyxen's "machine" frame). The
daemon maps that one page and serves it with :class:`XenstoreRing` on the same loop, until
XS_RELEASE. An INTRODUCE without descriptors (e.g. from ``xenstore-control``-style tools)
only marks the domain introduced. A repeated INTRODUCE with descriptors replaces the ring
(a VMM reconnecting after a xenstored restart).

Migration (socket clients only): XS_CONTROL commands whose bulk data travels through one
file descriptor attached to the request (SCM_RIGHTS; a memfd), in the JSON format of
:func:`~pyxen.xenstore.server.migration_document`:

* ``pyxen-export\\0<domid>\\0<root>\\0...`` + a writable regular file: freeze the domain's
  ring (:meth:`XenstoreRing.freeze`), write the nodes under the roots and the connection
  state to the file (from offset 0, truncated to the document), reply OK. Repeatable.
* ``pyxen-thaw\\0<domid>\\0``: unfreeze (the migration failed); the guest is served whatever
  it sent meanwhile.
* ``pyxen-import\\0<domid>\\0`` + a readable regular file: validate the whole document, then
  write its nodes (as dom0) and park its connection state; the domain's next INTRODUCE with
  descriptors serves that connection (watches without initial events, doomed transactions,
  queued output first, partial request fed first). Watch events for the domain queue on the
  parked connection meanwhile. Refused with EEXIST while the domain's ring is served here.

Errors: EINVAL (bad domid -- 0, reserved or not a number --, a missing/extra/unusable
descriptor, bad JSON or document), ENOENT (export/thaw of a domain without a ring here),
E2BIG (document over MIGRATION_MAX_BYTES). A failed command changes nothing. Frozen domains
and parked connections are kept in the state file.

Who calls: ``pyxen xenstored`` (CLI) or tests; :meth:`serve_forever` on one thread,
:meth:`stop` from any thread.
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import mmap
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pyxen.xenstore.ring import XenstoreRing
from pyxen.xenstore.server import (Connection, ConnectionState, XenstoreServer,
                                   migration_document, parse_migration_document)
from pyxen.xenstore.store import Store, XenstoreError
from pyxen.xenstore.wire import (XS_CONTROL, XS_INTRODUCE, XS_MKDIR, XS_RELEASE, XS_RM,
                                 XS_SET_PERMS, XS_TRANSACTION_END, XS_WATCH_EVENT, XS_WRITE,
                                 Message, MessageParser, ProtocolError, pack, split_strings)

log = logging.getLogger("pyxen.xenstored")

DEFAULT_SOCKET = "/run/xenstored/socket"
_MUTATING = {XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS, XS_TRANSACTION_END, XS_INTRODUCE,
             XS_RELEASE}


_MAX_FDS = 8
OUTPUT_MAX_MESSAGES = 65536            # queued for one socket client before it is dropped
#: changes reach the state file within this many seconds (at once when the loop goes idle)
SNAPSHOT_DELAY = 0.1
#: largest migration document pyxen-import reads
MIGRATION_MAX_BYTES = 64 << 20
_EXPORT, _THAW, _IMPORT = b"pyxen-export", b"pyxen-thaw", b"pyxen-import"


class _Client:
    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.parser = MessageParser()
        self.out = bytearray()                     # packed bytes being sent
        self.pending: deque[Message] = deque()     # not yet packed (events coalesce here)
        self.queued_events: set[bytes] = set()     # payloads of the watch events in pending
        self.fds: list[int] = []                   # received with SCM_RIGHTS, not yet used


class _DomainRing:
    """One introduced domain's store page, mapped from its memfd, and its two eventfds."""

    def __init__(self, domid: int, mm: mmap.mmap, kick_fd: int, notify_fd: int) -> None:
        self.domid = domid
        self.mm = mm
        self.kick_fd = kick_fd                     # the VMM signals: the guest notified us
        self.notify_fd = notify_fd                 # we signal: raise the guest's store port
        self.ring: XenstoreRing | None = None
        self.view = memoryview(mm)

    def raise_event(self) -> None:
        try:
            os.eventfd_write(self.notify_fd, 1)
        except OSError:
            pass                                   # the VMM is gone; release follows

    def close(self) -> None:
        self.view.release()
        if self.ring is not None:
            self.ring.page.release()
            self.ring.words.release()
        try:
            self.mm.close()
        except BufferError:                        # a view still alive: leave it to GC
            pass
        for fd in (self.kick_fd, self.notify_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class _Imported:
    """A domain's connection from pyxen-import, parked until its INTRODUCE: the registered
    connection (watches, doomed transactions, events queued since) and the ring bytes."""
    conn: Connection
    output: bytes
    input: bytes

    def state(self) -> ConnectionState:
        st = self.conn.state()
        return ConnectionState(st.watches, st.transactions, self.output + st.output,
                               self.input)


class XenstoredDaemon:
    """Serves ``server`` (a new one, or loaded from ``state_path``) on ``socket_path``."""

    def __init__(self, socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
                 state_path: str | os.PathLike[str] | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.state_path = Path(state_path) if state_path else None
        store = None
        #: watches of introduced domains from the state file, re-armed when each domain is
        #: introduced again (its VMM reconnects after a xenstored restart)
        self.saved_watches: dict[int, list[tuple[str, bytes]]] = {}
        #: pyxen-import: connections waiting for their domain's INTRODUCE
        self.imported: dict[int, _Imported] = {}
        #: pyxen-export: domains whose ring is frozen (also across a restart)
        self.frozen: set[int] = set()
        parked: dict[str, object] = {}
        if self.state_path and self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            if "store" in state:                   # {"store": ..., "domain_watches": ...}
                self.saved_watches = {
                    int(d): [(p, t.encode("latin-1")) for p, t in ws]
                    for d, ws in state.get("domain_watches", {}).items()}
                self.frozen = {int(d) for d in state.get("frozen", [])}
                parked = state.get("imported", {})
                state = state["store"]
            store = Store.from_dict(state)
            log.info("xenstored: state loaded from %s", self.state_path)
        self.server = XenstoreServer(store, on_release=self._release_ring)
        for d, st in parked.items():
            try:
                domid = int(d)
                cs = ConnectionState.from_json(st, domid)
                self.imported[domid] = _Imported(self.server.restore_connection(domid, cs),
                                                 cs.output, cs.input)
            except (XenstoreError, ValueError) as e:
                log.warning("xenstored: state file: imported connection of dom%s: %s", d, e)
        self.rings: dict[int, _DomainRing] = {}
        self._dirty = False
        self._dirty_since = 0.0
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
                ready = self.sel.select(SNAPSHOT_DELAY if self._dirty else None)
                if self._dirty and (not ready or
                                    time.monotonic() - self._dirty_since >= SNAPSHOT_DELAY):
                    self._snapshot()
                for key, events in ready:
                    if key.data == "stop":
                        return
                    if key.data == "listen":
                        self._accept()
                    elif isinstance(key.data, _DomainRing):
                        self._kicked(key.data)
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
        fds = array.array("i")
        try:
            data, anc, _flags, _addr = client.sock.recvmsg(
                65536, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
        client.fds.extend(fds)
        if not data:
            self._drop(client)
            return
        broken: ProtocolError | None = None
        try:
            msgs = client.parser.feed(data)
        except ProtocolError as e:
            msgs, broken = e.messages, e
        changed = False
        for m in msgs:
            if m.type == XS_INTRODUCE and client.fds:
                if not self._introduce_ring(client, m):
                    continue                       # answered with an error
            if m.type == XS_CONTROL and split_strings(m.payload)[:1] in (
                    [_EXPORT], [_THAW], [_IMPORT]):
                changed |= self._control(client, m)
                continue
            client.conn.handle(m)
            changed |= m.type in _MUTATING
        if not client.parser.pending:              # none may belong to a partial message
            self._close_fds(client)                # descriptors not claimed by INTRODUCE
        elif len(client.fds) > _MAX_FDS:
            broken = broken or ProtocolError("too many descriptors without a message")
        self._flush_all()
        if changed:
            self._mark_dirty()
        if broken is not None:                     # _flush_all sent what came before it
            log.info("xenstored: dropping a client: %s", broken)
            self._drop(client)

    # ------------------------------------------------------------------ guest rings
    def _introduce_ring(self, client: _Client, m: Message) -> bool:
        """Map the store page named by an INTRODUCE that carries descriptors. False (and an
        error reply queued) if they are unusable; the domain is then not introduced."""
        fds, client.fds = client.fds, []
        args = split_strings(m.payload)
        try:
            if len(fds) != 3 or len(args) < 3:
                raise ValueError("INTRODUCE needs domid, mfn, port and three descriptors")
            domid, mfn = int(args[0]), int(args[1])
            if not 0 < domid < 0x7FF0 or mfn < 0:
                raise ValueError(f"bad domid {domid} or mfn {mfn}")
            mem_fd, kick_fd, notify_fd = fds
            size = os.fstat(mem_fd).st_size
            if (mfn + 1) * 4096 > size:
                raise ValueError(f"mfn {mfn} beyond the {size}-byte memory file")
            mm = mmap.mmap(mem_fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=mfn * 4096)
        except (ValueError, OSError) as e:
            log.warning("xenstored: INTRODUCE refused: %s", e)
            for fd in fds:
                os.close(fd)
            client.conn.refuse(m, "EINVAL")
            return False
        os.close(mem_fd)
        old = self.rings.pop(domid, None)
        if old is not None:
            self._unregister_ring(old)
        dr = _DomainRing(domid, mm, kick_fd, notify_fd)
        self.rings[domid] = dr
        os.set_blocking(kick_fd, False)
        self.sel.register(kick_fd, selectors.EVENT_READ, dr)
        parked = self.imported.pop(domid, None)
        if self.server.is_introduced(domid):
            # re-introduction: drop the old ring's connection, keep the domain introduced
            for c in [c for c in self.server.connections if c.domid == domid
                      and (parked is None or c is not parked.conn)]:
                self.server.disconnect(c)
        if parked is not None:                     # migrated in: its connection as it was
            self.saved_watches.pop(domid, None)
            self.server.introduce_domain(domid)
            conn = parked.conn
        else:
            conn = self.server.connect(domid)
            for path, token in self.saved_watches.pop(domid, []):
                self.server.restore_watch(conn, path, token)
        dr.ring = XenstoreRing(dr.view, dr.raise_event, conn)
        if parked is not None:
            dr.ring.restore(parked.output, parked.input)     # validated at import
        if domid in self.frozen:
            dr.ring.freeze()                       # exported before a restart: stay frozen
        log.info("xenstored: dom%d introduced (store page %d)%s", domid, mfn,
                 " with its migrated connection" if parked is not None else "")
        dr.ring.notified()                         # requests queued before we mapped
        return True

    # ------------------------------------------------------------------ migration
    def _control(self, client: _Client, m: Message) -> bool:
        """Run a pyxen-export/-thaw/-import request and queue its reply. Export and import
        take every descriptor received so far (one is required); all are closed after.
        True if the store may have changed."""
        args = split_strings(m.payload)
        op = args[0]
        fds: list[int] = []
        if op != _THAW:
            fds, client.fds = client.fds, []
        try:
            if op == _EXPORT:
                self._export(args[1:], fds)
            elif op == _THAW:
                self._thaw(args[1:])
            else:
                self._import(args[1:], fds)
        except XenstoreError as e:
            log.warning("xenstored: %s refused: %s", op.decode(), e)
            client.conn.refuse(m, e.name)
            return False
        except Exception:                          # a bug must not take the daemon down
            log.exception("xenstored: %s failed", op.decode())
            client.conn.refuse(m, "EIO")
            return False
        finally:
            for fd in fds:
                os.close(fd)
        client.conn.answer(m, b"OK\0")
        return op != _EXPORT

    def _export(self, args: list[bytes], fds: list[int]) -> None:
        if not args:
            raise XenstoreError("EINVAL", "pyxen-export needs a domid")
        domid = _migration_domid(args[0])
        fd = _one_fd(fds, os.O_WRONLY)
        roots = [_ascii(a) for a in args[1:]]
        dr = self.rings.get(domid)
        if dr is None or dr.ring is None:
            raise XenstoreError("ENOENT", f"dom{domid} has no ring here")
        # one loop thread: nothing changes the store between this and the freeze
        nodes = self.server.export_nodes(roots)            # validates the roots
        ring, was_frozen = dr.ring, dr.ring.frozen
        ring.freeze()
        try:
            doc = migration_document(domid, nodes, ring.export_state())
            data = json.dumps(doc, separators=(",", ":")).encode()
            try:
                _write_all(fd, data)
            except OSError as e:
                raise XenstoreError("EINVAL", f"cannot write the document: {e}") from None
        except BaseException:
            if not was_frozen:
                ring.thaw()
            raise
        self.frozen.add(domid)
        self._mark_dirty()
        log.info("xenstored: dom%d exported and frozen (%d bytes)", domid, len(data))

    def _thaw(self, args: list[bytes]) -> None:
        if len(args) != 1:
            raise XenstoreError("EINVAL", "pyxen-thaw needs a domid")
        domid = _migration_domid(args[0])
        dr = self.rings.get(domid)
        if dr is None or dr.ring is None:
            if domid not in self.frozen:
                raise XenstoreError("ENOENT", f"dom{domid} has no ring here")
            self.frozen.discard(domid)             # frozen before a restart, not back yet
            self._mark_dirty()
            return
        self.frozen.discard(domid)
        dr.ring.thaw()
        log.info("xenstored: dom%d thawed", domid)

    def _import(self, args: list[bytes], fds: list[int]) -> None:
        if len(args) != 1:
            raise XenstoreError("EINVAL", "pyxen-import needs a domid")
        domid = _migration_domid(args[0])
        fd = _one_fd(fds, os.O_RDONLY)
        if domid in self.rings:
            raise XenstoreError("EEXIST", f"dom{domid} is served here")
        try:
            data = _read_all(fd, MIGRATION_MAX_BYTES)
        except OSError as e:
            raise XenstoreError("EINVAL", f"cannot read the document: {e}") from None
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise XenstoreError("EINVAL", f"bad JSON: {e}") from None
        imp = parse_migration_document(doc, domid)      # everything checked: now apply
        conn = self.server.import_domain(imp)
        old = self.imported.pop(domid, None)              # a repeated import replaces it
        if old is not None:
            self.server.disconnect(old.conn)
        self.imported[domid] = _Imported(conn, imp.connection.output, imp.connection.input)
        self.frozen.discard(domid)
        log.info("xenstored: dom%d imported (%d nodes, %d watches, %d transactions)", domid,
                 len(imp.nodes), len(imp.connection.watches), len(imp.connection.transactions))

    def _kicked(self, dr: _DomainRing) -> None:
        try:
            os.eventfd_read(dr.kick_fd)
        except OSError:                            # nothing pending (or the VMM is gone)
            return
        if dr.ring is not None:
            dr.ring.notified()
        self._flush_all()
        self._mark_dirty()                          # the guest's requests are not inspected

    def _release_ring(self, domid: int) -> None:
        self.saved_watches.pop(domid, None)
        self.imported.pop(domid, None)             # its connection was closed with the rest
        self.frozen.discard(domid)
        dr = self.rings.pop(domid, None)
        if dr is not None:
            self._unregister_ring(dr)

    def _unregister_ring(self, dr: _DomainRing) -> None:
        try:
            self.sel.unregister(dr.kick_fd)
        except (KeyError, ValueError):
            pass
        dr.close()

    @staticmethod
    def _close_fds(client: _Client) -> None:
        for fd in client.fds:
            os.close(fd)
        client.fds.clear()

    def _flush_all(self) -> None:
        """Queue every connection's new messages for its socket and send what fits. A watch
        event identical to one still queued is dropped (as xenstored's send_event), so a
        client that stops reading holds at most one copy of each event; one that still
        exceeds OUTPUT_MAX_MESSAGES queued messages is disconnected."""
        for c in list(self.clients.values()):
            for m in c.conn.outgoing():
                if m.type == XS_WATCH_EVENT:
                    if m.payload in c.queued_events:
                        continue
                    c.queued_events.add(m.payload)
                c.pending.append(m)
            if len(c.pending) > OUTPUT_MAX_MESSAGES:
                log.warning("xenstored: a client stopped reading (%d messages queued); "
                            "dropping it", len(c.pending))
                self._drop(c)
            elif c.pending or c.out:
                self._write(c)

    def _write(self, client: _Client) -> None:
        while len(client.out) < 65536 and client.pending:
            m = client.pending.popleft()
            if m.type == XS_WATCH_EVENT:
                client.queued_events.discard(m.payload)
            client.out += pack(m)
        try:
            n = client.sock.send(client.out)
            del client.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        busy = client.out or client.pending
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if busy else 0)
        self.sel.modify(client.sock, mask, client)

    def _drop(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        self.server.disconnect(client.conn)
        self._close_fds(client)
        client.sock.close()

    def _mark_dirty(self) -> None:
        if not self._dirty:
            self._dirty = True
            self._dirty_since = time.monotonic()

    def _snapshot(self) -> None:
        self._dirty = False
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        imported = {str(d): i.state().to_json() for d, i in self.imported.items()}
        with self.server.lock:
            watches = {str(domid): [(w.path, w.token.decode("latin-1"))
                                    for w in dr.ring.conn.watches.values()]
                       for domid, dr in self.rings.items() if dr.ring is not None}
            for domid, ws in self.saved_watches.items():
                watches.setdefault(str(domid), [(p, t.decode("latin-1")) for p, t in ws])
            data = json.dumps({"store": self.server.store.to_dict(),
                               "domain_watches": watches, "frozen": sorted(self.frozen),
                               "imported": imported})
        tmp.write_text(data)
        os.replace(tmp, self.state_path)

    def _shutdown(self) -> None:
        if self._dirty:
            self._snapshot()
        for c in list(self.clients.values()):
            self._drop(c)
        for dr in list(self.rings.values()):
            self._unregister_ring(dr)
        self.rings.clear()
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


# ---------------------------------------------------------------------- migration helpers

def _ascii(b: bytes) -> str:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        raise XenstoreError("EINVAL", "non-ASCII argument") from None


def _migration_domid(b: bytes) -> int:
    """A guest domid as the migration commands take it: decimal, 1 .. DOMID_FIRST_RESERVED-1."""
    s = _ascii(b)
    if not s.isdigit() or len(s) > 5 or not 0 < int(s) < 0x7FF0:
        raise XenstoreError("EINVAL", f"bad domid {s!r}")
    return int(s)


def _one_fd(fds: list[int], access: int) -> int:
    """The single descriptor of a request: a regular file open for ``access`` (O_RDONLY
    means readable, O_WRONLY writable); EINVAL otherwise."""
    if len(fds) != 1:
        raise XenstoreError("EINVAL", f"{len(fds)} descriptors instead of one")
    fd = fds[0]
    try:
        mode = os.fstat(fd).st_mode
        acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as e:
        raise XenstoreError("EINVAL", f"unusable descriptor: {e}") from None
    if not stat.S_ISREG(mode):
        raise XenstoreError("EINVAL", "the descriptor is not a regular file (memfd)")
    if acc not in (access, os.O_RDWR):
        raise XenstoreError("EINVAL", "the descriptor is not open for "
                            + ("reading" if access == os.O_RDONLY else "writing"))
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """``data`` at offset 0 of ``fd``, which is truncated to it (the file offset shared
    with the sender is left alone)."""
    view, off = memoryview(data), 0
    while off < len(data):
        off += os.pwrite(fd, view[off:], off)
    os.ftruncate(fd, len(data))


def _read_all(fd: int, limit: int) -> bytes:
    """The whole file from offset 0; E2BIG beyond ``limit`` bytes."""
    if os.fstat(fd).st_size > limit:
        raise XenstoreError("E2BIG", "migration document too large")
    out = bytearray()
    while True:
        chunk = os.pread(fd, 1 << 20, len(out))
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > limit:
            raise XenstoreError("E2BIG", "migration document too large")
