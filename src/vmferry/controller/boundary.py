"""Which way each of a VM's possible moves would cross a subnet or VLAN boundary
(``model.boundary`` decides; this fills its facts from the inventory)."""

from __future__ import annotations

from vmferry.api.boundary import CrossingOut
from vmferry.controller import nat
from vmferry.model.boundary import Way, crossing_facts, plan_crossing
from vmferry.model.topology import Topology
from vmferry.store.db import Store


def crossings(topology: Topology, vm: str, host: str, vlans: tuple[int, ...],
              store: Store | None = None) -> list[CrossingOut]:
    """For every other host a move to which crosses a boundary on one of the VM's VLANs:
    the chosen way and why not the others (moves within one L2 domain are left out)."""
    result: list[CrossingOut] = []
    for destination in (h.name for h in topology.hosts if h.name != host):
        for vlan in vlans:
            facts = crossing_facts(topology, vm, vlan, host, destination)
            if store is not None:           # the NAT way's address pool (controller/nat.py)
                with store.session() as session:
                    facts = nat.with_address_pool(session, topology, facts)
            plan = plan_crossing(facts)
            if plan.way is Way.SAME_L2:
                continue
            result.append(CrossingOut(
                destination=destination, way=plan.way.value if plan.way else None,
                reasons={way.value: reason for way, reason in plan.reasons.items()}))
    return result
