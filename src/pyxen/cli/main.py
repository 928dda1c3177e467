"""The ``pyxen`` command line. Errors are turned into messages here, once.

Subcommands so far:

* ``pyxen selftest [--accel kvm] [--all] [-v]`` — build and boot every test guest, print a
  PASS/FAIL table, exit 0 when all pass ("can this host run pyxen?").
* ``pyxen boot KERNEL [--initrd F] [--cmdline S] [--memory MiB] [--vcpus N] [--accel A]`` —
  boot a PVH kernel, stream its consoles, exit with a status derived from its shutdown reason.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pyxen.errors import PyxenError

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PyxenError as e:
        print(f"pyxen: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
