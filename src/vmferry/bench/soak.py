"""``vmferry bench soak``: many migrations between random hosts, each checked: it ended
completed (else a failure), the guest's own memory check on the destination found nothing
changed (else a corruption; no verdict: unverified), and ``audit`` right after it found
nothing left behind (else leftovers). Reports p50/p95/max of the moves' total time (the
controller's own: request accepted to completed).

By default it brings up a lab of its own (``BenchLab``), soaks it and brings it down; with
``--site`` it soaks whatever controller the CLI points at. It drives the controller only
through its API (``Api``: method, path, JSON body, query -> JSON). On a lab of its own it also
reads each destination's console through the agent (``MemcheckReader``) and waits for a full
pass of the guest's check that began after the move, so a page the move lost cannot hide in
the pass that was running across it. The guests it creates are deleted at the end, then
``audit`` runs once more.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from vmferry.errors import VmferryError

Api = Callable[[str, str, Any, dict[str, Any] | None], Any]
# (vm, host) -> the guest's MemcheckVerdict (as JSON) read from that host's console.
MemcheckReader = Callable[[str, str], dict[str, Any]]
FINAL = {"completed", "rolled-back", "failed"}
WAIT_S = 600.0
FULL_PASS_WAIT_S = 120.0


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def controller_api(url: str, token: str | None) -> Api:
    """The controller's API as an ``Api``; an error answer raises ``VmferryError`` with the
    controller's message and status (so one bad move is recorded, not fatal)."""
    import httpx

    from vmferry.http import client_for, error_payload

    def call(method: str, path: str, body: Any, params: dict[str, Any] | None) -> Any:
        try:
            with client_for(url, token=token, timeout=WAIT_S) as api:
                response = api.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise VmferryError(f"controller at {url} unreachable: {exc}") from exc
        if not response.is_success:
            message = error_payload(response).get("message", response.reason_phrase)
            raise VmferryError(f"{method} {path}: {message}", status=response.status_code)
        return response.json() if response.content else None
    return call


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


def total_seconds(record: dict[str, Any]) -> float | None:
    """The controller's own total: the migration's record created to its final state."""
    if not record.get("started_at") or not record.get("ended_at"):
        return None
    return round((datetime.fromisoformat(record["ended_at"])
                  - datetime.fromisoformat(record["started_at"])).total_seconds(), 3)


def full_pass_after(read: MemcheckReader, vm: str, host: str, failures_before: int,
                    timeout: float = FULL_PASS_WAIT_S, passes: int = 2) -> dict[str, Any]:
    """Wait until the destination's console shows a second pass line: its first pass may have
    begun on the source, the second began after the move. ``new_failures`` are the guest's
    failures beyond ``failures_before`` (its count is cumulative over its life)."""
    deadline = time.monotonic() + timeout
    while True:
        verdict = read(vm, host)
        failures = int(verdict.get("failures") or 0)
        if verdict.get("passes", 0) >= passes or failures > failures_before \
                or time.monotonic() >= deadline:
            return {"passes": verdict.get("passes", 0), "failures": failures,
                    "new_failures": max(0, failures - failures_before),
                    "fail_lines": verdict.get("fail_lines", [])[:5]}
        time.sleep(0.5)


def memory_verdict(controller: dict[str, Any], after: dict[str, Any] | None) -> bool | None:
    """True: intact; False: a changed block; None: unverified. The soak's own full pass
    after the move when it has one (its failures are this move's alone); else the
    controller's verdict (a pass printed on the destination; its count is the guest's life's)."""
    if after is not None:
        if after["new_failures"]:
            return False
        return True if after["passes"] >= 2 else None
    intact: bool | None = controller.get("intact")
    return intact


def one_move(api: Api, vm: str, hosts: list[str], rng: random.Random) -> dict[str, Any]:
    """One migration of ``vm`` to a random other host, then ``audit``. The memory verdict is
    the controller's until ``verify_after`` (lab only) has read a full pass itself."""
    move: dict[str, Any] = {"at": datetime.now(UTC).isoformat(timespec="seconds"),
                            "id": None, "vm": vm, "source": None, "destination": None,
                            "state": "error", "error": None, "total_s": None,
                            "answered_s": None, "memory_intact": None, "memory": {},
                            "leftovers": []}
    try:
        current = api("GET", f"/v1/vms/{vm}", None, None)["host"]
        destination = rng.choice([h for h in hosts if h != current])
        move.update(source=current, destination=destination)
        started = time.monotonic()
        record = api("POST", "/v1/migrations", {"vm": vm, "to": destination}, None)
        move["id"] = record["id"]
        record = wait_migration(api, int(record["id"]))
        result = record.get("result") or {}
        qemu = result.get("qemu") or {}
        move.update(state=record["state"], error=record.get("error"),
                    answered_s=round(time.monotonic() - started, 3),
                    total_s=total_seconds(record), qemu_total_ms=qemu.get("total_time_ms"),
                    qemu_downtime_ms=qemu.get("downtime_ms"),
                    phases_ms={p["phase"]: p.get("duration_ms")
                               for p in record.get("phases") or []})
        if move["total_s"] is not None:   # the move without the controller's memory wait
            move["moved_s"] = round(move["total_s"]
                                    - (move["phases_ms"].get("verify") or 0) / 1000, 3)
        move["memory"] = {"controller": result.get("memcheck"), "after_move": None}
        if record["state"] == "completed":
            move["memory_intact"] = memory_verdict(result.get("memcheck") or {}, None)
    except VmferryError as exc:
        move["error"] = move["error"] or exc.message
    try:
        findings = api("GET", "/v1/audit", None, None) or []
        move["leftovers"] = [f"{f['kind']} {f['where']} {f['what']}" for f in findings]
    except VmferryError as exc:
        move["leftovers"] = [f"audit failed: {exc.message}"]
    return move


def verify_after(read: MemcheckReader, move: dict[str, Any],
                 known_failures: dict[str, int]) -> None:
    """The soak's own reading of a completed move's destination console (a full pass that
    began after the move); sets ``move["memory_intact"]``: None when it cannot tell."""
    vm = move["vm"]
    waited = time.monotonic()
    try:
        after = full_pass_after(read, vm, move["destination"], known_failures.get(vm, 0))
    except VmferryError as exc:
        move["memory"]["after_move"] = {"error": exc.message}
        move["memory_intact"] = None
        return
    after["waited_s"] = round(time.monotonic() - waited, 3)
    known_failures[vm] = after["failures"]
    move["memory"]["after_move"] = after
    move["memory_intact"] = memory_verdict(move["memory"]["controller"] or {}, after)


def warm_up(api: Api, read: MemcheckReader, names: list[str]) -> dict[str, Any]:
    """Wait for each new guest's first full pass where it was created: a move of a guest that
    is still filling its region would charge the fill to the move's memory-check wait."""
    seen: dict[str, Any] = {}
    for name in names:
        try:
            host = api("GET", f"/v1/vms/{name}", None, None)["host"]
            seen[name] = full_pass_after(read, name, host, 0, timeout=WAIT_S / 2, passes=1)
        except VmferryError as exc:     # its moves will say unverified
            seen[name] = {"error": exc.message}
    return seen


def run(api: Api, *, migrations: int, guests: int = 2, seed: int | None = None,
        memory_mib: int = 192, workload_mibps: int = 8, memcheck_mib: int = 16,
        vlan: int = 100, subnet_prefix: str = "192.0.2",
        read_memcheck: MemcheckReader | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The soak; returns its report (also given to ``on_report`` after every move, so a soak
    cut short keeps its moves). With ``read_memcheck`` each completed move's full pass is
    awaited before that guest moves again (meanwhile the other guests move): the same proof,
    less waiting. Raises ``VmferryError`` when the guests cannot be created."""
    seed = seed if seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    config: dict[str, Any] = {"seed": seed, "guests": guests, "memory_mib": memory_mib,
                              "memcheck_mib": memcheck_mib, "workload_mibps": workload_mibps,
                              "full_pass_after_move": read_memcheck is not None}
    hosts = sorted(h["name"] for h in api("GET", "/v1/hosts", None, None))
    if len(hosts) < 2:
        raise VmferryError("a soak needs at least two hosts", hosts=hosts)
    moves: list[dict[str, Any]] = []
    known_failures: dict[str, int] = {}
    pending: dict[str, dict[str, Any]] = {}     # vm -> its last move, awaiting its full pass

    def settle(vm: str) -> None:
        move = pending.pop(vm, None)
        if move is not None and read_memcheck is not None:
            verify_after(read_memcheck, move, known_failures)
            if progress is not None and move["memory_intact"] is not True:
                progress({**move, "error": f"memory after the move: {move['memory']}"})
    try:
        names = create_guests(api, hosts, guests, rng, memory_mib=memory_mib,
                              workload_mibps=workload_mibps, memcheck_mib=memcheck_mib,
                              vlan=vlan, subnet_prefix=subnet_prefix)
        if read_memcheck is not None:
            config["warm_up"] = warm_up(api, read_memcheck, names)
            known_failures.update({name: seen.get("failures", 0)
                                   for name, seen in config["warm_up"].items()})
        for _ in range(migrations):
            vm = rng.choice(names)
            settle(vm)
            move = one_move(api, vm, hosts, rng)
            moves.append(move)
            if move["state"] == "completed" and read_memcheck is not None:
                move["memory_intact"] = None    # unverified until its full pass is read
                pending[vm] = move
            if progress is not None:
                progress(move)
            if on_report is not None:
                on_report(report(moves, **config))
        for vm in list(pending):
            settle(vm)
    finally:
        for index in range(guests):   # also the ones whose creation failed half-way
            try:
                api("DELETE", f"/v1/vms/soak{index + 1}", None, None)
            except VmferryError:
                pass  # absent, or the final audit reports what is left
    try:
        final = [f"{f['kind']} {f['where']} {f['what']}"
                 for f in api("GET", "/v1/audit", None, None) or []]
    except VmferryError as exc:
        final = [f"audit failed: {exc.message}"]
    return report(moves, final_leftovers=final, **config)


def report(moves: list[dict[str, Any]], final_leftovers: list[str] | None = None,
           **config: Any) -> dict[str, Any]:
    """The verdict: passed only when every move completed, every move's memory was verified
    intact, and no audit (after each move, and the final one) found anything."""
    times = [m["total_s"] for m in moves if m["state"] == "completed" and m["total_s"] is not None]
    moved = [m["moved_s"] for m in moves if m["state"] == "completed" and m.get("moved_s")]
    failures = [m for m in moves if m["state"] != "completed"]
    corruptions = [m for m in moves if m["memory_intact"] is False]
    unverified = [m for m in moves if m["state"] == "completed" and m["memory_intact"] is None]
    # A leftover stays until fixed: count each distinct finding once, however often seen.
    found = {f for m in moves for f in m["leftovers"]} | set(final_leftovers or [])
    return {"config": config, "migrations": len(moves), "completed": len(moves) - len(failures),
            "failures": len(failures), "corruptions": len(corruptions),
            "unverified": len(unverified), "leftovers": len(found),
            "moves_with_leftovers": sum(1 for m in moves if m["leftovers"]),
            "leftover_findings": sorted(found), "final_leftovers": final_leftovers,
            "p50_s": percentile(times, 0.5), "p95_s": percentile(times, 0.95),
            "max_s": max(times, default=None),
            "moved_p50_s": percentile(moved, 0.5), "moved_p95_s": percentile(moved, 0.95),
            "passed": bool(moves) and not failures and not corruptions and not found
            and not unverified,
            "moves": moves}


def write_report(document: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")


def run_on_lab(lab_name: str, topology: Path | None, controller_port: int,
               say: Callable[[str], None], **soak: Any) -> dict[str, Any]:
    """Bring up a lab of the soak's own, soak it, bring it down (also on failure). Raises
    ``VmferryError`` when the lab cannot be brought up or the guests cannot be created."""
    from vmferry.bench.migration.lab import BenchLab, free_port
    from vmferry.model.topology import default_topology_path, load_topology
    spec = load_topology(topology or default_topology_path())
    lab = BenchLab(spec.model_copy(update={"name": lab_name}), controller_port or free_port())

    def read(vm: str, host: str) -> dict[str, Any]:
        verdict: dict[str, Any] = lab.agent(host, "GET", f"/v1/guests/{vm}/memcheck",
                                            timeout=15)
        return verdict
    try:
        lab.up(say)
        say("soak")
        document = run(controller_api(lab.controller_url, lab.admin_token),
                       read_memcheck=read, **soak)
    finally:
        say("lab down")
        lab.down()
    document["lab"] = lab_name
    return document


def summary_line(document: dict[str, Any]) -> str:
    return (f"soak (seed {document['config']['seed']}): {document['migrations']} migrations, "
            f"failures {document['failures']}, leftovers {document['leftovers']}, corruptions "
            f"{document['corruptions']}, unverified {document['unverified']}; total time p50 "
            f"{document['p50_s']} s, p95 {document['p95_s']} s, max {document['max_s']} s "
            f"(without the controller's memory-check wait: p50 {document['moved_p50_s']} s, "
            f"p95 {document['moved_p95_s']} s); "
            f"{'PASSED' if document['passed'] else 'FAILED'}")


# size: a CLI command's options, one per line
def command(
    migrations: int = typer.Option(100, "--migrations", min=1, max=100_000,
                                   help="Migrations to run"),
    guests: int = typer.Option(2, "--guests", min=1, max=40,
                               help="Guests the soak creates (dirtying, memory-checked)"),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: random)"),
    memory: int = typer.Option(192, "--memory", min=64, help="Guest memory, MiB"),
    memcheck_mib: int = typer.Option(16, "--memcheck-mib", min=1, max=1024,
                                     help="Memory each guest fills and verifies, MiB"),
    workload_mibps: int = typer.Option(8, "--workload-mibps", min=0,
                                       help="Memory each guest dirties, MiB/s"),
    output: Path = typer.Option(Path("bench-results/soak.json"), "--output", "-o",
                                help="Where to write the JSON report (after every move)"),
    site: bool = typer.Option(False, "--site", help="Soak the controller the CLI points at "
                              "instead of a lab of its own"),
    lab_name: str = typer.Option("soak", "--lab-name", help="Name of the soak's own lab"),
    state_dir: Path | None = typer.Option(None, "--state-dir",
                                          help="State root for the lab (default: vmferry's)"),
    controller_port: int = typer.Option(0, "--controller-port",
                                        help="The lab controller's TCP port (0: a free one)"),
    topology: Path | None = typer.Option(None, "--topology",
                                         help="Topology YAML of the lab (default: built-in)"),
) -> None:
    """Migrate memory-checked guests that dirty memory between random hosts, checking each
    move: completed, memory intact after it, audit clean. On a lab of its own (brought up and
    down) unless --site. Writes JSON; exit 1 unless every move passed."""
    import os

    from vmferry import paths
    from vmferry.cli.common import console, errors_to_exit, target

    def show(move: dict[str, Any]) -> None:
        check = (move["memory"].get("controller") or {}).get("intact")
        console.print(f"#{move['id']} {move['vm']} {move['source']} -> {move['destination']}: "
                      f"{move['state']} in {move['total_s']} s, memory intact: "
                      f"{move['memory_intact']} (controller's check: {check}), leftovers: "
                      f"{len(move['leftovers'])}"
                      + (f", error: {move['error']}" if move["error"] else ""),
                      highlight=False)
    soak: dict[str, Any] = {
        "migrations": migrations, "guests": guests, "seed": seed, "memory_mib": memory,
        "memcheck_mib": memcheck_mib, "workload_mibps": workload_mibps, "progress": show,
        "on_report": lambda partial: write_report(partial, output)}
    with errors_to_exit():
        if site:
            document = run(controller_api(*target.resolve()), **soak)
        else:
            if state_dir is not None:
                # Keep sharing the image cache: building a guest image takes a while.
                os.environ.setdefault("VMFERRY_IMAGE_DIR", str(paths.image_dir()))
                os.environ["VMFERRY_STATE_DIR"] = str(state_dir.absolute())
            document = run_on_lab(lab_name, topology, controller_port,
                                  lambda step: console.print(f"  {step}", highlight=False),
                                  **soak)
    write_report(document, output)
    console.print(summary_line(document), highlight=False)
    console.print(f"JSON written to {output}")
    if not document["passed"]:
        raise typer.Exit(1)
