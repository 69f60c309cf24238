"""The "dual NIC" way across a boundary: a VM moving into a routed rack gets a second NIC in
the rack's subnet, and that NIC becomes its own; the old one is removed. The way back is the
reverse, under the VM's home VLAN, address and MAC (kept reserved while it is away).

Every lab guest has two PCIe root ports (drivers/hypervisor/qemu_cmdline.py): its NIC on one
(``home_slot`` at home), the second NIC hot-plugged on the other. QEMU needs the same devices
on both ends, so the destination starts with both NICs: there the NIC of the side it moves to
is the VM's main one (its port is the VM's port) and the other is the second NIC. The store
row (``dual_nic_moves``) keeps the home identity and the rack's. On the migration's phases
(controller/phases.py calls these):

    precheck          in: take a free address of the rack (shared with NAT, nat.next_address)
                      and a MAC from the pool (``reserved``); back: ``returning``; no
                      make-before-break (two VLANs)
    preset_port       the destination port is the next NIC's (``incoming``); on the source the
                      next NIC is hot-plugged with its port on the next VLAN, and the guest
                      takes the next address on it (control port, through the router)
    start_destination QEMU with both NICs (``incoming``)
    announce          the guest's default route goes via the next NIC (in: the rack's gateway;
                      back: none, as at home), the old NIC is hot-unplugged on the destination
                      and its port and tap removed; the VM's row takes the next identity (what
                      ``vmferry vm show`` publishes); in: ``active``; back: the row is deleted
    rollback          the second NIC is unplugged on the source; a move in gives its address
                      back, a move back is ``active`` again

The VM's address changes, so sessions it had open break (the README says so); clients reach
it at the new address (``vm show``). ``audit`` reports rows no VM or migration explains (and,
in controller/audit.py, a second NIC's tap on a host with no migration of its VM).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmferry.api.agent import AuxNic, GuestRequest
from vmferry.controller import nat
from vmferry.errors import MigrationError, VmferryError
from vmferry.model.addresses import bare
from vmferry.model.boundary import CrossingPlan, Way
from vmferry.store.schema import DualNicRow, VmRow

if TYPE_CHECKING:
    from vmferry.controller.run import Run
    from vmferry.controller.service import Controller

log = logging.getLogger(__name__)

RESERVED, ACTIVE, RETURNING = "reserved", "active", "returning"


@dataclasses.dataclass(frozen=True)
class Side:
    """One NIC identity of a VM moving by dual NIC."""

    vlan: int
    ip: str             # CIDR
    mac: str
    slot: int
    gateway: str        # "none": no default route (as at home)


@dataclasses.dataclass(frozen=True)
class DualMove:
    """A move by dual NIC under way: from ``current`` to ``next``, told through ``router``."""

    vm: str
    router: str
    current: Side
    next: Side
    inward: bool


def _sides(row: DualNicRow) -> tuple[Side, Side]:
    home = Side(row.home_vlan, row.home_ip, row.home_mac, row.home_slot, "none")
    rack = Side(row.vlan, row.ip, row.mac, 1 - row.home_slot, row.gateway)
    return home, rack


def _move(run: Run) -> DualMove | None:
    """This migration's move by dual NIC, None for any other."""
    with run.session() as session:
        row = session.get(DualNicRow, run.vm)
        if row is None or row.migration_id != run.id or row.state not in (RESERVED, RETURNING):
            return None
        home, rack = _sides(row)
        if row.state == RESERVED:
            return DualMove(run.vm, row.router, home, rack, inward=True)
        return DualMove(run.vm, row.router, rack, home, inward=False)


# ---- the migration's phases -------------------------------------------------------------


def precheck(run: Run, plan: CrossingPlan) -> str | None:
    """The dual NIC part of the precheck: "dual" if this is a move by dual NIC (in or back)
    with its row taken or marked; None for any other move. Raises ``MigrationError`` when
    the move cannot go by dual NIC."""
    topology = run.controller.topology()
    with run.session() as session:
        row = session.get(DualNicRow, run.vm)
        if row is not None and row.migration_id not in (None, run.id) and row.state != ACTIVE:
            raise MigrationError(f"{run.vm}'s dual NIC move is held by migration "
                                 f"{row.migration_id} ({row.state})", vm=run.vm)
        if row is not None:
            if nat.rack_of(topology, run.destination).router == row.router:
                raise MigrationError(f"{run.vm} is in {row.router}'s rack by dual NIC: it "
                                     f"moves only back out of it", vm=run.vm)
            row.state, row.migration_id = RETURNING, run.id
        elif plan.way is Way.DUAL:
            _take(session, run)
        else:
            return None
        nat.no_make_before_break(session, run)
    return Way.DUAL.value


def _take(session: Session, run: Run) -> None:
    vm = session.get(VmRow, run.vm)
    rack = nat.rack_of(run.controller.topology(), run.destination)
    address = nat.next_address(session, rack)
    if vm is None or address is None or rack.gateway is None or rack.vlan is None:
        raise MigrationError(f"no free address in {rack.subnet} for {run.vm}", vm=run.vm)
    mac = run.controller._allocate_mac(session)   # the VMs' pool: never reused
    session.add(DualNicRow(vm=run.vm, router=rack.router, home_vlan=vm.vlan, home_ip=vm.ip,
                           home_mac=vm.mac, home_slot=0, vlan=rack.vlan, ip=address, mac=mac,
                           gateway=bare(rack.gateway), state=RESERVED, migration_id=run.id))


def incoming(run: Run, request: GuestRequest) -> GuestRequest:
    """The destination's guest request of a move by dual NIC: its main NIC is the next one
    (the VM's port, on the next VLAN), the current one is its second NIC."""
    move = _move(run)
    if move is None:
        return request
    return request.model_copy(update={
        "mac": move.next.mac, "ip": move.next.ip, "vlan": move.next.vlan,
        "nic_slot": move.next.slot,
        "aux_nic": AuxNic(mac=move.current.mac, vlan=move.current.vlan,
                          slot=move.current.slot)})


def _tell(run: Run, move: DualMove, at: Side, line: str) -> None:
    run.controller.nat_driver().tell_guest(move.router, bare(at.ip), line)


def before_switchover(run: Run) -> None:
    """The source guest gets the next NIC (on the next VLAN) and takes the next address on
    it, beside the one it has (safe to repeat)."""
    move = _move(run)
    if move is None:
        return
    run.src.plug_nic(run.vm, AuxNic(mac=move.next.mac, vlan=move.next.vlan,
                                    slot=move.next.slot))
    _tell(run, move, move.current, f"addr add {move.next.ip} keep {move.next.mac}")
    run.record_result(dual={"from": move.current.ip, "address": move.next.ip,
                            "mac": move.next.mac, "router": move.router,
                            "direction": "in" if move.inward else "back"})


def after_switchover(run: Run) -> None:
    """The VM runs on the destination: its default route fails over to the next NIC, the old
    NIC is unplugged there and its port removed, and the VM's row takes the next identity
    (safe to repeat: a finished move is skipped)."""
    move = _move(run)
    if move is None:
        return
    _tell(run, move, move.next, f"addr add {move.next.ip} {move.next.gateway} {move.next.mac}")
    run.dst.unplug_nic(run.vm)
    with run.session() as session:
        vm = session.get(VmRow, run.vm)
        row = session.get(DualNicRow, run.vm)
        if vm is not None:
            vm.vlan, vm.ip, vm.mac = move.next.vlan, move.next.ip, move.next.mac
        if row is not None and move.inward:
            row.state = ACTIVE
        elif row is not None:
            session.delete(row)


def rollback(run: Run) -> str | None:
    """Undo ``before_switchover`` on the source (the second NIC goes, and its address with
    it) and give the address back (a move in) or keep it (a move back). Returns the problem,
    if any (a rollback goes on)."""
    move = _move(run)
    if move is None:
        return None
    problem: str | None = None
    try:
        run.src.unplug_nic(run.vm)
    except VmferryError as exc:
        problem = f"dual NIC: {exc.message}"
    with run.session() as session:
        row = session.get(DualNicRow, run.vm)
        if row is not None and move.inward:
            session.delete(row)
        elif row is not None:
            row.state, row.migration_id = ACTIVE, None
    return problem


# ---- audit --------------------------------------------------------------------------------


def leftovers(controller: Controller) -> list[tuple[str, str, str, str]]:
    """(kind, where, what, detail) of dual NIC rows that neither a running migration nor a VM
    placed in the row's rack explains. (A second NIC's tap where no migration of its VM runs
    is the host audit's, controller/audit.py.)"""
    topology = controller.topology()
    found: list[tuple[str, str, str, str]] = []
    with controller.store.session() as session:
        running, vms = nat.live_moves(session)
        for row in session.scalars(select(DualNicRow)):
            host = vms.get(row.vm)
            away = host is not None and nat.rack_of(topology, host).router == row.router
            if row.migration_id not in running and not (row.state == ACTIVE and away):
                found.append(("dual-nic", row.router, row.vm,
                              f"dual NIC move to {row.ip} ({row.state}) that no move explains"))
    return found


def fix(controller: Controller, kind: str, what: str) -> None:
    """Remove a row ``leftovers`` reported."""
    if kind != "dual-nic":
        return
    with controller.store.session() as session:
        row = session.get(DualNicRow, what)
        if row is not None:
            session.delete(row)
