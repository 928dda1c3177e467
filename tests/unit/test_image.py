"""Guest image: cpio writer/reader, module metadata, initramfs layout, run overlay, exit-marker
filter, cache lookup and the apt wrappers. No network; the last test inspects a cached real
image when one exists."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import re
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.errors import ImageError, PyxenError
from pyxen.image import build, cpio, fetch, initramfs, kmod, runspec
from pyxen.image.runspec import ExitMarkerFilter

# ---------------------------------------------------------------------------------- cpio


def sample_entries() -> list[cpio.Entry]:
    return [cpio.directory("bin"), cpio.directory("dev"),
            cpio.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
            cpio.symlink("bin/sh", "busybox"),
            cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666),
            cpio.file("init", b"#!/bin/sh\n", 0o755), cpio.file("empty", b""),
            cpio.file("odd-name-len", b"abc")]


def test_cpio_round_trip_and_determinism():
    entries = sample_entries()
    data = cpio.write_cpio(entries)
    assert data == cpio.write_cpio(sample_entries())
    assert cpio.read_cpio(data) == entries
    assert len(data) % 4 == 0
    assert data.endswith(b"TRAILER!!!\0" + bytes(-(110 + 11) % 4))


def test_cpio_headers():
    data = cpio.write_cpio(sample_entries())
    offsets = [m.start() for m in re.finditer(b"070701", data)]
    assert len(offsets) == len(sample_entries()) + 1
    inos = []
    for off in offsets:
        assert off % 4 == 0
        f = [int(data[off + 6 + 8 * i:off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime = f[:6]
        assert (uid, gid, mtime, f[12]) == (0, 0, 0, 0)
        inos.append(ino)
        name = data[off + 110:off + 110 + f[11] - 1]
        if name == b"dev/console":
            assert stat.S_ISCHR(mode) and (f[9], f[10]) == (5, 1) and f[6] == 0
        if name == b"bin":
            assert stat.S_ISDIR(mode) and nlink == 2
        if name == b"bin/sh":
            assert stat.S_ISLNK(mode) and f[6] == len(b"busybox")
    assert len(set(inos[:-1])) == len(inos) - 1 and 0 not in inos[:-1]


def test_cpio_strips_leading_slash_and_rejects_bad_entries():
    assert cpio.read_cpio(cpio.write_cpio([cpio.file("/init", b"x")]))[0].path == "init"
    for bad in ([cpio.file("", b"")], [cpio.file("TRAILER!!!", b"")],
                [cpio.Entry("d", stat.S_IFDIR | 0o755, b"data")]):
        with pytest.raises(ImageError):
            cpio.write_cpio(bad)
    with pytest.raises(ImageError):
        cpio.read_cpio(b"junk" * 40)
    with pytest.raises(ImageError):
        cpio.read_cpio(cpio.write_cpio(sample_entries())[:300])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="host has no cpio")
def test_cpio_host_tool_lists_archive(tmp_path):
    data = cpio.write_cpio(sample_entries())
    out = subprocess.run(["cpio", "-t"], input=data, capture_output=True, check=True).stdout
    assert out.decode().split() == [e.path for e in sample_entries()]


# ---------------------------------------------------------------------------------- kmod


def fake_module(modinfo: dict[str, list[str]]) -> bytes:
    """A minimal ELF64 LE with a section table holding .shstrtab and .modinfo."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, vs in modinfo.items() for v in vs)
    shstr = b"\0.shstrtab\0.modinfo\0"
    body_off = 64
    info_off = body_off + len(shstr)
    shoff = (info_off + len(info) + 7) & ~7
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 1)
    blob = bytes(hdr) + shstr + info + bytes(shoff - info_off - len(info))

    def sh(name: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, off, size, 0, 0, 1, 0)

    return blob + sh(0, 0, 0) + sh(1, body_off, len(shstr)) + sh(11, info_off, len(info))


def test_modinfo_and_depends():
    elf = fake_module({"depends": ["scsi_mod,scsi-common"], "alias": ["xen:vscsi"],
                       "license": ["GPL"]})
    info = kmod.modinfo(elf)
    assert info["alias"] == ["xen:vscsi"]
    assert kmod.depends(info) == ["scsi_mod", "scsi_common"]
    assert kmod.depends(kmod.modinfo(fake_module({"depends": [""]}))) == []
    with pytest.raises(ImageError):
        kmod.modinfo(b"not an elf" * 10)
    with pytest.raises(ImageError, match="no .modinfo"):
        kmod.modinfo(fake_module({})[:0x3A] + struct.pack("<HHH", 64, 2, 1)
                     + fake_module({})[0x40:])


def test_parse_kconfig():
    cfg = kmod.parse_kconfig('CONFIG_XEN_PVH=y\nCONFIG_XENFS=m\n# CONFIG_FOO is not set\n'
                             'CONFIG_SIG_HASH="sha256"\n# comment\nCONFIG_N=512\n')
    assert cfg == {"CONFIG_XEN_PVH": "y", "CONFIG_XENFS": "m", "CONFIG_FOO": "n",
                   "CONFIG_SIG_HASH": "sha256", "CONFIG_N": "512"}


def test_module_names_and_compression():
    assert kmod.module_name("kernel/drivers/block/xen-blkfront.ko.zst") == "xen_blkfront"
    assert kmod.module_name("xenfs.ko") == "xenfs"
    assert [kmod.compression(p) for p in ("a.ko", "a.ko.xz", "a.ko.zst", "a.ko.gz")] == [
        "none", "xz", "zstd", "gzip"]


def test_decompress_module():
    elf = fake_module({"license": ["GPL"]})
    assert kmod.decompress_module("m.ko", elf) == elf
    assert kmod.decompress_module("m.ko.xz", lzma.compress(elf)) == elf
    assert kmod.decompress_module("m.ko.gz", gzip.compress(elf)) == elf
    assert kmod.decompress_module("m.ko.zst", zstandard.ZstdCompressor().compress(elf)) == elf
    with pytest.raises(ImageError):
        kmod.decompress_module("m.ko.xz", b"garbage")
    with pytest.raises(ImageError):
        kmod.decompress_module("m.ko", b"garbage")


DEPS = {"xen_scsifront": ["scsi_mod"], "scsi_mod": ["scsi_common"], "scsi_common": [],
        "xenfs": ["xen_privcmd"], "xen_privcmd": [], "xen_blkfront": []}


def test_dependency_closure_orders_dependencies_first():
    assert kmod.dependency_closure(["xen-scsifront", "xenfs"], DEPS) == [
        "scsi_common", "scsi_mod", "xen_scsifront", "xen_privcmd", "xenfs"]
    with pytest.raises(ImageError, match="not in the kernel package"):
        kmod.dependency_closure(["nope"], DEPS)
    with pytest.raises(ImageError, match="needed by a"):
        kmod.dependency_closure(["a"], {"a": ["b"]})
    with pytest.raises(ImageError, match="cycle"):
        kmod.dependency_closure(["a"], {"a": ["b"], "b": ["a"]})


def test_modules_dep_and_alias():
    paths = {n: f"kernel/{n.replace('_', '-')}.ko" for n in DEPS}
    text = kmod.modules_dep(paths, DEPS)
    lines = dict(line.split(":", 1) for line in text.splitlines())
    # depmod order: the module to load last comes first; modprobe loads from the end
    assert lines["kernel/xen-scsifront.ko"].split() == ["kernel/scsi-mod.ko",
                                                        "kernel/scsi-common.ko"]
    assert lines["kernel/xen-blkfront.ko"] == ""
    assert text.endswith("\n") and len(lines) == len(DEPS)
    assert kmod.modules_alias({"xen_blkfront": {"alias": ["xen:vbd", "xenblk"]}}) == (
        "alias xen:vbd xen_blkfront\nalias xenblk xen_blkfront\n")


# ---------------------------------------------------------------------------------- initramfs


def base(**overrides) -> list[cpio.Entry]:
    args = dict(busybox=b"\x7fELFbusybox", applets=["bin/sh", "usr/bin/awk", "sbin/modprobe",
                                                     "bin/busybox"],
                release="6.1.0-1-cloud-amd64",
                modules={"kernel/drivers/block/xen-blkfront.ko": b"ko"},
                module_meta={"modules.dep": "kernel/drivers/block/xen-blkfront.ko:\n"},
                autoload=["xen-blkfront"])
    args.update(overrides)
    return initramfs.base_entries(**args)


def test_base_entries_layout():
    entries = base()
    by_path = {e.path: e for e in entries}
    assert len(by_path) == len(entries)
    assert by_path["init"].data == initramfs.INIT_SCRIPT.encode()
    assert by_path["init"].mode & 0o111
    assert by_path["bin/busybox"].kind == "file" and by_path["bin/busybox"].mode & 0o111
    assert by_path["bin/sh"].data == b"../bin/busybox"
    assert by_path["usr/bin/awk"].data == b"../../bin/busybox"
    assert (Path("/x/usr/bin") / by_path["usr/bin/awk"].data.decode()).resolve() == Path(
        "/x/bin/busybox")
    assert by_path["dev/console"].kind == "chardev" and by_path["dev/console"].rdev == (5, 1)
    assert by_path["dev/null"].rdev == (1, 3)
    assert by_path["etc/pyxen/modules"].data == b"xen-blkfront\n"
    mod = "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/block/xen-blkfront.ko"
    assert by_path[mod].data == b"ko"
    assert by_path["lib/modules/6.1.0-1-cloud-amd64/modules.dep"].kind == "file"
    assert by_path["tmp"].mode & 0o7777 == 0o1777
    seen: set[str] = set()
    for e in entries:  # every parent directory comes before its children
        parent = e.path.rpartition("/")[0]
        assert not parent or parent in seen, e.path
        seen.add(e.path)
    assert cpio.write_cpio(entries) == cpio.write_cpio(base())


def test_init_script_is_valid_sh_and_speaks_the_marker():
    script = initramfs.INIT_SCRIPT
    assert script.startswith("#!/bin/sh\n")
    sh = shutil.which("sh")
    if sh:
        subprocess.run([sh, "-n"], input=script.encode(), check=True)
    assert "printf '\\n@@pyxen-exit %s %d@@\\n' \"$nonce\" \"$status\"" in script
    for needle in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "mount -t devpts",
                   "/pyxen/mode", "/pyxen/cmd", "/pyxen/nonce", "/pyxen/modules", "modprobe",
                   "stty -onlcr", "setsid -c", "poweroff -f", "/dev/hvc0"):
        assert needle in script, needle


# ---------------------------------------------------------------------------------- overlay

NONCE = "00112233445566778899aabbccddeeff"


def test_make_overlay_contents():
    entries = {e.path: e for e in cpio.read_cpio(runspec.make_overlay("run", "echo hi; exit 3",
                                                                      NONCE))}
    assert entries["pyxen"].kind == "dir"
    assert entries["pyxen/mode"].data == b"run\n"
    assert entries["pyxen/cmd"].data == b"echo hi; exit 3"
    assert entries["pyxen/nonce"].data == NONCE.encode() + b"\n"
    assert "pyxen/modules" not in entries
    shell = {e.path: e.data for e in cpio.read_cpio(
        runspec.make_overlay("shell", "", NONCE, modules=["xen-netfront"]))}
    assert shell["pyxen/mode"] == b"shell\n" and shell["pyxen/modules"] == b"xen-netfront\n"
    none = {e.path: e.data for e in cpio.read_cpio(runspec.make_overlay("run", "", NONCE, []))}
    assert none["pyxen/modules"] == b""
    assert runspec.make_overlay("run", "x", NONCE) == runspec.make_overlay("run", "x", NONCE)
    assert re.fullmatch("[0-9a-f]{32}", runspec.new_nonce())
    assert runspec.new_nonce() != runspec.new_nonce()


@pytest.mark.parametrize("args", [("boot", "x", NONCE), ("run", "x", "XYZ"),
                                  ("run", "x", "abc"), ("run", "x", NONCE + "\n")])
def test_make_overlay_rejects(args):
    with pytest.raises(ImageError):
        runspec.make_overlay(*args)
    with pytest.raises(ImageError):
        runspec.make_overlay("run", "x", NONCE, modules=["bad name"])


def unpack_like_linux(initrd: bytes) -> list[list[cpio.Entry]]:
    """Archives in an initrd the way init/initramfs.c walks it: gzip members, zero padding,
    and uncompressed archives only at 4-byte aligned offsets."""
    archives, off = [], 0
    while off < len(initrd):
        if initrd[off] == 0:
            off += 1
        elif initrd[off:off + 6] == b"070701":
            assert off % 4 == 0, "uncompressed archive must start 4-byte aligned"
            archives.append(cpio.read_cpio(initrd[off:]))
            off += len(cpio.write_cpio(archives[-1]))
        else:
            d = zlib.decompressobj(wbits=31)
            archives.append(cpio.read_cpio(d.decompress(initrd[off:])))
            off = len(initrd) - len(d.unused_data)
    return archives


def test_combined_initrd(tmp_path):
    base_cpio = cpio.write_cpio(base())
    lengths = set()
    for extra in range(1, 5):  # the gzip name field varies the member's length mod 4
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", filename="x" * extra, mtime=0) as g:
            g.write(base_cpio)
        gz = buf.getvalue()
        lengths.add(len(gz) % 4)
        path = tmp_path / f"initramfs{extra}.cpio.gz"
        path.write_bytes(gz)
        img = build.Image(tmp_path, tmp_path / "vmlinuz", path, "6.1.0-1-cloud-amd64", {})
        data = runspec.combined_initrd(img, "run", "true", NONCE)
        assert data.startswith(gz) and len(data) % 4 == 0
        first, second = unpack_like_linux(data)
        assert first == base()
        assert {e.path for e in second} == {"pyxen", "pyxen/mode", "pyxen/cmd",
                                            "pyxen/nonce"}
    assert lengths == {0, 1, 2, 3}
    for n in range(5):
        padded = runspec.concat_initrd(b"x" * n, b"070701")
        assert padded[-6:] == b"070701" and (len(padded) - 6) % 4 == 0
    with pytest.raises(ImageError):
        runspec.combined_initrd(build.Image(tmp_path, tmp_path / "k", tmp_path / "missing",
                                            "r", {}), "run", "true", NONCE)


# ---------------------------------------------------------------------------------- marker


def marker(status: int, nonce: str = NONCE, eol: bytes = b"\n") -> bytes:
    return b"\n@@pyxen-exit " + nonce.encode() + b" %d@@" % status + eol


def run_filter(chunks: list[bytes], nonce: str = NONCE) -> tuple[bytes, int | None]:
    f = ExitMarkerFilter(nonce)
    out = b"".join(f.feed(c) for c in chunks) + f.flush()
    return out, f.status


def reference(stream: bytes, nonce: str = NONCE) -> tuple[bytes, int | None]:
    m = re.search(rb"\n@@pyxen-exit " + nonce.encode() + rb" (\d{1,10})@@\r?\n", stream)
    if not m:
        return stream, None
    return stream[:m.start()] + stream[m.end():], int(m.group(1))


def test_marker_basic():
    assert run_filter([b"hello\n" + marker(0)]) == (b"hello\n", 0)
    assert run_filter([b"no newline" + marker(42)]) == (b"no newline", 42)
    assert run_filter([marker(255) + b"reboot: Power down\n"]) == (b"reboot: Power down\n",
                                                                 255)
    assert run_filter([b"x" + marker(3, eol=b"\r\n")]) == (b"x", 3)
    assert run_filter([b"plain output\n"]) == (b"plain output\n", None)


def test_marker_rejects_lookalikes():
    for s in (marker(1, nonce="ffffffffffffffff"), b"\n@@pyxen-exit " + NONCE.encode()
              + b" x@@\n", b"\n@@pyxen-exit " + NONCE.encode() + b" @@\n",
              b"\n@@pyxen-exit " + NONCE.encode() + b" 12345678901@@\n",
              b"\n@@pyxen-exit " + NONCE.encode() + b" 1@\n", b"@@pyxen-exit " + NONCE.encode()
              + b" 1@@\n"):
        assert run_filter([s]) == (s, None), s
    # a lookalike followed by the real one: only the real one goes
    fake = b"\n@@pyxen-exit " + NONCE.encode() + b" 1@x"
    assert run_filter([fake + marker(9)]) == (fake, 9)
    # only the first marker counts; later text (even another marker) passes through
    assert run_filter([marker(1) + marker(2)]) == (marker(2), 1)


def test_marker_split_at_every_position():
    stream = b"out\n" + marker(17) + b"tail"
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert run_filter([stream[:i], stream[i:j], stream[j:]]) == (b"out\ntail", 17)


def test_marker_holds_back_only_a_possible_prefix():
    f = ExitMarkerFilter(NONCE)
    assert f.feed(b"abc\n") == b"abc"            # "\n" might start the marker
    assert f.feed(b"def") == b"\ndef"
    assert f.feed(b"\n@@pyx") == b""
    assert f.feed(b"z") == b"\n@@pyxz"
    assert f.feed(b"a@@b\n@@x") == b"a@@b\n@@x"   # "\n@@x" cannot start the marker
    assert f.feed(b"\n@@pyxen-exit " + NONCE.encode() + b" 12") == b""
    assert f.feed(b"3@@") == b""
    assert f.status is None
    assert f.feed(b"\nafter") == b"after" and f.status == 123
    assert f.feed(b"\n") == b"\n"                 # after the marker: no holding back


def test_marker_after_idle_flush():
    f = ExitMarkerFilter(NONCE)
    assert f.feed(b"line\n") == b"line"
    assert f.flush() == b"\n"                     # idle: show the newline now
    assert f.feed(marker(5)[1:]) == b""           # marker's newline was already shown
    assert f.status == 5
    g = ExitMarkerFilter(NONCE)
    assert g.feed(b"a\n") + g.flush() + g.feed(marker(6)) == b"a\n" and g.status == 6
    h = ExitMarkerFilter(NONCE)
    assert h.feed(b"\n") + h.flush() + h.feed(b"x\n") + h.flush() == b"\nx\n"
    assert h.status is None


_pieces = st.sampled_from([b"\n", b"\r", b"@", b"@@", b"1", b"42", b"x", b"out put",
                           b"\n@@pyxen-exit ", NONCE.encode(), b" ", b"ffff",
                           marker(0), marker(7, eol=b"\r\n"), marker(1, nonce="abcd1234"),
                           marker(3)[:-3], b"\n@@pyxen-exit " + NONCE.encode()])


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=12), st.lists(st.integers(0, 400), max_size=8))
def test_marker_chunking_never_matters(pieces, cuts):
    stream = b"".join(pieces)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run_filter(chunks) == reference(stream)
    assert run_filter([bytes([b]) for b in stream]) == reference(stream)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 10**6), st.binary(max_size=50))
def test_marker_in_random_bytes(before, status, after):
    stream = before + marker(status) + after
    out, got = run_filter([stream[i:i + 7] for i in range(0, len(stream), 7)])
    assert (out, got) == reference(stream)
    assert got is not None


def test_marker_hold_back_is_bounded():
    f = ExitMarkerFilter(NONCE)
    limit = len(f.prefix) + 10 + 3
    for piece in (b"\n@@pyxen-exit " + NONCE.encode() + b" 1234567890", b"@@\r"):
        f.feed(piece)
        assert len(f._held) <= limit


# ---------------------------------------------------------------------------------- cache


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PYXEN_CACHE_DIR", str(tmp_path / "env"))
    assert build.cache_root() == tmp_path / "env"
    assert build.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert build.images_dir() == tmp_path / "env" / "images"
    monkeypatch.delenv("PYXEN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build.cache_root() == tmp_path / "home" / ".cache" / "pyxen"


def fake_image(cache: Path, version: str, kernel: bytes = b"kernel") -> Path:
    d = cache / "images" / f"debian-cloud-{version}"
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(kernel)
    (d / "initramfs.cpio.gz").write_bytes(b"initramfs")
    files = {n: {"sha256": build._sha256(d / n), "size": (d / n).stat().st_size}
             for n in ("vmlinuz", "initramfs.cpio.gz")}
    (d / "manifest.json").write_text(json.dumps({
        "format": build.FORMAT, "recipe": build.recipe(), "files": files,
        "kernel": {"release": f"{version}-cloud-amd64"}}))
    return d


def test_find_image(tmp_path):
    assert build.find_image(tmp_path) is None
    fake_image(tmp_path, "6.1.9-1")
    newest = fake_image(tmp_path, "6.1.10-1")
    img = build.find_image(tmp_path)
    assert img is not None and img.directory == newest
    assert img.kernel == newest / "vmlinuz" and img.release == "6.1.10-1-cloud-amd64"
    (newest / "vmlinuz").write_bytes(b"kernex")       # same size, different content
    assert build.find_image(tmp_path).directory.name == "debian-cloud-6.1.9-1"
    assert build.find_image(tmp_path, verify=False).directory == newest
    stale = tmp_path / "images" / "debian-cloud-6.1.9-1" / "manifest.json"
    m = json.loads(stale.read_text())
    stale.write_text(json.dumps(dict(m, recipe="old")))
    assert build.find_image(tmp_path) is None


def test_ensure_image_uses_cache_without_network(tmp_path, monkeypatch):
    fake_image(tmp_path, "6.1.10-1")

    def no_network(*a, **k):
        raise AssertionError("must not fetch")
    monkeypatch.setattr(build, "_build", no_network)
    assert build.ensure_image(tmp_path).release == "6.1.10-1-cloud-amd64"


# ---------------------------------------------------------------------------------- fetch


def test_parse_depends():
    text = ("linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
            "  Recommends: firmware\n")
    assert fetch.parse_depends(text, "linux-image-") == "linux-image-6.1.0-56-cloud-amd64"
    assert fetch.parse_depends("x\n |Depends: linux-image-a\n", "linux-image-") == (
        "linux-image-a")
    with pytest.raises(ImageError):
        fetch.parse_depends("x\n  Depends: <linux-image-virtual>\n", "linux-image-")


def test_run_errors_name_the_step():
    with pytest.raises(ImageError, match="frobbing: `no-such-tool-pyxen` not found"):
        fetch.run(["no-such-tool-pyxen"], what="frobbing")
    with pytest.raises(ImageError, match=r"(?s)probing: `sh -c .*` failed \(exit 3\).*boom"):
        fetch.run(["sh", "-c", "echo boom >&2; exit 3"], what="probing")
    assert fetch.run(["sh", "-c", "echo ok"], what="x") == "ok\n"
    assert issubclass(ImageError, PyxenError)


def test_apt_updates_once_and_retries(monkeypatch, tmp_path):
    calls: list[list[str]] = []
    state = {"lists": False}

    def fake_run(cmd, *, cwd=None, what):
        calls.append(list(cmd))
        if "update" in cmd:
            state["lists"] = True
            return ""
        if not state["lists"]:
            raise ImageError(f"{what}: E: Unable to locate package")
        if cmd[0] == "apt-cache":
            return "m\n  Depends: linux-image-6.1.0-9-cloud-amd64\n"
        for p in cmd[cmd.index("download") + 1:]:
            (cwd / f"{p}_1.0_amd64.deb").write_bytes(b"")
        return ""

    monkeypatch.setattr(fetch, "run", fake_run)
    apt = fetch.Apt(lambda msg: None)
    assert apt.resolve_dependency("m", "linux-image-") == "linux-image-6.1.0-9-cloud-amd64"
    debs = apt.download(["busybox-static", "linux-image-6.1.0-9-cloud-amd64"], tmp_path)
    assert debs["busybox-static"] == tmp_path / "busybox-static_1.0_amd64.deb"
    assert sum("update" in c for c in calls) == 1
    state["lists"] = False                         # a second failure is not retried again
    with pytest.raises(ImageError, match="Unable to locate"):
        apt.resolve_dependency("m", "linux-image-")


# ---------------------------------------------------------------------------------- real image


def test_cached_real_image_if_present():
    """Inspects an image built earlier by ``ensure_image`` (skipped when there is none)."""
    img = build.find_image()
    if img is None:
        pytest.skip("no cached guest image (build one with pyxen.image.ensure_image())")
    assert img.kernel.read_bytes()[0x202:0x206] == b"HdrS"   # bzImage setup header
    entries = {e.path: e for e in cpio.read_cpio(gzip.decompress(img.initramfs.read_bytes()))}
    for path in ("init", "bin/busybox", "bin/sh", "sbin/modprobe", "sbin/poweroff",
                 "dev/console", "dev/null", "etc/pyxen/modules",
                 f"lib/modules/{img.release}/modules.dep"):
        assert path in entries, path
    assert entries["dev/console"].rdev == (5, 1)
    for rel in img.manifest["modules"]:
        assert entries[f"lib/modules/{img.release}/{rel}"].data[:4] == b"\x7fELF"


def test_build_pipeline_with_fake_packages(tmp_path, monkeypatch):
    """ensure_image end to end with apt/dpkg replaced: module selection, compressed modules,
    modules.dep, manifest, reuse, rebuild on tampering."""
    release = "6.1.0-9-cloud-amd64"
    config = "\n".join(f"{o}=y" for o in build.REQUIRED_BUILTIN) + "\nCONFIG_XENFS=m\n"
    mods = {"kernel/drivers/block/xen-blkfront.ko.xz": ({"alias": ["xen:vbd"]}, "xz"),
            "kernel/drivers/net/xen-netfront.ko": ({}, None),
            "kernel/drivers/scsi/xen-scsifront.ko.zst": ({"depends": ["scsi_mod"]}, "zstd"),
            "kernel/drivers/scsi/scsi_mod.ko": ({"depends": [""]}, None),
            "kernel/drivers/xen/xenfs/xenfs.ko": ({"depends": ["xen-privcmd"]}, None),
            "kernel/drivers/xen/xen-privcmd.ko": ({}, None),
            "kernel/fs/unrelated.ko": ({}, None)}

    class FakeApt:
        def __init__(self, progress):
            self.calls = 0

        def update(self):
            pass

        def resolve_dependency(self, meta, prefix):
            return f"linux-image-{release}"

        def candidate_version(self, package):
            return "6.1.99-1"

        def download(self, packages, dest):
            return {p: dest / f"{p}.deb" for p in packages}

    def fake_extract(deb, dest):
        if "busybox" in deb.name:
            (dest / "bin").mkdir(parents=True)
            (dest / "bin" / "busybox").write_bytes(b"\x7fELF-busybox")
            return dest
        (dest / "boot").mkdir(parents=True)
        (dest / "boot" / f"vmlinuz-{release}").write_bytes(b"bzImage")
        (dest / "boot" / f"config-{release}").write_text(config)
        moddir = dest / "lib" / "modules" / release
        for rel, (info, comp) in mods.items():
            elf = fake_module(info)
            data = {"xz": lzma.compress, "zstd": zstandard.ZstdCompressor().compress}.get(
                comp, lambda d: d)(elf)
            (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
            (moddir / rel).write_bytes(data)
        (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
        return dest

    monkeypatch.setattr(build, "Apt", FakeApt)
    monkeypatch.setattr(build, "extract", fake_extract)
    monkeypatch.setattr(build, "deb_fields", lambda deb, f: {f: "6.1.99-1"})
    monkeypatch.setattr(build, "_applets", lambda p: ["bin/sh", "sbin/modprobe"])
    msgs: list[str] = []
    img = build.ensure_image(tmp_path, progress=msgs.append)
    assert img.directory == tmp_path / "images" / "debian-cloud-6.1.99-1"
    assert img.release == release and img.kernel.read_bytes() == b"bzImage"
    assert any("built" in m for m in msgs)
    m = img.manifest
    assert m["modules"] == sorted(["kernel/drivers/block/xen-blkfront.ko",
                                   "kernel/drivers/net/xen-netfront.ko",
                                   "kernel/drivers/scsi/xen-scsifront.ko",
                                   "kernel/drivers/scsi/scsi_mod.ko",
                                   "kernel/drivers/xen/xenfs/xenfs.ko",
                                   "kernel/drivers/xen/xen-privcmd.ko"])
    assert m["module_compression"] == ["none", "xz", "zstd"]
    assert m["autoload"] == ["xen-blkfront", "xen-netfront"]
    assert m["xen_config"]["CONFIG_XEN_PVH"] == "y" and m["xen_config"]["CONFIG_XENFS"] == "m"
    entries = {e.path: e for e in cpio.read_cpio(gzip.decompress(img.initramfs.read_bytes()))}
    moddir = f"lib/modules/{release}"
    assert entries[f"{moddir}/kernel/drivers/block/xen-blkfront.ko"].data == fake_module(
        {"alias": ["xen:vbd"]})
    dep = entries[f"{moddir}/modules.dep"].data.decode()
    assert "kernel/drivers/scsi/xen-scsifront.ko: kernel/drivers/scsi/scsi_mod.ko\n" in dep
    assert "alias xen:vbd xen_blkfront" in entries[f"{moddir}/modules.alias"].data.decode()
    assert entries["etc/pyxen/modules"].data == b"xen-blkfront\nxen-netfront\n"
    assert entries["sbin/modprobe"].data == b"../bin/busybox"

    monkeypatch.setattr(build, "_build", lambda *a: pytest.fail("rebuilt a valid image"))
    assert build.ensure_image(tmp_path) == img
    monkeypatch.undo()
    monkeypatch.setattr(build, "Apt", FakeApt)
    monkeypatch.setattr(build, "extract", fake_extract)
    monkeypatch.setattr(build, "deb_fields", lambda deb, f: {f: "6.1.99-1"})
    monkeypatch.setattr(build, "_applets", lambda p: ["bin/sh"])
    img.initramfs.write_bytes(b"tampered")
    again = build.ensure_image(tmp_path)
    assert again.initramfs.read_bytes() != b"tampered"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        ".lock", "debian-cloud-6.1.99-1"]

    config_missing = config.replace("CONFIG_XEN_PVH=y", "CONFIG_XEN_PVH=n")
    config = config_missing
    with pytest.raises(ImageError, match="CONFIG_XEN_PVH"):
        build.ensure_image(tmp_path / "other")


# ---------------------------------------------------------------------------------- overlay files


def test_make_overlay_files():
    files = {"/usr/local/bin/tool": b"\x7fELF-tool", "usr/bin/iobench": bytearray(b"io"),
             "pyxen/extra/x": b""}
    data = runspec.make_overlay("run", "tool", NONCE, files=files)
    assert data == runspec.make_overlay("run", "tool", NONCE, files=dict(reversed(files.items())))
    entries = cpio.read_cpio(data)
    by_path = {e.path: e for e in entries}
    assert by_path["usr/local/bin/tool"].data == b"\x7fELF-tool"
    assert by_path["usr/bin/iobench"].data == b"io"
    for p in ("usr/local/bin/tool", "usr/bin/iobench", "pyxen/extra/x"):
        assert by_path[p].kind == "file" and by_path[p].mode & 0o777 == 0o755
    # missing parents come before their files; the base image's directories are not repeated
    dirs = [e.path for e in entries if e.kind == "dir"]
    assert dirs == ["pyxen", "pyxen/extra", "usr/local", "usr/local/bin"]
    assert by_path["usr/local/bin"].mode & 0o777 == 0o755
    order = [e.path for e in entries]
    assert order.index("usr/local") < order.index("usr/local/bin") < order.index(
        "usr/local/bin/tool")
    assert runspec.make_overlay("run", "x", NONCE, files={}) == runspec.make_overlay(
        "run", "x", NONCE)
    # through concat_initrd: Linux sees the files in the second archive
    gz = gzip.compress(cpio.write_cpio(base()), mtime=0)
    first, second = unpack_like_linux(runspec.concat_initrd(gz, data))
    assert first == base()
    assert {e.path for e in second} >= set(p.lstrip("/") for p in files)
    alone = cpio.read_cpio(runspec.files_archive(files))
    assert [e.path for e in alone] == [e.path for e in entries if not e.path.startswith(
        "pyxen") or e.path.startswith("pyxen/extra")]


@pytest.mark.parametrize("files", [{"init": b"x"}, {"pyxen/cmd": b"x"}, {"tmp": b"x"},
                                   {"../etc/x": b"x"}, {"a//b": b"x"}, {"": b"x"},
                                   {"a/./b": b"x"}, {"dev/x": b"x"}, {"proc/x": b"x"},
                                   {"a b": b"x"}, {"a": "text"}, {"a": b"x", "a/b": b"y"},
                                   {"x": b"1", "/x": b"2"}, {"etc/pyxen": b"x"}])
def test_make_overlay_rejects_bad_files(files):
    with pytest.raises(ImageError):
        runspec.make_overlay("run", "x", NONCE, files=files)
