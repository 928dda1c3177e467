"""Xenstore ring backend: serves one guest's store page from inside the VMM (xenstored's
domain.c role for a single domain).

Page layout (``struct xenstore_domain_interface``, io/xs_wire.h): req[1024] @0 (guest ->
server), rsp[1024] @1024 (server -> guest), req_cons @2048, req_prod @2052, rsp_cons @2056,
rsp_prod @2060, server_features @2064, connection @2068, error @2072. Indices are
free-running u32; position = idx & 1023. Both rings are byte streams: messages may wrap
and may be split across notifications.

Linux's xenbus (drivers/xen/xenbus/xenbus_comms.c) only notifies when it *starts* filling an
empty request ring (``prod <= req_cons``) or frees space in a *full* response ring, so this
backend always consumes every available request byte, fills the response ring completely
when output is pending, and re-checks both rings after a full barrier before going idle.

Migration: :meth:`XenstoreRing.freeze` stops all ring work (requests stay in the page, output
stays queued); :meth:`XenstoreRing.export_state` then captures what lives outside the page
(queued output, a partial request) and :meth:`XenstoreRing.thaw` resumes. On the destination,
:meth:`XenstoreRing.restore` puts that state back before the first pass over the copied page.

Index words are accessed through a ``memoryview.cast("I")`` so each load/store is one aligned
4-byte access (``struct.pack_into("<I")`` writes byte by byte, which a guest on another CPU
could observe torn). Full barriers come from a locked exchange (``pyxen.core.atomics``).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pyxen.core.atomics import full_barrier
from pyxen.xenstore.server import Connection, ConnectionState
from pyxen.xenstore.wire import (CONNECTION, ERROR_FIELD, REQ_CONS, REQ_OFF, REQ_PROD,
                                 RING_SIZE, RSP_CONS, RSP_OFF, RSP_PROD, SERVER_FEATURES,
                                 XENSTORE_CONNECTED, XENSTORE_ERROR_NONE, XENSTORE_ERROR_PROTO,
                                 XENSTORE_ERROR_RINGIDX, XENSTORE_RECONNECT,
                                 XENSTORE_SERVER_FEATURE_ERROR,
                                 XENSTORE_SERVER_FEATURE_RECONNECTION, MessageParser,
                                 ProtocolError, pack)

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF
MASK = RING_SIZE - 1
FEATURES = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR
_W_REQ_CONS, _W_REQ_PROD = REQ_CONS // 4, REQ_PROD // 4
_W_RSP_CONS, _W_RSP_PROD = RSP_CONS // 4, RSP_PROD // 4
_W_FEATURES, _W_CONNECTION, _W_ERROR = SERVER_FEATURES // 4, CONNECTION // 4, ERROR_FIELD // 4


class XenstoreRing:
    """Serves ``conn`` on the guest's 4096-byte store ``page``.

    ``raise_event()`` signals the guest's store event channel. :meth:`notified` is the event
    channel handler (any thread, e.g. a vCPU); :meth:`flush` pushes asynchronously produced
    output (watch events) and is installed as ``conn.on_output``. Both are thread-safe and
    non-blocking: if another thread is servicing the ring, they leave it a note and return,
    and that thread runs another pass. A guest that corrupts the indices or sends an
    oversized payload is disconnected (logged once, ``error`` field set); nothing raises.
    """

    def __init__(self, page: memoryview, raise_event: Callable[[], None],
                 conn: Connection) -> None:
        if page.nbytes < 4096:
            raise ValueError("xenstore page must be 4096 bytes")
        self.page = page.cast("B") if page.format != "B" else page
        self.words = self.page[:4096].cast("I")
        self.raise_event = raise_event
        self.conn = conn
        self.parser = MessageParser()
        self.pending = bytearray()                 # packed output not yet in the ring
        self.broken = False
        self.frozen = False                        # migration: no ring work at all
        self._lock = threading.Lock()
        self._kick = False
        self.words[_W_FEATURES] = FEATURES
        self.words[_W_CONNECTION] = XENSTORE_CONNECTED
        self.words[_W_ERROR] = XENSTORE_ERROR_NONE
        conn.on_output = self.flush

    # ----------------------------------------------------------------- entry points

    def notified(self, _port: int = 0) -> None:
        """The guest signalled the store event channel."""
        self._run()

    def flush(self) -> None:
        """Output was queued on the connection from elsewhere: push it to the guest."""
        self._run()

    # ----------------------------------------------------------------- migration

    def freeze(self) -> None:
        """Stop reading requests and writing responses (and the reconnect handshake) until
        :meth:`thaw`. Notifications and output arriving meanwhile are kept, not lost: the
        guest's requests stay in the page, output queues on the connection. Idempotent."""
        with self._lock:                           # waits for a pass in progress
            self.frozen = True

    def thaw(self) -> None:
        """Undo :meth:`freeze` and run a pass at once: whatever the guest wrote (and every
        notification it sent) meanwhile is served, queued output delivered."""
        with self._lock:
            self.frozen = False
        self._run()

    def export_state(self) -> ConnectionState:
        """The connection's migratable state (a frozen ring only, else RuntimeError):
        ``output`` = bytes not yet in the response ring (this ring's pending bytes, then the
        connection's queued messages), ``input`` = the partial request consumed from the
        request ring. Nothing is drained: a :meth:`thaw` continues as if never frozen."""
        with self._lock:
            if not self.frozen:
                raise RuntimeError("export_state needs a frozen ring")
            state = self.conn.state()
            state.output = bytes(self.pending) + state.output
            state.input = bytes(self.parser._buf)  # wire.MessageParser keeps no other copy
            return state

    def restore(self, output: bytes, partial_input: bytes) -> None:
        """Before the first pass on a migrated page: ``output`` goes out ahead of anything
        new, ``partial_input`` is fed to the parser first (ValueError if it holds a complete
        message or a bad header; nothing is changed then)."""
        probe = MessageParser()
        try:
            if probe.feed(partial_input):
                raise ValueError("partial input holds a complete message")
        except ProtocolError as e:
            raise ValueError(f"partial input: {e}") from None
        with self._lock:
            self.parser.feed(partial_input)
            self.pending[:0] = output

    def _run(self) -> None:
        self._kick = True
        while self._kick:
            if not self._lock.acquire(blocking=False):
                return                             # the holder sees _kick and loops
            signal = False
            try:
                while self._kick:
                    self._kick = False
                    signal |= self._service()
            except Exception:                      # never let a guest crash the caller
                log.exception("xenstore ring: dom%d: internal error", self.conn.domid)
                self._break(XENSTORE_ERROR_PROTO, "internal error")
            finally:
                self._lock.release()
            if signal:
                self.raise_event()

    # ----------------------------------------------------------------- ring work

    def _service(self) -> bool:
        """One pass until quiescent; True if the guest should be notified."""
        if self.frozen:
            return False                           # thaw() runs a full pass
        w = self.words
        signal = False
        if w[_W_CONNECTION] == XENSTORE_RECONNECT:
            self._reconnect()                      # also revives a broken connection
            signal = True
        if self.broken:
            return signal
        while True:
            progress = False
            # requests
            cons, prod = w[_W_REQ_CONS], w[_W_REQ_PROD]
            avail = (prod - cons) & M32
            if avail > RING_SIZE:
                self._break(XENSTORE_ERROR_RINGIDX, f"request indices cons={cons:#x} prod={prod:#x}")
                return signal
            if avail:
                data = self._copy_out(REQ_OFF, cons, avail)
                w[_W_REQ_CONS] = prod              # after the copy (loads before stores on x86)
                progress = signal = True
                try:
                    msgs = self.parser.feed(data)
                except ProtocolError as e:
                    for m in e.messages:
                        self.conn.handle(m)
                    self._break(XENSTORE_ERROR_PROTO, str(e))
                    return signal
                for m in msgs:
                    self.conn.handle(m)
            # responses
            for m in self.conn.outgoing():
                self.pending += pack(m)
            if self.pending:
                rcons, rprod = w[_W_RSP_CONS], w[_W_RSP_PROD]
                used = (rprod - rcons) & M32
                if used > RING_SIZE:
                    self._break(XENSTORE_ERROR_RINGIDX,
                                f"response indices cons={rcons:#x} prod={rprod:#x}")
                    return signal
                n = min(len(self.pending), RING_SIZE - used)
                if n:
                    self._copy_in(rprod, n)
                    del self.pending[:n]
                    w[_W_RSP_PROD] = (rprod + n) & M32   # after the data (stores in order)
                    progress = signal = True
            full_barrier()
            if progress:
                continue
            # quiescent unless the guest raced us (it skips notifying in those cases)
            if w[_W_REQ_PROD] != w[_W_REQ_CONS]:
                continue
            if self.pending and ((w[_W_RSP_PROD] - w[_W_RSP_CONS]) & M32) < RING_SIZE:
                continue
            if self.conn.has_output:
                continue
            return signal

    def _copy_out(self, base: int, idx: int, n: int) -> bytes:
        off = idx & MASK
        first = min(n, RING_SIZE - off)
        data = bytes(self.page[base + off:base + off + first])
        if first < n:
            data += bytes(self.page[base:base + n - first])
        return data

    def _copy_in(self, idx: int, n: int) -> None:
        off = idx & MASK
        first = min(n, RING_SIZE - off)
        self.page[RSP_OFF + off:RSP_OFF + off + first] = self.pending[:first]
        if first < n:
            self.page[RSP_OFF:RSP_OFF + n - first] = self.pending[first:n]

    def _reconnect(self) -> None:
        """Guest-initiated reconnect (docs/misc/xenstore-ring.txt): drop all state, zero
        the indices, report CONNECTED."""
        log.info("xenstore ring: dom%d reconnects", self.conn.domid)
        self.conn.reset()
        self.parser.reset()
        self.pending.clear()
        self.broken = False
        w = self.words
        w[_W_REQ_CONS] = w[_W_REQ_PROD] = w[_W_RSP_CONS] = w[_W_RSP_PROD] = 0
        w[_W_ERROR] = XENSTORE_ERROR_NONE
        full_barrier()
        w[_W_CONNECTION] = XENSTORE_CONNECTED

    def _break(self, error: int, why: str) -> None:
        if not self.broken:
            log.warning("xenstore ring: dom%d disconnected: %s", self.conn.domid, why)
        self.broken = True
        self.pending.clear()
        self.words[_W_ERROR] = error
