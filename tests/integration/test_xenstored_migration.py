"""Moving a domain's xenstore state between two real xenstored daemons (two "hosts").

Each daemon runs on a thread with its own socket and state file. The guest is emulated by
the test on a memfd page, as a VMM hands it to xenstored (XS_INTRODUCE + memfd, kick eventfd,
notify eventfd): it writes requests into the page and signals the kick eventfd, and reads
responses when the daemon signals the notify eventfd. Migration = pyxen-export on A (A
freezes the ring), a copy of the page into a new memfd, pyxen-import on B, INTRODUCE on B
with the copy. The guest must carry on without noticing: its watches, its transaction (which
fails with EAGAIN at commit, so Linux would retry), its unread replies and its half-written
request all survive; no initial watch event is sent again.
"""

from __future__ import annotations

import base64
import fcntl
import json
import mmap
import os
import select
import struct
import time
from collections import deque
from pathlib import Path

import pytest

from pyxen.xenstore import daemon as daemon_mod
from pyxen.xenstore import wire as W
from pyxen.testing.xsdaemon import DaemonThread
from pyxen.xenstore.client import XenstoreClient
from pyxen.xenstore.server import populate_domain
from pyxen.xenstore.store import XenstoreError
from pyxen.xenstore.wire import Message, MessageParser, pack

DOMID = 5
UUID = "0badc0de-0000-4000-8000-00000000cafe"
ROOTS = [f"/local/domain/{DOMID}", f"/vm/{UUID}", f"/libxl/{DOMID}"]
MFN = 1
M32 = 0xFFFFFFFF
BIG = b"B" * 1500


def z(*parts: str | bytes) -> bytes:
    return W.join_strings(*parts)


# ----------------------------------------------------------------------------- daemons

class Host(DaemonThread):
    """One xenstored on a thread, with its own socket and state file; restartable."""

    def __init__(self, d: Path) -> None:
        d.mkdir()
        super().__init__(d)

    def client(self) -> XenstoreClient:
        c = XenstoreClient(str(self.socket_path), timeout=10)
        self.clients.append(c)
        return c


@pytest.fixture
def hosts(tmp_path):
    a, b = Host(tmp_path / "a"), Host(tmp_path / "b")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


# ----------------------------------------------------------------------------- the guest

class RingGuest:
    """The guest side of a store page in a memfd, plus the two eventfds a VMM would own.
    Writes whole byte strings into the request ring; reads everything from the response
    ring and signals the kick eventfd after any ring change (a superset of Linux's
    notifications)."""

    def __init__(self, memfd: int) -> None:
        self.parser = MessageParser()
        self.inbox: deque[Message] = deque()
        self.attach(memfd)

    def attach(self, memfd: int) -> None:
        """(Re)attach to the page in ``memfd`` with fresh eventfds (the destination VMM)."""
        self.memfd = memfd
        self.mm = mmap.mmap(memfd, 4096, mmap.MAP_SHARED, offset=MFN * 4096)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.notify_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fds(self) -> tuple[int, int, int]:
        return self.memfd, self.kick_fd, self.notify_fd

    def close(self) -> None:
        self.mm.close()
        os.close(self.kick_fd)
        os.close(self.notify_fd)

    def idx(self, off: int) -> int:
        return struct.unpack_from("<I", self.mm, off)[0]

    def _set(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.mm, off, v & M32)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def write(self, data: bytes) -> None:
        prod = self.idx(W.REQ_PROD)
        assert ((prod - self.idx(W.REQ_CONS)) & M32) + len(data) <= W.RING_SIZE, "ring full"
        for i, byte in enumerate(data):
            self.mm[W.REQ_OFF + ((prod + i) & 1023)] = byte
        self._set(W.REQ_PROD, prod + len(data))
        self.kick()

    def send(self, typ: int, payload: bytes, req_id: int, tx: int = 0) -> None:
        self.write(pack(Message(typ, req_id, tx, payload)))

    def poll(self) -> int:
        """Take what the response ring holds; the number of bytes taken."""
        cons, prod = self.idx(W.RSP_CONS), self.idx(W.RSP_PROD)
        n = (prod - cons) & M32
        data = bytes(self.mm[W.RSP_OFF + ((cons + i) & 1023)] for i in range(n))
        self._set(W.RSP_CONS, prod)
        if n:
            self.kick()
            self.inbox.extend(self.parser.feed(data))
        return n

    def next(self, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while not self.inbox:
            if self.poll():
                continue
            left = deadline - time.monotonic()
            assert left > 0, "no message from xenstored"
            if select.select([self.notify_fd], [], [], left)[0]:
                os.eventfd_read(self.notify_fd)
        return self.inbox.popleft()

    def call(self, typ: int, payload: bytes, req_id: int, tx: int = 0) -> Message:
        """Send and return the reply; watch events before it are an error."""
        self.send(typ, payload, req_id, tx)
        m = self.next()
        assert m.req_id == req_id and m.type != W.XS_WATCH_EVENT, m
        return m

    def quiet(self, wait: float = 0.2) -> list[Message]:
        """Whatever arrives within ``wait`` seconds (normally: nothing)."""
        time.sleep(wait)
        self.poll()
        got, self.inbox = list(self.inbox), deque()
        return got


def new_memfd() -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, (MFN + 1) * 4096)
    return fd


def event(path: str, token: str) -> Message:
    return Message(W.XS_WATCH_EVENT, 0, 0, z(path, token))


PARTIAL = pack(Message(W.XS_READ, 12, 0, z("name")))
AFTER = pack(Message(W.XS_READ, 13, 0, z("domid")))
EXPECTED_REPLIES = [Message(W.XS_READ, 10, 0, BIG), Message(W.XS_READ, 11, 0, BIG),
                    Message(W.XS_READ, 12, 0, b"mig"), Message(W.XS_READ, 13, 0, b"5")]


def busy_domain(host: Host, cl: XenstoreClient) -> tuple[RingGuest, int]:
    """Domain 5 introduced on ``host`` with a guest that has two watches, an open
    transaction (with a write in it), a node it wrote itself, two unread READ replies (more
    than the response ring holds, so part of them waits in xenstored) and the first 10 bytes
    of a third request consumed by xenstored."""
    populate_domain(cl, DOMID, "mig", memory_kib=262144, vcpus=1, vm_uuid=UUID)
    cl.write(f"/local/domain/{DOMID}/data/big", BIG)
    g = RingGuest(new_memfd())
    cl.introduce(DOMID, MFN, 1, fds=g.fds())
    assert g.call(W.XS_WATCH, z("control/shutdown", "tok-sd"), 1).payload == b"OK\0"
    assert g.next() == event("control/shutdown", "tok-sd")
    assert g.call(W.XS_WATCH, z(f"/local/domain/{DOMID}/data", "tok-data"), 2).payload == b"OK\0"
    assert g.next() == event(f"/local/domain/{DOMID}/data", "tok-data")
    assert g.call(W.XS_WRITE, b"data/mine\0g", 3).payload == b"OK\0"
    assert g.next() == event(f"/local/domain/{DOMID}/data/mine", "tok-data")
    tid = int(g.call(W.XS_TRANSACTION_START, b"\0", 4).payload[:-1])
    assert g.call(W.XS_WRITE, b"data/intx\0t", 5, tid).payload == b"OK\0"
    g.send(W.XS_READ, z("data/big"), 10)
    g.send(W.XS_READ, z("data/big"), 11)
    g.write(PARTIAL[:10])
    deadline = time.monotonic() + 5
    while ((g.idx(W.RSP_PROD) - g.idx(W.RSP_CONS)) & M32 != W.RING_SIZE
           or g.idx(W.REQ_CONS) != g.idx(W.REQ_PROD)):
        assert time.monotonic() < deadline, "xenstored did not consume the requests"
        time.sleep(0.005)
    return g, tid


def assert_frozen(g: RingGuest, cl: XenstoreClient) -> tuple[int, int]:
    """The guest writes the rest of its partial request and one more; xenstored (frozen)
    neither consumes nor answers them. Returns the unchanged (req_cons, rsp_prod)."""
    before = g.idx(W.REQ_CONS), g.idx(W.RSP_PROD)
    g.write(PARTIAL[10:] + AFTER)
    cl.read(f"/local/domain/{DOMID}/name")        # a loop iteration after the kick
    time.sleep(0.1)
    assert (g.idx(W.REQ_CONS), g.idx(W.RSP_PROD)) == before
    return before


def copy_page(src_memfd: int) -> int:
    fd = new_memfd()
    os.pwrite(fd, os.pread(src_memfd, 4096, MFN * 4096), MFN * 4096)
    return fd


def read_all(g: RingGuest, n: int) -> list[Message]:
    return [g.next() for _ in range(n)]


# ----------------------------------------------------------------------------- migration

def test_migration_between_two_daemons(hosts):
    a, b = hosts
    ca, cb = a.client(), b.client()
    g, tid = busy_domain(a, ca)
    old_memfd = g.memfd
    doc = ca.export_domain(DOMID, ROOTS + ["/not/there"])

    # the document
    assert (doc["version"], doc["domid"]) == (1, DOMID)
    paths = [n["path"] for n in doc["nodes"]]
    assert paths[0] == ROOTS[0] and len(paths) == len(set(paths))
    for i, p in enumerate(paths):
        assert p.rsplit("/", 1)[0] not in paths[i:], p          # parents first
    assert f"/local/domain/{DOMID}/data/mine" in paths and f"/vm/{UUID}/uuid" in paths
    assert f"/local/domain/{DOMID}/data/intx" not in paths       # uncommitted
    conn = doc["connection"]
    assert conn["watches"] == [["control/shutdown", base64.b64encode(b"tok-sd").decode()],
                               [f"/local/domain/{DOMID}/data",
                                base64.b64encode(b"tok-data").decode()]]
    assert conn["transactions"] == [tid]
    assert base64.b64decode(conn["input"]) == PARTIAL[:10]
    unread = pack(EXPECTED_REPLIES[0]) + pack(EXPECTED_REPLIES[1])
    assert base64.b64decode(conn["output"]) == unread[W.RING_SIZE:]

    # A stops serving the guest
    assert_frozen(g, ca)

    # the move: page copied, document imported, ring introduced on B
    g.close()
    g.attach(copy_page(old_memfd))
    cb.import_domain(DOMID, json.loads(json.dumps(doc)))
    for n in doc["nodes"]:
        p = n["path"]
        assert cb.read(p) == ca.read(p) == base64.b64decode(n["value"]), p
        assert cb.get_perms(p) == ca.get_perms(p) == n["perms"], p
    assert cb.get_perms(f"/local/domain/{DOMID}/data/mine") == [f"n{DOMID}"]   # guest-owned
    assert not cb.is_introduced(DOMID)
    cb.introduce(DOMID, MFN, 1, fds=g.fds())
    assert cb.is_introduced(DOMID)

    # everything the guest was owed, in order, and no initial watch event again
    assert read_all(g, 4) == EXPECTED_REPLIES
    assert g.quiet() == []

    # the watches are armed on B, reported as registered
    cb.write(f"/local/domain/{DOMID}/control/shutdown", "poweroff")
    assert g.next() == event("control/shutdown", "tok-sd")
    cb.write(f"/local/domain/{DOMID}/data/new", "1")
    assert g.next() == event(f"/local/domain/{DOMID}/data/new", "tok-data")
    assert g.quiet() == []

    # the transaction: usable, but its commit fails so the guest retries it
    assert g.call(W.XS_READ, z("name"), 20, tid).payload == b"mig"
    assert g.call(W.XS_TRANSACTION_END, z("T"), 21, tid) == \
        Message(W.XS_ERROR, 21, tid, b"EAGAIN\0")
    assert g.call(W.XS_TRANSACTION_END, z("T"), 22, tid).payload == b"ENOENT\0"
    new_tid = int(g.call(W.XS_TRANSACTION_START, b"\0", 23).payload[:-1])
    assert g.call(W.XS_WRITE, b"data/intx\0retried", 24, new_tid).payload == b"OK\0"
    assert g.call(W.XS_TRANSACTION_END, z("T"), 25, new_tid).payload == b"OK\0"
    assert g.next() == event(f"/local/domain/{DOMID}/data/intx", "tok-data")
    assert cb.read(f"/local/domain/{DOMID}/data/intx") == b"retried"

    # the guest keeps working on B; A, frozen, saw none of it and releases the domain
    assert g.call(W.XS_WRITE, b"data/after\0x", 26).payload == b"OK\0"
    assert cb.read(f"/local/domain/{DOMID}/data/after") == b"x"
    assert ca.try_read(f"/local/domain/{DOMID}/data/after") is None
    ca.release(DOMID)
    assert a.alive and b.alive
    assert a.daemon.rings == {} and a.daemon.frozen == set()
    assert b.daemon.imported == {}
    g.close()
    os.close(old_memfd)
    os.close(g.memfd)


def test_thaw_serves_what_the_guest_sent_while_frozen(hosts):
    a, _ = hosts
    ca = a.client()
    g, tid = busy_domain(a, ca)
    doc = ca.export_domain(DOMID, ROOTS)
    assert_frozen(g, ca)
    assert ca.export_domain(DOMID, ROOTS) == doc                    # repeatable
    ca.write(f"/local/domain/{DOMID}/control/shutdown", "reboot")     # an event meanwhile
    assert g.quiet() == []                                          # nothing moves
    ca.thaw_domain(DOMID)
    got = read_all(g, 5)
    assert [m for m in got if m.type != W.XS_WATCH_EVENT] == EXPECTED_REPLIES
    assert got[2] == event("control/shutdown", "tok-sd")            # in the order queued
    assert g.quiet() == []
    # a live transaction here, not a doomed one
    assert g.call(W.XS_TRANSACTION_END, z("T"), 30, tid).payload == b"OK\0"
    assert g.next() == event(f"/local/domain/{DOMID}/data/intx", "tok-data")
    assert ca.read(f"/local/domain/{DOMID}/data/intx") == b"t"
    assert a.daemon.frozen == set()
    ca.thaw_domain(DOMID)                                           # idempotent
    g.close()
    os.close(g.memfd)


def test_export_and_import_survive_daemon_restarts(hosts):
    """A restarted while frozen keeps the domain frozen when its VMM re-introduces it; B
    restarted between import and introduce still hands the guest its connection."""
    a, b = hosts
    ca, cb = a.client(), b.client()
    g, tid = busy_domain(a, ca)
    doc = ca.export_domain(DOMID, ROOTS)
    old_memfd = g.memfd
    a.stop()
    a.start()
    ca = a.client()
    ca.introduce(DOMID, MFN, 1, fds=g.fds())                        # the VMM reconnects
    assert_frozen(g, ca)
    cb.import_domain(DOMID, doc)
    b.stop()
    b.start()
    cb = b.client()
    cb.write(f"/local/domain/{DOMID}/data/k", "v")                  # queued for the guest
    g.close()
    g.attach(copy_page(old_memfd))
    cb.introduce(DOMID, MFN, 1, fds=g.fds())
    got = read_all(g, 5)
    assert [m for m in got if m.type != W.XS_WATCH_EVENT] == EXPECTED_REPLIES
    assert got[2] == event(f"/local/domain/{DOMID}/data/k", "tok-data")
    assert g.call(W.XS_TRANSACTION_END, z("T"), 40, tid).payload == b"EAGAIN\0"
    g.close()
    os.close(old_memfd)
    os.close(g.memfd)


# ----------------------------------------------------------------------------- bad input

def ctl_error(cl: XenstoreClient, payload: bytes, fds=()) -> str:
    with pytest.raises(XenstoreError) as e:
        cl.request(W.XS_CONTROL, payload, fds=fds)
    return e.value.name


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("doc", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_export_and_thaw_bad_input(hosts, tmp_path):
    a, _ = hosts
    ca = a.client()
    g, _ = busy_domain(a, ca)
    ro_path = tmp_path / "ro"
    ro_path.write_text("")
    ro = os.open(ro_path, os.O_RDONLY)
    r, w = os.pipe()
    efd = os.eventfd(0)
    good = os.memfd_create("out")
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)       # writes fail after the
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)     # freeze: must thaw again
    before = nfds()
    cases = [
        (z("pyxen-export"), [good], "EINVAL"),                      # no domid
        (z("pyxen-export", "0"), [good], "EINVAL"),                 # dom0
        (z("pyxen-export", "x"), [good], "EINVAL"),
        (z("pyxen-export", "-5"), [good], "EINVAL"),
        (z("pyxen-export", "32752"), [good], "EINVAL"),             # DOMID_FIRST_RESERVED
        (z("pyxen-export", "5\xb2"), [good], "EINVAL"),             # non-ASCII digit
        (z("pyxen-export", "5", *ROOTS), [], "EINVAL"),             # no descriptor
        (z("pyxen-export", "5", *ROOTS), [good, good], "EINVAL"),   # two
        (z("pyxen-export", "5", *ROOTS), [ro], "EINVAL"),           # not writable
        (z("pyxen-export", "5", *ROOTS), [w], "EINVAL"),            # a pipe
        (z("pyxen-export", "5", *ROOTS), [efd], "EINVAL"),          # an eventfd
        (z("pyxen-export", "5", *ROOTS), [sealed], "EINVAL"),       # write fails
        (z("pyxen-export", "5", "local/domain/5"), [good], "EINVAL"),   # relative root
        (z("pyxen-export", "5", "/a//b"), [good], "EINVAL"),
        (z("pyxen-export", "7", *ROOTS), [good], "ENOENT"),         # no ring here
        (z("pyxen-thaw"), [], "EINVAL"),
        (z("pyxen-thaw", "0"), [], "EINVAL"),
        (z("pyxen-thaw", "5", "6"), [], "EINVAL"),
        (z("pyxen-thaw", "7"), [], "ENOENT"),
    ]
    for payload, fds, want in cases:
        assert ctl_error(ca, payload, fds) == want, payload
        assert a.alive
        assert a.daemon.frozen == set() and not a.daemon.rings[DOMID].ring.frozen, payload
    assert os.fstat(good).st_size == 0                              # nothing written
    assert nfds() == before                                         # all received fds closed
    # the ring was never frozen: the guest's replies keep coming
    got = read_all(g, 2)
    assert got == EXPECTED_REPLIES[:2]
    g.write(PARTIAL[10:])
    assert g.next() == EXPECTED_REPLIES[2]
    # other XS_CONTROL payloads are still unsupported
    assert ctl_error(ca, z("pyxen-frobnicate", "5")) == "ENOSYS"
    for fd in (ro, r, w, efd, good, sealed):
        os.close(fd)
    g.close()
    os.close(g.memfd)


def good_document(domid: int = DOMID) -> dict:
    return {"version": 1, "domid": domid,
            "nodes": [{"path": f"/local/domain/{domid}", "value": "", "perms": ["n0", f"r{domid}"]},
                      {"path": f"/local/domain/{domid}/name", "value": "bWln", "perms": ["n0"]}],
            "connection": {"watches": [["name", "dA=="]], "transactions": [4],
                           "output": "", "input": ""}}


def test_import_bad_input_changes_nothing(hosts, tmp_path, monkeypatch):
    _, b = hosts
    cb = b.client()
    wo_path = tmp_path / "wo"
    wo_path.write_text(json.dumps(good_document()))
    wo = os.open(wo_path, os.O_WRONLY)
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    os.write(w, json.dumps(good_document()).encode())

    def doc_with(**changes) -> bytes:
        d = good_document()
        for k, v in changes.items():
            if k.startswith("c_"):
                d["connection"][k[2:]] = v
            else:
                d[k] = v
        return json.dumps(d).encode()

    node = good_document()["nodes"][1]
    bad_docs = [
        b"", b"{", b"\xff\xfe", b"[]", b'"str"', b"[" * 100000 + b"]" * 100000,
        doc_with(version=2), doc_with(domid=6), doc_with(domid="5"),
        doc_with(nodes=[dict(node, value="not base64!")]),
        doc_with(nodes=[dict(node, path="/local//domain")]),
        doc_with(nodes=[dict(node, path="relative")]),
        doc_with(nodes=[dict(node, perms=["q5"])]),
        doc_with(nodes=[dict(node, perms=[])]),
        doc_with(nodes=[node, node]),
        doc_with(c_watches=[["bad//path", "dA=="]]),
        doc_with(c_watches=[["name", "%%"]]),
        doc_with(c_transactions=[0]),
        doc_with(c_output="@@@"),
        doc_with(c_input=base64.b64encode(pack(Message(W.XS_READ, 1, 0, z("x")))).decode()),
    ]
    assert not cb.is_introduced(DOMID)         # a round trip: the daemon accepted us
    before = nfds()
    for data in bad_docs:
        fd = memfd_with(data)
        assert ctl_error(cb, z("pyxen-import", str(DOMID)), [fd]) == "EINVAL", data[:60]
        os.close(fd)
    fd = memfd_with(json.dumps(good_document()).encode())
    for payload, fds, want in [
        (z("pyxen-import"), [fd], "EINVAL"),
        (z("pyxen-import", "0"), [fd], "EINVAL"),
        (z("pyxen-import", "five"), [fd], "EINVAL"),
        (z("pyxen-import", str(DOMID), "extra"), [fd], "EINVAL"),
        (z("pyxen-import", str(DOMID)), [], "EINVAL"),              # no descriptor
        (z("pyxen-import", str(DOMID)), [fd, fd], "EINVAL"),
        (z("pyxen-import", str(DOMID)), [wo], "EINVAL"),            # not readable
        (z("pyxen-import", str(DOMID)), [dirfd], "EINVAL"),         # a directory
        (z("pyxen-import", str(DOMID)), [r], "EINVAL"),             # a pipe
    ]:
        assert ctl_error(cb, payload, fds) == want, (payload, fds)
    monkeypatch.setattr(daemon_mod, "MIGRATION_MAX_BYTES", 64)
    assert ctl_error(cb, z("pyxen-import", str(DOMID)), [fd]) == "E2BIG"
    monkeypatch.undo()
    assert nfds() == before + 1                                     # only our fd is left
    assert b.alive
    assert cb.try_read(f"/local/domain/{DOMID}") is None            # nothing was applied
    assert b.daemon.imported == {}
    # the control: the same descriptor with a good document works
    cb.request(W.XS_CONTROL, z("pyxen-import", str(DOMID)), fds=[fd])
    assert cb.read(f"/local/domain/{DOMID}/name") == b"mig"
    assert list(b.daemon.imported) == [DOMID]
    # importing a domain whose ring this daemon serves is refused
    g = RingGuest(new_memfd())
    cb.introduce(DOMID, MFN, 1, fds=g.fds())
    assert ctl_error(cb, z("pyxen-import", str(DOMID)), [fd]) == "EEXIST"
    assert b.daemon.imported == {}
    for x in (fd, wo, dirfd, r, w):
        os.close(x)
    g.close()
    os.close(g.memfd)
