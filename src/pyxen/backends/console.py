"""PV console backend (xenconsoled's role) on the ring at HVM_PARAM_CONSOLE_PFN.

Ring layout (xen/include/public/io/console.h, ``struct xencons_interface``): in[1024] @0
(backend -> guest), out[2048] @1024 (guest -> backend), in_cons @3072, in_prod @3076,
out_cons @3080, out_prod @3084. Indices are free-running u32; position = idx & (size - 1).

:func:`drain_out` and :func:`fill_in` are the sans-IO ring logic over a 4 KiB buffer; the
:class:`ConsoleBackend` binds them to a guest page and event channel.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

IN_SIZE, OUT_SIZE = 1024, 2048
IN_OFF, OUT_OFF = 0, 1024
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084


def _set_index(page: memoryview, offset: int, value: int) -> None:
    """Store a ring index as one aligned 4-byte write (``struct.pack_into`` writes byte by
    byte, and the guest may read the index concurrently from another CPU)."""
    page[offset:offset + 4].cast("I")[0] = value & 0xFFFFFFFF


def drain_out(page: memoryview) -> bytes:
    """Consume everything the guest produced in ``out``; returns the bytes (never more than
    the ring holds, even if the guest wrote inconsistent indices)."""
    cons, prod = struct.unpack_from("<II", page, OUT_CONS)
    avail = (prod - cons) & 0xFFFFFFFF
    if avail > OUT_SIZE:                       # a broken or hostile guest: resynchronise
        _set_index(page, OUT_CONS, prod)
        return b""
    out = bytearray()
    for i in range(avail):
        out.append(page[OUT_OFF + ((cons + i) & (OUT_SIZE - 1))])
    _set_index(page, OUT_CONS, cons + avail)
    return bytes(out)


def fill_in(page: memoryview, data: bytes) -> int:
    """Produce as much of ``data`` into ``in`` as fits; returns how many bytes were queued."""
    cons, prod = struct.unpack_from("<II", page, IN_CONS)
    used = (prod - cons) & 0xFFFFFFFF
    if used > IN_SIZE:
        return 0
    n = min(len(data), IN_SIZE - used)
    for i in range(n):
        page[IN_OFF + ((prod + i) & (IN_SIZE - 1))] = data[i]
    _set_index(page, IN_PROD, prod + n)
    return n


class ConsoleBackend:
    """Serves one guest's hvc0. ``emit(bytes)`` receives output; :meth:`send_input` types."""

    def __init__(self, page: memoryview, raise_event: Callable[[], None],
                 emit: Callable[[bytes], None]) -> None:
        self.page = page
        self.raise_event = raise_event
        self.emit = emit
        self.pending_input = bytearray()
        self.lock = threading.Lock()

    def notified(self, _port: int = 0) -> None:
        """The guest signalled the console event channel: drain output, push queued input."""
        with self.lock:
            data = drain_out(self.page)
            sent = self._push()
        if data:
            self.emit(data)
        if data or sent:
            self.raise_event()

    def send_input(self, data: bytes) -> None:
        with self.lock:
            self.pending_input += data
            sent = self._push()
        if sent:
            self.raise_event()

    def _push(self) -> int:
        if not self.pending_input:
            return 0
        n = fill_in(self.page, bytes(self.pending_input))
        del self.pending_input[:n]
        return n
