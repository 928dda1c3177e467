"""xl's ``vif=`` spec strings, sans-IO (xl-network-configuration(5), xl's parse_nic_config and
libxlu's vif rate parser).

A spec is a comma-separated list of ``key=value`` items and the flags ``trusted`` /
``untrusted``; every key is optional, so ``''`` is a valid vif (all defaults: a random MAC
under Xen's OUI, bridge ``xenbr0``, script ``vif-bridge``, devid = position in the list).
Blanks around items, keys and values are ignored and empty items are skipped (xl splits with
``strtok``). A key with an empty value means its default.

Keys: ``mac bridge ip rate vifname model type script backend gatewaydev`` (``netdev`` is its
deprecated alias) ``mtu devid vlan``.

- ``mac``: six two-digit hex octets separated by ``:``; it must be unicast (the low bit of
  the first octet clear). Stored in lower case.
- ``ip``: one or more blank-separated addresses (optionally ``/prefix``), IPv4 or IPv6.
- ``rate``: ``RATE/s[@INTERVAL]``. RATE is a positive integer with an optional ``K``/``M``/
  ``G`` (powers of 1000) and ``B`` (bytes) or ``b`` (bits); INTERVAL is a positive integer
  with ``us``, ``ms``, ``s`` or no unit (seconds), default 50 ms. The result is libxl's pair
  (bytes per interval, interval in microseconds): ``1MB/s@20ms`` is 20000 bytes every
  20000 us. Limits as libxlu: the number before the unit fits 32 bits, the interval fits
  32 bits of microseconds.
- ``vifname``: a Linux interface name (1..15 chars, no ``/``, ``:`` or blanks, not ``.``/
  ``..``); ``mtu``: 68..65535; ``devid``: 0..2**31-1; ``type``: ``vif`` or ``ioemu``;
  ``vlan``: the documented ``N[p|u]``, ``N-M[u]``, ``N+OxC[u]`` terms joined by ``/``, ids
  1..4094.

Deliberate differences from xl: a key given twice is an error (xl keeps the last); xl parses
MACs leniently (any separator, 1-2 digits) and does not require unicast; a rate that rounds
to 0 bytes per interval is refused; the COLO keys, ``forwarddev`` and ``accel`` (which xl
ignores with a message) are refused.
"""

from __future__ import annotations

import ipaddress
import random as _random
import re
from dataclasses import dataclass
from typing import Any

from pyxen.errors import ConfigError

__all__ = ["Rate", "VifSpec", "VifSpecError", "XEN_OUI", "parse_rate", "parse_vif_spec",
           "random_mac"]

XEN_OUI = (0x00, 0x16, 0x3E)
DEFAULT_RATE_INTERVAL_US = 50_000

_U32_MAX = (1 << 32) - 1
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_RATE = re.compile(r"([0-9]+)([GMK]?)([Bb])/s")
_INTERVAL = re.compile(r"([0-9]+)([mu]?)s?")
_VLAN_TERM = re.compile(r"([0-9]+)(?:(p|u)|-([0-9]+)(u?)|\+([0-9]+)x([0-9]+)(u?))?")
_STRING_KEYS = ("bridge", "script", "backend", "gatewaydev", "model")
_UNSUPPORTED = ("accel", "forwarddev")


class VifSpecError(ConfigError):
    """A vif spec is malformed. ``spec`` is the text at fault and ``reason`` the bare
    message; ``str()`` is ``vif spec '<spec>': <reason>``."""

    def __init__(self, spec: str, message: str) -> None:
        self.spec = spec
        self.reason = message
        super().__init__(f"vif spec {spec!r}: {message}")


@dataclass(frozen=True)
class Rate:
    """A credit-based rate limit as libxl stores it: ``bytes_per_interval`` bytes of credit
    replenished every ``interval_us`` microseconds."""

    bytes_per_interval: int
    interval_us: int = DEFAULT_RATE_INTERVAL_US

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_per_interval * 1_000_000 / self.interval_us

    def to_dict(self) -> dict[str, int]:
        return {"bytes_per_interval": self.bytes_per_interval, "interval_us": self.interval_us}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rate":
        return cls(int(d["bytes_per_interval"]), int(d["interval_us"]))


@dataclass(frozen=True)
class VifSpec:
    """One parsed ``vif=`` entry; None means "xl's default" (see the module docstring)."""

    mac: str | None = None
    bridge: str | None = None
    ip: tuple[str, ...] = ()
    rate: Rate | None = None
    vifname: str | None = None
    model: str | None = None
    type: str | None = None
    script: str | None = None
    backend: str | None = None
    gatewaydev: str | None = None
    mtu: int | None = None
    devid: int | None = None
    vlan: str | None = None
    trusted: bool = True
    spec: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_dict` gives an equal VifSpec back."""
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["ip"] = list(self.ip)
        d["rate"] = self.rate.to_dict() if self.rate else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VifSpec":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["ip"] = tuple(kw.get("ip") or ())
        if kw.get("rate") is not None:
            kw["rate"] = Rate.from_dict(kw["rate"])
        return cls(**kw)


def parse_rate(text: str) -> Rate:
    """``RATE/s[@INTERVAL]`` -> :class:`Rate` (libxlu's arithmetic). Raises ValueError."""
    rate_text, at, interval_text = text.partition("@")
    if not rate_text:
        raise ValueError("no rate given")
    m = _RATE.fullmatch(rate_text)
    if not m:
        raise ValueError(f"invalid rate {rate_text!r} (e.g. 10Mb/s, 250KB/s)")
    if len(m.group(1)) > 10 or not 0 < int(m.group(1)) <= _U32_MAX:
        raise ValueError(f"rate {rate_text!r} out of range")
    per_sec = int(m.group(1)) * {"G": 10**9, "M": 10**6, "K": 10**3, "": 1}[m.group(2)]
    if m.group(3) == "b":
        per_sec //= 8
    interval = DEFAULT_RATE_INTERVAL_US
    if at:
        m = _INTERVAL.fullmatch(interval_text)
        if not m:
            raise ValueError(f"invalid replenishment interval {interval_text!r} "
                             "(e.g. 20ms, 50us, 1s)")
        if len(m.group(1)) > 10 or not 0 < int(m.group(1)) <= _U32_MAX:
            raise ValueError(f"replenishment interval {interval_text!r} out of range")
        interval = int(m.group(1)) * {"": 1_000_000, "m": 1000, "u": 1}[m.group(2)]
        if interval > _U32_MAX:
            raise ValueError(f"replenishment interval {interval_text!r} out of range")
    per_interval = per_sec * interval // 1_000_000
    if per_interval == 0:
        raise ValueError(f"rate {text!r} gives 0 bytes per {interval} us interval")
    return Rate(per_interval, interval)


def _check_ifname(name: str) -> str | None:
    """Why ``name`` is not a valid Linux interface name (dev_valid_name), or None."""
    if not name or len(name) > 15:
        return "must be 1..15 characters (Linux IFNAMSIZ)"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if any(c in "/:" or c.isspace() for c in name):
        return "must not contain '/', ':' or blanks"
    return None


def _check_vlan(text: str) -> str | None:
    def ok(v: str) -> bool:
        return len(v) <= 4 and 1 <= int(v) <= 4094

    terms = text.split("/")
    for term in terms:
        m = _VLAN_TERM.fullmatch(term)
        if not m:
            return f"bad term {term!r} (use N[p|u], N-M[u] or N+OxC[u])"
        first, _, last, _, offset, count, _ = m.groups()
        if not ok(first) or (last is not None and (not ok(last) or int(last) < int(first))):
            return f"bad VLAN id in {term!r} (ids are 1..4094, ranges ascending)"
        if offset is not None and (len(offset) > 4 or len(count) > 4
                                   or not ok(str(int(first) + int(offset) * int(count)))):
            return f"range {term!r} goes beyond 4094"
    if len(terms) > 1 and not any(t.endswith("p") for t in terms):
        return "one VLAN must be marked as the PVID with 'p'"
    return None


def parse_vif_spec(text: str) -> VifSpec:
    """Parse one ``vif=`` entry (see the module docstring). Raises :class:`VifSpecError`
    naming the spec on any error."""
    def err(message: str) -> VifSpecError:
        return VifSpecError(text, message)

    kw: dict[str, Any] = {}
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            if item in ("trusted", "untrusted"):
                key = "trusted"
                if key in seen:
                    raise err("trusted/untrusted given twice")
                seen.add(key)
                kw["trusted"] = item == "trusted"
                continue
            raise err(f"{item!r} is not a key=value setting")
        if key == "netdev":
            key = "gatewaydev"
        if key in seen:
            raise err(f"{key} given twice")
        seen.add(key)
        if not value and key in VifSpec.__dataclass_fields__ and key not in ("spec", "trusted"):
            continue                                        # empty value: the default
        if key in _STRING_KEYS:
            kw[key] = value
        elif key == "mac":
            if not _MAC.fullmatch(value):
                raise err(f"invalid mac {value!r} (six 2-digit hex octets separated by ':')")
            if int(value[:2], 16) & 1:
                raise err(f"mac {value!r} is a multicast address (the first octet must be "
                          "even)")
            kw["mac"] = value.lower()
        elif key == "ip":
            addrs = tuple(value.split())
            for a in addrs:
                try:
                    ipaddress.ip_interface(a)
                except ValueError:
                    raise err(f"invalid ip address {a!r}") from None
            kw["ip"] = addrs
        elif key == "rate":
            try:
                kw["rate"] = parse_rate(value)
            except ValueError as e:
                raise err(str(e)) from None
        elif key == "vifname":
            why = _check_ifname(value)
            if why:
                raise err(f"vifname {value!r} {why}")
            kw["vifname"] = value
        elif key == "type":
            if value not in ("vif", "ioemu"):
                raise err(f"unknown type {value!r} (use vif or ioemu)")
            kw["type"] = value
        elif key in ("mtu", "devid"):
            lo, hi = (68, 65535) if key == "mtu" else (0, (1 << 31) - 1)
            if not re.fullmatch(r"[0-9]{1,10}", value) or not lo <= int(value) <= hi:
                raise err(f"{key} {value!r} is not a number in {lo}..{hi}")
            kw[key] = int(value)
        elif key == "vlan":
            why = _check_vlan(value)
            if why:
                raise err(f"vlan {value!r}: {why}")
            kw["vlan"] = value
        elif key in _UNSUPPORTED or key.startswith("colo_"):
            raise err(f"{key}= is not supported by pyxen")
        else:
            raise err(f"unknown key {key!r}")
    return VifSpec(spec=text, **kw)


def random_mac(rng: _random.Random | None = None) -> str:
    """A MAC under Xen's OUI ``00:16:3e`` with three random octets, the first of them with
    its top bit clear, as libxl generates one. ``rng`` defaults to the system's CSPRNG."""
    r = rng if rng is not None else _random.SystemRandom()
    octets = XEN_OUI + (r.getrandbits(8) & 0x7F, r.getrandbits(8), r.getrandbits(8))
    return ":".join(f"{o:02x}" for o in octets)


def nic_config(spec: VifSpec, devid: int):  # type: ignore[no-untyped-def]
    """The VMM's :class:`~pyxen.vmm.devices.NicConfig` for ``spec`` as device ``devid``
    (``spec.devid`` wins if set): a random Xen MAC when none is given, pyxen's default
    bridge when none is named."""
    from pyxen.vmm.devices import NicConfig
    rate = (spec.rate.bytes_per_interval, spec.rate.interval_us) if spec.rate else None
    kw = {}
    if spec.mtu is not None:
        kw["mtu"] = spec.mtu
    return NicConfig(devid=spec.devid if spec.devid is not None else devid,
                     mac=spec.mac or random_mac(), bridge=spec.bridge or "pyxenbr0",
                     vifname=spec.vifname, rate=rate, ip=" ".join(spec.ip) or None,
                     spec=spec.spec, **kw)
