"""An in-memory fabric for unit tests: switches with ports, trunk VLANs, learned MACs and
rules by cookie, all as plain data a test can read and set."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vmferry.drivers.fabric.base import Fabric
from vmferry.drivers.fabric.router import Router
from vmferry.errors import FabricError
from vmferry.model.switchover import PortInfo, Rule, SwitchPorts
from vmferry.model.topology import Topology


@dataclass
class FakeSwitch:
    ports: dict[str, PortInfo] = field(default_factory=dict)
    rules: dict[int, list[Rule]] = field(default_factory=dict)
    learned: dict[str, str] = field(default_factory=dict)     # mac -> port
    pinned: dict[tuple[int, str], str] = field(default_factory=dict)   # (vlan, mac) -> port
    moves: int = 0


class FakeFabric(Fabric):
    """``switches`` by name; ``fail`` names switches whose every call raises ``FabricError``
    (an unreachable switch); ``calls`` records (method, switch) in order."""

    def __init__(self, switches: dict[str, FakeSwitch] | None = None) -> None:
        self.switches: dict[str, FakeSwitch] = switches or {}
        self.fail: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, topology: Topology) -> FakeFabric:
        """The topology's switches: a trunk port per link (carrying nothing yet) and an
        access port per client, numbered from 1 in that order."""
        switches = {s.name: FakeSwitch() for s in topology.switches}
        for trunk in topology.trunks():
            for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port)):
                if node in switches:
                    ports = switches[node].ports
                    ports[port] = PortInfo(len(ports) + 1, trunk_vlans=frozenset())
        for client in topology.clients:
            ports = switches[client.switch].ports
            ports[f"a-{client.name}"] = PortInfo(len(ports) + 1, access_vlan=client.vlan)
        return cls(switches)

    def _get(self, method: str, switch: str) -> FakeSwitch:
        with self._lock:
            self.calls.append((method, switch))
        if switch in self.fail:
            raise FabricError(f"switch {switch} unreachable", switch=switch)
        if switch not in self.switches:
            raise FabricError(f"no switch {switch}", switch=switch)
        return self.switches[switch]

    def _port(self, method: str, switch: str, port: str) -> PortInfo:
        info = self._get(method, switch).ports.get(port)
        if info is None:
            raise FabricError(f"switch {switch} has no port {port}", switch=switch, port=port)
        return info

    def trunk_vlans(self, switch: str, port: str) -> frozenset[int]:
        return self._port("trunk_vlans", switch, port).trunk_vlans or frozenset()

    def set_trunk_vlans(self, switch: str, port: str, vlans: frozenset[int]) -> None:
        info = self._port("set_trunk_vlans", switch, port)
        self.switches[switch].ports[port] = PortInfo(info.ofport, None, frozenset(vlans))

    def forget_mac(self, switch: str, mac: str) -> None:
        self._get("forget_mac", switch).learned.pop(mac.lower(), None)

    def pin_mac(self, switch: str, port: str, vlan: int, mac: str) -> bool:
        known = self._get("pin_mac", switch)
        if port not in known.ports:
            raise FabricError(f"switch {switch} has no port {port}", switch=switch, port=port)
        known.pinned[(vlan, mac.lower())] = port
        known.learned[mac.lower()] = port
        return True

    def unpin_mac(self, switch: str, vlan: int, mac: str, drain: bool = False) -> None:
        known = self._get("unpin_mac", switch)
        if known.pinned.pop((vlan, mac.lower()), None) is not None:
            known.learned.pop(mac.lower(), None)

    def pinned_macs(self, switch: str) -> set[tuple[int, str]]:
        return set(self._get("pinned_macs", switch).pinned)

    def learn(self, switch: str, mac: str, port: str) -> None:
        """What a frame from ``mac`` entering ``port`` teaches the switch (tests call it); a
        pinned MAC teaches nothing."""
        known = self._get("learn", switch)
        if any(m == mac.lower() for _, m in known.pinned):
            return
        before = known.learned.get(mac.lower())
        if before is not None and before != port:
            known.moves += 1
        known.learned[mac.lower()] = port

    def switch_ports(self, switch: str) -> SwitchPorts:
        return SwitchPorts(dict(self._get("switch_ports", switch).ports))

    def replace_rules(self, switch: str, cookie: int, rules: list[Rule],
                      known_empty: bool = False) -> None:
        known = self._get("replace_rules", switch)
        if rules:
            known.rules[cookie] = list(rules)
        else:
            known.rules.pop(cookie, None)

    def rule_cookies(self, switch: str) -> set[int]:
        return set(self._get("rule_cookies", switch).rules)

    def mac_moves(self, switch: str) -> int:
        return self._get("mac_moves", switch).moves


class FakeRouter(Router):
    """Routers' /32s and proxy entries as sets of addresses by router name; ``announced``
    records (router, address, into_rack) of every ``announce``; ``fail`` as FakeFabric's."""

    def __init__(self, routers: list[str]) -> None:
        self.routes: dict[str, set[str]] = {name: set() for name in routers}
        self.proxies: dict[str, set[str]] = {name: set() for name in routers}
        self.announced: list[tuple[str, str, bool]] = []
        self.fail: set[str] = set()

    def _get(self, router: str) -> set[str]:
        if router in self.fail or router not in self.routes:
            raise FabricError(f"router {router} unreachable", switch=router)
        return self.routes[router]

    def host_routes(self, router: str) -> frozenset[str]:
        return frozenset(self._get(router))

    def add_host_route(self, router: str, address: str) -> None:
        self._get(router).add(address.split("/")[0])

    def remove_host_route(self, router: str, address: str) -> None:
        self._get(router).discard(address.split("/")[0])

    def proxy_entries(self, router: str) -> frozenset[str]:
        self._get(router)
        return frozenset(self.proxies[router])

    def add_proxy(self, router: str, address: str) -> None:
        self._get(router)
        self.proxies[router].add(address.split("/")[0])

    def remove_proxy(self, router: str, address: str) -> None:
        self._get(router)
        self.proxies[router].discard(address.split("/")[0])

    def announce(self, router: str, address: str, mac: str, subnet: str,
                 into_rack: bool) -> int:
        self._get(router)
        self.announced.append((router, address.split("/")[0], into_rack))
        return 1
