#!/usr/bin/env python3
"""TCP throughput of guests on a host bridge: pyxen (xen-netfront on pyxen's backend)
against QEMU's software emulation (virtio-net), the same kernel and initramfs, in one run.

Rows (MiB/s, higher is better; ratio = pyxen / QEMU):

* ``guest_to_host``: one guest sends ``--mib`` MiB over one TCP connection to a receiver in
  this script bound to the bridge's 10.88.0.1; the host times first byte to EOF.
* ``guest_to_guest``: two guests of the same side run at once on the bridge; one receives
  (``iobench recv``, timing first byte to EOF inside the guest), the other sends ``--mib`` MiB.

The guests' traffic tool is ``iobench`` (``bench/guest/iobench.c``; ``send`` connects, retrying
while the peer is not up yet, writes, shuts down its write side and waits for the peer's close;
``recv`` accepts one connection and reads to EOF), put in the guest as in ``bench/blk.py``. It
is used instead of busybox ``nc`` so neither side pays for pipes through ``dd`` and ``nc``.
Guests get static addresses in 10.88.0.0/24 with busybox ``ip`` and 1 vCPU / 256 MiB each.

Network: the bridge ``pyxenbr0`` with 10.88.0.1/24 (pyxen's default bridge for ``--vif``).
The bench creates it if it is missing and then deletes it at the end (only if nothing else is
attached by then); it adds 10.88.0.1/24 to an existing bridge that lacks it (and removes it
again). QEMU's guests use persistent TAPs ``qt<pid>_<n>`` that the bench creates, attaches to
the bridge and deletes. pyxen creates and removes its own ``vif<domid>.<n>`` TAPs.

* pyxen: ``pyxen run --accel tcg --vcpus 1 --memory 256 --vif bridge=pyxenbr0,mac=00:16:3e:..
  -- ...`` (the guest sees eth0 on xen-netfront).
* QEMU: ``-M microvm -accel tcg ... -netdev tap,id=n0,ifname=qt..,script=no,downscript=no
  -device virtio-net-device,netdev=n0,mac=52:54:00:..`` (virtio_mmio + virtio_net modules).

Prints one JSON object like ``bench/blk.py`` (``rows``, medians of ``--runs``, ``samples``,
``errors`` per failed side). Needs root (bridge and TAPs).

Usage: bench/net.py [--runs 3] [--mib 128]      (quick check: --mib 32 --runs 1)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from blk import (ENV, GUEST_TOOL, MEMORY_MIB, SIDES, VCPUS, SideError,  # noqa: E402
                 alternate, build_iobench, json_lines, log_stderr, median_rows, pyxen_argv,
                 qemu_argv, qemu_version, run_guest)

BRIDGE = "pyxenbr0"
HOST_IP = "10.88.0.1"
PREFIX = 24
TESTS = [("guest_to_host", "MiB/s"), ("guest_to_guest", "MiB/s")]


class Bridge:
    """The bench's bridge and QEMU TAPs; removes exactly what it created."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute
        self.ipr = IPRoute()
        self.created_bridge = False
        self.added_addr = False
        self.taps: list[int] = []
        self.notes: list[str] = []
        self.index: int | None = None

    def __enter__(self) -> Bridge:
        try:
            found = self.ipr.link_lookup(ifname=BRIDGE)
            if not found:
                self.ipr.link("add", ifname=BRIDGE, kind="bridge")
                self.created_bridge = True
                found = self.ipr.link_lookup(ifname=BRIDGE)
            self.index = found[0]
            addrs = [a.get("IFA_ADDRESS") for a in self.ipr.get_addr(index=self.index,
                                                                     family=socket.AF_INET)]
            if HOST_IP not in addrs:
                self.ipr.addr("add", index=self.index, address=HOST_IP, prefixlen=PREFIX)
                self.added_addr = True
            self.ipr.link("set", index=self.index, state="up")
        except Exception:
            self.__exit__()
            raise
        return self

    def tap(self, name: str) -> str:
        self.ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        idx = self.ipr.link_lookup(ifname=name)[0]
        self.taps.append(idx)
        self.ipr.link("set", index=idx, master=self.index, state="up")
        return name

    def __exit__(self, *exc: object) -> None:
        for idx in self.taps:
            try:
                self.ipr.link("del", index=idx)
            except Exception as e:  # noqa: BLE001 - cleanup reports, never raises
                self.notes.append(f"could not delete TAP {idx}: {e}")
        self.taps = []
        if self.created_bridge and self.index is not None:
            ports = [link.get("ifname") for link in self.ipr.get_links()
                     if link.get("master") == self.index]
            if ports:
                self.notes.append(f"left {BRIDGE} in place: still has ports {ports}")
            else:
                self.ipr.link("del", index=self.index)
        elif self.added_addr and self.index is not None:
            self.ipr.addr("del", index=self.index, address=HOST_IP, prefixlen=PREFIX)
        self.ipr.close()


class HostReceiver:
    """One TCP connection on HOST_IP: bytes and seconds from first byte to EOF."""

    def __init__(self, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_IP, 0))
        self.sock.listen(1)
        self.sock.settimeout(timeout)
        self.port = self.sock.getsockname()[1]
        self.result: tuple[int, float] | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            self.error = f"host receiver: no connection ({e})"
            return
        buf = bytearray(1 << 20)
        got, t0 = 0, 0.0
        with conn:
            conn.settimeout(self.sock.gettimeout())
            try:
                while n := conn.recv_into(buf):
                    if not got:
                        t0 = time.monotonic()
                    got += n
            except OSError as e:
                self.error = f"host receiver: {e} after {got} bytes"
                return
            self.result = (got, time.monotonic() - t0)

    def close(self) -> None:
        self.sock.close()


def net_setup(ip: str) -> str:
    return ("i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.1; "
            "i=$((i+1)); done; [ -e /sys/class/net/eth0 ] || { echo 'no eth0'; ls "
            "/sys/class/net; exit 3; }; ip link set lo up && ip link set eth0 up && "
            f"ip addr add {ip}/{PREFIX} dev eth0 && ")


def result_line(out: str, mode: str, want: int) -> dict[str, Any]:
    for j in json_lines(out):
        if j.get("mode") == mode and "bytes" in j:
            if j["bytes"] != want:
                raise SideError(f"{mode}: moved {j['bytes']} bytes, expected {want}")
            return j
        if j.get("mode") == mode and "error" in j:
            raise SideError(f"{mode}: {j['error']}")
    raise SideError(f"no iobench {mode} result; output tail: {out[-600:]!r}")


def run_pair(recv_argv: list[str], send_argv: list[str], timeout: float) -> tuple[str, str]:
    """Both guests at once; (receiver stdout, sender stdout) or SideError. When one guest
    fails the other is killed (a sender would otherwise retry its connect for minutes)."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              errors="replace", env=ENV, stdin=subprocess.DEVNULL)
             for a in (recv_argv, send_argv)]
    outs: list[tuple[str, str]] = [("", ""), ("", "")]
    killed: set[int] = set()

    def wait(i: int) -> None:
        try:
            outs[i] = procs[i].communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            procs[i].kill()
            outs[i] = procs[i].communicate()
        if procs[i].returncode != 0 and procs[1 - i].poll() is None:
            killed.add(1 - i)
            procs[1 - i].kill()

    waiters = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(2)]
    try:
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    order = sorted(range(2), key=lambda i: i in killed)   # the guest that failed first
    for i in order:
        p, (out, err), who = procs[i], outs[i], ("receiver", "sender")[i]
        if p.returncode != 0:
            raise SideError(f"{who} guest: exit status {p.returncode}; stderr tail: "
                            f"{err[-800:]!r}; stdout tail: {out[-400:]!r}")
    return outs[0][0], outs[1][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128, help="MiB sent per test")
    ap.add_argument("--accel", default="tcg", help="pyxen's engine (default tcg)")
    ap.add_argument("--timeout", type=float, default=600, help="per guest boot")
    ap.add_argument("--only", choices=SIDES, help="run one side only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"error": "bench/net.py needs root (bridge and TAP devices)"}))
        return 1

    from pyxen.image.build import ensure_image
    from qemu_peer import qemu_binary

    img = ensure_image()
    qemu = qemu_binary()
    errors: dict[str, str] = {}
    if not qemu:
        errors["qemu"] = "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    if args.only:
        errors.setdefault(next(s for s in SIDES if s != args.only), "skipped (--only)")
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in SIDES}
    details: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    want = args.mib << 20
    base = 100 + (os.getpid() % 35) * 4              # 10.88.0.100-239, 2 per side
    ips = {"pyxen": (f"10.88.0.{base}", f"10.88.0.{base + 1}"),
           "qemu": (f"10.88.0.{base + 2}", f"10.88.0.{base + 3}")}
    rnd = random.Random()
    macs = {side: [oui + "".join(f":{rnd.randrange(256):02x}" for _ in range(3))
                   for _ in range(2)]
            for side, oui in (("pyxen", "00:16:3e"), ("qemu", "52:54:00"))}
    result: dict[str, Any] = {"runs": args.runs, "mib": args.mib, "vcpus": VCPUS,
                              "memory_mib": MEMORY_MIB, "kernel": img.release,
                              "qemu_version": qemu_version(qemu) if qemu else None,
                              "bridge": BRIDGE, "guest_ips": ips,
                              "guest_macs": macs}

    with tempfile.TemporaryDirectory(prefix="pyxen-net-") as tmpdir, Bridge() as br:
        tmp = Path(tmpdir)
        files = {GUEST_TOOL: build_iobench(tmp)}
        taps = [br.tap(f"qt{os.getpid()}_{i}") for i in range(2)] if qemu else []
        tool = GUEST_TOOL

        def argv(side: str, n: int, script: str) -> list[str]:
            if side == "pyxen":
                return pyxen_argv(img, script, tmp, files,
                                  ["--vif", f"bridge={BRIDGE},mac={macs[side][n]}"],
                                  args.accel, args.timeout)
            return qemu_argv(qemu, img, script, tmp, files,  # type: ignore[arg-type]
                             ["-netdev", f"tap,id=n0,ifname={taps[n]},script=no,"
                              "downscript=no", "-device",
                              f"virtio-net-device,netdev=n0,mac={macs[side][n]}"],
                             tag=f"q{n}")

        def measure(side: str) -> dict[str, float]:
            rx_ip, tx_ip = ips[side]
            # guest -> host
            host = HostReceiver(args.timeout)
            try:
                script = net_setup(tx_ip) + f"{tool} send {HOST_IP} {host.port} " \
                                            f"-m {args.mib} -t 120"
                out = run_guest(argv(side, 0, script), args.timeout + 30)
                guest = result_line(out, "send", want)
                host.thread.join(10)
                if host.error or host.result is None:
                    raise SideError(host.error or "host receiver got nothing")
                got, secs = host.result
                if got != want:
                    raise SideError(f"host received {got} bytes, expected {want}")
            finally:
                host.close()
            g2h = got / secs / 2**20
            # guest -> guest
            port = rnd.randrange(20000, 60000)
            rscript = net_setup(rx_ip) + f"{tool} recv {port} -t 300"
            sscript = net_setup(tx_ip) + f"{tool} send {rx_ip} {port} -m {args.mib} -t 300"
            rout, sout = run_pair(argv(side, 0, rscript), argv(side, 1, sscript),
                                  args.timeout + 30)
            recv = result_line(rout, "recv", want)
            send = result_line(sout, "send", want)
            details[side].append({"guest_to_host": {"host_s": round(secs, 4),
                                                    "guest_send_mib_s": guest["mib_s"]},
                                  "guest_to_guest": {"recv_s": recv["seconds"],
                                                     "send_mib_s": send["mib_s"]}})
            return {"guest_to_host": round(g2h, 3), "guest_to_guest": recv["mib_s"]}

        result["commands"] = {
            "pyxen": " ".join(argv("pyxen", 0, "<script>")),
            "qemu": " ".join(argv("qemu", 0, "<script>")) if qemu else None}
        alternate(args.runs, {"pyxen": lambda: measure("pyxen"),
                              "qemu": lambda: measure("qemu")}, samples, errors, log_stderr)
    if br.notes:
        result["cleanup"] = br.notes
    rows = median_rows(TESTS, samples, errors)
    print(json.dumps({"rows": rows, **result, "samples": samples, "details": details,
                      "errors": errors}, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
