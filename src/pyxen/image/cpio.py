"""cpio "newc" archives (the format Linux unpacks as an initramfs), sans-IO.

:func:`write_cpio` turns entries into archive bytes: magic ``070701``, 110-byte ASCII-hex
headers, name and data each padded to 4 bytes, a closing ``TRAILER!!!``. uid/gid and mtime are
always 0 and inode numbers are assigned in order, so the same entries give the same bytes.
Paths are stored without a leading ``/``; parents must come before their children (the writer
keeps the caller's order). :func:`read_cpio` parses such an archive back (tests, checks).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from pyxen.errors import ImageError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` is a full st_mode (type bits included); ``data`` is the
    file contents or, for a symlink, its target; ``rdev`` is (major, minor) for device nodes."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        """"dir", "file", "symlink", "chardev", "blockdev" or "other"."""
        fmt = stat.S_IFMT(self.mode)
        return {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
                stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev"}.get(fmt, "other")


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, bytes(data))


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _member(ino: int, mode: int, nlink: int, name: str, data: bytes,
            rdev: tuple[int, int]) -> bytes:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields) + raw
    return head + bytes(_pad4(len(head))) + data + bytes(_pad4(len(data)))


def write_cpio(entries: Iterable[Entry]) -> bytes:
    """Serialise ``entries`` (in the given order) plus the trailer as one newc archive."""
    out = []
    for ino, e in enumerate(entries, start=1):
        name = e.path.lstrip("/")
        if not name or name == TRAILER or "\0" in name:
            raise ImageError(f"cpio: bad member path {e.path!r}")
        if e.kind not in ("file", "symlink") and e.data:
            raise ImageError(f"cpio: {e.path}: only files and symlinks carry data")
        out.append(_member(ino, e.mode, 2 if e.kind == "dir" else 1, name, e.data, e.rdev))
    out.append(_member(0, 0, 1, TRAILER, b"", (0, 0)))
    return b"".join(out)


def read_cpio(data: bytes) -> list[Entry]:
    """Parse one newc archive (up to its trailer) back into entries; raises ImageError."""
    entries: list[Entry] = []
    off = 0
    while True:
        head = data[off:off + HEADER_SIZE]
        if len(head) < HEADER_SIZE or head[:6] != MAGIC:
            raise ImageError(f"cpio: no newc header at offset {off}")
        try:
            f = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ImageError(f"cpio: bad header at offset {off}") from None
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_end = off + HEADER_SIZE + namesize
        name = data[off + HEADER_SIZE:name_end - 1].decode()
        body = name_end + _pad4(name_end - off)
        if body + size > len(data):
            raise ImageError(f"cpio: member {name!r} runs past the end")
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, data[body:body + size], (rmaj, rmin)))
        off = body + size + _pad4(size)
