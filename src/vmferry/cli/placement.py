"""``vmferry where``, ``vmferry vm policy``, ``vmferry host drain|undrain``, ``vmferry balance``."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import typer
from rich.table import Table

from vmferry.cli.common import api_call, console, err_console, print_json

host_app = typer.Typer(help="Hosts: maintenance (drain, undrain).", no_args_is_help=True)
DRAIN_POLL_S = 0.5


def register(app: typer.Typer, vm_app: typer.Typer) -> None:
    app.command("where")(where)
    app.command("balance")(balance)
    app.add_typer(host_app, name="host")
    vm_app.command("policy")(policy)


def where(vm: str = typer.Argument(..., help="VM name"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Every host: may the VM run there, and every reason it may not."""
    out = api_call("GET", f"/v1/vms/{vm}/where")
    if as_json:
        print_json(out)
        return
    table = Table("host", "ok", "state", "rack", "zone", "free", "reasons")
    for h in out["hosts"]:
        reasons = "\n".join(f"{r['code']}: {r['message']}" for r in h["reasons"])
        table.add_row(h["host"], "[green]yes[/green]" if h["ok"] else "[red]no[/red]",
                      h["state"], h["rack"], h["zone"] or "-", f"{h['free_mib']} MiB",
                      reasons or "-")
    console.print(f"[bold]{vm}[/bold] runs on {out['host']}; policy {_policy_text(out['policy'])}")
    console.print(table)
    for crossing in out.get("crossings", []):
        console.print(f"to {crossing['destination']} across a boundary: "
                      f"{crossing['way'] or 'no way across'}")
        for way, reason in crossing["reasons"].items():
            console.print(f"  not {way}: {reason}")


def policy(
    vm: str = typer.Argument(..., help="VM name"),
    zone: str | None = typer.Option(None, "--zone", help="Security zone"),
    tier: int | None = typer.Option(None, "--tier", help="Restart priority, 0 first (0-9)"),
    max_downtime: int | None = typer.Option(None, "--max-downtime", help="ms"),
    affinity: list[str] = typer.Option([], "--affinity", help="Affinity group (repeat)"),
    anti_affinity: list[str] = typer.Option([], "--anti-affinity", help="Group (repeat)"),
    allowed: list[str] = typer.Option([], "--allowed-host", help="Allowed host (repeat)"),
    forbidden: list[str] = typer.Option([], "--forbidden-host", help="Forbidden host (repeat)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show a VM's placement policy, or replace it (live) when any option is given."""
    body: dict[str, Any] = {"affinity": affinity, "anti_affinity": anti_affinity,
                            "forbidden_hosts": forbidden}
    for key, value in (("zone", zone), ("tier", tier), ("max_downtime_ms", max_downtime),
                       ("allowed_hosts", allowed or None)):
        if value is not None:
            body[key] = value
    changing = any(v for v in (zone, tier is not None, max_downtime, affinity, anti_affinity,
                               allowed, forbidden))
    if changing:
        out = api_call("PUT", f"/v1/vms/{vm}/policy", json_body={"policy": body})
    else:
        out = api_call("GET", f"/v1/vms/{vm}/policy")
    if as_json:
        print_json(out)
    else:
        console.print(f"{vm}: {_policy_text(out)}")


@host_app.command("drain")
def drain(host: str = typer.Argument(..., help="Host to empty"),
          detach: bool = typer.Option(False, "--detach", help="Do not follow the progress"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Put a host in maintenance and move every VM away (refused up front, with every
    reason, when some VM has nowhere to go)."""
    job = api_call("POST", f"/v1/hosts/{host}/drain")
    if not detach:
        job = _follow_drain(host, job, quiet=as_json)
    if as_json:
        print_json(job)
    elif not detach:
        console.print(f"drain of {host}: {job['state']} ({_elapsed(job)})")
    if job["state"] == "failed":
        raise typer.Exit(1)


@host_app.command("undrain")
def undrain(host: str = typer.Argument(...)) -> None:
    """Take a host out of maintenance: it may take VMs again."""
    api_call("POST", f"/v1/hosts/{host}/undrain")
    console.print(f"host {host} takes VMs again")


def _follow_drain(host: str, job: dict[str, Any], quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn  # only a drain shows one
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=err_console,
                  disable=quiet) as progress:
        task = progress.add_task(f"draining {host}", total=len(job["moves"]))
        while job["state"] == "running":
            time.sleep(DRAIN_POLL_S)
            job = api_call("GET", f"/v1/hosts/{host}/drain")
            done = [m for m in job["moves"] if m["state"] not in ("planned", "running")]
            moving = ", ".join(f"{m['vm']}->{m['destination']}" for m in job["moves"]
                               if m["state"] == "running")
            progress.update(task, completed=len(done),
                            description=f"draining {host}: {moving or 'waiting'}")
    if not quiet:
        table = Table("vm", "from", "to", "state", "memory", "bandwidth", "error")
        for m in job["moves"]:
            table.add_row(m["vm"], m["source"], m["destination"], m["state"],
                          f"{m['memory_mib']} MiB", f"{m['bandwidth_mbps'] or '-'} Mbit/s",
                          m["error"] or "")
        console.print(table)
    return job


def balance(dry_run: bool = typer.Option(False, "--dry-run", help="Only show the plan"),
            max_moves: int = typer.Option(10, "--max-moves", help="At most this many moves"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Even out memory and CPU load over the hosts: plan (and unless --dry-run, make) moves.
    A host's load is the larger of its memory and CPU shares (CPU read from QEMU)."""
    out = api_call("POST", "/v1/balance", params={"dry_run": dry_run, "max_moves": max_moves},
                   timeout=3600)
    if as_json:
        print_json(out)
        return
    table = Table("host", "memory before", "cpu before", "memory after", "cpu after")
    for host in out["load_before"]:
        table.add_row(host, *(f"{out[key].get(host, 0):.0%}" for key in (
            "memory_before", "cpu_before", "memory_after", "cpu_after")))
    console.print(table)
    moves = Table("vm", "from", "to", "memory", "state")
    for m in out["moves"]:
        moves.add_row(m["vm"], m["source"], m["destination"], f"{m['memory_mib']} MiB",
                      m["state"])
    console.print(moves if out["moves"] else "nothing to move")
    if out["state"] == "failed":
        raise typer.Exit(1)


def _policy_text(policy: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in policy.items() if v not in (None, [], "")]
    return ", ".join(parts) or "default"


def _elapsed(job: dict[str, Any]) -> str:
    if not job.get("started_at") or not job.get("ended_at"):
        return "-"
    seconds = (datetime.fromisoformat(job["ended_at"]) -
               datetime.fromisoformat(job["started_at"])).total_seconds()
    return f"{seconds:.1f} s, {job.get('bytes_total', 0) / 2**20:.0f} MiB sent"
