"""Bad input against the real xenstored daemon (unix socket, in-process thread).

For every kind of abuse -- malformed or oversized headers, overlong paths and values, garbage
payloads, watch storms, event floods to a client that never reads, piles of open
transactions, clients vanishing mid-message -- the offending connection gets the error string
C xenstored would send (or is dropped, where Xen drops), while a second, well-behaved
connection keeps working throughout (reads, writes, its own watch events), the daemon
thread stays alive, data written before is intact, and it is all still there after a restart
from the state file.

Expected values are Xen's (docs/misc/xenstore.txt, xs_wire.h, tools/xenstored). Socket clients
are privileged (dom0): C xenstored applies the watch, transaction, node-size and path-length
quotas to unprivileged domains only, so those quotas are checked with a guest connection
(``server.connect(5)``, what a domain's ring gets) on the running daemon's server.
"""

from __future__ import annotations

import array
import fcntl
import os
import random
import socket
import struct
import termios
import time
from pathlib import Path

import pytest

from pyxen.xenstore import wire as W
from pyxen.xenstore.daemon import XenstoredDaemon
from pyxen.testing.xsdaemon import DaemonThread
from pyxen.testing.xswire import XsWireClient
from pyxen.xenstore.wire import HEADER, Message, pack

OK = b"OK\0"
SEED = {"/seed/a": b"alpha", "/seed/b/c": b"\x00\xff binary\x00", "/seed/perm": b"p"}
SEED_PERMS = ["n0", "r5", "b7"]


def z(*parts: str | bytes) -> bytes:
    return W.join_strings(*parts)


def write_payload(path: str, value: bytes) -> bytes:
    return path.encode() + b"\0" + value


# ----------------------------------------------------------------------------- clients

class XsClient(XsWireClient):
    """The shared raw client plus this file's shorthands."""

    def read(self, path: str) -> bytes:
        return self.ok(W.XS_READ, z(path))

    def write(self, path: str, value: bytes, tx: int = 0) -> None:
        assert self.ok(W.XS_WRITE, write_payload(path, value), tx) == OK


class Guest:
    """An unprivileged connection on the running daemon's server -- what a domU's ring
    backend gets (``XenstoreServer.connect(domid)``) -- driven synchronously."""

    def __init__(self, daemon: XenstoredDaemon, domid: int) -> None:
        self.conn = daemon.server.connect(domid)
        self.req_id = 0

    def call(self, typ: int, payload: bytes, tx: int = 0) -> Message:
        self.req_id += 1
        self.conn.handle(Message(typ, self.req_id, tx, payload))
        out = [m for m in self.conn.outgoing() if m.type != W.XS_WATCH_EVENT]
        assert len(out) == 1 and out[0].req_id == self.req_id, out
        return out[0]

    def result(self, typ: int, payload: bytes, tx: int = 0) -> str:
        """'OK' for success, else the error name."""
        m = self.call(typ, payload, tx)
        return m.payload[:-1].decode() if m.type == W.XS_ERROR else "OK"

    def close(self) -> None:
        self.conn.close()


# ----------------------------------------------------------------------------- the daemon

class Xsd(DaemonThread):
    """The daemon under test, on a thread, with a state file; restartable."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.start()

    def client(self, timeout: float = 10.0) -> XsClient:
        c = XsClient(self.socket_path, timeout)
        self.clients.append(c)
        return c


@pytest.fixture
def xsd(tmp_path):
    d = Xsd(tmp_path)
    d.start()
    yield d
    d.stop()


@pytest.fixture
def good(xsd):
    """The well-behaved connection, with the seed data written through it."""
    g = xsd.client()
    for path, value in SEED.items():
        g.write(path, value)
    assert g.ok(W.XS_SET_PERMS, z("/seed/perm", *SEED_PERMS)) == OK
    return g


def check_seed(c: XsClient) -> None:
    for path, value in SEED.items():
        assert c.read(path) == value, path
    assert W.split_strings(c.ok(W.XS_GET_PERMS, z("/seed/perm"))) == [p.encode() for p in SEED_PERMS]


_roundtrips = iter(range(1 << 30))


def assert_healthy(xsd: Xsd, good: XsClient) -> None:
    """The daemon thread lives; the good connection reads the seed, writes, and sees its own
    watch events; a brand-new connection works too."""
    assert xsd.alive, "the daemon thread died"
    assert good.sync() == []                       # nothing stray queued for it meanwhile
    check_seed(good)
    n = next(_roundtrips)
    base = f"/good/r{n}"
    assert good.ok(W.XS_WATCH, z(base, f"tok{n}")) == OK
    good.write(f"{base}/k", b"v%d" % n)
    assert good.sync() == [(base.encode(), b"tok%d" % n), (f"{base}/k".encode(), b"tok%d" % n)]
    assert good.read(f"{base}/k") == b"v%d" % n
    assert good.ok(W.XS_UNWATCH, z(base, f"tok{n}")) == OK
    fresh = xsd.client()
    check_seed(fresh)


def assert_survives_restart(xsd: Xsd, present: dict[str, bytes] | None = None,
                            absent: list[str] = ()) -> None:
    xsd.restart()
    c = xsd.client()
    check_seed(c)
    for path, value in (present or {}).items():
        assert c.read(path) == value, path
    for path in absent:
        assert c.err(W.XS_READ, z(path)) == "ENOENT", path


# ----------------------------------------------------------------------------- headers

def _random_header_over_limit() -> bytes:
    rnd = random.Random(20240607)
    while True:
        blob = rnd.randbytes(64)
        if HEADER.unpack_from(blob)[3] > W.XENSTORE_PAYLOAD_MAX:
            return blob


OVERSIZED_VALUE = HEADER.pack(W.XS_WRITE, 1, 0, W.XENSTORE_PAYLOAD_MAX + 1) + write_payload(
    "/bad/value", b"v" * (W.XENSTORE_PAYLOAD_MAX - len("/bad/value")))


@pytest.mark.parametrize("blob", [
    pytest.param(HEADER.pack(W.XS_READ, 1, 0, W.XENSTORE_PAYLOAD_MAX + 1) + z("/seed/a")
                 + b"\0" * (W.XENSTORE_PAYLOAD_MAX + 1 - len(z("/seed/a"))), id="len-4097"),
    pytest.param(HEADER.pack(W.XS_READ, 1, 0, 0xFFFFFFFF), id="len-4G"),
    pytest.param(b"\xff" * 16, id="all-ff"),
    pytest.param(_random_header_over_limit(), id="random-garbage"),
    pytest.param(OVERSIZED_VALUE, id="write-value-over-payload-max"),
])
def test_oversized_header_drops_only_that_connection(xsd, good, blob):
    """len > XENSTORE_PAYLOAD_MAX: "its xenstored connection will be immediately killed"
    (xenstore.txt; handle_input -> ignore_connection). No reply, nothing applied."""
    bad = xsd.client()
    assert bad.ok(W.XS_READ, z("/seed/a")) == b"alpha"       # a working connection first
    bad.raw(blob)
    assert bad.expect_closed() == b""
    assert_healthy(xsd, good)
    assert good.err(W.XS_READ, z("/bad/value")) == "ENOENT"
    assert_survives_restart(xsd, absent=["/bad/value"])


def test_payload_exactly_at_the_limit_is_accepted(xsd, good):
    """4096 payload bytes is legal; dom0 has no node-size quota (write_node_raw checks it for
    unprivileged domains only), so the value is stored and read back whole."""
    path = "/lim/v"
    value = bytes(range(256)) * 16
    value = value[:W.XENSTORE_PAYLOAD_MAX - len(path) - 1]
    good.write(path, value)
    assert good.read(path) == value
    long_path = "/lim/" + "p" * (W.XENSTORE_ABS_PATH_MAX - 5)            # 3072 chars
    long_value = b"w" * (W.XENSTORE_PAYLOAD_MAX - len(long_path) - 1)
    good.write(long_path, long_value)
    assert good.read(long_path) == long_value
    assert_healthy(xsd, good)
    assert_survives_restart(xsd, present={path: value, long_path: long_value})


def test_overlong_paths_get_einval_and_the_connection_survives(xsd, good):
    """Paths longer than XENSTORE_ABS_PATH_MAX (3072) are forbidden (xenstore.txt; xs_wire.h:
    "Violating these just gets you an error back") -- EINVAL, connection kept."""
    bad = xsd.client()
    at_limit = "/long/" + "x" * (W.XENSTORE_ABS_PATH_MAX - 6)
    over = at_limit + "y"
    assert len(at_limit) == W.XENSTORE_ABS_PATH_MAX and len(over) == W.XENSTORE_ABS_PATH_MAX + 1
    requests = [(W.XS_READ, z(over)), (W.XS_WRITE, write_payload(over, b"v")),
                (W.XS_MKDIR, z(over)), (W.XS_RM, z(over)), (W.XS_DIRECTORY, z(over)),
                (W.XS_GET_PERMS, z(over)), (W.XS_SET_PERMS, z(over, "n0")),
                (W.XS_WATCH, z(over, "t")), (W.XS_UNWATCH, z(over, "t"))]
    for typ, payload in requests:
        assert bad.err(typ, payload) == "EINVAL", W.TYPE_NAMES[typ]
        assert bad.read("/seed/a") == b"alpha"
    # the limit itself is fine, watches included
    assert bad.ok(W.XS_WATCH, z(at_limit, "t")) == OK
    bad.write(at_limit, b"edge")
    assert bad.sync() == [(at_limit.encode(), b"t")] * 2     # initial event + the write
    assert good.read(at_limit) == b"edge"
    assert good.read("/long") == b""
    assert_healthy(xsd, good)
    assert_survives_restart(xsd, present={at_limit: b"edge"})


# ----------------------------------------------------------------------------- payloads

BOGUS_TX = 0xDEADBEEF


@pytest.mark.parametrize("typ,payload,tx,expected", [
    pytest.param(W.XS_READ, b"", 0, "EINVAL", id="read-empty"),
    pytest.param(W.XS_READ, b"/seed/a", 0, "EINVAL", id="read-no-nul"),
    pytest.param(W.XS_READ, z("/seed/a", "/seed/b"), 0, "EINVAL", id="read-two-args"),
    pytest.param(W.XS_READ, z("/seed//a"), 0, "EINVAL", id="read-double-slash"),
    pytest.param(W.XS_READ, z("/seed/a/"), 0, "EINVAL", id="read-trailing-slash"),
    pytest.param(W.XS_READ, b"/seed/\xc3\xa4\0", 0, "EINVAL", id="read-non-ascii"),
    pytest.param(W.XS_READ, z("/seed/a b"), 0, "EINVAL", id="read-space"),
    pytest.param(W.XS_WRITE, b"/seed/zz", 0, "EINVAL", id="write-no-nul"),
    pytest.param(W.XS_WRITE, write_payload("/seed/new//x", b"v"), 0, "EINVAL",
                 id="write-double-slash"),
    pytest.param(W.XS_RM, z("/"), 0, "EINVAL", id="rm-root"),
    pytest.param(W.XS_WATCH, z("/seed/a"), 0, "EINVAL", id="watch-no-token"),
    pytest.param(W.XS_UNWATCH, z("/seed/a"), 0, "EINVAL", id="unwatch-no-token"),
    pytest.param(W.XS_SET_PERMS, z("/seed/a"), 0, "EINVAL", id="set-perms-no-perms"),
    pytest.param(W.XS_SET_PERMS, z("/seed/a", "x1"), 0, "EINVAL", id="set-perms-bad-kind"),
    pytest.param(W.XS_DIRECTORY_PART, z("/seed"), 0, "EINVAL", id="directory-part-no-offset"),
    pytest.param(W.XS_GET_PERMS, z("@bogusSpecial"), 0, "ENOENT", id="get-perms-bad-special"),
    pytest.param(W.XS_READ, z("/seed/a"), BOGUS_TX, "ENOENT", id="read-unknown-tx"),
    pytest.param(W.XS_WRITE, write_payload("/seed/zz", b"v"), BOGUS_TX, "ENOENT",
                 id="write-unknown-tx"),
    pytest.param(W.XS_TRANSACTION_END, z("T"), 0, "ENOENT", id="end-without-tx"),
    pytest.param(W.XS_TRANSACTION_END, z("Q"), 0, "EINVAL", id="end-bad-arg-without-tx"),
    pytest.param(W.XS_TRANSACTION_START, z(""), BOGUS_TX, "ENOENT", id="start-unknown-tx"),
    pytest.param(0x7777, z("/seed/a"), 0, "ENOSYS", id="unknown-type"),
    pytest.param(20, z(""), 0, "ENOSYS", id="removed-XS_RESTRICT"),
    pytest.param(W.XS_INVALID, b"", 0, "ENOSYS", id="XS_INVALID"),
    pytest.param(W.XS_WATCH_EVENT, z("/seed/a", "t"), 0, "ENOSYS", id="watch-event-as-request"),
    pytest.param(W.XS_ERROR, z("EINVAL"), 0, "ENOSYS", id="error-as-request"),
])
def test_malformed_request_gets_the_xen_error_and_the_connection_survives(
        xsd, good, typ, payload, tx, expected):
    bad = xsd.client()
    assert bad.err(typ, payload, tx) == expected
    assert bad.read("/seed/a") == b"alpha"                  # same connection, still served
    assert good.err(W.XS_READ, z("/seed/zz")) == "ENOENT"   # nothing was written
    assert_healthy(xsd, good)


def test_valid_request_before_a_bad_header_in_the_same_write_is_still_processed(xsd, good):
    """C xenstored handles one message at a time and drops the connection only at the bad
    header, so a complete request sent in the same write() before it is still applied."""
    bad = xsd.client()
    bad.raw(pack(Message(W.XS_WRITE, 1, 0, write_payload("/pipelined", b"yes")))
            + HEADER.pack(W.XS_READ, 2, 0, W.XENSTORE_PAYLOAD_MAX + 1))
    bad.expect_closed()
    assert_healthy(xsd, good)
    assert good.read("/pipelined") == b"yes"


def test_directory_reply_over_payload_max_is_e2big_and_directory_part_works(xsd, good):
    """A reply longer than 4096 bytes is E2BIG (send_reply); the connection stays, and
    DIRECTORY_PART pages through the children."""
    names = [f"{i}" + "c" * 2500 for i in range(2)]
    for n in names:
        good.write(f"/big/{n}", b"")
    assert good.err(W.XS_DIRECTORY, z("/big")) == "E2BIG"
    got, offset = [], 0
    while True:
        part = good.ok(W.XS_DIRECTORY_PART, z("/big", str(offset)))
        strings = W.split_strings(part)
        children = [s for s in strings[1:] if s]
        got += children
        offset += sum(len(c) + 1 for c in children)
        if part.endswith(b"\0\0") or not children:
            break
    assert [c.decode() for c in got] == names
    assert_healthy(xsd, good)


def test_overlong_watch_event_is_dropped_not_fatal(xsd, good):
    """An event longer than XENSTORE_PAYLOAD_MAX is not sent (send_event: "Don't try to send
    over-long events"); the watcher's connection and later events are unaffected."""
    watcher = xsd.client()
    token = "T" * 1100
    assert watcher.ok(W.XS_WATCH, z("/ow", token)) == OK
    long_path = "/ow/" + "p" * 3000
    good.write(long_path, b"x")                     # event would be 3005 + 1101 bytes
    good.write("/ow/short", b"y")
    assert watcher.sync() == [(b"/ow", token.encode()), (b"/ow/short", token.encode())]
    assert_healthy(xsd, good)


def _send_with_fds(c: XsClient, data: bytes, fds: list[int]) -> None:
    c.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _wait_consumed(c: XsClient, timeout: float = 5.0) -> None:
    """Until the daemon has read everything we sent (SIOCOUTQ of a unix socket: bytes the
    peer has not received yet)."""
    deadline = time.monotonic() + timeout
    while struct.unpack("i", fcntl.ioctl(c.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
        assert time.monotonic() < deadline, "the daemon does not read"
        time.sleep(0.001)


def _ring_features(memfd: int, mfn: int) -> int:
    """The store page's server_features word, which the daemon sets when it maps the ring."""
    return struct.unpack("<I", os.pread(memfd, 4, mfn * 4096 + W.SERVER_FEATURES))[0]


def test_introduce_with_unusable_descriptors_is_einval_and_leaks_nothing(xsd, good):
    """pyxen's guest-ring INTRODUCE carries (memfd, kick eventfd, notify eventfd) by
    SCM_RIGHTS. Unusable ones get EINVAL (as C xenstored's do_introduce when it cannot map
    the interface), the domain stays unintroduced, and every received descriptor is closed --
    also those attached to a request that is not an INTRODUCE. A usable set (the control)
    maps the page, and RELEASE gives everything back."""
    bad = xsd.client()
    assert bad.read("/seed/a") == b"alpha"            # accepted: the daemon's end is open
    fds_before = len(os.listdir("/proc/self/fd"))
    efd = os.eventfd(0)
    memfd = os.memfd_create("xs-bad-input")           # 0 bytes: no page 0, let alone 5
    cases = [([efd], z("7", "0", "1")),                # one descriptor instead of three
             ([memfd, efd, efd], z("7", "5", "1")),    # mfn beyond the memory file
             ([memfd, efd, efd], z("7", "0", "1")),    # page 0 beyond it as well
             ([memfd, efd, efd], z("0", "0", "1")),    # dom0
             ([memfd, efd, efd], z("7", "x", "1"))]    # mfn not a number
    for i, (fds, payload) in enumerate(cases):
        _send_with_fds(bad, pack(Message(W.XS_INTRODUCE, 500 + i, 0, payload)), fds)
        r = bad.reply(500 + i)
        assert (r.type, r.payload) == (W.XS_ERROR, b"EINVAL\0"), (payload, r)
        assert good.ok(W.XS_IS_DOMAIN_INTRODUCED, z("7")) == b"F\0"
    _send_with_fds(bad, pack(Message(W.XS_READ, 600, 0, z("/seed/a"))), [efd])
    assert bad.reply(600).payload == b"alpha"
    # control: a usable set is mapped (features word stamped), RELEASE unmaps and closes
    os.ftruncate(memfd, 2 * 4096)
    efd2 = os.eventfd(0)
    _send_with_fds(bad, pack(Message(W.XS_INTRODUCE, 700, 0, z("8", "1", "1"))),
                   [memfd, efd, efd2])
    assert bad.reply(700).payload == OK
    assert _ring_features(memfd, 1) != 0
    assert good.ok(W.XS_RELEASE, z("8")) == OK
    for fd in (efd, efd2, memfd):
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert_healthy(xsd, good)


def test_introduce_descriptors_arriving_with_a_partial_message_are_not_lost(xsd, good):
    """Descriptors come with the first bytes of the INTRODUCE they belong to; they must be
    kept until that message is complete -- never an OK for a domain whose ring is not
    mapped (the VMM would believe its guest's store is served)."""
    bad = xsd.client()
    efd, efd2 = os.eventfd(0), os.eventfd(0)
    memfd = os.memfd_create("xs-split-introduce")
    os.ftruncate(memfd, 2 * 4096)
    try:
        msg = pack(Message(W.XS_INTRODUCE, 1, 0, z("7", "1", "1")))
        _send_with_fds(bad, msg[:10], [memfd, efd, efd2])
        _wait_consumed(bad)                             # the daemon has read the first part
        bad.raw(msg[10:])
        r = bad.reply(1)
        assert_healthy(xsd, good)
        # either refused, or really served: never OK without a ring
        assert r.type == W.XS_ERROR or _ring_features(memfd, 1) != 0, r
    finally:
        for fd in (efd, efd2, memfd):
            os.close(fd)


# ----------------------------------------------------------------------------- disconnects

def _write_msg(path: str, value: bytes, req_id: int = 1) -> bytes:
    return pack(Message(W.XS_WRITE, req_id, 0, write_payload(path, value)))


@pytest.mark.parametrize("variant", ["partial-header", "partial-payload", "complete-then-partial",
                                     "open-transaction", "unread-output", "half-close"])
def test_client_disconnecting_mid_message(xsd, good, variant):
    """Whatever a client leaves half-done when it goes away is discarded; what it completed
    stays; nobody else notices."""
    bad = xsd.client()
    present: dict[str, bytes] = {}
    absent = ["/dc/partial", "/dc/tx"]
    if variant == "partial-header":
        bad.raw(_write_msg("/dc/partial", b"v")[:7])
    elif variant == "partial-payload":
        msg = _write_msg("/dc/partial", b"v" * 100)
        bad.raw(msg[:W.HEADER_SIZE + 30])
    elif variant == "complete-then-partial":
        bad.raw(_write_msg("/dc/complete", b"done") + _write_msg("/dc/partial", b"v", 2)[:20])
        assert bad.reply(1).payload == OK
        present["/dc/complete"] = b"done"
    elif variant == "open-transaction":
        tid = int(bad.ok(W.XS_TRANSACTION_START, z(""))[:-1])
        bad.write("/dc/tx", b"uncommitted", tx=tid)
        bad.write("/dc/tx2", b"uncommitted", tx=tid)
        absent.append("/dc/tx2")
    elif variant == "unread-output":
        big = b"B" * 4000
        good.write("/dc/big", big)
        assert bad.ok(W.XS_WATCH, z("/", "everything")) == OK
        # ~800 KiB of replies, more than a socket buffer holds, that nobody will read ...
        bad.raw(b"".join(pack(Message(W.XS_READ, 100 + i, 0, z("/dc/big"))) for i in range(200)))
        for i in range(50):                         # ... plus watch events behind them
            good.write(f"/dc/out{i}", b"x" * 100)
        present.update({"/dc/big": big, "/dc/out49": b"x" * 100})
    elif variant == "half-close":
        bad.raw(_write_msg("/dc/half", b"h"))
        bad.sock.shutdown(socket.SHUT_WR)
        assert bad.reply(1).payload == OK          # the answer still arrives ...
        assert bad.expect_closed() == b""          # ... then the daemon hangs up
        present["/dc/half"] = b"h"
    bad.close()
    assert_healthy(xsd, good)
    for path, value in present.items():
        assert good.read(path) == value
    for path in absent:
        assert good.err(W.XS_READ, z(path)) == "ENOENT", path
    assert_survives_restart(xsd, present=present, absent=absent)


def test_slow_partial_header_does_not_block_other_connections(xsd, good):
    slow = xsd.client()
    msg = pack(Message(W.XS_READ, 1, 0, z("/seed/a")))
    slow.raw(msg[:5])
    for i in range(20):
        good.write(f"/slow/{i}", b"%d" % i)
        assert good.read(f"/slow/{i}") == b"%d" % i
    slow.raw(msg[5:12])
    assert_healthy(xsd, good)
    slow.raw(msg[12:])
    assert slow.reply(1).payload == b"alpha"


# ----------------------------------------------------------------------------- watch storms

def test_dom0_watch_storm_has_no_quota_and_leaves_others_alone(xsd, good):
    """C xenstored exempts privileged connections from the watch quota (domain_watch() is 0
    for them): 1000 watches on one socket all succeed, each with its initial event."""
    storm = xsd.client()
    n = 1000
    paths = [f"/storm/w{i}" for i in range(n)]
    for lo in range(0, n, 250):                     # pipelined, 250 requests per write
        storm.raw(b"".join(pack(Message(W.XS_WATCH, 10_000 + i, 0, z(paths[i], f"k{i}")))
                           for i in range(lo, min(lo + 250, n))))
        for i in range(lo, min(lo + 250, n)):
            assert storm.reply(10_000 + i).payload == OK
        check_seed(good)                            # the good connection is served meanwhile
    storm.req_id = 10_000 + n
    assert sorted(storm.sync()) == sorted((p.encode(), b"k%d" % i) for i, p in enumerate(paths))
    assert storm.ok(W.XS_WATCH, z("/storm", "root")) == OK
    good.write("/storm/w7/x", b"1")
    assert sorted(storm.sync()) == sorted([(b"/storm", b"root"), (b"/storm/w7/x", b"k7"),
                                           (b"/storm/w7/x", b"root")])
    for i, p in enumerate(paths):
        assert storm.ok(W.XS_UNWATCH, z(p, f"k{i}")) == OK
    good.write("/storm/w8/x", b"1")
    assert storm.sync() == [(b"/storm/w8/x", b"root")]
    assert_healthy(xsd, good)
    assert_survives_restart(xsd, present={"/storm/w7/x": b"1"})


def _domu_results(xsd: Xsd, typ: int, payloads: list[bytes]) -> list[str]:
    guest = Guest(xsd.daemon, 5)
    try:
        return [guest.result(typ, p) for p in payloads]
    finally:
        guest.close()


def test_domu_watch_quota_is_e2big_and_others_unaffected(xsd, good):
    """Unprivileged domains get E2BIG past the watch quota (default 128, -W)."""
    results = _domu_results(xsd, W.XS_WATCH,
                            [z(f"/local/domain/5/w{i}", "t") for i in range(140)])
    assert results[:128] == ["OK"] * 128
    assert results[128] in ("OK", "E2BIG") and results[129:] == ["E2BIG"] * 11
    assert_healthy(xsd, good)


def test_domu_watch_quota_boundary_matches_c_xenstored(xsd, good):
    """do_watch refuses only when the domain already has MORE than quota watches
    (domain_watch(conn) > hard_quotas[ACC_WATCH].val): 129 with the default 128."""
    results = _domu_results(xsd, W.XS_WATCH,
                            [z(f"/local/domain/5/w{i}", "t") for i in range(130)])
    assert results == ["OK"] * 129 + ["E2BIG"]


def test_event_flood_to_a_client_that_never_reads(xsd, good):
    """A watcher that stops reading while others generate far more event bytes than a socket
    buffer holds: the daemon neither blocks nor drops anyone; the good connection stays
    responsive; when the watcher finally reads, every (distinct) event is there, in order.
    (dom0 connections have no memory quota in C xenstored, so nothing may be lost.)"""
    flooder = xsd.client()
    token = "F" * 1000
    assert flooder.ok(W.XS_WATCH, z("/flood", token)) == OK
    writer = xsd.client()
    assert good.ok(W.XS_WATCH, z("/goodw", "g")) == OK
    assert good.sync() == [(b"/goodw", b"g")]
    sndbuf = int(Path("/proc/sys/net/core/wmem_default").read_text())
    event_size = 4000
    n = max(150, 3 * sndbuf // event_size)
    paths = [f"/flood/{i:05d}" + "q" * (event_size - len(token) - 30) for i in range(n)]
    for i, p in enumerate(paths):
        writer.write(p, b"")
        if i % 10 == 0:
            t0 = time.monotonic()
            good.write(f"/goodw/{i}", b"g")
            assert good.sync() == [(f"/goodw/{i}".encode(), b"g")]
            assert time.monotonic() - t0 < 5
    assert n * event_size > 2 * sndbuf
    assert_healthy(xsd, good)
    events = flooder.sync()
    assert events == [(b"/flood", token.encode())] + [(p.encode(), token.encode()) for p in paths]
    assert_survives_restart(xsd, present={paths[-1]: b""})


def test_identical_events_to_a_stalled_client_are_coalesced(xsd, good):
    """C xenstored's send_event drops a watch event identical to one still pending in the
    connection's output queue: a client that stops reading collects, besides what the
    socket buffer already holds, one copy -- not one per write."""
    stalled = xsd.client()
    token = "S" * 1000
    path = "/same/" + "s" * 2900
    assert stalled.ok(W.XS_WATCH, z("/same", token)) == OK
    sndbuf = int(Path("/proc/sys/net/core/wmem_default").read_text())
    n = max(200, 4 * sndbuf // 3900)                # far more than the socket buffer holds
    for i in range(n):
        good.write(path, b"%d" % i)
    assert_healthy(xsd, good)
    events = stalled.sync()
    assert events[0] == (b"/same", token.encode())
    assert set(events[1:]) == {(path.encode(), token.encode())}
    assert len(events) - 1 < n // 2


# ----------------------------------------------------------------------------- transactions

def test_dom0_open_transactions_have_no_quota_and_die_with_the_connection(xsd, good):
    """C xenstored exempts privileged connections from the transaction quota
    (domain_transaction_get() is 0 for them): 200 open transactions on one socket all start;
    they do not block anybody; conflicts are detected per node; closing the socket discards
    the rest without a trace."""
    hog = xsd.client()
    n = 200
    hog.raw(b"".join(pack(Message(W.XS_TRANSACTION_START, 1000 + i, 0, z(""))) for i in range(n)))
    tids = []
    for i in range(n):
        r = hog.reply(1000 + i)
        assert r.type == W.XS_TRANSACTION_START, r
        tids.append(int(r.payload[:-1]))
    assert len(set(tids)) == n
    hog.raw(b"".join(pack(Message(W.XS_WRITE, 5000 + i, tid, write_payload(f"/txjunk/{i}", b"j")))
                     for i, tid in enumerate(tids)))
    for i in range(n):
        assert hog.reply(5000 + i).payload == OK
    hog.req_id = 10_000
    # isolation: nothing is visible outside; the good connection writes freely meanwhile
    assert good.err(W.XS_READ, z("/txjunk")) == "ENOENT"
    good.write("/newtop", b"")                          # changes "/", which every tx walked
    assert hog.err(W.XS_TRANSACTION_END, z("T"), tids[0]) == "EAGAIN"
    assert hog.ok(W.XS_TRANSACTION_END, z("F"), tids[1]) == OK
    assert hog.err(W.XS_TRANSACTION_END, z("T"), tids[1]) == "ENOENT"   # gone after END
    # a transaction that only touched /newtop survives an unrelated change at the top
    late = int(hog.ok(W.XS_TRANSACTION_START, z(""))[:-1])
    hog.write("/newtop/x", b"committed", tx=late)
    good.write("/othertop", b"")
    assert hog.ok(W.XS_TRANSACTION_END, z("T"), late) == OK
    assert good.read("/newtop/x") == b"committed"
    hog.close()
    assert_healthy(xsd, good)
    assert good.err(W.XS_READ, z("/txjunk")) == "ENOENT"
    assert_survives_restart(xsd, present={"/newtop/x": b"committed"}, absent=["/txjunk"])


def test_domu_transaction_quota_is_enospc_and_others_unaffected(xsd, good):
    """Unprivileged domains get ENOSPC past the transaction quota (default 10, -t)."""
    results = _domu_results(xsd, W.XS_TRANSACTION_START, [z("")] * 15)
    assert results[:10] == ["OK"] * 10
    assert results[10] in ("OK", "ENOSPC") and results[11:] == ["ENOSPC"] * 4
    assert_healthy(xsd, good)


def test_domu_transaction_quota_boundary_matches_c_xenstored(xsd, good):
    """do_transaction_start refuses only when MORE than quota transactions are open
    (domain_transaction_get(conn) > hard_quotas[ACC_TRANS].val): 11 with the default 10."""
    results = _domu_results(xsd, W.XS_TRANSACTION_START, [z("")] * 12)
    assert results == ["OK"] * 11 + ["ENOSPC"]
