"""Host networking against the real kernel: TAPs and a bridge created by pyxen inside a private
network namespace (``ip netns`` is used only to make and remove the namespace and to run the
scenario in it). Frames go TAP -> bridge -> TAP and TAP <-> a socket on the bridge address, and
the kernel's view of checksums and GSO is compared with pyxen.backends.netif's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2 (to create a test network namespace)")

# Runs inside the namespace; each scenario asserts and prints a JSON result on its last line.
SCENARIOS = textwrap.dedent(r'''
    import json, os, select, socket, struct, sys, time
    from pyxen.errors import HostNetworkError
    from pyxen.host import bridge, tap as T
    from pyxen.host.bridge import attach, bridge_exists, delete_bridge, detach, ensure_bridge
    from pyxen.host.tap import Tap, pack_vnet_hdr, unpack_vnet_hdr
    from pyxen.backends import netif as N

    GUEST_MAC = bytes.fromhex("00163e0000aa")
    OTHER_MAC = bytes.fromhex("00163e0000bb")

    def rfc1071(data):
        if len(data) % 2:
            data += b"\0"
        s = 0
        for i in range(0, len(data), 2):
            s += (data[i] << 8) + data[i + 1]
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    def ref_udp4_ok(frame):
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        tot = struct.unpack_from("!H", ip, 2)[0]
        seg = ip[ihl:tot]
        pseudo = ip[12:20] + bytes([0, ip[9]]) + struct.pack("!H", len(seg))
        return rfc1071(pseudo + seg) == 0

    def ip4(src, dst, proto, payload):
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, 0x4000,
                                    64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)))
        hdr[10:12] = struct.pack("!H", rfc1071(bytes(hdr)))
        return bytes(hdr) + payload

    def udp_frame(dst_mac, src_ip, dst_ip, payload, sport=5555, dport=7777):
        u = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        return dst_mac + GUEST_MAC + b"\x08\x00" + ip4(src_ip, dst_ip, 17, u)

    def read_matching(t, pred, timeout=5.0):
        buf = bytearray(T.MAX_FRAME)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([t.fd], [], [], 0.2)
            while True:
                k = t.read(buf)
                if not k:
                    break
                frame = bytes(buf[12:k])
                if pred(frame):
                    return bytes(buf[:12]), frame
        raise AssertionError(f"no matching frame on {t.name}")

    def is_udp_to(port):
        return lambda f: (len(f) >= 42 and f[12:14] == b"\x08\x00" and f[23] == 17
                          and struct.unpack_from("!H", f, 36)[0] == port)

    def bridge_mac(name):
        with open(f"/sys/class/net/{name}/address") as fh:
            return bytes.fromhex(fh.read().strip().replace(":", ""))

    def scenario_bridge():
        name = "pyxtbr0"
        assert not bridge_exists(name)
        idx = ensure_bridge(name, "10.77.0.1/24")
        assert idx == ensure_bridge(name, "10.77.5.1/24") and bridge_exists(name)
        from pyroute2 import IPRoute
        with IPRoute() as ip:
            addrs = [a.get("IFA_ADDRESS") for a in ip.get_addr(index=idx, family=socket.AF_INET)]
            up = ip.link("get", index=idx)[0]["flags"] & 1
        assert addrs == ["10.77.0.1"], addrs          # set only on creation
        assert up
        errors = {}
        with Tap("vif9.0") as t:
            try:
                ensure_bridge("vif9.0")
            except HostNetworkError as e:
                errors["not_bridge"] = str(e)
            try:
                delete_bridge("vif9.0")
            except HostNetworkError as e:
                errors["refuse_delete"] = str(e)
            attach("vif9.0", name)
            with open("/sys/class/net/vif9.0/master/ifindex") as fh:
                assert int(fh.read()) == idx
            detach("vif9.0")
            assert not os.path.exists("/sys/class/net/vif9.0/master")
            try:
                attach("vif9.0", "vif9.0")
            except HostNetworkError as e:
                errors["attach_non_bridge"] = str(e)
        for call in (lambda: attach("nosuch0", name), lambda: detach("nosuch0"),
                     lambda: attach("vif9.0", name)):
            try:
                call()
            except HostNetworkError as e:
                errors.setdefault("missing", []).append(str(e))
        try:
            ensure_bridge("x" * 16)
        except HostNetworkError as e:
            errors["long"] = str(e)
        assert delete_bridge(name) is True and delete_bridge(name) is False
        assert not bridge_exists(name)
        return errors

    def scenario_race():
        import multiprocessing as mp
        results = []
        for i in range(5):
            name = f"pyxrace{i}"
            with mp.get_context("fork").Pool(4) as pool:
                idxs = pool.starmap(ensure_bridge, [(name, "10.66.0.1/24")] * 8)
            assert len(set(idxs)) == 1, idxs
            from pyroute2 import IPRoute
            with IPRoute() as ip:
                n_addr = len(ip.get_addr(index=idxs[0], family=socket.AF_INET))
            assert n_addr == 1
            results.append(idxs[0])
            assert delete_bridge(name)
        return results

    def scenario_tap_basics():
        out = {}
        t = Tap("vif1.0", mtu=9000)
        out["ifindex"] = t.ifindex
        with open("/sys/class/net/vif1.0/address") as fh:
            out["mac"] = fh.read().strip()
        with open("/sys/class/net/vif1.0/mtu") as fh:
            out["mtu"] = int(fh.read())
        with open("/sys/class/net/vif1.0/flags") as fh:
            out["up"] = bool(int(fh.read(), 16) & 1)
        for bad in ("vif1.0", "a" * 16, "bad/name", ""):
            try:
                Tap(bad)
            except HostNetworkError as e:
                out.setdefault("errors", []).append(str(e))
        buf = bytearray(T.MAX_FRAME)
        t.set_link(up=False)
        out["read_empty"] = t.read(buf)
        out["write_down"] = t.write(pack_vnet_hdr() + udp_frame(OTHER_MAC, "10.1.0.1",
                                                               "10.1.0.2", b"x"))
        t.close()
        t.close()
        out["gone"] = bridge.ifindex("vif1.0") is None
        try:
            t.read(buf)
        except HostNetworkError as e:
            out["closed"] = str(e)
        return out

    def scenario_tap_to_tap():
        ensure_bridge()
        a, b, c = Tap("vif1.0"), Tap("vif2.0"), Tap("vif3.0")
        for t in (a, b, c):
            attach(t.name)
        c.set_offload(0)           # c cannot take partial checksums: the kernel completes them
        time.sleep(0.1)
        out = {}
        payload = bytes(range(256)) * 3 + b"odd"
        frame = bytearray(udp_frame(b"\xff" * 6, "10.88.0.2", "10.88.0.9", payload))
        assert N.seed_partial_checksum(frame)          # netfront's CHECKSUM_PARTIAL frame
        hdr = N.tx_to_vnet_hdr(frame, csum_blank=True, data_validated=True)
        assert unpack_vnet_hdr(hdr).csum_start == 34
        assert a.writev([hdr, frame]) == 12 + len(frame)
        vh, got = read_matching(b, is_udp_to(7777))
        h = unpack_vnet_hdr(vh)
        out["b_hdr"] = list(h)
        assert got == bytes(frame)                     # untouched through the bridge
        flags, gso = N.vnet_hdr_to_rx(vh)
        assert flags == N.NETRXF_csum_blank | N.NETRXF_data_validated and gso is None
        assert (h.csum_start, h.csum_offset) == N.csum_offsets(got)
        done = bytearray(got)
        assert N.complete_checksum(done) and ref_udp4_ok(bytes(done))
        # the kernel completed it for c: must equal ours byte for byte
        vh, got_c = read_matching(c, is_udp_to(7777))
        assert unpack_vnet_hdr(vh).flags & 1 == 0
        assert got_c == bytes(done), (got_c[40:42].hex(), done[40:42].hex())
        out["kernel_csum"] = got_c[40:42].hex()
        # a TCP super-frame from the "guest": the kernel segments it for c (no TSO)
        seg_payload = os.urandom(3000)
        tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
        big = bytearray(b"\xff" * 6 + GUEST_MAC + b"\x08\x00" +
                        ip4("10.88.0.2", "10.88.0.9", 6, tcp + seg_payload))
        gso = N.unpack_extra(N.pack_extra_gso(1000, N.XEN_NETIF_GSO_TYPE_TCPV4))
        N.seed_partial_checksum(big)
        hdr = N.tx_to_vnet_hdr(big, True, False, gso)
        assert a.writev([hdr, big]) == 12 + len(big)
        segs = []
        while len(segs) < 3:
            _, f = read_matching(c, lambda f: len(f) > 54 and f[23] == 6)
            segs.append(f)
        assert all(N.verify_checksum(f) for f in segs)
        assert b"".join(f[54:] for f in segs) == seg_payload
        out["segments"] = [len(f) for f in segs]
        for t in (a, b, c):
            t.close()
        assert delete_bridge()
        return out

    def scenario_host_socket():
        ensure_bridge()                                 # 10.88.0.1/24
        t = Tap("vif5.0")
        attach(t.name)
        time.sleep(0.1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("10.88.0.1", 7777))
        sock.settimeout(2.0)
        brmac = bridge_mac("pyxenbr0")
        out = {}

        def send(frame, hdr):
            assert t.writev([hdr, frame]) == 12 + len(frame)

        def recv():
            try:
                return sock.recvfrom(4096)
            except socket.timeout:
                return None

        # 1. full checksum computed by complete_checksum, no offload flags: the kernel checks it
        f1 = bytearray(udp_frame(brmac, "10.88.0.2", "10.88.0.1", b"checked by the kernel"))
        assert N.complete_checksum(f1) and ref_udp4_ok(bytes(f1))
        send(f1, pack_vnet_hdr())
        out["full"] = recv()[0].decode()
        # 2. negative control: a wrong checksum is dropped
        f2 = bytearray(f1)
        f2[40] ^= 0x5A
        send(f2, pack_vnet_hdr())
        out["bad_dropped"] = recv() is None
        # 3. NEEDS_CSUM with the netfront-style seed
        f3 = bytearray(udp_frame(brmac, "10.88.0.2", "10.88.0.1", b"partial from the guest"))
        N.seed_partial_checksum(f3)
        send(f3, N.tx_to_vnet_hdr(f3, True, True))
        out["partial"] = recv()[0].decode()
        # 4. host -> guest: the kernel hands us the datagram; check its checksum either way
        from pyroute2 import IPRoute
        with IPRoute() as ip:
            ip.neigh("add", dst="10.88.0.2", lladdr=GUEST_MAC.hex(":"),
                     ifindex=bridge.ifindex("pyxenbr0"), state=0x80)    # NUD_PERMANENT
        out["to_guest"] = []
        for offload in (T.DEFAULT_OFFLOAD, 0):
            t.set_offload(offload)
            sock.sendto(b"hello guest %d" % offload, ("10.88.0.2", 9999))
            vh, f = read_matching(t, is_udp_to(9999))
            h = unpack_vnet_hdr(vh)
            flags, _ = N.vnet_hdr_to_rx(vh)
            buf = bytearray(f)
            if h.flags & 1:
                assert (h.csum_start, h.csum_offset) == N.csum_offsets(f)
                assert N.complete_checksum(buf)
            else:
                assert N.verify_checksum(f)
                theirs = bytes(buf[40:42])
                assert N.complete_checksum(buf) and bytes(buf[40:42]) == theirs
            assert ref_udp4_ok(bytes(buf))
            out["to_guest"].append([h.flags, flags])
        sock.close()
        t.close()
        delete_bridge()
        return out

    if __name__ == "__main__":
        print(json.dumps(globals()["scenario_" + sys.argv[1]]()))
''')


@pytest.fixture
def netns():
    name = f"pyxen-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(netns: str, scenario: str, tmp_path) -> object:
    script = tmp_path / "scenarios.py"
    script.write_text(SCENARIOS)
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(script), scenario],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{scenario} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bridge_management(netns, tmp_path):
    errors = run_in(netns, "bridge", tmp_path)
    assert "vif9.0" in errors["not_bridge"] and "not a bridge" in errors["not_bridge"]
    assert "refusing" in errors["refuse_delete"]
    assert "not a bridge" in errors["attach_non_bridge"]
    assert len(errors["missing"]) == 3
    assert "nosuch0" in errors["missing"][0] and "nosuch0" in errors["missing"][1]
    assert "vif9.0" in errors["missing"][2]                   # the TAP vanished on close
    assert "15" in errors["long"]


def test_bridge_creation_race(netns, tmp_path):
    assert len(run_in(netns, "race", tmp_path)) == 5


def test_tap_basics(netns, tmp_path):
    out = run_in(netns, "tap_basics", tmp_path)
    assert out["ifindex"] > 0 and out["mac"] == "fe:ff:ff:ff:ff:ff" and out["mtu"] == 9000
    assert out["up"] and out["read_empty"] == 0 and out["gone"]
    assert out["write_down"] < 0                              # -EIO: dropped, not raised
    assert len(out["errors"]) == 4 and "already exists" in out["errors"][0]
    assert "closed" in out["closed"]


def test_frame_between_taps_through_bridge(netns, tmp_path):
    out = run_in(netns, "tap_to_tap", tmp_path)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = out["b_hdr"]
    assert flags & 1 and (csum_start, csum_offset) == (34, 6) and gso_type == 0
    assert out["segments"] == [1054, 1054, 1054]


def test_frames_to_and_from_host_socket(netns, tmp_path):
    out = run_in(netns, "host_socket", tmp_path)
    assert out["full"] == "checked by the kernel"
    assert out["bad_dropped"] is True
    assert out["partial"] == "partial from the guest"
    # with TUN_F_CSUM the kernel leaves the checksum partial (NEEDS_CSUM); without, it is full
    (vflags_on, rx_on), (vflags_off, rx_off) = out["to_guest"]
    assert vflags_on & 1 and rx_on & 2
    assert not vflags_off & 1
