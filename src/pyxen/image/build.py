"""The guest image for ``pyxen run``: Debian's cloud kernel plus a busybox initramfs, cached.

Cache: ``$PYXEN_CACHE_DIR`` if set, else ``~/.cache/pyxen``; images live in
``<cache>/images/debian-cloud-<kernel package version>/`` as ``vmlinuz`` (the bzImage from
``linux-image-<release>-cloud-amd64``), ``initramfs.cpio.gz`` and ``manifest.json`` (versions,
sha256 and size of both files, modules included, Xen config options, a recipe hash of the
init script and module choice). Nothing of it is in git.

:func:`ensure_image` returns a valid cached image (no network) or builds one: it resolves
``linux-image-cloud-amd64`` to its real kernel package, downloads that and ``busybox-static``
with ``apt-get download`` (``apt-get update`` once if a lookup fails, or first with
``refresh=True``), unpacks them with ``dpkg-deb`` and writes the image atomically (staging
directory + rename, under ``<cache>/images/.lock``).
:func:`find_image` only looks. Layout and ``/init`` are in :mod:`pyxen.image.initramfs`.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyxen.errors import ImageError
from pyxen.image import cpio, kmod
from pyxen.image.fetch import Apt, deb_fields, extract
from pyxen.image.initramfs import INIT_SCRIPT, base_entries

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
IMAGE_PREFIX = "debian-cloud-"
FORMAT = 1  # bump when the image layout changes in a way the recipe hash does not cover

#: Xen frontend modules put in the image when the kernel has them as modules.
FRONTENDS = ("xen-blkfront", "xen-netfront", "xen-scsifront", "xen-pcifront", "xen-tpmfront",
             "xen-kbdfront", "xen-fbfront", "9pnet_xen")
#: Xen device interfaces for guest user space (xenstore/evtchn/grant tools), also included.
XEN_DEVICES = ("xen-evtchn", "xenfs", "xen-privcmd", "xen-gntdev", "xen-gntalloc")
#: virtio drivers for the benchmarks' QEMU peer (``-M microvm``: virtio-mmio devices found
#: through ACPI), so both sides boot the same kernel and initramfs. Not autoloaded: a run
#: names them in its overlay's module list (``make_overlay(modules=...)``).
VIRTIO = ("virtio_mmio", "virtio_blk", "virtio_net")
#: Loaded by /init at boot when present (xen-pcifront refuses to load outside PV guests).
AUTOLOAD = ("xen-blkfront", "xen-netfront")
#: Options the kernel must have built in for the image to boot as a PVH guest.
REQUIRED_BUILTIN = ("CONFIG_XEN_PVH", "CONFIG_HVC_XEN", "CONFIG_BLK_DEV_INITRD",
                    "CONFIG_RD_GZIP", "CONFIG_DEVTMPFS", "CONFIG_TMPFS")

Progress = Callable[[str], object]


@dataclass(frozen=True)
class Image:
    """A built image: ``kernel`` (bzImage), ``initramfs`` (gzip cpio), the kernel release
    (``uname -r`` in the guest) and the parsed manifest."""

    directory: Path
    kernel: Path
    initramfs: Path
    release: str
    manifest: dict[str, Any] = field(compare=False)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$PYXEN_CACHE_DIR``, else ``~/.cache/pyxen``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PYXEN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pyxen"


def images_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return cache_root(cache_dir) / "images"


def recipe() -> str:
    """Hash of everything in this code that shapes an image; a change invalidates caches."""
    spec = json.dumps({"format": FORMAT, "init": INIT_SCRIPT, "frontends": FRONTENDS,
                       "devices": XEN_DEVICES, "virtio": VIRTIO,
                       "autoload": AUTOLOAD}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _version_key(text: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|\D+", text)]


def load_image(directory: Path, verify: bool = True) -> Image | None:
    """The image in ``directory`` if its manifest is current and (``verify``) its files match
    the recorded sha256; None otherwise."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or manifest.get("recipe") != recipe():
            return None
        for name in ("vmlinuz", "initramfs.cpio.gz"):
            path = directory / name
            if path.stat().st_size != files[name]["size"]:
                return None
            if verify and _sha256(path) != files[name]["sha256"]:
                return None
        release = manifest["kernel"]["release"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Image(directory, directory / "vmlinuz", directory / "initramfs.cpio.gz", release,
                 manifest)


def find_image(cache_dir: str | os.PathLike[str] | None = None,
               verify: bool = True) -> Image | None:
    """The newest valid cached image, without downloading anything; None if there is none."""
    root = images_dir(cache_dir)
    try:
        candidates = sorted((d for d in root.iterdir() if d.name.startswith(IMAGE_PREFIX)),
                            key=lambda d: _version_key(d.name[len(IMAGE_PREFIX):]),
                            reverse=True)
    except OSError:
        return None
    for d in candidates:
        if (img := load_image(d, verify)) is not None:
            return img
    return None


def ensure_image(cache_dir: str | os.PathLike[str] | None = None,
                 progress: Progress | None = None, refresh: bool = False) -> Image:
    """A valid image, from the cache (no network) or freshly built. ``refresh`` runs
    ``apt-get update`` and builds the current kernel package's image unless it is cached."""
    say: Progress = progress or (lambda _msg: None)
    if not refresh and (img := find_image(cache_dir)) is not None:
        return img
    root = images_dir(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(f"cannot create image cache {root}: {e.strerror}") from e
    with _locked(root / ".lock"):
        if not refresh and (img := find_image(cache_dir)) is not None:
            return img  # built by someone else while we waited
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
            return _build(root, Path(tmp), say, refresh)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(root: Path, tmp: Path, say: Progress, refresh: bool) -> Image:
    t0 = time.monotonic()
    apt = Apt(say)
    if refresh:
        apt.update()
    kernel_pkg = apt.resolve_dependency(KERNEL_METAPACKAGE, "linux-image-")
    target = root / f"{IMAGE_PREFIX}{apt.candidate_version(kernel_pkg)}"
    if (img := load_image(target)) is not None:
        say(f"image for {kernel_pkg} is already current: {target}")
        return img
    (tmp / "debs").mkdir()
    debs = apt.download([kernel_pkg, BUSYBOX_PACKAGE], tmp / "debs")
    kver = deb_fields(debs[kernel_pkg], "Version")["Version"]
    bver = deb_fields(debs[BUSYBOX_PACKAGE], "Version")["Version"]
    target = root / f"{IMAGE_PREFIX}{kver}"

    say(f"unpacking {kernel_pkg} {kver} and {BUSYBOX_PACKAGE} {bver}")
    kroot = extract(debs[kernel_pkg], tmp / "kernel")
    broot = extract(debs[BUSYBOX_PACKAGE], tmp / "busybox")
    release, moddir = _kernel_release(kroot)
    vmlinuz = kroot / "boot" / f"vmlinuz-{release}"
    config = kmod.parse_kconfig(_read(kroot / "boot" / f"config-{release}").decode())
    missing = [o for o in REQUIRED_BUILTIN if config.get(o) != "y"]
    if missing:
        raise ImageError(f"{kernel_pkg}: kernel lacks built-in {', '.join(missing)}")

    say("collecting modules")
    modules, meta, mod_facts = _collect_modules(moddir)
    busybox_path = broot / "bin" / "busybox"
    busybox = _read(busybox_path)
    applets = _applets(busybox_path)
    autoload = [m for m in AUTOLOAD if kmod.module_name(m) in mod_facts["names"]]
    entries = base_entries(busybox=busybox, applets=applets, release=release,
                           modules=modules, module_meta=meta, autoload=autoload)
    say(f"writing initramfs ({len(entries)} entries)")
    archive = cpio.write_cpio(entries)

    out = tmp / "out"
    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    (out / "initramfs.cpio.gz").write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
    manifest = {
        "format": FORMAT,
        "recipe": recipe(),
        "kernel": {"package": kernel_pkg, "version": kver, "release": release,
                   "metapackage": KERNEL_METAPACKAGE},
        "busybox": {"package": BUSYBOX_PACKAGE, "version": bver, "applets": len(applets)},
        "files": {name: {"sha256": _sha256(out / name), "size": (out / name).stat().st_size}
                  for name in ("vmlinuz", "initramfs.cpio.gz")},
        "initramfs_uncompressed_size": len(archive),
        "modules": sorted(modules),
        "module_compression": mod_facts["compression"],
        "autoload": autoload,
        "xen_config": {o: config.get(o, "n") for o in kmod.XEN_OPTIONS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if target.exists():
        target.rename(tmp / "old")
    out.rename(target)
    say(f"built {target} in {time.monotonic() - t0:.1f}s")
    img = load_image(target)
    if img is None:
        raise ImageError(f"{target}: freshly built image does not verify")
    return img


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from e


def _kernel_release(kroot: Path) -> tuple[str, Path]:
    """The kernel release and its modules directory in an unpacked kernel package."""
    dirs = [d for base in ("lib/modules", "usr/lib/modules") if (kroot / base).is_dir()
            for d in (kroot / base).iterdir() if d.is_dir()]
    if len(dirs) != 1:
        raise ImageError(f"kernel package: expected one modules directory, found "
                         f"{[d.name for d in dirs]}")
    release = dirs[0].name
    if not (kroot / "boot" / f"vmlinuz-{release}").is_file():
        raise ImageError(f"kernel package: no /boot/vmlinuz-{release}")
    return release, dirs[0]


def _collect_modules(moddir: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, Any]]:
    """Plain .ko bytes by relative path, modules.* text files, and facts for the manifest."""
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        if any(p.name.endswith(s) for s in kmod.MODULE_SUFFIXES):
            index[kmod.module_name(p.name)] = p
    wanted = [kmod.module_name(m) for m in FRONTENDS + XEN_DEVICES + VIRTIO
              if kmod.module_name(m) in index]
    deps: dict[str, list[str]] = {}
    infos: dict[str, dict[str, list[str]]] = {}
    plain: dict[str, bytes] = {}
    queue = list(wanted)
    while queue:
        name = queue.pop()
        if name in deps:
            continue
        if name not in index:
            raise ImageError(f"module {name} is needed but not in the kernel package")
        path = index[name]
        plain[name] = kmod.decompress_module(str(path), _read(path))
        infos[name] = kmod.modinfo(plain[name], path.name)
        deps[name] = kmod.depends(infos[name])
        queue.extend(deps[name])
    rel = {n: str(index[n].relative_to(moddir)) for n in deps}
    rel = {n: re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", r) for n, r in rel.items()}
    meta = {"modules.dep": kmod.modules_dep(rel, deps),
            "modules.alias": kmod.modules_alias(infos)}
    builtin = moddir / "modules.builtin"
    if builtin.is_file():
        meta["modules.builtin"] = _read(builtin).decode()
    compressions = sorted({kmod.compression(str(index[n])) for n in deps})
    facts = {"names": set(deps), "compression": compressions}
    return {rel[n]: plain[n] for n in deps}, meta, facts


def _applets(busybox: Path) -> list[str]:
    """``busybox --list-full`` of the unpacked (static, x86-64) busybox, run on the host."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ImageError(f"{busybox} --list-full failed: {e}") from e
    applets = sorted({line.strip() for line in out.splitlines() if line.strip()})
    if "bin/sh" not in applets:
        raise ImageError(f"{busybox} --list-full has no bin/sh")
    return applets


def elf_kernel(image: Image) -> Path:
    """The image's kernel as a plain ELF ``vmlinux`` (extracted once from the bzImage and kept
    next to it): loading it skips decompressing ~14 MB on every boot."""
    from pyxen.arch.x86.bzimage import extract_elf
    out = image.directory / "vmlinux"
    src = image.kernel
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(extract_elf(src.read_bytes(), str(src)))
    os.replace(tmp, out)
    return out


#: Name of the stable directory in the image store that points at the current image.
STABLE_NAME = "debian"


def publish(image: Image, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Point ``<images>/debian/vmlinuz`` (the ELF kernel) and ``<images>/debian/initrd.img``
    at ``image``, for configuration files (``examples/debian.cfg``) that name the image by a
    stable path. Returns the two paths."""
    stable = images_dir(cache_dir) / STABLE_NAME
    stable.mkdir(parents=True, exist_ok=True)
    targets = {"vmlinuz": elf_kernel(image), "initrd.img": image.initramfs}
    out = {}
    for name, target in targets.items():
        link = stable / name
        rel = os.path.relpath(target, stable)
        if not (link.is_symlink() and os.readlink(link) == rel):
            tmp = stable / f".{name}.{os.getpid()}"
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(rel, tmp)
            os.replace(tmp, link)
        out[name] = link
    return out
