"""pyxen.xen.evtchn.EventChannels: Xen 2-level event channel semantics."""

from __future__ import annotations

import ctypes
import contextlib
from types import SimpleNamespace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pyxen.core import atomics
from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EEXIST, EINVAL, ENOENT, EPERM, ESRCH, XenError
from pyxen.xen.evtchn import (FREE, INTERDOMAIN, IPI, UNBOUND, VIRQ, EventChannels)

DOMID = 7
SELF = X.DOMID_SELF
assert SELF == 0x7FF0
VIRQ_TIMER, VIRQ_DEBUG, VIRQ_CONSOLE, VIRQ_DOM_EXC = 0, 1, 2, 3


class StubVm:
    """Counts exclusive() sections: event bits must change only inside one."""

    def __init__(self) -> None:
        self.exclusive_sections = 0
        self.inside = False

    @contextlib.contextmanager
    def exclusive(self):
        self.exclusive_sections += 1
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


class StubDomain:
    def __init__(self, nvcpus: int) -> None:
        self.vcpus = [SimpleNamespace(index=i) for i in range(nvcpus)]
        self.notifies = 0
        self.vm = StubVm()

    def notify(self) -> None:
        self.notifies += 1


class StubXenDomain:
    """What EventChannels needs of a XenDomain: domid, domain, shared_info, two callbacks."""

    def __init__(self, nvcpus: int = 2) -> None:
        self.domid = DOMID
        self.domain = StubDomain(nvcpus)
        self._si = (ctypes.c_uint64 * 512)()           # one 4 KiB, 8-byte aligned page
        self.shared_info = SimpleNamespace(addr=ctypes.addressof(self._si))
        self.selected: list[tuple[int, int]] = []

    def mark_selector(self, vcpu: int, port: int) -> None:
        assert self.domain.vm.inside, "event bits changed outside vm.exclusive()"
        self.selected.append((vcpu, port))

    def clear_port_bits(self, port: int) -> None:
        atomics.test_and_clear_bit(self.shared_info.addr + X.SI_EVTCHN_PENDING, port)

    # guest-side views of shared_info
    def pending(self, port: int) -> bool:
        return atomics.test_bit(self.shared_info.addr + X.SI_EVTCHN_PENDING, port)

    def mask(self, port: int) -> None:
        atomics.test_and_set_bit(self.shared_info.addr + X.SI_EVTCHN_MASK, port)

    def masked(self, port: int) -> bool:
        return atomics.test_bit(self.shared_info.addr + X.SI_EVTCHN_MASK, port)

    def guest_clear_pending(self, port: int) -> None:
        atomics.test_and_clear_bit(self.shared_info.addr + X.SI_EVTCHN_PENDING, port)


@pytest.fixture
def xd():
    return StubXenDomain()


@pytest.fixture
def ev(xd):
    return EventChannels(xd)


def errno_of(fn, *args) -> int:
    with pytest.raises(XenError) as ei:
        fn(*args)
    return ei.value.errno


def loopback(ev) -> tuple[int, int]:
    a = ev.alloc_unbound(SELF, SELF)
    b = ev.bind_interdomain(SELF, a)
    return a, b


# ----------------------------------------------------------------------------- allocation

def test_ports_start_at_1(ev):
    assert ev.alloc_unbound(SELF, SELF) == 1
    assert ev.bind_ipi(0) == 2
    assert ev.bind_virq(VIRQ_TIMER, 0) == 3
    assert ev.status(SELF, 0)[0] == FREE               # port 0 is reserved: reads as closed


def test_alloc_unbound_and_status(ev):
    p = ev.alloc_unbound(DOMID, 0)                      # own domid works like DOMID_SELF
    assert ev.status(SELF, p) == (UNBOUND, 0, (0).to_bytes(2, "little") + bytes(6))
    q = ev.alloc_unbound(SELF, SELF)
    assert ev.status(DOMID, q) == (UNBOUND, 0, DOMID.to_bytes(2, "little") + bytes(6))
    assert errno_of(ev.alloc_unbound, 3, SELF) == EPERM     # for another domain
    assert errno_of(ev.alloc_unbound, 0x7FF5, SELF) == ESRCH
    assert errno_of(ev.status, 3, p) == ESRCH
    assert errno_of(ev.status, 0, p) == EPERM
    assert errno_of(ev.status, SELF, 100_000) == EINVAL


def test_loopback_interdomain(ev, xd):
    a, b = loopback(ev)
    assert (a, b) == (1, 2)
    assert ev.status(SELF, a) == (INTERDOMAIN, 0, DOMID.to_bytes(2, "little") + bytes(2)
                                  + b.to_bytes(4, "little"))
    assert ev.status(SELF, b) == (INTERDOMAIN, 0, DOMID.to_bytes(2, "little") + bytes(2)
                                  + a.to_bytes(4, "little"))
    # Xen raises the newly bound local port at once (lost-notification fix-up)
    assert xd.pending(b) and not xd.pending(a)
    assert xd.selected == [(0, b)] and xd.domain.notifies == 1
    ev.send(b)                                          # send on one end raises the peer
    assert xd.pending(a)
    assert xd.selected == [(0, b), (0, a)] and xd.domain.notifies == 2
    ev.send(a)                                          # already pending: no new selection
    assert ev.is_pending(a) and ev.is_pending(b) and len(xd.selected) == 2


def test_bind_interdomain_errors(ev):
    a = ev.alloc_unbound(SELF, 0)                       # unbound for domain 0, not for us
    assert errno_of(ev.bind_interdomain, SELF, a) == EINVAL
    assert errno_of(ev.bind_interdomain, SELF, 0) == EINVAL
    assert errno_of(ev.bind_interdomain, SELF, 99) == EINVAL
    assert errno_of(ev.bind_interdomain, 0, a) == EPERM
    assert errno_of(ev.bind_interdomain, 5, a) == ESRCH
    b = ev.alloc_unbound(SELF, SELF)
    ev.bind_interdomain(SELF, b)
    assert errno_of(ev.bind_interdomain, SELF, b) == EINVAL     # already bound


def test_send_on_unbound_is_dropped(ev, xd):
    p = ev.alloc_unbound(SELF, SELF)
    ev.send(p)
    assert not xd.pending(p) and xd.selected == [] and xd.domain.notifies == 0


def test_send_errors(ev):
    v = ev.bind_virq(VIRQ_TIMER, 0)
    assert errno_of(ev.send, v) == EINVAL
    assert errno_of(ev.send, 0) == EINVAL
    assert errno_of(ev.send, 50) == EINVAL              # free
    assert errno_of(ev.send, 10_000) == EINVAL
    assert errno_of(ev.send, -1) == EINVAL


# ----------------------------------------------------------------------------- VIRQs

def test_bind_virq_rules(ev):
    p = ev.bind_virq(VIRQ_TIMER, 1)                     # per-vCPU virq on vCPU 1
    assert ev.status(SELF, p) == (VIRQ, 1, VIRQ_TIMER.to_bytes(4, "little") + bytes(4))
    assert ev.bind_virq(VIRQ_TIMER, 0) != p             # another vCPU: fine
    assert errno_of(ev.bind_virq, VIRQ_TIMER, 1) == EEXIST
    g = ev.bind_virq(VIRQ_CONSOLE, 0)
    assert errno_of(ev.bind_virq, VIRQ_CONSOLE, 0) == EEXIST
    assert errno_of(ev.bind_virq, VIRQ_DOM_EXC, 1) == EINVAL     # global virq on vCPU 1
    assert errno_of(ev.bind_virq, X.NR_VIRQS, 0) == EINVAL
    assert errno_of(ev.bind_virq, -1, 0) == EINVAL
    assert errno_of(ev.bind_virq, VIRQ_DEBUG, 2) == ENOENT       # only 2 vCPUs
    assert errno_of(ev.bind_virq, VIRQ_DEBUG, -1) == ENOENT
    ev.close(g)
    assert ev.bind_virq(VIRQ_CONSOLE, 0) == g           # closing frees the binding


def test_send_virq(ev, xd):
    t1 = ev.bind_virq(VIRQ_TIMER, 1)
    c = ev.bind_virq(VIRQ_CONSOLE, 0)
    ev.send_virq(0, VIRQ_TIMER)                         # not bound on vCPU 0: nothing
    assert xd.selected == []
    ev.send_virq(1, VIRQ_TIMER)
    assert xd.pending(t1) and xd.selected == [(1, t1)]
    ev.send_virq(1, VIRQ_CONSOLE)                       # global: whichever vCPU asks
    assert xd.pending(c) and xd.selected[-1] == (0, c)


def test_global_virq_moved_to_another_vcpu(ev, xd):
    c = ev.bind_virq(VIRQ_CONSOLE, 0)
    ev.bind_vcpu(c, 1)
    assert ev.status(SELF, c)[:2] == (VIRQ, 1)
    ev.send_virq(0, VIRQ_CONSOLE)                       # still delivered, now to vCPU 1
    assert xd.pending(c) and xd.selected == [(1, c)]
    assert errno_of(ev.bind_virq, VIRQ_CONSOLE, 0) == EEXIST     # still bound once
    ev.close(c)
    assert ev.bind_virq(VIRQ_CONSOLE, 0) == c           # and closing frees it


def test_bind_vcpu(ev):
    t = ev.bind_virq(VIRQ_TIMER, 0)
    i = ev.bind_ipi(1)
    u = ev.alloc_unbound(SELF, SELF)
    assert errno_of(ev.bind_vcpu, t, 1) == EINVAL       # per-vCPU virq cannot move
    assert errno_of(ev.bind_vcpu, i, 0) == EINVAL       # nor an IPI
    assert errno_of(ev.bind_vcpu, u, 5) == ENOENT
    assert errno_of(ev.bind_vcpu, 40, 0) == EINVAL      # free port
    ev.bind_vcpu(u, 1)
    assert ev.status(SELF, u)[:2] == (UNBOUND, 1)


# ----------------------------------------------------------------------------- IPIs

def test_bind_ipi(ev, xd):
    p = ev.bind_ipi(1)
    assert ev.status(SELF, p) == (IPI, 1, bytes(8))
    ev.send(p)
    assert xd.pending(p) and xd.selected == [(1, p)] and xd.domain.notifies == 1
    ev.send(p)                                          # already pending: nothing more
    assert xd.selected == [(1, p)] and xd.domain.notifies == 1
    assert errno_of(ev.bind_ipi, 2) == ENOENT


# ----------------------------------------------------------------------------- close

def test_close_frees_and_peer_becomes_unbound(ev, xd):
    a, b = loopback(ev)
    ev.send(a)
    assert xd.pending(b)
    ev.close(b)
    assert not xd.pending(b)                            # closing clears the pending bit
    assert ev.status(SELF, b)[0] == FREE
    assert ev.status(SELF, a) == (UNBOUND, 0, DOMID.to_bytes(2, "little") + bytes(6))
    ev.send(a)                                          # dropped now
    assert not xd.pending(b)
    assert ev.bind_interdomain(SELF, a) == b            # free port reused, rebinding works
    assert errno_of(ev.close, 0) == EINVAL
    assert errno_of(ev.close, 30) == EINVAL             # free
    ev.close(a)
    ev.close(b)
    assert [ev.status(SELF, p)[0] for p in (a, b)] == [FREE, FREE]
    assert errno_of(ev.close, a) == EINVAL


def test_status_values(ev):
    u = ev.alloc_unbound(SELF, SELF)
    a, b = loopback(ev)
    v = ev.bind_virq(VIRQ_DEBUG, 0)
    i = ev.bind_ipi(0)
    assert [ev.status(SELF, p)[0] for p in (u, a, v, i)] == [1, 2, 4, 5]
    for p in (u, a, b, v, i):
        ev.close(p)
        assert ev.status(SELF, p)[0] == 0


# ----------------------------------------------------------------------------- masking

def test_masked_port_pending_without_selector(ev, xd):
    p = ev.bind_ipi(1)
    xd.mask(p)
    ev.send(p)
    assert xd.pending(p) and xd.selected == []
    ev.unmask(p)
    assert not xd.masked(p) and xd.selected == [(1, p)]
    ev.unmask(p)                                        # not masked any more: no second upcall
    assert xd.selected == [(1, p)]


def test_unmask_without_pending_does_not_select(ev, xd):
    p = ev.bind_ipi(0)
    xd.mask(p)
    ev.unmask(p)
    assert not xd.masked(p) and xd.selected == []
    ev.send(p)
    assert xd.selected == [(0, p)]


def test_set_pending_on_free_or_invalid_port_is_ignored(ev, xd):
    ev.set_pending(0)
    ev.set_pending(5)
    ev.set_pending(-3)
    ev.set_pending(1 << 20)
    assert xd.selected == [] and xd.domain.notifies == 0
    assert not any(xd._si)


# ----------------------------------------------------------------------------- backends

def test_bind_backend_and_send(ev, xd):
    calls: list[int] = []
    p = ev.alloc_unbound(SELF, 0)
    bport = ev.bind_backend(p, calls.append)
    assert bport == 1
    assert ev.status(SELF, p) == (INTERDOMAIN, 0, bytes(4) + bport.to_bytes(4, "little"))
    ev.send(p)
    ev.send(p)
    assert calls == [p, p] and not xd.pending(p)
    ev.set_pending(p)                                   # the backend raising the guest
    assert xd.pending(p) and xd.selected == [(0, p)]
    q = ev.alloc_unbound(SELF, 0)
    assert ev.bind_backend(q, calls.append) == 2
    assert errno_of(ev.bind_backend, q, calls.append) == EINVAL  # already bound
    u = ev.alloc_unbound(SELF, SELF)
    assert errno_of(ev.bind_backend, u, calls.append) == EINVAL  # not for domain 0
    ev.reset()                                          # reset keeps backend ports
    assert ev.status(SELF, p)[0] == INTERDOMAIN and ev.status(SELF, u)[0] == FREE
    ev.close(p)
    assert ev.status(SELF, p)[0] == FREE


def test_backend_may_raise_events_from_its_callback(ev, xd):
    p = ev.alloc_unbound(SELF, 0)
    ev.bind_backend(p, lambda port: ev.set_pending(port))
    ev.send(p)
    assert xd.pending(p)


def test_many_ports_grow_in_buckets(ev):
    ports = [ev.bind_ipi(0) for _ in range(200)]
    assert ports == list(range(1, 201))
    assert len(ev.ports) % 64 == 0
    ev.close(100)
    assert ev.bind_ipi(1) == 100                        # lowest free port first


# ----------------------------------------------------------------------------- random ops

def virq_key(port) -> tuple[int, int]:
    """Xen keeps a global VIRQ's binding on vCPU 0 wherever it is delivered."""
    return (port.notify_vcpu if port.virq in X.VIRQ_PER_VCPU else 0, port.virq)


PORTS = st.integers(-1, 70)
VCPUS = st.one_of(st.integers(0, 1), st.integers(-1, 3))
DOMS = st.sampled_from([SELF, DOMID, 0, 3])


class EvtchnMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.xd = StubXenDomain(nvcpus=3)
        self.ev = EventChannels(self.xd)

    def _port(self, data) -> int:
        """A port in use half of the time, else any number (often invalid)."""
        live = [n for n, p in enumerate(self.ev.ports) if p.state != FREE]
        if live and data.draw(st.booleans()):
            return data.draw(st.sampled_from(live))
        return data.draw(PORTS)

    def _do(self, fn, *args):
        try:
            return fn(*args)
        except XenError:
            return None

    @rule(dom=DOMS, remote=DOMS)
    def alloc_unbound(self, dom, remote):
        self._do(self.ev.alloc_unbound, dom, remote)

    @rule(dom=DOMS, data=st.data())
    def bind_interdomain(self, dom, data):
        port = self._port(data)
        self._do(self.ev.bind_interdomain, dom, port)

    @rule(virq=st.one_of(st.sampled_from([VIRQ_TIMER, VIRQ_CONSOLE, VIRQ_DOM_EXC]),
                         st.integers(-1, X.NR_VIRQS)), vcpu=VCPUS)
    def bind_virq(self, virq, vcpu):
        self._do(self.ev.bind_virq, virq, vcpu)

    @rule(vcpu=VCPUS)
    def bind_ipi(self, vcpu):
        self._do(self.ev.bind_ipi, vcpu)

    @rule(data=st.data(), vcpu=VCPUS)
    def bind_vcpu(self, data, vcpu):
        port = self._port(data)
        self._do(self.ev.bind_vcpu, port, vcpu)

    @rule(data=st.data())
    def close(self, data):
        port = self._port(data)
        self._do(self.ev.close, port)

    @rule(data=st.data())
    def send(self, data):
        port = self._port(data)
        self._do(self.ev.send, port)

    @rule(data=st.data())
    def unmask(self, data):
        port = self._port(data)
        self._do(self.ev.unmask, port)

    @rule(data=st.data())
    def guest_mask(self, data):
        port = self._port(data)
        if port >= 0:
            self.xd.mask(port)

    @rule(data=st.data())
    def guest_clear(self, data):
        port = self._port(data)
        if port >= 0:
            self.xd.guest_clear_pending(port)

    @rule(vcpu=VCPUS, virq=st.integers(0, X.NR_VIRQS - 1))
    def send_virq(self, vcpu, virq):
        self.ev.send_virq(vcpu, virq)

    @rule(dom=DOMS, data=st.data())
    def status(self, dom, data):
        port = self._port(data)
        r = self._do(self.ev.status, dom, port)
        if r is not None:
            assert r[0] in (FREE, UNBOUND, INTERDOMAIN, VIRQ, IPI)

    @rule(data=st.data())
    def bind_backend(self, data):
        port = self._port(data)
        self._do(self.ev.bind_backend, port, lambda p: None)

    @rule()
    def reset(self):
        self.ev.reset()

    @invariant()
    def one_port_per_virq(self):
        ports = self.ev.ports
        keys = [virq_key(p) for p in ports if p.state == VIRQ]
        assert len(keys) == len(set(keys)), keys
        assert sorted(keys) == sorted(self.ev.virqs)
        for key, port in self.ev.virqs.items():
            assert ports[port].state == VIRQ and virq_key(ports[port]) == key

    @invariant()
    def port_table_consistent(self):
        ports = self.ev.ports
        assert ports[0].state == FREE
        for n, p in enumerate(ports):
            if p.state == INTERDOMAIN and p.backend is None:
                peer = ports[p.remote_port]
                assert peer.state == INTERDOMAIN and peer.remote_port == n
            if p.state != FREE:
                assert 0 <= p.notify_vcpu < 3
            if p.state == VIRQ:
                assert 0 <= p.virq < X.NR_VIRQS


TestEvtchnStateMachine = EvtchnMachine.TestCase
TestEvtchnStateMachine.settings = settings(max_examples=150, stateful_step_count=50,
                                           deadline=None)


# ----------------------------------------------------------------------------- save / load

def test_save_load_round_trip(xd):
    ev = EventChannels(xd)
    a, b = loopback(ev)
    virq = ev.bind_virq(VIRQ_TIMER, 1)
    ipi = ev.bind_ipi(1)
    backend = ev.alloc_unbound(SELF, 0)
    ev.bind_backend(backend, lambda port: None)
    st = ev.save()
    fresh = EventChannels(StubXenDomain())
    fresh.load(st)
    assert fresh.save() == st
    for p in (a, b, virq, ipi):
        assert fresh.status(SELF, p) == ev.status(SELF, p)
    # a backend's port is saved unbound for domain 0: the backend re-attaches after restore
    assert fresh.status(SELF, backend)[0] == UNBOUND
    fresh.bind_backend(backend, lambda port: None)
    assert fresh.virqs == {(1, VIRQ_TIMER): virq}


@pytest.mark.parametrize("mutate, why", [
    (lambda st: st["ports"].__setitem__(1, {"state": 9, "notify_vcpu": 0, "remote_dom": 0,
                                            "remote_port": 0, "virq": 0}), "bad state"),
    (lambda st: st["ports"][1].update(notify_vcpu=5), "bad state"),
    (lambda st: st["ports"][1].update(remote_port=4000), "bad state"),
    (lambda st: st["ports"][0].update(state=UNBOUND), "bad state"),
    (lambda st: st["ports"].__setitem__(1, "x"), "event channel 1"),
    (lambda st: st.update(ports=[]), "'ports'"),
    (lambda st: st.update(virqs=[[0, 0, 1]]), "not a VIRQ port"),
    (lambda st: st["ports"][2].update(state=INTERDOMAIN, remote_dom=DOMID, remote_port=3),
     "interdomain peer"),
])
def test_load_rejects_bad_state_and_changes_nothing(xd, mutate, why):
    ev = EventChannels(xd)
    loopback(ev)
    st = ev.save()
    mutate(st)
    fresh = EventChannels(StubXenDomain())
    before = fresh.save()
    with pytest.raises(ValueError, match=why):
        fresh.load(st)
    assert fresh.save() == before


def test_repair_pending_gives_pending_unmasked_ports_their_selector(xd):
    ev = EventChannels(xd)
    a, b = loopback(ev)
    masked = ev.bind_ipi(1)
    for p in (a, b, masked):
        xd.guest_clear_pending(p)
    xd.selected.clear()
    for p in (a, masked):                  # pending bits copied without their selectors
        atomics.test_and_set_bit(xd.shared_info.addr + X.SI_EVTCHN_PENDING, p)
    xd.mask(masked)
    ev.repair_pending()
    assert xd.selected == [(0, a)]
