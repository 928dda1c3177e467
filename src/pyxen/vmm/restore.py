"""The receiving side of restore and live migration: a domain rebuilt from a record stream.

:class:`DomainRestorer` is fed the stream's bytes (:meth:`feed`, any chunking) and builds an
empty domain of the right shape when DOMAIN_CONFIG arrives, so page data goes straight into
its memory during pre-copy. Nothing outside this process is touched until END has been read
and every record checked: then :meth:`finish` loads the Xen and vCPU state, imports the
xenstore nodes and connection, connects console and store rings, re-attaches the backends and
returns the domain, paused. :meth:`discard` throws a half-built domain away. Every error names
the record (index, type) and its offset in the stream.

Runs in the VMM process that will own the domain; one thread.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from pyxen.core.memory import PAGE
from pyxen.engine.base import CpuidEntry
from pyxen.errors import EngineError, PyxenError
from pyxen.migration import stream as S
from pyxen.vmm.builder import (DomainConfig, Vmm, build_shell, connect_platform,
                                device_manager, platform_ports)
from pyxen.vmm.devices import DiskConfig, NicConfig

log = logging.getLogger("pyxen.migration")
_ZERO = bytes(PAGE)


class RestoreError(PyxenError):
    """The stream cannot be restored; the message names the record and offset."""


def cpuid_to_json(tables: list[list[CpuidEntry]]) -> list[list[list[int]]]:
    return [[[e.function, e.index, e.eax, e.ebx, e.ecx, e.edx, int(e.significant_index)]
             for e in t] for t in tables]


def cpuid_from_json(raw: object) -> list[list[CpuidEntry]]:
    if not isinstance(raw, list):
        raise ValueError("cpuid must be a list of tables")
    out = []
    for t in raw:
        out.append([CpuidEntry(*(int(x) & 0xFFFFFFFF for x in e[:6]), bool(e[6])) for e in t])
    return out


class DomainRestorer:
    """Rebuilds one domain. ``make_config(config) -> DomainConfig`` turns the stream's
    DOMAIN_CONFIG into this host's config (host-local paths, the xenstored socket) and raises
    RestoreError/PyxenError if this host cannot run it. ``xenstore_import(domid, state)``
    imports the XENSTORE record (the standalone xenstored). ``stream`` receives console output.
    """

    REQUIRED = (S.XEN_STATE, S.XENSTORE, S.DEVICES)

    def __init__(self, make_config: Callable[[dict], DomainConfig],
                 xenstore_import: Callable[[int, dict], None],
                 stream: Callable[[str, bytes], None] | None = None) -> None:
        self.make_config = make_config
        self.xenstore_import = xenstore_import
        self.stream = stream
        self.reader = S.StreamReader()
        self.config: dict | None = None
        self.cfg: DomainConfig | None = None
        self.vmm: Vmm | None = None
        self.vcpu_blobs: dict[int, tuple[bytes, S.Record]] = {}
        self.hyp_pages: dict[tuple[int, int], bytes] = {}
        self.json: dict[int, tuple[dict, S.Record]] = {}
        self.pages_received = 0
        self.ended = False
        self._regions: list = []
        #: duration of each step of :meth:`finish`, ms
        self.steps: dict[str, float] = {}
        self._disk_fds: dict[int, tuple[int, int]] = {}     # devid -> (fd, size): disk copy
        self.created_files: list[str] = []

    # ----------------------------------------------------------------- input
    def feed(self, data: bytes | memoryview) -> None:
        """Consume stream bytes. Raises StreamError/RestoreError (then :meth:`discard`)."""
        for rec in self.reader.feed(data):
            self._record(rec)

    def _fail(self, rec: S.Record, why: str) -> RestoreError:
        return RestoreError(f"record {rec.index} ({rec.name}) at offset 0x{rec.offset:x}: {why}")

    def _record(self, rec: S.Record) -> None:
        t = rec.type
        if self.config is None and t != S.DOMAIN_CONFIG:
            raise self._fail(rec, "the stream must start with DOMAIN_CONFIG")
        if t == S.DOMAIN_CONFIG:
            if self.config is not None:
                raise self._fail(rec, "a second DOMAIN_CONFIG")
            self._configure(rec, S.parse_json(rec))
        elif t == S.PAGE_DATA:
            self._pages(rec)
        elif t == S.HYPERVISOR_PAGE:
            kind, index, data = S.parse_hypervisor_page(rec)
            if kind not in (1, 2) or (kind == 1 and index != 0) or index >= 64:
                raise self._fail(rec, f"hypervisor page kind {kind} index {index}")
            self.hyp_pages[(kind, index)] = bytes(data)
        elif t == S.VCPU_STATE:
            vid, blob = S.parse_vcpu_state(rec)
            assert self.cfg is not None
            if not 0 <= vid < self.cfg.vcpus or vid in self.vcpu_blobs:
                raise self._fail(rec, f"vCPU {vid} (the domain has {self.cfg.vcpus}, each once)")
            self.vcpu_blobs[vid] = (bytes(blob), rec)
        elif t in (S.XEN_STATE, S.XENSTORE, S.DEVICES):
            if t in self.json:
                raise self._fail(rec, "appears twice")
            self.json[t] = (S.parse_json(rec), rec)
        elif t == S.DISK_DATA:
            devid, off, length, data = S.parse_disk_data(rec)
            target = self._disk_fds.get(devid)
            if target is None:
                raise self._fail(rec, f"disk data for device {devid}, which is not copied")
            fd, size = target
            if off + length > size:
                raise self._fail(rec, f"disk data at {off}+{length} beyond the {size}-byte "
                                 f"disk {devid}")
            try:
                os.pwrite(fd, data if data is not None else bytes(length), off)
            except OSError as e:
                raise self._fail(rec, f"writing disk {devid}: {e.strerror}") from None
        elif t == S.END:
            self.ended = True

    def _configure(self, rec: S.Record, config: dict) -> None:
        try:
            cfg = self.make_config(config)
            cpuid = cpuid_from_json(config.get("cpuid"))
            sites = [int(a) for a in config.get("hypercall_sites", [])]
            old_domid = int(config["spec"]["domid"])
            if cfg.domid != old_domid:        # a suspended guest may get a new ID (Xen leaf 4)
                cpuid = [[CpuidEntry(e.function, e.index, e.eax, e.ebx, cfg.domid, e.edx,
                                     e.significant_index)
                          if e.function >= 0x40000000 and e.function & 0xFF == 4
                          and e.ecx == old_domid else e for e in t] for t in cpuid]
        except (ValueError, TypeError, KeyError) as e:
            raise self._fail(rec, f"bad domain config: {e}") from None
        except PyxenError as e:
            raise self._fail(rec, str(e)) from None
        try:
            self.vmm = build_shell(cfg, cpuid, sites, self.stream)
        except PyxenError as e:
            raise self._fail(rec, f"cannot build the domain here: {e}") from None
        fmt = getattr(self.vmm.domain.vm, "engine", None)
        want = config.get("state_format")
        have = getattr(fmt, "state_format", None)
        if want != have:
            self.discard()
            raise self._fail(rec, f"saved with engine state {want!r}; this host's engine "
                             f"has {have!r}")
        self.config, self.cfg = config, cfg
        self._regions = [r for r in self.vmm.domain.memory.regions if r.kind != "xenpage"]
        if config.get("copy_storage"):
            self._create_disk_copies(rec, config["copy_storage"])
        if config.get("mode") == "suspend":
            return                          # devices start afresh after the guest resumes
        # open images, make TAPs now, while pre-copy runs: not during the pause
        self.vmm.devices = device_manager(self.vmm, cfg)
        try:
            self.vmm.devices.prepare({"disks": [d.to_dict() for d in cfg.disks],
                                      "nics": [n.to_dict() for n in cfg.nics]})
        except (PyxenError, OSError) as e:
            self.discard()
            raise self._fail(rec, f"devices: {e}") from None

    def _create_disk_copies(self, rec: S.Record, copies: object) -> None:
        """Create the (new, sparse) images a disk-copying migration fills; their paths are
        the config's disk targets (this host's, see ``make_config``)."""
        assert self.cfg is not None
        sizes = {}
        try:
            for c in copies:                                   # type: ignore[attr-defined]
                sizes[int(c["devid"])] = int(c["size"])
        except (TypeError, KeyError, ValueError):
            raise self._fail(rec, f"bad copy_storage list {copies!r}") from None
        for d in self.cfg.disks:
            if d.devid not in sizes:
                continue
            try:
                fd = os.open(d.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
            except OSError as e:
                self.discard()
                raise self._fail(rec, f"cannot create the disk copy {d.target}: "
                                 f"{e.strerror}") from None
            self.created_files.append(d.target)
            os.ftruncate(fd, sizes[d.devid])
            self._disk_fds[d.devid] = (fd, sizes[d.devid])

    def _pages(self, rec: S.Record) -> None:
        entries = S.parse_page_data(rec)
        regions = self._regions
        cache = None
        for pfn, ptype, data in entries:
            gpa = pfn * PAGE
            if cache is None or not cache.gpa <= gpa < cache.end:
                cache = next((r for r in regions if r.gpa <= gpa < r.end), None)
                if cache is None:
                    raise self._fail(rec, f"frame 0x{pfn:x} is outside the domain's memory")
            off = gpa - cache.gpa
            if data is None:
                cache.mm[off:off + PAGE] = _ZERO
            else:
                cache.mm[off:off + PAGE] = data
        self.pages_received += len(entries)

    def eof(self) -> None:
        """The input ended: raise (naming where) unless END was read."""
        self.reader.finish()

    # ----------------------------------------------------------------- build
    def finish(self) -> Vmm:
        """After END: apply the state and connect the domain (paused). On error the
        domain is destroyed and its xenstore nodes removed; RestoreError says why."""
        vmm, cfg = self.vmm, self.cfg
        if not self.ended or vmm is None or cfg is None:
            raise RestoreError("stream truncated: no END record")
        missing = [S.TYPE_NAMES[t] for t in self.REQUIRED if t not in self.json]
        missing += [f"VCPU_STATE {i}" for i in range(cfg.vcpus) if i not in self.vcpu_blobs]
        if missing:
            self.discard()
            raise RestoreError(f"stream incomplete: no {', '.join(missing)} before END")
        xd, d = vmm.xen, vmm.domain
        xen, xrec = self.json[S.XEN_STATE]
        imported = False
        if xen.get("suspended"):
            return self._finish_suspended(vmm, cfg, xen, xrec)
        t = [time.monotonic()]

        def step(name: str) -> None:
            now = time.monotonic()
            self.steps[name] = round((now - t[0]) * 1000, 2)
            t[0] = now
        try:
            try:
                xd.load_state(xen, self.hyp_pages)
            except (ValueError, KeyError, TypeError) as e:
                raise self._fail(xrec, str(e)) from None
            self._load_vcpus(xen, xrec)
            try:
                xd.clock.load(xen["clock"], guest_tsc=d.vcpus[0].ev.get_tsc())
            except (ValueError, KeyError) as e:
                raise self._fail(xrec, str(e)) from None
            step("cpu+xen")
            store, srec = self.json[S.XENSTORE]
            try:
                self.xenstore_import(cfg.domid, store)
                imported = True
            except PyxenError as e:
                raise self._fail(srec, f"xenstore import: {e}") from None
            step("xenstore-import")
            connect_platform(vmm, cfg, populate=False)
            step("platform")
            devices, drec = self.json[S.DEVICES]
            self._close_disk_fds()
            try:
                vmm.devices.restore(self._local_disks(devices))  # type: ignore[union-attr]
            except (PyxenError, ValueError, TypeError) as e:
                raise self._fail(drec, f"devices: {e}") from None
            step("devices")
        except BaseException:
            self.discard(release=imported)
            raise
        vmm.xen.resync_events()
        log.info("d%d: restore steps (ms): %s", cfg.domid, self.steps)
        return vmm

    def _finish_suspended(self, vmm: Vmm, cfg: DomainConfig, xen: dict,
                          xrec: S.Record) -> Vmm:
        """A guest that suspended itself (Xen's cooperative save): it resumes in a *new*
        domain, as on Xen -- fresh event channels, grant table, shared_info, xenstore
        connection and device handshakes, which the guest's resume path sets up again --
        with its memory and vCPUs as saved; its SCHEDOP_shutdown(suspend) returns 0."""
        xd, d = vmm.xen, vmm.domain
        self._close_disk_fds()
        try:
            try:
                params = {int(k): int(v) for k, v in xen["params"].items()}
                xd.e820 = [(int(a), int(b), int(c)) for a, b, c in xen["e820"]]
                xd.max_pages, xd.tot_pages = int(xen["max_pages"]), int(xen["tot_pages"])
                system_time = int(xen["system_time_ns"])
                khz = int(xen["clock"]["tsc_khz"])
            except (KeyError, TypeError, ValueError) as e:
                raise self._fail(xrec, f"suspended state: {e!r}") from None
            self._load_vcpus(xen, xrec)
            xd.params = params                 # the guest's, then new ports over them
            platform_ports(xd)
            # Xen system time goes on from where the guest left it
            xd.clock.anchor(d.vcpus[0].ev.get_tsc(), khz, system_time=system_time)
            xd.publish_time()
            connect_platform(vmm, cfg, populate=True)
            store, srec = self.json[S.XENSTORE]
            try:
                self._replay_guest_nodes(store, int(self.config["spec"]["domid"]), cfg)
            except (PyxenError, OSError, ValueError, KeyError, TypeError) as e:
                raise self._fail(srec, f"guest's xenstore nodes: {e}") from None
            devices, drec = self.json[S.DEVICES]
            try:
                for dd in self._local_disks(devices).get("disks", []):
                    vmm.devices.add_disk(DiskConfig.from_dict(dd))  # type: ignore[union-attr]
                for nd in devices.get("nics", []):
                    vmm.devices.add_nic(NicConfig.from_dict(  # type: ignore[union-attr]
                        {k: v for k, v in nd.items() if k != "vifname"}))
            except (PyxenError, ValueError, TypeError) as e:
                raise self._fail(drec, f"devices: {e}") from None
        except BaseException:
            self.discard(release=True)
            raise
        log.info("d%d: resumes from a guest suspend (new event channels, grants, devices)",
                 cfg.domid)
        return vmm

    def _load_vcpus(self, xen: dict, xrec: S.Record) -> None:
        """Each vCPU's engine blob, and its run flags from XEN_STATE's ``core_vcpus`` (a
        vCPU parked in SCHEDOP_shutdown(suspend) has it return 0 when it starts)."""
        assert self.vmm is not None
        vcpus = self.vmm.domain.vcpus
        try:
            for v, c in zip(vcpus, xen.get("core_vcpus", [])):
                v.online, v.sipi_wait = bool(c["online"]), bool(c["sipi_wait"])
                v.initialised = bool(c["initialised"])
                if c.get("parked_in_hypercall"):
                    v.parked_in_hypercall, v.resume_result = True, 0
        except (KeyError, TypeError, AttributeError) as e:
            raise self._fail(xrec, f"core_vcpus: {e!r}") from None
        for vid, (blob, rec) in sorted(self.vcpu_blobs.items()):
            try:
                vcpus[vid].ev.load_state(blob)
            except EngineError as e:
                raise self._fail(rec, str(e)) from None

    def _local_disks(self, devices: dict) -> dict:
        """DEVICES with this host's paths for the disks copied in the stream."""
        assert self.cfg is not None
        copied = self._copied_or_none()
        local = {c.devid: c.target for c in self.cfg.disks}
        if not copied <= set(local):
            raise ValueError(f"copied disks {sorted(copied - set(local))} are not in the "
                             "domain config")
        return dict(devices, disks=[
            dict(dd, target=local[dd["devid"]])
            if isinstance(dd, dict) and dd.get("devid") in copied else dd
            for dd in devices.get("disks", [])])

    @staticmethod
    def _replay_guest_nodes(store: dict, old: int, cfg: DomainConfig) -> None:
        """Write back the nodes the guest had written in its home (feature flags, data/),
        moved to the new domain ID, with the guest as owner. Not control/shutdown."""
        import base64
        from pyxen.xenstore.client import XenstoreClient
        if not cfg.xenstored or not store.get("nodes"):
            return
        src, dst = f"/local/domain/{old}/", f"/local/domain/{cfg.domid}/"
        with XenstoreClient(cfg.xenstored, timeout=10) as c:
            for n in store["nodes"]:
                path = str(n["path"])
                if not path.startswith(src) or path.endswith("/control/shutdown"):
                    continue
                new = dst + path[len(src):]
                c.write(new, base64.b64decode(n["value"]))
                perms = [p[0] + str(cfg.domid) if p[1:] == str(old) else p
                         for p in n.get("perms", [])]
                if perms:
                    c.set_perms(new, perms)

    @property
    def was_running(self) -> bool:
        return bool(self.json.get(S.XEN_STATE, ({}, None))[0].get("was_running", True))

    def _copied_or_none(self) -> set[int]:
        raw = (self.config or {}).get("copy_storage") or []
        return {int(c["devid"]) for c in raw}

    def _close_disk_fds(self) -> None:
        fds, self._disk_fds = self._disk_fds, {}
        for fd, _size in fds.values():
            os.close(fd)

    def discard(self, release: bool = False) -> None:
        """Throw the half-built domain away (and, with ``release``, its xenstore nodes);
        disk copies this restore created are deleted."""
        self._close_disk_fds()
        for path in self.created_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.created_files = []
        vmm, self.vmm = self.vmm, None
        if vmm is None:
            return
        try:
            vmm.destroy()
        except Exception as e:                           # noqa: BLE001 (failure path)
            log.warning("restore: destroying the half-built domain: %s", e)
        if release and self.cfg is not None and self.cfg.xenstored:
            from pyxen.vmm.process import release_domain
            release_domain(self.cfg.xenstored, self.cfg.domid, self.cfg.uuid)


def start_restored(vmm: Vmm, running: bool) -> None:
    """Start the vCPU threads of a restored domain (online ones run, APs the guest never
    started wait for SIPI) and unpause it if ``running``."""
    d = vmm.domain
    for v in d.vcpus:
        if v.online:
            v.start()
        elif v.sipi_wait:
            v.start_waiting_for_sipi()
    if running:
        d.unpause()
