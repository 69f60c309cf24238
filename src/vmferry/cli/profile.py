"""``vmferry profile``: apply, list, show and delete port profiles; ``vm set-profile`` and
``port show``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from vmferry.cli.common import api_call, console, errors_to_exit, print_json
from vmferry.errors import InputError

app = typer.Typer(help="Port profiles: VLAN, ACLs, QoS, storm control, port security.",
                  no_args_is_help=True)
port_app = typer.Typer(help="VM ports as their softswitch has them.", no_args_is_help=True)


@app.command("apply")
def apply(file: Path = typer.Option(..., "-f", "--file", help="YAML file, one or more profiles"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Create or update profiles; changes reach every port using them, live."""
    with errors_to_exit():
        try:
            text = file.read_text()
        except OSError as exc:
            raise InputError("file", f"cannot read {file}: {exc.strerror}") from exc
        from vmferry.model.profile import load_profiles  # pydantic: only when needed
        profiles = load_profiles(text)
    body = {"profiles": [p.model_dump(mode="json", exclude={"version"}) for p in profiles]}
    results = api_call("PUT", "/v1/profiles", json_body=body, timeout=300)
    if as_json:
        print_json(results)
    else:
        for result in results:
            what = "changed" if result["changed"] else "unchanged"
            console.print(f"profile [bold]{result['name']}[/bold] version {result['version']} "
                          f"({what})", highlight=False)
            for port in result["ports"]:
                outcome = "ok" if port["ok"] else f"[red]failed[/red]: {port['error']}"
                console.print(f"  {port['vm']} on {port['host']}: version {port['version']} "
                              f"{outcome}", highlight=False)
    if any(not p["ok"] for r in results for p in r["ports"]):
        raise typer.Exit(1)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """List profiles and the VMs using them."""
    profiles = api_call("GET", "/v1/profiles")
    if as_json:
        print_json(profiles)
        return
    table = Table("name", "version", "vlan", "acl rules", "qos", "vms", "description")
    for p in profiles:
        vlan = str(p["vlan"]) if p["vlan"] is not None else f"trunk {p['trunks']}"
        rules = len(p["acl"]["to_vm"]["rules"]) + len(p["acl"]["from_vm"]["rules"])
        qos = ", ".join(f"{d} {p['qos'][d]['rate_kbps']} kbit/s" for d in ("to_vm", "from_vm")
                        if p["qos"][d]) or "-"
        table.add_row(p["name"], str(p["version"]), vlan, str(rules), qos,
                      ", ".join(p["vms"]) or "-", p["description"])
    console.print(table)


@app.command("show")
def show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one profile, the VMs using it and the version each port carries."""
    profile = api_call("GET", f"/v1/profiles/{name}")
    if as_json:
        print_json(profile)
        return
    import yaml
    ports = profile.pop("ports")
    profile.pop("vms")
    console.print(yaml.safe_dump(profile, sort_keys=False).rstrip(), highlight=False)
    for port in ports:
        state = "ok" if port["ok"] and port["version"] == profile["version"] else \
            (port["error"] or "behind")
        console.print(f"port {port['vm']} on {port['host']}: version {port['version']} ({state})",
                      highlight=False)


@app.command("delete")
def delete(name: str) -> None:
    """Delete a profile no VM uses."""
    api_call("DELETE", f"/v1/profiles/{name}")
    console.print(f"profile {name} deleted")


def set_profile(vm: str = typer.Argument(..., help="VM name"),
                profile: str = typer.Argument(..., help="profile name"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Switch a VM to another port profile, live."""
    result = api_call("PUT", f"/v1/vms/{vm}/profile", json_body={"profile": profile})
    if as_json:
        print_json(result)
    elif result["ok"]:
        console.print(f"{vm} now carries profile {profile} version {result['version']}")
    else:
        console.print(f"[red]failed:[/red] {result['error']}", highlight=False)
    if not result["ok"]:
        raise typer.Exit(1)


@port_app.command("show")
def port_show(vm: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A VM's port: desired and actual side by side, and whether they match."""
    status: dict[str, Any] = api_call("GET", f"/v1/ports/{vm}")
    if as_json:
        print_json(status)
        return
    desired, actual = status["desired"], status["actual"]
    table = Table("", "desired", "actual", title=f"port {status['port']} of {vm} on "
                  f"{status['host']}")
    for key in ("profile", "version", "vlan", "trunks", "vlan_mode", "cookie", "meter_block"):
        table.add_row(key, str(desired.get(key, "-")), str(actual.get(key, "-")))
    table.add_row("flows", str(len(desired["flows"])), str(len(actual["flows"])))
    table.add_row("meters", str(len(desired["meters"])), str(len(actual["meters"])))
    console.print(table)
    for flow in status["missing_flows"]:
        console.print(f"  missing: {flow}", highlight=False)
    for flow in status["extra_flows"]:
        console.print(f"  extra:   {flow}", highlight=False)
    for item in status["not_enforced"]:
        console.print(f"  not enforced: {item}", highlight=False)
    console.print("[green]in sync[/green]" if status["match"] else "[red]NOT in sync[/red]")


def register(main: typer.Typer, vm_app: typer.Typer) -> None:
    """Hook the commands into the ``vmferry`` app."""
    main.add_typer(app, name="profile")
    main.add_typer(port_app, name="port")
    vm_app.command("set-profile")(set_profile)
