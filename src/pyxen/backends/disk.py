"""Disk images behind blkback: raw files and block devices, and qcow2 through QEMU.

:class:`DiskImage` is an open raw image (regular file or block device). Its data path moves
bytes between the file and guest pages with ``preadv``/``pwritev`` on views of the guest's
memory mapping: the kernel copies straight into guest memory, no bytes pass through Python
objects. Writes are buffered in the host page cache (QEMU's ``cache=writeback``), so they
survive the VMM process dying; :meth:`DiskImage.flush` (``fdatasync``) makes them durable
across a host crash, and blkback answers a flush only after it returns.

qcow2 (and QEMU's other formats) are not parsed here: :class:`QemuExport` runs Debian's
``qemu-storage-daemon`` with a FUSE export, which presents the image's guest-visible contents
as a raw file; blkback then uses that file like any raw image (discard and flush pass through
to QEMU's block layer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from pyxen.errors import ConfigError

log = logging.getLogger("pyxen.backends")

SECTOR = 512
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKSSZGET = 0x1268
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
QEMU_FORMATS = ("qcow2", "qcow", "vhd", "vpc", "qed", "vmdk", "vdi")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class DiskError(ConfigError):
    """A disk cannot be used (missing file, bad format, in use); names the spec."""


#: granularity of the write log (bytes)
WRITE_LOG_CHUNK = 1 << 16
_write_logs: dict[str, set[int]] = {}
_write_logs_lock = threading.Lock()


def start_write_log(path: str) -> None:
    """Record which WRITE_LOG_CHUNK-sized chunks of the image at ``path`` this process's
    backends write or discard from now on (live migration with disk copy). Any thread."""
    with _write_logs_lock:
        _write_logs[os.path.realpath(path)] = set()


def fetch_write_log(path: str) -> set[int]:
    """Chunk indices written since the last fetch (or start); clears them."""
    key = os.path.realpath(path)
    with _write_logs_lock:
        out = _write_logs.get(key, set())
        if key in _write_logs:
            _write_logs[key] = set()
        return out


def stop_write_log(path: str) -> None:
    with _write_logs_lock:
        _write_logs.pop(os.path.realpath(path), None)


class DiskImage:
    """An open raw disk at ``path`` (read-only if ``readonly``). Thread-safe: every call is
    one positioned system call on a shared descriptor."""

    def __init__(self, path: str, *, readonly: bool = False, spec: str | None = None) -> None:
        self.path = path
        self.readonly = readonly
        self._log_key = os.path.realpath(path)
        what = spec or path
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise DiskError(f"disk {what!r}: cannot open {path}: {e.strerror}") from e
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise DiskError(f"disk {what!r}: {path} is neither a file nor a block device")
        if self.is_block:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("<Q", buf)[0]
        else:
            self.size = st.st_size
        self.sectors = self.size // SECTOR
        self.can_discard = not readonly

    # --- data path (offsets and lengths in bytes)
    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        self._all(os.preadv, views, offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        self._all(os.pwritev, views, offset)
        if _write_logs:
            self._logged(offset, sum(v.nbytes for v in views))

    def _logged(self, offset: int, length: int) -> None:
        """After a write or discard completed: note its chunks in the write log, if any."""
        with _write_logs_lock:
            log = _write_logs.get(self._log_key)
            if log is not None and length > 0:
                log.update(range(offset // WRITE_LOG_CHUNK,
                                 (offset + length - 1) // WRITE_LOG_CHUNK + 1))

    def _all(self, fn, views: Sequence[memoryview], offset: int) -> None:  # type: ignore[no-untyped-def]
        views = list(views)
        while views:
            n = fn(self.fd, views, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: short transfer at {offset}")
            offset += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (file) or BLKDISCARD (block device); contents read back as zeroes
        for files."""
        if self.is_block:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
        elif _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{self.path}: punch hole: {os.strerror(e)}")
        if _write_logs:
            self._logged(offset, length)

    def close(self) -> None:
        """Close the image (idempotent: the descriptor number is never closed twice)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class QemuExport:
    """``qemu-storage-daemon`` exporting a ``fmt`` image as a raw file over FUSE.

    The export file lives in ``run_dir``; :attr:`path` is usable once the constructor returns.
    :meth:`close` stops the daemon (which flushes the image) and removes the export file.
    """

    def __init__(self, image: str, fmt: str, run_dir: str, *, readonly: bool,
                 spec: str | None = None, timeout: float = 10.0) -> None:
        what = spec or image
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise DiskError(f"disk {what!r}: format {fmt} needs qemu-storage-daemon "
                            "(Debian package qemu-system-common)")
        if not os.path.isfile(image):
            raise DiskError(f"disk {what!r}: {image}: no such file")
        os.makedirs(run_dir, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="qsd-", suffix=".raw", dir=run_dir)
        os.close(fd)
        self.log_path = self.path + ".log"
        ro = "on" if readonly else "off"
        argv = [qsd,
                "--blockdev", f"driver=file,node-name=file0,filename={image},read-only={ro}",
                "--blockdev", f"driver={fmt},node-name=fmt0,file=file0,read-only={ro}",
                "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={self.path},"
                            f"writable={'off' if readonly else 'on'}"]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = open(self.log_path, "rb").read().decode(errors="replace").strip()
                self._cleanup()
                raise DiskError(f"disk {what!r}: qemu-storage-daemon failed: {msg}")
            if _is_mountpoint(self.path):
                return
            time.sleep(0.02)
        self.close()
        raise DiskError(f"disk {what!r}: qemu-storage-daemon did not export within {timeout}s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self.path, self.log_path):
            try:
                os.unlink(p)
            except OSError:
                pass


def _is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def open_disk(target: str, fmt: str, *, readonly: bool, run_dir: str,
              spec: str | None = None) -> tuple[DiskImage, QemuExport | None]:
    """Open ``target`` in format ``fmt`` ("raw" or one of QEMU_FORMATS)."""
    what = spec or target
    if fmt == "raw":
        return DiskImage(target, readonly=readonly, spec=spec), None
    if fmt not in QEMU_FORMATS:
        raise DiskError(f"disk {what!r}: unknown format {fmt!r}")
    exp = QemuExport(target, "vpc" if fmt == "vhd" else fmt, run_dir, readonly=readonly,
                     spec=spec)
    try:
        return DiskImage(exp.path, readonly=readonly, spec=spec), exp
    except DiskError:
        exp.close()
        raise
