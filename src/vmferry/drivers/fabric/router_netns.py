"""Work in a routed rack's router namespace, shared by both ways across a routed boundary
(the host route, ``router.py``, and NAT, ``nat.py``): entering the namespace, proxy ARP
entries, connection tracking, ARP frames and nftables.

Everything runs in the calling process: ``RouterNamespaces.run`` does a piece of work in a
short-lived thread that entered the router's namespace (``setns`` changes only the calling
thread's), and every socket that work opens (netlink, packet, TCP) and every process it
starts (``nft``) belongs to that namespace. No ``ip netns exec``, no Python process per ARP,
no ``pyroute2`` child process per netlink socket: the way's switchover step costs
milliseconds instead of hundreds of them. Sockets live no longer than the work, so nothing
here keeps a namespace alive after ``lab down`` deleted it.

The helpers below the class expect to run inside ``run``.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.conntrack import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from vmferry.errors import FabricError

RACK_LEG = "rk0"          # the router's leg in its rack (lab/router.py builds it)
UPLINK_LEG = "up0"        # its leg in the subnet the rack is joined to
CLONE_NEWNET = 0x40000000
NTF_PROXY = 0x08          # a proxy ARP entry (ndmsg flags)
NUD_PERMANENT = 0x80
NETNS_DIR = "/var/run/netns"
TIMEOUT_S = 5.0           # a guest's control port, nft

T = TypeVar("T")
log = logging.getLogger(__name__)


class RouterNamespaces:
    """Router node -> its network namespace, and work done inside one."""

    def __init__(self, namespaces: dict[str, str]) -> None:
        self.namespaces = namespaces

    def namespace(self, router: str) -> str:
        try:
            return self.namespaces[router]
        except KeyError:
            raise FabricError(f"no router {router}", switch=router) from None

    def run(self, router: str, what: str, work: Callable[[], T]) -> T:
        """``work()`` inside the router's namespace; its result. Library and system errors
        become ``FabricError`` naming the router and ``what`` was being done."""
        namespace = self.namespace(router)
        result: list[T] = []
        failed: list[BaseException] = []

        def inside() -> None:
            try:
                _enter(namespace)
                result.append(work())
            except BaseException as exc:        # re-raised in the caller's thread
                failed.append(exc)

        thread = threading.Thread(target=inside, name=f"netns-{namespace}")
        thread.start()
        thread.join()
        if failed:
            exc = failed[0]
            if isinstance(exc, FabricError):
                raise exc
            if isinstance(exc, (OSError, NetlinkError, subprocess.SubprocessError)):
                raise FabricError(f"router {router}: cannot {what}: {exc}",
                                  switch=router) from exc
            raise exc
        return result[0]


def _enter(namespace: str) -> None:
    """Move the calling thread into ``namespace``. Raises ``OSError``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"{NETNS_DIR}/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {namespace}: {os.strerror(code)}")
    finally:
        os.close(fd)


# ---- netlink, inside the namespace --------------------------------------------------------


def link_index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise OSError(errno.ENODEV, f"no device {ifname}")
    return int(found[0])


@dataclass(frozen=True)
class Leg:
    index: int
    mac: bytes


def legs(ipr: IPRoute) -> dict[str, Leg]:
    """The namespace's devices by name, from one dump (a look-up by name dumps them all)."""
    return {str(link.get_attr("IFLA_IFNAME")): Leg(int(link["index"]),
                                                    mac_bytes(str(link.get_attr("IFLA_ADDRESS"))))
            for link in ipr.get_links()}


def leg(found: dict[str, Leg], ifname: str) -> Leg:
    if ifname not in found:
        raise OSError(errno.ENODEV, f"no device {ifname}")
    return found[ifname]


def proxy_entries(ipr: IPRoute, ifname: str) -> frozenset[str]:
    """The IPv4 addresses ``ifname`` answers ARP for by a proxy entry."""
    index = link_index(ipr, ifname)
    # The kernel dumps the proxy table only for a request flagged NTF_PROXY; an empty
    # dump_filter makes pyroute2 put the flag into the request instead of filtering on it.
    entries = ipr.neigh("dump", family=socket.AF_INET, dump_filter={}, flags=NTF_PROXY)
    return frozenset(str(e.get_attr("NDA_DST")) for e in entries if e["ifindex"] == index)


def set_proxy(ipr: IPRoute, index: int, address: str, present: bool) -> None:
    """Add or remove the proxy entry for ``address`` on the device ``index`` (idempotent)."""
    try:
        ipr.neigh("replace" if present else "del", dst=address, ifindex=index,
                  flags=NTF_PROXY, state=NUD_PERMANENT)
    except NetlinkError as exc:
        if present or exc.code != errno.ENOENT:
            raise


def neighbour_macs(ipr: IPRoute, index: int) -> dict[str, bytes]:
    """Address -> MAC of the device's neighbour table (any state that has a MAC)."""
    found: dict[str, bytes] = {}
    for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
        dst, lladdr = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
        if dst and lladdr:
            found[str(dst)] = mac_bytes(str(lladdr))
    return found


def in_network(macs: dict[str, bytes], network: ipaddress.IPv4Network,
               skip: str) -> list[tuple[str, bytes]]:
    """(address, MAC) of ``macs`` in ``network`` but ``skip``."""
    return [(a, m) for a, m in sorted(macs.items())
            if a != skip and ipaddress.IPv4Address(a) in network]


def leg_address(ipr: IPRoute, index: int) -> ipaddress.IPv4Interface | None:
    """The device's (first) IPv4 address with its prefix."""
    for addr in ipr.get_addr(family=socket.AF_INET, index=index):
        return ipaddress.IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
    return None


# ---- connection tracking, inside the namespace -------------------------------------------


@dataclass(frozen=True)
class Flow:
    """One connection-tracking entry's addresses: the original direction's and the reply's.
    A DNATed flow has ``orig_dst != reply_src``, a SNATed one ``orig_src != reply_dst``."""

    orig_src: str
    orig_dst: str
    reply_src: str
    reply_dst: str

    def addresses(self) -> frozenset[str]:
        return frozenset((self.orig_src, self.orig_dst, self.reply_src, self.reply_dst))


def _flows(ct: Conntrack) -> list[tuple[Flow, object]]:
    found = []
    for entry in ct.dump_entries():
        orig, reply = entry.tuple_orig, entry.tuple_reply
        found.append((Flow(str(orig.saddr), str(orig.daddr), str(reply.saddr),
                           str(reply.daddr)), entry))
    return found


def flows() -> list[Flow]:
    """The namespace's IPv4 connection-tracking entries."""
    with Conntrack() as ct:
        return [flow for flow, _ in _flows(ct)]


def forget_flows(addresses: Iterable[str]) -> int:
    """Delete exactly the entries that name one of ``addresses`` in either direction (a
    flow translated or steered the old way would otherwise go on so until it expires);
    returns how many. An entry that expired meanwhile is not an error."""
    wanted = frozenset(addresses)
    gone = 0
    with Conntrack() as ct:
        for flow, entry in _flows(ct):
            if flow.addresses() & wanted:
                try:
                    ct.delete(entry)
                    gone += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:
                        raise
    return gone


def forget_flows_or_warn(addresses: list[str]) -> int:
    """``forget_flows`` on a switchover's path: a failure is logged, not raised (the move's
    translation or route is in place by then; ``audit`` reports flows left translated)."""
    try:
        return forget_flows(addresses)
    except (OSError, NetlinkError) as exc:
        log.warning("cannot flush the tracked flows of %s: %s", ", ".join(addresses), exc)
        return 0


# ---- nftables, inside the namespace ------------------------------------------------------


def nft(*argv: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nft ARGV`` (``-f -`` reading ``script``), started from the namespace's thread so
    the process is in the namespace too; the caller checks the return code."""
    return subprocess.run(["nft", *argv], input=script, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)


# ---- a guest's control port, from inside the namespace -----------------------------------


def tell(address: str, port: int, line: str) -> str:
    """Send ``line`` to ``address``:``port`` and return the one-line answer. Raises
    ``OSError``."""
    with socket.create_connection((address, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\n" not in answer:
            chunk = sock.recv(512)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace").strip()


# ---- ARP frames --------------------------------------------------------------------------

BROADCAST = b"\xff" * 6
ETH_P_ARP = 0x0806
# A whole /22 at most: a larger subnet's far addresses keep their cached MACs until they age.
MAX_PEERS = 1024


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def arp_request(dst_mac: bytes, src_mac: bytes, sender_mac: bytes, sender_ip: str,
                target_ip: str) -> bytes:
    """An Ethernet frame with an ARP request ("who has target_ip, tell sender_ip"): a Linux
    host updates (or, when it is the target, creates) its entry sender_ip -> sender_mac."""
    return (dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + sender_mac + socket.inet_aton(sender_ip)
            + b"\x00" * 6 + socket.inet_aton(target_ip))


def peers(subnet: ipaddress.IPv4Network, skip: str) -> list[str]:
    """Every host address of ``subnet`` but ``skip`` (at most MAX_PEERS)."""
    result: list[str] = []
    for host in subnet.hosts():
        if str(host) != skip:
            result.append(str(host))
        if len(result) >= MAX_PEERS:
            break
    return result


def send_frames(frames: list[tuple[str, bytes]]) -> int:
    """Send each (leg, frame) from a send-only packet socket on that leg; how many went.
    The sockets take no protocol, so opening them registers no receive hook (that costs an
    RCU grace period, ~10 ms); closing one still waits for one, so a thread of its own
    closes them after the frames are out."""
    sockets: dict[str, socket.socket] = {}
    try:
        for leg, frame in frames:
            if leg not in sockets:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                sockets[leg] = sock
                sock.bind((leg, 0))
            sockets[leg].send(frame)
    finally:
        threading.Thread(target=_close, args=(list(sockets.values()),),
                         name="arp-socket-close", daemon=True).start()
    return len(frames)


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def into_rack_frames(address: str, vm_mac: bytes | None, subnet: ipaddress.IPv4Network,
                     up_mac: bytes, rack_mac: bytes) -> list[tuple[str, bytes]]:
    """A VM of ``subnet`` at ``address`` is now behind the rack leg: the uplink's clients
    learn ``address`` at the uplink leg's MAC (a gratuitous ARP), and the VM learns every
    other address of its subnet at the rack leg's MAC (requests addressed to it, unicast
    when its MAC is known), so its replies reach the router instead of a MAC it cannot
    reach from the rack. ``up_mac``, ``rack_mac``: the legs' own MACs."""
    frames = [(UPLINK_LEG, arp_request(BROADCAST, up_mac, up_mac, address, address))]
    frames += [(RACK_LEG, arp_request(vm_mac or BROADCAST, rack_mac, rack_mac, peer, address))
               for peer in peers(subnet, address)]
    return frames


def out_of_rack_frames(address: str, vm_mac: bytes | None, known: list[tuple[str, bytes]],
                       up_mac: bytes) -> list[tuple[str, bytes]]:
    """The VM at ``address`` is back on the uplink's segment: its clients learn it at
    ``vm_mac`` again (when known), and the VM learns the ``known`` (address, MAC) uplink
    neighbours at their own MACs (``up_mac``: the uplink leg's)."""
    frames = []
    if vm_mac is not None:
        frames.append((UPLINK_LEG, arp_request(BROADCAST, up_mac, vm_mac, address, address)))
    frames += [(UPLINK_LEG, arp_request(vm_mac or BROADCAST, up_mac, peer_mac, peer, address))
               for peer, peer_mac in known]
    return frames
