"""Hypothesis: random request sequences from dom0 and a domU, over the wire, against an
independent dict model of xenstore's values and permission rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.xenstore import wire as W
from pyxen.xenstore.server import XenstoreServer
from pyxen.xenstore.wire import Message

BITS = {"n": 0, "r": 1, "w": 2, "b": 3}
OWNER = 4
PATHS = ["/pub", "/pub/a", "/pub/a/b", "/priv", "/priv/a", "/new", "/new/a/b",
         "/local/domain/5/data", "/local/domain/5/data/a", "/local/domain/5/data/a/b",
         "/local/domain/5/x", "/local/domain/5/x/y", "data/a", "data/c", "x/y", "z"]


class Model:
    """path -> (value, perms); perms as [(kind, domid), ...]."""

    def __init__(self, nodes: dict[str, tuple[bytes, list[tuple[str, int]]]]) -> None:
        self.m = nodes

    @staticmethod
    def canon(d: int, p: str) -> str:
        return p if p.startswith("/") else f"/local/domain/{d}/{p}"

    @staticmethod
    def bits(d: int, perms: list[tuple[str, int]]) -> int:
        if d == 0 or perms[0][1] == d:
            return 7
        for k, x in perms[1:]:
            if x == d:
                return BITS[k]
        return BITS[perms[0][0]]

    def ancestor(self, p: str) -> str:
        while True:
            p = p.rsplit("/", 1)[0] or "/"
            if p in self.m:
                return p

    def lookup(self, d: int, p: str, need: int) -> str | None:
        """None if allowed and present, else the error name."""
        if p in self.m:
            return None if self.bits(d, self.m[p][1]) & need == need else "EACCES"
        return "ENOENT" if self.bits(d, self.m[self.ancestor(p)][1]) & need else "EACCES"

    def children(self, p: str) -> list[str]:
        pre = p.rstrip("/") + "/"
        return sorted(q[len(pre):] for q in self.m if q.startswith(pre) and "/" not in q[len(pre):] and q != p)

    def create(self, d: int, p: str, v: bytes) -> None:
        parts = p.strip("/").split("/")
        cur = ""
        for i, part in enumerate(parts):
            parent = cur or "/"
            cur = f"{cur}/{part}"
            if cur not in self.m:
                perms = list(self.m[parent][1])
                if d != 0:
                    perms[0] = (perms[0][0], d)
                self.m[cur] = (v if i == len(parts) - 1 else b"", perms)

    def apply(self, d: int, op: str, p: str, arg) -> tuple[str, object]:
        p = self.canon(d, p)
        if op == "read":
            e = self.lookup(d, p, 1)
            return ("err", e) if e else ("ok", self.m[p][0])
        if op == "directory":
            e = self.lookup(d, p, 1)
            return ("err", e) if e else ("ok", self.children(p))
        if op == "get_perms":
            e = self.lookup(d, p, 1)
            return ("err", e) if e else ("ok", [f"{k}{x}" for k, x in self.m[p][1]])
        if op in ("write", "mkdir"):
            e = self.lookup(d, p, 2)
            if e == "ENOENT":
                self.create(d, p, arg if op == "write" else b"")
            elif e:
                return ("err", e)
            elif op == "write":
                self.m[p] = (arg, self.m[p][1])
            return ("ok", b"OK\0")
        if op == "rm":
            e = self.lookup(d, p, 2)
            if e == "ENOENT":
                return ("ok", b"OK\0") if (p.rsplit("/", 1)[0] or "/") in self.m else ("err", e)
            if e:
                return ("err", e)
            for q in [q for q in self.m if q == p or q.startswith(p + "/")]:
                del self.m[q]
            return ("ok", b"OK\0")
        if op == "set_perms":
            e = self.lookup(d, p, 2 | OWNER)
            if e:
                return ("err", e)
            if d != 0 and arg[0][1] != self.m[p][1][0][1]:
                return ("err", "EPERM")
            self.m[p] = (self.m[p][0], list(arg))
            return ("ok", b"OK\0")
        raise AssertionError(op)


TYPES = {"read": W.XS_READ, "write": W.XS_WRITE, "mkdir": W.XS_MKDIR, "rm": W.XS_RM,
         "directory": W.XS_DIRECTORY, "get_perms": W.XS_GET_PERMS, "set_perms": W.XS_SET_PERMS}

perm_st = st.tuples(st.sampled_from("nrwb"), st.sampled_from([0, 5, 7]))
op_st = st.one_of(
    st.tuples(st.sampled_from([0, 5]), st.sampled_from(["read", "directory", "get_perms",
                                                        "mkdir", "rm"]),
              st.sampled_from(PATHS), st.none()),
    st.tuples(st.sampled_from([0, 5]), st.just("write"), st.sampled_from(PATHS),
              st.binary(max_size=12)),
    st.tuples(st.sampled_from([0, 5]), st.just("set_perms"), st.sampled_from(PATHS),
              st.lists(perm_st, min_size=1, max_size=3)),
)


def initial_server() -> XenstoreServer:
    s = XenstoreServer()
    s.write("/local/domain/5", "")
    s.set_perms("/local/domain/5", ["n0", "r5"])
    s.write("/local/domain/5/data", "")
    s.set_perms("/local/domain/5/data", ["n5"])
    s.write("/pub/a", "public")
    s.set_perms("/pub", ["r0"])
    s.set_perms("/pub/a", ["r0", "b5"])
    s.write("/priv/a", "secret")
    return s


def encode(op: str, p: str, arg) -> bytes:
    if op == "write":
        return p.encode() + b"\0" + arg
    if op == "set_perms":
        return W.join_strings(p, *[f"{k}{x}" for k, x in arg])
    return W.join_strings(p)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_random_ops_match_dict_model(ops):
    server = initial_server()
    model = Model({p: (n.value, list(n.perms)) for p, n in server.store.nodes.items()})
    conns = {0: server.connect(0), 5: server.connect(5)}
    for i, (d, op, p, arg) in enumerate(ops):
        conns[d].handle(Message(TYPES[op], i, 0, encode(op, p, arg)))
        (r,) = conns[d].outgoing()
        assert r.req_id == i
        want_kind, want = model.apply(d, op, p, arg)
        if want_kind == "err":
            assert (r.type, r.payload) == (W.XS_ERROR, f"{want}\0".encode()), (d, op, p, arg)
            continue
        assert r.type == TYPES[op], (d, op, p, arg, r)
        if op == "directory":
            assert sorted(s.decode() for s in W.split_strings(r.payload)) == want
            assert r.payload.endswith(b"\0") or r.payload == b""
        elif op == "get_perms":
            assert W.split_strings(r.payload) == [s.encode() for s in want]
        else:
            assert r.payload == want, (d, op, p, arg)
    # final states agree
    assert {p: (n.value, list(n.perms)) for p, n in server.store.nodes.items()} == model.m
    assert server.store.entries == {o: c for o, c in _owners(model.m).items()} | {
        o: 0 for o, c in server.store.entries.items() if c == 0}


def _owners(m: dict) -> dict[int, int]:
    out: dict[int, int] = {}
    for _, perms in m.values():
        out[perms[0][1]] = out.get(perms[0][1], 0) + 1
    return out
