"""A backend replaced under a running Linux guest (what a restarted driver domain does): the
new instance re-attaches to the frontend's rings and the guest's traffic and I/O carry on.

The guest runs a loop (pings to the host, or checksummed disk writes); the test swaps the
backend in the middle through ``DeviceManager.restart_nic`` / ``restart_disk`` -- the code
behind the VMM's ``device_restart`` control op -- and checks that the loop kept working.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time

import pytest

from pyxen.testing.toolstack import guest_image

pytestmark = pytest.mark.tcg


@pytest.fixture(scope="module")
def image():
    return guest_image()


class Guest:
    """A booted domain running ``command`` once; output collected in :attr:`out`."""

    def __init__(self, command: str, **cfg) -> None:  # type: ignore[no-untyped-def]
        from pyxen.image.runspec import ExitMarkerFilter, new_nonce
        from pyxen.vmm.builder import DomainConfig, build
        from pyxen.vmm.run import BASE_CMDLINE, RunOptions, _initrd_bytes
        nonce = new_nonce()
        kernel, initrd = _initrd_bytes(RunOptions(command=command), "run", nonce,
                                       lambda s: None)
        self.flt = ExitMarkerFilter(nonce)
        self.out = ""
        self.lock = threading.Lock()
        self.initrd = tempfile.NamedTemporaryFile(prefix="pyxen-test-initrd-")
        self.initrd.write(initrd)
        self.initrd.flush()
        self.vmm = build(DomainConfig(kernel=kernel, name="restart-test", memory=128,
                                      cmdline=BASE_CMDLINE, accel="tcg",
                                      modules=[(self.initrd.name, "")], **cfg),
                         stream=self._stream)
        self.vmm.start()

    def _stream(self, channel: str, data: bytes) -> None:
        if channel == "console":
            with self.lock:
                self.out += self.flt.feed(data).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                m = re.search(pattern, self.out)
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen; output:\n{self.out}")

    def finish(self, timeout: float = 120) -> int | None:
        self.vmm.wait(timeout)
        status = self.flt.status
        self.vmm.destroy()
        self.initrd.close()
        return status


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_netback_restart_keeps_the_guest_online(image):
    from pyxen.toolstack.xlvif import random_mac
    from pyxen.vmm.devices import NicConfig
    nic = NicConfig(devid=0, mac=random_mac(), vifname=f"vt{os.getpid()}.0")
    g = Guest("ip link set eth0 up && ip addr add 10.88.0.230/24 dev eth0; "
              "i=0; while [ $i -lt 60 ]; do "
              "if ping -c1 -W1 10.88.0.1 >/dev/null; then echo PING$i=ok; "
              "else echo PING$i=lost; fi; i=$((i+1)); done", nics=[nic])
    try:
        g.wait_for(r"PING3=ok")
        old = g.vmm.devices.nics[0][1]
        new = g.vmm.devices.restart_nic(0)
        assert new is not old and new.state == 4
        first_after = int(g.wait_for(r"PING(\d+)=\w+\n(?:.*\n)*?PING(\d+)=ok").group(2))
        g.wait_for(r"PING59=")
    finally:
        status = g.finish()
    assert status == 0, g.out
    results = dict(re.findall(r"PING(\d+)=(\w+)", g.out))
    after = [results[str(i)] for i in range(first_after + 5, 60)]
    assert after and all(r == "ok" for r in after), g.out
    assert sum(r == "lost" for r in results.values()) <= 3, g.out
    assert new.stats["rx_packets"] > 0 and new.stats["tx_packets"] > 0


def test_blkback_restart_loses_no_io(image, tmp_path):
    from pyxen.vmm.devices import DiskConfig
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    disk = DiskConfig(target=str(img), vdev="xvdb", devid=51728)
    # record i is written to sector i and read back; a mismatch or an I/O error shows up
    g = Guest("i=0; while [ $i -lt 300 ]; do "
              "printf 'rec%05d' $i | dd of=/dev/xvdb bs=512 seek=$i conv=sync,fsync "
              "oflag=direct 2>/dev/null || echo IOERR$i; "
              "r=$(dd if=/dev/xvdb bs=512 skip=$i count=1 iflag=direct 2>/dev/null "
              "| head -c 8); [ \"$r\" = \"$(printf rec%05d $i)\" ] || echo BAD$i; "
              "echo W$i; i=$((i+1)); done; echo ALLDONE", disks=[disk])
    try:
        g.wait_for(r"W40\n")
        g.vmm.devices.restart_disk(51728)
        g.wait_for(r"W120\n")
        g.vmm.devices.restart_disk(51728)
        g.wait_for(r"ALLDONE", timeout=240)
    finally:
        status = g.finish()
    assert status == 0, g.out
    assert "IOERR" not in g.out and "BAD" not in g.out, g.out
    data = img.read_bytes()
    for i in range(300):
        assert data[i * 512:i * 512 + 8] == b"rec%05d" % i
