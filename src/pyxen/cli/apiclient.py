"""The CLI's client for pyxend's HTTP/JSON API, over its unix socket (stdlib only: the CLI
starts fast and needs no HTTP library).

:func:`connect` returns a client for a running pyxend, starting one first if none answers
(xl needs xencommons; pyxen starts its daemon on first use and says so on stderr).
Non-2xx replies raise :class:`~pyxen.errors.ToolstackError` with pyxend's message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from urllib.parse import quote

from pyxen.errors import ToolstackError
from pyxen.toolstack.paths import Paths
from pyxen.toolstack.spawn import start_detached, wait_until_up

START_TIMEOUT = 30.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class ApiClient:
    def __init__(self, paths: Paths, timeout: float = 180.0) -> None:
        self.paths = paths
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> object:
        conn = _UnixConnection(self.paths.socket, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, f"/v1{path}", body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = {"error": raw.decode(errors="replace")}
        if resp.status >= 400:
            msg = obj.get("error") if isinstance(obj, dict) else None
            raise ToolstackError(msg or f"pyxend: HTTP {resp.status}", resp.status)
        return obj

    def get(self, path: str) -> object:
        return self.request("GET", path)

    def post(self, path: str, body: dict | None = None) -> object:
        return self.request("POST", path, body if body is not None else {})

    def delete(self, path: str) -> object:
        return self.request("DELETE", path)

    @staticmethod
    def dom(dom: str | int) -> str:
        return quote(str(dom), safe="")

    def alive(self) -> bool:
        try:
            self.get("/info")
            return True
        except (OSError, http.client.HTTPException):
            return False


def connect(paths: Paths | None = None, autostart: bool = True) -> ApiClient:
    """A client for the running pyxend; starts one (in its own session) if none answers."""
    paths = paths or Paths.from_env()
    client = ApiClient(paths)
    if client.alive() or not autostart:
        return client
    os.makedirs(paths.log_dir, exist_ok=True)
    logpath = os.path.join(paths.log_dir, "pyxend.log")
    p = start_detached([sys.executable, "-m", "pyxen.toolstack.api"], logpath)
    print(f"pyxen: no pyxend was running; started one (pid {p.pid}, API {paths.socket}, "
          f"log {logpath})", file=sys.stderr)
    wait_until_up(p, client.alive, START_TIMEOUT, "pyxend", paths.socket, logpath)
    return client
