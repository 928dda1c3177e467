"""Xenbus for backends: dom0's view of xenstore, and the backend half of the device handshake.

:class:`BackendBus` is what a backend needs from xenstore: reads and writes as dom0 and watches
whose callbacks run, one at a time, on the bus's own thread (as Linux's xenwatch thread runs
backend drivers' callbacks). Two implementations: :class:`SocketBus` talks to a standalone
xenstored (pyxend's domains), :class:`LocalBus` to an in-process :class:`XenstoreServer`
(``pyxen run``).

:class:`XenbusBackend` is the state machine of ``xenbus_dev_backend`` plus the common part of
Linux's blkback/netback ``frontend_changed`` (XenbusState values from io/xenbus.h)::

    Initialising -> InitWait      probe(): the backend writes its feature keys
    frontend Initialised/Connected -> connect(): map rings, bind ports -> Connected
    frontend Closing -> Closing;  frontend Closed -> disconnect() -> Closed
    frontend Initialising again (after Closed) -> InitWait (reconnect)

Subclasses implement :meth:`probe`, :meth:`connect` and :meth:`disconnect`. All transitions
happen on the bus thread or under the device lock.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
from typing import Callable, Iterable, Protocol

from pyxen.xenstore.client import XenstoreClient
from pyxen.xenstore.server import XenstoreServer
from pyxen.xenstore.store import XenstoreError
from pyxen.xenstore.wire import (XS_UNWATCH, XS_WATCH, XS_WATCH_EVENT, Message, MessageParser,
                                 ProtocolError, join_strings, pack, split_strings)

log = logging.getLogger("pyxen.backends")

UNKNOWN, INITIALISING, INITWAIT, INITIALISED, CONNECTED, CLOSING, CLOSED, RECONFIGURING, \
    RECONFIGURED = range(9)
STATE_NAMES = ("Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing",
               "Closed", "Reconfiguring", "Reconfigured")

WatchCallback = Callable[[str], None]


class BackendBus(Protocol):
    """Dom0 xenstore access for backends; raises XenstoreError (and ConnectionError for a
    socket bus whose xenstored is gone for good)."""

    def read(self, path: str) -> bytes: ...
    def try_read(self, path: str) -> bytes | None: ...
    def write(self, path: str, value: bytes | str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rm(self, path: str) -> None: ...
    def set_perms(self, path: str, perms: Iterable[str]) -> None: ...
    def directory(self, path: str) -> list[str]: ...
    def watch(self, path: str, callback: WatchCallback) -> str: ...
    def unwatch(self, token: str) -> None: ...
    def call_soon(self, fn: Callable[[], None]) -> None: ...
    def close(self) -> None: ...


class _Dispatcher:
    """The bus thread: runs watch callbacks and queued calls in order."""

    def __init__(self, name: str) -> None:
        self.callbacks: dict[str, tuple[str, WatchCallback]] = {}
        self._q: queue.Queue[tuple[str, str] | Callable[[], None] | None] = queue.Queue()
        self._tokens = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def new_token(self) -> str:
        return f"pyxen-be-{next(self._tokens)}"

    def event(self, path: str, token: str) -> None:
        self._q.put((path, token))

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                if callable(item):
                    item()
                else:
                    path, token = item
                    entry = self.callbacks.get(token)
                    if entry is not None:
                        entry[1](path)
            except Exception:
                log.exception("xenbus: backend callback failed")

    def stop(self) -> None:
        self._q.put(None)
        if not self.on_thread():
            self._thread.join(timeout=5)


class LocalBus:
    """A :class:`BackendBus` over an in-process :class:`XenstoreServer` (acting as dom0)."""

    def __init__(self, server: XenstoreServer) -> None:
        self.server = server
        self._disp = _Dispatcher("xenbus-local")
        self._conn = server.connect(0, on_output=self._output)
        self._req_id = itertools.count(1)

    def _output(self) -> None:
        for m in self._conn.outgoing():
            if m.type == XS_WATCH_EVENT:
                parts = split_strings(m.payload)
                if len(parts) >= 2:
                    self._disp.event(parts[0].decode(), parts[1].decode())

    def read(self, path: str) -> bytes:
        return self.server.read(path)

    def try_read(self, path: str) -> bytes | None:
        try:
            return self.server.read(path)
        except XenstoreError as e:
            if e.name == "ENOENT":
                return None
            raise

    def write(self, path: str, value: bytes | str) -> None:
        self.server.write(path, value)

    def mkdir(self, path: str) -> None:
        self.server.mkdir(path)

    def rm(self, path: str) -> None:
        self.server.rm(path)

    def set_perms(self, path: str, perms: Iterable[str]) -> None:
        self.server.set_perms(path, perms)

    def directory(self, path: str) -> list[str]:
        return self.server.directory(path)

    def watch(self, path: str, callback: WatchCallback) -> str:
        token = self._disp.new_token()
        self._disp.callbacks[token] = (path, callback)
        self._conn.handle(Message(XS_WATCH, next(self._req_id), 0, join_strings(path, token)))
        return token

    def unwatch(self, token: str) -> None:
        entry = self._disp.callbacks.pop(token, None)
        if entry is not None:
            self._conn.handle(Message(XS_UNWATCH, next(self._req_id), 0,
                                      join_strings(entry[0], token)))

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._disp.call_soon(fn)

    def close(self) -> None:
        self._conn.close()
        self._disp.stop()


class SocketBus:
    """A :class:`BackendBus` over a standalone xenstored's unix socket.

    Requests use one connection (serialised by a lock); watches another, read by a thread
    that feeds the dispatcher. If xenstored restarts, both reconnect and every watch is
    registered again -- which fires it, so devices re-read the state they watch.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._client = XenstoreClient(path)
        self._disp = _Dispatcher("xenbus-socket")
        self._wlock = threading.Lock()
        self._closed = False
        self._wsock = self._connect_watch()
        self._reader = threading.Thread(target=self._read_watches, name="xenbus-watch",
                                        daemon=True)
        self._reader.start()

    # --- requests
    def _call(self, fn: Callable[[XenstoreClient], object]) -> object:
        with self._lock:
            for attempt in (0, 1, 2, 3, 4):
                try:
                    return fn(self._client)
                except (ConnectionError, OSError):
                    if self._closed or attempt == 4:
                        raise
                    self._client.close()
                    threading.Event().wait(0.2 * (attempt + 1))
                    try:
                        self._client = XenstoreClient(self.path)
                    except OSError:
                        continue
        raise ConnectionError(f"xenstored at {self.path} unreachable")

    def read(self, path: str) -> bytes:
        return self._call(lambda c: c.read(path))  # type: ignore[return-value]

    def try_read(self, path: str) -> bytes | None:
        return self._call(lambda c: c.try_read(path))  # type: ignore[return-value]

    def write(self, path: str, value: bytes | str) -> None:
        self._call(lambda c: c.write(path, value))

    def mkdir(self, path: str) -> None:
        self._call(lambda c: c.mkdir(path))

    def rm(self, path: str) -> None:
        self._call(lambda c: c.rm(path))

    def set_perms(self, path: str, perms: Iterable[str]) -> None:
        p = list(perms)
        self._call(lambda c: c.set_perms(path, p))

    def directory(self, path: str) -> list[str]:
        return self._call(lambda c: c.directory(path))  # type: ignore[return-value]

    # --- watches
    def _connect_watch(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        return s

    def _send_watch(self, path: str, token: str) -> None:
        data = pack(Message(XS_WATCH, 0, 0, join_strings(path, token)))
        with self._wlock:
            try:
                self._wsock.sendall(data)
            except OSError:
                pass                     # the reader reconnects and registers it again

    def watch(self, path: str, callback: WatchCallback) -> str:
        token = self._disp.new_token()
        self._disp.callbacks[token] = (path, callback)
        self._send_watch(path, token)
        return token

    def unwatch(self, token: str) -> None:
        entry = self._disp.callbacks.pop(token, None)
        if entry is None:
            return
        data = pack(Message(XS_UNWATCH, 0, 0, join_strings(entry[0], token)))
        with self._wlock:
            try:
                self._wsock.sendall(data)
            except OSError:
                pass

    def _read_watches(self) -> None:
        parser = MessageParser()
        while not self._closed:
            try:
                data = self._wsock.recv(65536)
            except OSError:
                data = b""
            if data:
                try:
                    msgs = parser.feed(data)
                except ProtocolError:
                    msgs = []
                    data = b""
                for m in msgs:
                    if m.type == XS_WATCH_EVENT:
                        parts = split_strings(m.payload)
                        if len(parts) >= 2:
                            self._disp.event(parts[0].decode("ascii", "replace"),
                                             parts[1].decode("ascii", "replace"))
                if data:
                    continue
            if self._closed:
                return
            log.warning("xenbus: xenstored at %s went away; reconnecting watches", self.path)
            parser = MessageParser()
            while not self._closed:
                try:
                    s = self._connect_watch()
                    break
                except OSError:
                    threading.Event().wait(0.25)
            else:
                return
            with self._wlock:
                self._wsock.close()
                self._wsock = s
            for token, (path, _cb) in list(self._disp.callbacks.items()):
                self._send_watch(path, token)

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._disp.call_soon(fn)

    def close(self) -> None:
        self._closed = True
        try:
            self._wsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._wsock.close()
        self._client.close()
        self._disp.stop()


class DeviceError(Exception):
    """The frontend's configuration cannot be used (bad ring ref, unsupported protocol...).
    The backend reports it (``error`` node), moves to Closing and serves nothing."""


def backend_path(kind: str, domid: int, devid: int) -> str:
    return f"/local/domain/0/backend/{kind}/{domid}/{devid}"


def frontend_path(kind: str, domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/{kind}/{devid}"


class XenbusBackend:
    """Dom0's end of device ``kind``/``devid`` of domain ``domid`` (see module docstring).

    The toolstack has written both directories (state Initialising) before :meth:`start`.
    """

    kind = ""

    def __init__(self, bus: BackendBus, domid: int, devid: int) -> None:
        self.bus = bus
        self.domid = domid
        self.devid = devid
        self.be = backend_path(self.kind, domid, devid)
        self.fe = frontend_path(self.kind, domid, devid)
        self.state = INITIALISING
        self.connected = False
        self.lock = threading.RLock()
        self.closed_event = threading.Event()
        self._token: str | None = None
        self.removing = False

    # --- hooks
    def probe(self) -> None:
        """Write the backend's feature keys (before InitWait)."""

    def connect(self) -> None:
        """Read the frontend's ring details and start serving; raise DeviceError."""

    def disconnect(self) -> None:
        """Stop serving and release rings and ports (idempotent)."""

    # --- machinery
    def start(self, reattach: bool = False) -> None:
        """Probe and wait for the frontend. With ``reattach`` (a restarted backend taking
        over a device another instance served): if the backend node says Connected and the
        frontend is connected, attach to the frontend's existing rings and ports straight
        away -- the ring state is all in the shared pages -- so the frontend carries on
        without noticing; otherwise the normal handshake."""
        with self.lock:
            self.probe()
            be_state = self.bus.try_read(f"{self.be}/state")
            if (reattach and be_state == str(CONNECTED).encode()
                    and self.frontend_state() in (INITIALISED, CONNECTED)):
                try:
                    self.connect()
                    self.connected = True
                    self.state = CONNECTED
                except DeviceError as e:
                    self.fatal(f"reattach: {e}")
            else:
                self.switch(INITWAIT)
        self._token = self.bus.watch(f"{self.fe}/state", self._frontend_changed)

    def switch(self, state: int) -> None:
        if state == self.state:
            return
        self.state = state
        if state == CLOSED:
            self.closed_event.set()
        elif state != CLOSING:
            self.closed_event.clear()
        try:
            self.bus.write(f"{self.be}/state", str(state))
        except XenstoreError as e:
            log.warning("d%d %s/%d: cannot write state %s: %s", self.domid, self.kind,
                        self.devid, STATE_NAMES[state], e)

    def frontend_state(self) -> int:
        raw = self.bus.try_read(f"{self.fe}/state")
        try:
            return int(raw) if raw is not None else UNKNOWN
        except ValueError:
            return UNKNOWN

    def read_fe(self, key: str, default: str | None = None) -> str | None:
        raw = self.bus.try_read(f"{self.fe}/{key}")
        return default if raw is None else raw.decode("ascii", "replace")

    def read_fe_int(self, key: str, default: int | None = None) -> int:
        raw = self.read_fe(key)
        if raw is None:
            if default is None:
                raise DeviceError(f"frontend did not write {key}")
            return default
        try:
            return int(raw, 0)
        except ValueError:
            raise DeviceError(f"frontend's {key} = {raw!r} is not a number") from None

    def _frontend_changed(self, _path: str = "") -> None:
        with self.lock:
            fs = self.frontend_state()
            log.debug("d%d %s/%d: frontend %s, backend %s", self.domid, self.kind, self.devid,
                      STATE_NAMES[fs] if fs < 9 else fs, STATE_NAMES[self.state])
            if fs == INITIALISING:
                if self.state == CLOSED and not self.removing:
                    self.switch(INITWAIT)
            elif fs in (INITIALISED, CONNECTED):
                if self.state == CONNECTED or self.removing or self.state == CLOSING:
                    return
                self._do_disconnect()
                try:
                    self.connect()
                    self.connected = True
                except DeviceError as e:
                    self.fatal(str(e))
                    return
                self.switch(CONNECTED)
            elif fs == CLOSING:
                self.switch(CLOSING)
            elif fs in (CLOSED, UNKNOWN):
                self._do_disconnect()
                self.switch(CLOSED)

    def _do_disconnect(self) -> None:
        self.connected = False
        self.disconnect()

    def fatal(self, why: str) -> None:
        """xenbus_dev_fatal: report, stop serving, ask the frontend to close."""
        log.warning("d%d %s/%d: %s", self.domid, self.kind, self.devid, why)
        try:
            self.bus.write(f"{self.be}/error", why)
        except XenstoreError:
            pass
        self._do_disconnect()
        self.switch(CLOSING)

    def request_close(self) -> None:
        """The toolstack wants the device gone: Closing (online=0); the frontend answers
        with Closed, and so do we (then :attr:`closed_event` is set)."""
        with self.lock:
            self.removing = True
            try:
                self.bus.write(f"{self.be}/online", "0")
            except XenstoreError:
                pass
            if self.frontend_state() in (CLOSED, UNKNOWN, INITIALISING, INITWAIT):
                self._do_disconnect()
                self.switch(CLOSED)
            else:
                self.switch(CLOSING)

    def stop(self) -> None:
        """Stop watching and serving (device removal or domain destruction)."""
        if self._token is not None:
            self.bus.unwatch(self._token)
            self._token = None
        with self.lock:
            self._do_disconnect()
