"""Client side of a VMM process's control socket (protocol in :mod:`pyxen.vmm.process`).

:class:`VmmControl` sends one request at a time and returns the reply dict; a reply with
``ok: false`` raises :class:`~pyxen.errors.ToolstackError`. :meth:`VmmControl.events` turns a
connection into a ``subscribe`` stream. Blocking; one owner per object.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

from pyxen.errors import ToolstackError


class VmmGone(ToolstackError):
    """The VMM process is not reachable (it exited, or its socket is gone)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 410)


class VmmControl:
    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise VmmGone(f"VMM control socket {path}: {e.strerror or e}") from None
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VmmControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> dict:
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise VmmGone(f"VMM at {self.path}: {e}") from None
            if not data:
                raise VmmGone(f"VMM at {self.path} closed the connection")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def call(self, op: str, **args: object) -> dict:
        return self.request({"op": op, **args})

    def request(self, req: dict, error_status: int = 409) -> dict:
        """Send ``req`` (a dict with ``op``) as is; an ``ok: false`` reply raises
        ToolstackError(error, ``error_status``). Needed when an argument is called
        ``timeout`` (``device_remove``), which :meth:`call`'s callers use for the socket."""
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise VmmGone(f"VMM at {self.path}: {e}") from None
        reply = self._line()
        if not reply.get("ok"):
            raise ToolstackError(str(reply.get("error", "VMM request failed")), error_status)
        return reply

    def events(self) -> Iterator[dict]:
        """``subscribe``, then yield the current state and every later event until the VMM
        exits (the stream ends: StopIteration, or VmmGone on an abrupt close)."""
        yield self.call("subscribe")
        self.sock.settimeout(None)
        while True:
            ev = self._line()
            yield ev
            if ev.get("event") == "destroyed":
                return


def vmm_call(path: str, op: str, timeout: float = 10.0, **args: object) -> dict:
    """One request on a fresh connection."""
    with VmmControl(path, timeout) as c:
        return c.call(op, **args)


def vmm_request(path: str, req: dict, timeout: float = 10.0, error_status: int = 409) -> dict:
    """:meth:`VmmControl.request` on a fresh connection; ``timeout`` is the socket's (a
    deferred op such as ``device_add`` may take seconds before it answers)."""
    with VmmControl(path, timeout) as c:
        return c.request(req, error_status)
