"""Networks through the toolstack: ``vif = [...]`` in a config, ``network-attach``/``-detach``/
``-list``, traffic guest <-> host and guest <-> guest over pyxen's bridge, a restart with the
same MACs, config and API errors, and no TAP left behind after destroy.

Everything runs in private directories (``PYXEN_*`` and ``XENSTORED_PATH``), so the CLI starts
its own pyxend, which starts its own xenstored; both are stopped at the end. The private
pyxend's first domain ID is set high and per run (``next-domid``), so this run's TAPs
(``vif<domid>.<devid>``) do not collide with another installation's. The guests use the
default bridge pyxenbr0 (10.88.0.1/24, created if missing) and 10.88.0.61/.62. One guest
(``neta``, module fixture) is shared by most tests; ``netb`` joins it for the TCP transfer.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pyxen.testing.toolstack import PyxenHost, private_host

pytestmark = pytest.mark.tcg

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = "pyxenbr0"
HOST_IP = "10.88.0.1"
IP_A, IP_B = "10.88.0.61", "10.88.0.62"
NET_ROW = re.compile(r"^(\d+)\s+(\d+)\s+([0-9a-f:]{17})\s+(\d+)\s+(\d+)\s+(-?\d+)\s+(-?\d+)/"
                     r"(-?\d+)\s+(\S+)\s*$")
HEADER = ("Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path" + " " * 23)
CFG = """\
name    = "{name}"
type    = "pvh"
memory  = 192
kernel  = "debian/vmlinuz"
ramdisk = "debian/initrd.img"
extra   = "console=hvc0 quiet loglevel=1"
accel   = "tcg"
vif     = [ {vifs} ]
"""
VIF_LINE = 8                                   # the line of ``vif = ...`` in CFG


def _mac(last: int) -> str:
    """A Xen-OUI MAC unique to this run (the middle octets are random)."""
    return f"00:16:3e:{_RUN[0]:02x}:{_RUN[1]:02x}:{last:02x}"


_RUN = (random.randrange(0x80), random.randrange(256))


class Host(PyxenHost):
    """The shared harness with this run's own domid range, plus ``network-list`` parsing."""

    def __init__(self, base: str) -> None:
        super().__init__(base, first_domid=1000 + os.getpid() % 20000)

    def net_list(self, name: str) -> dict[int, tuple]:
        out = self.px("network-list", name).stdout.splitlines()
        assert out[0] == HEADER
        rows = {}
        for line in out[1:]:
            m = NET_ROW.match(line)
            assert m, f"not an xl network-list row: {line!r}"
            rows[int(m.group(1))] = m.groups()
        return rows


def _taps(domid: int) -> list[str]:
    return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(f"vif{domid}."))


def _master(ifname: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{ifname}/master"))
    except OSError:
        return None


from pyxen.testing.pinger import checksum as _icmp_checksum  # noqa: E402


def host_ping(addr: str, count: int = 2, wait: float = 2.0) -> bool:
    """``ping -c COUNT -W WAIT ADDR`` from the host: True if a reply came back. Uses the
    ping command when installed, else the same ICMP echo over a raw socket (root)."""
    if shutil.which("ping"):
        return subprocess.run(["ping", "-c", str(count), "-W", f"{wait:g}", addr],
                              capture_output=True, timeout=count * (wait + 2)).returncode == 0
    ident = os.getpid() & 0xFFFF
    got = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(count):
            body = struct.pack("!HHd", ident, seq, time.time())
            hdr = struct.pack("!BBH", 8, 0, 0)
            pkt = struct.pack("!BBH", 8, 0, _icmp_checksum(hdr + body)) + body
            s.sendto(pkt, (addr, 0))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, src = s.recvfrom(2048)
                except socket.timeout:
                    break
                ihl = (data[0] & 0x0F) * 4
                typ, _code, _ck, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if src[0] == addr and typ == 0 and rid == ident and rseq == seq:
                    got += 1
                    break
            time.sleep(0.2)
    return got > 0


@pytest.fixture(scope="module")
def host():
    yield from private_host(Host, "pxnt-")


@pytest.fixture(scope="module")
def cfgdir(host):
    d = Path(host.base, "cfg")
    d.mkdir()
    return d


def _cfg(cfgdir: Path, name: str, *vifs: str) -> Path:
    p = cfgdir / f"{name}.cfg"
    p.write_text(CFG.format(name=name, vifs=", ".join(f"'{v}'" for v in vifs)))
    return p


def _up(host: Host, name: str, ip: str) -> str:
    """Configure eth0 with ``ip`` in guest ``name`` and ping the host from it."""
    return host.sh(name, f"ip link set eth0 up; ip addr add {ip}/24 dev eth0; "
                         f"ping -c 2 -W 2 {HOST_IP} >/dev/null || ping -c 2 -W 2 {HOST_IP}; "
                         "echo PING=$?")


@pytest.fixture(scope="module")
def guest(host, cfgdir):
    """A running guest ``neta`` with one NIC (devid 0) on pyxenbr0, eth0 = 10.88.0.61."""
    return host.boot(_cfg(cfgdir, "neta", f"bridge={BRIDGE},mac={_mac(0x61)}"))


# ----------------------------------------------------------------------------- tests

def test_vif_in_config_reaches_host_both_ways(host, guest):
    domid = host.info(guest)["domid"]
    assert domid >= host.first_domid
    out = _up(host, guest, IP_A)
    assert "PING=0" in out, out
    tap = f"vif{domid}.0"
    assert _taps(domid) == [tap]
    assert _master(tap) == BRIDGE
    assert host_ping(IP_A), f"the host cannot ping {IP_A}"
    rows = host.net_list(guest)
    assert list(rows) == [0]
    idx, be, mac, handle, state, evtch, tx, rx, path = rows[0]
    assert (be, mac, handle, state) == ("0", _mac(0x61), "0", "4")
    assert int(evtch) > 0 and int(tx) > 0 and int(rx) > 0
    assert path == f"/local/domain/0/backend/vif/{domid}/0"
    long = json.loads(host.px("list", "-l", guest).stdout)[0]["config"]["nics"]
    assert long == [{"devid": 0, "mac": _mac(0x61), "bridge": BRIDGE, "nictype": "vif"}]
    out = host.sh(guest, "echo MAC=$(cat /sys/class/net/eth0/address)")
    assert f"MAC={_mac(0x61)}" in out, out


def test_network_attach_list_detach(host, guest):
    domid = host.info(guest)["domid"]
    host.px("network-attach", guest, f"bridge={BRIDGE}", f"mac={_mac(0x71)}")   # joined
    out = host.sh(guest, "for i in $(seq 100); do [ -e /sys/class/net/eth1 ] && break; "
                         "sleep 0.1; done; echo ETH1=$(cat /sys/class/net/eth1/address)")
    assert f"ETH1={_mac(0x71)}" in out, out
    host.wait_for(lambda: host.net_list(guest).get(1, ())[4:5] == ("4",), 30,
                  "vif 1 Connected")
    rows = host.net_list(guest)
    assert sorted(rows) == [0, 1] and rows[1][2] == _mac(0x71) and rows[1][3] == "1"
    assert rows[1][8] == f"/local/domain/0/backend/vif/{domid}/1"
    assert _taps(domid) == [f"vif{domid}.0", f"vif{domid}.1"]
    assert _master(f"vif{domid}.1") == BRIDGE
    assert [n["devid"] for n in host.info(guest)["nics"]] == [0, 1]

    host.px("network-detach", guest, "1")
    out = host.sh(guest, "for i in $(seq 100); do [ -e /sys/class/net/eth1 ] || break; "
                         "sleep 0.1; done; [ -e /sys/class/net/eth1 ] && echo STILL=yes || "
                         "echo STILL=no")
    assert "STILL=no" in out, out
    assert _taps(domid) == [f"vif{domid}.0"]
    assert sorted(host.net_list(guest)) == [0]
    assert [n["devid"] for n in host.info(guest)["nics"]] == [0]

    # by MAC, with a default spec (random MAC, next devid)
    host.px("network-attach", guest)
    st, rows = host.api("GET", f"/v1/domains/{guest}/nics")
    assert st == 200 and [r["devid"] for r in rows] == [0, 1]
    mac = rows[1]["mac"]
    assert mac.startswith("00:16:3e:") and rows[1]["vifname"] == f"vif{domid}.1"
    host.px("network-detach", guest, mac.upper())
    assert sorted(host.net_list(guest)) == [0] and _taps(domid) == [f"vif{domid}.0"]
    out = host.sh(guest, f"ping -c 1 -W 2 {HOST_IP} >/dev/null; echo PING=$?")
    assert "PING=0" in out, out


def test_two_guests_tcp_transfer(host, guest, cfgdir):
    """4 MiB from neta to netb over TCP (busybox nc), checksums compared."""
    out = host.sh(guest, f"ip addr show eth0 | grep -q {IP_A} || ip addr add {IP_A}/24 "
                         "dev eth0; echo OK=$((2+2))")
    assert "OK=4" in out
    b = host.boot(_cfg(cfgdir, "netb", f"bridge={BRIDGE},mac={_mac(0x62)}"))
    assert "PING=0" in _up(host, b, IP_B)
    out = host.sh(guest, f"i=0; until ping -c1 -W1 {IP_B} >/dev/null 2>&1; do i=$((i+1)); "
                         "[ $i -lt 20 ] || break; done; echo A2B=$i")
    assert re.search(r"A2B=1?\d\b", out), out
    # the listener's stdin must stay open: busybox nc ends the connection at its stdin's EOF
    out = host.sh(b, "mkfifo /tmp/h; nc -l -p 5000 < /tmp/h > /tmp/in & exec 3>/tmp/h; "
                     "echo LISTENING=$((3*3))")
    assert "LISTENING=9" in out, out
    out = host.sh(guest, "dd if=/dev/urandom of=/tmp/out bs=1M count=4 2>/dev/null; "
                         "echo SUM=$(md5sum < /tmp/out | cut -d' ' -f1); "
                         f"nc {IP_B} 5000 < /tmp/out; echo NC=$?", timeout=180)
    assert "NC=0" in out, out
    sent = re.search(r"SUM=([0-9a-f]{32})", out).group(1)
    out = host.sh(b, "wait; exec 3>&-; echo GOT=$(wc -c < /tmp/in),"
                     "$(md5sum < /tmp/in | cut -d' ' -f1)", timeout=120)
    m = re.search(r"GOT=\s*(\d+),([0-9a-f]{32})", out)
    assert m, out
    assert (int(m.group(1)), m.group(2)) == (4 << 20, sent)


def test_config_and_attach_errors_leave_everything_alone(host, guest, cfgdir):
    domid = host.info(guest)["domid"]
    before = host.net_list(guest)
    # a bad MAC in a cfg: file:line, nothing created
    cfg = _cfg(cfgdir, "badmac", f"bridge={BRIDGE}", "mac=00:16:3e:zz:00:01")
    r = host.px("create", str(cfg), check=False)
    assert r.returncode == 1
    assert f"{cfg}:{VIF_LINE}:vif: vif spec 'mac=00:16:3e:zz:00:01': invalid mac" in r.stderr
    assert "badmac" not in host.names()
    # what pyxend refuses names the spec and file:line too
    for name, vif, status, message in (
            ("dupmac", f"mac={_mac(0x61)}", 409, f"mac {_mac(0x61)} is in use by domain "
                                                 f"'{guest}' (devid 0)"),
            ("notbr", "bridge=lo", 400, "bridge=lo: lo is an interface but not a bridge"),
            ("script", "script=vif-route", 400, "vif hotplug scripts are not supported"),
            ("twice", f"vifname=vif{domid}.0", 409, f"vifname vif{domid}.0 is in use")):
        cfg = _cfg(cfgdir, name, vif)
        r = host.px("create", str(cfg), check=False)
        assert r.returncode == 1, (name, r.stderr)
        assert f"{cfg}:{VIF_LINE}: vif spec '{vif}': " in r.stderr, (name, r.stderr)
        assert message in r.stderr, (name, r.stderr)
        assert name not in host.names()
        st, body = host.api("POST", "/v1/domains", {
            "config": {"name": name, "kernel": host.info(guest)["config"]["kernel"]},
            "nics": [{"spec": vif, "where": "x.cfg:3"}]})
        assert st == status and body["error"].startswith(f"x.cfg:3: vif spec '{vif}': "), body
    # network-detach of an unknown NIC; attaching a MAC or TAP name in use
    r = host.px("network-detach", guest, "7", check=False)
    assert r.returncode == 1 and "unknown device 7" in r.stderr, r.stderr
    r = host.px("network-detach", guest, "00:16:3e:00:00:00", check=False)
    assert r.returncode == 1 and "unknown device 00:16:3e:00:00:00" in r.stderr
    for spec, status, message in (
            (f"mac={_mac(0x61)}", 409, "is in use by domain"),
            (f"vifname=vif{domid}.0", 409, f"vifname vif{domid}.0 is in use"),
            ("devid=0", 409, "devid 0 is already in use"),
            ("mac=01:16:3e:00:00:01", 400, "is a multicast address"),
            ("rate=fast", 400, "invalid rate 'fast'")):
        st, body = host.api("POST", f"/v1/domains/{guest}/nics", {"spec": spec})
        assert st == status and message in body["error"], (spec, st, body)
        assert body["error"].startswith(f"vif spec '{spec}': "), body
    st, body = host.api("GET", "/v1/domains/nosuch/nics")
    assert st == 404 and body == {"error": "domain 'nosuch' does not exist"}
    st, body = host.api("POST", "/v1/domains/nosuch/nics", {"spec": ""})
    assert st == 404
    st, body = host.api("DELETE", f"/v1/domains/{guest}/nics/9")
    assert st == 404 and "unknown device 9" in body["error"]
    st, doc = host.api("GET", "/openapi.json")
    assert {"/v1/domains/{dom}/nics", "/v1/domains/{dom}/nics/{device}"} <= set(doc["paths"])
    # the guest did not notice
    after = host.net_list(guest)
    assert {k: v[:5] for k, v in after.items()} == {k: v[:5] for k, v in before.items()}
    assert _taps(domid) == [f"vif{domid}.0"]
    out = host.sh(guest, f"ls /sys/class/net | tr '\\n' ,; ping -c 1 -W 2 {HOST_IP} "
                         ">/dev/null; echo PING=$?")
    assert "eth0,lo," in out and "PING=0" in out, out


def test_restart_keeps_the_nics_and_macs(host, guest):
    """on_reboot = "restart" brings the domain back with the same NICs (hot-plugged ones
    included) and MACs, on new TAPs; the old ones are gone."""
    host.px("network-attach", guest, f"bridge={BRIDGE}")
    first = host.info(guest)["domid"]
    macs = [n["mac"] for n in host.info(guest)["nics"]]
    assert len(macs) == 2 and macs[0] == _mac(0x61)
    host.px("reboot", "-w", guest, timeout=90)
    host.wait_for(lambda: guest in host.names() and host.info(guest)["domid"] != first, 60,
                  "the restarted domain")
    host.wait_for(lambda: host.info(guest).get("console"), 60, "its console")
    host.sh(guest, "\necho booted")
    domid = host.info(guest)["domid"]
    assert [n["mac"] for n in host.info(guest)["nics"]] == macs
    assert _taps(first) == []
    assert _taps(domid) == [f"vif{domid}.0", f"vif{domid}.1"]
    out = host.sh(guest, "for i in $(seq 100); do [ -e /sys/class/net/eth1 ] && break; "
                         "sleep 0.1; done; echo MACS=$(cat /sys/class/net/eth0/address),"
                         "$(cat /sys/class/net/eth1/address)")
    assert f"MACS={macs[0]},{macs[1]}" in out, out
    assert "PING=0" in _up(host, guest, IP_A)
    assert host_ping(IP_A)
    host.px("network-detach", guest, "1")


def test_destroy_leaves_no_tap(host, guest):
    for name in (guest, "netb"):
        if name not in host.names():
            continue
        domid = host.info(name)["domid"]
        assert _taps(domid)
        host.px("destroy", name)
        assert name not in host.names()
        assert _taps(domid) == [], f"TAPs of d{domid} left behind"


def test_net_pair_example():
    """examples/net-pair.sh: two ``pyxen run`` guests, ping and an 8 MiB TCP transfer."""
    if not os.path.exists(ROOT / ".venv/bin/pyxen"):
        pytest.skip("no .venv/bin/pyxen")
    r = subprocess.run([str(ROOT / "examples/net-pair.sh"), "8"], capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "net-pair: OK (8 MiB intact" in r.stdout
