"""Placement in the controller: the store and the agents' reports read into the pure model
(``vmferry.model.placement``), and what the operator asks of it: where a VM may go, its policy,
balancing. Drains and failure restarts run in ``controller.drain`` and ``controller.hostwatch``.

The same ``snapshot`` serves ``where``, the migration precheck (``refuse_move``), drains,
balancing and restarts, so they all give the same reasons.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from vmferry.api.agent import HostReport
from vmferry.api.controller import VmCreate
from vmferry.api.placement import BalanceOut, HostPlacementOut, MoveOut, ReasonOut, WhereOut
from vmferry.controller import events
from vmferry.controller.auth import Principal
from vmferry.controller.boundary import crossings
from vmferry.controller.service import HEARTBEAT_FRESH, PLACED_STATES, Controller
from vmferry.errors import ConflictError, NotFoundError, VmferryError
from vmferry.model.migration import MigrationState
from vmferry.model.placement import (
    Cluster,
    Code,
    HostFacts,
    HostState,
    Verdict,
    VmFacts,
    VmPolicy,
    network_view,
    profile_needs,
)
from vmferry.model.placement_plans import plan_balance
from vmferry.model.profile import PortProfile
from vmferry.model.topology import Topology
from vmferry.model.validation import input_error_from
from vmferry.store.profile_schema import ProfileRow
from vmferry.store.schema import HostRow, MigrationRow, VmRow

MAX_BALANCE_MOVES = 100


def policy_of(row: VmRow) -> VmPolicy:
    """The VM's stored policy; the VM's ``max_downtime_ms`` column is the policy's."""
    policy = VmPolicy.model_validate(row.policy) if row.policy else VmPolicy()
    if policy.max_downtime_ms != row.max_downtime_ms:
        policy = policy.model_copy(update={"max_downtime_ms": row.max_downtime_ms})
    return policy


def host_state(row: HostRow | None, now: datetime, *, answered: bool = False) -> HostState:
    """``answered``: the host's agent answered just now (as good as a fresh heartbeat)."""
    if row is None:
        return HostState.DOWN
    if row.failure_state:
        return HostState(row.failure_state)
    beat = row.last_heartbeat
    if beat is not None and beat.tzinfo is None:
        beat = beat.replace(tzinfo=UTC)
    if not answered and (beat is None or now - beat >= HEARTBEAT_FRESH):
        return HostState.DOWN
    return HostState.MAINTENANCE if row.maintenance else HostState.UP


def snapshot(controller: Controller, *, skip_migration: int | None = None,
             live: dict[str, HostReport] | None = None) -> Cluster:
    """The site now: inventory, heartbeat reports, host states, placed VMs with their policies
    and profiles' needs, and the destinations of running migrations (reserved there).
    ``live``: reports just read from some agents, used instead of their last heartbeat's."""
    live = live or {}
    topology = controller.topology()
    now = datetime.now(UTC)
    hosts = []
    cpu: dict[str, float] = {}      # each VM's CPU load as its host's agent last read it
    with controller.store.session() as session:
        rows = {r.name: r for r in session.scalars(select(HostRow))}
        for spec in topology.hosts:
            row = rows.get(spec.name)
            fresh = live.get(spec.name)
            report: dict[str, Any] = fresh.model_dump(mode="json") if fresh else \
                (row.report if row else None) or {}
            hosts.append(HostFacts(
                name=spec.name, rack=spec.rack, zone=spec.zone,
                state=host_state(row, now, answered=fresh is not None),
                memory_mib=spec.memory_mib, max_migrations=spec.max_migrations,
                migration_mbps=spec.migration_mbps, qemu_version=report.get("qemu_version"),
                machine_types=frozenset(report.get("machine_types") or ()),
                shared_storage=report.get("shared_storage"),
                shared_storage_ok=bool(report.get("shared_storage_ok")),
                migration_ip=report.get("migration_ip"),
                features=frozenset(spec.softswitch_features), cpus=report.get("cpus") or 1))
            cpu.update(_guest_cpu(spec.name, report))
        needs = {p.name: profile_needs(_profile(p)) for p in session.scalars(select(ProfileRow))}
        vms = [VmFacts(name=v.name, host=v.host, memory_mib=v.memory_mib, vlans=(v.vlan,),
                       policy=policy_of(v), needs=needs.get(v.profile or "", frozenset()),
                       workload_mibps=v.workload_mibps, cpu=cpu.get(f"{v.host}/{v.name}", 0.0))
               for v in session.scalars(select(VmRow)) if v.state in PLACED_STATES]
        incoming = [(m.vm, m.destination) for m in session.scalars(select(MigrationRow).where(
            MigrationRow.state == MigrationState.RUNNING.value)) if m.id != skip_migration]
    return Cluster(hosts, vms, network_view(topology), incoming)


def _guest_cpu(host: str, report: dict[str, Any]) -> dict[str, float]:
    """``host/guest`` -> CPU load from a stored report (a migrating guest is on both hosts:
    the VM's own host's reading counts)."""
    loads = {}
    for guest in report.get("guests") or ():
        load = guest.get("cpu_load") if isinstance(guest, dict) else None
        if isinstance(load, int | float):
            loads[f"{host}/{guest.get('name')}"] = float(load)
    return loads


def _profile(row: ProfileRow) -> PortProfile | None:
    try:
        return PortProfile.model_validate({**row.spec, "name": row.name})
    except ValidationError:
        return None


def verdict_out(cluster: Cluster, verdict: Verdict) -> HostPlacementOut:
    spec = cluster.hosts[verdict.host]
    return HostPlacementOut(
        host=verdict.host, ok=verdict.ok, state=spec.state.value, rack=spec.rack,
        zone=spec.zone, free_mib=spec.memory_mib - cluster.used[verdict.host],
        reasons=[ReasonOut(code=r.code.value, message=r.message) for r in verdict.reasons])


def refusal(verdict: Verdict) -> str:
    return "; ".join(f"{r.code.value}: {r.message}" for r in verdict.reasons)


def _live_reports(controller: Controller, hosts: set[str]) -> dict[str, HostReport]:
    """Reports read from these hosts' agents now; a host that does not answer keeps its last
    heartbeat's report (and state)."""
    live = {}
    for host in hosts:
        try:
            live[host] = controller.agent(host).report()
        except VmferryError:
            pass
    return live


def refuse_move(controller: Controller, vm: str, destination: str,
                migration_id: int | None = None) -> None:
    """The migration precheck: raise ``ConflictError`` (field ``to``) with every reason
    ``where`` gives for ``destination``; nothing has changed yet."""
    with controller.store.session() as session:
        row = session.get(VmRow, vm)
        source = row.host if row else None
    live = _live_reports(controller, {destination} | ({source} if source else set()))
    cluster = snapshot(controller, skip_migration=migration_id, live=live)
    if vm not in cluster.vms:
        raise NotFoundError("vm", f"no placed VM named {vm!r}")
    if destination not in cluster.hosts:
        raise NotFoundError("to", f"unknown host {destination!r}")
    verdict = cluster.verdict(vm, destination)
    if not verdict.ok:
        raise ConflictError("to", f"{vm} cannot go to {destination}: {refusal(verdict)}",
                            vm=vm, reasons=[{"code": r.code.value, "message": r.message}
                                            for r in verdict.reasons])


def refuse_create(controller: Controller, body: VmCreate, vlan: int,
                  profile: PortProfile | None) -> VmPolicy:
    """A new VM's policy (its ``max_downtime_ms`` folded in), checked against the inventory,
    and ``body.host`` checked as ``where`` would: raises ``ConflictError`` with every reason."""
    policy = body.policy or VmPolicy()
    if body.max_downtime_ms is not None:
        if policy.max_downtime_ms not in (None, body.max_downtime_ms):
            raise ConflictError("max_downtime_ms", "differs from policy.max_downtime_ms")
        policy = policy.model_copy(update={"max_downtime_ms": body.max_downtime_ms})
    check_policy_hosts(controller.topology(), policy)
    cluster = snapshot(controller, live=_live_reports(controller, {body.host}))
    if body.name in cluster.vms or body.host not in cluster.hosts:
        return policy      # the controller's own checks name these
    cluster.vms[body.name] = VmFacts(body.name, "", body.memory_mib, (vlan,), policy,
                                     profile_needs(profile), body.workload_mibps)
    verdict = cluster.verdict(body.name, body.host)
    # A new VM comes from no host: the QEMU and migration-link checks do not apply to it.
    reasons = [r for r in verdict.reasons if r.code not in (Code.DOWNTIME,)]
    if reasons:
        verdict = Verdict(body.host, False, reasons)
        # Memory beyond what the asked-for host has left is bad input in memory_mib.
        field = "memory_mib" if all(r.code is Code.CAPACITY for r in reasons) else "host"
        raise ConflictError(field, f"{body.name} cannot run on {body.host}: "
                            f"{refusal(verdict)}", reasons=[
                                {"code": r.code.value, "message": r.message} for r in reasons])
    return policy


class Placement:
    """What operators ask of placement through the API."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def where(self, vm: str) -> WhereOut:
        cluster = snapshot(self.controller)
        facts = cluster.vms.get(vm)
        if facts is None:
            raise NotFoundError("name", f"no placed VM named {vm!r}")
        return WhereOut(vm=vm, host=facts.host, policy=facts.policy,
                        hosts=[verdict_out(cluster, v) for v in cluster.where(vm)],
                        crossings=crossings(self.controller.topology(), vm, facts.host,
                                            facts.vlans, self.controller.store))

    def policy(self, vm: str) -> VmPolicy:
        with self.controller.store.session() as session:
            row = session.get(VmRow, vm)
            if row is None:
                raise NotFoundError("name", f"no VM named {vm!r}")
            return policy_of(row)

    def set_policy(self, vm: str, data: Any, actor: Principal) -> VmPolicy:
        """Replace the VM's policy (validated, hosts checked against the inventory). A policy
        its current host breaks is stored and reported: the VM is not moved by itself."""
        try:
            policy = VmPolicy.model_validate(data)
        except ValidationError as exc:
            raise input_error_from(exc, "policy") from exc
        check_policy_hosts(self.controller.topology(), policy)
        lock = self.controller.vm_lock(vm)
        if not lock.acquire(blocking=False):
            raise ConflictError("name", f"VM {vm!r} is being changed right now")
        try:
            with self.controller.store.session() as session:
                row = session.get(VmRow, vm)
                if row is None:
                    raise NotFoundError("name", f"no VM named {vm!r}")
                row.policy = policy.model_dump(mode="json")
                row.max_downtime_ms = policy.max_downtime_ms
        finally:
            lock.release()
        events.record(self.controller.store, actor.name, "vm.policy", vm, "ok",
                      policy=policy.model_dump(mode="json"))
        return policy

    def balance_plan(self, max_moves: int) -> tuple[Cluster, BalanceOut]:
        if not 1 <= max_moves <= MAX_BALANCE_MOVES:
            raise ConflictError("max_moves", f"must be 1-{MAX_BALANCE_MOVES}")
        cluster = snapshot(self.controller)
        plan = plan_balance(cluster, max_moves)
        return cluster, BalanceOut(
            dry_run=True, max_moves=max_moves, load_before=plan.load_before,
            load_after=plan.load_after, memory_before=plan.memory_before,
            memory_after=plan.memory_after, cpu_before=plan.cpu_before, cpu_after=plan.cpu_after,
            moves=[MoveOut(vm=m.vm, source=m.source, destination=m.destination,
                           memory_mib=m.memory_mib) for m in plan.moves])


def check_policy_hosts(topology: Topology, policy: VmPolicy) -> None:
    """Hosts a policy names must exist; its zone must be one some host carries."""
    known = {h.name for h in topology.hosts}
    for field in ("allowed_hosts", "forbidden_hosts"):
        names: list[str] = getattr(policy, field) or []
        unknown = sorted(set(names) - known)
        if unknown:
            raise NotFoundError(f"policy.{field}", f"unknown hosts {unknown}")
    zones = {h.zone for h in topology.hosts if h.zone}
    if policy.zone is not None and policy.zone not in zones:
        raise NotFoundError("policy.zone", f"no host is in zone {policy.zone!r} "
                            f"(zones: {sorted(zones)})")


__all__ = ["Placement", "check_policy_hosts", "host_state", "policy_of", "refuse_move",
           "snapshot"]
