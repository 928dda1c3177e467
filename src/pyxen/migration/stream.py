"""Sans-IO codec of pyxen's save/migration stream, version 1 (docs/migration-stream.md).

The stream follows Xen's libxc migration stream v3 (xen.git
``docs/specs/libxc-migration-stream.pandoc``)::

    image header   24 bytes, big-endian: marker u64 (all ones), id u32 ("PYXF"),
                   version u32 (1), options u16 (bit 0: endianness, 0 = little), 6 reserved
    domain header  16 bytes, little-endian: type u32 (1 = x86 PVH), page_shift u16 (12),
                   reserved u16, xen_major u32, xen_minor u32
    records        type u32, body_length u32, body_crc32 u32, reserved u32, body,
                   zero padding to a multiple of 8; the last record is END

Where it differs from Xen's:

* the id is ``PYXF`` (Xen: ``XENF``) and the domain type 1 means x86 PVH;
* the record header is 16 bytes, not 8: it adds ``body_crc32`` (``zlib.crc32`` of the body)
  and a reserved word, so a corrupted record is named and rejected before anything is built
  from it; a body longer than :data:`MAX_BODY` is rejected;
* PAGE_DATA keeps Xen's ``count, reserved, pfn[count]`` layout but its entry types are
  pyxen's: :data:`PAGE_NORMAL` (4096 bytes of data follow) and :data:`PAGE_ZERO` (an
  all-zero page, no data; Xen would send it as data);
* pyxen's own record types live at ``0x1001..`` (DOMAIN_CONFIG, VCPU_STATE, XEN_STATE,
  HYPERVISOR_PAGE, XENSTORE, DEVICES, DISK_DATA).

Encoders return ``bytes``, or for the bulk records a list of buffers meant for
``socket.sendmsg`` / ``os.writev`` so that page contents are never copied on the way out
(note Linux's IOV_MAX of 1024: a full PAGE_DATA list has 1025 buffers, send it in slices).
Encoder misuse (unknown type, wrong page size, oversized body) raises ``ValueError``.

:class:`StreamReader` parses incrementally: feed it any chunking of the stream, it returns
complete :class:`Record` objects once each record's CRC and padding are checked. The
decoders (:func:`parse_page_data`, ...) check one record's body and return memoryviews into
it rather than copies. Every parse failure is a :class:`StreamError` naming the record
(index, type name) or header and the byte offset in the stream.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from pyxen.errors import PyxenError

__all__ = [
    "END", "PAGE_DATA", "DOMAIN_CONFIG", "VCPU_STATE", "XEN_STATE", "HYPERVISOR_PAGE",
    "XENSTORE", "DEVICES", "DISK_DATA", "TYPE_NAMES", "JSON_TYPES",
    "PAGE_NORMAL", "PAGE_ZERO", "PAGE_SIZE", "MAX_BODY", "MAX_PAGES_PER_RECORD",
    "IMAGE_HEADER_SIZE", "DOMAIN_HEADER_SIZE", "RECORD_HEADER_SIZE",
    "MARKER", "IMAGE_ID", "VERSION", "DOMAIN_TYPE_X86_PVH", "PAGE_SHIFT",
    "XEN_MAJOR", "XEN_MINOR", "HV_SHARED_INFO", "HV_GRANT_FRAME", "DISK_ZEROES",
    "StreamError", "Record", "StreamReader", "record_name", "is_zero_page",
    "stream_headers", "encode_record", "encode_record_iov", "encode_page_data",
    "encode_json", "encode_vcpu_state", "encode_hypervisor_page", "encode_disk_data",
    "encode_end", "parse_page_data", "parse_json", "parse_vcpu_state",
    "parse_hypervisor_page", "parse_disk_data",
]

# --- record types -------------------------------------------------------------------------

END = 0x00000000
PAGE_DATA = 0x00000001
DOMAIN_CONFIG = 0x00001001
VCPU_STATE = 0x00001002
XEN_STATE = 0x00001003
HYPERVISOR_PAGE = 0x00001004
XENSTORE = 0x00001005
DEVICES = 0x00001006
DISK_DATA = 0x00001007

TYPE_NAMES: dict[int, str] = {
    END: "END",
    PAGE_DATA: "PAGE_DATA",
    DOMAIN_CONFIG: "DOMAIN_CONFIG",
    VCPU_STATE: "VCPU_STATE",
    XEN_STATE: "XEN_STATE",
    HYPERVISOR_PAGE: "HYPERVISOR_PAGE",
    XENSTORE: "XENSTORE",
    DEVICES: "DEVICES",
    DISK_DATA: "DISK_DATA",
}

#: Record types whose body is a UTF-8 JSON object.
JSON_TYPES = frozenset({DOMAIN_CONFIG, XEN_STATE, XENSTORE, DEVICES})

# --- sizes and header values --------------------------------------------------------------

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_BODY = 32 << 20
MAX_PAGES_PER_RECORD = 1024
IMAGE_HEADER_SIZE = 24
DOMAIN_HEADER_SIZE = 16
RECORD_HEADER_SIZE = 16

MARKER = 0xFFFFFFFFFFFFFFFF
IMAGE_ID = 0x50595846            # "PYXF"
XEN_IMAGE_ID = 0x58454E46        # "XENF": a libxc stream
VERSION = 1
OPT_BIG_ENDIAN = 0x0001
DOMAIN_TYPE_X86_PVH = 1
XEN_MAJOR = 4
XEN_MINOR = 17

# PAGE_DATA entry: bits 0-51 pfn, 52-59 reserved, 60-63 type.
PAGE_NORMAL = 0
PAGE_ZERO = 1
PFN_MASK = (1 << 52) - 1
PFN_RESERVED_MASK = 0xFF << 52
PFN_TYPE_SHIFT = 60
PAGE_DATA_HEADER_SIZE = 8
_MAX_PAGE_DATA_BODY = (PAGE_DATA_HEADER_SIZE
                       + MAX_PAGES_PER_RECORD * (8 + PAGE_SIZE))

# HYPERVISOR_PAGE kinds.
HV_SHARED_INFO = 1
HV_GRANT_FRAME = 2
HV_KIND_NAMES = {HV_SHARED_INFO: "shared_info", HV_GRANT_FRAME: "grant frame"}

# DISK_DATA flags.
DISK_ZEROES = 0x1
DISK_DATA_HEADER_SIZE = 24

_IMAGE_HDR = struct.Struct(">QIIH6s")
_DOMAIN_HDR = struct.Struct("<IHHII")
_REC_HDR = struct.Struct("<IIII")
_U32x2 = struct.Struct("<II")
_DISK_HDR = struct.Struct("<IIQQ")

_ZERO_PAGE = bytes(PAGE_SIZE)
_PAD = (b"", b"\0" * 7, b"\0" * 6, b"\0" * 5, b"\0" * 4, b"\0" * 3, b"\0" * 2, b"\0")


def record_name(rtype: int) -> str:
    """The name of record type ``rtype`` (``"PAGE_DATA"``), or ``"0x0000abcd"`` if unknown."""
    name = TYPE_NAMES.get(rtype)
    return name if name is not None else f"0x{rtype:08x}"


def _padding(length: int) -> bytes:
    """Zero bytes that pad a body of ``length`` bytes to a multiple of 8."""
    return _PAD[length & 7]


# --- errors and records -------------------------------------------------------------------

class StreamError(PyxenError):
    """The stream is malformed or truncated.

    ``index`` (0 = first record after the headers), ``offset`` (byte offset of the record
    header, or of the image/domain header, in the stream) and ``rtype`` say where; they are
    None when not applicable (``index`` and ``rtype`` for header errors). ``truncated`` is True
    when the stream merely ended early. ``str()`` always names what and where, e.g.
    ``record 12 (PAGE_DATA) at offset 0x3018: body length 8200 does not match ...``.
    """

    def __init__(self, message: str, *, index: int | None = None, offset: int | None = None,
                 rtype: int | None = None, truncated: bool = False) -> None:
        super().__init__(message)
        self.index = index
        self.offset = offset
        self.rtype = rtype
        self.truncated = truncated


def _where(index: int, offset: int, rtype: int | None) -> str:
    if rtype is None:
        return f"record {index} at offset 0x{offset:x}"
    return f"record {index} ({record_name(rtype)}) at offset 0x{offset:x}"


def _record_error(index: int, offset: int, rtype: int | None, reason: str) -> StreamError:
    return StreamError(f"{_where(index, offset, rtype)}: {reason}",
                       index=index, offset=offset, rtype=rtype)


def _header_error(what: str, offset: int, reason: str) -> StreamError:
    return StreamError(f"{what} at offset 0x{offset:x}: {reason}", offset=offset)


@dataclass(frozen=True, slots=True)
class Record:
    """One checked record: its ``type``, ``body`` (without padding; CRC verified), ``index``
    (0 = first record after the headers) and ``offset`` (of its header in the stream)."""

    type: int
    body: bytes
    index: int = 0
    offset: int = 0

    @property
    def name(self) -> str:
        """The type's name, e.g. ``"PAGE_DATA"``."""
        return record_name(self.type)

    def error(self, reason: str) -> StreamError:
        """A :class:`StreamError` about this record: ``record I (NAME) at offset 0x..: reason``."""
        return _record_error(self.index, self.offset, self.type, reason)


# --- encoders -----------------------------------------------------------------------------

def stream_headers(xen_major: int = XEN_MAJOR, xen_minor: int = XEN_MINOR) -> bytes:
    """The image header and the domain header (40 bytes) that start every stream."""
    return (_IMAGE_HDR.pack(MARKER, IMAGE_ID, VERSION, 0, bytes(6))
            + _DOMAIN_HDR.pack(DOMAIN_TYPE_X86_PVH, PAGE_SHIFT, 0, xen_major, xen_minor))


def _nbytes(buf) -> int:
    return buf.nbytes if type(buf) is memoryview else len(buf)


def _check_type(rtype: int, length: int) -> None:
    if rtype not in TYPE_NAMES:
        raise ValueError(f"unknown record type 0x{rtype:08x}")
    if length > MAX_BODY:
        raise ValueError(f"{record_name(rtype)} body of {length} bytes exceeds MAX_BODY "
                         f"({MAX_BODY})")
    if rtype == END and length:
        raise ValueError("END record must have an empty body")


def encode_record(rtype: int, body: bytes | bytearray | memoryview = b"") -> bytes:
    """One record as bytes: header (with the body's CRC-32), body, zero padding to 8."""
    length = _nbytes(body)
    _check_type(rtype, length)
    return b"".join((_REC_HDR.pack(rtype, length, zlib.crc32(body), 0), body,
                     _padding(length)))


def encode_record_iov(rtype: int, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """One record whose body is the concatenation of ``parts``, as a list of buffers for
    ``sendmsg``/``writev``: ``[header, *parts]`` plus a small padding ``bytes`` if needed.
    The parts are not copied (the CRC is computed over them incrementally); they must stay
    unchanged until the buffers are written."""
    length = 0
    crc = 0
    for part in parts:
        length += _nbytes(part)
        crc = zlib.crc32(part, crc)
    _check_type(rtype, length)
    out: list[bytes | memoryview] = [_REC_HDR.pack(rtype, length, crc, 0)]
    out.extend(parts)
    if length & 7:
        out.append(_padding(length))
    return out


def is_zero_page(view: bytes | bytearray | memoryview) -> bool:
    """True if the page (any contiguous buffer, normally 4096 bytes) is all zeroes.
    A memcmp against a zero page: no copy, no Python loop."""
    n = _nbytes(view)
    if n == PAGE_SIZE:
        return _ZERO_PAGE.startswith(view)
    if n < PAGE_SIZE:
        return _ZERO_PAGE[:n].startswith(view) if n else True
    return bytes(n).startswith(view)


def encode_page_data(entries: list[tuple[int, bytes | memoryview | None]]
                     ) -> list[bytes | memoryview]:
    """A PAGE_DATA record for ``entries`` of ``(pfn, page)``, as buffers for
    ``sendmsg``/``writev``: ``[header + pfn array, page, page, ...]``. ``page`` is a 4096-byte
    buffer (sent as a NORMAL page, not copied: keep it unchanged until written) or None for a
    ZERO page (the caller decides zero-ness, see :func:`is_zero_page`). 1..1024 entries;
    ``pfn`` < 2**52. The body is always a multiple of 8, so there is no padding."""
    count = len(entries)
    if not 1 <= count <= MAX_PAGES_PER_RECORD:
        raise ValueError(f"PAGE_DATA needs 1..{MAX_PAGES_PER_RECORD} entries, got {count}")
    words: list[int] = []
    pages: list[bytes | memoryview] = []
    zero_tag = PAGE_ZERO << PFN_TYPE_SHIFT
    for pfn, page in entries:
        if not 0 <= pfn <= PFN_MASK:
            raise ValueError(f"PAGE_DATA pfn 0x{pfn:x} does not fit in 52 bits")
        if page is None:
            words.append(pfn | zero_tag)
        else:
            if _nbytes(page) != PAGE_SIZE:
                raise ValueError(f"PAGE_DATA page for pfn 0x{pfn:x} is {_nbytes(page)} bytes, "
                                 f"not {PAGE_SIZE}")
            words.append(pfn)
            pages.append(page)
    head = struct.pack(f"<II{count}Q", count, 0, *words)
    crc = zlib.crc32(head)
    for page in pages:
        crc = zlib.crc32(page, crc)
    length = len(head) + PAGE_SIZE * len(pages)
    out: list[bytes | memoryview] = [_REC_HDR.pack(PAGE_DATA, length, crc, 0) + head]
    out.extend(pages)
    return out


def encode_json(rtype: int, obj: dict) -> bytes:
    """A DOMAIN_CONFIG / XEN_STATE / XENSTORE / DEVICES record holding ``obj`` (a dict) as
    compact ASCII JSON. NaN/Infinity are refused (``ValueError``), as :func:`parse_json` does."""
    if rtype not in JSON_TYPES:
        raise ValueError(f"{record_name(rtype)} is not a JSON record type")
    if not isinstance(obj, dict):
        raise ValueError(f"{record_name(rtype)} body must be a JSON object, "
                         f"not {type(obj).__name__}")
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
    return encode_record(rtype, body)


def encode_vcpu_state(vcpu_id: int, blob: bytes | memoryview) -> bytes:
    """A VCPU_STATE record: ``vcpu_id u32, reserved u32``, then the engine's state blob."""
    return encode_record(VCPU_STATE, _U32x2.pack(vcpu_id, 0) + bytes(blob))


def encode_hypervisor_page(kind: int, index: int, page: bytes | memoryview) -> bytes:
    """A HYPERVISOR_PAGE record: ``kind u32`` (:data:`HV_SHARED_INFO` or
    :data:`HV_GRANT_FRAME`), ``index u32``, then the 4096-byte page."""
    if kind not in HV_KIND_NAMES:
        raise ValueError(f"unknown HYPERVISOR_PAGE kind {kind}")
    if _nbytes(page) != PAGE_SIZE:
        raise ValueError(f"HYPERVISOR_PAGE page is {_nbytes(page)} bytes, not {PAGE_SIZE}")
    return encode_record(HYPERVISOR_PAGE, _U32x2.pack(kind, index) + bytes(page))


def encode_disk_data(devid: int, offset: int, data: bytes | memoryview | None,
                     length: int | None = None) -> bytes:
    """A DISK_DATA record: ``length`` bytes at byte ``offset`` of disk ``devid``. With
    ``data`` None the range is zeroes and no data is sent (flag bit 0); otherwise ``length``
    defaults to (and must equal) the data's size."""
    if data is None:
        if length is None:
            raise ValueError("DISK_DATA of zeroes needs a length")
        if not 0 <= length < 1 << 64 or not 0 <= offset < 1 << 64:
            raise ValueError("DISK_DATA offset/length out of range")
        return encode_record(DISK_DATA, _DISK_HDR.pack(devid, DISK_ZEROES, offset, length))
    n = _nbytes(data)
    if length is None:
        length = n
    elif length != n:
        raise ValueError(f"DISK_DATA length {length} does not match {n} bytes of data")
    return encode_record(DISK_DATA, _DISK_HDR.pack(devid, 0, offset, length) + bytes(data))


def encode_end() -> bytes:
    """The END record that closes the stream."""
    return encode_record(END, b"")


# --- incremental parser -------------------------------------------------------------------

_S_IMAGE, _S_DOMAIN, _S_RHDR, _S_BODY, _S_PAD, _S_DONE = range(6)


class StreamReader:
    """Incremental parser: ``feed()`` bytes as they arrive, get back complete records.

    Any chunking of the input (down to 1-byte chunks) yields the same records. Headers are
    validated as soon as they are complete; each record is returned only after its CRC and
    padding are checked. After END, ``ended`` is True and further input is ignored. The
    first error is raised as :class:`StreamError` and raised again by any later call.

    Memory: ``bytes`` input is referenced, not copied, while a record is incomplete (a body
    costs one copy, when it is joined); other buffers (bytearray, memoryview of a reused
    receive buffer) are copied as they are fed, so the caller may reuse them at once.
    """

    def __init__(self) -> None:
        self.ended = False
        #: Values from the domain header, once it has been read.
        self.domain_type: int | None = None
        self.xen_version: tuple[int, int] | None = None
        #: Number of records returned so far.
        self.records = 0
        self._stage = _S_IMAGE
        self._need = IMAGE_HEADER_SIZE
        self._pos = 0                  # stream offset of the current item's first byte
        self._parts: list[bytes | memoryview] = []
        self._have = 0
        self._error: StreamError | None = None
        self._rtype = 0
        self._rlen = 0
        self._rcrc = 0
        self._roffset = 0
        self._body = b""

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed (up to the end of END once ended)."""
        return self._pos + self._have

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Consume ``data``; return the records it completed, in order (maybe none).
        Raises :class:`StreamError` on the first malformed header or record."""
        if self._error is not None:
            raise self._error
        if self.ended:
            return []
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        keep = type(data) is bytes or (type(data) is memoryview
                                       and type(data.obj) is bytes)
        n = mv.nbytes
        pos = 0
        out: list[Record] = []
        try:
            while pos < n and not self.ended:
                need = self._need
                if not self._have and n - pos >= need:
                    piece: bytes | memoryview = mv[pos:pos + need]
                    pos += need
                else:
                    take = min(need - self._have, n - pos)
                    chunk = mv[pos:pos + take]
                    self._parts.append(chunk if keep else bytes(chunk))
                    self._have += take
                    pos += take
                    if self._have < need:
                        break
                    parts = self._parts
                    piece = parts[0] if len(parts) == 1 else b"".join(parts)
                    self._parts = []
                    self._have = 0
                self._complete(piece, out)
        except StreamError as err:
            self._error = err
            self._parts = []
            raise
        return out

    def finish(self) -> None:
        """Declare the input over: raises :class:`StreamError` (``truncated``) unless END
        has been read."""
        if self._error is not None:
            raise self._error
        if self.ended:
            return
        stage = self._stage
        have = self._have
        if stage in (_S_IMAGE, _S_DOMAIN):
            what = "image header" if stage == _S_IMAGE else "domain header"
            msg = (f"stream truncated: {what} at offset 0x{self._pos:x} needs "
                   f"{self._need - have} more bytes")
            err = StreamError(msg, offset=self._pos, truncated=True)
        elif stage == _S_RHDR:
            where = _where(self.records, self._pos, None)
            if have:
                msg = (f"stream truncated: {where} needs {RECORD_HEADER_SIZE - have} more "
                       f"bytes of its header")
            else:
                msg = f"stream truncated: {where} expected (the stream ended before END)"
            err = StreamError(msg, index=self.records, offset=self._pos, truncated=True)
        else:
            more = self._need - have
            if stage == _S_BODY:
                more += len(_padding(self._rlen))
            where = _where(self.records, self._roffset, self._rtype)
            err = StreamError(f"stream truncated: {where} needs {more} more bytes",
                              index=self.records, offset=self._roffset, rtype=self._rtype,
                              truncated=True)
        self._error = err
        raise err

    # The state machine: each stage needs exactly ``_need`` bytes; ``piece`` holds them.
    def _complete(self, piece: bytes | memoryview, out: list[Record]) -> None:
        while True:
            stage = self._stage
            start = self._pos
            self._pos = start + len(piece)
            if stage == _S_RHDR:
                self._record_header(piece, start)
            elif stage == _S_BODY:
                body = piece if type(piece) is bytes else bytes(piece)
                if zlib.crc32(body) != self._rcrc:
                    raise self._err(f"body CRC-32 0x{zlib.crc32(body):08x} does not match "
                                    f"the header's 0x{self._rcrc:08x}")
                self._body = body
                self._stage = _S_PAD
                self._need = len(_padding(self._rlen))
            elif stage == _S_PAD:
                if any(piece):
                    raise self._err(f"padding after the body is not zero ({bytes(piece).hex()})")
                self._emit(out)
            elif stage == _S_IMAGE:
                self._image_header(piece)
            elif stage == _S_DOMAIN:
                self._domain_header(piece, start)
            else:                                    # pragma: no cover (feed stops at END)
                return
            if self._need or self._stage == _S_DONE:
                return
            piece = b""

    def _err(self, reason: str) -> StreamError:
        return _record_error(self.records, self._roffset, self._rtype, reason)

    def _image_header(self, piece) -> None:
        marker, ident, version, options, reserved = _IMAGE_HDR.unpack(piece)
        if marker != MARKER:
            raise _header_error("image header", 0, f"bad marker 0x{marker:016x} "
                                f"(expected 0x{MARKER:016x})")
        if ident != IMAGE_ID:
            extra = ": a Xen (libxc) stream, not a pyxen one" if ident == XEN_IMAGE_ID else ""
            raise _header_error("image header", 0, f"bad id 0x{ident:08x} (expected "
                                f"0x{IMAGE_ID:08x} 'PYXF'){extra}")
        if version != VERSION:
            raise _header_error("image header", 0, f"unsupported version {version} "
                                f"(expected {VERSION})")
        if options & OPT_BIG_ENDIAN:
            raise _header_error("image header", 0, "options bit 0 set: big-endian streams "
                                "are not supported")
        if options:
            raise _header_error("image header", 0, f"unknown option bits 0x{options:04x}")
        if any(reserved):
            raise _header_error("image header", 0,
                                f"reserved bytes are not zero ({reserved.hex()})")
        self._stage = _S_DOMAIN
        self._need = DOMAIN_HEADER_SIZE

    def _domain_header(self, piece, start: int) -> None:
        dtype, page_shift, reserved, major, minor = _DOMAIN_HDR.unpack(piece)
        if dtype != DOMAIN_TYPE_X86_PVH:
            raise _header_error("domain header", start, f"unsupported domain type {dtype} "
                                f"(expected {DOMAIN_TYPE_X86_PVH}, x86 PVH)")
        if page_shift != PAGE_SHIFT:
            raise _header_error("domain header", start, f"page_shift {page_shift} "
                                f"(expected {PAGE_SHIFT})")
        if reserved:
            raise _header_error("domain header", start,
                                f"reserved field is 0x{reserved:04x} (must be 0)")
        self.domain_type = dtype
        self.xen_version = (major, minor)
        self._stage = _S_RHDR
        self._need = RECORD_HEADER_SIZE

    def _record_header(self, piece, start: int) -> None:
        rtype, length, crc, reserved = _REC_HDR.unpack(piece)
        self._rtype = rtype
        self._rlen = length
        self._rcrc = crc
        self._roffset = start
        if rtype not in TYPE_NAMES:
            raise self._err(f"unknown record type 0x{rtype:08x}")
        if reserved:
            raise self._err(f"reserved header field is 0x{reserved:08x} (must be 0)")
        if length > MAX_BODY:
            raise self._err(f"body length {length} exceeds MAX_BODY ({MAX_BODY})")
        if rtype == END and length:
            raise self._err(f"END record has a non-empty body ({length} bytes)")
        if rtype == PAGE_DATA and length > _MAX_PAGE_DATA_BODY:
            raise self._err(f"body length {length} exceeds the largest PAGE_DATA "
                            f"({_MAX_PAGE_DATA_BODY}: {MAX_PAGES_PER_RECORD} pages)")
        self._stage = _S_BODY
        self._need = length

    def _emit(self, out: list[Record]) -> None:
        out.append(Record(self._rtype, self._body, self.records, self._roffset))
        self.records += 1
        self._body = b""
        if self._rtype == END:
            self.ended = True
            self._stage = _S_DONE
            self._need = 0
        else:
            self._stage = _S_RHDR
            self._need = RECORD_HEADER_SIZE


# --- decoders -----------------------------------------------------------------------------

def _expect(rec: Record, *types: int) -> None:
    if rec.type not in types:
        names = " or ".join(record_name(t) for t in types)
        raise rec.error(f"expected a {names} record")


def parse_page_data(rec: Record) -> list[tuple[int, int, memoryview | None]]:
    """Decode a PAGE_DATA record into ``(pfn, type, page)`` entries in stream order:
    ``page`` is a 4096-byte read-only memoryview into ``rec.body`` for :data:`PAGE_NORMAL`
    and None for :data:`PAGE_ZERO`. Checks count (1..1024), the reserved word, each entry's
    type and reserved bits, and that the length matches the entries exactly."""
    _expect(rec, PAGE_DATA)
    body = rec.body
    n = len(body)
    if n < PAGE_DATA_HEADER_SIZE:
        raise rec.error(f"body length {n} is shorter than the {PAGE_DATA_HEADER_SIZE}-byte "
                        f"PAGE_DATA header")
    count, reserved = _U32x2.unpack_from(body, 0)
    if reserved:
        raise rec.error(f"reserved field is 0x{reserved:08x} (must be 0)")
    if not 1 <= count <= MAX_PAGES_PER_RECORD:
        raise rec.error(f"count {count} is not in 1..{MAX_PAGES_PER_RECORD}")
    data_off = PAGE_DATA_HEADER_SIZE + 8 * count
    if n < data_off:
        raise rec.error(f"body length {n} is too short for {count} pfns")
    words = struct.unpack_from(f"<{count}Q", body, PAGE_DATA_HEADER_SIZE)
    mv = memoryview(body)
    out: list[tuple[int, int, memoryview | None]] = []
    append = out.append
    off = data_off
    for i, word in enumerate(words):
        if word & PFN_RESERVED_MASK:
            raise rec.error(f"entry {i} (0x{word:016x}) has reserved bits 52-59 set")
        ptype = word >> PFN_TYPE_SHIFT
        if ptype == PAGE_NORMAL:
            append((word, PAGE_NORMAL, mv[off:off + PAGE_SIZE]))
            off += PAGE_SIZE
        elif ptype == PAGE_ZERO:
            append((word & PFN_MASK, PAGE_ZERO, None))
        else:
            raise rec.error(f"entry {i} (pfn 0x{word & PFN_MASK:x}) has bad type {ptype}")
    if off != n:
        raise rec.error(f"body length {n} does not match {count} pfns and "
                        f"{(off - data_off) // PAGE_SIZE} data pages")
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(rec: Record) -> dict:
    """Decode a DOMAIN_CONFIG / XEN_STATE / XENSTORE / DEVICES record: its body must be
    strict UTF-8 JSON (no NaN/Infinity) holding an object."""
    _expect(rec, DOMAIN_CONFIG, XEN_STATE, XENSTORE, DEVICES)
    try:
        text = bytes(rec.body).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise rec.error(f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise rec.error(f"body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise rec.error(f"body is a JSON {type(obj).__name__}, not an object")
    return obj


def parse_vcpu_state(rec: Record) -> tuple[int, bytes]:
    """Decode a VCPU_STATE record into ``(vcpu_id, blob)``."""
    _expect(rec, VCPU_STATE)
    body = rec.body
    if len(body) < 8:
        raise rec.error(f"body length {len(body)} is shorter than its 8-byte header")
    vcpu_id, reserved = _U32x2.unpack_from(body, 0)
    if reserved:
        raise rec.error(f"reserved field is 0x{reserved:08x} (must be 0)")
    return vcpu_id, bytes(body[8:])


def parse_hypervisor_page(rec: Record) -> tuple[int, int, bytes]:
    """Decode a HYPERVISOR_PAGE record into ``(kind, index, page)``; the body must be
    exactly 8 + 4096 bytes and ``kind`` one of :data:`HV_SHARED_INFO`, :data:`HV_GRANT_FRAME`."""
    _expect(rec, HYPERVISOR_PAGE)
    body = rec.body
    if len(body) != 8 + PAGE_SIZE:
        raise rec.error(f"body length {len(body)} is not {8 + PAGE_SIZE}")
    kind, index = _U32x2.unpack_from(body, 0)
    if kind not in HV_KIND_NAMES:
        raise rec.error(f"unknown kind {kind} (expected 1 shared_info or 2 grant frame)")
    return kind, index, bytes(body[8:])


def parse_disk_data(rec: Record) -> tuple[int, int, int, memoryview | None]:
    """Decode a DISK_DATA record into ``(devid, offset, length, data)``: ``data`` is a
    memoryview into ``rec.body`` of ``length`` bytes, or None when the range is zeroes."""
    _expect(rec, DISK_DATA)
    body = rec.body
    n = len(body)
    if n < DISK_DATA_HEADER_SIZE:
        raise rec.error(f"body length {n} is shorter than its {DISK_DATA_HEADER_SIZE}-byte "
                        f"header")
    devid, flags, offset, length = _DISK_HDR.unpack_from(body, 0)
    if flags & ~DISK_ZEROES:
        raise rec.error(f"unknown flag bits 0x{flags & ~DISK_ZEROES:08x}")
    if offset + length > 1 << 64:
        raise rec.error(f"offset 0x{offset:x} + length 0x{length:x} overflows 64 bits")
    if flags & DISK_ZEROES:
        if n != DISK_DATA_HEADER_SIZE:
            raise rec.error(f"body length {n} carries data but flags say zeroes")
        return devid, offset, length, None
    if n != DISK_DATA_HEADER_SIZE + length:
        raise rec.error(f"body length {n} does not match data length {length}")
    return devid, offset, length, memoryview(body)[DISK_DATA_HEADER_SIZE:]
