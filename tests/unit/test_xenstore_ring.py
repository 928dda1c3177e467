"""pyxen.xenstore.ring: a simulated Linux xenbus (xenbus_comms.c's xb_write/xb_read,
including its conditional notifications) against XenstoreRing on a bytearray page."""

from __future__ import annotations

import logging
import struct
import threading


from pyxen.xenstore import wire as W
from pyxen.xenstore.ring import XenstoreRing
from pyxen.xenstore.server import XenstoreServer, populate_domain
from pyxen.xenstore.wire import Message, MessageParser, pack

M32 = 0xFFFFFFFF
UUID = "11111111-2222-4333-8444-555555555555"


class LinuxGuest:
    """The guest half of the store ring, as Linux 6.1 drives it."""

    def __init__(self, page: memoryview) -> None:
        self.page = page
        self.ring: XenstoreRing | None = None
        self.parser = MessageParser()
        self.notifies = 0
        self.irqs = 0
        self.irq = threading.Event()

    def raise_event(self) -> None:                 # backend -> guest
        self.irqs += 1
        self.irq.set()

    def notify(self) -> None:                      # guest -> backend
        self.notifies += 1
        assert self.ring is not None
        self.ring.notified(7)

    def idx(self, off: int) -> int:
        return struct.unpack_from("<I", self.page, off)[0]

    def set_idx(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.page, off, v & M32)

    def xb_write(self, data: bytes) -> int:
        written = 0
        while data:
            cons, prod = self.idx(W.REQ_CONS), self.idx(W.REQ_PROD)
            assert (prod - cons) & M32 <= 1024
            if (prod - cons) & M32 == 1024:
                return written
            off = prod & 1023
            avail = min(1024 - off, 1024 - ((prod - cons) & M32), len(data))
            self.page[off:off + avail] = data[:avail]
            data = data[avail:]
            written += avail
            self.set_idx(W.REQ_PROD, prod + avail)
            if prod <= self.idx(W.REQ_CONS):       # Linux: notify only if the ring was empty
                self.notify()
        return written

    def xb_read(self) -> bytes:
        out = bytearray()
        while True:
            cons, prod = self.idx(W.RSP_CONS), self.idx(W.RSP_PROD)
            if cons == prod:
                return bytes(out)
            assert (prod - cons) & M32 <= 1024
            off = cons & 1023
            avail = min(1024 - off, (prod - cons) & M32)
            out += self.page[1024 + off:1024 + off + avail]
            self.set_idx(W.RSP_CONS, cons + avail)
            if (self.idx(W.RSP_PROD) - cons) & M32 >= 1024:   # Linux: only if it was full
                self.notify()

    def send(self, msg: Message) -> None:
        data = pack(msg)
        assert self.xb_write(data) == len(data)

    def receive(self) -> list[Message]:
        return self.parser.feed(self.xb_read())


def setup(domid: int = 5, start: int = 0) -> tuple[XenstoreServer, XenstoreRing, LinuxGuest]:
    server = XenstoreServer()
    populate_domain(server, domid, "guest", memory_kib=262144, vcpus=1, vm_uuid=UUID)
    page = memoryview(bytearray(4096))
    struct.pack_into("<IIII", page, W.REQ_CONS, start, start, start, start)
    guest = LinuxGuest(page)
    ring = XenstoreRing(page, guest.raise_event, server.connect(domid))
    guest.ring = ring
    return server, ring, guest


def z(*parts: str) -> bytes:
    return W.join_strings(*parts)


def test_construction_advertises_features_and_connected():
    _, _, g = setup()
    assert g.idx(W.SERVER_FEATURES) == W.XENSTORE_SERVER_FEATURE_RECONNECTION | W.XENSTORE_SERVER_FEATURE_ERROR
    assert g.idx(W.CONNECTION) == W.XENSTORE_CONNECTED
    assert g.idx(W.ERROR_FIELD) == W.XENSTORE_ERROR_NONE


def test_linux_first_request_gets_answered():
    _, _, g = setup()
    g.send(Message(W.XS_READ, 0, 0, z("control/platform-feature-xs_reset_watches")))
    assert g.notifies == 1 and g.irqs == 1
    assert g.receive() == [Message(W.XS_READ, 0, 0, b"1")]
    assert g.idx(W.REQ_CONS) == g.idx(W.REQ_PROD)
    g.send(Message(W.XS_RESET_WATCHES, 1, 0, b"\0"))
    g.send(Message(W.XS_WATCH, 2, 0, z("control/shutdown", "ffff8880deadbeef")))
    assert g.receive() == [Message(W.XS_RESET_WATCHES, 1, 0, b"OK\0"),
                           Message(W.XS_WATCH, 2, 0, b"OK\0"),
                           Message(W.XS_WATCH_EVENT, 0, 0, z("control/shutdown", "ffff8880deadbeef"))]


def test_message_split_across_two_notifies():
    _, ring, g = setup()
    data = pack(Message(W.XS_READ, 9, 0, z("name")))
    g.xb_write(data[:10])                         # half a header
    assert g.notifies == 1 and g.idx(W.RSP_PROD) == 0 and g.irqs == 1   # consumed: irq
    assert ring.parser.pending == 10
    g.xb_write(data[10:])
    assert g.notifies == 2
    assert g.receive() == [Message(W.XS_READ, 9, 0, b"guest")]


def test_full_response_ring_is_filled_completely_then_resumed():
    server, ring, g = setup()
    server.write("/local/domain/5/data/big", "v" * 1500)
    for i in range(3):
        g.send(Message(W.XS_READ, 100 + i, 0, z("data/big")))
    # 3 * 1516 bytes queued; exactly one ring's worth is in flight
    assert (g.idx(W.RSP_PROD) - g.idx(W.RSP_CONS)) & M32 == 1024
    assert len(ring.pending) == 3 * 1516 - 1024
    got = g.receive()                              # frees space, notifies, repeats
    assert [(m.req_id, m.payload) for m in got] == [(100 + i, b"v" * 1500) for i in range(3)]
    assert ring.pending == bytearray()


def test_indices_wrap_past_2_32():
    _, _, g = setup(start=M32 - 20)
    for i in range(40):
        g.send(Message(W.XS_READ, i, 0, z("domid")))
        assert g.receive() == [Message(W.XS_READ, i, 0, b"5")]
    assert g.idx(W.REQ_CONS) < 0x10000              # wrapped


def test_watch_event_from_another_connection_is_pushed_and_signalled():
    server, _, g = setup()
    g.send(Message(W.XS_WATCH, 1, 0, z("control/shutdown", "t")))
    assert len(g.receive()) == 2
    irqs = g.irqs
    server.write("/local/domain/5/control/shutdown", "poweroff")       # the toolstack
    assert g.irqs == irqs + 1
    assert g.receive() == [Message(W.XS_WATCH_EVENT, 0, 0, z("control/shutdown", "t"))]
    assert g.receive() == []


def test_transaction_over_the_ring():
    _, _, g = setup()
    g.send(Message(W.XS_TRANSACTION_START, 1, 0, b"\0"))
    (r,) = g.receive()
    tid = int(r.payload[:-1])
    g.send(Message(W.XS_WRITE, 2, tid, b"data/k\0v"))
    g.send(Message(W.XS_TRANSACTION_END, 3, tid, z("T")))
    assert g.receive() == [Message(W.XS_WRITE, 2, tid, b"OK\0"),
                           Message(W.XS_TRANSACTION_END, 3, tid, b"OK\0")]


def test_bad_request_indices_break_the_connection_once(caplog):
    _, ring, g = setup()
    g.set_idx(W.REQ_PROD, 2000)
    with caplog.at_level(logging.WARNING, logger="pyxen.xenstore.ring"):
        ring.notified(7)
        ring.notified(7)
    assert ring.broken and g.irqs == 0
    assert g.idx(W.ERROR_FIELD) == W.XENSTORE_ERROR_RINGIDX
    assert g.idx(W.REQ_CONS) == 0
    assert len([r for r in caplog.records if "disconnected" in r.message]) == 1


def test_bad_response_indices_break_the_connection():
    _, ring, g = setup()
    g.set_idx(W.RSP_CONS, 5000)
    g.send(Message(W.XS_READ, 1, 0, z("name")))
    assert ring.broken and g.idx(W.ERROR_FIELD) == W.XENSTORE_ERROR_RINGIDX
    assert g.idx(W.RSP_PROD) == 0


def test_oversized_payload_breaks_the_connection():
    _, ring, g = setup()
    g.xb_write(struct.pack("<IIII", W.XS_WRITE, 1, 0, 5000))
    assert ring.broken and g.idx(W.ERROR_FIELD) == W.XENSTORE_ERROR_PROTO
    g.xb_write(pack(Message(W.XS_READ, 2, 0, z("name"))))
    assert g.idx(W.RSP_PROD) == 0                  # no longer served


def test_reconnect_resets_ring_and_connection_state():
    server, ring, g = setup()
    g.set_idx(W.REQ_PROD, 3000)                   # broken first
    ring.notified(7)
    assert ring.broken
    g.set_idx(W.CONNECTION, W.XENSTORE_RECONNECT)
    ring.notified(7)
    assert not ring.broken and g.idx(W.CONNECTION) == W.XENSTORE_CONNECTED
    assert [g.idx(o) for o in (W.REQ_CONS, W.REQ_PROD, W.RSP_CONS, W.RSP_PROD)] == [0, 0, 0, 0]
    assert g.idx(W.ERROR_FIELD) == 0 and g.irqs == 1
    g.send(Message(W.XS_READ, 4, 0, z("name")))
    assert g.receive() == [Message(W.XS_READ, 4, 0, b"guest")]


def test_concurrent_watch_events_and_requests_lose_no_wakeups():
    """Guest thread issues requests while another thread fires watches at it."""
    server, _, g = setup()
    g.send(Message(W.XS_WATCH, 1, 0, z("data", "t")))
    assert len(g.receive()) == 2
    lock = threading.Lock()                        # guest-side xenbus mutex
    n_writes, n_reqs = 300, 200
    failures: list[str] = []

    def toolstack() -> None:
        for i in range(n_writes):
            server.write(f"/local/domain/5/data/k{i % 7}", str(i))

    replies, events = [], []

    def guest_loop() -> None:
        for i in range(n_reqs):
            with lock:
                g.send(Message(W.XS_READ, 1000 + i, 0, z("domid")))
            while not any(m.req_id == 1000 + i and m.type == W.XS_READ for m in replies):
                with lock:
                    got = g.receive()
                for m in got:
                    (events if m.type == W.XS_WATCH_EVENT else replies).append(m)
                if not got and not g.irq.wait(2.0):
                    failures.append(f"lost wakeup waiting for {1000 + i}")
                    return
                g.irq.clear()

    t1, t2 = threading.Thread(target=toolstack), threading.Thread(target=guest_loop)
    t1.start(), t2.start()
    t1.join(10), t2.join(10)
    assert not t1.is_alive() and not t2.is_alive()
    assert failures == []
    assert [m.req_id for m in replies] == [1000 + i for i in range(n_reqs)]
    # drain what is left: the last write's event must arrive
    with lock:
        events += [m for m in g.receive() if m.type == W.XS_WATCH_EVENT]
    assert {W.split_strings(m.payload)[0] for m in events} == {f"data/k{j}".encode() for j in range(7)}
    assert all(W.split_strings(m.payload)[1] == b"t" for m in events)


def test_request_written_while_backend_consumes_is_not_lost():
    """Linux skips the notify if the backend had not caught up (prod > req_cons): the
    backend must re-check the ring before going idle."""
    _, ring, g = setup()
    orig = ring._copy_out
    calls = []

    def racing_copy_out(base: int, idx: int, n: int) -> bytes:
        data = orig(base, idx, n)
        if not calls:
            calls.append(1)
            before = g.notifies
            g.xb_write(pack(Message(W.XS_READ, 2, 0, z("domid"))))
            assert g.notifies == before            # Linux saw the ring non-empty: no notify
        return data

    ring._copy_out = racing_copy_out              # type: ignore[method-assign]
    g.send(Message(W.XS_READ, 1, 0, z("name")))
    assert g.receive() == [Message(W.XS_READ, 1, 0, b"guest"), Message(W.XS_READ, 2, 0, b"5")]
