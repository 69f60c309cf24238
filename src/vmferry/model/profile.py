"""Port profiles: what a VM's switch port enforces, defined once by the network admin.

A profile is a value with no I/O: its VLAN (an access VLAN or a trunk set), MTU, ordered ACLs
per direction with a default action, QoS (rate limit with burst per direction, DSCP marking),
storm control (packets per second of broadcast / multicast / unknown unicast) and the port
security switches (MAC anti-spoofing, IP source guard, ARP guard, IPv6 router advertisement
and neighbour advertisement guards).

Directions are seen from the VM: ``to_vm`` is what reaches it, ``from_vm`` is what it sends.
Every validation problem becomes an ``InputError`` naming the field path, e.g.
``profiles[0].acl.to_vm.rules[2].port: port range 9000-80 is upside down``.

    profiles = load_profiles(text)            # YAML: one mapping, a list, or several documents
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from vmferry.errors import InputError
from vmferry.model.network import VlanId
from vmferry.model.validation import input_error_from, parse

PROFILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_RULES = 500            # per direction; rule priorities are laid out below this many


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AclRule(_Strict):
    """One ACL rule. ``remote`` is the peer's network (source to the VM, destination from
    it); ``port`` the VM's port to it, the remote port from it: ``8080`` or ``"8000-8100"``."""

    action: Literal["allow", "deny"]
    protocol: Literal["any", "icmp", "tcp", "udp"] = "any"
    remote: str | None = Field(None, description="IPv4 network, e.g. 198.51.100.0/24")
    port: int | str | None = Field(None, description="port or range lo-hi (tcp/udp only)")
    description: str = ""

    @field_validator("remote")
    @classmethod
    def _remote(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR network (like 198.51.100.0/24)") from None
        if network.version != 4:
            raise ValueError(f"{value!r}: only IPv4 networks are supported in ACL rules")
        return str(network)

    @field_validator("port")
    @classmethod
    def _port(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("a port is a number 1-65535 or a range lo-hi")
        low, high = _port_bounds(value)
        for bound in (low, high):
            if not 1 <= bound <= 65535:
                raise ValueError(f"port {bound} is not 1-65535")
        if low > high:
            raise ValueError(f"port range {low}-{high} is upside down (low must be <= high)")
        return low if low == high else f"{low}-{high}"

    @model_validator(mode="after")
    def _port_needs_transport(self) -> AclRule:
        if self.port is not None and self.protocol not in ("tcp", "udp"):
            raise ValueError(f"a port needs protocol tcp or udp, not {self.protocol}")
        return self

    @property
    def port_range(self) -> tuple[int, int] | None:
        return None if self.port is None else _port_bounds(self.port)


def _port_bounds(value: int | str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    text = value.strip()
    low_text, sep, high_text = text.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise ValueError(f"{value!r} is not a port or a range like 8000-8100") from None
    return low, high


class AclDirection(_Strict):
    default: Literal["allow", "deny"] = "allow"
    rules: list[AclRule] = Field(default_factory=list, max_length=MAX_RULES)


class Acl(_Strict):
    """Ordered rules per direction, first match wins. ``stateful``: replies to a connection
    one direction allowed are allowed back (connection tracking)."""

    stateful: bool = True
    to_vm: AclDirection = Field(default_factory=AclDirection)
    from_vm: AclDirection = Field(default_factory=AclDirection)

    @property
    def empty(self) -> bool:
        return not (self.to_vm.rules or self.from_vm.rules) and \
            self.to_vm.default == "allow" and self.from_vm.default == "allow"


class RateLimit(_Strict):
    rate_kbps: int = Field(gt=0, le=100_000_000, description="kbit/s")
    burst_kb: int | None = Field(None, ge=1, le=10_000_000, description="kbit")


class Qos(_Strict):
    to_vm: RateLimit | None = None
    from_vm: RateLimit | None = None
    dscp: Annotated[int | None, Field(ge=0, le=63, description="DSCP on the VM's IPv4")] = None


class StormControl(_Strict):
    """Packets per second the VM may send of each kind (None: unlimited)."""

    broadcast_pps: Annotated[int | None, Field(gt=0, le=10_000_000)] = None
    multicast_pps: Annotated[int | None, Field(gt=0, le=10_000_000)] = None
    unknown_unicast_pps: Annotated[int | None, Field(gt=0, le=10_000_000)] = None


class Security(_Strict):
    """Port security. The guards are on by default; ``allow_*`` let a VM that is a router
    (or proxies neighbour discovery) do what a plain VM must not.

    - ``mac_antispoof``: frames only from the VM's MAC.
    - ``ip_source_guard``: IPv4 only from its addresses (and DHCP discovery from 0.0.0.0),
      IPv6 only from its addresses, ``::`` (duplicate address detection) and the one
      link-local address its MAC gives (EUI-64), not any ``fe80::/10``.
    - ``arp_guard``: ARP only for its own IPv4 addresses, from its MAC.
    - ``allow_router_advertisements``: let the VM send IPv6 router advertisements (ICMPv6
      134) and redirects (137); off, they are dropped, so a VM cannot make itself the
      segment's router.
    - ``allow_foreign_neighbor_advertisements``: let the VM send neighbour advertisements
      (ICMPv6 136) for addresses that are not its own (proxy ND); off, such an advertisement
      is dropped (NA spoofing), and those it sends for its own addresses must carry its MAC
      as the target link-layer address, if they carry one at all.
    """

    mac_antispoof: bool = True
    ip_source_guard: bool = True
    arp_guard: bool = True
    # Strict: a new switch that opens a door takes true or false, not "yes" or 1.
    allow_router_advertisements: StrictBool = False
    allow_foreign_neighbor_advertisements: StrictBool = False


class PortProfile(_Strict):
    """A named, versioned port profile. ``version`` is assigned by the controller."""

    name: str = Field(min_length=1, max_length=64, pattern=PROFILE_NAME_PATTERN)
    description: str = Field("", max_length=1000)
    version: int | None = Field(None, ge=1)
    vlan: VlanId | None = None
    trunks: list[VlanId] | None = Field(None, min_length=1, max_length=4094)
    mtu: int | None = Field(None, ge=68, le=9216)
    acl: Acl = Field(default_factory=Acl)
    qos: Qos = Field(default_factory=lambda: Qos())
    storm_control: StormControl = Field(default_factory=lambda: StormControl())
    security: Security = Field(default_factory=Security)

    @field_validator("trunks")
    @classmethod
    def _trunks(cls, value: list[int] | None) -> list[int] | None:
        return sorted(set(value)) if value is not None else None

    @model_validator(mode="after")
    def _one_vlan_kind(self) -> PortProfile:
        if self.vlan is not None and self.trunks is not None:
            raise ValueError("give either vlan (access) or trunks, not both")
        if self.vlan is None and self.trunks is None:
            raise ValueError("give vlan (an access VLAN 1-4094) or trunks (a list of VLANs)")
        return self

    @property
    def fabric_vlans(self) -> list[int]:
        """The VLANs a port with this profile needs the fabric to carry."""
        return [self.vlan] if self.vlan is not None else list(self.trunks or [])

    def spec(self) -> dict[str, Any]:
        """The profile as stored and compared: everything except its name and version."""
        return self.model_dump(mode="json", exclude={"name", "version"})

    def same_spec(self, other: PortProfile) -> bool:
        return self.spec() == other.spec()


def parse_profile(data: Any, prefix: str = "") -> PortProfile:
    """One profile from a mapping; raises ``InputError`` naming the field path."""
    if not isinstance(data, dict):
        raise InputError(prefix or "profile", "a profile is a mapping of fields")
    return parse(PortProfile, data, prefix)


def parse_profiles(items: Any, prefix: str = "profiles") -> list[PortProfile]:
    """Several profiles; names must be unique. Raises ``InputError``."""
    if not isinstance(items, list) or not items:
        raise InputError(prefix, "give a non-empty list of profiles")
    profiles: list[PortProfile] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        path = f"{prefix}[{index}]"
        profile = parse_profile(item, path)
        if profile.name in seen:
            raise InputError(f"{path}.name", f"profile {profile.name!r} is also defined at "
                             f"{prefix}[{seen[profile.name]}]")
        seen[profile.name] = index
        profiles.append(profile)
    return profiles


def load_profiles(text: str) -> list[PortProfile]:
    """Profiles from YAML: a mapping, a list of mappings, ``profiles: [...]``, or several
    documents of those. Raises ``InputError`` for bad YAML or a bad profile."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise InputError("file", f"not valid YAML: {exc}") from exc
    items: list[Any] = []
    for doc in documents:
        if isinstance(doc, list):
            items.extend(doc)
        elif isinstance(doc, dict) and set(doc) == {"profiles"}:
            items.extend(doc["profiles"] or [])
        else:
            items.append(doc)
    if not items:
        raise InputError("file", "no profile in the file")
    return parse_profiles(items)


def validation_error(exc: ValidationError, prefix: str = "") -> InputError:
    """For callers that validate a profile themselves."""
    return input_error_from(exc, prefix)
