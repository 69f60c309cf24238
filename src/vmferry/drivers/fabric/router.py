"""The routers between subnets: what the "route" way across a boundary puts on them.

A VM that moved into a routed rack by the "route" way keeps its address and its gateway; its
rack's router gets a /32 to it through its leg in the rack (proxy ARP on both legs, set up
with the router, then answers ARP for it in the old subnet and for the old subnet in the
rack), and a proxy entry on the rack leg for the VM's old gateway (inert when that gateway is
the router's own address, as in the lab; needed when it is another router's). ARP caches
that still point the old way are re-pointed at the switchover (``announce``): a cached MAC
would otherwise be used until it ages out, tens of seconds.

``NetnsRouter`` drives the lab's router namespaces (pyroute2, ``ip neigh`` for the proxy
table, a packet socket for the ARP frames); ``FakeRouter`` (``fake.py``) keeps them in memory
for unit tests. ``controller.route_way`` decides what each router should hold.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import struct
import threading
from abc import ABC, abstractmethod

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmferry import privileged
from vmferry.errors import FabricError, VmferryError

RACK_LEG = "rk0"          # the router's leg in its rack (lab/router.py builds it)
UPLINK_LEG = "up0"        # its leg in the subnet the rack is joined to
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
        # A /32 with a gateway is the NAT way's (old address via the new one), not a host route.
        return frozenset(str(r.get_attr("RTA_DST")) for r in routes
                         if r["dst_len"] == 32 and r.get_attr("RTA_GATEWAY") is None)

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

    def proxy_entries(self, router: str) -> frozenset[str]:
        out = self._ip(router, "-4", "-j", "neigh", "show", "proxy", "dev", RACK_LEG)
        try:
            return frozenset(str(e["dst"]) for e in json.loads(out or "[]"))
        except (ValueError, KeyError, TypeError) as exc:
            raise FabricError(f"cannot read the proxy entries of router {router}: {exc}",
                              switch=router) from exc

    def add_proxy(self, router: str, address: str) -> None:
        self._ip(router, "neigh", "replace", "proxy", _host_address(address), "dev", RACK_LEG)

    def remove_proxy(self, router: str, address: str) -> None:
        if _host_address(address) in self.proxy_entries(router):
            self._ip(router, "neigh", "del", "proxy", _host_address(address), "dev", RACK_LEG)

    def _ip(self, router: str, *argv: str) -> str:
        try:
            return privileged.run_in_namespace(self._namespace(router), ["ip", *argv],
                                               timeout=10).stdout
        except VmferryError as exc:
            raise FabricError(f"router {router}: ip {' '.join(argv)}: {exc.message}",
                              switch=router) from exc

    def announce(self, router: str, address: str, mac: str, subnet: str,
                 into_rack: bool) -> int:
        vm_ip, vm_mac = _host_address(address), _mac_bytes(mac)
        namespace = self._namespace(router)
        try:
            uplink = _packet_socket(namespace, UPLINK_LEG)
            rack = _packet_socket(namespace, RACK_LEG)
        except OSError as exc:
            raise FabricError(f"cannot open router {router}'s legs to send ARP: {exc}",
                              switch=router) from exc
        with uplink, rack:
            up_mac, rack_mac = _own_mac(uplink), _own_mac(rack)
            if into_rack:
                frames = [(uplink, _arp(BROADCAST, up_mac, up_mac, vm_ip, vm_ip))]
                frames += [(rack, _arp(vm_mac, rack_mac, rack_mac, peer, vm_ip))
                           for peer in _peers(subnet, vm_ip)]
            else:
                frames = [(uplink, _arp(BROADCAST, up_mac, vm_mac, vm_ip, vm_ip))]
                frames += [(uplink, _arp(vm_mac, up_mac, peer_mac, peer, vm_ip))
                           for peer, peer_mac in self._uplink_neighbours(router, subnet,
                                                                          vm_ip, up_mac)]
            try:
                for sock, frame in frames:
                    sock.send(frame)
            except OSError as exc:
                raise FabricError(f"router {router}: cannot send ARP: {exc}",
                                  switch=router) from exc
        return len(frames)

    def _uplink_neighbours(self, router: str, subnet: str, vm_ip: str,
                           up_mac: bytes) -> list[tuple[str, bytes]]:
        """(address, MAC) of the router's resolved uplink neighbours in ``subnet`` (the VM's
        own address aside), and the router's own uplink address."""
        network = ipaddress.IPv4Network(subnet)
        found: list[tuple[str, bytes]] = []
        try:
            with IPRoute(netns=self._namespace(router)) as ipr:
                leg = ipr.link_lookup(ifname=UPLINK_LEG)
                for entry in ipr.get_neighbours(family=2, ifindex=leg[0] if leg else 0):
                    dst, lladdr = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
                    if dst and lladdr and dst != vm_ip \
                            and ipaddress.IPv4Address(dst) in network:
                        found.append((str(dst), _mac_bytes(str(lladdr))))
                for addr in ipr.get_addr(family=2, index=leg[0] if leg else 0):
                    own = addr.get_attr("IFA_ADDRESS")
                    if own and ipaddress.IPv4Address(own) in network:
                        found.append((str(own), up_mac))
        except (OSError, NetlinkError) as exc:
            raise FabricError(f"cannot read router {router}'s uplink neighbours: {exc}",
                              switch=router) from exc
        return found


# ---- ARP frames ------------------------------------------------------------------------------

BROADCAST = b"\xff" * 6
ETH_P_ARP = 0x0806
CLONE_NEWNET = 0x40000000
# A whole /22 at most: a larger subnet's far addresses keep their cached MACs until they age.
MAX_PEERS = 1024


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _arp(dst_mac: bytes, src_mac: bytes, sender_mac: bytes, sender_ip: str,
         target_ip: str) -> bytes:
    """An Ethernet frame with an ARP request ("who has target_ip, tell sender_ip"): a Linux
    host updates (or, when it is the target, creates) its entry sender_ip -> sender_mac."""
    return (dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + sender_mac + socket.inet_aton(sender_ip)
            + b"\x00" * 6 + socket.inet_aton(target_ip))


def _peers(subnet: str, vm_ip: str) -> list[str]:
    """Every host address of ``subnet`` but the VM's own (at most MAX_PEERS)."""
    result: list[str] = []
    for host in ipaddress.IPv4Network(subnet).hosts():
        if str(host) != vm_ip:
            result.append(str(host))
        if len(result) >= MAX_PEERS:
            break
    return result


def _own_mac(sock: socket.socket) -> bytes:
    return bytes(sock.getsockname()[4])


def _packet_socket(namespace: str, ifname: str) -> socket.socket:
    """A raw packet socket bound to ``ifname`` in ``namespace``. A socket stays in the network
    namespace it was made in: a short-lived thread enters the namespace (setns changes only
    the calling thread's), makes it, and ends. Raises ``OSError``."""
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            sock.bind((ifname, 0))
            made.append(sock)
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]
