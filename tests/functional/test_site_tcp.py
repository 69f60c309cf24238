"""Issue 15: the lab brought up as a site (``vmferry lab up --site``, lab/site.py): the
controller is given a ``kind: site`` inventory and reaches every agent over HTTPS (client
certificates) and every fabric switch over OVSDB and OpenFlow on TCP, all on a management
network between the lab's namespaces; the agents heartbeat to the controller the same way.
One VM with a port profile migrates across racks there, and the audit finds nothing left.

A small topology (one host per rack, one client) keeps the suite's cost to one lab and one
migration.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_migration import PROFILE, VM_IP, acl_enforced, host_has, migrate_json, trunks

from labkit import LabRun, default_topology, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow]


class SiteLabRun(LabRun):
    def up(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.topology_file.write_text(yaml.safe_dump(self.topology))
        self.cli("lab", "up", "--site", "--topology", str(self.topology_file),
                 "--controller-port", str(self.port), timeout=600)

    @property
    def root(self) -> Path:
        return self.state_dir / "labs" / self.name


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteLabRun]:
    topology = default_topology("t15s")
    topology["hosts"] = [h for h in topology["hosts"] if h["name"] in ("host1", "host3")]
    topology["clients"] = [c for c in topology["clients"] if c["name"] == "client-100"]
    run = SiteLabRun(tmp_path_factory.mktemp("state"), topology)
    try:
        run.up()
        yield run
    finally:
        run.down()
        assert leftovers(run.name, run.state_dir) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "vfm-t15s" not in links, "the management veth went with the lab"


def api_get(lab: SiteLabRun, path: str) -> Any:
    """GET from the controller's user listener with the admin token."""
    token = (lab.root / "secrets" / "admin.token").read_text().strip()
    out = subprocess.run(["curl", "-sf", "-H", f"Authorization: Bearer {token}",
                          f"http://127.0.0.1:{lab.port}{path}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def listening(lab: SiteLabRun, node: str) -> str:
    return lab.exec(node, "ss", "-Hltn").stdout


def test_site_over_tcp_migrates_with_profile_across_racks(lab: SiteLabRun) -> None:
    inventory = api_get(lab, "/v1/inventory")
    assert inventory["kind"] == "site"
    for host in inventory["hosts"]:
        assert host["agent_url"].startswith("https://198.1"), host
        # The agent listens on its management address, and on no unix socket of the lab.
        assert host["agent_url"].removeprefix("https://") in listening(lab, host["name"])
        assert not (lab.root / "run" / f"agent-{host['name']}.sock").exists()
    for switch in inventory["switches"]:
        assert switch["ovsdb"].startswith("tcp:198.1") and switch["unixctl"] is None, switch
        assert switch["openflow"].startswith("tcp:198.1"), switch
        ports = listening(lab, switch["name"])
        assert switch["ovsdb"].removeprefix("tcp:") in ports
        assert switch["openflow"].removeprefix("tcp:") in ports
    assert not (lab.root / "run" / "controller.sock").exists()
    # Every agent reports over TCP (the lab up waited for it; the controller still hears).
    hosts = {h["name"]: h for h in api_get(lab, "/v1/hosts")}
    assert all(h["agent_alive"] for h in hosts.values()), hosts

    vm = "sitevm"
    profiles = lab.state_dir / "site-profiles.yaml"
    profiles.write_text(yaml.safe_dump(PROFILE))
    lab.cli("profile", "apply", "-f", str(profiles))
    lab.cli("vm", "create", vm, "--host", "host1", "--profile", "mig-web", "--ip",
            f"{VM_IP}/24", "--memory", "256")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        assert acl_enforced(lab)
        record = migrate_json(lab, vm, "host3")
        assert record["state"] == "completed", (record["error"], record["phases"])
        assert record["source"] == "host1" and record["destination"] == "host3"
        assert lab.json("vm", "show", vm)["host"] == "host3"
        assert lab.pings("client-100", VM_IP)
        assert acl_enforced(lab), "the profile's ACL holds on the destination"
        assert host_has(lab, "host1", vm) == []
        # The VLAN reached rack2 over trunks set through OVSDB on TCP, and stays in sync.
        fabric = trunks(lab)
        assert any(100 in t["actual_b"] or 100 in t["actual_a"] for t in fabric.values())
        assert all(t["in_sync"] for t in fabric.values()), fabric
        audit = lab.cli("audit", check=False)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        lab.cli("vm", "delete", vm, check=False)
    assert lab.cli("audit", check=False).returncode == 0
