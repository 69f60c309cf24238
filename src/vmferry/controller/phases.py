"""The phases of a live migration, one function each, in the order of ``PHASES``.

Each phase is recorded before it acts (``Run.begin``) and is safe to run twice, so a restarted
controller can finish (or undo) what a dead one began. Up to ``precopy`` a failure rolls back
(``controller.recovery``); from ``switchover`` on the VM runs on the destination and failures
are completed forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmferry.api.agent import GuestRequest, HostReport
from vmferry.controller import dual_nic, nat, route_way
from vmferry.controller.migration_uri import incoming_uri
from vmferry.controller.placement import refuse_move
from vmferry.controller.precopy import precopy
from vmferry.controller.run import Run
from vmferry.controller.service import memory_used
from vmferry.errors import (
    CapacityError,
    ConflictError,
    InputError,
    MigrationError,
    NotFoundError,
    VmferryError,
)
from vmferry.model.boundary import crossing_facts, plan_crossing
from vmferry.model.fabric import path_between
from vmferry.model.migration import Phase
from vmferry.store.schema import HostRow, VmRow

SWITCHOVER_WAIT_S = 15.0
# How long verify waits for the guest's memory check to finish a pass on the destination.
MEMCHECK_WAIT_S = 90.0


def precheck(run: Run) -> None:
    """Refuse with a reason before anything changes: first every reason placement gives
    (the same as ``vmferry where``), then the live reports of both hosts."""
    refuse_move(run.controller, run.vm, run.destination, run.id)
    topology = run.controller.topology()
    with run.session() as session:
        vm = session.get(VmRow, run.vm)
        if vm is None:
            raise NotFoundError("vm", f"no VM named {run.vm!r}")
        if run.destination == vm.host:
            raise InputError("to", f"VM {run.vm} already runs on {run.destination}")
        used = memory_used(session, run.destination, except_migration=run.id)
        dst_host = session.get(HostRow, run.destination)
        memory, vlan = vm.memory_mib, vm.vlan
        if dst_host is not None and dst_host.maintenance:
            raise ConflictError("to", f"host {run.destination} is in maintenance")
        vm.state = "migrating"
    free = topology.host(run.destination).memory_mib - used
    if memory > free:
        raise CapacityError(f"host {run.destination} has {free} MiB free, "
                            f"{run.vm} needs {memory} MiB", field="to")
    path = path_between(topology, run.source, run.destination)
    if not path:
        raise MigrationError(f"VLAN {vlan} cannot be carried from {run.source} to "
                             f"{run.destination}: no fabric path", vm=run.vm)
    check_hosts(run, _report(run, run.source), _report(run, run.destination))
    with run.session() as session:          # the NAT way's address pool (controller/nat.py)
        facts = nat.with_address_pool(session, topology, crossing_facts(
            topology, run.vm, vlan, run.source, run.destination))
    plan = plan_crossing(facts, run.options.boundary)
    way = nat.precheck(run, plan) or dual_nic.precheck(run, plan)  # away by X: back by X
    if way is None:
        crossing = route_way.plan_move(topology, run.vm, vlan, run.source, run.destination,
                                       run.options.boundary, facts)
        way = crossing.way.value if crossing.way else None
    run.record_result(plan={"vlan": vlan, "path": path, "crossing": way})


def check_hosts(run: Run, src: HostReport, dst: HostReport) -> None:
    """The destination can take the guest: shared storage, a migration address, QEMU."""
    if not dst.shared_storage_ok or dst.shared_storage != src.shared_storage:
        raise MigrationError(f"{run.destination} does not see the shared storage "
                             f"{src.shared_storage}", vm=run.vm)
    if not dst.migration_ip:
        raise MigrationError(f"{run.destination} has no migration network address", vm=run.vm)
    if _major(dst.qemu_version) < _major(src.qemu_version):
        raise MigrationError(f"QEMU {dst.qemu_version} on {run.destination} cannot take a "
                             f"guest from QEMU {src.qemu_version}", vm=run.vm)
    machines = dst.machine_types
    if machines and "q35" not in machines and not any(m.startswith("pc-q35")
                                                      for m in machines):
        raise MigrationError(f"{run.destination} cannot run machine type q35", vm=run.vm)


def extend_vlan(run: Run) -> None:
    """Carry the VM's VLAN on every trunk between the source and the destination: the store
    now says this migration's destination is an endpoint of the VM's VLAN. Only a trunk end
    on the move's own path may fail it (drift elsewhere is recorded)."""
    run.controller.reconcile_fabric(move_path(run))


def preset_port(run: Run) -> None:
    """The destination port exists, with the VM's VLAN (the rack's, for a move by "route"),
    before the VM does; under a stateful profile it knows the connections the VM has open on
    the source (agent.conntrack)."""
    run.dst.preset_port(_incoming_request(run))
    nat.before_switchover(run)        # a NAT move: the guest takes its next address too
    dual_nic.before_switchover(run)   # a dual NIC move: the source guest gets its next NIC
    if run.options.carry_conntrack:
        run.dst.carry_conntrack(run.vm, run.src.conntrack(run.vm))


def start_destination(run: Run) -> None:
    """QEMU on the destination, paused, listening for the stream. The destination's event
    cursor is taken first, so only this guest's events count later."""
    if run.result().get("destination_event_seq") is None:
        run.record_result(destination_event_seq=run.last_event_seq(run.destination))
    info = run.dst.create_guest(_incoming_request(run))
    if not info.incoming_uri and info.state != "inmigrate":
        raise MigrationError(f"destination QEMU on {run.destination} is not waiting for the "
                             f"stream (state {info.state})", vm=run.vm)
    # The URI is the inventory's address and the port the agent chose (migration_uri.py).
    run.record_result(incoming_uri=incoming_uri(run.controller.topology(), run.destination,
                                                info.incoming_uri, vm=run.vm))


def switchover(run: Run) -> None:
    """The point of no return: the destination runs the VM; the store says so.

    QEMU reports "completed" on the source a few milliseconds before the destination leaves
    ``inmigrate``: wait (bounded) for the destination's RESUME event."""
    completed = (run.result().get("events") or {}).get("source_completed")
    if completed is not None:
        run.record_result(completed_to_switchover_ms=round(
            (time.time() - float(completed)) * 1000, 1))
    record_final_progress(run)
    state = _wait_destination_running(run)
    if state == "paused":
        run.dst.resume(run.vm)
        state = run.dst.guest_state(run.vm)
    if state not in {"running", "postmigrate"}:
        raise MigrationError(f"destination guest is {state}, not running "
                             f"(waited {SWITCHOVER_WAIT_S:g}s)", vm=run.vm)
    with run.session() as session:
        vm = session.get(VmRow, run.vm)
        if vm is not None:
            vm.host = run.destination


def record_final_progress(run: Run) -> None:
    """QEMU's final figures of the completed migration (downtime, total time), once."""
    if run.result().get("qemu") is not None:
        return
    try:
        final = run.src.migration(run.vm)
    except VmferryError:
        return                  # the source may be gone already (a recovered migration)
    if final.status == "completed":
        data = final.model_dump(mode="json")
        run.record_result(qemu=data, progress=data)


def _wait_destination_running(run: Run) -> str:
    """The destination guest's state once it left ``inmigrate`` (or the wait ran out); its
    RESUME event's timestamp is recorded."""
    deadline = time.monotonic() + SWITCHOVER_WAIT_S
    after = int(run.result().get("destination_event_seq") or 0)
    state = run.dst.guest_state(run.vm)
    while True:
        waiting = state == "inmigrate" and time.monotonic() < deadline
        try:
            events = run.dst.guest_events(
                run.vm, after, min(1.0, deadline - time.monotonic()) if waiting else 0)
        except VmferryError:
            events = []
            if waiting:
                time.sleep(0.02)      # an agent without the events route: poll the state
        for event in events:
            after = event.seq
            if event.kind == "RESUME":
                run.record_event("destination_resume", event.timestamp)
        if not waiting:
            return state
        state = run.dst.guest_state(run.vm)


def announce(run: Run) -> None:
    """Tell the fabric where the VM's MAC is now: RARPs from the guest's new port; the
    window's pins move to the new place and go (``controller.switchover``), or without
    them the switches on the old path forget the old location instead of waiting for it
    to age. A move by "route" (in or out of a routed rack) switches the routers first
    (route_way); a NAT move's translation follows the VM (controller/nat.py)."""
    route_way.switch(run)
    nat.after_switchover(run)
    dual_nic.after_switchover(run)    # the route fails over, the old NIC goes
    run.dst.announce(run.vm)
    # The destination is confirmed: both-ways delivery ends, the pins move here and go.
    if run.close_switchover(arrived=True):
        return
    mac = run.vm_row().mac          # no pin held the MAC: the old path forgets it
    topology = run.controller.topology()
    switches = {s.name for s in topology.switches}
    fabric = run.controller.fabric_driver()
    for node in path_between(topology, run.source, run.destination):
        if node in switches:
            fabric.forget_mac(node, mac)


def clean_source(run: Run) -> None:
    """Stop the source QEMU and remove its port, flows, meters and tap."""
    run.src.delete_guest(run.vm)


def prune_vlan(run: Run) -> None:
    """The source is no endpoint any more (the VM's host changed at switchover)."""
    with run.session() as session:
        vm = session.get(VmRow, run.vm)
        if vm is not None:
            vm.state = "running"
    run.controller.reconcile_fabric(move_path(run))


def verify(run: Run) -> None:
    info = run.dst.guest(run.vm)
    if info.state != "running" or not info.port_present:
        raise MigrationError(f"{run.vm} on {run.destination} is {info.state}, "
                             f"port present: {info.port_present}", vm=run.vm)
    if run.src.guest_state(run.vm) != "absent":
        raise MigrationError(f"{run.vm} still has a guest on {run.source}", vm=run.vm)
    check_memory(run)


def check_memory(run: Run) -> None:
    """The guest's own memory check (image/init.sh), read from the destination's console:
    intact when a pass completed after the move with no failure. Raises MigrationError on a
    changed block; a check that did not finish a pass in time is recorded, not failed."""
    if not run.vm_row().memcheck_mib:
        return
    deadline = time.monotonic() + MEMCHECK_WAIT_S
    while True:
        verdict = run.dst.memcheck(run.vm)
        if verdict.failures or verdict.passes or not verdict.available \
                or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    intact = None if not verdict.passes and not verdict.failures else verdict.failures == 0
    run.record_result(memcheck={**verdict.model_dump(mode="json"), "intact": intact})
    if intact is False:
        raise MigrationError(f"guest memory changed by the move: {verdict.failures} "
                             f"failure(s): {'; '.join(verdict.fail_lines[:3])}", vm=run.vm)


# The whole migration, in order (``vmferry.model.migration.PHASES`` names them).
STEPS: dict[Phase, Callable[[Run], None]] = {
    Phase.PRECHECK: precheck,
    Phase.EXTEND_VLAN: extend_vlan,
    Phase.PRESET_PORT: preset_port,
    Phase.START_DESTINATION: start_destination,
    Phase.PRECOPY: precopy,
    Phase.SWITCHOVER: switchover,
    Phase.ANNOUNCE: announce,
    Phase.CLEAN_SOURCE: clean_source,
    Phase.PRUNE_VLAN: prune_vlan,
    Phase.VERIFY: verify,
}


def _incoming_request(run: Run) -> GuestRequest:
    """The destination's guest: the rack's VLAN (route), or the next NIC first (dual)."""
    return dual_nic.incoming(run, route_way.incoming(run, run.guest_request(incoming=True)))


def move_path(run: Run) -> set[str]:
    """The nodes this move depends on: both hosts and the fabric between them."""
    return set(path_between(run.controller.topology(), run.source, run.destination))


def _report(run: Run, host: str) -> HostReport:
    """The host's report, live; its last heartbeat's when the agent does not answer."""
    try:
        return run.controller.agent(host).report()
    except VmferryError:
        cached = run.controller.host_report(host)
        if cached is not None:
            return cached
        raise


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0
