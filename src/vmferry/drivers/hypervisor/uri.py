"""Migration URIs: ``tcp:HOST:PORT`` and nothing else (defense in depth: the controller and
the agent API check them too)."""

from __future__ import annotations

import ipaddress
import re

from vmferry.errors import InputError

__all__ = ["validate_migration_uri"]

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_TCP_URI_RE = re.compile(
    r"^tcp:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")


def validate_migration_uri(uri: str) -> str:
    """Return ``uri`` if it is ``tcp:HOST:PORT`` (IPv4 literal, ``[IPv6]`` literal or host
    name; port 1-65535) and nothing else: QEMU would run ``exec:`` URIs as a shell command
    and read or write ``file:`` paths. Raises InputError("uri", ...)."""
    match = _TCP_URI_RE.match(uri) if isinstance(uri, str) else None
    if match is None:
        scheme = uri.split(":", 1)[0] if isinstance(uri, str) and ":" in uri else "none"
        raise InputError("uri", f"only tcp:HOST:PORT migration URIs are accepted "
                                f"(scheme {scheme[:16]!r} refused)")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise InputError("uri", f"port {port} is not in 1-65535")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError as exc:
            raise InputError("uri", f"not an IPv6 address: {match['v6']!r}") from exc
        return uri
    host = match["host"]
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise InputError("uri", f"not an IPv4 address: {host!r}") from exc
    elif not _HOSTNAME_RE.match(host):
        raise InputError("uri", f"not a host name: {host[:64]!r}")
    return uri
