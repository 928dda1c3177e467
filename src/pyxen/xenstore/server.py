"""Sans-IO xenstore server: requests in, replies and watch events out; no threads or I/O.

Usage::

    server = XenstoreServer()
    populate_domain(server, 1, "guest", memory_kib=524288, vcpus=2, vm_uuid=uuid)
    conn = server.connect(1, on_output=kick)     # one Connection per client
    conn.handle(msg)                              # queue the reply (+ any watch events)
    for reply in conn.outgoing(): ...             # drain

Threads: every public method may be called from any thread; one server lock serialises
them. ``on_output(conn)``-style callbacks (``Connection.on_output``, a zero-argument
callable) run *after* that lock is released, on the thread whose request produced the
output -- e.g. a watch fired by another connection's write -- so they may call back into
the server; they must not block for long.

Guest input never raises out of :meth:`Connection.handle`: malformed payloads get EINVAL,
unknown types ENOSYS, internal failures EIO.

Migration (the sans-IO half; xenstored's daemon moves the bytes): :meth:`XenstoreServer.export_nodes`
and :meth:`Connection.state` produce a domain's part of the store and its connection state;
:func:`migration_document` / :func:`parse_migration_document` are the JSON document (format
there); :meth:`XenstoreServer.import_domain` applies a parsed one and returns the domain's
connection with its watches and *doomed* transactions (their commit is EAGAIN).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from pyxen.xenstore.store import (READ, Event, Store, XenstoreError, domain_path, format_perm,
                                  is_child, parse_perm)
from pyxen.xenstore.wire import (XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX, XS_CONTROL,
                                 XS_DIRECTORY, XS_DIRECTORY_PART, XS_ERROR, XS_GET_DOMAIN_PATH,
                                 XS_GET_PERMS, XS_INTRODUCE, XS_IS_DOMAIN_INTRODUCED, XS_MKDIR,
                                 XS_READ, XS_RELEASE, XS_RESET_WATCHES, XS_RESUME, XS_RM,
                                 XS_SET_PERMS, XS_SET_TARGET, XS_TRANSACTION_END,
                                 XS_TRANSACTION_START, XS_UNWATCH, XS_WATCH, XS_WATCH_EVENT,
                                 XS_WRITE, Message, MessageParser, ProtocolError, error_reply,
                                 join_strings, pack, reply, split_strings)

log = logging.getLogger(__name__)

OK = b"OK\0"
# requests that run inside the transaction named by the header's tx_id
_TX_OPS = frozenset({XS_READ, XS_WRITE, XS_MKDIR, XS_RM, XS_DIRECTORY, XS_DIRECTORY_PART,
                     XS_GET_PERMS, XS_SET_PERMS})
_DOM0_ONLY = frozenset({XS_INTRODUCE, XS_RELEASE, XS_RESUME, XS_SET_TARGET, XS_CONTROL})


@dataclass
class Watch:
    path: str          # as the client sent it (relative, absolute or @special)
    token: bytes
    abs: str           # canonical form events are matched against
    relative: bool

    @classmethod
    def of(cls, path: str, token: bytes, absp: str) -> Watch:
        """A watch on ``path`` as registered (relative unless it starts with / or @)."""
        return cls(path, token, absp, not path.startswith(("/", "@")))


@dataclass
class Transaction:
    id: int
    work: Store        # tracked copy of the store at start; the transaction's requests run
                       # against it, and it remembers what each touched path held then
    events: list[Event] = field(default_factory=list)
    doomed: bool = False   # migrated in: requests work on ``work``, the commit is EAGAIN


@dataclass
class _Ctx:
    """What one request produced besides its reply (applied after the reply is queued)."""
    events: list[Event] = field(default_factory=list)
    direct: list[tuple[Connection, Message]] = field(default_factory=list)
    post: list[Callable[[], None]] = field(default_factory=list)


class Connection:
    """One client (a guest's ring, or a local caller) acting as domain ``domid``.

    ``on_output``: called with no arguments, outside the server lock, whenever messages were
    queued for this connection; the owner then calls :meth:`outgoing`.
    """

    def __init__(self, server: XenstoreServer, domid: int,
                 on_output: Callable[[], None] | None = None) -> None:
        self.server = server
        self.domid = domid
        self.on_output = on_output
        self.watches: dict[tuple[str, bytes], Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self.closed = False
        self._out: deque[Message] = deque()

    def handle(self, msg: Message) -> None:
        """Process one request; its reply (and any watch events) are queued, never raised."""
        self.server._handle(self, msg)

    def refuse(self, msg: Message, name: str) -> None:
        """Queue the error reply ``name`` for ``msg`` without processing it (the transport
        rejected the request, e.g. unusable descriptors on an INTRODUCE)."""
        with self.server.lock:
            self._out.append(error_reply(msg, name))

    def answer(self, msg: Message, payload: bytes) -> None:
        """Queue the success reply ``payload`` for ``msg``, which the transport handled
        itself (e.g. a pyxen XS_CONTROL command of the daemon)."""
        with self.server.lock:
            self._out.append(reply(msg, payload))

    def state(self) -> ConnectionState:
        """This connection's migratable state: watches as registered, open transaction ids,
        and ``output`` = its queued messages, packed (not drained). ``input`` is empty: a
        partial request is the transport's."""
        with self.server.lock:
            return ConnectionState([(w.path, w.token) for w in self.watches.values()],
                                   sorted(self.transactions),
                                   b"".join(pack(m) for m in self._out))

    def outgoing(self) -> list[Message]:
        """Drain and return everything queued for this connection, in order."""
        with self.server.lock:
            out = list(self._out)
            self._out.clear()
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def reset(self) -> None:
        """Forget watches, transactions and queued output (ring reconnect)."""
        with self.server.lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self.watches.clear()
        self.transactions.clear()
        self._out.clear()

    def close(self) -> None:
        self.server.disconnect(self)

    def _queue_event(self, msg: Message) -> bool:
        """Queue a watch event unless an identical one is still pending (as xenstored)."""
        if not msg.payload.startswith(b"@") and any(
                m.type == XS_WATCH_EVENT and m.payload == msg.payload for m in self._out):
            return False
        self._out.append(msg)
        return True

    def __repr__(self) -> str:
        return f"<xenstore Connection dom{self.domid}{' closed' if self.closed else ''}>"


class XenstoreServer:
    """Owns the :class:`Store`, the connections, and domain introduction state.

    ``on_introduce(domid, mfn, port)`` / ``on_release(domid)``: optional hooks run (outside
    the lock) when dom0 sends XS_INTRODUCE / XS_RELEASE; the server itself maps nothing.
    """

    def __init__(self, store: Store | None = None, *,
                 on_introduce: Callable[[int, int, int], None] | None = None,
                 on_release: Callable[[int], None] | None = None) -> None:
        self.store = store if store is not None else Store()
        self.lock = threading.Lock()
        self.connections: list[Connection] = []
        self.introduced: set[int] = set()
        self.on_introduce = on_introduce
        self.on_release = on_release
        self._next_tx = 1

    # ----------------------------------------------------------------- connections

    def connect(self, domid: int, on_output: Callable[[], None] | None = None) -> Connection:
        """A new connection for ``domid``. A domU's first connection counts as its
        introduction (fires @introduceDomain)."""
        conn = Connection(self, domid, on_output)
        ctx = _Ctx()
        with self.lock:
            self.connections.append(conn)
            if domid != 0 and domid not in self.introduced:
                self._introduce_locked(domid, ctx)
            touched = self._finish_locked(ctx)
        self._notify(touched)
        return conn

    def disconnect(self, conn: Connection) -> None:
        """Drop a connection with its watches and open transactions."""
        with self.lock:
            self._close_locked(conn)

    def introduce_domain(self, domid: int) -> None:
        ctx = _Ctx()
        with self.lock:
            if domid not in self.introduced:
                self._introduce_locked(domid, ctx)
            touched = self._finish_locked(ctx)
        self._notify(touched)

    def release_domain(self, domid: int) -> None:
        """The domain is gone: close its connections, fire @releaseDomain. The toolstack
        removes /local/domain/<domid> itself (as libxl does)."""
        ctx = _Ctx()
        with self.lock:
            self._release_locked(domid, ctx)
            touched = self._finish_locked(ctx)
        self._notify(touched)

    def is_introduced(self, domid: int) -> bool:
        return domid == 0 or domid in self.introduced

    # ----------------------------------------------------------------- local (toolstack) API

    def read(self, path: str, domid: int = 0) -> bytes:
        with self.lock:
            return self.store.read(domid, path)

    def exists(self, path: str) -> bool:
        with self.lock:
            return path in self.store.nodes

    def directory(self, path: str, domid: int = 0) -> list[str]:
        with self.lock:
            return self.store.directory(domid, path)

    def get_perms(self, path: str, domid: int = 0) -> list[str]:
        with self.lock:
            return self.store.get_perms(domid, path)

    def write(self, path: str, value: bytes | str, domid: int = 0) -> None:
        self._local(lambda: self.store.write(domid, path,
                                             value.encode() if isinstance(value, str) else value))

    def mkdir(self, path: str, domid: int = 0) -> None:
        self._local(lambda: self.store.mkdir(domid, path))

    def rm(self, path: str, domid: int = 0) -> None:
        self._local(lambda: self.store.rm(domid, path))

    def set_perms(self, path: str, perms: Iterable[str], domid: int = 0) -> None:
        self._local(lambda: self.store.set_perms(domid, path, list(perms)))

    def _local(self, op: Callable[[], list[Event]]) -> None:
        """Run a store operation (raising XenstoreError) and fire its watches."""
        with self.lock:
            ctx = _Ctx(events=op())
            touched = self._finish_locked(ctx)
        self._notify(touched)

    # ----------------------------------------------------------------- request handling

    def _handle(self, conn: Connection, msg: Message) -> None:
        ctx = _Ctx()
        with self.lock:
            if conn.closed:
                return
            try:
                payload = self._dispatch(conn, msg, ctx)
                if len(payload) > XENSTORE_PAYLOAD_MAX:
                    raise XenstoreError("E2BIG", "reply too long")
                out = reply(msg, payload)
            except XenstoreError as e:
                ctx.events.clear()
                ctx.direct.clear()
                out = error_reply(msg, e.name)
            except Exception:                     # a bug must not kill the guest's xenbus
                log.exception("xenstore: dom%d request %r failed", conn.domid, msg)
                ctx = _Ctx()
                out = error_reply(msg, "EIO")
            conn._out.append(out)
            touched = self._finish_locked(ctx)
            touched.add(conn)
        self._notify(touched)
        for fn in ctx.post:
            try:
                fn()
            except Exception:
                log.exception("xenstore: hook failed")

    def _finish_locked(self, ctx: _Ctx) -> set[Connection]:
        touched: set[Connection] = set()
        for c, m in ctx.direct:
            if not c.closed and c._queue_event(m):
                touched.add(c)
        for ev in ctx.events:
            self._fire_locked(ev, touched)
        return touched

    @staticmethod
    def _notify(touched: set[Connection]) -> None:
        for c in touched:
            if c.on_output is not None and not c.closed:
                try:
                    c.on_output()
                except Exception:
                    log.exception("xenstore: on_output for dom%d failed", c.domid)

    def _fire_locked(self, ev: Event, touched: set[Connection]) -> None:
        special = ev.path.startswith("@")
        for c in self.connections:
            if c.closed or not c.watches:
                continue
            if not any(self.store.perm_for(c.domid, p) & READ for p in ev.perms):
                continue
            for w in c.watches.values():
                if special or w.abs.startswith("@"):
                    epath = ev.path if ev.path == w.abs else None
                elif ev.removed and is_child(w.abs, ev.path):
                    epath = w.abs
                elif is_child(ev.path, w.abs):
                    epath = ev.path
                else:
                    epath = None
                if epath is None:
                    continue
                if w.relative:
                    prefix = domain_path(c.domid) + "/"
                    if epath.startswith(prefix):
                        epath = epath[len(prefix):]
                payload = epath.encode() + b"\0" + w.token + b"\0"
                if len(payload) <= XENSTORE_PAYLOAD_MAX and c._queue_event(
                        Message(XS_WATCH_EVENT, 0, 0, payload)):
                    touched.add(c)

    def _dispatch(self, conn: Connection, msg: Message, ctx: _Ctx) -> bytes:
        t, p, d = msg.type, msg.payload, conn.domid
        if t in _DOM0_ONLY and d != 0:
            raise XenstoreError("EACCES", "privileged request")
        if t in _TX_OPS:
            tx = None
            if msg.tx_id:
                tx = conn.transactions.get(msg.tx_id)
                if tx is None:
                    raise XenstoreError("ENOENT", "no such transaction")
            store = tx.work if tx is not None else self.store
            events = tx.events if tx is not None else ctx.events
            return self._store_op(t, p, d, store, events)
        if t == XS_WATCH:
            return self._watch(conn, p, ctx)
        if t == XS_UNWATCH:
            args = split_strings(p)
            if len(args) < 2:
                raise XenstoreError("EINVAL", "UNWATCH needs path and token")
            path = _decode(args[0])
            absp = self.store.canonical(d, path, special_ok=True)
            if conn.watches.pop((absp, args[1]), None) is None:
                raise XenstoreError("ENOENT", "no such watch")
            return OK
        if t == XS_RESET_WATCHES:
            conn.watches.clear()
            conn.transactions.clear()
            return OK
        if t == XS_TRANSACTION_START:
            if msg.tx_id:                          # as xenstored: looked up first
                if msg.tx_id not in conn.transactions:
                    raise XenstoreError("ENOENT", "no such transaction")
                raise XenstoreError("EBUSY", "nested transaction")
            # C xenstored refuses only beyond the quota (count > quota): a domU gets quota+1
            if d != 0 and len(conn.transactions) > self.store.quota.transactions_per_domain:
                raise XenstoreError("ENOSPC", "transaction quota")
            tid = self._alloc_tx_id(conn)
            conn.transactions[tid] = Transaction(tid, self.store.copy(track=True))
            return f"{tid}\0".encode()
        if t == XS_TRANSACTION_END:
            arg = _onearg(p)                       # argument first, as xenstored
            if arg not in ("T", "F"):
                raise XenstoreError("EINVAL", "TRANSACTION_END needs T or F")
            tx = conn.transactions.get(msg.tx_id)
            if tx is None:
                raise XenstoreError("ENOENT", "no such transaction")
            del conn.transactions[msg.tx_id]
            if arg == "T":
                if tx.doomed or self.store.conflicts(tx.work):
                    raise XenstoreError("EAGAIN", "transaction conflict")
                self.store.apply(tx.work)
                ctx.events.extend(tx.events)
            return OK
        if t == XS_GET_DOMAIN_PATH:
            return f"{domain_path(_domid(_onearg(p)))}\0".encode()
        if t == XS_IS_DOMAIN_INTRODUCED:
            return b"T\0" if self.is_introduced(_domid(_onearg(p))) else b"F\0"
        if t == XS_INTRODUCE:
            args = split_strings(p)
            if len(args) < 3:
                raise XenstoreError("EINVAL", "INTRODUCE needs domid, mfn, port")
            domid, mfn, port = _domid(_decode(args[0])), _int(args[1]), _int(args[2])
            if domid == 0:
                raise XenstoreError("EINVAL", "cannot introduce dom0")
            if domid not in self.introduced:
                self._introduce_locked(domid, ctx)
                if self.on_introduce is not None:
                    hook = self.on_introduce
                    ctx.post.append(lambda: hook(domid, mfn, port))
            return OK
        if t == XS_RELEASE:
            domid = _domid(_onearg(p))
            if domid == 0 or domid not in self.introduced:
                raise XenstoreError("ENOENT", "domain not introduced")
            self._release_locked(domid, ctx)
            if self.on_release is not None:
                rhook = self.on_release
                ctx.post.append(lambda: rhook(domid))
            return OK
        if t == XS_RESUME:
            if not self.is_introduced(_domid(_onearg(p))):
                raise XenstoreError("ENOENT", "domain not introduced")
            return OK
        if t == XS_SET_TARGET:
            args = split_strings(p)
            if len(args) != 2:
                raise XenstoreError("EINVAL", "SET_TARGET needs domid and target")
            self.store.targets[_domid(_decode(args[0]))] = _domid(_decode(args[1]))
            return OK
        if t in (XS_WATCH_EVENT, XS_ERROR):       # server-only types: no handler, as in C
            raise XenstoreError("ENOSYS", "server-only message type")
        raise XenstoreError("ENOSYS", f"unsupported type {t}")

    @staticmethod
    def _store_op(t: int, p: bytes, d: int, store: Store, events: list[Event]) -> bytes:
        if t == XS_READ:
            return store.read(d, _decode(_onearg_b(p)))
        if t == XS_WRITE:
            nul = p.find(b"\0")
            if nul < 0:
                raise XenstoreError("EINVAL", "WRITE needs path\\0value")
            events.extend(store.write(d, _decode(p[:nul]), p[nul + 1:]))
            return OK
        if t == XS_MKDIR:
            events.extend(store.mkdir(d, _onearg(p)))
            return OK
        if t == XS_RM:
            events.extend(store.rm(d, _onearg(p)))
            return OK
        if t == XS_DIRECTORY:
            return join_strings(*store.directory(d, _onearg(p)))
        if t == XS_DIRECTORY_PART:
            args = split_strings(p)
            if len(args) != 2 or len(p) != sum(len(a) + 1 for a in args):
                raise XenstoreError("EINVAL", "DIRECTORY_PART needs path and offset")
            return store.directory_part(d, _decode(args[0]), _int(args[1], signed=False))
        if t == XS_GET_PERMS:
            return join_strings(*store.get_perms(d, _onearg(p)))
        if t == XS_SET_PERMS:
            args = split_strings(p)
            if len(args) < 2:
                raise XenstoreError("EINVAL", "SET_PERMS needs path and permissions")
            events.extend(store.set_perms(d, _decode(args[0]), [_decode(a) for a in args[1:]]))
            return OK
        raise AssertionError(t)

    def _watch(self, conn: Connection, p: bytes, ctx: _Ctx) -> bytes:
        args = split_strings(p)
        if len(args) not in (2, 3):
            raise XenstoreError("EINVAL", "WATCH needs path and token")
        path, token = _decode(args[0]), args[1]
        if path.startswith("@") and len(path) > XENSTORE_REL_PATH_MAX:
            raise XenstoreError("EINVAL", "special path too long")
        absp = self.store.canonical(conn.domid, path, special_ok=True)
        key = (absp, token)
        if key in conn.watches:
            raise XenstoreError("EEXIST", "duplicate watch")
        if conn.domid != 0 and len(conn.watches) > self.store.quota.watches_per_domain:
            raise XenstoreError("E2BIG", "watch quota")
        conn.watches[key] = Watch.of(path, token, absp)
        # the initial event: path exactly as registered
        ctx.direct.append((conn, Message(XS_WATCH_EVENT, 0, 0, path.encode() + b"\0" + token + b"\0")))
        return OK

    def restore_watch(self, conn: Connection, path: str, token: bytes) -> None:
        """Re-arm a watch the connection had before a restart (no initial event, no reply:
        the client already has both). Invalid entries are skipped."""
        with self.lock:
            try:
                absp = self.store.canonical(conn.domid, path, special_ok=True)
            except XenstoreError:
                return
            conn.watches[(absp, token)] = Watch.of(path, token, absp)

    # ----------------------------------------------------------------- migration

    def export_nodes(self, roots: Iterable[str]) -> list[dict[str, Any]]:
        """Every node under each of ``roots`` (absolute paths; missing ones are skipped), as
        the migration document's ``nodes``: ``{"path", "value" (base64), "perms"}``, each
        parent before its children, each node once (a root under another root adds
        nothing). EINVAL for a root that is not an absolute node path."""
        with self.lock:
            tops: list[str] = []
            for r in roots:
                if not r.startswith("/") or self.store.canonical(0, r) != r:
                    raise XenstoreError("EINVAL", f"bad root {r!r}")
                tops.append(r)
            tops = [r for r in tops if not any(o != r and is_child(r, o) for o in tops)]
            out: list[dict[str, Any]] = []
            seen: set[str] = set()
            nodes = self.store.nodes
            for top in tops:
                stack = [top] if top in nodes and top not in seen else []
                while stack:
                    p = stack.pop()
                    seen.add(p)
                    n = nodes[p]
                    out.append({"path": p, "value": base64.b64encode(n.value).decode(),
                                "perms": [format_perm(x) for x in n.perms]})
                    base = p if p != "/" else ""
                    stack.extend(f"{base}/{c}" for c in reversed(n.children))
            return out

    def restore_connection(self, domid: int, state: ConnectionState) -> Connection:
        """A new connection for ``domid`` holding ``state``'s watches (no initial events)
        and transactions (doomed: they work on a copy of the store as it is now, and their
        commit fails with EAGAIN, so the client retries). It is registered -- watch events
        queue on it from now on -- but does not introduce the domain. ``state.output`` and
        ``state.input`` are the transport's. EINVAL (nothing registered) for a bad watch."""
        return self._restore(domid, state, [])

    def import_domain(self, imp: DomainImport) -> Connection:
        """Apply a parsed migration document atomically: write its nodes with their values
        and permissions as dom0 (watches of existing connections fire as for any write),
        then :meth:`restore_connection` its connection state (which therefore sees no
        events for the import itself)."""
        return self._restore(imp.domid, imp.connection, imp.nodes)

    def _restore(self, domid: int, state: ConnectionState,
                 nodes: list[tuple[str, bytes, tuple[str, ...]]]) -> Connection:
        conn = Connection(self, domid)
        ctx = _Ctx()
        with self.lock:
            for path, token in state.watches:
                absp = self.store.canonical(domid, path, special_ok=True)
                conn.watches[(absp, token)] = Watch.of(path, token, absp)
            work = self.store.copy(track=True)
            for path, value, perms in nodes:
                ctx.events.extend(work.write(0, path, value))
                ctx.events.extend(work.set_perms(0, path, perms))
            self.store.apply(work)
            touched = self._finish_locked(ctx)
            for tid in state.transactions:
                conn.transactions[tid] = Transaction(tid, self.store.copy(track=True),
                                                     doomed=True)
            self.connections.append(conn)
        self._notify(touched)
        return conn

    def _alloc_tx_id(self, conn: Connection) -> int:
        while True:
            tid = self._next_tx
            self._next_tx = (self._next_tx % 0xFFFFFFFF) + 1
            if tid not in conn.transactions:
                return tid

    def _introduce_locked(self, domid: int, ctx: _Ctx) -> None:
        self.introduced.add(domid)
        ctx.events.append(Event("@introduceDomain", (self.store.special["@introduceDomain"],)))

    def _release_locked(self, domid: int, ctx: _Ctx) -> None:
        for c in [c for c in self.connections if c.domid == domid]:
            self._close_locked(c)
        if domid in self.introduced:
            self.introduced.discard(domid)
            ctx.events.append(Event("@releaseDomain", (self.store.special["@releaseDomain"],)))

    def _close_locked(self, conn: Connection) -> None:
        conn.closed = True
        conn._reset_locked()
        if conn in self.connections:
            self.connections.remove(conn)


# ----------------------------------------------------------------- migration document

MIGRATION_VERSION = 1


@dataclass
class ConnectionState:
    """A guest connection's state as migrated: ``watches`` as registered ``(path, token)``,
    open transaction ids, ``output`` (packed messages queued for the guest but not yet in
    its ring; may start mid-message) and ``input`` (a partial request, never a complete
    one)."""
    watches: list[tuple[str, bytes]] = field(default_factory=list)
    transactions: list[int] = field(default_factory=list)
    output: bytes = b""
    input: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"watches": [[p, _b64(t)] for p, t in self.watches],
                "transactions": list(self.transactions),
                "output": _b64(self.output), "input": _b64(self.input)}

    @classmethod
    def from_json(cls, obj: object, domid: int) -> ConnectionState:
        """Validated inverse of :meth:`to_json` for domain ``domid``; XenstoreError EINVAL
        for anything malformed (watch paths are checked as ``domid`` would send them)."""
        d = _obj(obj, "connection")
        watches: list[tuple[str, bytes]] = []
        keys: set[tuple[str, bytes]] = set()
        paths = Store()
        for w in _list(d.get("watches"), "watches"):
            if not isinstance(w, list) or len(w) != 2 or not isinstance(w[0], str):
                raise XenstoreError("EINVAL", "a watch is [path, token]")
            path, token = w[0], _unb64(w[1], "watch token")
            if b"\0" in token:
                raise XenstoreError("EINVAL", "NUL in a watch token")
            if not path.isascii() or len(path) + len(token) + 2 > XENSTORE_PAYLOAD_MAX:
                raise XenstoreError("EINVAL", f"bad watch {path!r}")
            key = (paths.canonical(domid, path, special_ok=True), token)
            if key in keys:
                raise XenstoreError("EINVAL", f"duplicate watch {path!r}")
            keys.add(key)
            watches.append((path, token))
        txs = _list(d.get("transactions"), "transactions")
        if (not all(type(t) is int and 0 < t <= 0xFFFFFFFF for t in txs)
                or len(set(txs)) != len(txs)):
            raise XenstoreError("EINVAL", "bad transaction ids")
        output = _unb64(d.get("output"), "output")
        inp = _unb64(d.get("input"), "input")
        try:
            if MessageParser().feed(inp):
                raise XenstoreError("EINVAL", "input holds a complete request")
        except ProtocolError:
            raise XenstoreError("EINVAL", "input is not a request") from None
        return cls(watches, list(txs), output, inp)


@dataclass
class DomainImport:
    """A validated migration document (:func:`parse_migration_document`)."""
    domid: int
    nodes: list[tuple[str, bytes, tuple[str, ...]]]   # (path, value, perms) in order
    connection: ConnectionState


def migration_document(domid: int, nodes: list[dict[str, Any]],
                       connection: ConnectionState) -> dict[str, Any]:
    """The JSON document moving a domain between xenstoreds::

        {"version": 1, "domid": N,
         "nodes": [{"path": "/abs", "value": "<base64>", "perms": ["n0", "r5"]}, ...],
         "connection": {"watches": [["path as registered", "<base64 token>"], ...],
                        "transactions": [id, ...], "output": "<base64>",
                        "input": "<base64>"}}

    ``nodes`` as :meth:`XenstoreServer.export_nodes` returns them."""
    return {"version": MIGRATION_VERSION, "domid": domid, "nodes": nodes,
            "connection": connection.to_json()}


def parse_migration_document(doc: object, domid: int) -> DomainImport:
    """Validate a :func:`migration_document` meant for ``domid`` completely; XenstoreError
    EINVAL for anything wrong (version, domid mismatch, types, base64, paths, permissions,
    duplicate nodes, values over XENSTORE_PAYLOAD_MAX, a complete request as input)."""
    d = _obj(doc, "document")
    if d.get("version") != MIGRATION_VERSION or type(d.get("version")) is not int:
        raise XenstoreError("EINVAL", f"unsupported version {d.get('version')!r}")
    if type(d.get("domid")) is not int or d["domid"] != domid:
        raise XenstoreError("EINVAL", f"document is for domain {d.get('domid')!r}")
    paths = Store()
    nodes: list[tuple[str, bytes, tuple[str, ...]]] = []
    seen: set[str] = set()
    for n in _list(d.get("nodes"), "nodes"):
        n = _obj(n, "node")
        path = n.get("path")
        if (not isinstance(path, str) or not path.startswith("/")
                or paths.canonical(0, path) != path or path in seen):
            raise XenstoreError("EINVAL", f"bad node path {path!r}")
        seen.add(path)
        value = _unb64(n.get("value"), "value")
        if len(value) > XENSTORE_PAYLOAD_MAX:
            raise XenstoreError("EINVAL", f"value of {path} too long")
        perms = _list(n.get("perms"), "perms")
        if not perms or not all(isinstance(x, str) for x in perms):
            raise XenstoreError("EINVAL", f"bad permissions of {path}")
        for x in perms:
            parse_perm(x)
        nodes.append((path, value, tuple(perms)))
    return DomainImport(domid, nodes, ConnectionState.from_json(d.get("connection"), domid))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: object, what: str) -> bytes:
    if not isinstance(s, str):
        raise XenstoreError("EINVAL", f"{what} is not a base64 string")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise XenstoreError("EINVAL", f"{what} is not valid base64") from None


def _obj(o: object, what: str) -> dict[str, Any]:
    if not isinstance(o, dict):
        raise XenstoreError("EINVAL", f"{what} is not an object")
    return o


def _list(o: object, what: str) -> list[Any]:
    if not isinstance(o, list):
        raise XenstoreError("EINVAL", f"{what} is not a list")
    return o


# ----------------------------------------------------------------- payload helpers

def _onearg_b(p: bytes) -> bytes:
    """The single argument of a one-string payload (exactly one NUL, at the end)."""
    if not p or p.find(b"\0") != len(p) - 1:
        raise XenstoreError("EINVAL", "expected one NUL-terminated argument")
    return p[:-1]


def _onearg(p: bytes) -> str:
    return _decode(_onearg_b(p))


def _decode(b: bytes) -> str:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        raise XenstoreError("EINVAL", "non-ASCII path") from None


def _int(b: bytes | str, signed: bool = True) -> int:
    s = b.decode("ascii", "replace") if isinstance(b, bytes) else b
    body = s[1:] if signed and s.startswith("-") else s
    if not body.isdigit() or not body.isascii():
        raise XenstoreError("EINVAL", f"bad number {s!r}")
    return int(s)


def _domid(s: str) -> int:
    v = _int(s, signed=False)
    if v > 0xFFFF:
        raise XenstoreError("EINVAL", f"bad domid {s!r}")
    return v


# ----------------------------------------------------------------- toolstack layout

class XenstoreOps(Protocol):
    """What :func:`populate_domain` needs: the in-process server or a socket client."""

    def exists(self, path: str) -> bool: ...
    def write(self, path: str, value: bytes | str) -> None: ...
    def rm(self, path: str) -> None: ...
    def set_perms(self, path: str, perms: Iterable[str]) -> None: ...


def populate_domain(server: XenstoreOps, domid: int, name: str, memory_kib: int,
                    vcpus: int, vm_uuid: str, *, target_kib: int | None = None,
                    store_port: int | None = None, store_ring_ref: int | None = None,
                    console_port: int | None = None,
                    console_ring_ref: int | None = None) -> None:
    """Write the tree libxl creates for a PVH domU (libxl__domain_make + libxl__build_post +
    the primary console frontend), as dom0, with libxl's permissions:

    * ``/local/domain/<id>``, ``/vm/<uuid>``, cpu/, memory/, device/, control/: owned by dom0,
      readable by the guest (``n0 r<id>``); their leaves inherit that;
    * control/shutdown, control/feature-{poweroff,reboot,suspend}, control/sysrq,
      device/suspend/event-channel, data/, drivers/, feature/, attr/, error/: guest-owned
      (``n<id>``) so the guest can write them;
    * console/: guest-owned, dom0 may read (``n<id> r0``);
    * ``/libxl/<id>``: dom0 only.

    ``target_kib`` defaults to ``memory_kib``: Linux's balloon driver on PVH balloons down
    by ``static-max - target`` if they differ.
    """
    dom, vm, lx = domain_path(domid), f"/vm/{vm_uuid}", f"/libxl/{domid}"
    ro, rw, no = ["n0", f"r{domid}"], [f"n{domid}"], ["n0"]

    def mknod(path: str, perms: list[str], value: str = "") -> None:
        server.write(path, value)
        server.set_perms(path, perms)

    for path in (dom, vm, lx):
        if server.exists(path):
            server.rm(path)
    mknod(dom, ro)
    mknod(vm, ro)
    mknod(lx, no)
    mknod(f"{lx}/device", no)
    server.write(f"{dom}/vm", vm)
    server.write(f"{dom}/name", name)
    for sub in ("cpu", "memory", "device", "control"):
        mknod(f"{dom}/{sub}", ro)
    for sub in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                "control/feature-suspend", "control/sysrq", "device/suspend/event-channel",
                "data", "drivers", "feature", "attr", "error"):
        mknod(f"{dom}/{sub}", rw)
    server.write(f"{vm}/uuid", vm_uuid)
    server.write(f"{vm}/name", name)
    server.write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1")
    server.write(f"{dom}/control/platform-feature-xs_reset_watches", "1")
    server.write(f"{lx}/type", "pvh")
    # libxl__build_post
    server.write(f"{dom}/memory/static-max", str(memory_kib))
    server.write(f"{dom}/memory/target", str(memory_kib if target_kib is None else target_kib))
    server.write(f"{dom}/memory/videoram", "-1")
    server.write(f"{dom}/domid", str(domid))
    if store_port is not None:
        server.write(f"{dom}/store/port", str(store_port))
    if store_ring_ref is not None:
        server.write(f"{dom}/store/ring-ref", str(store_ring_ref))
    for i in range(vcpus):
        server.write(f"{dom}/cpu/{i}/availability", "online")
    # primary console frontend (libxl__device_console_add): guest-owned, dom0 reads
    mknod(f"{dom}/console", [f"n{domid}", "r0"])
    server.write(f"{dom}/console/backend-id", "0")
    server.write(f"{dom}/console/limit", "1048576")
    server.write(f"{dom}/console/type", "xenconsoled")
    server.write(f"{dom}/console/output", "pty")
    server.write(f"{dom}/console/tty", "")
    if console_port is not None:
        server.write(f"{dom}/console/port", str(console_port))
    if console_ring_ref is not None:
        server.write(f"{dom}/console/ring-ref", str(console_ring_ref))
