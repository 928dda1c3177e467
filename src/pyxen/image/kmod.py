"""Kernel config and module metadata, sans-IO.

Debian's kernel package ships no ``modules.dep`` (``depmod`` runs at install time), so the
image builder reads each module's ``.modinfo`` ELF section itself (:func:`modinfo`), closes
the wanted set over ``depends=`` (:func:`dependency_closure`) and writes the ``modules.dep`` /
``modules.alias`` that busybox ``modprobe`` reads (:func:`modules_dep`, :func:`modules_alias`).
Compressed modules (``.ko.xz``/``.ko.zst``/``.ko.gz``) are turned into plain ``.ko`` by
:func:`decompress_module`, because busybox's modprobe/insmod load only what the kernel accepts
as-is through ``init_module``.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Iterable, Mapping

from pyxen.errors import ImageError

#: Config options a Xen PVH guest image cares about, reported in the manifest.
XEN_OPTIONS = (
    "CONFIG_XEN", "CONFIG_XEN_PVH", "CONFIG_HVC_XEN", "CONFIG_HVC_XEN_FRONTEND",
    "CONFIG_XEN_XENBUS_FRONTEND", "CONFIG_XEN_BLKDEV_FRONTEND", "CONFIG_XEN_NETDEV_FRONTEND",
    "CONFIG_XEN_SCSI_FRONTEND", "CONFIG_XEN_PCIDEV_FRONTEND", "CONFIG_XEN_FBDEV_FRONTEND",
    "CONFIG_INPUT_XEN_KBDDEV_FRONTEND", "CONFIG_TCG_XEN", "CONFIG_XEN_DEV_EVTCHN",
    "CONFIG_XENFS", "CONFIG_XEN_GNTDEV", "CONFIG_XEN_GRANT_DEV_ALLOC", "CONFIG_XEN_PRIVCMD",
    "CONFIG_XEN_BALLOON", "CONFIG_EXT4_FS", "CONFIG_DEVTMPFS", "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP", "CONFIG_MODULE_SIG", "CONFIG_MODULE_COMPRESS_NONE",
    "CONFIG_MODULE_COMPRESS_GZIP", "CONFIG_MODULE_COMPRESS_XZ", "CONFIG_MODULE_COMPRESS_ZSTD",
)

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def parse_kconfig(text: str) -> dict[str, str]:
    """``/boot/config-*`` text -> {option: value}; ``# CONFIG_X is not set`` gives "n"."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:-len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value.strip('"') if value.startswith('"') else value
    return out


def module_name(path: str) -> str:
    """Canonical module name of a path: basename without suffix, ``-`` -> ``_``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def compression(path: str) -> str:
    """"none", "xz", "zstd" or "gzip", from a module file name."""
    return {".xz": "xz", ".zst": "zstd", ".gz": "gzip"}.get("." + path.rsplit(".", 1)[-1],
                                                           "none")


def decompress_module(path: str, data: bytes) -> bytes:
    """The plain ELF of a (possibly compressed) module file; raises ImageError."""
    kind = compression(path)
    try:
        if kind == "xz":
            data = lzma.decompress(data)
        elif kind == "gzip":
            data = gzip.decompress(data)
        elif kind == "zstd":
            import zstandard
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except Exception as e:  # lzma.LZMAError, OSError, zstandard.ZstdError
        raise ImageError(f"{path}: cannot decompress ({kind}): {e}") from e
    if data[:4] != b"\x7fELF":
        raise ImageError(f"{path}: not an ELF module after decompression")
    return data


def modinfo(elf: bytes, where: str = "module") -> dict[str, list[str]]:
    """Key -> values of a (64-bit little-endian) module's ``.modinfo`` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageError(f"{where}: not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    try:
        _, stroff, strsize = section(shstrndx)
        for i in range(shnum):
            name, off, size = section(i)
            end = elf.index(b"\0", stroff + name)
            if elf[stroff + name:end] == b".modinfo":
                info: dict[str, list[str]] = {}
                for item in elf[off:off + size].split(b"\0"):
                    key, sep, value = item.decode(errors="replace").partition("=")
                    if sep:
                        info.setdefault(key, []).append(value)
                return info
    except (struct.error, ValueError) as e:
        raise ImageError(f"{where}: malformed ELF section table: {e}") from e
    raise ImageError(f"{where}: no .modinfo section")


def depends(info: Mapping[str, list[str]]) -> list[str]:
    """Canonical names of the modules a module's modinfo says it depends on."""
    return [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]


def dependency_closure(wanted: Iterable[str],
                       deps: Mapping[str, list[str]]) -> list[str]:
    """``wanted`` plus everything they need, dependencies before dependents (load order).

    ``deps`` maps every known canonical module name to its direct dependencies; a wanted or
    needed name missing from it raises ImageError.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ImageError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in deps:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise ImageError(f"module {name}{via} is not in the kernel package")
        state[name] = 1
        for d in deps[name]:
            visit(d, chain + (name,))
        state[name] = 2
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def modules_dep(paths: Mapping[str, str], deps: Mapping[str, list[str]]) -> str:
    """``modules.dep`` text for the modules in ``paths`` (canonical name -> path relative to
    /lib/modules/<release>). Each line lists the module's full transitive dependencies, the
    one to load last first, as depmod writes them (modprobe loads the list from its end)."""
    lines = []
    for name in sorted(paths, key=lambda n: paths[n]):
        chain = dependency_closure([name], deps)[:-1]
        lines.append(f"{paths[name]}:" + "".join(f" {paths[d]}" for d in reversed(chain)))
    return "".join(line + "\n" for line in lines)


def modules_alias(infos: Mapping[str, Mapping[str, list[str]]]) -> str:
    """``modules.alias`` text (``alias PATTERN module``) from canonical name -> modinfo."""
    return "".join(f"alias {a} {name}\n" for name in sorted(infos)
                   for a in infos[name].get("alias", []))
