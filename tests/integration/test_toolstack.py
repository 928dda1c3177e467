"""The toolstack as a user drives it: ``pyxen create examples/debian.cfg``, ``list``, ``console``,
``shutdown -w``, ``reboot`` with ``on_reboot="restart"``, a pyxend restart under a running
domain, the API's JSON errors, and a guest's xenstore permission denial through its ring.

Everything runs in private directories (``PYXEN_*`` and ``XENSTORED_PATH``), so the CLI
starts its own pyxend, which starts its own xenstored; both are stopped at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pyxen.testing.toolstack import PyxenHost, private_host

pytestmark = pytest.mark.tcg

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_CFG = ROOT / "examples" / "debian.cfg"
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([-rbpscwSd?]{6})\s+(\d+\.\d)$")


class Host(PyxenHost):
    """The shared harness plus ``xl list`` parsing."""

    def rows(self) -> dict[str, tuple]:
        out = self.px("list").stdout.splitlines()
        assert out[0] == "Name" + " " * 40 + "ID   Mem VCPUs\tState\tTime(s)"
        rows = {}
        for line in out[1:]:
            m = ROW.match(line)
            assert m, f"not an xl list row: {line!r}"
            rows[m.group(1)] = m.groups()
        return rows


@pytest.fixture(scope="module")
def host():
    yield from private_host(Host, "pxts-")


def _boot_prompt(host: Host, name: str) -> None:
    host.wait_for(lambda: host.api("GET", f"/v1/domains/{name}")[1].get("console"), 60,
                  f"{name}'s console")
    host.console(name, "\necho READY-$((40+2))\n", "READY-42")


def test_create_list_console_shutdown(host):
    r = host.px("create", str(DEBIAN_CFG), 'accel="tcg"')
    assert "started one" in r.stderr                # the CLI started pyxend, and said so
    assert re.search(r"domain debian created \(id (\d+)\)", r.stderr)
    rows = host.rows()
    assert rows["Domain-0"][1] == "0"
    name, domid, mem, vcpus, state, _t = rows["debian"]
    assert (mem, vcpus) == ("256", "1") and state[2:] == "----" and state[:2] in ("r-", "-b")
    # the console reaches the guest's shell
    out = host.console("debian", "\nuname -r; cat /sys/hypervisor/type\n", "\nxen")
    assert "cloud-amd64" in out
    # xenstore: the libxl tree, read by Debian's xenstore-read through XENSTORED_PATH
    xs = subprocess.run(["xenstore-read", f"/local/domain/{domid}/name"], env=host.env,
                        capture_output=True, text=True, timeout=10)
    assert xs.stdout.strip() == "debian", xs.stderr
    # a clean power-off through control/shutdown and the guest's cooperation
    r = host.px("shutdown", "-w", "debian", timeout=90)
    assert f"Domain {domid} has been shut down, reason code 0" in r.stderr
    assert "debian" not in host.rows()
    dmesg = host.px("dmesg").stdout
    assert "poweroff requested via xenstore" in dmesg
    assert re.search(r"shut down, reason poweroff \(ACPI S5\); action destroy", dmesg)
    # destroyed domains leave nothing in xenstore
    ls = subprocess.run(["xenstore-ls", "/local/domain"], env=host.env, capture_output=True,
                        text=True, timeout=10)
    assert f"\n{domid} " not in "\n" + ls.stdout


def test_reboot_restarts_the_domain(host):
    host.px("create", "-q", str(DEBIAN_CFG), 'accel="tcg"', 'name="rb"')
    first = host.rows()["rb"][1]
    _boot_prompt(host, "rb")
    host.px("reboot", "-w", "rb", timeout=90)
    host.wait_for(lambda: "rb" in host.rows() and host.rows()["rb"][1] != first, 60,
                  "the restarted domain")
    second = host.rows()["rb"][1]
    assert int(second) > int(first)
    _boot_prompt(host, "rb")                       # the new incarnation boots to its shell
    assert "action restart" in host.px("dmesg").stdout
    host.px("destroy", "rb")
    assert "rb" not in host.rows()


def test_pyxend_restart_keeps_running_domains(host):
    host.px("create", "-q", str(DEBIAN_CFG), 'accel="tcg"', 'name="keep"')
    _boot_prompt(host, "keep")
    before = host.rows()["keep"]
    pid = host.api("GET", "/v1/info")[1]["pyxend_pid"]
    os.kill(pid, signal.SIGTERM)
    host.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, "pyxend to exit")
    after = host.rows()["keep"]                      # `list` starts a new pyxend
    assert after[1] == before[1]
    assert host.api("GET", "/v1/info")[1]["pyxend_pid"] != pid
    _boot_prompt(host, "keep")                      # same guest, still alive
    host.px("pause", "keep")
    assert host.rows()["keep"][4][2] == "p"
    host.px("unpause", "keep")
    host.px("rename", "keep", "kept")
    assert host.px("domid", "kept").stdout.strip() == before[1]
    assert host.px("domname", before[1]).stdout.strip() == "kept"
    vl = host.px("vcpu-list", "kept").stdout.splitlines()
    assert vl[0].startswith("Name") and re.match(rf"kept\s+{before[1]}\s+0\s", vl[1])
    assert re.match(r"Name\s+ID Uptime", host.px("uptime").stdout)
    host.px("destroy", "kept")


def test_crash_is_preserved_until_destroyed(host):
    """examples/debian.cfg keeps a crashed domain (on_crash = "preserve"): xl shows it as
    shut down with reason crash until it is destroyed."""
    host.px("create", "-q", str(DEBIAN_CFG), 'accel="tcg"', 'name="boom"')
    _boot_prompt(host, "boom")
    info = host.api("GET", "/v1/domains/boom")[1]
    s = socket.socket(socket.AF_UNIX)
    s.connect(info["console"])
    s.sendall(b"echo c > /proc/sysrq-trigger\n")
    host.wait_for(lambda: host.rows()["boom"][4] == "---sc-", 60, "the crashed state")
    s.close()
    assert "reason crash" in host.px("dmesg").stdout
    host.px("destroy", "boom")
    assert "boom" not in host.rows()


def test_guest_permission_denial_through_its_ring(host):
    """A domU's own xenbus device (a real client) is refused a dom0-owned node and may write
    its data/ directory; served by the standalone xenstored over the guest's ring."""
    host.px("create", "-q", str(DEBIAN_CFG), 'accel="tcg"', 'name="perm"')
    _boot_prompt(host, "perm")
    domid = host.rows()["perm"][1]
    script = (
        "xs() { len=$(( ${#2} + 1 + ${#3} )); exec 3<>/dev/xen/xenbus; "
        "printf \"\\\\$(printf %03o $1)\\\\000\\\\000\\\\000\\\\001\\\\000\\\\000\\\\000"
        "\\\\000\\\\000\\\\000\\\\000\\\\$(printf %03o $len)\\\\000\\\\000\\\\000$2\\\\000$3\" >&3; "
        "dd bs=4096 count=1 <&3 2>/dev/null | tail -c +17 | tr '\\\\0' ' '; echo; "
        "exec 3<&-; }\n"
        "echo W1=$(xs 11 name evil)\necho W2=$(xs 11 data/x hello)\necho DONE-PERM\n")
    out = host.console("perm", script, "DONE-PERM\r\n")
    assert "W1=EACCES" in out and "W2=OK" in out, out
    rd = lambda p: subprocess.run(["xenstore-read", p], env=host.env, capture_output=True,  # noqa: E731
                                  text=True, timeout=10).stdout.strip()
    assert rd(f"/local/domain/{domid}/name") == "perm"
    assert rd(f"/local/domain/{domid}/data/x") == "hello"
    host.px("destroy", "perm")


def test_xenstored_restart_under_a_running_guest(host):
    """Kill -9 xenstored: pyxend starts it again from its state file, the VMM introduces the
    domain again, and the guest's xenbus (watches included) keeps working."""
    host.px("create", "-q", str(DEBIAN_CFG), 'accel="tcg"', 'name="xsr"')
    _boot_prompt(host, "xsr")
    domid = host.rows()["xsr"][1]
    subprocess.run(["xenstore-write", "/tool/marker", "kept"], env=host.env, check=True,
                   timeout=10)
    time.sleep(0.5)                                  # past the snapshot delay
    pids = subprocess.run(["pgrep", "-f", f"xenstored --socket {host.env['XENSTORED_PATH']}"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGKILL)

    def back() -> bool:
        r = subprocess.run(["xenstore-read", "/tool/marker"], env=host.env,
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() == "kept"
    host.wait_for(back, 30, "xenstored to come back with its state")
    rd = subprocess.run(["xenstore-read", f"/local/domain/{domid}/name"], env=host.env,
                        capture_output=True, text=True, timeout=10)
    assert rd.stdout.strip() == "xsr"
    assert "starting it again" in host.px("dmesg").stdout
    # control/shutdown still reaches the guest: its watch survived the restart
    r = host.px("shutdown", "-w", "xsr", "--timeout", "60", timeout=90)
    assert "reason code 0" in r.stderr
    assert "forcing" not in host.px("dmesg").stdout


def test_create_paused_then_console(host):
    """``create -p`` leaves the domain paused (``--p---``, no CPU time used); ``unpause``
    starts it; ``console`` then reaches its shell."""
    host.px("create", "-q", "-p", str(DEBIAN_CFG), 'accel="tcg"', 'name="pz"')
    row = host.rows()["pz"]
    assert row[4] == "--p---" and row[5] == "0.0"
    time.sleep(1)
    assert host.rows()["pz"][5] == "0.0"
    host.px("unpause", "pz")
    _boot_prompt(host, "pz")
    r = host.px("console", "pz", stdin="echo CON-$((2*21))\n", timeout=30)
    assert "CON-42" in r.stdout                # piped input: leaves once the guest is quiet
    host.px("destroy", "pz")
    assert "pz" not in host.rows()


def test_config_error_names_file_and_line(host, tmp_path):
    running = host.px("create", "-q", str(DEBIAN_CFG), 'accel="tcg"', 'name="bystander"')
    assert running.returncode == 0
    before = host.rows()["bystander"][:2]
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nmemory = "lots"\n')
    r = host.px("create", str(bad), check=False)
    assert r.returncode != 0
    assert f"{bad}:2:" in r.stderr and "memory" in r.stderr
    syntax = tmp_path / "syntax.cfg"
    syntax.write_text('name = "y"\nvcpus = = 2\n')
    r = host.px("create", str(syntax), check=False)
    assert r.returncode != 0 and f"{syntax}:2:" in r.stderr
    clash = tmp_path / "clash.cfg"                  # a valid file naming a running domain
    clash.write_text(DEBIAN_CFG.read_text().replace('"debian"', '"bystander"'))
    r = host.px("create", str(clash), check=False)
    assert r.returncode != 0 and "'bystander' is already in use" in r.stderr
    assert host.rows()["bystander"][:2] == before    # untouched by all of the above
    host.px("destroy", "bystander")


def test_api_errors_are_json_naming_the_fault(host):
    host.px("list")                                    # pyxend is up
    st, body = host.api("GET", "/v1/domains/nosuch")
    assert st == 404 and body == {"error": "domain 'nosuch' does not exist"}
    st, body = host.api("POST", "/v1/domains", {"config": {"name": "m", "memory": "x",
                                                           "kernel": "/bin/true"}})
    assert st == 400 and "'memory'" in body["error"]
    st, body = host.api("POST", "/v1/domains", {"config": {"name": "k",
                                                           "kernel": "/no/such/vmlinuz"}})
    assert st == 400 and "/no/such/vmlinuz" in body["error"]
    st, body = host.api("POST", "/v1/domains", {"config": {"name": "k", "kernel": "/bin/true",
                                                           "on_reboot": "explode"}})
    assert st == 400 and "on_reboot" in body["error"] and "explode" in body["error"]
    st, body = host.api("POST", "/v1/domains", {"config": {"name": "k", "kernel": "/bin/true"}})
    assert st == 400 and "'k'" in body["error"]          # not a kernel: the build fails
    st, doc = host.api("GET", "/openapi.json")
    assert st == 200 and "/v1/domains" in doc["paths"]
    assert "k" not in host.rows()
    info = host.px("info").stdout
    assert re.search(rf"^xenstored_socket\s+: {host.base}/run/xs.sock$", info, re.M)
    assert re.search(r"^xen_version\s+: 4\.17", info, re.M)
