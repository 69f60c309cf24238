"""The agent's CPU load of its guests, read from the fake hypervisor's CPU-time counters."""

from __future__ import annotations

from vmferry.agent.cpuload import CpuLoad
from vmferry.drivers.hypervisor.base import GuestSpec
from vmferry.drivers.hypervisor.fake import FakeHypervisor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guest(hv: FakeHypervisor, name: str) -> None:
    hv.start(GuestSpec(name=name, memory_mib=128, mac="52:54:00:00:00:01", tap=f"t-{name}",
                       ip_cidr="192.0.2.10/24"))


def test_load_is_cpu_time_over_wall_time_between_two_readings() -> None:
    hv, clock = FakeHypervisor(), Clock()
    guest(hv, "a")
    guest(hv, "b")
    load = CpuLoad(hv, min_interval=1.0, clock=clock)
    assert load.sample(["a", "b"]) == {}          # one reading gives no load yet
    hv.burn("a", 1.5)
    hv.burn("b", 0.1)
    clock.now += 2.0
    assert load.sample(["a", "b"]) == {"a": 0.75, "b": 0.05}
    hv.burn("a", 5.0)
    clock.now += 0.5                              # too soon: the last load stands
    assert load.sample(["a"]) == {"a": 0.75}
    clock.now += 0.5
    assert load.sample(["a"]) == {"a": 5.0}


def test_a_new_process_starts_over_and_a_gone_guest_is_dropped() -> None:
    hv, clock = FakeHypervisor(), Clock()
    guest(hv, "a")
    load = CpuLoad(hv, clock=clock)
    hv.burn("a", 3.0)
    load.sample(["a"])
    hv.stop("a")
    assert load.sample(["a"]) == {}
    guest(hv, "a")                                # counter back at 0: a new reading
    clock.now += 5
    assert load.sample(["a"]) == {}
    hv.burn("a", 1.0)
    clock.now += 1
    assert load.sample(["a"]) == {"a": 1.0}
    assert hv.cpu_seconds("nobody") is None
