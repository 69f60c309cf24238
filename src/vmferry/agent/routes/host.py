"""The host as a whole: its report and what vmferry left on it."""

from __future__ import annotations

from fastapi import APIRouter

from vmferry.agent.service import HostAgent
from vmferry.api.agent import HostLeftovers, HostReport


def router(agent: HostAgent) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/report", response_model=HostReport)
    def report() -> HostReport:
        return agent.report()

    @api.get("/v1/audit", response_model=HostLeftovers)
    def audit() -> HostLeftovers:
        return agent.inventory_of_leftovers()

    @api.delete("/v1/taps/{name}", status_code=204)
    def delete_tap(name: str) -> None:
        agent.delete_stray_tap(name)

    return api
