"""The translations of the "NAT" way across a boundary, on the routed racks' routers.

A VM that moved into a routed rack by NAT holds an address of the rack's subnet; its rack's
router translates its old (home) address to the new one for the old subnet's clients:

- packets that arrive on the router's uplink leg for the home address are DNATed to the new
  one (the replies are translated back by conntrack);
- connections the VM opens towards the uplink leave with its home address (SNAT);
- the uplink leg answers ARP for the home address (a proxy entry), and says so at once with a
  gratuitous ARP, since the clients' ARP caches still hold the VM's MAC.

On a router the translations are two nftables maps (home -> new, new -> home) in a table of
their own, ``ip vmferry_nat``: adding or removing a VM's is one element each, and the table
goes away with the last one, so a router with no VM away holds nothing of the way.
``NftNat`` drives the lab's router namespaces from the controller's process
(``router_netns``): at the switchover one ``nft -f`` transaction, one netlink socket for the
route and the proxy entry, the ARP frames from packet sockets, then the connection-tracking
entries of the VM's two addresses are flushed (a flow the router tracked before would keep
its old translation, or none, until it expires); ``remove`` flushes them too, and
``stale_flows`` finds translated flows no translation explains (``audit``). ``FakeNat`` keeps
the same in memory.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import time
from abc import ABC, abstractmethod

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmferry.drivers.fabric import router_netns as netns
from vmferry.drivers.fabric.router_netns import RACK_LEG, UPLINK_LEG, RouterNamespaces
from vmferry.errors import FabricError
from vmferry.lab.names import LabLayout
from vmferry.model.addresses import bare
from vmferry.model.topology import Topology

log = logging.getLogger(__name__)

TABLE = "vmferry_nat"
TO_NEW, TO_HOME = "home_to_new", "new_to_home"


class NatBoundary(ABC):
    """Home -> new address translations on the routers of a site, by router node name."""

    @abstractmethod
    def translations(self, router: str) -> dict[str, str]:
        """Home address -> new address, as the router holds them. Raises ``FabricError``."""

    @abstractmethod
    def proxied(self, router: str) -> frozenset[str]:
        """The addresses the router's uplink leg answers ARP for. Raises ``FabricError``."""

    @abstractmethod
    def add(self, router: str, home: str, new: str) -> None:
        """Translate ``home`` to ``new`` and answer for ``home`` (idempotent; addresses bare
        or CIDR); flows the router tracked for either address are forgotten. Raises
        ``FabricError``."""

    @abstractmethod
    def remove(self, router: str, home: str) -> None:
        """Remove the translation of ``home``, its ARP proxy entry and the flows tracked for
        either address (idempotent). Raises ``FabricError``."""

    @abstractmethod
    def stale_flows(self, router: str) -> dict[str, str]:
        """Home -> new of connection-tracking entries that translate ``home`` to ``new``
        while the router's translations do not (leftovers of a removal). Raises
        ``FabricError``."""

    @abstractmethod
    def forget_flows(self, router: str, addresses: list[str]) -> int:
        """Flush the router's connection-tracking entries naming any of ``addresses``;
        returns how many. Raises ``FabricError``."""

    @abstractmethod
    def tell_guest(self, router: str, address: str, line: str) -> str:
        """Send ``line`` to the control port of the guest at ``address`` from the router
        (reached through whichever leg is on its subnet) and return its answer. Raises
        ``FabricError`` when the guest does not answer or refuses."""


GUEST_CONTROL_PORT = 9     # image/init.sh: the guest's control port


class NftNat(NatBoundary):
    """Lab routers: nftables, netlink and packet sockets in the router's namespace."""

    def __init__(self, topology: Topology) -> None:
        layout = LabLayout(topology.name)
        self.namespaces = {rack.router: layout.namespace(rack.router)
                           for rack in topology.routed_racks()}
        self.routers = RouterNamespaces(self.namespaces)

    def translations(self, router: str) -> dict[str, str]:
        return self.routers.run(router, "read the NAT map", _read_map)

    def proxied(self, router: str) -> frozenset[str]:
        def read() -> frozenset[str]:
            with IPRoute() as ipr:
                return netns.proxy_entries(ipr, UPLINK_LEG)
        return self.routers.run(router, "read the proxy entries", read)

    def add(self, router: str, home: str, new: str) -> None:
        home, new = bare(home), bare(new)
        steps: list[tuple[str, float]] = []

        def step(name: str, started: float) -> float:
            now = time.perf_counter()
            steps.append((name, (now - started) * 1000))
            return now

        def realize() -> None:
            started = time.perf_counter()
            _write(router, {home: new}, merge=True)
            started = step("nft", started)
            with IPRoute() as ipr:
                found = netns.legs(ipr)
                up, rack = netns.leg(found, UPLINK_LEG), netns.leg(found, RACK_LEG)
                # The kernel answers ARP for a proxy entry only when the route to the address
                # leaves by another device than the request came in on: a /32 to the new one.
                ipr.route("replace", dst=f"{home}/32", gateway=new, oif=rack.index)
                netns.set_proxy(ipr, up.index, home, True)
                # The router reached the guest at home through the uplink before the move.
                vm_mac = netns.neighbour_macs(ipr, up.index).get(home)
                own = netns.leg_address(ipr, up.index)
            started = step("route+proxy", started)
            subnet = own.network if own is not None else ipaddress.IPv4Network(f"{home}/32")
            netns.send_frames(netns.into_rack_frames(home, vm_mac, subnet, up.mac, rack.mac))
            started = step("arp", started)
            netns.forget_flows_or_warn([home, new])
            step("conntrack", started)

        self.routers.run(router, f"translate {home} to {new}", realize)
        log.info("nat add %s -> %s on %s: %s", home, new, router,
                 ", ".join(f"{name} {ms:.1f} ms" for name, ms in steps))

    def remove(self, router: str, home: str) -> None:
        home = bare(home)

        def undo() -> None:
            current = _read_map()
            new = current.get(home)
            with IPRoute() as ipr:
                found = netns.legs(ipr)
                up, rack = netns.leg(found, UPLINK_LEG), netns.leg(found, RACK_LEG)
                netns.set_proxy(ipr, up.index, home, False)
                _drop_route(ipr, home, rack.index)
                # The router reached the guest at its borrowed address through the rack leg.
                vm_mac = netns.neighbour_macs(ipr, rack.index).get(new) if new else None
                own = netns.leg_address(ipr, up.index)
                known = [] if own is None else netns.in_network(
                    netns.neighbour_macs(ipr, up.index), own.network, skip=home)
            if new is not None:
                _write(router, {h: n for h, n in current.items() if h != home})
            netns.forget_flows_or_warn([home] + ([new] if new else []))
            if own is not None:
                known.append((str(own.ip), up.mac))
            netns.send_frames(netns.out_of_rack_frames(home, vm_mac, known, up.mac))

        self.routers.run(router, f"remove the translation of {home}", undo)

    def stale_flows(self, router: str) -> dict[str, str]:
        def read() -> dict[str, str]:
            held = _read_map()
            return {flow.orig_dst: flow.reply_src for flow in netns.flows()
                    if flow.orig_dst != flow.reply_src
                    and held.get(flow.orig_dst) != flow.reply_src}
        return self.routers.run(router, "read the tracked flows", read)

    def forget_flows(self, router: str, addresses: list[str]) -> int:
        return self.routers.run(router, "flush tracked flows",
                                lambda: netns.forget_flows(bare(a) for a in addresses))

    def tell_guest(self, router: str, address: str, line: str) -> str:
        def talk() -> str:
            return netns.tell(bare(address), GUEST_CONTROL_PORT, line)
        try:
            answer = self.routers.run(router, f"reach the guest at {bare(address)}", talk)
        except FabricError as exc:
            raise FabricError(f"the guest at {bare(address)} did not take {line!r} from "
                              f"router {router}: {exc.message}", switch=router) from exc
        if not answer.startswith("VMFERRY-TALK started"):
            raise FabricError(f"the guest at {bare(address)} did not take {line!r} from "
                              f"router {router}: {answer or 'no answer'}", switch=router)
        return answer


def _drop_route(ipr: IPRoute, home: str, rack_index: int) -> None:
    """The /32 towards the new address, if it is there."""
    try:
        ipr.route("del", dst=f"{home}/32", oif=rack_index)
    except NetlinkError as exc:
        if exc.code not in (errno.ESRCH, errno.ENOENT):
            raise


def _read_map() -> dict[str, str]:
    """Home -> new as the namespace's NAT map holds it (no table: none)."""
    result = netns.nft("-j", "list", "map", "ip", TABLE, TO_NEW)
    if result.returncode != 0:
        if "No such file" in result.stderr:
            return {}
        raise OSError(f"nft list map: {result.stderr.strip()[-300:]}")
    found: dict[str, str] = {}
    for item in json.loads(result.stdout).get("nftables", []):
        for home, new in (item.get("map") or {}).get("elem", []):
            found[str(home)] = str(new)
    return found


def _write(router: str, wanted: dict[str, str], merge: bool = False) -> None:
    """In the namespace: the table as ``wanted`` says, in one nft transaction (none: no
    table). ``merge``: add ``wanted`` to what the table holds without reading it first (the
    switchover's path); when an element it names holds another value, the table is read and
    written whole."""
    if merge:
        result = netns.nft("-f", "-", script=_merge_script(wanted))
        if result.returncode == 0:
            return
        wanted = {**_read_map(), **wanted}
    script = f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"
    if wanted:
        script += _ruleset(wanted)
    result = netns.nft("-f", "-", script=script)
    if result.returncode != 0:
        raise FabricError(f"nft -f failed on router {router}: "
                          f"{(result.stderr or result.stdout).strip()[-300:]}", switch=router)


def _merge_script(wanted: dict[str, str]) -> str:
    """The table, its maps and chains created if missing, its two rules made exactly once,
    and ``wanted``'s elements added (an element already there with the same value is no
    error; with another value, the whole transaction fails and nothing changes)."""
    to_new, to_home = _elements(wanted)
    return (f"table ip {TABLE} {{\n"
            f"  map {TO_NEW} {{ type ipv4_addr : ipv4_addr; }}\n"
            f"  map {TO_HOME} {{ type ipv4_addr : ipv4_addr; }}\n"
            f"  chain prerouting {{ {_HOOK_DNAT} }}\n"
            f"  chain postrouting {{ {_HOOK_SNAT} }}\n"
            f"}}\n"
            f"flush chain ip {TABLE} prerouting\n"
            f"flush chain ip {TABLE} postrouting\n"
            f"add rule ip {TABLE} prerouting {_RULE_DNAT}\n"
            f"add rule ip {TABLE} postrouting {_RULE_SNAT}\n"
            f"add element ip {TABLE} {TO_NEW} {{ {to_new} }}\n"
            f"add element ip {TABLE} {TO_HOME} {{ {to_home} }}\n")


def _elements(wanted: dict[str, str]) -> tuple[str, str]:
    """The two maps' elements for ``wanted`` (home -> new), in nft's syntax."""
    pairs = sorted(wanted.items())
    return (", ".join(f"{home} : {new}" for home, new in pairs),
            ", ".join(f"{new} : {home}" for home, new in pairs))


_HOOK_DNAT = "type nat hook prerouting priority dstnat; policy accept;"
_HOOK_SNAT = "type nat hook postrouting priority srcnat; policy accept;"
_RULE_DNAT = f"iifname \"{UPLINK_LEG}\" dnat to ip daddr map @{TO_NEW}"
_RULE_SNAT = f"oifname \"{UPLINK_LEG}\" snat to ip saddr map @{TO_HOME}"


def _ruleset(wanted: dict[str, str]) -> str:
    """The table with its two maps holding ``wanted`` (home -> new) and its two rules."""
    to_new, to_home = _elements(wanted)
    return (f"table ip {TABLE} {{\n"
            f"  map {TO_NEW} {{ type ipv4_addr : ipv4_addr; elements = {{ {to_new} }} }}\n"
            f"  map {TO_HOME} {{ type ipv4_addr : ipv4_addr; elements = {{ {to_home} }} }}\n"
            f"  chain prerouting {{ {_HOOK_DNAT}\n    {_RULE_DNAT}\n  }}\n"
            f"  chain postrouting {{ {_HOOK_SNAT}\n    {_RULE_SNAT}\n  }}\n"
            f"}}\n")


class FakeNat(NatBoundary):
    """In memory, for the controller's unit tests: the same contract as ``NftNat``.
    ``flows`` stands for the routers' connection tracking: router -> home -> new of the
    translated flows (a test adds some; ``add`` and ``remove`` forget the VM's)."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, str]] = {}
        self.flows: dict[str, dict[str, str]] = {}
        self.told: list[tuple[str, str, str]] = []      # (router, address, line)
        self.guest_refuses = False

    def translations(self, router: str) -> dict[str, str]:
        return dict(self.maps.get(router, {}))

    def proxied(self, router: str) -> frozenset[str]:
        return frozenset(self.maps.get(router, {}))

    def add(self, router: str, home: str, new: str) -> None:
        self.maps.setdefault(router, {})[bare(home)] = bare(new)
        self.forget_flows(router, [home, new])

    def remove(self, router: str, home: str) -> None:
        new = self.maps.get(router, {}).pop(bare(home), None)
        if not self.maps.get(router, True):
            del self.maps[router]
        self.forget_flows(router, [home] + ([new] if new else []))

    def stale_flows(self, router: str) -> dict[str, str]:
        held = self.maps.get(router, {})
        return {home: new for home, new in self.flows.get(router, {}).items()
                if held.get(home) != new}

    def forget_flows(self, router: str, addresses: list[str]) -> int:
        gone = {bare(a) for a in addresses}
        flows = self.flows.get(router, {})
        doomed = [home for home, new in flows.items() if {home, new} & gone]
        for home in doomed:
            del flows[home]
        return len(doomed)

    def tell_guest(self, router: str, address: str, line: str) -> str:
        if self.guest_refuses:
            raise FabricError(f"the guest at {bare(address)} did not answer", switch=router)
        self.told.append((router, bare(address), line))
        return f"VMFERRY-TALK started {line}"
