"""``vmferry vm``: create, list, show and delete VMs."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from vmferry.cli.common import api_call, console, print_json

app = typer.Typer(help="Virtual machines.", no_args_is_help=True)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="VM name"),
    host: str = typer.Option(..., "--host", help="Host to run it on"),
    memory: int = typer.Option(256, "--memory", help="Memory in MiB"),
    vlan: int | None = typer.Option(None, "--vlan", help="Access VLAN (1-4094)"),
    profile: str | None = typer.Option(None, "--profile", help="Port profile"),
    ip: str = typer.Option(..., "--ip", help="Address with prefix, e.g. 192.0.2.10/24"),
    gateway: str | None = typer.Option(None, "--gateway"),
    workload_mibps: int = typer.Option(0, "--workload-mibps", help="Memory the guest dirties/s"),
    max_downtime: int | None = typer.Option(None, "--max-downtime", help="Policy, ms"),
    memcheck_mib: int = typer.Option(0, "--memcheck-mib", help="Memory the guest fills and "
                                     "verifies for ever (checked after every move)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a VM: allocate its MAC, carry its VLAN to the host, start it."""
    body: dict[str, Any] = {"name": name, "host": host, "memory_mib": memory, "ip": ip,
                            "workload_mibps": workload_mibps, "memcheck_mib": memcheck_mib}
    for key, value in (("vlan", vlan), ("profile", profile), ("gateway", gateway),
                       ("max_downtime_ms", max_downtime)):
        if value is not None:
            body[key] = value
    with console.status(f"creating {name} on {host}"):
        vm = api_call("POST", "/v1/vms", json_body=body, timeout=180)
    if as_json:
        print_json(vm)
    else:
        console.print(f"VM [bold]{vm['name']}[/bold] runs on {vm['host']}: VLAN {vm['vlan']}, "
                      f"{vm['ip']}, MAC {vm['mac']}")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """List VMs."""
    vms = api_call("GET", "/v1/vms")
    if as_json:
        print_json(vms)
        return
    table = Table("name", "host", "state", "vlan", "ip", "mac", "memory", "profile")
    for vm in vms:
        table.add_row(vm["name"], vm["host"], vm["state"], str(vm["vlan"]), vm["ip"], vm["mac"],
                      f"{vm['memory_mib']} MiB", vm["profile"] or "-")
    console.print(table)


@app.command("show")
def show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one VM, with what its host reports about it."""
    vm = api_call("GET", f"/v1/vms/{name}", params={"runtime": True})
    if as_json:
        print_json(vm)
        return
    for key, value in vm.items():
        console.print(f"[bold]{key:>16}[/bold]  {value}", highlight=False)


@app.command("delete")
def delete(name: str) -> None:
    """Delete a VM: stop it, remove its port, flows and tap, prune its VLAN."""
    with console.status(f"deleting {name}"):
        api_call("DELETE", f"/v1/vms/{name}")
    console.print(f"VM {name} deleted")
