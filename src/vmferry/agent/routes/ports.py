"""Guest ports, their profiles, the uplink trunk and the switchover rules."""

from __future__ import annotations

from fastapi import APIRouter

from vmferry.agent.checks import check_tap_free
from vmferry.agent.service import HostAgent
from vmferry.api.agent import (
    ConnCarried,
    ConnState,
    GuestInfo,
    GuestRequest,
    PortOutcomes,
    PortProfileBody,
    PortProfiles,
    PortStatus,
    Realization,
    SwitchoverCookies,
    SwitchoverRules,
    SwitchoverRulesOut,
    UplinkVlans,
)
from vmferry.api.links import OP_CLOSE_SWITCHOVER, link, links
from vmferry.errors import InputError


def router(agent: HostAgent) -> APIRouter:
    api = APIRouter()

    @api.put("/v1/ports/{name}", response_model=GuestInfo)
    def preset_port(name: str, body: GuestRequest) -> GuestInfo:
        if body.name != name:
            raise InputError("name", "does not match the URL")
        check_tap_free(agent, name)
        return agent.preset_port(body)

    @api.get("/v1/ports/{name}", response_model=PortStatus)
    def port_status(name: str) -> PortStatus:
        return agent.port_status(name)

    @api.put("/v1/ports/{name}/profile", response_model=Realization)
    def set_port_profile(name: str, body: PortProfileBody) -> Realization:
        return agent.set_port_profile(name, body.profile)

    @api.put("/v1/port-profiles", response_model=PortOutcomes)
    def set_port_profiles(body: PortProfiles) -> PortOutcomes:
        return PortOutcomes(ports=agent.set_port_profiles(body.vms, body.profile))

    @api.get("/v1/uplink", response_model=UplinkVlans)
    def uplink() -> UplinkVlans:
        return UplinkVlans(vlans=agent.uplink_vlans())

    @api.put("/v1/uplink", response_model=UplinkVlans)
    def set_uplink(body: UplinkVlans) -> UplinkVlans:
        return UplinkVlans(vlans=agent.set_uplink_vlans(body.vlans))

    @api.put("/v1/make-before-break/{name}", response_model=SwitchoverRulesOut,
             responses=links(200, CloseThem=link(
                 OP_CLOSE_SWITCHOVER, "remove the rules just opened",
                 parameters={"cookie": "$request.body#/cookie"})))
    def open_switchover(name: str, body: SwitchoverRules) -> SwitchoverRulesOut:
        return SwitchoverRulesOut(rules=agent.open_switchover(name, body.cookie, body.vlan,
                                                              str(body.mac)))

    @api.delete("/v1/make-before-break/{cookie}", status_code=204,
                operation_id=OP_CLOSE_SWITCHOVER)
    def close_switchover(cookie: int) -> None:
        agent.close_switchover(cookie)

    @api.get("/v1/make-before-break", response_model=SwitchoverCookies, responses=links(
        200, CloseFirst=link(OP_CLOSE_SWITCHOVER, "remove the first rules listed",
                             parameters={"cookie": "$response.body#/cookies/0"})))
    def switchover_cookies() -> SwitchoverCookies:
        return SwitchoverCookies(cookies=agent.switchover_cookies())

    @api.get("/v1/ports/{name}/conntrack", response_model=ConnState)
    def conntrack(name: str) -> ConnState:
        return agent.conntrack(name)

    @api.put("/v1/ports/{name}/conntrack", response_model=ConnCarried)
    def carry_conntrack(name: str, body: ConnState) -> ConnCarried:
        return agent.carry_conntrack(name, body)

    @api.delete("/v1/ports/{name}/conntrack", status_code=204)
    def drop_carried_conntrack(name: str) -> None:
        agent.drop_carried_conntrack(name)

    return api
