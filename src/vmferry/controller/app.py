"""The controller's HTTP API, assembled from its routers (``vmferry.controller.routes``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from vmferry.api.errors import ERROR_RESPONSES
from vmferry.controller import profiles
from vmferry.controller.auth import RefusalLog
from vmferry.controller.metrics import Metrics
from vmferry.controller.migration import Migrations
from vmferry.controller.routes import admin, inventory, placement, vms, watch
from vmferry.controller.service import Controller
from vmferry.controller.stream import EventHub
from vmferry.errors import AuthError, ForbiddenError
from vmferry.web import install_error_handlers


def create_app(controller: Controller, migrations: Migrations | None = None) -> FastAPI:
    app = FastAPI(title="vmferry controller", version="1",
                  description="Live-migrate VMs and carry their network with them.",
                  responses=ERROR_RESPONSES)
    install_error_handlers(app)
    store = controller.store
    migrations = migrations or Migrations(controller)
    app.state.migrations = migrations
    app.state.controller = controller
    port_profiles = profiles.Profiles(controller)
    metrics = app.state.metrics = Metrics(store)
    hub = app.state.event_hub = EventHub(store)
    migrations.listeners.extend([metrics.on_migration, hub.publish_migration])

    refusals = app.state.refusals = RefusalLog(store)

    @app.exception_handler(AuthError)
    async def _refused(request: Request, exc: AuthError) -> JSONResponse:
        """Refusals go to the audit log: who tried what, and why not (rate-limited, written
        by a worker thread, never on the event loop)."""
        outcome = "forbidden" if isinstance(exc, ForbiddenError) else "unauthorized"
        refusals.submit(str(exc.fields.get("actor", "anonymous")),
                        f"{request.method} {request.url.path[:200]}", request.url.path[:200],
                        outcome, exc.message)
        return JSONResponse(status_code=exc.http_status, content={"detail": exc.to_dict()})

    app.include_router(watch.router(metrics, hub))
    app.include_router(inventory.router(controller, metrics))
    app.include_router(vms.router(controller, migrations, port_profiles))
    app.include_router(profiles.router(port_profiles))
    app.include_router(admin.router(controller, metrics))
    app.include_router(placement.router(migrations))
    return app
