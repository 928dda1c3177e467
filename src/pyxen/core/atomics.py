"""Atomic read-modify-write on guest memory (8-byte words), for state the guest updates too.

Event-channel bitmaps in shared_info/vcpu_info are changed concurrently by the guest with
``lock``-prefixed instructions; a plain Python read-modify-write would lose its updates. These
wrappers call libatomic's lock-free 8-byte primitives on host addresses of mapped guest RAM.
Callers pass host virtual addresses that are 8-byte aligned and stay mapped for the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_SEQ_CST = 5


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:  # pragma: no cover - install step provides libatomic1
        raise ImportError(f"pyxen needs libatomic (Debian package libatomic1): {e}") from e
    for fn in ("__atomic_fetch_or_8", "__atomic_fetch_and_8", "__atomic_exchange_8"):
        f = getattr(lib, fn)
        f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
        f.restype = ctypes.c_uint64
    f = lib.__atomic_compare_exchange_8
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_bool,
                  ctypes.c_int, ctypes.c_int]
    f.restype = ctypes.c_bool
    return lib


_lib = _load()
_fetch_or = _lib.__atomic_fetch_or_8
_fetch_and = _lib.__atomic_fetch_and_8
_exchange = _lib.__atomic_exchange_8
_cmpxchg = _lib.__atomic_compare_exchange_8


def fetch_or(addr: int, value: int) -> int:
    """``*addr |= value``; returns the old value."""
    return _fetch_or(addr, value, _SEQ_CST)


def fetch_and(addr: int, value: int) -> int:
    """``*addr &= value``; returns the old value."""
    return _fetch_and(addr, value, _SEQ_CST)


def exchange(addr: int, value: int) -> int:
    """``old = *addr; *addr = value``; returns ``old``."""
    return _exchange(addr, value, _SEQ_CST)


def compare_exchange(addr: int, expected: int, desired: int) -> tuple[bool, int]:
    """If ``*addr == expected`` store ``desired``. Returns (swapped, value seen)."""
    seen = ctypes.c_uint64(expected)
    ok = _cmpxchg(addr, ctypes.addressof(seen), desired, False, _SEQ_CST, _SEQ_CST)
    return bool(ok), seen.value


def load(addr: int) -> int:
    """One aligned 8-byte load."""
    return ctypes.c_uint64.from_address(addr).value


def test_and_set_bit(base: int, bit: int) -> bool:
    """Set bit ``bit`` of the bitmap at ``base`` (u64 words); True if it was already set."""
    mask = 1 << (bit & 63)
    return bool(_fetch_or(base + (bit >> 6) * 8, mask, _SEQ_CST) & mask)


def test_and_clear_bit(base: int, bit: int) -> bool:
    """Clear bit ``bit``; True if it was set."""
    mask = 1 << (bit & 63)
    return bool(_fetch_and(base + (bit >> 6) * 8, ~mask & 0xFFFFFFFFFFFFFFFF, _SEQ_CST) & mask)


def test_bit(base: int, bit: int) -> bool:
    return bool(ctypes.c_uint64.from_address(base + (bit >> 6) * 8).value >> (bit & 63) & 1)


_fence_word = ctypes.c_uint64(0)


def full_barrier() -> None:
    """A full memory barrier (a locked exchange): orders this thread's earlier stores before
    its later loads, as ``mb()`` does in the ring macros of Xen's io/ring.h."""
    _exchange(ctypes.addressof(_fence_word), 0, _SEQ_CST)
