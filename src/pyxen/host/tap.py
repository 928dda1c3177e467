"""Host TAP devices (the ``vif<domid>.<devid>`` of Xen) carrying virtio-net headers.

A :class:`Tap` opens ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, so every
frame read or written is preceded by a virtio-net header that carries checksum and GSO offload
state: the netif backend maps Xen's ``NETTXF_csum_blank``/GSO extras onto it and back, and the
kernel does the checksumming and segmentation.

Header size: **12 bytes** (``TUNSETVNETHDRSZ`` = 12), i.e. ``struct virtio_net_hdr_v1`` /
``virtio_net_hdr_mrg_rxbuf``: the classic 10-byte header plus ``num_buffers`` (always 0 here,
ignored by TAP). Fields are little-endian (virtio 1.0 byte order; also the native order of the
x86 hosts pyxen runs on, so no ``TUNSETVNETLE`` is needed).

Offloads (``TUNSETOFFLOAD``) say which packets the kernel may hand *us*: by default
``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`` - partial checksums and TCP super-frames, both of which
netfront understands (``NETRXF_csum_blank`` and ``XEN_NETIF_GSO_TYPE_TCPV4/6``). UFO/USO are
*not* enabled: Xen's netif has no UDP GSO type, so such frames could not be passed to a guest.
TSO_ECN is not enabled either (netif has no ECN GSO feature). Narrow the set with
:meth:`Tap.set_offload` when the frontend does not advertise ``feature-gso-tcpv4/6``. Writes are
not limited by these flags: the kernel accepts any valid header on frames we write.

The device is non-persistent: it disappears (and leaves its bridge) when the fd is closed. Name,
MAC, MTU and link state are set over rtnetlink in the current network namespace.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

from pyxen.errors import HostNetworkError
from pyxen.host.bridge import _nlerr, _pyroute2, validate_ifname

# --- <linux/if_tun.h> ------------------------------------------------------------------------
TUNSETIFF = 0x400454CA          # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0      # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2          # _IOR('T', 210, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8    # _IOW('T', 216, int)
IFF_TUN, IFF_TAP, IFF_MULTI_QUEUE = 0x0001, 0x0002, 0x0100
IFF_NO_PI, IFF_VNET_HDR = 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_F_UFO, TUN_F_USO4, TUN_F_USO6 = 0x10, 0x20, 0x40
DEFAULT_OFFLOAD = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

# --- <linux/virtio_net.h> --------------------------------------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

VNET_HDR_LEN = 12
_VNET = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                                    # num_buffers
XEN_BACKEND_MAC = "fe:ff:ff:ff:ff:ff"   # what Xen's vif scripts give the backend vif
MAX_FRAME = VNET_HDR_LEN + 65535 + 18   # largest read: header + 64 KiB GSO frame + L2 header


class VnetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


def pack_vnet_hdr(flags: int = 0, gso_type: int = VIRTIO_NET_HDR_GSO_NONE, hdr_len: int = 0,
                  gso_size: int = 0, csum_start: int = 0, csum_offset: int = 0) -> bytes:
    """The 12-byte little-endian virtio-net header (``num_buffers`` = 0)."""
    return _VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


def unpack_vnet_hdr(data: bytes | bytearray | memoryview) -> VnetHdr:
    """Parse the first 10 bytes of a virtio-net header (the 12-byte form's ``num_buffers`` is
    ignored). Raises ValueError if fewer than 10 bytes are given."""
    if len(data) < 10:
        raise ValueError(f"virtio-net header needs 10 bytes, got {len(data)}")
    return VnetHdr(*struct.unpack_from("<BBHHHH", data, 0))


def _parse_mac(mac: str) -> str:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        raise HostNetworkError(mac, "bad MAC address (want xx:xx:xx:xx:xx:xx)")
    if int(parts[0], 16) & 1:
        raise HostNetworkError(mac, "MAC address is multicast")
    return mac.lower()


class Tap:
    """One host TAP device with a 12-byte virtio-net header on every frame.

    ``Tap("vif3.0")`` creates the device (refusing a name that already exists), sets the vnet
    header size and offloads, makes the fd non-blocking, sets ``mac``/``mtu`` and brings the link
    up. Attach it to a bridge with :func:`pyxen.host.bridge.attach`. ``close()`` (or leaving a
    ``with`` block) deletes it.
    """

    def __init__(self, name: str, *, mtu: int = 1500, mac: str = XEN_BACKEND_MAC,
                 offload: int = DEFAULT_OFFLOAD, up: bool = True) -> None:
        validate_ifname(name)
        mac = _parse_mac(mac)
        if not 68 <= mtu <= 65535:
            raise HostNetworkError(name, f"MTU {mtu} out of range 68..65535")
        self._fd = -1
        self._name = name
        self._ifindex = 0
        IPRoute, NetlinkError = _pyroute2()
        with IPRoute() as ip:
            if ip.link_lookup(ifname=name):
                # TUNSETIFF would attach to an existing persistent TAP: never take over a
                # device someone else made.
                raise HostNetworkError(name, "interface already exists", _errno.EEXIST)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise HostNetworkError(name, f"cannot open /dev/net/tun: {exc.strerror}",
                                   exc.errno) from None
        self._fd = fd
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                res = fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as exc:
                raise HostNetworkError(name, f"TUNSETIFF failed: {exc.strerror}",
                                       exc.errno) from None
            got = res[:16].split(b"\0", 1)[0].decode()
            if got != name:                          # cannot happen for a valid explicit name
                raise HostNetworkError(name, f"kernel named the TAP {got!r}")
            self._ioctl(TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN), "TUNSETVNETHDRSZ")
            self.set_offload(offload)
            with IPRoute() as ip:
                found = ip.link_lookup(ifname=name)
                if not found:
                    raise HostNetworkError(name, "TAP vanished right after creation",
                                           _errno.ENODEV)
                self._ifindex = found[0]
                try:
                    ip.link("set", index=self._ifindex, address=mac, mtu=mtu)
                    if up:
                        ip.link("set", index=self._ifindex, state="up")
                except NetlinkError as exc:
                    raise _nlerr(name, "configure TAP", exc) from None
        except BaseException:
            self.close()
            raise

    def _ioctl(self, request: int, arg: bytes | int, what: str) -> bytes | int:
        try:
            return fcntl.ioctl(self._check_open(), request, arg)
        except OSError as exc:
            raise HostNetworkError(self._name, f"{what} failed: {exc.strerror}",
                                   exc.errno) from None

    def _check_open(self) -> int:
        if self._fd < 0:
            raise HostNetworkError(self._name, "TAP is closed", _errno.EBADF)
        return self._fd

    # --- properties ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def fd(self) -> int:
        """The non-blocking TAP fd (-1 once closed); poll it for readability."""
        return self._fd

    @property
    def ifindex(self) -> int:
        return self._ifindex

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._check_open()

    # --- configuration ------------------------------------------------------------------
    def set_offload(self, flags: int) -> None:
        """Set which offloaded frames the kernel may give us (``TUN_F_*``; see module doc).
        ``TUN_F_TSO*`` requires ``TUN_F_CSUM``."""
        if flags & ~(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
                     | TUN_F_USO4 | TUN_F_USO6):
            raise HostNetworkError(self._name, f"unknown offload flags {flags:#x}")
        self._ioctl(TUNSETOFFLOAD, flags, "TUNSETOFFLOAD")

    def set_link(self, *, up: bool | None = None, mtu: int | None = None) -> None:
        """Change link state and/or MTU over rtnetlink."""
        attrs: dict[str, object] = {}
        if mtu is not None:
            attrs["mtu"] = mtu
        if up is not None:
            attrs["state"] = "up" if up else "down"
        if not attrs:
            return
        self._check_open()
        IPRoute, NetlinkError = _pyroute2()
        with IPRoute() as ip:
            try:
                ip.link("set", index=self._ifindex, **attrs)
            except NetlinkError as exc:
                raise _nlerr(self._name, "set link", exc) from None

    # --- data path ----------------------------------------------------------------------
    def read(self, buf: bytearray | memoryview) -> int:
        """Read one frame (12-byte vnet header + Ethernet frame) into ``buf``; returns its
        length, or 0 when none is queued (a frame is never shorter than the header). Size
        ``buf`` to :data:`MAX_FRAME` when TSO is on. Raises HostNetworkError if closed."""
        return self.readv((buf,))

    def readv(self, buffers: Sequence[bytearray | memoryview]) -> int:
        """Scatter one frame over ``buffers`` (e.g. a 12-byte header buffer then a data
        buffer); returns bytes read, 0 if none is queued."""
        fd = self._check_open()
        try:
            return os.readv(fd, buffers)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno == _errno.EINTR:
                return 0
            raise HostNetworkError(self._name, f"read failed: {exc.strerror}",
                                   exc.errno) from None

    def writev(self, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        """Send one frame given as pieces (vnet header first, then the Ethernet frame);
        returns bytes written, or ``-errno`` when the kernel refused or dropped this frame
        (``EINVAL`` bad header/GSO, ``EIO`` link down, ``EAGAIN``, ``ENOBUFS``, ``ENOMEM``,
        ``EFAULT``) - a guest's bad packet is not a host error. Raises HostNetworkError only
        if the TAP itself is unusable (closed, ``EBADF``)."""
        fd = self._check_open()
        try:
            return os.writev(fd, buffers)
        except OSError as exc:
            if exc.errno in (_errno.EBADF, _errno.ENODEV, _errno.EBADFD):
                raise HostNetworkError(self._name, f"write failed: {exc.strerror}",
                                       exc.errno) from None
            return -(exc.errno or _errno.EIO)

    def write(self, frame: bytes | bytearray | memoryview) -> int:
        """``writev((frame,))`` for a frame that already starts with its vnet header."""
        return self.writev((frame,))

    # --- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd, which deletes the (non-persistent) device. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"Tap({self._name!r}, ifindex={self._ifindex}, {state})"
