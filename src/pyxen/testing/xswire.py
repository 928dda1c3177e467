"""A raw, synchronous xs_wire client for tests that drive xenstored over its unix socket.

Unlike :class:`pyxen.xenstore.client.XenstoreClient` it exposes every wire detail a test
checks: any message type, tx_id and raw bytes may be sent, replies come back as
:class:`~pyxen.xenstore.wire.Message`, error names are returned instead of raised, and watch
events are set aside in :attr:`XsWireClient.events` as ``(path, token)`` bytes. Replies are
matched by req_id (xenstored answers in order).
"""

from __future__ import annotations

import socket
import time
from collections import deque
from pathlib import Path

from pyxen.xenstore import wire as W
from pyxen.xenstore.wire import Message, MessageParser, pack


class Closed(Exception):
    """The daemon closed the connection."""


class XsWireClient:
    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.parser = MessageParser()
        self.replies: deque[Message] = deque()
        self.events: list[tuple[bytes, bytes]] = []
        self.req_id = 0

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, typ: int, payload: bytes = b"", tx: int = 0) -> int:
        self.req_id += 1
        self.raw(pack(Message(typ, self.req_id, tx, payload)))
        return self.req_id

    def pump(self) -> None:
        """Receive once; sort what arrived into replies and watch events."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise Closed()
        for m in self.parser.feed(data):
            if m.type == W.XS_WATCH_EVENT:
                assert (m.req_id, m.tx_id) == (0, 0), m
                parts = W.split_strings(m.payload)
                assert len(parts) == 2 and m.payload.endswith(b"\0"), m
                self.events.append((parts[0], parts[1]))
            else:
                self.replies.append(m)

    def reply(self, req_id: int) -> Message:
        while not self.replies:
            self.pump()
        m = self.replies.popleft()
        assert m.req_id == req_id, (m, req_id)
        return m

    def call(self, typ: int, payload: bytes = b"", tx: int = 0) -> Message:
        m = self.reply(self.send(typ, payload, tx))
        assert m.tx_id == tx, m
        return m

    def ok(self, typ: int, payload: bytes = b"", tx: int = 0) -> bytes:
        """The reply payload; asserts the request succeeded."""
        m = self.call(typ, payload, tx)
        assert m.type == typ, (W.TYPE_NAMES.get(typ, typ), payload[:80], m)
        return m.payload

    def err(self, typ: int, payload: bytes = b"", tx: int = 0) -> str:
        """The error name; asserts the request failed."""
        m = self.call(typ, payload, tx)
        assert m.type == W.XS_ERROR and m.payload.endswith(b"\0"), (payload[:80], m)
        return m.payload[:-1].decode()

    def sync(self) -> list[tuple[bytes, bytes]]:
        """A round trip; afterwards every event queued for us before it has arrived.
        Returns (and clears) the events collected so far."""
        assert self.ok(W.XS_GET_DOMAIN_PATH, W.join_strings("0")) == \
            W.join_strings("/local/domain/0")
        ev, self.events = self.events, []
        return ev

    def expect_closed(self, timeout: float = 10.0) -> bytes:
        """Wait for the daemon to close us; returns whatever arrived before the close."""
        got = b""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                return got
            if not data:
                return got
            got += data
        raise AssertionError("the daemon did not close the connection")

    def close(self) -> None:
        self.sock.close()
