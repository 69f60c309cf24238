"""Where a VM may run, and every reason it may not: no I/O, the same code for the controller,
the migration precheck, drains, balancing, failure restarts and the simulated data center.

A ``Cluster`` is a snapshot: hosts (capacity, zone, state, what their agent reports), VMs (with
their policies and placements), moves in flight, and a ``NetworkView`` of which VLANs the
fabric's trunks may carry. ``Cluster.verdict(vm, host)`` answers yes or no with every reason;
``where`` does it for every host; ``plan_drain`` and ``plan_balance`` choose destinations.

Rules (each a ``Code``):
- ``state``: only hosts that are up take VMs (not maintenance, down, suspected, fenced, cleaning).
- ``zone``: a zoned VM goes only to hosts of its zone; a zoned host takes only VMs of its zone.
- ``allowed``/``forbidden``: the VM's allowed (if given) and forbidden host lists.
- ``capacity``: memory left after the VMs there and the moves heading there.
- ``anti_affinity``: no other member of any of the VM's anti-affinity groups on the host.
- ``affinity``: if other members of its affinity groups run on up hosts, only those hosts.
- ``vlan``: every trunk between the VM's host and the candidate (and the VLAN's other
  endpoints) may carry the VLAN.
- ``profile``: the host's softswitch can realize the port profile (e.g. meters for QoS).
- ``qemu``/``machine``: QEMU no older than the source's; the q35 machine type.
- ``storage``/``migration_address``: sees the source's shared storage; has a migration address.
- ``downtime``: the migration link outruns the VM's dirty rate, so precopy can converge to the
  VM's max downtime.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmferry.model.profile import PortProfile
from vmferry.model.topology import Topology

NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$"
MACHINE = "q35"
DEFAULT_TIER = 2


class HostState(StrEnum):
    UP = "up"
    MAINTENANCE = "maintenance"
    DOWN = "down"            # its agent does not heartbeat
    SUSPECTED = "suspected"  # missed heartbeats; may be fenced next
    FENCED = "fenced"        # cut off and its QEMUs killed; its VMs restart elsewhere
    CLEANING = "cleaning"    # back, being cleaned of what it ran before


class Code(StrEnum):
    STATE = "state"
    ZONE = "zone"
    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"
    CAPACITY = "capacity"
    ANTI_AFFINITY = "anti_affinity"
    AFFINITY = "affinity"
    VLAN = "vlan"
    PROFILE = "profile"
    QEMU = "qemu"
    MACHINE = "machine"
    STORAGE = "storage"
    MIGRATION_ADDRESS = "migration_address"
    DOWNTIME = "downtime"
    CURRENT = "current"


class VmPolicy(BaseModel):
    """A VM's placement policy: set at create, changed live, travels with the VM."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    zone: str | None = Field(default=None, pattern=NAME, description="security zone")
    tier: int = Field(default=DEFAULT_TIER, ge=0, le=9,
                      description="restart priority after a host failure: 0 first")
    max_downtime_ms: int | None = Field(default=None, ge=1, le=600_000)
    affinity: list[str] = Field(default_factory=list, max_length=16)
    anti_affinity: list[str] = Field(default_factory=list, max_length=16)
    allowed_hosts: list[str] | None = Field(default=None, max_length=10_000)
    forbidden_hosts: list[str] = Field(default_factory=list, max_length=10_000)

    @field_validator("affinity", "anti_affinity", "forbidden_hosts")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return _checked_names(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _checked_names(value)

    @model_validator(mode="after")
    def _consistent(self) -> VmPolicy:
        both = set(self.affinity) & set(self.anti_affinity)
        if both:
            raise ValueError(f"groups {sorted(both)} cannot be both affinity and anti_affinity")
        clash = set(self.allowed_hosts or ()) & set(self.forbidden_hosts)
        if clash:
            raise ValueError(f"hosts {sorted(clash)} are both allowed and forbidden")
        if self.allowed_hosts is not None and not self.allowed_hosts:
            raise ValueError("allowed_hosts: an empty list allows no host (omit it for any)")
        return self


def _checked_names(value: list[str]) -> list[str]:
    for name in value:
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"{name!r} must be 1-64 letters, digits, '-' or '_'")
    return sorted(set(value))


def profile_needs(profile: PortProfile | None) -> frozenset[str]:
    """What a softswitch must offer to realize ``profile``: rate limits and storm control are
    OpenFlow meters."""
    if profile is None:
        return frozenset()
    storm = profile.storm_control
    metered = profile.qos.to_vm or profile.qos.from_vm or storm.broadcast_pps or \
        storm.multicast_pps or storm.unknown_unicast_pps
    return frozenset({"meters"}) if metered else frozenset()


@dataclass(slots=True)
class HostFacts:
    """One host as placement sees it (inventory + its agent's last report + its state)."""

    name: str
    rack: str = ""
    zone: str | None = None
    state: HostState = HostState.UP
    memory_mib: int = 4096
    max_migrations: int = 2
    migration_mbps: int = 10_000
    qemu_version: str | None = None
    machine_types: frozenset[str] = frozenset()
    shared_storage: str | None = None
    shared_storage_ok: bool = False
    migration_ip: str | None = None
    features: frozenset[str] = frozenset({"meters"})
    cpus: int = 1            # CPUs its guests share (agent report); a VM's ``cpu`` is of one


@dataclass(slots=True)
class VmFacts:
    name: str
    host: str
    memory_mib: int
    vlans: tuple[int, ...]
    policy: VmPolicy = field(default_factory=lambda: VmPolicy())
    needs: frozenset[str] = frozenset()
    workload_mibps: int = 0
    cpu: float = 0.0         # CPU seconds per second its QEMU used lately (agent.cpuload)


@dataclass(frozen=True, slots=True)
class Reason:
    code: Code
    message: str


_Add = Callable[[Reason], None]


@dataclass(slots=True)
class Verdict:
    host: str
    ok: bool
    reasons: list[Reason]


class NetworkView:
    """Which nodes a VLAN can reach over trunks that may carry it. The fabric is a tree, so
    per VLAN the nodes fall into components; two nodes can exchange the VLAN's frames
    exactly when they are in the same one. VLANs carried by the same restricted trunks have
    the same components: they are computed once per such set (a data center has thousands
    of VLANs and few kinds of trunk restrictions)."""

    def __init__(self, edges: Iterable[tuple[str, str, frozenset[int] | None]],
                 vlan_anchors: Mapping[int, Iterable[str]] | None = None) -> None:
        self._adjacency: dict[str, list[tuple[str, frozenset[int] | None]]] = defaultdict(list)
        for a, b, allowed in edges:
            self._adjacency[a].append((b, allowed))
            self._adjacency[b].append((a, allowed))
        self._anchors = {v: tuple(nodes) for v, nodes in (vlan_anchors or {}).items()}
        self._components: dict[int, dict[str, int]] = {}
        self._by_carriers: dict[frozenset[int], dict[str, int]] = {}
        self._restricted = [allowed for peers in self._adjacency.values()
                            for _, allowed in peers if allowed is not None]
        self.unrestricted = all(allowed is None for peers in self._adjacency.values()
                                 for _, allowed in peers)

    def component(self, vlan: int) -> dict[str, int]:
        found = self._components.get(vlan)
        if found is not None:
            return found
        carriers = frozenset(i for i, allowed in enumerate(self._restricted) if vlan in allowed)
        found = self._by_carriers.get(carriers)
        if found is not None:
            self._components[vlan] = found
            return found
        found = {}
        for start in self._adjacency:
            if start in found:
                continue
            label = len(found)
            found[start] = label
            stack = [start]
            while stack:
                for peer, allowed in self._adjacency[stack.pop()]:
                    if peer not in found and (allowed is None or vlan in allowed):
                        found[peer] = label
                        stack.append(peer)
        self._components[vlan] = self._by_carriers[carriers] = found
        return found

    def blocked(self, vlan: int, src: str, dst: str) -> str | None:
        """Why ``vlan`` cannot be carried between ``src`` and ``dst`` and its fixed endpoints
        (clients on access ports); None when it can. The answer does not name ``dst`` (the
        caller does): it is the same for every host of ``dst``'s component."""
        if self.unrestricted:
            return None if dst in self._adjacency else "the host is not on the fabric"
        comp = self.component(vlan)
        here = comp.get(dst)
        if here is None:
            return "the host is not on the fabric"
        if src and comp.get(src) != here:
            return f"no trunk path from {src} may carry it there"
        for anchor in self._anchors.get(vlan, ()):
            if comp.get(anchor) != here:
                return f"no trunk path from there to {anchor} (its clients' switch) may carry it"
        return None


def network_view(topology: Topology) -> NetworkView:
    """The fabric of ``topology``: switch links and host uplinks with the VLANs each may
    carry; a VLAN's clients (access ports) are fixed endpoints every placement must reach."""
    edges: list[tuple[str, str, frozenset[int] | None]] = [
        (link.a, link.b, frozenset(link.vlans) if link.vlans is not None else None)
        for link in topology.links]
    tors = {rack.name: rack.tor for rack in topology.racks}
    edges += [(host.name, tors[host.rack],
               frozenset(host.uplink_vlans) if host.uplink_vlans is not None else None)
              for host in topology.hosts]
    anchors: dict[int, list[str]] = defaultdict(list)
    for client in topology.clients:
        anchors[client.vlan].append(client.switch)
    return NetworkView(edges, anchors)


@dataclass(slots=True)
class _Index:
    """Per snapshot: host names in order, hosts per kind, (free MiB, host) ascending, and
    one shared yes-verdict per host (verdicts are not changed by their readers)."""

    size: int
    names: list[str]
    by_kind: dict[int, list[str]]
    ok: dict[str, Verdict]
    by_free: list[tuple[int, str]]
    ok_list: list[Verdict]          # ok[name] for name in names
    position: dict[str, int]        # name -> its place in names


@dataclass(slots=True)
class _VmContext:
    """What one VM's verdicts share: its policy's host sets, its VLANs' components, and
    reasons already worked out per host kind and per VLAN component."""

    vm: VmFacts
    source: HostFacts | None
    allowed: frozenset[str] | None
    forbidden: frozenset[str]
    components: list[tuple[int, dict[str, int]]]
    affinity_peers: list[tuple[str, frozenset[str]]]
    kinds: dict[int, list[Reason]] = field(default_factory=dict)
    vlan_reasons: dict[tuple[int, int | None], str | None] = field(default_factory=dict)


class Cluster:
    """A snapshot of hosts, VMs and moves in flight, with the indexes placement needs.

    ``incoming``: (vm, destination) of moves in flight: their memory is reserved there and
    they count as members of their groups there."""

    def __init__(self, hosts: Iterable[HostFacts], vms: Iterable[VmFacts],
                 network: NetworkView, incoming: Iterable[tuple[str, str]] = ()) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.vms = {v.name: v for v in vms}
        self.network = network
        self.used: dict[str, int] = defaultdict(int)
        self.members: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.on_host: dict[str, set[str]] = defaultdict(set)
        self._cached_index: _Index | None = None
        self._free_dirty = True
        self._component_hosts: dict[int, dict[int | None, list[str]]] = {}
        self._kind_of: dict[str, int] = {}
        self._kinds: dict[tuple[object, ...], int] = {}
        for vm in self.vms.values():
            self._occupy(vm, vm.host, 1)
        for name, dest in incoming:
            moving = self.vms.get(name)
            if moving is not None and dest != moving.host:
                self._occupy(moving, dest, 1)

    def _occupy(self, vm: VmFacts, host: str, sign: int) -> None:
        self.used[host] += sign * vm.memory_mib
        for group in (*vm.policy.affinity, *vm.policy.anti_affinity):
            self.members[group][host] += sign
        if sign > 0:
            self.on_host[host].add(vm.name)
        else:
            self.on_host[host].discard(vm.name)

    def place(self, vm: str, host: str) -> None:
        """Tentatively move ``vm`` to ``host`` (plans build on their earlier moves)."""
        self._free_dirty = True
        facts = self.vms[vm]
        self._occupy(facts, facts.host, -1)
        facts.host = host
        self._occupy(facts, host, 1)

    # ---- one VM, one host -------------------------------------------------------------------

    def verdict(self, vm_name: str, host_name: str, *, first_only: bool = False) -> Verdict:
        """Can ``vm_name`` go to ``host_name``? Every reason it cannot (``first_only``: the
        answer is the same, the reasons may stop at the first: for planners)."""
        return self._verdict(self._context(vm_name), host_name, first_only)

    def _context(self, vm_name: str) -> _VmContext:
        vm = self.vms[vm_name]
        policy = vm.policy
        return _VmContext(
            vm=vm, source=self.hosts.get(vm.host),
            allowed=frozenset(policy.allowed_hosts) if policy.allowed_hosts is not None
            else None, forbidden=frozenset(policy.forbidden_hosts),
            components=[(vlan, self.network.component(vlan)) for vlan in vm.vlans]
            if not self.network.unrestricted else [],
            affinity_peers=self._affinity_peers(vm))

    def _verdict(self, ctx: _VmContext, host_name: str, first_only: bool) -> Verdict:
        vm = ctx.vm
        host = self.hosts[host_name]
        reasons: list[Reason] = []
        add = reasons.append
        if host_name == vm.host:
            add(Reason(Code.CURRENT, f"{vm.name} runs on {host_name} now"))
        if host.state is not HostState.UP:
            add(Reason(Code.STATE, f"host {host_name} is {host.state.value}"))
        if ctx.allowed is not None and host_name not in ctx.allowed:
            add(Reason(Code.ALLOWED, f"{host_name} is not among {vm.name}'s allowed hosts"))
        if host_name in ctx.forbidden:
            add(Reason(Code.FORBIDDEN, f"{host_name} is among {vm.name}'s forbidden hosts"))
        if first_only and reasons:
            return Verdict(host_name, False, reasons)
        # What depends only on the host's kind (zone, softswitch, QEMU, storage...) is worked
        # out once per kind: a data center has many hosts and few kinds.
        key = self._kind_of.get(host_name)
        if key is None:
            key = self._kind_of[host_name] = self._kind_key(host)
        kind = ctx.kinds.get(key)
        if kind is None:
            kind = ctx.kinds[key] = self._kind_reasons(vm, host, ctx.source)
        reasons.extend(kind)
        free = host.memory_mib - self.used[host_name]
        if vm.memory_mib > free:
            add(Reason(Code.CAPACITY, f"{host_name} has {max(free, 0)} MiB free, {vm.name} "
                                      f"needs {vm.memory_mib} MiB"))
        if vm.policy.anti_affinity:
            self._anti_affinity(vm, host_name, add)
        for group, peers in ctx.affinity_peers:
            if host_name not in peers:
                add(Reason(Code.AFFINITY, f"affinity group {group} runs on "
                                          f"{', '.join(sorted(peers))}, not {host_name}"))
        for vlan, component in ctx.components:
            why = self._vlan_why(ctx, vlan, component.get(host_name), host_name)
            if why:
                add(Reason(Code.VLAN, f"VLAN {vlan} cannot be carried to {host_name}: {why}"))
        return Verdict(host_name, not reasons, reasons)

    def _vlan_why(self, ctx: _VmContext, vlan: int, label: int | None, host_name: str
                  ) -> str | None:
        """Why the VM's ``vlan`` cannot reach hosts of component ``label`` (one of them is
        ``host_name``), worked out once per component."""
        why = ctx.vlan_reasons.get((vlan, label), "")
        if why == "":
            why = ctx.vlan_reasons[(vlan, label)] = self.network.blocked(
                vlan, ctx.vm.host if ctx.source else "", host_name) or None
        return why

    def _anti_affinity(self, vm: VmFacts, host_name: str, add: _Add) -> None:
        here = self.on_host[host_name]
        for group in vm.policy.anti_affinity:
            count = self.members[group].get(host_name, 0) - (vm.name in here)
            if count > 0:
                others = sorted(n for n in here if n != vm.name and
                                group in self.vms[n].policy.anti_affinity)
                add(Reason(Code.ANTI_AFFINITY, f"{host_name} runs {', '.join(others)} of "
                                               f"anti-affinity group {group}"))

    def _affinity_peers(self, vm: VmFacts) -> list[tuple[str, frozenset[str]]]:
        """Per affinity group, the up hosts its other members run on (none: no constraint)."""
        result = []
        for group in vm.policy.affinity:
            peers = frozenset(h for h, n in self.members[group].items()
                              if n - (h == vm.host) > 0 and h in self.hosts
                              and self.hosts[h].state is HostState.UP)
            if peers:
                result.append((group, peers))
        return result

    def _kind_key(self, host: HostFacts) -> int:
        """The host's kind: the facts ``_kind_reasons`` reads (they change only with a new
        snapshot; the host's state is checked per verdict)."""
        key = (host.zone, host.features, host.qemu_version, host.machine_types,
               host.shared_storage_ok, host.shared_storage, bool(host.migration_ip),
               host.migration_mbps)
        return self._kinds.setdefault(key, len(self._kinds))

    @staticmethod
    def _kind_reasons(vm: VmFacts, host: HostFacts, source: HostFacts | None) -> list[Reason]:
        """Reasons that depend only on the host's kind; the messages name no host."""
        reasons: list[Reason] = []
        add = reasons.append
        if vm.policy.zone != host.zone:
            add(Reason(Code.ZONE, _zone_message(vm.name, vm.policy.zone, host.zone)))
        missing = vm.needs - host.features
        if missing:
            add(Reason(Code.PROFILE, f"the port profile needs {', '.join(sorted(missing))}, "
                                     "which the host's softswitch lacks"))
        if host.qemu_version is None:
            add(Reason(Code.QEMU, "the host has not reported its QEMU version"))
        elif source is not None and source.qemu_version and \
                _major(host.qemu_version) < _major(source.qemu_version):
            add(Reason(Code.QEMU, f"QEMU {host.qemu_version} cannot take a guest from QEMU "
                                  f"{source.qemu_version}"))
        if host.machine_types and MACHINE not in host.machine_types and \
                not any(m.startswith("pc-q35") for m in host.machine_types):
            add(Reason(Code.MACHINE, f"the host cannot run machine type {MACHINE}"))
        if not host.shared_storage_ok:
            add(Reason(Code.STORAGE, "the host does not see its shared storage"))
        elif source is not None and source.shared_storage and \
                host.shared_storage != source.shared_storage:
            add(Reason(Code.STORAGE, f"the host does not see the shared storage "
                                     f"{source.shared_storage}"))
        if not host.migration_ip:
            add(Reason(Code.MIGRATION_ADDRESS, "the host has no migration network address"))
        link_mibps = host.migration_mbps / 8 * 1e6 / 2 ** 20
        if vm.workload_mibps and vm.workload_mibps >= link_mibps:
            limit = vm.policy.max_downtime_ms
            add(Reason(Code.DOWNTIME, f"{vm.name} dirties {vm.workload_mibps} MiB/s, more than "
                                      f"the host's migration link carries ({link_mibps:.0f} "
                                      f"MiB/s): precopy cannot converge"
                                      + (f" to {limit} ms" if limit else "")))
        return reasons

    # ---- all hosts --------------------------------------------------------------------------

    def where(self, vm_name: str) -> list[Verdict]:
        """Every host, yes or no, with every reason; hosts in name order.

        A data center has many hosts and few kinds of them: the hosts some rule might refuse
        are found with set operations over indexes (hosts per kind, per VLAN component, by
        free memory, ...); only those are examined one by one, the rest are a plain yes."""
        ctx = self._context(vm_name)
        index = self._index()
        vm = ctx.vm
        suspect = {vm.host} | ctx.forbidden
        for group in vm.policy.anti_affinity:
            suspect.update(h for h, n in self.members[group].items() if n > 0)
        suspect.update(n for n, h in self.hosts.items() if h.state is not HostState.UP)
        refused_kinds = []
        for kind, names in index.by_kind.items():
            reasons = ctx.kinds.get(kind)
            if reasons is None:
                reasons = ctx.kinds[kind] = self._kind_reasons(vm, self.hosts[names[0]],
                                                               ctx.source)
            if reasons:
                refused_kinds.append((names, reasons))
        short = bisect.bisect_left(index.by_free, (vm.memory_mib, ""))
        suspect.update(name for _, name in index.by_free[:short])
        if ctx.allowed is not None:
            suspect.update(self.hosts.keys() - ctx.allowed)
        for _, peers in ctx.affinity_peers:
            suspect.update(self.hosts.keys() - peers)
        # Start from "yes" everywhere (a list copy) and write only the hosts looked at: a
        # Python loop over every host would be most of the query's time. A host no other
        # rule suspects is refused for its kind and its VLANs' components alone: it gets
        # those reasons as they are, in ``_verdict``'s order, without a verdict of its own.
        result = index.ok_list.copy()
        position = index.position
        for names, reasons in refused_kinds:
            for name in names:
                if name not in suspect:
                    result[position[name]] = Verdict(name, False, list(reasons))
        for vlan, component in ctx.components:
            for label, names in self._hosts_by_component(vlan, component).items():
                why = self._vlan_why(ctx, vlan, label, names[0])
                if not why:
                    continue
                for name in names:
                    if name in suspect:
                        continue
                    reason = Reason(Code.VLAN, f"VLAN {vlan} cannot be carried to {name}: {why}")
                    verdict = result[position[name]]
                    if verdict.ok:          # the shared yes: never changed, replaced
                        result[position[name]] = Verdict(name, False, [reason])
                    else:                   # a verdict of this query's own
                        verdict.reasons.append(reason)
        for name in suspect:
            if name in position:
                result[position[name]] = self._verdict(ctx, name, False)
        return result

    def _index(self) -> _Index:
        """Hosts sorted by name, by kind and by free memory; rebuilt after ``place``."""
        if self._cached_index is None or self._cached_index.size != len(self.hosts):
            names = sorted(self.hosts)
            by_kind: dict[int, list[str]] = defaultdict(list)
            for name in names:
                by_kind[self._kind_key(self.hosts[name])].append(name)
            ok = {n: Verdict(n, True, []) for n in names}
            self._cached_index = _Index(
                size=len(names), names=names, by_kind=dict(by_kind), ok=ok, by_free=[],
                ok_list=[ok[n] for n in names], position={n: i for i, n in enumerate(names)})
        index = self._cached_index
        if self._free_dirty or not index.by_free:
            index.by_free = sorted((h.memory_mib - self.used[n], n)
                                   for n, h in self.hosts.items())
            self._free_dirty = False
        return index

    def _hosts_by_component(self, vlan: int, component: dict[str, int]
                            ) -> dict[int | None, list[str]]:
        # Keyed by the components themselves: VLANs that share them share this too.
        found = self._component_hosts.get(id(component))
        if found is None:
            found = defaultdict(list)
            for name in self.hosts:
                found[component.get(name)].append(name)
            self._component_hosts[id(component)] = found = dict(found)
        return found

    def candidates(self) -> list[tuple[int, str]]:
        """A heap of the up hosts by free memory (most first), for ``best_host``."""
        heap = [(-(h.memory_mib - self.used[n]), n) for n, h in self.hosts.items()
                if h.state is HostState.UP]
        heapq.heapify(heap)
        return heap

    def best_host(self, vm_name: str, heap: list[tuple[int, str]] | None = None) -> str | None:
        """The feasible host with the most free memory, or None.

        Hosts are tried from the most free memory down, so the search usually ends after a
        few. ``heap`` (from ``candidates``) may be shared by the moves of one plan: entries
        whose free memory changed since are put back with the new figure when met."""
        vm = self.vms[vm_name]
        heap = heap if heap is not None else self.candidates()
        ctx = self._context(vm_name)
        tried: list[tuple[int, str]] = []
        found = None
        while heap:
            negative_free, name = heapq.heappop(heap)
            spec = self.hosts[name]
            free = spec.memory_mib - self.used[name]
            if -negative_free != free:
                heapq.heappush(heap, (-free, name))      # stale: a plan's move changed it
                continue
            tried.append((negative_free, name))
            if free < vm.memory_mib:
                break
            if spec.state is HostState.UP and self._verdict(ctx, name, True).ok:
                found = name
                break
        for item in tried:
            heapq.heappush(heap, item)
        return found

    def load(self, host: str) -> float:
        spec = self.hosts[host]
        return self.used[host] / spec.memory_mib if spec.memory_mib else 0.0


def _zone_message(vm: str, want: str | None, have: str | None) -> str:
    if want is None:
        return f"the host is in zone {have}; {vm} has no zone"
    if have is None:
        return f"{vm} must run in zone {want}; the host has no zone"
    return f"{vm} must run in zone {want}; the host is in zone {have}"


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0
