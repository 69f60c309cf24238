"""The controller's HTTP API. Each route checks the caller's role, then asks the service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from vmferry.agent.models import HostReport
from vmferry.controller import audit, auth, events, profiles
from vmferry.controller.auth import Role
from vmferry.controller.deps import Caller
from vmferry.controller.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vmferry.controller.metrics import Metrics
from vmferry.controller.migration import Migrations
from vmferry.controller.models import (
    EventOut,
    HostOut,
    MigrationCreate,
    TokenCreate,
    TrunkOut,
    VmCreate,
    VmOut,
)
from vmferry.controller.service import Controller
from vmferry.controller.stream import MEDIA_TYPE as SSE_MEDIA_TYPE
from vmferry.controller.stream import EventHub
from vmferry.errors import AuthError, ForbiddenError
from vmferry.model.topology import Topology
from vmferry.web import install_error_handlers

# Store ids are 64-bit: larger numbers are refused as input, not overflowed in the database.
MAX_ID = 2**63 - 1
MigrationId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


def create_app(controller: Controller, migrations: Migrations | None = None) -> FastAPI:
    app = FastAPI(title="vmferry controller", version="1",
                  description="Live-migrate VMs and carry their network with them.")
    install_error_handlers(app)
    store = controller.store
    migrations = migrations or Migrations(controller)
    app.state.migrations = migrations
    app.state.controller = controller
    port_profiles = profiles.Profiles(controller)
    app.include_router(profiles.router(port_profiles))
    metrics = app.state.metrics = Metrics(store)
    hub = app.state.event_hub = EventHub(store)
    migrations.listeners.extend([metrics.on_migration, hub.publish_migration])

    @app.exception_handler(AuthError)
    async def _refused(request: Request, exc: AuthError) -> JSONResponse:
        """Every refusal is in the audit log: who tried what, and why not."""
        outcome = "forbidden" if isinstance(exc, ForbiddenError) else "unauthorized"
        events.record(store, str(exc.fields.get("actor", "anonymous")),
                      f"{request.method} {request.url.path}", request.url.path, outcome,
                      reason=exc.message)
        return JSONResponse(status_code=exc.http_status, content={"detail": exc.to_dict()})

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        """The web dashboard: a static page that reads this API with the user's token."""
        return FileResponse(Path(__file__).with_name("static") / "index.html",
                            media_type="text/html")

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/whoami")
    def whoami(caller: Caller) -> dict[str, str]:
        """The caller's name and role: the dashboard offers only the actions the role may do."""
        return {"name": caller.name, "role": caller.role.value}

    # ---- inventory and hosts ----------------------------------------------------------------

    @app.put("/v1/inventory")
    def set_inventory(body: Topology, caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.ADMIN, "load the inventory")
        controller.set_inventory(body, caller)
        return {"status": "ok", "hosts": [h.name for h in body.hosts]}

    @app.get("/v1/inventory")
    def get_inventory(caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.READ, "read the inventory")
        return controller.topology().model_dump(mode="json")

    @app.get("/v1/hosts", response_model=list[HostOut])
    def hosts(caller: Caller) -> list[HostOut]:
        auth.require(caller, auth.READ, "list hosts")
        return controller.hosts()

    @app.post("/v1/agents/{host}/heartbeat", status_code=204)
    def heartbeat(host: str, body: HostReport, caller: Caller) -> Response:
        if caller.role is not Role.AGENT or caller.host != host or body.host != host:
            raise ForbiddenError(f"{caller.name} may only report for its own host",
                                 actor=caller.name)
        controller.heartbeat(host, body)
        metrics.on_heartbeat(host)
        return Response(status_code=204)

    # ---- VMs --------------------------------------------------------------------------------

    @app.get("/v1/vms", response_model=list[VmOut])
    def vms(caller: Caller) -> list[VmOut]:
        auth.require(caller, auth.READ, "list VMs")
        return controller.vms()

    @app.post("/v1/vms", response_model=VmOut, status_code=201)
    def create_vm(body: VmCreate, caller: Caller) -> VmOut:
        auth.require(caller, auth.SERVERS, "create VMs")
        profile = port_profiles.for_new_vm(body)
        out = controller.create_vm(
            body, caller, profile_vlan=profile.fabric_vlans[0] if profile else None,
            profile_spec=profile.model_dump(mode="json") if profile else None)
        if profile:
            port_profiles.record_created(out.name, out.host, profile)
        return out

    @app.get("/v1/vms/{name}", response_model=VmOut)
    def vm(name: str, caller: Caller, runtime: bool = Query(False)) -> VmOut:
        auth.require(caller, auth.READ, "read VMs")
        return controller.vm(name, runtime=runtime)

    @app.delete("/v1/vms/{name}", status_code=204)
    def delete_vm(name: str, caller: Caller) -> Response:
        auth.require(caller, auth.SERVERS, "delete VMs")
        controller.delete_vm(name, caller)
        port_profiles.forget_port(name)
        return Response(status_code=204)

    # ---- migrations -------------------------------------------------------------------------

    @app.post("/v1/migrations", status_code=202)
    def migrate(body: MigrationCreate, caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.SERVERS, "migrate VMs")
        options = body.model_dump(exclude={"vm", "to"}, exclude_none=True)
        return migrations.start(body.vm, body.to, options, caller)

    @app.get("/v1/migrations")
    def list_migrations(caller: Caller, limit: int = Query(100, ge=1, le=10_000),
                        ) -> list[dict[str, Any]]:
        auth.require(caller, auth.READ, "list migrations")
        return migrations.recent(limit)

    @app.get("/v1/migrations/{migration_id}")
    def get_migration(migration_id: MigrationId, caller: Caller,
                      wait: float = Query(0, ge=0, le=600)) -> dict[str, Any]:
        auth.require(caller, auth.READ, "read migrations")
        if wait:
            return migrations.wait(migration_id, wait)
        return migrations.get(migration_id)

    @app.post("/v1/migrations/{migration_id}/cancel", status_code=202)
    def cancel_migration(migration_id: MigrationId, caller: Caller) -> dict[str, Any]:
        auth.require(caller, auth.SERVERS, "cancel migrations")
        return migrations.cancel(migration_id, caller)

    # ---- audit ------------------------------------------------------------------------------

    @app.get("/v1/audit")
    def run_audit(caller: Caller) -> list[dict[str, Any]]:
        auth.require(caller, auth.READ, "audit")
        findings = audit.audit(controller)
        metrics.on_audit(f.kind for f in findings)
        return audit.as_dicts(findings)

    @app.post("/v1/audit/fix")
    def fix_audit(caller: Caller) -> list[dict[str, Any]]:
        auth.require(caller, auth.ADMIN, "remove leftovers")
        remaining = audit.fix(controller, audit.audit(controller))
        events.record(store, caller.name, "audit.fix", "site", "ok" if not remaining else
                      "incomplete", remaining=len(remaining))
        return audit.as_dicts(remaining)

    # ---- fabric -----------------------------------------------------------------------------

    @app.get("/v1/fabric", response_model=list[TrunkOut])
    def fabric(caller: Caller) -> list[TrunkOut]:
        auth.require(caller, auth.READ, "read the fabric")
        return controller.fabric_state()

    @app.post("/v1/fabric/reconcile")
    def reconcile(caller: Caller) -> dict[str, list[int]]:
        auth.require(caller, auth.NETWORK, "reconcile the fabric")
        return controller.reconcile_fabric()

    # ---- tokens and events ------------------------------------------------------------------

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenCreate, caller: Caller) -> dict[str, str]:
        auth.require(caller, auth.ADMIN, "create tokens")
        token = auth.create_token(store, body.name, body.role, expires_in_s=body.expires_in_s)
        events.record(store, caller.name, "token.create", body.name, "ok", role=body.role)
        return {"name": body.name, "role": body.role, "token": token}

    @app.get("/v1/tokens")
    def tokens(caller: Caller) -> list[dict[str, object]]:
        auth.require(caller, auth.ADMIN, "list tokens")
        return auth.list_tokens(store)

    @app.delete("/v1/tokens/{name}", status_code=204)
    def revoke(name: str, caller: Caller) -> Response:
        auth.require(caller, auth.ADMIN, "revoke tokens")
        auth.revoke_token(store, name)
        events.record(store, caller.name, "token.revoke", name, "ok")
        return Response(status_code=204)

    @app.get("/v1/events", response_model=list[EventOut])
    def list_events(caller: Caller, limit: int = Query(100, ge=1, le=10_000),
                    after: int = Query(0, ge=0, le=MAX_ID)) -> list[EventOut]:
        auth.require(caller, auth.READ, "read events")
        return [EventOut(id=e.id, at=e.at.isoformat(), actor=e.actor, action=e.action,
                         target=e.target, outcome=e.outcome, detail=e.detail)
                for e in events.recent(store, limit, after)]

    # ---- watching: metrics and the live event stream ---------------------------------------

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {METRICS_CONTENT_TYPE: {}}}})
    def prometheus_metrics(caller: Caller) -> Response:
        auth.require(caller, auth.READ, "read metrics")
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/events/stream", response_class=StreamingResponse,
             responses={200: {"content": {SSE_MEDIA_TYPE: {}}}})
    def stream_events(request: Request, caller: Caller,
                      after: int | None = Query(None, ge=0, le=MAX_ID, description=
                                                "audit events after this id (default: new ones; "
                                                "a Last-Event-ID header wins)"),
                      limit: int | None = Query(None, ge=1, le=100_000, description=
                                                "close the stream after this many events"),
                      ) -> StreamingResponse:
        auth.require(caller, auth.READ, "read events")
        last = request.headers.get("last-event-id", "")
        start = int(last) if last.isdigit() else after if after is not None \
            else hub.latest_event_id()
        return StreamingResponse(
            hub.stream(request.is_disconnected, after=start, limit=limit),
            media_type=SSE_MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
