"""The "route" way across a boundary, realized (``model.boundary`` chooses it).

A VM moved into a routed rack by "route" keeps its address and its gateway. Its port on the
destination is in the rack's VLAN (not its own: nothing stretches), and from the switchover
on the rack's router holds a /32 to it and a proxy entry for its old gateway; ARP caches on
both sides are re-pointed through the router at once (``drivers.fabric.router``). Return
traffic: the VM sends to its old subnet's addresses (on-link for it) and to its gateway; the
router's rack leg answers ARP for both and routes them out of its uplink leg.

Desired state, actual state, difference: what each router should hold is derived from the
store alone -- a VM sits routed when the newest migration that brought it to its host (not
rolled back) crossed by "route" and that host's rack routes its VLAN -- and ``reconcile``
writes only what differs. The switchover, the rollback and ``audit --fix`` call it, so a
return home, a move elsewhere, a rollback or a restarted controller all leave the routers
holding exactly the routed VMs; ``leftovers`` is what ``audit`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from vmferry.api.agent import GuestRequest
from vmferry.errors import ConflictError
from vmferry.model.boundary import (
    CrossingFacts,
    CrossingPlan,
    HostRoute,
    Way,
    crossing_facts,
    host_route,
    plan_crossing,
)
from vmferry.model.migration import MigrationState
from vmferry.model.topology import Topology
from vmferry.store.schema import MigrationRow, VmRow

if TYPE_CHECKING:
    from vmferry.controller.run import Run
    from vmferry.controller.service import Controller


def plan_move(topology: Topology, vm: str, vlan: int, source: str, destination: str,
              requested: str | None, facts: CrossingFacts | None = None) -> CrossingPlan:
    """The way this move crosses (the precheck records it), from ``facts`` when the caller
    has them (the NAT way adds its address pool). Raises ``ConflictError`` when the operator
    asked for a way that cannot take it, naming why."""
    plan = plan_crossing(facts or crossing_facts(topology, vm, vlan, source, destination),
                         requested)
    if requested is not None and plan.way is None:
        raise ConflictError("boundary", f"a move {source} -> {destination} cannot cross by "
                            f"{requested}: {plan.reasons.get(Way(requested), '?')}")
    return plan


def migration_way(row: MigrationRow) -> Way | None:
    """The way a migration crosses, as its precheck recorded it."""
    crossing = ((row.result or {}).get("plan") or {}).get("crossing")
    return Way(crossing) if crossing in set(Way) else None


def placement_way(session: Any, vm: VmRow, host: str, before: int | None = None) -> Way | None:
    """The way the VM came to ``host``: the newest migration there that was not rolled back
    (older than migration ``before``, when given; not of an earlier VM of the same name);
    None when it was created there."""
    query = select(MigrationRow).where(
        MigrationRow.vm == vm.name, MigrationRow.destination == host,
        MigrationRow.state != MigrationState.ROLLED_BACK.value,
        MigrationRow.started_at >= vm.created_at)
    if before is not None:
        query = query.where(MigrationRow.id < before)
    row = session.scalars(query.order_by(MigrationRow.id.desc()).limit(1)).first()
    return migration_way(row) if row is not None else None


def attachment_vlan(topology: Topology, vlan: int, ip: str, host: str,
                    way: Way | None) -> int:
    """The VLAN of a VM's port on ``host``: its rack's, when it came there by "route"."""
    route = host_route(topology, ip, vlan, host) if way is Way.ROUTE else None
    return route.rack_vlan if route is not None else vlan


def placed_vlan(topology: Topology, session: Any, vm: VmRow) -> int:
    """The VLAN of the VM's port on its host now (the fabric's endpoint)."""
    if host_route(topology, vm.ip, vm.vlan, vm.host) is None:
        return vm.vlan          # no routed rack routes its VLAN there: no store look-up
    return attachment_vlan(topology, vm.vlan, vm.ip, vm.host,
                           placement_way(session, vm, vm.host))


def incoming(run: Run, request: GuestRequest) -> GuestRequest:
    """The destination's guest request of a move by "route": the port in the rack's VLAN."""
    vlan = attachment_vlan(run.controller.topology(), request.vlan, request.ip or "",
                           run.destination, run_way(run))
    return request if vlan == request.vlan else request.model_copy(update={"vlan": vlan})


def run_way(run: Run) -> Way | None:
    crossing = (run.result().get("plan") or {}).get("crossing")
    return Way(crossing) if crossing in set(Way) else None


@dataclass(frozen=True)
class Holding:
    """What one router should hold: /32s to the VMs routed into its rack, and a proxy entry
    for each of their old gateways."""

    routes: frozenset[str]
    proxies: frozenset[str]


def desired(controller: Controller) -> dict[str, Holding]:
    """Router -> what it should hold, from the store (every routed rack's router listed)."""
    topology = controller.topology()
    routes: dict[str, set[str]] = {r.router: set() for r in topology.routed_racks()}
    proxies: dict[str, set[str]] = {r.router: set() for r in topology.routed_racks()}
    with controller.store.session() as session:
        for vm in session.scalars(select(VmRow)):
            route = _routed(topology, session, vm)
            if route is not None:
                routes[route.router].add(route.address)
                proxies[route.router].add(route.gateway)
    return {r: Holding(frozenset(routes[r]), frozenset(proxies[r])) for r in routes}


def _routed(topology: Topology, session: Any, vm: VmRow) -> HostRoute | None:
    route = host_route(topology, vm.ip, vm.vlan, vm.host)
    if route is None or placement_way(session, vm, vm.host) is not Way.ROUTE:
        return None
    return route


def reconcile(controller: Controller, flows: bool = True) -> list[str]:
    """Make every router hold exactly what ``desired`` says, writing only what differs;
    returns the changes ("router: +route 192.0.2.30", ...). ``flows``: also flush the
    connection-tracking entries that translate as no NAT translation of the router does
    (``stale_flows``; the switchover leaves them to ``audit --fix`` and the rollback: reading
    them costs a dump per router). Raises ``FabricError``."""
    routers = controller.router_driver()
    changes: list[str] = []
    for router, want in desired(controller).items():
        if flows:
            changes += _forget_stale_flows(controller, router)
        routes, proxies = routers.host_routes(router), routers.proxy_entries(router)
        for address in sorted(want.routes - routes):
            routers.add_host_route(router, address)
            changes.append(f"{router}: +route {address}")
        for address in sorted(want.proxies - proxies):
            routers.add_proxy(router, address)
            changes.append(f"{router}: +proxy {address}")
        for address in sorted(routes - want.routes):
            routers.remove_host_route(router, address)
            changes.append(f"{router}: -route {address}")
        for address in sorted(proxies - want.proxies):
            routers.remove_proxy(router, address)
            changes.append(f"{router}: -proxy {address}")
    return changes


def _forget_stale_flows(controller: Controller, router: str) -> list[str]:
    nat = controller.nat_driver()
    stale = nat.stale_flows(router)
    if stale:
        nat.forget_flows(router, sorted(stale))
    return [f"{router}: -flows {home} -> {new}" for home, new in sorted(stale.items())]


def leftovers(controller: Controller) -> list[tuple[str, str, str, str]]:
    """(kind, router, address, detail) for what a router holds that no routed VM needs, for
    what one needs but its router lacks, and for tracked flows the router still translates
    as none of its translations says (``reconcile`` flushes them)."""
    routers = controller.router_driver()
    nat = controller.nat_driver()
    found: list[tuple[str, str, str, str]] = []
    for router, want in desired(controller).items():
        found += [("router-flow", router, home, f"tracked flows still translated to {new} "
                   "by no translation of the router") for home, new in
                  sorted(nat.stale_flows(router).items())]
        routes, proxies = routers.host_routes(router), routers.proxy_entries(router)
        found += [("host-route", router, a, "a /32 that no routed VM needs")
                  for a in sorted(routes - want.routes)]
        found += [("proxy-arp", router, a, "a proxy ARP entry that no routed VM needs")
                  for a in sorted(proxies - want.proxies)]
        found += [("host-route-missing", router, a, "a routed VM's /32 or proxy entry "
                   "is missing") for a in sorted((want.routes - routes)
                                                 | (want.proxies - proxies))]
    return found


def switch(run: Run) -> None:
    """At the switchover: the routers hold what the store now says, and the ARP caches on
    the way in (or out) of a routed rack point the new way (idempotent). This move's own /32
    and ARP frames go first, the site-wide reconcile (slower: proxy entries, every VM's way)
    after: the client's traffic waits only for the first."""
    topology = run.controller.topology()
    vm = run.vm_row()
    routers = run.controller.router_driver()
    into = host_route(topology, vm.ip, vm.vlan, run.destination) \
        if run_way(run) is Way.ROUTE else None
    out = host_route(topology, vm.ip, vm.vlan, run.source)
    with run.session() as session:
        row = session.get(VmRow, run.vm)
        left_routed = out is not None and row is not None and placement_way(
            session, row, run.source, before=run.id) is Way.ROUTE
    frames = 0
    if out is not None and left_routed:
        if into is None or into.router != out.router:
            routers.remove_host_route(out.router, out.address)
        frames += routers.announce(out.router, vm.ip, vm.mac, out.subnet, into_rack=False)
    if into is not None:
        routers.add_host_route(into.router, into.address)
        frames += routers.announce(into.router, vm.ip, vm.mac, into.subnet, into_rack=True)
    changes = reconcile(run.controller, flows=False)
    if changes or frames:
        run.record_result(route_way={"changes": changes, "arp_frames": frames})
