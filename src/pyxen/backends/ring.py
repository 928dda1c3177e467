"""The back end of a Xen shared ring (``xen/include/public/io/ring.h``), sans-IO.

A shared ring is a 64-byte header ``{u32 req_prod, req_event, rsp_prod, rsp_event; pad}``
followed by ``size`` entries of ``entry_size`` bytes (the size of the union of request and
response), where ``size`` is the largest power of two that fits in the ring's pages. Indices are
free-running u32 counters; slot = index & (size - 1). The frontend produces requests and
consumes responses; this end does the opposite, keeping two private counters, ``req_cons`` and
``rsp_prod_pvt`` (the ``BACK_RING`` of ring.h), which are the ring's whole saved state.

A ring may span several pages (multi-page rings). The backend sees each granted page as its own
buffer; :class:`RingPages` gives one byte-addressed view over them, so an entry that straddles
a page boundary still reads and writes as a whole.

Everything here works on buffers only (no grants, no event channels): the device code maps the
pages, and raises the event channel when :meth:`BackRing.push_responses` says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyxen.core.atomics import full_barrier

PAGE = 4096
HEADER = 64
M32 = 0xFFFFFFFF
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3     # u32 word indices


class RingError(Exception):
    """The frontend broke the ring protocol (e.g. produced more requests than fit); the
    device stops serving the ring."""


def ring_size(nr_pages: int, entry_size: int) -> int:
    """Number of entries in a ring of ``nr_pages`` pages (ring.h's ``__RING_SIZE``)."""
    n = (nr_pages * PAGE - HEADER) // entry_size
    if n < 1:
        raise ValueError(f"no room for one {entry_size}-byte entry in {nr_pages} page(s)")
    return 1 << (n.bit_length() - 1)


class RingPages:
    """``len(pages)`` page buffers seen as one contiguous byte range (offset 0 = header)."""

    def __init__(self, pages: Sequence[memoryview]) -> None:
        if not pages or any(p.nbytes != PAGE for p in pages):
            raise ValueError("ring pages must be whole 4096-byte pages")
        self.pages = [p.cast("B") if p.format != "B" else p for p in pages]
        self.words = self.pages[0][:HEADER].cast("I")          # aligned 4-byte accesses

    def read(self, off: int, n: int) -> bytes:
        p, o = divmod(off, PAGE)
        if o + n <= PAGE:
            return bytes(self.pages[p][o:o + n])
        first = PAGE - o
        return bytes(self.pages[p][o:]) + self.read(off + first, n - first)

    def write(self, off: int, data: bytes) -> None:
        p, o = divmod(off, PAGE)
        n = len(data)
        if o + n <= PAGE:
            self.pages[p][o:o + n] = data
            return
        first = PAGE - o
        self.pages[p][o:] = data[:first]
        self.write(off + first, data[first:])


class BackRing:
    """The backend's end of one shared ring over ``pages`` with ``entry_size``-byte slots.

    ``req_cons``/``rsp_prod_pvt`` may be given to resume a saved ring. One thread at a time
    may use an instance (the device's worker for that ring).
    """

    def __init__(self, pages: RingPages, entry_size: int, *, req_cons: int | None = None,
                 rsp_prod_pvt: int | None = None) -> None:
        self.mem = pages
        self.entry_size = entry_size
        self.size = ring_size(len(pages.pages), entry_size)
        w = pages.words
        # BACK_RING_ATTACH: start where the shared indices are (0 for a fresh ring)
        self.rsp_prod_pvt = w[_RSP_PROD] if rsp_prod_pvt is None else rsp_prod_pvt
        self.req_cons = self.rsp_prod_pvt if req_cons is None else req_cons

    def _slot(self, idx: int) -> int:
        return HEADER + (idx & (self.size - 1)) * self.entry_size

    def state(self) -> dict[str, int]:
        """The private counters (all a saved ring needs besides its pages)."""
        return {"req_cons": self.req_cons, "rsp_prod_pvt": self.rsp_prod_pvt}

    def pending(self) -> int:
        """Requests produced and not yet taken. Raises RingError if the frontend claims more
        than the ring can hold (``RING_REQUEST_PROD_OVERFLOW``)."""
        prod = self.mem.words[_REQ_PROD]
        if (prod - self.rsp_prod_pvt) & M32 > self.size:
            raise RingError(f"req_prod {prod} is more than {self.size} ahead of "
                            f"rsp_prod {self.rsp_prod_pvt}")
        return (prod - self.req_cons) & M32

    def take(self, limit: int | None = None) -> list[bytes]:
        """Copy out the pending requests (at most ``limit``) and consume them."""
        n = self.pending()
        if limit is not None:
            n = min(n, limit)
        out = [self.mem.read(self._slot(self.req_cons + i), self.entry_size) for i in range(n)]
        self.req_cons = (self.req_cons + n) & M32
        return out

    def peek(self, limit: int | None = None) -> list[bytes]:
        """Copy out the pending requests (at most ``limit``) without consuming them; consume
        with :meth:`advance` (for protocols whose units span several entries)."""
        n = self.pending()
        if limit is not None:
            n = min(n, limit)
        return [self.mem.read(self._slot(self.req_cons + i), self.entry_size) for i in range(n)]

    def advance(self, n: int) -> None:
        self.req_cons = (self.req_cons + n) & M32

    def put_response(self, data: bytes) -> None:
        """Write the next response slot (not yet visible to the frontend: see push)."""
        if len(data) > self.entry_size:
            raise ValueError("response larger than a ring entry")
        self.mem.write(self._slot(self.rsp_prod_pvt), data)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & M32

    def push_responses(self) -> bool:
        """Publish the responses written so far; True if the frontend asked to be notified
        (``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``)."""
        w = self.mem.words
        old, new = w[_RSP_PROD], self.rsp_prod_pvt
        if old == new:
            return False
        w[_RSP_PROD] = new                 # x86: stores are not reordered with older stores
        full_barrier()                     # ...but a later load may pass it without this
        return (new - w[_RSP_EVENT]) & M32 < (new - old) & M32

    def wait_for(self, n: int) -> bool:
        """True if at least ``n`` requests are pending; otherwise arm ``req_event`` so the
        frontend notifies once the ``n``-th is produced, and check again."""
        if self.pending() >= n:
            return True
        self.mem.words[_REQ_EVENT] = (self.req_cons + n) & M32
        full_barrier()
        return self.pending() >= n

    def final_check(self) -> bool:
        """True if more requests are pending; otherwise arm ``req_event`` so the frontend
        notifies us for the next one, and check again (``RING_FINAL_CHECK_FOR_REQUESTS``)."""
        if self.pending():
            return True
        self.mem.words[_REQ_EVENT] = (self.req_cons + 1) & M32
        full_barrier()
        return self.pending() > 0
