"""pyxend's core: the domain registry and the domain lifecycle (no HTTP here; see ``api``).

Each domain runs in its own VMM process (:mod:`pyxen.vmm.process`), started in a new session
so that it keeps running when pyxend stops. pyxend finds them again at start from the
registry (:mod:`pyxen.toolstack.registry`) and their control sockets. One monitor thread per
domain subscribes to the VMM's state stream and applies the domain's ``on_poweroff`` /
``on_reboot`` / ``on_crash`` / ``on_watchdog`` action when the guest shuts down:
``destroy``, ``restart`` (a new domain with the same name and configuration, as xl),
``preserve`` (left in shutdown state), ``rename-restart`` (the old domain is kept as
``<name>--incarnation-<n>`` and a new one started).

Disks (xl's ``disk = [...]``, ``block-attach``/``-detach``/``-list``): pyxend checks each spec
(:func:`resolve_disk`: parsed, target made absolute against the client's directory, present
and a file or block device) and hands the VMM :class:`~pyxen.vmm.devices.DiskConfig` dicts
(``VmmSpec.disks`` at creation, ``device_add``/``device_remove`` while it runs). The record
keeps the domain's current disk list in ``extra["disks"]``: ``list -l`` shows it and a
restart (``on_reboot="restart"``) attaches the same disks again, hot-plugged ones included,
as libxl keeps them in the domain's saved configuration. A disk writable by one running
domain is not given to another (the check xl's ``block`` hotplug script makes).

Networks (xl's ``vif = [...]``, ``network-attach``/``-detach``/``-list``) follow the same
design: :func:`parse_nic` checks a spec (xl's grammar, then what pyxen can serve: dom0
backend, no hotplug script but vif-bridge's behaviour, a bridge name that is not another kind
of interface), :func:`~pyxen.toolstack.xlvif.nic_config` resolves it (devid = position in the
list or the next free one, a random Xen MAC if none is given) and the VMM gets
:class:`~pyxen.vmm.devices.NicConfig` dicts. The record keeps them in ``extra["nics"]`` with
the resolved MAC, so a restart brings the guest back with the same MACs. A MAC used by
another running domain, or a TAP name (``vifname``, default ``vif<domid>.<devid>``) that
exists on the host, is 409.

``shutdown``/``reboot`` write ``control/shutdown`` in the guest's xenstore directory, as
libxl does, and need the guest's ``control/feature-poweroff``/``-reboot``; with
``fallback`` the domain is shut down by the VMM instead when the guest has no PV control
interface or does not react within ``timeout`` seconds.

pyxend also makes sure a xenstored serves ``paths.xenstored_socket`` (starting one, in its own
session, if none answers). Thread-safety: every public method may be called from any thread.
Errors are :class:`~pyxen.errors.ToolstackError` with the HTTP status they map to.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pyxen.errors import HostNetworkError, ToolstackError
from pyxen.toolstack.paths import Paths
from pyxen.toolstack.registry import CONFIG_KEYS, DomainRecord, Registry
from pyxen.toolstack.spawn import start_detached, wait_until_up
from pyxen.toolstack.vmmctl import VmmControl, VmmGone, vmm_call, vmm_request
from pyxen.toolstack.xlcfg import ACTIONS
from pyxen.toolstack.xldisk import DiskSpecError, disk_config, parse_disk_spec, vdev_to_devid
from pyxen.toolstack.xlvif import VifSpec, VifSpecError, nic_config, parse_vif_spec
from pyxen.vmm.devices import DiskConfig, NicConfig
from pyxen.vmm.process import release_domain
from pyxen.xenstore.client import XenstoreClient
from pyxen.xenstore.store import XenstoreError

log = logging.getLogger("pyxen.pyxend")

READY_TIMEOUT = 120.0                  # s for a VMM to build its domain
SHUTDOWN_TIMEOUT = 60.0                # s a guest has to honour control/shutdown (fallback)
XENSTORED_CHECK = 1.0                  # s between xenstored liveness checks
XENSTORED_START_TIMEOUT = 15.0
DEVICE_ADD_TIMEOUT = 60.0              # s for a VMM to attach a disk (opens it, starts blkback)
SAVE_TIMEOUT = 600.0                   # s for a VMM to write a save file
RESTORE_TIMEOUT = 600.0                # s for a VMM to rebuild a domain from a stream
MIGRATE_TIMEOUT = 3600.0               # s for a live migration
DETACH_TIMEOUT = 10.0                  # s the guest has to close a detached disk (libxl's)
ACTION_KEYS = {"poweroff": "on_poweroff", "reboot": "on_reboot", "crash": "on_crash",
               "watchdog": "on_watchdog", "soft_reset": "on_soft_reset"}
_NAME_FORBIDDEN = set("/\0\n\t ")


@dataclass
class _Live:
    """What pyxend knows about a domain beyond its record (in memory only)."""

    rec: DomainRecord
    proc: subprocess.Popen | None = None           # set if this pyxend started the VMM
    state: dict = field(default_factory=dict)       # the VMM's latest state event
    handled: bool = False                           # the shutdown action was taken
    destroying: bool = False
    gone: threading.Event = field(default_factory=threading.Event)
    dev_lock: threading.Lock = field(default_factory=threading.Lock)   # device attach/detach

    @property
    def disks(self) -> list[dict]:
        """The domain's disks (DiskConfig dicts), as its record keeps them."""
        return self.rec.extra.get("disks", [])

    @property
    def nics(self) -> list[dict]:
        """The domain's NICs (NicConfig dicts, MACs resolved), as its record keeps them."""
        return self.rec.extra.get("nics", [])

    def tap_name(self, nic: dict) -> str:
        """The host TAP of one of its NICs (the VMM's rule)."""
        return nic.get("vifname") or f"vif{self.rec.domid}.{nic['devid']}"


class Pyxend:
    def __init__(self, paths: Paths, start_xenstored: bool = True) -> None:
        self.paths = paths
        for d in (paths.run_dir, paths.vmm_run_dir, paths.state_dir, paths.log_dir):
            os.makedirs(d, exist_ok=True)
        self.registry = Registry(paths.state_dir)
        self.lock = threading.RLock()
        self.domains: dict[int, _Live] = {}
        self.started = time.time()
        self._dmesg: deque[str] = deque(maxlen=4000)
        self._incarnations: dict[str, int] = {}
        self.reserved: set[int] = set()         # IDs of domains being restored/migrated in
        self.relocation: tuple[str, int] | None = None
        if start_xenstored:
            self.ensure_xenstored()
            threading.Thread(target=self._supervise_xenstored, daemon=True,
                             name="xenstored-supervisor").start()
        self._adopt()

    # ----------------------------------------------------------------- xenstored
    def ensure_xenstored(self) -> None:
        """Start a xenstored on ``paths.xenstored_socket`` unless one answers there."""
        sock = self.paths.xenstored_socket
        if _xenstored_alive(sock):
            return
        logpath = os.path.join(self.paths.log_dir, "xenstored.log")
        p = start_detached([sys.executable, "-m", "pyxen.cli.main", "xenstored",
                            "--socket", sock, "--state", self.paths.xenstored_state], logpath)
        wait_until_up(p, lambda: _xenstored_alive(sock), XENSTORED_START_TIMEOUT,
                      "xenstored", sock, logpath)
        self.printk(f"xenstored started (pid {p.pid}, socket {sock})")

    def _supervise_xenstored(self) -> None:
        """Start xenstored again if it dies (its state file keeps the store; the VMMs
        introduce their domains again)."""
        while True:
            time.sleep(XENSTORED_CHECK)
            if _xenstored_alive(self.paths.xenstored_socket):
                continue
            self.printk("xenstored is not answering; starting it again")
            try:
                self.ensure_xenstored()
            except ToolstackError as e:
                self.printk(f"xenstored restart failed: {e}")

    # ----------------------------------------------------------------- registry
    def _adopt(self) -> None:
        for rec in self.registry.load_all():
            try:
                vmm_call(rec.control, "info", timeout=5)
            except (ToolstackError, OSError, ValueError):
                log.info("d%d (%s): VMM gone while pyxend was down; cleaning up",
                         rec.domid, rec.name)
                self.printk(f"d{rec.domid} ({rec.name}): VMM gone, cleaned up")
                release_domain(self.paths.xenstored_socket, rec.domid, rec.uuid)
                self.registry.remove(rec.domid)
                continue
            live = _Live(rec)
            self.domains[rec.domid] = live
            self._sync_disks(live)
            self._sync_nics(live)
            self.printk(f"d{rec.domid} ({rec.name}): re-attached to VMM pid {rec.pid}")
            self._monitor(live)

    def _sync_disks(self, live: _Live) -> None:
        """Make the record's disk list the VMM's (pyxend may have stopped between a
        ``device_add``/``device_remove`` and saving the record)."""
        try:
            rows = vmm_call(live.rec.control, "device_list", timeout=5, kind="vbd")["devices"]
        except (ToolstackError, OSError, ValueError, KeyError):
            return
        known = {d["devid"]: d for d in live.disks}
        disks = [known.get(r["devid"]) or DiskConfig(
            target=r["target"], vdev=r["vdev"], devid=r["devid"], format=r["format"],
            readonly=r["readonly"]).to_dict() for r in rows]
        if disks != live.disks:
            live.rec.extra["disks"] = disks
            self.registry.save(live.rec)

    def _sync_nics(self, live: _Live) -> None:
        """As :meth:`_sync_disks`, for the NICs."""
        try:
            rows = vmm_call(live.rec.control, "device_list", timeout=5, kind="vif")["devices"]
        except (ToolstackError, OSError, ValueError, KeyError):
            return
        known = {n["devid"]: n for n in live.nics}
        default = f"vif{live.rec.domid}."
        nics = [known.get(r["devid"]) or NicConfig(
            devid=r["devid"], mac=r["mac"], bridge=r.get("bridge") or "pyxenbr0",
            vifname=None if r.get("vifname") == f"{default}{r['devid']}" else r.get("vifname"),
        ).to_dict() for r in rows]
        if nics != live.nics:
            live.rec.extra["nics"] = nics
            self.registry.save(live.rec)

    def lookup(self, dom: str | int) -> _Live:
        """A domain by ID or name (xl's domain-id argument). 404 if there is none."""
        with self.lock:
            s = str(dom)
            if s.isdigit() and int(s) in self.domains:
                return self.domains[int(s)]
            for live in self.domains.values():
                if live.rec.name == s:
                    return live
        raise ToolstackError(f"domain {dom!r} does not exist", 404)

    # ----------------------------------------------------------------- create
    def create(self, config: dict, paused: bool = False, disks: list | None = None,
               nics: list | None = None, *, disk_configs: list[DiskConfig] | None = None,
               nic_configs: list[NicConfig] | None = None) -> DomainRecord:
        """Create and start a domain. ``disks``: disk requests (``{"spec", "cwd", "where"}``
        or bare spec strings) as the API takes them; ``nics``: vif requests (``{"spec",
        "where"}`` or bare spec strings; devid = position unless the spec gives one);
        ``disk_configs``/``nic_configs``: already resolved devices (a restart), checked
        again."""
        cfg = validate_config(config)
        nwheres: dict[int, str] = {}
        ncfgs = resolve_nics(nics or [], nwheres) if nic_configs is None else list(nic_configs)
        wheres: dict[int, str] = {}
        if disk_configs is None:
            dcfgs = resolve_disks(disks or [], wheres)
        else:
            dcfgs = list(disk_configs)
            for d in dcfgs:
                try:
                    check_disk_target(d)
                except DiskSpecError as e:
                    raise ToolstackError(str(e), 400) from None
        with self.lock:
            if any(lv.rec.name == cfg["name"] for lv in self.domains.values()) \
                    or cfg["name"] == "Domain-0":
                raise ToolstackError(f"domain name {cfg['name']!r} is already in use", 409)
            for d in dcfgs:
                try:
                    self._check_shared(d, None)
                except ToolstackError as e:
                    where = wheres.get(d.devid)
                    raise ToolstackError(f"{where}: {e}" if where else str(e),
                                         e.status) from None
            domid = self.registry.allocate_domid(set(self.domains) | self.reserved)
            for n in ncfgs:
                try:
                    self._check_nic_conflicts(n, domid, None)
                except ToolstackError as e:
                    where = nwheres.get(n.devid)
                    raise ToolstackError(f"{where}: {e}" if where else str(e),
                                         e.status) from None
            rec = DomainRecord(domid=domid, name=cfg["name"],
                               uuid=cfg.get("uuid") or str(uuidlib.uuid4()), config=cfg,
                               created=time.time(),
                               extra={"disks": [d.to_dict() for d in dcfgs],
                                      "nics": [n.to_dict() for n in ncfgs]})
            live = _Live(rec)
            self.domains[domid] = live
        try:
            self._spawn(live, paused)
        except BaseException:
            with self.lock:
                self.domains.pop(domid, None)
            self.registry.remove(domid)
            raise
        self.printk(f"d{domid} ({rec.name}): created, {cfg['vcpus']} vCPU(s), "
                    f"{cfg['memory']} MiB"
                    + "".join(f", {d.vdev} {d.target}" for d in dcfgs)
                    + "".join(f", {n.vifname or f'vif{domid}.{n.devid}'} {n.mac} on {n.bridge}"
                              for n in ncfgs)
                    + (" (paused)" if paused else ""))
        self._monitor(live)
        return rec

    def _spawn(self, live: _Live, paused: bool) -> None:
        rec, cfg = live.rec, live.rec.config
        spec = {"domid": rec.domid, "name": rec.name, "uuid": rec.uuid,
                "kernel": cfg["kernel"], "ramdisk": cfg.get("ramdisk"),
                "cmdline": cfg.get("cmdline") or "", "memory": cfg["memory"],
                "vcpus": cfg["vcpus"], "accel": cfg.get("accel", "auto"), "paused": paused,
                "disks": list(live.disks), "nics": list(live.nics),
                "run_dir": self.paths.vmm_run_dir, "log_dir": self.paths.log_dir,
                "xenstored": self.paths.xenstored_socket}
        spec_path = self.registry.spec_path(rec.domid)
        spec_path.write_text(json.dumps(spec))
        self.registry.save(rec)
        proc, ready = self._start_vmm(rec, spec_path, [], (), READY_TIMEOUT)
        if not ready.get("ok"):
            raise ToolstackError(f"domain {rec.name!r}: {ready['error']}", 400)
        rec.pid, rec.control, rec.console = ready["pid"], ready["control"], ready["console"]
        live.proc = proc
        self.registry.save(rec)

    def _start_vmm(self, rec: DomainRecord, spec_path, argv: list[str],  # type: ignore[no-untyped-def]
                   pass_fds: tuple, timeout: float) -> tuple[subprocess.Popen, dict]:
        """Start ``python -m pyxen.vmm.process --spec SPEC ARGV`` detached and wait for its
        ready line. A failed VMM is reaped and its reply has ``ok: false`` and ``error``."""
        r, w = os.pipe()
        try:
            proc = start_detached(
                [sys.executable, "-m", "pyxen.vmm.process", "--spec", str(spec_path), *argv,
                 "--ready-fd", str(w)],
                os.path.join(self.paths.log_dir, f"vmm-{rec.domid}.log"),
                pass_fds=(w, *pass_fds))
        finally:
            os.close(w)
        try:
            line = _read_line(r, timeout)
        finally:
            os.close(r)
        try:
            ready = json.loads(line) if line else {}
        except ValueError:
            ready = {}
        if not ready.get("ok"):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            ready = {"ok": False, "error": ready.get("error") or (
                f"VMM exited with status {proc.returncode}; see "
                f"{self.paths.log_dir}/vmm-{rec.domid}.log")}
        return proc, ready

    # ----------------------------------------------------------------- monitoring
    def _monitor(self, live: _Live) -> None:
        t = threading.Thread(target=self._watch, args=(live,), daemon=True,
                             name=f"monitor-d{live.rec.domid}")
        t.start()

    def _watch(self, live: _Live) -> None:
        rec = live.rec
        try:
            with VmmControl(rec.control, timeout=10) as ctl:
                for ev in ctl.events():
                    if ev.get("event") == "destroyed":
                        break
                    live.state = ev
                    if ev.get("state") == "shutdown" and not live.handled:
                        live.handled = True
                        threading.Thread(target=self._on_shutdown, args=(live, ev),
                                         daemon=True).start()
        except (ToolstackError, OSError, ValueError) as e:
            if not live.destroying:
                log.warning("d%d (%s): lost the VMM: %s", rec.domid, rec.name, e)
        if live.proc is not None:
            live.proc.wait()
        if not live.destroying:
            self.printk(f"d{rec.domid} ({rec.name}): VMM exited unexpectedly")
            release_domain(self.paths.xenstored_socket, rec.domid, rec.uuid)
        self._forget(live)

    def _forget(self, live: _Live) -> None:
        with self.lock:
            if self.domains.get(live.rec.domid) is live:
                del self.domains[live.rec.domid]
        self.registry.remove(live.rec.domid)
        live.gone.set()

    def _on_shutdown(self, live: _Live, ev: dict) -> None:
        rec = live.rec
        reason = ev.get("reason") or "poweroff"
        key = ACTION_KEYS.get(reason)              # suspend has no action: it stays
        action = rec.config.get(key, "preserve") if key else "preserve"
        self.printk(f"d{rec.domid} ({rec.name}): shut down, reason {reason}"
                    f"{' (' + ev['detail'] + ')' if ev.get('detail') else ''}; "
                    f"action {action}")
        try:
            if action in ("destroy", "coredump-destroy"):
                self.destroy(rec.domid)
            elif action in ("restart", "coredump-restart", "soft-reset"):
                disks, nics = self._stored_disks(live), self._stored_nics(live)
                self.destroy(rec.domid)
                self.create(rec.config, disk_configs=disks, nic_configs=nics)
            elif action == "rename-restart":
                n = self._incarnations.get(rec.name, 0) + 1
                self._incarnations[rec.name] = n
                original = rec.name
                self.rename(rec.domid, f"{original}--incarnation-{n}")
                self.create(dict(rec.config, name=original, uuid=None),
                            disk_configs=self._stored_disks(live),
                            nic_configs=self._stored_nics(live))
        except ToolstackError as e:
            self.printk(f"d{rec.domid} ({rec.name}): action {action} failed: {e}")

    # ----------------------------------------------------------------- operations
    def destroy(self, dom: str | int, timeout: float = 30.0) -> None:
        live = self.lookup(dom)
        live.destroying = True
        try:
            vmm_call(live.rec.control, "destroy")
        except VmmGone:
            pass
        if not live.gone.wait(timeout):
            pid = live.rec.pid
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            release_domain(self.paths.xenstored_socket, live.rec.domid, live.rec.uuid)
            self._forget(live)
        self.printk(f"d{live.rec.domid} ({live.rec.name}): destroyed")

    def pause(self, dom: str | int) -> None:
        vmm_call(self.lookup(dom).rec.control, "pause")

    def unpause(self, dom: str | int) -> None:
        vmm_call(self.lookup(dom).rec.control, "unpause")

    def rename(self, dom: str | int, new_name: str) -> None:
        _check_name(new_name)
        live = self.lookup(dom)
        with self.lock:
            if any(lv.rec.name == new_name and lv is not live for lv in self.domains.values()):
                raise ToolstackError(f"domain name {new_name!r} is already in use", 409)
            old = live.rec.name
            live.rec.name = new_name
            live.rec.config = dict(live.rec.config, name=new_name)
            self.registry.save(live.rec)
        vmm_call(live.rec.control, "rename", name=new_name)
        try:
            with XenstoreClient(self.paths.xenstored_socket) as xs:
                xs.write(f"/local/domain/{live.rec.domid}/name", new_name)
                xs.write(f"/vm/{live.rec.uuid}/name", new_name)
        except (OSError, ConnectionError, XenstoreError) as e:
            log.warning("rename: xenstore: %s", e)
        self.printk(f"d{live.rec.domid}: renamed {old} -> {new_name}")

    def shutdown(self, dom: str | int, reason: str = "poweroff", fallback: bool = False,
                 timeout: float = SHUTDOWN_TIMEOUT) -> str:
        """Ask the guest to shut down through xenstore; returns "pv" or "forced"."""
        if reason not in ("poweroff", "reboot"):
            raise ToolstackError(f"shutdown reason {reason!r}: use poweroff or reboot", 400)
        live = self.lookup(dom)
        rec = live.rec
        if live.state.get("state") == "shutdown":
            raise ToolstackError(f"domain {rec.name!r} is already shut down", 409)
        base = f"/local/domain/{rec.domid}/control"
        try:
            with XenstoreClient(self.paths.xenstored_socket) as xs:
                feature = xs.try_read(f"{base}/feature-{reason}")
                if feature == b"1":
                    xs.write(f"{base}/shutdown", reason)
                    if fallback:
                        self._arm_fallback(live, reason, timeout)
                    self.printk(f"d{rec.domid} ({rec.name}): {reason} requested via xenstore")
                    return "pv"
        except (OSError, ConnectionError, XenstoreError) as e:
            raise ToolstackError(f"xenstore: {e}", 503) from e
        if not fallback:
            raise ToolstackError(
                f"domain {rec.name!r} has no PV control interface (control/feature-{reason} "
                f"not set): use -F to force it", 409)
        vmm_call(rec.control, "shutdown", reason=reason,
                 detail="forced: no PV control interface")
        return "forced"

    def _arm_fallback(self, live: _Live, reason: str, timeout: float) -> None:
        def fire() -> None:
            if live.gone.wait(timeout) or live.state.get("state") == "shutdown":
                return
            self.printk(f"d{live.rec.domid} ({live.rec.name}): no reaction to "
                        f"control/shutdown within {timeout:g} s; forcing {reason}")
            try:
                vmm_call(live.rec.control, "shutdown", reason=reason,
                         detail=f"forced after {timeout:g} s")
            except ToolstackError:
                pass
        threading.Thread(target=fire, daemon=True).start()

    # ----------------------------------------------------------------- disks
    @staticmethod
    def _stored_disks(live: _Live) -> list[DiskConfig]:
        return [DiskConfig.from_dict(d) for d in live.disks]

    def _save_if_current(self, live: _Live) -> None:
        """Save the record unless the domain went away meanwhile (no stale record)."""
        with self.lock:
            if self.domains.get(live.rec.domid) is live:
                self.registry.save(live.rec)

    def _check_shared(self, dcfg: DiskConfig, exclude: _Live | None) -> None:
        """409 if another running domain has ``dcfg``'s image and one of them may write it.
        Caller holds ``self.lock``. Domains kept after a shutdown (preserve,
        rename-restart) do not count: their guest no longer writes."""
        real = os.path.realpath(dcfg.target)
        for lv in self.domains.values():
            if lv is exclude or lv.destroying or lv.state.get("state") == "shutdown":
                continue
            for d in lv.disks:
                if os.path.realpath(d["target"]) == real and not (
                        d.get("readonly") and dcfg.readonly):
                    raise ToolstackError(
                        f"disk spec {dcfg.spec or dcfg.target!r}: {dcfg.target} is in use by "
                        f"domain {lv.rec.name!r} as {d['vdev']}"
                        f"{'' if d.get('readonly') else ' (read-write)'}", 409)

    def _require_live(self, live: _Live) -> None:
        st = live.state.get("state")
        if not live.rec.control or live.destroying or st in ("shutdown", "dying"):
            raise ToolstackError(f"domain {live.rec.name!r} is "
                                 f"{'being built' if not live.rec.control else st or 'dying'}",
                                 409)

    def disk_attach(self, dom: str | int, spec: str, cwd: str | None = None) -> dict:
        """``xl block-attach``: check ``spec``, hot-plug it into the running domain and
        record it. Returns the device's ``block-list`` row (the guest connects to it
        asynchronously: its state may still be below Connected)."""
        live = self.lookup(dom)
        rec = live.rec
        dcfg = resolve_disk(spec, cwd)
        with live.dev_lock:
            self._require_live(live)
            real = os.path.realpath(dcfg.target)
            for d in live.disks:
                if d["devid"] == dcfg.devid:
                    alias = "" if d["vdev"] == dcfg.vdev else f" (as {d['vdev']})"
                    raise ToolstackError(f"disk spec {spec!r}: vdev {dcfg.vdev} is already in "
                                         f"use in domain {rec.name!r}{alias}", 409)
                if os.path.realpath(d["target"]) == real and not (
                        d.get("readonly") and dcfg.readonly):
                    raise ToolstackError(f"disk spec {spec!r}: {dcfg.target} is already "
                                         f"attached to domain {rec.name!r} as {d['vdev']}", 409)
            with self.lock:
                self._check_shared(dcfg, live)
            self._device_add(rec, "vbd", dcfg.to_dict(), f"disk spec {spec!r}", spec,
                             lambda m: "in use" in m or "already attached" in m)
            rec.extra["disks"] = live.disks + [dcfg.to_dict()]
            self._save_if_current(live)
        self.printk(f"d{rec.domid} ({rec.name}): disk {dcfg.target} attached as {dcfg.vdev}")
        row = next((r for r in self.disk_list(rec.domid) if r["devid"] == dcfg.devid), None)
        return row or {"vdev": dcfg.vdev, "devid": dcfg.devid, "frontend_id": rec.domid,
                       "target": dcfg.target, "format": dcfg.format,
                       "readonly": dcfg.readonly}

    @staticmethod
    def _device_add(rec: DomainRecord, kind: str, config: dict, what: str, spec: str,
                    conflict: Callable[[str], bool]) -> None:
        """Hot-plug through the VMM. Its refusal becomes 409 if ``conflict(message)`` (the
        device or its host side is taken), else 400, prefixed with ``what`` unless it
        already quotes ``spec``. VmmGone passes through."""
        try:
            vmm_request(rec.control, {"op": "device_add", "kind": kind, "config": config},
                        timeout=DEVICE_ADD_TIMEOUT, error_status=400)
        except VmmGone:
            raise
        except ToolstackError as e:
            msg = str(e)
            status = 409 if conflict(msg) else 400
            raise ToolstackError(msg if spec in msg else f"{what}: {msg}", status) from None

    def disk_detach(self, dom: str | int, device: str, force: bool = False,
                    timeout: float = DETACH_TIMEOUT) -> dict:
        """``xl block-detach``: ``device`` is a vdev (``xvdc``) or its number. Without
        ``force`` the guest is asked to close it first (``timeout`` seconds; then it is
        removed anyway and ``clean`` is false)."""
        live = self.lookup(dom)
        rec = live.rec
        try:
            devid = vdev_to_devid(str(device))
        except DiskSpecError:
            devid = None
        with live.dev_lock:
            entry = next((d for d in live.disks if d["devid"] == devid), None)
            if entry is None:
                raise ToolstackError(f"domain {rec.name!r}: device {device} not connected", 404)
            clean = self._remove_device(live, "vbd", devid, force, timeout)
        how = " (forced)" if force else "" if clean else " (the guest did not close it)"
        self.printk(f"d{rec.domid} ({rec.name}): disk {entry['vdev']} detached{how}")
        return {"vdev": entry["vdev"], "devid": devid, "clean": clean}

    def disk_list(self, dom: str | int) -> list[dict]:
        """``xl block-list`` rows of the domain's disks (the VMM's view: backend state,
        event channel, ring reference, backend path) plus ``frontend_id``."""
        return self._device_rows(self.lookup(dom), "vbd")

    # ----------------------------------------------------------------- devices (both kinds)
    _RECORD_KEY = {"vbd": "disks", "vif": "nics"}
    _VMM_NAME = {"vbd": "disk", "vif": "vif"}

    def _remove_device(self, live: _Live, kind: str, devid: int, force: bool,
                       timeout: float) -> bool:
        """Ask the VMM to remove device ``kind``/``devid`` and drop it from the record.
        Caller holds ``live.dev_lock``. Returns whether the guest closed it cleanly."""
        req = {"op": "device_remove", "kind": kind, "device": str(devid),
               "force": bool(force), "timeout": float(timeout)}
        try:
            reply = vmm_request(live.rec.control, req, timeout=timeout + 30, error_status=409)
        except VmmGone:
            raise
        except ToolstackError as e:
            if f"has no {self._VMM_NAME[kind]}" not in str(e):
                raise
            reply = {"clean": False}                # the VMM had dropped it already
        key = self._RECORD_KEY[kind]
        live.rec.extra[key] = [d for d in live.rec.extra.get(key, []) if d["devid"] != devid]
        self._save_if_current(live)
        return bool(reply.get("clean"))

    @staticmethod
    def _device_rows(live: _Live, kind: str) -> list[dict]:
        """The VMM's device_list rows for ``kind`` plus ``frontend_id`` ([] while the VMM is
        building or gone)."""
        if not live.rec.control:
            return []
        try:
            rows = vmm_call(live.rec.control, "device_list", timeout=10, kind=kind)["devices"]
        except VmmGone:
            return []
        return [dict(r, frontend_id=live.rec.domid) for r in rows]

    # ----------------------------------------------------------------- networks
    @staticmethod
    def _stored_nics(live: _Live) -> list[NicConfig]:
        return [NicConfig.from_dict(n) for n in live.nics]

    def _check_nic_conflicts(self, ncfg: NicConfig, domid: int, live: _Live | None) -> None:
        """409 if ``ncfg``'s MAC is used by a running domain (``live``, the NIC's own domain,
        included) or its TAP name (domain ``domid``'s) by any domain or host interface.
        Caller holds ``self.lock``. Domains kept after a shutdown do not count for the MAC
        (their guest no longer sends), being-destroyed ones for neither."""
        what = f"vif spec {ncfg.spec!r}"
        tap = ncfg.vifname or f"vif{domid}.{ncfg.devid}"
        mac = ncfg.mac.lower()
        for lv in self.domains.values():
            if lv.destroying:
                continue
            for n in lv.nics:
                if lv is live and n["devid"] == ncfg.devid:
                    continue
                if n["mac"].lower() == mac and lv.state.get("state") != "shutdown":
                    raise ToolstackError(f"{what}: mac {ncfg.mac} is in use by domain "
                                         f"{lv.rec.name!r} (devid {n['devid']})", 409)
                if lv.tap_name(n) == tap:
                    raise ToolstackError(f"{what}: vifname {tap} is in use by domain "
                                         f"{lv.rec.name!r} (devid {n['devid']})", 409)
        try:
            from pyxen.host.bridge import ifindex
            taken = ifindex(tap) is not None
        except HostNetworkError as e:
            raise ToolstackError(f"{what}: {e}", 400) from None
        if taken:
            raise ToolstackError(f"{what}: vifname {tap} is in use (the host has an "
                                 "interface of that name)", 409)

    def nic_attach(self, dom: str | int, spec: str) -> dict:
        """``xl network-attach``: check ``spec``, hot-plug the NIC into the running domain
        (devid: the spec's, else one above the highest in use, as libxl) and record it.
        Returns its ``network-list`` row (the guest connects asynchronously)."""
        live = self.lookup(dom)
        rec = live.rec
        vspec = parse_nic(spec)
        with live.dev_lock:
            self._require_live(live)
            used = [n["devid"] for n in live.nics]
            devid = vspec.devid if vspec.devid is not None else max(used, default=-1) + 1
            if devid in used:
                raise ToolstackError(f"vif spec {spec!r}: devid {devid} is already in use in "
                                     f"domain {rec.name!r}", 409)
            ncfg = nic_config(vspec, devid)
            with self.lock:
                self._check_nic_conflicts(ncfg, rec.domid, live)
            self._device_add(rec, "vif", ncfg.to_dict(), f"vif spec {spec!r}", spec,
                             lambda m: "in use" in m or "busy" in m.lower() or "exists" in m)
            rec.extra["nics"] = live.nics + [ncfg.to_dict()]
            self._save_if_current(live)
        self.printk(f"d{rec.domid} ({rec.name}): vif {devid} ({ncfg.mac}) attached on "
                    f"{ncfg.bridge} as {live.tap_name(ncfg.to_dict())}")
        row = next((r for r in self.nic_list(rec.domid) if r["devid"] == devid), None)
        return row or {"devid": devid, "backend_id": 0, "frontend_id": rec.domid,
                       "mac": ncfg.mac, "bridge": ncfg.bridge,
                       "vifname": live.tap_name(ncfg.to_dict())}

    def nic_detach(self, dom: str | int, device: str, force: bool = False,
                   timeout: float = DETACH_TIMEOUT) -> dict:
        """``xl network-detach``: ``device`` is a devid or a MAC (pyxen also takes the TAP
        name). Without ``force`` the guest is asked to close it first (``timeout``
        seconds; then it is removed anyway and ``clean`` is false)."""
        live = self.lookup(dom)
        rec = live.rec
        key = str(device).strip()
        with live.dev_lock:
            if ":" in key:
                entry = next((n for n in live.nics if n["mac"].lower() == key.lower()), None)
            elif key.isdigit():
                entry = next((n for n in live.nics if n["devid"] == int(key)), None)
            else:
                entry = next((n for n in live.nics if live.tap_name(n) == key), None)
            if entry is None:
                raise ToolstackError(f"domain {rec.name!r}: unknown device {key} (no NIC with "
                                     "that devid or MAC)", 404)
            devid = entry["devid"]
            clean = self._remove_device(live, "vif", devid, force, timeout)
        how = " (forced)" if force else "" if clean else " (the guest did not close it)"
        self.printk(f"d{rec.domid} ({rec.name}): vif {devid} ({entry['mac']}) detached{how}")
        return {"devid": devid, "mac": entry["mac"], "clean": clean}

    def nic_list(self, dom: str | int) -> list[dict]:
        """``xl network-list`` rows of the domain's NICs (the VMM's view: backend state,
        event channel, tx/rx ring references, backend path, bridge, TAP, counters) plus
        ``frontend_id``."""
        return self._device_rows(self.lookup(dom), "vif")

    # ----------------------------------------------------------------- queries
    # ----------------------------------------------------------------- save, restore, migrate
    @staticmethod
    def _record_dict(live: _Live) -> dict:
        r = live.rec
        return {"name": r.name, "uuid": r.uuid, "config": r.config, "extra": r.extra}

    def save(self, dom: str | int, path: str, keep: bool = False, paused: bool = False,
             mode: str = "transparent") -> dict:
        """xl save: write the domain to ``path`` (absolute); destroy it unless ``keep``."""
        live = self.lookup(dom)
        self._require_live(live)
        if not os.path.isabs(path):
            raise ToolstackError(f"save: {path!r} is not an absolute path", 400)
        live.destroying = not keep
        try:
            out = vmm_request(live.rec.control, {"op": "save", "path": path, "keep": keep,
                                                 "paused": paused, "mode": mode,
                                                 "record": self._record_dict(live)},
                              timeout=SAVE_TIMEOUT, error_status=400)
        except BaseException:
            live.destroying = False
            raise
        if not keep:
            live.gone.wait(30)
        self.printk(f"d{live.rec.domid} ({live.rec.name}): saved to {path} "
                    f"({out.get('bytes_sent', 0) >> 20} MiB, paused {out.get('pause_ms')} ms)"
                    + ("" if keep else "; destroyed"))
        return out

    def restore(self, path: str, paused: bool = False) -> DomainRecord:
        """xl restore: rebuild the domain saved in ``path`` with its own domain ID (a
        transparent restore keeps it: the guest's xenstore paths name it)."""
        from pyxen.migration.stream import DOMAIN_CONFIG, StreamError, StreamReader, parse_json
        if not os.path.isabs(path):
            raise ToolstackError(f"restore: {path!r} is not an absolute path", 400)
        reader = StreamReader()
        config = None
        try:
            with open(path, "rb") as f:
                while config is None:
                    data = f.read(65536)
                    if not data:
                        reader.finish()
                        break
                    for rec in reader.feed(data):
                        if rec.type != DOMAIN_CONFIG:
                            raise rec.error("the stream must start with DOMAIN_CONFIG")
                        config = parse_json(rec)
                        break
        except OSError as e:
            raise ToolstackError(f"restore: {path}: {e.strerror}", 400) from None
        except StreamError as e:
            raise ToolstackError(f"restore: {path}: {e}", 400) from None
        self._check_engine(config if isinstance(config, dict) else {})
        rec = self._reserve(config)
        try:
            self._spawn_restored(rec, ["--restore", path], (), paused)
        finally:
            with self.lock:
                self.reserved.discard(rec.domid)
        self.printk(f"d{rec.domid} ({rec.name}): restored from {path}"
                    + (" (paused)" if paused else ""))
        self._monitor(self.domains[rec.domid])
        return rec

    @staticmethod
    def _check_engine(config: dict) -> None:
        """Refuse a domain whose vCPU state this host's engine cannot load (409)."""
        from pyxen.vmm.builder import engine_state_format
        engine, want = config.get("engine"), config.get("state_format")
        have = engine_state_format(str(engine))
        if have is None:
            raise ToolstackError(f"the {engine} engine is not usable on this host", 409)
        if have != want:
            raise ToolstackError(f"incompatible engine: the domain's vCPU state is {want!r}, "
                                 f"this host's {engine} engine reads {have!r}", 409)

    def _reserve(self, config: dict) -> DomainRecord:
        """Check that this host can take the domain described by a DOMAIN_CONFIG record
        and reserve its ID. ToolstackError (409/400) with the reason otherwise."""
        spec = config.get("spec") if isinstance(config, dict) else None
        record = config.get("record") or {} if isinstance(config, dict) else {}
        if not isinstance(spec, dict) or not isinstance(record, dict):
            raise ToolstackError("the domain config has no spec", 400)
        try:
            domid, name, dom_uuid = int(spec["domid"]), str(spec["name"]), str(spec["uuid"])
        except (KeyError, TypeError, ValueError):
            raise ToolstackError("the domain config lacks domid/name/uuid", 400) from None
        with self.lock:
            if domid in self.domains or domid in self.reserved:
                if config.get("mode") != "suspend":
                    raise ToolstackError(f"domain ID {domid} is in use here (a transparent "
                                         "migration keeps the domain's ID)", 409)
                # a guest that suspended itself resumes in a new domain, as on Xen
                domid = self.registry.allocate_domid(set(self.domains) | self.reserved)
            if name == "Domain-0" or any(lv.rec.name == name for lv in self.domains.values()):
                raise ToolstackError(f"domain name {name!r} is already in use here", 409)
            self.reserved.add(domid)
        cfg = record.get("config") or {k: spec.get(k) for k in ("name", "memory", "vcpus",
                                                                "kernel", "ramdisk", "cmdline")}
        return DomainRecord(domid=domid, name=name, uuid=dom_uuid, config=dict(cfg, name=name),
                            created=time.time(), extra=record.get("extra") or {
                                "disks": spec.get("disks", []), "nics": spec.get("nics", [])})

    def _spawn_restored(self, rec: DomainRecord, argv: list[str], pass_fds: tuple,
                        paused: bool, disk_dir: str | None = None) -> None:
        """Start a VMM that rebuilds ``rec``'s domain from a stream; register it when the
        VMM reports it running. ToolstackError (nothing kept) if it fails."""
        local = {"domid": rec.domid, "run_dir": self.paths.vmm_run_dir,
                 "log_dir": self.paths.log_dir, "xenstored": self.paths.xenstored_socket,
                 "paused": paused, "disk_dir": disk_dir}
        spec_path = self.registry.spec_path(rec.domid)
        spec_path.write_text(json.dumps(local))
        proc, ready = self._start_vmm(rec, spec_path, argv, pass_fds, RESTORE_TIMEOUT)
        if not ready.get("ok"):
            self.registry.remove(rec.domid)
            # a VMM that died after the xenstore import (or introduced the ring) leaves it
            release_domain(self.paths.xenstored_socket, rec.domid, rec.uuid)
            raise ToolstackError(ready["error"], 400)
        rec.pid, rec.control, rec.console = ready["pid"], ready["control"], ready["console"]
        if isinstance(ready.get("spec"), dict):          # e.g. disk copies' new paths
            rec.extra["disks"] = ready["spec"].get("disks", rec.extra.get("disks", []))
        live = _Live(rec, proc=proc)
        with self.lock:
            self.domains[rec.domid] = live
        self.registry.save(rec)

    def migrate(self, dom: str | int, host: str, port: int | None = None,
                copy_storage: bool = False, mode: str = "transparent") -> dict:
        """Live-migrate a domain to the pyxend relocation service at ``host``:``port``.
        Returns the VMM's summary; the domain is then gone from here."""
        from pyxen.migration.channel import DEFAULT_PORT
        live = self.lookup(dom)
        self._require_live(live)
        port = port or DEFAULT_PORT
        live.destroying = True                  # the VMM exits by itself if it succeeds
        try:
            out = vmm_request(live.rec.control, {"op": "migrate", "host": host, "port": port,
                                                 "copy_storage": copy_storage, "mode": mode,
                                                 "record": self._record_dict(live)},
                              timeout=MIGRATE_TIMEOUT, error_status=502)
        except BaseException as e:
            live.destroying = False
            self.printk(f"d{live.rec.domid} ({live.rec.name}): migration to {host}:{port} "
                        f"failed: {e}")
            raise
        live.gone.wait(30)
        self.printk(f"d{live.rec.domid} ({live.rec.name}): migrated to {host}:{port} "
                    f"(pause {out.get('pause_ms')} ms, {out.get('rounds')} rounds)")
        return out

    def migration_status(self, dom: str | int) -> dict:
        return vmm_call(self.lookup(dom).rec.control, "migrate_status").get("migration", {})

    def serve_relocation(self, host: str, port: int) -> None:
        """Accept live migrations on TCP ``host``:``port`` (a thread per connection)."""
        import socket
        from pyxen.migration.channel import STREAM_BUFFER
        ls = socket.create_server((host, port), reuse_port=False)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_BUFFER)   # accepted: inherit
        self.relocation = ls.getsockname()[:2]
        log.info("relocation service on %s:%d", *self.relocation)

        def loop() -> None:
            while True:
                try:
                    conn, addr = ls.accept()
                except OSError:
                    return
                threading.Thread(target=self._incoming, args=(conn, addr), daemon=True,
                                 name="migrate-in").start()
        threading.Thread(target=loop, daemon=True, name="relocation").start()

    def _incoming(self, conn, addr) -> None:  # type: ignore[no-untyped-def]
        """One incoming migration: check the request, reserve the ID, hand the connection
        to a new VMM in receive mode, register the domain once it runs here."""
        from pyxen.migration.channel import PROTOCOL, Channel, ChannelError
        ch = Channel(conn, f"{addr[0]}:{addr[1]}")
        try:
            hello = ch.recv_json(15, "the request")
            if hello.get("pyxen-migrate") != PROTOCOL:
                raise ToolstackError(f"protocol {hello.get('pyxen-migrate')!r} (this host "
                                     f"speaks {PROTOCOL})", 400)
            if hello.get("mode", "transparent") not in ("transparent", "suspend"):
                raise ToolstackError(f"migration mode {hello.get('mode')!r} is not "
                                     "supported here", 400)
            self._check_engine(hello.get("config") or {})
            rec = self._reserve(hello.get("config") or {})
            disk_dir = None
            if hello.get("copy_storage"):
                disk_dir = os.path.join(self.paths.state_dir, "disks")
                os.makedirs(disk_dir, exist_ok=True)
        except (ToolstackError, ChannelError) as e:
            log.warning("incoming migration from %s refused: %s", ch.peer, e)
            try:
                ch.send_json({"ok": False, "error": str(e)})
            except ChannelError:
                pass
            ch.close()
            return
        try:
            ch.send_json({"ok": True})
            fd = conn.fileno()
            self._spawn_restored(rec, ["--receive-fd", str(fd)], (fd,), False,
                                 disk_dir=disk_dir)
        except (ToolstackError, ChannelError, OSError) as e:
            self.printk(f"incoming migration of {rec.name} from {ch.peer} failed: {e}")
            return
        finally:
            ch.close()
            with self.lock:
                self.reserved.discard(rec.domid)
        self.printk(f"d{rec.domid} ({rec.name}): migrated in from {ch.peer}")
        self._monitor(self.domains[rec.domid])

    def domain_info(self, dom: str | int) -> dict:
        live = self.lookup(dom)
        if not live.rec.control:                    # its VMM is still building it
            st = {"state": "paused", "paused": True, "building": True,
                  "memory_mib": live.rec.config.get("memory", 0), "vcpus": []}
        else:
            try:
                st = vmm_call(live.rec.control, "info", timeout=5)
            except VmmGone:
                st = dict(live.state, state="dying")
        st.pop("ok", None)
        return {"domid": live.rec.domid, "name": live.rec.name, "uuid": live.rec.uuid,
                "config": live.rec.config, "console": live.rec.console, "pid": live.rec.pid,
                "created": live.rec.created, "disks": list(live.disks),
                "nics": list(live.nics), "status": st}

    def guest_memory_mib(self) -> int:
        """Memory given to all domains (their configurations), MiB."""
        with self.lock:
            return sum(int(lv.rec.config.get("memory", 0)) for lv in self.domains.values())

    def list_domains(self) -> list[dict]:
        with self.lock:
            ids = sorted(self.domains)
        out = []
        for domid in ids:
            try:
                out.append(self.domain_info(domid))
            except ToolstackError:
                continue                            # went away meanwhile
        return out

    def printk(self, msg: str) -> None:
        """A line for ``dmesg`` (Xen's console ring), timestamped since pyxend start."""
        self._dmesg.append(f"(XEN) [{time.time() - self.started:12.6f}] {msg}")
        log.info("%s", msg)

    def dmesg(self, clear: bool = False) -> list[str]:
        lines = list(self._dmesg)
        if clear:
            self._dmesg.clear()
        return lines


def validate_config(config: dict) -> dict:
    """A checked copy of a domain configuration (DomainSpec's keys). 400 names the key."""
    if not isinstance(config, dict):
        raise ToolstackError("config must be a JSON object", 400)
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ToolstackError(f"config key {unknown[0]!r}: unknown", 400)
    cfg = dict(config)
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ToolstackError("config key 'name': a non-empty string is required", 400)
    _check_name(name)
    if cfg.setdefault("type", "pvh") != "pvh":
        raise ToolstackError(f"config key 'type': {cfg['type']!r} is not supported (pvh)", 400)

    def integer(key: str, default: int, lo: int, hi: int) -> int:
        v = cfg.get(key)
        v = default if v is None else v
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ToolstackError(f"config key {key!r}: {v!r} is not an integer in "
                                 f"{lo}..{hi}", 400)
        cfg[key] = v
        return v

    mem = integer("memory", 128, 16, 65536)
    integer("maxmem", mem, mem, 65536)
    vcpus = integer("vcpus", 1, 1, 128)
    integer("maxvcpus", vcpus, vcpus, 128)
    kernel = cfg.get("kernel")
    if not isinstance(kernel, str) or not kernel:
        raise ToolstackError("config key 'kernel': a kernel path is required", 400)
    for key in ("kernel", "ramdisk"):
        path = cfg.get(key)
        if path is None:
            continue
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ToolstackError(f"config key {key!r}: {path!r} is not an absolute path", 400)
        if not os.path.isfile(path):
            raise ToolstackError(f"config key {key!r}: {path}: no such file", 400)
    if cfg.get("cmdline") is not None and not isinstance(cfg["cmdline"], str):
        raise ToolstackError("config key 'cmdline': must be a string", 400)
    for key, default in (("on_poweroff", "destroy"), ("on_reboot", "restart"),
                         ("on_watchdog", "destroy"), ("on_crash", "destroy"),
                         ("on_soft_reset", "soft-reset")):
        v = cfg.setdefault(key, default)
        if v not in ACTIONS:
            raise ToolstackError(f"config key {key!r}: {v!r} is not one of "
                                 f"{', '.join(ACTIONS)}", 400)
    if cfg.setdefault("accel", "auto") not in ("auto", "kvm", "tcg"):
        raise ToolstackError(f"config key 'accel': {cfg['accel']!r} is not auto, kvm or tcg",
                             400)
    if cfg.get("uuid") is not None:
        try:
            cfg["uuid"] = str(uuidlib.UUID(str(cfg["uuid"])))
        except ValueError:
            raise ToolstackError(f"config key 'uuid': {cfg['uuid']!r} is not a UUID",
                                 400) from None
    return cfg


def resolve_disks(requests: list, wheres: dict[int, str] | None = None) -> list[DiskConfig]:
    """:func:`resolve_disk` for each request of a create (a dict ``{"spec", "cwd", "where"}``
    or a bare spec string); two disks with one vdev, or one image writable twice, are 400.
    ``wheres`` (if given) gets each disk's ``where`` by devid."""
    if not isinstance(requests, list):
        raise ToolstackError("disks must be a list", 400)
    out: list[DiskConfig] = []
    for req in requests:
        if isinstance(req, str):
            req = {"spec": req}
        if not isinstance(req, dict):
            raise ToolstackError("each disk must be a spec string or {\"spec\", \"cwd\"}", 400)
        where = req.get("where")
        dcfg = resolve_disk(req.get("spec"), req.get("cwd"), where)
        pre = f"{where}: " if where else ""
        for o in out:
            if o.devid == dcfg.devid:
                raise ToolstackError(f"{pre}disk spec {dcfg.spec!r}: vdev {dcfg.vdev} used "
                                     f"twice (also in {o.spec!r})", 400)
            if os.path.realpath(o.target) == os.path.realpath(dcfg.target) and not (
                    o.readonly and dcfg.readonly):
                raise ToolstackError(f"{pre}disk spec {dcfg.spec!r}: {dcfg.target} is "
                                     f"already used as {o.vdev}", 400)
        out.append(dcfg)
        if wheres is not None and where:
            wheres[dcfg.devid] = where
    return out


def resolve_disk(text: object, cwd: object = None, where: str | None = None) -> DiskConfig:
    """The VMM's DiskConfig for disk spec ``text``: parsed (xl's grammar), the target made
    absolute against ``cwd`` (the client's directory: the config file's for ``create``, the
    shell's for ``block-attach``) and checked (:func:`check_disk_target`). A fault is 400,
    ``[where: ]disk spec '<text>': <reason>``."""
    if not isinstance(text, str) or not text.strip():
        raise ToolstackError(f"{where + ': ' if where else ''}a disk spec (string) is required",
                             400)
    try:
        spec = parse_disk_spec(text)
        if spec.backend not in (None, "0", "Domain-0"):
            raise DiskSpecError(text, f"backend={spec.backend}: disks are served by dom0 "
                                      "only (no driver domains)")
        if spec.script:
            raise DiskSpecError(text, f"script={spec.script}: block hotplug scripts are "
                                      "not supported")
        if spec.specification != "xen":
            raise DiskSpecError(text, f"specification={spec.specification} is not supported")
        if spec.target and not os.path.isabs(spec.target):
            if not isinstance(cwd, str) or not os.path.isabs(cwd):
                raise DiskSpecError(text, f"{spec.target}: a relative target needs the "
                                          "client's directory (cwd, an absolute path)")
        dcfg = disk_config(spec, cwd if isinstance(cwd, str) else None)
        check_disk_target(dcfg, spec.target)
    except DiskSpecError as e:
        raise ToolstackError(f"{where}: {e}" if where else str(e), 400) from None
    return dcfg


def check_disk_target(dcfg: DiskConfig, shown: str | None = None) -> None:
    """DiskSpecError unless ``dcfg.target`` is a file or block device this process may open
    as asked, and its format can be served (non-raw formats need qemu-storage-daemon).
    ``shown`` is the target as the user wrote it (named in the message)."""
    shown = shown or dcfg.target

    def bad(msg: str) -> DiskSpecError:
        return DiskSpecError(dcfg.spec or dcfg.target, f"{shown}: {msg}")
    try:
        st = os.stat(dcfg.target)
    except FileNotFoundError:
        raise bad("no such file") from None
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise bad("is neither a file nor a block device")
    if not os.access(dcfg.target, os.R_OK if dcfg.readonly else os.R_OK | os.W_OK):
        raise bad("permission denied" + ("" if dcfg.readonly else
                                         " (read-write; use access=ro for read-only)"))
    if dcfg.format != "raw" and shutil.which("qemu-storage-daemon") is None:
        raise bad(f"format {dcfg.format} needs qemu-storage-daemon (Debian package "
                  "qemu-system-common) on the PATH")


def resolve_nics(requests: list, wheres: dict[int, str] | None = None) -> list[NicConfig]:
    """The NicConfigs of a create's vif requests (a dict ``{"spec", "where"}`` or a bare spec
    string): each checked by :func:`parse_nic`, devid = position in the list unless the spec
    gives one (xl's numbering), a random Xen MAC unless given. Two NICs with one devid, MAC
    or vifname are 400. ``wheres`` (if given) gets each NIC's ``where`` by devid."""
    if not isinstance(requests, list):
        raise ToolstackError("nics must be a list", 400)
    out: list[NicConfig] = []
    for i, req in enumerate(requests):
        if isinstance(req, str):
            req = {"spec": req}
        if not isinstance(req, dict):
            raise ToolstackError("each nic must be a spec string or {\"spec\", \"where\"}",
                                 400)
        where = req.get("where")
        pre = f"{where}: " if where else ""
        ncfg = nic_config(parse_nic(req.get("spec"), where), i)
        for o in out:
            clash = ("devid", ncfg.devid) if o.devid == ncfg.devid else \
                ("mac", ncfg.mac) if o.mac.lower() == ncfg.mac.lower() else \
                ("vifname", ncfg.vifname) if ncfg.vifname and o.vifname == ncfg.vifname \
                else None
            if clash:
                raise ToolstackError(f"{pre}vif spec {ncfg.spec!r}: {clash[0]} {clash[1]} used "
                                     f"twice (also in {o.spec!r})", 400)
        out.append(ncfg)
        if wheres is not None and where:
            wheres[ncfg.devid] = where
    return out


def parse_nic(text: object, where: str | None = None) -> VifSpec:
    """Parse vif spec ``text`` (xl's grammar) and check that pyxen can serve it: backend dom0,
    no hotplug script other than vif-bridge (whose job pyxen does itself), no emulated
    (``type=ioemu``) NIC, no ``gatewaydev``/``vlan``, and a bridge name that is a valid
    interface name and not an existing non-bridge interface. A fault is 400,
    ``[where: ]vif spec '<text>': <reason>``."""
    if not isinstance(text, str):
        raise ToolstackError(f"{where + ': ' if where else ''}a vif spec (string) is required",
                             400)
    try:
        spec = parse_vif_spec(text)
        if spec.backend not in (None, "0", "Domain-0"):
            raise VifSpecError(text, f"backend={spec.backend}: NICs are served by dom0 only "
                                     "(no driver domains)")
        if spec.script and os.path.basename(spec.script) != "vif-bridge":
            raise VifSpecError(text, f"script={spec.script}: vif hotplug scripts are not "
                                     "supported (pyxen puts the TAP on the bridge itself, as "
                                     "vif-bridge does)")
        if spec.type == "ioemu":
            raise VifSpecError(text, "type=ioemu: PVH domains have no emulated NICs "
                                     "(use type=vif)")
        if spec.gatewaydev:
            raise VifSpecError(text, f"gatewaydev={spec.gatewaydev}: only for vif-route/"
                                     "vif-nat, which pyxen does not have")
        if spec.vlan:
            raise VifSpecError(text, f"vlan={spec.vlan}: VLANs are not supported")
        if spec.bridge:
            _check_bridge(text, spec.bridge)
    except VifSpecError as e:
        raise ToolstackError(f"{where}: {e}" if where else str(e), 400) from None
    return spec


def _check_bridge(text: str, bridge: str) -> None:
    """VifSpecError unless ``bridge`` may name a bridge (missing ones are created)."""
    from pyxen.host.bridge import bridge_exists, ifindex
    try:
        if ifindex(bridge) is not None and not bridge_exists(bridge):
            raise VifSpecError(text, f"bridge={bridge}: {bridge} is an interface but not a "
                                     "bridge")
    except HostNetworkError as e:
        raise VifSpecError(text, f"bridge={bridge}: {e}") from None


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or any(c in _NAME_FORBIDDEN for c in name) \
            or name.isdigit():
        raise ToolstackError(f"domain name {name!r}: 1..64 characters, not all digits, "
                             f"no '/', blanks or control characters", 400)


def _xenstored_alive(path: str) -> bool:
    try:
        with XenstoreClient(path, timeout=2) as c:
            c.read("/")
        return True
    except (OSError, ConnectionError):
        return False
    except XenstoreError:
        return True


def _read_line(fd: int, timeout: float) -> bytes:
    """One line from ``fd`` (a pipe), or what arrived before EOF/timeout."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        buf += data
    return buf.split(b"\n", 1)[0]
