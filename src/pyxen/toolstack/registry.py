"""pyxend's domain registry on disk: one JSON record per domain, written atomically.

A record is everything needed to find a running domain again after pyxend restarts (the
VMM's pid and sockets) and to re-create it (its validated configuration, for
``on_reboot="restart"``). Records live in ``<state_dir>/domains/<domid>.json``; the next domain
ID in ``<state_dir>/next-domid``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: keys of a domain configuration the toolstack accepts (DomainSpec's, minus parse metadata)
CONFIG_KEYS = ("name", "type", "memory", "maxmem", "vcpus", "maxvcpus", "kernel", "ramdisk",
               "cmdline", "on_poweroff", "on_reboot", "on_watchdog", "on_crash",
               "on_soft_reset", "accel", "uuid")
FIRST_DOMID, LAST_DOMID = 1, 0x7FEF            # DOMID_FIRST_RESERVED = 0x7FF0


@dataclass
class DomainRecord:
    domid: int
    name: str
    uuid: str
    config: dict
    created: float
    pid: int | None = None
    control: str = ""
    console: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> DomainRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Registry:
    """The on-disk records. Not thread-safe: pyxend serialises access with its own lock."""

    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir) / "domains"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._next_path = Path(state_dir) / "next-domid"

    def path(self, domid: int) -> Path:
        return self.dir / f"{domid}.json"

    def spec_path(self, domid: int) -> Path:
        return self.dir / f"{domid}.spec.json"

    def save(self, rec: DomainRecord) -> None:
        tmp = self.path(rec.domid).with_suffix(".tmp")
        tmp.write_text(rec.to_json())
        os.replace(tmp, self.path(rec.domid))

    def remove(self, domid: int) -> None:
        for p in (self.path(domid), self.spec_path(domid)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def load_all(self) -> list[DomainRecord]:
        """Every readable record; unreadable ones are skipped."""
        out = []
        for p in sorted(self.dir.glob("*.json")):
            if p.name.endswith(".spec.json"):
                continue
            try:
                out.append(DomainRecord.from_dict(json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def allocate_domid(self, in_use: set[int]) -> int:
        """The next free domain ID after the last one handed out (Xen's rover)."""
        try:
            nxt = int(self._next_path.read_text())
        except (OSError, ValueError):
            nxt = FIRST_DOMID
        for _ in range(LAST_DOMID):
            if nxt > LAST_DOMID or nxt < FIRST_DOMID:
                nxt = FIRST_DOMID
            if nxt not in in_use:
                self._next_path.write_text(str(nxt + 1))
                return nxt
            nxt += 1
        raise RuntimeError("no free domain ID")
