"""Live migration, source side: the handshake around :class:`DomainSaver` (libxl's
``migrate`` protocol, docs/migration-stream.md).

:func:`migrate_out` returns a summary dict whose ``phase`` is ``done`` (the target runs the
domain: the caller destroys its copy), or raises MigrationError/ChannelError after resuming
the domain here -- except in the one ambiguous case (the connection broke after "go"), where
the domain is left paused and the error says so. Runs in the domain's VMM process, on a
thread that is not a vCPU.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from pyxen.migration.channel import PROTOCOL, ChannelError, connect
from pyxen.migration.save import MAX_ROUNDS, DomainSaver, FdSink, MigrationError
from pyxen.xenstore.client import XenstoreClient
from pyxen.xenstore.store import XenstoreError

log = logging.getLogger("pyxen.migration")

HELLO_TIMEOUT = 15.0       # s for the target to accept or refuse
READY_TIMEOUT = 60.0       # s for the target to rebuild the domain after END
RESUME_TIMEOUT = 30.0      # s for the target to report the guest running after "go"


class XenstoredHooks:
    """Export/thaw of a domain's xenstore state on the xenstored at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, domid: int, roots: list[str]) -> dict:
        try:
            with XenstoreClient(self.path, timeout=10) as c:
                return c.export_domain(domid, roots)
        except (OSError, ConnectionError, XenstoreError) as e:
            raise MigrationError(f"xenstore export of domain {domid}: {e}") from None

    def thaw(self, domid: int) -> None:
        with XenstoreClient(self.path, timeout=10) as c:
            c.thaw_domain(domid)

    def read(self, domid: int, key: str) -> bytes | None:
        """The guest's ``key`` (relative to its home), or None."""
        try:
            with XenstoreClient(self.path, timeout=10) as c:
                return c.try_read(f"/local/domain/{domid}/{key}")
        except (OSError, ConnectionError, XenstoreError) as e:
            raise MigrationError(f"xenstore: {e}") from None

    def write(self, domid: int, key: str, value: str) -> None:
        try:
            with XenstoreClient(self.path, timeout=10) as c:
                c.write(f"/local/domain/{domid}/{key}", value)
        except (OSError, ConnectionError, XenstoreError) as e:
            raise MigrationError(f"xenstore: {e}") from None


def migrate_out(vmm, config: dict, host: str, port: int, xenstore: XenstoredHooks,  # type: ignore[no-untyped-def]
                progress: Callable[[dict], None] | None = None, *,
                max_rounds: int = MAX_ROUNDS, mode: str = "transparent",
                copy_storage: bool = False) -> dict:
    """Send the domain to the pyxend relocation service at ``host``:``port``. With
    ``copy_storage`` its (raw) disk images travel in the stream, for hosts that share no
    storage; otherwise the target must see the same image paths."""
    t0 = time.monotonic()
    config = dict(config, mode=mode)
    copies: list[tuple[int, str]] = []
    if copy_storage and vmm.devices is not None:
        entries = []
        with vmm.devices.lock:
            disks = list(vmm.devices.disks.values())
        for cfg, _be, _export in disks:
            if cfg.format != "raw":
                raise MigrationError(f"disk {cfg.vdev}: copying storage supports raw images, "
                                     f"not {cfg.format}")
            copies.append((cfg.devid, cfg.target))
            entries.append({"devid": cfg.devid, "vdev": cfg.vdev,
                            "size": os.path.getsize(cfg.target)})
        config = dict(config, copy_storage=entries)
    ch = connect(host, port)
    try:
        ch.send_json({"pyxen-migrate": PROTOCOL, "config": config, "mode": mode,
                      "copy_storage": bool(copies)})
        ans = ch.recv_json(HELLO_TIMEOUT, "the request")
        if not ans.get("ok"):
            raise MigrationError(f"{ch.peer} refused the domain: {ans.get('error', 'no reason')}")
        saver = DomainSaver(vmm, config, FdSink(ch.sock.fileno()), xenstore, progress=progress,
                            copy_disks=copies, mode=mode)
        try:
            saver.send_header()
            saver.precopy(max_rounds=max_rounds)
            if progress:
                progress({"phase": "final"})
            saver.final()
            r = ch.recv_json(READY_TIMEOUT, "the restore on the target")
            saver.stats.step("target-restore")
            if not r.get("ready"):
                raise MigrationError(f"the target could not restore the domain: "
                                     f"{r.get('error', 'no reason')}")
        except OSError as e:
            saver.abort()
            why = _peer_error(ch)           # the target usually says why it stopped reading
            raise MigrationError(f"sending to {ch.peer}: {e.strerror or e}"
                                 + (f" (the target: {why})" if why else "")) from None
        except BaseException:
            saver.abort()
            raise
        try:
            ch.send_json({"go": True})
            r = ch.recv_json(RESUME_TIMEOUT, "the resume on the target")
        except ChannelError as e:
            # libxl's "migration target: unknown state": the target may be running it
            raise MigrationError(f"{e}; the domain may be running on {ch.peer}, so it is "
                                 "left paused here (destroy or unpause it by hand)") from None
        if not r.get("resumed"):
            saver.abort()
            raise MigrationError(f"the target could not start the domain: "
                                 f"{r.get('error', 'no reason')}; it runs here again")
        saver.stats.step("target-resume")
        done = time.monotonic()
        st = saver.stats
        assert st.paused_at is not None
        return {"phase": "done", **st.to_dict(),
                "total_ms": round((done - t0) * 1000, 1),
                "pause_ms": round((done - st.paused_at) * 1000, 1),
                "target": ch.peer}
    finally:
        ch.close()


def _peer_error(ch) -> str | None:  # type: ignore[no-untyped-def]
    """An error line the target sent before closing, if any (quick look, no waiting)."""
    try:
        msg = ch.recv_json(0.5, "its error report")
    except ChannelError:
        return None
    return str(msg.get("error")) if not msg.get("ok") and msg.get("error") else None
