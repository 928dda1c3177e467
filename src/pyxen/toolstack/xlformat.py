"""``xl info``, ``xl vcpu-list``, ``xl uptime [-s]`` and ``xl list -l`` output, byte for byte.

Sans-IO formatters following Xen 4.17's tools/xl (xl_info.c ``print_info``/``output_*``,
``print_uptime``/``uptime_to_string``; xl_vcpu.c ``vcpulist``/``print_vcpuinfo``; xl_utils.c
``print_bitmap``) and libxl's JSON (gentypes.py ``gen_json`` over libxl_types.idl, written by
yajl 2 with ``yajl_gen_beautify``). :func:`gather_host_info` is the one function that reads the
host (``/proc``, ``/sys``, ``os.uname()``, ``/dev/cpu/0/cpuid``).

``xl info``
    ``"%-23s: %s"`` lines in xl's order: uname facts, physinfo, Xen version info, then
    ``xend_config_format     : 4``; pyxen appends ``xenstored_socket`` (and ``pyxend_socket``
    when known) after it. ``virt_caps`` is the exception to the format: ``"virt_caps" + 14
    spaces + ":"`` followed by one ``" <cap>"`` per capability (an empty set leaves the line
    ending in ``:``). ``xl info NAME`` prints, for every line starting with NAME, the text after
    the first ``": "`` (see ``field`` of :func:`format_info`). ``-n`` (topology/NUMA tables) is
    not produced.

``xl vcpu-list``
    Header ``printf("%-32s %5s %5s %5s %5s %9s %s\\n", "Name", "ID", "VCPU", "CPU", "State",
    "Time(s)", "Affinity (Hard / Soft)")``; rows ``"%-32s %5u %5u"`` then, with no blank in
    between (so CPU onwards sits one column left of its heading), online
    ``"%5u %3c%c- "`` (r, b) or, offline, ``"%5c %3c%cp "`` with ``-`` everywhere (state
    ``--p``), then ``"%9.1f  "`` of ``(float)vcpu_time / 1e9``, hard affinity, ``" / "``, soft
    affinity. Names are padded, never truncated. Affinities are :func:`format_cpumap` strings.

``xl uptime``
    Header ``"%-33s %4s %s\\n"`` of Name/ID/Uptime, rows ``"%-33s %4d %s\\n"`` with
    ``[D day(s), ]H:MM:SS`` (hour ``%2d``). ``-s`` prints no header and one
    ``" HH:MM:SS up <short>, <name> (<domid>)"`` line per domain, where HH:MM:SS is the local
    time now and <short> drops the seconds (``[D day(s), ]H:MM``).

``xl list -l``
    A JSON array of ``{"domid": N, "config": <libxl_domain_config>}``; yajl beautify (4-space
    indent, ``": "``, an empty map or array is the opener, an empty line, then the closer),
    plus one newline from yajl and one from ``puts``. libxl writes a field only when it differs
    from its default, so e.g. ``on_poweroff: destroy`` never appears. The config is what
    ``libxl_retrieve_domain_configuration`` returns for a domain xl created from an xl.cfg:
    the parsed config as saved at creation (with libxl's post-create updates: uuid,
    ``video_memkb`` 0, ``arch_x86.msr_relaxed``), refreshed with the live name, uuid, online
    vCPUs, memory target/max and scheduler parameters. See :func:`libxl_domain_config`;
    :func:`libxl_device_disk` gives the entries of its ``disks`` array.

``xl block-list``
    Header and rows of xl_block.c ``main_blocklist``: ``"%-5s %-3s %-6s %-5s %-6s %-8s
    %-30s\n"`` of Vdev/BE/handle/state/evt-ch/ring-ref/BE-path, then per disk ``"%-5d %-3d
    %-6d %-5d %-6d %-8d %-30s\n"`` of the virtual-device *number*, backend domid, frontend
    domid, backend state, event channel, ring reference and backend path (so the last
    column is padded with blanks to 30). See :func:`format_block_list`.

``xl network-list``
    xl_nic.c ``main_networklist``: header ``"%-3s %-2s %-17s %-6s %-5s %-6s %5s/%-5s %-30s\n"``
    of Idx/BE/Mac Addr./handle/state/evt-ch/tx-/rx-ring-ref/BE-path, then per NIC
    ``"%-3d %-2d "`` (devid, backend domid), the MAC as ``%02hhx:...`` (lower case), and
    ``"%6d %5d %6d %5d/%-11d %-30s\n"`` of the devid again (the handle), backend state, event
    channel, tx and rx ring references and backend path. See :func:`format_network_list`;
    :func:`libxl_device_nic` gives the entries of ``xl list -l``'s ``nics`` array.
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "BLOCK_LIST_HEADER", "DEFAULT_VIRT_CAPS", "HostInfo", "INVALID_DOMID",
    "NETWORK_LIST_HEADER", "PVH_XEN_CAPS", "UPTIME_HEADER", "VCPU_LIST_HEADER", "VcpuRow",
    "format_block_list", "format_cpumap", "format_info", "format_list_long",
    "format_network_list", "format_uptime", "format_vcpu_list", "gather_host_info",
    "libxl_device_disk", "libxl_device_nic", "libxl_domain_config",
    "uptime_to_string", "VIRT_CAPS_ORDER", "vcpu_state", "yajl_json",
]

# --------------------------------------------------------------------------------------------
# xl info
# --------------------------------------------------------------------------------------------

#: What Xen's arch_get_xen_caps() builds on an x86-64 host with HVM but no PV support: each
#: entry is followed by a space, so the string (and the xl line) ends in one.
PVH_XEN_CAPS = "hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64 "

#: pyxen's honest physinfo capabilities: domains are PVH (HVM containers, so ``hvm``) whose
#: guest-physical space is a second translation stage under the guest's own page tables
#: (``hap``), with grant tables v1 only. No PV, no device passthrough (``*_directio``), no
#: shadow paging, vmtrace or vPMU.
DEFAULT_VIRT_CAPS = "hvm hap gnttab-v1"

#: xl's order of the virt_caps words (Xen 4.17 xl_info.c output_physinfo).
VIRT_CAPS_ORDER = ("pv", "hvm", "hvm_directio", "pv_directio", "hap", "shadow",
                   "iommu_hap_pt_share", "vmtrace", "vpmu", "gnttab-v1", "gnttab-v2")

#: XENVER_compile_info as pyxen's hypervisor answers it (xen/hypercalls/version.py).
_COMPILE_INFO = ("gcc (pyxen)", "pyxen", "pyxen.local", "Sat Nov 21 00:00:00 UTC 2026")


@dataclass(frozen=True)
class HostInfo:
    """Every value ``xl info`` prints, in print order, plus pyxen's socket paths.

    Units as xl prints them: memory fields in MiB; ``cpu_mhz`` is shown with three decimals
    (xl's ``cpu_khz`` split as ``%d.%03d``); ``hw_caps`` is eight 32-bit words;
    ``virt_caps`` is space-separated capability words, printed as given (xl's order is
    :data:`VIRT_CAPS_ORDER`);
    ``platform_params`` is ``virt_start``; ``xen_caps`` is printed verbatim. ``xen_version``
    is derived (``major.minor`` + extra).
    """

    host: str
    release: str
    version: str
    machine: str
    nr_cpus: int
    max_cpu_id: int
    nr_nodes: int
    cores_per_socket: int
    threads_per_core: int
    cpu_mhz: float
    hw_caps: tuple[int, ...]
    virt_caps: str
    total_memory: int
    free_memory: int
    sharing_freed_memory: int
    sharing_used_memory: int
    outstanding_claims: int
    free_cpus: int
    xen_major: int
    xen_minor: int
    xen_extra: str
    xen_caps: str
    xen_scheduler: str
    xen_pagesize: int
    platform_params: int
    xen_changeset: str
    xen_commandline: str
    cc_compiler: str
    cc_compile_by: str
    cc_compile_domain: str
    cc_compile_date: str
    build_id: str
    xend_config_format: int = 4
    xenstored_socket: str | None = None
    pyxend_socket: str | None = None

    @property
    def xen_version(self) -> str:
        return f"{self.xen_major}.{self.xen_minor}{self.xen_extra}"


def _line(label: str, value: object) -> str:
    return f"{label:<23}: {value}\n"


def _info_lines(info: HostInfo) -> list[str]:
    if len(info.hw_caps) != 8:
        raise ValueError(f"hw_caps needs 8 words, got {len(info.hw_caps)}")
    khz = int(round(info.cpu_mhz * 1000))
    caps = info.virt_caps.split()
    lines = [
        _line("host", info.host), _line("release", info.release),
        _line("version", info.version), _line("machine", info.machine),
        _line("nr_cpus", info.nr_cpus), _line("max_cpu_id", info.max_cpu_id),
        _line("nr_nodes", info.nr_nodes), _line("cores_per_socket", info.cores_per_socket),
        _line("threads_per_core", info.threads_per_core),
        _line("cpu_mhz", f"{khz // 1000}.{khz % 1000:03d}"),
        _line("hw_caps", ":".join(f"{w & 0xFFFFFFFF:08x}" for w in info.hw_caps)),
        "virt_caps" + " " * 14 + ":" + "".join(" " + c for c in caps) + "\n",
        _line("total_memory", info.total_memory), _line("free_memory", info.free_memory),
        _line("sharing_freed_memory", info.sharing_freed_memory),
        _line("sharing_used_memory", info.sharing_used_memory),
        _line("outstanding_claims", info.outstanding_claims),
        _line("free_cpus", info.free_cpus),
        _line("xen_major", info.xen_major), _line("xen_minor", info.xen_minor),
        _line("xen_extra", info.xen_extra), _line("xen_version", info.xen_version),
        _line("xen_caps", info.xen_caps), _line("xen_scheduler", info.xen_scheduler),
        _line("xen_pagesize", info.xen_pagesize),
        _line("platform_params", f"virt_start=0x{info.platform_params:x}"),
        _line("xen_changeset", info.xen_changeset),
        _line("xen_commandline", info.xen_commandline),
        _line("cc_compiler", info.cc_compiler), _line("cc_compile_by", info.cc_compile_by),
        _line("cc_compile_domain", info.cc_compile_domain),
        _line("cc_compile_date", info.cc_compile_date), _line("build_id", info.build_id),
        _line("xend_config_format", info.xend_config_format),
    ]
    if info.xenstored_socket is not None:
        lines.append(_line("xenstored_socket", info.xenstored_socket))
    if info.pyxend_socket is not None:
        lines.append(_line("pyxend_socket", info.pyxend_socket))
    return lines


def format_info(info: HostInfo, field: str | None = None) -> str:
    """``xl info`` output (every line ends in ``\\n``).

    With ``field`` (``xl info FIELD``) only lines starting with ``field`` are kept, and of
    those only the text after the first ``": "`` (xl's ``maybe_printf``): a prefix such as
    ``"xen_"`` selects several lines, and an empty ``virt_caps`` prints nothing.
    """
    lines = _info_lines(info)
    if field is None:
        return "".join(lines)
    out = []
    for line in lines:
        colon = line.find(":")
        if line.startswith(field) and colon >= 0 and line[colon + 1:colon + 2] == " ":
            out.append(line[colon + 2:])
    return "".join(out)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpulist(text: str | None) -> list[int] | None:
    """Linux cpulist format (``"0-3,8,10-11"``) to indices; None when absent or malformed."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.strip().split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return None
    return out


def _meminfo_kib(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            try:
                return int(rest.split()[0])
            except (IndexError, ValueError):
                return None
    return None


def _cpuinfo_first(text: str | None, key: str) -> str | None:
    for line in (text or "").splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == key:
            return rest.strip()
    return None


def _host_hw_caps(cpuid_dev: str) -> tuple[int, ...]:
    """Xen's featureset words 0-7 from the host CPUID (``/dev/cpu/0/cpuid``), zeros if
    unreadable: 1.EDX, 1.ECX, e1.EDX, e1.ECX, Dh:1.EAX, 7:0.EBX, 7:0.ECX, e7.EDX."""
    try:
        fd = os.open(cpuid_dev, os.O_RDONLY)
    except OSError:
        return (0,) * 8
    try:
        def leaf(fn: int, sub: int = 0) -> tuple[int, int, int, int]:
            data = os.pread(fd, 16, fn | (sub << 32))
            return struct.unpack("<4I", data) if len(data) == 16 else (0, 0, 0, 0)

        max_basic = leaf(0)[0]
        max_ext = leaf(0x80000000)[0]

        def get(fn: int, sub: int, reg: int) -> int:
            top = max_ext if fn & 0x80000000 else max_basic
            return leaf(fn, sub)[reg] if fn <= top else 0

        return (get(1, 0, 3), get(1, 0, 2), get(0x80000001, 0, 3), get(0x80000001, 0, 2),
                get(0xD, 1, 0), get(7, 0, 1), get(7, 0, 2), get(0x80000007, 0, 3))
    except OSError:
        return (0,) * 8
    finally:
        os.close(fd)


def gather_host_info(*, xen_version: tuple[int, int, str], xenstored_socket: str,
                     guest_memory_mib: int, scheduler: str = "credit",
                     virt_caps: str = DEFAULT_VIRT_CAPS, xen_caps: str = PVH_XEN_CAPS,
                     pyxend_socket: str | None = None, xen_changeset: str = "pyxen",
                     xen_commandline: str = "", build_id: str = "",
                     platform_virt_start: int = 0, proc_root: str = "/proc",
                     sys_root: str = "/sys",
                     cpuid_dev: str = "/dev/cpu/0/cpuid") -> HostInfo:
    """The real host's facts as a :class:`HostInfo` (reads ``proc_root``, ``sys_root`` and
    ``cpuid_dev``; a missing file falls back as described below, never raises).

    - ``host``/``release``/``version``/``machine``: ``os.uname()`` (xl runs uname in dom0;
      pyxen's toolstack runs on the host kernel).
    - ``nr_cpus``: online CPUs (``sys_root``/devices/system/cpu/online, else ``os.cpu_count()``);
      ``max_cpu_id``: highest possible CPU; ``nr_nodes``: online NUMA nodes (at least 1);
      ``threads_per_core``/``cores_per_socket``: CPU 0's thread and package siblings;
      ``cpu_mhz``: CPU 0's ``cpu MHz`` from cpuinfo (0 when absent).
    - ``hw_caps``: the host's raw CPUID in Xen's featureset word order, zeros if
      ``cpuid_dev`` cannot be read.
    - ``total_memory``: MemTotal in MiB. ``free_memory``: what a new domain could get, i.e.
      ``min(MemAvailable, MemTotal - guest_memory_mib)`` in MiB, never below 0. Xen counts a
      guest's whole allocation as used, but pyxen guests' RAM is lazily backed host memory
      that MemAvailable only partly reflects, so both bounds apply. Sharing and claims are 0.
    - ``free_cpus`` is 0: every pCPU belongs to the default pool, as on a fresh Xen host.
    - Version facts come from the arguments; ``cc_*`` mirror pyxen's XENVER_compile_info;
      ``platform_params`` (virt_start) is 0, as pyxen's XENVER_platform_parameters reports
      to HVM callers.
    """
    uts = os.uname()
    cpu_dir = f"{sys_root}/devices/system/cpu"
    online = _cpulist(_read(f"{cpu_dir}/online"))
    nr_cpus = len(online) if online else (os.cpu_count() or 1)
    possible = _cpulist(_read(f"{cpu_dir}/possible"))
    max_cpu_id = max(possible) if possible else nr_cpus - 1
    nodes = _cpulist(_read(f"{sys_root}/devices/system/node/online"))
    nr_nodes = len(nodes) if nodes else 1

    cpuinfo = _read(f"{proc_root}/cpuinfo")
    threads = _cpulist(_read(f"{cpu_dir}/cpu0/topology/thread_siblings_list"))
    package = _cpulist(_read(f"{cpu_dir}/cpu0/topology/core_siblings_list"))
    if threads and package:
        threads_per_core = len(threads)
        cores_per_socket = max(1, len(package) // threads_per_core)
    else:
        try:
            siblings = int(_cpuinfo_first(cpuinfo, "siblings") or 0)
            cores = int(_cpuinfo_first(cpuinfo, "cpu cores") or 0)
        except ValueError:
            siblings = cores = 0
        threads_per_core = max(1, siblings // cores) if cores else 1
        cores_per_socket = cores or 1
    try:
        cpu_mhz = float(_cpuinfo_first(cpuinfo, "cpu MHz") or 0)
    except ValueError:
        cpu_mhz = 0.0

    meminfo = _read(f"{proc_root}/meminfo")
    total_mib = (_meminfo_kib(meminfo, "MemTotal") or 0) // 1024
    avail_kib = _meminfo_kib(meminfo, "MemAvailable")
    avail_mib = avail_kib // 1024 if avail_kib is not None else total_mib
    free_mib = max(0, min(avail_mib, total_mib - guest_memory_mib))

    major, minor, extra = xen_version
    cc_compiler, cc_by, cc_domain, cc_date = _COMPILE_INFO
    return HostInfo(
        host=uts.nodename, release=uts.release, version=uts.version, machine=uts.machine,
        nr_cpus=nr_cpus, max_cpu_id=max_cpu_id, nr_nodes=nr_nodes,
        cores_per_socket=cores_per_socket, threads_per_core=threads_per_core,
        cpu_mhz=cpu_mhz, hw_caps=_host_hw_caps(cpuid_dev), virt_caps=virt_caps,
        total_memory=total_mib, free_memory=free_mib, sharing_freed_memory=0,
        sharing_used_memory=0, outstanding_claims=0, free_cpus=0,
        xen_major=major, xen_minor=minor, xen_extra=extra, xen_caps=xen_caps,
        xen_scheduler=scheduler, xen_pagesize=4096, platform_params=platform_virt_start,
        xen_changeset=xen_changeset, xen_commandline=xen_commandline,
        cc_compiler=cc_compiler, cc_compile_by=cc_by, cc_compile_domain=cc_domain,
        cc_compile_date=cc_date, build_id=build_id,
        xenstored_socket=xenstored_socket, pyxend_socket=pyxend_socket)


# --------------------------------------------------------------------------------------------
# xl vcpu-list
# --------------------------------------------------------------------------------------------

VCPU_LIST_HEADER = "%-32s %5s %5s %5s %5s %9s %s" % (
    "Name", "ID", "VCPU", "CPU", "State", "Time(s)", "Affinity (Hard / Soft)")


def vcpu_state(*, online: bool = True, running: bool = False, blocked: bool = False) -> str:
    """The State column: ``r``/``b`` flags then ``-`` when online (``"r--"``, ``"-b-"``,
    ``"---"``), always ``"--p"`` when offline."""
    if not online:
        return "--p"
    return ("r" if running else "-") + ("b" if blocked else "-") + "-"


def format_cpumap(cpus: Iterable[int], nr_cpus: int) -> str:
    """A cpumap as xl's ``print_bitmap`` over bits ``0..nr_cpus-1``: ``"all"`` when every bit
    is set, ``"none"`` when none is, else ranges such as ``"0-3,6"``."""
    bits = set(cpus)
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < nr_cpus:
        if i in bits:
            j = i
            while j + 1 < nr_cpus and j + 1 in bits:
                j += 1
            ranges.append((i, j))
            i = j + 1
        else:
            i += 1
    if not ranges:
        return "none"
    if ranges == [(0, nr_cpus - 1)]:
        return "all"
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


@dataclass(frozen=True)
class VcpuRow:
    """One ``xl vcpu-list`` row. ``cpu`` None means the vCPU is offline (CPU column ``-``,
    ``state`` then ``"--p"``); ``state`` is :func:`vcpu_state`'s three letters; ``hard`` and
    ``soft`` are affinity strings (:func:`format_cpumap`)."""

    name: str
    domid: int
    vcpu: int
    cpu: int | None
    state: str
    time_s: float = 0.0
    hard: str = "all"
    soft: str = "all"

    @classmethod
    def from_ns(cls, name: str, domid: int, vcpu: int, cpu: int | None, state: str,
                vcpu_time_ns: int, hard: str = "all", soft: str = "all") -> "VcpuRow":
        """A row from a hypervisor vcpu_time in ns, rounded through a C ``float`` as xl does."""
        f32 = struct.unpack("f", struct.pack("f", float(vcpu_time_ns)))[0]
        return cls(name, domid, vcpu, cpu, state, f32 / 1e9, hard, soft)


def _vcpu_row(row: VcpuRow) -> str:
    if len(row.state) != 3:
        raise ValueError(f"vCPU state must be 3 letters, got {row.state!r}")
    cpu = "-" if row.cpu is None else str(row.cpu)
    return (f"{row.name:<32} {row.domid:5d} {row.vcpu:5d}{cpu:>5} {row.state:>5} "
            f"{row.time_s:9.1f}  {row.hard} / {row.soft}")


def format_vcpu_list(rows: Iterable[VcpuRow]) -> str:
    """The whole ``xl vcpu-list`` output: header then one line per row, each ending ``\\n``."""
    return "".join(line + "\n" for line in [VCPU_LIST_HEADER, *(_vcpu_row(r) for r in rows)])


# --------------------------------------------------------------------------------------------
# xl uptime
# --------------------------------------------------------------------------------------------

UPTIME_HEADER = "%-33s %4s %s" % ("Name", "ID", "Uptime")


def uptime_to_string(seconds: int, short: bool = False) -> str:
    """xl's ``uptime_to_string``: ``"H:MM:SS"`` (hour ``%2d``), prefixed ``"1 day, "`` or
    ``"N days, "``; ``short`` drops the seconds. Negative input counts as 0."""
    up = max(0, int(seconds))
    day, up = divmod(up, 86400)
    hour, up = divmod(up, 3600)
    minute, sec = divmod(up, 60)
    clock = f"{hour:2d}:{minute:02d}" if short else f"{hour:2d}:{minute:02d}:{sec:02d}"
    if day > 1:
        return f"{day} days, {clock}"
    if day == 1:
        return f"{day} day, {clock}"
    return clock


def format_uptime(rows: Iterable[tuple[str, int, int]], short: bool = False,
                  now: _dt.datetime | _dt.time | None = None) -> str:
    """``xl uptime`` (``short=False``) or ``xl uptime -s`` output for (name, domid,
    uptime_seconds) rows, each line ending ``\\n``. The short form needs the local time of
    day: ``now``, or the current local time when None (the only impure default here)."""
    if not short:
        return "".join([UPTIME_HEADER + "\n"] + [
            f"{name:<33} {domid:4d} {uptime_to_string(up)}\n" for name, domid, up in rows])
    if now is None:
        now = _dt.datetime.now()
    hms = now.strftime("%H:%M:%S")
    return "".join(f" {hms} up {uptime_to_string(up, short=True)}, {name} ({domid})\n"
                   for name, domid, up in rows)


# --------------------------------------------------------------------------------------------
# xl list -l
# --------------------------------------------------------------------------------------------

#: DOMID_INVALID: what xl (>= 4.14, domid_policy "xen") stores as c_info.domid at creation.
INVALID_DOMID = 0x7FF4

_ACTIONS = {  # xl.cfg spelling -> libxl enum string (libxl_action_on_shutdown)
    "destroy": "destroy", "restart": "restart", "rename-restart": "restart_rename",
    "preserve": "preserve", "coredump-destroy": "coredump_destroy",
    "coredump-restart": "coredump_restart", "soft-reset": "soft_reset",
}
_ACTION_VALUES = set(_ACTIONS.values())

_DOMAIN_KEYS = {
    "domid", "name", "uuid", "type", "memory_kib", "maxmem_kib", "vcpus", "maxvcpus",
    "avail_vcpus", "kernel", "ramdisk", "cmdline", "on_poweroff", "on_reboot", "on_watchdog",
    "on_crash", "on_soft_reset", "sched", "sched_weight", "sched_cap", "sched_params",
    "c_info_domid", "run_hotplug_scripts", "claim_mode", "msr_relaxed", "disks", "nics",
}
_REQUIRED = ("domid", "name", "uuid", "memory_kib", "vcpus")


def _defbool(value: bool) -> str:
    return "True" if value else "False"


def _action(value: str | None, default: str) -> str:
    action = default if value is None else value
    if action in _ACTIONS:
        return _ACTIONS[action]
    if action in _ACTION_VALUES:
        return action
    raise ValueError(f"unknown shutdown action {action!r}")


def libxl_domain_config(domain: Mapping[str, Any]) -> dict[str, Any]:
    """The libxl_domain_config (as ordered dicts) ``xl list -l`` shows for a PVH domain.

    Required keys: ``domid`` (not part of the config), ``name``, ``uuid``, ``memory_kib``
    (target), ``vcpus`` (online count). Optional: ``type`` ("pvh" only), ``maxmem_kib``
    (default memory_kib), ``maxvcpus`` (default vcpus), ``avail_vcpus`` (online vCPU ids,
    default ``range(vcpus)``), ``kernel``/``ramdisk``/``cmdline`` (None: absent),
    ``on_poweroff``/``on_reboot``/``on_watchdog``/``on_crash``/``on_soft_reset`` (xl.cfg or
    libxl spelling; defaults destroy/restart/destroy/destroy/soft-reset), ``sched`` ("credit")
    with ``sched_weight`` (256) and ``sched_cap`` (0) or a verbatim ``sched_params`` dict,
    ``c_info_domid`` (:data:`INVALID_DOMID`; 0 omits it), ``run_hotplug_scripts``/
    ``claim_mode`` (True, xl.conf defaults), ``msr_relaxed`` (False), ``disks``/``nics``
    (lists of already-ordered libxl device dicts). Unknown keys raise ValueError. Fields equal
    to libxl's defaults are left out, exactly as libxl's generated gen_json does.
    """
    unknown = set(domain) - _DOMAIN_KEYS
    if unknown:
        raise ValueError(f"unknown domain keys: {sorted(unknown)}")
    missing = [k for k in _REQUIRED if k not in domain]
    if missing:
        raise ValueError(f"missing domain keys: {missing}")
    dtype = domain.get("type", "pvh")
    if dtype != "pvh":
        raise ValueError(f"only PVH domains are supported, got type {dtype!r}")

    c_info: dict[str, Any] = {"type": "pvh", "name": domain["name"]}
    c_domid = domain.get("c_info_domid", INVALID_DOMID)
    if c_domid:
        c_info["domid"] = c_domid
    uuid = str(domain["uuid"]).lower()
    if uuid.strip("0-"):                       # libxl_uuid_is_nil -> omitted
        c_info["uuid"] = uuid
    c_info["run_hotplug_scripts"] = _defbool(domain.get("run_hotplug_scripts", True))

    vcpus = domain["vcpus"]
    max_vcpus = domain.get("maxvcpus") or vcpus
    avail = sorted(set(domain.get("avail_vcpus", range(vcpus))))
    target = domain["memory_kib"]
    maxmem = domain.get("maxmem_kib") or target

    b_info: dict[str, Any] = {}
    if max_vcpus:
        b_info["max_vcpus"] = max_vcpus
    if avail:
        b_info["avail_vcpus"] = avail
    b_info["max_memkb"] = maxmem
    b_info["target_memkb"] = target
    b_info["video_memkb"] = 0
    if "sched_params" in domain:
        b_info["sched_params"] = dict(domain["sched_params"])
    else:
        sched = domain.get("sched", "credit")
        params: dict[str, Any] = {"sched": sched}
        if sched in ("credit", "credit2"):
            params["weight"] = domain.get("sched_weight", 256)
            params["cap"] = domain.get("sched_cap", 0)
        b_info["sched_params"] = params
    b_info["claim_mode"] = _defbool(domain.get("claim_mode", True))
    for key in ("kernel", "cmdline", "ramdisk"):
        if domain.get(key) is not None:
            b_info[key] = domain[key]
    b_info["type.pvh"] = {}
    b_info["arch_arm"] = {}
    b_info["arch_x86"] = {"msr_relaxed": _defbool(domain.get("msr_relaxed", False))}

    config: dict[str, Any] = {"c_info": c_info, "b_info": b_info}
    for key in ("disks", "nics"):
        if domain.get(key):
            config[key] = [dict(d) for d in domain[key]]
    for key, default in (("on_poweroff", "destroy"), ("on_reboot", "restart"),
                         ("on_watchdog", "destroy"), ("on_crash", "destroy"),
                         ("on_soft_reset", "soft-reset")):
        action = _action(domain.get(key), default)
        if action != "destroy":                # LIBXL_ACTION_ON_SHUTDOWN_DESTROY is init_val
            config[key] = action
    return config


def _yajl_string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\b":
            out.append("\\b")
        elif ord(ch) < 0x20:
            out.append(f"\\u00{ord(ch):02X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _yajl_value(value: Any, depth: int) -> str:
    indent = "    "
    if isinstance(value, Mapping):
        if not value:
            return "{\n\n" + indent * depth + "}"
        items = [indent * (depth + 1) + _yajl_string(str(k)) + ": " + _yajl_value(v, depth + 1)
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent * depth + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[\n\n" + indent * depth + "]"
        items = [indent * (depth + 1) + _yajl_value(v, depth + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent * depth + "]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = "%.20g" % value
        return text + ".0" if text.lstrip("-").isdigit() else text
    if isinstance(value, str):
        return _yajl_string(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def yajl_json(value: Any) -> str:
    """``value`` as yajl 2 writes it with ``yajl_gen_beautify`` (libxl_yajl_gen_alloc):
    4-space indent, ``": "`` after keys, empty containers as opener, blank line, closer;
    strings escape ``" \\ \\n \\r \\t \\f \\b`` and other controls as ``\\u00XX``, nothing else;
    ends with the newline yajl adds once the top-level value is complete."""
    return _yajl_value(value, 0) + "\n"


def format_list_long(domains: Sequence[Mapping[str, Any]]) -> str:
    """``xl list -l`` output: ``[{"domid": N, "config": ...}, ...]`` through :func:`yajl_json`
    plus ``puts``'s newline. Each domain is a dict as :func:`libxl_domain_config` takes."""
    items = [{"domid": d["domid"], "config": libxl_domain_config(d)} for d in domains]
    return yajl_json(items) + "\n"




_DISK_FORMATS = ("qcow", "qcow2", "vhd", "raw", "empty", "qed")    # libxl_disk_format names


def libxl_device_disk(disk: Mapping[str, Any]) -> dict[str, Any]:
    """One ``disks`` entry of ``xl list -l`` (libxl_device_disk through gen_json) for a
    pyxen disk (a :class:`~pyxen.vmm.devices.DiskConfig` dict: ``target``, ``vdev``,
    ``format``, ``readonly``, ``cdrom``, ``discard``).

    Fields in libxl_types.idl order, each only when it differs from libxl's default:
    ``pdev_path``, ``vdev``, ``backend`` (``phy`` for raw images, which blkback serves
    directly; ``qdisk`` for the formats QEMU serves), ``format``, ``removable`` (1 for a
    cdrom, as xl's parser sets it), ``readwrite`` (1 unless read-only), ``is_cdrom`` (1 for
    a cdrom) and ``discard_enable`` ("False" only when ``no-discard`` was asked for: xl's
    parser leaves the defbool at its default otherwise). The backend domain (dom0) is the
    default and never shown."""
    fmt = disk.get("format") or "raw"
    if fmt == "vpc":
        fmt = "vhd"
    cdrom = bool(disk.get("cdrom"))
    out: dict[str, Any] = {}
    if disk.get("target"):
        out["pdev_path"] = disk["target"]
    out["vdev"] = disk["vdev"]
    out["backend"] = "phy" if fmt == "raw" else "qdisk"
    if fmt in _DISK_FORMATS:
        out["format"] = fmt
    if cdrom:
        out["removable"] = 1
    if not (disk.get("readonly") or cdrom):
        out["readwrite"] = 1
    if cdrom:
        out["is_cdrom"] = 1
    if disk.get("discard", True) is False:
        out["discard_enable"] = "False"
    return out


# --------------------------------------------------------------------------------------------
# xl block-list
# --------------------------------------------------------------------------------------------

BLOCK_LIST_HEADER = "%-5s %-3s %-6s %-5s %-6s %-8s %-30s\n" % (
    "Vdev", "BE", "handle", "state", "evt-ch", "ring-ref", "BE-path")


def format_block_list(rows: Iterable[Mapping[str, Any]]) -> str:
    """``xl block-list`` output: :data:`BLOCK_LIST_HEADER`, then one line per disk from a
    mapping with ``devid``, ``backend_id``, ``frontend_id``, ``state``, ``evtch``,
    ``ring_ref`` and ``be_path`` (the event channel and ring reference are -1 until the
    guest's frontend has published them)."""
    out = [BLOCK_LIST_HEADER]
    for r in rows:
        out.append("%-5d %-3d %-6d %-5d %-6d %-8d %-30s\n" % (
            r["devid"], r.get("backend_id", 0), r["frontend_id"], r["state"],
            r.get("evtch", -1), r.get("ring_ref", -1), r["be_path"]))
    return "".join(out)


# --------------------------------------------------------------------------------------------
# xl network-list and the nics of xl list -l
# --------------------------------------------------------------------------------------------

NETWORK_LIST_HEADER = "%-3s %-2s %-17s %-6s %-5s %-6s %5s/%-5s %-30s\n" % (
    "Idx", "BE", "Mac Addr.", "handle", "state", "evt-ch", "tx-", "rx-ring-ref", "BE-path")

#: the MTU libxl gives a NIC whose config sets none (LIBXL_DEVICE_NIC_MTU_DEFAULT)
NIC_MTU_DEFAULT = 1500


def _mac_bytes(mac: str) -> str:
    """``LIBXL_MAC_FMT`` of a MAC string (``%02hhx`` octets joined by ``:``)."""
    octets = [int(o, 16) for o in mac.split(":")]
    if len(octets) != 6 or any(not 0 <= o <= 255 for o in octets):
        raise ValueError(f"not a MAC address: {mac!r}")
    return ":".join(f"{o:02x}" for o in octets)


def format_network_list(rows: Iterable[Mapping[str, Any]]) -> str:
    """``xl network-list`` output: :data:`NETWORK_LIST_HEADER`, then one line per NIC from a
    mapping with ``devid``, ``backend_id``, ``mac``, ``state``, ``evtch``, ``tx_ring_ref``,
    ``rx_ring_ref`` and ``be_path`` (event channel and ring references are -1 until the
    guest's netfront has published them). ``handle`` is the devid, as xl prints it."""
    out = [NETWORK_LIST_HEADER]
    for r in rows:
        out.append("%-3d %-2d " % (r["devid"], r.get("backend_id", 0)) + _mac_bytes(r["mac"])
                   + "%6d %5d %6d %5d/%-11d %-30s\n" % (
                       r["devid"], r["state"], r.get("evtch", -1), r.get("tx_ring_ref", -1),
                       r.get("rx_ring_ref", -1), r["be_path"]))
    return "".join(out)


def libxl_device_nic(nic: Mapping[str, Any]) -> dict[str, Any]:
    """One ``nics`` entry of ``xl list -l`` (libxl_device_nic through gen_json) for a pyxen
    NIC (a :class:`~pyxen.vmm.devices.NicConfig` dict: ``devid``, ``mac``, ``bridge``,
    ``vifname``, ``ip``, ``mtu``, ``rate``).

    Fields in libxl_types.idl order, each only when it differs from libxl's default, as
    libxl's saved configuration holds them for a NIC created from an xl.cfg entry: the
    parsed spec plus what libxl's ``update_config`` copies back (``devid``, the resolved
    ``mac``, ``nictype`` ``vif``): ``devid``, ``mtu`` (when not 1500), ``mac``, ``ip``,
    ``bridge`` (always: pyxen's default bridge plays xl.conf's ``default_bridge``),
    ``ifname`` (an explicit ``vifname``), ``nictype``, ``rate_bytes_per_interval`` and
    ``rate_interval_usecs``. The backend domain (dom0) is the default and never shown."""
    out: dict[str, Any] = {"devid": int(nic["devid"])}
    mtu = nic.get("mtu")
    if mtu and mtu != NIC_MTU_DEFAULT:
        out["mtu"] = int(mtu)
    out["mac"] = _mac_bytes(nic["mac"])
    if nic.get("ip"):
        out["ip"] = nic["ip"]
    if nic.get("bridge"):
        out["bridge"] = nic["bridge"]
    if nic.get("vifname"):
        out["ifname"] = nic["vifname"]
    out["nictype"] = "vif"
    rate = nic.get("rate")
    if rate:
        out["rate_bytes_per_interval"] = int(rate[0])
        out["rate_interval_usecs"] = int(rate[1])
    return out
