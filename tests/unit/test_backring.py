"""pyxen.backends.ring: the back end of a Xen shared ring (io/ring.h) over page buffers,
driven by a frontend written here from ring.h's FRONT_RING macros."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.backends.ring import HEADER, PAGE, BackRing, RingError, RingPages, ring_size

M32 = 0xFFFFFFFF


# --- geometry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pages,entry,size", [
    (1, 112, 32), (2, 112, 64), (4, 112, 128), (8, 112, 256), (16, 112, 512),   # blkif
    (1, 12, 256), (1, 8, 256), (2, 12, 512), (4, 8, 1024),                        # netif tx/rx
    (1, 4032, 1), (1, 64, 32), (1, 63, 64), (1, 2016, 2), (1, 2017, 1),
])
def test_ring_size(pages, entry, size):
    assert ring_size(pages, entry) == size


def test_ring_size_no_room():
    with pytest.raises(ValueError):
        ring_size(1, 4033)
    with pytest.raises(ValueError):
        ring_size(0, 8)


def test_ring_pages_must_be_whole_pages():
    with pytest.raises(ValueError):
        RingPages([])
    with pytest.raises(ValueError):
        RingPages([memoryview(bytearray(PAGE)), memoryview(bytearray(100))])


# --- a frontend over separate page buffers -----------------------------------------------------

class Front:
    """FRONT_RING over ``pages`` (each its own buffer, as non-contiguous grants map)."""

    def __init__(self, npages: int, entry: int, start: int = 0) -> None:
        self.maps = [mmap.mmap(-1, PAGE) for _ in range(npages)]   # page aligned, separate
        self.bufs = [memoryview(m) for m in self.maps]
        self.entry = entry
        self.size = ring_size(npages, entry)
        self.set(0, start)                       # req_prod
        self.set(1, start + 1)                   # req_event
        self.set(2, start)                       # rsp_prod
        self.set(3, start + 1)                   # rsp_event
        self.req_prod_pvt = self.rsp_cons = start & M32

    def get(self, i):
        return struct.unpack_from("<I", self.bufs[0], 4 * i)[0]

    def set(self, i, v):
        struct.pack_into("<I", self.bufs[0], 4 * i, v & M32)

    def write(self, off, data):
        for k, b in enumerate(data):
            p, o = divmod(off + k, PAGE)
            self.bufs[p][o] = b

    def read(self, off, n):
        out = bytearray()
        for k in range(n):
            p, o = divmod(off + k, PAGE)
            out.append(self.bufs[p][o])
        return bytes(out)

    def slot(self, idx):
        return HEADER + (idx & (self.size - 1)) * self.entry

    def put(self, data):
        self.write(self.slot(self.req_prod_pvt), data.ljust(self.entry, b"\0"))
        self.req_prod_pvt = (self.req_prod_pvt + 1) & M32

    def push(self):
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old, new = self.get(0), self.req_prod_pvt
        self.set(0, new)
        return (new - self.get(1)) & M32 < (new - old) & M32

    def responses(self, n):
        out = []
        for _ in range(n):
            assert self.rsp_cons != self.get(2)
            out.append(self.read(self.slot(self.rsp_cons), self.entry))
            self.rsp_cons = (self.rsp_cons + 1) & M32
        assert self.rsp_cons == self.get(2)
        return out

    def back(self, **kw):
        return BackRing(RingPages(self.bufs), self.entry, **kw)


def entry_bytes(i: int, size: int) -> bytes:
    return bytes((i * 7 + k) & 0xFF for k in range(size))


def test_header_and_slots():
    f = Front(1, 112)
    b = f.back()
    assert b.size == 32 and b.req_cons == 0 and b.rsp_prod_pvt == 0
    assert b._slot(0) == 64 and b._slot(31) == 64 + 31 * 112 and b._slot(32) == 64
    assert b.state() == {"req_cons": 0, "rsp_prod_pvt": 0}


@pytest.mark.parametrize("npages,entry,straddle", [
    (1, 112, False), (2, 112, False),           # slot 36 starts exactly at 4096
    (4, 112, True),                             # slot 72: 8128..8239 spans pages 1 and 2
    (2, 80, True), (4, 48, True), (16, 112, True)])
def test_round_trip_straddling_pages(npages, entry, straddle):
    f = Front(npages, entry)
    b = f.back()
    straddlers = [i for i in range(f.size)
                  if f.slot(i) // PAGE != (f.slot(i) + entry - 1) // PAGE]
    assert bool(straddlers) == straddle
    if (npages, entry) == (4, 112):
        assert 72 in straddlers
    # three laps so every slot (straddlers included) carries requests and responses
    for lap in range(3):
        reqs = [entry_bytes(lap * 1000 + i, entry) for i in range(f.size)]
        for r in reqs:
            f.put(r)
        f.push()
        got = b.take()
        assert got == reqs
        for r in got:
            b.put_response(r[::-1])
        b.push_responses()
        assert f.responses(f.size) == [r[::-1] for r in reqs]
        assert not b.final_check()


def test_take_limit_and_partial():
    f = Front(1, 112)
    b = f.back()
    for i in range(10):
        f.put(entry_bytes(i, 112))
    f.push()
    assert b.pending() == 10
    assert b.take(3) == [entry_bytes(i, 112) for i in range(3)]
    assert b.pending() == 7 and b.req_cons == 3
    assert b.take() == [entry_bytes(i, 112) for i in range(3, 10)]
    assert b.take() == [] and b.pending() == 0


def test_short_response_and_too_long():
    f = Front(1, 112)
    b = f.back()
    f.put(b"\xAA" * 112)
    f.push()
    b.take()
    b.put_response(b"\x01" * 16)
    b.push_responses()
    assert f.responses(1)[0][:16] == b"\x01" * 16
    with pytest.raises(ValueError):
        b.put_response(bytes(113))


@pytest.mark.parametrize("start", [M32 - 4, M32, M32 - 31, 2**31 - 3])
def test_wrap_around_near_2_32(start):
    f = Front(2, 112, start=start)
    b = f.back()
    assert b.rsp_prod_pvt == start and b.req_cons == start     # BACK_RING_ATTACH
    n = 0
    for batch in (5, 64, 1, 37):
        reqs = [entry_bytes(n + i, 112) for i in range(batch)]
        n += batch
        for r in reqs:
            f.put(r)
        f.push()
        assert b.pending() == batch
        assert b.take() == reqs
        for r in reqs:
            b.put_response(r[:16])
        b.push_responses()
        assert [x[:16] for x in f.responses(batch)] == [r[:16] for r in reqs]
        assert not b.final_check()
    assert b.req_cons == b.rsp_prod_pvt == (start + n) & M32 == f.get(2)
    assert f.get(1) == (start + n + 1) & M32                   # req_event armed past wrap


def test_resume_from_saved_state():
    f = Front(1, 112, start=100)
    b = f.back()
    for i in range(4):
        f.put(entry_bytes(i, 112))
    f.push()
    b.take(2)
    b.put_response(b"x" * 16)
    b.push_responses()
    saved = b.state()
    assert saved == {"req_cons": 102, "rsp_prod_pvt": 101}
    b2 = f.back(**saved)
    assert b2.pending() == 2
    assert b2.take() == [entry_bytes(2, 112), entry_bytes(3, 112)]


# --- notification rules ------------------------------------------------------------------------

def test_push_responses_notify_vs_rsp_event():
    """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: notify iff rsp_event is in (old, new]."""
    f = Front(1, 112)
    b = f.back()
    for i in range(20):
        f.put(entry_bytes(i, 112))
    f.push()
    b.take()
    assert not b.push_responses()                   # nothing new: never notify
    for case_event, count, expect in [
        (1, 1, True),        # frontend waits for response 1 (old 0, new 1)
        (1, 1, False),       # event 1 already passed (old 1, new 2)
        (5, 2, False),       # new 4 < 5
        (5, 1, True),        # new 5 == event
        (7, 3, True),        # event inside (5, 8]
        (100, 2, False),     # far ahead
        (9, 1, False),       # behind old (10): frontend already saw it
    ]:
        f.set(3, case_event)
        for _ in range(count):
            b.put_response(b"r" * 16)
        assert b.push_responses() is expect, (case_event, count)
        assert f.get(2) == b.rsp_prod_pvt


def test_push_responses_notify_across_wrap():
    f = Front(1, 112, start=M32 - 1)
    b = f.back()
    for i in range(4):
        f.put(entry_bytes(i, 112))
    f.push()
    b.take()
    f.set(3, 0)                                      # waits for index 0 == 2**32
    b.put_response(b"a" * 16)                        # new = M32: not yet
    assert not b.push_responses()
    b.put_response(b"b" * 16)                        # new = 0: event reached
    assert b.push_responses()


def test_final_check_arms_req_event():
    f = Front(1, 112)
    b = f.back()
    assert not b.final_check()
    assert f.get(1) == 1                             # req_event = req_cons + 1
    f.put(entry_bytes(0, 112))
    assert f.push()                                  # the frontend must notify now
    assert b.final_check()                           # work pending: req_event left alone
    assert f.get(1) == 1
    b.take()
    b.put_response(b"z" * 16)
    b.push_responses()
    assert not b.final_check()
    assert f.get(1) == 2
    f.put(entry_bytes(1, 112))
    f.put(entry_bytes(2, 112))
    assert f.push()                                  # req_event 2 in (1, 3]
    f.put(entry_bytes(3, 112))
    assert not f.push()                              # backend not re-armed: no notify needed
    assert b.final_check() and len(b.take()) == 3


def test_final_check_sees_request_racing_the_arm():
    """A request produced after the first check but before req_event is written is caught by
    the second check (the frontend may not have notified)."""
    f = Front(1, 112)
    b = f.back()
    real = b.pending
    calls = []

    def pending_with_race():
        calls.append(1)
        if len(calls) == 1:
            n = real()
            f.put(entry_bytes(9, 112))
            f.set(0, f.req_prod_pvt)                 # produced without seeing the new event
            return n
        return real()

    b.pending = pending_with_race
    assert b.final_check() is True and len(calls) == 2


# --- protocol violations -----------------------------------------------------------------------

@pytest.mark.parametrize("ahead", [33, 64, 2**31, M32])
def test_req_prod_too_far_ahead(ahead):
    f = Front(1, 112)
    b = f.back()
    f.set(0, ahead)
    with pytest.raises(RingError):
        b.pending()
    with pytest.raises(RingError):
        b.take()
    with pytest.raises(RingError):
        b.final_check()


def test_req_prod_full_ring_is_fine_but_one_more_is_not():
    f = Front(1, 112, start=M32 - 10)
    b = f.back()
    f.set(0, (M32 - 10 + 32) & M32)
    assert b.pending() == 32
    b.take(10)
    for _ in range(10):
        b.put_response(b"k" * 16)
    f.set(0, (M32 - 10 + 42) & M32)                  # 32 ahead of rsp_prod_pvt: still OK
    assert b.pending() == 32
    f.set(0, (M32 - 10 + 43) & M32)
    with pytest.raises(RingError):
        b.pending()


def test_req_prod_moving_backwards():
    f = Front(1, 112, start=50)
    b = f.back()
    f.set(0, 49)
    with pytest.raises(RingError):
        b.take()


@settings(max_examples=60, deadline=None)
@given(npages=st.sampled_from([1, 2, 4]), entry=st.sampled_from([8, 12, 112]),
       start=st.one_of(st.just(0), st.integers(M32 - 600, M32), st.integers(0, M32)),
       batches=st.lists(st.integers(0, 40), min_size=1, max_size=8))
def test_model(npages, entry, start, batches):
    f = Front(npages, entry, start)
    b = f.back()
    seq = 0
    for k in batches:
        k = min(k, f.size)
        reqs = [entry_bytes(seq + i, entry) for i in range(k)]
        seq += k
        for r in reqs:
            f.put(r)
        f.push()
        got = []
        while True:
            got += b.take(7)
            if not b.final_check():
                break
        assert got == reqs
        for r in got:
            b.put_response(r[::-1])
        b.push_responses()
        assert f.responses(k) == [r[::-1] for r in reqs]
        assert f.get(1) == (start + seq + 1) & M32
