"""Issue 2: the lab data center, VMs on VLANs, bad input, and a clean `lab down`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from labkit import LabRun, default_topology, leftovers, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("t2")) as run:
        yield run


def test_lab_status_lists_every_node(lab: LabRun) -> None:
    status = lab.json("lab", "status", "--lab", lab.name)
    assert status["up"] is True
    nodes = {n["node"]: n for n in status["nodes"]}
    assert set(nodes) == {"spine", "tor1", "tor2", "host1", "host2", "host3", "host4",
                          "client-100", "client-200"}
    assert all(n["agent_running"] for n in nodes.values() if n["kind"] == "host")
    hosts = lab.json("vm", "list")
    assert hosts == []


def test_vm_answers_on_its_vlan_only(lab: LabRun) -> None:
    lab.cli("vm", "create", "web100", "--host", "host1", "--vlan", "100",
            "--ip", "192.0.2.10/24", "--memory", "192")
    lab.cli("vm", "create", "web200", "--host", "host2", "--vlan", "200",
            "--ip", "198.51.100.10/24", "--memory", "192")
    try:
        assert lab.wait_ping("client-100", "192.0.2.10"), "VM on VLAN 100 must answer client-100"
        page = lab.http("client-100", "http://192.0.2.10/")
        assert page is not None and "web100" in page
        page = lab.http("client-100", "http://192.0.2.10:8080/")
        assert page is not None and "web100" in page
        assert lab.wait_ping("client-200", "198.51.100.10"), "VM on VLAN 200 answers its client"
        # client-100 cannot reach VLAN 200, even with an address in that subnet on its side.
        lab.exec("client-100", "ip", "addr", "add", "198.51.100.99/24", "dev", "eth0")
        try:
            assert not lab.pings("client-100", "198.51.100.10", count=3)
        finally:
            lab.exec("client-100", "ip", "addr", "del", "198.51.100.99/24", "dev", "eth0")
        vm = lab.json("vm", "show", "web100")
        assert vm["mac"].startswith("52:54:00:") and vm["state"] == "running"
        assert vm["runtime"]["state"] == "running"
        # The fabric carries VLAN 100 to host1 only, and nothing over the spine.
        trunks = {(t["a"], t["b"]): t for t in lab.json("fabric", "show")}
        assert trunks[("host1", "tor1")]["desired"] == [100]
        assert trunks[("host2", "tor1")]["desired"] == [200]
        assert trunks[("tor1", "spine")]["desired"] == []
        assert all(t["in_sync"] for t in trunks.values())
    finally:
        lab.cli("vm", "delete", "web100", check=False)
        lab.cli("vm", "delete", "web200", check=False)
    # Deleting leaves no process, tap or OVS port of the VMs on the hosts.
    for host in ("host1", "host2"):
        ports = lab.exec(host, "ip", "-o", "link").stdout
        assert "vm-web" not in ports
    assert all(t["desired"] == [] and t["in_sync"] for t in lab.json("fabric", "show"))


@pytest.mark.parametrize(("args", "needle"), [
    (["--host", "host9", "--vlan", "100", "--ip", "192.0.2.20/24"], "unknown host"),
    (["--host", "host1", "--vlan", "5000", "--ip", "192.0.2.20/24"], "vlan"),
    (["--host", "host1", "--vlan", "0", "--ip", "192.0.2.20/24"], "vlan"),
    (["--host", "host1", "--vlan", "100", "--ip", "192.0.2.300/24"], "ip"),
    (["--host", "host1", "--vlan", "100", "--ip", "192.0.2.20"], "ip"),
    (["--host", "host1", "--vlan", "100", "--ip", "192.0.2.20/24", "--memory", "999999"],
     "memory_mib"),
    (["--host", "host1", "--vlan", "100", "--ip", "198.51.100.7/24"], "subnet"),
])
def test_bad_vm_input_is_refused_and_changes_nothing(lab: LabRun, args: list[str],
                                                     needle: str) -> None:
    before_vms = lab.json("vm", "list")
    before_fabric = lab.json("fabric", "show")
    result = lab.cli("vm", "create", "bad1", *args, check=False)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert lab.json("vm", "list") == before_vms
    assert lab.json("fabric", "show") == before_fabric
    assert "vm-bad1" not in lab.exec("host1", "ip", "-o", "link").stdout


def test_duplicate_name_and_unknown_vm(lab: LabRun) -> None:
    lab.cli("vm", "create", "dup", "--host", "host2", "--vlan", "100", "--ip", "192.0.2.30/24",
            "--memory", "128")
    try:
        result = lab.cli("vm", "create", "dup", "--host", "host1", "--vlan", "100",
                         "--ip", "192.0.2.31/24", check=False)
        assert result.returncode == 2 and "exists" in result.stderr
        assert [v["host"] for v in lab.json("vm", "list")] == ["host2"]
    finally:
        lab.cli("vm", "delete", "dup")
    result = lab.cli("vm", "show", "nosuchvm", check=False)
    assert result.returncode == 2 and "no VM named" in result.stderr
    result = lab.cli("vm", "delete", "nosuchvm", check=False)
    assert result.returncode == 2


def test_bad_topology_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    data = default_topology("t2bad")
    data["hosts"][0]["rack"] = "rack9"
    data["colour"] = "blue"
    run = LabRun(tmp_path, data)
    run.topology_file.write_text(yaml.safe_dump(data))
    result = run.cli("lab", "up", "--topology", str(run.topology_file), check=False)
    assert result.returncode == 2
    assert "colour" in result.stderr or "rack9" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers("t2bad", tmp_path) == []


def test_other_topology_three_racks(tmp_path: Path) -> None:
    """Nothing depends on the default's names or numbers."""
    topo = {
        "name": "t3r", "migration_network": "198.51.100.0/28",
        "vlans": [{"id": 310, "subnet": "192.0.2.0/25"}, {"id": 320, "subnet": "192.0.2.128/25"}],
        "switches": [{"name": "core", "role": "spine"}, {"name": "leafA"}, {"name": "leafB"},
                     {"name": "leafC"}],
        "links": [{"a": "core", "b": "leafA"}, {"a": "core", "b": "leafB"},
                  {"a": "core", "b": "leafC"}],
        "racks": [{"name": "ra", "tor": "leafA"}, {"name": "rb", "tor": "leafB"},
                  {"name": "rc", "tor": "leafC"}],
        "hosts": [{"name": "alpha", "rack": "ra", "memory_mib": 1024},
                  {"name": "gamma", "rack": "rc", "memory_mib": 1024}],
        "clients": [{"name": "probe310", "switch": "leafA", "vlan": 310, "ip": "192.0.2.100/25"},
                    {"name": "probe320", "switch": "leafB", "vlan": 320,
                     "ip": "192.0.2.200/25"}],
    }
    run = LabRun(tmp_path, copy.deepcopy(topo))
    try:
        run.up()
        run.cli("vm", "create", "far", "--host", "gamma", "--vlan", "310",
                "--ip", "192.0.2.5/25", "--memory", "128")
        assert run.wait_ping("probe310", "192.0.2.5")
        assert not run.pings("probe320", "192.0.2.5", count=2)
        trunks = {(t["a"], t["b"]): t["desired"] for t in run.json("fabric", "show")}
        assert trunks[("core", "leafA")] == [310] and trunks[("core", "leafC")] == [310]
        assert trunks[("core", "leafB")] == []
        run.cli("vm", "delete", "far")
    finally:
        run.down()
    assert leftovers("t3r", tmp_path) == []
