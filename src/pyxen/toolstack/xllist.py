"""``xl list`` output, byte for byte (tools/xl/xl_info.c ``list_domains``).

Header: ``"Name" + 40 spaces + "ID   Mem VCPUs\\tState\\tTime(s)"``. Each row is
``printf("%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f", name, domid, mem_mib, vcpus_online,
r, b, p, s, reason, d, (float)cpu_time_ns / 1e9)``: names are padded, never truncated; the
fifth state letter is the shutdown *reason* from ``"-rscwS"`` (poweroff or not shut down
``-``, reboot ``r``, suspend ``s``, crash ``c``, watchdog ``w``, soft_reset ``S``, ``?``
beyond). Mem is (current + outstanding) KiB / 1024, which the caller supplies as ``mem_mib``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

__all__ = ["HEADER", "ListRow", "SHUTDOWN_REASON_LETTERS", "format_row", "format_xl_list",
           "state_letters"]

HEADER = "Name" + " " * 40 + "ID   Mem VCPUs\tState\tTime(s)"

#: SHUTDOWN_poweroff=0, reboot=1, suspend=2, crash=3, watchdog=4, soft_reset=5 (sched.h)
SHUTDOWN_REASON_LETTERS = "-rscwS"
SHUTDOWN_CRASH = 3


@dataclass(frozen=True)
class ListRow:
    """One domain as ``xl list`` shows it. ``crashed`` is shorthand for ``shutdown`` with
    reason crash (Xen sets both); ``shutdown_reason`` (a SHUTDOWN_* code) wins when given."""

    name: str
    domid: int
    mem_mib: int
    vcpus: int
    running: bool = False
    blocked: bool = False
    paused: bool = False
    shutdown: bool = False
    crashed: bool = False
    dying: bool = False
    cpu_time_s: float = 0.0
    shutdown_reason: int | None = None

    @classmethod
    def from_ns(cls, name: str, domid: int, mem_mib: int, vcpus: int, cpu_time_ns: int,
                **flags: bool | int | None) -> "ListRow":
        """A row from a hypervisor cpu_time in ns, rounded through a C ``float`` as xl does."""
        f32 = struct.unpack("f", struct.pack("f", float(cpu_time_ns)))[0]
        return cls(name, domid, mem_mib, vcpus, cpu_time_s=f32 / 1e9,
                   **flags)  # type: ignore[arg-type]


def state_letters(running: bool = False, blocked: bool = False, paused: bool = False,
                  shutdown: bool = False, crashed: bool = False, dying: bool = False,
                  shutdown_reason: int | None = None) -> str:
    """The six-character State column, e.g. ``"r-----"``, ``"--ps-d"``, ``"---sc-"``."""
    is_shutdown = shutdown or crashed
    if not is_shutdown:
        reason = 0
    elif shutdown_reason is not None:
        reason = shutdown_reason
    else:
        reason = SHUTDOWN_CRASH if crashed else 0
    letter = (SHUTDOWN_REASON_LETTERS[reason]
              if 0 <= reason < len(SHUTDOWN_REASON_LETTERS) else "?")
    return ("r" if running else "-") + ("b" if blocked else "-") + ("p" if paused else "-") \
        + ("s" if is_shutdown else "-") + letter + ("d" if dying else "-")


def format_row(row: ListRow) -> str:
    """One ``xl list`` line (no newline)."""
    state = state_letters(row.running, row.blocked, row.paused, row.shutdown, row.crashed,
                          row.dying, row.shutdown_reason)
    return (f"{row.name:<40} {row.domid:5d} {row.mem_mib:5d} {row.vcpus:5d}     "
            f"{state}  {row.cpu_time_s:8.1f}")


def format_xl_list(rows: Iterable[ListRow], long: bool = False) -> str:
    """The whole ``xl list`` output: header and one line per row, each ending in ``\\n``.

    ``long=True`` (``xl list -l``, the JSON domain configs) is not implemented yet and raises
    NotImplementedError.
    """
    if long:
        raise NotImplementedError("xl list -l (JSON domain configurations) is not implemented")
    return "".join(line + "\n" for line in [HEADER, *(format_row(r) for r in rows)])
