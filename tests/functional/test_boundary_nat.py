"""Issue 13, the "NAT" way: a VM moves into a routed rack under an address of the rack's
subnet, its router translating the old address to it, and back; with real traffic.

The lab is examples/routed-rack.yaml (see test_boundary.py): a VM of VLAN 100
(192.0.2.0/24) on host1 moves to host5 in rack3 (VLAN 300, 198.18.3.0/24, behind rtr-rack3)
by ``--boundary nat`` and back, while client-100 (VLAN 100) pings its old address. While it
is away: the controller's store holds its lease, the router's nftables maps translate the
old address to the leased one and its uplink leg answers ARP for the old address, the
guest's port is on VLAN 300 and the tunnel carries nothing (no stretch). New TCP sessions to
the old address work; the session held across the move is reset (the README says so).
After the return: no lease, no translation, no proxy entry, no tracked flow the router still
translates, nothing on host5, audit clean.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from test_boundary import (
    ROUTER,
    TUNNEL,
    hold_tcp,
    left_nothing,
    move,
    tcp_round,
)

from labkit import LabRun, running_lab, trunks
from vmferry.drivers.fabric.nat import NftNat
from vmferry.drivers.fabric.router_netns import Flow, RouterNamespaces, flows
from vmferry.model.topology import Topology, default_topology_path

pytestmark = [pytest.mark.root, pytest.mark.slow]

VM_IP = "192.0.2.30"          # test_boundary's helpers ping and connect to this address
CLIENT = "client-100"
MAX_LOST_AT_10MS = 300        # a bound on breakage, not a speed target (see test_boundary)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    path = default_topology_path().with_name("routed-rack.yaml")
    topology: dict[str, Any] = yaml.safe_load(path.read_text())
    topology["name"] = "tnat"
    with running_lab(tmp_path_factory.mktemp("state"), topology) as run:
        yield run


def leases(lab: LabRun) -> list[tuple[str, str, str, str]]:
    """(vm, home address, leased address, state) of every NAT lease in the controller's
    store."""
    db = lab.state_dir / "labs" / lab.name / "controller.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT vm, home_ip, ip, state FROM nat_leases").fetchall()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def router_nat(lab: LabRun) -> tuple[dict[str, str], frozenset[str], str]:
    """The router's translations and ARP proxy entries as NftNat reads them, and its
    whole nftables ruleset as nft lists it."""
    nat = NftNat(Topology.model_validate(lab.topology))
    ruleset = lab.exec(ROUTER, "nft", "list", "ruleset").stdout
    return nat.translations(ROUTER), nat.proxied(ROUTER), ruleset


def translated_flows(lab: LabRun, home: str) -> list[Flow]:
    """The router's connection-tracking entries that translate ``home`` to another address."""
    routers = RouterNamespaces({ROUTER: lab.namespace(ROUTER)})
    return [f for f in routers.run(ROUTER, "read the tracked flows", flows)
            if f.orig_dst == home and f.reply_src != home]


def guest_addresses_answer(lab: LabRun, address: str) -> bool:
    """A fresh TCP session to the guest's echo port at ``address`` echoes a line."""
    proc = subprocess.run(["ip", "netns", "exec", lab.namespace(CLIENT), "python3", "-c",
                           "import socket,sys; s=socket.create_connection((sys.argv[1], 7), "
                           "timeout=10); s.sendall(b'hi\\n'); print(s.recv(10).decode())",
                           address], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() == "hi"


def test_nat_into_the_routed_rack_and_back(lab: LabRun) -> None:
    vm = "bn"
    lab.cli("vm", "create", vm, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "192")
    try:
        assert lab.wait_ping(CLIENT, VM_IP)
        where = lab.json("where", vm)
        crossing = {c["destination"]: c for c in where["crossings"]}
        assert crossing["host5"]["way"] == "stretch"       # the default: most transparent
        assert "no free address" not in crossing["host5"]["reasons"]["nat"]
        tcp = hold_tcp(lab)

        record, sent, lost = move(lab, vm, "host5", "--boundary", "nat")
        print(f"\nNAT into rack3: {sent} pings at 10 ms to the old address, {lost} lost")
        assert record["state"] == "completed", (record.get("error"), record.get("phases"))
        assert record["result"]["plan"]["crossing"] == "nat"
        nat = record["result"]["nat"]
        new_ip = nat["address"]
        assert nat["home"] == f"{VM_IP}/24" and new_ip.startswith("198.18.3.")
        assert lost <= MAX_LOST_AT_10MS
        assert lab.pings(CLIENT, VM_IP), "the old address answers through the translation"
        lab.exec(CLIENT, "ip", "neigh", "flush", "to", VM_IP)
        assert lab.pings(CLIENT, VM_IP), "the router answers ARP for the old address"
        assert guest_addresses_answer(lab, VM_IP), "a new session to the old address works"
        print(f"session held across the move: {tcp_round(tcp) or 'reset'}")

        assert leases(lab) == [(vm, f"{VM_IP}/24", new_ip, "active")]
        translations, proxied, _ = router_nat(lab)
        assert lab.pings(ROUTER, new_ip.split("/")[0]), "the guest took the leased address"
        assert translations == {VM_IP: new_ip.split("/")[0]}
        assert {f.reply_src for f in translated_flows(lab, VM_IP)} == {new_ip.split("/")[0]}
        assert proxied == {VM_IP}
        there = trunks(lab)
        assert there[("host5", "tor3")]["actual_a"] == [300], there[("host5", "tor3")]
        assert there[TUNNEL]["actual_a"] == [] and there[TUNNEL]["actual_b"] == []
        assert all(t["in_sync"] for t in there.values()), there
        away_audit = lab.cli("audit", check=False)
        assert away_audit.returncode == 0, away_audit.stdout + away_audit.stderr

        record, sent, lost = move(lab, vm, "host1")   # the lease says: back by NAT
        print(f"NAT back: {sent} pings at 10 ms, {lost} lost")
        assert record["state"] == "completed", (record.get("error"), record.get("phases"))
        assert record["result"]["plan"]["crossing"] == "nat"
        assert lost <= MAX_LOST_AT_10MS
        assert lab.pings(CLIENT, VM_IP)
        assert guest_addresses_answer(lab, VM_IP)
        assert not lab.pings(ROUTER, new_ip.split("/")[0], count=2), \
            "the guest gave the borrowed address up"

        assert leases(lab) == []
        translations, proxied, ruleset = router_nat(lab)
        assert translations == {} and proxied == frozenset()
        # The pings' flow was translated while the VM was away: its tracked entry would go on
        # translating the old address to the borrowed one (until it expires) unless flushed.
        assert translated_flows(lab, VM_IP) == []
        assert "vmferry_nat" not in ruleset
        left_nothing(lab, vm)
    finally:
        lab.cli("vm", "delete", vm, check=False)
