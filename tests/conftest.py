"""Shared fixtures. Integration tests boot real guests: those marked ``kvm`` need /dev/kvm,
those marked ``tcg`` need the software engine (built by tools/setup.sh)."""

from __future__ import annotations

import os

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def _have_tcg() -> bool:
    from pyxen.engine.tcg import TcgEngine
    return TcgEngine.available()


def pytest_collection_modifyitems(config, items):
    skip_kvm = pytest.mark.skip(reason="/dev/kvm is not available")
    skip_tcg = pytest.mark.skip(reason="the software engine is not built (run tools/setup.sh)")
    have_tcg = None
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(skip_kvm)
        if "tcg" in item.keywords:
            if have_tcg is None:
                have_tcg = _have_tcg()
            if not have_tcg:
                item.add_marker(skip_tcg)


@pytest.fixture(scope="session")
def guest_elfs(tmp_path_factory):
    """The in-tree test guests, built once per session with the system gcc."""
    from pyxen.testing.guests import build_guests
    return build_guests(tmp_path_factory.mktemp("guests"))
