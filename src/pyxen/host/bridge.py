"""Linux bridges for guest networking, driven over rtnetlink (pyroute2), never by running ``ip``.

Every function opens its own netlink socket in the *current* network namespace, so pyxen works
unchanged under ``ip netns exec NS``. Failures raise :class:`pyxen.errors.HostNetworkError`
naming the interface and the netlink error.

The default bridge is ``pyxenbr0`` with ``10.88.0.1/24``: the address is set only by the process
that creates the bridge, so an administrator's later changes survive, and two processes racing to
create it both succeed (the loser sees ``EEXIST`` and uses the winner's bridge). Bridges are made
with STP off and a forward delay of 0 so a new port forwards at once, as Xen's ``vif-bridge``
setups do, and with a random locally administered MAC of their own (see :func:`_random_mac`).
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import os

from typing import Any

from pyxen.errors import HostNetworkError

DEFAULT_BRIDGE = "pyxenbr0"
DEFAULT_ADDRESS = "10.88.0.1/24"
IFNAMSIZ = 16                          # including the NUL: names are at most 15 bytes


def validate_ifname(name: str) -> str:
    """Check ``name`` against the kernel's rules (``dev_valid_name``): 1..15 bytes, not ``.``
    or ``..``, no ``/``, ``:`` or whitespace. Returns it; raises HostNetworkError."""
    if not isinstance(name, str):
        raise HostNetworkError(repr(name), "interface name must be a string")
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or len(raw) >= IFNAMSIZ:
        raise HostNetworkError(name, f"interface name must be 1..{IFNAMSIZ - 1} bytes long")
    if name in (".", "..") or any(c in "/:" or c.isspace() or c == "\0" for c in name):
        raise HostNetworkError(name, "invalid interface name (no '/', ':', NUL or whitespace)")
    return name


def _pyroute2() -> tuple[Any, type[Exception]]:
    """``(IPRoute, NetlinkError)``, imported on first use: pyroute2 takes ~0.2 s to import and
    the sans-IO users of :mod:`pyxen.host.tap` (vnet header helpers) never need it."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    return IPRoute, NetlinkError


def _random_mac() -> str:
    """A random locally administered unicast MAC. Giving the bridge its own address at creation
    pins it: otherwise Linux re-derives the bridge MAC from the lowest port MAC each time a port
    comes or goes (and all vifs use fe:ff:ff:ff:ff:ff), flipping the neighbours' ARP caches."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _nlerr(ifname: str, action: str, exc: Exception) -> HostNetworkError:
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        return HostNetworkError(ifname, f"{action} failed: netlink error: {exc}")
    args = getattr(exc, "args", ())
    msg = args[1] if len(args) > 1 and isinstance(args[1], str) else os.strerror(code)
    name = _errno.errorcode.get(code, "?")
    return HostNetworkError(ifname, f"{action} failed: netlink error {name} ({code}): {msg}",
                            code)


def _lookup(ip: Any, name: str) -> int | None:
    found = ip.link_lookup(ifname=name)
    return found[0] if found else None


def _kind(ip: Any, index: int) -> str | None:
    msg = ip.link("get", index=index)[0]
    info = msg.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


def _index(ip: Any, name: str, what: str = "interface") -> int:
    index = _lookup(ip, name)
    if index is None:
        raise HostNetworkError(name, f"no such {what} in this network namespace", _errno.ENODEV)
    return index


def ifindex(name: str) -> int | None:
    """The interface index of ``name`` in the current namespace, or None if absent."""
    validate_ifname(name)
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ip:
        return _lookup(ip, name)


def bridge_exists(name: str = DEFAULT_BRIDGE) -> bool:
    """True if an interface called ``name`` exists here *and* is a Linux bridge."""
    validate_ifname(name)
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ip:
        index = _lookup(ip, name)
        if index is None:
            return False
        try:
            return _kind(ip, index) == "bridge"
        except NetlinkError as exc:
            if exc.code == _errno.ENODEV:          # deleted under us
                return False
            raise _nlerr(name, "query", exc) from None


def ensure_bridge(name: str = DEFAULT_BRIDGE, address: str | None = DEFAULT_ADDRESS) -> int:
    """Create bridge ``name`` if it is missing (assigning ``address``, CIDR form, only then),
    bring it up, and return its ifindex. Idempotent, and safe when processes race. Raises
    HostNetworkError if ``name`` exists but is not a bridge, or on any netlink failure."""
    validate_ifname(name)
    iface = None
    if address is not None:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError as exc:
            raise HostNetworkError(name, f"bad bridge address {address!r}: {exc}") from None
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ip:
        created = False
        index = _lookup(ip, name)
        if index is None:
            try:
                ip.link("add", ifname=name, kind="bridge", address=_random_mac(),
                        br_stp_state=0, br_forward_delay=0)
                created = True
            except NetlinkError as exc:
                if exc.code != _errno.EEXIST:      # EEXIST: another process won the race
                    raise _nlerr(name, "create bridge", exc) from None
            index = _index(ip, name, "bridge")
        try:
            kind = _kind(ip, index)
        except NetlinkError as exc:
            raise _nlerr(name, "query", exc) from None
        if kind != "bridge":
            raise HostNetworkError(name, f"exists but is not a bridge (kind {kind or 'none'})")
        if created and iface is not None:
            try:
                ip.addr("add", index=index, address=str(iface.ip),
                        prefixlen=iface.network.prefixlen)
            except NetlinkError as exc:
                if exc.code != _errno.EEXIST:
                    raise _nlerr(name, f"add address {iface}", exc) from None
        try:
            ip.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise _nlerr(name, "bring up", exc) from None
        return index


def attach(ifname: str, bridge: str = DEFAULT_BRIDGE) -> None:
    """Make ``ifname`` a port of ``bridge`` (both must exist; ``bridge`` must be a bridge)."""
    validate_ifname(ifname)
    validate_ifname(bridge)
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ip:
        port = _index(ip, ifname)
        master = _index(ip, bridge, "bridge")
        try:
            if _kind(ip, master) != "bridge":
                raise HostNetworkError(bridge, "is not a bridge; cannot attach " + ifname)
            ip.link("set", index=port, master=master)
        except NetlinkError as exc:
            raise _nlerr(ifname, f"attach to bridge {bridge}", exc) from None


def detach(ifname: str) -> None:
    """Remove ``ifname`` from whatever bridge it is a port of (no-op if it has none)."""
    validate_ifname(ifname)
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ip:
        port = _index(ip, ifname)
        try:
            ip.link("set", index=port, master=0)
        except NetlinkError as exc:
            raise _nlerr(ifname, "detach from bridge", exc) from None


def delete_bridge(name: str = DEFAULT_BRIDGE) -> bool:
    """Delete bridge ``name``; False if it did not exist. Refuses (HostNetworkError) to delete
    an interface that is not a bridge. Its ports are released, not deleted."""
    validate_ifname(name)
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ip:
        index = _lookup(ip, name)
        if index is None:
            return False
        try:
            kind = _kind(ip, index)
            if kind != "bridge":
                raise HostNetworkError(name, f"is not a bridge (kind {kind or 'none'}); "
                                       "refusing to delete it")
            ip.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == _errno.ENODEV:          # someone else deleted it first
                return False
            raise _nlerr(name, "delete bridge", exc) from None
        return True
