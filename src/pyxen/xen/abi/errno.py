"""Xen's errno values (xen/include/public/errno.h) and the exception hypercall handlers raise.

A handler raises :class:`XenError`; the dispatcher returns ``-errno`` to the guest. These are
*guest* errors: they never escape the hypercall layer.
"""

from __future__ import annotations

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
E2BIG = 7
EBADF = 9
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
EXDEV = 18
ENODEV = 19
EISDIR = 21
EINVAL = 22
ENOSPC = 28
ERANGE = 34
ENOSYS = 38
ENOTEMPTY = 39
ETIME = 62
EOPNOTSUPP = 95

NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int)}


class XenError(Exception):
    """A hypercall fails with Xen errno ``errno`` (returned to the guest as ``-errno``)."""

    def __init__(self, errno: int, why: str = "") -> None:
        super().__init__(f"{NAMES.get(errno, errno)}{': ' + why if why else ''}")
        self.errno = errno
        self.why = why
