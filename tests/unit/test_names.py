"""Derived tap/port names: short names kept, long ones shortened with a hash, and a collision
refused at create (409 naming ``name``) on the controller and on the agent."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from enginekit import site_at

from vmferry.api.agent import GuestRequest
from vmferry.errors import ConflictError
from vmferry.model.names import check_unique, tap_name


def colliding_pair(prefix: str = "webapp-") -> tuple[str, str]:
    """Two VM names with the same tap name, found by brute force (birthday bound)."""
    seen: dict[str, str] = {}
    for i in itertools.count():
        name = f"{prefix}{i:07d}"
        tap = tap_name(name)
        if tap in seen:
            return seen[tap], name
        seen[tap] = name
    raise AssertionError("unreachable")


def test_short_names_are_kept_long_ones_fit() -> None:
    assert tap_name("web1") == "vm-web1"
    assert len(tap_name("x" * 40)) == 15
    # The pair of the issue no longer collides.
    assert tap_name("webapp-0000028") != tap_name("webapp-0001563")


def test_a_collision_is_detected() -> None:
    first, second = colliding_pair()
    assert tap_name(first) == tap_name(second)
    check_unique(first, ["other", first])
    with pytest.raises(ConflictError) as info:
        check_unique(second, ["other", first])
    assert info.value.field == "name"


def test_the_agent_refuses_a_colliding_guest(tmp_path: Path) -> None:
    first, second = colliding_pair()
    for site in site_at(tmp_path):
        client = site.clients["host1"]
        headers = {"Authorization": "Bearer token-host1"}
        body = {"memory_mib": 64, "mac": "52:54:00:00:00:01", "ip": "192.0.2.10/24",
                "vlan": 10}
        ok = client.put(f"/v1/ports/{first}", json={"name": first, **body}, headers=headers)
        assert ok.status_code == 200, ok.text
        refused = client.put(f"/v1/guests/{second}", json={"name": second, **body},
                             headers=headers)
        assert refused.status_code == 409
        assert refused.json()["detail"]["field"] == "name"
        assert [g.name for g in site.agents["host1"].guests()] == [first]
        GuestRequest.model_validate({"name": second, **body})   # the body itself was fine
