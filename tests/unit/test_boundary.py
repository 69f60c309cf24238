"""Which way a move across a boundary takes, and why not the others."""

from __future__ import annotations

import pytest

from vmferry.errors import InputError
from vmferry.model.boundary import CrossingFacts, Way, plan_crossing


def facts(**changes: object) -> CrossingFacts:
    base: dict[str, object] = dict(vm="web1", vlan=100, subnet="192.0.2.0/24",
                                   destination="host5", l2_path=False,
                                   destination_subnet="198.51.100.0/24",
                                   tunnel_endpoints=True, routers=("r1",),
                                   free_destination_address=True, guest_hotplug=True)
    base.update(changes)
    return CrossingFacts(**base)  # type: ignore[arg-type]


def test_no_boundary_when_the_vlan_reaches_the_destination() -> None:
    plan = plan_crossing(facts(l2_path=True))
    assert plan.way is Way.SAME_L2
    assert set(plan.reasons) == {Way.STRETCH, Way.ROUTE, Way.NAT, Way.DUAL}


def test_the_most_transparent_way_that_applies_is_taken() -> None:
    plan = plan_crossing(facts())
    assert plan.way is Way.STRETCH
    assert plan.reasons[Way.ROUTE] == "stretch comes first"
    assert "no fabric path carries VLAN 100" in plan.reasons[Way.SAME_L2]
    plan = plan_crossing(facts(tunnel_endpoints=False))
    assert plan.way is Way.ROUTE
    assert plan.reasons[Way.STRETCH] == "the ToRs cannot terminate a VXLAN tunnel"
    plan = plan_crossing(facts(tunnel_endpoints=False, routers=()))
    assert plan.way is Way.NAT
    assert plan.reasons[Way.ROUTE] == "no router joins the two subnets"


def test_every_reason_is_given_when_no_way_applies() -> None:
    plan = plan_crossing(facts(tunnel_endpoints=False, routers=(),
                               free_destination_address=False))
    assert plan.way is None
    assert plan.reasons[Way.NAT] == "no free address in 198.51.100.0/24"
    assert plan.reasons[Way.DUAL] == "no free address in 198.51.100.0/24"
    assert "no way across" in plan.describe()


def test_policy_refuses_ways_that_may_break_sessions() -> None:
    plan = plan_crossing(facts(tunnel_endpoints=False, routers=(),
                               sessions_must_survive=True))
    assert plan.way is None
    assert "sessions" in plan.reasons[Way.NAT]


def test_requested_way_or_none() -> None:
    plan = plan_crossing(facts(), "dual")
    assert plan.way is Way.DUAL
    assert plan.reasons[Way.STRETCH] == "not asked for"
    plan = plan_crossing(facts(guest_hotplug=False), Way.DUAL)
    assert plan.way is None
    assert plan.reasons[Way.DUAL] == "the guest does not take a hot-plugged NIC"
    with pytest.raises(InputError):
        plan_crossing(facts(), "teleport")
