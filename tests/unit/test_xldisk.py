"""pyxen.toolstack.xldisk: xl's disk spec grammar and libxl's vdev numbering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.errors import ConfigError
from pyxen.toolstack.xldisk import (DiskSpec, DiskSpecError, devid_to_xvd, parse_disk_spec,
                                    vdev_to_devid)

# ------------------------------------------------------------------ xl-disk-configuration(5)

VOLUME = [                                 # the man page's first set of equivalent specs
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
]
ISO = [                                    # ... and the second (a cdrom)
    "/root/image.iso,,hdc,cdrom",
    "/root/image.iso,,hdc,,cdrom",
    "/root/image.iso,raw,hdc,devtype=cdrom",
    "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
    "raw:/root/image.iso,hdc:cdrom,ro",
]


def fields(d: DiskSpec) -> tuple:
    return (d.target, d.format, d.vdev, d.devid, d.access, d.devtype)


@pytest.mark.parametrize("spec", VOLUME)
def test_man_page_equivalent_volume_specs(spec: str) -> None:
    d = parse_disk_spec(spec)
    assert fields(d) == ("/dev/vg/guest-volume", "raw", "hda", 768, "w", "disk")
    assert not d.readonly and d.spec == spec
    assert (d.backendtype, d.backend, d.script) == (None, None, None)
    assert (d.discard, d.direct_io_safe, d.trusted) == (True, False, True)


@pytest.mark.parametrize("spec", ISO)
def test_man_page_equivalent_cdrom_specs(spec: str) -> None:
    d = parse_disk_spec(spec)
    assert fields(d) == ("/root/image.iso", "raw", "hdc", 5632, "r", "cdrom")
    assert d.readonly and d.cdrom


@pytest.mark.parametrize("spec", [",hdc:cdrom,r", "vdev=hdc,cdrom", ",,hdc,cdrom",
                                  "devtype=cdrom,vdev=xvdc,target="])
def test_empty_cdrom(spec: str) -> None:
    d = parse_disk_spec(spec)
    assert d.target is None and d.cdrom and d.readonly


def test_cdrom_forces_read_only_like_xl() -> None:
    assert parse_disk_spec("/x.iso,raw,xvdc,rw,cdrom").access == "r"


@pytest.mark.parametrize("spec,target,fmt,vdev,access,script", [
    ("phy:/dev/vg0/swap,xvdb,w", "/dev/vg0/swap", "raw", "xvdb", "w", None),
    ("file:/srv/img,xvda,r", "/srv/img", "raw", "xvda", "r", None),
    ("tap:aio:/srv/img,xvda,w", "/srv/img", "raw", "xvda", "w", None),
    ("tap2:qcow2:/srv/img.qcow2,xvda,w", "/srv/img.qcow2", "qcow2", "xvda", "w", None),
    ("tapdisk:vhd:/srv/img.vhd,xvda,w", "/srv/img.vhd", "vhd", "xvda", "w", None),
    ("aio:/srv/img,xvda,w", "/srv/img", "raw", "xvda", "w", None),
    ("ioemu:/srv/img,hda,w", "/srv/img", "raw", "hda", "w", None),
    ("qcow:/srv/img,xvda,w", "/srv/img", "qcow", "xvda", "w", None),
    ("iscsi:iqn.2001-04.com.example:disk,xvda,w", "iqn.2001-04.com.example:disk", "raw",
     "xvda", "w", "block-iscsi"),
    ("nbd:host:1234,xvdb,r", "host:1234", "raw", "xvdb", "r", "block-nbd"),
    ("drbd:res0,xvda,w", "res0", "raw", "xvda", "w", "block-drbd"),
    ("phy:/dev/x,xvda:disk,w", "/dev/x", "raw", "xvda", "w", None),
])
def test_deprecated_prefixes(spec, target, fmt, vdev, access, script) -> None:
    d = parse_disk_spec(spec)
    assert (d.target, d.format, d.vdev, d.access, d.script) == (target, fmt, vdev, access,
                                                                 script)
    assert d.backendtype is None          # xl strips and ignores phy:/file:/tap: prefixes


def test_keyed_and_positional_mixed() -> None:
    d = parse_disk_spec("format=qcow2,/img.qcow2,xvdb")   # format known: next is the vdev
    assert (d.target, d.format, d.vdev, d.access) == ("/img.qcow2", "qcow2", "xvdb", "w")
    d = parse_disk_spec("vdev=xvdb, /img, , , access=ro")
    assert (d.target, d.format, d.vdev, d.access) == ("/img", "raw", "xvdb", "r")
    d = parse_disk_spec(",,xvdb,,target=/img")            # target= may fill an empty target
    assert (d.target, d.vdev) == ("/img", "xvdb")


def test_target_key_swallows_the_rest() -> None:
    d = parse_disk_spec("vdev=xvda, access=r, target=/srv/a,b=c, d ")
    assert d.target == "/srv/a,b=c, d " and d.access == "r"
    assert parse_disk_spec("vdev=xvda,target=/x,").target == "/x"


def test_other_keys_and_flags() -> None:
    d = parse_disk_spec("/img,qed,xvdc,ro,backendtype=qdisk,backend=drv,script=block-x,"
                        "no-discard,direct-io-safe,untrusted,specification=xen")
    assert (d.format, d.access, d.backendtype, d.backend, d.script) == (
        "qed", "r", "qdisk", "drv", "block-x")
    assert (d.discard, d.direct_io_safe, d.trusted, d.specification) == (False, True, False,
                                                                         "xen")
    assert parse_disk_spec("/img,,xvda,no-discard,discard").discard is True
    assert parse_disk_spec("/img,vhd,xvda,backendtype=tap").backendtype == "tap"
    assert parse_disk_spec("/img,,xvda,mode=ro").access == "r"
    assert parse_disk_spec("/img,,xvda,devtype=disk").devtype == "disk"
    assert parse_disk_spec("/img,raw,xvda,w,format=raw").format == "raw"   # same value: fine


def test_whitespace_before_items() -> None:
    d = parse_disk_spec("  /img ,\traw , xvda , w ")
    assert (d.target, d.format, d.vdev, d.access) == ("/img", "raw", "xvda", "w")


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("spec,fragment", [
    ("foo,raw", "no vdev"),
    ("", "no vdev"),
    ("/img,xvda,w", "unknown format 'xvda'"),            # xl needs a prefix for old syntax
    ("/img,vmdk,xvda", "unknown format 'vmdk'"),
    ("format=iso,/img,xvda", "unknown format 'iso'"),
    ("/img,raw,xvda,rwx", "unknown access 'rwx'"),
    ("/img,raw,xvda,w,extra", "too many positional"),
    ("/img,raw,xvda,w,bogus=1", "unknown parameter 'bogus'"),
    ("/a=b,raw,xvda", "unknown parameter '/a'"),
    ("/img,raw,xvda,devtype=floppy", "unknown devtype 'floppy'"),
    ("/img,raw,xvda,backendtype=qemu", "unknown backendtype 'qemu'"),
    ("/img,raw,xvda,specification=scsi", "unknown specification 'scsi'"),
    ("foo:/img,xvda,w", "unknown deprecated prefix 'foo:'"),
    ("phy:/img,xvda:floppy,w", "unknown deprecated device type 'floppy'"),
    ("format=raw,,xvda", "no target"),
    (",raw,xvda", "no target"),
    ("/img,raw,xvda,w,vdev=xvdb", "vdev given twice"),
    ("/img,raw,xvda,format=qcow2", "format given twice"),
    ("raw:/img,xvda,format=vhd", "format given twice"),
    ("/img,raw,xvda,r,access=w", "access given twice"),
    ("/a,raw,xvda,target=/b", "target given twice"),
    ("/img,raw,xvd", "bad vdev 'xvd'"),
    ("/img,raw,hde", "bad vdev 'hde'"),
    ("/img,raw,xvda0", "bad vdev 'xvda0'"),
    ("/img,raw,xvda,colo", "not supported"),
    ("/img,raw,xvda,colo-host=h", "not supported"),
])
def test_errors_name_the_spec(spec: str, fragment: str) -> None:
    with pytest.raises(DiskSpecError) as ei:
        parse_disk_spec(spec)
    e = ei.value
    assert isinstance(e, ConfigError) and e.spec == spec
    assert str(e).startswith(f"disk spec {spec!r}: ") and fragment in str(e)


def test_error_message_shape() -> None:
    with pytest.raises(DiskSpecError, match=r"^disk spec 'foo,raw': no vdev"):
        parse_disk_spec("foo,raw")


# ------------------------------------------------------------------ vdev numbers

@pytest.mark.parametrize("vdev,devid", [
    ("xvda", 51712), ("xvdb", 51728), ("xvdp", 51952), ("xvda1", 51713), ("xvda15", 51727),
    ("xvdq", (1 << 28) | (16 << 8)), ("xvda16", (1 << 28) | 16), ("xvdz", (1 << 28) | (25 << 8)),
    ("xvdaa", (1 << 28) | (26 << 8)), ("xvdba", (1 << 28) | (52 << 8)),
    ("xvdq255", (1 << 28) | (16 << 8) | 255),
    ("d0p0", 51712), ("d1p0", 51728), ("d0p3", 51715), ("d15p15", 51967),
    ("d16p0", (1 << 28) | (16 << 8)), ("d0p16", (1 << 28) | 16),
    ("hda", 768), ("hdb", 832), ("hdc", 5632), ("hdd", 5696), ("hda1", 769), ("hdc63", 5695),
    ("sda", 2048), ("sdb", 2064), ("sda1", 2049), ("sdp15", 2303),
    ("51712", 51712), ("0", 0), ("0x10", 16), ("010", 8), ("2147483647", 2147483647),
])
def test_vdev_numbers(vdev: str, devid: int) -> None:
    assert vdev_to_devid(vdev) == devid


@pytest.mark.parametrize("vdev", [
    "", "xvd", "xvd1", "xvdA", "xvda0", "xvda01", "xvda256", "hde", "hda64", "sdq", "sda16",
    "sda0", "d0p", "dp0", "d0p256", "d1048576p0", "2147483648", "09", "-1", "xvda ", "vda",
    "xvdaaaaaa",
])
def test_bad_vdevs(vdev: str) -> None:
    with pytest.raises(DiskSpecError, match=r"^vdev "):
        vdev_to_devid(vdev)


@pytest.mark.parametrize("vdev", ["xvda", "xvdb", "xvdp", "xvdq", "xvdz", "xvdaa", "xvdzz",
                                  "xvdaaa", "xvda1", "xvda15", "xvda16", "xvdq3", "xvdab255"])
def test_devid_to_xvd_inverts_xvd_names(vdev: str) -> None:
    assert devid_to_xvd(vdev_to_devid(vdev)) == vdev


def test_devid_to_xvd_examples() -> None:
    assert devid_to_xvd(51712) == "xvda" and devid_to_xvd(51729) == "xvdb1"
    assert devid_to_xvd(vdev_to_devid("d0p0")) == "xvda"
    with pytest.raises(ValueError):
        devid_to_xvd(-1)


@given(st.integers(0, (1 << 20) - 1), st.integers(0, 255))
def test_xvd_roundtrip_property(disk: int, part: int) -> None:
    devid = vdev_to_devid(f"d{disk}p{part}")
    name = devid_to_xvd(devid)
    assert vdev_to_devid(name) == devid


# ------------------------------------------------------------------ serialisation, robustness

@pytest.mark.parametrize("spec", VOLUME + ISO + [",hdc:cdrom,r",
                                                 "nbd:h:1,xvdb,r,no-discard,backend=d"])
def test_to_dict_round_trips_through_json(spec: str) -> None:
    d = parse_disk_spec(spec)
    data = json.loads(json.dumps(d.to_dict()))
    assert DiskSpec.from_dict(data) == d
    assert data["devid"] == d.devid and data["spec"] == spec


_ALPHABET = st.sampled_from(list("ax,:=/ \t0125pdhsx") + [
    "xvd", "hd", "sd", "raw", "qcow2", "phy:", "tap:", "aio:", "nbd:", "foo:", "cdrom",
    "target=", "format=", "vdev=", "access=", "devtype=", "backendtype=", "script=", "ro",
    "rw", "discard", "no-discard", "direct-io-safe", "mode=", "é", "\n"])


@settings(max_examples=400)
@given(st.one_of(st.text(max_size=60), st.lists(_ALPHABET, max_size=14).map("".join)))
def test_parse_only_raises_disk_spec_error(text: str) -> None:
    try:
        d = parse_disk_spec(text)
    except DiskSpecError as e:
        assert e.spec == text
        return
    assert d.vdev and vdev_to_devid(d.vdev) == d.devid
    assert d.access in ("r", "w") and d.devtype in ("disk", "cdrom")
    assert d.target or d.devtype == "cdrom"
    assert DiskSpec.from_dict(json.loads(json.dumps(d.to_dict()))) == d


@settings(max_examples=300)
@given(st.text(max_size=30))
def test_vdev_to_devid_only_raises_disk_spec_error(text: str) -> None:
    try:
        n = vdev_to_devid(text)
    except DiskSpecError:
        return
    assert 0 <= n < (1 << 29)
