"""The blkif protocol (``xen/include/public/io/blkif.h``, x86_64 ABI), sans-IO.

Ring entries are 112 bytes (the request union; responses are 16). Layouts, all packed,
little-endian:

* read/write/flush/barrier: ``u8 op, u8 nr_segments, u16 handle, u32 pad, u64 id,
  u64 sector_number, seg[11]`` where a segment is ``{u32 gref, u8 first_sect, u8 last_sect,
  u16 pad}`` (sectors of 512 bytes within the granted page);
* discard: ``u8 op, u8 flag, u16 pad, u32 pad, u64 id, u64 sector_number, u64 nr_sectors``;
* indirect: ``u8 op, u8 indirect_op, u16 nr_segments, u32 pad, u64 id, u64 sector_number,
  u16 handle, u16 pad, u32 indirect_grefs[8]``; the segments are in the granted pages, 512 per
  page;
* response: ``u64 id, u8 operation, u8 pad, i16 status``.

:func:`parse_request` turns one ring entry into a :class:`Request` or raises
:class:`BadRequest` (which carries the id and operation to answer with). Checks that need the
indirect pages or the disk (segment contents, disk bounds) are :func:`check_segments` and
:func:`check_bounds`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

OP_READ = 0
OP_WRITE = 1
OP_WRITE_BARRIER = 2
OP_FLUSH_DISKCACHE = 3
OP_RESERVED_1 = 4
OP_DISCARD = 5
OP_INDIRECT = 6
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_WRITE_BARRIER: "barrier",
            OP_FLUSH_DISKCACHE: "flush", OP_DISCARD: "discard", OP_INDIRECT: "indirect"}

RSP_OKAY = 0
RSP_ERROR = -1
RSP_EOPNOTSUPP = -2

MAX_SEGMENTS_PER_REQUEST = 11
MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENTS_PER_INDIRECT_FRAME = 4096 // 8
#: what pyxen offers as feature-max-indirect-segments (Linux's blkback offers the same)
MAX_INDIRECT_SEGMENTS = 256
DISCARD_SECURE = 1
SECTOR = 512
SECTORS_PER_PAGE = 4096 // SECTOR

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

ENTRY_SIZE = 112
RESPONSE_SIZE = 16
PROTOCOL_X86_64 = "x86_64-abi"

_HEAD = struct.Struct("<BBHIQQ")                  # op, b1, h, pad, id, sector
_SEG = struct.Struct("<IBBH")
_DISCARD_N = struct.Struct("<Q")                  # nr_sectors at offset 24
_INDIRECT = struct.Struct("<BBHIQQHH8I")
_RESPONSE = struct.Struct("<QBxh4x")          # 16 bytes: the u64 id pads the struct


@dataclass(frozen=True)
class Segment:
    gref: int
    first_sect: int
    last_sect: int

    @property
    def nbytes(self) -> int:
        return (self.last_sect - self.first_sect + 1) * SECTOR


@dataclass
class Request:
    """A parsed request. ``operation`` is the data operation (for an indirect request, its
    ``indirect_op``), which is also what the response carries: Linux's blkfront checks the
    response's operation against the indirect_op and disables the disk on a mismatch.
    ``ring_op`` is the operation in the ring entry. ``segments`` is empty for an indirect
    request until its indirect pages are read (``indirect_grefs``)."""

    ring_op: int
    operation: int
    id: int
    sector: int
    nr_segments: int = 0
    handle: int = 0
    segments: list[Segment] = field(default_factory=list)
    indirect_grefs: tuple[int, ...] = ()
    nr_sectors: int = 0                          # discard only
    secure: bool = False                         # discard only

    @property
    def writes(self) -> bool:
        return self.operation in (OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE, OP_DISCARD) \
            and (self.operation != OP_FLUSH_DISKCACHE or self.nr_segments > 0)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


class BadRequest(Exception):
    """A request the backend refuses; ``status`` goes in the response for ``id``/``op``."""

    def __init__(self, id: int, op: int, status: int, why: str) -> None:
        super().__init__(why)
        self.id = id
        self.op = op
        self.status = status


def parse_segments(raw: bytes, count: int) -> list[Segment]:
    return [Segment(g, f, last) for g, f, last, _ in _SEG.iter_unpack(raw[:count * _SEG.size])]


def parse_request(entry: bytes, max_indirect_segments: int = MAX_INDIRECT_SEGMENTS) -> Request:
    """One ring entry -> Request. Raises BadRequest for unknown operations (EOPNOTSUPP) and
    segment counts out of range (ERROR)."""
    op, b1, h, _, rid, sector = _HEAD.unpack_from(entry)
    if op in (OP_READ, OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE):
        n = b1
        if n > MAX_SEGMENTS_PER_REQUEST or (n == 0 and op in (OP_READ, OP_WRITE)):
            raise BadRequest(rid, op, RSP_ERROR, f"{OP_NAMES[op]} with {n} segments")
        req = Request(op, op, rid, sector, n, h, parse_segments(entry[24:], n))
        check_segments(req)
        return req
    if op == OP_DISCARD:
        (nr,) = _DISCARD_N.unpack_from(entry, 24)
        return Request(op, op, rid, sector, nr_sectors=nr, secure=bool(b1 & DISCARD_SECURE))
    if op == OP_INDIRECT:
        _, iop, n, _, _, _, h, _, *grefs = _INDIRECT.unpack_from(entry)
        if iop not in (OP_READ, OP_WRITE):
            raise BadRequest(rid, op, RSP_EOPNOTSUPP, f"indirect operation {iop}")
        if not 0 < n <= max_indirect_segments:
            raise BadRequest(rid, iop, RSP_ERROR, f"indirect request with {n} segments "
                             f"(max {max_indirect_segments})")
        pages = -(-n // SEGMENTS_PER_INDIRECT_FRAME)
        return Request(op, iop, rid, sector, n, h, indirect_grefs=tuple(grefs[:pages]))
    raise BadRequest(rid, op, RSP_EOPNOTSUPP, f"unknown operation {op}")


def check_segments(req: Request) -> None:
    """Each segment must lie within its page (first <= last < 8)."""
    for s in req.segments:
        if s.first_sect > s.last_sect or s.last_sect >= SECTORS_PER_PAGE:
            raise BadRequest(req.id, req.operation, RSP_ERROR,
                             f"segment sectors {s.first_sect}..{s.last_sect} outside the page")


def check_bounds(req: Request, disk_sectors: int) -> None:
    """The request's sectors must lie on the disk."""
    n = req.nr_sectors if req.operation == OP_DISCARD else req.nbytes // SECTOR
    if req.sector > disk_sectors or n > disk_sectors - req.sector:
        raise BadRequest(req.id, req.operation, RSP_ERROR,
                         f"sectors {req.sector}+{n} beyond the disk's {disk_sectors}")


def pack_response(id: int, op: int, status: int) -> bytes:
    return _RESPONSE.pack(id & 0xFFFFFFFFFFFFFFFF, op & 0xFF, status)


def unpack_response(data: bytes) -> tuple[int, int, int]:
    return _RESPONSE.unpack_from(data)


def pack_request(op: int, id: int, sector: int, segments: list[tuple[int, int, int]] = (),
                 handle: int = 0) -> bytes:
    """A read/write/flush ring entry (the frontend's side; used by tests and tools)."""
    body = _HEAD.pack(op, len(segments), handle, 0, id, sector)
    body += b"".join(_SEG.pack(g, f, last, 0) for g, f, last in segments)
    return body.ljust(ENTRY_SIZE, b"\0")


def pack_indirect(iop: int, id: int, sector: int, nr_segments: int, grefs: list[int],
                  handle: int = 0) -> bytes:
    g = list(grefs) + [0] * (MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
    return _INDIRECT.pack(OP_INDIRECT, iop, nr_segments, 0, id, sector, handle, 0,
                          *g).ljust(ENTRY_SIZE, b"\0")


def pack_discard(id: int, sector: int, nr_sectors: int, secure: bool = False) -> bytes:
    return (_HEAD.pack(OP_DISCARD, DISCARD_SECURE if secure else 0, 0, 0, id, sector)
            + _DISCARD_N.pack(nr_sectors)).ljust(ENTRY_SIZE, b"\0")


def pack_segments(segments: list[tuple[int, int, int]]) -> bytes:
    return b"".join(_SEG.pack(g, f, last, 0) for g, f, last in segments)
