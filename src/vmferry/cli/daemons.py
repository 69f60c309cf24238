"""``vmferry controller serve`` and ``vmferry agent serve``: the two daemons."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from vmferry.cli.common import errors_to_exit

controller_app = typer.Typer(help="Run the controller.", no_args_is_help=True)
agent_app = typer.Typer(help="Run a host agent.", no_args_is_help=True)


@controller_app.command("serve")
def controller_serve(
    db: str = typer.Option(..., help="Store URL: sqlite:///PATH or postgresql://..."),
    listen: list[str] = typer.Option(["127.0.0.1:8470"], help="HOST:PORT or unix:/PATH (repeat)"),
    bootstrap_token_file: Path | None = typer.Option(None, help="Admin token to register"),
) -> None:
    """Serve the controller's HTTP API."""
    from vmferry.controller.app import create_app
    from vmferry.controller.auth import ensure_bootstrap_token
    from vmferry.controller.leader import LeaderLease
    from vmferry.controller.migration import Migrations
    from vmferry.controller.service import Controller
    from vmferry.store.db import Store
    from vmferry.web import read_token_file, serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with errors_to_exit():
        store = Store(db)
        store.create_schema()
        if bootstrap_token_file:
            ensure_bootstrap_token(store, read_token_file(bootstrap_token_file))
        lease = LeaderLease(store)
        lease.acquire()
        lease.start_renewing()
        controller = Controller(store)
        migrations = Migrations(controller)
        # Finish or undo whatever a previous controller left half-done.
        migrations.resume_unfinished()
        try:
            serve(create_app(controller, migrations), listen)
        finally:
            lease.release()


@agent_app.command("serve")
def agent_serve(
    host: str = typer.Option(..., help="This host's name in the inventory"),
    listen: list[str] = typer.Option(..., help="HOST:PORT or unix:/PATH (repeat)"),
    token_file: Path = typer.Option(..., help="This agent's credential"),
    controller: str | None = typer.Option(None, help="Controller address for heartbeats"),
    ovsdb: str = typer.Option("unix:/var/run/openvswitch/db.sock", help="OVSDB of this host"),
    ovs_rundir: Path = typer.Option(Path("/var/run/openvswitch"), help="OVS run directory"),
    ovs_ctl: Path | None = typer.Option(None, help="ovs-vswitchd control socket"),
    run_dir: Path = typer.Option(Path("/var/lib/vmferry/guests"), help="Guests' files"),
    shared_storage: Path | None = typer.Option(None, help="Storage all hosts see"),
    memory_mib: int = typer.Option(4096, help="Memory guests may use on this host"),
    migration_ip: str | None = typer.Option(None, help="Address on the migration network"),
) -> None:
    """Serve a host agent (runs inside the host, or its namespace in the lab)."""
    from vmferry.agent.app import run_agent
    from vmferry.agent.service import AgentConfig, HostAgent
    from vmferry.drivers.hypervisor.qemu import QemuHypervisor
    from vmferry.drivers.softswitch.ovs import OvsSoftswitch
    from vmferry.image.builder import ensure_image
    from vmferry.web import read_token_file
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def make() -> tuple[HostAgent, str]:
        token = read_token_file(token_file)
        hypervisor = QemuHypervisor(run_dir, ensure_image())
        softswitch = OvsSoftswitch(ovsdb, rundir=ovs_rundir, vswitchd_ctl=ovs_ctl)
        address = migration_ip or _migration_address()
        config = AgentConfig(host=host, run_dir=run_dir, memory_mib=memory_mib,
                             shared_storage=shared_storage, migration_ip=address)
        return HostAgent(config, hypervisor, softswitch), token

    with errors_to_exit():
        run_agent(make, listen, controller)


def _migration_address() -> str | None:
    """This host's address on the migration interface, when it has one."""
    from pyroute2 import IPRoute

    from vmferry.model.topology import MIGRATION_IFNAME
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=MIGRATION_IFNAME)
        if not found:
            return None
        for addr in ipr.get_addr(index=found[0], family=2):
            return str(addr.get("IFA_ADDRESS"))
    return None
