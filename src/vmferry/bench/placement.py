"""``vmferry bench placement``: the placement model on a simulated data center.

A real ``Topology`` (validated like any inventory) of racks behind one spine, hosts with zones,
uplinks that may carry only some VLANs, and per host the facts an agent reports; VMs with
policies (zones, anti-affinity groups, allowed and forbidden hosts, profiles that need
meters). It runs the same ``vmferry.model.placement`` code the controller runs on its store's
snapshot: ``Cluster.where`` for random VMs and ``plan_drain`` for hosts holding 40 VMs.

With ``lab_drain_vms`` it also drains a real host on a lab of its own (real QEMU, the
controller's drain) and sets the drain's total time against its physical bound: the bytes QEMU
sent over the drained host's migration link divided by that link's measured rate.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vmferry.model.placement import (
    Cluster,
    HostFacts,
    HostState,
    VmFacts,
    VmPolicy,
    network_view,
)
from vmferry.model.placement_plans import plan_drain
from vmferry.model.topology import Topology

VLANS = list(range(100, 164))
SECURE_VLANS = list(range(900, 904))


@dataclass
class PlacementBenchConfig:
    hosts: int = 10_000
    vms: int = 100_000
    hosts_per_rack: int = 40
    where_queries: int = 200
    drains: int = 20
    drain_vms: int = 40
    seed: int = 14
    lab_drain_vms: int = 0          # 0: no lab drain
    lab_drain_memory_mib: int = 256
    lab_name: str = "bpl"


def simulated_topology(cfg: PlacementBenchConfig) -> Topology:
    racks = (cfg.hosts + cfg.hosts_per_rack - 1) // cfg.hosts_per_rack
    data: dict[str, Any] = {
        "name": "sim", "kind": "lab", "migration_network": "10.0.0.0/16",
        "vlans": [{"id": v} for v in VLANS + SECURE_VLANS],
        "switches": [{"name": "spine", "role": "spine"}] +
                    [{"name": f"tor{r}", "rack": f"r{r}"} for r in range(racks)],
        "racks": [{"name": f"r{r}", "tor": f"tor{r}"} for r in range(racks)],
        # Every tenth rack is the secure zone: its ToR link carries only the secure VLANs.
        "links": [{"a": f"tor{r}", "b": "spine", **({"vlans": SECURE_VLANS} if r % 10 == 0
                                                     else {})} for r in range(racks)],
        "hosts": [{"name": f"h{i}", "rack": f"r{i // cfg.hosts_per_rack}",
                   "memory_mib": 262_144, "max_migrations": 4,
                   **({"zone": "secure"} if (i // cfg.hosts_per_rack) % 10 == 0 else {}),
                   **({"softswitch_features": []} if i % 17 == 0 else {})}
                  for i in range(cfg.hosts)],
    }
    return Topology.model_validate(data)


def simulated_cluster(topology: Topology, cfg: PlacementBenchConfig,
                      rng: random.Random) -> tuple[Cluster, list[str]]:
    """Hosts as their agents would report them, VMs placed where the rules allow; returns the
    cluster and the hosts packed with ``drain_vms`` VMs each (for drain plans)."""
    hosts = [HostFacts(
        name=h.name, rack=h.rack, zone=h.zone, memory_mib=h.memory_mib,
        max_migrations=h.max_migrations, migration_mbps=h.migration_mbps,
        qemu_version="9.2.0" if i % 101 == 0 else "10.0.2",
        machine_types=frozenset({"q35", "pc"}), shared_storage="/srv/shared",
        shared_storage_ok=i % 211 != 0, migration_ip=f"10.0.{i // 250}.{i % 250 + 1}/16",
        features=frozenset(h.softswitch_features),
        state=HostState.MAINTENANCE if i % 499 == 0 else HostState.UP)
        for i, h in enumerate(topology.hosts)]
    plain = [h.name for h in hosts if h.zone is None and h.state is HostState.UP]
    secure = [h.name for h in hosts if h.zone == "secure" and h.state is HostState.UP]
    dense = rng.sample(plain, cfg.drains)
    vms: list[VmFacts] = []
    for i in range(cfg.vms):
        zoned = i % 10 == 0
        if i < cfg.drains * cfg.drain_vms:
            host, zoned = dense[i // cfg.drain_vms], False
        else:
            host = rng.choice(secure if zoned else plain)
        group = [f"g{i // 3}"] if i % 7 == 0 else []
        policy = VmPolicy(zone="secure" if zoned else None, anti_affinity=group,
                          tier=i % 4,
                          forbidden_hosts=[f"h{(i * 31) % cfg.hosts}"] if i % 5 == 0 else [])
        vms.append(VmFacts(
            name=f"vm{i}", host=host, memory_mib=rng.choice((512, 1024, 2048, 4096)),
            vlans=(rng.choice(SECURE_VLANS if zoned else VLANS),), policy=policy,
            needs=frozenset({"meters"}) if i % 3 == 0 else frozenset()))
    return Cluster(hosts, vms, network_view(topology)), dense


def run_placement_bench(cfg: PlacementBenchConfig) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    started = time.perf_counter()
    topology = simulated_topology(cfg)
    cluster, dense = simulated_cluster(topology, cfg, rng)
    setup_s = time.perf_counter() - started
    # The snapshot is long-lived: keep the cyclic collector from walking its 100,000 VMs on
    # every collection (a controller holding a snapshot would do the same).
    gc.collect()
    gc.freeze()
    names = list(cluster.vms)
    where_ms = []
    refused = allowed = 0
    for vm in rng.sample(names, cfg.where_queries):
        t0 = time.perf_counter()
        answer = cluster.where(vm)
        where_ms.append((time.perf_counter() - t0) * 1000)
        allowed += sum(v.ok for v in answer)
        refused += sum(not v.ok for v in answer)
    drain_ms = []
    stuck = moved = 0
    for host in dense:
        spec = cluster.hosts[host]
        spec.state = HostState.MAINTENANCE
        t0 = time.perf_counter()
        plan = plan_drain(cluster, host)
        drain_ms.append((time.perf_counter() - t0) * 1000)
        moved += len(plan.moves)
        stuck += len(plan.stuck)
        for move in reversed(plan.moves):       # put the VMs back for the next plan
            cluster.place(move.vm, move.source)
        spec.state = HostState.UP
    return {
        "hosts": len(cluster.hosts), "vms": len(cluster.vms), "setup_s": round(setup_s, 2),
        "where": _stats(where_ms, cfg.where_queries),
        "where_answers": {"allowed": allowed, "refused": refused},
        "drain_plan": _stats(drain_ms, len(dense)), "drain_vms": cfg.drain_vms,
        "drain_moves": moved, "drain_stuck": stuck,
        "targets": {"where_p99_ms": 50, "drain_plan_ms": 1000},
        **({"lab_drain": run_lab_drain(cfg)} if cfg.lab_drain_vms else {}),
    }


def run_lab_drain(cfg: PlacementBenchConfig) -> dict[str, Any]:
    """Drain host1 of a lab holding ``cfg.lab_drain_vms`` idle VMs; the drain's total time
    against bytes sent / the measured rate of host1's migration link. Raises
    ``VmferryError`` (the lab is brought down in any case)."""
    from vmferry.bench.migration.lab import BenchLab, free_port
    from vmferry.errors import VmferryError, WaitTimeout
    from vmferry.http import client_for
    from vmferry.model.topology import default_topology_path

    data = yaml.safe_load(default_topology_path().read_text())
    data["name"] = cfg.lab_name
    lab = BenchLab(Topology.model_validate(data), free_port())
    try:
        lab.up(lambda step: None)
        with client_for(lab.controller_url, token=lab.admin_token, timeout=300) as api:
            for i in range(cfg.lab_drain_vms):
                response = api.post("/v1/vms", json={
                    "name": f"drain{i}", "host": "host1", "ip": f"192.0.2.{60 + i}/24",
                    "vlan": 100, "memory_mib": cfg.lab_drain_memory_mib})
                if not response.is_success:
                    raise VmferryError(f"creating drain{i} failed: {response.text[:300]}")
            # Every move leaves through host1's link: its rate bounds the whole drain.
            link_mbps = lab.link_mbps("host1", "host2")
            response = api.post("/v1/hosts/host1/drain")
            if not response.is_success:
                raise VmferryError(f"the drain was refused: {response.text[:300]}")
            job = response.json()
            deadline = time.monotonic() + 600
            while job["state"] == "running":
                if time.monotonic() > deadline:
                    raise WaitTimeout("the drain of host1 to end", 600)
                time.sleep(0.2)
                job = api.get("/v1/hosts/host1/drain").json()
            records = [(m, api.get(f"/v1/migrations/{m['migration_id']}").json())
                       for m in job["moves"] if m.get("migration_id") is not None]
            # Measured again the same way once the drain is over: the spread of the two is
            # how far the bound moves with the machine's load (reported, not used).
            link_after = lab.link_mbps("host1", "host2")
    finally:
        lab.down()
    total_s = (datetime.fromisoformat(job["ended_at"]) -
               datetime.fromisoformat(job["started_at"])).total_seconds()
    bound_s = job["bytes_total"] * 8 / (link_mbps * 1e6)
    return {"state": job["state"], "vms": cfg.lab_drain_vms,
            "memory_mib": cfg.lab_drain_memory_mib, "total_s": round(total_s, 2),
            "bytes_total": job["bytes_total"], "link_mbps": link_mbps,
            "link_mbps_after": link_after, "bound_s": round(bound_s, 3),
            "bound_s_after": round(job["bytes_total"] * 8 / (link_after * 1e6), 3),
            "ratio_to_bound": round(total_s / bound_s, 2) if bound_s else None,
            "target_ratio": 1.3,
            "moves": [{k: m[k] for k in ("vm", "destination", "state", "bandwidth_mbps")}
                      for m in job["moves"]],
            "breakdown": [move_breakdown(m, r, job["started_at"]) for m, r in records]}


def move_breakdown(move: dict[str, Any], record: dict[str, Any],
                   drain_started: str) -> dict[str, Any]:
    """Where one move's time went, against the drain's start (ms): when the drain launched
    it, when its first phase began and its last ended, when its record ended and when the
    drain saw that; each phase's duration; QEMU's own setup/total/downtime figures."""
    t0 = datetime.fromisoformat(drain_started)

    def since(stamp: str | None) -> float | None:
        if stamp is None:
            return None
        at = datetime.fromisoformat(stamp)
        if at.tzinfo is None:          # the store keeps UTC without its zone
            at = at.replace(tzinfo=UTC)
        return round((at - t0).total_seconds() * 1000, 1)

    phases = record.get("phases") or []
    qemu = (record.get("result") or {}).get("qemu") or {}
    return {
        "vm": record["vm"], "destination": record["destination"],
        "state": record["state"],
        "launched_ms": since(move.get("started_at")),
        "started_ms": since(phases[0]["started"] if phases else None),
        "ended_ms": since(phases[-1].get("ended") if phases else None),
        "record_ended_ms": since(record.get("ended_at")),
        "seen_ended_ms": since(move.get("ended_at")),
        "phases_ms": {p["phase"]: p.get("duration_ms") for p in phases},
        "qemu_ms": {k: qemu.get(f"{k}_time_ms") for k in ("setup", "total")} |
                   {"downtime": qemu.get("downtime_ms")},
        "qemu_bytes": qemu.get("transferred_bytes"), "qemu_mbps": qemu.get("mbps"),
        "bandwidth_mbps": (record.get("options") or {}).get("bandwidth_mbps"),
    }


def _stats(samples: list[float], n: int) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": n, "p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(p99, 2),
            "max_ms": round(ordered[-1], 2)}


def write_placement_report(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
