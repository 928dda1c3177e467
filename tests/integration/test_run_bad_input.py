"""``pyxen run`` with bad input: one clear line, a non-zero exit, no traceback; a guest that
cannot finish ends as a crash with its console tail."""

from __future__ import annotations

import pytest

from pyxen.cli.main import main


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_missing_kernel(capsys):
    assert main(["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"]) == 1
    err = _err(capsys)
    assert "/nonexistent/vmlinuz" in err and "Traceback" not in err


def test_corrupt_kernel(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(range(256)) * 64)
    assert main(["run", "--kernel", str(junk), "--", "true"]) == 1
    err = _err(capsys)
    assert str(junk) in err and "neither an ELF image nor a bzImage" in err


def test_kernel_without_pvh_note(capsys):
    assert main(["run", "--kernel", "/bin/true", "--", "true"]) == 1
    assert "not a PVH-capable kernel" in _err(capsys)


def test_unknown_accel(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--accel", "vmware", "--", "true"])
    assert e.value.code == 2 and "invalid choice: 'vmware'" in _err(capsys)


def test_initrd_without_kernel(capsys):
    assert main(["run", "--initrd", "/tmp/x", "--", "true"]) == 1
    assert "--initrd needs --kernel" in _err(capsys)


@pytest.mark.tcg
def test_too_little_memory(capsys):
    pytest.importorskip("pyxen.image.build").ensure_image()
    assert main(["run", "--memory", "8", "--", "true"]) == 1
    assert "does not fit in 8 MiB of RAM" in _err(capsys)


@pytest.mark.tcg
def test_corrupt_initramfs_ends_as_crash_with_console_tail(tmp_path, capsys):
    img = pytest.importorskip("pyxen.image.build").ensure_image()
    junk = tmp_path / "initrd"
    junk.write_bytes(b"\x1f\x8b" + bytes(4096))
    rc = main(["run", "--kernel", str(img.kernel), "--initrd", str(junk), "--timeout", "120",
               "--", "true"])
    assert rc == 1
    err = _err(capsys)
    assert "the domain shut down (crash" in err
    assert "Kernel panic" in err                 # the console tail names the cause
