"""pyxen.core.atomics: libatomic RMW primitives and bitmap helpers on host memory."""

from __future__ import annotations

import ctypes
import threading

from hypothesis import given
from hypothesis import strategies as st

from pyxen.core import atomics

M64 = 2**64 - 1


def buffer(words: int = 4):
    buf = (ctypes.c_uint64 * words)()
    return buf, ctypes.addressof(buf)


def test_fetch_ops_return_old_value():
    buf, base = buffer(2)
    assert atomics.fetch_or(base, 0b1010) == 0
    assert atomics.fetch_or(base, 0b0110) == 0b1010
    assert buf[0] == 0b1110
    assert atomics.fetch_and(base, ~0b0100 & M64) == 0b1110
    assert buf[0] == 0b1010
    assert atomics.exchange(base, M64) == 0b1010
    assert buf[0] == M64
    assert atomics.fetch_and(base + 8, 0) == 0 and buf[1] == 0     # second word untouched


def test_bit_helpers_across_words():
    buf, base = buffer(4)
    assert not atomics.test_and_set_bit(base, 0)
    assert atomics.test_and_set_bit(base, 0)
    assert not atomics.test_and_set_bit(base, 63)
    assert not atomics.test_and_set_bit(base, 70)
    assert not atomics.test_and_set_bit(base, 255)
    assert list(buf) == [1 | 1 << 63, 1 << 6, 0, 1 << 63]
    assert atomics.test_bit(base, 70) and not atomics.test_bit(base, 71)
    assert atomics.test_and_clear_bit(base, 63)
    assert not atomics.test_and_clear_bit(base, 63)
    assert buf[0] == 1 and buf[1] == 1 << 6
    # the guest sees little-endian u64 bitmaps: bit 70 is byte 8, bit 6
    assert bytes(buf)[8] == 0x40


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 255)), max_size=60))
def test_bits_match_python_model(ops):
    buf, base = buffer(4)
    model = 0
    for set_it, bit in ops:
        was = bool(model >> bit & 1)
        if set_it:
            assert atomics.test_and_set_bit(base, bit) == was
            model |= 1 << bit
        else:
            assert atomics.test_and_clear_bit(base, bit) == was
            model &= ~(1 << bit)
    assert int.from_bytes(bytes(buf), "little") == model
    assert all(atomics.test_bit(base, b) == bool(model >> b & 1) for b in range(256))


def test_concurrent_disjoint_bits_are_never_lost():
    buf, base = buffer(1)
    errors: list[str] = []
    start = threading.Barrier(2)

    def worker(bits: list[int]) -> None:
        start.wait()
        for i in range(10_000):
            b = bits[i % len(bits)]
            if atomics.test_and_set_bit(base, b):
                errors.append(f"bit {b} was already set")
            if not atomics.test_and_clear_bit(base, b):
                errors.append(f"bit {b} lost")       # the other thread clobbered our update
            atomics.test_and_set_bit(base, bits[(i + 1) % len(bits)])
            atomics.test_and_clear_bit(base, bits[(i + 1) % len(bits)])
        for b in bits:
            atomics.test_and_set_bit(base, b)

    evens, odds = list(range(0, 64, 2)), list(range(1, 64, 2))
    threads = [threading.Thread(target=worker, args=(bits,)) for bits in (evens, odds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors[:5]
    assert buf[0] == M64
