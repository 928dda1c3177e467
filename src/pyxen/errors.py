"""pyxen's one error hierarchy.

Every exception pyxen raises on purpose derives from :class:`PyxenError`. Errors are typed by
operation and turned into user-facing messages once, at the edge (CLI, API). A guest's bad input
never becomes one of these: it becomes a Xen errno returned to that guest (see
:class:`pyxen.xen.abi.errno.XenError`).

Hierarchy::

    PyxenError
     +-- ConfigError            a user-supplied setting is wrong (names file:line:key when known)
     +-- KernelImageError       a kernel file is not a PVH-capable ELF/bzImage (names the file)
     +-- EngineError            the CPU engine failed (ioctl error, emulation failure)
     |    +-- EngineUnavailable the requested engine cannot run on this host
     +-- DomainError            a domain operation failed
     +-- GuestBuildError        the in-tree test guests could not be built
     +-- ImageError             the guest image could not be fetched or built (names the step)
     +-- XenstoredUnavailable   the standalone xenstored cannot be reached or refused a domain
     +-- ToolstackError         a pyxend request failed (carries the HTTP status and message)
     +-- HostNetworkError       a host TAP/bridge operation failed (names the interface)
"""

from __future__ import annotations


class PyxenError(Exception):
    """Root of every error pyxen raises deliberately."""


class ConfigError(PyxenError):
    """A configuration value is wrong. ``where`` is ``file:line`` or a key name when known."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class KernelImageError(PyxenError):
    """A kernel (or initrd) file cannot be booted; the message names the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class EngineError(PyxenError):
    """The CPU engine failed: a host ioctl error or an instruction it cannot execute."""


class EngineUnavailable(EngineError):
    """The requested engine cannot run on this host (e.g. no /dev/kvm)."""


class DomainError(PyxenError):
    """A domain-level operation failed (bad state, missing resource)."""


class GuestBuildError(PyxenError):
    """The in-tree test guests could not be built (missing compiler, build failure)."""


class ImageError(PyxenError):
    """The guest image (kernel + initramfs) could not be fetched, built or read; names the step."""


class XenstoredUnavailable(PyxenError):
    """The standalone xenstored cannot be reached, or it refused to introduce a domain."""


class ToolstackError(PyxenError):
    """A toolstack (pyxend) request failed. ``status`` is the HTTP status it maps to; the
    message names the domain, key or value at fault."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class HostNetworkError(PyxenError):
    """A host-side network operation (TAP device, Linux bridge, netlink) failed. ``ifname``
    names the interface, ``errno`` is the kernel/netlink error number when there is one."""

    def __init__(self, ifname: str, message: str, errno: int | None = None) -> None:
        self.ifname = ifname
        self.errno = errno
        super().__init__(f"{ifname}: {message}")
