"""pyxen.toolstack.xlcfg: xl.cfg grammar (libxlu_cfg), overrides, and the PVH domain keys."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.errors import ConfigError
from pyxen.toolstack.xlcfg import (Atom, XlConfigError, XlList, apply_overrides, c_strtol,
                                   domain_config, dumps, parse, render_value)
from pyxen.toolstack.xldisk import DiskSpec

DEBIAN = """\
# Debian 12 PVH guest (xl create /etc/xen/debian.cfg)
name    = "debian-pvh"
type    = "pvh"
memory  = 1024
maxmem  = 2048
vcpus   = 2
maxvcpus = 4

kernel  = "/var/lib/xen/boot/vmlinuz-6.1.0-18-amd64"
ramdisk = '/var/lib/xen/boot/initrd.img-6.1.0-18-amd64'
root    = "/dev/xvda1 ro"
extra   = "console=hvc0 earlyprintk=xen"

disk = [ 'format=raw, vdev=xvda, access=rw, target=/srv/xen/debian.img',
         'phy:/dev/vg0/debian-swap,xvdb,w',   # old-style spec, kept raw
       ]
vif  = [ 'mac=00:16:3e:12:34:56, bridge=xenbr0' ]

on_poweroff = "destroy"
on_reboot   = "restart"
on_crash    = "preserve"
accel = "tcg"
"""


def v(cfg, key):  # the winning value
    return cfg.get(key).value


# ------------------------------------------------------------------ grammar

def test_realistic_debian_config() -> None:
    cfg = parse(DEBIAN, "/etc/xen/debian.cfg")
    spec = domain_config(cfg)
    assert (spec.name, spec.type, spec.memory, spec.maxmem) == ("debian-pvh", "pvh", 1024, 2048)
    assert (spec.vcpus, spec.maxvcpus) == (2, 4)
    assert spec.kernel == "/var/lib/xen/boot/vmlinuz-6.1.0-18-amd64"
    assert spec.ramdisk == "/var/lib/xen/boot/initrd.img-6.1.0-18-amd64"
    assert spec.cmdline == "root=/dev/xvda1 ro console=hvc0 earlyprintk=xen"
    assert spec.disk == ("format=raw, vdev=xvda, access=rw, target=/srv/xen/debian.img",
                         "phy:/dev/vg0/debian-swap,xvdb,w")
    assert spec.vif == ("mac=00:16:3e:12:34:56, bridge=xenbr0",)
    assert (spec.on_poweroff, spec.on_reboot, spec.on_crash) == ("destroy", "restart",
                                                                "preserve")
    assert (spec.on_watchdog, spec.on_soft_reset) == ("destroy", "soft-reset")
    assert spec.accel == "tcg"
    assert spec.warnings == ()
    assert spec.where("memory") == "/etc/xen/debian.cfg:4:memory"
    assert cfg.get("disk").line == 14


def test_every_value_form() -> None:
    cfg = parse('a = "dq"\nb = \'sq\'\nc = 42\nd = 0x1f\ne = 010\nf = []\n'
                'g = [1, "two", [3, \'four\']]\n'
                'h = "esc \\" \\\' \\\\ \\n \\t \\a \\b \\f \\r \\v"\n'
                'i.j_k.9 = ""\n')
    assert v(cfg, "a") == Atom("dq") and v(cfg, "b") == Atom("sq")
    assert v(cfg, "c") == Atom("42", quoted=False)
    assert v(cfg, "d") == Atom("0x1f", quoted=False) and c_strtol("0x1f") == 31
    assert c_strtol(v(cfg, "e").text) == 8                        # C strtol base 0: octal
    assert v(cfg, "f") == XlList(())
    assert v(cfg, "g") == XlList((Atom("1", False), Atom("two"),
                                  XlList((Atom("3", False), Atom("four")))))
    assert v(cfg, "h").text == "esc \" ' \\ \n \t \a \b \f \r \v"
    assert v(cfg, "i.j_k.9") == Atom("")


def test_comments_semicolons_blank_lines() -> None:
    cfg = parse("# head\n\n  a = 1 ; b = 2;c=3   # tail\n;;\n\td = '#not a comment'\n# eof")
    assert [s.key for s in cfg.settings] == ["a", "b", "c", "d"]
    assert [s.line for s in cfg.settings] == [3, 3, 3, 5]
    assert v(cfg, "d").text == "#not a comment"


def test_last_statement_needs_no_newline() -> None:
    assert v(parse("a = 1"), "a") == Atom("1", False)
    assert parse("").settings == () and parse("\n\n# only comments\n").settings == ()


def test_multiline_lists_and_trailing_commas() -> None:
    cfg = parse("disk = [\n\n  'a',\n  # comment inside\n  'b'\n  ,\n  'c',\n\n]\nx = [\n]\n"
                "y = [ 1, ]\n")
    assert v(cfg, "disk") == XlList((Atom("a"), Atom("b"), Atom("c")))
    assert v(cfg, "x") == XlList(())
    assert v(cfg, "y") == XlList((Atom("1", False),))
    assert cfg.get("x").line == 10


def test_last_assignment_wins() -> None:
    cfg = parse('memory = 256\nname = "a"\nmemory = 512\n')
    assert v(cfg, "memory") == Atom("512", False) and cfg.get("memory").line == 3
    assert list(cfg.effective()) == ["memory", "name"]
    assert domain_config(parse('name="x"; type="pvh"; memory=256; memory=768')).memory == 768


def test_plus_equals_strings_lists_and_new_keys() -> None:
    cfg = parse('extra = "console=hvc0"\nextra += " quiet"\n'
                'disk = ["a"]\ndisk += ["b", "c"]\n'
                'new += "x"\nlst += [1]\n'
                'n = 1\nn += 2\n')
    assert v(cfg, "extra").text == "console=hvc0 quiet"
    assert v(cfg, "disk") == XlList((Atom("a"), Atom("b"), Atom("c")))
    assert v(cfg, "new") == Atom("x") and v(cfg, "lst") == XlList((Atom("1", False),))
    assert v(cfg, "n").text == "12" and cfg.get("n").op == "+="   # concatenated text, as xl
    # ...but a number key set with += is refused when interpreted
    with pytest.raises(XlConfigError, match=r"c:2:memory: can't use \+= with numbers"):
        domain_config(parse('name = "x"\nmemory += 512\n', "c"))
    # a plain assignment after += resets the operator
    assert domain_config(parse('name="x"\nmemory += 1\nmemory = 64\n')).memory == 64


def test_quoted_numbers_and_bare_number_strings_are_accepted_like_xl() -> None:
    spec = domain_config(parse('name = 42\ntype = "pvh"\nmemory = "0x100"\nvcpus = " 3"\n'))
    assert (spec.name, spec.memory, spec.vcpus) == ("42", 256, 3)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("text,line,token,fragment", [
    ('name = "debian\nmemory = 1\n', 1, '"debian', "unterminated string"),
    ("a = 1\nb = 'x\\'\n", 2, "'x\\'", "unterminated string"),
    ("a = 1\nmemory = 256 * 2\n", 2, "*", "looks like Python"),
    ("acpi = True\n", 1, "True", "looks like Python"),
    ("memory = -1\n", 1, "-1", "lexical error"),
    ("kernel = os.path.join('/boot', 'vmlinuz')\n", 1, "os.path.join", "unexpected IDENT"),
    ("\n\nname \"debian\"\n", 3, '"debian"', "expecting '=' or '+='"),
    ("Name = 'x'\n", 1, "Name", "lowercase"),
    ("disk = ['a' 'b']\n", 1, "'b'", "expecting ',' or ']'"),
    ("disk = [,]\n", 1, ",", "unexpected ','"),
    ("memory = 1 2\n", 1, "2", "after the value"),
    ("= 3\n", 1, "=", "setting name"),
    ("x = 0x1F\n", 1, "F", "lexical error"),
    ("import os\n", 1, "os", "expecting '=' or '+='"),
    ("if x: y = 1\n", 1, "x", "expecting '=' or '+='"),
    ("s = 'a\\qb'\n", 1, "\\q", "invalid character after backslash"),
    ("s = 'a\\x41'\n", 1, "\\x", "numeric character escapes"),
    ("a = 1\r\nb = 2\r\n", 1, "\r", "carriage return"),
    ("disk = ['a',\n  'b'\n", 3, "", "end of file"),
    ("a = [1]\na += 'x'\n", 2, None, "can't add [list] to \"string\""),
])
def test_syntax_errors_name_file_line_and_token(text: str, line: int, token: str | None,
                                                fragment: str) -> None:
    with pytest.raises(XlConfigError) as ei:
        parse(text, "/etc/xen/bad.cfg")
    e = ei.value
    assert isinstance(e, ConfigError)
    assert (e.filename, e.line) == ("/etc/xen/bad.cfg", line)
    assert str(e).startswith(f"/etc/xen/bad.cfg:{line}")
    assert fragment in str(e)
    if token is not None:
        assert e.token == token
        assert f"near `{token}'" in str(e) or token == "" or token == "\r"


def test_first_error_in_the_file_is_reported() -> None:
    with pytest.raises(XlConfigError) as ei:
        parse("a = foo\nb = (1)\n")
    assert ei.value.line == 1


@pytest.mark.parametrize("body,key,fragment", [
    ('memory = "lots"', "memory", "is not a valid number"),
    ("vcpus = [1]", "vcpus", "is a list [1] but should be a number"),
    ("memory = 12abc", "memory", "is not a valid number"),
    ("kernel = ['/boot/vmlinuz']", "kernel", "should be a single value"),
    ("disk = 'vdev=xvda,target=/img'", "disk", "should be a list"),
    ("vif = [['bridge=xenbr0']]", "vif", "nested list"),
    ('type = "hvm"', "type", "not supported"),
    ('builder = "generic"', "builder", "not supported"),
    ('on_crash = "reboot"', "on_crash", "unknown value 'reboot'"),
    ('accel = "xen"', "accel", "unknown value 'xen'"),
    ("maxvcpus = 1\nvcpus = 2", "maxvcpus", "less than vcpus"),
    ("memory = 512\nmaxmem = 256", "maxmem", "less than memory"),
    ("memory = 0", "memory", "at least 1 MiB"),
    ('name = ""', "name", "must not be empty"),
])
def test_value_errors_name_file_line_key(body: str, key: str, fragment: str) -> None:
    text = 'name = "g"\n' + body + "\n"
    with pytest.raises(XlConfigError) as ei:
        domain_config(parse(text, "g.cfg"))
    e = ei.value
    line = max(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith(key))
    assert (e.filename, e.line, e.key) == ("g.cfg", line, key)
    assert str(e).startswith(f"g.cfg:{line}:{key}: ") and fragment in str(e)


def test_missing_name() -> None:
    with pytest.raises(XlConfigError, match=r"^g.cfg:name: domain name must be specified"):
        domain_config(parse("memory = 64\n", "g.cfg"))


# ------------------------------------------------------------------ interpretation

def test_defaults_follow_xl_and_libxl() -> None:
    spec = domain_config(parse('name = "tiny"\ntype = "pvh"\n'))
    assert (spec.memory, spec.maxmem, spec.vcpus, spec.maxvcpus) == (32, 32, 1, 1)
    assert (spec.on_poweroff, spec.on_reboot, spec.on_watchdog, spec.on_crash,
            spec.on_soft_reset) == ("destroy", "restart", "destroy", "destroy", "soft-reset")
    assert (spec.kernel, spec.ramdisk, spec.cmdline, spec.accel) == (None, None, None, "auto")
    assert (spec.disk, spec.vif) == ((), ())
    assert domain_config(parse('name="t"; type="pvh"; vcpus=3')).maxvcpus == 3


def test_cmdline_rules() -> None:
    def cmd(body: str) -> tuple[str | None, list[str]]:
        spec = domain_config(parse('name="g"\ntype="pvh"\n' + body))
        return spec.cmdline, [w.message for w in spec.warnings]

    assert cmd('root="/dev/xvda1"\nextra="quiet"') == ("root=/dev/xvda1 quiet", [])
    assert cmd('root="/dev/xvda1"') == ("root=/dev/xvda1", [])
    assert cmd('extra="console=hvc0"') == ("console=hvc0", [])
    assert cmd('cmdline="a b"\nroot="/dev/x"\nextra="q"') == (
        "a b", ["ignoring root= and extra= in favour of cmdline="])
    assert cmd('cmdline=""') == ("", [])


def test_all_shutdown_actions() -> None:
    for action in ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
                   "coredump-restart", "soft-reset"):
        assert domain_config(parse(f'name="g"\ntype="pvh"\non_reboot="{action}"')).on_reboot \
            == action


def test_relative_kernel_paths_are_kept_like_xl_or_resolved_against_cwd() -> None:
    cfg = parse('name="g"\ntype="pvh"\nkernel="boot/vmlinuz"\nramdisk="/abs/initrd"',
                "/etc/xen/g.cfg")
    assert domain_config(cfg).kernel == "boot/vmlinuz"          # xl: relative to xl's CWD
    spec = domain_config(cfg, cwd="/home/me")
    assert (spec.kernel, spec.ramdisk) == ("/home/me/boot/vmlinuz", "/abs/initrd")


def test_unknown_deprecated_and_unsupported_keys_warn() -> None:
    text = ('name = "g"\ntype = "pvh"\nmemroy = 512\naltp2mhvm = 1\nvfb = ["vnc=1"]\n'
            'builder = "generic"\n')
    with pytest.raises(XlConfigError):       # builder=generic means pv: refused
        domain_config(parse(text, "w.cfg"))
    spec = domain_config(parse(text.replace('builder = "generic"\n', 'foo.bar = "x"\n'),
                               "w.cfg"))
    got = [(w.line, w.key, w.message) for w in spec.warnings]
    assert got == [(3, "memroy", "unknown key; ignored"),
                   (4, "altp2mhvm", "deprecated; use altp2m"),
                   (5, "vfb", "xl key not supported by pyxen; ignored"),
                   (6, "foo.bar", "unknown key; ignored")]
    assert str(spec.warnings[0]) == "w.cfg:3: warning: memroy: unknown key; ignored"


def test_builder_is_deprecated_and_missing_type_is_assumed_pvh() -> None:
    spec = domain_config(parse('name = "g"\n', "n.cfg"))
    assert spec.type == "pvh"
    assert [(w.line, w.key) for w in spec.warnings] == [(None, "type")]
    assert str(spec.warnings[0]).startswith("n.cfg: warning: type: ")
    with pytest.raises(XlConfigError, match="contradicting"):
        domain_config(parse('name = "g"\ntype = "pvh"\nbuilder = "hvm"\n'))


def test_vcpus_below_one_become_one_like_xl() -> None:
    spec = domain_config(parse('name="g"\ntype="pvh"\nvcpus=0\n'))
    assert spec.vcpus == 1 and spec.warnings[0].key == "vcpus"


# ------------------------------------------------------------------ overrides

def test_overrides_win_and_use_the_grammar() -> None:
    cfg = parse(DEBIAN, "debian.cfg")
    cfg2 = apply_overrides(cfg, ["memory=512", 'extra+=" single"; vcpus=1',
                                 "disk+=['vdev=xvdc,target=/x']"])
    spec = domain_config(cfg2)
    assert (spec.memory, spec.vcpus) == (512, 1)
    assert spec.cmdline.endswith("console=hvc0 earlyprintk=xen single")
    assert len(spec.disk) == 3
    assert spec.where("memory") == "<command line>:1:memory"
    assert spec.where("name") == "debian.cfg:2:name"
    assert domain_config(cfg).memory == 1024                    # the original is unchanged


def test_bad_overrides() -> None:
    cfg = parse('name = "g"\n')
    with pytest.raises(XlConfigError, match=r"^<command line>:2: .*near `\*2'"):
        apply_overrides(cfg, ["memory=1", "memory=2*2"])
    with pytest.raises(XlConfigError, match=r"^<command line>:1: `debian.cfg' is not"):
        apply_overrides(cfg, ["debian.cfg"])
    with pytest.raises(XlConfigError, match=r"^<command line>:1:memory: .*not a valid"):
        domain_config(apply_overrides(cfg, ["memory='big'"]))


# ------------------------------------------------------------------ round trip

KEYS = st.from_regex(r"[a-z][._0-9a-z]{0,12}", fullmatch=True)
NUMBERS = st.one_of(st.integers(0, 2**40).map(str),
                    st.integers(0, 2**40).map(lambda n: f"0x{n:x}"),
                    st.integers(0, 2**20).map(lambda n: f"0{n:o}"))
# anything but a newline may sit in a string; the renderer escapes quotes, \\, \n, \t, \r
STRINGS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
ATOMS = st.one_of(NUMBERS.map(lambda t: Atom(t, False)), STRINGS.map(Atom))
VALUES = st.recursive(ATOMS, lambda inner: st.lists(inner, max_size=4)
                      .map(lambda xs: XlList(tuple(xs))), max_leaves=12)
SEPARATORS = st.sampled_from(["\n", ";", " ;\n", "  # c\n", "\n\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, VALUES, SEPARATORS), max_size=10))
def test_round_trip_render_parse(entries: list) -> None:
    text = "".join(f"{k} = {render_value(val)}{sep}" for k, val, sep in entries)
    cfg = parse(text)
    assert [(s.key, s.value) for s in cfg.settings] == [(k, val) for k, val, _ in entries]
    expected: dict = {}
    for k, val, _ in entries:
        expected[k] = val
    assert cfg.values() == expected
    assert parse(dumps(cfg)).values() == expected


@settings(max_examples=100, deadline=None)
@given(st.text(string.printable, max_size=40))
def test_parser_only_raises_config_errors(text: str) -> None:
    try:
        parse(text)
    except XlConfigError as e:
        assert e.line is not None and e.line >= 1


# ------------------------------------------------------------------ disk and vif specs

def test_disk_and_vif_specs_are_parsed() -> None:
    spec = domain_config(parse('name = "g"\ntype = "pvh"\ndisk = [\'/img,raw,xvdb,rw\']\n'
                               "vif = ['', 'mac=00:16:3e:00:00:02,bridge=br1']\n", "g.cfg"))
    assert spec.disk == ("/img,raw,xvdb,rw",)                   # the raw strings stay
    (d,) = spec.disks
    assert isinstance(d, DiskSpec)
    assert (d.target, d.format, d.vdev, d.devid, d.access) == ("/img", "raw", "xvdb", 51728, "w")
    assert [v.bridge for v in spec.vifs] == [None, "br1"]
    assert spec.vifs[1].mac == "00:16:3e:00:00:02"


def test_realistic_config_disks_and_vifs() -> None:
    spec = domain_config(parse(DEBIAN, "/etc/xen/debian.cfg"))
    assert [(d.target, d.vdev, d.devid) for d in spec.disks] == [
        ("/srv/xen/debian.img", "xvda", 51712), ("/dev/vg0/debian-swap", "xvdb", 51728)]
    assert spec.vifs[0].mac == "00:16:3e:12:34:56" and spec.vifs[0].bridge == "xenbr0"


def test_no_disk_or_vif() -> None:
    spec = domain_config(parse('name = "g"\ntype = "pvh"\n'))
    assert (spec.disks, spec.vifs) == ((), ())


@pytest.mark.parametrize("body,key,fragment", [
    ("disk = [ '/img,raw,xvdb,rw',\n  '/img2,raw' ]", "disk", "disk spec '/img2,raw': no vdev"),
    ("disk = ['/img,xvda,w']", "disk", "unknown format 'xvda'"),
    ("disk = ['/a,,xvdb', 'vdev=xvdb,target=/b']", "disk", "vdev xvdb used twice"),
    ("disk = ['/a,,xvdb', '/b,,d1p0']", "disk", "vdev d1p0 used twice (as 'xvdb'"),
    ("vif = ['bridge=xenbr0', 'mac=01:00:00:00:00:01']", "vif",
     "vif spec 'mac=01:00:00:00:00:01': mac '01:00:00:00:00:01' is a multicast"),
    ("vif = ['rate=fast']", "vif", "invalid rate 'fast'"),
])
def test_bad_disk_or_vif_names_file_line_key(body: str, key: str, fragment: str) -> None:
    text = 'name = "g"\ntype = "pvh"\n' + body + "\n"
    with pytest.raises(XlConfigError) as ei:
        domain_config(parse(text, "g.cfg"))
    e = ei.value
    assert (e.filename, e.line, e.key) == ("g.cfg", 3, key)
    assert str(e).startswith(f"g.cfg:3:{key}: ") and fragment in str(e)


def test_bad_disk_from_an_override_names_the_command_line() -> None:
    cfg = apply_overrides(parse('name = "g"\ntype = "pvh"\ndisk = ["/a,,xvda"]\n', "g.cfg"),
                          ["disk += ['/b,,xvda']"])
    with pytest.raises(XlConfigError, match=r"^<command line>:1:disk: vdev xvda used twice"):
        domain_config(cfg)
