"""Port profile model: YAML loading and refusal of bad input with the field path."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from vmferry.errors import InputError
from vmferry.model.profile import PortProfile, load_profiles, parse_profile, parse_profiles

GOOD = """
name: web
description: web servers
vlan: 100
mtu: 1500
acl:
  to_vm:
    default: deny
    rules:
      - {action: allow, protocol: tcp, port: 80}
      - {action: deny, protocol: tcp, port: 8000-8100, remote: 198.51.100.0/24}
      - {action: allow, protocol: icmp}
  from_vm: {default: allow}
qos:
  to_vm: {rate_kbps: 10000, burst_kb: 1000}
  from_vm: {rate_kbps: 5000}
  dscp: 46
storm_control: {broadcast_pps: 100, multicast_pps: 200}
security: {mac_antispoof: true, ip_source_guard: false}
"""


def base(**changes: Any) -> dict[str, Any]:
    return {"name": "p", "vlan": 100, **changes}


def test_full_profile_loads() -> None:
    [profile] = load_profiles(GOOD)
    assert profile.vlan == 100 and profile.fabric_vlans == [100]
    rules = profile.acl.to_vm.rules
    assert rules[0].port_range == (80, 80) and rules[1].port_range == (8000, 8100)
    assert rules[1].remote == "198.51.100.0/24"
    assert profile.acl.stateful is True and profile.acl.to_vm.default == "deny"
    assert profile.qos.to_vm is not None and profile.qos.to_vm.burst_kb == 1000
    assert profile.security.arp_guard is True and profile.security.ip_source_guard is False
    assert profile.storm_control.broadcast_pps == 100


def test_several_profiles_per_file_as_list_and_documents() -> None:
    assert [p.name for p in load_profiles("- {name: a, vlan: 1}\n- {name: b, trunks: [5, 3]}\n")
            ] == ["a", "b"]
    docs = load_profiles("name: a\nvlan: 1\n---\nname: b\nvlan: 2\n---\nprofiles:\n"
                         "  - {name: c, vlan: 3}\n")
    assert [p.name for p in docs] == ["a", "b", "c"]
    assert load_profiles("name: t\ntrunks: [200, 100, 100]\n")[0].trunks == [100, 200]


def test_spec_excludes_name_and_version() -> None:
    a = parse_profile(base(version=3))
    b = parse_profile(base(name="other"))
    assert a.same_spec(b)
    assert "version" not in a.spec() and "name" not in a.spec()


@pytest.mark.parametrize(("data", "field", "reason"), [
    (base(vlan=0), "vlan", "greater than or equal to 1"),
    (base(vlan=4095), "vlan", "less than or equal to 4094"),
    (base(vlan=5000), "vlan", "less than or equal to 4094"),
    ({"name": "p", "trunks": [100, 5000]}, "trunks[1]", "4094"),
    (base(acl={"to_vm": {"rules": [{"action": "deny", "remote": "10.0.0.300/8"}]}}),
     "acl.to_vm.rules[0].remote", "not a CIDR"),
    (base(acl={"from_vm": {"rules": [{"action": "deny", "protocol": "tcp",
                                       "port": "9000-80"}]}}),
     "acl.from_vm.rules[0].port", "upside down"),
    (base(acl={"to_vm": {"rules": [{"action": "deny", "protocol": "tcp", "port": 70000}]}}),
     "acl.to_vm.rules[0].port", "not 1-65535"),
    (base(acl={"to_vm": {"rules": [{"action": "deny", "protocol": "gre"}]}}),
     "acl.to_vm.rules[0].protocol", "'any', 'icmp', 'tcp' or 'udp'"),
    (base(acl={"to_vm": {"rules": [{"action": "deny", "protocol": "icmp", "port": 80}]}}),
     "acl.to_vm.rules[0]", "needs protocol tcp or udp"),
    (base(acl={"to_vm": {"rules": [{"action": "reject"}]}}),
     "acl.to_vm.rules[0].action", "'allow' or 'deny'"),
    (base(acl={"to_vm": {"default": "maybe"}}), "acl.to_vm.default", "'allow' or 'deny'"),
    (base(qos={"to_vm": {"rate_kbps": 0}}), "qos.to_vm.rate_kbps", "greater than 0"),
    (base(qos={"from_vm": {"rate_kbps": 100, "burst_kb": -5}}), "qos.from_vm.burst_kb",
     "greater than or equal to 1"),
    (base(qos={"dscp": 64}), "qos.dscp", "less than or equal to 63"),
    (base(storm_control={"broadcast_pps": 0}), "storm_control.broadcast_pps", "greater than 0"),
    (base(colour="red"), "colour", "unknown field"),
    (base(acl={"to_vm": {"rules": [{"action": "deny", "prot": "tcp"}]}}),
     "acl.to_vm.rules[0].prot", "unknown field"),
    (base(security={"mac_antispoofing": True}), "security.mac_antispoofing", "unknown field"),
    (base(security={"allow_router_advertisements": "yes"}),
     "security.allow_router_advertisements", "valid boolean"),
    (base(security={"allow_foreign_neighbor_advertisements": 1}),
     "security.allow_foreign_neighbor_advertisements", "valid boolean"),
    ({"name": "p"}, "body", "give vlan"),
    (base(trunks=[1]), "body", "not both"),
    (base(name="bad name"), "name", "pattern"),
    (base(mtu=20), "mtu", "greater than or equal to 68"),
])
def test_bad_input_names_the_field(data: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_profile(data)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_field_path_in_a_file_names_the_profile() -> None:
    with pytest.raises(InputError) as caught:
        load_profiles("- {name: a, vlan: 1}\n- {name: b, vlan: 1, qos: {to_vm: {rate_kbps: 0}}}\n")
    assert caught.value.field == "profiles[1].qos.to_vm.rate_kbps"


def test_duplicate_names_and_bad_yaml_refused() -> None:
    with pytest.raises(InputError) as caught:
        parse_profiles([{"name": "a", "vlan": 1}, {"name": "a", "vlan": 2}])
    assert caught.value.field == "profiles[1].name"
    with pytest.raises(InputError) as caught:
        load_profiles("name: [unclosed\n")
    assert caught.value.field == "file"
    with pytest.raises(InputError):
        load_profiles("")


def test_profile_is_immutable() -> None:
    profile = parse_profile(base())
    with pytest.raises(ValidationError):
        profile.vlan = 5  # type: ignore[misc]
    assert isinstance(profile, PortProfile)


def test_ipv6_guards_are_on_unless_allowed() -> None:
    plain = parse_profile({"name": "p", "vlan": 1})
    assert not plain.security.allow_router_advertisements
    assert not plain.security.allow_foreign_neighbor_advertisements
    router = parse_profile({"name": "r", "vlan": 1, "security": {
        "allow_router_advertisements": True, "allow_foreign_neighbor_advertisements": True}})
    assert router.security.allow_router_advertisements
    assert router.security.allow_foreign_neighbor_advertisements
    assert not router.same_spec(plain)
