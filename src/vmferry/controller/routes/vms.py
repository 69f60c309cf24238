"""VMs and their migrations."""

from __future__ import annotations

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from vmferry.api.controller import MigrationCreate, MigrationRecord, VmCreate, VmOut
from vmferry.api.links import (
    OP_CANCEL_MIGRATION,
    OP_CREATE_VM,
    OP_GET_MIGRATION,
    OP_MIGRATE,
    OP_WHERE,
    link,
    links,
)
from vmferry.controller import auth, profiles
from vmferry.controller.deps import Caller
from vmferry.controller.migration import Migrations
from vmferry.controller.routes import MigrationId
from vmferry.controller.service import Controller
from vmferry.web import ConcurrencyCap

MAX_WAITS = 32               # long waits at once, all callers
MAX_WAITS_PER_CALLER = 4


def router(controller: Controller, migrations: Migrations,
           port_profiles: profiles.Profiles) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/vms", response_model=list[VmOut])
    def vms(caller: Caller) -> list[VmOut]:
        auth.require(caller, auth.READ, "list VMs")
        return controller.vms()

    @api.post("/v1/vms", response_model=VmOut, status_code=201, operation_id=OP_CREATE_VM,
              responses=links(201, WhereMayItGo=link(
                  OP_WHERE, "the hosts the new VM may move to",
                  parameters={"name": "$response.body#/name"})))
    def create_vm(body: VmCreate, caller: Caller) -> VmOut:
        auth.require(caller, auth.SERVERS, "create VMs")
        profile = port_profiles.for_new_vm(body)
        out = controller.create_vm(body, caller, profile=profile)
        if profile:
            port_profiles.record_created(out.name, out.host, profile)
        return out

    @api.get("/v1/vms/{name}", response_model=VmOut)
    def vm(name: str, caller: Caller, runtime: bool = Query(False)) -> VmOut:
        auth.require(caller, auth.READ, "read VMs")
        return controller.vm(name, runtime=runtime)

    @api.delete("/v1/vms/{name}", status_code=204)
    def delete_vm(name: str, caller: Caller) -> Response:
        auth.require(caller, auth.SERVERS, "delete VMs")
        controller.delete_vm(name, caller)
        port_profiles.forget_port(name)
        return Response(status_code=204)

    @api.post("/v1/migrations", status_code=202, response_model=MigrationRecord,
              operation_id=OP_MIGRATE, responses=links(
                  202, WaitForIt=link(OP_GET_MIGRATION, "the migration, waited on",
                                      parameters={"migration_id": "$response.body#/id"}),
                  CancelIt=link(OP_CANCEL_MIGRATION, "cancel the migration",
                                parameters={"migration_id": "$response.body#/id"})))
    def migrate(body: MigrationCreate, caller: Caller) -> MigrationRecord:
        auth.require(caller, auth.SERVERS, "migrate VMs")
        return migrations.start(body.vm, body.to, body.options(), caller)

    @api.get("/v1/migrations", response_model=list[MigrationRecord])
    def list_migrations(caller: Caller, limit: int = Query(100, ge=1, le=10_000),
                        ) -> list[MigrationRecord]:
        auth.require(caller, auth.READ, "list migrations")
        return migrations.recent(limit)

    # Long waits run on threads of their own (never the pool heartbeats and every other
    # route use), a bounded number of them, and only a few per caller (429 beyond).
    waits = ConcurrencyCap("wait", per_key=MAX_WAITS_PER_CALLER, total=MAX_WAITS)
    wait_threads = anyio.CapacityLimiter(MAX_WAITS)

    @api.get("/v1/migrations/{migration_id}", response_model=MigrationRecord,
             operation_id=OP_GET_MIGRATION)
    async def get_migration(migration_id: MigrationId, caller: Caller,
                            wait: float = Query(0, ge=0, le=600)) -> MigrationRecord:
        auth.require(caller, auth.READ, "read migrations")
        if not wait:
            return await run_in_threadpool(migrations.get, migration_id)
        waits.acquire(caller.name)
        try:
            return await anyio.to_thread.run_sync(migrations.wait, migration_id, wait,
                                                  limiter=wait_threads)
        finally:
            waits.release(caller.name)

    @api.post("/v1/migrations/{migration_id}/cancel", status_code=202,
              response_model=MigrationRecord, operation_id=OP_CANCEL_MIGRATION)
    def cancel_migration(migration_id: MigrationId, caller: Caller) -> MigrationRecord:
        auth.require(caller, auth.SERVERS, "cancel migrations")
        return migrations.cancel(migration_id, caller)

    return api
