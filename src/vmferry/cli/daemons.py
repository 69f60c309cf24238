"""``vmferry controller serve`` and ``vmferry agent serve``: the two daemons.

Each reads its settings from the command line and, with ``--config FILE``, from a TOML file
whose keys are the long option names (``token-file = "/etc/vmferry/agent.token"``). A value
given on the command line (or in its environment variable) wins over the file; the file wins
over the built-in default. An unknown key or a value of the wrong type in the file is refused,
naming the key, before anything starts. A relative path in the file is taken beside the file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vmferry.cli.common import errors_to_exit
from vmferry.errors import InputError

if TYPE_CHECKING:
    from vmferry.cli.daemon_settings import AgentSettings, ControllerSettings

controller_app = typer.Typer(help="Run the controller.", no_args_is_help=True)
agent_app = typer.Typer(help="Run a host agent.", no_args_is_help=True)

CONFIG_HELP = "TOML file of settings (keys: the long option names); options given here win"


@controller_app.command("serve")
def controller_serve(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    db: str | None = typer.Option(None, help="Store URL: sqlite:///PATH or postgresql://..."),
    listen: list[str] | None = typer.Option(
        None, help="HOST:PORT or unix:/PATH (repeat) \\[default: 127.0.0.1:8470]"),
    bootstrap_token_file: Path | None = typer.Option(None, help="Admin token to register"),
    tls_dir: Path | None = typer.Option(None, help="HTTPS with client certificates on every "
                                        "--listen (a `vmferry pki issue` directory)"),
    plain_listen: list[str] | None = typer.Option(
        None, help="Plain-HTTP listener besides the HTTPS ones (loopback, for users' tokens)"),
    secrets_dir: Path | None = typer.Option(None, help="Agent token files must be inside it "
                                            "\\[default: /etc/vmferry/secrets]"),
    run_dir: Path | None = typer.Option(None, help="unix: agent URLs must be inside it "
                                        "\\[default: /run/vmferry]"),
    db_password_file: Path | None = typer.Option(
        None, help="The store's password (else $VMFERRY_DB_PASSWORD); never put it in --db"),
) -> None:
    """Serve the controller's HTTP API."""
    from vmferry.cli.daemon_settings import ControllerSettings, resolve_settings
    with errors_to_exit():
        settings = resolve_settings(ControllerSettings, ctx, config, {
            "db": db, "listen": listen, "bootstrap_token_file": bootstrap_token_file,
            "tls_dir": tls_dir, "plain_listen": plain_listen, "secrets_dir": secrets_dir,
            "run_dir": run_dir, "db_password_file": db_password_file})
    _run_controller(settings)


def _run_controller(settings: ControllerSettings) -> None:
    from vmferry.controller.app import create_app
    from vmferry.controller.auth import ensure_bootstrap_token
    from vmferry.controller.leader import LeaderLease
    from vmferry.controller.migration import Migrations
    from vmferry.controller.service import Controller
    from vmferry.web import read_token_file, serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from vmferry.controller.inventory_rules import Confinement
    from vmferry.http import ClientTls
    from vmferry.web import ServerTls
    restrict_umask()
    with errors_to_exit():
        store = open_store(settings)
        store.create_schema()
        if settings.bootstrap_token_file:
            ensure_bootstrap_token(store, read_token_file(settings.bootstrap_token_file))
        lease = LeaderLease(store)
        lease.acquire()
        lease.start_renewing()
        tls = settings.tls_dir
        controller = Controller(store, agent_tls=ClientTls(tls) if tls else None)
        migrations = Migrations(controller, lease=lease)
        # Finish or undo whatever a previous controller left half-done.
        migrations.resume_unfinished()
        app = create_app(controller, migrations)
        app.state.confinement = Confinement(settings.secrets_dir, settings.run_dir)
        try:
            serve(app, list(settings.listen), tls=ServerTls(tls) if tls else None,
                  plain=list(settings.plain_listen))
        finally:
            lease.release()


@agent_app.command("serve")
def agent_serve(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    host: str | None = typer.Option(None, help="This host's name in the inventory \\[required]"),
    listen: list[str] | None = typer.Option(None, help="HOST:PORT or unix:/PATH (repeat) "
                                            "\\[required]"),
    token_file: Path | None = typer.Option(None, help="This agent's credential \\[required]"),
    controller: str | None = typer.Option(None, help="Controller address for heartbeats"),
    # Defaults (named in the help) are AgentSettings': None here lets the config file's value
    # through, and keeps pydantic out of every `vmferry` start.
    ovsdb: str | None = typer.Option(None, help="OVSDB of this host "
                                     "\\[default: unix:/var/run/openvswitch/db.sock]"),
    ovs_rundir: Path | None = typer.Option(None, help="OVS run directory "
                                           "\\[default: /var/run/openvswitch]"),
    ovs_ctl: Path | None = typer.Option(None, help="ovs-vswitchd control socket"),
    run_dir: Path | None = typer.Option(None, help="Guests' files "
                                        "\\[default: /var/lib/vmferry/guests]"),
    shared_storage: Path | None = typer.Option(None, help="Storage all hosts see"),
    memory_mib: int | None = typer.Option(None, help="Memory guests may use on this host "
                                          "\\[default: 4096]"),
    migration_ip: str | None = typer.Option(None, help="Address on the migration network"),
    hypervisor: str | None = typer.Option(None, help="qemu (QMP) or libvirt \\[default: qemu]"),
    libvirt_uri: str | None = typer.Option(None, help="libvirt daemon of this host "
                                           "\\[default: qemu:///system]"),
    libvirt_console_dir: Path | None = typer.Option(
        None, help="Where that daemon's domain logs are \\[default: /var/log/libvirt/qemu]"),
    tls_dir: Path | None = typer.Option(None, help="HTTPS with client certificates and QEMU "
                                        "migration TLS (a `vmferry pki issue` directory)"),
    controller_name: str | None = typer.Option(None, help="The only certificate name (CN) "
                                               "served \\[default: controller]"),
) -> None:
    """Serve a host agent (runs inside the host, or its namespace in the lab)."""
    from vmferry.cli.daemon_settings import AgentSettings, resolve_settings
    with errors_to_exit():
        settings = resolve_settings(AgentSettings, ctx, config, {
            "host": host, "listen": listen, "token_file": token_file, "controller": controller,
            "ovsdb": ovsdb, "ovs_rundir": ovs_rundir, "ovs_ctl": ovs_ctl, "run_dir": run_dir,
            "shared_storage": shared_storage, "memory_mib": memory_mib,
            "migration_ip": migration_ip, "hypervisor": hypervisor, "libvirt_uri": libvirt_uri,
            "libvirt_console_dir": libvirt_console_dir, "tls_dir": tls_dir,
            "controller_name": controller_name})
    _run_agent(settings)


def _run_agent(settings: AgentSettings) -> None:
    from vmferry.agent.app import run_agent
    from vmferry.agent.service import AgentConfig, HostAgent
    from vmferry.drivers.hypervisor.base import Hypervisor
    from vmferry.drivers.hypervisor.qemu import QemuHypervisor
    from vmferry.drivers.softswitch.ovs import OvsSoftswitch
    from vmferry.image.builder import ensure_image
    from vmferry.web import read_token_file
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def make() -> tuple[HostAgent, str]:
        token = read_token_file(settings.token_file)
        hypervisor: Hypervisor
        if settings.hypervisor == "libvirt":
            from vmferry.drivers.hypervisor.libvirt import LibvirtHypervisor
            hypervisor = LibvirtHypervisor(settings.run_dir, ensure_image(),
                                           uri=settings.libvirt_uri, host=settings.host,
                                           console_dir=settings.libvirt_console_dir)
        else:
            hypervisor = QemuHypervisor(settings.run_dir, ensure_image(),
                                        tls_dir=settings.tls_dir)
        softswitch = OvsSoftswitch(settings.ovsdb, rundir=settings.ovs_rundir,
                                   vswitchd_ctl=settings.ovs_ctl)
        found = _migration_interface()
        address = settings.migration_ip or (str(found.ip) if found else None)
        agent_config = AgentConfig(host=settings.host, run_dir=settings.run_dir,
                                   memory_mib=settings.memory_mib,
                                   shared_storage=settings.shared_storage, migration_ip=address,
                                   migration_network=str(found.network) if found else None)
        return HostAgent(agent_config, hypervisor, softswitch), token

    restrict_umask()
    with errors_to_exit():
        run_agent(make, list(settings.listen), settings.controller, tls_dir=settings.tls_dir,
                  controller_name=settings.controller_name)


def restrict_umask() -> None:
    """Whatever a daemon creates (state, requests, sockets, QEMU's files) is its own: files
    0600, directories 0700."""
    os.umask(0o077)


def open_store(settings: ControllerSettings) -> Any:
    """The store, with the password from a file or $VMFERRY_DB_PASSWORD added to the URL here
    (so it is in no argv, config or log); an error names the URL with the password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from vmferry.store.db import Store
    try:
        url = make_url(settings.db)
    except ArgumentError:
        raise InputError("db", "not a database URL") from None
    password = os.environ.get("VMFERRY_DB_PASSWORD")
    if settings.db_password_file is not None:
        password = read_secret(settings.db_password_file, "db-password-file")
    if password:
        url = url.set(password=password)
    try:
        return Store(url.render_as_string(hide_password=False))
    except InputError:
        raise InputError("db", f"cannot use database URL "
                         f"{url.render_as_string(hide_password=True)}") from None


def read_secret(path: Path, field: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise InputError(field, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise InputError(field, f"{path} is empty")
    return value


def _migration_interface() -> ipaddress.IPv4Interface | None:
    """This host's address and network on the migration interface, when it has one."""
    from pyroute2 import IPRoute

    from vmferry.model.topology import MIGRATION_IFNAME
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=MIGRATION_IFNAME)
        if not found:
            return None
        for addr in ipr.get_addr(index=found[0], family=2):
            return ipaddress.IPv4Interface(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}")
    return None
