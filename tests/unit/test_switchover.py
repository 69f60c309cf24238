"""Make-before-break switchover: cookies, the rules (pure), and one window's life cycle on a
fake fabric and fake agents."""

from __future__ import annotations

import re

import pytest

from vmferry.controller.switchover import (
    MakeBeforeBreak,
    SwitchoverContext,
    SwitchoverError,
    leftovers,
)
from vmferry.drivers.fabric.fake import FakeFabric, FakeSwitch
from vmferry.drivers.fabric.ovs_fabric import parse_mac_moves, parse_static_entries
from vmferry.errors import AgentError, FabricError, InputError, NotFoundError
from vmferry.model.switchover import (
    COOKIE_PREFIX,
    GATE_BIT,
    PRIORITY,
    PortInfo,
    Rule,
    SwitchPorts,
    carries,
    fabric_rules,
    gate_cookie,
    gate_rules,
    host_rules,
    is_gate_cookie,
    is_mbb_cookie,
    mbb_cookie,
    migration_of,
    path_ports,
    pin_sides,
    switch_rules,
)
from vmferry.model.topology import Topology, default_topology_path, load_topology

MAC = "52:54:00:AB:CD:EF"


@pytest.fixture
def topology() -> Topology:
    return load_topology(default_topology_path())


def lab_ports() -> dict[str, dict[str, PortInfo]]:
    trunk = frozenset({100, 200})
    return {
        "tor1": {"t-spine": PortInfo(1, trunk_vlans=trunk),
                 "h-host1": PortInfo(2, trunk_vlans=frozenset({100})),
                 "h-host2": PortInfo(3, trunk_vlans=frozenset({4095})),
                 "a-client-100": PortInfo(4, access_vlan=100),
                 "a-client-200": PortInfo(5, access_vlan=200),
                 "br-fabric": PortInfo(65534, trunk_vlans=frozenset())},
        "spine": {"t-tor1": PortInfo(1, trunk_vlans=trunk), "t-tor2": PortInfo(2,
                                                                              trunk_vlans=trunk)},
        "tor2": {"t-spine": PortInfo(1, trunk_vlans=trunk),
                 "h-host3": PortInfo(2, trunk_vlans=frozenset({100, 200})),
                 "h-host4": PortInfo(3, trunk_vlans=frozenset({200}))},
    }


def test_cookie_round_trip_and_recognition() -> None:
    cookie = mbb_cookie(42)
    assert is_mbb_cookie(cookie)
    assert migration_of(cookie) == 42
    assert not is_mbb_cookie(42)
    assert not is_mbb_cookie(0)
    assert not is_mbb_cookie(COOKIE_PREFIX)     # no migration id
    assert mbb_cookie(1) != mbb_cookie(2)
    for bad in (0, GATE_BIT, 1 << 40):
        with pytest.raises(ValueError):
            mbb_cookie(bad)
    gate = gate_cookie(cookie)
    assert gate != cookie and is_mbb_cookie(gate) and is_gate_cookie(gate)
    assert not is_gate_cookie(cookie)
    assert migration_of(gate) == 42
    assert not is_mbb_cookie(COOKIE_PREFIX | GATE_BIT)      # a gate of no migration


def test_path_ports_across_the_spine(topology: Topology) -> None:
    assert path_ports(topology, "host1", "host3") == {
        "tor1": ["h-host1", "t-spine"], "spine": ["t-tor1", "t-tor2"],
        "tor2": ["t-spine", "h-host3"]}


@pytest.mark.parametrize(("port", "expected"), [
    (PortInfo(1, trunk_vlans=frozenset({100, 200})), "tagged"),
    (PortInfo(1, trunk_vlans=frozenset({200})), None),
    (PortInfo(1, trunk_vlans=frozenset()), None),          # OVS: all VLANs; we admit none
    (PortInfo(1, trunk_vlans=frozenset({4095})), None),
    (PortInfo(1, access_vlan=100), "untagged"),
    (PortInfo(1, access_vlan=200), None),
])
def test_which_ports_admit_the_vlan(port: PortInfo, expected: str | None) -> None:
    assert carries(port, 100) == expected


def test_every_fabric_rule_matches_its_input_port_and_vlan(topology: Topology) -> None:
    ports = {name: SwitchPorts(p) for name, p in lab_ports().items()}
    rules = fabric_rules(topology, 100, MAC, "host1", "host3", ports)
    by_ofport = {name: {info.ofport: (pname, info) for pname, info in p.items()}
                 for name, p in lab_ports().items()}
    assert set(rules) == {"tor1", "spine", "tor2"}
    for switch, switch_rules_ in rules.items():
        for rule in switch_rules_:
            assert rule.priority == PRIORITY
            in_port = int(re.search(r"in_port=(\d+)", rule.match).group(1))  # type: ignore[union-attr]
            name, info = by_ofport[switch][in_port]
            if info.access_vlan is not None:
                assert info.access_vlan == 100 and "vlan_tci=0" in rule.match, rule
                assert rule.actions.startswith("push_vlan:0x8100,set_field:4196->vlan_vid,")
            else:
                assert info.trunk_vlans and 100 in info.trunk_vlans, (switch, name)
                assert "dl_vlan=100" in rule.match, rule
            assert f"dl_dst={MAC.lower()}" in rule.match
            # Never out of the port it came in by, never to a port off the path.
            outputs = {int(n) for n in re.findall(r"output:(\d+)", rule.actions)}
            assert in_port not in outputs
            path = {by_ofport[switch][o][0] for o in outputs}
            assert path <= set(path_ports(topology, "host1", "host3")[switch])
    tor1 = {r.match.split(",")[0] for r in rules["tor1"]}
    # client-200 (VLAN 200), host2 (does not carry 100), the bridge's own port: no rule.
    assert tor1 == {"in_port=1", "in_port=2", "in_port=4"}
    assert Rule(PRIORITY, f"in_port=4,vlan_tci=0,dl_dst={MAC.lower()}",
                "push_vlan:0x8100,set_field:4196->vlan_vid,output:2,output:1") in rules["tor1"]
    assert Rule(PRIORITY, f"in_port=1,dl_vlan=100,dl_dst={MAC.lower()}",
                "output:2") in rules["tor2"]


def test_a_path_port_without_the_vlan_is_refused() -> None:
    ports = SwitchPorts({"a": PortInfo(1, trunk_vlans=frozenset({200})),
                         "b": PortInfo(2, trunk_vlans=frozenset({100}))})
    with pytest.raises(ValueError, match="does not carry VLAN 100"):
        switch_rules(["a", "b"], ports, 100, MAC)


def test_host_rule_pops_the_tag_into_the_tap() -> None:
    assert host_rules(7, 9, 100, MAC) == [
        Rule(PRIORITY, f"in_port=7,dl_vlan=100,dl_dst={MAC.lower()}", "pop_vlan,output:9")]


def test_the_closed_gate_drops_what_the_open_one_delivers() -> None:
    closed, = gate_rules(7, 100, MAC)
    opened, = host_rules(7, 9, 100, MAC)
    assert closed == Rule(PRIORITY, f"in_port=7,dl_vlan=100,dl_dst={MAC.lower()}", "drop")
    # Same priority and match: one replaces the other, never both at once.
    assert (closed.priority, closed.match) == (opened.priority, opened.match)


def test_pins_sit_towards_the_source_and_move_towards_the_destination(
        topology: Topology) -> None:
    assert pin_sides(topology, "host1", "host3") == {
        "tor1": ("h-host1", "t-spine"), "spine": ("t-tor1", "t-tor2"),
        "tor2": ("t-spine", "h-host3")}
    assert pin_sides(topology, "host3", "host1")["tor1"] == ("t-spine", "h-host1")
    assert pin_sides(topology, "host1", "host2") == {"tor1": ("h-host1", "h-host2")}


def test_static_entries_from_fdb_show() -> None:
    text = (" port  VLAN  MAC                Age\n"
            "    2   100  52:54:00:ab:cd:ef  static\n"
            "    1   100  52:54:00:00:00:01    3\n"
            "    4   200  52:54:00:AB:00:02  static\n")
    assert parse_static_entries(text) == {(100, "52:54:00:ab:cd:ef"), (200, "52:54:00:ab:00:02")}


def test_mac_moves_from_fdb_stats_show() -> None:
    text = ('Statistics for bridge "br-fabric":\n'
            "  Current/maximum MAC entries in the table: 3/8192\n"
            "  Total number of port moved MAC entries  : 7\n")
    assert parse_mac_moves(text) == 7
    with pytest.raises(FabricError):
        parse_mac_moves("nothing")


# ---- one window on fakes ------------------------------------------------------------------

class FakeAgent:
    def __init__(self, host: str, log: list[tuple[str, str, int]], fail: bool = False) -> None:
        self.host, self.log, self.fail = host, log, fail

    def open_switchover(self, vm: str, cookie: int, vlan: int, mac: str) -> int:
        if self.fail:
            raise AgentError(f"agent on {self.host} unreachable", host=self.host)
        self.log.append(("arm" if is_gate_cookie(cookie) else "open", self.host, cookie))
        return 1

    def close_switchover(self, cookie: int) -> None:
        self.log.append(("close", self.host, cookie))


def window(topology: Topology, *, profile: bool = False, failing: set[str] = frozenset(),
           ) -> tuple[MakeBeforeBreak, FakeFabric, list[tuple[str, str, int]], dict[str, object]]:
    fabric = FakeFabric({name: FakeSwitch(ports=dict(p)) for name, p in lab_ports().items()})
    calls: list[tuple[str, str, int]] = []
    recorded: dict[str, object] = {}
    ctx = SwitchoverContext(
        migration_id=5, vm="vm1", mac=MAC, vlan=100, source="host1", destination="host3",
        has_profile=profile, topology=topology, fabric=fabric,
        agent=lambda host: FakeAgent(host, calls, fail=host in failing),
        record=lambda **values: recorded.update(values))
    return MakeBeforeBreak(ctx), fabric, calls, recorded


def test_prepare_stages_behind_a_closed_gate_open_opens_it_close_removes_all(
        topology: Topology) -> None:
    mbb, fabric, calls, recorded = window(topology)
    cookie = mbb_cookie(5)
    mbb.open()                                  # nothing staged: nothing to open
    assert calls == []
    mbb.prepare()
    assert {n for n, s in fabric.switches.items() if cookie in s.rules} == {"tor1", "spine",
                                                                            "tor2"}
    assert calls == [("arm", "host3", gate_cookie(cookie))]
    assert recorded["make_before_break_installs"] == 1
    mbb.open()
    assert calls[1:] == [("open", "host3", cookie)]
    assert recorded["make_before_break_open_ms"] is not None
    mbb.open()                                  # once per run
    assert len(calls) == 2
    assert mbb.close() == []
    assert all(not s.rules for s in fabric.switches.values())
    assert sorted(c for c in calls if c[0] == "close") == [("close", "host1", cookie),
                                                           ("close", "host3", cookie)]
    assert recorded["make_before_break"] == "removed"
    mbb.prepare()                               # closed: never stages again
    mbb.open()
    assert all(not s.rules for s in fabric.switches.values()) and len(calls) == 4


def test_the_mac_is_pinned_at_the_source_while_the_window_stands_then_moves_once(
        topology: Topology) -> None:
    mbb, fabric, _, recorded = window(topology)
    mac = MAC.lower()
    for switch, port in (("tor1", "h-host1"), ("spine", "t-tor1"), ("tor2", "t-spine")):
        fabric.learn(switch, mac, port)
    mbb.prepare()
    assert {n: s.pinned for n, s in fabric.switches.items()} == {
        "tor1": {(100, mac): "h-host1"}, "spine": {(100, mac): "t-tor1"},
        "tor2": {(100, mac): "t-spine"}}
    mbb.open()
    # Frames from the resumed guest cross the switches from the destination's side: the
    # pins hold, so nothing moves back and forth.
    for switch, port in (("tor2", "h-host3"), ("spine", "t-tor2"), ("tor1", "t-spine")):
        fabric.learn(switch, mac, port)
    assert all(s.learned[mac] != "h-host3" for s in fabric.switches.values())
    assert mbb.close(arrived=True) == [] and mbb.pins_held == 3
    assert all(not s.rules for s in fabric.switches.values())
    mbb.close()                     # the run's ending: waits for the pins going meanwhile
    assert all(not s.pinned for s in fabric.switches.values())
    assert recorded["make_before_break_pins"] == ["spine", "tor1", "tor2"]
    pins = [(m, sw) for m, sw in fabric.calls if m in ("pin_mac", "unpin_mac")]
    # Each path switch: pinned at staging, moved to the destination's side, released.
    assert sorted(pins) == sorted([("pin_mac", sw) for sw in ("tor1", "spine", "tor2")] * 2
                                  + [("unpin_mac", sw) for sw in ("tor1", "spine", "tor2")])
    for switch, port in (("tor2", "h-host3"), ("spine", "t-tor2"), ("tor1", "t-spine")):
        fabric.learn(switch, mac, port)
    assert {n: s.moves for n, s in fabric.switches.items()} == {"tor1": 0, "spine": 0,
                                                                  "tor2": 0}


def test_a_window_that_ends_without_arrival_releases_its_pins_where_the_guest_runs(
        topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    mbb, fabric, _, _ = window(topology)
    mbb.prepare()
    moved: list[tuple[str, str]] = []
    real = fabric.pin_mac

    def record(switch: str, port: str, vlan: int, mac: str) -> bool:
        moved.append((switch, port))
        return real(switch, port, vlan, mac)
    monkeypatch.setattr(fabric, "pin_mac", record)
    assert mbb.close() == []                    # a rollback: never towards the destination
    assert moved == [] and mbb.pins_held == 3
    assert all(not s.pinned for s in fabric.switches.values())
    assert mbb.close(arrived=True) == [] and mbb.pins_held == 0     # idempotent


def test_an_arrival_moves_the_pins_to_the_destination_before_they_go(
        topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    mbb, fabric, _, _ = window(topology)
    mbb.prepare()
    order: list[tuple[str, str, str]] = []
    real_pin, real_unpin = fabric.pin_mac, fabric.unpin_mac

    def pin(switch: str, port: str, vlan: int, mac: str) -> bool:
        order.append(("pin", switch, port))
        return real_pin(switch, port, vlan, mac)

    def unpin(switch: str, vlan: int, mac: str, drain: bool = False) -> None:
        order.append(("unpin-drained" if drain else "unpin", switch,
                      "rules gone" if not fabric.switches[switch].rules else "rules in"))
        real_unpin(switch, vlan, mac, drain)
    monkeypatch.setattr(fabric, "pin_mac", pin)
    monkeypatch.setattr(fabric, "unpin_mac", unpin)
    mbb.close(arrived=True)
    mbb.close()
    for switch, port in (("tor1", "t-spine"), ("spine", "t-tor2"), ("tor2", "h-host3")):
        mine = [o for o in order if o[1] == switch]
        assert mine == [("pin", switch, port), ("unpin-drained", switch, "rules gone")]


def test_a_pin_refused_fails_the_staging_and_close_removes_the_rest(
        topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    mbb, fabric, calls, _ = window(topology)
    real = fabric.pin_mac

    def spine_refuses(switch: str, port: str, vlan: int, mac: str) -> bool:
        if switch == "spine":
            raise FabricError("spine refused the static entry", switch=switch)
        return real(switch, port, vlan, mac)
    monkeypatch.setattr(fabric, "pin_mac", spine_refuses)
    with pytest.raises(SwitchoverError, match="spine"):
        mbb.prepare()
    mbb.open()
    assert [c for c in calls if c[0] == "open"] == []
    assert mbb.close() == []
    assert all(not s.pinned and not s.rules for s in fabric.switches.values())


def test_a_guest_with_a_profile_has_its_gate_removed_not_replaced(topology: Topology) -> None:
    mbb, fabric, calls, _ = window(topology, profile=True)
    cookie = mbb_cookie(5)
    mbb.prepare()
    mbb.open()
    assert calls == [("arm", "host3", gate_cookie(cookie)),
                     ("close", "host3", gate_cookie(cookie))]
    assert fabric.switches["tor2"].rules


def test_no_fabric_rule_without_the_gate(topology: Topology) -> None:
    mbb, fabric, calls, recorded = window(topology, failing={"host3"})
    with pytest.raises(SwitchoverError, match="host3"):
        mbb.prepare()
    assert all(not s.rules for s in fabric.switches.values())
    assert recorded["make_before_break_problems"]
    mbb.open()                                  # a failed staging never opens
    assert calls == []
    assert mbb.close() == []


def test_a_partial_staging_never_opens_and_close_still_removes_everything(
        topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    mbb, fabric, calls, recorded = window(topology)
    real = fabric.replace_rules

    def spine_refuses(switch: str, cookie: int, rules: list[Rule],
                      known_empty: bool = False) -> None:
        if switch == "spine":
            raise FabricError("spine refused the rules", switch=switch)
        real(switch, cookie, rules, known_empty)
    monkeypatch.setattr(fabric, "replace_rules", spine_refuses)
    with pytest.raises(SwitchoverError, match="spine"):
        mbb.prepare()
    assert fabric.switches["tor1"].rules
    mbb.open()
    assert [c for c in calls if c[0] == "open"] == []
    monkeypatch.setattr(fabric, "replace_rules", real)
    assert mbb.close() == []
    assert all(not s.rules for s in fabric.switches.values())
    assert recorded["make_before_break"] == "removed"


def test_close_reports_an_unreachable_switch_without_raising(topology: Topology) -> None:
    mbb, fabric, _, recorded = window(topology)
    mbb.prepare()
    mbb.open()
    fabric.fail = {"tor2"}
    problems = mbb.close()
    assert problems and "tor2" in problems[0]
    assert recorded["make_before_break"] == "removal-failed"


def test_leftovers_skip_live_migrations_and_foreign_cookies() -> None:
    fabric = FakeFabric({"tor1": FakeSwitch(rules={5: [], mbb_cookie(3): [], mbb_cookie(4): []}),
                         "spine": FakeSwitch()})
    assert leftovers(fabric, ["tor1", "spine"], live={4}) == [("tor1", mbb_cookie(3))]


def test_a_fake_fabric_of_the_default_topology_opens_a_window(topology: Topology) -> None:
    fabric = FakeFabric.of(topology)
    for switch, port in (("tor1", "h-host1"), ("tor1", "t-spine"), ("spine", "t-tor1"),
                         ("spine", "t-tor2"), ("tor2", "t-spine"), ("tor2", "h-host3")):
        fabric.set_trunk_vlans(switch, port, frozenset({100}))
    calls: list[tuple[str, str, int]] = []
    mbb = MakeBeforeBreak(SwitchoverContext(
        migration_id=9, vm="vm1", mac=MAC, vlan=100, source="host1", destination="host3",
        has_profile=False, topology=topology, fabric=fabric,
        agent=lambda host: FakeAgent(host, calls)))
    mbb.prepare()
    assert {n for n, s in fabric.switches.items() if s.rules} == {"tor1", "spine", "tor2"}
    assert leftovers(fabric, list(fabric.switches), live=set()) == [
        (n, mbb_cookie(9)) for n in sorted(fabric.switches)]
    mbb.close()
    assert leftovers(fabric, list(fabric.switches), live=set()) == []


def test_the_host_gate_is_armed_opened_in_one_bundle_and_removed_by_cookie() -> None:
    from vmferry.agent.switchover import (
        PROFILE_KEY,
        host_rule_cookies,
        install_host_rules,
        remove_host_rules,
    )
    from vmferry.drivers.softswitch.base import PortSpec
    from vmferry.drivers.softswitch.fake import FakeSoftswitch
    switch = FakeSoftswitch()
    switch.ensure_bridge("br-vm")
    switch.ensure_ports("br-vm", [PortSpec("uplink", trunks=frozenset({100})),
                                  PortSpec("tap1", tag=100)])
    uplink, tap = (switch.ports("br-vm")[p].ofport for p in ("uplink", "tap1"))
    cookie = mbb_cookie(7)

    def rules() -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for stats in switch.flow_stats("br-vm"):
            found.setdefault(stats.cookie, []).append(stats.flow.actions)
        return found

    # Armed: the closed gate on the uplink, and the guest's own frames from the tap open it.
    assert install_host_rules(switch, "br-vm", "uplink", "tap1", gate_cookie(cookie), 100,
                              MAC) == 2
    armed = {s.flow.match: s.flow.actions for s in switch.flow_stats("br-vm")}
    assert armed[f"in_port={uplink},dl_vlan=100,dl_dst={MAC.lower()}"] == "drop"
    trigger = armed[f"in_port={tap},vlan_tci=0,dl_src={MAC.lower()}"]
    assert trigger.endswith(",NORMAL") and trigger.startswith("learn(")
    assert (f"cookie={gate_cookie(cookie):#x},in_port={uplink},nxm_of_vlan_tci[0..12]=0x1064,"
            in trigger.lower() and f"priority={PRIORITY + 1}," in trigger)
    bundles = switch.calls["bundles"]
    install_host_rules(switch, "br-vm", "uplink", "tap1", cookie, 100, MAC)
    assert rules() == {cookie: [f"pop_vlan,output:{tap}"]}      # the trigger went too
    assert switch.calls["bundles"] == bundles + 1       # the gate out, delivery in: one step
    assert host_rule_cookies(switch, "br-vm") == [cookie]
    remove_host_rules(switch, "br-vm", cookie)
    assert rules() == {}
    # Removing a migration's cookie takes its closed gate too; a gate cookie only the gate.
    install_host_rules(switch, "br-vm", "uplink", "tap1", gate_cookie(cookie), 100, MAC)
    remove_host_rules(switch, "br-vm", cookie)
    assert rules() == {}
    with pytest.raises(InputError, match="cookie"):
        install_host_rules(switch, "br-vm", "uplink", "tap1", 5, 100, MAC)
    # A port with a profile: a rule on its frames would bypass the profile's own flows.
    switch.ensure_ports("br-vm", [PortSpec("tap2", tag=100,
                                           external_ids={PROFILE_KEY: "web"})])
    assert install_host_rules(switch, "br-vm", "uplink", "tap2", gate_cookie(cookie), 100,
                              MAC) == 1
    assert rules() == {gate_cookie(cookie): ["drop"]}
    with pytest.raises(NotFoundError, match="tap"):
        install_host_rules(switch, "br-vm", "uplink", "tap9", cookie, 100, MAC)

