"""pyxen.toolstack.xlvif: xl's vif spec grammar, rate limits and MAC generation."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.errors import ConfigError
from pyxen.toolstack.xlvif import (Rate, VifSpec, VifSpecError, parse_rate, parse_vif_spec,
                                   random_mac)

# ------------------------------------------------------------------ xl-network-configuration(5)

def test_man_page_examples() -> None:
    v = parse_vif_spec("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0")
    assert (v.mac, v.model, v.bridge) == ("00:16:3e:74:3d:76", "rtl8139", "xenbr0")
    assert parse_vif_spec("mac=00:16:3E:74:34:32").mac == "00:16:3e:74:34:32"
    v = parse_vif_spec("mac=00:16:3e:5f:48:e4,bridge=xenbr1")
    assert (v.mac, v.bridge) == ("00:16:3e:5f:48:e4", "xenbr1")


@pytest.mark.parametrize("spec", ["", " ", ",", " , ,"])
def test_empty_spec_is_all_defaults(spec: str) -> None:
    v = parse_vif_spec(spec)
    assert v == VifSpec(spec=spec)
    assert (v.mac, v.bridge, v.ip, v.rate, v.mtu, v.devid, v.trusted) == (
        None, None, (), None, None, None, True)


def test_every_key() -> None:
    v = parse_vif_spec(" mac = 02:00:00:00:00:01 , bridge=br-lan, ip=10.0.0.2 10.0.0.3/24 "
                       "fe80::1, rate=10Mb/s@20ms, vifname=web0, model=e1000, type=ioemu, "
                       "script=vif-route, backend=netdom, gatewaydev=eth0, mtu=9000, "
                       "devid=3, vlan=10p/20, untrusted")
    assert v.mac == "02:00:00:00:00:01" and v.bridge == "br-lan"
    assert v.ip == ("10.0.0.2", "10.0.0.3/24", "fe80::1")
    assert v.rate == Rate(25000, 20000)
    assert (v.vifname, v.model, v.type, v.script, v.backend, v.gatewaydev) == (
        "web0", "e1000", "ioemu", "vif-route", "netdom", "eth0")
    assert (v.mtu, v.devid, v.vlan, v.trusted) == (9000, 3, "10p/20", False)


def test_netdev_is_gatewaydev_and_empty_values_are_defaults() -> None:
    assert parse_vif_spec("netdev=eth1").gatewaydev == "eth1"
    assert parse_vif_spec("bridge=,mac=,ip=").bridge is None
    assert parse_vif_spec("type=vif").type == "vif"


# ------------------------------------------------------------------ rates

@pytest.mark.parametrize("text,per_interval,interval", [
    ("10Mb/s", 62500, 50000),               # 10 megabits/s over the default 50 ms
    ("250KB/s", 12500, 50000),
    ("1MB/s@20ms", 20000, 20000),           # the man page: 20,000 bytes every 20,000 us
    ("100MB/s@20ms", 2_000_000, 20000),
    ("1Gb/s@50us", 6250, 50),
    ("1GB/s@1s", 10**9, 1_000_000),
    ("8b/s@1", 1, 1_000_000),                # a bare interval is in seconds
    ("1000B/s@10m", 10, 10000),              # "m" alone means milliseconds
    ("4294967295B/s", 214748364, 50000),
])
def test_rates(text: str, per_interval: int, interval: int) -> None:
    r = parse_rate(text)
    assert (r.bytes_per_interval, r.interval_us) == (per_interval, interval)
    assert parse_vif_spec(f"rate={text}").rate == r


def test_rate_bytes_per_second() -> None:
    assert parse_rate("1MB/s@20ms").bytes_per_second == 1_000_000


@pytest.mark.parametrize("text", ["", "@20ms", "10Mb", "10 Mb/s", "10mb/s", "10TB/s", "0MB/s",
                                  "4294967296B/s", "1MB/s@", "1MB/s@0ms", "1MB/s@20ns",
                                  "1MB/s@5000s", "1b/s", "-1MB/s", "1MB/s@20ms@1s"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)
    if text:
        with pytest.raises(VifSpecError, match=r"^vif spec "):
            parse_vif_spec(f"rate={text}")


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("spec,fragment", [
    ("mac=01:16:3e:00:00:01", "multicast"),
    ("mac=ff:ff:ff:ff:ff:ff", "multicast"),
    ("mac=00:16:3e:00:00", "invalid mac"),
    ("mac=00-16-3e-00-00-01", "invalid mac"),
    ("mac=00:16:3e:00:00:0g", "invalid mac"),
    ("mac=0:16:3e:0:0:1", "invalid mac"),
    ("vifname=abcdefghijklmnop", "1..15 characters"),
    ("vifname=a/b", "must not contain"),
    ("vifname=vif 1", "must not contain"),
    ("vifname=..", "must not be"),
    ("mtu=67", "68..65535"),
    ("mtu=65536", "68..65535"),
    ("mtu=15OO", "68..65535"),
    ("devid=-1", "0..2147483647"),
    ("type=e1000", "unknown type"),
    ("ip=10.0.0.300", "invalid ip"),
    ("vlan=0", "bad VLAN id"),
    ("vlan=4095", "bad VLAN id"),
    ("vlan=20-10", "bad VLAN id"),
    ("vlan=10/20", "PVID"),
    ("vlan=4000+100x2", "beyond 4094"),
    ("vlan=10q", "bad term"),
    ("bridge=a,bridge=b", "bridge given twice"),
    ("gatewaydev=a,netdev=b", "gatewaydev given twice"),
    ("trusted,untrusted", "given twice"),
    ("bridge", "not a key=value"),
    ("foo=bar", "unknown key 'foo'"),
    ("accel=x", "not supported"),
    ("colo_checkpoint_host=h", "not supported"),
])
def test_errors_name_the_spec(spec: str, fragment: str) -> None:
    with pytest.raises(VifSpecError) as ei:
        parse_vif_spec(spec)
    e = ei.value
    assert isinstance(e, ConfigError) and e.spec == spec
    assert str(e).startswith(f"vif spec {spec!r}: ") and fragment in str(e)


@pytest.mark.parametrize("spec", ["vlan=10", "vlan=10p/20", "vlan=10p/100+10x4", "vlan=1-10u/20p",
                                  "vifname=vif1.0-emu", "mtu=68", "mtu=65535", "devid=0"])
def test_boundary_values_accepted(spec: str) -> None:
    parse_vif_spec(spec)


# ------------------------------------------------------------------ random_mac

def test_random_mac_uses_xen_oui_and_is_unicast() -> None:
    for seed in range(200):
        mac = random_mac(random.Random(seed))
        octets = [int(x, 16) for x in mac.split(":")]
        assert octets[:3] == [0x00, 0x16, 0x3E] and octets[3] < 0x80
        assert parse_vif_spec(f"mac={mac}").mac == mac
    assert random_mac(random.Random(7)) == random_mac(random.Random(7))
    assert random_mac().startswith("00:16:3e:")


# ------------------------------------------------------------------ serialisation, robustness

@pytest.mark.parametrize("spec", ["", "mac=00:16:3e:01:02:03,bridge=xenbr0",
                                  "ip=10.0.0.1 10.0.0.2,rate=1MB/s@20ms,mtu=1400,untrusted,"
                                  "vlan=10p/20,devid=2,vifname=v0"])
def test_to_dict_round_trips_through_json(spec: str) -> None:
    v = parse_vif_spec(spec)
    data = json.loads(json.dumps(v.to_dict()))
    assert VifSpec.from_dict(data) == v
    assert data["spec"] == spec


_ALPHABET = st.sampled_from(list("=, :@/.-0129abfmpsux\t") + [
    "mac=", "00:16:3e:", "rate=", "Mb/s", "MB/s", "ms", "us", "vifname=", "mtu=", "devid=",
    "vlan=", "p", "+10x4", "ip=", "10.0.0.1", "bridge=", "type=", "trusted", "é"])


@settings(max_examples=400)
@given(st.one_of(st.text(max_size=60), st.lists(_ALPHABET, max_size=14).map("".join)))
def test_parse_only_raises_vif_spec_error(text: str) -> None:
    try:
        v = parse_vif_spec(text)
    except VifSpecError as e:
        assert e.spec == text
        return
    assert VifSpec.from_dict(json.loads(json.dumps(v.to_dict()))) == v
