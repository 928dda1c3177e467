"""Connect a domain's store ring to a standalone xenstored (the ``xs_introduce_domain`` step).

The VMM owns the guest's memory and event channels; xenstored runs in its own process. This
module hands xenstored what it needs to serve the ring itself, as Xen's xenstored maps the
page and binds the event channel:

* the domain's memfd, with the store page's index in it as the INTRODUCE ``mfn``;
* ``kick``, an eventfd the VMM signals whenever the guest notifies its store port;
* ``notify``, an eventfd xenstored signals to raise the guest's store port; a thread here
  turns each signal into ``set_pending`` on the port.

The link keeps its introducing connection open. When xenstored goes away (a restart), it
reconnects and introduces the domain again with the same descriptors; xenstored restores the
store from its state file and the domain's watches with it, so the guest carries on.

Owner: the domain builder creates one per domain; :meth:`close` stops the threads and closes
the descriptors (xenstored keeps its own copies until XS_RELEASE).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pyxen.core.memory import PAGE, GuestMemory
from pyxen.xenstore.client import XenstoreClient
from pyxen.xenstore.store import XenstoreError

log = logging.getLogger("pyxen.vmm")


class StoreLink:
    """The store ring of domain ``domid`` at guest frame ``gfn``, port ``port``, served by
    the xenstored at ``path``. ``set_pending(port)`` raises the guest's port (any thread)."""

    def __init__(self, path: str, domid: int, memory: GuestMemory, gfn: int, port: int,
                 set_pending) -> None:  # type: ignore[no-untyped-def]
        region = memory.find(gfn * PAGE)
        if region is None:
            raise ValueError(f"store page 0x{gfn:x} is not guest memory")
        self.path = path
        self.domid = domid
        self.port = port
        self.mfn = (region.offset + gfn * PAGE - region.gpa) // PAGE
        self._memfd = memory.fd
        self._set_pending = set_pending
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.notify_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._closed = False
        self._client: XenstoreClient | None = None
        self._thread = threading.Thread(target=self._pump, name=f"xs-notify-d{domid}",
                                        daemon=True)
        self._thread.start()

    def guest_notified(self, _port: int = 0) -> None:
        """Event-channel backend for the store port: pass the notification to xenstored."""
        try:
            os.eventfd_write(self.kick_fd, 1)
        except OSError:
            pass

    def introduce(self, client: XenstoreClient) -> None:
        """XS_INTRODUCE with the descriptors on ``client``, which the link then owns: it stays
        open so that a xenstored restart is noticed (and the domain introduced again)."""
        self._introduce_on(client)
        self._client = client
        threading.Thread(target=self._supervise, name=f"xs-link-d{self.domid}",
                         daemon=True).start()

    def _introduce_on(self, client: XenstoreClient) -> None:
        client.introduce(self.domid, self.mfn, self.port,
                         fds=(self._memfd, self.kick_fd, self.notify_fd))

    def _supervise(self) -> None:
        while not self._closed:
            try:
                self._client.sock.settimeout(None)
                while self._client.sock.recv(4096):
                    pass                               # nothing is expected; EOF = restart
            except OSError:
                pass
            self._client.close()
            if self._closed:
                return
            log.warning("d%d: xenstored at %s went away; re-introducing the domain",
                        self.domid, self.path)
            while not self._closed:
                try:
                    client = XenstoreClient(self.path, timeout=5)
                except OSError:
                    time.sleep(0.25)
                    continue
                try:
                    self._introduce_on(client)
                except (OSError, ConnectionError, XenstoreError) as e:
                    log.warning("d%d: re-introduction failed: %s", self.domid, e)
                    client.close()
                    time.sleep(0.25)
                    continue
                self._client = client
                self.guest_notified()                 # requests written meanwhile
                break

    def _pump(self) -> None:
        while True:
            try:
                os.eventfd_read(self.notify_fd)
            except OSError:
                return
            if self._closed:
                return
            self._set_pending(self.port)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            try:
                self._client.sock.shutdown(2)
            except OSError:
                pass
        try:
            os.eventfd_write(self.notify_fd, 1)
        except OSError:
            pass
        self._thread.join(timeout=2)
        os.close(self.kick_fd)
        os.close(self.notify_fd)
