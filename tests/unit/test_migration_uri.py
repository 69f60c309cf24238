"""Migration URIs: built by the controller from the inventory, typed at the agent API, and
checked by the source agent against its migration network."""

from __future__ import annotations

from pathlib import Path

import pytest
from enginekit import site_at
from pydantic import ValidationError

from vmferry.agent.checks import check_destination
from vmferry.api.agent import MigrateRequest
from vmferry.controller.migration_uri import incoming_uri
from vmferry.errors import InputError, MigrationError
from vmferry.model.topology import Topology, default_topology_path, load_topology


@pytest.fixture
def topology() -> Topology:
    return load_topology(default_topology_path())


def test_the_controller_builds_the_uri_from_the_inventory(topology: Topology) -> None:
    host = topology.hosts[1].name
    address = topology.migration_address(host).split("/")[0]
    assert incoming_uri(topology, host, f"tcp:{address}:4444") == f"tcp:{address}:4444"


@pytest.mark.parametrize("reported", [
    "exec:touch /tmp/marker", "file:/etc/shadow", "tcp:198.51.100.9:4444",
    "tcp:evil.example:4444", "unix:/tmp/x", "", None, "tcp:203.0.113.2:0"])
def test_a_lying_destination_is_refused(topology: Topology, reported: str | None) -> None:
    with pytest.raises(MigrationError) as info:
        incoming_uri(topology, topology.hosts[1].name, reported, vm="vm1")
    assert info.value.fields["field"] == "incoming_uri"


@pytest.mark.parametrize("uri", ["exec:sh -c id", "file:/tmp/x", "fd:3", "rdma:1.2.3.4:5",
                                 "tcp:1.2.3.4:99999", "tcp:1.2.3.4"])
def test_the_api_type_accepts_tcp_only(uri: str) -> None:
    with pytest.raises(ValidationError) as info:
        MigrateRequest.model_validate({"uri": uri})
    assert info.value.errors()[0]["loc"] == ("uri",)


def test_the_source_agent_sends_only_to_its_migration_network(tmp_path: Path) -> None:
    for site in site_at(tmp_path):
        agent = site.agents["host1"]
        check_destination(agent, "tcp:127.0.0.2:4444")
        for uri, reason in [("tcp:127.0.0.1:4444", "this host itself"),
                            ("tcp:198.51.100.7:4444", "not on the migration network"),
                            ("tcp:peer.example:4444", "IP address")]:
            with pytest.raises(InputError, match=reason) as info:
                check_destination(agent, uri)
            assert info.value.field == "uri"
