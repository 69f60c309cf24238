"""`vmferry audit`: what vmferry installed that no VM needs any more, on every host and switch.

What should exist is derived from the store (VMs and running migrations); what exists is read
back from the agents and switches; the findings are the difference."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import select

from vmferry.api.controller import FindingOut
from vmferry.controller import dual_nic, nat, route_way, switchover
from vmferry.controller.service import Controller
from vmferry.errors import VmferryError
from vmferry.model.migration import MigrationState
from vmferry.model.names import aux_tap_name, tap_name
from vmferry.model.switchover import migration_of
from vmferry.store.schema import MigrationRow, VmRow


@dataclass(frozen=True)
class Finding:
    kind: str        # qemu, port, tap, guest-record, trunk-vlan, switchover-flow,
    #                  switchover-pin, unreachable ...
    where: str       # host or switch (and port)
    what: str        # VM name or VLAN list
    detail: str


def expected_guests(controller: Controller) -> dict[str, set[str]]:
    """host -> VMs that may legitimately have something there right now."""
    expected: dict[str, set[str]] = {h.name: set() for h in controller.topology().hosts}
    with controller.store.session() as session:
        for vm in session.scalars(select(VmRow)):
            expected.setdefault(vm.host, set()).add(vm.name)
        for m in session.scalars(select(MigrationRow).where(MigrationRow.state.in_(
                [MigrationState.RUNNING.value, MigrationState.ROLLING_BACK.value]))):
            expected.setdefault(m.source, set()).add(m.vm)
            expected.setdefault(m.destination, set()).add(m.vm)
    return expected


def audit(controller: Controller) -> list[Finding]:
    findings: list[Finding] = []
    migrating = _migrating(controller)
    for host, wanted in expected_guests(controller).items():
        try:
            found = controller.agent(host).leftovers().model_dump()
        except VmferryError as exc:
            findings.append(Finding("unreachable", host, "-", exc.message))
            continue
        for kind, key in (("qemu", "guests"), ("port", "ports"), ("guest-record", "requests")):
            for vm in found.get(key, []):
                if vm not in wanted:
                    findings.append(Finding(kind, host, vm, f"{kind} of {vm} that no VM needs"))
        for vm in found.get("carried", []):
            if vm not in migrating:
                findings.append(Finding("conntrack-carry", host, vm,
                                        f"carried conntrack flows of {vm} after its migration"))
        # A second NIC's tap (dual NIC) only while its VM migrates.
        wanted_taps = {tap_name(vm) for vm in wanted} | \
            {aux_tap_name(vm) for vm in wanted & migrating}
        for tap in found.get("taps", []):
            if tap not in wanted_taps:
                findings.append(Finding("tap", host, tap, "tap that no VM needs"))
    for trunk in controller.fabric_state():
        for node, port, actual in ((trunk.a, trunk.a_port, trunk.actual_a),
                                   (trunk.b, trunk.b_port, trunk.actual_b)):
            if actual is None:
                findings.append(Finding("unreachable", f"{node}:{port}", "-",
                                        trunk.error or "cannot read"))
                continue
            extra = sorted(set(actual) - set(trunk.desired))
            if extra:
                findings.append(Finding("trunk-vlan", f"{node}:{port}", ",".join(map(str, extra)),
                                        "VLANs carried with no endpoint beyond"))
            missing = sorted(set(trunk.desired) - set(actual))
            if missing:
                findings.append(Finding("trunk-missing", f"{node}:{port}",
                                        ",".join(map(str, missing)),
                                        "VLANs needed but not carried"))
    findings.extend(switchover_leftovers(controller))
    try:
        findings += [Finding(*found) for found in route_way.leftovers(controller)]
    except VmferryError as exc:
        findings.append(Finding("unreachable", "routers", "-", exc.message))
    findings.extend(Finding(*found) for found in nat.leftovers(controller))
    findings.extend(Finding(*found) for found in dual_nic.leftovers(controller))
    return findings


def _migrating(controller: Controller) -> set[str]:
    """VMs with a migration running (their carry flows are in use)."""
    with controller.store.session() as session:
        return {m.vm for m in session.scalars(select(MigrationRow).where(MigrationRow.state.in_(
            [MigrationState.RUNNING.value, MigrationState.ROLLING_BACK.value])))}


def switchover_leftovers(controller: Controller) -> list[Finding]:
    """Temporary make-before-break rules of migrations that are no longer running, and MACs
    of VMs pinned on a switch with no migration of theirs running."""
    with controller.store.session() as session:
        running = list(session.scalars(select(MigrationRow).where(MigrationRow.state.in_(
            [MigrationState.RUNNING.value, MigrationState.ROLLING_BACK.value]))))
        macs = {vm.mac.lower(): vm.name for vm in session.scalars(select(VmRow))}
    live = {m.id for m in running}
    moving = {m.vm for m in running}
    findings: list[Finding] = []
    topology = controller.topology()
    fabric = controller.fabric_driver()
    for switch in topology.switches:
        try:
            for _, cookie in switchover.leftovers(fabric, [switch.name], live):
                findings.append(Finding("switchover-flow", switch.name, f"{cookie:#x}",
                                        f"make-before-break rules of migration "
                                        f"{migration_of(cookie)}"))
            for vlan, mac in sorted(fabric.pinned_macs(switch.name)):
                if macs.get(mac) is not None and macs[mac] not in moving:
                    findings.append(Finding("switchover-pin", switch.name, f"{vlan}/{mac}",
                                            f"MAC of {macs[mac]} pinned by a make-before-"
                                            "break window that ended"))
        except VmferryError as exc:
            findings.append(Finding("unreachable", switch.name, "-", exc.message))
    for host in topology.hosts:
        try:
            cookies = controller.agent(host.name).switchover_cookies()
        except VmferryError as exc:
            findings.append(Finding("unreachable", host.name, "-", exc.message))
            continue
        for cookie in cookies:
            if migration_of(cookie) not in live:
                findings.append(Finding("switchover-flow", host.name, f"{cookie:#x}",
                                        f"make-before-break rules of migration "
                                        f"{migration_of(cookie)}"))
    return findings


def fix(controller: Controller, findings: list[Finding]) -> list[Finding]:
    """Remove what the findings name; returns what is still found afterwards."""
    for host_vm in sorted({(f.where, f.what) for f in findings
                           if f.kind in ("qemu", "port", "guest-record")}):
        controller.agent(host_vm[0]).delete_guest(host_vm[1])
    for f in findings:
        if f.kind == "tap":
            # A tap with no guest record: deleting the guest by the tap's VM name is not
            # possible, so the agent removes the bare device.
            controller.agent(f.where).delete_tap(f.what)
    for f in findings:
        if f.kind == "conntrack-carry":
            controller.agent(f.where).drop_carried_conntrack(f.what)
    hosts = {h.name for h in controller.topology().hosts}
    for f in findings:
        if f.kind == "switchover-flow":
            if f.where in hosts:
                controller.agent(f.where).close_switchover(int(f.what, 0))
            else:
                fabric = controller.fabric_driver()
                fabric.replace_rules(f.where, int(f.what, 0), [])
        elif f.kind == "switchover-pin":
            vlan, mac = f.what.split("/", 1)
            controller.fabric_driver().unpin_mac(f.where, int(vlan), mac)
    if any(f.kind in ("host-route", "proxy-arp", "host-route-missing", "router-flow")
           for f in findings):
        route_way.reconcile(controller)
    for f in findings:
        if f.kind.startswith("nat-"):
            nat.fix(controller, f.kind, f.where, f.what)
        dual_nic.fix(controller, f.kind, f.what)
    if any(f.kind.startswith("trunk") for f in findings):
        controller.reconcile_fabric()
    return audit(controller)


def as_out(findings: list[Finding]) -> list[FindingOut]:
    return [FindingOut(**asdict(f)) for f in findings]
