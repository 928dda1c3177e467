"""The per-domain VMM process: one domain, its control socket and its console socket.

pyxend starts ``python -m pyxen.vmm.process --spec FILE --ready-fd N`` in a new session, so
the process outlives a pyxend restart. It builds the domain (the standalone xenstored serves
the store ring), reports on the ready descriptor one JSON line -- ``{"ok": true, "pid": ..}``
or ``{"ok": false, "error": "..."}`` -- and then serves, on one selector loop:

* the **control socket** (``<run_dir>/<domid>.ctl``): newline-delimited JSON requests
  ``{"op": ...}`` answered with ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``
  (:data:`OPS`). ``subscribe`` keeps the connection open and pushes
  ``{"event": "state", ...}`` on every state change, starting with the current one.
* the **console socket** (``<run_dir>/<domid>.console``): a raw byte stream to and from the
  guest's hvc0 (xenconsoled's pty). Several clients may attach; all see the output.
  Console output is also appended to ``<log_dir>/console-<domid>.log``.

A guest that shuts down leaves the process in state ``shutdown`` until the toolstack decides
(``destroy``, or nothing for ``preserve``). ``destroy`` (or SIGTERM) stops the vCPUs, removes
the domain's xenstore subtree, releases it from xenstored and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pyxen.errors import PyxenError
from pyxen.migration.channel import DEFAULT_PORT
from pyxen.migration.outgoing import XenstoredHooks, migrate_out
from pyxen.vmm.restore import cpuid_to_json
from pyxen.migration.save import MAX_ROUNDS, DomainSaver, FdSink, MigrationError
from pyxen.vmm.builder import DomainConfig, Vmm, build
from pyxen.vmm.devices import DeviceManager, DiskConfig, NicConfig
from pyxen.xen.abi import xen as X
from pyxen.xenstore.client import XenstoreClient
from pyxen.xenstore.store import XenstoreError

log = logging.getLogger("pyxen.vmm")

#: SHUTDOWN_* codes (xen/include/public/sched.h) by pyxen's reason names
REASON_CODES = {name: code for code, name in X.SHUTDOWN_NAMES.items()}
OPS = ("info", "pause", "unpause", "shutdown", "destroy", "rename", "subscribe",
       "device_add", "device_remove", "device_list", "device_restart", "save", "migrate",
       "migrate_status")
DEVICE_KINDS = ("vbd", "vif")
#: VmmSpec fields that belong to the host, not the domain (not sent in a save/migration)
HOST_LOCAL = ("run_dir", "log_dir", "xenstored", "paused")
# (``disk_dir``, in a receiving VMM's local spec: where copied disk images go)
_CONSOLE_CLIENT_MAX = 1 << 20          # bytes queued for a console client before it is cut


@dataclass
class VmmSpec:
    """What pyxend asks a VMM process to run. Memory in MiB."""

    domid: int
    name: str
    kernel: str
    run_dir: str
    log_dir: str
    xenstored: str
    uuid: str
    memory: int = 128
    vcpus: int = 1
    ramdisk: str | None = None
    cmdline: str = ""
    accel: str = "auto"
    paused: bool = False
    disks: list[dict] = field(default_factory=list)      # DiskConfig.to_dict() each
    nics: list[dict] = field(default_factory=list)       # NicConfig.to_dict() each

    @classmethod
    def from_dict(cls, d: dict) -> VmmSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def control_path(self) -> str:
        return os.path.join(self.run_dir, f"{self.domid}.ctl")

    def console_path(self) -> str:
        return os.path.join(self.run_dir, f"{self.domid}.console")


class _Deferred:
    """A control op that takes time (device hot-plug waits for the guest): it runs on its
    own thread and its reply is sent from the main loop when it is done."""

    def __init__(self, fn: Callable[[], dict | None]) -> None:
        self.fn = fn


@dataclass
class _Peer:
    sock: socket.socket
    kind: str                                   # "ctl" | "console"
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    subscribed: bool = False
    closing: bool = False


class VmmProcess:
    """Runs one built domain; :meth:`serve` is the main loop (main thread)."""

    def __init__(self, spec: VmmSpec, vmm: Vmm) -> None:
        self.spec = spec
        self.vmm = vmm
        self.domain = vmm.domain
        self.started = False
        self.start_time = time.time()
        self.sel = selectors.DefaultSelector()
        self.peers: dict[int, _Peer] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._console_pending = bytearray()
        self._replies: list[tuple[_Peer, dict]] = []
        self.migration: dict = {}
        self._state_changed = False
        self._exit = False
        os.makedirs(spec.log_dir, exist_ok=True)
        self._console_log = open(os.path.join(spec.log_dir, f"console-{spec.domid}.log"), "ab")
        self.listeners = {}
        for kind, path in (("ctl", spec.control_path()), ("console", spec.console_path())):
            if os.path.exists(path):
                os.unlink(path)
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            ls.bind(path)
            os.chmod(path, 0o600)
            ls.listen(16)
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, ("listen", kind))
            self.listeners[kind] = ls
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.domain.on_state_change.append(lambda _st: self._wake(state=True))

    # ----------------------------------------------------------------- cross-thread input
    def console_output(self, channel: str, data: bytes) -> None:
        """Sink for the domain's output (vCPU / event threads)."""
        with self._lock:
            self._console_pending += data
        self._wake()

    def _wake(self, state: bool = False) -> None:
        if state:
            self._state_changed = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if not self.started:
            self.started = True
            self.start_time = time.time()
            self.vmm.start()
        else:
            self.domain.unpause()

    def serve(self) -> None:
        while not self._exit:
            for key, events in self.sel.select(1.0):
                what, arg = key.data
                if what == "listen":
                    self._accept(key.fileobj, arg)     # type: ignore[arg-type]
                elif what == "wake":
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    peer: _Peer = arg
                    if events & selectors.EVENT_READ:
                        self._read(peer)
                    if events & selectors.EVENT_WRITE and peer.sock.fileno() >= 0:
                        self._flush(peer)
            self._pump_console()
            self._send_replies()
            if self._state_changed:
                self._state_changed = False
                self._broadcast_state()
        self._teardown()

    def request_exit(self) -> None:
        self._exit = True
        self._wake()

    # ----------------------------------------------------------------- sockets
    def _accept(self, ls: socket.socket, kind: str) -> None:
        try:
            sock, _ = ls.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        peer = _Peer(sock, kind)
        self.peers[sock.fileno()] = peer
        self.sel.register(sock, selectors.EVENT_READ, ("peer", peer))

    def _read(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)
            return
        if peer.kind == "console":
            self.vmm.console.send_input(data)
            return
        peer.inbuf += data
        while b"\n" in peer.inbuf:
            line, _, rest = bytes(peer.inbuf).partition(b"\n")
            peer.inbuf[:] = rest
            reply = self._control(peer, line)
            if isinstance(reply, _Deferred):
                threading.Thread(target=self._run_deferred, args=(peer, reply), daemon=True,
                                 name="vmm-op").start()
            else:
                self._send(peer, reply)
        if len(peer.inbuf) > 65536:
            self._drop(peer)

    def _run_deferred(self, peer: _Peer, op: _Deferred) -> None:
        exit_after = False
        try:
            reply = {"ok": True, **(op.fn() or {})}
            exit_after = bool(reply.pop("_exit", False))
        except (PyxenError, ValueError, RuntimeError) as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:                       # a bug must not take the domain down
            log.exception("d%d: control op failed", self.domain.domid)
            reply = {"ok": False, "error": f"internal error: {e}"}
        with self._lock:
            self._replies.append((peer, reply))
            if exit_after:
                self._exit = True                   # after this reply has been sent
        self._wake()

    def _send_replies(self) -> None:
        with self._lock:
            replies, self._replies = self._replies, []
        for peer, reply in replies:
            if self.peers.get(peer.sock.fileno()) is peer:
                self._send(peer, reply)

    def _send(self, peer: _Peer, obj: dict) -> None:
        peer.out += json.dumps(obj).encode() + b"\n"
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        if peer.out:
            try:
                n = peer.sock.send(peer.out)
                del peer.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(peer)
                return
        if peer.kind == "console" and len(peer.out) > _CONSOLE_CLIENT_MAX:
            self._drop(peer)                          # a stuck reader: cut it loose
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.out else 0)
        try:
            self.sel.modify(peer.sock, mask, ("peer", peer))
        except (KeyError, ValueError):
            pass

    def _drop(self, peer: _Peer) -> None:
        self.peers.pop(peer.sock.fileno(), None)
        try:
            self.sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()

    def _pump_console(self) -> None:
        with self._lock:
            data = bytes(self._console_pending)
            self._console_pending.clear()
        if not data:
            return
        self._console_log.write(data)
        self._console_log.flush()
        for peer in list(self.peers.values()):
            if peer.kind == "console":
                peer.out += data
                self._flush(peer)

    def _broadcast_state(self) -> None:
        st = self.state()
        for peer in list(self.peers.values()):
            if peer.subscribed:
                self._send(peer, {"event": "state", **st})

    # ----------------------------------------------------------------- control requests
    def _control(self, peer: _Peer, line: bytes) -> dict | _Deferred:
        try:
            req = json.loads(line)
            op = req.get("op") if isinstance(req, dict) else None
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if op not in OPS:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            out = getattr(self, f"_op_{op}")(peer, req)
            if isinstance(out, _Deferred):
                return out
            return {"ok": True, **(out or {})}
        except (PyxenError, ValueError, RuntimeError) as e:
            return {"ok": False, "error": str(e)}

    def _op_info(self, _peer: _Peer, _req: dict) -> dict:
        return self.state()

    def _op_subscribe(self, peer: _Peer, _req: dict) -> dict:
        peer.subscribed = True
        return self.state()

    def _require_live(self) -> None:
        st = self.domain.runstate.state
        if st not in ("running", "paused"):
            raise ValueError(f"domain {self.domain.name} is {st}")

    def _op_pause(self, _peer: _Peer, _req: dict) -> None:
        self._require_live()
        if self.started:
            self.domain.pause()

    def _op_unpause(self, _peer: _Peer, _req: dict) -> None:
        self._require_live()
        self.start()

    def _op_shutdown(self, _peer: _Peer, req: dict) -> None:
        """Forced shutdown (the toolstack's fallback when the guest ignores control/shutdown)."""
        reason = req.get("reason", "poweroff")
        if reason not in REASON_CODES:
            raise ValueError(f"unknown shutdown reason {reason!r}")
        self.domain.shutdown(reason, req.get("detail", "forced by the toolstack"))

    def _op_destroy(self, _peer: _Peer, _req: dict) -> None:
        self._exit = True

    def _op_rename(self, _peer: _Peer, req: dict) -> None:
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("rename needs a non-empty name")
        self.domain.name = name
        self.spec.name = name

    # --- devices (xl block-attach/-detach/-list)
    def _devices(self, req: dict) -> DeviceManager:
        kind = req.get("kind")
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device kind {kind!r} (one of {', '.join(DEVICE_KINDS)})")
        if self.vmm.devices is None:
            raise ValueError("this domain has no device manager")
        return self.vmm.devices

    def _op_device_add(self, _peer: _Peer, req: dict) -> _Deferred:
        self._require_live()
        devices = self._devices(req)
        conf = req.get("config")
        if not isinstance(conf, dict):
            raise ValueError("device_add needs a config object")
        if req["kind"] == "vif":
            try:
                ncfg = NicConfig.from_dict(conf)
            except TypeError as e:
                raise ValueError(f"bad vif config: {e}") from e

            def add_nic() -> dict:
                be = devices.add_nic(ncfg)
                self.spec.nics.append(ncfg.to_dict())
                return {"devid": be.devid, "vifname": be.tap.name}
            return _Deferred(add_nic)
        try:
            cfg = DiskConfig.from_dict(conf)
        except TypeError as e:
            raise ValueError(f"bad disk config: {e}") from e

        def add() -> dict:
            be = devices.add_disk(cfg)
            self.spec.disks.append(cfg.to_dict())
            return {"devid": be.devid}
        return _Deferred(add)

    def _op_device_remove(self, _peer: _Peer, req: dict) -> _Deferred:
        devices = self._devices(req)
        name = str(req.get("device", ""))
        timeout = float(req.get("timeout", 10.0))
        force = bool(req.get("force", False))
        if req["kind"] == "vif":
            noun, find, detach, listed = "vif", devices.find_nic, devices.remove_nic, "nics"
        else:
            noun, find, detach, listed = "disk", devices.find_disk, devices.remove_disk, "disks"
        devid = find(name)
        if devid is None:
            raise ValueError(f"domain {self.domain.name} has no {noun} {name!r}")

        def remove() -> dict:
            clean = detach(devid, timeout=timeout, force=force)
            setattr(self.spec, listed,
                    [d for d in getattr(self.spec, listed) if d.get("devid") != devid])
            return {"devid": devid, "clean": clean}
        return _Deferred(remove)

    def _op_device_restart(self, _peer: _Peer, req: dict) -> dict:
        """Replace a device's backend with a new instance that re-attaches to the guest's
        rings (what a restarted driver domain does); the guest keeps its device."""
        devices = self._devices(req)
        name = str(req.get("device", ""))
        if req["kind"] == "vif":
            nid = devices.find_nic(name)
            if nid is None:
                raise ValueError(f"domain {self.domain.name} has no vif {name!r}")
            be = devices.restart_nic(nid)
        else:
            did = devices.find_disk(name)
            if did is None:
                raise ValueError(f"domain {self.domain.name} has no disk {name!r}")
            be = devices.restart_disk(did)
        return {"devid": be.devid, "state": be.state}

    def _op_device_list(self, _peer: _Peer, req: dict) -> dict:
        devices = self._devices(req)
        return {"devices": devices.list_nics() if req["kind"] == "vif" else devices.list_disks()}

    # --- save and live migration
    def _xenstore_hooks(self) -> XenstoredHooks:
        if self.vmm.store_link is None:
            raise ValueError("only domains whose xenstore is served by xenstored can be saved")
        return XenstoredHooks(self.spec.xenstored)

    def domain_config(self, record: dict | None) -> dict:
        """The DOMAIN_CONFIG record: the VMM spec without host-local paths, the toolstack's
        record, and what the engine state needs on the other side."""
        spec = {k: v for k, v in asdict(self.spec).items() if k not in HOST_LOCAL}
        engine = self.domain.vm.engine                 # type: ignore[attr-defined]
        return {"spec": spec, "record": record or {}, "engine": engine.name,
                "state_format": engine.state_format, "cpuid": cpuid_to_json(self.vmm.cpuid),
                "hypercall_sites": list(self.vmm.hypercall_sites)}

    def _op_save(self, _peer: _Peer, req: dict) -> _Deferred:
        """xl save: write the domain to ``path``; then destroy it, or with ``keep`` (-c)
        let it go on (``paused``: -p, leave it paused)."""
        self._require_live()
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("save needs a file name")
        hooks = self._xenstore_hooks()
        keep, paused = bool(req.get("keep")), bool(req.get("paused"))
        mode = str(req.get("mode") or "transparent")
        config = dict(self.domain_config(req.get("record")), mode=mode)

        def run() -> dict:
            t0 = time.monotonic()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            saver = DomainSaver(self.vmm, config, FdSink(fd), hooks, mode=mode)
            try:
                saver.send_header()
                saver.final()
                os.fsync(fd)
            except BaseException as e:
                saver.abort()
                os.close(fd)
                try:
                    os.unlink(path)
                except OSError:
                    pass
                if isinstance(e, OSError):
                    raise MigrationError(f"writing {path}: {e.strerror or e}") from None
                raise
            os.close(fd)
            st = saver.stats
            out = {**st.to_dict(), "path": path,
                   "total_ms": round((time.monotonic() - t0) * 1000, 1),
                   "pause_ms": round((st.stream_done_at - st.paused_at) * 1000, 1)}
            if keep:
                saver.abort()                        # thaw, re-attach, unpause as before
                if paused:
                    self.domain.pause()
                return out
            log.info("d%d: saved to %s; destroying", self.domain.domid, path)
            return {**out, "_exit": True}
        return _Deferred(run)

    def _op_migrate_status(self, _peer: _Peer, _req: dict) -> dict:
        return {"migration": self.migration}

    def _op_migrate(self, _peer: _Peer, req: dict) -> _Deferred:
        """Live-migrate to the pyxend at ``host``:``port`` (see migration/channel.py)."""
        self._require_live()
        if self.migration.get("phase") in ("connecting", "precopy", "final"):
            raise ValueError("a migration of this domain is already running")
        host = req.get("host")
        if not isinstance(host, str) or not host:
            raise ValueError("migrate needs a host")
        port = int(req.get("port") or DEFAULT_PORT)
        hooks = self._xenstore_hooks()
        config = self.domain_config(req.get("record"))
        self.migration = {"phase": "connecting", "host": host, "port": port}

        def progress(p: dict) -> None:
            self.migration = {**self.migration, **p}

        def run() -> dict:
            try:
                out = migrate_out(self.vmm, config, host, port, hooks, progress,
                                  max_rounds=int(req.get("max_rounds") or MAX_ROUNDS),
                                  copy_storage=bool(req.get("copy_storage")),
                                  mode=str(req.get("mode") or "transparent"))
            except PyxenError as e:
                self.migration = {**self.migration, "phase": "failed", "error": str(e)}
                raise
            self.migration = {**self.migration, **out}
            if out["phase"] == "done":
                return {**out, "_exit": True}
            return out
        return _Deferred(run)

    def state(self) -> dict:
        d = self.domain
        rs = d.runstate
        vcpus = []
        for v in d.vcpus:
            vcpus.append({"id": v.index, "online": v.online, "blocked": v.blocked,
                          "cpu_time_ns": v.cpu_time_ns})
        running = rs.state == "running" and self.started
        all_blocked = running and all(v.blocked for v in d.vcpus if v.online)
        return {
            "domid": d.domid, "name": d.name, "pid": os.getpid(),
            "state": rs.state,
            "reason": rs.reason, "detail": rs.detail,
            "reason_code": REASON_CODES.get(rs.reason) if rs.state == "shutdown" else None,
            "running": running and not all_blocked, "blocked": all_blocked,
            "paused": rs.state == "paused", "memory_mib": self.spec.memory,
            "vcpus": vcpus, "cpu_time_ns": sum(v.cpu_time_ns for v in d.vcpus),
            "start_time": self.start_time,
        }

    # ----------------------------------------------------------------- teardown
    def _teardown(self) -> None:
        log.info("d%d: destroying", self.domain.domid)
        for peer in list(self.peers.values()):
            if peer.subscribed:
                try:
                    peer.sock.setblocking(True)
                    peer.sock.settimeout(1.0)
                    peer.sock.sendall(json.dumps({"event": "destroyed"}).encode() + b"\n")
                except OSError:
                    pass
            self._drop(peer)
        for kind, ls in self.listeners.items():
            ls.close()
        for path in (self.spec.control_path(), self.spec.console_path()):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.vmm.destroy()
        release_domain(self.spec.xenstored, self.spec.domid, self.spec.uuid)
        self._console_log.close()


def release_domain(xenstored: str, domid: int, vm_uuid: str | None) -> None:
    """Remove a domain's xenstore subtree and release it (libxl's destroy step). Idempotent;
    failures are logged, never raised (xenstored may be gone)."""
    try:
        with XenstoreClient(xenstored, timeout=5) as c:
            for path in (f"/local/domain/{domid}", f"/libxl/{domid}",
                         f"/vm/{vm_uuid}" if vm_uuid else None):
                if path:
                    try:
                        c.rm(path)
                    except XenstoreError as e:
                        if e.name != "ENOENT":
                            raise
            try:
                c.release(domid)
            except XenstoreError as e:
                if e.name != "ENOENT":
                    raise
    except (OSError, ConnectionError, XenstoreError) as e:
        log.warning("d%d: xenstore clean-up failed: %s", domid, e)


def _report(fd: int | None, obj: dict) -> None:
    if fd is None:
        return
    try:
        os.write(fd, json.dumps(obj).encode() + b"\n")
    finally:
        os.close(fd)


def _domain_config(spec: VmmSpec) -> DomainConfig:
    modules = [(spec.ramdisk, "")] if spec.ramdisk else []
    return DomainConfig(kernel=spec.kernel, name=spec.name, memory=spec.memory,
                        vcpus=spec.vcpus, cmdline=spec.cmdline, modules=modules,
                        accel=spec.accel, domid=spec.domid, xenstored=spec.xenstored,
                        uuid=spec.uuid, run_dir=spec.run_dir,
                        disks=[DiskConfig.from_dict(d) for d in spec.disks],
                        nics=[NicConfig.from_dict(n) for n in spec.nics])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyxen-vmm", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="JSON file with the VmmSpec")
    ap.add_argument("--ready-fd", type=int, default=None)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--restore", metavar="FILE", help="restore the domain saved in FILE "
                     "(the spec then holds only this host's paths)")
    src.add_argument("--receive-fd", type=int, metavar="FD",
                     help="receive a live migration on the connected socket FD")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s pyxen-vmm[%(process)d] %(levelname)s %(message)s")
    ready = args.ready_fd
    try:
        raw = json.loads(Path(args.spec).read_text())
        spec = VmmSpec.from_dict(raw) if not (args.restore or args.receive_fd is not None) \
            else None
    except (OSError, ValueError, TypeError) as e:
        _report(ready, {"ok": False, "error": f"{args.spec}: {e}"})
        return 1
    holder: dict = {}

    def console(ch: str, data: bytes) -> None:
        if "p" in holder:
            holder["p"].console_output(ch, data)
    if spec is None:
        return _main_restore(args, raw, console, holder, ready)
    try:
        vmm = build(_domain_config(spec), stream=console)
        os.makedirs(spec.run_dir, exist_ok=True)
        proc = VmmProcess(spec, vmm)
    except (PyxenError, OSError) as e:
        release_domain(spec.xenstored, spec.domid, spec.uuid)
        _report(ready, {"ok": False, "error": str(e)})
        return 1
    holder["p"] = proc
    _set_console_tty(spec)
    _signals(proc)
    if not spec.paused:
        proc.start()
    log.info("d%d (%s): built in %.0f ms%s", spec.domid, spec.name, vmm.build_ms,
             " (paused)" if spec.paused else "")
    _report(ready, {"ok": True, "pid": os.getpid(), "control": spec.control_path(),
                    "console": spec.console_path()})
    proc.serve()
    return 0


def _fault_point(local: dict, name: str) -> None:
    """Fault injection for the migration tests: if ``<run_dir>/migrate-fault`` names this
    point, the receiving VMM dies here (SIGKILL, as a crash would)."""
    try:
        with open(os.path.join(local.get("run_dir", ""), "migrate-fault")) as f:
            if f.read().strip() == name:
                log.warning("fault injection: dying at %s", name)
                os.kill(os.getpid(), signal.SIGKILL)
    except OSError:
        pass


def _signals(proc: VmmProcess) -> None:
    signal.signal(signal.SIGTERM, lambda *_: proc.request_exit())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _main_restore(args: argparse.Namespace, local: dict, console, holder: dict,  # type: ignore[no-untyped-def]
                  ready: int | None) -> int:
    """Restore from a file (``--restore``) or receive a migration (``--receive-fd``): the
    spec comes from the stream, this host's paths from ``local`` (run_dir, log_dir,
    xenstored, paused; ``domid``: the ID pyxend reserved, which must be the stream's)."""
    import socket as _socket
    from pyxen.migration.channel import Channel, ChannelError, bound_receive_buffer
    from pyxen.vmm.restore import DomainRestorer, start_restored
    from pyxen.migration.outgoing import RESUME_TIMEOUT
    holder_spec: dict = {}

    def make_config(config: dict) -> DomainConfig:
        raw = config.get("spec")
        if not isinstance(raw, dict):
            raise ValueError("no spec in the domain config")
        copies = config.get("copy_storage")
        if copies:
            if not local.get("disk_dir"):
                raise ValueError("the stream carries disk images but this host was not "
                                 "asked to receive them")
            wanted = {int(c["devid"]) for c in copies}
            stamp = time.strftime("%Y%m%d-%H%M%S")
            raw = dict(raw, disks=[
                dict(d, target=os.path.join(local["disk_dir"],
                                            f"{raw.get('name')}.{d.get('vdev')}.{stamp}.img"))
                if int(d.get("devid", -1)) in wanted else d for d in raw.get("disks", [])])
        spec = VmmSpec.from_dict({**raw, **{k: local[k] for k in HOST_LOCAL if k in local}})
        want = local.get("domid")
        if want is not None and spec.domid != want:
            if config.get("mode") != "suspend":
                raise ValueError(f"domain ID {spec.domid} in the stream, {want} reserved here")
            spec.domid = want                 # a self-suspended guest takes any new ID
        holder_spec["spec"] = spec
        holder_spec["record"] = config.get("record") or {}
        return _domain_config(spec)

    def xs_import(domid: int, state: dict) -> None:
        with XenstoreClient(local["xenstored"], timeout=10) as c:
            c.import_domain(domid, state)

    restorer = DomainRestorer(make_config, xs_import, stream=console)
    ch: Channel | None = None
    what = args.restore or "the migration stream"
    try:
        if args.restore:
            with open(args.restore, "rb") as f:
                while not restorer.ended:
                    data = f.read(1 << 22)
                    if not data:
                        break
                    restorer.feed(data)
        else:
            sock = _socket.socket(fileno=args.receive_fd)
            bound_receive_buffer(sock)
            ch = Channel(sock, "the source")
            while not restorer.ended:
                data = ch.recv_some(60.0, "the stream")
                if not data:
                    break
                restorer.feed(data)
        restorer.eof()
        _fault_point(local, "before-restore")
        vmm = restorer.finish()
    except (PyxenError, OSError, ValueError) as e:
        restorer.discard()
        msg = f"{what}: {e}" if args.restore else str(e)
        log.error("restore failed: %s", msg)
        if ch is not None:
            try:
                ch.send_json({"ok": False, "error": msg})
            except ChannelError:
                pass
        _report(ready, {"ok": False, "error": msg})
        return 1
    spec: VmmSpec = holder_spec["spec"]
    os.makedirs(spec.run_dir, exist_ok=True)
    proc = VmmProcess(spec, vmm)
    proc.started = True
    holder["p"] = proc
    running = restorer.was_running and not local.get("paused")
    if ch is not None:
        _fault_point(local, "before-ready")
        try:
            ch.send_json({"ok": True, "ready": True})
            go = ch.recv_json(RESUME_TIMEOUT, "waiting for go")
            if not go.get("go"):
                raise ChannelError("the source did not say go")
        except ChannelError as e:
            log.error("migration aborted before go: %s", e)
            proc._teardown()
            _report(ready, {"ok": False, "error": f"migration aborted: {e}"})
            return 1
    _set_console_tty(spec)
    _signals(proc)
    start_restored(vmm, running)
    if ch is not None:
        try:
            ch.send_json({"ok": True, "resumed": True})
        except ChannelError:
            pass                     # the source will leave its copy paused; ours runs
        ch.close()
    log.info("d%d (%s): restored from %s (%d pages)%s", spec.domid, spec.name, what,
             restorer.pages_received, "" if running else " (paused)")
    _report(ready, {"ok": True, "pid": os.getpid(), "control": spec.control_path(),
                    "console": spec.console_path(), "spec": asdict(spec),
                    "record": holder_spec.get("record", {})})
    proc.serve()
    return 0


def _set_console_tty(spec: VmmSpec) -> None:
    """``console/tty``: where ``console`` attaches (libxl writes the pty path there)."""
    try:
        with XenstoreClient(spec.xenstored, timeout=5) as c:
            c.write(f"/local/domain/{spec.domid}/console/tty", spec.console_path())
    except (OSError, ConnectionError, XenstoreError) as e:
        log.warning("d%d: cannot record console/tty: %s", spec.domid, e)


if __name__ == "__main__":
    sys.exit(main())
