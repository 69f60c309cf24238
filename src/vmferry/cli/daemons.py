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
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmferry.cli.common import errors_to_exit
from vmferry.errors import InputError

controller_app = typer.Typer(help="Run the controller.", no_args_is_help=True)
agent_app = typer.Typer(help="Run a host agent.", no_args_is_help=True)

CONFIG_HELP = "TOML file of settings (keys: the long option names); options given here win"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Settings(BaseModel):
    """A daemon's settings: keys in files are the long option names (kebab-case)."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True,
                              frozen=True)


class ControllerSettings(_Settings):
    db: str = Field(min_length=1, description="Store URL: sqlite:///PATH or postgresql://...")
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:8470"], min_length=1)
    bootstrap_token_file: Path | None = None
    # HTTPS with client certificates on every ``listen`` (a `vmferry pki issue` directory);
    # ``plain-listen`` addresses stay plain HTTP (a loopback address for users' tokens).
    tls_dir: Path | None = None
    plain_listen: list[str] = Field(default_factory=list)
    # Inventory confinement: agent token files only from here, unix: agent URLs only here.
    secrets_dir: Path = Path("/etc/vmferry/secrets")
    run_dir: Path = Path("/run/vmferry")
    # The store URL's password, read from this file (never in argv, the config or logs).
    db_password_file: Path | None = None


class AgentSettings(_Settings):
    host: str = Field(min_length=1)
    listen: list[str] = Field(min_length=1)
    token_file: Path
    controller: str | None = None
    ovsdb: str = "unix:/var/run/openvswitch/db.sock"
    ovs_rundir: Path = Path("/var/run/openvswitch")
    ovs_ctl: Path | None = None
    run_dir: Path = Path("/var/lib/vmferry/guests")
    shared_storage: Path | None = None
    memory_mib: int = Field(4096, ge=64)
    migration_ip: str | None = None
    hypervisor: Literal["qemu", "libvirt"] = "qemu"
    libvirt_uri: str = "qemu:///system"
    libvirt_console_dir: Path = Path("/var/log/libvirt/qemu")
    # HTTPS with client certificates (a `vmferry pki issue` directory named after this host);
    # the same directory is QEMU's migration TLS credentials.
    tls_dir: Path | None = None
    controller_name: str = Field("controller", min_length=1, max_length=63)


S = TypeVar("S", bound=_Settings)

# Sources that mean "the operator said so here", which beat the config file. By name: Typer
# ships its own copy of click, whose ParameterSource is not click's.
_EXPLICIT = {"COMMANDLINE", "ENVIRONMENT"}


def read_config(path: Path, model: type[_Settings]) -> dict[str, Any]:
    """The settings in a TOML file, keyed by field name. Raises InputError naming the key that
    is unknown, or the file when it cannot be read or parsed."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InputError("config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError("config", f"{path} is not valid TOML: {exc}") from exc
    names = {_kebab(name): name for name in model.model_fields}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise InputError(key, f"unknown setting in {path}; known: {', '.join(sorted(names))}",
                             config=str(path))
        name = names[key]
        # A relative path in a file means beside that file, wherever the daemon was started.
        if isinstance(value, str) and _is_path(model, name) and not Path(value).is_absolute():
            value = str(path.parent / value)
        values[name] = value
    return values


def _is_path(model: type[_Settings], name: str) -> bool:
    annotation = model.model_fields[name].annotation
    return annotation is Path or Path in typing.get_args(annotation)


def resolve_settings(model: type[S], ctx: typer.Context, config: Path | None,
                     options: dict[str, Any]) -> S:
    """Merge built-in defaults, the config file and the command line (in rising order) and
    validate the result. ``options`` are the command's parameters by field name."""
    from_file = read_config(config, model) if config is not None else {}
    merged: dict[str, Any] = {}
    for name, value in options.items():
        source = ctx.get_parameter_source(name)
        explicit = source is not None and source.name in _EXPLICIT
        if name in from_file and not explicit:
            merged[name] = from_file[name]
        elif value is not None and value != []:
            merged[name] = value
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = _kebab(str(error["loc"][0])) if error["loc"] else "config"
        where = f" in {config}" if config is not None and key in map(_kebab, from_file) else ""
        reason = (f"required: give --{key} or {key} = ... in --config FILE"
                  if error["type"] == "missing" else f"{error['msg']}{where}")
        raise InputError(key, reason) from exc


@controller_app.command("serve")
def controller_serve(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    db: str | None = typer.Option(None, help="Store URL: sqlite:///PATH or postgresql://..."),
    listen: list[str] | None = typer.Option(
        None, help="HOST:PORT or unix:/PATH (repeat) [default: 127.0.0.1:8470]"),
    bootstrap_token_file: Path | None = typer.Option(None, help="Admin token to register"),
    tls_dir: Path | None = typer.Option(None, help="HTTPS with client certificates on every "
                                        "--listen (a `vmferry pki issue` directory)"),
    plain_listen: list[str] | None = typer.Option(
        None, help="Plain-HTTP listener besides the HTTPS ones (loopback, for users' tokens)"),
    secrets_dir: Path | None = typer.Option(None, help="Agent token files must be inside it "
                                            "[default: /etc/vmferry/secrets]"),
    run_dir: Path | None = typer.Option(None, help="unix: agent URLs must be inside it "
                                        "[default: /run/vmferry]"),
    db_password_file: Path | None = typer.Option(
        None, help="The store's password (else $VMFERRY_DB_PASSWORD); never put it in --db"),
) -> None:
    """Serve the controller's HTTP API."""
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
    host: str | None = typer.Option(None, help="This host's name in the inventory [required]"),
    listen: list[str] | None = typer.Option(None, help="HOST:PORT or unix:/PATH (repeat) "
                                            "[required]"),
    token_file: Path | None = typer.Option(None, help="This agent's credential [required]"),
    controller: str | None = typer.Option(None, help="Controller address for heartbeats"),
    ovsdb: str = typer.Option(AgentSettings.model_fields["ovsdb"].default,
                              help="OVSDB of this host"),
    ovs_rundir: Path = typer.Option(AgentSettings.model_fields["ovs_rundir"].default,
                                    help="OVS run directory"),
    ovs_ctl: Path | None = typer.Option(None, help="ovs-vswitchd control socket"),
    run_dir: Path = typer.Option(AgentSettings.model_fields["run_dir"].default,
                                 help="Guests' files"),
    shared_storage: Path | None = typer.Option(None, help="Storage all hosts see"),
    memory_mib: int = typer.Option(AgentSettings.model_fields["memory_mib"].default,
                                   help="Memory guests may use on this host"),
    migration_ip: str | None = typer.Option(None, help="Address on the migration network"),
    hypervisor: str = typer.Option(AgentSettings.model_fields["hypervisor"].default,
                                   help="qemu (QMP) or libvirt"),
    libvirt_uri: str = typer.Option(AgentSettings.model_fields["libvirt_uri"].default,
                                    help="libvirt daemon of this host"),
    libvirt_console_dir: Path = typer.Option(
        AgentSettings.model_fields["libvirt_console_dir"].default,
        help="Where that daemon's domain logs are"),
    tls_dir: Path | None = typer.Option(None, help="HTTPS with client certificates and QEMU "
                                        "migration TLS (a `vmferry pki issue` directory)"),
    controller_name: str = typer.Option(AgentSettings.model_fields["controller_name"].default,
                                        help="The only certificate name (CN) served"),
) -> None:
    """Serve a host agent (runs inside the host, or its namespace in the lab)."""
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
