"""What links the in-memory hypervisors (``fake.FakeHypervisor``): incoming URIs listened on
and broken links."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from vmferry.errors import HypervisorError

if TYPE_CHECKING:
    from vmferry.drivers.hypervisor.fake import FakeHypervisor

__all__ = ["FakeNetwork"]


class FakeNetwork:
    """What links fakes: incoming URIs being listened on, and links that are broken."""

    def __init__(self) -> None:
        self._listeners: dict[str, tuple[FakeHypervisor, str]] = {}
        self._broken: set[str] = set()
        self._cut: set[str] = set()     # "tcp:ADDR": every port of the address
        self._lock = threading.Lock()
        #: One lock and condition for every fake on this network: a migration changes two.
        self.changed = threading.Condition(threading.RLock())

    def listen(self, uri: str, hypervisor: FakeHypervisor, name: str) -> None:
        with self._lock:
            if uri in self._listeners:
                raise HypervisorError(f"{uri} is already in use", host=hypervisor.host,
                                      vm=name, cause="Address already in use")
            self._listeners[uri] = (hypervisor, name)

    def unlisten(self, uri: str) -> None:
        with self._lock:
            self._listeners.pop(uri, None)

    def listener(self, uri: str) -> tuple[FakeHypervisor, str] | None:
        with self._lock:
            return self._listeners.get(uri)

    def break_link(self, uri: str) -> None:
        """Migrations to ``uri`` fail at their next step (until ``repair_link``)."""
        with self._lock:
            self._broken.add(uri)

    def repair_link(self, uri: str) -> None:
        with self._lock:
            self._broken.discard(uri)

    def cut(self, address: str) -> None:
        """Every migration to ``address``, on any port, fails or pauses (a link down) until
        ``restore``; a postcopy cannot be resumed to it meanwhile."""
        with self._lock:
            self._cut.add(f"tcp:{address}")

    def restore(self, address: str) -> None:
        with self._lock:
            self._cut.discard(f"tcp:{address}")

    def is_broken(self, uri: str) -> bool:
        with self._lock:
            return uri in self._broken or uri.rsplit(":", 1)[0] in self._cut
