"""The routers between subnets: the /32 host routes of the "route" way across a boundary.

A VM that moved into a routed rack by the "route" way keeps its address; its rack's router
gets a /32 to it through its leg in the rack, and (proxy ARP on both legs, set up with the
router) answers ARP for it in the old subnet and for the old subnet in the rack. The
interface is three calls; ``NetnsRouter`` drives the lab's router namespaces with pyroute2,
``FakeRouter`` (``fake.py``) keeps them in memory for unit tests.

Not wired into the migration yet: the controller does not choose the "route" way for a move
(see ``model.boundary``); this is the part that realizes it on a router.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmferry.errors import FabricError

RACK_LEG = "rk0"          # the router's leg in its rack (lab/router.py builds it)
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


def _host_address(address: str) -> str:
    """The bare IPv4 address of ``address`` (with or without a prefix)."""
    return str(ipaddress.IPv4Interface(address).ip)


class NetnsRouter(Router):
    """Lab routers: one network namespace each (``lab.router.router_namespaces``)."""

    def __init__(self, namespaces: dict[str, str]) -> None:
        self.namespaces = namespaces      # router node -> its namespace

    def _namespace(self, router: str) -> str:
        try:
            return self.namespaces[router]
        except KeyError:
            raise FabricError(f"no router {router}", switch=router) from None

    def host_routes(self, router: str) -> frozenset[str]:
        try:
            with IPRoute(netns=self._namespace(router)) as ipr:
                routes = ipr.get_routes(family=2, table=MAIN_TABLE)
        except (OSError, NetlinkError) as exc:
            raise FabricError(f"cannot read the routes of router {router}: {exc}",
                              switch=router) from exc
        return frozenset(str(r.get_attr("RTA_DST")) for r in routes if r["dst_len"] == 32)

    def add_host_route(self, router: str, address: str) -> None:
        self._change(router, "replace", address)

    def remove_host_route(self, router: str, address: str) -> None:
        if _host_address(address) in self.host_routes(router):
            self._change(router, "del", address)

    def _change(self, router: str, command: str, address: str) -> None:
        try:
            with IPRoute(netns=self._namespace(router)) as ipr:
                leg = ipr.link_lookup(ifname=RACK_LEG)
                if not leg:
                    raise FabricError(f"router {router} has no leg {RACK_LEG}", switch=router)
                ipr.route(command, dst=f"{_host_address(address)}/32", oif=leg[0],
                          table=MAIN_TABLE, scope=SCOPE_LINK)
        except (OSError, NetlinkError) as exc:
            raise FabricError(f"cannot {command} the route to {address} on router {router}: "
                              f"{exc}", switch=router) from exc
