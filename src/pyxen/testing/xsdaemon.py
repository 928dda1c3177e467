"""A xenstored under test: :class:`~pyxen.xenstore.daemon.XenstoredDaemon` on a thread with
its own socket and state file, stoppable and restartable, closing the clients it handed out.
Used by the xenstored integration tests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pyxen.xenstore.daemon import XenstoredDaemon


class DaemonThread:
    """``socket_path``/``state_path`` in ``directory``. Subclasses add a ``client()`` that
    appends what it opens to :attr:`clients` (anything with ``close()``)."""

    def __init__(self, directory: Path) -> None:
        self.socket_path = directory / "socket"
        self.state_path = directory / "state.json"
        self.daemon: XenstoredDaemon | None = None
        self.thread: threading.Thread | None = None
        self.clients: list[Any] = []

    def start(self) -> None:
        self.daemon = XenstoredDaemon(self.socket_path, self.state_path)
        self.thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self.thread.start()
        assert self.daemon.ready.wait(5)

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.daemon is not None:
            self.daemon.stop()
            assert self.thread is not None
            self.thread.join(10)
            assert not self.thread.is_alive(), "the daemon thread did not stop"
            self.daemon = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
