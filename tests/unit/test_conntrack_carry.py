"""Connection-tracking state that follows a VM: reading the tracker, the carry flows, the
sweep, the agent's routes (on the in-memory switch)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmferry.drivers.softswitch.base import ConnEntry, Flow, PortSpec, Tuple5
from vmferry.drivers.softswitch.fake import FakeSoftswitch
from vmferry.drivers.softswitch.ovs import conntrack as carry
from vmferry.drivers.softswitch.ovs import profile as port_profile
from vmferry.drivers.softswitch.ovs.flowtext import flow_add_text
from vmferry.drivers.softswitch.ovs.profile_flows import TABLE_FROM_VM, TABLE_TO_VM
from vmferry.errors import InputError, SoftswitchError
from vmferry.model.profile import PortProfile

BRIDGE = "br-vm"
PORT = "vf-web1"
MAC = "52:54:00:00:00:10"
VM = "192.0.2.10"
CLIENT = "192.0.2.250"

DUMP = """\
tcp,orig=(src=192.0.2.10,dst=192.0.2.250,sport=40000,dport=5000),reply=(src=192.0.2.250,dst=192.0.2.10,sport=5000,dport=40000),zone=4106,protoinfo=(state=ESTABLISHED)
tcp,orig=(src=192.0.2.250,dst=192.0.2.10,sport=33000,dport=80),reply=(src=192.0.2.10,dst=192.0.2.250,sport=80,dport=33000),zone=4106,protoinfo=(state_orig=TIME_WAIT,state_reply=TIME_WAIT)
udp,orig=(src=192.0.2.10,dst=192.0.2.250,sport=41000,dport=6969),reply=(src=192.0.2.250,dst=192.0.2.10,sport=6969,dport=41000),zone=4106
icmp,orig=(src=192.0.2.250,dst=192.0.2.10,id=7,type=8,code=0),reply=(src=192.0.2.10,dst=192.0.2.250,id=7,type=0,code=0),zone=4106
tcp,orig=(src=2001:db8::1,dst=2001:db8::2,sport=1,dport=2),reply=(src=2001:db8::2,dst=2001:db8::1,sport=2,dport=1),zone=4106,protoinfo=(state=ESTABLISHED)
sctp,orig=(src=192.0.2.1,dst=192.0.2.2,sport=1,dport=2),reply=(src=192.0.2.2,dst=192.0.2.1,sport=2,dport=1),zone=4106
"""


def test_dump_is_parsed_ipv4_tcp_udp_icmp_only() -> None:
    entries = carry.parse_dump_conntrack(DUMP)
    assert [e.protocol for e in entries] == ["tcp", "tcp", "udp", "icmp"]
    tcp = entries[0]
    assert tcp.orig == Tuple5(VM, CLIENT, 40000, 5000)
    assert tcp.reply == Tuple5(CLIENT, VM, 5000, 40000)
    assert (tcp.zone, tcp.state) == (4106, "ESTABLISHED")
    assert entries[1].state == "TIME_WAIT"
    assert entries[3].orig == Tuple5(CLIENT, VM, 7, 8 << 8)


def test_unreadable_entry_is_an_error_naming_it() -> None:
    with pytest.raises(SoftswitchError) as caught:
        carry.parse_dump_conntrack("tcp,orig=(src=192.0.2.1,dst=192.0.2.2),reply=(src=x),zone=1")
    assert "192.0.2.1" in str(caught.value.fields.get("cause"))


@pytest.fixture
def switch() -> FakeSoftswitch:
    sw = FakeSoftswitch()
    sw.ensure_bridge(BRIDGE)
    sw.ensure_port(BRIDGE, PortSpec(name=PORT, tag=100))
    return sw


def stateful(to_vm: str = "deny", from_vm: str = "allow") -> PortProfile:
    return PortProfile.model_validate({"name": "p", "vlan": 100, "acl": {
        "stateful": True, "to_vm": {"default": to_vm}, "from_vm": {"default": from_vm}}})


def metered() -> PortProfile:
    """The demo's kind of profile (examples/profiles.yaml "web"): stateful, to-VM default deny,
    rate limits both ways (meters), and DSCP marking."""
    return PortProfile.model_validate({"name": "web", "vlan": 100, "acl": {
        "stateful": True, "to_vm": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "icmp"}]}, "from_vm": {"default": "allow"}},
        "qos": {"to_vm": {"rate_kbps": 100000, "burst_kb": 10000},
                "from_vm": {"rate_kbps": 100000, "burst_kb": 10000}, "dscp": 10}})


def test_carry_flows_commit_both_directions_in_the_port_zone(switch: FakeSoftswitch) -> None:
    report = port_profile.realize(switch, BRIDGE, PORT, MAC, [f"{VM}/24"], stateful())
    zone = 0x1000 + report.meter_block
    entries = carry.parse_dump_conntrack(DUMP)
    flows = carry.install(switch, BRIDGE, PORT, MAC, [f"{VM}/24"], entries)
    installed = switch.dump_flows(BRIDGE, carry.carry_cookie(PORT))
    # tcp established: 2 directions, TIME_WAIT: none, udp: 2, icmp: the echo request only.
    assert flows == len(installed) == 5
    for flow in installed:
        assert f"ct_state=+new+trk,ct_zone={zone}" in flow.match
        assert flow.actions.startswith(f"ct(commit,zone={zone}),")
    to_vm = [f for f in installed if f.table == TABLE_TO_VM]
    from_vm = [f for f in installed if f.table == TABLE_FROM_VM]
    assert {f"nw_src={CLIENT}" in f.match for f in to_vm} == {True}
    assert {f"nw_src={VM}" in f.match for f in from_vm} == {True}
    assert any("icmp_type=8" in f.match for f in to_vm)
    assert not any("icmp_type=0" in f.match for f in installed)
    # The profile's own flows are untouched.
    assert carry.port_zone(switch, BRIDGE, PORT) == zone


def test_carry_needs_a_stateful_profile(switch: FakeSoftswitch) -> None:
    profile = PortProfile.model_validate({"name": "p", "vlan": 100,
                                          "acl": {"stateful": False}})
    port_profile.realize(switch, BRIDGE, PORT, MAC, [f"{VM}/24"], profile)
    assert carry.read(switch, BRIDGE, PORT) == []
    with pytest.raises(SoftswitchError):
        carry.install(switch, BRIDGE, PORT, MAC, [VM], carry.parse_dump_conntrack(DUMP))
    assert carry.install(switch, BRIDGE, PORT, MAC, [VM], []) == 0


def test_other_protocols_are_refused() -> None:
    pipe = carry.PortPipeline(3, MAC, frozenset({VM}), 4106, "goto_table:42", "NORMAL")
    with pytest.raises(InputError):
        carry.carry_flows([ConnEntry("sctp", Tuple5(VM, CLIENT), Tuple5(CLIENT, VM), 1)], pipe)


def test_read_takes_the_port_zone_from_the_tracker(switch: FakeSoftswitch) -> None:
    report = port_profile.realize(switch, BRIDGE, PORT, MAC, [VM], stateful("allow", "deny"))
    zone = 0x1000 + report.meter_block
    for entry in carry.parse_dump_conntrack(DUMP):
        switch.track(ConnEntry(entry.protocol, entry.orig, entry.reply, zone, entry.state))
    switch.track(ConnEntry("udp", Tuple5("192.0.2.1", "192.0.2.2", 1, 2),
                           Tuple5("192.0.2.2", "192.0.2.1", 2, 1), zone + 1))
    assert len(carry.read(switch, BRIDGE, PORT)) == 4


def test_sweep_removes_committed_connections_and_remove_the_rest(
        switch: FakeSoftswitch) -> None:
    port_profile.realize(switch, BRIDGE, PORT, MAC, [VM], stateful())
    carry.install(switch, BRIDGE, PORT, MAC, [VM], carry.parse_dump_conntrack(DUMP))
    cookie = carry.carry_cookie(PORT)
    tcp_in = next(f for f in switch.dump_flows(BRIDGE, cookie)
                  if f.table == TABLE_TO_VM and "tcp" in f.match)
    switch.count(BRIDGE, cookie, tcp_in, packets=1)
    # The TCP connection is committed: both its flows go; udp (2) and icmp (1) stay.
    assert carry.sweep(switch, BRIDGE, PORT) == 3
    assert not any("tcp" in f.match for f in switch.dump_flows(BRIDGE, cookie))
    assert carry.carry_cookies(switch, BRIDGE) == [cookie]
    carry.remove(switch, BRIDGE, PORT)
    assert carry.carry_cookies(switch, BRIDGE) == []


def test_carry_cookie_is_its_own() -> None:
    cookie = carry.carry_cookie(PORT)
    assert carry.is_carry_cookie(cookie)
    assert not carry.is_carry_cookie(port_profile.port_cookie(PORT))


def test_fake_conntrack_zone_is_checked() -> None:
    with pytest.raises(InputError):
        FakeSoftswitch().dump_conntrack(70000)


def test_pipeline_requires_both_tables() -> None:
    with pytest.raises(SoftswitchError):
        carry.pipeline([Flow(TABLE_TO_VM, 3000, "dl_dst=x,ip,ct_state=+est+trk,ct_zone=5",
                             "NORMAL")], 3, MAC, [VM])


def test_commit_goes_after_a_meter_and_before_the_rest() -> None:
    assert carry.commit_then(7, "NORMAL") == "ct(commit,zone=7),NORMAL"
    assert carry.commit_then(7, "meter:3,NORMAL") == "meter:3,ct(commit,zone=7),NORMAL"
    assert (carry.commit_then(7, "meter:2,set_field:10->ip_dscp,goto_table:42")
            == "meter:2,ct(commit,zone=7),set_field:10->ip_dscp,goto_table:42")


def test_carry_flows_of_a_metered_profile_keep_the_meter_first(switch: FakeSoftswitch) -> None:
    """The demo's move: ovs-ofctl refused ``ct(commit,...),meter:N,...`` ("invalid instruction
    ordering: meter must appear before apply_actions")."""
    report = port_profile.realize(switch, BRIDGE, PORT, MAC, [VM], metered())
    zone, block = 0x1000 + report.meter_block, report.meter_block
    to_meter, from_meter = block * 8 + 1, block * 8 + 2
    carry.install(switch, BRIDGE, PORT, MAC, [VM], carry.parse_dump_conntrack(DUMP))
    actions = {(f.table, f.match.split(",")[0]): f.actions
               for f in switch.dump_flows(BRIDGE, carry.carry_cookie(PORT))}
    assert actions[(TABLE_TO_VM, "tcp")] == f"meter:{to_meter},ct(commit,zone={zone}),NORMAL"
    assert actions[(TABLE_FROM_VM, "udp")] == (
        f"meter:{from_meter},ct(commit,zone={zone}),set_field:10->ip_dscp,goto_table:42")


@pytest.mark.skipif(shutil.which("ovs-ofctl") is None, reason="needs ovs-ofctl (its parser)")
@pytest.mark.parametrize("profile", [metered(), stateful()], ids=["metered", "plain"])
def test_ovs_ofctl_accepts_every_carry_flow(switch: FakeSoftswitch,
                                            profile: PortProfile) -> None:
    """OVS's own parser (no switch needed) takes each carry flow as written."""
    port_profile.realize(switch, BRIDGE, PORT, MAC, [VM], profile)
    carry.install(switch, BRIDGE, PORT, MAC, [VM], carry.parse_dump_conntrack(DUMP))
    cookie = carry.carry_cookie(PORT)
    for flow in switch.dump_flows(BRIDGE, cookie):
        text = flow_add_text(cookie, flow).removeprefix("add ")
        parsed = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "parse-flow", text],
                                capture_output=True, text=True, timeout=10)
        assert parsed.returncode == 0, parsed.stderr
