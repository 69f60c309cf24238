"""Port profiles in the controller: stored, versioned, pushed live to every port that uses them.

Every change of a profile's content bumps its version; applying an identical profile changes
nothing. After a change the new version is pushed to the VMs' ports, one agent call per host
for all its ports (``PUT /v1/port-profiles``, realized together there), hosts side by side
(at most ``PUSH_PARALLEL_HOSTS`` at a time); one VM switching profile goes through
``PUT /v1/ports/{vm}/profile``. The outcome is recorded per port (``PortRealizationRow``): a
port whose host fails keeps the version it had, with the error.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import select

from vmferry.api.controller import (
    PortRealizationOut,
    PortView,
    ProfileApplied,
    ProfileDetail,
    ProfileOut,
    VmCreate,
    VmProfileBody,
)
from vmferry.controller import auth, events
from vmferry.controller.auth import Principal
from vmferry.controller.deps import Caller
from vmferry.controller.service import PLACED_STATES, Controller
from vmferry.errors import ConflictError, InputError, NotFoundError, VmferryError
from vmferry.model.profile import PortProfile, parse_profile, parse_profiles
from vmferry.store.db import Store
from vmferry.store.profile_schema import PortRealizationRow, ProfileRow
from vmferry.store.schema import VmRow

log = logging.getLogger(__name__)

PUSH_PARALLEL_HOSTS = 8


def _profile(row: ProfileRow) -> PortProfile:
    return PortProfile.model_validate({**row.spec, "name": row.name, "version": row.version})


def stored_profile(store: Store, name: str | None) -> PortProfile | None:
    """The stored profile ``name`` as a guest request carries it (None for no profile)."""
    if name is None:
        return None
    with store.session() as session:
        row = session.get(ProfileRow, name)
        if row is None:
            raise NotFoundError("profile", f"no profile named {name!r}")
        return _profile(row)


class Profiles:
    """Profile CRUD and live pushes. Raises ``InputError`` and its subclasses."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.store = controller.store

    # ---- reading ----------------------------------------------------------------------------

    def get(self, name: str) -> PortProfile:
        with self.store.session() as session:
            row = session.get(ProfileRow, name)
            if row is None:
                raise NotFoundError("name", f"no profile named {name!r}")
            return _profile(row)

    def all(self) -> list[dict[str, Any]]:
        with self.store.session() as session:
            used: dict[str, list[str]] = {}
            for vm in session.scalars(select(VmRow)):
                if vm.profile:
                    used.setdefault(vm.profile, []).append(vm.name)
            return [{**_profile(row).model_dump(mode="json"), "vms": sorted(used.get(row.name, []))}
                    for row in session.scalars(select(ProfileRow).order_by(ProfileRow.name))]

    def show(self, name: str) -> dict[str, Any]:
        profile = self.get(name)
        with self.store.session() as session:
            ports = [_port_out(r) for r in session.scalars(
                select(PortRealizationRow).where(PortRealizationRow.profile == name)
                .order_by(PortRealizationRow.vm))]
            vms = sorted(v.name for v in session.scalars(select(VmRow)) if v.profile == name)
        return {**profile.model_dump(mode="json"), "vms": vms, "ports": ports}

    # ---- writing ----------------------------------------------------------------------------

    def create(self, data: Any, actor: Principal) -> dict[str, Any]:
        """Create a new profile; a name clash is a ``ConflictError``."""
        profile = parse_profile(data)
        with self.store.session() as session:
            if session.get(ProfileRow, profile.name) is not None:
                raise ConflictError("name", f"a profile named {profile.name!r} exists")
        return self.apply([profile.model_dump(mode="json")], actor)[0]

    def apply(self, items: Any, actor: Principal) -> list[dict[str, Any]]:
        """Create or update each profile (all validated first: bad input changes nothing),
        then push every changed one to the ports using it."""
        profiles = parse_profiles(items)
        results = []
        for profile in profiles:
            changed, version = self._store(profile)
            stored = profile.model_copy(update={"version": version})
            ports = self.push(stored) if changed else []
            events.record(self.store, actor.name, "profile.apply", profile.name,
                          "ok" if all(p["ok"] for p in ports) else "partial",
                          version=version, changed=changed)
            results.append({"name": profile.name, "version": version, "changed": changed,
                            "ports": ports})
        return results

    def _store(self, profile: PortProfile) -> tuple[bool, int]:
        with self.store.session() as session:
            row = session.get(ProfileRow, profile.name, with_for_update=True)
            if row is None:
                session.add(ProfileRow(name=profile.name, version=1, spec=profile.spec()))
                return True, 1
            if row.spec == profile.spec():
                return False, row.version
            row.spec = profile.spec()
            row.version += 1
            row.updated_at = datetime.now(UTC)
            return True, row.version

    def delete(self, name: str, actor: Principal) -> None:
        with self.store.session() as session:
            row = session.get(ProfileRow, name)
            if row is None:
                raise NotFoundError("name", f"no profile named {name!r}")
            users = sorted(v.name for v in session.scalars(select(VmRow)) if v.profile == name)
            if users:
                raise ConflictError("name", f"profile {name!r} is used by VMs {users}",
                                    vms=users)
            session.delete(row)
        events.record(self.store, actor.name, "profile.delete", name, "ok")

    # ---- pushing to ports -------------------------------------------------------------------

    def push(self, profile: PortProfile) -> list[dict[str, Any]]:
        """Realize ``profile`` on every VM using it; one result per port, failures included."""
        with self.store.session() as session:
            vms = [(v.name, v.host, v.vlan) for v in session.scalars(
                select(VmRow).where(VmRow.profile == profile.name))
                if v.state in PLACED_STATES]
        vlan = profile.fabric_vlans[0]
        moved = [name for name, _, old in vms if old != vlan]
        if moved:
            self._set_vlan(moved, vlan)
            self.controller.reconcile_fabric()
        by_host: dict[str, list[str]] = {}
        for name, host, _ in vms:
            by_host.setdefault(host, []).append(name)
        if not by_host:
            return []
        with ThreadPoolExecutor(max_workers=min(PUSH_PARALLEL_HOSTS, len(by_host)),
                                thread_name_prefix="profile-push") as pool:
            pushed = {host: pool.submit(self._push_host, host, names, profile)
                      for host, names in by_host.items()}
        errors = {vm: error for future in pushed.values() for vm, error in future.result().items()}
        return [self._record(name, host, profile, errors[name]) for name, host, _ in vms]

    def _push_host(self, host: str, vms: list[str], profile: PortProfile
                   ) -> dict[str, str | None]:
        """Realize ``profile`` on the ports of ``vms`` on ``host`` in one agent call; the
        error of each port (None: realized). Never raises: a host failing fails its ports."""
        try:
            answer = self.controller.agent(host).set_port_profiles(vms, profile)
            ports = {port.vm: port for port in answer}
            errors = {vm: (None if ports[vm].ok else
                           f"agent on {host}: {ports[vm].error}") for vm in vms}
        except VmferryError as exc:
            errors = dict.fromkeys(vms, exc.message)
        except KeyError as exc:
            errors = dict.fromkeys(vms, f"agent on {host}: unexpected answer ({exc!r})")
        for vm, error in errors.items():
            if error is not None:
                log.warning("profile %s v%s on %s/%s failed: %s", profile.name,
                            profile.version, host, vm, error)
        return errors

    def push_port(self, vm: str, host: str, profile: PortProfile) -> dict[str, Any]:
        """Realize ``profile`` on one VM's port and record the outcome."""
        error: str | None = None
        try:
            self.controller.agent(host).set_port_profile(vm, profile)
        except VmferryError as exc:
            error = exc.message
            log.warning("profile %s v%s on %s/%s failed: %s", profile.name, profile.version,
                        host, vm, error)
        return self._record(vm, host, profile, error)

    def _record(self, vm: str, host: str, profile: PortProfile,
                error: str | None) -> dict[str, Any]:
        """Record the outcome of realizing ``profile`` on a VM's port."""
        with self.store.session() as session:
            row = session.get(PortRealizationRow, vm)
            if row is None:
                row = PortRealizationRow(vm=vm, host=host, profile=profile.name, version=None,
                                         wanted=profile.version or 0)
                session.add(row)
            elif row.profile != profile.name:
                row.version = None
            row.host, row.profile, row.wanted = host, profile.name, profile.version or 0
            row.ok, row.error = error is None, error
            if error is None:
                row.version = profile.version
            row.updated_at = datetime.now(UTC)
            return _port_out(row)

    def record_created(self, vm: str, host: str, profile: PortProfile) -> None:
        """A VM was created with ``profile`` realized on its port by the agent."""
        with self.store.session() as session:
            session.merge(PortRealizationRow(vm=vm, host=host, profile=profile.name,
                                             version=profile.version,
                                             wanted=profile.version or 0, ok=True, error=None,
                                             updated_at=datetime.now(UTC)))

    def forget_port(self, vm: str) -> None:
        with self.store.session() as session:
            row = session.get(PortRealizationRow, vm)
            if row is not None:
                session.delete(row)

    def _set_vlan(self, vms: list[str], vlan: int) -> None:
        with self.store.session() as session:
            for name in vms:
                row = session.get(VmRow, name)
                if row is not None:
                    row.vlan = vlan

    def set_vm_profile(self, vm: str, name: str, actor: Principal) -> dict[str, Any]:
        """Switch a VM to another profile, live."""
        profile = self.get(name)
        vlan = profile.fabric_vlans[0]
        with self.store.session() as session:
            row = session.get(VmRow, vm)
            if row is None:
                raise NotFoundError("vm", f"no VM named {vm!r}")
            if row.state not in ("running",):
                raise ConflictError("vm", f"VM {vm!r} is {row.state}")
            host, ip, old_vlan, old_profile = row.host, row.ip, row.vlan, row.profile
        if vlan != old_vlan:
            self.controller._check_vlan_and_ip(self.controller.topology(), vlan, ip)
        with self.store.session() as session:
            row = session.get(VmRow, vm)
            assert row is not None
            row.profile, row.vlan = name, vlan
        if vlan != old_vlan:
            self.controller.reconcile_fabric()
        result = self.push_port(vm, host, profile)
        if not result["ok"]:
            with self.store.session() as session:
                row = session.get(VmRow, vm)
                if row is not None:
                    row.profile, row.vlan = old_profile, old_vlan
            if vlan != old_vlan:
                self.controller.reconcile_fabric()
        events.record(self.store, actor.name, "vm.set-profile", vm,
                      "ok" if result["ok"] else "failed", profile=name,
                      version=profile.version, error=result["error"])
        return result

    def port(self, vm: str) -> dict[str, Any]:
        """The VM's port as its host sees it (desired vs actual) and the realized version."""
        out = self.controller.vm(vm)
        status = self.controller.agent(out.host).port_status(vm).model_dump(mode="json")
        with self.store.session() as session:
            row = session.get(PortRealizationRow, vm)
            realized = _port_out(row) if row is not None else None
        latest = None
        if out.profile:
            try:
                latest = self.get(out.profile).version
            except NotFoundError:
                latest = None
        return {"vm": vm, "host": out.host, "profile": out.profile, "latest_version": latest,
                "realized": realized, **status}

    def for_new_vm(self, body: VmCreate) -> PortProfile | None:
        """The profile a VM is created with; refuses a VLAN that contradicts it."""
        if body.profile is None:
            return None
        try:
            profile = self.get(body.profile)
        except NotFoundError as exc:
            raise NotFoundError("profile", exc.reason) from exc
        if body.vlan is not None and body.vlan not in profile.fabric_vlans:
            raise InputError("vlan", f"profile {profile.name!r} puts the VM on VLAN "
                             f"{profile.fabric_vlans[0]}; leave --vlan out")
        return profile


def _port_out(row: PortRealizationRow) -> dict[str, Any]:
    return {"vm": row.vm, "host": row.host, "profile": row.profile, "version": row.version,
            "wanted": row.wanted, "ok": row.ok, "error": row.error}


# ---- HTTP -------------------------------------------------------------------------------------

def router(profiles: Profiles) -> APIRouter:
    """Routes: /v1/profiles, /v1/vms/{name}/profile, /v1/ports/{vm}."""
    api = APIRouter()

    @api.get("/v1/profiles", response_model=list[ProfileOut])
    def list_profiles(caller: Caller) -> list[dict[str, Any]]:
        auth.require(caller, auth.READ, "list profiles")
        return profiles.all()

    @api.get("/v1/profiles/{name}", response_model=ProfileDetail)
    def show_profile(name: str, caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.READ, "read profiles")
        return profiles.show(name)

    @api.post("/v1/profiles", status_code=201, response_model=ProfileApplied)
    def create_profile(body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.NETWORK, "create profiles")
        return profiles.create(body, caller)

    @api.put("/v1/profiles", response_model=list[ProfileApplied])
    def apply_profiles(body: dict[str, Any], caller: Caller) -> list[dict[str, Any]]:
        auth.require(caller, auth.NETWORK, "change profiles")
        if set(body) != {"profiles"}:
            raise InputError("body", "give {\"profiles\": [...]}")
        return profiles.apply(body["profiles"], caller)

    @api.delete("/v1/profiles/{name}", status_code=204)
    def delete_profile(name: str, caller: Caller) -> Response:
        auth.require(caller, auth.NETWORK, "delete profiles")
        profiles.delete(name, caller)
        return Response(status_code=204)

    @api.put("/v1/vms/{name}/profile", response_model=PortRealizationOut)
    def set_vm_profile(name: str, body: VmProfileBody, caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.NETWORK, "change a VM's profile")
        return profiles.set_vm_profile(name, body.profile, caller)

    @api.get("/v1/ports/{vm}", response_model=PortView)
    def port(vm: str, caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.READ, "read ports")
        return profiles.port(vm)

    return api
