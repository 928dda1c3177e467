"""xl.cfg files with xl's own grammar, sans-IO (libxlu_cfg_l.l / libxlu_cfg_y.y / libxlu_cfg.c).

Grammar (checked against the generated lexer tables and the bison grammar)::

    file      := { stmt } [ assignment ]          # the last statement may lack a newline
    stmt      := assignment endstmt | endstmt
    endstmt   := NEWLINE | ';'
    assignment:= IDENT '=' value | IDENT '+=' value
    value     := STRING | NUMBER | '[' nl* [ value nl* { ',' nl* value nl* } [ ',' nl* ] ] ']'

Tokens: IDENT ``[a-z][._0-9a-z]*``; NUMBER ``[0-9][0-9a-fx]*`` (no sign: ``-`` is an error;
the text is interpreted later with C ``strtol(s, 0)``, so ``010`` is 8 and ``0x1F`` does not
even lex); STRING in ``'...'`` or ``"..."`` on one line, with the escapes ``\\' \\" \\\\ \\a \\b
\\f \\n \\r \\t \\v``; ``#`` comments to the end of the line; blanks are space and tab.
Lists nest and may mix strings and numbers. Anything else (``* ( ) - + . :``, ``True``,
uppercase, CR line endings) is a lexical error naming ``file:line:`` and the offending token.

Semantics kept from libxlu: the *last* assignment of a key wins; ``KEY += VALUE`` concatenates a
string (or a bare number's text) to the previous value, appends a list to the previous list,
is an error when mixing a list and a string, and is just an assignment when the key is new;
a number key whose winning assignment used ``+=`` is refused ("can't use += with numbers").
Like xl, a quoted string holding a number (``memory = "512"``) is accepted where a number is
expected, and a bare number (``name = 42``) where a string is.

Deliberate differences from xl: xl's numeric escapes (``\\xHH``, octal) are broken (``\\x``
always fails, octal drops the character), so both are rejected here; xl rejects a ``#`` comment
at end of file without a final newline, pyxen accepts it; xl only warns about (and then ignores)
badly typed values of known keys, pyxen refuses them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Sequence, Union

from pyxen.errors import ConfigError
from pyxen.toolstack.xldisk import DiskSpec, DiskSpecError, parse_disk_spec
from pyxen.toolstack.xlvif import VifSpec, VifSpecError, parse_vif_spec

__all__ = [
    "ACTIONS", "Atom", "ConfigWarning", "DomainSpec", "Setting", "XlConfig", "XlConfigError",
    "XlList", "Value", "apply_overrides", "domain_config", "dumps", "parse", "render_value",
]


class XlConfigError(ConfigError):
    """An xl.cfg syntax or value error. ``where`` is ``file:line`` (syntax) or
    ``file:line:key`` (a value); ``token`` is the offending token when there is one."""

    def __init__(self, message: str, filename: str, line: int | None, key: str | None = None,
                 token: str | None = None) -> None:
        self.filename = filename
        self.line = line
        self.key = key
        self.token = token
        where = filename + (f":{line}" if line is not None else "") + (f":{key}" if key else "")
        super().__init__(message, where)


@dataclass(frozen=True)
class ConfigWarning:
    """A non-fatal remark about a setting (unknown key, deprecated key, ignored value)."""

    filename: str
    line: int | None      # None: the remark is about a key that is absent
    key: str
    message: str

    def __str__(self) -> str:
        where = self.filename + (f":{self.line}" if self.line is not None else "")
        return f"{where}: warning: {self.key}: {self.message}"


# ---------------------------------------------------------------------------------- values

@dataclass(frozen=True)
class Atom:
    """A scalar. xl stores strings and numbers alike as text; ``quoted`` says which it was."""

    text: str
    quoted: bool = True


@dataclass(frozen=True)
class XlList:
    """A ``[ ... ]`` list of values (atoms or nested lists)."""

    items: tuple["Value", ...] = ()


Value = Union[Atom, XlList]


@dataclass(frozen=True)
class Setting:
    """One stored assignment: ``key op value`` from ``filename:line``. After ``+=`` the value
    is already the concatenation (as in libxlu), and ``op`` stays ``"+="``."""

    key: str
    value: Value
    op: Literal["=", "+="]
    filename: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.filename}:{self.line}"


@dataclass(frozen=True)
class XlConfig:
    """A parsed config: every stored assignment in order (``settings``); lookups see the last.

    Invariant: ``get(k)`` is the last element of ``settings`` whose key is ``k``.
    """

    filename: str
    settings: tuple[Setting, ...] = ()

    def get(self, key: str) -> Setting | None:
        """The winning assignment of ``key`` (the last one), or None."""
        for s in reversed(self.settings):
            if s.key == key:
                return s
        return None

    def __contains__(self, key: object) -> bool:
        return any(s.key == key for s in self.settings)

    def effective(self) -> dict[str, Setting]:
        """Key -> winning setting, in order of each key's first appearance."""
        out: dict[str, Setting] = {}
        for s in self.settings:
            out[s.key] = s
        return out

    def values(self) -> dict[str, Value]:
        """Key -> winning value (plain view for tests and tools)."""
        return {k: s.value for k, s in self.effective().items()}


# ---------------------------------------------------------------------------------- lexer

_IDENT = re.compile(r"[a-z][._0-9a-z]*")
_NUMBER = re.compile(r"[0-9][0-9a-fx]*")
_PYTHONISH = set("+-.():*/%<>!{}")   # xl's own "looks like Python" set is "+-.():"
_SIMPLE_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f",
                   "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


@dataclass(frozen=True)
class _Tok:
    kind: str          # IDENT NUMBER STRING NEWLINE EOF or the punctuation itself ("=", "+=", ...)
    text: str          # the source text (for messages)
    line: int
    value: str = ""    # the dequoted string / number / ident text


def _lex(text: str, filename: str, first_line: int) -> Iterator[_Tok]:
    """Tokens on demand (so the first error in the file, lexical or syntactic, is reported)."""
    i, n, line = 0, len(text), first_line

    def lexerr(start: int, msg: str) -> XlConfigError:
        m = re.compile(r"[^ \t\n]*").match(text, start)
        tok = (m.group(0) if m else "") or text[start:start + 1]
        python = text[start] in _PYTHONISH or tok in ("True", "False", "None")
        if text[start].isupper() and not python:
            hint = "; names are lowercase and strings must be quoted"
        else:
            hint = ("; the file looks like Python, which xl config files are not (no expressions,"
                    " booleans or calls)") if python else ""
        return XlConfigError(f"config parsing error near `{tok}': {msg}{hint}",
                             filename, line, token=tok)

    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c == "\n":
            yield _Tok("NEWLINE", "\n", line)
            line += 1
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j          # the newline itself becomes the NEWLINE token
        elif "a" <= c <= "z":
            m = _IDENT.match(text, i)
            assert m
            yield _Tok("IDENT", m.group(0), line, m.group(0))
            i = m.end()
        elif "0" <= c <= "9":
            m = _NUMBER.match(text, i)
            assert m
            yield _Tok("NUMBER", m.group(0), line, m.group(0))
            i = m.end()
        elif c in "\"'":
            j = i + 1
            out: list[str] = []
            while True:
                if j >= n or text[j] == "\n":
                    raise XlConfigError(
                        f"config parsing error near `{text[i:j]}': unterminated string "
                        "(strings end on the line they start)", filename, line, token=text[i:j])
                d = text[j]
                if d == c:
                    break
                if d == "\\":
                    if j + 1 >= n or text[j + 1] == "\n":
                        raise XlConfigError(
                            f"config parsing error near `{text[i:j + 1]}': unterminated string",
                            filename, line, token=text[i:j + 1])
                    e = text[j + 1]
                    if e not in _SIMPLE_ESCAPES:
                        what = ("numeric character escapes are not supported (xl mis-parses "
                                "them)" if e == "x" or "0" <= e <= "7"
                                else "invalid character after backslash in quoted string")
                        raise XlConfigError(f"config parsing error near `\\{e}': {what}",
                                            filename, line, token="\\" + e)
                    out.append(_SIMPLE_ESCAPES[e])
                    j += 2
                else:
                    out.append(d)
                    j += 1
            yield _Tok("STRING", text[i:j + 1], line, "".join(out))
            i = j + 1
        elif c in ",[]=;":
            yield _Tok(c, c, line)
            i += 1
        elif c == "+" and text.startswith("+=", i):
            yield _Tok("+=", "+=", line)
            i += 2
        elif c == "\r":
            raise XlConfigError("config parsing error near `\\r': lexical error (carriage "
                                "return: DOS line endings are not accepted)", filename, line,
                                token="\r")
        else:
            raise lexerr(i, "lexical error")
    yield _Tok("EOF", "", line)


# ---------------------------------------------------------------------------------- parser

def _describe(t: _Tok) -> str:
    return {"NEWLINE": "<newline>", "EOF": "end of file"}.get(t.kind, f"`{t.text}'")


class _Parser:
    def __init__(self, toks: Iterator[_Tok], filename: str) -> None:
        self.toks = toks
        self.ahead: _Tok | None = None
        self.filename = filename

    def peek(self) -> _Tok:
        if self.ahead is None:
            self.ahead = next(self.toks)
        return self.ahead

    def take(self) -> _Tok:
        t = self.peek()
        if t.kind != "EOF":
            self.ahead = None
        return t

    def fail(self, t: _Tok, expecting: str) -> XlConfigError:
        kind = t.kind if t.kind.isalpha() else f"'{t.kind}'"
        hint = ""
        if t.kind == "IDENT" and expecting.startswith("STRING"):
            hint = " (a bare word is not a value: quote strings; there are no variables)"
        return XlConfigError(f"config parsing error near {_describe(t)}: syntax error, "
                             f"unexpected {kind}, expecting {expecting}{hint}",
                             self.filename, t.line, token=t.text)

    def skip_newlines(self) -> None:
        while self.peek().kind == "NEWLINE":
            self.take()

    def statements(self) -> list[tuple[str, str, Value, int]]:
        out: list[tuple[str, str, Value, int]] = []
        while True:
            t = self.take()
            if t.kind == "EOF":
                return out
            if t.kind in ("NEWLINE", ";"):
                continue
            if t.kind != "IDENT":
                raise self.fail(t, "a setting name (lowercase: [a-z][._0-9a-z]*)")
            op = self.take()
            if op.kind not in ("=", "+="):
                raise self.fail(op, "'=' or '+='")
            value = self.value()
            end = self.peek()
            if end.kind not in ("NEWLINE", ";", "EOF"):
                raise self.fail(end, "<newline> or ';' after the value")
            out.append((t.value, op.kind, value, t.line))

    def value(self) -> Value:
        t = self.take()
        if t.kind == "STRING":
            return Atom(t.value, True)
        if t.kind == "NUMBER":
            return Atom(t.value, False)
        if t.kind != "[":
            raise self.fail(t, "STRING or NUMBER or '['")
        items: list[Value] = []
        self.skip_newlines()
        while True:
            if self.peek().kind == "]":
                self.take()
                return XlList(tuple(items))
            items.append(self.value())
            self.skip_newlines()
            t = self.take()
            if t.kind == "]":
                return XlList(tuple(items))
            if t.kind != ",":
                raise self.fail(t, "',' or ']'")
            self.skip_newlines()


def _store(settings: list[Setting], key: str, op: str, value: Value, filename: str,
           line: int) -> None:
    """Append one assignment with libxlu's ``+=`` semantics (xlu__cfg_set_store)."""
    if op == "+=":
        prev = next((s for s in reversed(settings) if s.key == key), None)
        if prev is not None:
            if isinstance(prev.value, Atom) and isinstance(value, Atom):
                value = Atom(prev.value.text + value.text, prev.value.quoted or value.quoted)
            elif isinstance(prev.value, XlList) and isinstance(value, XlList):
                value = XlList(prev.value.items + value.items)
            else:
                raise XlConfigError("config parsing error: can't add [list] to \"string\" or "
                                    f"vice versa (`{key}' was set at {prev.where})",
                                    filename, line, key=key)
    settings.append(Setting(key, value, "+=" if op == "+=" else "=", filename, line))


def _parse_into(settings: list[Setting], text: str, filename: str, first_line: int = 1) -> None:
    for key, op, value, line in _Parser(_lex(text, filename, first_line), filename).statements():
        _store(settings, key, op, value, filename, line)


def parse(text: str, filename: str = "<config>") -> XlConfig:
    """Parse xl.cfg ``text``. Raises :class:`XlConfigError` (``file:line:`` + token) on any
    syntax error; never reads files."""
    settings: list[Setting] = []
    _parse_into(settings, text, filename)
    return XlConfig(filename, tuple(settings))


def apply_overrides(cfg: XlConfig, overrides: Iterable[str],
                    source: str = "<command line>") -> XlConfig:
    """``xl create CFG key=value ...``: each argument is parsed with the same grammar as one
    more line after the file (xl appends ``"\\n" + args joined by "\\n"`` to the file text), so
    ``+=`` extends the file's value and the override wins. An argument may hold several
    ``;``-separated settings. Errors name ``<command line>:N`` (N = argument number)."""
    settings = list(cfg.settings)
    for n, arg in enumerate(overrides, 1):
        if "=" not in arg:
            raise XlConfigError(f"`{arg}' is not a key=value setting", source, n, token=arg)
        _parse_into(settings, arg, source, n)
    return XlConfig(cfg.filename, tuple(settings))


# ---------------------------------------------------------------------------------- rendering

def _render_string(s: str) -> str:
    quote = "'" if '"' in s and "'" not in s else '"'
    out = []
    for ch in s:
        if ch == "\\" or ch == quote:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch)
    return quote + "".join(out) + quote


def render_value(v: Value) -> str:
    """xl syntax for a value; ``parse`` of the result gives ``v`` back."""
    if isinstance(v, XlList):
        return "[" + ", ".join(render_value(i) for i in v.items) + "]"
    if not v.quoted and _NUMBER.fullmatch(v.text):
        return v.text
    return _render_string(v.text)


def dumps(cfg: XlConfig) -> str:
    """The winning settings of ``cfg`` as an xl.cfg text (one ``key = value`` per line)."""
    return "".join(f"{k} = {render_value(s.value)}\n" for k, s in cfg.effective().items())


# ---------------------------------------------------------------------------------- domain keys

ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
           "coredump-restart", "soft-reset")
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_MEMORY_MIB = 32        # libxl__domain_build_info_setdefault: max_memkb = 32 MiB

#: keys domain_config interprets
SUPPORTED_KEYS = frozenset({
    "name", "type", "memory", "maxmem", "vcpus", "maxvcpus", "kernel", "ramdisk", "cmdline",
    "extra", "root", "on_poweroff", "on_reboot", "on_watchdog", "on_crash", "on_soft_reset",
    "accel", "disk", "vif", "uuid",
})

#: deprecated xl keys -> advice
DEPRECATED_KEYS = {
    "builder": 'deprecated since Xen 4.10; use type="pvh"',
    "altp2mhvm": "deprecated; use altp2m",
    "vncviewer": 'ignored by xl; use "xl create -V"',
    "device_model": "no longer supported; use device_model_override",
    "usb": "deprecated; use usbctrl/usbdev",
    "usbdevice": "deprecated; use usbctrl/usbdev",
}

#: other keys xl.cfg(5) documents; pyxen ignores them (with a warning)
XL_KEYS = frozenset("""
pool cpus cpus_soft cpu_weight cap period slice latency extratime vnuma bootloader
bootloader_args bootloader_restrict bootloader_user firmware pvshim pvshim_path pvshim_cmdline
pvshim_extra seclabel init_seclabel max_grant_frames max_maptrack_frames max_grant_version
transitive_grants nomigrate driver_domain device_tree passthrough vtpm p9 pvcalls vfb channel
rdm usbctrl usbdev pci pci_permissive pci_msitranslate pci_seize pci_power_mgmt gfx_passthru
rdm_mem_boundary dtdev ioports irqs iomem max_event_channels vdispl vsnd vkb tee acpi acpi_s3
acpi_s4 acpi_laptop_slate apic pae hpet hap oos shadow_memory nestedhvm altp2m cpuid mca_caps
tsc_mode localtime rtc_timeoffset e820_host videoram stdvga vga vnc vnclisten vncdisplay
vncunused vncpasswd keymap sdl opengl display xauthority serial soundhw usbversion boot bios
bios_path_override firmware_override smbios_firmware acpi_firmware ms_vm_genid viridian
timer_mode vpt_align xen_platform_pci device_model_version device_model_override
device_model_stubdomain_override device_model_stub_domain_seclabel device_model_args
device_model_args_pv device_model_args_hvm device_model_user stubdomain_kernel
stubdomain_ramdisk stubdomain_memory dm_restrict llc_colors vuart gic_version sve nr_spis
disable_evtchn_fifo claim_on_node vpmu vmtrace_buf_kb trap_unmapped_accesses
""".split())


@dataclass(frozen=True)
class DomainSpec:
    """What ``xl create`` needs for a PVH domain, interpreted as xl does. Memory in MiB.

    ``disk``/``vif`` are the raw spec strings; ``disks``/``vifs`` the same entries parsed
    (:mod:`pyxen.toolstack.xldisk`, :mod:`pyxen.toolstack.xlvif`), in the same order.
    ``sources`` maps each key that was set to ``file:line`` so later checks can name where a
    value came from.
    """

    name: str
    type: str = "pvh"
    memory: int = DEFAULT_MEMORY_MIB
    maxmem: int = DEFAULT_MEMORY_MIB
    vcpus: int = 1
    maxvcpus: int = 1
    kernel: str | None = None
    ramdisk: str | None = None
    cmdline: str | None = None
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_watchdog: str = "destroy"
    on_crash: str = "destroy"
    on_soft_reset: str = "soft-reset"
    accel: str = "auto"
    uuid: str | None = None
    disk: tuple[str, ...] = ()
    vif: tuple[str, ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    warnings: tuple[ConfigWarning, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """``file:line:key`` for a key that was set, else just ``key``."""
        src = self.sources.get(key)
        return f"{src}:{key}" if src else key


def c_strtol(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` requiring the whole text to be used, as xlu_cfg_get_long
    does: optional blanks, an optional sign, then ``0x`` hex, ``0`` octal or decimal.
    Returns None when the text is not such a number (or exceeds a 64-bit long)."""
    m = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        v = int(digits[2:], 16)
    elif digits.startswith("0"):
        v = int(digits, 8)
    else:
        v = int(digits)
    v = -v if m.group(1) == "-" else v
    return v if -(1 << 63) <= v < (1 << 63) else None


class _Reader:
    """Typed access to the winning settings, raising XlConfigError naming file:line:key."""

    def __init__(self, cfg: XlConfig) -> None:
        self.cfg = cfg

    def err(self, s: Setting, msg: str) -> XlConfigError:
        return XlConfigError(msg, s.filename, s.line, key=s.key)

    def string(self, key: str) -> str | None:
        s = self.cfg.get(key)
        if s is None:
            return None
        if not isinstance(s.value, Atom):
            raise self.err(s, f"is a list {render_value(s.value)} but should be a single value")
        return s.value.text

    def number(self, key: str) -> int | None:
        s = self.cfg.get(key)
        if s is None:
            return None
        if not isinstance(s.value, Atom):
            raise self.err(s, f"is a list {render_value(s.value)} but should be a number")
        if s.op == "+=":
            raise self.err(s, "can't use += with numbers")
        v = c_strtol(s.value.text)
        if v is None:
            raise self.err(s, f"{render_value(s.value)} is not a valid number")
        return v

    def string_list(self, key: str) -> tuple[str, ...]:
        s = self.cfg.get(key)
        if s is None:
            return ()
        if not isinstance(s.value, XlList):
            raise self.err(s, f"is a single value but should be a list, e.g. "
                              f"{key} = [ {render_value(s.value)} ]")
        out = []
        for i, item in enumerate(s.value.items):
            if not isinstance(item, Atom):
                raise self.err(s, f"item {i} is a nested list; expected a spec string")
            out.append(item.text)
        return tuple(out)

    def choice(self, key: str, allowed: Sequence[str], default: str) -> str:
        v = self.string(key)
        if v is None:
            return default
        if v not in allowed:
            s = self.cfg.get(key)
            assert s is not None
            raise self.err(s, f"unknown value {v!r} (use one of {', '.join(allowed)})")
        return v


def _resolve(path: str | None, cwd: str | None) -> str | None:
    if path is None or cwd is None or os.path.isabs(path):
        return path
    return os.path.join(cwd, path)


def domain_config(cfg: XlConfig, cwd: str | None = None) -> DomainSpec:
    """Interpret ``cfg`` as ``xl create`` does (xl_parse.c parse_config_data) for a PVH guest.

    - ``name`` is required; ``type`` must be ``"pvh"`` (absent: pvh, with a warning, since xl
      on x86 would default to pv); ``builder`` is deprecated and must not contradict it.
    - ``memory`` defaults to 32 MiB (libxl), ``maxmem`` to ``memory``; ``vcpus`` defaults to 1
      (values < 1 become 1, as in xl), ``maxvcpus`` to ``vcpus``; ``maxvcpus < vcpus`` and
      ``maxmem < memory`` are errors.
    - ``cmdline`` wins over ``root``/``extra`` (warning if both kinds are set); otherwise the
      command line is ``"root=<root> <extra>"``, ``"root=<root>"`` or ``"<extra>"``.
    - ``kernel``/``ramdisk`` are used as written: xl passes them to libxl unchanged, so a
      relative path is relative to xl's working directory, *not* the config file's. Give
      ``cwd`` to make them absolute against a specific directory.
    - ``on_*`` take one of :data:`ACTIONS`; ``accel`` (pyxen) one of auto|kvm|tcg.
    - ``disk``/``vif`` entries are parsed into ``disks``/``vifs``; a malformed entry, or two
      disks with the same virtual-device number, raise :class:`XlConfigError` naming
      file:line:key. Nothing on the host is checked (targets, bridges).
    - Unknown, deprecated and xl-only keys give :class:`ConfigWarning` records in
      ``warnings``; wrongly typed values raise :class:`XlConfigError` naming file:line:key.
    """
    r = _Reader(cfg)
    eff = cfg.effective()
    warnings: list[ConfigWarning] = []

    def warn(key: str, msg: str) -> None:
        s = eff[key]
        warnings.append(ConfigWarning(s.filename, s.line, key, msg))

    for key in eff:
        if key in SUPPORTED_KEYS:
            continue
        if key in DEPRECATED_KEYS:
            warn(key, DEPRECATED_KEYS[key])
        elif key in XL_KEYS:
            warn(key, "xl key not supported by pyxen; ignored")
        else:
            warn(key, "unknown key; ignored")

    name = r.string("name")
    if name is None:
        raise XlConfigError("domain name must be specified (name = \"...\")", cfg.filename,
                            None, key="name")
    if not name:
        raise r.err(eff["name"], "domain name must not be empty")

    typ = r.string("type")
    builder = r.string("builder")
    if builder is not None:
        btype = {"generic": "pv", "hvm": "hvm"}.get(builder)
        if btype is None:
            raise r.err(eff["builder"], f"invalid domain type {builder!r}")
        if typ is not None and typ != btype:
            raise r.err(eff["builder"], 'contradicting "builder" and "type" options')
        typ = btype
    if typ is None:
        warnings.append(ConfigWarning(cfg.filename, None, "type", 'not set; xl on x86 defaults '
                                      'to "pv", pyxen builds PVH guests only: assuming "pvh"'))
        typ = "pvh"
    if typ != "pvh":
        src = eff.get("type") or eff["builder"]
        raise r.err(src, f"domain type {typ!r} is not supported: pyxen builds PVH guests "
                         f'only (type = "pvh")')

    memory = r.number("memory")
    memory = DEFAULT_MEMORY_MIB if memory is None else memory
    if memory < 1:
        raise r.err(eff["memory"], f"memory = {memory}: must be at least 1 MiB")
    maxmem = r.number("maxmem")
    maxmem = memory if maxmem is None else maxmem
    if maxmem < memory:
        raise r.err(eff["maxmem"], f"maxmem = {maxmem} is less than memory = {memory}")

    vcpus = r.number("vcpus")
    if vcpus is not None and vcpus < 1:
        warn("vcpus", f"vcpus = {vcpus}: using 1 (as xl does)")
    vcpus = 1 if vcpus is None or vcpus < 1 else vcpus
    maxvcpus = r.number("maxvcpus")
    maxvcpus = vcpus if maxvcpus is None or maxvcpus == 0 else maxvcpus
    if maxvcpus < vcpus:
        raise r.err(eff["maxvcpus"], f"maxvcpus = {maxvcpus} is less than vcpus = {vcpus}")

    cmdline = r.string("cmdline")
    root, extra = r.string("root"), r.string("extra")
    if cmdline is not None:
        if root is not None or extra is not None:
            warn("cmdline", "ignoring root= and extra= in favour of cmdline=")
    elif root is not None and extra is not None:
        cmdline = f"root={root} {extra}"
    elif root is not None:
        cmdline = f"root={root}"
    elif extra is not None:
        cmdline = extra

    actions = {k: r.choice(k, ACTIONS, d) for k, d in (
        ("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_watchdog", "destroy"),
        ("on_crash", "destroy"), ("on_soft_reset", "soft-reset"))}

    disk, vif = r.string_list("disk"), r.string_list("vif")
    disks: list[DiskSpec] = []
    for text in disk:
        try:
            d = parse_disk_spec(text)
        except DiskSpecError as e:
            raise r.err(eff["disk"], str(e)) from None
        other = next((o for o in disks if o.devid == d.devid), None)
        if other is not None:
            also = "" if other.vdev == d.vdev else f" (as {other.vdev!r} in {other.spec!r})"
            raise r.err(eff["disk"], f"vdev {d.vdev} used twice{also}")
        disks.append(d)
    vifs: list[VifSpec] = []
    for text in vif:
        try:
            vifs.append(parse_vif_spec(text))
        except VifSpecError as e:
            raise r.err(eff["vif"], str(e)) from None

    return DomainSpec(
        name=name, type=typ, memory=memory, maxmem=maxmem, vcpus=vcpus, maxvcpus=maxvcpus,
        kernel=_resolve(r.string("kernel"), cwd), ramdisk=_resolve(r.string("ramdisk"), cwd),
        cmdline=cmdline, accel=r.choice("accel", ACCELS, "auto"), uuid=r.string("uuid"),
        disk=disk, vif=vif, disks=tuple(disks), vifs=tuple(vifs), warnings=tuple(warnings),
        sources={k: s.where for k, s in eff.items()}, **actions)
