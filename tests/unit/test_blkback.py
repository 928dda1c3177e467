"""pyxen.backends.blkback end to end without KVM: a XenDomain over fake-engine guest memory,
its grant table and event channels, an in-process xenstore (LocalBus), a raw image in a temp
file, and a Python blkfront (pyxen.testing.blkfront) driving the shared rings."""

from __future__ import annotations

import os
import random
import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from pyxen.backends import blkif as B
from pyxen.backends.blkback import BlkBackend
from pyxen.backends.disk import DiskImage
from pyxen.backends.guestio import DomainGuestAccess
from pyxen.backends.xenbus import (CLOSED, CLOSING, CONNECTED, INITIALISING, INITWAIT,
                                   LocalBus)
from pyxen.core.memory import PAGE
from pyxen.testing.blkfront import (GNT_WINDOW, FakeBlkfront, FakeGuest, create_vbd_nodes,
                                    poll)
from pyxen.xen.abi import xen as X
from pyxen.xen.evtchn import INTERDOMAIN, UNBOUND
from pyxen.xenstore.server import XenstoreServer

DOMID = 5
DEVID = 51712
PIN_BITS = X.GTF_reading | X.GTF_writing
OK, ERR, NOTSUPP = B.RSP_OKAY, B.RSP_ERROR, B.RSP_EOPNOTSUPP


class Rig:
    """Guest + xenstore + bus + image + started BlkBackend (backend in InitWait)."""

    def __init__(self, path, *, readonly=False, disk_sectors=2048, ram=2 << 20, discard=True,
                 max_queues=4, seed=1):
        self.guest = FakeGuest(DOMID, ram)
        self.server = XenstoreServer()
        self.bus = LocalBus(self.server)
        self.path = str(path)
        rnd = random.Random(seed)
        with open(self.path, "wb") as f:
            f.write(rnd.randbytes(disk_sectors * 512))
        self.original = self.disk_bytes()
        create_vbd_nodes(self.server, DOMID, DEVID, readonly=readonly)
        self.disk = DiskImage(self.path, readonly=readonly)
        self.be = BlkBackend(self.bus, DomainGuestAccess(self.guest.xd), DEVID, self.disk,
                             discard=discard, max_queues=max_queues)
        self.be.start()
        self.fronts: list[FakeBlkfront] = []
        assert self.wait(lambda: self.be_key("state") == str(INITWAIT))

    def be_key(self, key):
        try:
            return self.server.read(f"{self.be.be}/{key}").decode()
        except Exception:
            return None

    wait = staticmethod(poll)

    def front(self, connect=True, **kw) -> FakeBlkfront:
        f = FakeBlkfront(self.guest, self.server, DEVID, **kw)
        self.fronts.append(f)
        if connect:
            f.connect()
        return f

    def disk_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def close(self):
        self.be.stop()
        self.bus.close()
        self.guest.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "disk.img")
    yield r
    r.close()


@pytest.fixture
def ro_rig(tmp_path):
    r = Rig(tmp_path / "ro.img", readonly=True)
    yield r
    r.close()


def data_pages(rig, n, *, readonly=False, fill=None):
    """n fresh guest pages granted to dom0 -> [(gfn, ref)]; optionally filled with bytes."""
    out = []
    for i in range(n):
        gfn = rig.guest.alloc_page()
        if fill is not None:
            rig.guest.mem.write(gfn * PAGE, fill(i))
        out.append((gfn, rig.guest.grant(gfn, readonly=readonly)))
    return out


def ram_outside_rings(rig, front):
    """Guest RAM with the frontend's ring pages blanked (they carry requests/responses)."""
    ram = bytearray(rig.guest.ram())
    for ring in front.rings:
        for gfn in ring.gfns:
            ram[gfn * PAGE:(gfn + 1) * PAGE] = bytes(PAGE)
    return bytes(ram)


def pattern(seed):
    return lambda i: random.Random(seed * 1000 + i).randbytes(PAGE)


# --- handshake -------------------------------------------------------------------------------

def test_probe_and_connect_keys(rig):
    k = rig.be_key
    assert k("feature-flush-cache") == "1" and k("feature-discard") == "1"
    assert k("discard-granularity") == "4096" and k("discard-secure") == "0"
    assert k("feature-max-indirect-segments") == "256"
    assert k("max-ring-page-order") == "4" and k("multi-queue-max-queues") == "4"
    f = rig.front()
    assert f.backend_state() == CONNECTED
    assert k("sectors") == "2048" and k("info") == "0"
    assert k("sector-size") == "512" and k("physical-sector-size") == "512"
    assert k("feature-persistent") == "1"
    port = f.rings[0].port
    assert rig.guest.xd.evtchn.status(X.DOMID_SELF, port)[0] == INTERDOMAIN
    assert rig.be.info()["queues"] == 1 and rig.be.info()["persistent"]


def test_read_write_round_trip(rig):
    f = rig.front(persistent=False)
    src = data_pages(rig, 2, readonly=True, fill=pattern(1))      # blkfront: ro for writes
    segs = [(src[0][1], 0, 7), (src[1][1], 2, 4)]                  # 8 + 3 sectors
    assert f.request([B.pack_request(B.OP_WRITE, 0x1111, 100, segs)]) == [(0x1111, 1, OK)]
    expect = rig.guest.read_page(src[0][0]) + rig.guest.read_page(src[1][0])[1024:2560]
    disk = rig.disk_bytes()
    assert disk[100 * 512:111 * 512] == expect
    assert disk[:100 * 512] == rig.original[:100 * 512]
    assert disk[111 * 512:] == rig.original[111 * 512:]

    dst = data_pages(rig, 2)
    rig.guest.mem.vmm_dirty.clear()
    segs = [(dst[0][1], 1, 3), (dst[1][1], 0, 7)]
    assert f.request([B.pack_request(B.OP_READ, 0x2222, 98, segs)]) == [(0x2222, 0, OK)]
    p0, p1 = rig.guest.read_page(dst[0][0]), rig.guest.read_page(dst[1][0])
    assert p0[512:2048] == disk[98 * 512:101 * 512]
    assert p0[:512] == bytes(512) and p0[2048:] == bytes(PAGE - 2048)   # rest untouched
    assert p1 == disk[101 * 512:109 * 512]
    assert {dst[0][0], dst[1][0]} <= rig.guest.mem.vmm_dirty          # migration sees it
    st_ = rig.be.stats
    assert (st_.reads, st_.writes, st_.bytes_written, st_.bytes_read) == \
        (1, 1, 11 * 512, 11 * 512)


def test_eleven_segments_and_batches(rig):
    f = rig.front()
    src = data_pages(rig, 11, fill=pattern(2))
    segs = [(ref, i % 4, 4 + i % 4) for i, (_g, ref) in enumerate(src)]
    nsect = sum(last - first + 1 for _r, first, last in segs)
    reqs = [B.pack_request(B.OP_WRITE, 10, 0, segs),
            B.pack_request(B.OP_WRITE, 11, 1000, segs)]
    assert f.request(reqs) == [(10, 1, OK), (11, 1, OK)]
    expect = b"".join(rig.guest.read_page(g)[s * 512:(e + 1) * 512]
                      for (g, _r), (_x, s, e) in zip(src, segs))
    disk = rig.disk_bytes()
    assert disk[:nsect * 512] == expect and disk[1000 * 512:(1000 + nsect) * 512] == expect
    # read it back, 40 small requests in one push (more than one ring's worth over time)
    dst = data_pages(rig, 4)
    for rnd in range(3):
        reqs = [B.pack_request(B.OP_READ, 1000 * rnd + i, i, [(dst[i % 4][1], i % 8, i % 8)])
                for i in range(30)]
        got = f.request(reqs)
        assert got == [(1000 * rnd + i, 0, OK) for i in range(30)]
    for i in range(26, 30):                                          # last writer wins
        assert rig.guest.read_page(dst[i % 4][0])[(i % 8) * 512:(i % 8 + 1) * 512] == \
            disk[i * 512:(i + 1) * 512]


@pytest.mark.parametrize("nseg", [12, 100, 256])
def test_indirect_write_and_read(rig, nseg):
    f = rig.front()
    npages = 32
    src = data_pages(rig, npages, fill=pattern(3))
    segs = [(src[i % npages][1], (i // npages) % 8, (i // npages) % 8) for i in range(nseg)]
    ind_gfn = rig.guest.alloc_page()
    rig.guest.mem.write(ind_gfn * PAGE, B.pack_segments(segs))
    ind_ref = rig.guest.grant(ind_gfn, readonly=True)             # the backend only reads it
    e = B.pack_indirect(B.OP_WRITE, 0xABC, 7, nseg, [ind_ref])
    assert f.request([e]) == [(0xABC, B.OP_WRITE, OK)]                 # op = indirect_op
    expect = b"".join(rig.guest.read_page(src[i % npages][0])[s * 512:(s + 1) * 512]
                      for i, (_r, s, _l) in enumerate(segs))
    assert rig.disk_bytes()[7 * 512:(7 + nseg) * 512] == expect
    dst = data_pages(rig, npages)
    segs = [(dst[i % npages][1], (i // npages) % 8, (i // npages) % 8) for i in range(nseg)]
    rig.guest.mem.write(ind_gfn * PAGE, B.pack_segments(segs))
    e = B.pack_indirect(B.OP_READ, 0xABD, 7, nseg, [ind_ref])
    assert f.request([e]) == [(0xABD, B.OP_READ, OK)]
    got = b"".join(rig.guest.read_page(dst[i % npages][0])[s * 512:(s + 1) * 512]
                   for i, (_r, s, _l) in enumerate(segs))
    assert got == expect


def test_indirect_refusals(rig):
    f = rig.front()
    (g, ref), = data_pages(rig, 1)
    ind_gfn = rig.guest.alloc_page()
    ind_ref = rig.guest.grant(ind_gfn, readonly=True)
    rig.guest.mem.write(ind_gfn * PAGE, B.pack_segments([(ref, 0, 7), (ref, 3, 2)]))
    got = f.request([
        B.pack_indirect(B.OP_READ, 1, 0, 1, [ind_ref]),         # fine
        B.pack_indirect(B.OP_READ, 2, 0, 2, [ind_ref]),         # second segment bad
        B.pack_indirect(B.OP_READ, 3, 0, 0, [ind_ref]),         # no segments
        B.pack_indirect(B.OP_WRITE, 4, 0, 257, [ind_ref]),      # more than offered
        B.pack_indirect(B.OP_FLUSH_DISKCACHE, 5, 0, 1, [ind_ref]),
        B.pack_indirect(B.OP_READ, 6, 0, 1, [9999]),            # bad indirect page ref
        B.pack_indirect(B.OP_READ, 7, 2047, 1, [ind_ref]),      # last sector + 7 past end
    ])
    assert got == [(1, 0, OK), (2, 0, ERR), (3, 0, ERR), (4, 1, ERR),
                   (5, B.OP_INDIRECT, NOTSUPP), (6, 0, ERR), (7, 0, ERR)]


def test_flush_and_barrier(rig):
    f = rig.front()
    (g, ref), = data_pages(rig, 1, fill=pattern(4))
    got = f.request([B.pack_request(B.OP_FLUSH_DISKCACHE, 1, 0),
                     B.pack_request(B.OP_WRITE_BARRIER, 2, 0),
                     B.pack_request(B.OP_FLUSH_DISKCACHE, 3, 16, [(ref, 0, 7)]),
                     B.pack_request(B.OP_WRITE_BARRIER, 4, 24, [(ref, 0, 0)])])
    assert got == [(1, 3, OK), (2, 2, OK), (3, 3, OK), (4, 2, OK)]
    page = rig.guest.read_page(g)
    disk = rig.disk_bytes()
    assert disk[16 * 512:24 * 512] == page and disk[24 * 512:25 * 512] == page[:512]
    assert rig.be.stats.flushes == 4


def test_discard_punches_a_hole(rig):
    f = rig.front()
    assert rig.disk_bytes()[4096:12288] != bytes(8192)
    got = f.request([B.pack_discard(1, 8, 16),                # 4 KiB .. 12 KiB
                     B.pack_discard(2, 101, 3),               # unaligned: still zeroed
                     B.pack_discard(3, 0, 1, secure=True),    # discard-secure=0
                     B.pack_discard(4, 2040, 9),              # past the end
                     B.pack_discard(5, 2047, 1)])             # the last sector
    assert got == [(1, 5, OK), (2, 5, OK), (3, 5, NOTSUPP), (4, 5, ERR), (5, 5, OK)]
    disk = rig.disk_bytes()
    assert len(disk) == len(rig.original)
    assert disk[4096:12288] == bytes(8192)
    assert disk[101 * 512:104 * 512] == bytes(1536)
    assert disk[2047 * 512:] == bytes(512)
    assert disk[:4096] == rig.original[:4096]                 # secure discard did nothing
    assert disk[12288:101 * 512] == rig.original[12288:101 * 512]
    assert disk[104 * 512:2040 * 512] == rig.original[104 * 512:2040 * 512]
    # and the guest reads zeroes back
    (g, ref), = data_pages(rig, 1, fill=lambda i: b"\xff" * PAGE)
    assert f.request([B.pack_request(B.OP_READ, 6, 8, [(ref, 0, 7)])]) == [(6, 0, OK)]
    assert rig.guest.read_page(g) == bytes(PAGE)


def test_discard_disabled(tmp_path):
    r = Rig(tmp_path / "nd.img", discard=False)
    try:
        assert r.be_key("feature-discard") == "0" and r.be_key("discard-granularity") is None
        f = r.front()
        assert f.request([B.pack_discard(1, 0, 8)]) == [(1, 5, NOTSUPP)]
        assert r.disk_bytes() == r.original
    finally:
        r.close()


def test_read_only_disk(ro_rig):
    rig = ro_rig
    assert rig.be_key("feature-discard") == "0"
    f = rig.front()
    assert rig.be_key("info") == str(B.VDISK_READONLY)
    src = data_pages(rig, 2, readonly=True, fill=pattern(5))
    ind_gfn = rig.guest.alloc_page()
    rig.guest.mem.write(ind_gfn * PAGE, B.pack_segments([(src[0][1], 0, 7)]))
    ind = rig.guest.grant(ind_gfn, readonly=True)
    got = f.request([B.pack_request(B.OP_WRITE, 1, 0, [(src[0][1], 0, 7)]),
                     B.pack_request(B.OP_WRITE_BARRIER, 2, 0, [(src[0][1], 0, 7)]),
                     B.pack_request(B.OP_FLUSH_DISKCACHE, 3, 0, [(src[1][1], 0, 7)]),
                     B.pack_discard(4, 0, 64),
                     B.pack_indirect(B.OP_WRITE, 5, 0, 1, [ind]),
                     B.pack_request(B.OP_FLUSH_DISKCACHE, 6, 0)])
    assert got == [(1, 1, ERR), (2, 2, ERR), (3, 3, ERR), (4, 5, ERR), (5, 1, ERR),
                   (6, 3, OK)]
    assert rig.disk_bytes() == rig.original
    (g, ref), = data_pages(rig, 1)
    assert f.request([B.pack_request(B.OP_READ, 7, 3, [(ref, 0, 7)])]) == [(7, 0, OK)]
    assert rig.guest.read_page(g) == rig.original[3 * 512:11 * 512]


def test_grant_refusals(rig):
    f = rig.front(persistent=False)
    g = rig.guest
    (ro_gfn, ro_ref), = data_pages(rig, 1, readonly=True, fill=pattern(6))
    (w_gfn, w_ref), = data_pages(rig, 1, fill=pattern(7))
    other = g.grant(g.alloc_page(), domid=3)                     # granted to another domain
    transfer = g.grant(g.alloc_page(), flags=X.GTF_accept_transfer)
    invalid = g.grant(g.alloc_page(), flags=X.GTF_invalid)
    nomem = g.grant(0x7FFFF)                                     # no such frame
    xenpage = g.grant(GNT_WINDOW)                                # the grant table itself
    before_ram, before_gt = ram_outside_rings(rig, f), g.grant_table()
    reqs = [B.pack_request(B.OP_READ, 1, 0, [(ro_ref, 0, 7)]),   # read into a ro grant
            B.pack_request(B.OP_READ, 2, 0, [(w_ref, 0, 7), (other, 0, 7)]),
            B.pack_request(B.OP_READ, 3, 0, [(transfer, 0, 7)]),
            B.pack_request(B.OP_READ, 4, 0, [(invalid, 0, 7)]),
            B.pack_request(B.OP_READ, 5, 0, [(nomem, 0, 7)]),
            B.pack_request(B.OP_READ, 6, 0, [(xenpage, 0, 7)]),
            B.pack_request(B.OP_WRITE, 7, 0, [(xenpage, 0, 7)]),
            B.pack_request(B.OP_READ, 8, 0, [(512, 0, 7)]),       # beyond the table
            B.pack_request(B.OP_READ, 9, 0, [(2**32 - 1, 0, 7)]),
            B.pack_request(B.OP_WRITE, 10, 0, [(other, 0, 7)])]
    assert f.request(reqs) == [(i, 1 if i in (7, 10) else 0, ERR) for i in range(1, 11)]
    assert ram_outside_rings(rig, f) == before_ram and g.grant_table() == before_gt
    assert rig.disk_bytes() == rig.original


def test_bad_requests_answered(rig):
    f = rig.front()
    (g, ref), = data_pages(rig, 1)
    e = bytearray(B.pack_request(B.OP_READ, 3, 0, [(ref, 0, 7)]))
    e[1] = 12
    unknown = bytearray(B.pack_request(B.OP_READ, 4, 0))
    unknown[0] = 0x42
    got = f.request([B.pack_request(B.OP_READ, 1, 0),               # no segments
                     B.pack_request(B.OP_READ, 2, 0, [(ref, 5, 4)]),
                     bytes(e), bytes(unknown),
                     B.pack_request(B.OP_RESERVED_1, 5, 0),
                     B.pack_request(B.OP_READ, 6, 2041, [(ref, 0, 7)]),   # 1 past the end
                     B.pack_request(B.OP_READ, 7, 2**64 - 1, [(ref, 0, 0)]),
                     B.pack_request(B.OP_READ, 2**64 - 1, 2040, [(ref, 0, 7)])])
    assert got == [(1, 0, ERR), (2, 0, ERR), (3, 0, ERR), (4, 0x42, NOTSUPP),
                   (5, 4, NOTSUPP), (6, 0, ERR), (7, 0, ERR), (2**64 - 1, 0, OK)]
    assert rig.guest.read_page(g) == rig.original[2040 * 512:]


# --- notifications ---------------------------------------------------------------------------

def test_backend_notifies_when_asked(rig):
    f = rig.front()
    ev = rig.guest.xd.evtchn
    port = f.rings[0].port
    (g, ref), = data_pages(rig, 1)
    rig.guest.xd.clear_port_bits(port)
    f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])])
    assert rig.wait(lambda: ev.is_pending(port))    # rsp_event was rsp_cons + 1
    rig.guest.xd.clear_port_bits(port)
    f.rings[0].set_word(3, f.rings[0].rsp_cons + 1000)   # frontend: do not tell me
    f.submit([B.pack_request(B.OP_READ, 2, 0, [(ref, 0, 7)])])
    assert rig.wait(lambda: f.rings[0].rsp_prod == f.rings[0].rsp_cons + 1)
    time.sleep(0.01)
    assert not ev.is_pending(port)


def test_notification_rule_is_respected_by_both_ends(rig):
    """The frontend notifies only when req_event asks: responses still come, i.e. the
    backend re-arms req_event before sleeping."""
    f = rig.front()
    (g, ref), = data_pages(rig, 1)
    for i in range(50):
        assert f.request([B.pack_request(B.OP_READ, i, i, [(ref, 0, 0)])]) == [(i, 0, OK)]
    # (a request pushed before the worker re-armed req_event needs no notification: the
    # worker's second check in RING_FINAL_CHECK_FOR_REQUESTS finds it)
    assert 1 <= f.rings[0].notifies <= 50
    assert rig.wait(lambda: f.rings[0].req_event == f.rings[0].req_prod + 1)


def test_ring_pages_recorded_dirty(rig):
    f = rig.front()
    (g, ref), = data_pages(rig, 1)
    rig.guest.mem.vmm_dirty.clear()
    assert f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])]) == [(1, 0, OK)]
    assert g in rig.guest.mem.vmm_dirty                      # the data page is
    assert f.rings[0].gfns[0] in rig.guest.mem.vmm_dirty     # the ring page is not


def test_ring_indices_near_wrap(rig):
    f = rig.front(start_index=2**32 - 7)
    (g, ref), = data_pages(rig, 1)
    for k in range(4):
        got = f.request([B.pack_request(B.OP_READ, 10 * k + i, i, [(ref, 0, 0)])
                         for i in range(5)])
        assert got == [(10 * k + i, 0, OK) for i in range(5)]
    assert f.rings[0].rsp_prod == (2**32 - 7 + 20) & 0xFFFFFFFF


# --- persistent grants, multi-page rings, multi-queue, reconnect --------------------------------

def test_persistent_grants_pinned_while_connected(rig):
    f = rig.front(persistent=True)
    pages = data_pages(rig, 3, fill=pattern(8))
    (ro_gfn, ro_ref), = data_pages(rig, 1, readonly=True, fill=pattern(9))
    got = f.request([B.pack_request(B.OP_WRITE, 1, 0, [(pages[0][1], 0, 7)]),
                     B.pack_request(B.OP_READ, 2, 8, [(pages[1][1], 0, 7)]),
                     B.pack_request(B.OP_WRITE, 3, 16, [(ro_ref, 0, 7)])])
    assert got == [(1, 1, OK), (2, 0, OK), (3, 1, OK)]
    flags = lambda ref: rig.guest.grant_entry(ref)[0]  # noqa: E731
    assert flags(pages[0][1]) & PIN_BITS == PIN_BITS
    assert flags(pages[1][1]) & PIN_BITS == PIN_BITS
    assert flags(pages[2][1]) & PIN_BITS == 0          # never used
    assert flags(ro_ref) & X.GTF_writing == 0          # a read-only grant is never pinned rw
    assert flags(ro_ref) & PIN_BITS == 0
    # the pinned mapping is used again (same data path)
    assert f.request([B.pack_request(B.OP_READ, 4, 0, [(pages[1][1], 0, 7)])]) == [(4, 0, OK)]
    assert rig.guest.read_page(pages[1][0]) == rig.guest.read_page(pages[0][0])
    assert f.close()
    assert flags(pages[0][1]) & PIN_BITS == 0 and flags(pages[1][1]) & PIN_BITS == 0
    assert flags(pages[0][1]) == X.GTF_permit_access   # nothing else changed


def test_not_persistent_when_frontend_declines(rig):
    f = rig.front(persistent=False)
    assert rig.be_key("feature-persistent") == "0"
    (g, ref), = data_pages(rig, 1)
    assert f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])]) == [(1, 0, OK)]
    assert rig.guest.grant_entry(ref)[0] == X.GTF_permit_access


@pytest.mark.parametrize("order", [1, 2, 4])
def test_multi_page_ring(rig, order):
    f = rig.front(ring_page_order=order)
    ring = f.rings[0]
    assert len(ring.gfns) == 1 << order and ring.size == {1: 64, 2: 128, 4: 512}[order]
    assert all(b - a > 1 for a, b in zip(ring.gfns, ring.gfns[1:]))   # not contiguous
    assert rig.server.read(f"{f.fe}/ring-ref{(1 << order) - 1}")
    (g, ref), = data_pages(rig, 1)
    for lap in range(3):                                 # full rings, every slot used
        reqs = [B.pack_request(B.OP_READ, lap << 32 | i, i % 2048, [(ref, i % 8, i % 8)])
                for i in range(ring.size)]
        assert f.request(reqs) == [(lap << 32 | i, 0, OK) for i in range(ring.size)]


def test_multi_queue(rig):
    f = rig.front(queues=2, ring_page_order=1)
    assert rig.server.read(f"{f.fe}/queue-1/event-channel")
    assert len(rig.be.queues) == 2
    assert {q.thread.name for q in rig.be.queues} == \
        {f"blkback-d{DOMID}-{DEVID}-q0", f"blkback-d{DOMID}-{DEVID}-q1"}
    pages = data_pages(rig, 2, fill=pattern(10))
    f.submit([B.pack_request(B.OP_WRITE, 100 + i, 8 * i, [(pages[0][1], 0, 7)])
              for i in range(20)], queue=0)
    f.submit([B.pack_request(B.OP_WRITE, 200 + i, 8 * (20 + i), [(pages[1][1], 0, 7)])
              for i in range(20)], queue=1)
    r1 = [B.unpack_response(r) for r in f.wait_responses(20, queue=1)]
    r0 = [B.unpack_response(r) for r in f.wait_responses(20, queue=0)]
    assert r0 == [(100 + i, 1, OK) for i in range(20)]
    assert r1 == [(200 + i, 1, OK) for i in range(20)]
    disk = rig.disk_bytes()
    assert disk[:20 * 4096] == rig.guest.read_page(pages[0][0]) * 20
    assert disk[20 * 4096:40 * 4096] == rig.guest.read_page(pages[1][0]) * 20


def test_reconnect(rig):
    ev = rig.guest.xd.evtchn
    f = rig.front()
    old_port = f.rings[0].port
    (g, ref), = data_pages(rig, 1)
    assert f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])]) == [(1, 0, OK)]
    assert f.close()
    assert rig.be.state == CLOSED and rig.be.queues == []
    assert ev.status(X.DOMID_SELF, old_port)[0] == UNBOUND      # dom0 end closed
    f.set_state(INITIALISING)
    assert f.wait_backend(INITWAIT)
    f.connect()                                                 # fresh rings and ports
    assert f.rings[0].port != old_port
    assert f.request([B.pack_request(B.OP_READ, 2, 8, [(ref, 0, 7)])]) == [(2, 0, OK)]
    assert rig.guest.read_page(g) == rig.original[8 * 512:16 * 512]
    # and once more, now with two queues and a bigger ring
    assert f.close()
    f.set_state(INITIALISING)
    assert f.wait_backend(INITWAIT)
    f.nqueues, f.order = 2, 2
    f.connect()
    assert f.request([B.pack_request(B.OP_READ, 3, 16, [(ref, 0, 7)])], queue=1) == \
        [(3, 0, OK)]


def test_ring_error_closes_the_device(rig):
    f = rig.front()
    ring = f.rings[0]
    (g, ref), = data_pages(rig, 1)
    assert f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])]) == [(1, 0, OK)]
    q = rig.be.queues[0]
    ring.set_word(0, ring.req_prod + 33)                        # more than a 32-slot ring
    rig.guest.xd.evtchn.send(ring.port)
    assert f.wait_backend(CLOSING)
    assert "req_prod" in (rig.be_key("error") or "")
    assert rig.wait(lambda: not q.thread.is_alive())
    assert q.broken and rig.be.queues == []
    assert ring.rsp_prod == ring.rsp_cons                       # nothing answered
    # the guest recovers with a clean reconnect
    assert f.close()
    f.set_state(INITIALISING)
    assert f.wait_backend(INITWAIT)
    f.connect()
    assert f.request([B.pack_request(B.OP_READ, 2, 0, [(ref, 0, 7)])]) == [(2, 0, OK)]


def test_ring_error_with_requests_already_queued_at_connect(rig):
    f = rig.front(connect=False)
    f.setup_rings()
    f.rings[0].set_word(0, 1000)                                # before the backend attaches
    f.write_keys()
    f.set_state(3)
    assert f.wait_backend(CLOSING)
    f.set_state(CLOSED)
    assert f.wait_backend(CLOSED)


def unbound_for_dom0(rig, port):
    st_ = rig.guest.xd.evtchn.status(X.DOMID_SELF, port)
    return st_[0] == UNBOUND and st_[2][:2] == b"\0\0"


@pytest.mark.parametrize("breakage", [
    "protocol", "ring-ref", "ro-ring", "event-channel", "order", "queues", "queue1-ref",
    "port-not-for-dom0", "garbage-number", "xenpage-ring", "other-dom-ring"])
def test_connect_refused(rig, breakage):
    f = rig.front(connect=False, queues=2 if breakage == "queue1-ref" else 1)
    f.setup_rings()
    f.write_keys()
    pre = "queue-0/" if f.nqueues > 1 else ""
    if breakage == "protocol":
        f.fe_write("protocol", "x86_32-abi")
    elif breakage == "ring-ref":
        f.fe_write("ring-ref", "4096")
    elif breakage == "ro-ring":
        rig.guest.grant(f.rings[0].gfns[0], readonly=True, ref=f.rings[0].refs[0])
    elif breakage == "event-channel":
        rig.server.rm(f"{f.fe}/event-channel")
    elif breakage == "order":
        f.fe_write("ring-page-order", "5")
    elif breakage == "queues":
        f.fe_write("multi-queue-num-queues", "5")
    elif breakage == "queue1-ref":
        f.fe_write("queue-1/ring-ref", "9999")
    elif breakage == "port-not-for-dom0":
        p = rig.guest.xd.evtchn.alloc_unbound(X.DOMID_SELF, X.DOMID_SELF)
        f.fe_write(f"{pre}event-channel", str(p))
    elif breakage == "garbage-number":
        f.fe_write("ring-ref", "eight")
    elif breakage == "xenpage-ring":                         # the grant table frame
        rig.guest.grant(GNT_WINDOW, ref=f.rings[0].refs[0])
    elif breakage == "other-dom-ring":
        rig.guest.grant(f.rings[0].gfns[0], domid=1, ref=f.rings[0].refs[0])
    f.set_state(3)
    assert f.wait_backend(CLOSING)
    assert rig.be_key("error")
    assert rig.be.queues == [] and not rig.be.connected
    for ring in f.rings:                                     # nothing left bound
        assert unbound_for_dom0(rig, ring.port)
    f.set_state(CLOSED)
    assert f.wait_backend(CLOSED)


def test_toolstack_close_handshake(rig):
    f = rig.front()
    (g, ref), = data_pages(rig, 1)
    assert f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])]) == [(1, 0, OK)]
    rig.be.request_close()
    assert rig.be_key("online") == "0" and f.backend_state() == CLOSING
    assert not rig.be.closed_event.is_set()
    assert f.request([B.pack_request(B.OP_READ, 2, 0, [(ref, 0, 7)])]) == [(2, 0, OK)]
    assert f.close()                                 # blkfront answers Closing with Closed
    assert rig.be.closed_event.wait(5)
    assert rig.be.queues == [] and rig.guest.grant_entry(ref)[0] & PIN_BITS == 0
    f.set_state(INITIALISING)                        # being removed: no reconnect
    time.sleep(0.05)
    assert f.backend_state() == CLOSED


def test_stop_while_connected_releases_everything(tmp_path):
    r = Rig(tmp_path / "s.img")
    f = r.front()
    (g, ref), = data_pages(r, 1)
    assert f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)])]) == [(1, 0, OK)]
    threads = [q.thread for q in r.be.queues]
    assert r.guest.grant_entry(ref)[0] & PIN_BITS
    r.be.stop()
    assert not any(t.is_alive() for t in threads)
    assert r.guest.grant_entry(ref)[0] & PIN_BITS == 0
    assert unbound_for_dom0(r, f.rings[0].port)
    r.bus.close()
    r.guest.close()


# --- fuzz: a reference model of the backend's answers and effects --------------------------------

FUZZ_SECTORS = 256
RING_REF_BASE = 400            # the frontend's ring grants live far from the fuzzed refs


class TouchesRing(Exception):
    """The example would make the backend move data to/from the ring page itself (allowed
    for a frontend, but then the ring contents are no longer the model's)."""


class World:
    """A connected device with a fixed set of grants of every kind, and a model of what the
    backend must do with any ring entry."""

    def __init__(self, path, readonly, persistent):
        self.rig = Rig(path, readonly=readonly, disk_sectors=FUZZ_SECTORS, ram=1 << 20, seed=7)
        g = self.rig.guest
        self.readonly = readonly
        self.refs = {}
        for kind, n, kw in [("w", 6, {}), ("ro", 3, {"readonly": True}),
                            ("other", 1, {"domid": 3}),
                            ("transfer", 1, {"flags": X.GTF_accept_transfer}),
                            ("invalid", 1, {"flags": X.GTF_invalid}),
                            ("ind", 3, {"readonly": True})]:
            for _ in range(n):
                gfn = g.alloc_page()
                g.mem.write(gfn * PAGE, random.Random(gfn).randbytes(PAGE))
                self.refs.setdefault(kind, []).append(g.grant(gfn, **kw))
        self.refs["nomem"] = [g.grant(0x7FFFF)]
        self.refs["xenpage"] = [g.grant(GNT_WINDOW)]
        self.refs["beyond"] = [512, 4096, 2**32 - 1]
        self.refs["zero"] = [0]
        self.pool = sorted({r for v in self.refs.values() for r in v})
        self.ind_gfns = [g.grant_entry(r)[2] for r in self.refs["ind"]]
        g.next_ref = RING_REF_BASE
        self.front = self.rig.front(persistent=persistent)
        self.ring_gfns = set(self.front.rings[0].gfns)
        self.table0 = g.grant_table()

    # the model -----------------------------------------------------------------------
    def frame(self, ref, write):
        """Xen's grant check + 'is guest RAM': the frame, or None."""
        if not 0 <= ref < 512:
            return None
        flags, dom, frame = struct.unpack_from("<HHI", self.table0, ref * 8)
        if flags & 3 != X.GTF_permit_access or dom != 0 or (write and flags & X.GTF_readonly):
            return None
        return frame if (frame + 1) * PAGE <= self.rig.guest.ram_bytes else None

    def model(self, entry, disk, ram):
        op, b1 = entry[0], entry[1]
        rid, sector = struct.unpack_from("<QQ", entry, 8)

        def transfer(o, segs):
            if any(f > last or last > 7 for _g, f, last in segs):
                return ERR
            if self.readonly and o != B.OP_READ:
                return ERR
            total = sum(last - f + 1 for _g, f, last in segs)
            if sector + total > FUZZ_SECTORS:
                return ERR
            frames = [self.frame(gref, o == B.OP_READ) for gref, _f, _l in segs]
            if None in frames:
                return ERR
            if self.ring_gfns & set(frames):
                raise TouchesRing
            pos = sector * 512
            for fr, (_g, f, last) in zip(frames, segs):
                a, n = fr * PAGE + f * 512, (last - f + 1) * 512
                if o == B.OP_READ:
                    ram[a:a + n] = disk[pos:pos + n]
                else:
                    disk[pos:pos + n] = ram[a:a + n]
                pos += n
            return OK

        if op in (B.OP_READ, B.OP_WRITE, B.OP_WRITE_BARRIER, B.OP_FLUSH_DISKCACHE):
            if b1 > 11 or (b1 == 0 and op in (B.OP_READ, B.OP_WRITE)):
                return rid, op, ERR
            segs = [struct.unpack_from("<IBB", entry, 24 + 8 * i) for i in range(b1)]
            if any(f > last or last > 7 for _g, f, last in segs):
                return rid, op, ERR
            if self.readonly and op != B.OP_READ and (segs or op == B.OP_WRITE_BARRIER):
                return rid, op, ERR
            return rid, op, transfer(op, segs) if segs else OK
        if op == B.OP_DISCARD:
            (nr,) = struct.unpack_from("<Q", entry, 24)
            if self.readonly:
                return rid, op, ERR
            if b1 & B.DISCARD_SECURE:
                return rid, op, NOTSUPP
            if sector + nr > FUZZ_SECTORS or nr == 0:
                return rid, op, ERR
            disk[sector * 512:(sector + nr) * 512] = bytes(nr * 512)
            return rid, op, OK
        if op == B.OP_INDIRECT:
            (n,) = struct.unpack_from("<H", entry, 2)
            if b1 not in (B.OP_READ, B.OP_WRITE):
                return rid, B.OP_INDIRECT, NOTSUPP
            if not 0 < n <= 256:
                return rid, b1, ERR
            fr = self.frame(struct.unpack_from("<I", entry, 28)[0], False)
            if fr is None:
                return rid, b1, ERR
            if fr in self.ring_gfns:
                raise TouchesRing
            page = bytes(ram[fr * PAGE:(fr + 1) * PAGE])
            segs = [struct.unpack_from("<IBB", page, 8 * i) for i in range(n)]
            return rid, b1, transfer(b1, segs)
        return rid, op, NOTSUPP

    # one example ---------------------------------------------------------------------
    def run(self, entries, indirect_pages):
        g = self.rig.guest
        for gfn, content in zip(self.ind_gfns, indirect_pages):
            if content is not None:
                g.mem.write(gfn * PAGE, content.ljust(PAGE, b"\0"))
        ram0, disk0 = g.ram(), self.rig.disk_bytes()
        ram, disk = bytearray(ram0), bytearray(disk0)
        try:
            expect = [self.model(e, disk, ram) for e in entries]
        except TouchesRing:
            event("rejected: touches the ring")
            reject()
        got = self.front.request(entries, timeout=10)
        assert got == expect
        for e, (_id, op, status) in zip(entries, got):
            event(f"{'indirect ' if e[0] == B.OP_INDIRECT else ''}op {op} -> {status}")
        ram1, disk1 = g.ram(), self.rig.disk_bytes()
        assert len(disk1) == len(disk0) == FUZZ_SECTORS * 512
        assert disk1 == bytes(disk)
        writable = {self.frame(r, True) for r in self.pool} - {None}
        for p in range(len(ram1) // PAGE):
            a, b = ram1[p * PAGE:(p + 1) * PAGE], ram[p * PAGE:(p + 1) * PAGE]
            if p in self.ring_gfns:
                continue
            if a != ram0[p * PAGE:(p + 1) * PAGE]:
                assert p in writable, f"page {p:#x} changed but was not granted writable"
            assert a == b, f"page {p:#x} differs from the model"
        table = g.grant_table()
        for ref in range(512):
            now = struct.unpack_from("<HHI", table, ref * 8)
            was = struct.unpack_from("<HHI", self.table0, ref * 8)
            assert now[1:] == was[1:] and now[0] & ~PIN_BITS == was[0] & ~PIN_BITS
            if now[0] & PIN_BITS:                    # only persistent rw grants of RAM
                assert self.frame(ref, True) is not None and now[0] & PIN_BITS == PIN_BITS
        q = self.rig.be.queues[0]
        assert q.thread.is_alive() and not q.broken
        assert self.rig.be.state == CONNECTED


@pytest.fixture(scope="module", params=[(False, True), (False, False), (True, False)],
                ids=["rw-persistent", "rw", "readonly"])
def world(request, tmp_path_factory):
    readonly, persistent = request.param
    w = World(tmp_path_factory.mktemp("fuzz") / "disk.img", readonly, persistent)
    yield w
    w.rig.close()


def gref(w):
    return st.one_of(st.sampled_from(w.pool), st.integers(0, 2**32 - 1))


def sector_s():
    return st.one_of(st.integers(0, FUZZ_SECTORS + 2), st.integers(FUZZ_SECTORS - 90,
                     FUZZ_SECTORS), st.integers(0, 2**64 - 1), st.just(2**64 - 1))


def seg_s(w):
    sect = st.one_of(st.integers(0, 7), st.integers(0, 7), st.integers(0, 255))
    return st.tuples(st.sampled_from(w.pool), sect, sect)


@st.composite
def good_seg(draw, refs):
    first = draw(st.integers(0, 7))
    return draw(st.sampled_from(refs)), first, draw(st.integers(first, 7))


@st.composite
def segments(draw, w, op, min_size, max_size):
    """Mostly a well-formed list (usable grants, sectors inside the page), sometimes with one
    fault injected, sometimes anything."""
    mode = draw(st.integers(0, 3))
    if mode == 0:
        return draw(st.lists(seg_s(w), min_size=min_size, max_size=max_size))
    refs = w.refs["w"] if op == B.OP_READ else w.refs["w"] + w.refs["ro"]
    segs = draw(st.lists(good_seg(refs), min_size=max(1, min_size), max_size=max_size))
    if mode == 1:
        segs[draw(st.integers(0, len(segs) - 1))] = draw(seg_s(w))
    return segs


def sector_for(draw, segs):
    total = sum(max(0, last - first + 1) for _g, first, last in segs)
    if draw(st.integers(0, 3)):
        return draw(st.integers(0, max(0, FUZZ_SECTORS - total)))
    return draw(sector_s())


@st.composite
def structured(draw, w):
    """(entry, (indirect page slot, content) or None)"""
    kind = draw(st.sampled_from(["rw", "rw", "rw", "discard", "indirect", "indirect",
                                 "unknown"]))
    rid = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 64)))
    if kind == "rw":
        op = draw(st.sampled_from([B.OP_READ, B.OP_READ, B.OP_WRITE, B.OP_WRITE,
                                   B.OP_WRITE_BARRIER, B.OP_FLUSH_DISKCACHE]))
        segs = draw(segments(w, op, 0, 11))
        sector = sector_for(draw, segs)
        e = bytearray(B.pack_request(op, rid, sector, segs, handle=draw(st.integers(0, 0xFFFF))))
        if draw(st.integers(0, 9)) == 0:
            e[1] = draw(st.integers(0, 255))                  # a lying nr_segments
        return bytes(e), None
    if kind == "discard":
        nr = draw(st.one_of(st.integers(0, 64), st.integers(0, FUZZ_SECTORS + 1),
                            st.integers(0, 2**64 - 1)))
        sector = draw(st.one_of(st.integers(0, max(0, FUZZ_SECTORS - nr)), sector_s()))
        return B.pack_discard(rid, sector, nr, secure=draw(st.integers(0, 7)) == 0), None
    if kind == "indirect":
        iop = draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3, 5, 6, 0xFF]))
        segs = draw(segments(w, iop, 1, 40))
        sector = sector_for(draw, segs)
        n = draw(st.one_of(st.just(len(segs)), st.just(len(segs)), st.just(len(segs)),
                           st.sampled_from([0, 256, 257, 0xFFFF]), st.integers(0, 300)))
        slot = draw(st.integers(0, len(w.refs["ind"]) - 1))
        ind = draw(st.one_of(st.just(w.refs["ind"][slot]), st.just(w.refs["ind"][slot]),
                             gref(w)))
        return B.pack_indirect(iop, rid, sector, n, [ind]), (slot, B.pack_segments(segs))
    e = bytearray(B.pack_request(B.OP_READ, rid, draw(sector_s()), [(w.pool[0], 0, 7)]))
    e[0] = draw(st.sampled_from([4, 7, 8, 0x80, 0xFF]))
    return bytes(e), None


@st.composite
def raw_entry(draw, w):
    e = bytearray(draw(st.binary(min_size=112, max_size=112)))
    if draw(st.booleans()):
        e[0] = draw(st.integers(0, 7))
    if e[0] in (0, 1, 2, 3) and draw(st.booleans()):
        e[1] = draw(st.integers(0, 12))
    for i in range(11):                                         # grefs: mostly ones we know
        if draw(st.integers(0, 3)):
            off = 28 if e[0] == B.OP_INDIRECT and i == 0 else 24 + 8 * i
            struct.pack_into("<I", e, off, draw(st.sampled_from(w.pool)))
            if e[0] != B.OP_INDIRECT:
                e[off + 4] = draw(st.integers(0, 8))
                e[off + 5] = draw(st.integers(0, 8))
    if e[0] == B.OP_INDIRECT and draw(st.booleans()):
        e[1] = draw(st.integers(0, 1))
        struct.pack_into("<H", e, 2, draw(st.integers(0, 300)))
    if draw(st.booleans()):
        struct.pack_into("<Q", e, 16, draw(st.integers(0, FUZZ_SECTORS)))
    return bytes(e), None


def run_batch(w, batch):
    pages = [None] * len(w.ind_gfns)
    for _e, ind in batch:
        if ind is not None:
            slot, content = ind
            pages[slot] = content
    w.run([e for e, _ in batch], pages)


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_fuzz_structured(world, data):
    batch = data.draw(st.lists(structured(world), min_size=1, max_size=8))
    run_batch(world, batch)


@FUZZ
@given(data=st.data())
def test_fuzz_raw_entries(world, data):
    batch = data.draw(st.lists(raw_entry(world), min_size=1, max_size=8))
    run_batch(world, batch)


def test_fuzz_world_still_works(world):
    """After the fuzzing the device still serves a plain read."""
    w = world
    ref = w.refs["w"][0]
    got = w.front.request([B.pack_request(B.OP_READ, 77, 0, [(ref, 0, 7)])])
    assert got == [(77, 0, OK)]
    assert w.rig.guest.read_page(w.frame(ref, True)) == w.rig.disk_bytes()[:PAGE]


@settings(max_examples=15, deadline=None)
@given(ahead=st.one_of(st.integers(33, 2**32 - 1), st.sampled_from([33, 2**31, 2**32 - 1])),
       valid_first=st.integers(0, 5))
def test_fuzz_ring_overflow_is_fatal_not_a_crash(tmp_path_factory, ahead, valid_first):
    r = Rig(tmp_path_factory.mktemp("ovf") / "d.img", disk_sectors=64)
    try:
        f = r.front()
        (g, ref), = data_pages(r, 1)
        if valid_first:
            f.request([B.pack_request(B.OP_READ, i, 0, [(ref, 0, 7)])
                       for i in range(valid_first)])
        ring = f.rings[0]
        ring.set_word(0, ring.req_prod + ahead)
        r.guest.xd.evtchn.send(ring.port)
        assert f.wait_backend(CLOSING)
        assert r.be.queues == []
        assert r.disk_bytes() == r.original
        assert f.close()
    finally:
        r.close()


def test_os_errors_become_error_responses(rig):
    f = rig.front()
    (g, ref), = data_pages(rig, 1)
    os.close(rig.disk.fd)                                   # the image went away under us
    rig.disk.fd = os.open(os.devnull, os.O_RDONLY)          # reads 0 bytes: short transfer
    got = f.request([B.pack_request(B.OP_READ, 1, 0, [(ref, 0, 7)]),
                     B.pack_request(B.OP_WRITE, 2, 0, [(ref, 0, 7)]),
                     B.pack_discard(3, 0, 8),
                     B.pack_indirect(B.OP_READ, 4, 0, 1, [ref]),
                     B.pack_request(B.OP_FLUSH_DISKCACHE, 5, 0)])
    assert [x[:2] for x in got] == [(1, 0), (2, 1), (3, 5), (4, 0), (5, 3)]
    assert [x[2] for x in got[:4]] == [ERR] * 4
    assert rig.be.queues[0].thread.is_alive()
