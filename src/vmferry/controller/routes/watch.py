"""Watching: the dashboard, health, Prometheus metrics and the live event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from vmferry.api.controller import Health, WhoAmI
from vmferry.controller import auth
from vmferry.controller.deps import Caller
from vmferry.controller.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vmferry.controller.metrics import Metrics
from vmferry.controller.routes import MAX_ID
from vmferry.controller.stream import MEDIA_TYPE as SSE_MEDIA_TYPE
from vmferry.controller.stream import EventHub
from vmferry.web import ConcurrencyCap, parse_decimal

MAX_STREAMS = 64              # open event streams, all callers
MAX_STREAMS_PER_CALLER = 4
STATIC = Path(__file__).resolve().parent.parent / "static"


def router(metrics: Metrics, hub: EventHub) -> APIRouter:
    api = APIRouter()
    streams = ConcurrencyCap("stream", per_key=MAX_STREAMS_PER_CALLER, total=MAX_STREAMS)

    @api.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        """The web dashboard: a static page that reads this API with the user's token."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/v1/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok")

    @api.get("/v1/whoami", response_model=WhoAmI)
    def whoami(caller: Caller) -> WhoAmI:
        return WhoAmI(name=caller.name, role=caller.role.value)

    @api.get("/metrics", response_class=Response,
             responses={200: {"content": {METRICS_CONTENT_TYPE: {}}}})
    def prometheus_metrics(caller: Caller) -> Response:
        auth.require(caller, auth.READ, "read metrics")
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @api.get("/v1/events/stream", response_class=StreamingResponse,
             responses={200: {"content": {SSE_MEDIA_TYPE: {}}}})
    def stream_events(request: Request, caller: Caller,
                      after: int | None = Query(None, ge=0, le=MAX_ID, description=
                                                "audit events after this id (default: new ones; "
                                                "a Last-Event-ID header wins)"),
                      limit: int | None = Query(None, ge=1, le=100_000, description=
                                                "close the stream after this many events"),
                      ) -> StreamingResponse:
        auth.require(caller, auth.READ, "read events")
        last = parse_decimal(request.headers.get("last-event-id"))
        start = last if last is not None else after if after is not None \
            else hub.latest_event_id()
        streams.acquire(caller.name)      # 429 beyond the caller's share; body() releases
        async def body() -> AsyncIterator[str]:
            try:
                async for frame in hub.stream(request.is_disconnected, after=start,
                                              limit=limit):
                    yield frame
            finally:
                streams.release(caller.name)

        return StreamingResponse(
            body(),
            media_type=SSE_MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api
