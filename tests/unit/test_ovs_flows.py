"""Flow and meter text of the OVS driver: normalization, parsing, diffs. No switch needed.

The expected forms are what ovs-ofctl 3.1 printed back (``--no-stats --no-names``) for each
input, recorded from a real switch.
"""

from __future__ import annotations

import pytest

from vmferry.drivers.softswitch.base import Flow, Meter
from vmferry.drivers.softswitch.ovs import (
    FlowStats,
    MeterStats,
    flow_add_text,
    flow_delete_text,
    meter_text,
    meters_after,
    normalize_actions,
    normalize_flow,
    normalize_match,
    parse_dump_flows,
    parse_dump_meters,
    parse_fdb_show,
    parse_flow_line,
    parse_meter_stats,
    plan_flow_changes,
    plan_meter_changes,
)
from vmferry.errors import InputError

# (match as written, actions as written, line ovs-ofctl dumped after installing it)
RECORDED = [
    ("dl_type=0x0806", "normal", "cookie=0x99, priority=100,arp actions=NORMAL"),
    ("dl_type=0x800,nw_proto=6,tp_dst=22", "drop",
     "cookie=0x99, priority=101,tcp,tp_dst=22 actions=drop"),
    ("ip,nw_proto=17", "output:1", "cookie=0x99, priority=102,udp actions=output:1"),
    ("dl_type=0x86dd", "push_vlan:0x8100,set_field:4196->vlan_vid,NORMAL",
     "cookie=0x99, priority=103,ipv6 actions=push_vlan:0x8100,set_field:4196->vlan_vid,NORMAL"),
    ("ip,nw_src=192.0.2.0/255.255.255.0", "resubmit(,1)",
     "cookie=0x99, priority=104,ip,nw_src=192.0.2.0/24 actions=resubmit(,1)"),
    ("dl_src=52:54:00:AA:BB:CC,dl_vlan=100", "",
     "cookie=0x99, priority=105,dl_vlan=100,dl_src=52:54:00:aa:bb:cc actions=drop"),
    ("in_port=1,dl_dst=01:00:00:00:00:00/01:00:00:00:00:00", "meter:3,output:LOCAL",
     ("cookie=0x99, priority=106,in_port=1,dl_dst=01:00:00:00:00:00/01:00:00:00:00:00 "
     "actions=meter:3,LOCAL")),
    ("ipv6,nw_proto=58", "drop", "cookie=0x99, priority=107,icmp6 actions=drop"),
    ("icmp,icmp_type=8", "drop", "cookie=0x99, priority=108,icmp,icmp_type=8 actions=drop"),
    ("ip,nw_proto=47", "drop", "cookie=0x99, priority=109,ip,nw_proto=47 actions=drop"),
    ("udp,udp_dst=0x35", "drop", "cookie=0x99, priority=111,udp,tp_dst=53 actions=drop"),
    ("tcp,tp_dst=0x1000/0xf000", "drop",
     "cookie=0x99, priority=112,tcp,tp_dst=0x1000/0xf000 actions=drop"),
    ("icmp6,icmp_type=135,nd_target=2001:DB8::1", "drop",
     "cookie=0x99, priority=113,icmp6,icmp_type=135,nd_target=2001:db8::1 actions=drop"),
    ("icmp6,icmpv6_type=135", "drop", "cookie=0x99, priority=101,icmp6,icmp_type=135 actions=drop"),
    ("ipv6,ipv6_src=2001:db8:0:0::/64", "drop",
     "cookie=0x99, priority=114,ipv6,ipv6_src=2001:db8::/64 actions=drop"),
    ("arp,nw_src=192.0.2.7,nw_proto=1", "drop",
     "cookie=0x99, priority=115,arp,arp_spa=192.0.2.7,arp_op=1 actions=drop"),
    ("arp,arp_sha=52:54:00:00:00:0A", "drop",
     "cookie=0x99, priority=116,arp,arp_sha=52:54:00:00:00:0a actions=drop"),
    ("ip,nw_dst=192.0.2.9/32", "controller",
     "cookie=0x99, priority=117,ip,nw_dst=192.0.2.9 actions=CONTROLLER:65535"),
    ("ct_state=+trk+est,ip", "drop", "cookie=0x99, priority=118,ct_state=+est+trk,ip actions=drop"),
    ("dl_dst=ff:ff:ff:ff:ff:ff", "flood",
     "cookie=0x99, priority=119,dl_dst=ff:ff:ff:ff:ff:ff actions=FLOOD"),
    ("in_port=LOCAL,ip", "in_port", "cookie=0x99, priority=120,ip,in_port=LOCAL actions=IN_PORT"),
    ("dl_type=0x88cc", "drop", "cookie=0x99, priority=121,dl_type=0x88cc actions=drop"),
    ("ip,nw_tos=0x10", "drop", "cookie=0x99, priority=122,ip,nw_tos=16 actions=drop"),
    ("tcp,tcp_flags=+syn-ack", "drop",
     "cookie=0x99, priority=123,tcp,tcp_flags=+syn-ack actions=drop"),
    ("metadata=0x5", "drop", "cookie=0x99, priority=124,metadata=0x5 actions=drop"),
    ("dl_vlan=0x64", "pop_vlan,NORMAL",
     "cookie=0x99, priority=126,dl_vlan=100 actions=pop_vlan,NORMAL"),
    ("ip,nw_src=192.0.2.5/24", "drop", ("cookie=0x99, priority=128,ip,nw_src=192.0.2.0/24 "
     "actions=drop")),
    ("dl_dst=01:00:5E:00:00:00/FF:FF:FF:80:00:00", "drop",
     "cookie=0x99, priority=133,dl_dst=01:00:5e:00:00:00/ff:ff:ff:80:00:00 actions=drop"),
    ("icmp,tp_src=3,tp_dst=1", "drop",
     "cookie=0x99, priority=135,icmp,icmp_type=3,icmp_code=1 actions=drop"),
    ("ip", "set_field:52:54:00:AB:CD:EF->eth_dst,output:2",
     "cookie=0x99, priority=136,ip actions=set_field:52:54:00:ab:cd:ef->eth_dst,output:2"),
    ("arp,arp_op=2", "mod_dl_src:52:54:00:AA:AA:AA,NORMAL",
     "cookie=0x99, priority=138,arp,arp_op=2 actions=set_field:52:54:00:aa:aa:aa->eth_src,NORMAL"),
    ("eth_src=52:54:00:00:00:01,eth_type=0x0800,ip_proto=1", "drop",
     "cookie=0x99, priority=100,icmp,dl_src=52:54:00:00:00:01 actions=drop"),
    ("ip", "ct(commit,zone=5),NORMAL",
     "cookie=0x99, priority=140,ip actions=ct(commit,zone=5),NORMAL"),
    ("ip", "2,3", "cookie=0x99, priority=145,ip actions=output:2,output:3"),
    ("ip", "mod_nw_dst:192.0.2.4,NORMAL",
     "cookie=0x99, priority=146,ip actions=set_field:192.0.2.4->ip_dst,NORMAL"),
]


@pytest.mark.parametrize(("match", "actions", "dumped"), RECORDED)
def test_written_and_dumped_flows_normalize_equal(match: str, actions: str, dumped: str) -> None:
    parsed = parse_flow_line(dumped)
    assert parsed is not None
    assert parsed.cookie == 0x99
    assert parsed.flow.match == normalize_match(match)
    assert parsed.flow.actions == normalize_actions(actions)


def test_normalization_is_idempotent() -> None:
    for match, actions, _ in RECORDED:
        once = normalize_flow(Flow(0, 1, match, actions))
        assert normalize_flow(once) == once


def test_protocol_goes_first_then_ovs_field_order() -> None:
    assert normalize_match("tp_dst=80,nw_src=192.0.2.1,dl_type=0x0800,nw_proto=6,in_port=3") == \
        "tcp,in_port=3,nw_src=192.0.2.1,tp_dst=80"


def test_empty_match_and_actions() -> None:
    assert normalize_match("") == ""
    assert normalize_actions("") == "drop"
    assert normalize_actions(" ") == "drop"


def test_match_rejects_flow_attributes_and_missing_prerequisites() -> None:
    with pytest.raises(InputError):
        normalize_match("priority=5,ip")
    with pytest.raises(InputError):
        normalize_match("ip,tp_dst=80")            # OVS would silently drop tp_dst
    with pytest.raises(InputError):
        normalize_match("nw_src=192.0.2.1")
    with pytest.raises(InputError):
        normalize_match("ip,icmp_type=8")


def test_parse_dump_with_stats_and_defaults() -> None:
    text = (
        "OFPST_FLOW reply (OF1.3) (xid=0x2):\n"
        " cookie=0x5, duration=0.035s, table=0, n_packets=7, n_bytes=686, "
        "priority=100,ip,nw_src=192.0.2.1 actions=meter:1,NORMAL\n"
        " cookie=0x5, duration=0.1s, table=1, n_packets=0, n_bytes=0, idle_age=3, "
        "priority=90,arp actions=drop\n"
        " cookie=0x0, duration=6.173s, table=0, n_packets=2, n_bytes=180, "
        "priority=0 actions=NORMAL\n"
        " cookie=0x6, arp actions=NORMAL\n"
    )
    assert parse_dump_flows(text) == [
        FlowStats(5, Flow(0, 100, "ip,nw_src=192.0.2.1", "meter:1,NORMAL"), 7, 686),
        FlowStats(5, Flow(1, 90, "arp", "drop"), 0, 0),
        FlowStats(0, Flow(0, 0, "", "NORMAL"), 2, 180),
        FlowStats(6, Flow(0, 32768, "arp", "NORMAL"), 0, 0),     # default priority omitted
    ]


def test_parse_no_stats_default_flow() -> None:
    assert parse_dump_flows(" priority=0 actions=NORMAL\n") == [
        FlowStats(0, Flow(0, 0, "", "NORMAL"))]


def test_add_and_delete_lines() -> None:
    flow = Flow(2, 10, "tcp,tp_dst=22", "drop")
    assert flow_add_text(0x5, flow) == \
        "add cookie=0x5,table=2,priority=10,tcp,tp_dst=22,actions=drop"
    assert flow_delete_text(0x5, flow) == \
        "delete_strict cookie=0x5/-1,table=2,priority=10,tcp,tp_dst=22"
    assert flow_add_text(1, Flow(0, 1, "", "")) == "add cookie=0x1,table=0,priority=1,actions=drop"


def test_plan_unchanged_flows_is_empty() -> None:
    desired = [Flow(0, 100, "dl_type=0x0800,nw_src=192.0.2.1", "meter:1,normal")]
    actual = [Flow(0, 100, "ip,nw_src=192.0.2.1", "meter:1,NORMAL")]
    assert plan_flow_changes(7, actual, desired) == []


def test_plan_deletes_stale_adds_new_and_changed() -> None:
    actual = [Flow(0, 100, "ip", "NORMAL"), Flow(0, 90, "arp", "NORMAL"),
              Flow(0, 80, "ipv6", "drop")]
    desired = [Flow(0, 100, "ip", "NORMAL"), Flow(0, 90, "arp", "drop"),
               Flow(1, 10, "", "NORMAL")]
    assert plan_flow_changes(7, actual, desired) == [
        "delete_strict cookie=0x7/-1,table=0,priority=80,ipv6",
        "add cookie=0x7,table=0,priority=90,arp,actions=drop",
        "add cookie=0x7,table=1,priority=10,actions=NORMAL",
    ]


def test_plan_everything_away() -> None:
    actual = [Flow(0, 100, "ip", "NORMAL")]
    assert plan_flow_changes(7, actual, []) == [
        "delete_strict cookie=0x7/-1,table=0,priority=100,ip"]


def test_plan_rejects_conflicting_flows_and_dedups_equal_ones() -> None:
    same = [Flow(0, 1, "ip", "drop"), Flow(0, 1, "dl_type=0x0800", "drop")]
    assert plan_flow_changes(1, [], same) == [("add cookie=0x1,table=0,priority=1,dl_type=0x0800,"
                                              "actions=drop")]
    with pytest.raises(InputError):
        plan_flow_changes(1, [], [Flow(0, 1, "ip", "drop"), Flow(0, 1, "ip", "NORMAL")])


# ---- meters ------------------------------------------------------------------------------------

DUMP_METERS = """OFPST_METER_CONFIG reply (OF1.3) (xid=0x2):
meter=1 pktps burst stats bands=
type=drop rate=10 burst_size=5

meter=2 kbps stats bands=
type=drop rate=2000

meter=3 kbps burst bands=
type=drop rate=1000 burst_size=200
"""

METER_STATS = """OFPST_METER reply (OF1.3) (xid=0x2):
meter:1 flow_count:1 packet_in_count:300 byte_in_count:29400 duration:4.041s bands:
0: packet_count:250 byte_count:24500

meter:3 flow_count:0 packet_in_count:0 byte_in_count:0 duration:4.034s bands:
0: packet_count:0 byte_count:0
"""


def test_meter_text() -> None:
    assert meter_text(Meter(1, pktps=10, burst=5)) == \
        "meter=1,pktps,burst,stats,bands=type=drop,rate=10,burst_size=5"
    assert meter_text(Meter(2, kbps=2000)) == "meter=2,kbps,stats,bands=type=drop,rate=2000"


def test_parse_dump_meters() -> None:
    assert parse_dump_meters(DUMP_METERS) == [
        Meter(1, pktps=10, burst=5), Meter(2, kbps=2000), Meter(3, kbps=1000, burst=200)]
    assert parse_dump_meters("OFPST_METER_CONFIG reply (OF1.3) (xid=0x2):\n") == []


def test_parse_meter_stats() -> None:
    assert parse_meter_stats(METER_STATS) == {
        1: MeterStats(1, flows=1, packets_in=300, bytes_in=29400, band_packets=250,
                      band_bytes=24500),
        3: MeterStats(3, flows=0, packets_in=0, bytes_in=0, band_packets=0, band_bytes=0),
    }


def test_plan_meters_touches_only_owned_and_different() -> None:
    actual = parse_dump_meters(DUMP_METERS)
    desired = [Meter(1, pktps=10, burst=5), Meter(2, kbps=3000), Meter(4, pktps=100)]
    assert plan_meter_changes(actual, desired, {1, 2, 4, 5}) == [
        ("mod-meter", "meter=2,kbps,stats,bands=type=drop,rate=3000"),
        ("add-meter", "meter=4,pktps,stats,bands=type=drop,rate=100"),
    ]
    # meter 3 is not owned: left alone even though it is not desired
    assert plan_meter_changes(actual, [], {1, 2}) == [
        ("del-meter", "meter=1"), ("del-meter", "meter=2")]


def test_plan_meters_rejects_bad_meters() -> None:
    with pytest.raises(InputError):
        plan_meter_changes([], [Meter(9, kbps=1)], {1})
    with pytest.raises(InputError):
        plan_meter_changes([], [Meter(1, kbps=1, pktps=1)], {1})
    with pytest.raises(InputError):
        plan_meter_changes([], [Meter(1)], {1})
    with pytest.raises(InputError):
        plan_meter_changes([], [Meter(1, kbps=0)], {1})


# ---- fdb ---------------------------------------------------------------------------------------

def test_parse_fdb_show() -> None:
    text = (" port  VLAN  MAC                Age\n"
            "    1   100  52:54:00:AA:00:01    3\n"
            "LOCAL     0  a6:71:c4:9e:3b:48    0\n")
    assert parse_fdb_show(text) == [("1", 100, "52:54:00:aa:00:01"),
                                    ("LOCAL", 0, "a6:71:c4:9e:3b:48")]


def test_parse_dump_keeps_only_the_cookies_asked_for() -> None:
    text = (
        " cookie=0x5, priority=100,ip actions=NORMAL\n"
        " cookie=0x6, priority=90,arp actions=drop\n"
        " cookie=7, priority=80,arp actions=drop\n"
        " priority=0 actions=NORMAL\n"
    )
    assert [s.cookie for s in parse_dump_flows(text, {5, 7})] == [5, 7]
    assert [s.cookie for s in parse_dump_flows(text, {0})] == [0]
    assert parse_dump_flows(text, set()) == []


def test_meters_after_a_plan_is_applied() -> None:
    actual = parse_dump_meters(DUMP_METERS)          # meters 1, 2, 3
    desired = [Meter(2, kbps=3000), Meter(4, pktps=100)]
    after = meters_after(actual, desired, {1, 2, 4})
    assert after == [Meter(2, kbps=3000), Meter(3, kbps=1000, burst=200), Meter(4, pktps=100)]
    # Nothing left to do when the result is read back as the actual state.
    assert plan_meter_changes(after, desired, {1, 2, 4}) == []
