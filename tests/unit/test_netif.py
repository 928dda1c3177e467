"""Sans-IO netif protocol: layouts, the TX assembler's netback rules, RX layout, checksums and
the netif <-> virtio-net header mapping."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.backends import netif as n
from pyxen.host.tap import (VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                            VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
                            VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VNET_HDR_LEN,
                            pack_vnet_hdr, unpack_vnet_hdr)

# --- an independent RFC 1071 implementation and packet builders -------------------------------


def rfc1071(data: bytes) -> int:
    """Checksum the textbook way: big-endian 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ref_l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes, csum_at: int) -> int:
    seg = bytearray(segment)
    seg[csum_at:csum_at + 2] = b"\0\0"
    if len(src) == 4:
        pseudo = src + dst + bytes([0, proto]) + struct.pack("!H", len(seg))
    else:
        pseudo = src + dst + struct.pack("!I", len(seg)) + bytes([0, 0, 0, proto])
    c = rfc1071(pseudo + bytes(seg))
    return 0xFFFF if (c == 0 and proto == 17) else c


MAC_A = bytes.fromhex("00163e000001")
MAC_B = bytes.fromhex("00163e000002")
V4_SRC, V4_DST = bytes([10, 88, 0, 2]), bytes([10, 88, 0, 1])
V6_SRC = bytes.fromhex("fd00000000000000000000000000000a")
V6_DST = bytes.fromhex("fd00000000000000000000000000000b")


def eth(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return MAC_B + MAC_A + tag + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, options: bytes = b"", frag: int = 0x4000) -> bytes:
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 1,
                                frag, 64, proto, 0, V4_SRC, V4_DST) + options)
    hdr[10:12] = struct.pack("!H", rfc1071(bytes(hdr)))
    return bytes(hdr) + payload


def ipv6(nh: int, payload: bytes, ext: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(payload), nh, 64,
                       V6_SRC, V6_DST) + ext + payload


def udp(payload: bytes, csum: int = 0) -> bytes:
    return struct.pack("!HHHH", 5000, 6000, 8 + len(payload), csum) + payload


def tcp(payload: bytes, options: bytes = b"", csum: int = 0) -> bytes:
    doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 2, doff << 4, 0x18, 65535, csum, 0) \
        + options + payload


def udp4_frame(payload: bytes = b"hello, netif!", vlan: int | None = None) -> bytes:
    return eth(0x0800, ipv4(17, udp(payload)), vlan)


# --- layouts --------------------------------------------------------------------------------------


def test_struct_sizes_and_ring_geometry():
    assert (n.TX_REQUEST_SIZE, n.TX_RESPONSE_SIZE, n.EXTRA_INFO_SIZE, n.TX_ENTRY_SIZE) == \
        (12, 4, 8, 12)
    assert (n.RX_REQUEST_SIZE, n.RX_RESPONSE_SIZE, n.RX_ENTRY_SIZE) == (8, 8, 8)
    assert len(n.pack_tx_request(1, 2, 3, 4, 5)) == 12
    assert len(n.pack_tx_response(1, 0)) == 4
    assert len(n.pack_extra_gso(1448, 1)) == 8
    assert len(n.pack_rx_request(1, 2)) == 8 and len(n.pack_rx_response(1, 2, 3, 4)) == 8
    assert n.SRING_HEADER_SIZE == 64
    assert n.TX_RING_SIZE == 256 and n.RX_RING_SIZE == 256       # 336 and 504 rounded down
    assert n.ring_capacity(12, 2) == 512 and n.ring_capacity(8, 2) == 512
    assert n.ring_capacity(12, 4) == 1024


def test_field_offsets():
    # tx request: gref@0 (u32) offset@4 flags@6 id@8 size@10
    raw = n.pack_tx_request(0x11223344, 0x0102, 0x0304, 0x0506, 0x0708)
    assert raw == bytes.fromhex("44332211" "0201" "0403" "0605" "0807")
    assert n.unpack_tx_request(raw) == n.TxRequest(0x11223344, 0x0102, 0x0304, 0x0506, 0x0708)
    assert n.unpack_tx_request(raw + b"junk").size == 0x0708
    # tx response: id@0 status@2 (signed)
    assert n.pack_tx_response(7, n.NETIF_RSP_ERROR) == bytes.fromhex("0700ffff")
    assert n.unpack_tx_response(n.pack_tx_response(9, n.NETIF_RSP_NULL)) == (9, 1)
    # rx request: id@0 pad@2 gref@4
    assert n.pack_rx_request(0x0102, 0xAABBCCDD) == bytes.fromhex("0201" "0000" "ddccbbaa")
    assert n.unpack_rx_request(bytes.fromhex("0201" "ffff" "ddccbbaa")) == (0x0102, 0xAABBCCDD)
    # rx response: id@0 offset@2 flags@4 status@6 (signed)
    assert n.pack_rx_response(1, 2, 3, -2) == bytes.fromhex("0100" "0200" "0300" "feff")
    # extra: type@0 flags@1 gso.size@2 gso.type@4 pad@5 features@6
    gso = n.pack_extra_gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV6, features=0, flags=1)
    assert gso == bytes.fromhex("01" "01" "a805" "02" "00" "0000")
    e = n.unpack_extra(gso + b"\0" * 4)                     # as found in a 12-byte TX slot
    assert (e.type, e.flags, e.gso_size, e.gso_type, e.gso_features, e.more) == \
        (1, 1, 1448, 2, 0, True)
    mc = n.unpack_extra(n.pack_extra(n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, MAC_A))
    assert mc.mcast_addr == MAC_A
    h = n.unpack_extra(n.pack_extra(n.XEN_NETIF_EXTRA_TYPE_HASH, 0, bytes([3, 1]) +
                                    (0xDEADBEEF).to_bytes(4, "little")))
    assert (h.hash_type, h.hash_algorithm, h.hash_value) == (3, 1, 0xDEADBEEF)
    x = n.unpack_extra(n.pack_extra(n.XEN_NETIF_EXTRA_TYPE_XDP, 0, bytes([0, 1, 0, 0, 0, 0])))
    assert x.xdp_headroom == 256


def test_constants():
    assert (n.NETTXF_csum_blank, n.NETTXF_data_validated, n.NETTXF_more_data,
            n.NETTXF_extra_info) == (1, 2, 4, 8)
    assert (n.NETRXF_data_validated, n.NETRXF_csum_blank, n.NETRXF_more_data,
            n.NETRXF_extra_info, n.NETRXF_gso_prefix) == (1, 2, 4, 8, 16)
    assert (n.XEN_NETIF_EXTRA_TYPE_GSO, n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
            n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL, n.XEN_NETIF_EXTRA_TYPE_HASH,
            n.XEN_NETIF_EXTRA_TYPE_XDP, n.XEN_NETIF_EXTRA_TYPE_MAX) == (1, 2, 3, 4, 5, 6)
    assert (n.XEN_NETIF_GSO_TYPE_TCPV4, n.XEN_NETIF_GSO_TYPE_TCPV6) == (1, 2)
    assert (n.NETIF_RSP_DROPPED, n.NETIF_RSP_ERROR, n.NETIF_RSP_OKAY, n.NETIF_RSP_NULL) == \
        (-2, -1, 0, 1)
    assert n.XEN_NETIF_MAX_TX_SIZE == 0xFFFF
    assert (n.XEN_NETBK_LEGACY_SLOTS_MAX, n.FATAL_SKB_SLOTS_DEFAULT) == (18, 20)


# --- TX assembler ---------------------------------------------------------------------------------
def req(size: int, id: int = 0, flags: int = 0, offset: int = 0, gref: int = 100) -> bytes:
    return n.pack_tx_request(gref, offset, flags, id, size)


def extra(type: int, flags: int = 0, data: bytes = bytes(6)) -> bytes:
    return n.pack_extra(type, flags, data) + bytes(4)


def gso_extra(size: int = 1448, gtype: int = n.XEN_NETIF_GSO_TYPE_TCPV4, flags: int = 0):
    return n.pack_extra_gso(size, gtype, flags=flags) + bytes(4)


def chain(total: int, sizes: list[int], first_id: int = 1, first_flags: int = 0):
    """A first request of ``total`` bytes followed by ``sizes`` chained slots (ids 2, 3...)."""
    out = [req(total, first_id, first_flags | (n.NETTXF_more_data if sizes else 0))]
    for i, s in enumerate(sizes):
        more = n.NETTXF_more_data if i < len(sizes) - 1 else 0
        out.append(req(s, first_id + 1 + i, more))
    return out


def test_single_slot_packet():
    r = n.assemble_tx([req(60, id=5, offset=100, gref=77), req(99, id=6)])
    assert isinstance(r, n.TxPacket)
    assert r.slots == [n.TxRequest(77, 100, 0, 5, 60)]
    assert (r.first_id, r.total_len, r.consumed, r.extra_count) == (5, 60, 1, 0)
    assert not r.csum_blank and not r.data_validated and r.extras == {} and r.gso is None
    assert r.responses() == [(5, n.NETIF_RSP_OKAY)]
    assert r.responses(n.NETIF_RSP_DROPPED) == [(5, -2)]


def test_multi_slot_first_size_is_total():
    entries = chain(3000, [1000, 500]) + [req(60, 9)]
    r = n.assemble_tx(entries)
    assert isinstance(r, n.TxPacket)
    assert [s.size for s in r.slots] == [1500, 1000, 500]
    assert [s.id for s in r.slots] == [1, 2, 3]
    assert r.total_len == 3000 and r.consumed == 3
    assert r.responses() == [(1, 0), (2, 0), (3, 0)]


def test_csum_flags():
    r = n.assemble_tx([req(60, flags=n.NETTXF_csum_blank | n.NETTXF_data_validated)])
    assert r.csum_blank and r.data_validated
    r = n.assemble_tx([req(60, flags=n.NETTXF_data_validated)])
    assert not r.csum_blank and r.data_validated


def test_gso_extra_and_null_responses():
    f = n.NETTXF_extra_info | n.NETTXF_more_data | n.NETTXF_csum_blank
    entries = [req(5000, 1, f), gso_extra(1448, flags=n.XEN_NETIF_EXTRA_FLAG_MORE),
               extra(n.XEN_NETIF_EXTRA_TYPE_HASH, 0, bytes([1, 0, 1, 2, 3, 4])),
               req(4000, 2, n.NETTXF_more_data), req(900, 3)]
    r = n.assemble_tx(entries)
    assert isinstance(r, n.TxPacket)
    assert r.consumed == 5 and r.extra_count == 2
    assert r.gso.gso_size == 1448 and r.gso.gso_type == n.XEN_NETIF_GSO_TYPE_TCPV4
    assert r.extras[n.XEN_NETIF_EXTRA_TYPE_HASH].hash_value == 0x04030201
    assert [s.size for s in r.slots] == [100, 4000, 900]
    assert r.responses() == [(1, 0), (0, n.NETIF_RSP_NULL), (0, n.NETIF_RSP_NULL), (2, 0), (3, 0)]


def test_incomplete():
    assert n.assemble_tx([]) is n.TX_INCOMPLETE
    assert n.assemble_tx(chain(3000, [1000, 500])[:2]) is n.TX_INCOMPLETE
    assert n.assemble_tx([req(100, 1, n.NETTXF_extra_info)]) is n.TX_INCOMPLETE
    more_extras = [req(100, 1, n.NETTXF_extra_info),
                   gso_extra(flags=n.XEN_NETIF_EXTRA_FLAG_MORE)]
    assert n.assemble_tx(more_extras) is n.TX_INCOMPLETE
    assert n.TX_INCOMPLETE.consumed == 0


def test_reads_no_further_than_the_packet():
    pulled = []

    def gen():
        for e in chain(3000, [1000, 500]) + [req(60, 9), req(60, 10)]:
            pulled.append(e)
            yield e
    r = n.assemble_tx(gen())
    assert r.consumed == 3 and len(pulled) == 3


def test_slot_limits_match_netback():
    # 18 following slots (19 in all) are fine
    r = n.assemble_tx(chain(18 * 100 + 60, [100] * 18))
    assert isinstance(r, n.TxPacket) and len(r.slots) == 19 and r.slots[0].size == 60
    # 19 and 20 following slots: consumed and answered with errors, not fatal
    for k in (19, 20):
        r = n.assemble_tx(chain(k * 100 + 60, [100] * k) + [req(60, 99)])
        assert isinstance(r, n.TxError) and r.code == n.ERR_TOO_MANY_SLOTS and not r.fatal
        assert r.consumed == k + 1 and r.error_ids == list(range(1, k + 2))
        assert r.responses() == [(i, n.NETIF_RSP_ERROR) for i in range(1, k + 2)]
    # a 21st following slot announced: malicious
    r = n.assemble_tx(chain(21 * 100 + 60, [100] * 21))
    assert isinstance(r, n.TxError) and r.code == n.ERR_FATAL_SLOTS and r.fatal
    assert r.consumed == 21
    # ...decided without waiting for the 21st to be produced
    r = n.assemble_tx(chain(21 * 100 + 60, [100] * 21)[:21])
    assert isinstance(r, n.TxError) and r.code == n.ERR_FATAL_SLOTS
    # limits are parameters
    r = n.assemble_tx(chain(500, [100, 100]), max_slots=1, fatal_slots=5)
    assert r.code == n.ERR_TOO_MANY_SLOTS


def test_slot_larger_than_remaining():
    r = n.assemble_tx(chain(100, [200]))
    assert isinstance(r, n.TxError) and r.code == n.ERR_SLOT_TOO_BIG and not r.fatal
    assert r.consumed == 2 and r.error_ids == [1, 2]
    r = n.assemble_tx(chain(1000, [600, 600, 10]))      # cumulative: the second overflows
    assert r.code == n.ERR_SLOT_TOO_BIG and r.consumed == 4 and r.error_ids == [1, 2, 3, 4]
    assert "slot 2" in r.reason


def test_runt_first_slot():
    for entries in ([req(0)], [req(10)], chain(1000, [990]), chain(1000, [1000])):
        r = n.assemble_tx(entries)
        assert isinstance(r, n.TxError) and r.code == n.ERR_RUNT and not r.fatal
        assert r.consumed == len(entries)
    assert isinstance(n.assemble_tx([req(14)]), n.TxPacket)
    assert isinstance(n.assemble_tx(chain(1014, [1000])), n.TxPacket)


def test_cross_page_is_fatal():
    assert isinstance(n.assemble_tx([req(60, offset=4036)]), n.TxPacket)
    r = n.assemble_tx([req(61, offset=4036)])
    assert r.code == n.ERR_CROSS_PAGE and r.fatal and r.consumed == 1
    entries = [req(2000, 1, n.NETTXF_more_data), req(10, 2, n.NETTXF_more_data, offset=4090),
               req(10, 3)]
    r = n.assemble_tx(entries)
    assert r.code == n.ERR_CROSS_PAGE and r.fatal and r.consumed == 2 and r.error_ids == [1, 2]
    # the first slot is checked with its own size, not the total
    ok = [req(5000, 1, n.NETTXF_more_data, offset=3096), req(4000, 2)]
    assert isinstance(n.assemble_tx(ok), n.TxPacket)
    bad = [req(5000, 1, n.NETTXF_more_data, offset=3097), req(4000, 2)]
    r = n.assemble_tx(bad)
    assert r.code == n.ERR_CROSS_PAGE and r.fatal and r.consumed == 2


def test_bad_extra_type_is_fatal():
    for t in (0, 6, 255):
        r = n.assemble_tx([req(100, 1, n.NETTXF_extra_info), extra(t), req(60, 2)])
        assert isinstance(r, n.TxError) and r.code == n.ERR_BAD_EXTRA and r.fatal
        assert r.consumed == 2 and r.extra_count == 1
        assert r.responses() == [(1, -1), (0, n.NETIF_RSP_NULL)]
    # unknown-but-valid types (HASH, XDP) pass
    r = n.assemble_tx([req(100, 1, n.NETTXF_extra_info), extra(n.XEN_NETIF_EXTRA_TYPE_XDP)])
    assert isinstance(r, n.TxPacket) and n.XEN_NETIF_EXTRA_TYPE_XDP in r.extras


def test_bad_gso_is_fatal():
    base = n.NETTXF_extra_info | n.NETTXF_csum_blank
    for ex in (gso_extra(size=0), gso_extra(gtype=0), gso_extra(gtype=3)):
        r = n.assemble_tx([req(100, 1, base), ex])
        assert isinstance(r, n.TxError) and r.code == n.ERR_BAD_GSO and r.fatal
        assert r.consumed == 2
    r = n.assemble_tx([req(100, 1, base), gso_extra(gtype=n.XEN_NETIF_GSO_TYPE_TCPV6)])
    assert isinstance(r, n.TxPacket)


def test_multicast_control():
    f = n.NETTXF_extra_info | n.NETTXF_more_data        # more_data is ignored, like netback
    r = n.assemble_tx([req(0, 4, f), extra(n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, MAC_A),
                       req(60, 5)])
    assert isinstance(r, n.TxControl)
    assert (r.op, r.mcast_addr, r.consumed, r.first_id) == \
        (n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, MAC_A, 2, 4)
    assert r.responses() == [(4, 0), (0, n.NETIF_RSP_NULL)]
    r = n.assemble_tx([req(0, 4, n.NETTXF_extra_info),
                       extra(n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL, 0, MAC_B)])
    assert r.op == n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL and r.mcast_addr == MAC_B


# --- hypothesis: the assembler is total --------------------------------------------------------
@st.composite
def ring_entry(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(min_size=12, max_size=12))
    if kind == 1:
        ex_type = draw(st.integers(0, 7))
        return n.pack_extra(ex_type, draw(st.integers(0, 3)),
                            draw(st.binary(min_size=6, max_size=6))) + bytes(4)
    flags = draw(st.integers(0, 0xFFFF)) if kind == 2 else \
        draw(st.sampled_from([0, 4, 8, 12, 5, 1, 2, 3]))
    size = draw(st.one_of(st.integers(0, 0xFFFF), st.integers(0, 4200)))
    offset = draw(st.one_of(st.integers(0, 0xFFFF), st.integers(0, 4096)))
    return n.pack_tx_request(draw(st.integers(0, 2**32 - 1)), offset, flags,
                             draw(st.integers(0, 0xFFFF)), size)


@st.composite
def structured_entries(draw):
    """Mostly well-formed packets (extras, long chains), with random damage."""
    k = draw(st.integers(0, 24))
    sizes = draw(st.lists(st.integers(0, 300), min_size=k, max_size=k))
    own = draw(st.integers(0, 300))
    n_extras = draw(st.integers(0, 3))
    flags = draw(st.sampled_from([0, n.NETTXF_csum_blank, n.NETTXF_data_validated]))
    if n_extras:
        flags |= n.NETTXF_extra_info
    out = [req(own + sum(sizes), 1, flags | (n.NETTXF_more_data if k else 0),
               offset=draw(st.integers(0, 4096)))]
    for i in range(n_extras):
        more = n.XEN_NETIF_EXTRA_FLAG_MORE if i < n_extras - 1 else 0
        out.append(gso_extra(draw(st.integers(0, 2)), draw(st.integers(0, 3)), more)
                   if draw(st.booleans()) else extra(draw(st.integers(0, 6)), more))
    for i, size in enumerate(sizes):
        more = n.NETTXF_more_data if i < k - 1 or draw(st.integers(0, 9)) == 0 else 0
        out.append(req(size, 2 + i, more, offset=draw(st.integers(0, 4000))))
    for _ in range(draw(st.integers(0, 2))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(ring_entry())
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return out + draw(st.lists(ring_entry(), max_size=3))


@settings(max_examples=800, deadline=None)
@given(st.one_of(st.lists(ring_entry(), max_size=30), structured_entries()))
def test_fuzz_assembler_is_total(entries):
    pulled = 0

    def gen():
        nonlocal pulled
        for e in entries:
            pulled += 1
            yield e
    r = n.assemble_tx(gen())
    assert isinstance(r, (n.TxPacket, n.TxControl, n.TxError, n.TxIncomplete))
    assert 0 <= r.consumed <= len(entries)
    if isinstance(r, n.TxIncomplete):
        return
    assert r.consumed >= 1 and pulled == r.consumed        # never reads past the packet
    assert len(r.responses()) == r.consumed                 # one response per consumed slot
    if isinstance(r, n.TxPacket):
        assert all(s.offset + s.size <= n.XEN_PAGE_SIZE for s in r.slots)
        assert sum(s.size for s in r.slots) == r.total_len
        assert r.slots[0].size >= n.ETH_HLEN
        assert len(r.slots) <= 1 + n.XEN_NETBK_LEGACY_SLOTS_MAX
        assert r.consumed == len(r.slots) + r.extra_count
    if isinstance(r, n.TxError):
        assert r.code in (n.ERR_TOO_MANY_SLOTS, n.ERR_FATAL_SLOTS, n.ERR_SLOT_TOO_BIG,
                          n.ERR_RUNT, n.ERR_CROSS_PAGE, n.ERR_BAD_EXTRA, n.ERR_BAD_GSO)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 4096), min_size=1, max_size=18), st.integers(14, 4096),
       st.integers(0, 0xFFFF))
def test_fuzz_valid_chains_assemble(sizes, first_own, first_id):
    total = first_own + sum(sizes)
    if total > 0xFFFF:
        return
    r = n.assemble_tx(chain(total, sizes, first_id=first_id % 0xFF00))
    assert isinstance(r, n.TxPacket)
    assert [s.size for s in r.slots] == [first_own, *sizes]


# --- RX layout ------------------------------------------------------------------------------------
def test_rx_layout_single_and_multi():
    reqs = [(10 + i, 500 + i) for i in range(8)]
    s = n.layout_rx(60, n.NETRXF_data_validated, [], reqs)
    assert len(s) == 1 and (s[0].id, s[0].gref, s[0].src, s[0].length) == (10, 500, 0, 60)
    assert n.unpack_rx_response(s[0].response) == (10, 0, n.NETRXF_data_validated, 60)
    flags = n.NETRXF_csum_blank | n.NETRXF_data_validated
    s = n.layout_rx(9000, flags, [n.pack_extra_gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)], reqs)
    assert [x.length for x in s] == [4096, 0, 4096, 808]
    assert [x.src for x in s] == [0, 4096, 4096, 8192]
    assert n.unpack_rx_response(s[0].response) == \
        (10, 0, flags | n.NETRXF_more_data | n.NETRXF_extra_info, 4096)
    ex = n.unpack_extra(s[1].response)
    assert (ex.type, ex.gso_size, ex.more) == (n.XEN_NETIF_EXTRA_TYPE_GSO, 1448, False)
    assert n.unpack_rx_response(s[2].response) == (12, 0, n.NETRXF_more_data, 4096)
    assert n.unpack_rx_response(s[3].response) == (13, 0, 0, 808)
    # two extras: MORE on the first only
    s = n.layout_rx(100, 0, [n.pack_extra_gso(1, 1), n.pack_extra(4, 0)], reqs)
    assert [n.unpack_extra(x.response).more for x in s[1:]] == [True, False]
    assert n.layout_rx(9000, 0, [], reqs[:2]) is None
    assert n.rx_slots_needed(9000, 1) == 4 and n.rx_slots_needed(4096) == 1


# --- checksums ------------------------------------------------------------------------------------
def test_internet_checksum_rfc1071_example():
    data = bytes.fromhex("0001f203f4f5f6f7")             # RFC 1071 section 3 example
    assert n.internet_checksum(data) == ~0xDDF2 & 0xFFFF == rfc1071(data)
    assert n.internet_checksum(b"\x01") == rfc1071(b"\x01") == 0xFEFF


def test_ipv4_header_checksum_with_independent_sum():
    hdr = ipv4(17, udp(b"x"))[:20]
    assert n.internet_checksum(hdr) == 0                   # builder filled it by rfc1071


CASES = {
    "udp4": (udp4_frame(), 34, 6),
    "udp4-odd": (udp4_frame(b"odd"), 34, 6),
    "udp4-vlan": (udp4_frame(b"tagged", vlan=42), 38, 6),
    "tcp4-options": (eth(0x0800, ipv4(6, tcp(b"GET / HTTP/1.0\r\n\r\n", b"\x01\x01\x01\x00"),
                                      options=b"\x94\x04\x00\x00")), 38, 16),
    "tcp6": (eth(0x86DD, ipv6(6, tcp(b"v6 data!"))), 54, 16),
    "udp6-exthdrs": (eth(0x86DD, ipv6(0, udp(b"through ext headers"),
                                      ext=bytes([60, 0, 1, 4, 0, 0, 0, 0])      # hop-by-hop
                                      + bytes([17, 1]) + bytes(14))), 14 + 40 + 8 + 16, 6),
    "udp6-vlan-frag0": (eth(0x86DD, ipv6(44, udp(b"atomic fragment"),
                                         ext=bytes([17, 0, 0, 0, 0, 0, 0, 1])), vlan=7),
                        18 + 40 + 8, 6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_csum_offsets_and_complete(name):
    frame, start, off = CASES[name]
    assert n.csum_offsets(frame) == (start, off)
    assert n.csum_offsets(frame[:start + (20 if off == 16 else 8)]) == (start, off)   # headers
    buf = bytearray(frame)
    assert n.complete_checksum(buf)
    got = struct.unpack_from("!H", buf, start + off)[0]
    if name.startswith(("udp4", "tcp4")):
        ip = frame[14 + (4 if "vlan" in name else 0):]
        src, dst = ip[12:16], ip[16:20]
    else:
        ip = frame[14 + (4 if "vlan" in name else 0):]
        src, dst = ip[8:24], ip[24:40]
    proto = 6 if off == 16 else 17
    assert got == ref_l4_checksum(src, dst, proto, frame[start:], off)
    assert n.verify_checksum(buf) is True
    buf[-1] ^= 0x55
    assert n.verify_checksum(buf) is False
    # the old field content is ignored
    junk = bytearray(frame)
    junk[start + off:start + off + 2] = b"\x12\x34"
    assert n.complete_checksum(junk) and junk[start + off:start + off + 2] == \
        buf[start + off:start + off + 2]


def test_complete_excludes_ethernet_padding():
    frame = udp4_frame(b"pad")
    padded = bytearray(frame + bytes(60 - len(frame)) if len(frame) < 60 else frame)
    padded[-1] = 0xAB                                      # junk in the padding
    exact = bytearray(frame)
    assert n.complete_checksum(padded) and n.complete_checksum(exact)
    assert padded[:len(frame)] == exact


def test_udp_zero_checksum_sent_as_ffff():
    payload = bytearray(b"\0\0zero")
    frame = bytearray(udp4_frame(bytes(payload)))
    n.complete_checksum(frame)
    c = frame[40:42]
    frame2 = bytearray(udp4_frame(bytes(c) + b"zero"))     # makes the true checksum 0
    assert n.complete_checksum(frame2)
    assert frame2[40:42] == b"\xff\xff"
    assert n.verify_checksum(frame2)


def test_seed_then_kernel_style_completion():
    for name in sorted(CASES):
        frame, start, off = CASES[name]
        buf = bytearray(frame)
        assert n.seed_partial_checksum(buf)
        # what the kernel does for CHECKSUM_PARTIAL: sum from csum_start, store the complement
        c = rfc1071(bytes(buf[start:]))
        proto = 6 if off == 16 else 17
        c = 0xFFFF if (c == 0 and proto == 17) else c
        full = bytearray(frame)
        n.complete_checksum(full)
        assert c == struct.unpack_from("!H", full, start + off)[0], name


def test_not_checksummable():
    icmp = eth(0x0800, ipv4(1, b"\x08\x00" + bytes(30)))
    assert n.csum_offsets(icmp) is None and not n.complete_checksum(bytearray(icmp))
    frag = eth(0x0800, ipv4(17, udp(b"frag"), frag=0x2000))          # MF set
    assert n.csum_offsets(frag) is None
    frag = eth(0x0800, ipv4(17, udp(b"frag"), frag=0x0010))          # offset != 0
    assert n.csum_offsets(frag) is None
    v6frag = eth(0x86DD, ipv6(44, udp(b"x"), ext=bytes([17, 0, 0, 9, 0, 0, 0, 1])))
    assert n.csum_offsets(v6frag) is None
    arp = eth(0x0806, bytes(28))
    assert n.csum_offsets(arp) is None
    assert n.csum_offsets(udp4_frame()[:40]) is None                  # UDP header cut
    assert n.csum_offsets(b"") is None and n.csum_offsets(bytes(13)) is None
    # double tag: only one is supported
    qinq = MAC_B + MAC_A + struct.pack("!HHHH", 0x88A8, 1, 0x8100, 2) + b"\x08\x00" + \
        ipv4(17, udp(b"q"))
    assert n.csum_offsets(qinq) is None
    # truncated payload: offsets known, completion refused
    short = bytearray(udp4_frame(b"0123456789")[:-3])
    assert n.csum_offsets(short) == (34, 6) and not n.complete_checksum(short)
    # IPv6 routing header with segments left: pseudo-header destination unknown
    routed = eth(0x86DD, ipv6(43, udp(b"r"), ext=bytes([17, 0, 0, 1, 0, 0, 0, 0])))
    assert n.csum_offsets(routed) == (62, 6) and not n.complete_checksum(bytearray(routed))
    assert n.verify_checksum(routed) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_fuzz_checksum_helpers_never_raise(data, tagged):
    frame = bytearray(eth(0x0800 if len(data) % 2 else 0x86DD, data, 3 if tagged else None))
    for pkt in (bytearray(data), frame):
        offs = n.csum_offsets(pkt)
        if offs is not None:
            assert offs[1] in (6, 16) and offs[0] + offs[1] + 2 <= len(pkt)
        n.complete_checksum(bytearray(pkt))
        n.seed_partial_checksum(bytearray(pkt))
        n.verify_checksum(pkt)
        n.gso_from_packet(pkt, 1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1500), st.sampled_from(["udp4", "tcp4", "udp6", "tcp6"]),
       st.one_of(st.none(), st.integers(0, 4095)))
def test_fuzz_complete_matches_reference(payload, kind, vlan):
    if kind == "udp4":
        frame, src, dst, proto = eth(0x0800, ipv4(17, udp(payload)), vlan), V4_SRC, V4_DST, 17
    elif kind == "tcp4":
        frame, src, dst, proto = eth(0x0800, ipv4(6, tcp(payload)), vlan), V4_SRC, V4_DST, 6
    elif kind == "udp6":
        frame, src, dst, proto = eth(0x86DD, ipv6(17, udp(payload)), vlan), V6_SRC, V6_DST, 17
    else:
        frame, src, dst, proto = eth(0x86DD, ipv6(6, tcp(payload)), vlan), V6_SRC, V6_DST, 6
    start, off = n.csum_offsets(frame)
    buf = bytearray(frame)
    assert n.complete_checksum(buf)
    assert struct.unpack_from("!H", buf, start + off)[0] == \
        ref_l4_checksum(src, dst, proto, frame[start:], off)


# --- virtio-net header mapping --------------------------------------------------------------------
def test_vnet_header_layout():
    h = pack_vnet_hdr(1, 4, 0x36, 1448, 34, 16)
    assert len(h) == VNET_HDR_LEN == 12
    assert h == bytes.fromhex("01" "04" "3600" "a805" "2200" "1000" "0000")
    assert tuple(unpack_vnet_hdr(h)) == (1, 4, 0x36, 1448, 34, 16)
    assert tuple(unpack_vnet_hdr(h[:10])) == (1, 4, 0x36, 1448, 34, 16)
    with pytest.raises(ValueError):
        unpack_vnet_hdr(b"\0" * 9)


def test_tx_to_vnet_hdr_checksum_modes():
    frame = udp4_frame()
    h = unpack_vnet_hdr(n.tx_to_vnet_hdr(frame, True, True))
    assert (h.flags, h.csum_start, h.csum_offset, h.gso_type) == \
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, 34, 6, 0)
    h = unpack_vnet_hdr(n.tx_to_vnet_hdr(frame, False, True))
    assert h.flags == VIRTIO_NET_HDR_F_DATA_VALID and h.csum_start == 0
    assert n.tx_to_vnet_hdr(frame, False, False) == bytes(12)
    icmp = eth(0x0800, ipv4(1, bytes(30)))
    assert n.tx_to_vnet_hdr(icmp, True, False) is None        # netback would drop it
    assert n.tx_to_vnet_hdr(icmp, False, True) is not None


def test_tx_to_vnet_hdr_gso():
    seg = tcp(bytes(3000), options=b"\x01\x01\x08\x0a" + bytes(8))        # 32-byte TCP header
    v4 = eth(0x0800, ipv4(6, seg))
    g4 = n.unpack_extra(n.pack_extra_gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4))
    h = unpack_vnet_hdr(n.tx_to_vnet_hdr(v4[:100], True, True, g4))
    assert (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset) == \
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 14 + 20 + 32, 1448, 34, 16)
    v6 = eth(0x86DD, ipv6(6, seg), vlan=5)
    g6 = n.unpack_extra(n.pack_extra_gso(1428, n.XEN_NETIF_GSO_TYPE_TCPV6))
    h = unpack_vnet_hdr(n.tx_to_vnet_hdr(v6, True, False, g6))
    assert (h.gso_type, h.hdr_len, h.csum_start) == (VIRTIO_NET_HDR_GSO_TCPV6, 18 + 40 + 32, 58)
    assert n.tx_to_vnet_hdr(v4, True, False, g6) is None      # type does not match the frame
    assert n.tx_to_vnet_hdr(udp4_frame(), True, False, g4) is None
    assert n.gso_from_packet(v4, n.XEN_NETIF_GSO_TYPE_TCPV4) == (1, 66)
    # GSO without csum_blank: netback's fixup seeds the pseudo-header checksum
    with pytest.raises(TypeError):
        n.tx_to_vnet_hdr(v4, False, False, g4)
    buf = bytearray(v4)
    assert n.tx_to_vnet_hdr(buf, False, False, g4) is not None
    seeded = bytearray(v4)
    n.seed_partial_checksum(seeded)
    assert buf == seeded and buf != bytearray(v4)


def test_vnet_hdr_to_rx():
    assert n.vnet_hdr_to_rx(pack_vnet_hdr()) == (0, None)
    assert n.vnet_hdr_to_rx(pack_vnet_hdr(VIRTIO_NET_HDR_F_DATA_VALID)) == \
        (n.NETRXF_data_validated, None)
    flags, g = n.vnet_hdr_to_rx(pack_vnet_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6))
    assert flags == n.NETRXF_csum_blank | n.NETRXF_data_validated and g is None
    for vtype, xtype in ((VIRTIO_NET_HDR_GSO_TCPV4, n.XEN_NETIF_GSO_TYPE_TCPV4),
                         (VIRTIO_NET_HDR_GSO_TCPV6, n.XEN_NETIF_GSO_TYPE_TCPV6),
                         (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
                          n.XEN_NETIF_GSO_TYPE_TCPV4)):
        flags, g = n.vnet_hdr_to_rx(pack_vnet_hdr(1, vtype, 66, 1448, 34, 16))
        assert (g.type, g.gso_type, g.gso_size, g.flags) == (1, xtype, 1448, 0)
    with pytest.raises(ValueError):
        n.vnet_hdr_to_rx(pack_vnet_hdr(1, VIRTIO_NET_HDR_GSO_UDP, 42, 1400, 34, 6))
