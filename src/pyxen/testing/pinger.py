"""``python -m pyxen.testing.pinger ADDR OUT``: ping ADDR once per interval (raw ICMP echo,
root) until SIGTERM, then write ``{"sent": n, "received": n, "lost": [seqs]}`` to OUT.

A reply counts if it arrives within ``--wait`` seconds of its request, as ``ping -W``. Used
by the migration tests and examples/migrate-pair.sh (this host may have no ping binary)."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("out")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--wait", type=float, default=2.0)
    args = ap.parse_args(argv)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}
    got: set[int] = set()
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    seq = 0
    next_send = time.monotonic()
    while not stop["now"]:
        now = time.monotonic()
        if now >= next_send:
            body = struct.pack("!HHd", ident, seq & 0xFFFF, time.time())
            pkt = struct.pack("!BBH", 8, 0, checksum(b"\x08\0\0\0" + body)) + body
            try:
                s.sendto(pkt, (args.addr, 0))
            except OSError:
                pass
            sent[seq & 0xFFFF] = now
            seq += 1
            next_send += args.interval
        r, _, _ = select.select([s], [], [], max(0.0, min(0.05, next_send - now)))
        if r:
            data, src = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _c, _k, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if (src[0] == args.addr and typ == 0 and rid == ident and rseq in sent
                    and time.monotonic() - sent[rseq] <= args.wait):
                got.add(rseq)
    deadline = time.monotonic() + args.wait          # replies to the last requests
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], 0.05)
        if r:
            data, src = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _c, _k, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src[0] == args.addr and typ == 0 and rid == ident:
                got.add(rseq)
    lost = sorted(set(sent) - got)
    with open(args.out, "w") as f:
        json.dump({"sent": len(sent), "received": len(got), "lost": lost}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
