"""Random hypercall arguments thrown at a real domain: every call ends in a Xen errno or a
result, the VMM never raises, and the domain's Xen state stays usable afterwards."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxen.cpustate import Regs
from pyxen.testing.guests import GuestSpec
from pyxen.vmm.builder import DomainConfig, build
from pyxen.xen.abi import errno as E


IMPLEMENTED = [12, 15, 17, 18, 20, 21, 24, 29, 32, 34]
XEN_ERRNOS = {v for k, v in vars(E).items() if k.isupper() and isinstance(v, int)}


class _FuzzEngineVcpu:
    """Presents fuzzed registers; everything else goes to the real (parked) vCPU."""

    def __init__(self, real, regs):
        self.real = real
        self.regs = regs

    def get_regs(self):
        return self.regs

    def __getattr__(self, name):
        return getattr(self.real, name)


class _FuzzVcpu:
    def __init__(self, real_vcpu, regs):
        self.index = real_vcpu.index
        self.domain = real_vcpu.domain
        self.apic_id = real_vcpu.apic_id
        self.ev = _FuzzEngineVcpu(real_vcpu.ev, regs)


@pytest.fixture(scope="module", params=[pytest.param("kvm", marks=pytest.mark.kvm),
                                        pytest.param("tcg", marks=pytest.mark.tcg)])
def parked_domain(request, guest_elfs):
    """The boot guest, run to completion: a live domain in long mode with paging on."""
    spec = GuestSpec("boot")
    vmm = build(DomainConfig(kernel=str(guest_elfs / f"{spec.name}.elf"), memory=16,
                             name="fuzz", accel=request.param))
    vmm.start()
    assert vmm.wait(60) is not None
    yield vmm
    vmm.destroy()


addresses = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 16 << 20),
                      st.sampled_from([0, 0x1000, 0x100000, 0xFEFFF000, 0xFFFFFFFFFFFFF000]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(nr=st.one_of(st.sampled_from(IMPLEMENTED), st.integers(0, 2**64 - 1)),
       cmd=st.one_of(st.integers(0, 30), st.integers(0, 2**64 - 1)),
       a2=addresses, a3=st.integers(0, 2**64 - 1), a4=addresses, a5=addresses)
def test_random_hypercalls_get_an_errno_never_an_exception(parked_domain, nr, cmd, a2, a3, a4, a5):
    xd = parked_domain.xen
    real = parked_domain.domain.vcpus[0]
    regs = Regs(rax=nr, rdi=cmd, rsi=a2, rdx=a3, r10=a4, r8=a5)
    result = xd.hypercall(_FuzzVcpu(real, regs))
    if isinstance(result, int) and result < 0:
        assert -result in XEN_ERRNOS, f"hypercall {nr} returned non-Xen errno {result}"


def test_xen_state_still_consistent_after_fuzzing(parked_domain):
    ev = parked_domain.xen.evtchn
    seen = set()
    for (vcpu, virq), port in ev.virqs.items():
        assert ev.ports[port].virq == virq and ev.ports[port].notify_vcpu == vcpu
        assert port not in seen
        seen.add(port)
