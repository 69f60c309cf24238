"""The daemons' settings (``controller serve``, ``agent serve``): pydantic models of what each
takes, read from a TOML file and the command line (see vmferry.cli.daemons). Apart from the
commands, so that pydantic loads only when a daemon starts, not for every `vmferry` call."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmferry.errors import InputError


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
