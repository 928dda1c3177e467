"""Hypothesis (stateful): the real xenstored daemon over its unix socket, three connections at
once, every reply and every watch event checked against an in-test model of the store.

Each example starts a fresh :class:`XenstoredDaemon` (own temp dir, socket and state file) on a
thread and opens three sockets to it. All socket clients are dom0 in Xen's model, so
permission *checks* never fire; permissions are checked as data instead: GET_PERMS returns
exactly what SET_PERMS set, and nodes created by WRITE/MKDIR inherit their parent's list
unchanged (tools/xenstored construct_node: only an unprivileged creator becomes the owner).

What the model follows (docs/misc/xenstore.txt, matching store.py/server.py):

* WRITE/MKDIR create missing parents with empty values; MKDIR of an existing node and RM of a
  missing node whose parent exists are no-ops (no event); RM of ``/`` is EINVAL; RM with a
  missing parent is ENOENT. Children are listed in creation order.
* Watches: the initial event ``(wpath, token)`` on registration; a modification of ``p``
  (write, create, set_perms) fires every watch whose wpath is a parent of ``p`` (or ``p``)
  with epath ``p``; a recursive RM of ``p`` additionally fires watches *below* ``p`` with
  their own wpath ("if the event was the recursive removal of a parent of <wpath>, <epath> is
  just <wpath>"). An event identical to one already queued for that connection by the same
  request is dropped (C xenstored's send_event does the same against its pending queue).
  Events of one request may arrive in any order; events of successive requests arrive in
  request order (checked with a round trip on every connection after every step).
* Transactions: a snapshot of the store at TRANSACTION_START ("whole db is copied; reads and
  writes happen on the copy"); TRANSACTION_END T fails with EAGAIN iff a node the transaction
  accessed (read, wrote, or walked past as a missing node's nearest existing ancestor)
  changed in the live store since the start; the transaction is gone afterwards either way.
  Events of a transaction's requests fire only on a successful commit, as one batch.
  (C xenstored is lazier -- it snapshots each node at its first access in the transaction --
  which gives fewer EAGAINs; the documented copy semantics are what pyxen implements.)
* Closing a socket, RESET_WATCHES and a daemon restart (from its state file) drop that
  connection's watches and transactions but never committed data.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pyxen.xenstore import wire as W
from pyxen.xenstore.daemon import XenstoredDaemon
from pyxen.testing.xswire import XsWireClient

NCONN = 3
PATHS = ["/", "/a", "/a/b", "/a/b/c", "/a/d", "/e", "/e/f/g"]
WATCH_PATHS = PATHS + ["/a/b/c/z", "/zz"]          # also watches on nodes that never exist
TOKENS = ["t0", "t1"]                               # shared tokens: duplicate payloads happen
DOMIDS = [0, 1, 5]
BAD_PERMS = ["x1", ""]                              # bad kind, empty string: EINVAL
BOGUS_TX = 0xDEADBEEF


def z(*parts: str | bytes) -> bytes:
    return W.join_strings(*parts)


# ----------------------------------------------------------------------------- the model

class XsError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class MNode:
    value: bytes
    perms: tuple[str, ...]
    children: tuple[str, ...] = ()


def parent_of(p: str) -> str:
    i = p.rfind("/")
    return p[:i] if i > 0 else "/"


def base_of(p: str) -> str:
    return p.rsplit("/", 1)[1]


def is_child(child: str, parent: str) -> bool:
    return child == parent or parent == "/" or child.startswith(parent + "/")


def valid_perm(s: str) -> bool:
    return len(s) >= 2 and s[0] in "nrwb" and s[1:].isdigit() and int(s[1:]) <= 0xFFFF


class MStore:
    """path -> MNode, with (for a transaction's working copy) the set of paths accessed and
    modified, and (for the live store) the paths replaced or deleted by the last operation."""

    def __init__(self, nodes: dict[str, MNode], track: bool = False) -> None:
        self.nodes = nodes
        self.accessed: set[str] | None = set() if track else None
        self.modified: set[str] | None = set() if track else None
        self.touched: list[str] = []

    def get(self, p: str) -> MNode | None:
        if self.accessed is not None:
            self.accessed.add(p)
        return self.nodes.get(p)

    def put(self, p: str, n: MNode) -> None:
        self.nodes[p] = n
        self._mark(p)

    def delete(self, p: str) -> None:
        del self.nodes[p]
        self._mark(p)

    def _mark(self, p: str) -> None:
        self.touched.append(p)
        if self.modified is not None:
            self.accessed.add(p)                # type: ignore[union-attr]
            self.modified.add(p)

    def lookup(self, p: str) -> MNode:
        n = self.get(p)
        if n is not None:
            return n
        a = p
        while self.get(a := parent_of(a)) is None:
            pass
        raise XsError("ENOENT")

    def create(self, p: str, value: bytes) -> None:
        missing = [p]
        while (parent := self.get(par := parent_of(missing[-1]))) is None:
            missing.append(par)
        for q in reversed(missing):
            parent = replace(parent, children=parent.children + (base_of(q),))
            self.put(par, parent)
            node = MNode(value if q == p else b"", parent.perms)   # inherited as is (dom0)
            self.put(q, node)
            par, parent = q, node

    # each returns (expected reply payload, [(event path, recursive removal?)])
    def read(self, p: str):
        return self.lookup(p).value, []

    def directory(self, p: str):
        return z(*self.lookup(p).children), []

    def get_perms(self, p: str):
        return z(*self.lookup(p).perms), []

    def write(self, p: str, value: bytes):
        try:
            n = self.lookup(p)
        except XsError:
            self.create(p, value)
        else:
            self.put(p, replace(n, value=value))
        return b"OK\0", [(p, False)]

    def mkdir(self, p: str):
        try:
            self.lookup(p)
            return b"OK\0", []
        except XsError:
            self.create(p, b"")
            return b"OK\0", [(p, False)]

    def rm(self, p: str):
        try:
            self.lookup(p)
        except XsError:
            if p != "/" and self.get(parent_of(p)) is not None:
                return b"OK\0", []
            raise
        if p == "/":
            raise XsError("EINVAL")
        doomed = [q for q in self.nodes if is_child(q, p)]
        par = parent_of(p)
        parent = self.nodes[par]
        self.put(par, replace(parent, children=tuple(c for c in parent.children
                                                     if c != base_of(p))))
        for q in doomed:
            self.delete(q)
        return b"OK\0", [(p, True)]

    def set_perms(self, p: str, perms: list[str]):
        if not all(valid_perm(s) for s in perms):
            raise XsError("EINVAL")
        n = self.lookup(p)
        self.put(p, replace(n, perms=tuple(perms)))
        return b"OK\0", [(p, False)]


@dataclass
class MTx:
    base_ver: dict[str, int]
    work: MStore
    events: list[tuple[str, bool]] = field(default_factory=list)


def event_path(ev_path: str, removed: bool, wpath: str) -> str | None:
    if removed and is_child(wpath, ev_path):
        return wpath
    if is_child(ev_path, wpath):
        return ev_path
    return None


# ----------------------------------------------------------------------------- the machine

conn_st = st.integers(0, NCONN - 1)
path_st = st.sampled_from(PATHS)
txsel_st = st.sampled_from([None, 0, 1])
_good_perm = st.builds(lambda k, d: f"{k}{d}", st.sampled_from("nrwb"), st.sampled_from(DOMIDS))
perm_st = st.one_of(_good_perm, _good_perm, _good_perm, _good_perm, st.sampled_from(BAD_PERMS))
perms_st = st.lists(perm_st, min_size=1, max_size=3)
# one store request: (kind, path, argument)
op_st = st.one_of(
    st.tuples(st.sampled_from(["read", "directory", "get_perms", "mkdir", "rm"]), path_st,
              st.none()),
    st.tuples(st.just("write"), path_st, st.binary(max_size=6)),
    st.tuples(st.just("set_perms"), path_st, perms_st),
)
TYPES = {"read": W.XS_READ, "directory": W.XS_DIRECTORY, "get_perms": W.XS_GET_PERMS,
         "mkdir": W.XS_MKDIR, "rm": W.XS_RM, "write": W.XS_WRITE, "set_perms": W.XS_SET_PERMS}


def encode(kind: str, p: str, arg) -> bytes:
    if kind == "write":
        return p.encode() + b"\0" + arg
    if kind == "set_perms":
        return z(p, *arg)
    return z(p)


def model_call(store: MStore, kind: str, p: str, arg):
    if kind in ("write", "set_perms"):
        return getattr(store, kind)(p, arg)
    return getattr(store, kind)(p)


class XenstoredSocketMachine(RuleBasedStateMachine):

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="pyxen-xsm-"))
        self.daemon: XenstoredDaemon | None = None
        self.thread: threading.Thread | None = None
        self.clients: list[XsWireClient] = []
        self._start()
        self.live = MStore(self._read_tree(self.clients[0]))
        self.vers = count(1)
        self.ver: dict[str, int] = {p: next(self.vers) for p in self.live.nodes}
        self.watches: list[dict[tuple[str, str], None]] = [{} for _ in range(NCONN)]
        self.txs: list[dict[int, MTx]] = [{} for _ in range(NCONN)]
        self.expected: list[list[tuple[bytes, bytes]]] = [[] for _ in range(NCONN)]

    # --------------------------------------------------------------- daemon plumbing

    def _start(self) -> None:
        self.daemon = XenstoredDaemon(self.dir / "socket", self.dir / "state.json")
        self.thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self.thread.start()
        assert self.daemon.ready.wait(5)
        self.clients = [XsWireClient(self.dir / "socket") for _ in range(NCONN)]

    def _stop(self) -> None:
        for c in self.clients:
            c.close()
        self.clients = []
        if self.daemon is not None:
            self.daemon.stop()
            self.thread.join(10)
            assert not self.thread.is_alive(), "daemon thread did not stop"
            self.daemon = None

    def teardown(self) -> None:
        try:
            if self.daemon is not None and self.clients:
                self._check_tree()
        finally:
            self._stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _read_tree(cl: XsWireClient) -> dict[str, MNode]:
        nodes: dict[str, MNode] = {}
        stack = ["/"]
        while stack:
            p = stack.pop()
            kids = tuple(s.decode() for s in W.split_strings(cl.ok(W.XS_DIRECTORY, z(p))))
            perms = tuple(s.decode() for s in W.split_strings(cl.ok(W.XS_GET_PERMS, z(p))))
            nodes[p] = MNode(cl.ok(W.XS_READ, z(p)), perms, kids)
            stack.extend(f"{p.rstrip('/')}/{k}" for k in kids)
        return nodes

    def _check_tree(self) -> None:
        assert self._read_tree(self.clients[0]) == self.live.nodes

    # --------------------------------------------------------------- model helpers

    def _bump(self) -> None:
        for p in self.live.touched:
            if p in self.live.nodes:
                self.ver[p] = next(self.vers)
            else:
                self.ver.pop(p, None)
        self.live.touched.clear()

    def _fire(self, events: list[tuple[str, bool]]) -> None:
        """Queue the events one request produces on every connection's expected list."""
        for c in range(NCONN):
            batch: list[tuple[bytes, bytes]] = []
            for ev_path, removed in events:
                for wpath, tok in self.watches[c]:
                    ep = event_path(ev_path, removed, wpath)
                    if ep is not None and (item := (ep.encode(), tok.encode())) not in batch:
                        batch.append(item)
            self.expected[c].extend(batch)

    def _tid(self, c: int, sel: int | None) -> int:
        if sel is None or not self.txs[c]:
            return 0
        tids = list(self.txs[c])
        return tids[sel % len(tids)]

    def _op(self, c: int, tid: int, op: tuple) -> None:
        """Send one store request on connection ``c`` (in transaction ``tid`` unless 0) and
        check the reply against the model."""
        kind, p, arg = op
        typ, payload = TYPES[kind], encode(kind, p, arg)
        tx = self.txs[c][tid] if tid else None
        try:
            want, events = model_call(tx.work if tx is not None else self.live, kind, p, arg)
            err = None
        except XsError as e:
            want, events, err = None, [], e.name
        m = self.clients[c].call(typ, payload, tid)
        event(f"{kind}{' in tx' if tid else ''}: {err or 'ok'}")
        if err is not None:
            assert (m.type, m.payload) == (W.XS_ERROR, err.encode() + b"\0"), (op, tid, m)
        else:
            assert (m.type, m.payload) == (typ, want), (op, tid, m)
        if tx is not None:
            tx.events.extend(events)
        else:
            self._bump()
            self._fire(events)

    def _start_tx(self, c: int) -> int:
        reply = self.clients[c].ok(W.XS_TRANSACTION_START, z(""))
        assert reply.endswith(b"\0") and reply[:-1].isdigit(), reply
        tid = int(reply[:-1])
        assert 0 < tid <= 0xFFFFFFFF and tid not in self.txs[c] and tid != BOGUS_TX
        self.txs[c][tid] = MTx(dict(self.ver), MStore(dict(self.live.nodes), track=True))
        return tid

    def _end_tx(self, c: int, tid: int, arg: str) -> None:
        m = self.clients[c].call(W.XS_TRANSACTION_END, z(arg), tid)
        if arg not in ("T", "F"):
            assert (m.type, m.payload) == (W.XS_ERROR, b"EINVAL\0"), m
            return                                          # still open
        tx = self.txs[c].pop(tid)
        if arg == "F":
            assert (m.type, m.payload) == (W.XS_TRANSACTION_END, b"OK\0"), m
            return
        assert tx.work.accessed is not None and tx.work.modified is not None
        if any(self.ver.get(p) != tx.base_ver.get(p) for p in tx.work.accessed):
            event("commit: EAGAIN")
            assert (m.type, m.payload) == (W.XS_ERROR, b"EAGAIN\0"), m
            return
        event(f"commit: ok, {'with' if tx.events else 'no'} events")
        assert (m.type, m.payload) == (W.XS_TRANSACTION_END, b"OK\0"), m
        for p in tx.work.modified:
            n = tx.work.nodes.get(p)
            if n is not None:
                self.live.put(p, n)
            elif p in self.live.nodes:
                self.live.delete(p)
        self._bump()
        self._fire(tx.events)

    # --------------------------------------------------------------- a busy start

    @initialize(seed=st.lists(st.tuples(path_st, st.binary(max_size=3)), max_size=4),
                wpaths=st.lists(st.sampled_from(WATCH_PATHS), min_size=NCONN, max_size=NCONN),
                txconns=st.lists(conn_st, max_size=2))
    def busy_start(self, seed, wpaths, txconns):
        """Some nodes, one watch per connection and up to two open transactions, so that
        short examples already interleave watches, transactions and writes."""
        for p, v in seed:
            self._op(0, 0, ("write", p, v))
        for c, p in enumerate(wpaths):
            self.watch(c, p, TOKENS[0])
        for c in txconns:
            self._start_tx(c)

    # --------------------------------------------------------------- store operations

    @rule(c=conn_st, op=op_st, sel=txsel_st)
    def store_op(self, c, op, sel):
        """read/directory/get_perms/write/mkdir/rm/set_perms, maybe in an open transaction."""
        self._op(c, self._tid(c, sel), op)

    @rule(c=conn_st, op=op_st)
    def store_op_outside_transactions(self, c, op):
        self._op(c, 0, op)

    @rule(c=conn_st, p=path_st)
    def op_in_unknown_transaction(self, c, p):
        m = self.clients[c].call(W.XS_READ, z(p), BOGUS_TX)
        assert (m.type, m.payload) == (W.XS_ERROR, b"ENOENT\0"), m

    # --------------------------------------------------------------- watches

    @rule(c=conn_st, p=st.sampled_from(WATCH_PATHS), tok=st.sampled_from(TOKENS))
    def watch(self, c, p, tok):
        m = self.clients[c].call(W.XS_WATCH, z(p, tok))
        if (p, tok) in self.watches[c]:
            assert (m.type, m.payload) == (W.XS_ERROR, b"EEXIST\0"), m
            return
        assert (m.type, m.payload) == (W.XS_WATCH, b"OK\0"), m
        self.watches[c][(p, tok)] = None
        self.expected[c].append((p.encode(), tok.encode()))     # the initial event

    @rule(c=conn_st, i=st.integers(0, 7), p=st.sampled_from(WATCH_PATHS),
          tok=st.sampled_from(TOKENS), existing=st.booleans())
    def unwatch(self, c, i, p, tok, existing):
        if existing and self.watches[c]:
            p, tok = list(self.watches[c])[i % len(self.watches[c])]
        m = self.clients[c].call(W.XS_UNWATCH, z(p, tok))
        if (p, tok) in self.watches[c]:
            assert (m.type, m.payload) == (W.XS_UNWATCH, b"OK\0"), m
            del self.watches[c][(p, tok)]
        else:
            assert (m.type, m.payload) == (W.XS_ERROR, b"ENOENT\0"), m

    @rule(c=conn_st)
    def reset_watches(self, c):
        """RESET_WATCHES drops the caller's watches and transactions."""
        assert self.clients[c].ok(W.XS_RESET_WATCHES, z("")) == b"OK\0"
        self.watches[c].clear()
        self.txs[c].clear()

    # --------------------------------------------------------------- transactions

    @rule(c=conn_st)
    def transaction_start(self, c):
        if sum(map(len, self.txs)) < 6:
            self._start_tx(c)

    @rule(i=st.integers(0, 11), arg=st.sampled_from(["T", "T", "T", "F", "X"]))
    def transaction_end(self, i, arg):
        open_txs = [(c, tid) for c in range(NCONN) for tid in self.txs[c]]
        if not open_txs:                                # TRANSACTION_END without a transaction
            m = self.clients[i % NCONN].call(W.XS_TRANSACTION_END, z("T"))
            assert (m.type, m.payload) == (W.XS_ERROR, b"ENOENT\0"), m
            return
        self._end_tx(*open_txs[i % len(open_txs)], arg)

    @rule(a=conn_st, b=conn_st, inside=st.lists(op_st, min_size=1, max_size=4),
          other=st.lists(op_st, max_size=3), split=st.integers(0, 4),
          arg=st.sampled_from(["T", "T", "F"]))
    def interleaved_transaction(self, a, b, inside, other, split, arg):
        """START on ``a``; requests in it; requests from ``b`` (outside any transaction) in
        the middle; END. Conflicts (EAGAIN) come from here mostly."""
        tid = self._start_tx(a)
        for i, op in enumerate(inside):
            if i == split:
                for op2 in other:
                    self._op(b, 0, op2)
            self._op(a, tid, op)
        if split >= len(inside):
            for op2 in other:
                self._op(b, 0, op2)
        self._end_tx(a, tid, arg)

    # --------------------------------------------------------------- connections, restarts

    @rule(c=conn_st)
    def reconnect(self, c):
        """Close one socket (its watches and open transactions die) and open a new one."""
        self.clients[c].close()
        self.clients[c] = XsWireClient(self.dir / "socket")
        self.watches[c].clear()
        self.txs[c].clear()

    @rule()
    def restart_daemon(self):
        """Stop the daemon and start a new one from its state file."""
        self._stop()
        self._start()
        for c in range(NCONN):
            self.watches[c].clear()
            self.txs[c].clear()
        self._check_tree()

    @rule()
    def whole_tree_matches(self):
        self._check_tree()

    # --------------------------------------------------------------- after every step

    @invariant()
    def events_match_and_daemon_alive(self):
        assert self.thread is not None and self.thread.is_alive()
        for c in range(NCONN):
            got = self.clients[c].sync()
            want, self.expected[c] = self.expected[c], []
            assert sorted(got) == sorted(want), (c, got, want, self.watches[c])
            if got:
                event(f"watch events in one step: {min(len(got), 4)}{'+' if len(got) >= 4 else ''}")


XenstoredSocketMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestXenstoredSocketModel = XenstoredSocketMachine.TestCase
