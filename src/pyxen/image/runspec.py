"""Per-run overlay archive and the exit-marker filter, sans-IO.

A run boots the cached initramfs plus a small uncompressed cpio appended to it (Linux unpacks
concatenated archives; the whole is the guest's single initrd module). The overlay holds
``/pyxen/mode`` ("run" or "shell"), ``/pyxen/cmd`` (run with ``sh -c``), ``/pyxen/nonce`` and,
optionally, ``/pyxen/modules`` (replaces the image's module autoload list).

In mode "run" the guest's /init ends with ``\\n@@pyxen-exit <nonce> <status>@@\\n`` on hvc0;
:class:`ExitMarkerFilter` removes that line from the console stream and records the status.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pyxen.errors import ImageError
from pyxen.image import cpio

if TYPE_CHECKING:
    from pyxen.image.build import Image

MODES = ("run", "shell")
_NONCE = re.compile(r"[0-9a-f]{8,64}")
_MAX_STATUS_DIGITS = 10


def new_nonce() -> str:
    """A fresh random hex nonce (128 bits)."""
    return os.urandom(16).hex()


def make_overlay(mode: str, command: str, nonce: str,
                 modules: Iterable[str] | None = None) -> bytes:
    """The uncompressed overlay cpio for one run (deterministic for equal arguments).

    ``nonce`` must be 8-64 lowercase hex digits; ``modules``, when given, replaces the image's
    autoload list (an empty list loads nothing).
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
