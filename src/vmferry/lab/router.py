"""A routed rack's router in the lab, and the VXLAN tunnel its transit network carries.

The router is a namespace with IP forwarding and three legs:

- ``up0``: an access port of its uplink switch in the uplink VLAN (say 192.0.2.1 in VLAN
  100): the gateway of the subnet the rack is joined to;
- ``rk0``: an access port of the rack's ToR in the rack's VLAN (the rack's ``gateway``);
- ``tu0``/``tr0``: point-to-point links to both ToRs' namespaces (the first two /30s of the
  rack's ``transit``), the underlay of the VXLAN tunnel between the two ToRs.

Both legs answer ARP for what they route the other way (``proxy_arp``): what the "route" way
across the boundary needs (a /32 towards a VM that kept its address). The tunnel's ends are
Linux VXLAN devices in the ToRs' namespaces, named as the topology's tunnel trunk ports, so
the lab adds them to the ToRs' bridges like any trunk and the controller prunes their VLANs
like any trunk's. Everything lives in the lab's namespaces: ``lab down`` removes it with them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmferry import privileged
from vmferry.drivers.fabric.router_netns import RACK_LEG, UPLINK_LEG
from vmferry.errors import PrivilegedError
from vmferry.lab.names import LabLayout
from vmferry.model.network import short_ifname
from vmferry.model.topology import Rack, Topology

TRANSIT_UPLINK = "tu0"          # the router's end towards the uplink switch's ToR namespace
TRANSIT_RACK = "tr0"            # the router's end towards the routed rack's ToR namespace
VXLAN_PORT = 4789
VNI_BASE = 10_000               # the rack's index is added: one VNI per routed rack
TRANSIT_MTU = 1600              # room for VXLAN's 50 bytes around a full 1500-byte frame


@dataclass(frozen=True)
class RouterPlan:
    """Every name and address of one routed rack's router and tunnel."""

    rack: Rack
    vni: int

    @property
    def transit(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.rack.transit)

    def _addr(self, offset: int) -> str:
        return str(self.transit.network_address + offset)

    @property
    def uplink_switch(self) -> str:
        assert self.rack.uplink is not None
        return self.rack.uplink.switch

    @property
    def uplink_tor_ip(self) -> str:         # the uplink switch's tunnel end
        return self._addr(1)

    @property
    def router_uplink_transit_ip(self) -> str:
        return self._addr(2)

    @property
    def router_rack_transit_ip(self) -> str:
        return self._addr(5)

    @property
    def rack_tor_ip(self) -> str:           # the routed rack's ToR's tunnel end
        return self._addr(6)

    @property
    def transit_port(self) -> str:
        """The name of the transit link's end in either ToR namespace."""
        return short_ifname("u-", self.rack.name)

    @property
    def access_port(self) -> str:
        """The router legs' access port names (one on each switch)."""
        return short_ifname("a-", self.rack.router)


def router_plans(topology: Topology) -> list[RouterPlan]:
    return [RouterPlan(rack, VNI_BASE + i) for i, rack in enumerate(topology.racks)
            if rack.routed]


def build_router(layout: LabLayout, plan: RouterPlan) -> None:
    """The router namespace, its legs' addresses, forwarding, proxy ARP, the transit links
    and the VXLAN devices at both ToRs (idempotent). The legs' access ports on the switches
    are the caller's (they are OVS ports)."""
    rack = plan.rack
    assert rack.uplink is not None and rack.gateway is not None
    router = layout.namespace(rack.router)
    up_ns, rack_ns = layout.namespace(plan.uplink_switch), layout.namespace(rack.tor)
    privileged.create_namespace(router)
    privileged.create_veth(router, UPLINK_LEG, up_ns, plan.access_port)
    privileged.create_veth(router, RACK_LEG, rack_ns, plan.access_port)
    privileged.add_address(router, UPLINK_LEG, rack.uplink.ip)
    privileged.add_address(router, RACK_LEG, rack.gateway)
    privileged.create_veth(router, TRANSIT_UPLINK, up_ns, plan.transit_port, mtu=TRANSIT_MTU)
    privileged.create_veth(router, TRANSIT_RACK, rack_ns, plan.transit_port, mtu=TRANSIT_MTU)
    privileged.add_address(router, TRANSIT_UPLINK, f"{plan.router_uplink_transit_ip}/30")
    privileged.add_address(router, TRANSIT_RACK, f"{plan.router_rack_transit_ip}/30")
    privileged.add_address(up_ns, plan.transit_port, f"{plan.uplink_tor_ip}/30")
    privileged.add_address(rack_ns, plan.transit_port, f"{plan.rack_tor_ip}/30")
    privileged.run_in_namespace(router, [
        "sysctl", "-qw", "net.ipv4.ip_forward=1", f"net.ipv4.conf.{UPLINK_LEG}.proxy_arp=1",
        f"net.ipv4.conf.{RACK_LEG}.proxy_arp=1",
        # Proxy ARP answers at once (the default waits up to 0.8 s: an interruption).
        f"net.ipv4.neigh.{UPLINK_LEG}.proxy_delay=0", f"net.ipv4.neigh.{RACK_LEG}.proxy_delay=0"])
    # Each ToR reaches the other's tunnel end through the router.
    _ensure_route(up_ns, f"{plan.rack_tor_ip}/32", plan.router_uplink_transit_ip)
    _ensure_route(rack_ns, f"{plan.uplink_tor_ip}/32", plan.router_rack_transit_ip)
    _ensure_vxlan(up_ns, short_ifname("x-", rack.tor), plan,
                  plan.uplink_tor_ip, plan.rack_tor_ip)
    _ensure_vxlan(rack_ns, short_ifname("x-", plan.uplink_switch), plan,
                  plan.rack_tor_ip, plan.uplink_tor_ip)
    for namespace, ifname in ((up_ns, short_ifname("x-", rack.tor)),
                              (rack_ns, short_ifname("x-", plan.uplink_switch)),
                              (router, UPLINK_LEG), (router, RACK_LEG)):
        # The userspace datapath does not complete partial checksums (builder.py).
        privileged.run_in_namespace(namespace, ["ethtool", "-K", ifname, "tx", "off"],
                                    check=False)


def _ensure_route(namespace: str, dst: str, gateway: str) -> None:
    try:
        with IPRoute(netns=namespace) as ipr:
            ipr.route("replace", dst=dst, gateway=gateway)
    except (OSError, NetlinkError) as exc:
        raise PrivilegedError(f"cannot route {dst} via {gateway} in {namespace}",
                              cause=str(exc)) from exc


def _ensure_vxlan(namespace: str, ifname: str, plan: RouterPlan, local: str,
                  remote: str) -> None:
    """A VXLAN device carrying whole (tagged) frames between the two ToRs' transit ends."""
    privileged.check_ifname(ifname)
    try:
        with IPRoute(netns=namespace) as ipr:
            if not ipr.link_lookup(ifname=ifname):
                underlay = ipr.link_lookup(ifname=plan.transit_port)[0]
                ipr.link("add", ifname=ifname, kind="vxlan", vxlan_id=plan.vni,
                         vxlan_local=local, vxlan_group=remote, vxlan_port=VXLAN_PORT,
                         vxlan_link=underlay, vxlan_learning=0)
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up", mtu=1500)
    except (OSError, NetlinkError) as exc:
        raise PrivilegedError(f"cannot create VXLAN device {ifname} in {namespace}",
                              cause=str(exc)) from exc


def router_namespaces(topology: Topology) -> dict[str, str]:
    """Router node -> its namespace: what ``drivers.fabric.router.NetnsRouter`` takes."""
    layout = LabLayout(topology.name)
    return {rack.router: layout.namespace(rack.router) for rack in topology.routed_racks()}
