"""Shared fixtures. Integration tests (marked ``kvm``) boot real guests and need /dev/kvm."""

from __future__ import annotations

import os

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="/dev/kvm is not available")
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest_elfs(tmp_path_factory):
    """The in-tree test guests, built once per session with the system gcc."""
    from pyxen.testing.guests import build_guests
    return build_guests(tmp_path_factory.mktemp("guests"))
