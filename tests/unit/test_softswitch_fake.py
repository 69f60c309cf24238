"""The in-memory ``FakeSoftswitch`` keeps the real switch's contract where callers see it."""

from __future__ import annotations

import threading

import pytest

from vmferry.drivers.softswitch.base import FdbEntry, Flow, Meter, PortSpec, Softswitch
from vmferry.drivers.softswitch.fake import FakeSoftswitch
from vmferry.errors import ConflictError, InputError, SoftswitchError, WaitTimeout

BR = "br0"


@pytest.fixture
def switch() -> FakeSoftswitch:
    fake = FakeSoftswitch(unnumbered={"late"})
    fake.ensure_bridge(BR)
    fake.calls.clear()
    return fake


def test_it_is_a_complete_softswitch() -> None:
    assert isinstance(FakeSoftswitch(), Softswitch)
    assert not getattr(FakeSoftswitch, "__abstractmethods__", set())


def test_ports_are_written_only_when_they_differ(switch: FakeSoftswitch) -> None:
    ports = [PortSpec("p1", tag=10), PortSpec("p2", trunks=frozenset({20, 30}))]
    switch.ensure_ports(BR, ports)
    assert switch.calls["transactions"] == 1
    switch.ensure_ports(BR, ports)
    assert switch.calls["transactions"] == 1, "nothing differs: no transaction"
    switch.ensure_port(BR, PortSpec("p1", tag=11))
    assert switch.calls["transactions"] == 2
    states = switch.ports(BR)
    assert states["p1"].tag == 11 and states["p1"].ofport == 1
    assert states["p2"].trunks == frozenset({20, 30}) and states["p2"].ofport == 2
    assert list(switch.ports(BR, ["p2"])) == ["p2"]


def test_bad_ports_change_nothing(switch: FakeSoftswitch) -> None:
    switch.ensure_bridge("br1")
    switch.ensure_port("br1", PortSpec("elsewhere"))
    with pytest.raises(ConflictError):
        switch.ensure_ports(BR, [PortSpec("p1"), PortSpec("elsewhere")])
    with pytest.raises(InputError, match=r"port\.vlan"):
        switch.ensure_ports(BR, [PortSpec("p1"), PortSpec("p2", tag=5000)])
    with pytest.raises(InputError, match="named twice"):
        switch.ensure_ports(BR, [PortSpec("p1"), PortSpec("p1")])
    assert switch.ports(BR) == {}
    with pytest.raises(SoftswitchError, match="does not exist"):
        switch.ensure_port("nobridge", PortSpec("p1"))


def test_set_trunks_and_delete(switch: FakeSoftswitch) -> None:
    switch.ensure_port(BR, PortSpec("up", trunks=frozenset({1})))
    switch.set_trunks(BR, "up", frozenset({1, 2}))
    assert switch.ports(BR)["up"].trunks == frozenset({1, 2})
    with pytest.raises(SoftswitchError, match="not on bridge"):
        switch.set_trunks(BR, "nope", frozenset({1}))
    switch.delete_port(BR, "up")
    switch.delete_port(BR, "up")
    assert switch.ports(BR) == {}


def test_wait_for_port_wakes_on_numbering_and_times_out(switch: FakeSoftswitch) -> None:
    switch.ensure_port(BR, PortSpec("late"))
    assert switch.ports(BR)["late"].ofport is None
    with pytest.raises(WaitTimeout):
        switch.wait_for_port(BR, "late", timeout=0.01)
    numbering = threading.Thread(target=switch.number_port, args=(BR, "late", 7))
    numbering.start()
    assert switch.wait_for_port(BR, "late", timeout=10) == 7
    numbering.join()
    switch.number_port(BR, "late", -1)
    with pytest.raises(SoftswitchError, match="cannot use"):
        switch.wait_for_port(BR, "late")


def test_flows_round_trip_normalized_and_bundle_only_on_change(switch: FakeSoftswitch) -> None:
    flows = [Flow(0, 100, "eth_type=0x0800,ip_src=10.0.0.1", "output:LOCAL"),
             Flow(0, 90, "in_port=1", "")]
    switch.replace_flows(BR, 5, flows)
    assert switch.dump_flows(BR, 5) == [Flow(0, 100, "ip,nw_src=10.0.0.1", "LOCAL"),
                                        Flow(0, 90, "in_port=1", "drop")]
    switch.replace_flows(BR, 5, flows)
    assert switch.calls["bundles"] == 1
    switch.count(BR, 5, flows[0], packets=3)
    switch.replace_flows_many(BR, {5: flows, 6: [Flow(1, 1, "", "NORMAL")]})
    assert switch.calls["bundles"] == 2
    kept = {s.flow.priority: s.packets for s in switch.flow_stats(BR, 5)}
    assert kept == {100: 3, 90: 0}, "an unchanged flow keeps its counters"
    assert switch.flow_cookies(BR) == {5, 6}
    switch.replace_flows(BR, 5, [])
    assert switch.flow_cookies(BR) == {6}


def test_refused_flows_change_no_cookie(switch: FakeSoftswitch) -> None:
    switch.replace_flows(BR, 1, [Flow(0, 1, "in_port=1", "NORMAL")])
    before = switch.dump_flows(BR)
    with pytest.raises(SoftswitchError, match="meter 9"):
        switch.replace_flows_many(BR, {1: [], 2: [Flow(0, 2, "in_port=2", "meter:9,NORMAL")]})
    with pytest.raises(InputError, match="different actions"):
        switch.replace_flows(BR, 3, [Flow(0, 1, "ip", "drop"), Flow(0, 1, "ip", "NORMAL")])
    with pytest.raises(InputError, match="cookie"):
        switch.replace_flows(BR, 0, [])
    switch.refuse_cookies.add(4)
    with pytest.raises(SoftswitchError, match="refused"):
        switch.replace_flows_many(BR, {1: [], 4: [Flow(0, 1, "in_port=4", "NORMAL")]})
    assert switch.dump_flows(BR) == before


def test_meters_and_their_flows(switch: FakeSoftswitch) -> None:
    after = switch.replace_meters(BR, [Meter(1, kbps=100), Meter(2, pktps=5)], {1, 2})
    assert after == switch.dump_meters(BR) == [Meter(1, kbps=100), Meter(2, pktps=5)]
    switch.replace_flows(BR, 7, [Flow(0, 1, "in_port=1", "meter:1,NORMAL"),
                                 Flow(0, 2, "in_port=2", "NORMAL")])
    assert switch.meter_stats(BR)[1].flows == 1
    with pytest.raises(InputError):
        switch.replace_meters(BR, [Meter(3, kbps=1)], {1})
    switch.replace_meters(BR, [], {1}, actual=after)
    assert switch.dump_meters(BR) == [Meter(2, pktps=5)]
    assert switch.dump_flows(BR, 7) == [Flow(0, 2, "in_port=2", "NORMAL")], \
        "deleting a meter deletes the flows using it"


def test_fdb_learn_and_flush(switch: FakeSoftswitch) -> None:
    switch.learn(BR, "1", 10, "52:54:00:00:00:0A")
    switch.learn(BR, "2", 10, "52:54:00:00:00:0b")
    switch.learn(BR, "3", 10, "52:54:00:00:00:0a")     # moved
    assert sorted(switch.fdb(BR)) == [FdbEntry("2", 10, "52:54:00:00:00:0b"),
                                      FdbEntry("3", 10, "52:54:00:00:00:0a")]
    with pytest.raises(InputError, match="mac"):
        switch.flush_fdb(BR, "nonsense")
    switch.flush_fdb(BR, "52:54:00:00:00:0B")
    assert [e.mac for e in switch.fdb(BR)] == ["52:54:00:00:00:0a"]
    switch.flush_fdb(BR)
    assert switch.fdb(BR) == []


def test_bridges_and_close() -> None:
    with FakeSoftswitch() as fake:
        fake.ensure_bridge("b2")
        fake.ensure_bridge("b1", fail_mode="secure")
        with pytest.raises(InputError, match="fail_mode"):
            fake.ensure_bridge("b3", fail_mode="open")
        assert fake.bridges() == ["b1", "b2"]
        fake.delete_bridge("b2")
        fake.delete_bridge("b2")
        assert fake.bridges() == ["b1"]
    with pytest.raises(SoftswitchError, match="closed"):
        fake.ports("b1")
