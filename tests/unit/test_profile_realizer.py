"""The realizer's pure parts (cookies, meter blocks, port ranges, flows per profile), and
realizing ports against the in-memory ``FakeSoftswitch``."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from vmferry.drivers.softswitch.base import PortSpec, PortState
from vmferry.drivers.softswitch.fake import FakeSoftswitch
from vmferry.drivers.softswitch.ovs import normalize_flow
from vmferry.drivers.softswitch.ovs import profile as pp
from vmferry.drivers.softswitch.ovs import profile_flows as pf
from vmferry.errors import InputError, SoftswitchError
from vmferry.model.profile import parse_profile

MAC = "52:54:00:00:00:07"


def state(name: str, **ids: str) -> PortState:
    return PortState(name=name, tag=100, trunks=frozenset(), vlan_mode="access", iface_type="",
                     ofport=5, mac_in_use=None, external_ids=dict(ids))


def profile(**fields: Any) -> Any:
    return parse_profile({"name": "p", "vlan": 100, "version": 2, **fields})


def flows_of(prof: Any, ips: list[str] | None = None) -> list[Any]:
    alloc = pf.Allocation(pf.port_cookie("vm-a"), 3)
    return pf.desired_flows(5, MAC, ips or ["192.0.2.7"], prof, alloc)


@pytest.mark.parametrize(("low", "high"), [(80, 80), (1000, 1100), (1, 65535), (8000, 8100),
                                           (1023, 1025)])
def test_port_range_masks_cover_exactly(low: int, high: int) -> None:
    covered = set()
    for text in pf.port_range_masks(low, high):
        value, _, mask = text.partition("/")
        v, m = int(value, 0), int(mask, 0) if mask else 0xFFFF
        covered |= {p for p in range(65536) if p & m == v}
    assert covered == set(range(low, high + 1))


def test_cookie_is_tagged_and_stable() -> None:
    assert pf.port_cookie("vm-a") == pf.port_cookie("vm-a") != pf.port_cookie("vm-b")
    assert pf.port_cookie("vm-a") >> 48 == pf.COOKIE_TAG


def test_meter_block_is_recorded_or_first_free() -> None:
    preferred = pf.preferred_block("vm-a")
    taken = {"vm-b": {pf.KEY_BLOCK: str(preferred)}}
    alloc = pf.allocate("vm-a", {**taken, "vm-a": {}})
    assert alloc.block == (preferred + 1) % pf.METER_BLOCKS
    kept = pf.allocate("vm-a", {"vm-a": {pf.KEY_BLOCK: "42"}})
    assert kept.block == 42 and kept.meter_id("to_vm") == 42 * pf.METER_BLOCK_SIZE + 1
    assert len(kept.meter_ids) == len(pf.METER_ROLES)


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
    acl = [f for f in flows_of(prof) if f.table == pf.TABLE_TO_VM and "tcp" in f.match]
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
    alloc = pf.Allocation(pf.port_cookie("vm-a"), 0)
    meters = {m.meter_id: m for m in pf.desired_meters(prof, alloc)}
    assert meters[alloc.meter_id("to_vm")].kbps == 1000
    assert meters[alloc.meter_id("to_vm")].burst == 200
    assert meters[alloc.meter_id("broadcast")].pktps == 50
    want = pf.desired_port(state("vm-a", **{"vmferry-owner": "vmferry"}), 5, MAC,
                           ["192.0.2.7"], prof, alloc)
    assert want.spec.tag == 100 and want.spec.external_ids[pf.KEY_VERSION] == "2"
    assert want.spec.external_ids["vmferry-owner"] == "vmferry"
    assert want.not_enforced == ["storm_control.unknown_unicast_pps"]
    trunk = parse_profile({"name": "t", "trunks": [10, 20]})
    spec = pf.desired_spec(state("vm-a"), trunk, alloc)
    assert spec.tag is None and spec.trunks == frozenset({10, 20}) and spec.vlan_mode == "trunk"


# ---- realizing against the fake switch --------------------------------------------------

def fake_switch(names: list[str], **options: Any) -> FakeSoftswitch:
    """A fake switch with a bridge ``br`` holding ``names`` as access ports of VLAN 100."""
    switch = FakeSoftswitch(**options)
    switch.ensure_bridge("br")
    switch.ensure_ports("br", [PortSpec(name, tag=100, vlan_mode="access",
                                        external_ids={"vmferry-owner": "t"}) for name in names])
    switch.calls.clear()
    return switch


def meter_ids(switch: FakeSoftswitch) -> set[int]:
    return {meter.meter_id for meter in switch.dump_meters("br")}


def requests(names: list[str], prof: Any) -> list[pp.PortRequest]:
    return [pp.PortRequest(name, f"52:54:00:00:01:{i:02x}", (f"192.0.2.{i + 10}/24",), prof)
            for i, name in enumerate(names)]


METERED = {"qos": {"to_vm": {"rate_kbps": 1000}, "from_vm": {"rate_kbps": 2000}},
           "storm_control": {"broadcast_pps": 50}}


def test_realize_many_is_one_transaction_one_meter_dump_one_bundle() -> None:
    names = [f"vm-{i}" for i in range(5)]
    switch = fake_switch(names)
    reports = pp.realize_many(switch, "br", requests(names, profile(**METERED)))
    assert [r.port for r in reports] == names
    assert switch.calls["transactions"] == 1 and switch.calls["bundles"] == 1
    assert switch.calls["meter_dumps"] == 1 and switch.calls["flow_dumps"] == 1
    blocks = [r.meter_block for r in reports]
    assert len(set(blocks)) == len(blocks), "every port gets a meter block of its own"
    assert len(meter_ids(switch)) == 5 * 3
    for name, report in zip(names, reports, strict=True):
        row = switch.ports("br")[name]
        assert row.external_ids[pf.KEY_VERSION] == "2"
        assert row.external_ids[pf.KEY_BLOCK] == str(report.meter_block)
        assert row.external_ids["vmferry-owner"] == "t"
        assert switch.dump_flows("br", pf.port_cookie(name))


def test_realize_many_equals_realizing_one_by_one() -> None:
    names = ["vm-a", "vm-b", "vm-c"]
    together, alone = fake_switch(names), fake_switch(names)
    pp.realize_many(together, "br", requests(names, profile(**METERED)))
    for request in requests(names, profile(**METERED)):
        pp.realize(alone, "br", request.port, request.vm_mac, request.vm_ips, request.profile)
    assert together.ports("br") == alone.ports("br")
    assert together.dump_flows("br") == alone.dump_flows("br")
    assert together.dump_meters("br") == alone.dump_meters("br")


def test_realize_many_drops_meters_a_new_version_no_longer_uses() -> None:
    names = ["vm-a", "vm-b"]
    switch = fake_switch(names)
    pp.realize_many(switch, "br", requests(names, profile(**METERED)))
    pp.realize_many(switch, "br", requests(names, profile(version=3)))
    assert switch.dump_meters("br") == []
    assert all(switch.ports("br")[n].external_ids[pf.KEY_VERSION] == "3" for n in names)


def test_realize_each_reports_a_refused_port_alone() -> None:
    names = ["vm-a", "vm-b", "vm-c"]
    switch = fake_switch(names, refuse_cookies={pf.port_cookie("vm-b")})
    outcomes = pp.realize_each(switch, "br", requests(names, profile()))
    assert isinstance(outcomes[1], SoftswitchError)
    assert isinstance(outcomes[0], pp.RealizationReport)
    assert isinstance(outcomes[2], pp.RealizationReport)
    cookies = switch.flow_cookies("br")
    assert pf.port_cookie("vm-a") in cookies and pf.port_cookie("vm-c") in cookies
    assert pf.port_cookie("vm-b") not in cookies


def test_realize_many_refuses_a_port_twice_and_a_missing_port() -> None:
    switch = fake_switch(["vm-a"])
    with pytest.raises(InputError):
        pp.realize_many(switch, "br", requests(["vm-a", "vm-a"], profile()))
    with pytest.raises(SoftswitchError):
        pp.realize_many(switch, "br", requests(["vm-a", "vm-x"], profile()))
    assert switch.calls["transactions"] == 0 and switch.calls["bundles"] == 0


def test_status_matches_after_realize_and_tells_what_was_tampered() -> None:
    switch = fake_switch(["vm-a"])
    prof = profile(**METERED)
    pp.realize(switch, "br", "vm-a", MAC, ["192.0.2.7/24"], prof)
    status = pp.port_status(switch, "br", "vm-a", MAC, ["192.0.2.7"], prof)
    assert status["match"] and not status["missing_flows"] and not status["extra_flows"]
    entry = [f for f in switch.dump_flows("br", pf.port_cookie("vm-a")) if f.table != 0]
    switch.replace_flows("br", pf.port_cookie("vm-a"), entry)
    status = pp.port_status(switch, "br", "vm-a", MAC, ["192.0.2.7"], prof)
    assert not status["match"] and status["missing_flows"] and not status["extra_flows"]
    assert all(text.startswith("table=0,") for text in status["missing_flows"])


def test_remove_takes_away_flows_meters_and_tags_only() -> None:
    switch = fake_switch(["vm-a", "vm-b"])
    pp.realize_many(switch, "br", requests(["vm-a", "vm-b"], profile(**METERED)))
    assert pp.remove(switch, "br", "vm-a") is True
    row = switch.ports("br")["vm-a"]
    assert not set(pf.PROFILE_KEYS) & row.external_ids.keys()
    assert row.external_ids["vmferry-owner"] == "t" and row.tag == 100
    assert pf.port_cookie("vm-a") not in switch.flow_cookies("br")
    assert pf.port_cookie("vm-b") in switch.flow_cookies("br")
    assert len(meter_ids(switch)) == 3, "the other port's meters stay"
    assert pp.remove(switch, "br", "vm-a") is False
    assert pp.port_status(switch, "br", "vm-a", MAC, [], None)["match"]


def test_realize_waits_for_the_port_number_on_an_event() -> None:
    switch = FakeSoftswitch(unnumbered={"vm-late"})
    switch.ensure_bridge("br")
    switch.ensure_port("br", PortSpec("vm-late", tag=100, vlan_mode="access"))
    numbering = threading.Timer(0.05, switch.number_port, args=("br", "vm-late", 9))
    numbering.start()
    report = pp.realize(switch, "br", "vm-late", MAC, ["192.0.2.7"], profile())
    numbering.join()
    assert report.flows > 0
    assert all("in_port=9" in f.match or "dl_dst" in f.match
               for f in switch.dump_flows("br", report.cookie) if f.table == 0)


def test_ipv6_link_local_only_from_the_vms_own_mac() -> None:
    assert pf.link_local("52:54:00:12:34:56") == "fe80::5054:ff:fe12:3456"
    entry = [f for f in flows_of(profile(), ["192.0.2.7", "2001:db8::7"]) if f.table == 0]
    sources = {f.match.rpartition("ipv6_src=")[2] for f in entry if "ipv6_src=" in f.match}
    assert sources == {"2001:db8::7", pf.link_local(MAC), "::"}
    assert all(f.actions == f"goto_table:{pf.TABLE_ND_GUARD}" for f in entry
               if "ipv6_src=" in f.match)


def test_router_and_neighbor_advertisements_are_guarded_unless_allowed() -> None:
    guard = [f for f in flows_of(profile(), ["2001:db8::7"]) if f.table == pf.TABLE_ND_GUARD]
    drops = {f.match for f in guard if f.actions == "drop"}
    assert drops == {"in_port=5,icmp6,icmp_type=134", "in_port=5,icmp6,icmp_type=137",
                     "in_port=5,icmp6,icmp_type=136,icmp_code=0"}
    targets = {(f.match.split("nd_target=")[1].split(",")[0], f.match.split("nd_tll=")[1])
               for f in guard if "nd_target=" in f.match}
    assert targets == {(t, tll) for t in ("2001:db8::7", pf.link_local(MAC))
                       for tll in (MAC, pf.NO_MAC)}
    for flow in guard:
        normalize_flow(flow)         # raises for a field without its prerequisites
    router = profile(security={"allow_router_advertisements": True})
    assert not any("icmp_type=134" in f.match for f in flows_of(router))
    assert any("icmp_type=136" in f.match for f in flows_of(router))
    both = profile(security={"allow_router_advertisements": True,
                             "allow_foreign_neighbor_advertisements": True})
    flows = flows_of(both)
    assert not any(f.table == pf.TABLE_ND_GUARD for f in flows)
    assert not any(str(pf.TABLE_ND_GUARD) in f.actions for f in flows)


def test_nd_guard_holds_without_the_source_guard() -> None:
    off = profile(security={"ip_source_guard": False})
    entry = [f for f in flows_of(off) if f.table == 0 and "ipv6" in f.match]
    assert [(f.match, f.actions) for f in entry] == [
        (f"in_port=5,dl_src={MAC},ipv6", f"goto_table:{pf.TABLE_ND_GUARD}")]
