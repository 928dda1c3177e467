"""A domain's split-driver devices: libxl's device add/remove plus the backends that serve them.

For each device the manager does what libxl does in dom0 -- write the frontend directory
(guest-owned, dom0 may read) and the backend directory (dom0-owned, the guest may read), both
in state Initialising -- and then starts the backend, which lives in this VMM process and
reaches the guest only through :class:`GuestAccess` (grants and event channels).

Removal follows libxl's ``device_generic_remove``: the backend goes to Closing with
``online = 0``, the frontend answers Closed, the backend follows, and then both directories are
removed (a frontend that does not answer within the timeout is removed anyway, as
``xl block-detach`` does after its timeout).

Owner: the domain's :class:`Vmm`. Thread-safe: add/remove may be called from the control
socket thread while the bus thread runs the backends' state machines.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Callable

from pyxen.backends.blkback import BlkBackend
from pyxen.backends.netback import NetBackend
from pyxen.backends.disk import DiskError, QemuExport, open_disk
from pyxen.backends.guestio import GuestAccess
from pyxen.backends.xenbus import (INITIALISING, STATE_NAMES, BackendBus, backend_path,
                                   frontend_path)
from pyxen.errors import DomainError

log = logging.getLogger("pyxen.vmm")

@dataclass(frozen=True)
class DiskConfig:
    """One virtual disk, as the toolstack resolved it (JSON-safe). ``devid`` is Xen's
    virtual-device number, ``vdev`` its name (``xvdb``); ``spec`` is the text the user wrote
    (named in errors)."""

    target: str
    vdev: str
    devid: int
    format: str = "raw"
    readonly: bool = False
    cdrom: bool = False
    discard: bool = True
    spec: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiskConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class NicConfig:
    """One virtual NIC (JSON-safe). ``rate`` is (bytes, interval in microseconds) or None;
    ``vifname`` defaults to Xen's ``vif<domid>.<devid>``; ``bridge`` to pyxen's default."""

    devid: int
    mac: str
    bridge: str = "pyxenbr0"
    vifname: str | None = None
    rate: tuple[int, int] | None = None
    ip: str | None = None
    mtu: int = 1500
    spec: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NicConfig:
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if kw.get("rate") is not None:
            kw["rate"] = tuple(kw["rate"])
        return cls(**kw)


class DeviceManager:
    """All split-driver devices of one domain. ``bus_factory`` makes the backends' xenstore
    connection when the first device is added (a domain without devices opens none)."""

    def __init__(self, bus_factory: Callable[[], BackendBus], guest: GuestAccess,
                 run_dir: str, max_queues: int = 1) -> None:
        self._bus_factory = bus_factory
        self._bus: BackendBus | None = None
        self._bus_lock = threading.Lock()
        self.guest = guest
        self.domid = guest.domid
        self.run_dir = run_dir
        self.max_queues = max_queues
        self.lock = threading.Lock()
        self.disks: dict[int, tuple[DiskConfig, BlkBackend, QemuExport | None]] = {}
        self.nics: dict[int, tuple[NicConfig, NetBackend]] = {}
        self._prepared: dict[tuple[str, int], tuple] = {}   # (kind, devid) -> (cfg, thing)

    @property
    def bus(self) -> BackendBus:
        with self._bus_lock:
            if self._bus is None:
                self._bus = self._bus_factory()
            return self._bus

    # --- block devices
    def add_disk(self, cfg: DiskConfig) -> BlkBackend:
        """Attach ``cfg`` (DiskError naming the spec if it cannot be used)."""
        what = cfg.spec or cfg.target
        with self.lock:
            if cfg.devid in self.disks:
                raise DiskError(f"disk {what!r}: vdev {cfg.vdev} is already in use")
            for other, _be, _e in self.disks.values():
                if (os.path.realpath(other.target) == os.path.realpath(cfg.target)
                        and not (other.readonly and cfg.readonly)):
                    raise DiskError(f"disk {what!r}: {cfg.target} is already attached "
                                    f"as {other.vdev}")
            if self.bus.try_read(f"{frontend_path('vbd', self.domid, cfg.devid)}/state"):
                raise DiskError(f"disk {what!r}: vdev {cfg.vdev} is already in use")
            image, export = open_disk(cfg.target, cfg.format, readonly=cfg.readonly,
                                      run_dir=self.run_dir, spec=what)
            try:
                be = BlkBackend(self.bus, self.guest, cfg.devid, image, discard=cfg.discard,
                                max_queues=self.max_queues)
                self._write_nodes("vbd", cfg.devid, frontend={
                    "virtual-device": str(cfg.devid),
                    "device-type": "cdrom" if cfg.cdrom else "disk",
                }, backend={
                    "dev": cfg.vdev, "type": "qdisk" if export else "phy",
                    "mode": "r" if cfg.readonly else "w", "params": cfg.target,
                    "device-type": "cdrom" if cfg.cdrom else "disk",
                    "removable": "0", "bootable": "1",
                    "discard-enable": "1" if cfg.discard else "0",
                })
                be.start()
            except BaseException:
                image.close()
                if export is not None:
                    export.close()
                raise
            self.disks[cfg.devid] = (cfg, be, export)
            log.info("d%d: disk %s attached as %s (%d)", self.domid, cfg.target, cfg.vdev,
                     cfg.devid)
            return be

    def remove_disk(self, devid: int, timeout: float = 10.0, force: bool = False) -> bool:
        """Detach disk ``devid``. Returns True if the frontend closed cleanly; False if it
        was removed after ``timeout`` without an answer (or ``force``)."""
        with self.lock:
            entry = self.disks.pop(devid, None)
        if entry is None:
            raise DomainError(f"domain {self.domid} has no disk with devid {devid}")
        cfg, be, export = entry
        clean = True
        if not force:
            be.request_close()
            clean = be.closed_event.wait(timeout)
            if not clean:
                log.warning("d%d: disk %s: frontend did not close within %gs; removing it",
                            self.domid, cfg.vdev, timeout)
        be.stop()
        self._remove_nodes("vbd", devid)
        if export is not None:
            export.close()
        return clean

    def find_disk(self, name: str) -> int | None:
        """devid of the disk called ``name`` (vdev or number), or None."""
        with self.lock:
            for devid, (cfg, _be, _e) in self.disks.items():
                if name in (cfg.vdev, str(devid)):
                    return devid
        return None

    def list_disks(self) -> list[dict]:
        """``xl block-list`` rows: Vdev BE handle state evt-ch ring-ref BE-path, plus ours."""
        with self.lock:
            entries = list(self.disks.values())
        rows = []
        for cfg, be, _e in entries:
            info = be.info()
            fe = frontend_path("vbd", self.domid, cfg.devid)
            evt = self.bus.try_read(f"{fe}/event-channel") or \
                self.bus.try_read(f"{fe}/queue-0/event-channel") or b"-1"
            ref = self.bus.try_read(f"{fe}/ring-ref") or \
                self.bus.try_read(f"{fe}/ring-ref0") or b"-1"
            rows.append({"vdev": cfg.vdev, "devid": cfg.devid, "backend_id": 0,
                         "state": be.state, "state_name": STATE_NAMES[be.state],
                         "frontend_state": info["frontend_state"],
                         "evtch": int(evt), "ring_ref": int(ref),
                         "be_path": backend_path("vbd", self.domid, cfg.devid),
                         "target": cfg.target, "format": cfg.format,
                         "readonly": cfg.readonly, "stats": info["stats"]})
        return rows

    # --- network devices
    def add_nic(self, cfg: NicConfig) -> NetBackend:
        """Create the host TAP (``vif<domid>.<devid>``), attach it to ``cfg.bridge``
        (created with pyxen's default address if it does not exist) and start netback.
        Raises HostNetworkError / DomainError naming the vif."""
        from pyxen.host.bridge import DEFAULT_BRIDGE
        with self.lock:
            if cfg.devid in self.nics:
                raise DomainError(f"vif {cfg.spec or cfg.devid!r}: devid {cfg.devid} is "
                                  "already in use")
            bridge = cfg.bridge or DEFAULT_BRIDGE
            tap = self._bridged_tap(cfg)
            try:
                be = NetBackend(self.bus, self.guest, cfg.devid, tap, rate=cfg.rate)
                backend = {"mac": cfg.mac, "bridge": bridge, "handle": str(cfg.devid),
                           "type": "vif", "script": "pyxen-bridge", "mtu": str(cfg.mtu),
                           "vifname": tap.name}
                if cfg.ip:
                    backend["ip"] = cfg.ip
                if cfg.rate:
                    backend["rate"] = f"{cfg.rate[0]},{cfg.rate[1]}"
                self._write_nodes("vif", cfg.devid,
                                  frontend={"handle": str(cfg.devid), "mac": cfg.mac},
                                  backend=backend)
                be.start()
            except BaseException:
                tap.close()
                raise
            self.nics[cfg.devid] = (cfg, be)
            log.info("d%d: vif %d (%s) on %s as %s", self.domid, cfg.devid, cfg.mac, bridge,
                     tap.name)
            return be

    def _bridged_tap(self, cfg: NicConfig):  # type: ignore[no-untyped-def]
        """The NIC's host TAP (``vifname``, default Xen's ``vif<domid>.<devid>``), on its
        bridge; pyxen's default bridge is created with its address if missing, another
        named bridge without one. The TAP is deleted again if attaching fails."""
        from pyxen.host.bridge import DEFAULT_BRIDGE, attach, ensure_bridge
        from pyxen.host.tap import Tap
        bridge = cfg.bridge or DEFAULT_BRIDGE
        if bridge == DEFAULT_BRIDGE:
            ensure_bridge(bridge)
        else:
            ensure_bridge(bridge, address=None)
        tap = Tap(self._tap_name(cfg), mtu=cfg.mtu)
        try:
            attach(tap.name, bridge)
        except BaseException:
            tap.close()
            raise
        return tap

    def _tap_name(self, cfg: NicConfig) -> str:
        return cfg.vifname or f"vif{self.domid}.{cfg.devid}"

    def remove_nic(self, devid: int, timeout: float = 10.0, force: bool = False) -> bool:
        with self.lock:
            entry = self.nics.pop(devid, None)
        if entry is None:
            raise DomainError(f"domain {self.domid} has no vif with devid {devid}")
        _cfg, be = entry
        clean = True
        if not force:
            be.request_close()
            clean = be.closed_event.wait(timeout)
        be.stop()
        self._remove_nodes("vif", devid)
        return clean

    def restart_nic(self, devid: int) -> NetBackend:
        """Replace vif ``devid``'s backend with a fresh instance, as a restarted driver
        domain would: the old one stops abruptly (no xenbus handshake); the new one takes over
        the same TAP and re-attaches to the frontend's rings (XenbusBackend.start(reattach))."""
        with self.lock:
            entry = self.nics.get(devid)
            if entry is None:
                raise DomainError(f"domain {self.domid} has no vif with devid {devid}")
            cfg, old = entry
            old.stop(keep_tap=True)
            be = NetBackend(self.bus, self.guest, devid, old.tap, rate=cfg.rate)
            be.start(reattach=True)
            self.nics[devid] = (cfg, be)
            log.info("d%d: vif %d backend restarted", self.domid, devid)
            return be

    def restart_disk(self, devid: int) -> BlkBackend:
        """As :meth:`restart_nic` for a disk: the image is reopened by the new instance."""
        with self.lock:
            entry = self.disks.get(devid)
            if entry is None:
                raise DomainError(f"domain {self.domid} has no disk with devid {devid}")
            cfg, old, export = entry
            old.stop()
            from pyxen.backends.disk import DiskImage
            image = DiskImage(export.path if export else cfg.target, readonly=cfg.readonly,
                              spec=cfg.spec)
            be = BlkBackend(self.bus, self.guest, devid, image, discard=cfg.discard,
                            max_queues=self.max_queues)
            be.start(reattach=True)
            self.disks[devid] = (cfg, be, export)
            log.info("d%d: disk %s backend restarted", self.domid, cfg.vdev)
            return be

    def find_nic(self, name: str) -> int | None:
        with self.lock:
            for devid, (cfg, be) in self.nics.items():
                if name in (str(devid), cfg.mac, be.tap.name):
                    return devid
        return None

    def list_nics(self) -> list[dict]:
        """``xl network-list`` rows: Idx BE Mac Addr. handle state evt-ch tx-/rx-ring-ref
        BE-path, plus the TAP and counters."""
        with self.lock:
            entries = list(self.nics.values())
        rows = []
        for cfg, be in entries:
            fe = frontend_path("vif", self.domid, cfg.devid)
            rd = self.bus.try_read
            rows.append({"devid": cfg.devid, "backend_id": 0, "mac": cfg.mac,
                         "handle": cfg.devid, "state": be.state,
                         "state_name": STATE_NAMES[be.state],
                         "evtch": int(rd(f"{fe}/event-channel") or
                                      rd(f"{fe}/event-channel-tx") or b"-1"),
                         "tx_ring_ref": int(rd(f"{fe}/tx-ring-ref") or b"-1"),
                         "rx_ring_ref": int(rd(f"{fe}/rx-ring-ref") or b"-1"),
                         "be_path": backend_path("vif", self.domid, cfg.devid),
                         "bridge": cfg.bridge, "vifname": be.tap.name,
                         "stats": dict(be.stats)})
        return rows

    # --- save/restore and migration
    def save_state(self) -> dict:
        """Every device's config (the ring state is in guest memory and xenstore)."""
        with self.lock:
            return {"disks": [cfg.to_dict() for cfg, _b, _e in self.disks.values()],
                    "nics": [{**cfg.to_dict(), "vifname": be.tap.name}
                             for cfg, be in self.nics.values()]}

    def suspend(self) -> None:
        """Stop every backend without a handshake (the domain is paused for migration):
        in-flight requests finish, rings and ports are released, images (and qcow2 exports)
        closed so another host can open them; TAPs stay. Undo with :meth:`resume`."""
        with self.lock:
            for devid, (cfg, be, export) in list(self.disks.items()):
                be.stop()
                if export is not None:
                    export.close()
                self.disks[devid] = (cfg, be, None)
            for cfg, nbe in self.nics.values():
                nbe.stop(keep_tap=True)

    def resume(self) -> None:
        """After :meth:`suspend` (a migration that failed): new backends re-attach to the
        guest's rings, as a backend restart does."""
        with self.lock:
            for devid, (cfg, _old, _e) in list(self.disks.items()):
                self.disks[devid] = self._reattach_disk(cfg)
            for devid, (ncfg, old) in list(self.nics.items()):
                be = NetBackend(self.bus, self.guest, devid, old.tap, rate=ncfg.rate)
                be.start(reattach=True)
                self.nics[devid] = (ncfg, be)

    def prepare(self, state: dict) -> None:
        """Before a restore's final state arrives (during pre-copy): open the images and
        make and bridge the TAPs of ``state``'s devices (``save_state``'s form), and
        connect to xenstore, so that :meth:`restore` only re-attaches. Idempotent; what is
        not used by :meth:`restore` is released by :meth:`close`."""
        self.bus                                          # noqa: B018 (connect now)
        for d in state.get("disks", []):
            cfg = DiskConfig.from_dict(d)
            if ("vbd", cfg.devid) not in self._prepared:
                self._prepared[("vbd", cfg.devid)] = (cfg, open_disk(
                    cfg.target, cfg.format, readonly=cfg.readonly, run_dir=self.run_dir,
                    spec=cfg.spec or cfg.target))
        for n in state.get("nics", []):
            ncfg = NicConfig.from_dict(n)
            if ("vif", ncfg.devid) not in self._prepared:
                self._prepared[("vif", ncfg.devid)] = (ncfg, self._bridged_tap(ncfg))

    def _release_prepared(self) -> None:
        prepared, self._prepared = self._prepared, {}
        for (kind, _devid), (_cfg, thing) in prepared.items():
            self._release_one(kind, thing)

    @staticmethod
    def _release_one(kind: str, thing) -> None:  # type: ignore[no-untyped-def]
        if kind == "vif":
            thing.close()
        else:
            image, export = thing
            image.close()
            if export is not None:
                export.close()

    def restore(self, state: dict) -> None:
        """Re-create :meth:`save_state`'s devices in a restored domain whose xenstore nodes
        were imported: open the images, make the TAPs, and re-attach the backends to the
        guest's rings (the guest never notices); each NIC then announces the guest's MAC
        (RARP, as QEMU does after a migration) so switches learn where it went."""
        disks = [DiskConfig.from_dict(d) for d in state.get("disks", [])]
        nics = [NicConfig.from_dict(n) for n in state.get("nics", [])]
        try:
            with self.lock:
                for cfg in disks:
                    self.disks[cfg.devid] = self._reattach_disk(
                        cfg, self._take_prepared("vbd", cfg))
                for ncfg in nics:
                    tap = self._take_prepared("vif", ncfg) or self._bridged_tap(ncfg)
                    try:
                        be = NetBackend(self.bus, self.guest, ncfg.devid, tap, rate=ncfg.rate)
                        be.start(reattach=True)
                    except BaseException:
                        tap.close()
                        raise
                    self.nics[ncfg.devid] = (ncfg, be)
                    be.announce(ncfg.mac)
        except BaseException:
            self.close()
            raise
        self._release_prepared()                 # devices the final state no longer has

    def _take_prepared(self, kind: str, cfg: DiskConfig | NicConfig) -> object | None:
        """What :meth:`prepare` made for device ``cfg``, if it was made for the same
        image/bridge/name (otherwise it is released and None returned)."""
        entry = self._prepared.pop((kind, cfg.devid), None)
        if entry is None:
            return None
        pcfg, thing = entry
        same = ((pcfg.target, pcfg.format, pcfg.readonly) == (cfg.target, cfg.format,
                                                                cfg.readonly)
                if kind == "vbd" else
                (pcfg.bridge, pcfg.mtu) == (cfg.bridge, cfg.mtu)
                and thing.name == self._tap_name(cfg))
        if same:
            return thing
        self._release_one(kind, thing)
        return None

    def _reattach_disk(self, cfg: DiskConfig, opened: tuple | None = None
                       ) -> tuple[DiskConfig, BlkBackend, QemuExport | None]:
        image, export = opened or open_disk(cfg.target, cfg.format, readonly=cfg.readonly,
                                            run_dir=self.run_dir, spec=cfg.spec or cfg.target)
        try:
            be = BlkBackend(self.bus, self.guest, cfg.devid, image, discard=cfg.discard,
                            max_queues=self.max_queues)
            be.start(reattach=True)
        except BaseException:
            image.close()
            if export is not None:
                export.close()
            raise
        return cfg, be, export

    # --- libxl's xenstore layout
    def _write_nodes(self, kind: str, devid: int, *, frontend: dict[str, str],
                     backend: dict[str, str]) -> None:
        fe = frontend_path(kind, self.domid, devid)
        be = backend_path(kind, self.domid, devid)
        w = self.bus.write
        # frontend: guest-owned, dom0 reads; backend: dom0-owned, the guest reads
        w(fe, "")
        self.bus.set_perms(fe, [f"n{self.domid}", "r0"])
        w(be, "")
        self.bus.set_perms(be, ["n0", f"r{self.domid}"])
        for k, v in {"backend": be, "backend-id": "0", "state": str(INITIALISING),
                     **frontend}.items():
            w(f"{fe}/{k}", v)
        for k, v in {"frontend": fe, "frontend-id": str(self.domid), "online": "1",
                     "state": str(INITIALISING), **backend}.items():
            w(f"{be}/{k}", v)

    def _remove_nodes(self, kind: str, devid: int) -> None:
        for path in (frontend_path(kind, self.domid, devid),
                     backend_path(kind, self.domid, devid)):
            try:
                if self.bus.try_read(path) is not None:
                    self.bus.rm(path)
            except Exception as e:                      # best effort on teardown
                log.warning("d%d: cannot remove %s: %s", self.domid, path, e)

    def close(self) -> None:
        """Domain teardown: stop every backend (no handshake) and release images."""
        self._release_prepared()
        with self.lock:
            entries = list(self.disks.values())
            nics = list(self.nics.values())
            self.disks.clear()
            self.nics.clear()
        for ncfg, nbe in nics:
            nbe.stop()
            self._remove_nodes("vif", ncfg.devid)
        for cfg, be, export in entries:
            be.stop()
            self._remove_nodes("vbd", cfg.devid)
            if export is not None:
                export.close()
        if self._bus is not None:
            self._bus.close()

