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
``NftNat`` drives the lab's router namespaces; ``FakeNat`` keeps the same in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from abc import ABC, abstractmethod

from vmferry import privileged
from vmferry.errors import FabricError
from vmferry.lab.names import LabLayout
from vmferry.model.addresses import bare
from vmferry.model.topology import Topology

TABLE = "vmferry_nat"
UPLINK_LEG = "up0"        # the router's leg in the subnet it joins the rack to (lab/router.py)
RACK_LEG = "rk0"
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
        or CIDR). Raises ``FabricError``."""

    @abstractmethod
    def remove(self, router: str, home: str) -> None:
        """Remove the translation of ``home`` and its ARP proxy entry (idempotent). Raises
        ``FabricError``."""

    @abstractmethod
    def tell_guest(self, router: str, address: str, line: str) -> str:
        """Send ``line`` to the control port of the guest at ``address`` from the router
        (reached through whichever leg is on its subnet) and return its answer. Raises
        ``FabricError`` when the guest does not answer or refuses."""


GUEST_CONTROL_PORT = 9     # image/init.sh: the guest's control port


class NftNat(NatBoundary):
    """Lab routers: nftables in the router's namespace, ``ip neigh`` for the proxy entry."""

    def __init__(self, topology: Topology) -> None:
        layout = LabLayout(topology.name)
        self.namespaces = {rack.router: layout.namespace(rack.router)
                           for rack in topology.routed_racks()}

    def _namespace(self, router: str) -> str:
        try:
            return self.namespaces[router]
        except KeyError:
            raise FabricError(f"no router {router}", switch=router) from None

    def _run(self, router: str, argv: list[str], stdin: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = privileged.netns_argv(self._namespace(router), argv)
        try:
            result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                    timeout=15)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FabricError(f"{argv[-1]} on router {router}: {exc}", switch=router) from exc
        if check and result.returncode != 0:
            raise FabricError(f"{' '.join(argv[3:])} failed on router {router}: "
                              f"{(result.stderr or result.stdout).strip()[-300:]}",
                              switch=router)
        return result

    def translations(self, router: str) -> dict[str, str]:
        result = self._run(router, ["nft", "-j", "list", "map", "ip", TABLE, TO_NEW],
                           check=False)
        if result.returncode != 0:
            if "No such file" in result.stderr:
                return {}                 # no table: no translation
            raise FabricError(f"cannot read the NAT map of router {router}: "
                              f"{result.stderr.strip()[-300:]}", switch=router)
        found: dict[str, str] = {}
        for item in json.loads(result.stdout).get("nftables", []):
            for home, new in (item.get("map") or {}).get("elem", []):
                found[str(home)] = str(new)
        return found

    def proxied(self, router: str) -> frozenset[str]:
        out = self._run(router, ["ip", "-4", "neigh", "show", "proxy", "dev", UPLINK_LEG]).stdout
        return frozenset(line.split()[0] for line in out.splitlines() if line.strip())

    def add(self, router: str, home: str, new: str) -> None:
        home, new = bare(home), bare(new)
        self._write(router, {**self.translations(router), home: new})
        # The kernel answers ARP for a proxy entry only when the route to the address leaves
        # by another device than the request came in on: a /32 towards the new address.
        self._run(router, ["ip", "route", "replace", f"{home}/32", "via", new, "dev", RACK_LEG])
        self._run(router, ["ip", "neigh", "replace", "proxy", home, "dev", UPLINK_LEG])
        self._run(router, [sys.executable, "-m", "vmferry.drivers.fabric.nat_wire", "garp",
                           UPLINK_LEG, home])

    def remove(self, router: str, home: str) -> None:
        home = bare(home)
        if home in self.proxied(router):
            self._run(router, ["ip", "neigh", "del", "proxy", home, "dev", UPLINK_LEG])
        current = self.translations(router)
        self._run(router, ["ip", "route", "del", f"{home}/32", "dev", RACK_LEG], check=False)
        if home in current:
            self._write(router, {h: n for h, n in current.items() if h != home})

    def _write(self, router: str, wanted: dict[str, str]) -> None:
        """The whole table as ``wanted`` says, in one nft transaction (none: no table)."""
        script = f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"
        if wanted:
            script += _ruleset(wanted)
        self._run(router, ["nft", "-f", "-"], stdin=script)

    def tell_guest(self, router: str, address: str, line: str) -> str:
        result = self._run(router, [sys.executable, "-m", "vmferry.drivers.fabric.nat_wire",
                                    "tell", bare(address), str(GUEST_CONTROL_PORT), line],
                           check=False)
        answer = result.stdout.strip()
        if result.returncode != 0 or not answer.startswith("VMFERRY-TALK started"):
            raise FabricError(f"the guest at {bare(address)} did not take {line!r} from "
                              f"router {router}: {answer or result.stderr.strip()[-300:]}",
                              switch=router)
        return answer


def _ruleset(wanted: dict[str, str]) -> str:
    """The table with its two maps holding ``wanted`` (home -> new) and its two rules."""
    to_new = ", ".join(f"{home} : {new}" for home, new in sorted(wanted.items()))
    to_home = ", ".join(f"{new} : {home}" for home, new in sorted(wanted.items()))
    return (f"table ip {TABLE} {{\n"
            f"  map {TO_NEW} {{ type ipv4_addr : ipv4_addr; elements = {{ {to_new} }} }}\n"
            f"  map {TO_HOME} {{ type ipv4_addr : ipv4_addr; elements = {{ {to_home} }} }}\n"
            f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n"
            f"    iifname \"{UPLINK_LEG}\" dnat to ip daddr map @{TO_NEW}\n  }}\n"
            f"  chain postrouting {{ type nat hook postrouting priority srcnat; "
            f"policy accept;\n"
            f"    oifname \"{UPLINK_LEG}\" snat to ip saddr map @{TO_HOME}\n  }}\n"
            f"}}\n")


class FakeNat(NatBoundary):
    """In memory, for the controller's unit tests: the same contract as ``NftNat``."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, str]] = {}
        self.told: list[tuple[str, str, str]] = []      # (router, address, line)
        self.guest_refuses = False

    def translations(self, router: str) -> dict[str, str]:
        return dict(self.maps.get(router, {}))

    def proxied(self, router: str) -> frozenset[str]:
        return frozenset(self.maps.get(router, {}))

    def add(self, router: str, home: str, new: str) -> None:
        self.maps.setdefault(router, {})[bare(home)] = bare(new)

    def remove(self, router: str, home: str) -> None:
        self.maps.get(router, {}).pop(bare(home), None)
        if not self.maps.get(router, True):
            del self.maps[router]

    def tell_guest(self, router: str, address: str, line: str) -> str:
        if self.guest_refuses:
            raise FabricError(f"the guest at {bare(address)} did not answer", switch=router)
        self.told.append((router, bare(address), line))
        return f"VMFERRY-TALK started {line}"

