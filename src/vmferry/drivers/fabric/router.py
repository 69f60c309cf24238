"""The routers between subnets: what the "route" way across a boundary puts on them.

A VM that moved into a routed rack by the "route" way keeps its address and its gateway; its
rack's router gets a /32 to it through its leg in the rack (proxy ARP on both legs, set up
with the router, then answers ARP for it in the old subnet and for the old subnet in the
rack), and a proxy entry on the rack leg for the VM's old gateway (inert when that gateway is
the router's own address, as in the lab; needed when it is another router's). ARP caches
that still point the old way are re-pointed at the switchover (``announce``): a cached MAC
would otherwise be used until it ages out, tens of seconds.

``NetnsRouter`` drives the lab's router namespaces (``router_netns``: netlink, packet
sockets, in the controller's process); ``FakeRouter`` (``fake.py``) keeps them in memory for
unit tests. ``controller.route_way`` decides what each router should hold.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod

from pyroute2 import IPRoute

from vmferry.drivers.fabric import router_netns as netns
from vmferry.drivers.fabric.router_netns import RACK_LEG, UPLINK_LEG, RouterNamespaces

__all__ = ["RACK_LEG", "UPLINK_LEG", "NetnsRouter", "Router"]

MAIN_TABLE = 254
SCOPE_LINK = 253          # the VM is on the leg's segment: no gateway


class Router(ABC):
    """The host routes of the routers of a site, by router node name."""

    @abstractmethod
    def host_routes(self, router: str) -> frozenset[str]:
        """The addresses the router has a /32 to. Raises ``FabricError``."""

    @abstractmethod
    def add_host_route(self, router: str, address: str) -> None:
        """Route ``address``/32 into the router's rack (idempotent). Raises ``FabricError``."""

    @abstractmethod
    def remove_host_route(self, router: str, address: str) -> None:
        """Remove the /32 to ``address`` (idempotent). Raises ``FabricError``."""

    @abstractmethod
    def proxy_entries(self, router: str) -> frozenset[str]:
        """The addresses the router's rack leg answers ARP for by a proxy entry. Raises
        ``FabricError``."""

    @abstractmethod
    def add_proxy(self, router: str, address: str) -> None:
        """Answer ARP for ``address`` on the rack leg (idempotent). Raises ``FabricError``."""

    @abstractmethod
    def remove_proxy(self, router: str, address: str) -> None:
        """Stop answering for ``address`` on the rack leg (idempotent). Raises
        ``FabricError``."""

    @abstractmethod
    def announce(self, router: str, address: str, mac: str, subnet: str,
                 into_rack: bool) -> int:
        """Re-point ARP caches after the VM ``address`` (``mac``, of ``subnet``) moved into
        the router's rack (``into_rack``) or out of it; returns the frames sent.

        Into the rack: the uplink's clients learn ``address`` at the router's uplink MAC (a
        gratuitous ARP), and the VM learns every other address of its subnet at the rack
        leg's MAC (ARP requests addressed to it). Out of it: the clients learn ``address``
        at ``mac`` again, and the VM learns the uplink neighbours the router knows (and the
        router's own uplink address) at their MACs. Raises ``FabricError``."""


def _host_address(address: str) -> str:
    """The bare IPv4 address of ``address`` (with or without a prefix)."""
    return str(ipaddress.IPv4Interface(address).ip)


class NetnsRouter(Router):
    """Lab routers: one network namespace each (``lab.router.router_namespaces``)."""

    def __init__(self, namespaces: dict[str, str]) -> None:
        self.routers = RouterNamespaces(namespaces)
        self.namespaces = namespaces      # router node -> its namespace

    def host_routes(self, router: str) -> frozenset[str]:
        def read() -> frozenset[str]:
            with IPRoute() as ipr:
                return _host_routes(ipr)
        return self.routers.run(router, "read the routes", read)

    def add_host_route(self, router: str, address: str) -> None:
        def add() -> None:
            with IPRoute() as ipr:
                _route(ipr, "replace", _host_address(address))
        self.routers.run(router, f"route {address}", add)

    def remove_host_route(self, router: str, address: str) -> None:
        """The /32 goes, and with it the connection-tracking entries of the address."""
        vm_ip = _host_address(address)

        def remove() -> None:
            with IPRoute() as ipr:
                if vm_ip in _host_routes(ipr):
                    _route(ipr, "del", vm_ip)
            netns.forget_flows_or_warn([vm_ip])
        self.routers.run(router, f"remove the route to {address}", remove)

    def proxy_entries(self, router: str) -> frozenset[str]:
        def read() -> frozenset[str]:
            with IPRoute() as ipr:
                return netns.proxy_entries(ipr, RACK_LEG)
        return self.routers.run(router, "read the proxy entries", read)

    def add_proxy(self, router: str, address: str) -> None:
        self._proxy(router, address, True)

    def remove_proxy(self, router: str, address: str) -> None:
        self._proxy(router, address, False)

    def _proxy(self, router: str, address: str, present: bool) -> None:
        def change() -> None:
            with IPRoute() as ipr:
                netns.set_proxy(ipr, netns.link_index(ipr, RACK_LEG), _host_address(address),
                                present)
        self.routers.run(router, f"{'add' if present else 'remove'} the proxy entry for "
                         f"{address}", change)

    def announce(self, router: str, address: str, mac: str, subnet: str,
                 into_rack: bool) -> int:
        vm_ip, vm_mac = _host_address(address), netns.mac_bytes(mac)
        network = ipaddress.IPv4Network(subnet)

        def send() -> int:
            with IPRoute() as ipr:
                found = netns.legs(ipr)
                up, rack = netns.leg(found, UPLINK_LEG), netns.leg(found, RACK_LEG)
                if into_rack:
                    frames = netns.into_rack_frames(vm_ip, vm_mac, network, up.mac, rack.mac)
                    return netns.send_frames(frames)
                known = netns.in_network(netns.neighbour_macs(ipr, up.index), network,
                                         skip=vm_ip)
                own = netns.leg_address(ipr, up.index)
            if own is not None and own.ip in network:
                known.append((str(own.ip), up.mac))
            return netns.send_frames(netns.out_of_rack_frames(vm_ip, vm_mac, known, up.mac))

        return self.routers.run(router, "send ARP", send)


def _host_routes(ipr: IPRoute) -> frozenset[str]:
    routes = ipr.get_routes(family=2, table=MAIN_TABLE)
    # A /32 with a gateway is the NAT way's (old address via the new one), not a host route.
    return frozenset(str(r.get_attr("RTA_DST")) for r in routes
                     if r["dst_len"] == 32 and r.get_attr("RTA_GATEWAY") is None)


def _route(ipr: IPRoute, command: str, vm_ip: str) -> None:
    ipr.route(command, dst=f"{vm_ip}/32", oif=netns.link_index(ipr, RACK_LEG),
              table=MAIN_TABLE, scope=SCOPE_LINK)
