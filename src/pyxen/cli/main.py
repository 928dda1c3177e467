"""The ``pyxen`` command line. Errors are turned into messages here, once.

Subcommands so far:

* ``pyxen selftest [--accel kvm] [--all] [-v]`` — build and boot every test guest, print a
  PASS/FAIL table, exit 0 when all pass ("can this host run pyxen?").
* ``pyxen boot KERNEL [--initrd F] [--cmdline S] [--memory MiB] [--vcpus N] [--accel A]`` —
  boot a PVH kernel, stream its consoles, exit with a status derived from its shutdown reason.
* ``pyxen run [--vcpus N] [--memory MiB] [--kernel K --initrd I] [--accel A] [-- COMMAND...]`` —
  boot a throwaway domain from the default Debian image, run COMMAND in its shell, exit with
  COMMAND's status; without a command, an interactive shell on hvc0 (Ctrl-] ends it).
* ``pyxen image [--refresh]`` — fetch Debian's cloud kernel and busybox and build the image.
* ``pyxen xenstored [--socket PATH] [--state FILE]`` — run xenstored in the foreground.
* xl's domain commands (``create``, ``list``, ``console``, ``shutdown``, ``reboot``,
  ``destroy``, ``pause``, ``unpause``, ``rename``, ``domid``, ``domname``, ``uptime``, ``info``,
  ``dmesg``, ``vcpu-list``): :mod:`pyxen.cli.xl`, through pyxend's API.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import logging
import sys

from pyxen.errors import ConfigError, PyxenError

EXIT_BY_REASON = {"poweroff": 0, "reboot": 2, "suspend": 3, "crash": 4, "watchdog": 5,
                  "soft_reset": 6, "timeout": 124}


def cmd_selftest(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pyxen.testing.guests import (SHUTDOWN_REASONS, SUITE, available, build_guests,
                                      run_guest)

    out = Console()
    elf_dir = build_guests()
    specs = available(SUITE + (SHUTDOWN_REASONS if args.all else ()))
    if args.only:
        specs = tuple(s for s in specs if s.name in args.only)
    table = Table(title=f"pyxen selftest (accel={args.accel})")
    for col in ("guest", "vcpus", "result", "checks", "ended", "time"):
        table.add_column(col)
    all_ok = True
    for spec in specs:
        label = spec.name if spec.name != "sched" else f"sched ({spec.reason})"
        try:
            r = run_guest(spec, elf_dir, accel=args.accel)
        except PyxenError as e:
            all_ok = False
            table.add_row(label, str(spec.vcpus), "[red]FAIL[/red]", "-", "-", str(e))
            continue
        all_ok &= r.passed
        verdict = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(label, str(spec.vcpus), verdict, str(r.checks), r.reason,
                      f"{r.seconds:.2f}s")
        if not r.passed or args.verbose:
            out.print(f"--- {label}: {r.summary}")
            for line in (r.debug.splitlines() if args.verbose else r.failures):
                out.print("   ", line, markup=False, highlight=False)
    out.print(table)
    out.print("[green]all guests passed[/green]" if all_ok else "[red]some guests failed[/red]")
    return 0 if all_ok else 1


def cmd_boot(args: argparse.Namespace) -> int:
    from pyxen.vmm.builder import DomainConfig, build

    def stream(channel: str, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    cfg = DomainConfig(kernel=args.kernel, name=args.name, memory=args.memory,
                       vcpus=args.vcpus, cmdline=args.cmdline, accel=args.accel,
                       modules=[(args.initrd, "")] if args.initrd else [])
    vmm = build(cfg, stream=stream)
    vmm.start()
    try:
        state = vmm.wait(args.timeout)
    except KeyboardInterrupt:
        state = None
    finally:
        vmm.destroy()
    reason = "timeout" if state is None else state.reason
    print(f"\n[pyxen] domain {args.name} ended: {reason}"
          f"{' (' + state.detail + ')' if state and state.detail else ''}", file=sys.stderr)
    return EXIT_BY_REASON.get(reason, 1)


def _progress(msg: str) -> None:
    print(f"pyxen: {msg}", file=sys.stderr)


def cmd_image(args: argparse.Namespace) -> int:
    from pyxen.image.build import ensure_image, publish
    img = ensure_image(progress=_progress, refresh=args.refresh)
    links = publish(img)
    print(f"kernel   {img.kernel}\ninitrd   {img.initramfs}\nrelease  {img.release}\n"
          f"stable   {links['vmlinuz']}  {links['initrd.img']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pyxen.vmm.run import RunOptions, raw_terminal, run

    command = " ".join(args.argv) if args.argv else None
    if args.initrd and not args.kernel:
        raise ConfigError("--initrd needs --kernel", "initrd")
    from pyxen.toolstack.xldisk import disk_config, parse_disk_spec
    from pyxen.toolstack.xlvif import nic_config, parse_vif_spec
    disks = [disk_config(parse_disk_spec(d)) for d in args.disk]
    nics = [nic_config(parse_vif_spec(v), i) for i, v in enumerate(args.vif)]
    # throwaway domains all have domid 1: name their TAPs by process, not vif<domid>.<n>
    nics = [n if n.vifname else dataclasses.replace(n, vifname=f"vr{os.getpid()}.{n.devid}")
            for n in nics]
    opts = RunOptions(command=command, vcpus=args.vcpus, memory=args.memory,
                      kernel=args.kernel, initrd=args.initrd, accel=args.accel,
                      cmdline=args.cmdline, timeout=args.timeout, disks=disks,
                      nics=nics)
    from pyxen.vmm.builder import hardware_virtualisation
    if args.accel == "kvm" and not hardware_virtualisation():
        print("pyxen: warning: this CPU has no VT-x/AMD-V, so KVM interprets guest kernel "
              "code and a stock kernel cannot boot on it; --accel tcg (or auto) can",
              file=sys.stderr)
    out = sys.stdout.buffer
    if command is None:
        print("pyxen: interactive shell on hvc0; Ctrl-] ends the session", file=sys.stderr)
        with raw_terminal(sys.stdin.fileno()):
            r = run(opts, out, _progress, stdin_fd=sys.stdin.fileno())
        return 0
    r = run(opts, out, _progress)
    if r.status is not None:
        return r.status
    why = f"the domain shut down ({r.reason}{': ' + r.detail if r.detail else ''})"
    tail = "\n".join(r.console_tail.splitlines()[-15:])
    print(f"pyxen: the command did not complete: {why}\n--- console tail ---\n{tail}",
          file=sys.stderr)
    return 1


def cmd_xenstored(args: argparse.Namespace) -> int:
    import signal

    from pyxen.xenstore.daemon import XenstoredDaemon
    d = XenstoredDaemon(args.socket, args.state)
    signal.signal(signal.SIGTERM, lambda *_: d.stop())
    print(f"pyxen: xenstored listening on {args.socket}"
          f"{' (state ' + args.state + ')' if args.state else ''}", file=sys.stderr)
    try:
        d.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyxen", description="Xen, rebuilt in Python on KVM")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("selftest", help="boot every test guest and report PASS/FAIL")
    s.add_argument("--accel", default="kvm", choices=["kvm", "tcg", "auto"])
    s.add_argument("--all", action="store_true", help="also every SCHEDOP_shutdown reason")
    s.add_argument("--only", nargs="*", help="only these guests")
    s.set_defaults(func=cmd_selftest)

    b = sub.add_parser("boot", help="boot a PVH kernel and stream its consoles")
    b.add_argument("kernel")
    b.add_argument("--initrd")
    b.add_argument("--cmdline", default="")
    b.add_argument("--memory", type=int, default=64, help="MiB")
    b.add_argument("--vcpus", type=int, default=1)
    b.add_argument("--accel", default="auto", choices=["kvm", "tcg", "auto"])
    b.add_argument("--name", default="domU")
    b.add_argument("--timeout", type=float, default=None, help="seconds")
    b.set_defaults(func=cmd_boot)

    r = sub.add_parser("run", help="run a command in a throwaway Linux domain",
                       description="Boot Debian's cloud kernel as a PVH domain, run COMMAND "
                       "(after --) in its shell and exit with its status. Without a command, "
                       "attach an interactive shell on hvc0 (Ctrl-] ends it).")
    r.add_argument("--vcpus", type=int, default=1)
    r.add_argument("--memory", type=int, default=256, help="MiB (default 256)")
    r.add_argument("--kernel", help="a PVH kernel instead of the default image's")
    r.add_argument("--initrd", help="an initramfs to use with --kernel")
    r.add_argument("--accel", default="auto", choices=["kvm", "tcg", "auto"])
    r.add_argument("--cmdline", default="", help="extra kernel command line")
    r.add_argument("--timeout", type=float, default=None, help="seconds")
    r.add_argument("--disk", action="append", default=[], metavar="SPEC",
                   help="a virtual disk, as xl's disk spec (e.g. img.raw,raw,xvdb,rw); "
                        "repeatable")
    r.add_argument("--vif", action="append", default=[], metavar="SPEC",
                   help="a virtual NIC, as xl's vif spec (e.g. bridge=pyxenbr0,mac=...); "
                        "the guest sees eth0, eth1...; repeatable")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the command to run in the guest's shell")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("image", help="fetch and build the default guest image")
    i.add_argument("--refresh", action="store_true", help="check Debian for a newer kernel")
    i.set_defaults(func=cmd_image)

    from pyxen.xenstore.daemon import DEFAULT_SOCKET
    x = sub.add_parser("xenstored", help="run xenstored (unix socket, foreground)")
    x.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    x.add_argument("--state", help="JSON snapshot kept across restarts")
    x.set_defaults(func=cmd_xenstored)

    from pyxen.cli import xl
    xl.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PyxenError as e:
        print(f"pyxen: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
