"""The fabric interface: the VLANs on the switches' trunk ports, and MAC learning."""

from __future__ import annotations

from abc import ABC, abstractmethod


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

    def close(self) -> None:  # noqa: B027 - a hook; drivers without connections keep it
        """Release connections."""
