"""The kvm engine's vCPU state blob framing (pyxen.engine.kvm.pack_state/parse_state): no
/dev/kvm needed; loading blobs into real vCPUs is tests/integration/test_kvm_migration_state."""

from __future__ import annotations

import struct

import pytest

from pyxen.engine.kvm import STATE_FORMAT, STATE_MAGIC, STATE_VERSION, pack_state, parse_state
from pyxen.errors import EngineError

SIZES = {b"REGS": 144, b"SREG": 312, b"XSAV": 4096, b"MSRS": 24, b"LAPC": 1024,
         b"EVNT": 64, b"MPST": 4}


def sections(**replace: bytes) -> list[tuple[bytes, bytes]]:
    out = [(tag, bytes([i]) * size) for i, (tag, size) in enumerate(SIZES.items())]
    out.append((b"ENGN", struct.pack("<IBB", 0, 1, 1) + struct.pack("<Q", 0x1000)))
    return [(t, replace.get(t.decode().strip("_"), p)) for t, p in out]


def test_round_trip():
    secs = sections()
    blob = pack_state(secs)
    assert blob[:8] == STATE_MAGIC and STATE_FORMAT == f"kvm:{STATE_VERSION}"
    assert parse_state(blob) == dict(secs)


@pytest.mark.parametrize("mutate, why", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:10], "shorter than the 16-byte header"),
    (lambda b: b"XXXXXXXX" + b[8:], "magic"),
    (lambda b: b[:8] + struct.pack("<I", STATE_VERSION + 1) + b[12:], "version"),
    (lambda b: b + b"\0", "after the last section"),
    (lambda b: b[:12] + struct.pack("<I", 99) + b[16:], "truncated"),
])
def test_framing_errors(mutate, why):
    with pytest.raises(EngineError, match=why):
        parse_state(mutate(pack_state(sections())))


@pytest.mark.parametrize("secs, why", [
    ([s for s in sections() if s[0] != b"LAPC"], "missing section.*LAPC"),
    ([s for s in sections() if s[0] != b"XSAV"], "missing section.*XSAV or FPU_"),
    (sections(LAPC=bytes(1000)), "LAPC is 1000 bytes, expected 1024"),
    (sections(XSAV=bytes(4000)), "XSAV is 4000 bytes, at least 4096"),
    (sections(MSRS=bytes(13)), "MSRS is 13 bytes"),
    (sections(ENGN=struct.pack("<IBB", 0, 0, 2) + bytes(8)), "ENGN is 14 bytes for 2"),
    (sections(ENGN=struct.pack("<IBB", 0, 7, 0)), "pending-exit code 7"),
    (sections() + [(b"REGS", bytes(144))], "REGS appears twice"),
    (sections() + [(b"WHAT", b"")], "unknown section 'WHAT'"),
])
def test_section_errors(secs, why):
    with pytest.raises(EngineError, match=why):
        parse_state(pack_state(secs))
