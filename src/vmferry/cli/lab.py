"""``vmferry lab``: the built-in data center on this machine."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from vmferry.cli.common import console, current_lab, errors_to_exit, print_json, set_current_lab

app = typer.Typer(help="The lab: racks, switches, hosts and clients in namespaces.",
                  no_args_is_help=True)


@app.command("up")
def up(topology: Path | None = typer.Option(None, "--topology", "-t",
                                            help="Topology YAML (default: two racks)"),
       controller_port: int = typer.Option(8470, help="TCP port of the lab's controller"),
       site: bool = typer.Option(False, help="Reach agents and switches over TCP on a "
                                 "management network, as a real site (lab/site.py)")) -> None:
    """Build the lab and start its controller and agents (idempotent)."""
    from vmferry.image.builder import ensure_image
    from vmferry.lab.builder import Lab
    from vmferry.model.topology import default_topology_path, load_topology
    with errors_to_exit():
        topo = load_topology(topology or default_topology_path())
        with console.status("guest image"):
            ensure_image()
        lab = Lab(topo, controller_port=controller_port, site=site)
        set_current_lab(topo.name)
        with console.status("building the lab") as status:
            lab.up(progress=lambda step: status.update(f"lab: {step}"))
    console.print(f"lab [bold]{topo.name}[/bold] is up: {len(topo.switches)} switches, "
                  f"{len(topo.hosts)} hosts, {len(topo.clients)} clients; controller at "
                  f"{lab.controller_url}")


@app.command("status")
def status(as_json: bool = typer.Option(False, "--json"),
           lab: str | None = typer.Option(None, help="Lab name (default: the current one)"),
           ) -> None:
    """Show the lab's nodes and whether they run."""
    from vmferry.lab.builder import status as lab_status
    result = lab_status(lab or current_lab())
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    console.print(f"lab {result.lab}: {'up' if result.up else 'DOWN'}"
                  + (f", controller {result.controller_url}" if result.controller_url else ""))
    table = Table("node", "kind", "namespace", "running")
    for node in result.nodes:
        running = all(node.get(k, True) for k in ("namespace_up", "ovs_running", "agent_running"))
        table.add_row(node["node"], node["kind"], node["namespace"], "yes" if running else "NO")
    console.print(table)
    if not result.up:
        raise typer.Exit(1)


@app.command("exec", context_settings={"allow_extra_args": True,
                                        "ignore_unknown_options": True})
def exec_(node: str = typer.Argument(..., help="Lab node (host, switch or client)"),
          command: list[str] = typer.Argument(..., help="Command to run, after --"),
          lab: str | None = typer.Option(None, help="Lab name")) -> None:
    """Run a command inside a lab node's namespace."""
    from vmferry.lab.builder import node_namespace
    with errors_to_exit():
        namespace = node_namespace(lab or current_lab(), node)
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", namespace, *command])


@app.command("down")
def down(lab: str | None = typer.Option(None, help="Lab name (default: the current one)")) -> None:
    """Remove every namespace, process, tap, veth and OVS database of the lab."""
    from vmferry.lab.builder import teardown
    with errors_to_exit():
        removed = teardown(lab or current_lab())
    console.print(f"lab {lab or current_lab()} is down ({len(removed)} things removed)")
