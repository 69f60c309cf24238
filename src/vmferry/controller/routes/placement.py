"""Placement: where a VM may go and why not, its policy, host drains, balancing."""

from __future__ import annotations

from fastapi import APIRouter, Query

from vmferry.api.agent import Accepted
from vmferry.api.links import (
    OP_DRAIN,
    OP_DRAIN_STATUS,
    OP_MIGRATE,
    OP_UNDRAIN,
    OP_WHERE,
    link,
    links,
)
from vmferry.api.placement import BalanceOut, DrainOut, PolicyBody, VmPolicy, WhereOut
from vmferry.controller import auth, hostwatch
from vmferry.controller.deps import Caller
from vmferry.controller.drain import Mover
from vmferry.controller.migration import Migrations
from vmferry.controller.placement import MAX_BALANCE_MOVES, Placement


def router(migrations: Migrations) -> APIRouter:
    api = APIRouter()
    placement = Placement(migrations.controller)
    mover = Mover(migrations)
    watch = hostwatch.from_environment(migrations.controller)
    if watch is not None:
        watch.start()

    @api.get("/v1/vms/{name}/where", response_model=WhereOut, operation_id=OP_WHERE,
             responses=links(200, MoveIt=link(
                 OP_MIGRATE, "move the VM to the second host listed",
                 request_body={"vm": "$response.body#/vm", "to": "$response.body#/hosts/1/host"})))
    def where(name: str, caller: Caller) -> WhereOut:
        auth.require(caller, auth.READ, "read placements")
        return placement.where(name)

    @api.get("/v1/vms/{name}/policy", response_model=VmPolicy)
    def get_policy(name: str, caller: Caller) -> VmPolicy:
        auth.require(caller, auth.READ, "read VMs")
        return placement.policy(name)

    @api.put("/v1/vms/{name}/policy", response_model=VmPolicy)
    def set_policy(name: str, body: PolicyBody, caller: Caller) -> VmPolicy:
        auth.require(caller, auth.SERVERS, "change VM policies")
        return placement.set_policy(name, body.policy.model_dump(), caller)

    @api.post("/v1/hosts/{host}/drain", status_code=202, response_model=DrainOut,
              operation_id=OP_DRAIN, responses=links(
                  202, FollowIt=link(OP_DRAIN_STATUS, "the drain's progress",
                                     parameters={"host": "$request.path.host"}),
                  UndrainIt=link(OP_UNDRAIN, "give the host back",
                                 parameters={"host": "$request.path.host"})))
    def drain(host: str, caller: Caller) -> DrainOut:
        auth.require(caller, auth.SERVERS, "drain hosts")
        return mover.drain(host, caller)

    @api.get("/v1/hosts/{host}/drain", response_model=DrainOut, operation_id=OP_DRAIN_STATUS)
    def drain_status(host: str, caller: Caller) -> DrainOut:
        auth.require(caller, auth.READ, "read drains")
        return mover.drain_status(host)

    @api.post("/v1/hosts/{host}/undrain", response_model=Accepted, operation_id=OP_UNDRAIN)
    def undrain(host: str, caller: Caller) -> Accepted:
        auth.require(caller, auth.SERVERS, "undrain hosts")
        mover.undrain(host, caller)
        return Accepted(status="ok")

    @api.post("/v1/balance", response_model=BalanceOut)
    def balance(caller: Caller, dry_run: bool = Query(True),
                max_moves: int = Query(10, ge=1, le=MAX_BALANCE_MOVES)) -> BalanceOut:
        auth.require(caller, auth.READ if dry_run else auth.SERVERS,
                     "plan balancing" if dry_run else "balance the site")
        return mover.balance(max_moves, dry_run, caller)

    return api
