"""``vmferry bench soak``: many migrations between random hosts of a running site, each
checked: it ended completed (else a failure), the guest's own memory check on the destination
found nothing changed (else a corruption), and ``audit`` found nothing left behind (else
leftovers). Reports p50/p95 of the total time of the completed moves.

It drives the controller through its API (``Api``: method, path, JSON body, query -> JSON), so
it soaks whatever site the CLI points at (e.g. a lab: ``vmferry lab up`` first). Guests it
creates dirty memory and check it (``vmferry.memcheck``); they are deleted at the end.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

Api = Callable[[str, str, Any, dict[str, Any] | None], Any]
FINAL = {"completed", "rolled-back", "failed"}
WAIT_S = 600.0


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def wait_migration(api: Api, migration_id: int, timeout: float = WAIT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = api("GET", f"/v1/migrations/{migration_id}", None,
                                     {"wait": 30})
        if record["state"] in FINAL or time.monotonic() >= deadline:
            return record


def create_guests(api: Api, hosts: list[str], count: int, rng: random.Random, *,
                  memory_mib: int, workload_mibps: int, memcheck_mib: int,
                  vlan: int, subnet_prefix: str) -> list[str]:
    names = []
    for index in range(count):
        name = f"soak{index + 1}"
        api("POST", "/v1/vms", {"name": name, "host": rng.choice(hosts), "vlan": vlan,
                                "ip": f"{subnet_prefix}.{200 + index}/24",
                                "memory_mib": memory_mib, "workload_mibps": workload_mibps,
                                "memcheck_mib": memcheck_mib}, None)
        names.append(name)
    return names


def one_move(api: Api, vm: str, hosts: list[str], rng: random.Random) -> dict[str, Any]:
    """One migration of ``vm`` to a random other host, then ``audit``."""
    current = api("GET", f"/v1/vms/{vm}", None, None)["host"]
    destination = rng.choice([h for h in hosts if h != current])
    started = time.monotonic()
    record = api("POST", "/v1/migrations", {"vm": vm, "to": destination}, None)
    record = wait_migration(api, int(record["id"]))
    elapsed = time.monotonic() - started
    memcheck = (record.get("result") or {}).get("memcheck") or {}
    findings = api("GET", "/v1/audit", None, None) or []
    return {"id": record["id"], "vm": vm, "source": current, "destination": destination,
            "state": record["state"], "error": record.get("error"),
            "total_s": round(elapsed, 3), "memory_intact": memcheck.get("intact"),
            "leftovers": [f"{f['kind']} {f['where']} {f['what']}" for f in findings]}


def run(api: Api, *, migrations: int, guests: int = 2, seed: int | None = None,
        memory_mib: int = 192, workload_mibps: int = 8, memcheck_mib: int = 16,
        vlan: int = 100, subnet_prefix: str = "192.0.2",
        progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The soak; returns its report."""
    seed = seed if seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    hosts = sorted(h["name"] for h in api("GET", "/v1/hosts", None, None))
    if len(hosts) < 2:
        raise ValueError("a soak needs at least two hosts")
    names = create_guests(api, hosts, guests, rng, memory_mib=memory_mib,
                          workload_mibps=workload_mibps, memcheck_mib=memcheck_mib,
                          vlan=vlan, subnet_prefix=subnet_prefix)
    moves: list[dict[str, Any]] = []
    try:
        for _ in range(migrations):
            move = one_move(api, rng.choice(names), hosts, rng)
            moves.append(move)
            if progress is not None:
                progress(move)
    finally:
        for name in names:
            try:
                api("DELETE", f"/v1/vms/{name}", None, None)
            except Exception:  # the report still matters; audit shows what is left
                pass
    return report(moves, seed=seed, guests=guests, memcheck_mib=memcheck_mib,
                  workload_mibps=workload_mibps)


def report(moves: list[dict[str, Any]], **config: Any) -> dict[str, Any]:
    times = [m["total_s"] for m in moves if m["state"] == "completed"]
    failures = [m for m in moves if m["state"] != "completed"]
    corruptions = [m for m in moves if m["memory_intact"] is False]
    unverified = [m for m in moves if m["state"] == "completed" and m["memory_intact"] is None]
    leftovers = sum(len(m["leftovers"]) for m in moves)
    return {"config": config, "migrations": len(moves), "completed": len(times),
            "failures": len(failures), "corruptions": len(corruptions),
            "unverified": len(unverified), "leftovers": leftovers,
            "p50_s": percentile(times, 0.5), "p95_s": percentile(times, 0.95),
            "passed": bool(moves) and not failures and not corruptions and not leftovers
            and not unverified,
            "moves": moves}


def write_report(document: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")


# size: a CLI command's options, one per line
def command(
    migrations: int = typer.Option(100, "--migrations", min=1, max=100_000,
                                   help="Migrations to run"),
    guests: int = typer.Option(2, "--guests", min=1, max=50,
                               help="Guests the soak creates (dirtying, memory-checked)"),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: random)"),
    memcheck_mib: int = typer.Option(16, "--memcheck-mib", min=1,
                                     help="Memory each guest fills and verifies"),
    workload_mibps: int = typer.Option(8, "--workload-mibps", min=0,
                                       help="Memory each guest dirties, MiB/s"),
    output: Path = typer.Option(Path("bench-results/soak.json"), "--output", "-o",
                                help="Where to write the JSON report"),
) -> None:
    """Migrate guests between random hosts of the site the CLI points at (a lab), checking
    each move: completed, memory intact, audit clean. Exit 1 unless all are."""
    from vmferry.cli.common import api_call, console

    def api(method: str, path: str, body: Any, params: dict[str, Any] | None) -> Any:
        return api_call(method, path, json_body=body, params=params, timeout=WAIT_S)

    def show(move: dict[str, Any]) -> None:
        console.print(f"#{move['id']} {move['vm']} {move['source']} -> {move['destination']}: "
                      f"{move['state']} in {move['total_s']:.1f}s, memory intact: "
                      f"{move['memory_intact']}, leftovers: {len(move['leftovers'])}")
    document = run(api, migrations=migrations, guests=guests, seed=seed,
                   memcheck_mib=memcheck_mib, workload_mibps=workload_mibps, progress=show)
    write_report(document, output)
    console.print(f"soak (seed {document['config']['seed']}): {document['migrations']} "
                  f"migrations, failures {document['failures']}, leftovers "
                  f"{document['leftovers']}, corruptions {document['corruptions']}, unverified "
                  f"{document['unverified']}; total time p50 {document['p50_s']}s, p95 "
                  f"{document['p95_s']}s -> {output}")
    if not document["passed"]:
        raise typer.Exit(1)
