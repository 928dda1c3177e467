"""``pyxen run``: boot a throwaway domain from the default image, run one command, tear it down.

The command travels in a small overlay archive appended to the initramfs (``pyxen.image``);
its output streams from hvc0 with the exit marker removed, and its exit status is the marker's.
Without a command the guest's shell is attached interactively (Ctrl-] ends the session and
destroys the domain). Who calls: the CLI. Units: memory MiB, times seconds.
"""

from __future__ import annotations

import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from pyxen.errors import ConfigError
from pyxen.vmm.builder import DomainConfig, build
from pyxen.vmm.devices import DiskConfig, NicConfig

DETACH = 0x1D                    # Ctrl-], as xl console
#: kernel messages below KERN_EMERG stay in the guest's dmesg (panics still reach the console)
BASE_CMDLINE = "console=hvc0 quiet loglevel=1"


@dataclass
class RunOptions:
    command: str | None                      # None: interactive shell
    vcpus: int = 1
    memory: int = 256
    kernel: str | None = None
    initrd: str | None = None
    accel: str = "auto"
    cmdline: str = ""                        # appended to BASE_CMDLINE
    timeout: float | None = None
    modules: list[str] | None = field(default=None)   # frontend modules /init loads
    disks: list[DiskConfig] = field(default_factory=list)
    nics: list[NicConfig] = field(default_factory=list)


@dataclass
class RunResult:
    status: int | None                       # the command's exit status, if it finished
    reason: str                              # domain shutdown reason ("crash" if it hung)
    detail: str
    console_tail: str
    wall_s: float
    first_output_s: float | None             # run start -> first byte of command output


def _initrd_bytes(opts: RunOptions, mode: str, nonce: str,
                  progress: Callable[[str], None]) -> tuple[str, bytes]:
    from pyxen.image.build import ensure_image
    from pyxen.image.runspec import concat_initrd, make_overlay
    overlay = make_overlay(mode, opts.command or "", nonce, modules=opts.modules)
    if opts.kernel and opts.initrd:
        try:
            with open(opts.initrd, "rb") as f:
                base = f.read()
        except OSError as e:
            raise ConfigError(f"initrd {opts.initrd}: {e.strerror}", "initrd") from e
        return opts.kernel, concat_initrd(base, overlay)
    from pyxen.image.build import elf_kernel
    image = ensure_image(progress=progress)
    kernel = opts.kernel or str(elf_kernel(image))
    return kernel, concat_initrd(image.initramfs.read_bytes(), overlay)


def run(opts: RunOptions, out: BinaryIO, progress: Callable[[str], None] = lambda s: None,
        stdin_fd: int | None = None) -> RunResult:
    """Boot, run ``opts.command`` (or attach a shell on ``stdin_fd``), wait, destroy."""
    import tempfile

    from pyxen.image.runspec import ExitMarkerFilter, new_nonce
    t0 = time.monotonic()
    nonce = new_nonce()
    mode = "run" if opts.command is not None else "shell"
    kernel, initrd = _initrd_bytes(opts, mode, nonce, progress)
    flt = ExitMarkerFilter(nonce)
    tail = bytearray()
    first: list[float] = []
    lock = threading.Lock()

    def stream(channel: str, data: bytes) -> None:
        with lock:
            tail.extend(data)
            del tail[:-8192]
            if channel != "console" or flt.status is not None:
                return                   # after the exit marker: only the power-off remains
            shown = flt.feed(data)
            if shown:
                if not first:
                    first.append(time.monotonic() - t0)
                out.write(shown)
                out.flush()

    with tempfile.NamedTemporaryFile(prefix="pyxen-initrd-") as f:
        f.write(initrd)
        f.flush()
        cfg = DomainConfig(kernel=kernel, name="pyxen-run", memory=opts.memory,
                           vcpus=opts.vcpus, cmdline=f"{BASE_CMDLINE} {opts.cmdline}".strip(),
                           modules=[(f.name, "")], accel=opts.accel, disks=opts.disks,
                           nics=opts.nics, run_dir=tempfile.gettempdir())
        vmm = build(cfg, stream=stream)
    stop = threading.Event()
    try:
        vmm.start()
        if mode == "shell" and stdin_fd is not None:
            _attach(vmm, stdin_fd, stop)
        state = vmm.wait(opts.timeout)
        if state is None:                    # hung: it ends as a crash, as xl's watchdog would
            vmm.domain.shutdown("crash", f"no shutdown within {opts.timeout:g} s (hung)")
            state = vmm.domain.runstate
    finally:
        stop.set()
        vmm.destroy()
    with lock:
        rest = flt.flush()
        if rest:
            out.write(rest)
            out.flush()
    reason, detail = state.reason, state.detail
    return RunResult(flt.status, reason, detail, bytes(tail).decode(errors="replace"),
                     time.monotonic() - t0, first[0] if first else None)


def _attach(vmm, fd: int, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    """Forward keystrokes from ``fd`` (a raw terminal) to hvc0 until Ctrl-] or shutdown."""

    def pump() -> None:
        while not stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.2)
            if not r:
                continue
            data = os.read(fd, 1024)
            if not data:
                return
            if DETACH in data:
                data = data[:data.index(DETACH)]
                if data:
                    vmm.console.send_input(data)
                vmm.domain.shutdown("poweroff", "console detached (Ctrl-])")
                return
            vmm.console.send_input(data.replace(b"\n", b"\r") if not os.isatty(fd) else data)

    threading.Thread(target=pump, name="console-input", daemon=True).start()


def raw_terminal(fd: int):  # type: ignore[no-untyped-def]
    """Context manager: put the terminal on ``fd`` in raw mode (no-op if it is not a tty)."""
    import contextlib
    import termios
    import tty

    @contextlib.contextmanager
    def cm():  # type: ignore[no-untyped-def]
        if not os.isatty(fd):
            yield
            return
        saved = termios.tcgetattr(fd)
        try:
            tty.setraw(fd)
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return cm()


__all__ = ["RunOptions", "RunResult", "run", "raw_terminal"]
