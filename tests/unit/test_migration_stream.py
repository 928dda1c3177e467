"""pyxen.migration.stream: the sans-IO codec of the save/migration stream
(docs/migration-stream.md): round trips, arbitrary chunking, every rejection naming the record
and offset, truncation at every cut point, and a fuzz that only StreamError escapes."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.errors import PyxenError
from pyxen.migration import stream as S
from pyxen.migration.stream import Record, StreamError, StreamReader

HEADERS_LEN = S.IMAGE_HEADER_SIZE + S.DOMAIN_HEADER_SIZE     # offset of record 0


def page(fill: int) -> bytes:
    return bytes([fill]) * S.PAGE_SIZE


def raw_record(rtype: int, body: bytes = b"", *, crc: int | None = None, reserved: int = 0,
               length: int | None = None, pad: bytes | None = None) -> bytes:
    """A record built by hand, so that it can be wrong in any one way."""
    if crc is None:
        crc = zlib.crc32(body)
    if length is None:
        length = len(body)
    if pad is None:
        pad = bytes(-len(body) & 7)
    return struct.pack("<IIII", rtype, length, crc, reserved) + body + pad


def image_header(marker=S.MARKER, ident=S.IMAGE_ID, version=S.VERSION, options=0,
                 reserved=bytes(6)) -> bytes:
    return struct.pack(">QIIH6s", marker, ident, version, options, reserved)


def domain_header(dtype=1, page_shift=12, reserved=0, major=4, minor=17) -> bytes:
    return struct.pack("<IHHII", dtype, page_shift, reserved, major, minor)


def parse_all(data: bytes, chunks: list[int] | None = None) -> tuple[list[Record], StreamReader]:
    """Feed ``data`` (split at the given chunk sizes, the rest in one piece), then finish()."""
    reader = StreamReader()
    out: list[Record] = []
    pos = 0
    for size in chunks or []:
        out += reader.feed(data[pos:pos + size])
        pos += size
    out += reader.feed(data[pos:])
    reader.finish()
    return out, reader


def join(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


CONFIG = {"name": "guest", "memory": 64, "vcpus": 2, "uuid": "1234", "domid": 3,
          "devices": {"vbd": [{"devid": 51712}]}, "unicode": "caf\u00e9"}


def sample_stream() -> bytes:
    """A small valid stream holding every record type once (PAGE_DATA twice)."""
    return b"".join([
        S.stream_headers(),
        S.encode_json(S.DOMAIN_CONFIG, CONFIG),
        join(S.encode_page_data([(5, page(0xAB)), (6, None), (0x10, page(1))])),
        S.encode_disk_data(51712, 4096, b"disk bytes!"),
        S.encode_disk_data(51712, 1 << 20, None, 1 << 30),
        join(S.encode_page_data([(5, None)])),
        S.encode_hypervisor_page(S.HV_SHARED_INFO, 0, page(7)),
        S.encode_hypervisor_page(S.HV_GRANT_FRAME, 3, page(8)),
        S.encode_vcpu_state(0, b"vcpu0 state"),
        S.encode_vcpu_state(1, b"\x01\x02\x03"),
        S.encode_json(S.XEN_STATE, {"evtchn": [1, 2], "clock": 1.5}),
        S.encode_json(S.XENSTORE, {"nodes": {"/local/domain/3": ["", "n3"]}}),
        S.encode_json(S.DEVICES, {"vif": {}}),
        S.encode_end(),
    ])


def small_stream() -> bytes:
    """A few KiB, for the cut-at-every-byte and fuzz tests."""
    return b"".join([
        S.stream_headers(),
        S.encode_json(S.DOMAIN_CONFIG, {"name": "x", "vcpus": 1}),
        join(S.encode_page_data([(1, None), (2, page(0x5A))])),
        S.encode_vcpu_state(0, b"abcde"),
        S.encode_disk_data(1, 0, b"xyz"),
        S.encode_json(S.XEN_STATE, {"a": [1]}),
        S.encode_end(),
    ])


SAMPLE = sample_stream()
SMALL = small_stream()
SAMPLE_RECORDS, _ = parse_all(SAMPLE)
SMALL_RECORDS, _ = parse_all(SMALL)


def first_error(data: bytes) -> StreamError:
    """The StreamError that feeding ``data`` then finishing raises."""
    reader = StreamReader()
    with pytest.raises(StreamError) as info:
        reader.feed(data)
        reader.finish()
    return info.value


def assert_names(err: StreamError, index: int | None, name: str | None, offset: int) -> None:
    msg = str(err)
    assert err.offset == offset
    assert f"offset 0x{offset:x}" in msg
    if index is not None:
        assert err.index == index
        assert f"record {index}" in msg
    if name is not None:
        assert f"({name})" in msg
        assert S.record_name(err.rtype) == name


def decode(rec: Record):
    if rec.type == S.PAGE_DATA:
        return S.parse_page_data(rec)
    if rec.type in S.JSON_TYPES:
        return S.parse_json(rec)
    if rec.type == S.VCPU_STATE:
        return S.parse_vcpu_state(rec)
    if rec.type == S.HYPERVISOR_PAGE:
        return S.parse_hypervisor_page(rec)
    if rec.type == S.DISK_DATA:
        return S.parse_disk_data(rec)
    return None


# --- constants and headers ------------------------------------------------------------------

def test_constants():
    assert (S.END, S.PAGE_DATA) == (0, 1)
    assert [S.DOMAIN_CONFIG, S.VCPU_STATE, S.XEN_STATE, S.HYPERVISOR_PAGE, S.XENSTORE,
            S.DEVICES, S.DISK_DATA] == list(range(0x1001, 0x1008))
    assert len(S.TYPE_NAMES) == 9 and S.TYPE_NAMES[S.DISK_DATA] == "DISK_DATA"
    assert (S.PAGE_NORMAL, S.PAGE_ZERO, S.PAGE_SIZE) == (0, 1, 4096)
    assert S.MAX_BODY == 32 << 20 and S.MAX_PAGES_PER_RECORD == 1024
    assert (S.IMAGE_HEADER_SIZE, S.DOMAIN_HEADER_SIZE, S.RECORD_HEADER_SIZE) == (24, 16, 16)
    assert issubclass(StreamError, PyxenError)


def test_stream_headers_layout():
    h = S.stream_headers()
    assert len(h) == 40
    assert h[:8] == b"\xff" * 8 and h[8:12] == b"PYXF" and h[12:16] == b"\0\0\0\1"
    assert h[16:24] == bytes(8)
    assert h[24:] == domain_header()
    reader = StreamReader()
    assert reader.feed(h) == []
    assert reader.domain_type == 1 and reader.xen_version == (4, 17)
    assert not reader.ended and reader.offset == 40


def test_record_layout():
    rec = S.encode_record(S.XEN_STATE, b"abc")
    assert rec == struct.pack("<IIII", 0x1003, 3, zlib.crc32(b"abc"), 0) + b"abc" + bytes(5)
    assert S.encode_end() == bytes(16)
    assert len(S.encode_record(S.DEVICES, b"12345678")) == 24


# --- round trips ----------------------------------------------------------------------------

def test_sample_stream_round_trip():
    recs, reader = parse_all(SAMPLE)
    assert reader.ended and reader.offset == len(SAMPLE)
    assert [r.name for r in recs] == [
        "DOMAIN_CONFIG", "PAGE_DATA", "DISK_DATA", "DISK_DATA", "PAGE_DATA",
        "HYPERVISOR_PAGE", "HYPERVISOR_PAGE", "VCPU_STATE", "VCPU_STATE", "XEN_STATE",
        "XENSTORE", "DEVICES", "END"]
    assert [r.index for r in recs] == list(range(13))
    assert recs[0].offset == HEADERS_LEN
    for a, b in zip(recs, recs[1:]):          # offsets are contiguous, padded to 8
        assert b.offset == a.offset + 16 + len(a.body) + (-len(a.body) & 7)
        assert b.offset % 8 == 0
    assert S.parse_json(recs[0]) == CONFIG
    pd = S.parse_page_data(recs[1])
    assert [(pfn, t) for pfn, t, _ in pd] == [(5, 0), (6, 1), (0x10, 0)]
    assert bytes(pd[0][2]) == page(0xAB) and pd[1][2] is None and bytes(pd[2][2]) == page(1)
    devid, off, length, data = S.parse_disk_data(recs[2])
    assert (devid, off, length, bytes(data)) == (51712, 4096, 11, b"disk bytes!")
    assert S.parse_disk_data(recs[3]) == (51712, 1 << 20, 1 << 30, None)
    assert S.parse_page_data(recs[4]) == [(5, S.PAGE_ZERO, None)]
    assert S.parse_hypervisor_page(recs[5]) == (S.HV_SHARED_INFO, 0, page(7))
    assert S.parse_hypervisor_page(recs[6]) == (S.HV_GRANT_FRAME, 3, page(8))
    assert S.parse_vcpu_state(recs[7]) == (0, b"vcpu0 state")
    assert S.parse_vcpu_state(recs[8]) == (1, b"\x01\x02\x03")
    assert S.parse_json(recs[9]) == {"evtchn": [1, 2], "clock": 1.5}
    assert S.parse_json(recs[10]) == {"nodes": {"/local/domain/3": ["", "n3"]}}
    assert S.parse_json(recs[11]) == {"vif": {}}
    assert recs[12].type == S.END and recs[12].body == b""


@pytest.mark.parametrize("rtype", sorted(S.JSON_TYPES))
def test_json_round_trip(rtype):
    obj = {"k": [1, "two", None, True, {"x": -3.25}], "\u2603": "snow"}
    (rec, end), _ = parse_all(S.stream_headers() + S.encode_json(rtype, obj) + S.encode_end())
    assert rec.type == rtype and S.parse_json(rec) == obj
    assert end.type == S.END


def test_vcpu_state_empty_and_large_blob():
    blob = bytes(range(256)) * 50
    for b in (b"", blob):
        (rec, _), _ = parse_all(S.stream_headers() + S.encode_vcpu_state(7, b) + S.encode_end())
        assert S.parse_vcpu_state(rec) == (7, b)


def test_disk_data_empty_and_memoryview():
    data = memoryview(bytearray(b"q" * 1000))[10:509]
    stream = (S.stream_headers() + S.encode_disk_data(2, 7, data)
              + S.encode_disk_data(3, 0, b"") + S.encode_end())
    recs, _ = parse_all(stream)
    d = S.parse_disk_data(recs[0])
    assert d[:3] == (2, 7, 499) and bytes(d[3]) == b"q" * 499
    d = S.parse_disk_data(recs[1])
    assert d[:3] == (3, 0, 0) and bytes(d[3]) == b""


@given(st.lists(st.tuples(st.integers(0, (1 << 52) - 1), st.booleans(),
                          st.integers(0, 255)), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None)
def test_page_data_mixes(entries):
    pages = [(pfn, None if zero else page(fill)) for pfn, zero, fill in entries]
    iov = S.encode_page_data(pages)
    # pages go out as the caller's own objects: no copy
    normal = [p for _, p in pages if p is not None]
    assert len(iov) == 1 + len(normal)
    assert all(a is b for a, b in zip(iov[1:], normal))
    (rec, _), _ = parse_all(S.stream_headers() + join(iov) + S.encode_end())
    got = S.parse_page_data(rec)
    assert len(got) == len(pages)
    for (pfn, p), (gpfn, gtype, view) in zip(pages, got):
        assert gpfn == pfn
        if p is None:
            assert gtype == S.PAGE_ZERO and view is None
        else:
            assert gtype == S.PAGE_NORMAL and view == p
            assert view.obj is rec.body                 # a view into the body, not a copy


def test_page_data_full_record_and_memoryview_pages():
    backing = bytearray(S.PAGE_SIZE * 1024)
    mem = memoryview(backing)
    for i in range(1024):
        backing[i * S.PAGE_SIZE] = i & 0xFF
    entries = [(i, mem[i * 4096:(i + 1) * 4096] if i % 3 else None) for i in range(1024)]
    iov = S.encode_page_data(entries)
    data = join(iov)
    assert data == S.encode_record(S.PAGE_DATA, data[16:])
    (rec, _), _ = parse_all(S.stream_headers() + data + S.encode_end())
    got = S.parse_page_data(rec)
    assert [g[0] for g in got] == list(range(1024))
    assert all((g[2] is None) == (i % 3 == 0) for i, g in enumerate(got))
    assert all(g[2] == entries[i][1] for i, g in enumerate(got) if g[2] is not None)


def test_encode_record_iov_matches_encode_record():
    parts = [b"abc", memoryview(b"defgh")[1:], bytearray(b"xy")]
    iov = S.encode_record_iov(S.DEVICES, parts)
    body = b"abcefghxy"
    assert join(iov) == S.encode_record(S.DEVICES, body)
    assert iov[1] is parts[0] and iov[2] is parts[1] and iov[3] is parts[2]
    assert iov[-1] == bytes(7)                       # padding is its own small buffer
    assert S.encode_record_iov(S.DEVICES, [b"12345678"])[-1] == b"12345678"


def test_is_zero_page():
    assert S.is_zero_page(bytes(4096))
    assert S.is_zero_page(memoryview(bytearray(8192))[4096:])
    for pos in (0, 1, 2047, 4095):
        p = bytearray(4096)
        p[pos] = 1
        assert not S.is_zero_page(p)
        assert not S.is_zero_page(memoryview(p))
    assert S.is_zero_page(b"") and S.is_zero_page(bytes(10)) and not S.is_zero_page(b"\0\1")
    assert S.is_zero_page(bytes(10000)) and not S.is_zero_page(bytes(9999) + b"\1")


def test_encoder_misuse_is_value_error():
    with pytest.raises(ValueError):
        S.encode_record(0x1234, b"")
    with pytest.raises(ValueError):
        S.encode_record(S.END, b"x")
    with pytest.raises(ValueError):
        S.encode_page_data([])
    with pytest.raises(ValueError):
        S.encode_page_data([(i, None) for i in range(1025)])
    with pytest.raises(ValueError):
        S.encode_page_data([(1 << 52, None)])
    with pytest.raises(ValueError):
        S.encode_page_data([(1, b"short")])
    with pytest.raises(ValueError):
        S.encode_json(S.VCPU_STATE, {})
    with pytest.raises(ValueError):
        S.encode_json(S.XEN_STATE, [1])
    with pytest.raises(ValueError):
        S.encode_json(S.XEN_STATE, {"x": float("nan")})
    with pytest.raises(ValueError):
        S.encode_hypervisor_page(3, 0, page(0))
    with pytest.raises(ValueError):
        S.encode_hypervisor_page(1, 0, b"x")
    with pytest.raises(ValueError):
        S.encode_disk_data(1, 0, b"abc", 4)
    with pytest.raises(ValueError):
        S.encode_disk_data(1, 0, None)
    with pytest.raises(ValueError):
        S.encode_record_iov(S.DISK_DATA, [bytes(S.MAX_BODY + 1)])


# --- chunking -------------------------------------------------------------------------------

@given(st.lists(st.integers(0, 5000), max_size=30), st.sampled_from(["bytes", "bytearray",
                                                                      "memoryview"]))
@settings(max_examples=80, deadline=None)
def test_any_chunking_gives_the_same_records(cuts, kind):
    data = SAMPLE + b"trailing garbage after END"
    reader = StreamReader()
    got: list[Record] = []
    bounds = sorted({min(c * 7, len(data)) for c in cuts} | {0, len(data)})
    for a, b in zip(bounds, bounds[1:]):
        if kind == "bytes":
            chunk = data[a:b]
        elif kind == "bytearray":
            chunk = bytearray(data[a:b])
        else:
            chunk = memoryview(data)[a:b]
        got += reader.feed(chunk)
        if kind == "bytearray":
            chunk[:] = b"\xee" * len(chunk)           # the caller may reuse its buffer
    reader.finish()
    assert got == SAMPLE_RECORDS
    assert reader.ended and reader.offset == len(SAMPLE)


def test_one_byte_chunks():
    reader = StreamReader()
    got: list[Record] = []
    for i in range(len(SMALL)):
        got += reader.feed(SMALL[i:i + 1])
    reader.finish()
    assert got == SMALL_RECORDS


def test_reused_receive_buffer():
    """A recv_into-style caller that overwrites one buffer between feeds."""
    buf = bytearray(333)
    view = memoryview(buf)
    reader = StreamReader()
    got: list[Record] = []
    for pos in range(0, len(SAMPLE), len(buf)):
        n = len(SAMPLE[pos:pos + len(buf)])
        buf[:n] = SAMPLE[pos:pos + n]
        got += reader.feed(view[:n])
        buf[:] = b"\x99" * len(buf)
    reader.finish()
    assert got == SAMPLE_RECORDS


def test_after_end_input_is_ignored():
    reader = StreamReader()
    recs = reader.feed(SMALL + b"\xff" * 100)
    assert recs[-1].type == S.END and reader.ended
    assert reader.feed(b"not a record at all") == []
    reader.finish()
    reader.finish()


def test_record_name_and_error_helper():
    rec = Record(S.XEN_STATE, b"", 3, 0x2040)
    assert rec.name == "XEN_STATE"
    assert Record(0xABCD, b"").name == "0x0000abcd"
    assert str(rec.error("boom")) == "record 3 (XEN_STATE) at offset 0x2040: boom"


# --- rejections: headers --------------------------------------------------------------------

@pytest.mark.parametrize("header,words", [
    (image_header(marker=0xFFFFFFFFFFFFFFFE), "bad marker 0xfffffffffffffffe"),
    (image_header(ident=0x58454E46), "bad id 0x58454e46"),
    (image_header(ident=0x12345678), "bad id 0x12345678"),
    (image_header(version=2), "unsupported version 2"),
    (image_header(version=0), "unsupported version 0"),
    (image_header(options=2), "unknown option bits 0x0002"),
    (image_header(options=0x8000), "unknown option bits 0x8000"),
    (image_header(options=1), "big-endian"),
    (image_header(reserved=b"\0\0\0\0\0\1"), "reserved bytes"),
])
def test_bad_image_header(header, words):
    err = first_error(header + domain_header() + S.encode_end())
    assert str(err).startswith("image header at offset 0x0: ")
    assert words in str(err)
    assert err.offset == 0 and err.index is None and err.rtype is None
    assert not err.truncated


def test_xen_stream_is_named():
    err = first_error(image_header(ident=0x58454E46))
    assert "Xen (libxc) stream" in str(err)


def test_bad_image_header_detected_before_rest_arrives():
    reader = StreamReader()
    with pytest.raises(StreamError, match="bad marker"):
        reader.feed(image_header(marker=0))


@pytest.mark.parametrize("header,words", [
    (domain_header(dtype=2), "unsupported domain type 2"),
    (domain_header(page_shift=21), "page_shift 21"),
    (domain_header(reserved=1), "reserved field is 0x0001"),
])
def test_bad_domain_header(header, words):
    err = first_error(image_header() + header + S.encode_end())
    assert str(err).startswith("domain header at offset 0x18: ")
    assert words in str(err)
    assert err.offset == 0x18 and err.index is None


# --- rejections: records --------------------------------------------------------------------

def prefix() -> bytes:
    """Headers plus one good record: the bad record is then record 1 at offset 0x48."""
    return S.stream_headers() + S.encode_json(S.DOMAIN_CONFIG, {"name": "ab"})


BAD_OFF = len(prefix())                  # 0x48


def test_unknown_record_type():
    err = first_error(prefix() + raw_record(0x1008, b"x") + S.encode_end())
    assert str(err) == (f"record 1 (0x00001008) at offset 0x{BAD_OFF:x}: "
                        f"unknown record type 0x00001008")
    assert err.rtype == 0x1008 and err.index == 1


def test_nonzero_reserved_in_record_header():
    err = first_error(prefix() + raw_record(S.XEN_STATE, b"{}", reserved=1))
    assert_names(err, 1, "XEN_STATE", BAD_OFF)
    assert "reserved header field is 0x00000001" in str(err)


def test_body_longer_than_max_body():
    err = first_error(prefix() + raw_record(S.DISK_DATA, b"", length=S.MAX_BODY + 1))
    assert_names(err, 1, "DISK_DATA", BAD_OFF)
    assert f"body length {S.MAX_BODY + 1} exceeds MAX_BODY" in str(err)
    # MAX_BODY itself passes the header check (the reader then waits for the body)
    reader = StreamReader()
    assert reader.feed(prefix() + raw_record(S.DISK_DATA, b"", length=S.MAX_BODY)) != []


def test_page_data_longer_than_1024_pages_rejected_at_header():
    err = first_error(prefix() + raw_record(S.PAGE_DATA, b"", length=8 + 1025 * 4104))
    assert_names(err, 1, "PAGE_DATA", BAD_OFF)
    assert "largest PAGE_DATA" in str(err)


@pytest.mark.parametrize("where", [0, 5, 16 + 8 + 16 + 100, -1])
def test_crc_mismatch(where):
    good = join(S.encode_page_data([(1, page(3)), (2, None)]))
    pos = 16 + (where % (len(good) - 16))
    bad = bytearray(good)
    bad[pos] ^= 0x40
    err = first_error(prefix() + bytes(bad) + S.encode_end())
    assert_names(err, 1, "PAGE_DATA", BAD_OFF)
    assert "CRC-32" in str(err) and "does not match" in str(err)


def test_crc_field_corrupted():
    err = first_error(prefix() + raw_record(S.DEVICES, b"{}", crc=0xDEADBEEF))
    assert_names(err, 1, "DEVICES", BAD_OFF)
    assert "0xdeadbeef" in str(err)


def test_nonzero_padding():
    err = first_error(prefix() + raw_record(S.DEVICES, b"{}", pad=b"\0\0\0\0\0\1"))
    assert_names(err, 1, "DEVICES", BAD_OFF)
    assert "padding" in str(err)


def test_end_with_body():
    err = first_error(prefix() + raw_record(S.END, b"x"))
    assert_names(err, 1, "END", BAD_OFF)
    assert "non-empty body" in str(err)


def test_error_is_sticky():
    reader = StreamReader()
    with pytest.raises(StreamError) as first:
        reader.feed(prefix() + raw_record(0x77, b""))
    with pytest.raises(StreamError) as again:
        reader.feed(S.encode_end())
    assert again.value is first.value
    with pytest.raises(StreamError):
        reader.finish()


def record_of(rtype: int, body: bytes) -> Record:
    """The record the reader returns for a hand-made body (CRC correct)."""
    recs, _ = parse_all(prefix() + raw_record(rtype, body) + S.encode_end())
    assert recs[1].index == 1 and recs[1].offset == BAD_OFF
    return recs[1]


def page_data_body(words: list[int], npages: int, count: int | None = None,
                   reserved: int = 0) -> bytes:
    n = len(words) if count is None else count
    return struct.pack(f"<II{len(words)}Q", n, reserved, *words) + page(9) * npages


@pytest.mark.parametrize("body,words", [
    (page_data_body([], 0), "count 0 is not in 1..1024"),
    (page_data_body([1 << 60] * 1025, 0), "count 1025 is not in 1..1024"),
    (page_data_body([1, 1 << 60], 0), "body length 24 does not match 2 pfns and 1 data pages"),
    (page_data_body([1, 1 << 60], 2), "does not match 2 pfns and 1 data pages"),
    (page_data_body([1], 1) + b"\0" * 8, "does not match 1 pfns and 1 data pages"),
    (page_data_body([1, 2], 0, count=3), "body length 24 is too short for 3 pfns"),
    (page_data_body([2 << 60 | 5], 0), "entry 0 (pfn 0x5) has bad type 2"),
    (page_data_body([1 << 60, 0xF << 60], 0), "entry 1 (pfn 0x0) has bad type 15"),
    (page_data_body([1 << 60, 1 << 52 | 3], 1), "entry 1 (0x0010000000000003) has reserved bits"),
    (page_data_body([1 << 59], 1), "reserved bits 52-59"),
    (page_data_body([1 << 60], 0, reserved=4), "reserved field is 0x00000004"),
    (b"\1\0\0\0", "shorter than the 8-byte PAGE_DATA header"),
])
def test_bad_page_data(body, words):
    rec = record_of(S.PAGE_DATA, body)
    with pytest.raises(StreamError) as info:
        S.parse_page_data(rec)
    assert str(info.value).startswith(f"record 1 (PAGE_DATA) at offset 0x{BAD_OFF:x}: ")
    assert words in str(info.value)
    assert info.value.index == 1 and info.value.rtype == S.PAGE_DATA


def test_page_data_message_example():
    rec = Record(S.PAGE_DATA, page_data_body([1, 1 << 60 | 2], 1) + bytes(8), 12, 0x3018)
    with pytest.raises(StreamError) as info:
        S.parse_page_data(rec)
    assert str(info.value) == ("record 12 (PAGE_DATA) at offset 0x3018: body length 4128 "
                               "does not match 2 pfns and 1 data pages")
    assert (info.value.index, info.value.offset, info.value.rtype) == (12, 0x3018, S.PAGE_DATA)


@pytest.mark.parametrize("body,words", [
    (b"[1, 2]", "JSON list, not an object"),
    (b"\"str\"", "JSON str, not an object"),
    (b"null", "JSON NoneType, not an object"),
    (b"42", "JSON int, not an object"),
    (b"{\"a\": NaN}", "not valid JSON"),
    (b"{\"a\": 1", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"{\"a\": \"\xff\"}", "not UTF-8"),
    (b"[" * 100000, "not valid JSON"),
])
def test_bad_json(body, words):
    for rtype in sorted(S.JSON_TYPES):
        rec = record_of(rtype, body)
        with pytest.raises(StreamError) as info:
            S.parse_json(rec)
        assert_names(info.value, 1, S.record_name(rtype), BAD_OFF)
        assert words in str(info.value)


@pytest.mark.parametrize("rtype,body,words", [
    (S.VCPU_STATE, b"\0\0\0", "shorter than its 8-byte header"),
    (S.VCPU_STATE, struct.pack("<II", 0, 1) + b"x", "reserved field is 0x00000001"),
    (S.HYPERVISOR_PAGE, struct.pack("<II", 1, 0) + bytes(4095), "body length 4103 is not 4104"),
    (S.HYPERVISOR_PAGE, struct.pack("<II", 3, 0) + bytes(4096), "unknown kind 3"),
    (S.HYPERVISOR_PAGE, struct.pack("<II", 0, 0) + bytes(4096), "unknown kind 0"),
    (S.DISK_DATA, bytes(23), "shorter than its 24-byte header"),
    (S.DISK_DATA, struct.pack("<IIQQ", 1, 2, 0, 0), "unknown flag bits 0x00000002"),
    (S.DISK_DATA, struct.pack("<IIQQ", 1, 0, 0, 4) + b"abc", "does not match data length 4"),
    (S.DISK_DATA, struct.pack("<IIQQ", 1, 1, 0, 4) + b"abcd", "carries data but flags say"),
    (S.DISK_DATA, struct.pack("<IIQQ", 1, 1, 1 << 63, 1 << 63 | 1), "overflows 64 bits"),
])
def test_bad_fixed_records(rtype, body, words):
    rec = record_of(rtype, body)
    with pytest.raises(StreamError) as info:
        decode(rec)
    assert_names(info.value, 1, S.record_name(rtype), BAD_OFF)
    assert words in str(info.value)


@pytest.mark.parametrize("decoder", [S.parse_page_data, S.parse_json, S.parse_vcpu_state,
                                     S.parse_hypervisor_page, S.parse_disk_data])
def test_decoder_refuses_other_record_types(decoder):
    with pytest.raises(StreamError, match=r"record 4 \(END\) at offset 0x80: expected a"):
        decoder(Record(S.END, b"", 4, 0x80))


# --- truncation -----------------------------------------------------------------------------

def test_truncated_at_every_cut_point():
    starts = [r.offset for r in SMALL_RECORDS]
    for cut in range(len(SMALL)):
        reader = StreamReader()
        recs = reader.feed(SMALL[:cut])
        assert not reader.ended
        with pytest.raises(StreamError) as info:
            reader.finish()
        err = info.value
        msg = str(err)
        assert msg.startswith("stream truncated: ") and err.truncated, (cut, msg)
        assert f"offset 0x{err.offset:x}" in msg
        if cut < 24:
            assert "image header at offset 0x0" in msg and f"needs {24 - cut} more" in msg
            continue
        if cut < 40:
            assert "domain header at offset 0x18" in msg and f"needs {40 - cut} more" in msg
            continue
        i = max(k for k, s in enumerate(starts) if s <= cut)
        assert len(recs) == i and err.index == i and err.offset == starts[i]
        assert f"record {i} " in msg
        if cut == starts[i]:
            assert err.rtype is None and "ended before END" in msg
        elif cut < starts[i] + 16:
            assert err.rtype is None and f"needs {starts[i] + 16 - cut} more bytes" in msg
        else:
            rec = SMALL_RECORDS[i]
            end = starts[i] + 16 + len(rec.body) + (-len(rec.body) & 7)
            assert err.rtype == rec.type and f"({rec.name})" in msg
            assert f"needs {end - cut} more bytes" in msg
        # the error is sticky and feeding more cannot revive the reader
        with pytest.raises(StreamError):
            reader.feed(SMALL[cut:])


def test_truncated_message_example():
    body = b"{" + b" " * 118 + b"}"
    data = S.stream_headers() + S.encode_json(S.DOMAIN_CONFIG, {}) + raw_record(S.XEN_STATE, body)
    err = first_error(data[:-120])
    assert str(err) == ("stream truncated: record 1 (XEN_STATE) at offset 0x40 "
                        "needs 120 more bytes")
    assert (err.index, err.offset, err.rtype, err.truncated) == (1, 0x40, S.XEN_STATE, True)


def test_empty_stream_is_truncated():
    with pytest.raises(StreamError, match="stream truncated: image header at offset 0x0 "
                                          "needs 24 more bytes"):
        StreamReader().finish()


# --- fuzz -----------------------------------------------------------------------------------

def run_everything(data: bytes, chunk: int) -> None:
    """Feed ``data`` in ``chunk``-sized pieces, finish and decode every record: only
    StreamError may escape."""
    reader = StreamReader()
    recs: list[Record] = []
    for pos in range(0, len(data), chunk):
        recs += reader.feed(data[pos:pos + chunk])
    for rec in recs:
        decode(rec)
    reader.finish()


SMALL_PARTS = [(r.type, r.body) for r in SMALL_RECORDS]


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_fuzz_raw_mutations_only_raise_stream_error(data):
    """Flip, insert, delete bytes and truncate anywhere in a valid stream."""
    buf = bytearray(SMALL)
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos:pos + data.draw(st.integers(1, 16))]
        elif buf:
            buf[pos] = data.draw(st.integers(0, 255))
    buf = buf[:data.draw(st.integers(0, len(buf)))]
    try:
        run_everything(bytes(buf), data.draw(st.integers(1, 600)))
    except StreamError as err:
        assert str(err) and err.offset is not None


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_fuzz_body_mutations_with_valid_crc(data):
    """Mutate record bodies and types but keep CRCs valid, so the decoders see the damage."""
    parts = list(SMALL_PARTS)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(parts) - 2))
        rtype, body = parts[i]
        body = bytearray(body)
        op = data.draw(st.sampled_from(["flip", "cut", "extend", "retype", "word"]))
        if op == "flip" and body:
            pos = data.draw(st.integers(0, len(body) - 1))
            body[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            body = body[:data.draw(st.integers(0, len(body)))]
        elif op == "extend":
            body += data.draw(st.binary(max_size=24))
        elif op == "retype":
            rtype = data.draw(st.sampled_from(sorted(S.TYPE_NAMES)[1:]))
        elif len(body) >= 8:
            pos = data.draw(st.integers(0, len(body) // 8 - 1)) * 8
            body[pos:pos + 8] = struct.pack("<Q", data.draw(st.integers(0, (1 << 64) - 1)))
        parts[i] = (rtype, bytes(body))
    stream = S.stream_headers() + b"".join(raw_record(t, b) for t, b in parts)
    try:
        run_everything(stream, data.draw(st.integers(1, 5000)))
    except StreamError as err:
        assert str(err) and err.index is not None and err.offset is not None
        assert f"record {err.index}" in str(err)


def test_json_parse_of_generated_body_round_trips():
    obj = json.loads(json.dumps(CONFIG))
    assert S.parse_json(record_of(S.DOMAIN_CONFIG, json.dumps(obj).encode())) == CONFIG
