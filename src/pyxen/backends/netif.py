"""Xen netif (netback/netfront) wire protocol, sans-IO.

Everything here is pure functions over bytes: ring-entry layouts and constants of
``xen/include/public/io/netif.h``, the TX packet assembler that applies Linux netback's
validation rules (``xenvif_tx_build_gops``, ``xenvif_get_extras``, ``xenvif_count_requests``),
the RX slot layout netfront expects (``xenvif_rx_skb``), TCP/UDP checksum helpers, and the
mapping between netif checksum/GSO state and the virtio-net header a TAP device uses. The device
glue maps grants, moves bytes and rings event channels.

Layouts (all little-endian, as on x86)::

    netif_tx_request  (12)  u32 gref | u16 offset | u16 flags (NETTXF_*) | u16 id | u16 size
    netif_tx_response  (4)  u16 id | s16 status (NETIF_RSP_*)
    netif_extra_info   (8)  u8 type | u8 flags | 6 bytes of union:
                              gso:   u16 size | u8 type | u8 pad | u16 features
                              mcast: u8 addr[6]
                              hash:  u8 type | u8 algorithm | u8 value[4]
                              xdp:   u16 headroom | u16 pad[2]
    netif_rx_request   (8)  u16 id | u16 pad | u32 gref
    netif_rx_response  (8)  u16 id | u16 offset | u16 flags (NETRXF_*) | s16 status

A TX ring slot is 12 bytes (the request; responses and extras use its first 4 / 8 bytes), an RX
slot 8 bytes. A one-page ring has a 64-byte header, then ``4032 // entry`` slots rounded down to
a power of two: 256 for both rings.

Guest transmit: the first request's ``size`` is the *total* packet length; each following
request (chained with ``NETTXF_more_data``) carries its own size, so the first slot's own data
is ``total - sum(rest)``. Extras (``NETTXF_extra_info`` on the first request, chained with
``XEN_NETIF_EXTRA_FLAG_MORE``) sit between the first and second request. Every consumed slot
gets one response slot, in order: the first request's id with the status, one
``NETIF_RSP_NULL`` per extra, then the other requests' ids (any order).

Guest receive: every data slot carries its own length in ``status``; extras come right after the
*first data slot*; each response goes in the ring slot of the request it answers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from pyxen.host.tap import (VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                            VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
                            VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, pack_vnet_hdr,
                            unpack_vnet_hdr)

XEN_PAGE_SIZE = 4096
ETH_HLEN = 14

# --- flags -------------------------------------------------------------------------------------
NETTXF_csum_blank = 1 << 0          # L4 checksum field holds only the pseudo-header sum
NETTXF_data_validated = 1 << 1      # checksum known good
NETTXF_more_data = 1 << 2           # packet continues in the next request
NETTXF_extra_info = 1 << 3          # extras follow this (first) request

NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4          # deprecated, never produced

XEN_NETIF_EXTRA_TYPE_NONE = 0       # never valid
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_XDP = 5
XEN_NETIF_EXTRA_TYPE_MAX = 6
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2        # note: virtio's TCPV6 is 4

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1                  # the response slot of an extra-info request

# --- limits ------------------------------------------------------------------------------------
XEN_NETIF_MAX_TX_SIZE = 0xFFFF
XEN_NETIF_NR_SLOTS_MIN = 18         # slots every backend must accept (old MAX_SKB_FRAGS)
XEN_NETBK_LEGACY_SLOTS_MAX = XEN_NETIF_NR_SLOTS_MIN
FATAL_SKB_SLOTS_DEFAULT = 20        # netback's fatal_skb_slots module parameter default
MAX_XEN_SKB_FRAGS = 65536 // XEN_PAGE_SIZE + 1     # 17: netfront linearizes above 18 slots
XEN_NETBK_MCAST_MAX = 64            # multicast filter entries netback keeps per vif

# --- struct sizes and ring geometry ------------------------------------------------------------
TX_REQUEST_SIZE = 12
TX_RESPONSE_SIZE = 4
EXTRA_INFO_SIZE = 8                 # occupies a whole 12-byte slot on the TX ring
TX_ENTRY_SIZE = 12                  # union of request / response
RX_REQUEST_SIZE = 8
RX_RESPONSE_SIZE = 8
RX_ENTRY_SIZE = 8
SRING_HEADER_SIZE = 64              # req_prod, req_event, rsp_prod, rsp_event, pvt[4], pad[44]


def ring_capacity(entry_size: int, nr_pages: int = 1) -> int:
    """ring.h ``__RING_SIZE``: entries after the 64-byte header, rounded down to a power of 2."""
    n = (nr_pages * XEN_PAGE_SIZE - SRING_HEADER_SIZE) // entry_size
    if n < 1:
        raise ValueError(f"no room for a {entry_size}-byte entry in {nr_pages} page(s)")
    return 1 << (n.bit_length() - 1)


TX_RING_SIZE = ring_capacity(TX_ENTRY_SIZE)     # 256
RX_RING_SIZE = ring_capacity(RX_ENTRY_SIZE)     # 256

_TXREQ = struct.Struct("<IHHHH")
_TXRSP = struct.Struct("<Hh")
_RXREQ = struct.Struct("<HHI")
_RXRSP = struct.Struct("<HHHh")
_EXTRA_GSO = struct.Struct("<BBHBBH")


# --- entries -----------------------------------------------------------------------------------
class TxRequest(NamedTuple):
    gref: int
    offset: int
    flags: int
    id: int
    size: int


class Extra(NamedTuple):
    """A ``netif_extra_info``. The GSO view is decoded; ``data`` holds the 6 union bytes for
    the other types (see the properties)."""
    type: int
    flags: int
    gso_size: int
    gso_type: int
    gso_features: int
    data: bytes

    @property
    def more(self) -> bool:
        return bool(self.flags & XEN_NETIF_EXTRA_FLAG_MORE)

    @property
    def mcast_addr(self) -> bytes:
        return self.data

    @property
    def hash_type(self) -> int:
        return self.data[0]

    @property
    def hash_algorithm(self) -> int:
        return self.data[1]

    @property
    def hash_value(self) -> int:
        return int.from_bytes(self.data[2:6], "little")

    @property
    def xdp_headroom(self) -> int:
        return int.from_bytes(self.data[0:2], "little")


def unpack_tx_request(b: bytes | bytearray | memoryview) -> TxRequest:
    """Decode a 12-byte ``netif_tx_request`` (extra bytes are ignored)."""
    return TxRequest(*_TXREQ.unpack_from(b, 0))


def pack_tx_request(gref: int, offset: int, flags: int, id: int, size: int) -> bytes:
    """Encode a ``netif_tx_request`` (what netfront writes; for tests and tools)."""
    return _TXREQ.pack(gref, offset, flags, id, size)


def unpack_extra(b: bytes | bytearray | memoryview) -> Extra:
    """Decode an 8-byte ``netif_extra_info`` (a TX slot's trailing 4 bytes are padding)."""
    t, f, size, gtype, _pad, feat = _EXTRA_GSO.unpack_from(b, 0)
    return Extra(t, f, size, gtype, feat, bytes(b[2:8]))


def pack_extra(type: int, flags: int, data: bytes = bytes(6)) -> bytes:
    """Encode a ``netif_extra_info`` with 6 raw union bytes (8 bytes)."""
    if len(data) != 6:
        raise ValueError("extra-info union is 6 bytes")
    return bytes((type & 0xFF, flags & 0xFF)) + bytes(data)


def pack_extra_gso(gso_size: int, gso_type: int, features: int = 0, flags: int = 0) -> bytes:
    """Encode a GSO ``netif_extra_info`` (8 bytes; an RX response slot is exactly this)."""
    return _EXTRA_GSO.pack(XEN_NETIF_EXTRA_TYPE_GSO, flags, gso_size, gso_type, 0, features)


def pack_tx_response(id: int, status: int) -> bytes:
    """Encode a 4-byte ``netif_tx_response``."""
    return _TXRSP.pack(id & 0xFFFF, status)


def unpack_tx_response(b: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Decode a ``netif_tx_response`` to ``(id, status)``."""
    return _TXRSP.unpack_from(b, 0)


def unpack_rx_request(b: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Decode an 8-byte ``netif_rx_request`` to ``(id, gref)``."""
    rid, _pad, gref = _RXREQ.unpack_from(b, 0)
    return rid, gref


def pack_rx_request(id: int, gref: int) -> bytes:
    """Encode a ``netif_rx_request`` (what netfront writes; for tests and tools)."""
    return _RXREQ.pack(id, 0, gref)


def pack_rx_response(id: int, offset: int, flags: int, status: int) -> bytes:
    """Encode an 8-byte ``netif_rx_response``; ``status`` is the data length (>= 0) or a
    ``NETIF_RSP_*`` error."""
    return _RXRSP.pack(id & 0xFFFF, offset, flags, status)


def unpack_rx_response(b: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """Decode a ``netif_rx_response`` to ``(id, offset, flags, status)``."""
    return _RXRSP.unpack_from(b, 0)


# --- TX packet assembly --------------------------------------------------------------------------
# TxError.code values
ERR_TOO_MANY_SLOTS = "too-many-slots"        # more than max_slots following slots: dropped
ERR_FATAL_SLOTS = "fatal-slot-count"         # fatal_slots following slots reached: malicious
ERR_SLOT_TOO_BIG = "slot-exceeds-remaining"  # a slot is larger than what is left of the total
ERR_RUNT = "first-slot-too-small"            # first slot's own data < ETH_HLEN (incl. 0)
ERR_CROSS_PAGE = "crosses-page"              # offset + size > 4096 (fatal)
ERR_BAD_EXTRA = "bad-extra-type"             # extra type 0 or >= XEN_NETIF_EXTRA_TYPE_MAX (fatal)
ERR_BAD_GSO = "bad-gso"                      # GSO size 0 or unknown GSO type (fatal)


def _responses(first_id: int, extra_count: int, other_ids: Sequence[int],
               status: int) -> list[tuple[int, int]]:
    out = [(first_id, status)]
    out.extend((0, NETIF_RSP_NULL) for _ in range(extra_count))
    out.extend((i, status) for i in other_ids)
    return out


@dataclass(frozen=True, slots=True)
class TxPacket:
    """One well-formed guest packet. ``slots[0]`` is the first request with ``size`` replaced by
    its *own* data length (``total_len`` minus the other slots), so every slot is a plain
    ``(gref, offset, size)`` chunk within one page; concatenated they are the frame. ``extras``
    maps ``XEN_NETIF_EXTRA_TYPE_*`` to the last extra of that type. ``consumed`` ring entries
    (requests plus ``extra_count`` extras) were used."""
    first_id: int
    slots: list[TxRequest]
    extras: dict[int, Extra]
    total_len: int
    csum_blank: bool
    data_validated: bool
    consumed: int
    extra_count: int

    @property
    def gso(self) -> Extra | None:
        return self.extras.get(XEN_NETIF_EXTRA_TYPE_GSO)

    def responses(self, status: int = NETIF_RSP_OKAY) -> list[tuple[int, int]]:
        """``(id, status)`` for each consumed entry in ring order (``NETIF_RSP_NULL`` ones
        for the extras); pass to :func:`pack_tx_response`."""
        return _responses(self.first_id, self.extra_count,
                          [s.id for s in self.slots[1:]], status)


@dataclass(frozen=True, slots=True)
class TxControl:
    """A dummy request carrying ``XEN_NETIF_EXTRA_TYPE_MCAST_ADD``/``MCAST_DEL`` (checked in
    that order, like netback): no packet. Respond to ``first_id`` with OKAY (or ERROR when an
    add does not fit in the filter); following requests are *not* part of it, even if the first
    has ``NETTXF_more_data``."""
    first_id: int
    extras: dict[int, Extra]
    consumed: int
    extra_count: int

    @property
    def op(self) -> int:
        return (XEN_NETIF_EXTRA_TYPE_MCAST_ADD if XEN_NETIF_EXTRA_TYPE_MCAST_ADD in self.extras
                else XEN_NETIF_EXTRA_TYPE_MCAST_DEL)

    @property
    def mcast_addr(self) -> bytes:
        return self.extras[self.op].mcast_addr

    def responses(self, status: int = NETIF_RSP_OKAY) -> list[tuple[int, int]]:
        return _responses(self.first_id, self.extra_count, (), status)


@dataclass(frozen=True, slots=True)
class TxError:
    """A bad packet. ``code`` is one of the ``ERR_*`` strings, ``reason`` says what was wrong.
    ``consumed`` entries were used; ``error_ids`` (first request first) must be answered with
    ``NETIF_RSP_ERROR``, plus one NULL per extra (:meth:`responses`).

    ``fatal``: Linux netback would consider the frontend malicious/broken and disable the vif
    (no responses, carrier off). The device may do that, or answer with :meth:`responses` and
    carry on from ``consumed``."""
    code: str
    reason: str
    fatal: bool
    consumed: int
    error_ids: list[int]
    extra_count: int

    def responses(self) -> list[tuple[int, int]]:
        if not self.error_ids:
            return []
        return _responses(self.error_ids[0], self.extra_count, self.error_ids[1:],
                          NETIF_RSP_ERROR)


class TxIncomplete:
    """The entries given end inside a packet: call again from the same consumer index when
    more are produced. Nothing was consumed. (netfront publishes whole packets, so with all
    ``req_prod - req_cons`` entries given this means a broken frontend; if it persists with a
    full ring, netback treats it as fatal.)"""
    consumed = 0
    __slots__ = ()

    def __repr__(self) -> str:
        return "TX_INCOMPLETE"


TX_INCOMPLETE = TxIncomplete()
TxResult = TxPacket | TxControl | TxError | TxIncomplete


def _next_entry(it: Iterator[bytes | bytearray | memoryview]
                ) -> bytes | bytearray | memoryview | None:
    """The next TX ring entry, or None when the ring holds no more (the packet is
    incomplete). ValueError for an entry shorter than a request (a caller's bug)."""
    raw = next(it, None)
    if raw is not None and len(raw) < TX_REQUEST_SIZE:
        raise ValueError("TX ring entries are 12 bytes")
    return raw


def assemble_tx(entries: Iterable[bytes | bytearray | memoryview], *,
                max_slots: int = XEN_NETBK_LEGACY_SLOTS_MAX,
                fatal_slots: int = FATAL_SKB_SLOTS_DEFAULT) -> TxResult:
    """Parse the packet that starts at the first of ``entries`` (raw 12-byte TX ring slots from
    the consumer index on; copy them out of shared memory first, the guest can rewrite them).

    Rules are Linux netback's: up to ``max_slots`` requests may follow the first; packets with
    more are consumed and answered with errors, and reaching ``fatal_slots`` following requests
    is fatal; a following slot larger than what remains of the total is an error; the first
    slot's own data must be at least ``ETH_HLEN``; any slot crossing its page is fatal; extras
    must have a type in 1..5, and a GSO extra a nonzero size and type TCPv4/TCPv6 (fatal).

    Never raises for any content of 12-byte entries (ValueError for shorter ones): returns :class:`TxPacket`, :class:`TxControl`,
    :class:`TxError` or :data:`TX_INCOMPLETE`; never consumes more entries than given.
    """
    it = iter(entries)
    raw = _next_entry(it)
    if raw is None:
        return TX_INCOMPLETE
    first = unpack_tx_request(raw)
    consumed = 1

    # xenvif_get_extras
    extras: dict[int, Extra] = {}
    extra_count = 0
    if first.flags & NETTXF_extra_info:
        while True:
            raw = _next_entry(it)
            if raw is None:
                return TX_INCOMPLETE
            extra = unpack_extra(raw)
            consumed += 1
            extra_count += 1
            if not 0 < extra.type < XEN_NETIF_EXTRA_TYPE_MAX:
                return TxError(ERR_BAD_EXTRA, f"invalid extra-info type {extra.type}", True,
                               consumed, [first.id], extra_count)
            extras[extra.type] = extra
            if not extra.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                break

    if XEN_NETIF_EXTRA_TYPE_MCAST_ADD in extras or XEN_NETIF_EXTRA_TYPE_MCAST_DEL in extras:
        return TxControl(first.id, extras, consumed, extra_count)

    # xenvif_count_requests
    remaining = first.size
    others: list[TxRequest] = []
    ids: list[int] = []
    drop: tuple[str, str] | None = None
    more = bool(first.flags & NETTXF_more_data)
    while more:
        n = len(ids)
        if n >= fatal_slots:
            return TxError(ERR_FATAL_SLOTS, f"more than {fatal_slots} slots follow the first",
                           True, consumed, [first.id, *ids], extra_count)
        if drop is None and n >= max_slots:
            drop = (ERR_TOO_MANY_SLOTS, f"more than {max_slots} slots follow the first")
        raw = _next_entry(it)
        if raw is None:
            return TX_INCOMPLETE
        txp = unpack_tx_request(raw)
        consumed += 1
        ids.append(txp.id)
        if drop is None and txp.size > remaining:
            drop = (ERR_SLOT_TOO_BIG, f"slot {n + 1} (id {txp.id}) has {txp.size} bytes but "
                    f"only {remaining} of the {first.size}-byte packet remain")
        remaining = (remaining - txp.size) & 0xFFFF
        if txp.offset + txp.size > XEN_PAGE_SIZE:
            return TxError(ERR_CROSS_PAGE, f"slot {n + 1} (id {txp.id}) crosses its page: "
                           f"offset {txp.offset} + size {txp.size}", True, consumed,
                           [first.id, *ids], extra_count)
        if drop is None:
            others.append(txp)
        more = bool(txp.flags & NETTXF_more_data)
    if drop is not None:
        return TxError(drop[0], drop[1], False, consumed, [first.id, *ids], extra_count)

    # xenvif_tx_build_gops, after counting
    if remaining < ETH_HLEN:
        return TxError(ERR_RUNT, f"first slot (id {first.id}) holds {remaining} bytes, less "
                       f"than an Ethernet header", False, consumed, [first.id, *ids], extra_count)
    if first.offset + remaining > XEN_PAGE_SIZE:
        return TxError(ERR_CROSS_PAGE, f"first slot (id {first.id}) crosses its page: offset "
                       f"{first.offset} + size {remaining}", True, consumed, [first.id, *ids],
                       extra_count)
    gso = extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
    if gso is not None:
        if gso.gso_size == 0:
            return TxError(ERR_BAD_GSO, "GSO size is zero", True, consumed, [first.id, *ids],
                           extra_count)
        if gso.gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
            return TxError(ERR_BAD_GSO, f"bad GSO type {gso.gso_type}", True, consumed,
                           [first.id, *ids], extra_count)
    head = first._replace(size=remaining)
    return TxPacket(first.id, [head, *others], extras, first.size,
                    bool(first.flags & NETTXF_csum_blank),
                    bool(first.flags & NETTXF_data_validated), consumed, extra_count)


# --- RX slot layout -------------------------------------------------------------------------------
class RxSlot(NamedTuple):
    """One RX ring slot used for a packet: answer request ``id`` (grant ``gref``) with
    ``response`` in the *same* ring slot. Data slots get packet bytes ``[src, src + length)``
    copied to offset 0 of the granted page; extra slots have ``length`` 0."""
    id: int
    gref: int
    src: int
    length: int
    response: bytes


def rx_slots_needed(length: int, n_extras: int = 0) -> int:
    """Requests needed to deliver a ``length``-byte packet with ``n_extras`` extras."""
    return max(1, -(-length // XEN_PAGE_SIZE)) + n_extras


def layout_rx(length: int, flags: int, extras: Sequence[bytes],
              requests: Sequence[tuple[int, int]]) -> list[RxSlot] | None:
    """Spread a ``length``-byte packet over RX ``requests`` (``(id, gref)`` from the consumer
    index on), as netback does: full pages of data, ``NETRXF_more_data`` on all but the last
    data slot, ``flags`` (``NETRXF_csum_blank``/``data_validated``) and ``NETRXF_extra_info``
    on the first, and the 8-byte ``extras`` (e.g. :func:`pack_extra_gso`, MORE flags are set
    here) right after the first data slot. None if there are not enough requests; netfront
    takes at most ``XEN_NETIF_NR_SLOTS_MIN`` data slots."""
    if not 0 < length <= XEN_NETIF_NR_SLOTS_MIN * XEN_PAGE_SIZE:
        raise ValueError(f"cannot deliver a {length}-byte packet")
    if rx_slots_needed(length, len(extras)) > len(requests):
        return None
    out: list[RxSlot] = []
    reqs = iter(requests)

    def data_slot(first: bool) -> None:
        rid, gref = next(reqs)
        src = out[-1].src + out[-1].length if out else 0
        n = min(XEN_PAGE_SIZE, length - src)
        f = NETRXF_more_data if src + n < length else 0
        if first:
            f |= flags & (NETRXF_csum_blank | NETRXF_data_validated)
            if extras:
                f |= NETRXF_extra_info
        out.append(RxSlot(rid, gref, src, n, pack_rx_response(rid, 0, f, n)))

    data_slot(True)
    end = out[0].length
    for i, ex in enumerate(extras):
        if len(ex) != EXTRA_INFO_SIZE:
            raise ValueError("extra infos are 8 bytes")
        ex = bytearray(ex)
        if i < len(extras) - 1:
            ex[1] |= XEN_NETIF_EXTRA_FLAG_MORE
        else:
            ex[1] &= ~XEN_NETIF_EXTRA_FLAG_MORE & 0xFF
        rid, gref = next(reqs)
        out.append(RxSlot(rid, gref, end, 0, bytes(ex)))
    while end < length:
        data_slot(False)
        end = out[-1].src + out[-1].length
    return out


# --- checksums --------------------------------------------------------------------------------------
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
IPPROTO_TCP, IPPROTO_UDP = 6, 17
_V6_EXT_OPTS = (0, 43, 60)          # hop-by-hop, routing, destination options
_V6_FRAG, _V6_AH, _V6_ROUTING = 44, 51, 43


class _L4(NamedTuple):
    version: int
    src: bytes
    dst: bytes
    proto: int
    start: int          # offset of the TCP/UDP header in the frame (csum_start)
    length: int         # TCP/UDP header + payload length according to the IP header
    csum_field: int     # 16 (TCP) or 6 (UDP): csum_offset
    routed: bool        # IPv6 routing header with segments left: the pseudo-header's
                        # destination is not the IPv6 header's


def _parse_l4(pkt: bytes | bytearray | memoryview) -> _L4 | None:
    n = len(pkt)
    if n < ETH_HLEN:
        return None
    etype = pkt[12] << 8 | pkt[13]
    off = ETH_HLEN
    if etype in (ETH_P_8021Q, ETH_P_8021AD):
        if n < off + 4:
            return None
        etype = pkt[off + 2] << 8 | pkt[off + 3]
        off += 4
    routed = False
    if etype == ETH_P_IP:
        if n < off + 20 or pkt[off] >> 4 != 4:
            return None
        ihl = (pkt[off] & 0xF) * 4
        total = pkt[off + 2] << 8 | pkt[off + 3]
        if ihl < 20 or n < off + ihl or total < ihl:
            return None
        if (pkt[off + 6] << 8 | pkt[off + 7]) & 0x3FFF:     # MF or fragment offset
            return None
        version, proto = 4, pkt[off + 9]
        src, dst = bytes(pkt[off + 12:off + 16]), bytes(pkt[off + 16:off + 20])
        start, length = off + ihl, total - ihl
    elif etype == ETH_P_IPV6:
        if n < off + 40 or pkt[off] >> 4 != 6:
            return None
        end = off + 40 + (pkt[off + 4] << 8 | pkt[off + 5])
        version, proto = 6, pkt[off + 6]
        src, dst = bytes(pkt[off + 8:off + 24]), bytes(pkt[off + 24:off + 40])
        p = off + 40
        for _ in range(16):                     # bounded walk over extension headers
            if proto in _V6_EXT_OPTS or proto == _V6_AH:
                if n < p + 8:
                    return None
                if proto == _V6_ROUTING and pkt[p + 3]:
                    routed = True
                size = (pkt[p + 1] + 2) * 4 if proto == _V6_AH else (pkt[p + 1] + 1) * 8
                proto, p = pkt[p], p + size
            elif proto == _V6_FRAG:
                if n < p + 8:
                    return None
                if (pkt[p + 2] << 8 | pkt[p + 3]) & 0xFFF9:   # offset or M flag: a fragment
                    return None
                proto, p = pkt[p], p + 8
            else:
                break
        else:
            return None
        start, length = p, end - p
    else:
        return None
    if proto == IPPROTO_TCP:
        hdr, field_off = 20, 16
    elif proto == IPPROTO_UDP:
        hdr, field_off = 8, 6
    else:
        return None
    if length < hdr or n < start + hdr:
        return None
    return _L4(version, src, dst, proto, start, length, field_off, routed)


def _sum_le(data: bytes | bytearray | memoryview) -> int:
    """Unfolded sum of the data as little-endian 16-bit words (odd byte zero-padded). By the
    byte-order independence of the ones'-complement sum (RFC 1071 s.2(B)), byte-swapping the
    folded result gives the network-order sum."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    s = sum(mv[:n & ~1].cast("H")) if n > 1 else 0
    if n & 1:
        s += mv[n - 1]
    return s


def _fold_swap(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ((s & 0xFF) << 8) | (s >> 8)


def _pseudo(info: _L4) -> bytes:
    if info.version == 4:
        return info.src + info.dst + bytes((0, info.proto)) + info.length.to_bytes(2, "big")
    return info.src + info.dst + info.length.to_bytes(4, "big") + bytes((0, 0, 0, info.proto))


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum (complement of the folded ones'-complement sum) of ``data``;
    ``initial`` is a network-order partial sum to add in."""
    s = _fold_swap(_sum_le(data))        # network-order folded sum
    s += initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def csum_offsets(packet: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(csum_start, csum_offset)`` of the TCP/UDP checksum in an Ethernet frame (one
    802.1Q/802.1ad tag allowed; IPv4 with options; IPv6 past hop-by-hop, routing, destination
    options, AH and atomic-fragment headers), or None (not TCP/UDP, an IP fragment, or headers
    truncated). Only the headers need to be present."""
    info = _parse_l4(packet)
    return None if info is None else (info.start, info.csum_field)


def seed_partial_checksum(buf: bytearray | memoryview) -> bool:
    """Store the folded pseudo-header sum in the TCP/UDP checksum field - the
    ``CHECKSUM_PARTIAL``/``NEEDS_CSUM`` convention, which the kernel completes by summing from
    ``csum_start`` to the end (what netback does for GSO packets sent without csum_blank).
    Needs only the headers. False if the frame has no checksummable TCP/UDP header."""
    info = _parse_l4(buf)
    if info is None or info.routed:
        return False
    seed = _fold_swap(_sum_le(_pseudo(info)))
    pos = info.start + info.csum_field
    buf[pos:pos + 2] = seed.to_bytes(2, "big")
    return True


def complete_checksum(buf: bytearray | memoryview) -> bool:
    """Compute the TCP/UDP checksum of a whole frame in place: pseudo-header plus segment (the
    field's old content, blank or seed, is ignored); UDP's 0 is sent as 0xFFFF. Sums only the
    length the IP header gives (Ethernet padding is excluded). False, leaving ``buf`` alone, if
    the frame has no checksummable TCP/UDP payload or is shorter than its IP length."""
    info = _parse_l4(buf)
    if info is None or info.routed or len(buf) < info.start + info.length:
        return False
    pos = info.start + info.csum_field
    buf[pos:pos + 2] = b"\0\0"
    s = _sum_le(_pseudo(info)) + _sum_le(memoryview(buf)[info.start:info.start + info.length])
    c = ~_fold_swap(s) & 0xFFFF
    if c == 0 and info.proto == IPPROTO_UDP:
        c = 0xFFFF
    buf[pos:pos + 2] = c.to_bytes(2, "big")
    return True


def verify_checksum(packet: bytes | bytearray | memoryview) -> bool | None:
    """True/False whether the frame's TCP/UDP checksum is right (an IPv4 UDP checksum of 0,
    'none', counts as right); None if it cannot be checked."""
    info = _parse_l4(packet)
    if info is None or info.routed or len(packet) < info.start + info.length:
        return None
    pos = info.start + info.csum_field
    if info.proto == IPPROTO_UDP and info.version == 4 and packet[pos] == packet[pos + 1] == 0:
        return True
    s = _sum_le(_pseudo(info)) + _sum_le(memoryview(packet)[info.start:info.start + info.length])
    return _fold_swap(s) == 0xFFFF


# --- netif <-> virtio-net header ------------------------------------------------------------------
def gso_from_packet(packet: bytes | bytearray | memoryview,
                    xen_gso_type: int) -> tuple[int, int] | None:
    """For a Xen GSO extra of ``xen_gso_type`` on this frame, the virtio ``(gso_type,
    hdr_len)``: TCPv4/TCPv6 and the length of all headers through TCP's (data offset). None
    if the frame is not TCP over the matching IP version or its headers are cut short."""
    info = _parse_l4(packet)
    if info is None or info.proto != IPPROTO_TCP:
        return None
    if xen_gso_type == XEN_NETIF_GSO_TYPE_TCPV4 and info.version == 4:
        vtype = VIRTIO_NET_HDR_GSO_TCPV4
    elif xen_gso_type == XEN_NETIF_GSO_TYPE_TCPV6 and info.version == 6:
        vtype = VIRTIO_NET_HDR_GSO_TCPV6
    else:
        return None
    doff = (packet[info.start + 12] >> 4) * 4
    if doff < 20 or doff > info.length or len(packet) < info.start + doff:
        return None
    return vtype, info.start + doff


def tx_to_vnet_hdr(head: bytes | bytearray | memoryview, csum_blank: bool,
                   data_validated: bool, gso: Extra | None = None) -> bytes | None:
    """The 12-byte virtio-net header for writing a guest packet to the TAP. ``head`` is the
    start of the frame (at least all its headers). csum_blank (or GSO) -> NEEDS_CSUM with the
    L4 offsets; else data_validated -> DATA_VALID; a GSO extra -> TCPV4/6, hdr_len, gso_size.

    A GSO packet without csum_blank gets its pseudo-header seed written into ``head`` (as
    netback's checksum fixup does), so ``head`` must then be the writable buffer that will be
    sent. Returns None when netback would drop the packet (no TCP/UDP header to offload, GSO
    not matching the frame); respond OKAY and discard it."""
    flags = gso_type = hdr_len = gso_size = cstart = coff = 0
    if csum_blank or gso is not None:
        offs = csum_offsets(head)
        if offs is None:
            return None
        cstart, coff = offs
        flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    elif data_validated:
        flags = VIRTIO_NET_HDR_F_DATA_VALID
    if gso is not None:
        if gso.type != XEN_NETIF_EXTRA_TYPE_GSO or gso.gso_size == 0:
            return None
        derived = gso_from_packet(head, gso.gso_type)
        if derived is None:
            return None
        gso_type, hdr_len = derived
        gso_size = gso.gso_size
        if not csum_blank:
            if isinstance(head, bytes) or (isinstance(head, memoryview) and head.readonly):
                raise TypeError("GSO without csum_blank needs a writable head to fix up")
            if not seed_partial_checksum(head):
                return None
    return pack_vnet_hdr(flags, gso_type, hdr_len, gso_size, cstart, coff)


def vnet_hdr_to_rx(vnet_hdr: bytes | bytearray | memoryview) -> tuple[int, Extra | None]:
    """Netif view of a frame read from the TAP: ``(NETRXF_* flags, GSO extra or None)``.
    NEEDS_CSUM -> csum_blank|data_validated (netback's CHECKSUM_PARTIAL mapping; the checksum
    field already holds the pseudo-header seed netfront expects); DATA_VALID -> data_validated.
    TCPv4/TCPv6 GSO becomes a GSO extra (ECN bit dropped, as netback does); raises ValueError
    for UDP GSO, which netif cannot express (Tap never enables UFO/USO)."""
    h = unpack_vnet_hdr(vnet_hdr)
    flags = 0
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        flags = NETRXF_csum_blank | NETRXF_data_validated
    elif h.flags & VIRTIO_NET_HDR_F_DATA_VALID:
        flags = NETRXF_data_validated
    gtype = h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gtype == VIRTIO_NET_HDR_GSO_NONE:
        return flags, None
    if gtype == VIRTIO_NET_HDR_GSO_TCPV4:
        xtype = XEN_NETIF_GSO_TYPE_TCPV4
    elif gtype == VIRTIO_NET_HDR_GSO_TCPV6:
        xtype = XEN_NETIF_GSO_TYPE_TCPV6
    else:
        raise ValueError(f"virtio GSO type {h.gso_type:#x} has no netif equivalent")
    if h.gso_size == 0:
        raise ValueError("virtio GSO header with gso_size 0")
    return flags, unpack_extra(pack_extra_gso(h.gso_size, xtype))

