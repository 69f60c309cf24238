"""The "NAT" way across a boundary: a VM moves into a routed rack under an address of the
rack's subnet, and the rack's router translates its home address to it; removed on return.

The VM's row keeps its home VLAN and address (what its clients use); a lease in the store
(``nat_leases``) holds the borrowed address while it is away. A move in and a move back, on
the migration's phases (controller/phases.py calls these):

    precheck          in: take a free address of the rack (the lease is ``reserved``);
                      back: the lease is ``returning``; make-before-break is off (frames
                      cannot be delivered to both ends in two VLANs)
    (fabric, port)    the VM's port is on the rack's VLAN wherever the lease's rack is
                      (``vlan_at``): the destination port, the trunks' VLANs
    preset_port       the guest takes the address it will need next as a second one
                      (in: the new one; back: its home one), told through its control port
                      from the router, which has a leg in either subnet
    announce          in: the router translates home -> new and answers ARP for home, and
                      the guest drops its home address and routes via the rack's gateway
                      (lease ``active``); back: the router drops the translation and the
                      guest drops the borrowed address; the lease is released
    rollback          the guest drops the address it took at preset_port; a lease taken
                      by the move in is released, one of a move back is ``active`` again

Sessions the VM had open across the move are reset: their packets now reach the new
address, which no socket of theirs is bound to (the README says so). New sessions to the
home address work while the VM is away. ``audit`` reports translations no lease explains and
leases no VM or migration explains.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmferry.errors import MigrationError, VmferryError
from vmferry.model.addresses import NatAddress, bare, free_address
from vmferry.model.boundary import CrossingFacts, CrossingPlan, Way
from vmferry.model.migration import MigrationState
from vmferry.model.topology import Rack, Topology
from vmferry.store.schema import DualNicRow, MigrationRow, NatLeaseRow, VmRow

if TYPE_CHECKING:
    from vmferry.controller.run import Run
    from vmferry.controller.service import Controller

log = logging.getLogger(__name__)

RESERVED, ACTIVE, RETURNING = "reserved", "active", "returning"


def rack_of(topology: Topology, host: str) -> Rack:
    return next(r for r in topology.racks if r.name == topology.host(host).rack)


def routed_rack(topology: Topology, router: str) -> Rack | None:
    return next((r for r in topology.routed_racks() if r.router == router), None)


def vlan_at(topology: Topology, lease: NatLeaseRow | DualNicRow | None, home_vlan: int,
            host: str) -> int:
    """The VLAN a VM's port has on ``host``: its lease's (the rack's) in the lease's rack,
    its home VLAN anywhere else (the lease's: a VM away by dual NIC has the rack's VLAN in
    its row)."""
    if lease is None:
        return home_vlan
    if rack_of(topology, host).router == lease.router and rack_of(topology, host).routed:
        return lease.vlan
    return lease.home_vlan


def leases(session: Session) -> dict[str, NatLeaseRow | DualNicRow]:
    """Every VM away in a routed rack under a borrowed address, by NAT or by dual NIC (what
    places its port on the rack's VLAN there, ``vlan_at``)."""
    found: dict[str, NatLeaseRow | DualNicRow] = dict(nat_leases(session))
    found.update({row.vm: row for row in session.scalars(select(DualNicRow))})
    return found


def nat_leases(session: Session) -> dict[str, NatLeaseRow]:
    return {row.vm: row for row in session.scalars(select(NatLeaseRow))}


def _taken(session: Session, vlan: int) -> list[str]:
    """Addresses of ``vlan`` in use or reserved: VMs', NAT leases', and those of moves by
    dual NIC (the rack's address and the home one kept for the way back)."""
    vms = [v.ip for v in session.scalars(select(VmRow).where(VmRow.vlan == vlan))]
    dual = [row.ip for row in session.scalars(select(DualNicRow).where(
        DualNicRow.vlan == vlan))] + [row.home_ip for row in session.scalars(
            select(DualNicRow).where(DualNicRow.home_vlan == vlan))]
    return vms + dual + [row.ip for row in session.scalars(
        select(NatLeaseRow).where(NatLeaseRow.vlan == vlan))]


def next_address(session: Session, rack: Rack) -> str | None:
    """A free address of the routed rack's subnet (CIDR), None when none is left: shared by
    the NAT and the dual NIC way."""
    if rack.subnet is None or rack.vlan is None:
        return None
    return free_address(rack.subnet, rack.gateway, _taken(session, rack.vlan))


def with_address_pool(session: Session, topology: Topology,
                      facts: CrossingFacts) -> CrossingFacts:
    """``facts`` with ``free_destination_address`` as the store says (a free address is left
    in the pool of the destination's routed rack) and ``guest_hotplug`` as the destination's
    hypervisor says (the QEMU driver hot-plugs a NIC; libvirt's does not)."""
    if facts.destination_subnet is None:
        return facts
    free = next_address(session, rack_of(topology, facts.destination)) is not None
    hotplug = topology.guest_hotplug and topology.host(facts.destination).hypervisor == "qemu"
    return dataclasses.replace(facts, free_destination_address=free, guest_hotplug=hotplug)


def lease_of(row: NatLeaseRow) -> NatAddress:
    return NatAddress(vm=row.vm, router=row.router, home_vlan=row.home_vlan,
                      home_ip=row.home_ip, vlan=row.vlan, ip=row.ip, gateway=row.gateway)


# ---- the migration's phases -------------------------------------------------------------


def precheck(run: Run, plan: CrossingPlan) -> str | None:
    """The NAT part of the precheck: the way this move takes if it is a NAT move (in or
    back), with its lease taken or marked; None for any other move. Raises
    ``MigrationError`` when the move is asked to go by NAT and cannot."""
    topology = run.controller.topology()
    with run.session() as session:
        lease = session.get(NatLeaseRow, run.vm)
        if lease is not None and lease.migration_id not in (None, run.id) \
                and lease.state != ACTIVE:
            raise MigrationError(f"{run.vm}'s NAT lease is held by migration "
                                 f"{lease.migration_id} ({lease.state})", vm=run.vm)
        if lease is not None:
            if rack_of(topology, run.destination).router == lease.router:
                return None                   # a move inside the rack: nothing to translate
            lease.state, lease.migration_id = RETURNING, run.id
            way = "nat"
        elif plan.way is Way.NAT:
            way = _take_lease(session, topology, run)
        else:
            return None
        no_make_before_break(session, run)
    return way


def _take_lease(session: Session, topology: Topology, run: Run) -> str:
    vm = session.get(VmRow, run.vm)
    rack = rack_of(topology, run.destination)
    address = next_address(session, rack)
    if vm is None or address is None or rack.gateway is None or rack.vlan is None:
        raise MigrationError(f"no free address in {rack.subnet} for {run.vm}", vm=run.vm)
    session.add(NatLeaseRow(vm=run.vm, router=rack.router, home_vlan=vm.vlan, home_ip=vm.ip,
                            vlan=rack.vlan, ip=address, gateway=bare(rack.gateway),
                            state=RESERVED, migration_id=run.id))
    return "nat"


def no_make_before_break(session: Session, run: Run) -> None:
    """Frames cannot reach both ends in two VLANs: the move runs without make-before-break
    (the store's options too, so a restarted controller agrees)."""
    run.options = run.options.model_copy(update={"make_before_break": False})
    row = session.get(MigrationRow, run.id)
    if row is not None:
        row.options = {**row.options, "make_before_break": False}


def _lease(run: Run) -> NatAddress | None:
    with run.session() as session:
        row = session.get(NatLeaseRow, run.vm)
        if row is None or row.migration_id != run.id:
            return None
        return lease_of(row) if row.state in (RESERVED, RETURNING) else None


def _state(run: Run) -> str | None:
    with run.session() as session:
        row = session.get(NatLeaseRow, run.vm)
        return row.state if row is not None and row.migration_id == run.id else None


def before_switchover(run: Run) -> None:
    """The guest takes the address it needs next, beside the one it has (safe to repeat)."""
    lease, state = _lease(run), _state(run)
    if lease is None:
        return
    nat = run.controller.nat_driver()
    if state == RESERVED:
        nat.tell_guest(lease.router, lease.home_address, f"addr add {lease.ip}")
    else:
        nat.tell_guest(lease.router, lease.address, f"addr add {lease.home_ip}")
    run.record_result(nat={"home": lease.home_ip, "address": lease.ip,
                           "router": lease.router, "direction": "in" if state == RESERVED
                           else "back"})


def after_switchover(run: Run) -> None:
    """The VM runs on the destination: the router's translation follows it, the guest drops
    the address of the side it left (safe to repeat: a finished step is skipped)."""
    lease, state = _lease(run), _state(run)
    if lease is None:
        return
    nat = run.controller.nat_driver()
    if state == RESERVED:
        nat.add(lease.router, lease.home_ip, lease.ip)
        nat.tell_guest(lease.router, lease.address, f"addr del {lease.home_ip} {lease.gateway}")
        with run.session() as session:
            row = session.get(NatLeaseRow, run.vm)
            if row is not None:
                row.state = ACTIVE
    else:
        nat.remove(lease.router, lease.home_ip)
        nat.tell_guest(lease.router, lease.home_address, f"addr del {lease.ip} none")
        with run.session() as session:
            row = session.get(NatLeaseRow, run.vm)
            if row is not None:
                session.delete(row)


def rollback(run: Run) -> str | None:
    """Undo ``before_switchover`` on the source's guest and give the lease back (a move in)
    or keep it (a move back). Returns the problem, if any (a rollback goes on)."""
    lease, state = _lease(run), _state(run)
    if lease is None:
        return None
    nat = run.controller.nat_driver()
    problem: str | None = None
    try:
        if state == RESERVED:
            nat.tell_guest(lease.router, lease.home_address, f"addr del {lease.ip}")
        else:
            nat.tell_guest(lease.router, lease.address, f"addr del {lease.home_ip}")
    except VmferryError as exc:
        problem = f"nat: {exc.message}"
    with run.session() as session:
        row = session.get(NatLeaseRow, run.vm)
        if row is not None and state == RESERVED:
            session.delete(row)
        elif row is not None:
            row.state, row.migration_id = ACTIVE, None
    return problem


# ---- audit --------------------------------------------------------------------------------


def live_moves(session: Session) -> tuple[set[int], dict[str, str]]:
    """(ids of the migrations still running or rolling back, each VM's host): what explains
    a lease or a dual NIC row in the audit."""
    running = {m.id for m in session.scalars(select(MigrationRow).where(
        MigrationRow.state.in_([MigrationState.RUNNING.value,
                                MigrationState.ROLLING_BACK.value])))}
    return running, {v.name: v.host for v in session.scalars(select(VmRow))}


def leftovers(controller: Controller) -> list[tuple[str, str, str, str]]:
    """(kind, where, what, detail) of what the NAT way left behind: translations and ARP
    proxy entries on routers that no lease explains, and leases that neither a placed VM in
    the lease's rack nor a running migration explains."""
    topology = controller.topology()
    found: list[tuple[str, str, str, str]] = []
    with controller.store.session() as session:
        running, vms = live_moves(session)
        held: list[NatAddress] = []           # leases a placed VM or a move explains
        active: set[str] = set()
        for row in nat_leases(session).values():
            host = vms.get(row.vm)
            away = host is not None and rack_of(topology, host).router == row.router
            if row.migration_id in running or (row.state == ACTIVE and away):
                held.append(lease_of(row))
                if row.state == ACTIVE:
                    active.add(bare(row.home_ip))
            else:
                found.append(("nat-lease", row.router, row.vm,
                              f"lease of {row.ip} ({row.state}) that no move explains"))
    wanted = {(lease.router, lease.home_address): lease.address for lease in held}
    nat = controller.nat_driver()
    for rack in topology.routed_racks():
        try:
            translations = nat.translations(rack.router)
            proxied = nat.proxied(rack.router)
        except VmferryError as exc:
            found.append(("unreachable", rack.router, "-", exc.message))
            continue
        for home, new in translations.items():
            if wanted.get((rack.router, home)) != new:
                found.append(("nat-rule", rack.router, home,
                              f"translation {home} -> {new} that no lease explains"))
        for (router, home), new in wanted.items():
            if router == rack.router and home in active and translations.get(home) != new:
                found.append(("nat-missing", router, home,
                              f"translation {home} -> {new} of an active lease is missing"))
        for home in proxied - {h for (r, h) in wanted if r == rack.router}:
            found.append(("nat-proxy", rack.router, home,
                          f"ARP proxy entry for {home} that no lease explains"))
    return found


def fix(controller: Controller, kind: str, where: str, what: str) -> None:
    """Remove one leftover ``leftovers`` reported."""
    if kind in ("nat-rule", "nat-proxy"):
        controller.nat_driver().remove(where, what)
    elif kind == "nat-missing":
        with controller.store.session() as session:
            row = next((r for r in nat_leases(session).values()
                        if r.router == where and bare(r.home_ip) == what), None)
            lease = lease_of(row) if row is not None else None
        if lease is not None:
            controller.nat_driver().add(lease.router, lease.home_ip, lease.ip)
    elif kind == "nat-lease":
        with controller.store.session() as session:
            row = session.get(NatLeaseRow, what)
            if row is not None:
                session.delete(row)
