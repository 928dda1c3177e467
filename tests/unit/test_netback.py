"""pyxen.backends.netback end to end without KVM or /dev/net/tun: a XenDomain over fake-engine
guest memory with its grant table and event channels, an in-process xenstore (LocalBus), a
FakeTap standing in for the host TAP, and a Python netfront (pyxen.testing.netfront) driving
the TX and RX rings."""

from __future__ import annotations

import errno
import logging
import random
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

from pyxen.backends import netif as N
from pyxen.backends.guestio import DomainGuestAccess
from pyxen.backends.netback import NetBackend
from pyxen.backends.xenbus import (CLOSED, CLOSING, CONNECTED, INITIALISED, INITIALISING,
                                   INITWAIT, LocalBus)
from pyxen.core.memory import PAGE
from pyxen.host.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
                            VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
                            VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
                            VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VNET_HDR_LEN,
                            VnetHdr, pack_vnet_hdr)
from pyxen.testing.blkfront import GNT_WINDOW, FakeGuest, poll
from pyxen.testing.netfront import FakeNetfront, FakeTap, create_vif_nodes
from pyxen.xen.abi import xen as X
from pyxen.xen.evtchn import INTERDOMAIN, UNBOUND
from pyxen.xenstore.server import XenstoreServer

DOMID = 5
DEVID = 0
OK, ERR, NULL = N.NETIF_RSP_OKAY, N.NETIF_RSP_ERROR, N.NETIF_RSP_NULL
ALL_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
RX_MIN = 18            # buffers netback wants posted before it reads a frame (largest GSO)


# --- failures on other threads --------------------------------------------------------------

class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_thread_failures():
    """No exception may escape a thread (the data path, the xenbus dispatcher) and nothing
    may be logged as an error ("xenbus: backend callback failed")."""
    escaped = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: escaped.append(args)
    handler = _Errors()
    logging.getLogger("pyxen").addHandler(handler)
    yield escaped
    threading.excepthook = old_hook
    logging.getLogger("pyxen").removeHandler(handler)
    assert not escaped, [f"{a.thread}: {a.exc_type.__name__}: {a.exc_value}" for a in escaped]
    assert not handler.records, [r.getMessage() for r in handler.records]


# --- frames ---------------------------------------------------------------------------------

MAC_G, MAC_H = bytes.fromhex("00163e000001"), bytes.fromhex("feffffffffff")
V4_G, V4_H = bytes([10, 88, 0, 2]), bytes([10, 88, 0, 1])
V6_G = bytes.fromhex("fd00000000000000000000000000000a")
V6_H = bytes.fromhex("fd00000000000000000000000000000b")


def ones(data: bytes) -> int:
    """Folded ones'-complement sum of big-endian 16-bit words (RFC 1071, not complemented)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def tcp_segment(data: bytes, pseudo: bytes, *, check: str = "full") -> bytes:
    """TCP header (20 bytes) + data; ``check``: 'full' (valid), 'seed' (pseudo-header sum
    only, what CHECKSUM_PARTIAL carries) or 'zero'."""
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, 1, 2, 5 << 4, 0x18, 65535, 0, 0)
                    + data)
    if check == "full":
        seg[16:18] = struct.pack("!H", ~ones(pseudo + bytes(seg)) & 0xFFFF)
    elif check == "seed":
        seg[16:18] = struct.pack("!H", ones(pseudo))
    return bytes(seg)


def tcp4(n: int, seed: int = 0, check: str = "full") -> bytes:
    """An Ethernet/IPv4/TCP frame with ``n`` bytes of TCP payload (headers: 54 bytes)."""
    data = payload(n, seed)
    seg_len = 20 + n
    pseudo = V4_G + V4_H + bytes([0, 6]) + struct.pack("!H", seg_len)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + seg_len, 1, 0x4000, 64, 6, 0,
                               V4_G, V4_H))
    ip[10:12] = struct.pack("!H", ~ones(bytes(ip)) & 0xFFFF)
    return MAC_H + MAC_G + b"\x08\x00" + bytes(ip) + tcp_segment(data, pseudo, check=check)


def tcp6(n: int, seed: int = 0, check: str = "full") -> bytes:
    """Ethernet/IPv6/TCP (headers: 74 bytes)."""
    data = payload(n, seed)
    seg_len = 20 + n
    pseudo = V6_G + V6_H + struct.pack("!I", seg_len) + bytes([0, 0, 0, 6])
    ip = struct.pack("!IHBB16s16s", 6 << 28, seg_len, 6, 64, V6_G, V6_H)
    return MAC_H + MAC_G + b"\x86\xdd" + ip + tcp_segment(data, pseudo, check=check)


def udp4(n: int, seed: int = 0) -> bytes:
    data = payload(n, seed)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + n, 1, 0x4000, 64, 17, 0,
                               V4_G, V4_H))
    ip[10:12] = struct.pack("!H", ~ones(bytes(ip)) & 0xFFFF)
    return MAC_H + MAC_G + b"\x08\x00" + bytes(ip) + struct.pack("!HHHH", 5000, 53, 8 + n,
                                                                 0) + data


def tcp4_seed(frame: bytes) -> int:
    """The pseudo-header sum netback's checksum fixup writes into a TCPv4 frame."""
    seg_len = len(frame) - 34
    return ones(frame[26:30] + frame[30:34] + bytes([0, 6]) + struct.pack("!H", seg_len))


# --- the rig --------------------------------------------------------------------------------

class Rig:
    """Guest + xenstore + bus + FakeTap + started NetBackend (backend in InitWait)."""

    def __init__(self, *, rate=None, ram=4 << 20):
        self.guest = FakeGuest(DOMID, ram)
        self.server = XenstoreServer()
        self.bus = LocalBus(self.server)
        create_vif_nodes(self.server, DOMID, DEVID)
        self.tap = FakeTap(f"vif{DOMID}.{DEVID}")
        self.be = NetBackend(self.bus, DomainGuestAccess(self.guest.xd), DEVID, self.tap,
                             rate=rate)
        self.be.start()
        self.fronts: list[FakeNetfront] = []
        assert self.wait(lambda: self.be_key("state") == str(INITWAIT))

    def be_key(self, key):
        try:
            return self.server.read(f"{self.be.be}/{key}").decode()
        except Exception:
            return None

    wait = staticmethod(poll)

    def front(self, connect=True, **kw) -> FakeNetfront:
        f = FakeNetfront(self.guest, self.server, DEVID, **kw)
        self.fronts.append(f)
        if connect:
            f.connect()
        return f

    def thread(self):
        return self.be._thread

    def close(self):
        self.be.stop()
        self.bus.close()
        self.guest.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def vnet(frame: bytes) -> VnetHdr:
    return FakeTap.split(frame)[0]


def unbound_for_dom0(rig, port):
    st_ = rig.guest.xd.evtchn.status(X.DOMID_SELF, port)
    return st_[0] == UNBOUND and st_[2][:2] == b"\0\0"


# --- handshake --------------------------------------------------------------------------------

def test_probe_keys_and_connect(rig):
    k = rig.be_key
    for key, val in [("feature-sg", "1"), ("feature-gso-tcpv4", "1"),
                     ("feature-gso-tcpv6", "1"), ("feature-ipv6-csum-offload", "1"),
                     ("feature-rx-copy", "1"), ("feature-rx-flip", "0"),
                     ("feature-multicast-control", "1"),
                     ("feature-split-event-channels", "1"), ("multi-queue-max-queues", "1")]:
        assert k(key) == val, key
    assert k("state") == str(INITWAIT) and rig.tap.offloads == []
    f = rig.front()
    assert f.backend_state() == CONNECTED and rig.be.state == CONNECTED
    assert rig.tap.offloads == [ALL_OFFLOADS]
    assert rig.guest.xd.evtchn.status(X.DOMID_SELF, f.tx_port)[0] == INTERDOMAIN
    assert rig.thread().is_alive()
    info = rig.be.info()
    assert info["state"] == CONNECTED and info["tap"] == "vif5.0"
    assert info["frontend_state"] == CONNECTED


def test_connect_from_initialised(rig):
    f = rig.front(connect=False)
    f.connect(state=INITIALISED)
    assert f.backend_state() == CONNECTED
    f.send(tcp4(10))
    assert f.wait_tx(1) == [(0, OK)]


@pytest.mark.parametrize("features, offload", [
    ({}, ALL_OFFLOADS),
    ({"feature-no-csum-offload": "1"}, 0),
    ({"feature-gso-tcpv4": None, "feature-gso-tcpv6": None}, TUN_F_CSUM),
    ({"feature-gso-tcpv6": None}, TUN_F_CSUM | TUN_F_TSO4),
    ({"feature-ipv6-csum-offload": None}, TUN_F_CSUM | TUN_F_TSO4),   # TSO6 needs v6 csum
    ({"feature-gso-tcpv4": None}, TUN_F_CSUM | TUN_F_TSO6),
    ({"feature-no-csum-offload": "0"}, ALL_OFFLOADS),
], ids=["all", "no-csum", "no-gso", "tso4-only", "no-v6-csum", "tso6-only", "csum-0"])
def test_offloads_follow_frontend_features(rig, features, offload):
    rig.front(features=features)
    assert rig.tap.offloads == [offload]


def test_no_sg_frontend_gets_no_tso(rig):
    rig.front(features={"feature-sg": None})
    assert rig.tap.offloads == [TUN_F_CSUM]


def test_split_event_channels(rig):
    f = rig.front(split=True)
    ev = rig.guest.xd.evtchn
    assert f.tx_port != f.rx_port
    assert ev.status(X.DOMID_SELF, f.tx_port)[0] == INTERDOMAIN
    assert ev.status(X.DOMID_SELF, f.rx_port)[0] == INTERDOMAIN
    f.post_rx(RX_MIN + 2)
    rig.guest.xd.clear_port_bits(f.rx_port)
    rig.guest.xd.clear_port_bits(f.tx_port)
    frame = tcp4(100)
    rig.tap.inject_frame(frame)
    (pkt,) = f.wait_rx(1)
    assert pkt.data == frame
    assert rig.wait(lambda: ev.is_pending(f.rx_port))
    assert not ev.is_pending(f.tx_port)
    f.send(tcp4(20, seed=1))
    assert f.wait_tx(1) == [(0, OK)]
    assert rig.wait(lambda: ev.is_pending(f.tx_port))
    assert rig.tap.wait_sent(1)[0][VNET_HDR_LEN:] == tcp4(20, seed=1)


@pytest.mark.parametrize("breakage", [
    "rx-flip", "no-rx-copy-key", "queues", "tx-ring-ref", "rx-ring-ref", "ro-ring",
    "other-dom-ring", "xenpage-ring", "no-event-channel", "port-not-for-dom0",
    "split-rx-missing", "garbage-number"])
def test_connect_refused(rig, breakage):
    f = rig.front(connect=False, split=breakage == "split-rx-missing")
    f.setup_rings()
    f.write_keys()
    if breakage == "rx-flip":
        f.fe_write("request-rx-copy", "0")
    elif breakage == "no-rx-copy-key":
        f.fe_rm("request-rx-copy")
    elif breakage == "queues":
        f.fe_write("multi-queue-num-queues", "2")
    elif breakage == "tx-ring-ref":
        f.fe_write("tx-ring-ref", "4000")
    elif breakage == "rx-ring-ref":
        f.fe_write("rx-ring-ref", "300")                # an unused (invalid) entry
    elif breakage == "ro-ring":
        rig.guest.grant(f.rx.gfn, readonly=True, ref=f.rx.ref)
    elif breakage == "other-dom-ring":
        rig.guest.grant(f.tx.gfn, domid=1, ref=f.tx.ref)
    elif breakage == "xenpage-ring":
        rig.guest.grant(GNT_WINDOW, ref=f.tx.ref)
    elif breakage == "no-event-channel":
        f.fe_rm("event-channel")
    elif breakage == "port-not-for-dom0":
        p = rig.guest.xd.evtchn.alloc_unbound(X.DOMID_SELF, X.DOMID_SELF)
        f.fe_write("event-channel", str(p))
    elif breakage == "split-rx-missing":
        f.fe_rm("event-channel-rx")
    elif breakage == "garbage-number":
        f.fe_write("tx-ring-ref", "eight")
    f.set_state(CONNECTED)
    assert f.wait_backend(CLOSING)
    assert rig.be_key("error")
    assert not rig.be.connected and rig.thread() is None
    for port in {f.tx_port, f.rx_port}:
        assert unbound_for_dom0(rig, port)
    assert rig.tap.offloads == []
    f.set_state(CLOSED)
    assert f.wait_backend(CLOSED)
    if breakage == "queues":
        f.fe_rm("multi-queue-num-queues")
    f.reconnect()                                       # a clean second attempt works
    f.send(tcp4(10))
    assert f.wait_tx(1) == [(0, OK)]


# --- guest transmit ----------------------------------------------------------------------------

def test_tx_single_slot(rig):
    f = rig.front()
    frame = tcp4(100)
    (rid,) = f.send(frame)
    assert f.wait_tx(1) == [(rid, OK)]
    (sent,) = rig.tap.wait_sent(1)
    assert sent == bytes(VNET_HDR_LEN) + frame               # no offload: all-zero header
    st_ = rig.be.stats
    assert st_["tx_packets"] == 1 and st_["tx_bytes"] == len(frame)


def test_tx_data_validated_and_csum_blank(rig):
    f = rig.front()
    plain_v4, plain_v6, u4 = tcp4(200, check="seed"), tcp6(300, check="seed"), udp4(50)
    f.send(tcp4(64), data_validated=True)
    f.send(plain_v4, csum_blank=True, data_validated=True)
    f.send(plain_v6, csum_blank=True)
    f.send(u4, csum_blank=True)
    assert [s for _i, s in f.wait_tx(4)] == [OK] * 4
    sent = rig.tap.wait_sent(4)
    assert vnet(sent[0]) == VnetHdr(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)
    assert vnet(sent[1]) == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)
    assert vnet(sent[2]) == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 54, 16)
    assert vnet(sent[3]) == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    assert [s[VNET_HDR_LEN:] for s in sent] == [tcp4(64), plain_v4, plain_v6, u4]


def test_tx_multi_slot(rig):
    f = rig.front()
    frame = tcp4(9000, seed=3)
    chunks = [100, 4000, 3000, len(frame) - 7100]
    offsets = [3996, 96, 0, 17]
    ids = f.send(frame, chunks=chunks, offsets=offsets)
    assert f.wait_tx(4) == [(i, OK) for i in ids]             # ring order
    (sent,) = rig.tap.wait_sent(1)
    assert sent == bytes(VNET_HDR_LEN) + frame
    assert rig.tap.pieces == [1 + 4]                          # header, head copy, 3 views
    # zero-sized following slots are legal
    frame = tcp4(50, seed=4)
    ids = f.send(frame, chunks=[len(frame), 0, 0], offsets=[0, 4096, 7])
    assert f.wait_tx(3) == [(i, OK) for i in ids]
    assert rig.tap.wait_sent(2)[1] == bytes(VNET_HDR_LEN) + frame


def test_tx_max_legal_slots(rig):
    f = rig.front()
    frame = tcp4(18 * 100 - 54 + 500)
    chunks = [500] + [100] * 18                              # 18 slots after the first
    ids = f.send(frame, chunks=chunks)
    assert f.wait_tx(19) == [(i, OK) for i in ids]
    assert rig.tap.wait_sent(1)[0][VNET_HDR_LEN:] == frame


@pytest.mark.parametrize("v6", [False, True], ids=["tcpv4", "tcpv6"])
def test_tx_gso(rig, v6):
    f = rig.front()
    frame = tcp6(20000, check="seed") if v6 else tcp4(20000, check="seed")
    chunks = [1000] + [4096] * 4 + [len(frame) - 1000 - 4 * 4096]
    gtype = N.XEN_NETIF_GSO_TYPE_TCPV6 if v6 else N.XEN_NETIF_GSO_TYPE_TCPV4
    ids = f.send(frame, chunks=chunks, csum_blank=True, gso=(1448, gtype))
    got = f.wait_tx(len(ids) + 1)
    assert got[0] == (ids[0], OK) and got[1][1] == NULL                   # extra: NULL
    assert got[2:] == [(i, OK) for i in ids[1:]]
    (sent,) = rig.tap.wait_sent(1)
    h = vnet(sent)
    if v6:
        assert h == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 74, 1448,
                            54, 16)
    else:
        assert h == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448,
                            34, 16)
    assert sent[VNET_HDR_LEN:] == frame


def test_tx_gso_without_csum_blank_gets_seeded(rig):
    f = rig.front()
    frame = tcp4(6000, check="zero")                     # a buggy frontend: no csum_blank
    ids = f.send(frame, chunks=[3000, 3054], gso=(1000, N.XEN_NETIF_GSO_TYPE_TCPV4))
    got = f.wait_tx(3)
    assert [s for _i, s in got] == [OK, NULL, OK] and [got[0][0], got[2][0]] == ids
    (sent,) = rig.tap.wait_sent(1)
    assert vnet(sent) == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54,
                                 1000, 34, 16)
    expect = bytearray(frame)
    expect[50:52] = struct.pack("!H", tcp4_seed(frame))
    assert sent[VNET_HDR_LEN:] == bytes(expect)
    # the guest's page was not written: netback fixed up its own copy
    pages = [rig.guest.mem.read(b.gfn * PAGE, 3000) for b in f.tx_pool.free]
    assert frame[:3000] in pages


def test_tx_responses_in_ring_order_across_packets(rig):
    f = rig.front()
    entries, expect = [], []
    for k in range(12):
        frame = tcp4(100 * k + 1, seed=k)
        if k % 3 == 0:
            e, ids = f.build_tx(frame, csum_blank=True, gso=(500, 1))
            expect += [(ids[0], OK), (None, NULL)]
        elif k % 3 == 1:
            e, ids = f.build_tx(frame, chunks=[60, len(frame) - 60])
            expect += [(i, OK) for i in ids]
        else:
            e, ids = f.build_tx(frame)
            expect += [(ids[0], OK)]
        entries += e
    f.put_tx(entries)
    f.push_tx()
    got = f.wait_tx(len(expect))
    assert [(None if s == NULL else i, s) for i, s in got] == expect
    assert len(rig.tap.wait_sent(12)) == 12


def test_tx_incomplete_packet_waits_for_the_rest(rig):
    f = rig.front()
    frame = tcp4(500)
    entries, ids = f.build_tx(frame, chunks=[100, 200, len(frame) - 300])
    f.put_tx(entries[:2])
    f.push_tx()
    time.sleep(0.05)
    assert f.poll_tx() == 0 and rig.tap.sent == []
    f.put_tx(entries[2:])
    f.push_tx()
    assert f.wait_tx(3) == [(i, OK) for i in ids]
    assert rig.tap.wait_sent(1)[0][VNET_HDR_LEN:] == frame


def test_tx_notification_rules(rig):
    f = rig.front()
    ev = rig.guest.xd.evtchn
    for k in range(40):
        f.send(tcp4(k, seed=k))
        assert f.wait_tx(1)[0][1] == OK
    assert 1 <= f.tx.notifies <= 40
    assert rig.wait(lambda: f.tx.req_event == f.tx.req_prod + 1)     # re-armed
    rig.guest.xd.clear_port_bits(f.tx_port)
    f.tx.set_word(3, f.tx.rsp_cons + 1000)                          # "do not tell me"
    f.send(tcp4(5))
    assert rig.wait(lambda: f.tx.rsp_prod == f.tx.rsp_cons + 1)
    time.sleep(0.01)
    assert not ev.is_pending(f.tx_port)


def test_tx_ring_indices_near_wrap(rig):
    f = rig.front(tx_start=2**32 - 5, rx_start=2**32 - 3)
    for k in range(4):
        ids = f.send(tcp4(300, seed=k), chunks=[100, 254])
        assert f.wait_tx(2) == [(i, OK) for i in ids]
    f.post_rx(RX_MIN + 4)
    for k in range(4):
        rig.tap.inject_frame(tcp4(k, seed=k))
    pkts = f.wait_rx(4)
    assert [p.data for p in pkts] == [tcp4(k, seed=k) for k in range(4)]


def test_tx_multicast_control(rig):
    f = rig.front()
    mac = bytes.fromhex("01005e000001")
    for op in (N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, N.XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
        buf = f.tx_pool.get()
        f.put_tx([N.pack_tx_request(buf.ref, 0, N.NETTXF_extra_info, 1000 + op, 0),
                  N.pack_extra(op, 0, mac)])
        f.push_tx()
        got = f.wait_tx(2)
        assert got[0] == (1000 + op, OK) and got[1][1] == NULL
    time.sleep(0.02)
    assert rig.tap.sent == []
    f.send(tcp4(1))
    assert f.wait_tx(1)[0][1] == OK


def test_tx_dropped_by_checksum_setup_is_answered_okay(rig):
    """csum_blank on something that is not TCP/UDP: netback drops it silently (OKAY)."""
    f = rig.front()
    arp = MAC_H + MAC_G + b"\x08\x06" + bytes(28)
    (rid,) = f.send(arp, csum_blank=True)
    assert f.wait_tx(1) == [(rid, OK)]
    f.send(arp)
    assert f.wait_tx(1)[0][1] == OK
    assert [s[VNET_HDR_LEN:] for s in rig.tap.wait_sent(1)] == [arp]
    assert rig.be.stats["tx_dropped"] == 1


def test_tx_tap_refusal_is_not_the_guests_problem(rig):
    f = rig.front()
    rig.tap.write_result = -errno.EIO
    (rid,) = f.send(tcp4(10))
    assert f.wait_tx(1) == [(rid, OK)]
    assert rig.be.stats["tx_dropped"] == 1 and rig.be.state == CONNECTED
    rig.tap.write_result = None
    f.send(tcp4(11))
    assert f.wait_tx(1)[0][1] == OK
    assert len(rig.tap.wait_sent(1)) == 1


def _bad_grant_refs(rig):
    g = rig.guest
    other = g.grant(g.alloc_page(), domid=3)
    invalid = g.grant(g.alloc_page(), flags=X.GTF_invalid)
    xenpage = g.grant(GNT_WINDOW)
    nomem = g.grant(0x7FFFF)
    return {"beyond": 4000, "other-dom": other, "invalid": invalid, "xenpage": xenpage,
            "nomem": nomem}


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("kind", ["beyond", "other-dom", "invalid", "xenpage", "nomem"])
def test_tx_bad_grant_is_an_error_not_fatal(rig, kind, where):
    f = rig.front()
    bad = _bad_grant_refs(rig)[kind]
    frame = tcp4(300)
    entries, ids = f.build_tx(frame, chunks=[100, 100, len(frame) - 200])
    e = bytearray(entries[where])
    struct.pack_into("<I", e, 0, bad)
    entries[where] = bytes(e)
    f.put_tx(entries)
    f.push_tx()
    assert f.wait_tx(3) == [(i, ERR) for i in ids]
    assert rig.be.stats["tx_errors"] == 1
    f.send(frame)
    assert f.wait_tx(1)[0][1] == OK
    assert [s[VNET_HDR_LEN:] for s in rig.tap.wait_sent(1)] == [frame]
    assert rig.be.state == CONNECTED and rig.thread().is_alive()


def test_tx_readonly_grant_is_fine_for_transmit(rig):
    f = rig.front()
    assert f.tx_pool.readonly                       # netfront grants TX pages read-only
    f.send(tcp4(10))
    assert f.wait_tx(1)[0][1] == OK


def raw_req(ref, off, flags, rid, size):
    return N.pack_tx_request(ref, off, flags, rid, size)


@pytest.mark.parametrize("case", ["runt", "runt-zero", "slot-too-big", "too-many-slots"])
def test_tx_non_fatal_errors(rig, case):
    f = rig.front()
    b = f.tx_pool.get()
    M = N.NETTXF_more_data
    if case == "runt":
        entries = [raw_req(b.ref, 0, 0, 900, 13)]
    elif case == "runt-zero":
        entries = [raw_req(b.ref, 0, M, 900, 100), raw_req(b.ref, 0, 0, 901, 100)]
    elif case == "slot-too-big":
        entries = [raw_req(b.ref, 0, M, 900, 100), raw_req(b.ref, 0, 0, 901, 101)]
    else:                                           # 19 following slots: dropped
        entries = [raw_req(b.ref, 0, M, 900, 2000)] + \
            [raw_req(b.ref, 0, M if i < 18 else 0, 901 + i, 10) for i in range(19)]
    f.put_tx(entries)
    f.push_tx()
    got = f.wait_tx(len(entries))
    assert got == [(900 + i, ERR) for i in range(len(entries))]
    f.send(tcp4(5))
    assert f.wait_tx(1)[0][1] == OK
    assert len(rig.tap.wait_sent(1)) == 1 and rig.be.state == CONNECTED


@pytest.mark.parametrize("case", ["first-crosses-page", "slot-crosses-page", "extra-type-0",
                                  "extra-type-6", "gso-size-0", "gso-type-3",
                                  "fatal-slot-count"])
def test_tx_fatal_errors_close_the_device(rig, case):
    f = rig.front()
    b = f.tx_pool.get()
    M, XI = N.NETTXF_more_data, N.NETTXF_extra_info
    gso = N.pack_extra_gso
    entries = {
        "first-crosses-page": [raw_req(b.ref, 4000, 0, 900, 100)],
        "slot-crosses-page": [raw_req(b.ref, 0, M, 900, 200), raw_req(b.ref, 4090, 0, 901, 7)],
        "extra-type-0": [raw_req(b.ref, 0, XI, 900, 60), N.pack_extra(0, 0)],
        "extra-type-6": [raw_req(b.ref, 0, XI, 900, 60), N.pack_extra(6, 0)],
        "gso-size-0": [raw_req(b.ref, 0, XI, 900, 60), gso(0, 1)],
        "gso-type-3": [raw_req(b.ref, 0, XI, 900, 60), gso(1000, 3)],
        "fatal-slot-count": [raw_req(b.ref, 0, M, 900, 2000)] +
        [raw_req(b.ref, 0, M, 901 + i, 10) for i in range(20)] + [raw_req(b.ref, 0, 0, 999, 1)],
    }[case]
    # a good packet first: it is sent, the bad one then stops the device
    good, _ = f.build_tx(tcp4(7))
    f.put_tx(good + entries)
    f.push_tx()
    assert f.wait_backend(CLOSING)
    assert rig.be_key("error") and "malformed" in rig.be_key("error")
    assert rig.wait(lambda: rig.thread() is None) and rig.be.tx is None
    assert unbound_for_dom0(rig, f.tx_port)
    time.sleep(0.02)
    f.poll_tx()
    bad_ids = {900 + i for i in range(100)}
    assert not any(i in bad_ids and s != NULL for i, s in f.tx_responses)   # none answered
    assert [s[VNET_HDR_LEN:] for s in rig.tap.sent] == [tcp4(7)]
    f.reconnect()                                        # the guest recovers
    f.send(tcp4(8))
    assert f.wait_tx(1)[0][1] == OK


def test_tx_ring_overflow_is_fatal(rig):
    f = rig.front()
    f.tx.set_word(0, f.tx.req_prod + 257)
    rig.guest.xd.evtchn.send(f.tx_port)
    assert f.wait_backend(CLOSING)
    assert "ring" in rig.be_key("error")
    f.reconnect()
    f.send(tcp4(8))
    assert f.wait_tx(1)[0][1] == OK


def test_tx_full_ring_of_unterminated_extras_is_fatal(rig):
    f = rig.front()
    b = f.tx_pool.get()
    mcast = bytes.fromhex("01005e000001")
    entries = [raw_req(b.ref, 0, N.NETTXF_extra_info, 900, 60)] + \
        [N.pack_extra(N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, N.XEN_NETIF_EXTRA_FLAG_MORE, mcast)] * 255
    f.put_tx(entries)
    assert f.tx.free() == 0
    f.push_tx()
    assert f.wait_backend(CLOSING, timeout=1.0)


def test_tx_csum_blank_headers_spanning_slots(rig):
    f = rig.front()
    frame = tcp4(500, check="seed")
    ids = f.send(frame, chunks=[44, len(frame) - 44], offsets=[4052, 0], csum_blank=True)
    assert f.wait_tx(2) == [(i, OK) for i in ids]
    (sent,) = rig.tap.wait_sent(1, timeout=1.0)
    assert vnet(sent) == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)
    assert sent[VNET_HDR_LEN:] == frame


# --- guest receive -----------------------------------------------------------------------------

def test_rx_plain_frame(rig):
    f = rig.front()
    ids = f.post_rx(RX_MIN + 2)
    frame = tcp4(100)
    rig.tap.inject_frame(frame)
    (pkt,) = f.wait_rx(1)
    assert pkt.data == frame and pkt.flags == 0 and pkt.extras == []
    assert pkt.slots == [(ids[0], 0, 0, len(frame))] and not pkt.mismatched
    st_ = rig.be.stats
    assert st_["rx_packets"] == 1 and st_["rx_bytes"] == len(frame)


@pytest.mark.parametrize("vflags, rxflags", [
    (0, 0),
    (VIRTIO_NET_HDR_F_DATA_VALID, N.NETRXF_data_validated),
    (VIRTIO_NET_HDR_F_NEEDS_CSUM, N.NETRXF_csum_blank | N.NETRXF_data_validated),
    (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID,
     N.NETRXF_csum_blank | N.NETRXF_data_validated),
], ids=["none", "data-valid", "needs-csum", "both"])
def test_rx_checksum_flags(rig, vflags, rxflags):
    f = rig.front()
    f.post_rx(RX_MIN + 1)
    frame = tcp4(300, check="seed" if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM else "full")
    rig.tap.inject_frame(frame, flags=vflags, csum_start=34, csum_offset=16)
    (pkt,) = f.wait_rx(1)
    assert pkt.flags == rxflags and pkt.data == frame


def test_rx_multi_slot(rig):
    f = rig.front()
    ids = f.post_rx(RX_MIN + 3)
    frame = tcp4(9000 - 54, seed=9)
    rig.tap.inject_frame(frame, flags=VIRTIO_NET_HDR_F_DATA_VALID)
    (pkt,) = f.wait_rx(1)
    M, DV = N.NETRXF_more_data, N.NETRXF_data_validated
    assert pkt.slots == [(ids[0], 0, M | DV, 4096), (ids[1], 0, M, 4096), (ids[2], 0, 0, 808)]
    assert pkt.data == frame
    last = f.rx_pool.free[-1]                       # data at offset 0, the rest untouched
    assert rig.guest.read_page(last.gfn)[808:] == b"\xee" * (PAGE - 808)


@pytest.mark.parametrize("v6, ecn", [(False, False), (True, False), (False, True)],
                         ids=["tcpv4", "tcpv6", "tcpv4-ecn"])
def test_rx_gso_frame(rig, v6, ecn):
    f = rig.front()
    ids = f.post_rx(RX_MIN + 2)
    frame = tcp6(10000 - 74, check="seed") if v6 else tcp4(10000 - 54, check="seed")
    vtype = (VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4) | \
        (VIRTIO_NET_HDR_GSO_ECN if ecn else 0)
    rig.tap.inject_frame(frame, flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=vtype,
                         hdr_len=74 if v6 else 54, gso_size=1440,
                         csum_start=54 if v6 else 34, csum_offset=16)
    raw = []
    assert rig.wait(lambda: raw.extend(f.poll_rx_raw()) or len(raw) >= 4)
    assert len(raw) == 4
    # slot order: first data slot, the GSO extra, then the other data slots
    first = N.unpack_rx_response(raw[0][1])
    assert first == (ids[0], 0, N.NETRXF_csum_blank | N.NETRXF_data_validated |
                     N.NETRXF_extra_info | N.NETRXF_more_data, 4096)
    ex = N.unpack_extra(raw[1][1])
    assert (ex.type, ex.flags, ex.gso_size, ex.gso_features) == (N.XEN_NETIF_EXTRA_TYPE_GSO,
                                                                  0, 1440, 0)
    assert ex.gso_type == (N.XEN_NETIF_GSO_TYPE_TCPV6 if v6 else N.XEN_NETIF_GSO_TYPE_TCPV4)
    assert N.unpack_rx_response(raw[2][1]) == (ids[2], 0, N.NETRXF_more_data, 4096)
    assert N.unpack_rx_response(raw[3][1]) == (ids[3], 0, 0, 10000 - 8192)
    # the data landed at offset 0 of the data slots' buffers
    data = b""
    for idx, r in (raw[0], raw[2], raw[3]):
        _rid, buf = f.rx_posted[idx & 255]
        data += rig.guest.mem.read(buf.gfn * PAGE, N.unpack_rx_response(r)[3])
    assert data == frame


def test_rx_gso_parsed_by_fake_netfront(rig):
    f = rig.front()
    f.post_rx(40)
    frame = tcp4(30000, check="seed")
    rig.tap.inject_frame(frame, flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                         gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1448,
                         csum_start=34, csum_offset=16)
    rig.tap.inject_frame(tcp4(10))
    p1, p2 = f.wait_rx(2)
    assert p1.data == frame and len(p1.slots) == 8 and not p1.mismatched
    assert [(e.type, e.gso_size, e.gso_type) for e in p1.extras] == [(1, 1448, 1)]
    assert p2.data == tcp4(10) and p2.extras == []


def test_rx_largest_frame(rig):
    f = rig.front()
    f.post_rx(RX_MIN)
    frame = tcp4(65535 + 14 - 54, check="seed")           # 64 KiB IP packet
    rig.tap.inject_frame(frame, flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                         gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1448,
                         csum_start=34, csum_offset=16)
    (pkt,) = f.wait_rx(1)
    assert pkt.data == frame and len(pkt.slots) == 17 and len(pkt.extras) == 1


def test_rx_udp_gso_is_dropped(rig):
    f = rig.front()
    f.post_rx(RX_MIN + 2)
    rig.tap.inject_frame(udp4(3000), flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                         gso_type=VIRTIO_NET_HDR_GSO_UDP, hdr_len=42, gso_size=1400)
    rig.tap.inject_frame(tcp4(1, seed=1), gso_type=VIRTIO_NET_HDR_GSO_TCPV4)   # gso_size 0
    rig.tap.inject(b"\0" * 5)                                  # shorter than the header
    rig.tap.inject(pack_vnet_hdr())                            # a header, no frame
    rig.tap.inject_frame(tcp4(2, seed=2))
    (pkt,) = f.wait_rx(1)
    assert pkt.data == tcp4(2, seed=2)
    assert rig.be.stats["rx_dropped"] == 2 and rig.tap.queued() == 0


def test_rx_waits_for_buffers_and_honours_req_event(rig):
    f = rig.front()
    ev = rig.guest.xd.evtchn
    frames = [tcp4(10 * k, seed=k) for k in range(3)]
    for fr in frames:
        rig.tap.inject_frame(fr)
    time.sleep(0.05)
    assert rig.tap.queued() == 3                    # no buffers: frames wait in the TAP
    assert f.rx.req_event == f.rx.req_prod + RX_MIN      # "tell me when 18 are there"
    f.post_rx(RX_MIN - 1)
    assert f.rx.notifies == 0                       # below req_event: no notification
    time.sleep(0.05)
    assert f.poll_rx() == 0 and rig.tap.queued() == 3
    rig.guest.xd.clear_port_bits(f.rx_port)
    f.post_rx(1)                                    # crosses req_event: notify
    assert f.rx.notifies == 1
    (p0,) = f.wait_rx(1)
    assert p0.data == frames[0]
    assert rig.wait(lambda: ev.is_pending(f.rx_port))
    # one buffer used: 17 left, fewer than the largest frame needs, so the next frames wait
    time.sleep(0.05)
    assert rig.tap.queued() == 2
    assert f.rx.req_event == f.rx.req_prod + 1
    for k in (1, 2):
        f.post_rx(1)
        (p,) = f.wait_rx(1)
        assert p.data == frames[k]
    assert rig.tap.queued() == 0


def test_rx_backend_respects_rsp_event(rig):
    f = rig.front()
    ev = rig.guest.xd.evtchn
    f.post_rx(RX_MIN + 5)
    rig.guest.xd.clear_port_bits(f.rx_port)
    f.rx.set_word(3, f.rx.rsp_cons + 1000)              # frontend: do not tell me
    rig.tap.inject_frame(tcp4(1))
    assert rig.wait(lambda: f.rx.rsp_prod == f.rx.rsp_cons + 1)
    time.sleep(0.01)
    assert not ev.is_pending(f.rx_port)


def test_rx_many_frames_in_batches(rig):
    f = rig.front()
    f.post_rx(100)
    frames = [tcp4(k * 7, seed=k) for k in range(150)]
    for fr in frames:
        rig.tap.inject_frame(fr)
    got = f.wait_rx(100 - RX_MIN + 1)               # one buffer each while >= 18 are left
    time.sleep(0.02)
    assert f.poll_rx() == 0 and rig.tap.queued() == 150 - len(got)
    f.post_rx(100)
    rest = f.wait_rx(150 - len(got))
    assert [p.data for p in got + rest] == frames
    assert all(len(p.slots) == 1 and not p.mismatched for p in got + rest)


def test_rx_into_readonly_buffer_is_an_error(rig):
    f = rig.front()
    g = rig.guest
    ro_gfn = g.alloc_page()
    g.mem.write(ro_gfn * PAGE, b"\x77" * PAGE)
    ro_ref = g.grant(ro_gfn, readonly=True)
    f.put_rx(0x4000, ro_ref)
    slot0 = f.rx.req_prod_pvt - 1
    f.post_rx(RX_MIN + 1)
    rig.tap.inject_frame(tcp4(100))
    raw = []
    assert rig.wait(lambda: raw.extend(f.poll_rx_raw()) or raw)
    assert raw[0][0] == slot0
    rid, _off, _fl, status = N.unpack_rx_response(raw[0][1])
    assert rid == 0x4000 and status < 0
    assert g.read_page(ro_gfn) == b"\x77" * PAGE
    rig.tap.inject_frame(tcp4(101))                     # the next frame is fine
    (pkt,) = f.wait_rx(1)
    assert pkt.data == tcp4(101) and rig.be.state == CONNECTED


def test_rx_error_slot_keeps_its_flags(rig):
    f = rig.front()
    g = rig.guest
    ro_ref = g.grant(g.alloc_page(), readonly=True)
    f.put_rx(0x4000, ro_ref)
    f.post_rx(RX_MIN + 1)
    rig.tap.inject_frame(tcp4(6000))                          # two data slots
    raw = []
    assert rig.wait(lambda: raw.extend(f.poll_rx_raw()) or len(raw) >= 2)
    rid, _off, flags, status = N.unpack_rx_response(raw[0][1])
    assert status < 0
    assert flags & N.NETRXF_more_data


def test_rx_ring_overflow_is_fatal(rig):
    f = rig.front()
    f.post_rx(RX_MIN)
    f.rx.set_word(0, f.rx.req_prod + 300)
    rig.guest.xd.evtchn.send(f.rx_port)
    assert f.wait_backend(CLOSING)
    assert "ring" in rig.be_key("error")
    f.reconnect()
    f.post_rx(RX_MIN)
    rig.tap.inject_frame(tcp4(3))
    assert f.wait_rx(1)[0].data == tcp4(3)


# --- rate limit --------------------------------------------------------------------------------

def test_rate_limit_delays_but_delivers():
    r = Rig(rate=(2000, 100_000))                       # 2000 bytes per 100 ms
    try:
        f = r.front()
        frames = [tcp4(1000 - 54, seed=k) for k in range(6)]
        t0 = time.monotonic()
        for fr in frames:
            f.send(fr)
        got = f.wait_tx(6)
        elapsed = time.monotonic() - t0
        assert [s for _i, s in got] == [OK] * 6
        assert [s[VNET_HDR_LEN:] for s in r.tap.wait_sent(6)] == frames
        assert elapsed >= 0.15, elapsed                 # 2 now, 2 per refill: >= 2 waits
        # a packet larger than the whole credit still passes (alone)
        big = tcp4(5000)
        f.send(big, chunks=[2000, len(big) - 2000])
        assert [s for _i, s in f.wait_tx(2)] == [OK, OK]
    finally:
        r.close()


def test_no_rate_limit_is_fast(rig):
    f = rig.front()
    t0 = time.monotonic()
    for k in range(6):
        f.send(tcp4(1000 - 54, seed=k))
    f.wait_tx(6)
    assert time.monotonic() - t0 < 0.1


def test_rate_limited_backend_disconnects_promptly():
    r = Rig(rate=(1000, 10_000_000))                     # 1000 bytes per 10 s
    try:
        f = r.front()
        for k in range(3):
            f.send(tcp4(600 - 54, seed=k))
        assert r.tap.wait_sent(1)
        t0 = time.monotonic()
        assert f.close()                                  # the waiting thread is stopped
        assert time.monotonic() - t0 < 2
    finally:
        r.close()


# --- lifecycle ---------------------------------------------------------------------------------

def test_disconnect_and_reconnect(rig):
    f = rig.front()
    ev = rig.guest.xd.evtchn
    f.send(tcp4(1))
    assert f.wait_tx(1)[0][1] == OK
    f.post_rx(RX_MIN)
    old_port, thread = f.tx_port, rig.thread()
    assert f.close()
    assert rig.be.state == CLOSED and not thread.is_alive() and rig.thread() is None
    assert ev.status(X.DOMID_SELF, old_port)[0] == UNBOUND
    rig.tap.inject_frame(tcp4(2))                        # nobody reads it while closed
    time.sleep(0.02)
    assert rig.tap.queued() == 1
    rig.tap.drain()
    f.set_state(INITIALISING)
    assert f.wait_backend(INITWAIT)
    f.connect()
    assert rig.tap.offloads == [ALL_OFFLOADS, ALL_OFFLOADS]
    f.send(tcp4(3))
    assert f.wait_tx(1)[0][1] == OK
    f.post_rx(RX_MIN)
    rig.tap.inject_frame(tcp4(4))
    assert f.wait_rx(1)[0].data == tcp4(4)
    # and again, now with split event channels and no offloads
    assert f.close()
    f.split = True
    f.features["feature-no-csum-offload"] = "1"
    f.set_state(INITIALISING)
    assert f.wait_backend(INITWAIT)
    f.connect()
    assert rig.tap.offloads[-1] == 0
    f.post_rx(RX_MIN)
    rig.tap.inject_frame(tcp4(5))
    assert f.wait_rx(1)[0].data == tcp4(5)
    assert [s[VNET_HDR_LEN:] for s in rig.tap.sent] == [tcp4(1), tcp4(3)]


def test_toolstack_close_handshake(rig):
    f = rig.front()
    rig.be.request_close()
    assert rig.be_key("online") == "0" and f.backend_state() == CLOSING
    f.send(tcp4(1))                                       # still served until Closed
    assert f.wait_tx(1)[0][1] == OK
    assert f.close()
    assert rig.be.closed_event.wait(5) and rig.thread() is None
    f.set_state(INITIALISING)                             # being removed: no reconnect
    time.sleep(0.05)
    assert f.backend_state() == CLOSED


def test_stop_while_connected():
    r = Rig()
    f = r.front()
    thread = r.thread()
    r.be.stop()
    assert not thread.is_alive() and r.tap.closed
    assert unbound_for_dom0(r, f.tx_port)
    r.bus.close()
    r.guest.close()


# --- fuzz ------------------------------------------------------------------------------------------

FRONT_REFS = 300


def note(msg):
    """hypothesis.event, when running under hypothesis."""
    try:
        event(msg)
    except InvalidArgument:
        pass


class World:
    """A connected vif with a fixed set of grants of every kind, and models of what netback
    must do with any TX ring entries and RX requests."""

    def __init__(self):
        self.rig = Rig(ram=4 << 20)
        g = self.rig.guest
        self.refs: dict[str, list[int]] = {}
        rnd = random.Random(5)
        for kind, n, kw in [("ro", 4, {"readonly": True}), ("rw", 6, {}),
                            ("other", 1, {"domid": 3}),
                            ("invalid", 1, {"flags": X.GTF_invalid}),
                            ("transfer", 1, {"flags": X.GTF_accept_transfer})]:
            for _ in range(n):
                gfn = g.alloc_page()
                g.mem.write(gfn * PAGE, rnd.randbytes(PAGE))
                self.refs.setdefault(kind, []).append(g.grant(gfn, **kw))
        # real frames at offset 0 of two read-only pages, for checksum/GSO offload paths
        ro = [g.grant_entry(r)[2] for r in self.refs["ro"]]
        g.mem.write(ro[0] * PAGE, tcp4(3000, check="seed"))
        g.mem.write(ro[1] * PAGE, tcp6(3000, check="zero"))
        self.refs["nomem"] = [g.grant(0x7FFFF)]
        self.refs["xenpage"] = [g.grant(GNT_WINDOW)]
        self.refs["beyond"] = [600, 4096, 2**32 - 1]
        self.refs["zero"] = [0]
        self.pool = sorted({r for v in self.refs.values() for r in v})
        self.table = g.grant_table()
        g.next_ref = FRONT_REFS                 # the frontend's own grants: never fuzzed
        self.front = self.rig.front()
        self.rx_pending: list[tuple[int, int]] = []     # RX requests not consumed yet
        self.resets = 0

    def frame(self, ref, write):
        """Xen's grant check + 'is guest RAM': the frame, or None."""
        if not 0 <= ref < 512:
            return None
        flags, dom, frame = struct.unpack_from("<HHI", self.table, ref * 8)
        if flags & 3 != X.GTF_permit_access or dom != 0 or (write and flags & X.GTF_readonly):
            return None
        return frame if (frame + 1) * PAGE <= self.rig.guest.ram_bytes else None

    def ring_gfns(self):
        return {self.front.tx.gfn, self.front.rx.gfn}

    def check_alive(self):
        assert self.rig.be.state == CONNECTED, self.rig.be_key("error")
        assert self.rig.thread() is not None and self.rig.thread().is_alive()

    def reset(self):
        """Reconnect (after a fatal error or to drop an unfinished packet)."""
        self.resets += 1
        self.front.reconnect()
        self.rx_pending = []
        self.rig.tap.drain()
        self.rig.tap.take_sent()

    def check_memory(self, before: bytes, expect: bytearray | None):
        """No page outside the rings changed, except as ``expect`` says."""
        after = self.rig.guest.ram()
        rings = self.ring_gfns()
        ref = expect if expect is not None else before
        writable = {self.frame(r, True) for r in self.pool} - {None}
        for p in range(len(after) // PAGE):
            if p in rings:
                continue
            a = after[p * PAGE:(p + 1) * PAGE]
            if a != before[p * PAGE:(p + 1) * PAGE]:
                assert p in writable, f"page {p:#x} changed but was not granted writable"
            assert a == ref[p * PAGE:(p + 1) * PAGE], f"page {p:#x} differs from the model"

    # --- TX model (Linux netback's rules) -----------------------------------------------------
    def tx_model(self, entries, ram):
        """(responses [(id or None, status)], frames written, outcome) for ``entries``;
        outcome is 'done', 'fatal' or 'incomplete' (the rest of the last packet is missing)."""
        responses, written = [], []
        i = 0
        while i < len(entries):
            first = N.unpack_tx_request(entries[i])
            j = i + 1
            extras = {}
            nextra = 0
            if first.flags & N.NETTXF_extra_info:
                while True:
                    if j >= len(entries):
                        return responses, written, "incomplete"
                    t, fl = entries[j][0], entries[j][1]
                    j += 1
                    nextra += 1
                    if not 0 < t < N.XEN_NETIF_EXTRA_TYPE_MAX:
                        return responses, written, "fatal"
                    extras[t] = entries[j - 1]
                    if not fl & N.XEN_NETIF_EXTRA_FLAG_MORE:
                        break
            nulls = [(None, NULL)] * nextra
            if N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD in extras or \
                    N.XEN_NETIF_EXTRA_TYPE_MCAST_DEL in extras:
                responses += [(first.id, OK)] + nulls
                i = j
                continue
            remaining, others, drop = first.size, [], False
            more = first.flags & N.NETTXF_more_data
            while more:
                if len(others) >= N.FATAL_SKB_SLOTS_DEFAULT:
                    return responses, written, "fatal"
                if len(others) >= N.XEN_NETBK_LEGACY_SLOTS_MAX:
                    drop = True
                if j >= len(entries):
                    return responses, written, "incomplete"
                txp = N.unpack_tx_request(entries[j])
                j += 1
                if txp.size > remaining:
                    drop = True
                remaining = (remaining - txp.size) & 0xFFFF
                if txp.offset + txp.size > PAGE:
                    return responses, written, "fatal"
                others.append(txp)
                more = txp.flags & N.NETTXF_more_data
            ids = [first.id] + [o.id for o in others]
            if drop or remaining < N.ETH_HLEN:
                responses += [(first.id, ERR)] + nulls + [(o, ERR) for o in ids[1:]]
                i = j
                continue
            if first.offset + remaining > PAGE:
                return responses, written, "fatal"
            gso = extras.get(N.XEN_NETIF_EXTRA_TYPE_GSO)
            if gso is not None:
                g = N.unpack_extra(gso)
                if g.gso_size == 0 or g.gso_type not in (1, 2):
                    return responses, written, "fatal"
            slots = [(first.gref, first.offset, remaining)] + \
                [(o.gref, o.offset, o.size) for o in others]
            frames = [self.frame(ref, False) for ref, _o, _s in slots]
            if None in frames:
                responses += [(first.id, ERR)] + nulls + [(o, ERR) for o in ids[1:]]
                i = j
                continue
            chunks = [bytes(ram[fr * PAGE + off:fr * PAGE + off + n])
                      for fr, (_r, off, n) in zip(frames, slots)]
            # netback parses headers from the first 128 bytes, pulled across slots
            whole = b"".join(chunks)
            head = bytearray(whole[:max(len(chunks[0]), 128)])
            hdr = N.tx_to_vnet_hdr(head, bool(first.flags & N.NETTXF_csum_blank),
                                   bool(first.flags & N.NETTXF_data_validated),
                                   N.unpack_extra(gso) if gso is not None else None)
            if hdr is not None:
                written.append(hdr + bytes(head) + whole[len(head):])
            elif not first.flags & N.NETTXF_csum_blank and gso is None:
                raise AssertionError("a plain packet must always be sent")
            responses += [(first.id, OK)] + nulls + [(o, OK) for o in ids[1:]]
            i = j
        return responses, written, "done"

    def run_tx(self, entries):
        f, tap = self.front, self.rig.tap
        before = self.rig.guest.ram()
        expect, written, outcome = self.tx_model(entries, before)
        note(f"tx: {outcome}, {len(written)} sent, "
              f"{sum(s == ERR for _i, s in expect)} error responses")
        f.put_tx(entries)
        f.push_tx()
        if outcome == "fatal":
            assert f.wait_backend(CLOSING), f"backend {f.backend_state()}"
            assert self.rig.be_key("error")
            assert self.rig.wait(lambda: self.rig.thread() is None)
            f.poll_tx()
            got = f.tx_responses
            assert len(got) <= len(expect)                       # only a prefix, if any
            assert [(None if s == NULL else i, s) for i, s in got] == expect[:len(got)]
            assert tap.take_sent() == written                    # what came before it
            self.check_memory(before, None)
            self.reset()
            return
        got = f.wait_tx(len(expect))
        assert [(None if s == NULL else i, s) for i, s in got] == expect
        if outcome == "incomplete":
            time.sleep(0.02)
            assert f.poll_tx() == 0                              # the tail waits
        assert tap.take_sent() == written
        self.check_memory(before, None)
        self.check_alive()
        if outcome == "incomplete":
            self.reset()

    # --- RX model -----------------------------------------------------------------------------------
    def rx_model(self, frames, pending, ram):
        """Expected responses [(ring position, id, flags or None, status or 'err', extra)]
        and the frames left in the TAP; applies the copies to ``ram``."""
        out = []
        pos = 0
        left = 0
        for k, fr in enumerate(frames):
            if len(pending) - pos < RX_MIN:
                left = len(frames) - k
                break
            if len(fr) <= VNET_HDR_LEN:
                continue
            vflags, vgso, _hl, gsize = struct.unpack_from("<BBHH", fr, 0)
            flags = 0
            if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                flags = N.NETRXF_csum_blank | N.NETRXF_data_validated
            elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
                flags = N.NETRXF_data_validated
            gt = vgso & ~VIRTIO_NET_HDR_GSO_ECN
            extra = None
            if gt != VIRTIO_NET_HDR_GSO_NONE:
                if gt not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) or gsize == 0:
                    continue                                      # dropped
                extra = N.pack_extra_gso(gsize, 1 if gt == VIRTIO_NET_HDR_GSO_TCPV4 else 2)
            data = fr[VNET_HDR_LEN:]
            chunks = [data[o:o + PAGE] for o in range(0, len(data), PAGE)]
            for c, chunk in enumerate(chunks):
                rid, gref = pending[pos]
                fl = N.NETRXF_more_data if c < len(chunks) - 1 else 0
                if c == 0:
                    fl |= flags | (N.NETRXF_extra_info if extra else 0)
                target = self.frame(gref, True)
                if target is None:
                    out.append((pos, rid, None, "err"))
                else:
                    ram[target * PAGE:target * PAGE + len(chunk)] = chunk
                    out.append((pos, rid, fl, len(chunk)))
                pos += 1
                if c == 0 and extra:
                    out.append((pos, None, None, extra))
                    pos += 1
        return out, pos, left

    def run_rx(self, requests, frames):
        f, tap, g = self.front, self.rig.tap, self.rig.guest
        requests = requests[:f.rx.free()]
        before = g.ram()
        ram = bytearray(before)
        pending = self.rx_pending + requests
        expect, used, left = self.rx_model(frames, pending, ram)
        note(f"rx: {len(expect)} slots, {left} frames left, "
              f"{sum(e[3] == 'err' for e in expect)} errors")
        base = f.rx.rsp_cons
        for rid, gref in requests:
            f.put_rx(rid, gref)
        f.push_rx()
        for fr in frames:
            tap.inject(fr)
        got: list[tuple[int, bytes]] = []
        assert self.rig.wait(lambda: got.extend(f.poll_rx_raw()) or
                             (len(got) >= len(expect) and tap.queued() == left))
        time.sleep(0.005)
        got.extend(f.poll_rx_raw())
        assert len(got) == len(expect), (len(got), len(expect))
        for (idx, raw), (pos, rid, fl, status) in zip(got, expect):
            assert (idx - base) & 0xFFFFFFFF == pos
            if isinstance(status, bytes):                          # the GSO extra
                assert raw == status
                continue
            r_id, r_off, r_fl, r_status = N.unpack_rx_response(raw)
            assert r_id == rid
            if status == "err":
                assert r_status < 0
            else:
                assert (r_off, r_fl, r_status) == (0, fl, status)
        self.check_memory(before, ram)
        assert tap.queued() == left
        tap.drain()
        self.rx_pending = pending[used:]
        self.check_alive()


@pytest.fixture(scope="module")
def world():
    escaped = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: escaped.append(args)
    w = World()
    yield w
    w.rig.close()
    threading.excepthook = old_hook
    assert not escaped


M, XI, CB, DV = N.NETTXF_more_data, N.NETTXF_extra_info, N.NETTXF_csum_blank, \
    N.NETTXF_data_validated


def gref_s(w):
    return st.one_of(st.sampled_from(w.pool), st.sampled_from(w.refs["ro"] + w.refs["rw"]),
                     st.integers(0, FRONT_REFS - 1), st.integers(512, 2**32 - 1))


@st.composite
def tx_extra(draw, valid=False):
    kind = draw(st.integers(0, 9))
    if kind < 6 or valid:                                           # GSO
        if valid:
            return N.pack_extra_gso(draw(st.integers(1, 9000)), draw(st.sampled_from([1, 2])))
        size = draw(st.one_of(st.integers(1, 9000), st.just(0)))
        gtype = draw(st.one_of(st.sampled_from([1, 2]), st.integers(0, 255)))
        return N.pack_extra_gso(size, gtype)
    if kind < 8:
        return N.pack_extra(draw(st.sampled_from([2, 3])), 0, bytes.fromhex("01005e000001"))
    if kind < 9:
        return N.pack_extra(draw(st.sampled_from([4, 5])), 0, draw(st.binary(min_size=6,
                                                                            max_size=6)))
    return N.pack_extra(draw(st.sampled_from([0, 6, 7, 255])), 0)


TX_FAULTS = ["total", "first-off", "first-ref", "follow-ref", "follow-off", "follow-flags",
             "follow-size", "extras", "many-slots", "runt"]


@st.composite
def tx_packet(draw, w):
    """One packet's entries: well-formed (sent, possibly with offloads) or with one or two
    faults injected."""
    faults = set() if draw(st.integers(0, 9)) < 5 else \
        set(draw(st.lists(st.sampled_from(TX_FAULTS), min_size=1, max_size=2)))
    nfollow = draw(st.integers(17, 22)) if "many-slots" in faults else draw(st.integers(0, 4))
    sizes = [draw(st.integers(0, 4096)) for _ in range(nfollow)]
    # the first slot: mostly the real TCP frames at offset 0 of ro[0] (v4) / ro[1] (v6)
    which = draw(st.integers(0, 3))
    first_ref = w.refs["ro"][which]
    head = draw(st.integers(60, 3000)) if which < 2 else draw(st.integers(14, 4096))
    first_off = 0 if which < 2 else draw(st.integers(0, 4096 - head))
    if "runt" in faults:
        head = draw(st.integers(0, 13))
    total = head + sum(sizes)
    if "total" in faults:
        total = draw(st.integers(0, 0xFFFF))
    if "first-off" in faults:
        first_off = draw(st.integers(0, 0xFFFF))
    if "first-ref" in faults:
        first_ref = draw(gref_s(w))
    flags = draw(st.sampled_from([0, CB, DV, CB | DV]))
    if "extras" in faults:
        extras = draw(st.lists(tx_extra(), min_size=1, max_size=3))
    elif draw(st.integers(0, 2)) == 0:
        extras = [N.pack_extra_gso(draw(st.integers(1, 9000)), 2 if which == 1 else 1)]
    else:
        extras = []
    if extras:
        flags |= XI
    if nfollow:
        flags |= M
    ids = draw(st.lists(st.integers(0, 0xFFFF), min_size=nfollow + 1, max_size=nfollow + 1))
    entries = [N.pack_tx_request(first_ref & 0xFFFFFFFF, first_off & 0xFFFF, flags, ids[0],
                                 total & 0xFFFF)]
    for k, ex in enumerate(extras):
        ex = bytearray(ex)
        if k < len(extras) - 1:
            ex[1] |= N.XEN_NETIF_EXTRA_FLAG_MORE
        entries.append(bytes(ex).ljust(12, b"\0"))
    bad = draw(st.integers(0, max(0, nfollow - 1)))                 # the slot to break
    for k, size in enumerate(sizes):
        ref = draw(st.sampled_from(w.refs["ro"] + w.refs["rw"]))
        off = draw(st.integers(0, 4096 - size))
        fl = M if k < nfollow - 1 else 0
        if k == bad:
            if "follow-ref" in faults:
                ref = draw(gref_s(w))
            if "follow-off" in faults:
                off = draw(st.integers(0, 0xFFFF))
            if "follow-flags" in faults:
                fl = draw(st.integers(0, 0xFFFF))
            if "follow-size" in faults:
                size = draw(st.integers(0, 0xFFFF))
        entries.append(N.pack_tx_request(ref & 0xFFFFFFFF, off, fl, ids[k + 1], size))
    return entries


@st.composite
def raw_tx_entry(draw, w):
    e = bytearray(draw(st.binary(min_size=12, max_size=12)))
    if draw(st.booleans()):
        struct.pack_into("<I", e, 0, draw(st.sampled_from(w.pool)))
    if draw(st.booleans()):
        struct.pack_into("<H", e, 4, draw(st.integers(0, 1096)))
    if draw(st.booleans()):
        struct.pack_into("<H", e, 6, draw(st.integers(0, 15)))
    if draw(st.booleans()):
        struct.pack_into("<H", e, 10, draw(st.integers(0, 3000)))
    return bytes(e)


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_tx_packets(world, data):
    packets = data.draw(st.lists(tx_packet(world), min_size=1, max_size=4))
    world.run_tx([e for p in packets for e in p])


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_tx_raw_entries(world, data):
    entries = data.draw(st.lists(raw_tx_entry(world), min_size=1, max_size=12))
    world.run_tx(entries)


@st.composite
def rx_frame(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=VNET_HDR_LEN))    # no frame behind it
    n = draw(st.one_of(st.integers(1, 200), st.integers(1, 20000), st.just(4096),
                       st.just(8192), st.integers(60000, 65535 + 18)))
    body = random.Random(draw(st.integers(0, 2**16))).randbytes(n)
    vflags = draw(st.sampled_from([0, 1, 2, 3, 4]))
    vgso = draw(st.sampled_from([0, 0, 0, 0, 1, 1, 4, 0x81, 0x84, 3, 5, 2, 0x80]))
    gsize = draw(st.one_of(st.integers(1, 9000), st.just(0)))
    hdr = struct.pack("<BBHHHHH", vflags, vgso, draw(st.integers(0, 200)), gsize,
                      draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)), 0)
    return hdr + body


@FUZZ
@given(data=st.data())
def test_fuzz_rx(world, data):
    w = world
    good = st.sampled_from(w.refs["rw"])
    gref = st.one_of(good, good, good, gref_s(w))
    n = data.draw(st.one_of(st.integers(18, 60), st.integers(0, 40), st.integers(15, 20)))
    requests = [(data.draw(st.integers(0, 0xFFFF)), data.draw(gref)) for _ in range(n)]
    frames = data.draw(st.lists(rx_frame(), max_size=5))
    w.run_rx(requests, frames)


def test_fuzz_world_still_works(world):
    """After the fuzzing the vif still moves packets both ways."""
    w = world
    f = w.front
    for rid in (1, 2):
        f.put_tx([N.pack_tx_request(w.refs["ro"][0], 0, 0, rid, 100)])
    f.push_tx()
    assert f.wait_tx(2) == [(1, OK), (2, OK)]
    w.run_rx([(7, w.refs["rw"][0])] * (RX_MIN + 1), [pack_vnet_hdr() + tcp4(77)])
    w.check_alive()
