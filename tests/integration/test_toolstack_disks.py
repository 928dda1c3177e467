"""Disks through the toolstack: ``disk = [...]`` in a config, ``block-attach``/``-detach``/
``-list``, read-only disks, restart with the same disks, and durability of acknowledged
writes across a ``kill -9`` of the VMM.

Everything runs in private directories (``PYXEN_*`` and ``XENSTORED_PATH``), so the CLI starts
its own pyxend, which starts its own xenstored; both are stopped at the end. One guest with
two disks is shared by most tests (module fixture ``guest``); the create/readback and the
kill -9 tests boot their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from pyxen.testing.toolstack import PyxenHost, private_host

pytestmark = pytest.mark.tcg

ROOT = Path(__file__).resolve().parents[2]
BLOCK_ROW = re.compile(r"^(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(-?\d+)\s+(-?\d+)\s+(\S+)\s*$")
CFG = """\
name    = "{name}"
type    = "pvh"
memory  = 128
kernel  = "debian/vmlinuz"
ramdisk = "debian/initrd.img"
extra   = "console=hvc0 quiet loglevel=1"
accel   = "tcg"
disk    = [ {disks} ]
"""


class Host(PyxenHost):
    """The shared harness plus ``block-list`` parsing."""

    def block_list(self, name: str) -> dict[int, tuple]:
        out = self.px("block-list", name).stdout.splitlines()
        assert out[0] == "Vdev  BE  handle state evt-ch ring-ref BE-path" + " " * 23
        rows = {}
        for line in out[1:]:
            m = BLOCK_ROW.match(line)
            assert m, f"not an xl block-list row: {line!r}"
            rows[int(m.group(1))] = m.groups()
        return rows


@pytest.fixture(scope="module")
def host():
    yield from private_host(Host, "pxdk-")


@pytest.fixture(scope="module")
def imgdir(host):
    d = Path(host.base, "img")
    d.mkdir()
    return d


def _image(path: Path, size: int, data: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.write(data)
    return path


def _cfg(imgdir: Path, name: str, *disks: str) -> Path:
    p = imgdir / f"{name}.cfg"
    p.write_text(CFG.format(name=name, disks=", ".join(f"'{d}'" for d in disks)))
    return p


@pytest.fixture(scope="module")
def guest(host, imgdir):
    """A running guest with a scratch disk (xvdb, rw) and a read-only one (xvde)."""
    _image(imgdir / "scratch.img", 32 << 20)
    _image(imgdir / "ro.img", 4 << 20, os.urandom(1 << 20))
    cfg = _cfg(imgdir, "shared", "scratch.img,raw,xvdb,rw",
               "format=raw, vdev=xvde, access=ro, target=ro.img")
    return host.boot(cfg)


# ----------------------------------------------------------------------------- tests

def test_create_with_disk_filesystem_persists(host, imgdir):
    """A filesystem made and written in one guest is on the host's image after destroy and
    readable by the next guest booted with the same image."""
    img = _image(imgdir / "fs.img", 64 << 20)
    cfg = _cfg(imgdir, "fsa", "fs.img,raw,xvdb,rw")          # relative: the cfg's directory
    host.boot(cfg)
    out = host.sh("fsa", "mke2fs /dev/xvdb >/dev/null 2>&1; mkdir -p /mnt && "
                         "mount -t ext2 /dev/xvdb /mnt && echo pyxen-disk-$((6*7)) > /mnt/f && "
                         "sync && umount /mnt && echo FS=$((1+1))")
    assert "FS=2" in out, out
    # list -l: libxl's disk entry
    long = json.loads(host.px("list", "-l", "fsa").stdout)
    assert long[0]["config"]["disks"] == [{"pdev_path": str(img), "vdev": "xvdb",
                                          "backend": "phy", "format": "raw", "readwrite": 1}]
    host.px("destroy", "fsa")
    assert "fsa" not in host.names()
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    if os.path.exists(debugfs):
        r = subprocess.run([debugfs, "-R", "cat /f", str(img)], capture_output=True,
                           text=True, timeout=30)
        assert r.stdout.strip() == "pyxen-disk-42", r.stderr
    else:
        assert b"pyxen-disk-42\n" in img.read_bytes()
    # a second domain reads it back
    host.boot(cfg, 'name="fsb"')
    out = host.sh("fsb", "mkdir -p /mnt && mount -t ext2 -o ro /dev/xvdb /mnt && "
                         "echo GOT=$(cat /mnt/f)")
    assert "GOT=pyxen-disk-42" in out, out
    host.px("destroy", "fsb")


def test_readonly_disk(host, guest, imgdir):
    img = imgdir / "ro.img"
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    out = host.sh(guest, "echo RO=$(cat /sys/block/xvde/ro); "
                         "dd if=/dev/zero of=/dev/xvde bs=512 count=8 oflag=direct conv=fsync; "
                         "echo DDRC=$?; echo RD=$(dd if=/dev/xvde bs=512 count=1 2>/dev/null "
                         "| wc -c)")
    assert "RO=1" in out and "RD=512" in out, out
    assert re.search(r"DDRC=[1-9]", out), out
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    rows = host.block_list(guest)
    assert sorted(rows) == [51728, 51776]                  # xvdb, xvde
    long = json.loads(host.px("list", "-l", guest).stdout)[0]["config"]["disks"]
    assert [d["vdev"] for d in long] == ["xvdb", "xvde"]
    assert long[0]["readwrite"] == 1 and "readwrite" not in long[1]


def test_block_attach_list_detach(host, guest, imgdir):
    _image(imgdir / "hot.img", 16 << 20)
    domid = host.info(guest)["domid"]
    host.px("block-attach", guest, "hot.img,raw,xvdc,rw", cwd=str(imgdir))
    out = host.sh(guest, "for i in $(seq 100); do [ -b /dev/xvdc ] && break; sleep 0.1; done; "
                         "ls /dev/xvdc; echo hot-$((3*3)) | dd of=/dev/xvdc bs=512 conv=sync,fsync "
                         "oflag=direct 2>/dev/null; echo WR=$?")
    assert "\n/dev/xvdc" in out and "WR=0" in out, out
    assert (imgdir / "hot.img").read_bytes()[:6] == b"hot-9\n"

    def connected() -> bool:
        r = host.block_list(guest).get(51744)
        return r is not None and r[3] == "4"
    host.wait_for(connected, 30, "xvdc Connected")
    row = host.block_list(guest)[51744]
    assert row[1:3] == ("0", str(domid))
    assert row[6] == f"/local/domain/0/backend/vbd/{domid}/51744"
    assert int(row[4]) > 0 and int(row[5]) > 0
    assert [d["vdev"] for d in host.info(guest)["disks"]] == ["xvdb", "xvde", "xvdc"]

    host.px("block-detach", guest, "xvdc")
    out = host.sh(guest, "for i in $(seq 100); do [ -b /dev/xvdc ] || break; sleep 0.1; done; "
                         "[ -b /dev/xvdc ] && echo STILL=yes || echo STILL=no")
    assert "STILL=no" in out, out
    assert sorted(host.block_list(guest)) == [51728, 51776]
    assert [d["vdev"] for d in host.info(guest)["disks"]] == ["xvdb", "xvde"]
    r = host.px("block-detach", guest, "xvdc", check=False)
    assert r.returncode == 1 and "device xvdc not connected" in r.stderr
    # by number, and --force
    host.px("block-attach", guest, str(imgdir / "hot.img"), "raw", "xvdc")   # joined by ","
    host.px("block-detach", "--force", guest, "51744")
    assert sorted(host.block_list(guest)) == [51728, 51776]


def test_block_attach_errors_leave_the_guest_alone(host, guest, imgdir):
    before = host.block_list(guest)
    _image(imgdir / "other.img", 1 << 20)
    for spec, message in (
            ("nope.img,raw,xvdd", "disk spec 'nope.img,raw,xvdd': nope.img: no such file"),
            ("other.img,raw,xvdb", "disk spec 'other.img,raw,xvdb': vdev xvdb is already "
                                   "in use"),
            ("other.img,vmdk9,xvdd", "disk spec 'other.img,vmdk9,xvdd': unknown format "
                                     "'vmdk9'"),
            ("scratch.img,raw,xvdd", "scratch.img is already attached to domain"),
            (".,raw,xvdd", "is neither a file nor a block device")):
        r = host.px("block-attach", guest, spec, check=False, cwd=str(imgdir))
        assert r.returncode == 1 and message in r.stderr, (spec, r.stderr)
    assert host.block_list(guest) == before
    out = host.sh(guest, "ls /dev/ | grep -c '^xvd'; echo ALIVE=$((5+5))")
    assert "ALIVE=10" in out and "\n2\r" in out, out
    # a writable image in use by a running domain is not given to another one
    cfg = _cfg(imgdir, "thief", "scratch.img,raw,xvdb,rw")
    r = host.px("create", str(cfg), check=False)
    assert r.returncode == 1, r.stderr
    assert f"{cfg}:8: disk spec 'scratch.img,raw,xvdb,rw'" in r.stderr
    assert "in use by domain 'shared'" in r.stderr
    assert "thief" not in host.names()


def test_disk_api(host, guest, imgdir):
    st, body = host.api("GET", "/v1/domains/nosuch/disks")
    assert st == 404 and body == {"error": "domain 'nosuch' does not exist"}
    st, body = host.api("POST", "/v1/domains/nosuch/disks", {"spec": "/x,raw,xvdc"})
    assert st == 404
    st, body = host.api("POST", f"/v1/domains/{guest}/disks", {"spec": "a.img,raw"})
    assert st == 400 and body["error"].startswith("disk spec 'a.img,raw': no vdev")
    st, body = host.api("POST", f"/v1/domains/{guest}/disks",
                        {"spec": "hot.img,raw,xvdc"})             # relative without cwd
    assert st == 400 and "cwd" in body["error"]
    st, body = host.api("POST", f"/v1/domains/{guest}/disks",
                        {"spec": "hot.img,raw,xvdb", "cwd": str(imgdir)})
    assert st == 409 and "xvdb is already in use" in body["error"]
    st, body = host.api("DELETE", f"/v1/domains/{guest}/disks/xvdq")
    assert st == 404 and "xvdq not connected" in body["error"]
    st, body = host.api("POST", f"/v1/domains/{guest}/disks",
                        {"spec": "format=raw,vdev=xvdf,target=hot.img", "cwd": str(imgdir)})
    assert st == 201 and body["vdev"] == "xvdf" and body["devid"] == 51792
    assert body["target"] == str(imgdir / "hot.img")
    host.wait_for(lambda: [r["state"] for r in host.api("GET", f"/v1/domains/{guest}/disks")[1]
                           if r["vdev"] == "xvdf"] == [4], 30, "xvdf Connected")
    st, rows = host.api("GET", f"/v1/domains/{guest}/disks")
    assert st == 200 and [r["vdev"] for r in rows] == ["xvdb", "xvde", "xvdf"]
    st, body = host.api("DELETE", f"/v1/domains/{guest}/disks/xvdf?timeout=20")
    assert st == 200 and body == {"vdev": "xvdf", "devid": 51792, "clean": True}
    st, doc = host.api("GET", "/openapi.json")
    assert "/v1/domains/{dom}/disks/{vdev}" in doc["paths"]


def test_restart_keeps_the_disks(host, guest, imgdir):
    """on_reboot="restart": the new domain gets the same disks, hot-plugged ones included."""
    host.px("block-attach", guest, "hot.img,raw,xvdc", cwd=str(imgdir))
    first = host.info(guest)["domid"]
    host.px("reboot", "-w", guest, timeout=90)
    host.wait_for(lambda: guest in host.names() and host.info(guest)["domid"] != first, 60,
                  "the restarted domain")
    host.wait_for(lambda: host.info(guest).get("console"), 60, "its console")
    host.sh(guest, "\necho booted")
    assert [d["vdev"] for d in host.info(guest)["disks"]] == ["xvdb", "xvde", "xvdc"]
    out = host.sh(guest, "for i in $(seq 100); do [ -b /dev/xvdc ] && break; sleep 0.1; done; "
                         "echo DEVS=$(ls /dev | grep '^xvd' | tr '\\n' ,); "
                         "echo RO=$(cat /sys/block/xvde/ro)")
    assert "DEVS=xvdb,xvdc,xvde," in out and "RO=1" in out, out


def test_acknowledged_writes_survive_kill9_of_the_vmm(host, imgdir):
    """The guest writes record N to sector N with O_DIRECT + fsync and prints "done N";
    after kill -9 of the VMM every record it reported is in the image, intact."""
    img = _image(imgdir / "dur.img", 8 << 20)
    name = host.boot(_cfg(imgdir, "dur", "dur.img,raw,xvdb,rw"))
    pid = host.info(name)["pid"]
    s = socket.socket(socket.AF_UNIX)
    s.connect(host.info(name)["console"])
    s.settimeout(60)
    s.sendall(b"i=0; while [ $i -lt 16000 ]; do printf 'REC%07d' $i | dd of=/dev/xvdb bs=512 "
              b"seek=$i count=1 oflag=direct conv=sync,fsync 2>/dev/null && echo done $i; "
              b"i=$((i+1)); done\n")
    buf = b""
    while len(re.findall(rb"done \d+\r?\n", buf)) < 40:
        data = s.recv(65536)
        assert data, buf[-2000:]
        buf += data
    os.kill(pid, signal.SIGKILL)
    while True:                                    # what it printed before it died
        try:
            data = s.recv(65536)
        except OSError:
            break
        if not data:
            break
        buf += data
    s.close()
    done = [int(n) for n in re.findall(rb"done (\d+)\r?\n", buf)]
    assert done == list(range(len(done))) and len(done) >= 40
    data = img.read_bytes()
    for n in done:
        rec = data[n * 512:(n + 1) * 512]
        assert rec == b"REC%07d" % n + bytes(502), f"record {n}: {rec[:16]!r}"
    host.wait_for(lambda: name not in host.names(), 30, "pyxend to drop the dead domain")
    assert "VMM exited unexpectedly" in host.px("dmesg").stdout
