"""Save/restore and live migration of a running Linux guest between two pyxen "hosts".

The hosts (pyxen.testing.hostpair) are two network namespaces on this machine, each with its
own pyxend (relocation service on its bridge address), xenstored and state directory, their
bridges joined by a veth pair. One guest (module fixture, 128 MiB, tcg) has a disk (xvdb,
ext2, shared storage: the same image path on both hosts) and a NIC on the bridge at
10.88.0.70. In the guest a counter loop appends 1, 2, 3, ... to a file on xvdb; from host A's
namespace a pinger sends one ICMP echo per second to the guest.

Checked: ten migrations there and back with no counter value lost or repeated, at most two
pings lost, e2fsck clean afterwards; save + restore in the middle of the loop resumes it and
the guest's clock does not go backwards; every failure (target refuses, unreachable host,
connection cut mid-stream, target VMM killed before the final handshake) leaves the domain
running on the source with its loop intact; a corrupted or truncated save file is refused
naming the record and offset, and creates nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyxen.testing.hostpair import HostPair
from pyxen.testing.toolstack import require_guest_image

pytestmark = pytest.mark.tcg

GUEST_IP = "10.88.0.70"
CFG = """\
name    = "mig"
type    = "pvh"
memory  = 128
kernel  = "debian/vmlinuz"
ramdisk = "debian/initrd.img"
extra   = "console=hvc0 quiet loglevel=1"
accel   = "tcg"
disk    = [ "{img},raw,xvdb,rw" ]
vif     = [ "bridge=pyxenbr0,mac=00:16:3e:5a:{m1:02x}:{m2:02x}" ]
"""
LOOP = ("(i=$(wc -l < /mnt/c 2>/dev/null || echo 0); while [ ! -e /tmp/stop ]; do "
        "i=$((i+1)); echo $i >> /mnt/c; usleep 50000; done; rm /tmp/stop) "
        "</dev/null >/dev/null 2>&1 & :")


def _check_counter(host, name: str) -> int:
    """Stop the loop, then check the file holds 1..N, each once; returns N."""
    host.sh(name, "touch /tmp/stop; while [ -e /tmp/stop ]; do usleep 50000; done")
    out = host.sh(name, "awk 'NR != $1 {bad++} END {print \"LINES=\" NR \" BAD=\" bad+0}' "
                        "/mnt/c")
    m = re.search(r"LINES=(\d+) BAD=(\d+)", out)
    assert m, out
    assert m.group(2) == "0", f"counter file has {m.group(2)} lost/repeated values:\n" + \
        host.sh(name, "awk 'NR != $1 {print NR, $1}' /mnt/c | head")
    return int(m.group(1))


def _start_loop(host, name: str) -> None:
    host.sh(name, LOOP)


def _where(pair: HostPair, name: str):
    for h in (pair.a, pair.b):
        if name in h.names():
            return h
    raise AssertionError(f"{name} runs on neither host")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (network namespaces)")
    require_guest_image()
    base = tmp_path_factory.mktemp("migpair")
    p = HostPair(str(base), first_domid=1)
    try:
        p.setup()
        yield p
    finally:
        for h in (p.a, p.b):
            print(f"--- {h.ns} pyxend log ---\n{h.log('pyxend.log')}", file=sys.stderr)
        p.close()


@pytest.fixture(scope="module")
def guest(pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("migguest")
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    cfg = d / "mig.cfg"
    cfg.write_text(CFG.format(img=img, m1=os.getpid() & 0xFF, m2=(os.getpid() >> 8) & 0xFF))
    name = pair.a.boot(cfg)
    out = pair.a.sh(name, f"mke2fs /dev/xvdb >/dev/null 2>&1; mkdir -p /mnt && mount -t ext2 "
                          f"/dev/xvdb /mnt && ip link set eth0 up && ip addr add {GUEST_IP}/24 "
                          f"dev eth0 && echo SETUP=$((2+2))")
    assert "SETUP=4" in out, out
    _start_loop(pair.a, name)
    yield name, img


def test_migrate_back_and_forth_ten_times(pair, guest):
    name, img = guest
    out = str(Path(pair.base) / "ping.json")
    pinger = pair.a.popen(sys.executable, "-m", "pyxen.testing.pinger", GUEST_IP, out)
    pauses = []
    try:
        time.sleep(2)
        for i in range(10):
            src, dst = (pair.a, pair.b) if i % 2 == 0 else (pair.b, pair.a)
            r = src.px("migrate", name, dst.address, timeout=300)
            m = re.search(r"paused ([\d.]+) ms", r.stderr)
            assert m, r.stderr
            pauses.append(float(m.group(1)))
            assert name in dst.names() and name not in src.names()
            time.sleep(1)
    finally:
        pinger.send_signal(signal.SIGTERM)
        pinger.wait(timeout=30)
    host = _where(pair, name)
    assert host is pair.a                       # ten moves: back where it started
    n = _check_counter(host, name)
    assert n > 50
    result = json.loads(Path(out).read_text())
    print(f"pauses (ms): {pauses}; ping: {result['sent']} sent, lost {result['lost']}")
    assert result["sent"] >= 10
    assert len(result["lost"]) <= 2, result
    # the filesystem is clean: unmount in the guest, check the shared image on the host
    assert "UMOUNT=1" in host.sh(name, "umount /mnt && echo UMOUNT=$((0+1))")
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    host.sh(name, "mount -t ext2 /dev/xvdb /mnt")
    _start_loop(host, name)


def test_save_and_restore_mid_loop(pair, guest, tmp_path):
    name, _img = guest
    host = _where(pair, name)
    before = float(host.sh(name, "cat /proc/uptime").split("\n")[-2].split()[0])
    path = tmp_path / "mig.save"
    r = host.px("save", name, str(path))
    assert "Saved" in r.stderr and name not in host.names()
    r = host.px("restore", str(path))
    assert name in host.names(), r.stderr
    after = float(host.sh(name, "cat /proc/uptime").split("\n")[-2].split()[0])
    assert after >= before, (before, after)
    time.sleep(1)
    assert _check_counter(host, name) > 0
    _start_loop(host, name)


def _assert_still_running_on(host, name: str) -> None:
    assert name in host.names()
    st = host.info(name)["status"]
    assert st["state"] == "running", st
    a = host.sh(name, "wc -l < /mnt/c")
    time.sleep(0.5)
    b = host.sh(name, "wc -l < /mnt/c")
    assert a != b, "the counter loop stopped"


def test_migrate_to_unreachable_host_fails_fast(pair, guest):
    name, _ = guest
    host = _where(pair, name)
    t0 = time.monotonic()
    r = host.px("migrate", "--port", "1", name, "10.88.0.2", check=False)
    assert r.returncode != 0 and "cannot reach" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20
    _assert_still_running_on(host, name)


def test_target_refuses(pair, guest, tmp_path):
    name, _ = guest
    src = _where(pair, name)
    dst = pair.b if src is pair.a else pair.a
    cfg = tmp_path / "same-name.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "pvh"\nmemory = 64\nkernel = "debian/vmlinuz"\naccel = "tcg"\n')
    dst.px("create", "-p", str(cfg))
    try:
        r = src.px("migrate", name, dst.address, check=False)
        assert r.returncode != 0 and "refused the domain" in r.stderr and "in use here" in r.stderr, r.stderr
        _assert_still_running_on(src, name)
    finally:
        dst.px("destroy", name)


def test_connection_cut_mid_stream(pair, guest):
    """The receiving VMM is killed as soon as it exists: the source is mid pre-copy."""
    name, _ = guest
    src = _where(pair, name)
    dst = pair.b if src is pair.a else pair.a
    proc = src.popen(sys.executable, "-m", "pyxen.cli.main", "migrate", name, dst.address,
                     env=src.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.monotonic() + 60
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        for pid in os.listdir("/proc"):
            try:
                cmd = Path("/proc", pid, "cmdline").read_bytes()
            except OSError:
                continue
            if b"--receive-fd" in cmd and dst.base.encode() in cmd:
                os.kill(int(pid), signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    _out, err = proc.communicate(timeout=120)
    assert killed, "never saw the receiving VMM"
    assert proc.returncode != 0, err
    _assert_still_running_on(src, name)
    assert name not in dst.names()


def test_target_vmm_dies_before_final_handshake(pair, guest):
    name, _ = guest
    src = _where(pair, name)
    dst = pair.b if src is pair.a else pair.a
    fault = Path(dst.base, "run", "vmm", "migrate-fault")
    fault.parent.mkdir(parents=True, exist_ok=True)
    fault.write_text("before-ready")
    try:
        r = src.px("migrate", name, dst.address, check=False, timeout=300)
    finally:
        fault.unlink()
    assert r.returncode != 0 and "closed the connection" in r.stderr, r.stderr
    _assert_still_running_on(src, name)
    assert name not in dst.names()


def test_bad_save_files_are_refused_and_create_nothing(pair, guest, tmp_path):
    """Save (the domain is gone), try damaged copies -- each refused naming the record and
    offset, no domain appears -- then restore the good file: the loop carries on."""
    name, _ = guest
    host = _where(pair, name)
    good = tmp_path / "good.save"
    host.px("save", name, str(good))
    data = good.read_bytes()
    cases = {"truncated": data[:len(data) * 2 // 3],
             "crc-32": data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x40])
             + data[len(data) // 2 + 1:],
             "version": data[:15] + b"\x09" + data[16:]}
    for message, bad in cases.items():
        path = tmp_path / f"bad-{message}.save"
        path.write_bytes(bad)
        r = host.px("restore", str(path), check=False)
        assert r.returncode != 0, r.stderr
        assert message in r.stderr.lower() and "offset" in r.stderr, r.stderr
        assert name not in host.names()
    # well-formed streams with hostile contents: named, refused, nothing created
    from pyxen.migration import stream as S
    reader = S.StreamReader()
    config_rec = next(r for r in reader.feed(data[:1 << 20]) if r.type == S.DOMAIN_CONFIG)
    config = S.parse_json(config_rec)
    other_engine = dict(config, state_format="tcg:unicorn-0.0-elsewhere")
    crafted = {
        "outside the domain's memory": (config, [S.encode_page_data([(0xFFFFFFFFF,
                                                                      bytes(4096))])]),
        "vcpu 7": (config, [S.encode_vcpu_state(7, b"x" * 64)]),
        "no xen_state": (config, []),
        "incompatible engine": (other_engine, []),
    }
    for message, (cfg, body) in crafted.items():
        parts = [S.stream_headers(), S.encode_json(S.DOMAIN_CONFIG, cfg)]
        for piece in body:
            parts += [bytes(p) for p in piece] if isinstance(piece, list) else [piece]
        parts.append(S.encode_end())
        path = tmp_path / "crafted.save"
        path.write_bytes(b"".join(parts))
        r = host.px("restore", str(path), check=False)
        assert r.returncode != 0, r.stderr
        assert message in r.stderr.lower(), r.stderr
        assert name not in host.names()
    host.px("restore", str(good))
    time.sleep(1)
    assert _check_counter(host, name) > 0
    _start_loop(host, name)


def test_migrate_copying_storage(pair, guest):
    """--copy-storage: the disk travels in the stream (hosts without shared storage); the
    guest goes on writing during pre-copy and nothing is lost; the copy checks clean."""
    name, img = guest
    src = _where(pair, name)
    dst = pair.b if src is pair.a else pair.a
    r = src.px("migrate", "--copy-storage", name, dst.address, timeout=300)
    assert "Migrated" in r.stderr, r.stderr
    st, rows = dst.api("GET", f"/v1/domains/{name}/disks")
    assert st == 200, rows
    target = rows[0]["target"]
    assert target != str(img) and target.startswith(dst.base), target
    assert _check_counter(dst, name) > 0
    assert "UMOUNT=1" in dst.sh(name, "umount /mnt && echo UMOUNT=$((0+1))")
    fsck = subprocess.run(["e2fsck", "-fn", target], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dst.sh(name, "mount -t ext2 /dev/xvdb /mnt")
    _start_loop(dst, name)
    # and back, on (now shared) storage: both "hosts" see the copy's path
    dst.px("migrate", name, src.address, timeout=300)
    assert _check_counter(src, name) > 0
    _start_loop(src, name)


def test_example_migrate_pair_script():
    """examples/migrate-pair.sh (one round trip) passes its own checks and cleans up."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2")
    script = Path(__file__).resolve().parents[2] / "examples" / "migrate-pair.sh"
    def namespaces() -> set[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}
    before = namespaces()
    r = subprocess.run([str(script), "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "migrate-pair: OK" in r.stdout + r.stderr
    assert not {n for n in namespaces() - before if n.startswith("pxm")}


def test_migrate_with_guest_suspend(pair, guest):
    """--mode suspend: Xen's cooperative protocol. The guest suspends itself
    (control/shutdown = suspend), resumes in a new domain on the target and reconnects its
    disk and NIC through xenbus; its counter loop goes on and it answers pings."""
    name, _img = guest
    src = _where(pair, name)
    dst = pair.b if src is pair.a else pair.a
    r = src.px("migrate", "--mode", "suspend", name, dst.address, timeout=300)
    assert "Migrated" in r.stderr and "guest-suspend" in r.stderr, r.stderr
    assert name in dst.names() and name not in src.names()
    out = dst.sh(name, "dmesg | grep -c 'suspending xenstore'")
    assert re.search(r"^[1-9]\d*\r?$", out, re.M), out         # the guest's own suspend ran
    ping = str(Path(pair.base) / "ping-suspend.json")
    pinger = pair.a.popen(sys.executable, "-m", "pyxen.testing.pinger", GUEST_IP, ping,
                          "--interval", "0.5")
    time.sleep(3)
    pinger.send_signal(signal.SIGTERM)
    pinger.wait(timeout=30)
    result = json.loads(Path(ping).read_text())
    assert result["received"] >= 3, result            # netfront reconnected
    assert _check_counter(dst, name) > 0               # blkfront reconnected, nothing lost
    _start_loop(dst, name)
    dst.px("migrate", name, src.address, timeout=300)  # and back, transparently
    assert name in src.names()


def test_save_restore_with_guest_suspend(pair, guest, tmp_path):
    name, _img = guest
    host = _where(pair, name)
    path = tmp_path / "suspended.save"
    r = host.px("save", "--mode", "suspend", name, str(path))
    assert "Saved" in r.stderr and name not in host.names()
    host.px("restore", str(path))
    time.sleep(1)
    assert _check_counter(host, name) > 0
    _start_loop(host, name)
