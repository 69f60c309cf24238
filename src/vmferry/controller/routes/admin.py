"""Audit, tokens, and the audit log."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from vmferry.api.controller import EventOut, FindingOut, TokenCreate, TokenCreated, TokenOut
from vmferry.controller import audit, auth, events
from vmferry.controller.deps import Caller
from vmferry.controller.metrics import Metrics
from vmferry.controller.routes import MAX_ID
from vmferry.controller.service import Controller


def router(controller: Controller, metrics: Metrics) -> APIRouter:
    api = APIRouter()
    store = controller.store

    @api.get("/v1/audit", response_model=list[FindingOut])
    def run_audit(caller: Caller) -> list[FindingOut]:
        auth.require(caller, auth.READ, "audit")
        findings = audit.audit(controller)
        metrics.on_audit(f.kind for f in findings)
        return audit.as_out(findings)

    @api.post("/v1/audit/fix", response_model=list[FindingOut])
    def fix_audit(caller: Caller) -> list[FindingOut]:
        auth.require(caller, auth.ADMIN, "remove leftovers")
        remaining = audit.fix(controller, audit.audit(controller))
        events.record(store, caller.name, "audit.fix", "site", "ok" if not remaining else
                      "incomplete", remaining=len(remaining))
        return audit.as_out(remaining)

    @api.post("/v1/tokens", status_code=201, response_model=TokenCreated)
    def create_token(body: TokenCreate, caller: Caller) -> TokenCreated:
        auth.require(caller, auth.ADMIN, "create tokens")
        token = auth.create_token(store, body.name, body.role, expires_in_s=body.expires_in_s)
        events.record(store, caller.name, "token.create", body.name, "ok", role=body.role)
        return TokenCreated(name=body.name, role=body.role, token=token)

    @api.get("/v1/tokens", response_model=list[TokenOut])
    def tokens(caller: Caller) -> list[TokenOut]:
        auth.require(caller, auth.ADMIN, "list tokens")
        return [TokenOut.model_validate(t) for t in auth.list_tokens(store)]

    @api.delete("/v1/tokens/{name}", status_code=204)
    def revoke(name: str, caller: Caller) -> Response:
        auth.require(caller, auth.ADMIN, "revoke tokens")
        auth.revoke_token(store, name)
        events.record(store, caller.name, "token.revoke", name, "ok")
        return Response(status_code=204)

    @api.get("/v1/events", response_model=list[EventOut])
    def list_events(caller: Caller, limit: int = Query(100, ge=1, le=10_000),
                    after: int = Query(0, ge=0, le=MAX_ID)) -> list[EventOut]:
        auth.require(caller, auth.READ, "read events")
        return [EventOut(id=e.id, at=e.at.isoformat(), actor=e.actor, action=e.action,
                         target=e.target, outcome=e.outcome, detail=e.detail)
                for e in events.recent(store, limit, after)]

    return api
