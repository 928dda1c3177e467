"""Where the toolstack keeps its sockets, state and logs.

Defaults follow Xen's layout; each can be moved with an environment variable (tests and a
second "host" on one machine use private directories):

========================  ==============================  ===========================
what                      default                         variable
========================  ==============================  ===========================
pyxend API socket         ``/run/pyxen/pyxend.sock``      ``PYXEN_SOCKET``
run dir (VMM sockets)     ``/run/pyxen``                  ``PYXEN_RUN_DIR``
state (registry, store)   ``/var/lib/pyxen``              ``PYXEN_STATE_DIR``
logs                      ``/var/log/pyxen``              ``PYXEN_LOG_DIR``
xenstored socket          ``/run/xenstored/socket``       ``XENSTORED_PATH`` (as libxenstore)
========================  ==============================  ===========================
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Paths:
    socket: str
    run_dir: str
    state_dir: str
    log_dir: str
    xenstored_socket: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Paths:
        e = os.environ if env is None else env
        run = e.get("PYXEN_RUN_DIR") or "/run/pyxen"
        return cls(socket=e.get("PYXEN_SOCKET") or os.path.join(run, "pyxend.sock"),
                   run_dir=run,
                   state_dir=e.get("PYXEN_STATE_DIR") or "/var/lib/pyxen",
                   log_dir=e.get("PYXEN_LOG_DIR") or "/var/log/pyxen",
                   xenstored_socket=e.get("XENSTORED_PATH") or "/run/xenstored/socket")

    @property
    def domains_dir(self) -> str:
        return os.path.join(self.state_dir, "domains")

    @property
    def vmm_run_dir(self) -> str:
        return os.path.join(self.run_dir, "vmm")

    @property
    def xenstored_state(self) -> str:
        return os.path.join(self.state_dir, "xenstored.json")

    def env(self) -> dict[str, str]:
        """The variables that make a child process use these paths."""
        return {"PYXEN_SOCKET": self.socket, "PYXEN_RUN_DIR": self.run_dir,
                "PYXEN_STATE_DIR": self.state_dir, "PYXEN_LOG_DIR": self.log_dir,
                "XENSTORED_PATH": self.xenstored_socket}
