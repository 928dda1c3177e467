"""The xenstore wire protocol (xen/include/public/io/xs_wire.h, docs/misc/xenstore.txt).

Every message is a ``struct xsd_sockmsg`` header -- four little-endian u32: type, req_id,
tx_id, len -- followed by ``len`` payload bytes, ``len <= XENSTORE_PAYLOAD_MAX`` (4096) in
both directions. A peer that sends a longer payload is broken: xenstored drops it.

Sans-IO: :func:`pack` and :class:`MessageParser` turn messages into bytes and back; no
threads, no I/O. Ring-page layout constants (``struct xenstore_domain_interface``) live here
too so the ring backend and tests share one definition.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# enum xsd_sockmsg_type
XS_CONTROL = 0
XS_DEBUG = XS_CONTROL
XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_IS_DOMAIN_INTRODUCED = 17
XS_RESUME = 18
XS_SET_TARGET = 19
# 20 was XS_RESTRICT (removed; invalid)
XS_RESET_WATCHES = 21
XS_DIRECTORY_PART = 22
XS_INVALID = 0xFFFF

TYPE_NAMES = {v: k for k, v in globals().items()
              if k.startswith("XS_") and isinstance(v, int) and k != "XS_DEBUG"}

# struct xsd_errors xsd_errors[] -- transmitted by name, never by number.
XSD_ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
              "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size   # 16

# struct xenstore_domain_interface (byte offsets in the 4 KiB store page)
RING_SIZE = 1024
REQ_OFF, RSP_OFF = 0, 1024
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
SERVER_FEATURES, CONNECTION, ERROR_FIELD = 2064, 2068, 2072

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3


@dataclass(frozen=True, slots=True)
class Message:
    """One xenstore message. ``payload`` excludes the header; its length is the header's len."""
    type: int
    req_id: int = 0
    tx_id: int = 0
    payload: bytes = b""


class ProtocolError(Exception):
    """The peer violated the wire protocol (payload longer than XENSTORE_PAYLOAD_MAX).
    The connection cannot be resynchronised and must be dropped -- after handling
    ``messages``, the complete messages that came before the bad header (as xenstored,
    which reads one message at a time)."""

    def __init__(self, message: str, messages: list[Message] | None = None) -> None:
        super().__init__(message)
        self.messages = messages or []


def pack(msg: Message) -> bytes:
    """Header + payload. Raises ValueError for a payload over XENSTORE_PAYLOAD_MAX."""
    if len(msg.payload) > XENSTORE_PAYLOAD_MAX:
        raise ValueError(f"xenstore payload of {len(msg.payload)} bytes exceeds 4096")
    return HEADER.pack(msg.type, msg.req_id, msg.tx_id, len(msg.payload)) + msg.payload


class MessageParser:
    """Incremental decoder for a byte stream of messages (bytes may arrive split anywhere).

    :meth:`feed` returns the messages completed so far. A header announcing more than
    XENSTORE_PAYLOAD_MAX bytes raises :class:`ProtocolError`; afterwards ``broken`` is True
    and every further feed raises too. Not thread-safe: one owner feeds it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> list[Message]:
        if self.broken:
            raise ProtocolError("stream already broken")
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER_SIZE:
            typ, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > XENSTORE_PAYLOAD_MAX:
                self.broken = True
                raise ProtocolError(f"payload length {length} exceeds {XENSTORE_PAYLOAD_MAX}",
                                    out)
            if len(self._buf) < HEADER_SIZE + length:
                break
            payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
            del self._buf[:HEADER_SIZE + length]
            out.append(Message(typ, req_id, tx_id, payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self.broken = False


def reply(req: Message, payload: bytes) -> Message:
    """A success reply: same type, req_id and tx_id as ``req``."""
    return Message(req.type, req.req_id, req.tx_id, payload)


def ok_reply(req: Message) -> Message:
    """The ``OK\\0`` reply of write-like requests."""
    return reply(req, b"OK\0")


def error_reply(req: Message, name: str) -> Message:
    """An XS_ERROR reply carrying ``name\\0``; req_id and tx_id copied from ``req``."""
    if name not in XSD_ERRORS:
        raise ValueError(f"not a xenstore error name: {name!r}")
    return Message(XS_ERROR, req.req_id, req.tx_id, name.encode() + b"\0")


def split_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings at the start of ``payload`` (like xenstored's
    get_strings: trailing bytes without a terminating NUL are ignored)."""
    parts = payload.split(b"\0")
    return parts[:-1]


def join_strings(*parts: bytes | str) -> bytes:
    """Each part followed by a NUL."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)
