"""The fabric interface: the VLANs on the switches' trunk ports, MAC learning, and the
temporary switchover rules (``vmferry.model.switchover``)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from vmferry.model.switchover import Rule, SwitchPorts


class Fabric(ABC):
    """The fabric switches of a site (not the hosts' softswitches: agents own those)."""

    @abstractmethod
    def trunk_vlans(self, switch: str, port: str) -> frozenset[int]:
        """VLANs the trunk port carries now."""

    @abstractmethod
    def set_trunk_vlans(self, switch: str, port: str, vlans: frozenset[int]) -> None:
        """Make the trunk port carry exactly ``vlans``."""

    @abstractmethod
    def forget_mac(self, switch: str, mac: str) -> None:
        """Drop what ``switch`` learned about ``mac`` so the next frame teaches it anew."""

    @abstractmethod
    def pin_mac(self, switch: str, port: str, vlan: int, mac: str) -> bool:
        """Hold ``mac`` on ``vlan`` at ``port`` (a static entry): frames from the MAC entering
        elsewhere teach the switch nothing until ``unpin_mac``; moving a pin is not a MAC
        move. False when the switch offers no way to pin (nothing changed). Raises
        ``FabricError``."""

    @abstractmethod
    def unpin_mac(self, switch: str, vlan: int, mac: str, drain: bool = False) -> None:
        """Release the pin so the next frame from ``mac`` teaches the switch anew.
        ``drain``: first let the switch account for the frames it forwarded so far, while
        the pin holds (a switch that learns late from them would move the MAC back).
        Idempotent. Raises ``FabricError``."""

    @abstractmethod
    def pinned_macs(self, switch: str) -> set[tuple[int, str]]:
        """(VLAN, MAC) of every pinned MAC on the switch. Raises ``FabricError``."""

    @abstractmethod
    def switch_ports(self, switch: str) -> SwitchPorts:
        """The switch's ports as they are now (OpenFlow numbers, access VLAN or trunk list).
        Raises ``FabricError``."""

    @abstractmethod
    def replace_rules(self, switch: str, cookie: int, rules: list[Rule],
                      known_empty: bool = False) -> None:
        """Make the switch's rules with ``cookie`` exactly ``rules`` (atomically: all or
        none). ``known_empty``: the caller knows no rule has this cookie yet (saves a read).
        Raises ``FabricError``."""

    @abstractmethod
    def rule_cookies(self, switch: str) -> set[int]:
        """The cookies of the switch's rules. Raises ``FabricError``."""

    @abstractmethod
    def mac_moves(self, switch: str) -> int:
        """How many times a learned MAC moved between ports on the switch since it started
        (a counter; physical switches alarm on MAC flapping). Raises ``FabricError``."""

    def close(self) -> None:  # noqa: B027 - a hook; drivers without connections keep it
        """Release connections."""
