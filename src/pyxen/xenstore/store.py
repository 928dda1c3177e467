"""The xenstore database: a tree of nodes with values, permissions and generation counts.

Paths are absolute strings (``/local/domain/5/name``); :meth:`Store.canonical` resolves a
caller's relative path against ``/local/domain/<domid>``. Every operation takes the caller's
domid and applies xenstored's rules (tools/xenstored/core.c):

* a permission list is ``[(kind, domid), ...]`` with kind in ``n r w b``; entry 0 names the
  owner and the default for everyone else, later entries override per domain;
* domid 0 is privileged; the owner (or a domain whose SET_TARGET target is the owner) gets
  read+write+owner;
* a missing node answers ENOENT only when the nearest existing ancestor grants the requested
  access, else EACCES (no information leaks); creating needs write on that ancestor;
* new nodes inherit their parent's permissions, but unprivileged creators become the owner;
* quotas (:class:`Quota`) apply to unprivileged callers only.

Nodes are immutable; a change replaces the :class:`Node`. That makes :meth:`Store.copy` a
cheap shallow copy (used for transactions) and conflict detection an identity test.
Not thread-safe: the owner (:class:`~pyxen.xenstore.server.XenstoreServer`) serialises.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from pyxen.xenstore.wire import XENSTORE_ABS_PATH_MAX, XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX

Perm = tuple[str, int]            # ("b", 0) == "b0"
Perms = tuple[Perm, ...]

READ, WRITE, OWNER = 1, 2, 4
_KIND_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
_VALID = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")
SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")
NODE_OVERHEAD = 24                # xs_tdb_record_hdr; each perm adds 8 (struct xs_permissions)


class XenstoreError(Exception):
    """An operation failed; ``name`` is the XSD error string sent to the client ("ENOENT")."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


def parse_perm(s: str) -> Perm:
    """``"r5"`` -> ``("r", 5)``; EINVAL unless kind in n/r/w/b and a decimal domid 0..65535."""
    if len(s) < 2 or s[0] not in _KIND_BITS or not s[1:].isdigit() or not s[1:].isascii():
        raise XenstoreError("EINVAL", f"bad permission {s!r}")
    domid = int(s[1:])
    if domid > 0xFFFF:
        raise XenstoreError("EINVAL", f"bad domid in permission {s!r}")
    return (s[0], domid)


def format_perm(p: Perm) -> str:
    return f"{p[0]}{p[1]}"


def parent_of(path: str) -> str:
    """Parent of an absolute path other than ``/``."""
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def is_child(child: str, parent: str) -> bool:
    """xenstore.txt's "child": identical, or under ``parent`` (everything is under ``/``)."""
    return child == parent or parent == "/" or child.startswith(parent + "/")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0][1]

    def size(self) -> int:
        """Record size as xenstored accounts it against quota-entry-size."""
        return (NODE_OVERHEAD + 8 * len(self.perms) + len(self.value)
                + sum(len(c) + 1 for c in self.children))


@dataclass(frozen=True, slots=True)
class Event:
    """A modification for watch matching. ``perms``: permission sets before/after the change
    -- a watcher able to read under any of them is told. ``removed``: a recursive RM."""
    path: str
    perms: tuple[Perms, ...]
    removed: bool = False


@dataclass
class Quota:
    """xenstored's defaults (``-E``, ``-S``, ``-W``, ``-t``, ``quota-nb-perms``)."""
    entries_per_domain: int = 1000
    entry_size: int = 2048
    watches_per_domain: int = 128
    transactions_per_domain: int = 10
    perms_per_node: int = 5


@dataclass
class Store:
    quota: Quota = field(default_factory=Quota)
    nodes: dict[str, Node] = field(default_factory=lambda: {"/": Node(b"", (("n", 0),))})
    generation: int = 0                               # last generation handed out
    entries: dict[int, int] = field(default_factory=dict)   # owner domid -> node count
    targets: dict[int, int] = field(default_factory=dict)   # domid -> SET_TARGET domid
    special: dict[str, Perms] = field(
        default_factory=lambda: {p: (("n", 0),) for p in SPECIAL_PATHS})
    # transaction tracking (None outside a transaction's working copy): every path the
    # transaction touched, with what it held when first touched (the start snapshot's value)
    accessed: dict[str, object] | None = None
    modified: set[str] | None = None

    def __post_init__(self) -> None:
        if not self.entries:
            for n in self.nodes.values():
                self.entries[n.owner] = self.entries.get(n.owner, 0) + 1

    # ----------------------------------------------------------------- infrastructure

    def copy(self, track: bool = False) -> Store:
        """Shallow snapshot (nodes are immutable). ``track``: record accessed/modified paths
        (with their values as first seen, which :meth:`conflicts` compares against)."""
        return Store(self.quota, dict(self.nodes), self.generation, dict(self.entries),
                     dict(self.targets), dict(self.special),
                     {} if track else None, set() if track else None)

    def _seen(self, path: str) -> None:
        """Record ``path``'s value before a tracked copy first reads or changes it."""
        acc = self.accessed
        if acc is not None and path not in acc:
            acc[path] = self.special.get(path) if path[0] == "@" else self.nodes.get(path)

    def perm_for(self, domid: int, perms: Perms) -> int:
        """READ|WRITE|OWNER bits ``domid`` holds under ``perms``."""
        owner = perms[0][1]
        target = self.targets.get(domid)
        if domid == 0 or owner == domid or (target is not None and owner == target):
            return READ | WRITE | OWNER
        for kind, d in perms[1:]:
            if d == domid or (target is not None and d == target):
                return _KIND_BITS[kind]
        return _KIND_BITS[perms[0][0]]

    def canonical(self, domid: int, path: str, special_ok: bool = False) -> str:
        """Absolute, validated form of ``path`` as sent by ``domid``; EINVAL if malformed."""
        if not path:
            raise XenstoreError("EINVAL", "empty path")
        if path[0] == "@":
            if not special_ok or len(path) > XENSTORE_REL_PATH_MAX or not set(path) <= _VALID:
                raise XenstoreError("EINVAL", f"bad special path {path!r}")
            return path
        if path[0] != "/":
            path = f"{domain_path(domid)}/{path}"
        if ((path.endswith("/") and path != "/") or "//" in path
                or len(path) > XENSTORE_ABS_PATH_MAX or not set(path) <= _VALID):
            raise XenstoreError("EINVAL", f"bad path {path!r}")
        return path

    def _get(self, path: str) -> Node | None:
        self._seen(path)
        return self.nodes.get(path)

    def _next_gen(self) -> int:
        self.generation += 1
        return self.generation

    def _put(self, path: str, node: Node) -> None:
        self._seen(path)
        old = self.nodes.get(path)
        if old is not None:
            self.entries[old.owner] = self.entries.get(old.owner, 0) - 1
        self.entries[node.owner] = self.entries.get(node.owner, 0) + 1
        self.nodes[path] = node
        if self.modified is not None:
            self.modified.add(path)

    def _del(self, path: str) -> None:
        self._seen(path)
        old = self.nodes.pop(path)
        self.entries[old.owner] = self.entries.get(old.owner, 0) - 1
        if self.modified is not None:
            self.modified.add(path)

    def _lookup(self, domid: int, path: str, need: int) -> Node:
        """xenstored's get_node: the node if ``domid`` holds ``need`` on it, else raise."""
        node = self._get(path)
        if node is not None:
            if self.perm_for(domid, node.perms) & need != need:
                raise XenstoreError("EACCES", path)
            return node
        anc = path
        while True:
            anc = parent_of(anc)
            a = self._get(anc)
            if a is not None:
                break
        raise XenstoreError("ENOENT" if self.perm_for(domid, a.perms) & need else "EACCES", path)

    def _check_size(self, domid: int, node: Node) -> None:
        if domid != 0 and node.size() >= self.quota.entry_size:
            raise XenstoreError("ENOSPC", "node too large")

    def _create(self, domid: int, path: str, value: bytes) -> Node:
        """Create ``path`` and any missing ancestors (caller checked perms via _lookup)."""
        missing = [path]
        while True:
            par = parent_of(missing[-1])
            parent = self._get(par)
            if parent is not None:
                break
            missing.append(par)
        if domid != 0 and self.entries.get(domid, 0) + len(missing) > self.quota.entries_per_domain:
            raise XenstoreError("ENOSPC", "entry quota")
        staged: list[tuple[str, Node]] = []
        for p in reversed(missing):
            perms = parent.perms
            if domid != 0:
                perms = ((perms[0][0], domid),) + perms[1:]
            parent = replace(parent, children=parent.children + (p[len(par) + 1 if par != "/" else 1:],))
            staged.append((par, parent))
            node = Node(value if p == path else b"", perms)
            staged.append((p, node))
            par, parent = p, node
        # the last staged entry of each path wins; check sizes before touching the store
        final: dict[str, Node] = {}
        for p, n in staged:
            final[p] = n
        for n in final.values():
            self._check_size(domid, n)
        for p, n in final.items():
            self._put(p, replace(n, generation=self._next_gen()))
        return self.nodes[path]

    # ----------------------------------------------------------------- operations

    def read(self, domid: int, path: str) -> bytes:
        return self._lookup(domid, self.canonical(domid, path), READ).value

    def write(self, domid: int, path: str, value: bytes) -> list[Event]:
        p = self.canonical(domid, path)
        try:
            node = self._lookup(domid, p, WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create(domid, p, value)
            return [Event(p, (node.perms,))]
        new = replace(node, value=value)
        self._check_size(domid, new)
        self._put(p, replace(new, generation=self._next_gen()))
        return [Event(p, (new.perms,))]

    def mkdir(self, domid: int, path: str) -> list[Event]:
        p = self.canonical(domid, path)
        try:
            self._lookup(domid, p, WRITE)
            return []
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
        node = self._create(domid, p, b"")
        return [Event(p, (node.perms,))]

    def rm(self, domid: int, path: str) -> list[Event]:
        p = self.canonical(domid, path)
        try:
            node = self._lookup(domid, p, WRITE)
        except XenstoreError as e:
            if e.name == "ENOENT" and p != "/" and self._get(parent_of(p)) is not None:
                return []                       # already gone, parent exists: fine
            raise
        if p == "/":
            raise XenstoreError("EINVAL", "cannot remove /")
        doomed, stack = [], [p]
        while stack:
            q = stack.pop()
            doomed.append(q)
            n = self.nodes[q]
            stack.extend(f"{q}/{c}" for c in n.children)
        par = parent_of(p)
        parent = self.nodes[par]
        base = p.rsplit("/", 1)[1]
        self._put(par, replace(parent, children=tuple(c for c in parent.children if c != base),
                               generation=self._next_gen()))
        for q in doomed:
            self._del(q)
        return [Event(p, (node.perms,), removed=True)]

    def directory(self, domid: int, path: str) -> list[str]:
        return list(self._lookup(domid, self.canonical(domid, path), READ).children)

    def directory_part(self, domid: int, path: str, offset: int) -> bytes:
        """XS_DIRECTORY_PART reply: ``gen\\0`` + children from byte ``offset`` of the
        NUL-joined child list, plus a final extra ``\\0`` once the list is complete."""
        node = self._lookup(domid, self.canonical(domid, path), READ)
        children = b"".join(c.encode() + b"\0" for c in node.children)
        gen = str(node.generation).encode() + b"\0"
        if offset >= len(children):
            return gen + b"\0"
        maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        end = offset
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if nxt - offset > maxlen:
                break
            end = nxt
        chunk = children[offset:end]
        return gen + chunk + (b"\0" if end == len(children) else b"")

    def get_perms(self, domid: int, path: str) -> list[str]:
        p = self.canonical(domid, path, special_ok=True)
        if p[0] == "@":
            perms = self._special(p)
            if not self.perm_for(domid, perms) & READ:
                raise XenstoreError("EACCES", p)
        else:
            perms = self._lookup(domid, p, READ).perms
        return [format_perm(x) for x in perms]

    def _special(self, p: str) -> Perms:
        self._seen(p)
        perms = self.special.get(p)
        if perms is None:
            raise XenstoreError("ENOENT", p)
        return perms

    def set_perms(self, domid: int, path: str, perms: Iterable[str]) -> list[Event]:
        new_perms: Perms = tuple(parse_perm(s) for s in perms)
        if not new_perms:
            raise XenstoreError("EINVAL", "no permissions")
        if domid != 0 and len(new_perms) > self.quota.perms_per_node:
            raise XenstoreError("ENOSPC", "too many permissions")
        p = self.canonical(domid, path, special_ok=True)
        if p[0] == "@":
            old = self._special(p)
            if self.perm_for(domid, old) & (WRITE | OWNER) != WRITE | OWNER:
                raise XenstoreError("EACCES", p)
            if domid != 0 and new_perms[0][1] != old[0][1]:
                raise XenstoreError("EPERM", "cannot change owner")
            self.special[p] = new_perms
            if self.modified is not None:
                self.modified.add(p)
            return []
        node = self._lookup(domid, p, WRITE | OWNER)
        if domid != 0 and new_perms[0][1] != node.owner:
            raise XenstoreError("EPERM", "cannot change owner")
        new = replace(node, perms=new_perms)
        self._check_size(domid, new)
        self._put(p, replace(new, generation=self._next_gen()))
        return [Event(p, (node.perms, new_perms))]

    # ----------------------------------------------------------------- transactions

    def conflicts(self, work: Store) -> bool:
        """True if a path ``work`` (a tracked copy of this store) accessed changed here since
        the copy was taken (nodes are immutable: identity is the test)."""
        assert work.accessed is not None
        for p, first in work.accessed.items():
            now = self.special.get(p) if p[0] == "@" else self.nodes.get(p)
            if now is not first:
                return True
        return False

    def apply(self, work: Store) -> None:
        """Copy ``work``'s modifications in (after :meth:`conflicts` said no)."""
        assert work.modified is not None
        for p in work.modified:
            if p[0] == "@":
                self.special[p] = work.special[p]
                continue
            n = work.nodes.get(p)
            if n is None:
                if p in self.nodes:
                    self._del(p)
            else:
                self._put(p, replace(n, generation=self._next_gen()))

    # ----------------------------------------------------------------- state

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible state (values as latin-1 strings, exact for any bytes)."""
        return {
            "version": 1,
            "generation": self.generation,
            "quota": vars(self.quota).copy(),
            "targets": {str(k): v for k, v in self.targets.items()},
            "special": {k: [format_perm(p) for p in v] for k, v in self.special.items()},
            "nodes": {path: {"value": n.value.decode("latin-1"),
                             "perms": [format_perm(p) for p in n.perms],
                             "children": list(n.children),
                             "generation": n.generation}
                      for path, n in self.nodes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Store:
        if d.get("version") != 1:
            raise ValueError(f"unsupported xenstore state version {d.get('version')!r}")
        s = cls(Quota(**d["quota"]))
        s.generation = int(d["generation"])
        s.targets = {int(k): int(v) for k, v in d["targets"].items()}
        s.special = {k: tuple(parse_perm(p) for p in v) for k, v in d["special"].items()}
        s.nodes, s.entries = {}, {}
        for path, n in d["nodes"].items():
            s._put(path, Node(n["value"].encode("latin-1"),
                              tuple(parse_perm(p) for p in n["perms"]),
                              tuple(n["children"]), int(n["generation"])))
        if "/" not in s.nodes:
            raise ValueError("xenstore state has no root node")
        for path, n in s.nodes.items():
            for c in n.children:
                if f"{path.rstrip('/')}/{c}" not in s.nodes:
                    raise ValueError(f"xenstore state: {path} lists missing child {c}")
        return s
