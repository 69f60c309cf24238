"""Realizing a port profile on a softswitch port: desired state, actual state, difference.

What a profile means on a port (flows, meters, the port row) is computed by ``profile_flows``;
this module reads the switch, writes only what differs, and reports. It works through the
``Softswitch`` interface, so the in-memory ``FakeSoftswitch`` runs it in unit tests.

A profile arrives typed (``PortProfile``): it is parsed once where it enters the process.

Many ports are realized together (``realize_many``: a live profile update reaching every port
of a host) with the work of one: one OVSDB transaction for all port rows, one meter dump, the
meter changes side by side, one flow dump and one OpenFlow bundle for all ports' flows.
``realize_each`` does that and, if the switch refuses the batch, falls back to one port at a
time so each port gets its own outcome.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vmferry.drivers.softswitch.base import Flow, PortSpec, PortState, Softswitch
from vmferry.drivers.softswitch.ovs.flowtext import flow_key, normalize_actions, normalize_flow
from vmferry.drivers.softswitch.ovs.profile_flows import (
    KEY_BLOCK,
    KEY_PROFILE,
    KEY_VERSION,
    PROFILE_KEYS,
    Allocation,
    DesiredPort,
    allocate,
    desired_port,
    port_cookie,
)
from vmferry.errors import InputError, SoftswitchError, VmferryError
from vmferry.model.profile import PortProfile

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortRequest:
    """One port to realize a profile on: the port, its VM's MAC and addresses, the profile."""

    port: str
    vm_mac: str
    vm_ips: tuple[str, ...]
    profile: PortProfile


@dataclass
class RealizationReport:
    port: str
    profile: str
    version: int | None
    cookie: int
    meter_block: int
    flows: int
    meters: int
    seconds: float
    not_enforced: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "cookie": f"0x{self.cookie:x}"}



# ---- talking to the switch ---------------------------------------------------------------------

def _ports_ready(softswitch: Softswitch, bridge: str, names: Sequence[str],
                 timeout: float = 10) -> tuple[dict[str, PortState], dict[str, dict[str, str]]]:
    """The ports ``names`` once each has an OpenFlow number, and the tags ``allocate`` needs:
    their ``external_ids``, and every other port's too if one of them has no meter block yet.

    Raises ``SoftswitchError`` if one is missing, ``WaitTimeout``.
    """
    ports = softswitch.ports(bridge, names)
    waited = False
    for port in names:
        state = ports.get(port)
        if state is None:
            raise SoftswitchError(f"port {port} is not on bridge {bridge}",
                                  cause="no such port")
        if state.ofport is None or state.ofport < 0:
            softswitch.wait_for_port(bridge, port, timeout)
            waited = True
    if waited:
        ports = softswitch.ports(bridge, names)
    tags = {name: dict(ports[name].external_ids) for name in names}
    if any(KEY_BLOCK not in ids for ids in tags.values()):
        tags = {**softswitch.port_external_ids(bridge), **tags}
    return ports, tags


def _port_state(softswitch: Softswitch, bridge: str, port: str, timeout: float = 10
                ) -> tuple[dict[str, dict[str, str]], PortState, int]:
    ports, tags = _ports_ready(softswitch, bridge, [port], timeout)
    state = ports[port]
    assert state.ofport is not None
    return tags, state, state.ofport


def realize(softswitch: Softswitch, bridge: str, port: str, vm_mac: str, vm_ips: Iterable[str],
            profile: PortProfile) -> RealizationReport:
    """Make the port enforce ``profile``, writing only what differs. Idempotent.

    Order keeps traffic safe while changing: the port row (VLAN, tags recording the cookie and
    meter block) first, then meters the new flows need, then the flows in one bundle, then
    meters no flow uses any more. Raises ``SoftswitchError`` (the port is missing, OVS refuses
    a change), ``WaitTimeout``.
    """
    request = PortRequest(port=port, vm_mac=vm_mac, vm_ips=tuple(vm_ips), profile=profile)
    return realize_many(softswitch, bridge, [request])[0]


def realize_many(softswitch: Softswitch, bridge: str,
                 requests: Sequence[PortRequest]) -> list[RealizationReport]:
    """``realize`` for many ports at once, in the same order and with the work of one.

    All port rows in one OVSDB transaction (flows and meters are read meanwhile), then every
    meter the new flows need, then all flows in one bundle (atomic: if OVS refuses one flow,
    no port's flows change), then the meters no flow uses any more. Returns one report per
    request, in order. Raises ``InputError`` (a port named twice), ``SoftswitchError``,
    ``WaitTimeout``.
    """
    if not requests:
        return []
    started = time.perf_counter()
    names = [request.port for request in requests]
    if len(set(names)) != len(names):
        raise InputError("ports", "a port is named twice")
    ports, tags = _ports_ready(softswitch, bridge, names)
    # Meter blocks are taken one port after another, so two new ports never pick the same.
    wants: list[tuple[Allocation, DesiredPort]] = []
    for request in requests:
        alloc = allocate(request.port, tags)
        state = ports[request.port]
        ips = [str(ipaddress.ip_interface(ip).ip) for ip in request.vm_ips]
        assert state.ofport is not None
        want = desired_port(state, state.ofport, request.vm_mac, ips, request.profile, alloc)
        tags[request.port][KEY_BLOCK] = str(alloc.block)
        wants.append((alloc, want))
    flows = {alloc.cookie: want.flows for alloc, want in wants}
    # Reading the flows and meters does not depend on the port rows: read while they commit.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="realize-read") as pool:
        meters_read = pool.submit(softswitch.dump_meters, bridge)
        flows_read = pool.submit(softswitch.dump_flows_many, bridge, flows.keys())
        softswitch.ensure_ports(bridge, [want.spec for _, want in wants])
    meters = [meter for _, want in wants for meter in want.meters]
    now = softswitch.replace_meters(bridge, meters, {m.meter_id for m in meters},
                                    actual=meters_read.result())
    softswitch.replace_flows_many(bridge, flows, actual=flows_read.result())
    softswitch.replace_meters(bridge, meters,
                              {i for alloc, _ in wants for i in alloc.meter_ids}, actual=now)
    seconds = time.perf_counter() - started
    return [RealizationReport(port=request.port, profile=request.profile.name,
                              version=request.profile.version, cookie=alloc.cookie,
                              meter_block=alloc.block, flows=len(want.flows),
                              meters=len(want.meters), seconds=seconds,
                              not_enforced=want.not_enforced)
            for request, (alloc, want) in zip(requests, wants, strict=True)]


def realize_each(softswitch: Softswitch, bridge: str, requests: Sequence[PortRequest]
                 ) -> list[RealizationReport | VmferryError]:
    """``realize_many``, and if the switch refuses the batch, each port on its own, so that
    one port's failure is reported for that port only. One outcome per request, in order."""
    try:
        return list(realize_many(softswitch, bridge, requests))
    except VmferryError as exc:
        if len(requests) == 1:
            return [exc]
        LOG.warning("realizing %d ports on %s together failed (%s); one port at a time",
                    len(requests), bridge, exc)
    outcomes: list[RealizationReport | VmferryError] = []
    for request in requests:
        try:
            outcomes.append(realize_many(softswitch, bridge, [request])[0])
        except VmferryError as exc:
            outcomes.append(exc)
    return outcomes




def remove(softswitch: Softswitch, bridge: str, port: str) -> bool:
    """Remove every flow, meter and tag a profile installed on the port; the port stays.

    Returns whether the port had a profile. Idempotent. Flows are found by the port's cookie
    even if the port is gone; meters by the block recorded on the port. Raises
    ``SoftswitchError``.
    """
    cookie = port_cookie(port)
    softswitch.replace_flows(bridge, cookie, [])
    state = softswitch.ports(bridge, [port]).get(port)
    if state is None or KEY_BLOCK not in state.external_ids:
        return False
    alloc = Allocation(cookie, int(state.external_ids[KEY_BLOCK]))
    softswitch.replace_meters(bridge, [], alloc.meter_ids)
    ids = {k: v for k, v in state.external_ids.items() if k not in PROFILE_KEYS}
    softswitch.ensure_port(bridge, PortSpec(name=port, tag=state.tag, trunks=state.trunks,
                                            vlan_mode=state.vlan_mode,
                                            iface_type=state.iface_type, external_ids=ids))
    return True


def _flow_text(flow: Flow) -> str:
    return f"table={flow.table},priority={flow.priority},{flow.match} actions={flow.actions}"


def port_status(softswitch: Softswitch, bridge: str, port: str, vm_mac: str,
                vm_ips: Iterable[str], profile: PortProfile | None) -> dict[str, Any]:
    """Desired and actual state of the port side by side, and whether they match.

    ``profile=None`` means the port should carry no profile at all. Raises
    ``SoftswitchError``.
    """
    ips = [str(ipaddress.ip_interface(ip).ip) for ip in vm_ips]
    tags, state, ofport = _port_state(softswitch, bridge, port)
    cookie = port_cookie(port)
    actual_flows = [normalize_flow(f) for f in softswitch.dump_flows(bridge, cookie)]
    recorded_block = state.external_ids.get(KEY_BLOCK)
    alloc = allocate(port, tags)
    actual_meters = [m for m in softswitch.dump_meters(bridge)
                     if recorded_block is not None and m.meter_id in alloc.meter_ids]
    actual = {"vlan": state.tag, "trunks": sorted(state.trunks), "vlan_mode": state.vlan_mode,
              "profile": state.external_ids.get(KEY_PROFILE),
              "version": _int_or_none(state.external_ids.get(KEY_VERSION)),
              "cookie": f"0x{cookie:x}", "meter_block": _int_or_none(recorded_block),
              "flows": sorted(_flow_text(f) for f in actual_flows),
              "meters": [m.__dict__ for m in actual_meters]}
    if profile is None:
        desired: dict[str, Any] = {"profile": None, "flows": [], "meters": []}
        match = not actual_flows and not actual_meters and recorded_block is None
        return {"port": port, "ofport": ofport, "desired": desired, "actual": actual,
                "match": match, "missing_flows": [], "extra_flows": actual["flows"],
                "not_enforced": []}
    want = desired_port(state, ofport, vm_mac, ips, profile, alloc)
    wanted = {flow_key(f): normalize_actions(f.actions) for f in want.flows}
    have = {flow_key(f): normalize_actions(f.actions) for f in actual_flows}
    missing = sorted(_flow_text(normalize_flow(f)) for f in want.flows
                     if have.get(flow_key(f)) != wanted[flow_key(f)])
    extra = sorted(_flow_text(f) for f in actual_flows
                   if wanted.get(flow_key(f)) != have[flow_key(f)])
    desired = {"vlan": want.spec.tag, "trunks": sorted(want.spec.trunks),
               "vlan_mode": want.spec.vlan_mode, "profile": profile.name,
               "version": profile.version, "cookie": f"0x{alloc.cookie:x}",
               "meter_block": alloc.block,
               "flows": sorted(_flow_text(normalize_flow(f)) for f in want.flows),
               "meters": [m.__dict__ for m in want.meters]}
    match = (not missing and not extra
             and sorted(want.meters, key=lambda m: m.meter_id) == actual_meters
             and all(desired[k] == actual[k] for k in ("vlan", "trunks", "vlan_mode",
                                                       "profile", "version", "meter_block")))
    return {"port": port, "ofport": ofport, "desired": desired, "actual": actual,
            "match": match, "missing_flows": missing, "extra_flows": extra,
            "not_enforced": want.not_enforced}


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def apply(softswitch: Softswitch, bridge: str, port: str, vm_mac: str, vm_ips: Iterable[str],
          profile: PortProfile | None) -> dict[str, Any]:
    """Realize ``profile`` on the port, or remove any profile when it is None. Returns what
    was done (a ``RealizationReport`` as a dict, or ``{"port", "removed"}``). Raises
    ``SoftswitchError``, ``WaitTimeout``."""
    if profile is None:
        return {"port": port, "removed": remove(softswitch, bridge, port)}
    return realize(softswitch, bridge, port, vm_mac, vm_ips, profile).to_dict()
