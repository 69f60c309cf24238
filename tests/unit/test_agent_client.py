"""``AgentClient`` and ``AgentClients``: one kept client per host, rebuilt only when the host's
address or token changes; typed answers; the events long poll is bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from enginekit import Site, site_at

from vmferry.api.agent_client import AgentClient, AgentClients
from vmferry.errors import AgentError, HostUnavailableError
from vmferry.model.topology import Topology


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path)


def test_one_client_per_host_until_its_inventory_entry_changes(site: Site) -> None:
    reads: list[str] = []

    def read_token(path: str) -> str:
        reads.append(path)
        return Path(path).read_text().strip()

    clients = AgentClients(read_token, transport=site.transport)
    clients.refresh(site.topology)
    first = clients.get("host1")
    assert clients.get("host1") is first
    assert first.report().host == "host1"
    assert first.report().host == "host1"
    assert len(reads) == 1                      # the token file is read once
    clients.refresh(site.topology)              # the same inventory: the same client
    assert clients.get("host1") is first
    data = site.topology.model_dump(mode="json")
    data["hosts"][0]["agent_url"] = "http://elsewhere.agent"
    clients.refresh(Topology.model_validate(data))
    assert clients.get("host1") is not first
    with pytest.raises(AgentError, match="unknown host"):
        clients.get("host9")
    clients.close()


def test_errors_are_typed(site: Site) -> None:
    client = site.controller.agent("host1")
    assert client.guest_state("nosuch") == "absent"
    with pytest.raises(AgentError) as info:
        client.guest("nosuch")
    assert info.value.fields["status"] == 404
    site.unreachable.add("host1")
    with pytest.raises(HostUnavailableError, match="does not answer"):
        client.report()


def test_wrong_token_is_refused(site: Site) -> None:
    client = AgentClient("host1", "http://host1.agent", "not-the-token",
                         transport=site.transport("host1"))
    with pytest.raises(AgentError) as info:
        client.report()
    assert info.value.fields["status"] == 401


def test_guest_events_long_poll(site: Site) -> None:
    site.create_vm()
    client = site.controller.agent("host1")
    events = client.guest_events("vm1", 0, 0)
    assert [e.kind for e in events] == ["RESUME"]
    assert client.guest_events("vm1", events[-1].seq, 0.2) == []     # waited, none came
    site.hold("host1", "vm1", at="setup")
    site.migrate()
    later = client.guest_events("vm1", events[-1].seq, 5)
    assert (later[0].kind, later[0].status, later[0].seq) == ("MIGRATION", "setup",
                                                            events[-1].seq + 1)
    raw = httpx.Client(transport=site.transport("host1"), base_url="http://x",
                       headers={"Authorization": "Bearer token-host1"})
    assert raw.get("/v1/guests/vm1/events", params={"wait": 31}).status_code == 422
