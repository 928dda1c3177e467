"""The migration connection: JSON lines around the record stream on one TCP socket.

The handshake (docs/migration-stream.md, "Live migration handshake") is a few JSON lines;
between them the source sends the record stream. :class:`Channel` keeps bytes that arrive
after a line for the stream reader (:meth:`Channel.recv_some`). Every wait has a timeout;
a closed or silent peer raises :class:`ChannelError` saying which step it was.
"""

from __future__ import annotations

import json
import socket

from pyxen.errors import PyxenError

PROTOCOL = 1
DEFAULT_PORT = 8002            # xend's relocation port
#: socket buffer bound (bytes) on both ends: what pre-copy leaves queued in the kernel when
#: the source pauses the guest is what the target must still work through during the pause
STREAM_BUFFER = 256 << 10
_LINE_MAX = 1 << 20


class ChannelError(PyxenError):
    """The peer closed the connection, went silent, or sent something unexpected."""


class Channel:
    """One side of a migration connection (blocking socket)."""

    def __init__(self, sock: socket.socket, peer: str = "peer") -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()

    def send_json(self, obj: dict) -> None:
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            raise ChannelError(f"sending to {self.peer}: {e.strerror or e}") from None

    def recv_json(self, timeout: float, step: str) -> dict:
        """The next line as a JSON object; ChannelError naming ``step`` if none comes."""
        self.sock.settimeout(timeout)
        try:
            while b"\n" not in self.buf:
                if len(self.buf) > _LINE_MAX:
                    raise ChannelError(f"{self.peer} sent an over-long line during {step}")
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    raise ChannelError(f"{self.peer} did not answer within {timeout:g} s "
                                       f"({step})") from None
                except OSError as e:
                    raise ChannelError(f"connection to {self.peer} failed during {step}: "
                                       f"{e.strerror or e}") from None
                if not data:
                    raise ChannelError(f"{self.peer} closed the connection during {step}")
                self.buf += data
        finally:
            self.sock.settimeout(None)
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf[:] = rest
        try:
            obj = json.loads(line)
        except ValueError:
            raise ChannelError(f"{self.peer} sent a bad message during {step}") from None
        if not isinstance(obj, dict):
            raise ChannelError(f"{self.peer} sent a bad message during {step}")
        return obj

    def recv_some(self, timeout: float, step: str) -> bytes:
        """Stream bytes: what is buffered, else the next chunk from the socket (b"" = EOF)."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1 << 20)
        except socket.timeout:
            raise ChannelError(f"{self.peer} sent nothing for {timeout:g} s ({step})") from None
        except OSError as e:
            raise ChannelError(f"connection to {self.peer} failed during {step}: "
                               f"{e.strerror or e}") from None
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, timeout: float = 5.0) -> Channel:
    """Connect to a target pyxend's relocation port; ChannelError (fast) if unreachable."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ChannelError(f"cannot reach {host}:{port}: {e.strerror or e}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER)
    return Channel(sock, f"{host}:{port}")


def bound_receive_buffer(sock: socket.socket) -> None:
    """The target's side of :data:`STREAM_BUFFER`."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_BUFFER)
