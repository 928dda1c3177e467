"""pyxend's HTTP/JSON API (FastAPI; the OpenAPI document is served at ``/openapi.json``).

Served on a unix socket (``paths.socket``) by default, on TCP only when asked
(``pyxend --listen HOST:PORT``). Every error is ``{"error": "<message>"}`` with a 4xx/5xx
status; the message names the domain, key or value at fault. Domains are addressed by ID or
name, as xl's ``domain-id`` arguments.

Run: ``pyxend [--listen HOST:PORT] [--foreground]`` (the console script) or
``python -m pyxen.toolstack.api``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from pyxen.errors import ToolstackError
from pyxen.toolstack.paths import Paths
from pyxen.toolstack.pyxend import DETACH_TIMEOUT, SHUTDOWN_TIMEOUT, Pyxend

log = logging.getLogger("pyxen.pyxend")
API_VERSION = "v1"


class DiskRequest(BaseModel):
    spec: str = Field(description="an xl disk spec (xl-disk-configuration(5)), e.g. "
                      "'img.raw,raw,xvdb,rw' or 'format=raw,vdev=xvdc,access=ro,target=/x.img'")
    cwd: str | None = Field(None, description="absolute directory a relative target is "
                            "resolved against (the config file's for create, the client's "
                            "current directory for block-attach)")
    where: str | None = Field(None, description="where the spec came from (file:line), "
                              "prefixed to error messages")


class NicRequest(BaseModel):
    spec: str = Field(description="an xl vif spec (xl-network-configuration(5)), e.g. "
                      "'bridge=pyxenbr0,mac=00:16:3e:01:02:03' or '' (all defaults)")
    where: str | None = Field(None, description="where the spec came from (file:line), "
                              "prefixed to error messages")


class CreateRequest(BaseModel):
    config: dict = Field(description="Domain configuration: name, memory (MiB), maxmem, vcpus, "
                         "maxvcpus, kernel, ramdisk, cmdline, on_poweroff, on_reboot, "
                         "on_crash, on_watchdog, accel, uuid")
    paused: bool = Field(False, description="leave the domain paused (xl create -p)")
    disks: list[DiskRequest] = Field(default_factory=list,
                                     description="the domain's disks (xl.cfg's disk = [...])")
    nics: list[NicRequest] = Field(default_factory=list,
                                   description="the domain's NICs (xl.cfg's vif = [...]); "
                                   "devid = position in the list unless the spec sets it")


class ShutdownRequest(BaseModel):
    fallback: bool = Field(False, description="force the shutdown if the guest has no PV "
                           "control interface or does not react within `timeout` (xl -F)")
    timeout: float = Field(SHUTDOWN_TIMEOUT, gt=0, le=3600)


class RenameRequest(BaseModel):
    name: str


class SaveRequest(BaseModel):
    path: str = Field(description="absolute path of the file to write")
    keep: bool = Field(False, description="leave the domain running afterwards (xl save -c)")
    paused: bool = Field(False, description="with keep: leave it paused (xl save -p)")
    mode: Literal["transparent", "suspend"] = Field(
        "transparent", description="transparent: pyxen stops the guest; suspend: the guest "
        "suspends itself (control/shutdown = suspend) and resumes in a new domain")


class RestoreRequest(BaseModel):
    path: str = Field(description="absolute path of a file written by save")
    paused: bool = Field(False, description="leave the restored domain paused (xl restore -p)")


class MigrateRequest(BaseModel):
    host: str = Field(description="the target pyxend's relocation address")
    port: int | None = Field(None, ge=1, le=65535, description="its port (default 8002)")
    copy_storage: bool = Field(False, description="send the (raw) disk images too, for hosts "
                               "that share no storage (xl migrate has no such option; "
                               "libvirt's --copy-storage-all)")
    mode: Literal["transparent", "suspend"] = Field(
        "transparent", description="as for save; suspend lets the domain take another ID")


def make_app(daemon: Pyxend) -> FastAPI:
    app = FastAPI(title="pyxend", version="0.1.0",
                  description="pyxen's toolstack daemon: domains, lifecycle, host info.")

    @app.exception_handler(ToolstackError)
    async def _toolstack_error(_req: Request, e: ToolstackError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where or 'request'}: {first.get('msg', 'invalid')}"},
                            status_code=400)

    p = f"/{API_VERSION}"

    @app.get(f"{p}/info", summary="host and toolstack facts (xl info)")
    def info() -> dict:
        return host_facts(daemon)

    @app.get(f"{p}/domains", summary="all domains, Domain-0 first (xl list)")
    def list_domains() -> list[dict]:
        return [domain0_entry()] + daemon.list_domains()

    @app.post(f"{p}/domains", status_code=201, summary="create and start a domain")
    def create(req: CreateRequest) -> dict:
        rec = daemon.create(req.config, paused=req.paused,
                            disks=[d.model_dump() for d in req.disks],
                            nics=[n.model_dump() for n in req.nics])
        return {"domid": rec.domid, "name": rec.name, "console": rec.console,
                "disks": rec.extra.get("disks", []), "nics": rec.extra.get("nics", [])}

    @app.get(p + "/domains/{dom}", summary="one domain (by ID or name)")
    def get_domain(dom: str) -> dict:
        if dom in ("0", "Domain-0"):
            return domain0_entry()
        return daemon.domain_info(dom)

    @app.delete(p + "/domains/{dom}", summary="destroy a domain (xl destroy)")
    def destroy(dom: str) -> dict:
        _not_dom0(dom)
        daemon.destroy(dom)
        return {}

    @app.post(p + "/domains/{dom}/shutdown", summary="ask the guest to power off")
    def shutdown(dom: str, req: ShutdownRequest) -> dict:
        _not_dom0(dom)
        return {"method": daemon.shutdown(dom, "poweroff", req.fallback, req.timeout)}

    @app.post(p + "/domains/{dom}/reboot", summary="ask the guest to reboot")
    def reboot(dom: str, req: ShutdownRequest) -> dict:
        _not_dom0(dom)
        return {"method": daemon.shutdown(dom, "reboot", req.fallback, req.timeout)}

    @app.post(p + "/domains/{dom}/pause", summary="pause all vCPUs")
    def pause(dom: str) -> dict:
        _not_dom0(dom)
        daemon.pause(dom)
        return {}

    @app.post(p + "/domains/{dom}/unpause", summary="resume a paused domain")
    def unpause(dom: str) -> dict:
        _not_dom0(dom)
        daemon.unpause(dom)
        return {}

    @app.post(p + "/domains/{dom}/rename", summary="rename a domain")
    def rename(dom: str, req: RenameRequest) -> dict:
        _not_dom0(dom)
        daemon.rename(dom, req.name)
        return {}

    @app.get(p + "/domains/{dom}/disks",
             summary="the domain's disks with their backend state (xl block-list)")
    def list_disks(dom: str) -> list[dict]:
        _not_dom0(dom)
        return daemon.disk_list(dom)

    @app.post(p + "/domains/{dom}/disks", status_code=201,
              summary="hot-plug a disk into a running domain (xl block-attach)")
    def attach_disk(dom: str, req: DiskRequest) -> dict:
        _not_dom0(dom)
        return daemon.disk_attach(dom, req.spec, req.cwd)

    @app.delete(p + "/domains/{dom}/disks/{vdev}",
                summary="unplug a disk (xl block-detach); vdev is a name (xvdc) or number")
    def detach_disk(dom: str, vdev: str, force: bool = False,
                    timeout: float = DETACH_TIMEOUT) -> dict:
        _not_dom0(dom)
        _check_detach_timeout(timeout)
        return daemon.disk_detach(dom, vdev, force=force, timeout=timeout)

    @app.get(p + "/domains/{dom}/nics",
             summary="the domain's NICs with their backend state (xl network-list)")
    def list_nics(dom: str) -> list[dict]:
        _not_dom0(dom)
        return daemon.nic_list(dom)

    @app.post(p + "/domains/{dom}/nics", status_code=201,
              summary="hot-plug a NIC into a running domain (xl network-attach)")
    def attach_nic(dom: str, req: NicRequest) -> dict:
        _not_dom0(dom)
        return daemon.nic_attach(dom, req.spec)

    @app.delete(p + "/domains/{dom}/nics/{device}",
                summary="unplug a NIC (xl network-detach); device is a devid or a MAC")
    def detach_nic(dom: str, device: str, force: bool = False,
                   timeout: float = DETACH_TIMEOUT) -> dict:
        _not_dom0(dom)
        _check_detach_timeout(timeout)
        return daemon.nic_detach(dom, device, force=force, timeout=timeout)

    @app.post(p + "/domains/{dom}/save", summary="save a domain to a file (xl save)")
    def save(dom: str, req: SaveRequest) -> dict:
        _not_dom0(dom)
        return daemon.save(dom, req.path, keep=req.keep, paused=req.paused, mode=req.mode)

    @app.post(f"{p}/restore", status_code=201, summary="restore a saved domain (xl restore)")
    def restore(req: RestoreRequest) -> dict:
        rec = daemon.restore(req.path, paused=req.paused)
        return {"domid": rec.domid, "name": rec.name, "console": rec.console}

    @app.post(p + "/domains/{dom}/migrate",
              summary="live-migrate a domain to another host's pyxend (xl migrate); "
                      "returns when it is done, with the summary")
    def migrate(dom: str, req: MigrateRequest) -> dict:
        _not_dom0(dom)
        return daemon.migrate(dom, req.host, req.port, copy_storage=req.copy_storage,
                              mode=req.mode)

    @app.get(p + "/domains/{dom}/migrate", summary="progress of a running migration")
    def migrate_status(dom: str) -> dict:
        _not_dom0(dom)
        return daemon.migration_status(dom)

    @app.get(f"{p}/dmesg", summary="the hypervisor's message ring (xl dmesg)")
    def dmesg(clear: bool = False) -> dict:
        return {"lines": daemon.dmesg(clear)}

    return app


def _check_detach_timeout(timeout: float) -> None:
    if not 0 < timeout <= 3600:
        raise ToolstackError(f"timeout {timeout:g}: must be in (0, 3600] seconds", 400)


def _not_dom0(dom: str) -> None:
    if dom in ("0", "Domain-0"):
        raise ToolstackError("this operation is not possible on Domain-0", 400)


def domain0_entry() -> dict:
    """Domain-0 is the host: its memory, CPUs and CPU time (as xl lists dom0)."""
    mem_kib = _meminfo().get("MemTotal", 0)
    cpu_s = 0.0
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        hz = os.sysconf("SC_CLK_TCK")
        cpu_s = sum(int(x) for i, x in enumerate(fields[:8]) if i != 3 and i != 4) / hz
    except (OSError, ValueError):
        pass
    n = os.cpu_count() or 1
    return {"domid": 0, "name": "Domain-0", "config": {"name": "Domain-0"},
            "status": {"state": "running", "running": True, "blocked": False,
                       "paused": False, "memory_mib": mem_kib // 1024,
                       "vcpus": [{"id": i, "online": True, "blocked": False,
                                  "cpu_time_ns": int(cpu_s * 1e9 / n)} for i in range(n)],
                       "cpu_time_ns": int(cpu_s * 1e9), "start_time": _boot_time()}}


def host_facts(daemon: Pyxend) -> dict:
    """``xl info``'s fields (:class:`~pyxen.toolstack.xlformat.HostInfo`) plus pyxend's own."""
    from dataclasses import asdict

    from pyxen.toolstack.xlformat import gather_host_info
    from pyxen.xen.domain import XEN_VERSION
    from pyxen.xen.hypercalls.version import EXTRAVERSION
    info = gather_host_info(xen_version=(XEN_VERSION[0], XEN_VERSION[1], EXTRAVERSION.decode()),
                            xenstored_socket=daemon.paths.xenstored_socket,
                            guest_memory_mib=daemon.guest_memory_mib(),
                            pyxend_socket=daemon.paths.socket)
    return {**asdict(info), "pyxend_pid": os.getpid(), "domains": len(daemon.domains)}


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _boot_time() -> float:
    try:
        with open("/proc/uptime") as f:
            return time.time() - float(f.read().split()[0])
    except (OSError, ValueError):
        return time.time()


def _answers(path: str) -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyxend", description="pyxen's toolstack daemon")
    ap.add_argument("--listen", metavar="HOST:PORT",
                    help="serve the API on TCP instead of the unix socket (opt-in)")
    ap.add_argument("--relocation", metavar="HOST:PORT",
                    default=os.environ.get("PYXEN_RELOCATION"),
                    help="accept live migrations on this TCP address (default: off; "
                         "env PYXEN_RELOCATION; the port defaults to 8002)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    import uvicorn
    paths = Paths.from_env()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s pyxend[%(process)d] %(levelname)s %(message)s")
    if _answers(paths.socket):
        print(f"pyxend: already running on {paths.socket}", file=sys.stderr)
        return 1
    try:
        daemon = Pyxend(paths)
    except ToolstackError as e:
        print(f"pyxend: {e}", file=sys.stderr)
        return 1
    if args.relocation:
        rhost, _, rport = args.relocation.rpartition(":")
        try:
            daemon.serve_relocation(rhost or "0.0.0.0", int(rport or 8002))
        except (OSError, ValueError) as e:
            print(f"pyxend: relocation service on {args.relocation}: {e}", file=sys.stderr)
            return 1
    app = make_app(daemon)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        uvicorn.run(app, host=host or "127.0.0.1", port=int(port), log_level="warning")
    else:
        if os.path.exists(paths.socket):
            os.unlink(paths.socket)
        sockdir = os.path.dirname(paths.socket)
        os.makedirs(sockdir, exist_ok=True)
        os.chmod(sockdir, 0o700)            # the API is root's: uvicorn makes the socket 0666
        uvicorn.run(app, uds=paths.socket, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
