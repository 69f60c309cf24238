"""Guests and their migrations."""

from __future__ import annotations

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from vmferry.agent.checks import check_destination, check_tap_free
from vmferry.agent.service import HostAgent
from vmferry.api.agent import (
    MAX_EVENTS_WAIT_S,
    Accepted,
    AuxNic,
    GuestEvent,
    GuestInfo,
    GuestRequest,
    MemcheckVerdict,
    MigrateRequest,
    MigrationProgress,
    MigrationResume,
    RecoveryListening,
)
from vmferry.errors import InputError
from vmferry.web import ConcurrencyCap

MAX_EVENT_WAITS = 64     # long polls at once (one per running migration and side)


# size: one short nested function per guest route; the router is their list, not logic
def router(agent: HostAgent) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/guests", response_model=list[GuestInfo])
    def guests() -> list[GuestInfo]:
        return agent.guests()

    @api.put("/v1/guests/{name}", response_model=GuestInfo)
    def create_guest(name: str, body: GuestRequest) -> GuestInfo:
        if body.name != name:
            raise InputError("name", "does not match the URL")
        check_tap_free(agent, name)
        return agent.create_guest(body)

    @api.get("/v1/guests/{name}", response_model=GuestInfo)
    def guest(name: str) -> GuestInfo:
        return agent.guest(name)

    @api.delete("/v1/guests/{name}", status_code=204)
    def delete_guest(name: str) -> None:
        agent.delete_guest(name)

    @api.put("/v1/guests/{name}/second-nic", response_model=GuestInfo)
    def plug_nic(name: str, body: AuxNic) -> GuestInfo:
        return agent.plug_nic(name, body)

    @api.delete("/v1/guests/{name}/second-nic", response_model=GuestInfo)
    def unplug_nic(name: str) -> GuestInfo:
        return agent.unplug_nic(name)

    @api.post("/v1/guests/{name}/resume", status_code=202, response_model=Accepted)
    def resume(name: str) -> Accepted:
        agent.resume(name)
        return Accepted(status="running")

    @api.post("/v1/guests/{name}/announce", status_code=202, response_model=Accepted)
    def announce(name: str) -> Accepted:
        agent.announce(name)
        return Accepted(status="announced")

    @api.post("/v1/guests/{name}/migrate", status_code=202, response_model=Accepted)
    def migrate(name: str, body: MigrateRequest) -> Accepted:
        check_destination(agent, body.uri)
        agent.migrate(name, body)
        return Accepted(status="started")

    @api.get("/v1/guests/{name}/memcheck", response_model=MemcheckVerdict)
    def memcheck(name: str) -> MemcheckVerdict:
        return agent.memcheck(name)

    @api.get("/v1/guests/{name}/migration", response_model=MigrationProgress)
    def migration(name: str) -> MigrationProgress:
        return agent.migration_progress(name)

    @api.post("/v1/guests/{name}/migration/cancel", status_code=202, response_model=Accepted)
    def cancel(name: str) -> Accepted:
        agent.cancel_migration(name)
        return Accepted(status="cancelling")

    @api.post("/v1/guests/{name}/migration/postcopy", status_code=202, response_model=Accepted)
    def postcopy(name: str) -> Accepted:
        agent.start_postcopy(name)
        return Accepted(status="postcopy")

    @api.post("/v1/guests/{name}/migration/continue", status_code=202, response_model=Accepted)
    def continue_migration(name: str) -> Accepted:
        agent.continue_migration(name)
        return Accepted(status="continuing")

    @api.post("/v1/guests/{name}/migration/pause", status_code=202, response_model=Accepted)
    def pause_migration(name: str) -> Accepted:
        agent.pause_migration(name)
        return Accepted(status="pausing")

    @api.post("/v1/guests/{name}/migration/recover", response_model=RecoveryListening)
    def recover_incoming(name: str) -> RecoveryListening:
        return RecoveryListening(uri=agent.recover_incoming(name))

    @api.post("/v1/guests/{name}/migration/resume", status_code=202, response_model=Accepted)
    def resume_migration(name: str, body: MigrationResume) -> Accepted:
        check_destination(agent, body.uri)
        agent.resume_migration(name, body.uri)
        return Accepted(status="resuming")

    # Long polls wait on threads of their own, a bounded number (429 beyond): the other
    # routes keep the default pool.
    waits = ConcurrencyCap("wait", per_key=MAX_EVENT_WAITS, total=MAX_EVENT_WAITS)
    wait_threads = anyio.CapacityLimiter(MAX_EVENT_WAITS)

    @api.get("/v1/guests/{name}/events", response_model=list[GuestEvent])
    async def events(name: str, after: int = Query(0, ge=0, le=2**63 - 1),
                     wait: float = Query(0.0, ge=0.0, le=MAX_EVENTS_WAIT_S),
                     ) -> list[GuestEvent]:
        """QMP events of the guest after ``after``, oldest first; a long poll of up to
        ``wait`` seconds when there is none yet."""
        if not wait:
            return await run_in_threadpool(agent.events, name, after, 0.0)
        waits.acquire("controller")     # only the controller's certificate reaches here
        try:
            return await anyio.to_thread.run_sync(agent.events, name, after, wait,
                                                  limiter=wait_threads)
        finally:
            waits.release("controller")

    return api
