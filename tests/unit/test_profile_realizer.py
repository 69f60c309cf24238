"""The realizer's pure parts (cookies, meter blocks, port ranges, flows per profile), and
realizing many ports at once against an in-memory switch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import pytest

from vmferry.agent import port_profile as pp
from vmferry.drivers.softswitch.base import Flow, Meter, PortSpec, PortState, Softswitch
from vmferry.drivers.softswitch.ovs import meters_after, normalize_flow
from vmferry.errors import InputError, SoftswitchError
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
    taken = {"vm-b": {pp.KEY_BLOCK: str(preferred)}}
    alloc = pp.allocate("vm-a", {**taken, "vm-a": {}})
    assert alloc.block == (preferred + 1) % pp.METER_BLOCKS
    kept = pp.allocate("vm-a", {"vm-a": {pp.KEY_BLOCK: "42"}})
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


# ---- realize_many against an in-memory switch --------------------------------------------------

class MemorySwitch(Softswitch):
    """Ports, flows by cookie and meters in memory; counts the calls that cost on a real one."""

    def __init__(self, names: list[str]) -> None:
        self.rows = {name: PortState(name=name, tag=100, trunks=frozenset(),
                                     vlan_mode="access", iface_type="", ofport=index + 1,
                                     mac_in_use=None, external_ids={"vmferry-owner": "t"})
                     for index, name in enumerate(names)}
        self.flows: dict[int, list[Flow]] = {}
        self.meters: dict[int, Meter] = {}
        self.calls: Counter[str] = Counter()
        self.refuse_port: str | None = None        # flows of this port's cookie are refused

    def ensure_bridge(self, bridge: str, *, datapath_type: str = "netdev",
                      fail_mode: str | None = None) -> None: ...

    def delete_bridge(self, bridge: str) -> None: ...

    def ensure_port(self, bridge: str, port: PortSpec) -> None:
        self.calls["ensure_port"] += 1
        old = self.rows[port.name]
        self.rows[port.name] = PortState(
            name=port.name, tag=port.tag, trunks=port.trunks, vlan_mode=port.vlan_mode,
            iface_type=port.iface_type, ofport=old.ofport, mac_in_use=None,
            external_ids=dict(port.external_ids))

    def ensure_ports(self, bridge: str, ports: Iterable[PortSpec]) -> None:
        self.calls["ensure_ports"] += 1
        for port in ports:
            self.ensure_port(bridge, port)

    def delete_port(self, bridge: str, port: str) -> None: ...

    def ports(self, bridge: str, names: Collection[str] | None = None) -> dict[str, PortState]:
        return {n: s for n, s in self.rows.items() if names is None or n in names}

    def set_trunks(self, bridge: str, port: str, vlans: frozenset[int]) -> None: ...

    def replace_flows(self, bridge: str, cookie: int, flows: list[Flow]) -> None:
        self.replace_flows_many(bridge, {cookie: flows})

    def replace_flows_many(self, bridge: str, flows: Mapping[int, list[Flow]],
                           actual: Mapping[int, list[Flow]] | None = None) -> None:
        self.calls["bundle"] += 1
        if self.refuse_port is not None and pp.port_cookie(self.refuse_port) in flows:
            raise SoftswitchError("OVS refused a flow", cause="test")
        for cookie, cookie_flows in flows.items():
            used = {int(a.split(":")[1]) for f in cookie_flows for a in f.actions.split(",")
                    if a.startswith("meter:")}
            assert used <= set(self.meters), "a flow's meter must exist before the flow"
            self.flows[cookie] = list(cookie_flows)

    def dump_flows_many(self, bridge: str, cookies: Collection[int]) -> dict[int, list[Flow]]:
        self.calls["dump_flows"] += 1
        return {cookie: list(self.flows.get(cookie, [])) for cookie in cookies}

    def dump_flows(self, bridge: str, cookie: int | None = None) -> list[Flow]:
        return [f for c, fl in self.flows.items() if cookie in (None, c) for f in fl]

    def replace_meters(self, bridge: str, meters: list[Meter], owned: Collection[int],
                       actual: list[Meter] | None = None) -> list[Meter]:
        if actual is None:
            actual = self.dump_meters(bridge)
        for meter_id in owned:
            self.meters.pop(meter_id, None)
        self.meters.update({m.meter_id: m for m in meters})
        return meters_after(actual, meters, owned)

    def dump_meters(self, bridge: str) -> list[Meter]:
        self.calls["dump_meters"] += 1
        return sorted(self.meters.values(), key=lambda m: m.meter_id)

    def flush_fdb(self, bridge: str, mac: str | None = None) -> None: ...


def requests(names: list[str], prof: Any) -> list[pp.PortRequest]:
    return [pp.PortRequest(name, f"52:54:00:00:01:{i:02x}", (f"192.0.2.{i + 10}/24",), prof)
            for i, name in enumerate(names)]


METERED = {"qos": {"to_vm": {"rate_kbps": 1000}, "from_vm": {"rate_kbps": 2000}},
           "storm_control": {"broadcast_pps": 50}}


def test_realize_many_is_one_transaction_one_meter_dump_one_bundle() -> None:
    names = [f"vm-{i}" for i in range(5)]
    switch = MemorySwitch(names)
    reports = pp.realize_many(switch, "br", requests(names, profile(**METERED)))
    assert [r.port for r in reports] == names
    assert switch.calls["ensure_ports"] == 1 and switch.calls["bundle"] == 1
    assert switch.calls["dump_meters"] == 1 and switch.calls["dump_flows"] == 1
    blocks = [r.meter_block for r in reports]
    assert len(set(blocks)) == len(blocks), "every port gets a meter block of its own"
    assert len(switch.meters) == 5 * 3
    for name, report in zip(names, reports, strict=True):
        row = switch.rows[name]
        assert row.external_ids[pp.KEY_VERSION] == "2"
        assert row.external_ids[pp.KEY_BLOCK] == str(report.meter_block)
        assert row.external_ids["vmferry-owner"] == "t"
        assert switch.flows[pp.port_cookie(name)]


def test_realize_many_equals_realizing_one_by_one() -> None:
    names = ["vm-a", "vm-b", "vm-c"]
    together, alone = MemorySwitch(names), MemorySwitch(names)
    pp.realize_many(together, "br", requests(names, profile(**METERED)))
    for request in requests(names, profile(**METERED)):
        pp.realize(alone, "br", request.port, request.vm_mac, request.vm_ips, request.profile)
    assert together.rows == alone.rows
    assert together.flows == alone.flows and together.meters == alone.meters


def test_realize_many_drops_meters_a_new_version_no_longer_uses() -> None:
    names = ["vm-a", "vm-b"]
    switch = MemorySwitch(names)
    pp.realize_many(switch, "br", requests(names, profile(**METERED)))
    pp.realize_many(switch, "br", requests(names, profile(version=3)))
    assert switch.meters == {}
    assert all(switch.rows[n].external_ids[pp.KEY_VERSION] == "3" for n in names)


def test_realize_each_reports_a_refused_port_alone() -> None:
    names = ["vm-a", "vm-b", "vm-c"]
    switch = MemorySwitch(names)
    switch.refuse_port = "vm-b"
    outcomes = pp.realize_each(switch, "br", requests(names, profile()))
    assert isinstance(outcomes[1], SoftswitchError)
    assert isinstance(outcomes[0], pp.RealizationReport)
    assert isinstance(outcomes[2], pp.RealizationReport)
    assert pp.port_cookie("vm-a") in switch.flows and pp.port_cookie("vm-c") in switch.flows
    assert pp.port_cookie("vm-b") not in switch.flows


def test_realize_many_refuses_a_port_twice_and_a_missing_port() -> None:
    switch = MemorySwitch(["vm-a"])
    with pytest.raises(InputError):
        pp.realize_many(switch, "br", requests(["vm-a", "vm-a"], profile()))
    with pytest.raises(SoftswitchError):
        pp.realize_many(switch, "br", requests(["vm-a", "vm-x"], profile()))
    assert switch.calls["ensure_ports"] == 0 and switch.calls["bundle"] == 0
