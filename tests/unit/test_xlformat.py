"""pyxen.toolstack.xlformat: xl info / vcpu-list / uptime / list -l / block-list /
network-list output byte for byte."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from pyxen.toolstack.xlformat import (BLOCK_LIST_HEADER, DEFAULT_VIRT_CAPS, INVALID_DOMID,
                                      NETWORK_LIST_HEADER, PVH_XEN_CAPS, UPTIME_HEADER,
                                      VCPU_LIST_HEADER, HostInfo, VcpuRow, format_block_list,
                                      format_cpumap, format_info, format_list_long,
                                      format_network_list, format_uptime, format_vcpu_list,
                                      gather_host_info, libxl_device_disk, libxl_device_nic,
                                      libxl_domain_config, uptime_to_string, vcpu_state,
                                      yajl_json)

# ------------------------------------------------------------------------------- xl info

INFO = HostInfo(
    host="node1", release="6.1.0-18-amd64", version="#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1",
    machine="x86_64", nr_cpus=8, max_cpu_id=15, nr_nodes=1, cores_per_socket=4,
    threads_per_core=2, cpu_mhz=2596.14,
    hw_caps=(0x178BFBFF, 0xFFFA3203, 0x2FD3FBFF, 0x004003F3, 0xF, 0xF1BF07AB, 0x405FC6, 0x100),
    virt_caps="hvm hap gnttab-v1", total_memory=32011, free_memory=30123,
    sharing_freed_memory=0, sharing_used_memory=0, outstanding_claims=0, free_cpus=0,
    xen_major=4, xen_minor=17, xen_extra=".0-pyxen", xen_caps=PVH_XEN_CAPS,
    xen_scheduler="credit", xen_pagesize=4096, platform_params=0, xen_changeset="pyxen",
    xen_commandline="", cc_compiler="gcc (pyxen)", cc_compile_by="pyxen",
    cc_compile_domain="pyxen.local", cc_compile_date="Sat Nov 21 00:00:00 UTC 2026",
    build_id="", xenstored_socket="/run/pyxen/xenstored.sock")

INFO_GOLDEN = """\
host                   : node1
release                : 6.1.0-18-amd64
version                : #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1
machine                : x86_64
nr_cpus                : 8
max_cpu_id             : 15
nr_nodes               : 1
cores_per_socket       : 4
threads_per_core       : 2
cpu_mhz                : 2596.140
hw_caps                : 178bfbff:fffa3203:2fd3fbff:004003f3:0000000f:f1bf07ab:00405fc6:00000100
virt_caps              : hvm hap gnttab-v1
total_memory           : 32011
free_memory            : 30123
sharing_freed_memory   : 0
sharing_used_memory    : 0
outstanding_claims     : 0
free_cpus              : 0
xen_major              : 4
xen_minor              : 17
xen_extra              : .0-pyxen
xen_version            : 4.17.0-pyxen
xen_caps               : hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64 \n\
xen_scheduler          : credit
xen_pagesize           : 4096
platform_params        : virt_start=0x0
xen_changeset          : pyxen
xen_commandline        : \n\
cc_compiler            : gcc (pyxen)
cc_compile_by          : pyxen
cc_compile_domain      : pyxen.local
cc_compile_date        : Sat Nov 21 00:00:00 UTC 2026
build_id               : \n\
xend_config_format     : 4
xenstored_socket       : /run/pyxen/xenstored.sock
"""


def test_info_golden() -> None:
    assert format_info(INFO) == INFO_GOLDEN


def test_info_labels_follow_the_c_format() -> None:
    for line in format_info(replace(INFO, pyxend_socket="/run/pyxen/pyxend.sock")).splitlines():
        label = line[:23].rstrip()
        assert line[:23] == "%-23s" % label and line[23] == ":", line
    last = format_info(replace(INFO, pyxend_socket="/p.sock")).splitlines()[-3:]
    assert last == ["xend_config_format     : 4",
                    "xenstored_socket       : /run/pyxen/xenstored.sock",
                    "pyxend_socket          : /p.sock"]


def test_info_without_pyxen_lines_ends_like_xl() -> None:
    text = format_info(replace(INFO, xenstored_socket=None))
    assert text.endswith("build_id               : \nxend_config_format     : 4\n")


@pytest.mark.parametrize("caps,line", [
    ("", "virt_caps              :"),
    ("hvm", "virt_caps              : hvm"),
    ("pv hvm hvm_directio pv_directio hap shadow",
     "virt_caps              : pv hvm hvm_directio pv_directio hap shadow"),
])
def test_virt_caps_line(caps: str, line: str) -> None:
    assert line in format_info(replace(INFO, virt_caps=caps)).splitlines()


@pytest.mark.parametrize("mhz,shown", [(2596.14, "2596.140"), (999.5, "999.500"),
                                       (0.0, "0.000"), (3000.0009, "3000.001")])
def test_cpu_mhz_is_khz_split_like_xl(mhz: float, shown: str) -> None:
    assert f"cpu_mhz                : {shown}\n" in format_info(replace(INFO, cpu_mhz=mhz))


def test_platform_params_hex() -> None:
    text = format_info(replace(INFO, platform_params=0xFFFF800000000000))
    assert "platform_params        : virt_start=0xffff800000000000\n" in text


def test_hw_caps_needs_eight_words() -> None:
    with pytest.raises(ValueError):
        format_info(replace(INFO, hw_caps=(1, 2, 3)))


def test_info_field_selects_values_like_maybe_printf() -> None:
    assert format_info(INFO, "xen_version") == "4.17.0-pyxen\n"
    assert format_info(INFO, "free_memory") == "30123\n"
    # a prefix selects several lines; empty values still print their newline
    assert format_info(INFO, "xen_") == ("4\n17\n.0-pyxen\n4.17.0-pyxen\n" + PVH_XEN_CAPS
                                         + "\ncredit\n4096\npyxen\n\n")
    assert format_info(INFO, "cc_compile_") == "pyxen\npyxen.local\nSat Nov 21 00:00:00 UTC 2026\n"
    assert format_info(INFO, "xenstored_socket") == "/run/pyxen/xenstored.sock\n"
    assert format_info(INFO, "nonexistent") == ""
    # "virt_caps :" with no capability has no ": " and prints nothing
    assert format_info(replace(INFO, virt_caps=""), "virt_caps") == ""
    assert format_info(INFO, "virt_caps") == "hvm hap gnttab-v1\n"


def test_default_caps_are_pvh_only() -> None:
    assert PVH_XEN_CAPS.split() == ["hvm-3.0-x86_32", "hvm-3.0-x86_32p", "hvm-3.0-x86_64"]
    assert PVH_XEN_CAPS.endswith(" ") and "xen-3.0" not in PVH_XEN_CAPS
    assert "pv" not in DEFAULT_VIRT_CAPS.split() and "hvm" in DEFAULT_VIRT_CAPS.split()


def test_gather_host_info_on_this_machine() -> None:
    info = gather_host_info(xen_version=(4, 17, ".0-pyxen"), xenstored_socket="/x.sock",
                            guest_memory_mib=0)
    assert info.nr_cpus >= 1 and info.max_cpu_id >= info.nr_cpus - 1
    assert info.nr_nodes >= 1 and info.threads_per_core >= 1 and info.cores_per_socket >= 1
    assert info.total_memory > 0 and 0 <= info.free_memory <= info.total_memory
    assert info.host == os.uname().nodename and info.machine == os.uname().machine
    assert len(info.hw_caps) == 8 and all(0 <= w < 2**32 for w in info.hw_caps)
    assert info.xen_version == "4.17.0-pyxen" and info.xen_scheduler == "credit"
    text = format_info(info)
    assert text.count("\n") == 35 and text.endswith("xenstored_socket       : /x.sock\n")
    # every pCPU counted by xl is one the host has online
    assert info.nr_cpus <= (os.cpu_count() or info.nr_cpus)


def test_gather_free_memory_subtracts_guests() -> None:
    huge = gather_host_info(xen_version=(4, 17, ""), xenstored_socket="s",
                            guest_memory_mib=10**9)
    assert huge.free_memory == 0


def _fake_host(tmp_path: Path, *, meminfo: str, cpuinfo: str, sysfiles: dict[str, str]
               ) -> tuple[str, str]:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text(meminfo)
    (proc / "cpuinfo").write_text(cpuinfo)
    sys_root = tmp_path / "sys"
    for rel, text in sysfiles.items():
        path = sys_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(sys_root)


def test_gather_from_fake_host(tmp_path: Path) -> None:
    proc, sys_root = _fake_host(
        tmp_path,
        meminfo="MemTotal:       16777216 kB\nMemFree:        1 kB\nMemAvailable:   8388608 kB\n",
        cpuinfo="processor\t: 0\ncpu MHz\t\t: 3400.000\nsiblings\t: 8\ncpu cores\t: 4\n",
        sysfiles={"devices/system/cpu/online": "0-7\n",
                  "devices/system/cpu/possible": "0-15\n",
                  "devices/system/cpu/cpu0/topology/thread_siblings_list": "0,4\n",
                  "devices/system/cpu/cpu0/topology/core_siblings_list": "0-7\n",
                  "devices/system/node/online": "0-1\n"})
    info = gather_host_info(xen_version=(4, 17, ".0-pyxen"), xenstored_socket="s",
                            guest_memory_mib=12288, proc_root=proc, sys_root=sys_root,
                            cpuid_dev=str(tmp_path / "nocpuid"), scheduler="credit2",
                            virt_caps="hvm", pyxend_socket="p")
    assert (info.nr_cpus, info.max_cpu_id, info.nr_nodes) == (8, 15, 2)
    assert (info.threads_per_core, info.cores_per_socket) == (2, 4)
    assert info.cpu_mhz == 3400.0 and info.hw_caps == (0,) * 8
    # total 16384 MiB; available 8192; total - guests = 4096 -> the smaller bound
    assert (info.total_memory, info.free_memory) == (16384, 4096)
    assert (info.xen_scheduler, info.virt_caps, info.pyxend_socket) == ("credit2", "hvm", "p")


def test_gather_falls_back_without_sysfs(tmp_path: Path) -> None:
    proc, sys_root = _fake_host(
        tmp_path, meminfo="MemTotal:       2048000 kB\n",
        cpuinfo="processor\t: 0\nsiblings\t: 4\ncpu cores\t: 2\n", sysfiles={})
    info = gather_host_info(xen_version=(4, 17, ""), xenstored_socket="s", guest_memory_mib=0,
                            proc_root=proc, sys_root=sys_root,
                            cpuid_dev=str(tmp_path / "none"))
    assert info.nr_cpus == (os.cpu_count() or 1) and info.max_cpu_id == info.nr_cpus - 1
    assert (info.nr_nodes, info.threads_per_core, info.cores_per_socket) == (1, 2, 2)
    assert (info.total_memory, info.free_memory, info.cpu_mhz) == (2000, 2000, 0.0)


# -------------------------------------------------------------------------- xl vcpu-list

# xl_vcpu.c: printf("%-32s %5s %5s %5s %5s %9s %s\n", "Name", "ID", "VCPU", "CPU", "State",
#                   "Time(s)", "Affinity (Hard / Soft)");
XL_VCPU_HEADER = ("Name                                ID  VCPU   CPU State   Time(s) "
                  "Affinity (Hard / Soft)")


def test_vcpu_header_is_xls() -> None:
    assert VCPU_LIST_HEADER == XL_VCPU_HEADER


def test_vcpu_list_golden() -> None:
    rows = [VcpuRow("Domain-0", 0, 0, 0, vcpu_state(running=True), 54.3),
            VcpuRow("Domain-0", 0, 1, 1, vcpu_state(blocked=True), 1234.56),
            VcpuRow("debian-pvh", 7, 0, 1, vcpu_state(), 3.0, "0-1", "all"),
            VcpuRow("debian-pvh", 7, 1, None, vcpu_state(online=False), 0.0, "all", "none")]
    assert format_vcpu_list(rows) == (
        XL_VCPU_HEADER + "\n"
        "Domain-0                             0     0    0   r--      54.3  all / all\n"
        "Domain-0                             0     1    1   -b-    1234.6  all / all\n"
        "debian-pvh                           7     0    1   ---       3.0  0-1 / all\n"
        "debian-pvh                           7     1    -   --p       0.0  all / none\n")


def test_vcpu_row_follows_the_c_format() -> None:
    row = VcpuRow("g", 32767, 127, 255, "rb-", 99999.95, "0,2", "1-3")
    c = "%-32s %5u %5u" % ("g", 32767, 127) + "%5u %3c%c- " % (255, "r", "b") \
        + "%9.1f  " % 99999.95 + "0,2 / 1-3"
    assert format_vcpu_list([row]).splitlines()[1] == c
    off = VcpuRow("g", 1, 2, None, "--p")
    c_off = "%-32s %5u %5u" % ("g", 1, 2) + "%5c %3c%cp " % ("-", "-", "-") \
        + "%9.1f  " % 0.0 + "all / all"
    assert format_vcpu_list([off]).splitlines()[1] == c_off


def test_vcpu_long_names_are_padded_never_truncated() -> None:
    name = "a-really-long-domain-name-exceeding-32-chars"
    line = format_vcpu_list([VcpuRow(name, 1, 0, 0, "-b-")]).splitlines()[1]
    assert line.startswith(name + "     1     0    0   -b-")
    exact = "x" * 32
    assert format_vcpu_list([VcpuRow(exact, 1, 0, 0, "-b-")]).splitlines()[1] \
        .startswith(exact + "     1")


def test_vcpu_state_letters() -> None:
    assert vcpu_state(running=True) == "r--"
    assert vcpu_state(blocked=True) == "-b-"
    assert vcpu_state(running=True, blocked=True) == "rb-"
    assert vcpu_state() == "---"
    assert vcpu_state(online=False, running=True, blocked=True) == "--p"
    with pytest.raises(ValueError):
        format_vcpu_list([VcpuRow("g", 1, 0, 0, "r")])


def test_vcpu_time_from_ns_goes_through_a_c_float() -> None:
    assert VcpuRow.from_ns("d", 1, 0, 0, "r--", 10**17).time_s == pytest.approx(99999998.4306,
                                                                                   abs=1e-3)
    assert format_vcpu_list([VcpuRow.from_ns("d", 1, 0, 0, "r--", 54_300_000_000)]) \
        .splitlines()[1].endswith("   r--      54.3  all / all")


@pytest.mark.parametrize("cpus,nr,text", [
    ([0, 1, 2, 3], 4, "all"), ([], 4, "none"), ([1, 2, 3], 4, "1-3"), ([0, 1], 4, "0-1"),
    ([0, 2], 4, "0,2"), ([0, 1, 3], 4, "0-1,3"), ([0, 1, 2, 3, 6], 8, "0-3,6"),
    ([5], 8, "5"), ([0, 1, 7, 9], 2, "all"), ([0], 1, "all"), ([], 0, "none"),
    ([1, 2, 4, 5, 6], 7, "1-2,4-6"),
])
def test_format_cpumap_like_print_bitmap(cpus: list[int], nr: int, text: str) -> None:
    assert format_cpumap(cpus, nr) == text


# ----------------------------------------------------------------------------- xl uptime

def test_uptime_header_is_xls() -> None:
    assert UPTIME_HEADER == "%-33s %4s %s" % ("Name", "ID", "Uptime")
    assert UPTIME_HEADER == "Name                                ID Uptime"


@pytest.mark.parametrize("secs,long,short", [
    (0, " 0:00:00", " 0:00"), (12, " 0:00:12", " 0:00"), (3599, " 0:59:59", " 0:59"),
    (36000 + 61, "10:01:01", "10:01"), (86399, "23:59:59", "23:59"),
    (86400, "1 day,  0:00:00", "1 day,  0:00"),
    (86400 + 2 * 3600 + 3 * 60 + 4, "1 day,  2:03:04", "1 day,  2:03"),
    (2 * 86400 + 13 * 3600, "2 days, 13:00:00", "2 days, 13:00"),
    (400 * 86400 + 5, "400 days,  0:00:05", "400 days,  0:00"),
    (-5, " 0:00:00", " 0:00"),
])
def test_uptime_to_string(secs: int, long: str, short: str) -> None:
    assert uptime_to_string(secs) == long
    assert uptime_to_string(secs, short=True) == short


def test_uptime_golden() -> None:
    rows = [("Domain-0", 0, 9774), ("debian-pvh", 3, 93784), ("old", 12, 2 * 86400 + 5)]
    assert format_uptime(rows) == (
        "Name                                ID Uptime\n"
        "Domain-0                             0  2:42:54\n"
        "debian-pvh                           3 1 day,  2:03:04\n"
        "old                                 12 2 days,  0:00:05\n")


def test_uptime_rows_follow_the_c_format() -> None:
    name = "n" * 40
    assert format_uptime([(name, 32000, 61)]).splitlines()[1] == "%-33s %4d %s" % (
        name, 32000, " 0:01:01")


def test_uptime_short_has_no_header() -> None:
    rows = [("Domain-0", 0, 9774), ("debian-pvh", 3, 93784), ("old", 12, 3 * 86400)]
    now = dt.datetime(2026, 1, 2, 9, 5, 7)
    assert format_uptime(rows, short=True, now=now) == (
        " 09:05:07 up  2:42, Domain-0 (0)\n"
        " 09:05:07 up 1 day,  2:03, debian-pvh (3)\n"
        " 09:05:07 up 3 days,  0:00, old (12)\n")
    assert format_uptime([("d", 1, 5)], short=True, now=dt.time(23, 59, 1)) \
        == " 23:59:01 up  0:00, d (1)\n"
    assert format_uptime([], short=True) == ""
    assert format_uptime([]) == UPTIME_HEADER + "\n"


def test_uptime_short_defaults_to_local_now() -> None:
    line = format_uptime([("d", 1, 5)], short=True)
    assert line[0] == " " and line[3] == ":" and line[6] == ":" and line.endswith(" d (1)\n")


# ---------------------------------------------------------------------------- xl list -l

DOMAIN = dict(domid=3, name="debian-pvh", uuid="6F1C6A4E-3B8E-4A4B-9A0E-1C2D3E4F5A6B",
              type="pvh", memory_kib=524288, maxmem_kib=1048576, vcpus=2, maxvcpus=4,
              kernel="/var/cache/pyxen/vmlinuz", ramdisk="/var/cache/pyxen/initrd.img",
              cmdline="console=hvc0 quiet", on_poweroff="destroy", on_reboot="restart",
              on_crash="destroy")

LIST_LONG_GOLDEN = """\
[
    {
        "domid": 3,
        "config": {
            "c_info": {
                "type": "pvh",
                "name": "debian-pvh",
                "domid": 32756,
                "uuid": "6f1c6a4e-3b8e-4a4b-9a0e-1c2d3e4f5a6b",
                "run_hotplug_scripts": "True"
            },
            "b_info": {
                "max_vcpus": 4,
                "avail_vcpus": [
                    0,
                    1
                ],
                "max_memkb": 1048576,
                "target_memkb": 524288,
                "video_memkb": 0,
                "sched_params": {
                    "sched": "credit",
                    "weight": 256,
                    "cap": 0
                },
                "claim_mode": "True",
                "kernel": "/var/cache/pyxen/vmlinuz",
                "cmdline": "console=hvc0 quiet",
                "ramdisk": "/var/cache/pyxen/initrd.img",
                "type.pvh": {

                },
                "arch_arm": {

                },
                "arch_x86": {
                    "msr_relaxed": "False"
                }
            },
            "on_reboot": "restart",
            "on_soft_reset": "soft_reset"
        }
    }
]

"""


def test_list_long_golden() -> None:
    assert format_list_long([DOMAIN]) == LIST_LONG_GOLDEN


def test_list_long_is_valid_json_of_the_config() -> None:
    second = dict(DOMAIN, domid=4, name="two", uuid="00000000-0000-0000-0000-000000000001",
                  vcpus=1, maxvcpus=None, maxmem_kib=None, ramdisk=None, cmdline=None)
    out = json.loads(format_list_long([DOMAIN, second]))
    assert [d["domid"] for d in out] == [3, 4]
    assert out[0]["config"] == libxl_domain_config(DOMAIN)
    b = out[1]["config"]["b_info"]
    assert (b["max_vcpus"], b["avail_vcpus"], b["max_memkb"]) == (1, [0], 524288)
    assert "ramdisk" not in b and "cmdline" not in b


def test_list_long_empty() -> None:
    # yajl: "[" "\n", close: "\n" "]", final newline; then puts() adds one more
    assert format_list_long([]) == "[\n\n]\n\n"


def test_list_long_actions_use_libxl_names_and_skip_destroy() -> None:
    cfg = libxl_domain_config(dict(DOMAIN, on_poweroff="preserve", on_reboot="rename-restart",
                                   on_watchdog="coredump-restart", on_crash="coredump-destroy",
                                   on_soft_reset="destroy"))
    assert [(k, v) for k, v in cfg.items() if k.startswith("on_")] == [
        ("on_poweroff", "preserve"), ("on_reboot", "restart_rename"),
        ("on_watchdog", "coredump_restart"), ("on_crash", "coredump_destroy")]
    cfg = libxl_domain_config(dict(DOMAIN, on_reboot="destroy", on_crash="restart_rename"))
    assert [k for k in cfg if k.startswith("on_")] == ["on_crash", "on_soft_reset"]
    with pytest.raises(ValueError):
        libxl_domain_config(dict(DOMAIN, on_crash="explode"))


def test_list_long_defaults_are_left_out() -> None:
    cfg = libxl_domain_config(dict(DOMAIN, c_info_domid=0,
                                   uuid="00000000-0000-0000-0000-000000000000"))
    assert list(cfg["c_info"]) == ["type", "name", "run_hotplug_scripts"]
    assert list(cfg) == ["c_info", "b_info", "on_reboot", "on_soft_reset"]
    assert list(cfg["b_info"]) == ["max_vcpus", "avail_vcpus", "max_memkb", "target_memkb",
                                   "video_memkb", "sched_params", "claim_mode", "kernel",
                                   "cmdline", "ramdisk", "type.pvh", "arch_arm", "arch_x86"]
    assert libxl_domain_config(dict(DOMAIN))["c_info"]["domid"] == INVALID_DOMID


def test_list_long_scheduler_params() -> None:
    b = libxl_domain_config(dict(DOMAIN, sched="credit2", sched_weight=512, sched_cap=50))
    assert b["b_info"]["sched_params"] == {"sched": "credit2", "weight": 512, "cap": 50}
    b = libxl_domain_config(dict(DOMAIN, sched="null"))
    assert b["b_info"]["sched_params"] == {"sched": "null"}
    b = libxl_domain_config(dict(DOMAIN, sched_params={}))
    assert b["b_info"]["sched_params"] == {}
    assert '"sched_params": {\n\n                },' in format_list_long(
        [dict(DOMAIN, sched_params={})])


def test_list_long_devices_and_avail_vcpus() -> None:
    disk = {"pdev_path": "/img", "vdev": "xvda", "backend": "qdisk", "format": "raw",
            "readwrite": 1}
    cfg = libxl_domain_config(dict(DOMAIN, disks=[disk], avail_vcpus=[2, 0]))
    assert list(cfg)[:3] == ["c_info", "b_info", "disks"] and cfg["disks"] == [disk]
    assert cfg["b_info"]["avail_vcpus"] == [0, 2]
    text = format_list_long([dict(DOMAIN, disks=[disk])])
    assert ('            "disks": [\n                {\n                    "pdev_path": "/img",'
            in text)


def test_list_long_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown"):
        libxl_domain_config(dict(DOMAIN, memroy_kib=1))
    with pytest.raises(ValueError, match="missing"):
        libxl_domain_config({k: v for k, v in DOMAIN.items() if k != "uuid"})
    with pytest.raises(ValueError, match="PVH"):
        libxl_domain_config(dict(DOMAIN, type="hvm"))


def test_yajl_string_escapes() -> None:
    s = 'a"b\\c/d\ne\rf\tg\x01h\x1fi\x7fj\u00e9k\f\b'
    assert yajl_json(s) == '"a\\"b\\\\c/d\\ne\\rf\\tg\\u0001h\\u001Fi\x7fj\u00e9k\\f\\b"\n'
    assert json.loads(yajl_json(s)) == s


def test_yajl_layout() -> None:
    assert yajl_json({}) == "{\n\n}\n"
    assert yajl_json([]) == "[\n\n]\n"
    assert yajl_json({"a": [], "b": {"c": None, "d": True, "e": False}}) == (
        '{\n    "a": [\n\n    ],\n    "b": {\n        "c": null,\n        "d": true,\n'
        '        "e": false\n    }\n}\n')
    assert yajl_json([[1], {}]) == "[\n    [\n        1\n    ],\n    {\n\n    }\n]\n"
    assert yajl_json(1.5) == "1.5\n" and yajl_json(2.0) == "2.0\n"
    with pytest.raises(TypeError):
        yajl_json(object())


# ------------------------------------------------------------------------------- disks

def test_libxl_device_disk_fields_in_idl_order_defaults_left_out() -> None:
    rw = {"target": "/var/lib/pyxen/d.img", "vdev": "xvdb", "devid": 51728, "format": "raw",
          "readonly": False, "cdrom": False, "discard": True, "spec": "d.img,raw,xvdb,rw"}
    assert libxl_device_disk(rw) == {"pdev_path": "/var/lib/pyxen/d.img", "vdev": "xvdb",
                                     "backend": "phy", "format": "raw", "readwrite": 1}
    assert list(libxl_device_disk(rw)) == ["pdev_path", "vdev", "backend", "format",
                                           "readwrite"]
    ro = libxl_device_disk(dict(rw, readonly=True, discard=False))
    assert "readwrite" not in ro and ro["discard_enable"] == "False"
    cd = libxl_device_disk(dict(rw, format="qcow2", cdrom=True, readonly=True))
    assert list(cd) == ["pdev_path", "vdev", "backend", "format", "removable", "is_cdrom"]
    assert cd["backend"] == "qdisk" and cd["removable"] == cd["is_cdrom"] == 1
    assert libxl_device_disk(dict(rw, format="vpc"))["format"] == "vhd"


def test_list_long_with_pyxen_disks() -> None:
    disk = {"target": "/img", "vdev": "xvdb", "format": "raw", "readonly": False}
    text = format_list_long([dict(DOMAIN, disks=[libxl_device_disk(disk)])])
    assert ('            "disks": [\n                {\n                    "pdev_path": "/img",\n'
            '                    "vdev": "xvdb",\n                    "backend": "phy",\n'
            '                    "format": "raw",\n                    "readwrite": 1\n'
            '                }\n            ],\n') in text


def test_block_list_golden() -> None:
    """xl_block.c main_blocklist: %-5s %-3s %-6s %-5s %-6s %-8s %-30s header, %d rows."""
    assert BLOCK_LIST_HEADER == ("Vdev  BE  handle state evt-ch ring-ref BE-path"
                                 + " " * 23 + "\n")
    rows = [{"devid": 51728, "backend_id": 0, "frontend_id": 3, "state": 4, "evtch": 8,
             "ring_ref": 8, "be_path": "/local/domain/0/backend/vbd/3/51728"},
            {"devid": 268439552, "frontend_id": 12, "state": 2,
             "be_path": "/local/domain/0/backend/vbd/12/268439552"}]
    assert format_block_list(rows) == (
        BLOCK_LIST_HEADER
        + "51728 0   3      4     8      8        /local/domain/0/backend/vbd/3/51728\n"
        + "268439552 0   12     2     -1     -1       "
          "/local/domain/0/backend/vbd/12/268439552\n")
    short = format_block_list([dict(rows[0], be_path="/b")])
    assert short.splitlines()[1].endswith("/b" + " " * 28)
    assert format_block_list([]) == BLOCK_LIST_HEADER


# ------------------------------------------------------------------------------- networks

def test_network_list_golden() -> None:
    """xl_nic.c main_networklist: "%-3s %-2s %-17s %-6s %-5s %-6s %5s/%-5s %-30s" header;
    rows "%-3d %-2d ", LIBXL_MAC_FMT, "%6d %5d %6d %5d/%-11d %-30s"."""
    assert NETWORK_LIST_HEADER == ("Idx BE Mac Addr.         handle state evt-ch   tx-/"
                                   "rx-ring-ref BE-path" + " " * 23 + "\n")
    rows = [{"devid": 0, "backend_id": 0, "mac": "00:16:3E:01:02:03", "state": 4,
             "evtch": 9, "tx_ring_ref": 1280, "rx_ring_ref": 1281,
             "be_path": "/local/domain/0/backend/vif/3/0"},
            {"devid": 12, "mac": "00:16:3e:7f:0a:0b", "state": 2,
             "be_path": "/local/domain/0/backend/vif/17/12"}]
    assert format_network_list(rows) == (
        NETWORK_LIST_HEADER
        + "0   0  00:16:3e:01:02:03     0     4      9  1280/1281        "
          "/local/domain/0/backend/vif/3/0\n"
        + "12  0  00:16:3e:7f:0a:0b    12     2     -1    -1/-1          "
          "/local/domain/0/backend/vif/17/12\n")
    short = format_network_list([dict(rows[0], be_path="/b")])
    assert short.splitlines()[1].endswith("/b" + " " * 28)
    assert format_network_list([]) == NETWORK_LIST_HEADER
    with pytest.raises(ValueError, match="MAC"):
        format_network_list([dict(rows[0], mac="00:16:3e:01:02")])


def test_libxl_device_nic_fields_in_idl_order_defaults_left_out() -> None:
    nic = {"devid": 0, "mac": "00:16:3E:AA:bb:01", "bridge": "pyxenbr0", "vifname": None,
           "rate": None, "ip": None, "mtu": 1500, "spec": "bridge=pyxenbr0"}
    assert libxl_device_nic(nic) == {"devid": 0, "mac": "00:16:3e:aa:bb:01",
                                     "bridge": "pyxenbr0", "nictype": "vif"}
    full = libxl_device_nic(dict(nic, devid=3, mtu=9000, ip="10.88.0.5", vifname="web0",
                                 rate=[20000, 20000]))
    assert list(full) == ["devid", "mtu", "mac", "ip", "bridge", "ifname", "nictype",
                          "rate_bytes_per_interval", "rate_interval_usecs"]
    assert (full["mtu"], full["ifname"], full["rate_bytes_per_interval"],
            full["rate_interval_usecs"]) == (9000, "web0", 20000, 20000)


def test_list_long_with_pyxen_nics() -> None:
    nic = {"devid": 0, "mac": "00:16:3e:00:00:61", "bridge": "pyxenbr0", "mtu": 1500}
    cfg = libxl_domain_config(dict(DOMAIN, nics=[libxl_device_nic(nic)]))
    assert list(cfg)[:3] == ["c_info", "b_info", "nics"]
    text = format_list_long([dict(DOMAIN, nics=[libxl_device_nic(nic)])])
    assert ('            "nics": [\n                {\n                    "devid": 0,\n'
            '                    "mac": "00:16:3e:00:00:61",\n'
            '                    "bridge": "pyxenbr0",\n'
            '                    "nictype": "vif"\n                }\n            ],\n') in text
