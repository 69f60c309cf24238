"""VLAN pruning: a trunk carries a VLAN exactly when it has endpoints on both sides."""

from __future__ import annotations

from vmferry.model.fabric import (
    NO_VLANS,
    Endpoint,
    carried_vlans,
    client_endpoints,
    desired_trunk_vlans,
    path_between,
    trunk_column,
)
from vmferry.model.topology import default_topology_path, load_topology

TOPO = load_topology(default_topology_path())


def by_ends(desired: dict[str, frozenset[int]]) -> dict[tuple[str, str], frozenset[int]]:
    return {(t.a, t.b): desired[t.key] for t in TOPO.trunks()}


def test_no_vms_no_vlans_leave_the_rack() -> None:
    desired = by_ends(desired_trunk_vlans(TOPO, client_endpoints(TOPO)))
    assert all(not v for v in desired.values())


def test_vm_in_rack1_extends_only_its_uplink() -> None:
    eps = client_endpoints(TOPO) + [Endpoint("host1", 100, "vm1")]
    desired = by_ends(desired_trunk_vlans(TOPO, eps))
    assert desired[("host1", "tor1")] == {100}
    assert desired[("host2", "tor1")] == set()
    assert desired[("tor1", "spine")] == set()
    assert desired[("tor2", "spine")] == set()


def test_vm_in_rack2_pulls_vlan_across_the_spine() -> None:
    eps = client_endpoints(TOPO) + [Endpoint("host3", 100, "vm1")]
    desired = by_ends(desired_trunk_vlans(TOPO, eps))
    assert desired[("tor1", "spine")] == {100}
    assert desired[("tor2", "spine")] == {100}
    assert desired[("host3", "tor2")] == {100}
    assert desired[("host4", "tor2")] == set()
    assert desired[("host1", "tor1")] == set()


def test_migration_window_carries_both_then_prunes() -> None:
    during = client_endpoints(TOPO) + [Endpoint("host1", 100, "vm1"), Endpoint("host3", 100, "vm1")]
    d = by_ends(desired_trunk_vlans(TOPO, during))
    assert d[("host1", "tor1")] == {100} and d[("host3", "tor2")] == {100}
    after = client_endpoints(TOPO) + [Endpoint("host3", 100, "vm1")]
    a = by_ends(desired_trunk_vlans(TOPO, after))
    assert a[("host1", "tor1")] == set()


def test_lone_vlan_is_carried_nowhere() -> None:
    eps = [Endpoint("host3", 300, "vm9")]
    assert all(not v for v in desired_trunk_vlans(TOPO, eps).values())


def test_path_and_trunk_column() -> None:
    assert path_between(TOPO, "host1", "host4") == ["host1", "tor1", "spine", "tor2", "host4"]
    assert trunk_column(frozenset()) == NO_VLANS
    assert carried_vlans(trunk_column(frozenset({5}))) == {5}
    assert carried_vlans(NO_VLANS) == set()
