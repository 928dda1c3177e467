"""Build a running PVH domain from a :class:`DomainConfig` (Firecracker's ``builder.rs`` role).

Steps, in order: pick the engine; create guest memory (RAM, ACPI area, Xen special pages); load
the kernel at its physical addresses; lay out modules, start_info and ACPI tables; create the
Xen state (shared_info, event channels, grant table, params, store/console ports); create
vCPUs with per-vCPU CPUID; anchor the clock; wire port I/O (debug port 0xE9, ACPI sleep/reset);
leave vCPU 0 at the PVH entry. The result is paused until :meth:`Vmm.start`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from pyxen.arch.x86 import acpi, layout
from pyxen.arch.x86.cpu import pvh_entry_state
from pyxen.arch.x86.cpuid import HYPERCALL_PAGE_MSR, build_cpuid
from pyxen.arch.x86.kernel import load_pvh_kernel
from pyxen.arch.x86.pvh import build_start_info_blob
from pyxen.backends.console import ConsoleBackend
from pyxen.core.clock import DomainClock
from pyxen.core.domain import Domain, RunState, Vcpu
from pyxen.core.memory import GuestMemory
from pyxen.engine.base import CpuidEntry, Engine, EngineVm
from pyxen.errors import (ConfigError, EngineUnavailable, KernelImageError,
                          XenstoredUnavailable)
from pyxen.backends.guestio import DomainGuestAccess
from pyxen.backends.xenbus import LocalBus, SocketBus
from pyxen.vmm.devices import DeviceManager, DiskConfig, NicConfig
from pyxen.vmm.storelink import StoreLink
from pyxen.xen.abi import xen as X
from pyxen.xen.domain import XEN_VERSION, ConsoleSink, XenDomain
from pyxen.xenstore import XenstoreError, XenstoreRing, XenstoreServer, populate_domain
from pyxen.xenstore.client import XenstoreClient

log = logging.getLogger("pyxen.vmm")

MiB = 1 << 20


@dataclass
class DomainConfig:
    """What a domain is made of. Units: memory in MiB."""

    kernel: str
    name: str = "domU"
    memory: int = 32
    vcpus: int = 1
    cmdline: str = ""
    modules: list[tuple[str, str]] = field(default_factory=list)   # (path, cmdline)
    accel: str = "auto"
    domid: int = 1
    #: a shared in-process xenstore server; None: see ``xenstored``
    xenstore: XenstoreServer | None = None
    #: socket of a standalone xenstored that serves the store ring (the toolstack's case);
    #: None (and no ``xenstore``): a private in-process server (``pyxen run``)
    xenstored: str | None = None
    uuid: str | None = None
    #: virtual disks (served by blkback in this process)
    disks: list[DiskConfig] = field(default_factory=list)
    #: virtual NICs (served by netback in this process, TAPs on host bridges)
    nics: list[NicConfig] = field(default_factory=list)
    #: where device helpers (qemu-storage-daemon exports) keep their files
    run_dir: str = "/tmp"


ACCELS = ("auto", "kvm", "tcg")


def hardware_virtualisation() -> bool:
    """True if the host CPU offers VT-x/AMD-V, so KVM runs guest ring 0 natively.

    Without it (e.g. ``kvm_pvm``) KVM interprets guest kernel code and a stock kernel cannot
    boot, so ``auto`` picks the software engine.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


def select_engine(accel: str) -> Engine:
    """The engine for ``accel``: ``kvm``, ``tcg`` or ``auto`` (kvm with hardware
    virtualisation, else tcg). Raises ConfigError for an unknown name, EngineUnavailable."""
    if accel not in ACCELS:
        raise ConfigError(f"accel={accel!r}: unknown accelerator (use one of "
                          f"{', '.join(ACCELS)})", "accel")
    if accel == "kvm" or (accel == "auto" and hardware_virtualisation()):
        from pyxen.engine.kvm import KvmEngine
        try:
            return KvmEngine()
        except EngineUnavailable:
            if accel == "kvm":
                raise
    from pyxen.engine.tcg import TcgEngine
    return TcgEngine()


def engine_state_format(name: str) -> str | None:
    """The vCPU state format engine ``name`` would use on this host, or None if it is not
    usable here (a migration target checks this before accepting a domain)."""
    if name == "tcg":
        from pyxen.engine import tcg
        return tcg.state_format() if tcg.TcgEngine.available() else None
    if name == "kvm":
        from pyxen.engine import kvm
        return kvm.STATE_FORMAT if kvm.KvmEngine.available() else None
    return None


class Vmm:
    """One built domain: the core :class:`Domain`, its Xen state and its console backend."""

    def __init__(self, domain: Domain, xen: XenDomain, console: ConsoleBackend,
                 build_ms: float) -> None:
        self.domain = domain
        self.xen = xen
        self.console = console
        self.build_ms = build_ms

    def start(self) -> None:
        """Run vCPU 0 at the entry point; the others wait for INIT/SIPI or VCPUOP_up."""
        self.domain.unpause()
        self.domain.vcpus[0].start()
        for v in self.domain.vcpus[1:]:
            if not v.online:
                v.start_waiting_for_sipi()

    def wait(self, timeout: float | None = None) -> RunState | None:
        return self.domain.wait_for_shutdown(timeout)

    xenstore: XenstoreServer | None = None
    store_link: StoreLink | None = None
    devices: DeviceManager | None = None

    cpuid: list[list[CpuidEntry]] = []
    hypercall_sites: list[int] = []

    def destroy(self) -> None:
        self.domain.destroy()
        if self.devices is not None:
            self.devices.close()
        if self.store_link is not None:
            self.store_link.close()
        self.xen.close()
        self.domain.vm.close()
        self.domain.memory.close()


def _align(x: int, a: int = 4096) -> int:
    return (x + a - 1) & ~(a - 1)


def build(cfg: DomainConfig, stream: Callable[[str, bytes], None] | None = None) -> Vmm:
    """Build the domain described by ``cfg`` (paused). Raises ConfigError/KernelImageError."""
    t0 = time.monotonic()
    _check_limits(cfg)
    kernel = load_pvh_kernel(cfg.kernel)
    engine = select_engine(cfg.accel)
    vm = engine.create_vm()
    mem = _memory(vm, cfg)

    # kernel, modules, start_info
    mem_bytes = cfg.memory * MiB
    for seg in kernel.segments:
        if not mem.is_ram(seg.paddr) or not mem.is_ram(seg.paddr + seg.memsz - 1):
            raise KernelImageError(cfg.kernel, f"segment at 0x{seg.paddr:x} (+0x{seg.memsz:x}) "
                                   f"does not fit in {cfg.memory} MiB of RAM")
        mem.write(seg.paddr, seg.data + bytes(seg.memsz - len(seg.data)))
    memmap = layout.build_memmap(mem_bytes)
    si_base = _align(kernel.image_end)
    mods_data = []
    for path, mcmd in cfg.modules:
        try:
            with open(path, "rb") as f:
                mods_data.append((f.read(), mcmd))
        except OSError as e:
            raise ConfigError(f"module {path}: {e.strerror}", "ramdisk") from e
    acpi_blob, rsdp = acpi.build_acpi_tables(layout.ACPI_BASE, cfg.vcpus)
    mem.write(layout.ACPI_BASE, acpi_blob)
    probe = build_start_info_blob(si_base, cmdline=cfg.cmdline,
                                  modules=[(0, len(d), c) for d, c in mods_data],
                                  memmap=memmap, rsdp_paddr=rsdp)
    addr = _align(si_base + len(probe))
    modules = []
    for data, mcmd in mods_data:
        if not mem.is_ram(addr + len(data)):
            raise ConfigError(f"modules do not fit in {cfg.memory} MiB of RAM", "memory")
        mem.write(addr, data)
        modules.append((addr, len(data), mcmd))
        addr = _align(addr + len(data))
    mem.write(si_base, build_start_info_blob(si_base, cmdline=cfg.cmdline, modules=modules,
                                             memmap=memmap, rsdp_paddr=rsdp))

    host_cpuid = engine.supported_cpuid()
    cpuid = [build_cpuid(host_cpuid, vcpu_id=i, domid=cfg.domid, nr_vcpus=cfg.vcpus,
                         xen_version=XEN_VERSION, hypercall_msr=HYPERCALL_PAGE_MSR)
             for i in range(cfg.vcpus)]
    vmm = _shell(cfg, vm, mem, cpuid, list(kernel.hypercall_sites), stream)
    domain, xd = vmm.domain, vmm.xen
    xd.e820 = [(r.addr, r.size, r.type) for r in memmap]
    bsp = domain.vcpus[0]
    sregs = bsp.ev.get_sregs()
    regs = pvh_entry_state(sregs, kernel.entry, si_base)
    bsp.ev.set_sregs(sregs)
    bsp.ev.set_regs(regs)
    bsp.initialised = True
    khz = bsp.ev.tsc_khz()                  # first: it may take time to measure
    xd.clock.anchor(bsp.ev.get_tsc(), khz)  # guest TSC read just before anchoring
    xd.publish_time()

    platform_ports(xd)
    try:
        connect_platform(vmm, cfg, populate=True)
        for disk in cfg.disks:
            vmm.devices.add_disk(disk)      # type: ignore[union-attr]
        for nic in cfg.nics:
            vmm.devices.add_nic(nic)        # type: ignore[union-attr]
    except BaseException:
        vmm.destroy()
        raise
    vmm.build_ms = (time.monotonic() - t0) * 1000
    return vmm


def platform_ports(xd: XenDomain) -> None:
    """The xenstore and console ports of a new domain (store first, then console, as libxl
    does), unbound for domain 0, and the HVM params naming them and their pages."""
    ev = xd.evtchn
    store_port = ev.alloc_unbound(X.DOMID_SELF, 0)
    console_port = ev.alloc_unbound(X.DOMID_SELF, 0)
    xd.params.update({X.HVM_PARAM_STORE_PFN: layout.XENSTORE_PFN,
                      X.HVM_PARAM_STORE_EVTCHN: store_port,
                      X.HVM_PARAM_CONSOLE_PFN: layout.CONSOLE_PFN,
                      X.HVM_PARAM_CONSOLE_EVTCHN: console_port})


def _check_limits(cfg: DomainConfig) -> None:
    if cfg.vcpus < 1 or cfg.vcpus > 128:
        raise ConfigError(f"vcpus={cfg.vcpus}: must be 1..128", "vcpus")
    if cfg.memory < 4 or cfg.memory > 64 * 1024:
        raise ConfigError(f"memory={cfg.memory}: must be 4..65536 MiB", "memory")


def _memory(vm: EngineVm, cfg: DomainConfig) -> GuestMemory:
    """The domain's guest-physical layout: RAM, the ACPI area, the Xen special pages."""
    mem = GuestMemory(vm, cfg.name)
    for i, (gpa, size) in enumerate(layout.ram_ranges(cfg.memory * MiB)):
        mem.add_region(f"ram{i}", gpa, size, "ram")
    mem.add_region("acpi", layout.ACPI_BASE, layout.ACPI_SIZE, "acpi")
    mem.add_region("special", layout.SPECIAL_PAGES_BASE,
                   layout.SPECIAL_PAGES_COUNT * layout.PAGE_SIZE, "special")
    return mem


def _shell(cfg: DomainConfig, vm: EngineVm, mem: GuestMemory, cpuid: list[list[CpuidEntry]],
           hypercall_sites: list[int], stream: Callable[[str, bytes], None] | None) -> Vmm:
    """Domain + Xen state + vCPUs (with their CPUID tables) + port I/O, no guest contents:
    what a boot and a restore have in common."""
    domain = Domain(cfg.domid, cfg.name, vm, mem)
    sink = ConsoleSink(stream=stream)
    xd = XenDomain(domain, hypercall_msr=HYPERCALL_PAGE_MSR, clock=DomainClock(),
                   max_pages=(cfg.memory * MiB) >> 12, sink=sink)
    domain.handlers = xd
    for i in range(cfg.vcpus):
        v = domain.add_vcpu(i)
        xd.add_vcpu_state()
        v.ev.set_cpuid(cpuid[i])
    vm.set_hypercall_sites(hypercall_sites)
    vm.set_trapped_msrs([HYPERCALL_PAGE_MSR])
    # port I/O: debug console, ACPI sleep control (power off), reset register
    xd.io_write_handlers[0xE9] = lambda v, p, d: sink.emit("debug", d)
    xd.io_read_handlers[0xE9] = lambda v, p, n: b"\xe9" * n     # Bochs/QEMU port-E9 hack
    xd.io_write_handlers[acpi.ACPI_SLEEP_CONTROL_PORT] = _sleep_control(domain)
    xd.io_write_handlers[acpi.ACPI_SLEEP_STATUS_PORT] = lambda v, p, d: None
    xd.io_read_handlers[acpi.ACPI_SLEEP_STATUS_PORT] = lambda v, p, n: bytes(n)
    xd.io_write_handlers[acpi.ACPI_RESET_PORT] = _reset_register(domain)
    vm.set_trapped_ports(sorted({Engine.HYPERCALL_PORT, *xd.io_write_handlers,
                                 *xd.io_read_handlers}))
    vmm = Vmm(domain, xd, None, 0.0)        # type: ignore[arg-type]
    vmm.cpuid = cpuid
    vmm.hypercall_sites = hypercall_sites
    return vmm


def connect_platform(vmm: Vmm, cfg: DomainConfig, *, populate: bool,
                     store_state: dict | None = None) -> None:
    """Serve the console ring and connect the store ring (ports and pages from the HVM
    params) and make the device manager. ``populate``: write libxl's /local/domain tree (a
    new domain); otherwise the tree is already in xenstore (a restore imported it, with the
    guest's connection state ``store_state`` for the in-process server, unused by xenstored)."""
    xd = vmm.xen
    mem = vmm.domain.memory
    ev = xd.evtchn
    sink = xd.sink
    store_port = xd.params[X.HVM_PARAM_STORE_EVTCHN]
    console_port = xd.params[X.HVM_PARAM_CONSOLE_EVTCHN]
    console = ConsoleBackend(mem.view(layout.CONSOLE_PFN << 12, 4096),
                             lambda: ev.set_pending(console_port),
                             lambda data: sink.emit("console", data))
    ev.bind_backend(console_port, console.notified)
    vmm.console = console

    # xenstore: the standard domU tree, then the guest's ring -- served by a standalone
    # xenstored (introduced with the memfd and two eventfds) or by a server in this process
    tree = dict(domid=cfg.domid, name=cfg.name, memory_kib=cfg.memory * 1024,
                vcpus=cfg.vcpus, vm_uuid=cfg.uuid or str(uuid.uuid4()), store_port=store_port,
                store_ring_ref=layout.XENSTORE_PFN, console_port=console_port,
                console_ring_ref=layout.CONSOLE_PFN)
    link = None
    xs: XenstoreServer | None = None
    if cfg.xenstored and cfg.xenstore is None:
        link = StoreLink(cfg.xenstored, cfg.domid, mem, layout.XENSTORE_PFN, store_port,
                         ev.set_pending)
        ev.bind_backend(store_port, link.guest_notified)
        client = None
        try:
            client = XenstoreClient(cfg.xenstored)
            if populate:
                populate_domain(client, **tree)
            link.introduce(client)                 # the link keeps the connection
        except (OSError, ConnectionError, XenstoreError) as e:
            if client is not None:
                client.close()
            link.close()
            raise XenstoredUnavailable(f"xenstored at {cfg.xenstored}: {e}") from e
    else:
        xs = cfg.xenstore or XenstoreServer()
        if populate:
            populate_domain(xs, **tree)
        store = XenstoreRing(mem.view(layout.XENSTORE_PFN << 12, 4096),
                             lambda: ev.set_pending(store_port), xs.connect(cfg.domid))
        ev.bind_backend(store_port, store.notified)
    vmm.xenstore = xs
    vmm.store_link = link
    # split-driver devices: backends in this process, reached by the guest through xenbus
    if vmm.devices is None:
        vmm.devices = device_manager(vmm, cfg)


def device_manager(vmm: Vmm, cfg: DomainConfig) -> DeviceManager:
    """The domain's device manager (backends talk to the same xenstore as the guest)."""
    xenstored, xs = cfg.xenstored, vmm.xenstore
    bus_factory = (lambda: SocketBus(xenstored)) if xenstored and cfg.xenstore is None \
        else (lambda: LocalBus(xs))
    return DeviceManager(bus_factory, DomainGuestAccess(vmm.xen), cfg.run_dir,
                         max_queues=min(cfg.vcpus, 4))


def build_shell(cfg: DomainConfig, cpuid: list[list[CpuidEntry]], hypercall_sites: list[int],
                stream: Callable[[str, bytes], None] | None = None) -> Vmm:
    """An empty domain for a restore: memory layout, vCPUs with the saved CPUID tables,
    Xen state at its defaults; nothing connected yet (the restorer loads the saved state,
    then calls :func:`connect_platform`). Raises ConfigError/EngineUnavailable."""
    _check_limits(cfg)
    if len(cpuid) != cfg.vcpus:
        raise ConfigError(f"{len(cpuid)} CPUID tables for {cfg.vcpus} vCPUs", "vcpus")
    engine = select_engine(cfg.accel)
    vm = engine.create_vm()
    try:
        mem = _memory(vm, cfg)
        return _shell(cfg, vm, mem, cpuid, hypercall_sites, stream)
    except BaseException:
        vm.close()
        raise


def _sleep_control(domain: Domain) -> Callable[[Vcpu, int, bytes], None]:
    def write(_v: Vcpu, _p: int, data: bytes) -> None:
        if acpi.decode_sleep_control(data[0]) == acpi.SLEEP_TYPE_S5:
            domain.shutdown("poweroff", "ACPI S5")
    return write


def _reset_register(domain: Domain) -> Callable[[Vcpu, int, bytes], None]:
    def write(_v: Vcpu, _p: int, data: bytes) -> None:
        if data[0] & 0x04:
            domain.shutdown("reboot", "ACPI reset register")
    return write

