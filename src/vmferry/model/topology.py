"""A data center's inventory as the operator writes it: racks, switches, trunks, hosts, clients.

The same format describes the built-in lab (``kind: lab``: every node becomes a network
namespace on this machine) and a real site (``kind: site``: hosts and switches are reached by
address). Validation is strict: unknown keys and dangling references are refused with the
field path and the reason.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vmferry.errors import InputError
from vmferry.model.network import InterfaceCidr, NetworkCidr, VlanId, short_ifname
from vmferry.model.validation import parse

NodeName = str
HOST_BRIDGE = "br-vm"          # each host's softswitch bridge
SWITCH_BRIDGE = "br-fabric"    # each fabric switch's bridge
HOST_UPLINK_PORT = "uplink"    # the host's trunk port towards its ToR
MIGRATION_IFNAME = "mig0"      # the host's interface on the migration network


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str, what: str) -> str:
    if not value or len(value) > 40 or not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError(f"{what} name {value!r} must be 1-40 letters, digits, '-' or '_'")
    return value


class Vlan(_Strict):
    id: VlanId
    name: str = ""
    subnet: NetworkCidr | None = None


class Switch(_Strict):
    name: str
    role: Literal["tor", "spine", "leaf", "core"] = "tor"
    rack: str | None = None
    ovsdb: str | None = None       # site only: e.g. "tcp:10.0.0.5:6640"
    openflow: str | None = None    # site only: e.g. "tcp:10.0.0.5:6653"
    unixctl: str | None = None     # ovs-vswitchd control socket, where reachable

    @model_validator(mode="after")
    def _name(self) -> Switch:
        _check_name(self.name, "switch")
        return self


class RouterLeg(_Strict):
    """A routed rack's router's leg in the subnet the rack is joined to: an access port of a
    fabric switch outside the rack, in that subnet's VLAN."""

    switch: str
    vlan: VlanId
    ip: InterfaceCidr


class Rack(_Strict):
    """A rack: its ToR and hosts. A ``routed`` rack is another subnet: its hosts' VLAN
    (``vlan``, ``subnet``) reaches the rest of the site only through its router (a node with
    IP forwarding, ``gateway`` its address in the rack's subnet, ``uplink`` its leg outside).
    Its ToR is linked to the rest only by a ``tunnel`` link (VXLAN between the two ToRs over
    ``transit``, a /29 the router joins: the way to stretch a VLAN into the rack)."""

    name: str
    tor: str
    routed: bool = False
    vlan: VlanId | None = None
    subnet: NetworkCidr | None = None
    gateway: InterfaceCidr | None = None
    uplink: RouterLeg | None = None
    transit: NetworkCidr | None = None

    @model_validator(mode="after")
    def _name(self) -> Rack:
        _check_name(self.name, "rack")
        routed_fields = ("vlan", "subnet", "gateway", "uplink", "transit")
        if not self.routed:
            given = [f for f in routed_fields if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{given[0]}: only a routed rack has one (set routed: true)")
            return self
        for f in routed_fields:
            if getattr(self, f) is None:
                raise ValueError(f"{f}: required for a routed rack")
        assert self.subnet and self.gateway and self.transit
        if ipaddress.ip_interface(self.gateway).ip not in ipaddress.ip_network(self.subnet):
            raise ValueError(f"gateway: {self.gateway} is outside the rack's subnet "
                             f"{self.subnet}")
        if ipaddress.ip_network(self.transit).prefixlen > 29:
            raise ValueError(f"transit: {self.transit} is too small (a /29 or larger: two "
                             f"point-to-point /30s through the router)")
        return self

    @property
    def router(self) -> str:
        """The node name of a routed rack's router."""
        return f"rtr-{self.name}"


class Link(_Strict):
    """An 802.1Q trunk between two fabric switches. ``vlans``: the VLANs the site allows on
    it (None: any); a VLAN not allowed here cannot be carried across it."""

    a: str
    b: str
    vlans: list[VlanId] | None = None
    # A VXLAN tunnel between a routed rack's ToR and its router's uplink switch (over the
    # router), not a cable: the lab builds it from the rack's ``transit``.
    tunnel: bool = False


class Host(_Strict):
    name: str
    rack: str
    memory_mib: int = Field(4096, ge=256, le=16 * 1024 * 1024)
    max_migrations: int = Field(2, ge=1, le=64)
    migration_ip: InterfaceCidr | None = None
    agent_url: str | None = None   # site only; the lab derives a unix socket
    agent_token_file: str | None = None
    # Placement: the security zone the host belongs to (a zoned host takes only VMs of its
    # zone, and a zoned VM only hosts of its zone), free-form labels, the migration link's
    # bandwidth, the VLANs its uplink may carry (None: any), what its softswitch can do.
    zone: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    migration_mbps: int = Field(10_000, ge=1, le=1_000_000)
    uplink_vlans: list[VlanId] | None = None
    softswitch_features: list[Literal["meters"]] = Field(
        default_factory=lambda: list[Literal["meters"]](["meters"]))
    # Who runs the host's guests: the agent's own QEMU (QMP) or the host's libvirt daemon.
    hypervisor: Literal["qemu", "libvirt"] = "qemu"

    @property
    def pauses_before_switchover(self) -> bool:
        """Whether the host's driver can hold a migration in "pre-switchover" (libvirt owns
        migrate-continue: drivers/hypervisor/libvirt.py PAUSE_BEFORE_SWITCHOVER)."""
        return self.hypervisor == "qemu"

    @model_validator(mode="after")
    def _name(self) -> Host:
        _check_name(self.name, "host")
        if self.zone is not None:
            _check_name(self.zone, "zone")
        return self


class Client(_Strict):
    """A node on an access port of a fabric switch: a tenant's client, a router, a probe."""

    name: str
    switch: str
    vlan: VlanId
    ip: InterfaceCidr

    @model_validator(mode="after")
    def _name(self) -> Client:
        _check_name(self.name, "client")
        return self


class Topology(_Strict):
    name: str = "lab"
    kind: Literal["lab", "site"] = "lab"
    migration_network: NetworkCidr = "203.0.113.0/24"
    # Guests start with PCIe root ports, their NIC on one, so a NIC can be hot-plugged (the
    # "dual" NIC way needs it). Off by default: with it, a postcopy migration whose link is cut
    # left the destination QEMU unable to answer QMP, so recovery could not pause it.
    guest_hotplug: bool = False
    shared_storage: str | None = None   # lab: defaults to a directory under the lab's state
    vlans: list[Vlan] = Field(default_factory=list)
    switches: list[Switch]
    racks: list[Rack]
    links: list[Link] = Field(default_factory=list)
    hosts: list[Host]
    clients: list[Client] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Topology:
        _check_name(self.name, "topology")
        _unique("switches", [s.name for s in self.switches])
        _unique("racks", [r.name for r in self.racks])
        _unique("hosts", [h.name for h in self.hosts])
        _unique("clients", [c.name for c in self.clients])
        _unique("vlans", [str(v.id) for v in self.vlans], key="id")
        nodes = [s.name for s in self.switches] + [h.name for h in self.hosts] + \
            [c.name for c in self.clients] + [r.router for r in self.racks if r.routed]
        clash = {n for n in nodes if nodes.count(n) > 1}
        if clash:
            raise ValueError(f"node names must be unique across switches, hosts, clients and "
                             f"routers: "
                             f"{sorted(clash)}")
        switches = {s.name for s in self.switches}
        racks = {r.name for r in self.racks}
        for i, rack in enumerate(self.racks):
            if rack.tor not in switches:
                raise ValueError(f"racks[{i}].tor: unknown switch {rack.tor!r}")
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in switches:
                    raise ValueError(f"links[{i}].{end}: unknown switch {getattr(link, end)!r}")
            if link.a == link.b:
                raise ValueError(f"links[{i}]: a link must join two different switches")
        _check_routed_racks(self)
        for i, host in enumerate(self.hosts):
            if host.rack not in racks:
                raise ValueError(f"hosts[{i}].rack: unknown rack {host.rack!r}")
        vlan_ids = {v.id for v in self.vlans}
        for i, client in enumerate(self.clients):
            if client.switch not in switches:
                raise ValueError(f"clients[{i}].switch: unknown switch {client.switch!r}")
            if vlan_ids and client.vlan not in vlan_ids:
                raise ValueError(f"clients[{i}].vlan: VLAN {client.vlan} is not declared in vlans")
        for i, switch in enumerate(self.switches):
            if switch.rack is not None and switch.rack not in racks:
                raise ValueError(f"switches[{i}].rack: unknown rack {switch.rack!r}")
        if not self.hosts:
            raise ValueError("hosts: a topology needs at least one host")
        _check_tree(self)
        if self.kind == "site":
            for i, host in enumerate(self.hosts):
                if not host.agent_url:
                    raise ValueError(f"hosts[{i}].agent_url: required for a site")
            for i, switch in enumerate(self.switches):
                if not switch.ovsdb:
                    raise ValueError(f"switches[{i}].ovsdb: required for a site")
        mig = ipaddress.ip_network(self.migration_network)
        if mig.num_addresses - 2 < len(self.hosts):
            raise ValueError("migration_network: too small for the number of hosts")
        return self

    # ---- derived views ------------------------------------------------------------------

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise InputError("host", f"unknown host {name!r}")

    def switch(self, name: str) -> Switch:
        for switch in self.switches:
            if switch.name == name:
                return switch
        raise InputError("switch", f"unknown switch {name!r}")

    def tor_of(self, host: str) -> str:
        rack = self.host(host).rack
        return next(r.tor for r in self.racks if r.name == rack)

    def vlan_subnet(self, vlan: int) -> str | None:
        return next((v.subnet for v in self.vlans if v.id == vlan), None)

    def migration_address(self, host: str) -> str:
        """The host's address on the migration network, CIDR form."""
        explicit = self.host(host).migration_ip
        if explicit:
            return explicit
        net = ipaddress.ip_network(self.migration_network)
        index = [h.name for h in self.hosts].index(host)
        return f"{net.network_address + index + 1}/{net.prefixlen}"

    def trunks(self) -> list[Trunk]:
        """Every trunk of the fabric: switch-to-switch links and host uplinks."""
        prefix = {False: "t-", True: "x-"}
        result = [Trunk(a=link.a, a_port=short_ifname(prefix[link.tunnel], link.b),
                        b=link.b, b_port=short_ifname(prefix[link.tunnel], link.a),
                        tunnel=link.tunnel) for link in self.links]
        for host in self.hosts:
            tor = self.tor_of(host.name)
            result.append(Trunk(a=host.name, a_port=HOST_UPLINK_PORT,
                                b=tor, b_port=short_ifname("h-", host.name)))
        return result

    def access_port(self, client: str) -> str:
        return short_ifname("a-", client)

    def routed_racks(self) -> list[Rack]:
        return [rack for rack in self.racks if rack.routed]

    def rack_of_tor(self, switch: str) -> Rack | None:
        return next((rack for rack in self.racks if rack.tor == switch), None)


class Trunk(BaseModel):
    """One trunk between two nodes of the fabric graph, with the port name at each end."""

    model_config = ConfigDict(frozen=True)
    a: str
    a_port: str
    b: str
    b_port: str
    tunnel: bool = False

    @property
    def key(self) -> str:
        return f"{self.a}:{self.a_port}~{self.b}:{self.b_port}"


def _unique(field: str, names: list[str], key: str = "name") -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{i}].{key}: duplicate {name!r}")
        seen.add(name)


def _check_routed_racks(topo: Topology) -> None:
    """A routed rack's router legs name known switches and declared VLANs, and its ToR is
    joined to the rest only by a tunnel to its router's uplink switch."""
    switches = {s.name for s in topo.switches}
    vlans = {v.id: v for v in topo.vlans}
    routed_tors = {rack.tor for rack in topo.racks if rack.routed}
    for j, link in enumerate(topo.links):
        if link.tunnel and not {link.a, link.b} & routed_tors:
            raise ValueError(f"links[{j}].tunnel: a tunnel must end at a routed rack's ToR")
    transits: list[tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for i, rack in enumerate(topo.racks):
        if not rack.routed:
            continue
        assert rack.uplink and rack.vlan and rack.subnet and rack.transit
        where = f"racks[{i}]"
        if rack.uplink.switch not in switches:
            raise ValueError(f"{where}.uplink.switch: unknown switch {rack.uplink.switch!r}")
        if rack.uplink.switch == rack.tor:
            raise ValueError(f"{where}.uplink.switch: the router's uplink must be outside "
                             f"the rack (not its ToR {rack.tor!r})")
        for field, vlan in (("vlan", rack.vlan), ("uplink.vlan", rack.uplink.vlan)):
            if vlans and vlan not in vlans:
                raise ValueError(f"{where}.{field}: VLAN {vlan} is not declared in vlans")
        if rack.vlan == rack.uplink.vlan:
            raise ValueError(f"{where}.vlan: a routed rack needs a VLAN of its own, not its "
                             f"uplink's {rack.uplink.vlan}")
        declared = vlans.get(rack.vlan)
        if declared and declared.subnet and declared.subnet != rack.subnet:
            raise ValueError(f"{where}.subnet: {rack.subnet} differs from VLAN {rack.vlan}'s "
                             f"subnet {declared.subnet}")
        uplink_subnet = vlans[rack.uplink.vlan].subnet if rack.uplink.vlan in vlans else None
        if uplink_subnet and ipaddress.ip_interface(rack.uplink.ip).ip not in \
                ipaddress.ip_network(uplink_subnet):
            raise ValueError(f"{where}.uplink.ip: {rack.uplink.ip} is outside VLAN "
                             f"{rack.uplink.vlan}'s subnet {uplink_subnet}")
        transit = ipaddress.ip_network(rack.transit)
        for k, other in transits:
            if transit.overlaps(other):
                raise ValueError(f"{where}.transit: overlaps racks[{k}].transit")
        transits.append((i, transit))
    for rack in topo.routed_racks():
        assert rack.uplink is not None
        for j, link in enumerate(topo.links):
            joins = {link.a, link.b}
            if rack.tor in joins and not link.tunnel:
                raise ValueError(f"links[{j}]: {rack.tor} is the ToR of routed rack "
                                 f"{rack.name!r}: only a tunnel link may join it")
            if rack.tor in joins and rack.uplink.switch not in joins:
                raise ValueError(f"links[{j}]: a tunnel to routed rack {rack.name!r} must "
                                 f"end at its router's uplink switch {rack.uplink.switch!r}")


def _check_tree(topo: Topology) -> None:
    """Trunks must form a tree: with no spanning tree protocol a loop would melt the fabric,
    and an unreachable switch could never carry a VM's VLAN."""
    adjacency: dict[str, set[str]] = defaultdict(set)
    for i, link in enumerate(topo.links):
        if link.b in adjacency[link.a]:
            raise ValueError(f"links[{i}]: duplicate link between {link.a} and {link.b}")
        adjacency[link.a].add(link.b)
        adjacency[link.b].add(link.a)
    switches = [s.name for s in topo.switches]
    if len(topo.links) != len(switches) - 1:
        raise ValueError("links: switches must be joined in a tree (no loops, none cut off): "
                         f"{len(switches)} switches need exactly {len(switches) - 1} links")
    seen = {switches[0]}
    stack = [switches[0]]
    while stack:
        for peer in adjacency[stack.pop()]:
            if peer not in seen:
                seen.add(peer)
                stack.append(peer)
    cut_off = sorted(set(switches) - seen)
    if cut_off:
        raise ValueError(f"links: switches {cut_off} are not connected to the rest")


def load_topology(source: str | Path | dict[str, Any]) -> Topology:
    """Read a topology from a YAML file (or an already parsed dict).

    Raises InputError naming the field and the reason."""
    if isinstance(source, dict):
        data: Any = source
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InputError("topology", f"cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise InputError("topology", f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError("topology", "must be a mapping")
    return parse(Topology, data, prefix="topology")


def default_topology_path() -> Path:
    return Path(__file__).resolve().parent.parent / "examples" / "two-racks.yaml"
