"""Start the toolstack's long-lived processes (pyxend, xenstored, VMMs) detached.

A detached process runs in its own session (it outlives its starter and the starter's
terminal), reads nothing, and appends its output to a log file.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence

from pyxen.errors import ToolstackError


def start_detached(argv: Sequence[str], logpath: str, **popen: object) -> subprocess.Popen:
    """Start ``argv`` in a new session with stdin from /dev/null and stdout/stderr appended
    to ``logpath``; extra keyword arguments go to :class:`subprocess.Popen`."""
    with open(logpath, "ab") as log:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, **popen)  # type: ignore[arg-type]


def wait_until_up(proc: subprocess.Popen, up: Callable[[], bool], timeout: float, what: str,
                  where: str, logpath: str) -> None:
    """Poll ``up()`` until it holds; ToolstackError (503) if ``proc`` exits first or
    ``timeout`` seconds pass. ``what``/``where`` name the daemon and its socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up():
            return
        if proc.poll() is not None:
            raise ToolstackError(f"{what} exited with status {proc.returncode}; see {logpath}",
                                 503)
        time.sleep(0.05)
    raise ToolstackError(f"{what} did not answer on {where} within {timeout:g} s; see "
                         f"{logpath}", 503)
