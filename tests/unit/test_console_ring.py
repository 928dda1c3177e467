"""pyxen.backends.console: the xencons_interface ring logic and ConsoleBackend."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxen.backends.console import (IN_CONS, IN_OFF, IN_PROD, IN_SIZE, OUT_CONS, OUT_OFF,
                                    OUT_PROD, OUT_SIZE, ConsoleBackend, drain_out, fill_in)

M32 = 0xFFFFFFFF


def new_page(in_idx: int = 0, out_idx: int = 0) -> memoryview:
    page = memoryview(bytearray(4096))
    struct.pack_into("<IIII", page, IN_CONS, in_idx, in_idx, out_idx, out_idx)
    return page


def idx(page: memoryview, off: int) -> int:
    return struct.unpack_from("<I", page, off)[0]


# --- the guest's side of the ring (what Linux's hvc_xen does)

def guest_write(page: memoryview, data: bytes) -> int:
    cons, prod = idx(page, OUT_CONS), idx(page, OUT_PROD)
    n = min(len(data), OUT_SIZE - ((prod - cons) & M32))
    for i in range(n):
        page[OUT_OFF + ((prod + i) & (OUT_SIZE - 1))] = data[i]
    struct.pack_into("<I", page, OUT_PROD, (prod + n) & M32)
    return n


def guest_read(page: memoryview) -> bytes:
    cons, prod = idx(page, IN_CONS), idx(page, IN_PROD)
    n = (prod - cons) & M32
    assert n <= IN_SIZE
    data = bytes(page[IN_OFF + ((cons + i) & (IN_SIZE - 1))] for i in range(n))
    struct.pack_into("<I", page, IN_CONS, (cons + n) & M32)
    return data


def test_layout_is_xencons_interface():
    assert (IN_OFF, IN_SIZE, OUT_OFF, OUT_SIZE) == (0, 1024, 1024, 2048)
    assert (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD) == (3072, 3076, 3080, 3084)


def test_drain_out_empty():
    page = new_page(out_idx=123)
    assert drain_out(page) == b""
    assert idx(page, OUT_CONS) == 123


def test_drain_out_wraps_indices_past_2_32():
    page = new_page(out_idx=2**32 - 5)
    assert guest_write(page, b"hello, world") == 12
    assert idx(page, OUT_PROD) == 7                    # the producer index wrapped
    assert drain_out(page) == b"hello, world"
    assert idx(page, OUT_CONS) == 7
    assert drain_out(page) == b""


def test_drain_out_full_ring_wrapping_buffer():
    page = new_page(out_idx=2**32 - 100)
    data = bytes(i * 7 & 0xFF for i in range(OUT_SIZE))
    assert guest_write(page, data + b"more") == OUT_SIZE
    assert drain_out(page) == data
    assert idx(page, OUT_CONS) == idx(page, OUT_PROD) == OUT_SIZE - 100


@pytest.mark.parametrize("cons,prod", [(0, OUT_SIZE + 1), (2**32 - 10, 5000), (100, 99),
                                       (0, 2**31)])
def test_hostile_out_ring_resynchronises(cons, prod):
    page = new_page()
    page[OUT_OFF:OUT_OFF + OUT_SIZE] = b"x" * OUT_SIZE
    struct.pack_into("<II", page, OUT_CONS, cons, prod)
    assert drain_out(page) == b""
    assert idx(page, OUT_CONS) == prod and idx(page, OUT_PROD) == prod
    assert guest_write(page, b"ok") == 2               # and the ring works again
    assert drain_out(page) == b"ok"


def test_fill_in_wraps_and_fills():
    page = new_page(in_idx=2**32 - 3)
    assert fill_in(page, b"abcdef") == 6
    assert idx(page, IN_PROD) == 3
    assert guest_read(page) == b"abcdef"
    big = bytes(range(256)) * 5                         # 1280 > IN_SIZE
    assert fill_in(page, big) == IN_SIZE
    assert fill_in(page, b"z") == 0                     # full
    assert (idx(page, IN_PROD) - idx(page, IN_CONS)) & M32 == IN_SIZE
    assert guest_read(page) == big[:IN_SIZE]
    assert fill_in(page, b"") == 0


def test_fill_in_partially_full():
    page = new_page(in_idx=2**32 - 1)
    assert fill_in(page, b"a" * 1000) == 1000
    assert fill_in(page, b"b" * 100) == IN_SIZE - 1000
    assert guest_read(page) == b"a" * 1000 + b"b" * (IN_SIZE - 1000)


def test_fill_in_hostile_indices():
    page = new_page()
    struct.pack_into("<II", page, IN_CONS, 0, IN_SIZE + 1)
    assert fill_in(page, b"abc") == 0
    assert bytes(page[IN_OFF:IN_OFF + IN_SIZE]) == bytes(IN_SIZE)   # nothing written
    assert idx(page, IN_PROD) == IN_SIZE + 1


@given(start=st.one_of(st.integers(0, M32), st.integers(2**32 - 3000, M32)),
       sizes=st.lists(st.integers(0, 3000), max_size=12))
def test_out_stream_round_trip(start, sizes):
    page = new_page(out_idx=start)
    sent, got = bytearray(), bytearray()
    counter = 0
    for size in sizes:
        chunk = bytes((counter + i) & 0xFF for i in range(size))
        counter += size
        n = guest_write(page, chunk)
        assert n == min(size, OUT_SIZE)                 # ring was drained before each write
        sent += chunk[:n]
        got += drain_out(page)
    assert got == sent
    assert idx(page, OUT_CONS) == (start + len(sent)) & M32


@given(start=st.one_of(st.integers(0, M32), st.integers(2**32 - 2000, M32)),
       sizes=st.lists(st.integers(0, 1500), max_size=12),
       reads=st.lists(st.booleans(), max_size=12))
def test_in_stream_round_trip(start, sizes, reads):
    page = new_page(in_idx=start)
    queued, got = bytearray(), bytearray()
    for i, size in enumerate(sizes):
        chunk = bytes((len(queued) + j) * 13 & 0xFF for j in range(size))
        free = IN_SIZE - ((idx(page, IN_PROD) - idx(page, IN_CONS)) & M32)
        n = fill_in(page, chunk)
        assert n == min(size, free)
        queued += chunk[:n]
        if i < len(reads) and reads[i]:
            got += guest_read(page)
    got += guest_read(page)
    assert got == queued


# --- ConsoleBackend

class Recorder:
    def __init__(self) -> None:
        self.events = 0
        self.out: list[bytes] = []

    def raise_event(self) -> None:
        self.events += 1

    def emit(self, data: bytes) -> None:
        self.out.append(data)


def backend(page: memoryview) -> tuple[ConsoleBackend, Recorder]:
    r = Recorder()
    return ConsoleBackend(page, r.raise_event, r.emit), r


def test_notified_drains_output():
    page = new_page(out_idx=2**32 - 2)
    be, r = backend(page)
    be.notified(7)
    assert r.out == [] and r.events == 0                # nothing to do: no event
    guest_write(page, b"login: ")
    be.notified(7)
    assert r.out == [b"login: "] and r.events == 1      # consumed: tell the guest


def test_send_input_and_backpressure():
    page = new_page(in_idx=2**32 - 10)
    be, r = backend(page)
    be.send_input(b"root\n")
    assert r.events == 1 and guest_read(page) == b"root\n"
    data = bytes(range(256)) * 6                        # 1536 bytes: more than the ring
    be.send_input(data)
    assert r.events == 2
    assert len(be.pending_input) == len(data) - IN_SIZE
    be.send_input(b"!")                                 # ring full: queued, no event
    assert r.events == 2 and len(be.pending_input) == len(data) - IN_SIZE + 1
    first = guest_read(page)
    be.notified()                                       # guest consumed and notified us
    assert r.events == 3 and be.pending_input == bytearray()
    assert first + guest_read(page) == data + b"!"
    assert r.out == []
