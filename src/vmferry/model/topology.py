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


class Rack(_Strict):
    name: str
    tor: str

    @model_validator(mode="after")
    def _name(self) -> Rack:
        _check_name(self.name, "rack")
        return self


class Link(_Strict):
    """An 802.1Q trunk between two fabric switches. ``vlans``: the VLANs the site allows on
    it (None: any); a VLAN not allowed here cannot be carried across it."""

    a: str
    b: str
    vlans: list[VlanId] | None = None


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
            [c.name for c in self.clients]
        clash = {n for n in nodes if nodes.count(n) > 1}
        if clash:
            raise ValueError(f"node names must be unique across switches, hosts and clients: "
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
        result = [Trunk(a=link.a, a_port=short_ifname("t-", link.b),
                        b=link.b, b_port=short_ifname("t-", link.a)) for link in self.links]
        for host in self.hosts:
            tor = self.tor_of(host.name)
            result.append(Trunk(a=host.name, a_port=HOST_UPLINK_PORT,
                                b=tor, b_port=short_ifname("h-", host.name)))
        return result

    def access_port(self, client: str) -> str:
        return short_ifname("a-", client)


class Trunk(BaseModel):
    """One trunk between two nodes of the fabric graph, with the port name at each end."""

    model_config = ConfigDict(frozen=True)
    a: str
    a_port: str
    b: str
    b_port: str

    @property
    def key(self) -> str:
        return f"{self.a}:{self.a_port}~{self.b}:{self.b_port}"


def _unique(field: str, names: list[str], key: str = "name") -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{i}].{key}: duplicate {name!r}")
        seen.add(name)


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
