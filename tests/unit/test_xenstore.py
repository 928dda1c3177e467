"""pyxen.xenstore: wire format, store semantics, the sans-IO server and populate_domain."""

from __future__ import annotations

import json
import struct

import pytest

from pyxen.xenstore import wire as W
from pyxen.xenstore.server import XenstoreServer, populate_domain
from pyxen.xenstore.store import Quota, Store, XenstoreError
from pyxen.xenstore.wire import Message, MessageParser, ProtocolError, pack

UUID = "6f2b3c1e-0000-4000-8000-000000000042"


def z(*parts: str | bytes) -> bytes:
    return W.join_strings(*parts)


class Client:
    """Drives one Connection like a xenbus client: request -> (type, payload)."""

    def __init__(self, server: XenstoreServer, domid: int) -> None:
        self.conn = server.connect(domid)
        self.req_id = 100
        self.events: list[tuple[str, str]] = []

    def raw(self, typ: int, payload: bytes, tx: int = 0) -> list[Message]:
        self.req_id += 1
        self.conn.handle(Message(typ, self.req_id, tx, payload))
        out = self.conn.outgoing()
        replies = [m for m in out if m.type != W.XS_WATCH_EVENT]
        assert len(replies) == 1, out
        assert replies[0].req_id == self.req_id and replies[0].tx_id == tx
        for m in out:
            if m.type == W.XS_WATCH_EVENT:
                self.events.append(tuple(s.decode() for s in W.split_strings(m.payload)))
        return out

    def call(self, typ: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        r = [m for m in self.raw(typ, payload, tx) if m.type != W.XS_WATCH_EVENT][0]
        return r.type, r.payload

    def ok(self, typ: int, payload: bytes, tx: int = 0) -> bytes:
        t, p = self.call(typ, payload, tx)
        assert t == typ, (t, p)
        return p

    def err(self, typ: int, payload: bytes, tx: int = 0) -> str:
        t, p = self.call(typ, payload, tx)
        assert t == W.XS_ERROR, (t, p)
        assert p.endswith(b"\0")
        return p[:-1].decode()

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.ok(W.XS_READ, z(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        assert self.ok(W.XS_WRITE, path.encode() + b"\0" + v, tx) == b"OK\0"

    def drain_events(self) -> list[tuple[str, str]]:
        for m in self.conn.outgoing():
            assert m.type == W.XS_WATCH_EVENT
            self.events.append(tuple(s.decode() for s in W.split_strings(m.payload)))
        ev, self.events = self.events, []
        return ev


@pytest.fixture
def server() -> XenstoreServer:
    s = XenstoreServer()
    populate_domain(s, 5, "guest", memory_kib=262144, vcpus=2, vm_uuid=UUID)
    return s


# --------------------------------------------------------------------------- wire

def test_message_type_numbers_match_xs_wire_h():
    assert (W.XS_CONTROL, W.XS_DIRECTORY, W.XS_READ, W.XS_GET_PERMS, W.XS_WATCH,
            W.XS_UNWATCH, W.XS_TRANSACTION_START, W.XS_TRANSACTION_END, W.XS_INTRODUCE,
            W.XS_RELEASE, W.XS_GET_DOMAIN_PATH, W.XS_WRITE, W.XS_MKDIR, W.XS_RM,
            W.XS_SET_PERMS, W.XS_WATCH_EVENT, W.XS_ERROR, W.XS_IS_DOMAIN_INTRODUCED,
            W.XS_RESUME, W.XS_SET_TARGET) == tuple(range(20))
    assert (W.XS_RESET_WATCHES, W.XS_DIRECTORY_PART, W.XS_INVALID) == (21, 22, 0xFFFF)
    assert W.XSD_ERRORS[0] == "EINVAL" and W.XSD_ERRORS[-1] == "EPERM" and len(W.XSD_ERRORS) == 16


def test_ring_layout_matches_xenstore_domain_interface():
    assert (W.REQ_OFF, W.RSP_OFF, W.RING_SIZE) == (0, 1024, 1024)
    assert (W.REQ_CONS, W.REQ_PROD, W.RSP_CONS, W.RSP_PROD) == (2048, 2052, 2056, 2060)
    assert (W.SERVER_FEATURES, W.CONNECTION, W.ERROR_FIELD) == (2064, 2068, 2072)


def test_pack_is_four_le_u32_then_payload():
    b = pack(Message(W.XS_READ, 0x01020304, 7, b"abc\0"))
    assert b == struct.pack("<IIII", 2, 0x01020304, 7, 4) + b"abc\0"
    with pytest.raises(ValueError):
        pack(Message(W.XS_WRITE, 0, 0, b"x" * 4097))
    assert len(pack(Message(W.XS_WRITE, 0, 0, b"x" * 4096))) == 4112


def test_parser_round_trip_split_at_every_byte():
    msgs = [Message(W.XS_WRITE, 1, 0, b"a/b\0value"), Message(W.XS_READ, 2, 9, b""),
            Message(W.XS_DIRECTORY, 0xFFFFFFFF, 3, b"x" * 300)]
    stream = b"".join(pack(m) for m in msgs)
    for cut in range(len(stream) + 1):
        p = MessageParser()
        got = p.feed(stream[:cut]) + p.feed(stream[cut:])
        assert got == msgs, cut
        assert p.pending == 0
    p = MessageParser()                                   # byte by byte
    got = [m for i in range(len(stream)) for m in p.feed(stream[i:i + 1])]
    assert got == msgs


def test_parser_rejects_oversized_payload_for_good():
    p = MessageParser()
    assert p.feed(struct.pack("<IIII", 2, 1, 0, 4096)) == []      # 4096 is fine
    p = MessageParser()
    with pytest.raises(ProtocolError):
        p.feed(struct.pack("<IIII", 2, 1, 0, 4097))
    assert p.broken
    with pytest.raises(ProtocolError):
        p.feed(pack(Message(W.XS_READ, 1, 0, b"a\0")))


def test_error_and_ok_replies():
    req = Message(W.XS_READ, 42, 3, b"x\0")
    assert W.error_reply(req, "ENOENT") == Message(W.XS_ERROR, 42, 3, b"ENOENT\0")
    assert W.ok_reply(req) == Message(W.XS_READ, 42, 3, b"OK\0")
    with pytest.raises(ValueError):
        W.error_reply(req, "EWHATEVER")


# --------------------------------------------------------------------------- store

def test_store_read_write_mkdir_rm_directory():
    s = Store()
    s.write(0, "/a/b/c", b"v")
    assert s.read(0, "/a/b/c") == b"v"
    assert s.read(0, "/a/b") == b"" and s.directory(0, "/a") == ["b"]
    s.mkdir(0, "/a/b")                                     # exists: value untouched
    s.write(0, "/a/b", b"keep")
    s.mkdir(0, "/a/b")
    assert s.read(0, "/a/b") == b"keep"
    s.write(0, "/a/x", b"")
    assert s.directory(0, "/a") == ["b", "x"]
    s.rm(0, "/a/b")
    assert s.directory(0, "/a") == ["x"]
    assert "/a/b/c" not in s.nodes
    s.rm(0, "/a/b")                                        # gone, parent exists: fine
    with pytest.raises(XenstoreError) as e:
        s.rm(0, "/nope/deeper")
    assert e.value.name == "ENOENT"
    with pytest.raises(XenstoreError) as e:
        s.rm(0, "/")
    assert e.value.name == "EINVAL"


@pytest.mark.parametrize("bad", ["", "/a/", "/a//b", "/a b", "/ä", "x" * 3100, "@foo"])
def test_store_rejects_bad_paths(bad):
    with pytest.raises(XenstoreError) as e:
        Store().write(0, bad, b"")
    assert e.value.name == "EINVAL"


def test_relative_paths_resolve_under_the_domain():
    s = Store()
    s.write(0, "/local/domain/7", b"")
    s.set_perms(0, "/local/domain/7", ["n7"])
    s.write(7, "data/x", b"1")
    assert s.read(0, "/local/domain/7/data/x") == b"1"
    assert s.canonical(7, "a/b") == "/local/domain/7/a/b"


def test_permissions_owner_default_and_per_domain_entries():
    s = Store()
    s.write(0, "/p", b"secret")
    s.set_perms(0, "/p", ["n0", "r5"])
    assert s.read(5, "/p") == b"secret"
    for domid in (6, 7):
        with pytest.raises(XenstoreError) as e:
            s.read(domid, "/p")
        assert e.value.name == "EACCES"
    with pytest.raises(XenstoreError) as e:
        s.write(5, "/p", b"x")
    assert e.value.name == "EACCES"
    s.set_perms(0, "/p", ["r0", "w6"])          # default read; dom6 write-only
    assert s.read(7, "/p") == b"secret"
    s.write(6, "/p", b"w")
    with pytest.raises(XenstoreError):
        s.read(6, "/p")
    assert s.get_perms(0, "/p") == ["r0", "w6"]


def test_missing_node_under_unreadable_parent_is_eacces_not_enoent():
    s = Store()
    s.write(0, "/hidden", b"")                    # root perms n0: inherited
    with pytest.raises(XenstoreError) as e:
        s.read(5, "/hidden/nothing")
    assert e.value.name == "EACCES"
    s.set_perms(0, "/hidden", ["n0", "r5"])
    with pytest.raises(XenstoreError) as e:
        s.read(5, "/hidden/nothing")
    assert e.value.name == "ENOENT"
    with pytest.raises(XenstoreError) as e:        # creating needs write on the ancestor
        s.write(5, "/hidden/new", b"")
    assert e.value.name == "EACCES"


def test_new_nodes_inherit_perms_and_domu_becomes_owner():
    s = Store()
    s.write(0, "/d", b"")
    s.set_perms(0, "/d", ["n0", "b5", "r9"])
    s.write(5, "/d/mine/leaf", b"1")
    assert s.get_perms(0, "/d/mine") == ["n5", "b5", "r9"]
    assert s.get_perms(0, "/d/mine/leaf") == ["n5", "b5", "r9"]
    s.write(0, "/d/dom0s", b"")
    assert s.get_perms(0, "/d/dom0s") == ["n0", "b5", "r9"]


def test_set_perms_needs_ownership_and_domu_cannot_give_away():
    s = Store()
    s.write(0, "/d", b"")
    s.set_perms(0, "/d", ["n0", "b5"])
    with pytest.raises(XenstoreError) as e:        # write but not owner
        s.set_perms(5, "/d", ["n0", "r5"])
    assert e.value.name == "EACCES"
    s.write(5, "/d/m", b"")
    s.set_perms(5, "/d/m", ["n5", "r0", "r7"])
    with pytest.raises(XenstoreError) as e:
        s.set_perms(5, "/d/m", ["n7"])
    assert e.value.name == "EPERM"
    for bad in ([], ["x5"], ["r"], ["rr"], ["r70000"]):
        with pytest.raises(XenstoreError) as e:
            s.set_perms(0, "/d/m", bad)
        assert e.value.name == "EINVAL"


def test_quota_entries_size_and_perms_for_domu_only():
    s = Store(Quota(entries_per_domain=5, entry_size=2048))
    s.write(0, "/q", b"")
    s.set_perms(0, "/q", ["n3"])                   # dom3 owns 1 node
    s.write(3, "/q/a/b/c", b"")                    # +3 = 4
    s.write(3, "/q/d", b"")                        # 5
    with pytest.raises(XenstoreError) as e:
        s.write(3, "/q/e", b"")
    assert e.value.name == "ENOSPC"
    with pytest.raises(XenstoreError):
        s.mkdir(3, "/q/f/g")
    assert "/q/f" not in s.nodes                   # failed create left nothing behind
    s.rm(3, "/q/a")
    s.write(3, "/q/e", b"")
    with pytest.raises(XenstoreError) as e:
        s.write(3, "/q/e", b"x" * 2048)
    assert e.value.name == "ENOSPC"
    s.write(3, "/q/e", b"x" * 1900)
    s.write(0, "/q/big", b"x" * 3000)              # dom0 is exempt
    with pytest.raises(XenstoreError) as e:
        s.set_perms(3, "/q/e", ["n3", "r1", "r2", "r4", "r5", "r6"])
    assert e.value.name == "ENOSPC"


def test_store_state_round_trips_through_json():
    s = Store()
    s.write(0, "/a/b", b"\x00\xffbin")
    s.set_perms(0, "/a", ["n0", "r4"])
    s.targets[3] = 4
    d = json.loads(json.dumps(s.to_dict()))
    t = Store.from_dict(d)
    assert t.nodes == s.nodes and t.generation == s.generation
    assert t.targets == {3: 4} and t.entries == s.entries
    assert t.read(4, "/a") == b"" and t.read(0, "/a/b") == b"\x00\xffbin"
    d["nodes"]["/a"]["children"].append("ghost")
    with pytest.raises(ValueError):
        Store.from_dict(d)


def test_generation_changes_on_every_modification():
    s = Store()
    s.write(0, "/g", b"1")
    g1 = s.nodes["/g"].generation
    s.write(0, "/g", b"2")
    g2 = s.nodes["/g"].generation
    s.write(0, "/g/c", b"")
    g3 = s.nodes["/g"].generation
    assert g1 < g2 < g3


# --------------------------------------------------------------------------- server

def test_linux_boot_sequence(server):
    """What Linux 6.1's xenbus does first: read the reset-watches flag, reset, watch."""
    g = Client(server, 5)
    assert g.read("control/platform-feature-xs_reset_watches") == b"1"
    assert g.ok(W.XS_RESET_WATCHES, b"\0") == b"OK\0"
    assert g.ok(W.XS_WATCH, z("control/shutdown", "FFFF8880")) == b"OK\0"
    assert g.drain_events() == [("control/shutdown", "FFFF8880")]      # initial event
    assert g.ok(W.XS_DIRECTORY, z("device")) == z("suspend")       # libxl's, no devices
    assert g.ok(W.XS_GET_DOMAIN_PATH, z("5")) == b"/local/domain/5\0"
    g.write("control/feature-poweroff", "1")
    assert g.read("memory/target") == b"262144"


def test_domu_denied_reading_dom0_only_node(server):
    g = Client(server, 5)
    assert g.err(W.XS_READ, z("/libxl/5/type")) == "EACCES"
    assert g.err(W.XS_READ, z("/local/domain/0/anything")) == "EACCES"
    assert g.err(W.XS_WRITE, b"name\0evil") == "EACCES"
    assert g.err(W.XS_DIRECTORY, z("/local/domain")) == "EACCES"
    assert server.read("/libxl/5/type") == b"pvh"


def test_reply_errors_for_malformed_and_unknown(server):
    g = Client(server, 5)
    assert g.err(W.XS_READ, b"control") == "EINVAL"            # no NUL
    assert g.err(W.XS_READ, b"a\0b\0") == "EINVAL"             # two args
    assert g.err(W.XS_WRITE, b"novalue") == "EINVAL"
    assert g.err(W.XS_WATCH, z("only-path")) == "EINVAL"
    assert g.err(W.XS_READ, z("\xff".encode("latin-1"))) == "EINVAL"
    assert g.err(20, b"") == "ENOSYS"
    assert g.err(999, b"x") == "ENOSYS"
    assert g.err(W.XS_ERROR, b"") == "ENOSYS"               # server-only type, as C xenstored
    assert g.err(W.XS_INTRODUCE, z("6", "1", "2")) == "EACCES"
    assert g.err(W.XS_CONTROL, z("help")) == "EACCES"
    assert g.err(W.XS_GET_DOMAIN_PATH, z("x")) == "EINVAL"
    assert g.err(W.XS_READ, z("nothere")) == "ENOENT"


def test_watch_fires_for_node_and_descendants_on_their_connection(server):
    d0, g = Client(server, 0), Client(server, 5)
    g.ok(W.XS_WATCH, z("device", "tok"))
    d0.ok(W.XS_WATCH, z("/local/domain/5/device", "abs"))
    assert g.drain_events() == [("device", "tok")]
    assert d0.drain_events() == [("/local/domain/5/device", "abs")]
    d0.write("/local/domain/5/device/vif/0/state", "1")
    assert g.drain_events() == [("device/vif/0/state", "tok")]      # relative as registered
    assert d0.drain_events() == [("/local/domain/5/device/vif/0/state", "abs")]
    d0.write("/local/domain/5/devicefoo", "")                       # not a child
    d0.write("/local/domain/5/data/x", "")
    assert g.drain_events() == [] and d0.drain_events() == []


def test_watch_events_respect_read_permission(server):
    d0, g = Client(server, 0), Client(server, 5)
    g.ok(W.XS_WATCH, z("/libxl", "t"))
    assert g.drain_events() == [("/libxl", "t")]
    d0.write("/libxl/5/secret", "x")
    assert g.drain_events() == []
    d0.write("/local/domain/5/data/y", "")                           # readable, not watched
    assert g.drain_events() == []


def test_rm_fires_watches_below_and_above(server):
    d0, g = Client(server, 0), Client(server, 5)
    d0.write("/local/domain/5/device/vbd/768/state", "4")
    g.ok(W.XS_WATCH, z("device/vbd/768/state", "deep"))
    g.ok(W.XS_WATCH, z("device", "top"))
    g.drain_events()
    d0.ok(W.XS_RM, z("/local/domain/5/device/vbd"))
    assert sorted(g.drain_events()) == [("device/vbd", "top"), ("device/vbd/768/state", "deep")]


def test_on_output_called_for_watch_from_other_connection(server):
    kicks = []
    g = server.connect(5, on_output=lambda: kicks.append(1))
    g.handle(Message(W.XS_WATCH, 1, 0, z("control/shutdown", "t")))
    assert kicks == [1]
    g.outgoing()
    server.write("/local/domain/5/control/shutdown", "poweroff")
    assert kicks == [1, 1]
    assert [m.payload for m in g.outgoing()] == [z("control/shutdown", "t")]


def test_duplicate_pending_events_are_coalesced_and_unwatch(server):
    g = Client(server, 5)
    g.ok(W.XS_WATCH, z("data", "t"))
    g.drain_events()
    g.write("data/a", "1")
    assert g.events == [("data/a", "t")]
    g.events.clear()
    server.write("/local/domain/5/data/b", "1")
    server.write("/local/domain/5/data/b", "2")
    assert g.drain_events() == [("data/b", "t")]
    assert g.err(W.XS_WATCH, z("data", "t")) == "EEXIST"
    assert g.ok(W.XS_UNWATCH, z("data", "t")) == b"OK\0"
    assert g.err(W.XS_UNWATCH, z("data", "t")) == "ENOENT"
    server.write("/local/domain/5/data/c", "1")
    assert g.drain_events() == []


def test_reset_watches_drops_watches_and_transactions(server):
    g = Client(server, 5)
    g.ok(W.XS_WATCH, z("data", "t"))
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    g.ok(W.XS_RESET_WATCHES, b"\0")
    g.drain_events()
    server.write("/local/domain/5/data/c", "1")
    assert g.drain_events() == []
    assert g.err(W.XS_READ, z("data"), tx=tid) == "ENOENT"


def test_watch_quota(server):
    server.store.quota.watches_per_domain = 3
    g = Client(server, 5)
    for i in range(4):                 # C xenstored refuses only beyond it: quota + 1 fit
        g.ok(W.XS_WATCH, z("data", f"t{i}"))
    assert g.err(W.XS_WATCH, z("data", "t4")) == "E2BIG"
    d0 = Client(server, 0)
    for i in range(5):
        d0.ok(W.XS_WATCH, z("/", f"t{i}"))


def test_transaction_commit_abort_and_isolation(server):
    g, other = Client(server, 5), Client(server, 0)
    g.ok(W.XS_WATCH, z("data", "w"))
    g.drain_events()
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    assert tid != 0
    g.write("data/t", "in-tx", tx=tid)
    assert g.read("data/t", tx=tid) == b"in-tx"
    assert g.err(W.XS_READ, z("data/t")) == "ENOENT"                 # invisible outside
    assert g.drain_events() == []                                     # no event until commit
    assert g.ok(W.XS_TRANSACTION_END, z("T"), tx=tid) == b"OK\0"
    assert g.read("data/t") == b"in-tx"
    assert g.drain_events() == [("data/t", "w")]
    assert g.err(W.XS_TRANSACTION_END, z("T"), tx=tid) == "ENOENT"    # gone
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    g.write("data/t", "dropped", tx=tid)
    g.ok(W.XS_TRANSACTION_END, z("F"), tx=tid)
    assert g.read("data/t") == b"in-tx"
    assert other.err(W.XS_TRANSACTION_START, b"\0", tx=77) == "ENOENT"   # unknown id first


def test_transaction_conflict_gets_eagain_and_unrelated_write_does_not(server):
    g, d0 = Client(server, 5), Client(server, 0)
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    assert g.read("memory/target", tx=tid) == b"262144"
    g.write("data/x", "1", tx=tid)
    d0.write("/local/domain/5/drivers/unrelated", "y")
    assert g.ok(W.XS_TRANSACTION_END, z("T"), tx=tid) == b"OK\0"
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    assert g.read("memory/target", tx=tid) == b"262144"
    g.write("data/x", "2", tx=tid)
    d0.write("/local/domain/5/memory/target", "131072")               # read in the tx
    assert g.err(W.XS_TRANSACTION_END, z("T"), tx=tid) == "EAGAIN"
    assert g.read("data/x") == b"1"                                   # nothing applied
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    assert g.err(W.XS_READ, z("data/new"), tx=tid) == "ENOENT"
    d0.write("/local/domain/5/data/new", "appeared")                  # phantom
    assert g.err(W.XS_TRANSACTION_END, z("T"), tx=tid) == "EAGAIN"


def test_transaction_rm_and_quota_and_bad_end(server):
    g = Client(server, 5)
    g.write("data/a/b", "1")
    tid = int(g.ok(W.XS_TRANSACTION_START, b"\0")[:-1])
    g.ok(W.XS_RM, z("data/a"), tx=tid)
    assert g.err(W.XS_TRANSACTION_END, z("X"), tx=tid) == "EINVAL"
    g.ok(W.XS_TRANSACTION_END, z("T"), tx=tid)
    assert g.err(W.XS_READ, z("data/a/b")) == "ENOENT"
    assert server.store.entries[5] == sum(1 for n in server.store.nodes.values() if n.owner == 5)
    ids = [g.ok(W.XS_TRANSACTION_START, b"\0") for _ in range(11)]   # quota 10, + 1 as C
    assert len(set(ids)) == 11
    assert g.err(W.XS_TRANSACTION_START, b"\0") == "ENOSPC"


def test_get_set_perms_over_the_wire(server):
    g = Client(server, 5)
    assert g.ok(W.XS_GET_PERMS, z("control")) == z("n0", "r5")
    assert g.ok(W.XS_GET_PERMS, z("data")) == z("n5")
    assert g.ok(W.XS_SET_PERMS, z("data", "n5", "r0", "b7")) == b"OK\0"
    assert server.get_perms("/local/domain/5/data") == ["n5", "r0", "b7"]
    assert g.err(W.XS_SET_PERMS, z("control", "n5")) == "EACCES"
    assert g.err(W.XS_SET_PERMS, z("data")) == "EINVAL"


def test_directory_part_format(server):
    for i in range(300):
        server.write(f"/many/child-number-{i:04d}", "")
    d0 = Client(server, 0)
    assert d0.err(W.XS_DIRECTORY, z("/many")) == "E2BIG"           # 6900 bytes of names
    full = z(*server.directory("/many"))
    assert full.count(b"\0") == 300 and len(full) > 4096
    names, off, gens = b"", 0, set()
    while True:
        p = d0.ok(W.XS_DIRECTORY_PART, z("/many", str(off)))
        assert len(p) <= 4096
        gen, rest = p.split(b"\0", 1)
        gens.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            names += rest[:-1]
            break
        names += rest
        off += len(rest)
    assert names == full and len(gens) == 1
    assert d0.ok(W.XS_DIRECTORY_PART, z("/many", "999999")) == gen + b"\0\0"


def test_introduce_release_and_special_watches():
    hooks = []
    s = XenstoreServer(on_introduce=lambda *a: hooks.append(("in", a)),
                       on_release=lambda d: hooks.append(("out", d)))
    d0 = Client(s, 0)
    d0.ok(W.XS_WATCH, z("@introduceDomain", "i"))
    d0.ok(W.XS_WATCH, z("@releaseDomain", "r"))
    assert sorted(d0.drain_events()) == [("@introduceDomain", "i"), ("@releaseDomain", "r")]
    assert d0.ok(W.XS_IS_DOMAIN_INTRODUCED, z("9")) == b"F\0"
    assert d0.ok(W.XS_INTRODUCE, z("9", "-12", "3")) == b"OK\0"
    assert hooks == [("in", (9, -12, 3))]
    assert d0.drain_events() == [("@introduceDomain", "i")]
    assert d0.ok(W.XS_IS_DOMAIN_INTRODUCED, z("9")) == b"T\0"
    g = Client(s, 9)
    g.ok(W.XS_WATCH, z("@releaseDomain", "x"))              # allowed, but n0 hides events
    g.drain_events()
    assert d0.ok(W.XS_RELEASE, z("9")) == b"OK\0"
    assert hooks[-1] == ("out", 9)
    assert d0.drain_events() == [("@releaseDomain", "r")]
    assert g.conn.closed and g.conn.outgoing() == []
    assert d0.err(W.XS_RELEASE, z("9")) == "ENOENT"
    s.connect(11)                                            # implicit introduction
    assert d0.drain_events() == [("@introduceDomain", "i")]


def test_set_target_grants_owner_access():
    s = XenstoreServer()
    s.write("/local/domain/3/data", "")
    s.set_perms("/local/domain/3", ["n3"])
    d0, stub = Client(s, 0), Client(s, 4)
    assert stub.err(W.XS_READ, z("/local/domain/3")) == "EACCES"
    d0.ok(W.XS_SET_TARGET, z("4", "3"))
    assert stub.read("/local/domain/3") == b""


def test_handle_never_raises_even_if_store_breaks(server, monkeypatch):
    g = Client(server, 5)
    monkeypatch.setattr(server.store, "read", lambda *a: 1 / 0)
    assert g.err(W.XS_READ, z("name")) == "EIO"


def test_oversized_reply_is_e2big(server):
    server.write("/local/domain/5/data/big", "x" * 4000)
    for i in range(200):
        server.write(f"/local/domain/5/data/child-with-a-long-name-{i:04d}", "")
    g = Client(server, 5)
    assert g.err(W.XS_DIRECTORY, z("data")) == "E2BIG"


# --------------------------------------------------------------------------- populate_domain

def test_populate_domain_layout_readable_by_the_domain(server):
    g = Client(server, 5)
    expect = {
        "name": b"guest", "domid": b"5", "vm": f"/vm/{UUID}".encode(),
        "memory/target": b"262144", "memory/static-max": b"262144",
        "cpu/0/availability": b"online", "cpu/1/availability": b"online",
        "control/platform-feature-multiprocessor-suspend": b"1",
        "control/platform-feature-xs_reset_watches": b"1",
        "console/type": b"xenconsoled", "console/output": b"pty", "console/limit": b"1048576",
    }
    for path, value in expect.items():
        assert g.read(path) == value, path
    assert g.err(W.XS_READ, z("cpu/2/availability")) == "ENOENT"
    assert g.read(f"/vm/{UUID}/uuid") == UUID.encode()
    assert set(g.ok(W.XS_DIRECTORY, z("/local/domain/5")).split(b"\0")[:-1]) >= {
        b"name", b"domid", b"vm", b"memory", b"cpu", b"control", b"device", b"data",
        b"drivers", b"feature", b"attr", b"error", b"console"}
    # guest-writable where libxl makes it so, read-only elsewhere
    for p in ("control/shutdown", "control/feature-poweroff", "control/sysrq", "data/x",
              "drivers/linux", "attr/os", "error/device", "feature/y",
              "device/suspend/event-channel", "console/tty"):
        g.write(p, "1")
    for p in ("name", "memory/target", "control/new-flag", "control/platform-feature-xs_reset_watches",
              "cpu/0/availability", "domid", "device/vif"):
        assert g.err(W.XS_WRITE, p.encode() + b"\0v") == "EACCES", p
    assert server.get_perms("/local/domain/5") == ["n0", "r5"]
    assert server.get_perms("/local/domain/5/console") == ["n5", "r0"]


def test_populate_domain_is_idempotent_and_replaces_old_tree(server):
    server.write("/local/domain/5/data/stale", "x")
    populate_domain(server, 5, "again", memory_kib=1024, vcpus=1, vm_uuid=UUID, target_kib=512,
                    store_port=1, store_ring_ref=0xFEFFF, console_port=2)
    assert server.read("/local/domain/5/name") == b"again"
    assert server.read("/local/domain/5/memory/target") == b"512"
    assert server.read("/local/domain/5/store/ring-ref") == str(0xFEFFF).encode()
    assert server.read("/local/domain/5/console/port") == b"2"
    with pytest.raises(XenstoreError):
        server.read("/local/domain/5/data/stale")
    with pytest.raises(XenstoreError):
        server.read("/local/domain/5/cpu/1")
