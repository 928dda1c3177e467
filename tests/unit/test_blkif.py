"""pyxen.backends.blkif: the blkif wire format (x86_64 ABI of io/blkif.h) and request checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.backends import blkif as B

U64 = 2**64 - 1


def raw_rw(op, nseg, handle, rid, sector, segs=()):
    """An rw entry packed by hand from blkif.h's blkif_request (packed, x86_64)."""
    body = struct.pack("<BBHIQQ", op, nseg, handle, 0, rid, sector)
    body += b"".join(struct.pack("<IBBH", g, f, last, 0) for g, f, last in segs)
    return body.ljust(112, b"\0")


# --- layouts ---------------------------------------------------------------------------------

def test_constants_are_blkif_h():
    assert (B.OP_READ, B.OP_WRITE, B.OP_WRITE_BARRIER, B.OP_FLUSH_DISKCACHE, B.OP_RESERVED_1,
            B.OP_DISCARD, B.OP_INDIRECT) == (0, 1, 2, 3, 4, 5, 6)
    assert (B.RSP_OKAY, B.RSP_ERROR, B.RSP_EOPNOTSUPP) == (0, -1, -2)
    assert B.MAX_SEGMENTS_PER_REQUEST == 11
    assert B.MAX_INDIRECT_PAGES_PER_REQUEST == 8
    assert B.SEGMENTS_PER_INDIRECT_FRAME == 512
    assert B.DISCARD_SECURE == 1
    assert (B.VDISK_CDROM, B.VDISK_REMOVABLE, B.VDISK_READONLY) == (1, 2, 4)
    assert (B.ENTRY_SIZE, B.RESPONSE_SIZE, B.SECTOR, B.SECTORS_PER_PAGE) == (112, 16, 512, 8)
    assert B.PROTOCOL_X86_64 == "x86_64-abi"


def test_request_layout():
    segs = [(0x11223344, 1, 6), (0xAABBCCDD, 0, 7)]
    e = B.pack_request(B.OP_WRITE, 0x0102030405060708, 0x1112131415161718, segs, handle=0xBEEF)
    assert len(e) == 112
    assert e[0] == 1 and e[1] == 2                                   # op, nr_segments
    assert e[2:4] == b"\xef\xbe" and e[4:8] == bytes(4)              # handle, _pad1
    assert e[8:16] == bytes.fromhex("0807060504030201")              # id
    assert e[16:24] == bytes.fromhex("1817161514131211")             # sector_number
    assert e[24:32] == bytes.fromhex("44332211" "01" "06" "0000")    # seg[0]
    assert e[32:40] == bytes.fromhex("ddccbbaa" "00" "07" "0000")    # seg[1]
    assert e[40:] == bytes(72)
    assert 24 + 11 * 8 == 112                                        # seg[11] fills the entry
    assert e == raw_rw(1, 2, 0xBEEF, 0x0102030405060708, 0x1112131415161718, segs)
    assert B.pack_segments(segs) == e[24:40]


def test_indirect_layout():
    e = B.pack_indirect(B.OP_READ, 0x0102030405060708, 0x99, 0x1234, [5, 6, 7], handle=0x0A0B)
    assert len(e) == 112
    assert e[0] == B.OP_INDIRECT and e[1] == B.OP_READ
    assert struct.unpack_from("<H", e, 2)[0] == 0x1234               # nr_segments u16 at 2
    assert e[4:8] == bytes(4)
    assert struct.unpack_from("<Q", e, 8)[0] == 0x0102030405060708   # id at 8
    assert struct.unpack_from("<Q", e, 16)[0] == 0x99                # sector at 16
    assert struct.unpack_from("<H", e, 24)[0] == 0x0A0B              # handle at 24
    assert struct.unpack_from("<8I", e, 28) == (5, 6, 7, 0, 0, 0, 0, 0)   # grefs at 28
    assert e[60:] == bytes(52)


def test_discard_layout():
    e = B.pack_discard(0x77, 0x1000, 0x2000, secure=True)
    assert len(e) == 112
    assert e[0] == B.OP_DISCARD and e[1] == B.DISCARD_SECURE          # op, flag
    assert struct.unpack_from("<QQQ", e, 8) == (0x77, 0x1000, 0x2000)   # id, sector, nr_sectors
    assert B.pack_discard(1, 2, 3)[1] == 0


def test_response_layout():
    r = B.pack_response(0xFEDCBA9876543210, B.OP_INDIRECT, B.RSP_EOPNOTSUPP)
    assert r[:8] == bytes.fromhex("1032547698badcfe")                 # id
    assert r[8] == 6 and r[9] == 0                                    # operation, pad
    assert r[10:12] == b"\xfe\xff"                                    # int16 status at 10
    assert B.unpack_response(r) == (0xFEDCBA9876543210, 6, -2)
    assert B.unpack_response(B.pack_response(1, 0, B.RSP_ERROR)) == (1, 0, -1)
    assert B.pack_response(-1, 0x106, 0)[8] == 6                      # masked to the fields
    assert B.unpack_response(B.pack_response(-1, 0, 0))[0] == U64



def test_response_is_16_bytes():
    r = B.pack_response(1, B.OP_READ, B.RSP_OKAY)
    assert len(r) == B.RESPONSE_SIZE == 16 and r[12:] == bytes(4)

# --- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [B.OP_READ, B.OP_WRITE, B.OP_WRITE_BARRIER,
                                B.OP_FLUSH_DISKCACHE])
def test_parse_rw(op):
    segs = [(100 + i, i % 8, 7) for i in range(11)]
    r = B.parse_request(B.pack_request(op, 42, 1000, segs, handle=3))
    assert (r.ring_op, r.operation, r.id, r.sector, r.nr_segments, r.handle) == \
        (op, op, 42, 1000, 11, 3)
    assert r.segments == [B.Segment(g, f, last) for g, f, last in segs]
    assert r.nbytes == sum((7 - i % 8 + 1) * 512 for i in range(11))
    assert r.indirect_grefs == ()


def test_parse_only_nr_segments_segments():
    e = bytearray(B.pack_request(B.OP_READ, 1, 0, [(9, 0, 7)]))
    e[32:40] = struct.pack("<IBBH", 1234, 9, 3, 0)          # junk in seg[1]: not looked at
    r = B.parse_request(bytes(e))
    assert r.segments == [B.Segment(9, 0, 7)]


@pytest.mark.parametrize("op", [B.OP_WRITE_BARRIER, B.OP_FLUSH_DISKCACHE])
def test_flush_and_barrier_without_segments(op):
    r = B.parse_request(B.pack_request(op, 7, 0))
    assert r.operation == op and r.segments == [] and r.nbytes == 0


def test_parse_discard():
    r = B.parse_request(B.pack_discard(9, 2048, 4096))
    assert (r.ring_op, r.operation, r.id, r.sector, r.nr_sectors, r.secure) == \
        (B.OP_DISCARD, B.OP_DISCARD, 9, 2048, 4096, False)
    assert B.parse_request(B.pack_discard(9, 0, 1, secure=True)).secure
    e = bytearray(B.pack_discard(9, 0, 1))
    e[1] = 0xFE                                              # other flag bits: not secure
    assert not B.parse_request(bytes(e)).secure


@pytest.mark.parametrize("iop", [B.OP_READ, B.OP_WRITE])
def test_parse_indirect(iop):
    r = B.parse_request(B.pack_indirect(iop, 77, 123, 100, [55, 66]))
    assert (r.ring_op, r.operation, r.id, r.sector, r.nr_segments) == \
        (B.OP_INDIRECT, iop, 77, 123, 100)
    assert r.indirect_grefs == (55,)                        # 100 segments fit one page
    assert r.segments == []
    r = B.parse_request(B.pack_indirect(iop, 1, 0, 256, [1, 2]))
    assert r.indirect_grefs == (1,)
    r = B.parse_request(B.pack_indirect(iop, 1, 0, 513, [1, 2, 3]), max_indirect_segments=1024)
    assert r.indirect_grefs == (1, 2)                       # 513 segments need two pages
    r = B.parse_request(B.pack_indirect(iop, 1, 0, 4096, list(range(10, 18))),
                        max_indirect_segments=4096)
    assert r.indirect_grefs == tuple(range(10, 18))


def test_indirect_segments_from_pages():
    segs = [(1000 + i, 0, 7) for i in range(600)]
    raw = B.pack_segments(segs)
    assert len(raw) == 4800
    parsed = B.parse_segments(raw, 600)
    assert parsed[0] == B.Segment(1000, 0, 7) and parsed[599] == B.Segment(1599, 0, 7)
    assert B.parse_segments(raw, 3) == [B.Segment(1000 + i, 0, 7) for i in range(3)]


def bad(entry, **kw):
    with pytest.raises(B.BadRequest) as ei:
        B.parse_request(entry, **kw)
    return ei.value.id, ei.value.op, ei.value.status


@pytest.mark.parametrize("op", [B.OP_RESERVED_1, 7, 8, 0x80, 0xFF])
def test_unknown_operation_is_eopnotsupp(op):
    e = bytearray(B.pack_request(B.OP_READ, 0xABCDEF, 0, [(1, 0, 7)]))
    e[0] = op
    assert bad(bytes(e)) == (0xABCDEF, op, B.RSP_EOPNOTSUPP)


@pytest.mark.parametrize("op", [B.OP_READ, B.OP_WRITE])
@pytest.mark.parametrize("nseg", [0, 12, 0xFF])
def test_rw_segment_count_out_of_range(op, nseg):
    assert bad(raw_rw(op, nseg, 0, 5, 0, [(1, 0, 7)] * 11)) == (5, op, B.RSP_ERROR)


@pytest.mark.parametrize("op", [B.OP_WRITE_BARRIER, B.OP_FLUSH_DISKCACHE])
def test_flush_segment_count_out_of_range(op):
    assert bad(raw_rw(op, 12, 0, 6, 0, [(1, 0, 7)] * 11)) == (6, op, B.RSP_ERROR)


@pytest.mark.parametrize("first,last", [(1, 0), (7, 6), (0, 8), (8, 8), (0, 255), (255, 255)])
def test_segment_outside_page(first, last):
    e = B.pack_request(B.OP_READ, 9, 0, [(1, 0, 7), (2, first, last)])
    assert bad(e) == (9, B.OP_READ, B.RSP_ERROR)


@pytest.mark.parametrize("first,last", [(0, 0), (7, 7), (0, 7), (3, 5)])
def test_segment_inside_page(first, last):
    r = B.parse_request(B.pack_request(B.OP_WRITE, 9, 0, [(1, first, last)]))
    assert r.nbytes == (last - first + 1) * 512


@pytest.mark.parametrize("n", [0, 257, 0xFFFF])
def test_indirect_segment_count_out_of_range(n):
    assert bad(B.pack_indirect(B.OP_WRITE, 3, 0, n, [1])) == (3, B.OP_WRITE, B.RSP_ERROR)
    r = B.parse_request(B.pack_indirect(B.OP_WRITE, 3, 0, 256, [1]))
    assert r.nr_segments == 256
    assert bad(B.pack_indirect(B.OP_READ, 3, 0, 9, [1]), max_indirect_segments=8)[2] == \
        B.RSP_ERROR


@pytest.mark.parametrize("iop", [B.OP_WRITE_BARRIER, B.OP_FLUSH_DISKCACHE, B.OP_RESERVED_1,
                                 B.OP_DISCARD, B.OP_INDIRECT, 0xFF])
def test_indirect_with_bad_indirect_op(iop):
    # Refused before anything else. (Linux's blkback answers RSP_ERROR with the indirect_op
    # as operation; pyxen answers EOPNOTSUPP with BLKIF_OP_INDIRECT. A frontend never sends
    # this, so either is harmless.)
    assert bad(B.pack_indirect(iop, 0x55, 0, 4, [1])) == (0x55, B.OP_INDIRECT, B.RSP_EOPNOTSUPP)


def test_indirect_segments_checked_after_loading():
    r = B.parse_request(B.pack_indirect(B.OP_READ, 8, 0, 2, [1]))
    r.segments = B.parse_segments(B.pack_segments([(1, 0, 7), (2, 4, 3)]), 2)
    with pytest.raises(B.BadRequest) as ei:
        B.check_segments(r)
    assert (ei.value.id, ei.value.op, ei.value.status) == (8, B.OP_READ, B.RSP_ERROR)


def test_response_op_for_indirect_is_indirect_op():
    for iop in (B.OP_READ, B.OP_WRITE):
        r = B.parse_request(B.pack_indirect(iop, 1, 10**6, 8, [1]))
        assert r.operation == iop and r.ring_op == B.OP_INDIRECT
        r.segments = [B.Segment(1, 0, 7)] * 8
        with pytest.raises(B.BadRequest) as ei:
            B.check_bounds(r, 100)
        assert ei.value.op == iop
        assert B.unpack_response(B.pack_response(r.id, r.operation, 0))[1] == iop


def test_writes_property():
    assert not B.parse_request(B.pack_request(B.OP_READ, 1, 0, [(1, 0, 7)])).writes
    assert B.parse_request(B.pack_request(B.OP_WRITE, 1, 0, [(1, 0, 7)])).writes
    assert B.parse_request(B.pack_request(B.OP_WRITE_BARRIER, 1, 0)).writes
    assert not B.parse_request(B.pack_request(B.OP_FLUSH_DISKCACHE, 1, 0)).writes
    assert B.parse_request(B.pack_request(B.OP_FLUSH_DISKCACHE, 1, 0, [(1, 0, 7)])).writes
    assert B.parse_request(B.pack_discard(1, 0, 1)).writes


# --- disk bounds -----------------------------------------------------------------------------

def rw(sector, nsect_per_seg=(8,)):
    return B.parse_request(B.pack_request(B.OP_READ, 1, sector,
                                          [(1, 0, n - 1) for n in nsect_per_seg]))


def test_bounds_exactly_at_the_end():
    B.check_bounds(rw(92), 100)                     # sectors 92..99 of 100
    B.check_bounds(rw(0, [8] * 11), 88)             # the whole disk
    B.check_bounds(rw(99, [1]), 100)                # the last sector
    B.check_bounds(B.parse_request(B.pack_discard(1, 0, 100)), 100)
    B.check_bounds(B.parse_request(B.pack_discard(1, 100, 0)), 100)


@pytest.mark.parametrize("req", [
    lambda: rw(93), lambda: rw(100, [1]), lambda: rw(0, [8] * 11 + []),
    lambda: rw(2**64 - 1, [1]), lambda: rw(2**64 - 8), lambda: rw(2**63),
    lambda: B.parse_request(B.pack_discard(1, 1, 100)),
    lambda: B.parse_request(B.pack_discard(1, 101, 0)),
    lambda: B.parse_request(B.pack_discard(1, 0, 2**64 - 1)),
    lambda: B.parse_request(B.pack_discard(1, 2**64 - 1, 2)),      # u64 wrap-around to 1
    lambda: B.parse_request(B.pack_discard(1, 50, 2**64 - 49)),    # sector + n wraps to 1
])
def test_bounds_past_the_end(req):
    r = req()
    disk = 100 if r.operation == B.OP_DISCARD or r.nbytes < 88 * 512 else 87
    with pytest.raises(B.BadRequest) as ei:
        B.check_bounds(r, disk)
    assert ei.value.status == B.RSP_ERROR and ei.value.op == r.operation


def test_bounds_empty_disk():
    with pytest.raises(B.BadRequest):
        B.check_bounds(rw(0, [1]), 0)
    B.check_bounds(B.parse_request(B.pack_request(B.OP_FLUSH_DISKCACHE, 1, 0)), 0)


@settings(max_examples=200)
@given(sector=st.integers(0, 2**64 - 1), lens=st.lists(st.integers(1, 8), min_size=1,
                                                         max_size=11),
       disk=st.one_of(st.integers(0, 1 << 20), st.integers(0, 2**64 - 1)))
def test_bounds_property(sector, lens, disk):
    r = rw(sector, lens)
    n = sum(lens)
    ok = sector + n <= disk                         # unbounded integers: no wrap-around
    if ok:
        B.check_bounds(r, disk)
    else:
        with pytest.raises(B.BadRequest):
            B.check_bounds(r, disk)


@settings(max_examples=300)
@given(st.binary(min_size=112, max_size=112))
def test_parse_never_raises_anything_else(entry):
    try:
        r = B.parse_request(entry)
    except B.BadRequest as e:
        assert e.status in (B.RSP_ERROR, B.RSP_EOPNOTSUPP)
        assert e.id == struct.unpack_from("<Q", entry, 8)[0]
        return
    assert r.id == struct.unpack_from("<Q", entry, 8)[0]
    assert r.sector == struct.unpack_from("<Q", entry, 16)[0]
    if r.ring_op != B.OP_INDIRECT:
        assert len(r.segments) == r.nr_segments <= 11
        assert all(s.first_sect <= s.last_sect < 8 for s in r.segments)
    else:
        assert 0 < r.nr_segments <= B.MAX_INDIRECT_SEGMENTS and len(r.indirect_grefs) == 1
