"""netback: the network backend Linux's xen-netfront talks to, forwarding to a host TAP.

Negotiation (Linux 6.1's netback/netfront keys):

* probe: ``feature-sg``, ``feature-gso-tcpv4``, ``feature-gso-tcpv6``,
  ``feature-ipv6-csum-offload``, ``feature-rx-copy`` (1) and ``feature-rx-flip`` (0),
  ``feature-multicast-control``, ``feature-split-event-channels``,
  ``multi-queue-max-queues`` (1: one queue);
* the frontend writes ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel`` (or
  ``event-channel-tx``/``-rx``), ``request-rx-copy``, ``feature-rx-notify``, its offload
  features (``feature-sg``, ``feature-gso-tcpv4/6``, ``feature-no-csum-offload``,
  ``feature-ipv6-csum-offload``);
* connect maps both rings, binds the ports and sets the TAP's offloads to what the frontend
  accepts, so the host kernel never hands it a frame it cannot take.

Data path, one thread per vif, woken by the TAP fd and the event channels:

* guest transmit: :func:`netif.assemble_tx` validates each packet with netback's rules; the
  frame goes to the TAP with ``writev`` as [virtio-net header, first slot (copied: its headers
  may need the checksum seed), views of the other granted slots]. Responses follow in ring
  order. The optional ``rate`` (bytes per interval) is a credit scheduler as netback's.
* guest receive (rx-copy): a frame read from the TAP (virtio-net header first) is copied into
  the pages the frontend posted, laid out by :func:`netif.layout_rx` (GSO as an extra slot).
  Without posted buffers the TAP is not read: frames wait in its queue, as they do in
  netback's.

A frontend that breaks the protocol (fatal TX errors, a corrupt ring) gets its vif disabled:
the device closes (xenbus Closing), as netback does; nothing else is affected.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from pyxen.backends import netif as N
from pyxen.backends.guestio import GuestAccess, GuestAccessError
from pyxen.backends.ring import BackRing, RingError, RingPages
from pyxen.backends.xenbus import BackendBus, DeviceError, XenbusBackend
from pyxen.host.tap import (MAX_FRAME, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN, Tap)

log = logging.getLogger("pyxen.backends")

HEADER_PULL = 128              # bytes of a TX packet gathered for header parsing (netback's)
RX_BATCH = 64                  # frames moved to the guest per pass before checking TX
#: posted RX buffers needed before a frame is read from the TAP: the largest GSO frame
RX_SLOTS_MAX = N.rx_slots_needed((N.XEN_NETIF_NR_SLOTS_MIN - 1) * N.XEN_PAGE_SIZE, 1)


class _Credit:
    """netback's credit scheduler: at most ``amount`` bytes per ``interval_s``."""

    def __init__(self, amount: int, interval_s: float) -> None:
        self.amount = amount
        self.interval = interval_s
        self.remaining = amount
        self.next_refill = time.monotonic() + interval_s

    def wait_for(self, n: int, stopping: threading.Event) -> None:
        while True:
            now = time.monotonic()
            if now >= self.next_refill:
                self.remaining = self.amount
                self.next_refill = now + self.interval
            if self.remaining >= n or n > self.amount:       # a jumbo packet passes alone
                self.remaining -= min(n, self.remaining)
                return
            if stopping.wait(self.next_refill - now):
                return


class NetBackend(XenbusBackend):
    """One vif: frontend ``devid`` of domain ``guest.domid`` <-> host TAP ``tap``."""

    kind = "vif"

    def __init__(self, bus: BackendBus, guest: GuestAccess, devid: int, tap: Tap, *,
                 rate: tuple[int, int] | None = None) -> None:
        super().__init__(bus, guest.domid, devid)
        self.guest = guest
        self.tap = tap
        self.rate = rate                       # (bytes per interval, interval in us)
        self.tx: BackRing | None = None
        self.rx: BackRing | None = None
        self.tx_port = self.rx_port = 0
        self.ring_gfns: list[int] = []
        self._kick_r, self._kick_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"tx_packets": 0, "tx_bytes": 0, "tx_errors": 0, "tx_dropped": 0,
                      "rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0}

    # --- xenbus hooks
    def probe(self) -> None:
        w = self.bus.write
        for key, val in (("feature-sg", "1"), ("feature-gso-tcpv4", "1"),
                         ("feature-gso-tcpv6", "1"), ("feature-ipv6-csum-offload", "1"),
                         ("feature-rx-copy", "1"), ("feature-rx-flip", "0"),
                         ("feature-multicast-control", "1"),
                         ("feature-dynamic-multicast-control", "1"),
                         ("feature-split-event-channels", "1"),
                         ("multi-queue-max-queues", "1")):
            w(f"{self.be}/{key}", val)

    def connect(self) -> None:
        if self.read_fe_int("multi-queue-num-queues", 1) != 1:
            raise DeviceError("frontend asked for several queues; one is offered")
        if self.read_fe_int("request-rx-copy", 0) != 1:
            raise DeviceError("frontend does not use rx-copy (rx-flip is not supported)")
        tx_ref = self.read_fe_int("tx-ring-ref")
        rx_ref = self.read_fe_int("rx-ring-ref")
        if self.read_fe("event-channel-tx") is not None:
            tx_port = self.read_fe_int("event-channel-tx")
            rx_port = self.read_fe_int("event-channel-rx")
        else:
            tx_port = rx_port = self.read_fe_int("event-channel")
        try:
            (tx_page,), tx_gfn = self.guest.map_grants([tx_ref], write=True)
            (rx_page,), rx_gfn = self.guest.map_grants([rx_ref], write=True)
        except GuestAccessError as e:
            raise DeviceError(f"mapping the rings: {e}") from e
        self.ring_gfns = tx_gfn + rx_gfn         # written by us: dirty for migration
        self.tx = BackRing(RingPages([tx_page]), N.TX_ENTRY_SIZE)
        self.rx = BackRing(RingPages([rx_page]), N.RX_ENTRY_SIZE)
        try:
            self.guest.bind_port(tx_port, self._kick)
            if rx_port != tx_port:
                self.guest.bind_port(rx_port, self._kick)
        except GuestAccessError as e:
            self.guest.unbind_port(tx_port)
            raise DeviceError(str(e)) from e
        self.tx_port, self.rx_port = tx_port, rx_port
        offload = 0
        sg = self.read_fe_int("feature-sg", 0) == 1
        if self.read_fe_int("feature-no-csum-offload", 0) == 0:
            offload |= TUN_F_CSUM
            # TSO needs scatter-gather (Linux's netdev_fix_features drops it without SG)
            if sg and self.read_fe_int("feature-gso-tcpv4", 0):
                offload |= TUN_F_TSO4
            if sg and self.read_fe_int("feature-gso-tcpv6", 0) and \
                    self.read_fe_int("feature-ipv6-csum-offload", 0):
                offload |= TUN_F_TSO6
        self.tap.set_offload(offload)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"netback-d{self.domid}-{self.devid}")
        self._thread.start()
        log.info("d%d vif/%d: connected to %s (offload 0x%x, ports %d/%d)", self.domid,
                 self.devid, self.tap.name, offload, tx_port, rx_port)

    def disconnect(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._kick()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        self.guest.unbind_port(self.tx_port)
        if self.rx_port != self.tx_port:
            self.guest.unbind_port(self.rx_port)
        self.tx = self.rx = None

    def stop(self, keep_tap: bool = False) -> None:
        """Stop serving; the TAP is deleted unless ``keep_tap`` (a restart hands it on)."""
        super().stop()
        if not keep_tap:
            self.tap.close()
        fds, self._kick_r, self._kick_w = (self._kick_r, self._kick_w), -1, -1
        for fd in fds:                        # idempotent: never close a reused number
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def announce(self, mac: str, count: int = 3) -> None:
        """Send ``count`` RARP broadcasts from the guest's ``mac`` into the TAP (QEMU's
        announce-self after a migration): bridges and switches learn the guest's new port
        at once instead of after their next flood. Failures are logged, never raised."""
        hw = bytes.fromhex(mac.replace(":", ""))
        frame = (b"\xff" * 6 + hw + b"\x80\x35"               # RARP
                 + bytes.fromhex("0001" "0800" "06" "04" "0003")  # Ethernet/IPv4, reverse request
                 + hw + bytes(4) + hw + bytes(4)).ljust(60, b"\0")
        for _ in range(count):
            try:
                self.tap.write(bytes(12) + frame)
            except Exception as e:                # best effort: the TAP may be gone
                log.info("d%d vif/%d: announce failed: %s", self.domid, self.devid, e)
                return

    def _kick(self) -> None:
        try:
            os.write(self._kick_w, b"k")
        except (BlockingIOError, OSError):
            pass

    # --- the data path thread
    def _run(self) -> None:
        tx, rx, tap = self.tx, self.rx, self.tap
        assert tx is not None and rx is not None
        credit = _Credit(self.rate[0], self.rate[1] / 1e6) if self.rate else None
        buf = bytearray(MAX_FRAME)
        mv = memoryview(buf)
        tap_wanted = True
        try:
            while not self._stopping.is_set():
                fds = [self._kick_r] + ([tap.fd] if tap_wanted else [])
                try:
                    ready, _, _ = select.select(fds, [], [], 1.0)
                except (OSError, ValueError):
                    return
                if self._kick_r in ready:
                    try:
                        while os.read(self._kick_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if self._stopping.is_set():
                    return
                self._do_tx(tx, credit)
                tap_wanted = self._do_rx(rx, mv)
                self.guest.mark_dirty_gfns(self.ring_gfns)
        except RingError as e:
            why = f"ring: {e}"
            self.bus.call_soon(lambda: self.fatal(why))
        except _Fatal as e:
            why = str(e)
            self.bus.call_soon(lambda: self.fatal(why))

    def _do_tx(self, tx: BackRing, credit: _Credit | None) -> None:
        while True:
            entries = tx.peek()
            sent_any = False
            while entries:
                res = N.assemble_tx(entries)
                if res is N.TX_INCOMPLETE:
                    if len(entries) >= tx.size:       # the rest can never come
                        raise _Fatal("guest filled the TX ring with one unfinished packet")
                    break
                if isinstance(res, N.TxError) and res.fatal:
                    raise _Fatal(f"guest sent a malformed packet: {res.reason}")
                status = N.NETIF_RSP_OKAY
                if isinstance(res, N.TxPacket):
                    if credit is not None:
                        credit.wait_for(res.total_len, self._stopping)
                    status = self._send_packet(res)
                elif isinstance(res, N.TxError):
                    self.stats["tx_errors"] += 1
                    log.debug("d%d vif/%d: tx error %s", self.domid, self.devid, res.reason)
                responses = res.responses() if isinstance(res, N.TxError) else \
                    res.responses(status)
                for rid, st in responses:
                    tx.put_response(N.pack_tx_response(rid, st))
                tx.advance(res.consumed)
                entries = entries[res.consumed:]
                sent_any = True
            if sent_any and tx.push_responses():
                self.guest.notify(self.tx_port)
            if not tx.final_check():
                return
            if not sent_any:
                return                         # an incomplete packet: wait for the rest

    def _send_packet(self, pkt: N.TxPacket) -> int:
        try:
            chunks = []
            for slot in pkt.slots:
                p = self.guest.map_grant(slot.gref, False)
                chunks.append(p[slot.offset:slot.offset + slot.size])
            # the head (copied: it may get the checksum seed) holds at least the headers,
            # pulled from the following slots if the first is short (skb_checksum_setup)
            head = bytearray(chunks[0])
            rest = chunks[1:]
            while len(head) < HEADER_PULL and rest:
                take = rest[0][:HEADER_PULL - len(head)]
                head += take
                rest[0] = rest[0][len(take):]
                if not rest[0].nbytes:
                    rest.pop(0)
            views: list = [None, head, *rest]
        except GuestAccessError as e:
            log.debug("d%d vif/%d: tx grant: %s", self.domid, self.devid, e)
            self.stats["tx_errors"] += 1
            return N.NETIF_RSP_ERROR
        hdr = N.tx_to_vnet_hdr(head, pkt.csum_blank, pkt.data_validated, pkt.gso)
        if hdr is None:
            self.stats["tx_dropped"] += 1
            return N.NETIF_RSP_OKAY            # netback drops it silently
        views[0] = hdr
        n = self.tap.writev(views)
        if n < 0:
            self.stats["tx_dropped"] += 1
        else:
            self.stats["tx_packets"] += 1
            self.stats["tx_bytes"] += pkt.total_len
        return N.NETIF_RSP_OKAY

    def _do_rx(self, rx: BackRing, mv: memoryview) -> bool:
        """Move frames from the TAP into posted buffers; False if the guest has none left
        (stop reading the TAP until it posts more)."""
        delivered = 0
        while delivered < RX_BATCH:
            if not rx.wait_for(RX_SLOTS_MAX):
                # too few buffers for the largest frame: the frontend notifies when it has
                # posted enough; until then frames wait in the TAP's queue
                self._push_rx(rx)
                return False
            reqs = rx.peek()
            n = self.tap.read(mv)
            if n <= 0:
                break
            if n <= VNET_HDR_LEN:
                continue
            length = n - VNET_HDR_LEN
            try:
                flags, gso = N.vnet_hdr_to_rx(mv[:VNET_HDR_LEN])
            except ValueError:
                self.stats["rx_dropped"] += 1
                continue
            extras = [N.pack_extra_gso(gso.gso_size, gso.gso_type)] if gso else []
            parsed = [N.unpack_rx_request(r) for r in reqs]
            slots = N.layout_rx(length, flags, extras, parsed)
            if slots is None:                  # cannot happen: checked above
                self.stats["rx_dropped"] += 1
                continue
            frame = mv[VNET_HDR_LEN:n]
            for slot in slots:
                status_slot = slot.response
                if slot.length:
                    try:
                        (page,), gfns = self.guest.map_grants([slot.gref], True)
                        page[:slot.length] = frame[slot.src:slot.src + slot.length]
                        self.guest.mark_dirty_gfns(gfns)
                    except GuestAccessError:
                        # only the status changes: the flags still chain the packet's slots
                        status_slot = slot.response[:6] + \
                            N.NETIF_RSP_ERROR.to_bytes(2, "little", signed=True)
                rx.put_response(status_slot)
            rx.advance(len(slots))
            delivered += 1
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += length
        self._push_rx(rx)
        return True

    def _push_rx(self, rx: BackRing) -> None:
        if rx.push_responses():
            self.guest.notify(self.rx_port)

    def info(self) -> dict:
        return {"devid": self.devid, "state": self.state, "tap": self.tap.name,
                "frontend_state": self.frontend_state(), "stats": dict(self.stats)}


class _Fatal(Exception):
    pass
