"""The realizer's pure parts: cookies, meter blocks, port ranges, flows per profile."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.agent import port_profile as pp
from vmferry.drivers.softswitch.base import PortState
from vmferry.drivers.softswitch.ovs import normalize_flow
from vmferry.model.profile import parse_profile

MAC = "52:54:00:00:00:07"


def state(name: str, **ids: str) -> PortState:
    return PortState(name=name, tag=100, trunks=frozenset(), vlan_mode="access", iface_type="",
                     ofport=5, mac_in_use=None, external_ids=dict(ids))


def profile(**fields: Any) -> Any:
    return parse_profile({"name": "p", "vlan": 100, "version": 2, **fields})


def flows_of(prof: Any, ips: list[str] | None = None) -> list[Any]:
    alloc = pp.Allocation(pp.port_cookie("vm-a"), 3)
    return pp.desired_flows(5, MAC, ips or ["192.0.2.7"], prof, alloc)


@pytest.mark.parametrize(("low", "high"), [(80, 80), (1000, 1100), (1, 65535), (8000, 8100),
                                           (1023, 1025)])
def test_port_range_masks_cover_exactly(low: int, high: int) -> None:
    covered = set()
    for text in pp.port_range_masks(low, high):
        value, _, mask = text.partition("/")
        v, m = int(value, 0), int(mask, 0) if mask else 0xFFFF
        covered |= {p for p in range(65536) if p & m == v}
    assert covered == set(range(low, high + 1))


def test_cookie_is_tagged_and_stable() -> None:
    assert pp.port_cookie("vm-a") == pp.port_cookie("vm-a") != pp.port_cookie("vm-b")
    assert pp.port_cookie("vm-a") >> 48 == pp.COOKIE_TAG


def test_meter_block_is_recorded_or_first_free() -> None:
    preferred = pp.preferred_block("vm-a")
    taken = {"vm-b": state("vm-b", **{pp.KEY_BLOCK: str(preferred)})}
    alloc = pp.allocate("vm-a", {**taken, "vm-a": state("vm-a")})
    assert alloc.block == (preferred + 1) % pp.METER_BLOCKS
    kept = pp.allocate("vm-a", {"vm-a": state("vm-a", **{pp.KEY_BLOCK: "42"})})
    assert kept.block == 42 and kept.meter_id("to_vm") == 42 * pp.METER_BLOCK_SIZE + 1
    assert len(kept.meter_ids) == len(pp.METER_ROLES)


def test_flows_are_valid_ovs_text_and_unique() -> None:
    prof = profile(acl={"to_vm": {"default": "deny", "rules": [
        {"action": "allow", "protocol": "tcp", "port": "80-81", "remote": "198.51.100.0/24"},
        {"action": "deny", "protocol": "icmp"}]}},
        qos={"to_vm": {"rate_kbps": 100}, "dscp": 10}, storm_control={"broadcast_pps": 5})
    flows = [normalize_flow(f) for f in flows_of(prof)]
    keys = [(f.table, f.priority, f.match) for f in flows]
    assert len(keys) == len(set(keys))
    texts = "\n".join(f"{f.table} {f.priority} {f.match} {f.actions}" for f in flows)
    assert "nw_src=198.51.100.0/24" in texts and "tp_dst=0x50/0xfffe" in texts
    assert "set_field:10->ip_dscp" in texts and "ct(commit,zone=" in texts


def test_first_rule_wins_and_default_applies() -> None:
    prof = profile(acl={"to_vm": {"rules": [{"action": "deny", "protocol": "tcp", "port": 8080},
                                            {"action": "allow", "protocol": "tcp"}]}})
    acl = [f for f in flows_of(prof) if f.table == pp.TABLE_TO_VM and "tcp" in f.match]
    deny = next(f for f in acl if "tp_dst=8080" in f.match)
    allow = next(f for f in acl if "tp_dst" not in f.match)
    assert deny.actions == "drop" and deny.priority > allow.priority


def test_security_switches_off_leave_no_guard() -> None:
    off = profile(security={"mac_antispoof": False, "ip_source_guard": False,
                            "arp_guard": False})
    entry = [f for f in flows_of(off) if f.table == 0]
    assert all(f.actions != "drop" for f in entry)
    on = [f for f in flows_of(profile()) if f.table == 0]
    assert any(f.match == "in_port=5" and f.actions == "drop" for f in on)
    assert any("arp_spa=192.0.2.7" in f.match and f"arp_sha={MAC}" in f.match for f in on)


def test_stateless_acl_has_no_conntrack() -> None:
    prof = profile(acl={"stateful": False, "to_vm": {"rules": [{"action": "deny"}]}})
    assert not any("ct(" in f.actions or "ct_state" in f.match for f in flows_of(prof))


def test_meters_and_spec_follow_profile() -> None:
    prof = profile(qos={"to_vm": {"rate_kbps": 1000, "burst_kb": 200},
                        "from_vm": {"rate_kbps": 2000}},
                   storm_control={"broadcast_pps": 50, "unknown_unicast_pps": 9})
    alloc = pp.Allocation(pp.port_cookie("vm-a"), 0)
    meters = {m.meter_id: m for m in pp.desired_meters(prof, alloc)}
    assert meters[alloc.meter_id("to_vm")].kbps == 1000
    assert meters[alloc.meter_id("to_vm")].burst == 200
    assert meters[alloc.meter_id("broadcast")].pktps == 50
    want = pp.desired_port(state("vm-a", **{"vmferry-owner": "vmferry"}), 5, MAC,
                           ["192.0.2.7"], prof, alloc)
    assert want.spec.tag == 100 and want.spec.external_ids[pp.KEY_VERSION] == "2"
    assert want.spec.external_ids["vmferry-owner"] == "vmferry"
    assert want.not_enforced == ["storm_control.unknown_unicast_pps"]
    trunk = parse_profile({"name": "t", "trunks": [10, 20]})
    spec = pp.desired_spec(state("vm-a"), trunk, alloc)
    assert spec.tag is None and spec.trunks == frozenset({10, 20}) and spec.vlan_mode == "trunk"
