"""The lab as a site (``vmferry lab up --site``): every daemon is reached the way a real
install reaches it, over TCP on a management network, instead of the lab's unix sockets.

    root namespace: controller ── vfm-<lab> ─┐
    vf-<lab>-_mgmt: br-mgmt (Linux bridge) ──┼── mgmt0 of every host namespace: agent
                                             └── mgmt0 of every switch namespace: OVSDB, OpenFlow

* Agents listen on ``MGMT_IP:8471`` with HTTPS and client certificates; they heartbeat to
  the controller's HTTPS listener on its management address (the controller keeps a plain
  loopback listener for users' tokens, as in the lab).
* Each fabric switch's ovsdb-server listens on ``ptcp:6640:MGMT_IP`` and its bridge accepts
  OpenFlow on ``ptcp:6653:MGMT_IP`` (a passive "service" controller, in-band control off).
* The controller is given a ``kind: site`` inventory: agents by ``https://`` URL, switches by
  ``tcp:`` OVSDB and OpenFlow addresses and no unixctl socket (a site's switches are not on
  the controller's machine; the guest's own RARP announcements move its MAC there).

The management subnet is a /24 of RFC 2544's 198.18.0.0/15 chosen by the lab's name, so two
site labs of different names do not share routes in the root namespace. Everything lives in
the lab's namespaces except the root end of one veth, which goes with the management
namespace when the lab comes down.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from vmferry import privileged
from vmferry.errors import SetupError
from vmferry.lab.names import LabLayout
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.network import short_ifname
from vmferry.model.topology import SWITCH_BRIDGE, Topology

__all__ = ["AGENT_PORT", "MGMT_IFNAME", "OPENFLOW_PORT", "OVSDB_PORT", "ManagementNetwork"]

MGMT_BRIDGE = "br-mgmt"
MGMT_IFNAME = "mgmt0"           # a host's or switch's interface on the management network
CONTROLLER_PEER = "ctl0"        # the mgmt namespace's end of the controller's veth
AGENT_PORT = 8471
OVSDB_PORT = 6640
OPENFLOW_PORT = 6653
_SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")
_FIRST_HOST, _FIRST_SWITCH = 10, 100


class ManagementNetwork:
    """The addresses of a site lab's management network, and how to build it."""

    def __init__(self, layout: LabLayout, topology: Topology) -> None:
        self.layout = layout
        self.topology = topology
        index = int(hashlib.sha1(topology.name.encode()).hexdigest()[:8], 16) % 512
        self.subnet = ipaddress.IPv4Network((int(_SUPERNET.network_address) + 256 * index, 24))
        if len(topology.hosts) > _FIRST_SWITCH - _FIRST_HOST or \
                len(topology.switches) > 250 - _FIRST_SWITCH:
            raise SetupError(f"a site lab has room for {_FIRST_SWITCH - _FIRST_HOST} hosts "
                             f"and {250 - _FIRST_SWITCH} switches on its management /24")
        self._addresses: dict[str, str] = {}
        for i, host in enumerate(topology.hosts):
            self._addresses[host.name] = str(self.subnet[_FIRST_HOST + i])
        for i, switch in enumerate(topology.switches):
            self._addresses[switch.name] = str(self.subnet[_FIRST_SWITCH + i])

    @property
    def namespace(self) -> str:
        return self.layout.namespace("_mgmt")

    @property
    def controller_ip(self) -> str:
        return str(self.subnet[1])

    @property
    def root_ifname(self) -> str:
        return short_ifname("vfm-", self.topology.name)

    def address(self, node: str) -> str:
        """The management address of a host or switch."""
        return self._addresses[node]

    # ---- what the daemons are told ------------------------------------------------------

    def controller_listen(self, port: int) -> str:
        return f"{self.controller_ip}:{port}"

    def controller_url(self, port: int, *, tls: bool) -> str:
        return f"{'https' if tls else 'http'}://{self.controller_ip}:{port}"

    def agent_listen(self, host: str) -> str:
        return f"{self.address(host)}:{AGENT_PORT}"

    def certificate_ips(self, name: str) -> list[str]:
        """Addresses a certificate of ``name`` (a host or the controller) must carry here."""
        return [self.controller_ip] if name not in self._addresses else [self.address(name)]

    def inventory(self, data: dict[str, Any], *, tls: bool) -> dict[str, Any]:
        """The lab's inventory (as a dict) turned into a site's: ``kind: site``, agents and
        switches by network address only."""
        data["kind"] = "site"
        for switch in data["switches"]:
            ip = self.address(switch["name"])
            switch["ovsdb"] = f"tcp:{ip}:{OVSDB_PORT}"
            switch["openflow"] = f"tcp:{ip}:{OPENFLOW_PORT}"
            switch["unixctl"] = None
        for host in data["hosts"]:
            host["agent_url"] = f"{'https' if tls else 'http'}://" \
                f"{self.address(host['name'])}:{AGENT_PORT}"
        return data

    # ---- building -----------------------------------------------------------------------

    def build(self) -> None:
        """The bridge, a veth per node and one to the root namespace, and the switches'
        TCP listeners (idempotent). The node namespaces must exist and run OVS."""
        mgmt = self.namespace
        privileged.create_namespace(mgmt)
        privileged.create_linux_bridge(mgmt, MGMT_BRIDGE)
        privileged.create_veth(None, self.root_ifname, mgmt, CONTROLLER_PEER)
        privileged.attach_to_bridge(mgmt, CONTROLLER_PEER, MGMT_BRIDGE)
        privileged.add_address(None, self.root_ifname, f"{self.controller_ip}/24")
        for node in self._addresses:
            peer = short_ifname("g-", node)
            privileged.create_veth(self.layout.namespace(node), MGMT_IFNAME, mgmt, peer)
            privileged.attach_to_bridge(mgmt, peer, MGMT_BRIDGE)
            privileged.add_address(self.layout.namespace(node), MGMT_IFNAME,
                                   f"{self.address(node)}/24")
        for switch in self.topology.switches:
            self._listen_on_tcp(switch.name)

    def _listen_on_tcp(self, switch: str) -> None:
        ovs = OvsInstance(switch, self.layout.namespace(switch), self.layout.ovs_dir(switch))
        ip = self.address(switch)
        remote = f"ptcp:{OVSDB_PORT}:{ip}"
        listed = privileged.run_in_namespace(
            ovs.namespace, ["ovs-appctl", "-t", str(ovs.ovsdb_ctl), "ovsdb-server/list-remotes"])
        if remote not in listed.stdout.split():
            privileged.run_in_namespace(ovs.namespace, ["ovs-appctl", "-t", str(ovs.ovsdb_ctl),
                                                        "ovsdb-server/add-remote", remote])
        # A passive controller is a service listener: it takes no part in fail-mode, and
        # with in-band control off vswitchd adds no hidden flows for it.
        privileged.run_in_namespace(ovs.namespace, [
            "ovs-vsctl", f"--db=unix:{ovs.db_socket}", "--", "set-controller", SWITCH_BRIDGE,
            f"ptcp:{OPENFLOW_PORT}:{ip}", "--", "set", "bridge", SWITCH_BRIDGE,
            "other-config:disable-in-band=true"])
