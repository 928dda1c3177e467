"""xl-compatible subcommands: ``create``, ``list``, ``console``, ``shutdown``, ``reboot``,
``destroy``, ``pause``, ``unpause``, ``rename``, ``domid``, ``domname``, ``uptime``, ``info``,
``dmesg``, ``vcpu-list``, ``block-attach``, ``block-detach``, ``block-list``,
``network-attach``, ``network-detach``, ``network-list``, ``save``, ``restore``,
``migrate``. They talk only
to pyxend's API (:mod:`pyxen.cli.apiclient`); the console attaches to the socket pyxend names
for the domain, as xl's console opens the pty named in xenstore.

``create`` parses the xl.cfg file here, so a configuration error is reported as
``file:line: message`` before anything reaches the daemon. Relative ``kernel``/``ramdisk``
paths are tried against the current directory (xl's rule), then the configuration file's
directory, then pyxen's image store (``$PYXEN_CACHE_DIR/images``), where ``debian/vmlinuz``
and ``debian/initrd.img`` name the default Debian image (fetched on first use).

Disks: ``disk = [...]`` entries go to pyxend as spec strings with the configuration file's
directory (relative targets are resolved there) and their ``file:line``; pyxend checks them
(a missing image is ``file:line: disk spec '...': img: no such file``). ``block-attach DOM
SPEC...`` joins its spec arguments with commas (xl parses them as one spec) and resolves a
relative target against the current directory.

Networks: ``vif = [...]`` entries go to pyxend as spec strings with their ``file:line``
(devid = position in the list); ``network-attach DOM ITEM...`` joins its items with commas;
``network-detach DOM DEVID|MAC``; ``network-list`` prints xl's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import socket
import sys
import time

from pyxen.cli.apiclient import ApiClient, connect
from pyxen.errors import ConfigError, ToolstackError
from pyxen.toolstack.registry import CONFIG_KEYS

DETACH = b"\x1d"                       # Ctrl-]
WAIT_POLL = 0.2
EOF_GRACE = 1.0                        # s of console silence after stdin's EOF before leaving


# ----------------------------------------------------------------------------- create

def resolve_image_path(path: str | None, cfg_dir: str, key: str) -> str | None:
    """Absolute path for a ``kernel``/``ramdisk`` value (rules in the module docstring)."""
    if path is None or os.path.isabs(path):
        return path
    for base in (os.getcwd(), cfg_dir):
        cand = os.path.join(base, path)
        if os.path.exists(cand):
            return os.path.abspath(cand)
    from pyxen.image.build import STABLE_NAME, images_dir
    store = images_dir()
    if path.split("/", 1)[0] == STABLE_NAME and not os.path.exists(store / path):
        from pyxen.image.build import ensure_image, publish
        print("pyxen: fetching the default Debian image (first use)", file=sys.stderr)
        publish(ensure_image(progress=lambda m: print(f"pyxen: {m}", file=sys.stderr)))
    cand = store / path
    if cand.exists():
        return str(cand)
    raise ConfigError(f"{path}: not found (looked in {os.getcwd()}, {cfg_dir} and {store})",
                      key)


def cmd_create(args: argparse.Namespace) -> int:
    from pyxen.toolstack.xlcfg import apply_overrides, domain_config, parse
    path = args.config
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read configuration: {e.strerror}", path) from None
    cfg = parse(text, path)
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    spec = domain_config(cfg)
    for w in spec.warnings:
        if not args.quiet:
            print(f"pyxen: warning: {w}", file=sys.stderr)
    cfg_dir = os.path.dirname(os.path.abspath(path))
    if spec.kernel is None:
        raise ConfigError("kernel must be specified for a PVH domain", f"{path}:kernel")
    kernel = resolve_image_path(spec.kernel, cfg_dir, spec.where("kernel"))
    ramdisk = resolve_image_path(spec.ramdisk, cfg_dir, spec.where("ramdisk"))
    config = {k: v for k, v in dataclasses.asdict(spec).items() if k in CONFIG_KEYS}
    config.update(kernel=kernel, ramdisk=ramdisk)
    disks = [{"spec": d, "cwd": cfg_dir, "where": spec.sources.get("disk")}
             for d in spec.disk]
    nics = [{"spec": v, "where": spec.sources.get("vif")} for v in spec.vif]
    if args.dry_run:
        shown = dict(config)
        if disks:
            shown["disk"] = list(spec.disk)
        if nics:
            shown["vif"] = list(spec.vif)
        print(json.dumps(shown, indent=4))
        return 0
    api = connect()
    res = api.post("/domains", {"config": config, "paused": args.paused, "disks": disks,
                                "nics": nics})
    assert isinstance(res, dict)
    if not args.quiet:
        print(f"Parsing config from {path}", file=sys.stderr)
        print(f"pyxen: domain {res['name']} created (id {res['domid']})"
              f"{', paused' if args.paused else ''}", file=sys.stderr)
    if args.console:
        return _console(api, res["domid"])
    if args.foreground:
        _wait_gone(api, res["name"], by_name=True)
    return 0


# ----------------------------------------------------------------------------- list & co

def _domains(api: ApiClient, doms: list[str] | None) -> list[dict]:
    if doms:
        return [_get(api, d) for d in doms]
    res = api.get("/domains")
    assert isinstance(res, list)
    return res


def _get(api: ApiClient, dom: str | int) -> dict:
    res = api.get(f"/domains/{api.dom(dom)}")
    assert isinstance(res, dict)
    return res


def cmd_list(args: argparse.Namespace) -> int:
    from pyxen.toolstack.xllist import ListRow, format_xl_list
    api = connect()
    doms = _domains(api, args.domains)
    if args.long:
        from pyxen.toolstack.xlformat import format_list_long
        sys.stdout.write(format_list_long([_long_entry(d) for d in doms if d["domid"] != 0]))
        return 0
    rows = []
    for d in doms:
        st = d.get("status", {})
        state = st.get("state")
        rows.append(ListRow.from_ns(
            d["name"], d["domid"], st.get("memory_mib", 0),
            sum(1 for v in st.get("vcpus", []) if v.get("online")), st.get("cpu_time_ns", 0),
            running=bool(st.get("running")), blocked=bool(st.get("blocked")),
            paused=state == "paused", shutdown=state == "shutdown",
            dying=state == "dying", shutdown_reason=st.get("reason_code")))
    sys.stdout.write(format_xl_list(rows))
    return 0


def _long_entry(d: dict) -> dict:
    from pyxen.toolstack.xlformat import libxl_device_disk, libxl_device_nic
    c = d.get("config", {})
    return {"domid": d["domid"], "name": d["name"], "uuid": d.get("uuid"), "type": "pvh",
            "memory_kib": c.get("memory", 0) * 1024, "maxmem_kib": c.get("maxmem", 0) * 1024,
            "vcpus": c.get("vcpus", 1), "maxvcpus": c.get("maxvcpus", 1),
            "kernel": c.get("kernel"), "ramdisk": c.get("ramdisk"),
            "cmdline": c.get("cmdline"), "on_poweroff": c.get("on_poweroff"),
            "on_reboot": c.get("on_reboot"), "on_crash": c.get("on_crash"),
            "disks": [libxl_device_disk(x) for x in d.get("disks", [])],
            "nics": [libxl_device_nic(x) for x in d.get("nics", [])]}


def cmd_domid(args: argparse.Namespace) -> int:
    d = _get(connect(), args.name)
    if d["name"] != args.name:
        raise ToolstackError(f"domain {args.name!r} does not exist", 404)
    print(d["domid"])
    return 0


def cmd_domname(args: argparse.Namespace) -> int:
    if not args.domid.isdigit():
        raise ToolstackError(f"{args.domid!r} is not a domain ID", 400)
    print(_get(connect(), args.domid)["name"])
    return 0


def cmd_uptime(args: argparse.Namespace) -> int:
    from pyxen.toolstack.xlformat import format_uptime
    now = time.time()
    rows = [(d["name"], d["domid"], max(0.0, now - d.get("status", {}).get("start_time", now)))
            for d in _domains(connect(), args.domains)]
    sys.stdout.write(format_uptime(rows, short=args.short))
    return 0


def cmd_vcpu_list(args: argparse.Namespace) -> int:
    from pyxen.toolstack.xlformat import VcpuRow, format_vcpu_list, vcpu_state
    rows = []
    ncpu = os.cpu_count() or 1
    for d in _domains(connect(), args.domains):
        st = d.get("status", {})
        running = st.get("state") == "running"         # a paused domain's vCPUs: neither
        for v in st.get("vcpus", []):
            online = bool(v.get("online"))
            blocked = running and bool(v.get("blocked"))
            rows.append(VcpuRow.from_ns(
                d["name"], d["domid"], v["id"], (v["id"] % ncpu) if online else None,
                vcpu_state(online=online, running=running and not blocked, blocked=blocked),
                v.get("cpu_time_ns", 0)))
    sys.stdout.write(format_vcpu_list(rows))
    return 0


def cmd_info(_args: argparse.Namespace) -> int:
    from pyxen.toolstack.xlformat import HostInfo, format_info
    info = connect().get("/info")
    assert isinstance(info, dict)
    fields = {k: info[k] for k in HostInfo.__dataclass_fields__ if k in info}
    fields["hw_caps"] = tuple(fields.get("hw_caps", ()))
    sys.stdout.write(format_info(HostInfo(**fields)))
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
    res = connect().get(f"/dmesg?clear={'true' if args.clear else 'false'}")
    assert isinstance(res, dict)
    for line in res["lines"]:
        print(line)
    return 0


# ----------------------------------------------------------------------------- lifecycle

def _targets(api: ApiClient, args: argparse.Namespace) -> list[dict]:
    if getattr(args, "all", False):
        return [d for d in _domains(api, None) if d["domid"] != 0]
    if not args.domain:
        raise ToolstackError("a domain is required (or -a for all)", 400)
    return [_get(api, args.domain)]


def _shutdown(args: argparse.Namespace, reason: str) -> int:
    api = connect()
    targets = _targets(api, args)
    for d in targets:
        api.post(f"/domains/{d['domid']}/{'reboot' if reason == 'reboot' else 'shutdown'}",
                 {"fallback": args.fallback, "timeout": args.timeout})
    if args.wait:
        for d in targets:
            print(f"Waiting for domain {d['name']} ({d['domid']}) to die [pid {os.getpid()}]",
                  file=sys.stderr)
            _wait_gone(api, d["domid"])
            print(f"Domain {d['domid']} has been shut down, reason code "
                  f"{0 if reason == 'poweroff' else 1}", file=sys.stderr)
        if len(targets) > 1:
            print("All domains have been shut down", file=sys.stderr)
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    return _shutdown(args, "poweroff")


def cmd_reboot(args: argparse.Namespace) -> int:
    return _shutdown(args, "reboot")


def _wait_gone(api: ApiClient, dom: str | int, by_name: bool = False) -> None:
    while True:
        try:
            d = _get(api, dom)
            if by_name and d["name"] != dom:
                return
        except ToolstackError as e:
            if e.status == 404:
                return
            raise
        time.sleep(WAIT_POLL)


def cmd_destroy(args: argparse.Namespace) -> int:
    api = connect()
    api.delete(f"/domains/{api.dom(args.domain)}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    api = connect()
    api.post(f"/domains/{api.dom(args.domain)}/pause")
    return 0


def cmd_unpause(args: argparse.Namespace) -> int:
    api = connect()
    api.post(f"/domains/{api.dom(args.domain)}/unpause")
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    api = connect()
    api.post(f"/domains/{api.dom(args.domain)}/rename", {"name": args.new_name})
    return 0


# ----------------------------------------------------------------------------- save, migrate

def cmd_save(args: argparse.Namespace) -> int:
    api = connect()
    out = api.post(f"/domains/{api.dom(args.domain)}/save",
                   {"path": os.path.abspath(args.file), "keep": args.keep,
                    "paused": args.paused, "mode": args.mode})
    assert isinstance(out, dict)
    print(f"Saved {args.domain} to {args.file}: {out.get('bytes_sent', 0) / (1 << 20):.1f} "
          f"MiB, {out.get('pages_sent', 0)} pages ({out.get('zero_pages', 0)} zero), "
          f"paused {out.get('pause_ms')} ms, {out.get('total_ms')} ms in all",
          file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    api = connect()
    out = api.post("/restore", {"path": os.path.abspath(args.file), "paused": args.paused})
    assert isinstance(out, dict)
    print(f"Restored {out['name']} as domain {out['domid']}", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """xl migrate: live-migrate, showing rounds, pages, rate and ETA while it runs."""
    import threading
    api = connect()
    dom = api.dom(args.domain)
    host, port = args.host, args.port
    if ":" in host and port is None and host.count(":") == 1:
        host, _, p = host.partition(":")
        port = int(p)
    result: dict = {}

    def run() -> None:
        try:
            result["out"] = api.post(f"/domains/{dom}/migrate", {
                "host": host, "port": port, "copy_storage": args.copy_storage,
                "mode": args.mode})
        except BaseException as e:               # shown by the main thread
            result["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    from rich.console import Console
    console = Console(stderr=True)
    with console.status(f"migrating {args.domain} to {host}") as status:
        while t.is_alive():
            t.join(0.25)
            if not t.is_alive() or args.quiet:
                continue
            try:
                st = api.get(f"/domains/{dom}/migrate")
            except ToolstackError:
                continue
            if isinstance(st, dict) and st.get("phase"):
                status.update(_progress_line(args.domain, host, st))
    if "error" in result:
        raise result["error"]
    out = result["out"]
    assert isinstance(out, dict)
    mib = out.get("bytes_sent", 0) / (1 << 20)
    print(f"Migrated {args.domain} to {host}: {out.get('total_ms')} ms in all, paused "
          f"{out.get('pause_ms')} ms, {mib:.1f} MiB sent in {out.get('rounds')} rounds "
          f"({out.get('pages_sent')} pages; dirty per round {out.get('dirty_history')})",
          file=sys.stderr)
    steps = out.get("pause_steps_ms") or {}
    if steps:
        print("Pause: " + ", ".join(f"{k} {v:g} ms" for k, v in steps.items()), file=sys.stderr)
    return 0


MODE_HELP = ("transparent (default): pyxen stops the guest, which never notices; suspend: "
             "the guest suspends itself (Xen's control/shutdown = suspend) and resumes in a "
             "new domain, reconnecting its devices")


def _progress_line(name: str, host: str, st: dict) -> str:
    pages, total = st.get("pages", 0), st.get("total_pages") or 0
    eta = st.get("eta_s")
    return (f"{name} -> {host}: {st.get('phase')} round {st.get('round', 0)}, "
            f"{pages}/{total} pages sent, {st.get('dirty', '?')} dirty, "
            f"{st.get('rate_mib_s', 0)} MiB/s" + (f", ETA {eta:.2f} s" if eta else ""))


# ----------------------------------------------------------------------------- disks

def cmd_block_attach(args: argparse.Namespace) -> int:
    api = connect()
    api.post(f"/domains/{api.dom(args.domain)}/disks",
             {"spec": ",".join(args.spec), "cwd": os.getcwd()})
    return 0


def _detach(args: argparse.Namespace, kind: str, what: str) -> int:
    """block-detach / network-detach: remove the device, warning if the guest did not let go
    of it in time (the toolstack removes it anyway, as xl does after its timeout)."""
    api = connect()
    force = "true" if args.force else "false"
    res = api.delete(f"/domains/{api.dom(args.domain)}/{kind}/{api.dom(args.device)}"
                     f"?force={force}&timeout={args.timeout:g}")
    if isinstance(res, dict) and not res.get("clean", True) and not args.force:
        print(f"pyxen: warning: the guest did not release {what}{args.device} within "
              f"{args.timeout:g} s; it was removed anyway", file=sys.stderr)
    return 0


def _device_list(args: argparse.Namespace, kind: str, header: str, fmt) -> int:  # type: ignore[no-untyped-def]
    """block-list / network-list: xl's table for each domain (dom0 has no devices)."""
    api = connect()
    sys.stdout.write(header)
    for dom in args.domains:
        if dom in ("0", "Domain-0"):
            continue
        try:
            rows = api.get(f"/domains/{api.dom(dom)}/{kind}")
        except ToolstackError as e:
            if e.status not in (400, 404):
                raise
            print(f"{dom} is an invalid domain identifier", file=sys.stderr)
            continue
        assert isinstance(rows, list)
        sys.stdout.write(fmt(rows)[len(header):])
    sys.stdout.flush()
    return 0


def cmd_block_detach(args: argparse.Namespace) -> int:
    return _detach(args, "disks", "")


def cmd_block_list(args: argparse.Namespace) -> int:
    from pyxen.toolstack.xlformat import BLOCK_LIST_HEADER, format_block_list
    return _device_list(args, "disks", BLOCK_LIST_HEADER, format_block_list)


# ----------------------------------------------------------------------------- networks

def cmd_network_attach(args: argparse.Namespace) -> int:
    api = connect()
    api.post(f"/domains/{api.dom(args.domain)}/nics", {"spec": ",".join(args.spec)})
    return 0


def cmd_network_detach(args: argparse.Namespace) -> int:
    return _detach(args, "nics", "NIC ")


def cmd_network_list(args: argparse.Namespace) -> int:
    from pyxen.toolstack.xlformat import NETWORK_LIST_HEADER, format_network_list
    return _device_list(args, "nics", NETWORK_LIST_HEADER, format_network_list)


# ----------------------------------------------------------------------------- console

def cmd_console(args: argparse.Namespace) -> int:
    api = connect()
    return _console(api, _get(api, args.domain)["domid"])


def _console(api: ApiClient, domid: int) -> int:
    """Attach stdin/stdout to the domain's console until Ctrl-] or the domain goes away."""
    from pyxen.vmm.run import raw_terminal
    d = _get(api, domid)
    path = d.get("console")
    if not path:
        raise ToolstackError(f"domain {d['name']!r} has no console", 409)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        raise ToolstackError(f"console of {d['name']!r} ({path}): {e.strerror}", 409) from None
    fd_in, out = sys.stdin.fileno(), sys.stdout.buffer
    tty = os.isatty(fd_in)
    if tty:
        print(f"pyxen: console of {d['name']} ({domid}); Ctrl-] detaches", file=sys.stderr)
    stdin_open = True
    with raw_terminal(fd_in):
        while True:
            rl = [s] + ([fd_in] if stdin_open else [])
            r, _, _ = select.select(rl, [], [], None if stdin_open else EOF_GRACE)
            if not r:
                break                            # input ended and the guest went quiet
            if s in r:
                data = s.recv(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
            if stdin_open and fd_in in r:
                data = os.read(fd_in, 4096)
                if not data:
                    stdin_open = False           # show the answer, then leave when quiet
                    continue
                if DETACH in data:
                    data = data[:data.index(DETACH)]
                    if data:
                        s.sendall(data)
                    break
                s.sendall(data)
    s.close()
    return 0


# ----------------------------------------------------------------------------- parsers

def register(sub: argparse._SubParsersAction) -> None:
    """Add the xl subcommands to ``pyxen``'s parser."""
    c = sub.add_parser("create", help="create a domain from an xl.cfg file")
    c.add_argument("config", metavar="CFG")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("-c", dest="console", action="store_true", help="attach the console")
    c.add_argument("-p", dest="paused", action="store_true", help="leave it paused")
    c.add_argument("-F", dest="foreground", action="store_true",
                   help="stay in the foreground until the domain is gone")
    c.add_argument("-q", dest="quiet", action="store_true")
    c.add_argument("-n", dest="dry_run", action="store_true",
                   help="parse the configuration and print it; create nothing")
    c.set_defaults(func=cmd_create)

    li = sub.add_parser("list", help="list domains (xl list)")
    li.add_argument("-l", "--long", action="store_true", help="JSON configurations")
    li.add_argument("domains", nargs="*")
    li.set_defaults(func=cmd_list)

    co = sub.add_parser("console", help="attach to a domain's console (Ctrl-] detaches)")
    co.add_argument("domain")
    co.set_defaults(func=cmd_console)

    for name, fn, what in (("shutdown", cmd_shutdown, "power off"),
                           ("reboot", cmd_reboot, "reboot")):
        p = sub.add_parser(name, help=f"ask a domain to {what} (through xenstore)")
        p.add_argument("domain", nargs="?")
        p.add_argument("-a", "--all", action="store_true", help="every domain")
        p.add_argument("-w", "--wait", action="store_true", help="wait until it is gone")
        p.add_argument("-F", dest="fallback", action="store_true",
                       help="force it if the guest has no PV control or does not react")
        p.add_argument("--timeout", type=float, default=60.0,
                       help="seconds before -F forces it (default 60)")
        p.set_defaults(func=fn)

    for name, fn, what in (("destroy", cmd_destroy, "destroy a domain at once"),
                           ("pause", cmd_pause, "pause a domain"),
                           ("unpause", cmd_unpause, "unpause a domain")):
        p = sub.add_parser(name, help=what)
        p.add_argument("domain")
        p.set_defaults(func=fn)

    sv = sub.add_parser("save", help="save a domain to a file (destroys it unless -c)")
    sv.add_argument("-c", dest="keep", action="store_true",
                    help="leave the domain running after saving it")
    sv.add_argument("-p", dest="paused", action="store_true",
                    help="with -c: leave it paused")
    sv.add_argument("--mode", choices=("transparent", "suspend"), default="transparent",
                    help=MODE_HELP)
    sv.add_argument("domain")
    sv.add_argument("file")
    sv.set_defaults(func=cmd_save)

    rs = sub.add_parser("restore", help="restore a domain from a file written by save")
    rs.add_argument("-p", dest="paused", action="store_true", help="leave it paused")
    rs.add_argument("file")
    rs.set_defaults(func=cmd_restore)

    mg = sub.add_parser("migrate", help="live-migrate a domain to another host's pyxend "
                        "(its relocation service, pyxend --relocation)")
    mg.add_argument("--port", type=int, default=None, help="relocation port (default 8002)")
    mg.add_argument("-q", dest="quiet", action="store_true", help="no progress display")
    mg.add_argument("--copy-storage", action="store_true",
                    help="send the disk images too (hosts without shared storage); the "
                         "target keeps them in its state directory")
    mg.add_argument("--mode", choices=("transparent", "suspend"), default="transparent",
                    help=MODE_HELP)
    mg.add_argument("domain")
    mg.add_argument("host", help="HOST or HOST:PORT")
    mg.set_defaults(func=cmd_migrate)

    r = sub.add_parser("rename", help="rename a domain")
    r.add_argument("domain")
    r.add_argument("new_name")
    r.set_defaults(func=cmd_rename)

    p = sub.add_parser("domid", help="the ID of a domain name")
    p.add_argument("name")
    p.set_defaults(func=cmd_domid)
    p = sub.add_parser("domname", help="the name of a domain ID")
    p.add_argument("domid")
    p.set_defaults(func=cmd_domname)

    u = sub.add_parser("uptime", help="domain uptimes")
    u.add_argument("-s", dest="short", action="store_true", help="short format")
    u.add_argument("domains", nargs="*")
    u.set_defaults(func=cmd_uptime)

    sub.add_parser("info", help="host and toolstack facts").set_defaults(func=cmd_info)

    dm = sub.add_parser("dmesg", help="the hypervisor's message ring")
    dm.add_argument("-c", dest="clear", action="store_true", help="clear it after reading")
    dm.set_defaults(func=cmd_dmesg)

    v = sub.add_parser("vcpu-list", help="vCPUs of domains")
    v.add_argument("domains", nargs="*")
    v.set_defaults(func=cmd_vcpu_list)

    b = sub.add_parser("block-attach", help="hot-plug a disk into a domain (xl disk spec)")
    b.add_argument("domain")
    b.add_argument("spec", nargs="+", metavar="DISK-SPEC-COMPONENT",
                   help="e.g. img.raw,raw,xvdc,rw (several arguments are joined with commas)")
    b.set_defaults(func=cmd_block_attach)
    b = sub.add_parser("block-detach", help="unplug a disk (by vdev or device number)")
    b.add_argument("-f", "--force", action="store_true",
                   help="remove it without waiting for the guest to release it")
    b.add_argument("--timeout", type=float, default=10.0,
                   help="seconds the guest has to release it (default 10)")
    b.add_argument("domain")
    b.add_argument("device", metavar="DEVID", help="xvdc or 51744")
    b.set_defaults(func=cmd_block_detach)
    b = sub.add_parser("block-list", help="list the disks of domains")
    b.add_argument("domains", nargs="+")
    b.set_defaults(func=cmd_block_list)

    n = sub.add_parser("network-attach", help="hot-plug a NIC into a domain (xl vif spec)")
    n.add_argument("domain")
    n.add_argument("spec", nargs="*", metavar="VIF-SPEC-ITEM",
                   help="e.g. bridge=pyxenbr0 mac=00:16:3e:01:02:03 (joined with commas; "
                        "none: all defaults)")
    n.set_defaults(func=cmd_network_attach)
    n = sub.add_parser("network-detach", help="unplug a NIC (by devid or MAC)")
    n.add_argument("-f", "--force", action="store_true",
                   help="remove it without waiting for the guest to release it")
    n.add_argument("--timeout", type=float, default=10.0,
                   help="seconds the guest has to release it (default 10)")
    n.add_argument("domain")
    n.add_argument("device", metavar="DEVID|MAC")
    n.set_defaults(func=cmd_network_detach)
    n = sub.add_parser("network-list", help="list the NICs of domains")
    n.add_argument("domains", nargs="+")
    n.set_defaults(func=cmd_network_list)
