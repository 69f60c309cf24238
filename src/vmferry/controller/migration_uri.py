"""The URI a migration's source sends its stream to, built by the controller from the
inventory: ``tcp:ADDR:PORT`` where ADDR is the destination's migration address. The destination
agent only chooses the port; an agent that reports any other scheme or address (a lying or
compromised host) is refused, so no agent can point a source QEMU at ``exec:`` or elsewhere."""

from __future__ import annotations

import ipaddress
import re

from vmferry.drivers.hypervisor.uri import validate_migration_uri
from vmferry.errors import InputError, MigrationError
from vmferry.model.topology import Topology

_ADDR_PORT = re.compile(r"^tcp:(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:]+)):(?P<port>[0-9]{1,5})$")


def migration_ip(topology: Topology, host: str) -> str:
    """``host``'s address on the migration network, without prefix."""
    return str(ipaddress.ip_interface(topology.migration_address(host)).ip)


def format_uri(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"tcp:[{ip}]:{port}" if ip.version == 6 else f"tcp:{ip}:{port}"


def incoming_uri(topology: Topology, destination: str, reported: str | None, *,
                 vm: str | None = None) -> str:
    """The URI to migrate ``vm`` to ``destination``, from the port its agent reported in
    ``reported``. Raises MigrationError (field ``incoming_uri``) when the report is not
    ``tcp:`` to the destination's own migration address."""
    if not reported:
        raise MigrationError(f"the destination on {destination} has no incoming address",
                             vm=vm, field="incoming_uri")
    expected = migration_ip(topology, destination)
    try:
        validate_migration_uri(reported)
    except InputError as exc:
        raise MigrationError(f"the destination on {destination} reported an incoming URI "
                             f"that is refused: {exc.reason}", vm=vm,
                             field="incoming_uri") from None
    match = _ADDR_PORT.match(reported)
    address = (match["v6"] or match["v4"]) if match else None
    try:
        same = address is not None and ipaddress.ip_address(address) == \
            ipaddress.ip_address(expected)
    except ValueError:
        same = False    # a host name: the inventory names addresses only
    if not same or match is None:
        raise MigrationError(f"the destination on {destination} reported an incoming address "
                             f"that is not its migration address {expected}", vm=vm,
                             field="incoming_uri")
    return format_uri(expected, int(match["port"]))
