"""xl's ``disk=`` spec strings and Xen's virtual-disk numbering, sans-IO.

Grammar (xl-disk-configuration(5); the behaviour is that of libxlu's disk lexer)::

    DISKSPEC := item { ',' item }            # blanks before an item are ignored
    item     := KEY '=' VALUE | FLAG | POSITIONAL | 'target=' REST-OF-STRING
                (each optionally preceded by deprecated 'prefix:'es)

- Positional items (no ``=``) fill the unset slots ``target, format, vdev, access`` in that
  order; an empty item fills its slot with the default. Once a deprecated prefix was seen
  (``phy:/dev/x``, ``raw:/img``, ...) the format slot is skipped, which is what makes the old
  xm form ``phy:/dev/vg/x,xvda,w`` work.
- Keys: ``target= format= vdev= access= devtype= backendtype= backend= script=
  specification=``; flags: ``cdrom discard no-discard direct-io-safe trusted untrusted``.
  ``target=`` swallows the rest of the spec (commas included), so it comes last; it may
  replace an empty positional target. A parameter given twice with different values is an
  error (an earlier *empty* string value may be overridden).
- Deprecated prefixes, stripped wherever an item starts: ``raw: qcow: qcow2: vhd:`` set the
  format; ``iscsi: nbd: enbd: drbd:`` set ``script=block-<name>``; ``tapdisk: tap: tap2: aio:
  ioemu: file: phy:`` are ignored (as xl ignores them: they do not select a backend). Any other
  ``word:`` followed by the end of the item or a non-alphanumeric is an unknown prefix.
- Deprecated ``vdev:cdrom`` / ``vdev:disk`` suffix, and the empty-cdrom form ``,hdc:cdrom,r``.
- After parsing: ``cdrom`` forces read-only; a non-cdrom needs a non-empty target; a vdev is
  mandatory and must be a name :func:`vdev_to_devid` understands.

Deliberate differences from xl: trailing blanks of an item, and blanks after a key's ``=``,
are stripped (xl keeps them and then usually fails), except for ``target=``, which keeps the
rest verbatim as xl does; ``access`` given twice with different values is an error (xl keeps
the last); ``mode=`` is accepted as an alias of ``access=`` (xm's name; xl itself rejects
it); ``format=empty`` is not accepted and an empty cdrom keeps format ``raw`` (xl switches
it to its internal "empty" format); the COLO keys and ``grant_usage`` are refused.

Virtual-device numbers (libxl ``libxl__device_disk_dev_number``, xen-vbd-interface(7)):

- ``xvdX[N]`` and ``dNpM``: disk < 16 and partition < 16 give ``202<<8 | disk<<4 | part``
  (xvda = 51712), otherwise the extended form ``1<<28 | disk<<8 | part`` (disk < 2**20,
  partition < 256). Disk letters count a..z, aa..zz, ... (bijective base 26).
- ``hdX[N]`` (hda..hdd, partition < 64): major 3 for hda/hdb, 22 for hdc/hdd, minor 64 for
  the second disk of a pair (hda = 768, hdc = 5632).
- ``sdX[N]`` (sda..sdp, partition < 16): ``8<<8 | disk<<4 | part`` (sda = 2048).
- A plain number (C ``strtoul`` base 0: decimal, ``0x`` hex, ``0`` octal) up to INT_MAX is
  the number itself. Partition numbers have no leading zeros.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from pyxen.errors import ConfigError

__all__ = ["DiskSpec", "DiskSpecError", "FORMATS", "BACKENDTYPES", "devid_to_xvd",
           "parse_disk_spec", "vdev_to_devid"]

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")
BACKENDTYPES = ("phy", "qdisk", "standalone", "tap")
SPECIFICATIONS = ("xen", "virtio")

_INT_MAX = (1 << 31) - 1
_XVD_MAJOR = 202
_EXTENDED = 1 << 28


class DiskSpecError(ConfigError):
    """A disk spec (or a vdev name) is malformed. ``spec`` is the text at fault and
    ``reason`` the bare message; ``str()`` is ``disk spec '<spec>': <reason>``."""

    def __init__(self, spec: str, message: str, what: str = "disk spec") -> None:
        self.spec = spec
        self.reason = message
        super().__init__(f"{what} {spec!r}: {message}")


@dataclass(frozen=True)
class DiskSpec:
    """One parsed ``disk=`` entry. ``spec`` is the original text; ``devid`` is Xen's
    virtual-device number for ``vdev`` (the xenstore ``device/vbd/<devid>`` key)."""

    target: str | None          # None: an empty cdrom drive
    vdev: str
    devid: int
    format: str = "raw"
    access: str = "w"           # "w" or "r"
    devtype: str = "disk"       # "disk" or "cdrom"
    backendtype: str | None = None
    backend: str | None = None  # backend domain name (None: dom0)
    script: str | None = None
    discard: bool = True
    direct_io_safe: bool = False
    trusted: bool = True
    specification: str = "xen"
    spec: str = ""

    @property
    def readonly(self) -> bool:
        return self.access == "r"

    @property
    def cdrom(self) -> bool:
        return self.devtype == "cdrom"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_dict` gives an equal DiskSpec back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiskSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------------- vdevs

def _letters_partition(rest: str, max_disk: int, max_part: int) -> tuple[int, int] | None:
    """``<letters>[<partition>]`` -> (disk index, partition) within the limits, else None."""
    m = re.fullmatch(r"([a-z]+)([1-9][0-9]*)?", rest)
    if not m:
        return None
    disk = -1
    for c in m.group(1):
        disk = (disk + 1) * 26 + (ord(c) - ord("a"))
        if disk > max_disk:
            return None
    part_text = m.group(2)
    if part_text is None:
        return disk, 0
    if len(part_text) > 4 or int(part_text) > max_part:
        return None
    return disk, int(part_text)


def _xvd_number(disk: int, part: int) -> int:
    if disk <= 15 and part <= 15:
        return (_XVD_MAJOR << 8) | (disk << 4) | part
    return _EXTENDED | (disk << 8) | part


def vdev_to_devid(vdev: str) -> int:
    """Xen's virtual-device number for a guest disk name (libxl's numbering, see the module
    docstring). Raises :class:`DiskSpecError` for a name libxl would refuse."""
    if vdev.startswith("xvd"):
        dp = _letters_partition(vdev[3:], (1 << 20) - 1, 255)
        if dp is not None:
            return _xvd_number(*dp)
    m = re.fullmatch(r"d([0-9]{1,7})p([0-9]{1,3})", vdev)
    if m:
        disk, part = int(m.group(1)), int(m.group(2))
        if disk < (1 << 20) and part < 256:
            return _xvd_number(disk, part)
    m = re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,9}", vdev)
    if m:
        t = m.group(0)
        n = int(t, 16) if t[:2] in ("0x", "0X") else int(t, 8) if t.startswith("0") else int(t)
        if n <= _INT_MAX:
            return n
    if vdev.startswith("hd"):
        dp = _letters_partition(vdev[2:], 3, 63)
        if dp is not None:
            disk, part = dp
            return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part
    if vdev.startswith("sd"):
        dp = _letters_partition(vdev[2:], 15, 15)
        if dp is not None:
            disk, part = dp
            return (8 << 8) | (disk << 4) | part
    raise DiskSpecError(vdev, "not a virtual disk name libxl knows (xvdX[N] up to 2**20 disks, "
                              "hda..hdd, sda..sdp, dNpM or a number; partitions without "
                              "leading zeros)", what="vdev")


def _disk_letters(n: int) -> str:
    out = ""
    while True:
        out = chr(ord("a") + n % 26) + out
        if n < 26:
            return out
        n = n // 26 - 1


def devid_to_xvd(devid: int) -> str:
    """The ``xvd`` name of a virtual-device number, as libxl's ``libxl__devid_to_vdev`` (and
    ``xl block-list``) shows it: the inverse of :func:`vdev_to_devid` for xvd numbers. Like
    libxl it ignores the major of a non-extended number (an hd/sd number shows as an xvd)."""
    if not 0 <= devid <= 0xFFFFFFFF:
        raise ValueError(f"virtual-device number {devid} out of range")
    if devid & _EXTENDED:
        minor, nr_parts = devid & ~_EXTENDED, 256
    else:
        minor, nr_parts = devid & 0xFF, 16
    part = minor % nr_parts
    return "xvd" + _disk_letters(minor // nr_parts) + (str(part) if part else "")


# ---------------------------------------------------------------------------------- parser

_KNOWN_PREFIX = re.compile(r"(raw|qcow2?|vhd|iscsi|e?nbd|drbd|tapdisk|tap2?|aio|ioemu|file|phy):")
_ANY_PREFIX = re.compile(r"[a-z][a-z0-9]*:(?![a-z0-9])")
_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_FLAGS = ("cdrom", "discard", "no-discard", "direct-io-safe", "trusted", "untrusted")
_UNSUPPORTED = ("colo", "no-colo", "colo-host", "colo-port", "colo-export", "active-disk",
                "hidden-disk", "grant_usage")
_BLANKS = " \t\n"


class _State:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.target: str | None = None
        self.format: str | None = None
        self.vdev: str | None = None
        self.access: str | None = None
        self.access_positional = False
        self.had_prefix = False
        self.cdrom = False
        self.backendtype: str | None = None
        self.backend: str | None = None
        self.script: str | None = None
        self.specification: str | None = None
        self.discard = True
        self.direct_io_safe = False
        self.trusted = True

    def err(self, message: str) -> DiskSpecError:
        return DiskSpecError(self.spec, message)

    def save(self, name: str, value: str) -> None:
        """Set a string parameter; respecifying a non-empty one with another value fails."""
        old = getattr(self, name)
        if old and old != value:
            raise self.err(f"{name} given twice ({old!r} and {value!r})")
        setattr(self, name, value)

    def choose(self, name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise self.err(f"unknown {name} {value!r} (use one of {', '.join(allowed)})")
        self.save(name, value)

    def set_format(self, value: str, hint: str = "") -> None:
        value = value or "raw"
        if value not in FORMATS:
            raise self.err(f"unknown format {value!r} (use one of {', '.join(FORMATS)}){hint}")
        self.save("format", value)

    def set_access(self, value: str) -> None:
        if value == "":
            return                    # empty: the default, and no conflict with a real value
        if value in ("r", "ro"):
            acc = "r"
        elif value in ("w", "rw"):
            acc = "w"
        else:
            raise self.err(f"unknown access {value!r} (use r, ro, w or rw)")
        if self.access is not None and self.access != acc:
            raise self.err(f"access given twice ({self.access!r} and {acc!r})")
        self.access = acc

    def vdev_devtype(self, item: str) -> bool:
        """The deprecated ``vdev:devtype`` positional; False if there is no colon."""
        vdev, colon, devtype = item.rpartition(":")
        if not colon:
            return False
        self.save("vdev", vdev)
        if devtype == "cdrom":
            self.cdrom = True
        elif devtype != "disk":
            raise self.err(f"unknown deprecated device type {devtype!r} in {item!r} "
                           "(use vdev:cdrom or vdev:disk)")
        return True

    def positional(self, item: str) -> None:
        if self.target is None:
            self.target = item
        elif not self.had_prefix and self.format is None:
            if self.target == "" and self.vdev_devtype(item):
                self.format = "raw"       # xend's empty cdrom: ",hdc:cdrom,r"
            else:
                self.set_format(item, " (positional parameters are target, format, vdev, "
                                      "access; an old-style 'target,vdev,access' spec needs "
                                      "a prefix such as 'phy:' or 'file:')")
        elif self.vdev is None:
            if not self.vdev_devtype(item):
                self.save("vdev", item)
        elif not self.access_positional:
            self.access_positional = True
            self.set_access(item)
        else:
            raise self.err(f"too many positional parameters at {item!r} (they are target, "
                           "format, vdev, access)")

    def keyed(self, key: str, value: str) -> None:
        if key == "format":
            self.set_format(value)
        elif key in ("access", "mode"):
            self.set_access(value)
        elif key == "vdev":
            self.save("vdev", value)
        elif key == "devtype":
            if value == "cdrom":
                self.cdrom = True
            elif value == "disk":
                self.cdrom = False
            else:
                raise self.err(f"unknown devtype {value!r} (use cdrom or disk)")
        elif key == "backendtype":
            self.choose("backendtype", value, BACKENDTYPES)
        elif key == "specification":
            self.choose("specification", value, SPECIFICATIONS)
        elif key in ("backend", "script"):
            self.save(key, value)
        elif key in _UNSUPPORTED:
            raise self.err(f"{key}= is not supported by pyxen")
        else:
            raise self.err(f"unknown parameter {key!r}")

    def flag(self, name: str) -> None:
        if name == "cdrom":
            self.cdrom = True
        elif name in ("discard", "no-discard"):
            self.discard = name == "discard"
        elif name == "direct-io-safe":
            self.direct_io_safe = True
        else:
            self.trusted = name == "trusted"


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse one ``disk=`` entry (see the module docstring). Never touches the host: whether
    the target exists, and what backend suits it, is for a later stage. Raises
    :class:`DiskSpecError` naming the spec on any error."""
    st = _State(text)
    pos, n = 0, len(text)
    while pos < n:
        while pos < n and text[pos] in _BLANKS:
            pos += 1
        if pos >= n:
            break
        if text.startswith("target=", pos):
            value = text[pos + 7:]
            if value.endswith(","):
                value = value[:-1]
            st.save("target", value)
            break
        m = _KNOWN_PREFIX.match(text, pos)
        if m:
            st.had_prefix = True
            word = m.group(1)
            if word in _FORMAT_PREFIXES:
                st.set_format(word)
            elif word in _SCRIPT_PREFIXES:
                st.save("script", "block-" + word)
            pos = m.end()
            continue
        m = _ANY_PREFIX.match(text, pos)
        if m:
            raise st.err(f"unknown deprecated prefix {m.group(0)!r} (known: raw: qcow: qcow2: "
                         "vhd: iscsi: nbd: enbd: drbd: tapdisk: tap: tap2: aio: ioemu: file: "
                         "phy:)")
        end = text.find(",", pos)
        end = n if end < 0 else end
        item = text[pos:end].rstrip(_BLANKS)
        pos = end + 1
        key, eq, value = item.partition("=")
        if eq:
            st.keyed(key, value.lstrip(_BLANKS))
        elif item in _FLAGS:
            st.flag(item)
        elif item in _UNSUPPORTED:
            raise st.err(f"{item} is not supported by pyxen")
        else:
            st.positional(item)

    if not st.vdev:
        raise st.err("no vdev (the guest's device name, e.g. xvda) given")
    if not st.cdrom and not st.target:
        raise st.err("no target (image file or block device) given, and the device is not "
                     "a cdrom")
    try:
        devid = vdev_to_devid(st.vdev)
    except DiskSpecError as e:
        raise st.err(f"bad vdev {st.vdev!r}: {e.reason}") from None
    return DiskSpec(
        target=st.target or None, vdev=st.vdev, devid=devid, format=st.format or "raw",
        access="r" if st.cdrom else (st.access or "w"),
        devtype="cdrom" if st.cdrom else "disk", backendtype=st.backendtype,
        backend=st.backend or None, script=st.script or None, discard=st.discard,
        direct_io_safe=st.direct_io_safe, trusted=st.trusted,
        specification=st.specification or "xen", spec=text)


def disk_config(spec: DiskSpec, base_dir: str | None = None):  # type: ignore[no-untyped-def]
    """The VMM's :class:`~pyxen.vmm.devices.DiskConfig` for ``spec``: the target made absolute
    (relative to ``base_dir``, default the current directory). An empty cdrom (no target) is
    refused: pyxen has no media-change support yet."""
    import os

    from pyxen.vmm.devices import DiskConfig
    if not spec.target:
        raise DiskSpecError(spec.spec, "an empty drive (no target) is not supported")
    if spec.backendtype == "tap":
        raise DiskSpecError(spec.spec, "backendtype=tap (blktap) is not supported; "
                            "use phy or qdisk")
    target = os.path.join(base_dir or os.getcwd(), spec.target)
    return DiskConfig(target=os.path.normpath(target), vdev=spec.vdev, devid=spec.devid,
                      format=spec.format, readonly=spec.readonly, cdrom=spec.cdrom,
                      discard=spec.discard, spec=spec.spec)
