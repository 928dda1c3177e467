"""Linux's xen-blkfront and xen-netfront on pyxen's backends, through ``pyxen run``.

Disks: a raw image gets an ext2 filesystem and a file in one boot; a second boot reads the
file back; the host sees the same bytes (``debugfs``); a read-only disk refuses writes and
stays bit-identical; a qcow2 image works through qemu-storage-daemon. Network: two guests on
pyxen's default bridge ping each other and the host and move a TCP stream intact
(``examples/net-pair.sh``, a smaller transfer than the demo's default).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyxen.testing.toolstack import guest_image

pytestmark = pytest.mark.tcg

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image():
    return guest_image()


def _run(command: str, disks: list[str] = (), timeout: float = 240):
    from pyxen.toolstack.xldisk import disk_config, parse_disk_spec
    from pyxen.vmm.run import RunOptions, run
    out = io.BytesIO()
    r = run(RunOptions(command=command, memory=128, accel="tcg", timeout=timeout,
                       disks=[disk_config(parse_disk_spec(d)) for d in disks]), out)
    text = out.getvalue().decode(errors="replace")
    assert r.status is not None, f"no exit status ({r.reason} {r.detail}):\n{r.console_tail}"
    return r.status, text


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ext2_image(image, tmp_path_factory):
    """A 32 MiB raw image the guest formatted and wrote ``/hello`` to."""
    img = tmp_path_factory.mktemp("disk") / "d.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    status, out = _run("mke2fs -q /dev/xvdb >/dev/null && mkdir -p /m && mount /dev/xvdb /m "
                       "&& echo written-by-the-guest > /m/hello && sync && umount /m "
                       "&& echo FORMATTED", [f"{img},raw,xvdb,rw"])
    assert status == 0 and "FORMATTED" in out, out
    return img


def test_files_survive_a_reboot(ext2_image):
    status, out = _run("mkdir -p /m && mount /dev/xvdb /m && cat /m/hello && umount /m",
                       [f"{ext2_image},raw,xvdb,rw"])
    assert status == 0, out
    assert "written-by-the-guest" in out


@pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs' debugfs missing")
def test_host_sees_the_guests_bytes(ext2_image):
    cat = subprocess.run(["debugfs", "-R", "cat /hello", str(ext2_image)],
                         capture_output=True, text=True, check=True)
    assert cat.stdout.strip() == "written-by-the-guest"
    fsck = subprocess.run(["e2fsck", "-fn", str(ext2_image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_read_only_disk_refuses_writes(ext2_image):
    before = _sha(ext2_image)
    status, out = _run("cat /sys/block/xvdb/ro; "
                       "dd if=/dev/zero of=/dev/xvdb bs=4096 count=4 2>&1; echo DD=$?; "
                       "mkdir -p /m && mount -o ro /dev/xvdb /m && cat /m/hello; "
                       "echo x > /m/new 2>&1; echo WRITE=$?",
                       [f"{ext2_image},raw,xvdb,ro"])
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0].strip() == "1"                      # the kernel marked the disk read-only
    assert "DD=0" not in out and "DD=" in out
    assert "written-by-the-guest" in out
    assert "WRITE=0" not in out
    assert _sha(ext2_image) == before


def test_bad_disk_specs_are_named(image, tmp_path):
    from pyxen.errors import ConfigError
    with pytest.raises(ConfigError, match="nope.img"):
        _run("true", [f"{tmp_path}/nope.img,raw,xvdb,rw"])
    img = tmp_path / "x.img"
    img.write_bytes(bytes(1 << 20))
    with pytest.raises(ConfigError, match="vdev xvdb is already in use"):
        _run("true", [f"{img},raw,xvdb,ro", f"{img},raw,xvdb,ro"])
    with pytest.raises(ConfigError, match="vmdk9"):
        _run("true", [f"{img},vmdk9,xvdb,rw"])


@pytest.mark.skipif(shutil.which("qemu-img") is None or
                    shutil.which("qemu-storage-daemon") is None or
                    not os.path.exists("/dev/fuse"), reason="needs qemu-utils, QSD and FUSE")
def test_qcow2_through_qemu_storage_daemon(image, tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M"], check=True)
    status, out = _run("mke2fs -q /dev/xvdb >/dev/null && mkdir -p /m && mount /dev/xvdb /m "
                       "&& echo in-qcow2 > /m/q && sync && umount /m && echo OK",
                       [f"{img},qcow2,xvdb,rw"])
    assert status == 0 and "OK" in out, out
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    status, out = _run("mkdir -p /m && mount /dev/xvdb /m && cat /m/q", [f"{img},qcow2,xvdb,ro"])
    assert status == 0 and "in-qcow2" in out, out


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_two_guests_on_a_bridge(image):
    env = dict(os.environ, PYXEN=str(REPO / ".venv" / "bin" / "pyxen"))
    r = subprocess.run([str(REPO / "examples" / "net-pair.sh"), "8"], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "net-pair: OK (8 MiB intact" in r.stdout
    assert "A: ping host ok" in r.stdout and "B: ping A ok" in r.stdout
