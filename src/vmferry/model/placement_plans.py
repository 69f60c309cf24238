"""Plans built on the placement model (``vmferry.model.placement``): a host's drain, the
restart of a failed host's VMs by tier, and balancing memory load within a bound on moves.
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
    plan = Plan()
    heap = cluster.candidates()
    for name in _hard_first(cluster, cluster.on_host.get(host, set())):
        target = cluster.best_host(name, heap)
        if target is None:
            plan.stuck[name] = cluster.where(name)
            continue
        plan.moves.append(Move(name, host, target, cluster.vms[name].memory_mib))
        cluster.place(name, target)
    return plan


def plan_restart(cluster: Cluster, host: str) -> Plan:
    """Where the VMs of a failed (fenced) ``host`` restart: by tier (0 first), then the
    hardest to fit first; ``stuck`` for those with nowhere to go."""
    plan = Plan()
    names = cluster.on_host.get(host, set())
    by_tier = sorted(_hard_first(cluster, names), key=lambda n: cluster.vms[n].policy.tier)
    heap = cluster.candidates()
    for name in by_tier:
        target = cluster.best_host(name, heap)
        if target is None:
            plan.stuck[name] = cluster.where(name)
            continue
        plan.moves.append(Move(name, host, target, cluster.vms[name].memory_mib))
        cluster.place(name, target)
    return plan


def plan_balance(cluster: Cluster, max_moves: int, *, tolerance: float = 0.05) -> Plan:
    """At most ``max_moves`` moves that even out memory load (used / capacity) over the up
    hosts: each takes a VM from the most loaded host to the least loaded feasible one, when
    that lowers the larger of the two loads. Stops when the spread is within ``tolerance``."""
    up = [n for n, h in cluster.hosts.items() if h.state is HostState.UP]
    plan = Plan(load_before={n: round(cluster.load(n), 4) for n in sorted(up)})
    moved: set[str] = set()
    while len(plan.moves) < max_moves and len(up) > 1:
        ranked = sorted(up, key=cluster.load)
        hot = ranked[-1]
        if cluster.load(hot) - cluster.load(ranked[0]) <= tolerance:
            break
        move = _best_balancing_move(cluster, hot, ranked[:-1], moved)
        if move is None:
            break
        plan.moves.append(move)
        moved.add(move.vm)
        cluster.place(move.vm, move.destination)
    plan.load_after = {n: round(cluster.load(n), 4) for n in sorted(up)}
    return plan


def _best_balancing_move(cluster: Cluster, hot: str, cold_first: list[str],
                         moved: set[str]) -> Move | None:
    hot_spec = cluster.hosts[hot]
    before = cluster.load(hot)
    best: tuple[float, Move] | None = None
    for name in sorted(cluster.on_host.get(hot, set()) - moved):
        vm = cluster.vms[name]
        for cold in cold_first:
            spec = cluster.hosts[cold]
            after = max((cluster.used[hot] - vm.memory_mib) / hot_spec.memory_mib,
                        (cluster.used[cold] + vm.memory_mib) / spec.memory_mib)
            if after >= before - 1e-9:
                continue
            if cluster.verdict(name, cold, first_only=True).ok:
                if best is None or after < best[0]:
                    best = (after, Move(name, hot, cold, vm.memory_mib))
                break       # colder hosts come first: the first feasible one is this VM's best
    return best[1] if best else None
