"""Migration of a domain's xenstore state, sans-IO: node export/import, the JSON document,
connection state (watches, transactions, queued output, partial input), doomed transactions,
and ring freeze/export/thaw/restore on a bytearray page driven by a simulated guest."""

from __future__ import annotations

import base64
import copy
import json
import struct

import pytest

from pyxen.xenstore import wire as W
from pyxen.xenstore.ring import XenstoreRing
from pyxen.xenstore.server import (ConnectionState, XenstoreServer, migration_document,
                                   parse_migration_document, populate_domain)
from pyxen.xenstore.store import XenstoreError
from pyxen.xenstore.wire import Message, MessageParser, pack

UUID = "0badc0de-0000-4000-8000-000000000005"
M32 = 0xFFFFFFFF
ROOTS = ["/local/domain/5", f"/vm/{UUID}", "/libxl/5"]


def z(*parts: str | bytes) -> bytes:
    return W.join_strings(*parts)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def new_server() -> XenstoreServer:
    s = XenstoreServer()
    populate_domain(s, 5, "mig", memory_kib=262144, vcpus=1, vm_uuid=UUID)
    return s


def call(conn, typ: int, payload: bytes, tx: int = 0, req_id: int = 1) -> Message:
    conn.handle(Message(typ, req_id, tx, payload))
    out = [m for m in conn.outgoing() if m.type != W.XS_WATCH_EVENT]
    assert len(out) == 1 and out[0].req_id == req_id, out
    return out[0]


def event(path: str, token: str) -> Message:
    return Message(W.XS_WATCH_EVENT, 0, 0, z(path, token))


# --------------------------------------------------------------------------- nodes

def test_export_nodes_parents_first_each_once_missing_roots_skipped():
    s = new_server()
    s.write("/local/domain/5/data/a/b", b"\x00\xffbin")
    s.set_perms("/local/domain/5/data/a/b", ["n5", "r0", "b7"])
    nodes = s.export_nodes(["/local/domain/5/data", "/nope/x", "/local/domain/5",
                            "/local/domain/5/data/a"])
    paths = [n["path"] for n in nodes]
    assert paths[0] == "/local/domain/5" and len(paths) == len(set(paths))
    assert set(paths) == {p for p in s.store.nodes if p.startswith("/local/domain/5")}
    for i, p in enumerate(paths):                  # every parent that is exported comes first
        par = p.rsplit("/", 1)[0]
        assert par not in paths or paths.index(par) < i
    byp = {n["path"]: n for n in nodes}
    assert base64.b64decode(byp["/local/domain/5/data/a/b"]["value"]) == b"\x00\xffbin"
    assert byp["/local/domain/5/data/a/b"]["perms"] == ["n5", "r0", "b7"]
    assert byp["/local/domain/5/name"]["perms"] == ["n0", "r5"]
    assert s.export_nodes(["/nothing"]) == []


@pytest.mark.parametrize("root", ["local/domain/5", "/a//b", "/a/", "@releaseDomain", ""])
def test_export_nodes_rejects_bad_roots(root):
    with pytest.raises(XenstoreError) as e:
        new_server().export_nodes([root])
    assert e.value.name == "EINVAL"


def test_document_round_trip_to_another_server_with_values_and_perms():
    a, b = new_server(), XenstoreServer()
    a.write("/local/domain/5/data/x", b"\x01\x02")
    a.set_perms("/local/domain/5/data/x", ["n5", "r0"])
    doc = migration_document(5, a.export_nodes(ROOTS), ConnectionState())
    doc = json.loads(json.dumps(doc))              # it is plain JSON
    watcher = b.connect(0)
    call(watcher, W.XS_WATCH, z("/local/domain", "w"))
    watcher.outgoing()
    b.import_domain(parse_migration_document(doc, 5))
    for n in doc["nodes"]:
        p = n["path"]
        assert b.read(p) == a.read(p), p
        assert b.get_perms(p) == a.get_perms(p), p
    ev = watcher.outgoing()                        # the import fired watches as writes do
    assert event("/local/domain/5/data/x", "w") in ev
    assert b.store.entries.get(5) == a.store.entries.get(5)   # quota accounting follows


def good_doc() -> dict:
    return migration_document(
        5, [{"path": "/local/domain/5", "value": b64(b""), "perms": ["n0", "r5"]},
            {"path": "/local/domain/5/k", "value": b64(b"v"), "perms": ["n5"]}],
        ConnectionState([("data", b"tok"), ("@releaseDomain", b"r")], [3, 9],
                        b"\x00" * 5, pack(Message(W.XS_READ, 1, 0, z("name")))[:7]))


def _set(doc: dict, path: tuple, value) -> dict:
    d = copy.deepcopy(doc)
    o = d
    for k in path[:-1]:
        o = o[k]
    if value is KeyError:
        del o[path[-1]]
    else:
        o[path[-1]] = value
    return d


BAD_DOCS = [
    ("not-an-object", ()),
    ("version-2", ("version",), 2),
    ("version-true", ("version",), True),
    ("no-version", ("version",), KeyError),
    ("other-domid", ("domid",), 6),
    ("domid-string", ("domid",), "5"),
    ("nodes-not-list", ("nodes",), {}),
    ("node-not-object", ("nodes", 0), "x"),
    ("relative-path", ("nodes", 0, "path"), "local/domain/5"),
    ("double-slash", ("nodes", 0, "path"), "/local//domain"),
    ("special-path", ("nodes", 0, "path"), "@releaseDomain"),
    ("path-not-str", ("nodes", 0, "path"), 5),
    ("duplicate-path", ("nodes", 1, "path"), "/local/domain/5"),
    ("bad-base64", ("nodes", 1, "value"), "!!!"),
    ("base64-not-str", ("nodes", 1, "value"), 1),
    ("value-too-long", ("nodes", 1, "value"), b64(b"v" * 4097)),
    ("no-perms", ("nodes", 1, "perms"), []),
    ("bad-perm", ("nodes", 1, "perms"), ["x5"]),
    ("perm-domid-too-big", ("nodes", 1, "perms"), ["n70000"]),
    ("perm-not-str", ("nodes", 1, "perms"), [5]),
    ("no-connection", ("connection",), KeyError),
    ("watch-bad-path", ("connection", "watches", 0, 0), "a//b"),
    ("watch-bad-token", ("connection", "watches", 0, 1), "%%"),
    ("watch-nul-token", ("connection", "watches", 0, 1), b64(b"a\0b")),
    ("watch-not-pair", ("connection", "watches", 0), ["data"]),
    ("watch-duplicate", ("connection", "watches", 1), ["/local/domain/5/data", b64(b"tok")]),
    ("tx-zero", ("connection", "transactions"), [0]),
    ("tx-string", ("connection", "transactions"), ["3"]),
    ("tx-bool", ("connection", "transactions"), [True]),
    ("tx-too-big", ("connection", "transactions"), [1 << 32]),
    ("tx-duplicate", ("connection", "transactions"), [3, 3]),
    ("output-bad-base64", ("connection", "output"), "a"),
    ("input-complete-request", ("connection", "input"),
     b64(pack(Message(W.XS_READ, 1, 0, z("name"))))),
    ("input-oversized-header", ("connection", "input"),
     b64(struct.pack("<IIII", W.XS_WRITE, 1, 0, 5000))),
]


@pytest.mark.parametrize("case", BAD_DOCS, ids=[c[0] for c in BAD_DOCS])
def test_parse_rejects_bad_documents_with_einval(case):
    doc = "just a string" if len(case) == 2 else _set(good_doc(), case[1], case[2])
    with pytest.raises(XenstoreError) as e:
        parse_migration_document(doc, 5)
    assert e.value.name == "EINVAL"


def test_parse_accepts_the_good_document():
    imp = parse_migration_document(good_doc(), 5)
    assert imp.nodes[1] == ("/local/domain/5/k", b"v", ("n5",))
    assert imp.connection.watches == [("data", b"tok"), ("@releaseDomain", b"r")]
    assert imp.connection.transactions == [3, 9]


def test_a_restore_that_fails_changes_nothing():
    s = new_server()
    before = dict(s.store.nodes)
    conns = list(s.connections)
    imp = parse_migration_document(good_doc(), 5)
    imp.connection.watches.append(("bad//path", b"t"))      # bypassing the parser
    with pytest.raises(XenstoreError):
        s.import_domain(imp)
    assert s.store.nodes == before and s.connections == conns


# --------------------------------------------------------------------------- connections

def test_connection_state_and_doomed_transactions():
    a = new_server()
    c = a.connect(5)
    call(c, W.XS_WATCH, z("control/shutdown", "t1"))
    call(c, W.XS_WATCH, z("/local/domain/5/data", "t2"))
    call(c, W.XS_WATCH, z("@introduceDomain", "t3"))
    tid = int(call(c, W.XS_TRANSACTION_START, b"\0").payload[:-1])
    c.handle(Message(W.XS_READ, 77, 0, z("name")))           # a reply left queued
    st = c.state()
    assert st.watches == [("control/shutdown", b"t1"), ("/local/domain/5/data", b"t2"),
                          ("@introduceDomain", b"t3")]
    assert st.transactions == [tid]
    assert st.output == pack(Message(W.XS_READ, 77, 0, b"mig"))
    assert c.outgoing() == [Message(W.XS_READ, 77, 0, b"mig")]   # state() drained nothing
    rt = ConnectionState.from_json(json.loads(json.dumps(st.to_json())), 5)
    assert rt == st

    b = new_server()
    d = b.restore_connection(5, st)
    assert d.outgoing() == []                                # no initial watch events
    assert not b.is_introduced(5)                            # restoring is not introducing
    b.write("/local/domain/5/control/shutdown", "poweroff")
    b.write("/local/domain/5/data/k", "1")
    b.introduce_domain(6)                                    # special watch, domU: no READ
    assert d.outgoing() == [event("control/shutdown", "t1"), event("/local/domain/5/data/k", "t2")]
    # the doomed transaction works on a copy, is isolated, and cannot commit
    assert call(d, W.XS_READ, z("name"), tid).payload == b"mig"
    assert call(d, W.XS_WRITE, b"data/t\0v", tid).payload == b"OK\0"
    assert call(d, W.XS_READ, z("data/t"), tid).payload == b"v"
    assert not b.exists("/local/domain/5/data/t")
    assert call(d, W.XS_TRANSACTION_END, z("T"), tid).payload == b"EAGAIN\0"
    assert call(d, W.XS_TRANSACTION_END, z("F"), tid).payload == b"ENOENT\0"   # gone
    assert not b.exists("/local/domain/5/data/t")
    # a fresh transaction behaves normally; abort of a doomed one is fine
    d2 = b.restore_connection(5, ConnectionState(transactions=[tid]))
    assert call(d2, W.XS_TRANSACTION_END, z("F"), tid).payload == b"OK\0"
    t2 = int(call(d2, W.XS_TRANSACTION_START, b"\0").payload[:-1])
    assert call(d2, W.XS_WRITE, b"data/u\0w", t2).payload == b"OK\0"
    assert call(d2, W.XS_TRANSACTION_END, z("T"), t2).payload == b"OK\0"
    assert b.read("/local/domain/5/data/u") == b"w"


def test_restored_transaction_ids_are_not_handed_out_again():
    s = new_server()
    c = s.restore_connection(5, ConnectionState(transactions=[1, 2, 3]))
    tid = int(call(c, W.XS_TRANSACTION_START, b"\0").payload[:-1])
    assert tid not in (1, 2, 3)


# --------------------------------------------------------------------------- ring

class Guest:
    """The guest half of a store page (whole messages written at once, everything read)."""

    def __init__(self, page: memoryview) -> None:
        self.page = page
        self.ring: XenstoreRing | None = None
        self.parser = MessageParser()
        self.irqs = 0

    def raise_event(self) -> None:
        self.irqs += 1

    def idx(self, off: int) -> int:
        return struct.unpack_from("<I", self.page, off)[0]

    def write(self, data: bytes, notify: bool = True) -> None:
        prod = self.idx(W.REQ_PROD)
        assert (prod - self.idx(W.REQ_CONS)) & M32 + len(data) <= 1024
        for i, byte in enumerate(data):
            self.page[(prod + i) & 1023] = byte
        struct.pack_into("<I", self.page, W.REQ_PROD, (prod + len(data)) & M32)
        if notify:
            self.ring.notified()

    def receive(self, notify: bool = True) -> list[Message]:
        """Everything in the response ring; notifies the backend if it took anything."""
        cons, prod = self.idx(W.RSP_CONS), self.idx(W.RSP_PROD)
        data = bytes(self.page[1024 + ((cons + i) & 1023)] for i in range((prod - cons) & M32))
        struct.pack_into("<I", self.page, W.RSP_CONS, prod)
        if data and notify:
            self.ring.notified()
        return self.parser.feed(data)

    def drain(self) -> list[Message]:
        """Receive until the backend has nothing more to write."""
        out: list[Message] = []
        while True:
            got = self.receive()
            out += got
            if not got and self.idx(W.RSP_PROD) == self.idx(W.RSP_CONS):
                return out


def setup_ring(server: XenstoreServer, page: bytearray | None = None, conn=None):
    page = memoryview(page if page is not None else bytearray(4096))
    g = Guest(page)
    g.ring = XenstoreRing(page, g.raise_event, conn if conn is not None else server.connect(5))
    return g


BIG = b"B" * 1500
PARTIAL = pack(Message(W.XS_READ, 12, 0, z("name")))


def busy_guest(server: XenstoreServer) -> tuple[Guest, int]:
    """A watch, an open transaction, two unread replies that overflow the response ring,
    and a partial request in the parser."""
    server.write("/local/domain/5/data/big", BIG)
    g = setup_ring(server)
    g.write(pack(Message(W.XS_WATCH, 1, 0, z("data", "tok"))))
    g.write(pack(Message(W.XS_TRANSACTION_START, 2, 0, b"\0")))
    got = g.drain()
    tid = int(got[-1].payload[:-1])
    assert got == [Message(W.XS_WATCH, 1, 0, b"OK\0"), event("data", "tok"),
                   Message(W.XS_TRANSACTION_START, 2, 0, b"%d\0" % tid)]
    g.write(pack(Message(W.XS_READ, 10, 0, z("data/big"))))
    g.write(pack(Message(W.XS_READ, 11, 0, z("data/big"))))
    g.write(PARTIAL[:10])
    assert (g.idx(W.RSP_PROD) - g.idx(W.RSP_CONS)) & M32 == 1024
    assert g.ring.parser.pending == 10
    return g, tid


def after_export(g: Guest) -> None:
    """The guest goes on: the rest of the partial request and one more."""
    g.write(PARTIAL[10:] + pack(Message(W.XS_READ, 13, 0, z("domid"))))


EXPECTED_REPLIES = [Message(W.XS_READ, 10, 0, BIG), Message(W.XS_READ, 11, 0, BIG),
                    Message(W.XS_READ, 12, 0, b"mig"), Message(W.XS_READ, 13, 0, b"5")]


def test_freeze_export_then_thaw_loses_nothing():
    s = new_server()
    g, tid = busy_guest(s)
    g.ring.freeze()
    st = g.ring.export_state()
    replies = pack(EXPECTED_REPLIES[0]) + pack(EXPECTED_REPLIES[1])
    assert st.output == replies[1024:]
    assert st.input == PARTIAL[:10]
    assert st.watches == [("data", b"tok")] and st.transactions == [tid]
    cons, rsp, irqs = g.idx(W.REQ_CONS), g.idx(W.RSP_PROD), g.irqs
    after_export(g)
    s.write("/local/domain/5/data/k", "x")                  # an event while frozen
    assert (g.idx(W.REQ_CONS), g.idx(W.RSP_PROD), g.irqs) == (cons, rsp, irqs)
    got = g.receive()                                       # the ring is full: reading
    assert g.idx(W.RSP_PROD) == rsp                         # frees space, still nothing
    again = g.ring.export_state()                           # repeatable; the event is in
    assert again.output == st.output + pack(event("data/k", "tok"))
    assert (again.input, again.watches, again.transactions) == (st.input, st.watches,
                                                                st.transactions)
    g.ring.thaw()
    got += g.drain()
    assert [m for m in got if m.type != W.XS_WATCH_EVENT] == EXPECTED_REPLIES
    assert got[2] == event("data/k", "tok")                 # queued while frozen, in order
    assert call_ring(g, Message(W.XS_TRANSACTION_END, 20, tid, z("T"))) == \
        [Message(W.XS_TRANSACTION_END, 20, tid, b"OK\0")]   # still a live transaction here


def call_ring(g: Guest, msg: Message) -> list[Message]:
    g.write(pack(msg))
    return g.drain()


def test_export_state_needs_a_frozen_ring():
    g = setup_ring(new_server())
    with pytest.raises(RuntimeError):
        g.ring.export_state()


def test_migrated_ring_carries_on_on_another_server():
    a = new_server()
    g, tid = busy_guest(a)
    g.ring.freeze()
    doc = json.loads(json.dumps(migration_document(5, a.export_nodes(ROOTS),
                                                   g.ring.export_state())))
    after_export(g)
    a.write("/local/domain/5/data/lost", "on A")            # A's events stay on A
    # the destination: another server, a copy of the page
    b = XenstoreServer()
    imp = parse_migration_document(doc, 5)
    conn = b.import_domain(imp)
    b.write("/local/domain/5/data/k", "before the ring")    # queued on the parked conn
    page_b = bytearray(g.page)
    h = setup_ring(b, page_b, conn)
    h.ring.restore(imp.connection.output, imp.connection.input)
    h.ring.notified()
    got = h.drain()
    assert [m for m in got if m.type != W.XS_WATCH_EVENT] == EXPECTED_REPLIES
    assert [m for m in got if m.type == W.XS_WATCH_EVENT] == [event("data/k", "tok")]
    assert got[2] == event("data/k", "tok")                # after the migrated output
    b.write("/local/domain/5/data/k2", "1")
    assert h.drain() == [event("data/k2", "tok")]
    assert call_ring(h, Message(W.XS_TRANSACTION_END, 20, tid, z("T"))) == \
        [Message(W.XS_ERROR, 20, tid, b"EAGAIN\0")]
    assert g.idx(W.RSP_PROD) != h.idx(W.RSP_PROD)           # the old page saw none of it


def test_restore_rejects_complete_or_broken_input():
    g = setup_ring(new_server())
    with pytest.raises(ValueError):
        g.ring.restore(b"", PARTIAL)
    with pytest.raises(ValueError):
        g.ring.restore(b"", struct.pack("<IIII", W.XS_READ, 1, 0, 5000))
    assert g.ring.parser.pending == 0 and g.ring.pending == bytearray()
