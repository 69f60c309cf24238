"""Issue 13, the "dual NIC" way: a VM moves into a routed rack by taking a second NIC in the
rack's subnet, which becomes its own (the old NIC is unplugged), and back; with real traffic.

The lab is examples/routed-rack.yaml (see test_boundary.py): a VM of VLAN 100
(192.0.2.0/24) on host1 moves to host5 in rack3 (VLAN 300, 198.18.3.0/24, behind rtr-rack3)
by ``--boundary dual`` and back, while client-100 (VLAN 100) pings the address vmferry
publishes for it and holds a TCP session. While it is away: ``vm show`` publishes the rack's
address (the client reaches it through the router), the guest has one NIC (the new one) and
one port on host5 in VLAN 300, the old address answers nowhere, the tunnel carries nothing.
The session held across the move breaks: its address is gone (the README says so).
After the return: the home address and NIC again, nothing on host5, no second NIC's tap on
host1, no router entry, audit clean.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import pytest
import yaml
from test_boundary import TUNNEL, hold_tcp, left_nothing, move, tcp_round

from labkit import LabRun, running_lab, trunks
from vmferry.model.topology import default_topology_path

pytestmark = [pytest.mark.root, pytest.mark.slow]

VM_IP = "192.0.2.33"          # not the other boundary tests': the client caches MACs
CLIENT = "client-100"
PREDICTED_IP = "198.18.3.254"
UPLINK_GATEWAY = "192.0.2.1"  # rtr-rack3's leg in VLAN 100


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    path = default_topology_path().with_name("routed-rack.yaml")
    topology: dict[str, Any] = yaml.safe_load(path.read_text())
    topology["name"] = "tdual"
    with running_lab(tmp_path_factory.mktemp("state"), topology) as run:
        # A client of the old subnet reaches the rack's subnet through the router's leg in
        # its own (the lab gives clients no default route): where the VM will be reached.
        run.exec(CLIENT, "ip", "route", "replace", "198.18.3.0/24", "via", UPLINK_GATEWAY)
        yield run


def dual_rows(lab: LabRun) -> list[tuple[str, str, str, str]]:
    """(vm, home address, rack address, state) of every dual NIC move in the store."""
    db = lab.state_dir / "labs" / lab.name / "controller.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT vm, home_ip, ip, state FROM dual_nic_moves").fetchall()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


Pinger = tuple[subprocess.Popen[str], IO[str]]


def stamped_ping(lab: LabRun, address: str) -> Pinger:
    """``ping -D`` (epoch stamps) from the client every 10 ms, bounded by its count (200 s):
    no ``-w``, with which ping ends at its first error (the router's "host unreachable" for
    an address not up yet, or gone); into a file, not a pipe (ping would block once 64 KiB
    of unread lines filled it)."""
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.namespace(CLIENT), "ping", "-D", "-n",
                             "-i", "0.01", "-c", "20000", "-W", "1", address],
                            stdout=output, stderr=subprocess.STDOUT, text=True)
    return proc, output


def reply_times(pinger: Pinger) -> list[float]:
    proc, output = pinger
    proc.send_signal(2)
    proc.wait(timeout=30)
    output.seek(0)
    out = output.read()
    output.close()
    return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out,
                                                   re.M)]


def failover_gap_ms(old: list[float], new: list[float]) -> float | None:
    """From the last reply at the old address to the first at the new one: how long the VM
    answered at neither (None when either never answered)."""
    if not old or not new:
        return None
    later = [t for t in new if t > old[-1]]
    return round((later[0] - old[-1]) * 1000, 1) if later else None


def host_links(lab: LabRun, host: str) -> str:
    return lab.exec(host, "ip", "-o", "link").stdout


def test_dual_nic_into_the_routed_rack_and_back(lab: LabRun) -> None:
    vm = "bd"
    lab.cli("vm", "create", vm, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "192")
    try:
        assert lab.wait_ping(CLIENT, VM_IP)
        home = lab.json("vm", "show", vm)
        crossing = {c["destination"]: c for c in lab.json("where", vm)["crossings"]}
        assert crossing["host5"]["way"] == "stretch"       # the default: most transparent
        assert crossing["host5"]["reasons"]["dual"] == "stretch comes first"
        tcp = hold_tcp(lab, VM_IP)
        # The rack's pool hands out its highest free address first (model.addresses).
        old_ping, new_ping = stamped_ping(lab, VM_IP), stamped_ping(lab, PREDICTED_IP)
        record, sent, lost = move(lab, vm, "host5", "--boundary", "dual", ip=VM_IP)
        assert record["state"] == "completed", (record.get("error"), record.get("phases"))
        assert record["result"]["plan"]["crossing"] == "dual"
        dual = record["result"]["dual"]
        new_ip = dual["address"].split("/")[0]
        assert lab.wait_ping(CLIENT, new_ip, timeout=30), "the published address answers"
        gap = failover_gap_ms(reply_times(old_ping), reply_times(new_ping))
        print(f"\ndual NIC into rack3: {sent} pings at 10 ms to the old address, {lost} "
              f"lost (it is gone after the move); new address {new_ip}; answered at "
              f"neither for {gap} ms")
        assert new_ip == PREDICTED_IP
        shown = lab.json("vm", "show", vm)
        assert shown["ip"] == dual["address"] and shown["vlan"] == 300
        assert shown["mac"] == dual["mac"] != home["mac"]
        assert not lab.pings(CLIENT, VM_IP, count=2), "the old address went with its NIC"
        session = tcp_round(tcp)
        print(f"session held across the move: {session or 'broken'}")
        assert session != "OK 2", "a session to the old address cannot survive its removal"
        assert dual_rows(lab) == [(vm, f"{VM_IP}/24", dual["address"], "active")]
        assert "vm-bd.n" not in host_links(lab, "host5"), "the old NIC's tap is removed"
        assert "vm-bd" not in host_links(lab, "host1")
        there = trunks(lab)
        assert there[("host5", "tor3")]["actual_a"] == [300], there[("host5", "tor3")]
        assert there[TUNNEL]["actual_a"] == [] and there[TUNNEL]["actual_b"] == []
        away_audit = lab.cli("audit", check=False)
        assert away_audit.returncode == 0, away_audit.stdout + away_audit.stderr
        tcp = hold_tcp(lab, new_ip)                         # a new session, to the new address

        old_ping, new_ping = stamped_ping(lab, new_ip), stamped_ping(lab, VM_IP)
        record, sent, lost = move(lab, vm, "host1", ip=new_ip)   # the row says: back by dual
        assert record["state"] == "completed", (record.get("error"), record.get("phases"))
        assert record["result"]["plan"]["crossing"] == "dual"
        assert lab.wait_ping(CLIENT, VM_IP, timeout=30)
        gap = failover_gap_ms(reply_times(old_ping), reply_times(new_ping))
        print(f"dual NIC back: {sent} pings at 10 ms to the rack address, {lost} lost; "
              f"answered at neither for {gap} ms")
        back = lab.json("vm", "show", vm)
        assert (back["ip"], back["vlan"], back["mac"]) == (home["ip"], 100, home["mac"])
        assert not lab.pings(CLIENT, new_ip, count=2)
        session = tcp_round(tcp)
        print(f"session held across the way back: {session or 'broken'}")
        assert session != "OK 2"
        assert dual_rows(lab) == []
        assert "vm-bd.n" not in host_links(lab, "host1"), "the rack NIC's tap is removed"
        left_nothing(lab, vm)
    finally:
        lab.cli("vm", "delete", vm, check=False)
