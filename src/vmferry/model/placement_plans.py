"""Plans built on the placement model (``vmferry.model.placement``): a host's drain, the
restart of a failed host's VMs by tier, and balancing memory and CPU load within a bound on
moves.
Each plan places its moves in the cluster as it goes, so later moves see earlier ones."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vmferry.model.placement import Cluster, HostState, Verdict


@dataclass
class Move:
    vm: str
    source: str
    destination: str
    memory_mib: int


@dataclass
class Plan:
    """Moves to make (in order) and, for VMs that have nowhere to go, every host's refusal."""

    moves: list[Move] = field(default_factory=list)
    stuck: dict[str, list[Verdict]] = field(default_factory=dict)
    load_before: dict[str, float] = field(default_factory=dict)
    load_after: dict[str, float] = field(default_factory=dict)
    memory_before: dict[str, float] = field(default_factory=dict)
    memory_after: dict[str, float] = field(default_factory=dict)
    cpu_before: dict[str, float] = field(default_factory=dict)
    cpu_after: dict[str, float] = field(default_factory=dict)


def _hard_first(cluster: Cluster, names: Iterable[str]) -> list[str]:
    """VMs with the most constraints and the most memory first: they are the hardest to fit."""
    def key(name: str) -> tuple[int, int, str]:
        p = cluster.vms[name].policy
        constraints = len(p.anti_affinity) + len(p.affinity) + (p.zone is not None) + \
            (p.allowed_hosts is not None)
        return (-constraints, -cluster.vms[name].memory_mib, name)
    return sorted(names, key=key)


def plan_drain(cluster: Cluster, host: str) -> Plan:
    """Moves that empty ``host`` (which the caller has put in maintenance in ``cluster``),
    each to the feasible host with the most free memory at that point of the plan. A VM with
    nowhere to go is in ``stuck`` with every host's reasons; the caller refuses the drain."""
    return _place_in_order(cluster, host, _hard_first(cluster, cluster.on_host.get(host, set())))


def plan_restart(cluster: Cluster, host: str) -> Plan:
    """Where the VMs of a failed (fenced) ``host`` restart: by tier (0 first), then the
    hardest to fit first; ``stuck`` for those with nowhere to go."""
    names = cluster.on_host.get(host, set())
    by_tier = sorted(_hard_first(cluster, names), key=lambda n: cluster.vms[n].policy.tier)
    return _place_in_order(cluster, host, by_tier)


def _place_in_order(cluster: Cluster, host: str, names: list[str]) -> Plan:
    """Each VM of ``names`` (in that order) off ``host``, to the feasible host with the most
    free memory at that point of the plan; ``stuck`` with every host's reasons otherwise."""
    plan = Plan()
    heap = cluster.candidates()
    for name in names:
        target = cluster.best_host(name, heap)
        if target is None:
            plan.stuck[name] = cluster.where(name)
            continue
        plan.moves.append(Move(name, host, target, cluster.vms[name].memory_mib))
        cluster.place(name, target)
    return plan


# Balancing evens out a host's *pressure*: the pair (dominant share, other share) of its two
# resources, memory (used / capacity) and CPU (its VMs' CPU load / its CPUs), compared as a
# tuple. The dominant share (as in dominant-resource fairness) makes a host full on either
# resource count as loaded: a weighted sum would let a CPU-saturated host with little memory
# in use look average, and memory-first lexicographic order would ignore CPU whenever memory
# differs at all. The other share breaks ties, so of two hosts equally full in memory the one
# with a busy guest is the hotter.
Pressure = tuple[float, float]


def cpu_load(cluster: Cluster, host: str) -> float:
    """CPU load of the VMs on ``host`` over its CPUs (1.0: every CPU busy)."""
    return _cpu_used(cluster, host) / max(1, cluster.hosts[host].cpus)


def _cpu_used(cluster: Cluster, host: str) -> float:
    return sum(cluster.vms[n].cpu for n in cluster.on_host.get(host, ()))


def pressure(cluster: Cluster, host: str) -> Pressure:
    return _pressure(cluster.load(host), cpu_load(cluster, host))


def _pressure(memory: float, cpu: float) -> Pressure:
    # Rounded: figures that differ by float noise only are a tie (the tie-break decides).
    return (round(max(memory, cpu), 4), round(min(memory, cpu), 4))


def plan_balance(cluster: Cluster, max_moves: int, *, tolerance: float = 0.05) -> Plan:
    """At most ``max_moves`` moves that even out memory and CPU load over the up hosts (see
    ``pressure``): each takes a VM from the hottest host to the feasible host where the
    hotter of the two ends is coolest afterwards, when that is cooler than the hot host was.
    Stops when the hottest and coolest hosts' dominant shares differ by ``tolerance`` or less.
    ``load_*`` are the dominant shares, ``memory_*`` and ``cpu_*`` each resource's."""
    up = [n for n, h in cluster.hosts.items() if h.state is HostState.UP]
    plan = Plan()
    _record_loads(cluster, up, plan.load_before, plan.memory_before, plan.cpu_before)
    moved: set[str] = set()
    while len(plan.moves) < max_moves and len(up) > 1:
        ranked = sorted(up, key=lambda n: (pressure(cluster, n), n))
        hot = ranked[-1]
        if pressure(cluster, hot)[0] - pressure(cluster, ranked[0])[0] <= tolerance:
            break
        move = _best_balancing_move(cluster, hot, ranked[:-1], moved)
        if move is None:
            break
        plan.moves.append(move)
        moved.add(move.vm)
        cluster.place(move.vm, move.destination)
    _record_loads(cluster, up, plan.load_after, plan.memory_after, plan.cpu_after)
    return plan


def _record_loads(cluster: Cluster, up: list[str], load: dict[str, float],
                  memory: dict[str, float], cpu: dict[str, float]) -> None:
    for name in sorted(up):
        memory[name] = round(cluster.load(name), 4)
        cpu[name] = round(cpu_load(cluster, name), 4)
        load[name] = max(memory[name], cpu[name])


def _best_balancing_move(cluster: Cluster, hot: str, colder: list[str],
                         moved: set[str]) -> Move | None:
    """The move off ``hot`` whose hotter end is coolest afterwards; of equal ones, the one
    that leaves ``hot`` coolest (it takes the most of what loads it), then by name."""
    before = pressure(cluster, hot)
    hot_memory, hot_cpu = cluster.used[hot], _cpu_used(cluster, hot)
    best: tuple[Pressure, Pressure, str, str] | None = None
    for name in sorted(cluster.on_host.get(hot, set()) - moved):
        vm = cluster.vms[name]
        hot_after = _shares(cluster, hot, hot_memory - vm.memory_mib, hot_cpu - vm.cpu)
        for cold in colder:
            cold_after = _shares(cluster, cold, cluster.used[cold] + vm.memory_mib,
                                 _cpu_used(cluster, cold) + vm.cpu)
            key = (max(hot_after, cold_after), hot_after, name, cold)
            if key[0] >= before or (best is not None and key >= best):
                continue
            if cluster.verdict(name, cold, first_only=True).ok:
                best = key
    if best is None:
        return None
    _, _, name, cold = best
    return Move(name, hot, cold, cluster.vms[name].memory_mib)


def _shares(cluster: Cluster, host: str, memory_mib: float, cpu: float) -> Pressure:
    spec = cluster.hosts[host]
    memory = memory_mib / spec.memory_mib if spec.memory_mib else 0.0
    return _pressure(memory, cpu / max(1, spec.cpus))
