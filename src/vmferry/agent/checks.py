"""What the agent's API checks before it acts on a request (the service trusts its input)."""

from __future__ import annotations

import ipaddress
import re

from vmferry.agent.service import HostAgent
from vmferry.errors import InputError
from vmferry.model.names import check_unique

_ADDR = re.compile(r"^tcp:(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:]+)):[0-9]{1,5}$")


def check_destination(agent: HostAgent, uri: str) -> None:
    """An outgoing stream goes to another address of this host's migration network, by IP
    (the URI is already ``tcp:``-only by its type). Raises InputError naming ``uri``."""
    match = _ADDR.match(uri)
    try:
        address = ipaddress.ip_address((match["v6"] or match["v4"]) if match else "")
    except ValueError:
        raise InputError("uri", "the address must be an IP address on the migration "
                         "network") from None
    config = agent.config
    if config.migration_ip is None:
        raise InputError("uri", f"host {config.host} has no migration network")
    if address == ipaddress.ip_address(config.migration_ip):
        raise InputError("uri", "the destination is this host itself")
    if config.migration_network is not None and \
            address not in ipaddress.ip_network(config.migration_network, strict=False):
        raise InputError("uri", f"{address} is not on the migration network "
                         f"{config.migration_network}")


def check_tap_free(agent: HostAgent, name: str) -> None:
    """Two guests whose names derive the same tap would share (and break) one port: the
    second is refused (409 naming ``name``) before anything is created."""
    check_unique(name, (guest.name for guest in agent.guests()))
