"""Per-run overlay archive and the exit-marker filter, sans-IO.

A run boots the cached initramfs plus a small uncompressed cpio appended to it (Linux unpacks
concatenated archives; the whole is the guest's single initrd module). The overlay holds
``/pyxen/mode`` ("run" or "shell"), ``/pyxen/cmd`` (run with ``sh -c``), ``/pyxen/nonce`` and,
optionally, ``/pyxen/modules`` (replaces the image's module autoload list) and extra executable
files (``files``: e.g. a benchmark's guest tool).

In mode "run" the guest's /init ends with ``\\n@@pyxen-exit <nonce> <status>@@\\n`` on hvc0;
:class:`ExitMarkerFilter` removes that line from the console stream and records the status.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from pyxen.errors import ImageError
from pyxen.image import cpio
from pyxen.image.initramfs import BASE_DIRS

if TYPE_CHECKING:
    from pyxen.image.build import Image

MODES = ("run", "shell")
_NONCE = re.compile(r"[0-9a-f]{8,64}")
_MAX_STATUS_DIGITS = 10


def new_nonce() -> str:
    """A fresh random hex nonce (128 bits)."""
    return os.urandom(16).hex()


_PATH_PART = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_RESERVED = ("init", "pyxen/cmd", "pyxen/mode", "pyxen/nonce", "pyxen/modules")
_MOUNTED = ("dev", "proc", "sys")   # /init mounts over these: files there would be hidden


def _file_entries(files: Mapping[str, bytes]) -> list[cpio.Entry]:
    """Entries for ``files`` (guest path -> content, mode 0755) and for their parent
    directories that the base image lacks, sorted by path. Directories the base image has are
    not repeated: unpacking a directory entry over an existing one resets its mode (/tmp)."""
    known = set(BASE_DIRS) | {"pyxen"}
    dirs: set[str] = set()
    out: dict[str, cpio.Entry] = {}
    for raw, data in files.items():
        if not isinstance(raw, str) or not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"overlay: files must map str paths to bytes, not {raw!r}")
        path = raw.lstrip("/")
        parts = path.split("/")
        if not all(_PATH_PART.fullmatch(p) for p in parts):
            raise ImageError(f"overlay: bad file path {raw!r}")
        if path in _RESERVED or path in known or path in out or parts[0] in _MOUNTED:
            raise ImageError(f"overlay: file path {raw!r} is reserved or repeated")
        out[path] = cpio.file(path, bytes(data), 0o755)
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    if clash := sorted(dirs & set(out)):
        raise ImageError(f"overlay: {clash[0]!r} is both a file and a directory")
    return [cpio.directory(d) for d in sorted(dirs - known)] + [out[p] for p in sorted(out)]


def files_archive(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed cpio of just ``files`` (rules as for :func:`make_overlay`), for a
    custom ``--initrd``: ``concat_initrd(image initramfs, files_archive(files))``."""
    return cpio.write_cpio(_file_entries(files))


def make_overlay(mode: str, command: str, nonce: str,
                 modules: Iterable[str] | None = None,
                 files: Mapping[str, bytes] | None = None) -> bytes:
    """The uncompressed overlay cpio for one run (deterministic for equal arguments).

    ``nonce`` must be 8-64 lowercase hex digits; ``modules``, when given, replaces the image's
    autoload list (an empty list loads nothing); ``files`` maps guest paths (``usr/bin/tool``,
    a leading ``/`` is ignored) to contents, written with mode 0755; their missing parent
    directories are created (0755).
    """
    if mode not in MODES:
        raise ImageError(f"overlay: mode must be one of {MODES}, not {mode!r}")
    if not _NONCE.fullmatch(nonce):
        raise ImageError(f"overlay: nonce must be 8-64 lowercase hex digits, not {nonce!r}")
    entries = [cpio.directory("pyxen"),
               cpio.file("pyxen/cmd", command.encode()),
               cpio.file("pyxen/mode", mode.encode() + b"\n"),
               cpio.file("pyxen/nonce", nonce.encode() + b"\n")]
    if modules is not None:
        names = list(modules)
        if any(not re.fullmatch(r"[A-Za-z0-9_-]+", m) for m in names):
            raise ImageError(f"overlay: bad module name in {names!r}")
        entries.append(cpio.file("pyxen/modules", "".join(f"{m}\n" for m in names).encode()))
    if files:
        entries.extend(_file_entries(files))
    return cpio.write_cpio(entries)


def concat_initrd(base: bytes, overlay: bytes) -> bytes:
    """``base`` (compressed or not) zero-padded to 4 bytes, then ``overlay``: Linux only
    recognises an uncompressed archive that starts 4-byte aligned after a compressed one."""
    return base + bytes(-len(base) % 4) + overlay


def combined_initrd(image: Image, mode: str, command: str, nonce: str,
                    modules: Iterable[str] | None = None) -> bytes:
    """The bytes to hand the guest as its initrd: the image's initramfs plus the overlay."""
    try:
        base = image.initramfs.read_bytes()
    except OSError as e:
        raise ImageError(f"{image.initramfs}: cannot read initramfs: {e.strerror}") from e
    return concat_initrd(base, make_overlay(mode, command, nonce, modules))


class ExitMarkerFilter:
    """Removes ``\\n@@pyxen-exit <nonce> <status>@@\\n`` from a console byte stream.

    ``feed(data)`` returns what may be shown now: everything except the marker (its leading
    newline included, an optional ``\\r`` before its final newline tolerated). Only a tail that
    could still become the marker is held back; ``flush()`` releases it (call at end of stream,
    or when the stream has been idle). Once the marker was seen, ``status`` is its value and
    the rest of the stream passes through untouched. Output does not depend on how the stream
    is split into ``feed`` calls. A marker whose leading newline was already released by
    ``flush()`` is still recognised at the start of a line.
    """

    def __init__(self, nonce: str) -> None:
        self.prefix = b"\n@@pyxen-exit " + nonce.encode() + b" "
        self.status: int | None = None
        self._held = b""
        self._line_start = False  # a flushed "\n" was the last byte released

    def feed(self, data: bytes) -> bytes:
        """Bytes to pass on now; holds back at most a partial marker."""
        if self.status is not None:
            return bytes(data)
        # A newline released by flush() is put back in front (``skip``) so a marker right
        # after it still matches, but it is never emitted or held a second time.
        skip = 1 if self._line_start and data else 0
        buf = b"\n" * skip + self._held + bytes(data)
        if skip:
            self._line_start = False
        pos = 0                          # where to look for the next candidate

        def keep_from(start: int) -> bytes:
            self._held = buf[max(start, skip):]
            self._line_start = start < skip
            return buf[skip:start]

        while (i := buf.find(self.prefix, pos)) >= 0:
            end = self._match_end(buf, i)
            if end is None:              # undecided: hold the candidate back
                return keep_from(i)
            if end:                      # the marker: drop it, pass the rest through
                digits = buf[i + len(self.prefix):buf.index(b"@@", i + len(self.prefix))]
                self.status = int(digits)
                self._held = b""
                return buf[skip:i] + buf[end:]
            pos = i + 1                  # not a marker after all
        # hold back the longest tail that is a proper prefix of the marker (it starts at "\n")
        j = buf.rfind(b"\n", max(pos, len(buf) - len(self.prefix) + 1))
        return keep_from(j if j >= 0 and self.prefix.startswith(buf[j:]) else len(buf))

    def _match_end(self, buf: bytes, i: int) -> int | None:
        """End offset of a full marker at ``i``; 0 when it is not one; None when undecided."""
        k = i + len(self.prefix)
        digits = 0
        while k < len(buf) and buf[k:k + 1].isdigit():
            k += 1
            digits += 1
        if digits > _MAX_STATUS_DIGITS:
            return 0
        if k == len(buf):
            return None
        if digits == 0:
            return 0
        for expected in (b"@", b"@"):
            if k == len(buf):
                return None
            if buf[k:k + 1] != expected:
                return 0
            k += 1
        if k == len(buf):
            return None
        if buf[k:k + 1] == b"\r":
            k += 1
            if k == len(buf):
                return None
        return k + 1 if buf[k:k + 1] == b"\n" else 0

    def flush(self) -> bytes:
        """Release whatever is held back (end of stream or idle)."""
        held, self._held = self._held, b""
        if held.endswith(b"\n") and self.status is None:
            self._line_start = True
        elif held:
            self._line_start = False
        return held
