"""The topology format: the default loads, bad input is refused with field and reason."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from vmferry.errors import InputError
from vmferry.model.topology import Topology, default_topology_path, load_topology


def default_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(default_topology_path().read_text())
    return data


def test_default_topology_loads() -> None:
    topo = load_topology(default_topology_path())
    assert [h.name for h in topo.hosts] == ["host1", "host2", "host3", "host4"]
    assert topo.tor_of("host3") == "tor2"
    assert topo.migration_address("host1") == "203.0.113.1/24"
    keys = {t.key for t in topo.trunks()}
    assert len(keys) == 2 + 4   # two switch links, four host uplinks


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (lambda d: d.update(colour="blue"), "topology.colour", "unknown field"),
    (lambda d: d["hosts"][0].update(rack="rack9"), "hosts[0].rack", "unknown rack"),
    (lambda d: d["racks"][0].update(tor="nope"), "racks[0].tor", "unknown switch"),
    (lambda d: d["clients"][0].update(vlan=4095), "topology.clients[0].vlan", "less than or equal"),
    (lambda d: d["clients"][0].update(ip="192.0.2.300/24"), "topology.clients[0].ip",
     "not a valid CIDR"),
    (lambda d: d["links"].append({"a": "tor1", "b": "tor2"}), "links", "tree"),
    (lambda d: d["hosts"].append(dict(d["hosts"][0])), "hosts[4].name", "duplicate"),
    (lambda d: d["clients"][0].update(vlan=300), "clients[0].vlan", "not declared"),
    (lambda d: d["hosts"][0].update(memory_mib=1), "topology.hosts[0].memory_mib",
     "greater than or equal"),
])
def test_bad_topology_names_field_and_reason(mutate: Any, field: str, reason: str) -> None:
    data = copy.deepcopy(default_data())
    mutate(data)
    with pytest.raises(InputError) as info:
        load_topology(data)
    message = info.value.message
    assert field in message, message
    assert reason in message, message


def test_unreadable_file_is_input_error(tmp_path: Any) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_topology(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_topology(bad)


def test_site_needs_addresses() -> None:
    data = default_data()
    data["kind"] = "site"
    with pytest.raises(InputError, match="agent_url"):
        load_topology(data)


def test_three_racks_other_names() -> None:
    topo = Topology.model_validate({
        "name": "dc2", "vlans": [{"id": 310}, {"id": 320}],
        "switches": [{"name": "core"}, {"name": "leafA"}, {"name": "leafB"}, {"name": "leafC"}],
        "links": [{"a": "core", "b": "leafA"}, {"a": "core", "b": "leafB"},
                  {"a": "core", "b": "leafC"}],
        "racks": [{"name": "ra", "tor": "leafA"}, {"name": "rb", "tor": "leafB"},
                  {"name": "rc", "tor": "leafC"}],
        "hosts": [{"name": "alpha", "rack": "ra"}, {"name": "beta", "rack": "rb"},
                  {"name": "gamma", "rack": "rc"}],
        "clients": [{"name": "probe", "switch": "leafA", "vlan": 310, "ip": "192.0.2.9/24"}],
    })
    assert topo.tor_of("gamma") == "leafC"
