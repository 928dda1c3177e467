"""Two pyxen "hosts" on one machine, for migration tests and the migrate-pair example.

Each host is a network namespace with its own bridge ``pyxenbr0`` and its own pyxen
installation (run/state/log directories, xenstored, pyxend with a relocation service on
its bridge address); a veth pair joins the two bridges into one Ethernet segment, as two
machines on one switch::

    ns A: pyxenbr0 10.88.0.1/24 --- vethA ==== vethB --- pyxenbr0 10.88.0.2/24 :ns B

Guests on either host are reachable from both namespaces at their own address in 10.88.0.0/24.
Everything is created with ``ip`` and removed by :meth:`HostPair.close` (deleting a namespace
deletes its devices). Root only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pyxen.testing.toolstack import PyxenHost

RELOCATION_PORT = 8002
SUBNET_PREFIX = "10.88.0."


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetnsHost(PyxenHost):
    """A :class:`PyxenHost` whose commands (and hence its pyxend, xenstored and VMMs) run in
    network namespace ``ns``; its relocation service listens on ``address``."""

    def __init__(self, base: str, ns: str, address: str, first_domid: int | None = None) -> None:
        super().__init__(base, first_domid)
        self.ns = ns
        self.prefix = ("ip", "netns", "exec", ns)
        self.address = address
        self.env["PYXEN_RELOCATION"] = f"{address}:{RELOCATION_PORT}"

    def run(self, *argv: str, **kw: object) -> subprocess.CompletedProcess:
        """Run a command in this host's namespace."""
        return subprocess.run([*self.prefix, *argv], **kw)  # type: ignore[call-overload]

    def popen(self, *argv: str, **kw: object) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix, *argv], **kw)  # type: ignore[call-overload]


class HostPair:
    """Hosts ``a`` and ``b`` (see the module docstring) under directory ``base``. ``tag``
    makes the namespace and veth names unique (default: this process's ID)."""

    def __init__(self, base: str, tag: str | None = None, first_domid: int = 1) -> None:
        tag = tag or str(os.getpid())
        self.ns = (f"pxa{tag}", f"pxb{tag}")
        self.veth = (f"pxva{tag}"[:15], f"pxvb{tag}"[:15])
        self.base = base
        self.a = NetnsHost(f"{base}/a", self.ns[0], SUBNET_PREFIX + "1", first_domid)
        self.b = NetnsHost(f"{base}/b", self.ns[1], SUBNET_PREFIX + "2", first_domid)
        self._made = False

    def setup(self) -> HostPair:
        a, b = self.ns
        va, vb = self.veth
        self._made = True
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, veth, addr in ((a, va, self.a.address), (b, vb, self.b.address)):
            for cmd in (("link", "set", "lo", "up"),
                        ("link", "add", "pyxenbr0", "type", "bridge"),
                        ("link", "set", "pyxenbr0", "type", "bridge", "forward_delay", "0"),
                        ("addr", "add", f"{addr}/24", "dev", "pyxenbr0"),
                        ("link", "set", veth, "master", "pyxenbr0"),
                        ("link", "set", veth, "up"),
                        ("link", "set", "pyxenbr0", "up")):
                _ip("-n", ns, *cmd)
        for h in (self.a, self.b):
            Path(h.base).mkdir(parents=True, exist_ok=True)
            h.px("list")                 # starts the host's pyxend (and its relocation port)
        return self

    def close(self) -> None:
        for h in (self.a, self.b):
            try:
                h.stop()
            except Exception:                              # noqa: BLE001 (clean-up)
                pass
        if self._made:
            for ns in self.ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            self._made = False

    def __enter__(self) -> HostPair:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.close()
