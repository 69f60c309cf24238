"""The inventory, hosts and their agents' heartbeats, and the fabric."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from vmferry.api.agent import HostReport
from vmferry.api.controller import HostOut, InventoryLoaded, TrunkOut
from vmferry.api.links import OP_CREATE_VM, OP_DRAIN, OP_DRAIN_STATUS, link, links
from vmferry.controller import auth
from vmferry.controller.auth import Role
from vmferry.controller.deps import Caller
from vmferry.controller.inventory_rules import Confinement
from vmferry.controller.metrics import Metrics
from vmferry.controller.service import Controller
from vmferry.errors import ForbiddenError
from vmferry.model.topology import Topology


def router(controller: Controller, metrics: Metrics) -> APIRouter:
    api = APIRouter()

    @api.put("/v1/inventory", response_model=InventoryLoaded)
    def set_inventory(body: Topology, caller: Caller, request: Request) -> InventoryLoaded:
        auth.require(caller, auth.ADMIN, "load the inventory")
        confinement: Confinement | None = getattr(request.app.state, "confinement", None)
        if confinement is not None:     # the daemon always sets it (cli/daemons.py)
            confinement.check(body)
        controller.set_inventory(body, caller)
        return InventoryLoaded(status="ok", hosts=[h.name for h in body.hosts])

    @api.get("/v1/inventory", response_model=Topology, responses=links(
        200, CreateVmThere=link(
            OP_CREATE_VM, "a VM on the first host and VLAN (addressed by the VLAN's subnet)",
            request_body={"host": "$response.body#/hosts/0/name",
                          "vlan": "$response.body#/vlans/0/id",
                          "ip": "$response.body#/vlans/0/subnet"})))
    def get_inventory(caller: Caller) -> Topology:
        auth.require(caller, auth.READ, "read the inventory")
        return controller.topology()

    @api.get("/v1/hosts", response_model=list[HostOut], responses=links(
        200, DrainFirst=link(OP_DRAIN, "drain the first host listed",
                             parameters={"host": "$response.body#/0/name"}),
        ItsDrain=link(OP_DRAIN_STATUS, "the first host's drain",
                      parameters={"host": "$response.body#/0/name"})))
    def hosts(caller: Caller) -> list[HostOut]:
        auth.require(caller, auth.READ, "list hosts")
        return controller.hosts()

    @api.post("/v1/agents/{host}/heartbeat", status_code=204)
    def heartbeat(host: str, body: HostReport, caller: Caller) -> Response:
        if caller.role is not Role.AGENT or caller.host != host or body.host != host:
            raise ForbiddenError(f"{caller.name} may only report for its own host",
                                 actor=caller.name)
        controller.heartbeat(host, body)
        metrics.on_heartbeat(host)
        return Response(status_code=204)

    @api.get("/v1/fabric", response_model=list[TrunkOut])
    def fabric(caller: Caller) -> list[TrunkOut]:
        auth.require(caller, auth.READ, "read the fabric")
        return controller.fabric_state()

    @api.post("/v1/fabric/reconcile")
    def reconcile(caller: Caller) -> dict[str, list[int]]:
        auth.require(caller, auth.NETWORK, "reconcile the fabric")
        return controller.reconcile_fabric()

    return api
