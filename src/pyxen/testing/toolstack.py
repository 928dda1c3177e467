"""Test harness for the toolstack: a private pyxen installation driven through its CLI, its
HTTP API and guest consoles. Used by the toolstack integration tests."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

_MARKS = itertools.count(100)


class PyxenHost:
    """One private pyxen installation under ``base`` (its own run/state/log directories and
    xenstored socket, so tests never touch the machine's): CLI runner, API, console helpers.
    ``first_domid`` seeds the domid rover (distinct TAP names between runs)."""

    def __init__(self, base: str, first_domid: int | None = None) -> None:
        self.base = base
        self.env = dict(os.environ, PYXEN_RUN_DIR=f"{base}/run", PYXEN_STATE_DIR=f"{base}/st",
                        PYXEN_LOG_DIR=f"{base}/log", XENSTORED_PATH=f"{base}/run/xs.sock")
        self.env.pop("PYXEN_SOCKET", None)
        if first_domid is not None:
            os.makedirs(f"{base}/st", exist_ok=True)
            Path(base, "st", "next-domid").write_text(str(first_domid))
        self.first_domid = first_domid

    #: argv that runs a command "on this host" (e.g. ``ip netns exec NS``); empty: here
    prefix: tuple[str, ...] = ()

    def px(self, *args: str, check: bool = True, timeout: float = 120,
           cwd: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.prefix, sys.executable, "-m", "pyxen.cli.main", *args],
                           env=self.env, input=stdin, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            where = f"[{' '.join(self.prefix)}] " if self.prefix else ""
            raise AssertionError(f"{where}pyxen {' '.join(args)} -> {r.returncode}\n"
                                 f"{r.stderr}\n--- pyxend log:\n{self.log('pyxend.log')}")
        return r

    def log(self, name: str) -> str:
        try:
            return Path(self.base, "log", name).read_text()[-4000:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        base = self.base

        class Conn(http.client.HTTPConnection):
            def connect(conn) -> None:  # noqa: N805
                conn.sock = socket.socket(socket.AF_UNIX)
                conn.sock.connect(f"{base}/run/pyxend.sock")
        c = Conn("localhost", timeout=120)
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        data = resp.read()
        c.close()
        return resp.status, json.loads(data) if data else None

    def info(self, name: str) -> dict:
        st, body = self.api("GET", f"/v1/domains/{name}")
        assert st == 200, body
        return body

    def names(self) -> set[str]:
        return {line.split()[0] for line in self.px("list").stdout.splitlines()[1:]}

    def sh(self, name: str, cmd: str, timeout: float = 90) -> str:
        """Run ``cmd`` in the guest's shell; its output (with the echoed command line)."""
        n = next(_MARKS)
        return self.console(name, f"{cmd}; echo END-$(({n}+1))\n", f"END-{n + 1}", timeout,
                            what=f"guest {name} never finished {cmd!r}")

    def console(self, name: str, script: str, expect: str, timeout: float = 60,
                what: str | None = None) -> str:
        """Type ``script`` on the domain's console; the output up to ``expect`` (an
        AssertionError saying ``what`` if it does not come within ``timeout`` s)."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.info(name)["console"])
        s.settimeout(timeout)
        s.sendall(script.encode())
        buf = b""
        deadline = time.monotonic() + timeout
        while expect.encode() not in buf and time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            buf += data
        s.close()
        text = buf.decode(errors="replace")
        assert expect in text, \
            f"{what or f'console never showed {expect!r}'}:\n{text[-2000:]}"
        return text

    def boot(self, cfg: Path, *overrides: str) -> str:
        r = self.px("create", str(cfg), *overrides)
        name = re.search(r"domain (\S+) created", r.stderr).group(1)
        self.wait_for(lambda: self.info(name).get("console"), 60, f"{name}'s console")
        self.sh(name, "\necho booted")
        return name

    def wait_for(self, pred, timeout: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.log('pyxend.log')}")

    def stop(self) -> None:
        """Destroy our domains, stop our pyxend and xenstored (by pid: only this run's)."""
        try:
            st, info = self.api("GET", "/v1/info")
        except OSError:
            info = None
        if isinstance(info, dict):
            for d in self.api("GET", "/v1/domains")[1]:
                if d["domid"]:
                    self.api("DELETE", f"/v1/domains/{d['domid']}")
            pid = info["pyxend_pid"]
            os.kill(pid, signal.SIGTERM)
            # wait for it: its supervisor would restart a xenstored killed under it
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                cmdline = Path("/proc", pid, "cmdline").read_bytes()
            except OSError:
                continue
            if self.base.encode() in cmdline and b"pyxen" in cmdline:
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except ProcessLookupError:
                    pass


def guest_image():  # type: ignore[no-untyped-def]
    """The default Debian guest image (fetched on first use), or skip the calling test
    (no route to Debian's archive: say so)."""
    import pytest

    from pyxen.errors import PyxenError
    from pyxen.image.build import ensure_image
    try:
        return ensure_image()
    except PyxenError as e:
        pytest.skip(f"guest image unavailable: {e}")


def require_guest_image() -> None:
    """:func:`guest_image`, published in the image store (``debian/vmlinuz`` etc.)."""
    from pyxen.image.build import publish
    publish(guest_image())


def private_host(cls: type[PyxenHost], prefix: str) -> Iterator[PyxenHost]:
    """A module fixture's body (``yield from private_host(Host, "pxts-")``): a ``cls``
    installation under a new short directory in /tmp (AF_UNIX paths are at most 107
    bytes), stopped and removed afterwards. Skips without the guest image."""
    require_guest_image()
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    h = cls(base)
    yield h
    h.stop()
    shutil.rmtree(base, ignore_errors=True)
