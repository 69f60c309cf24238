"""Bring the lab data center up and down.

``lab up`` turns a topology into namespaces: one per fabric switch and per host, each running
its own Open vSwitch (userspace datapath), trunks as veth pairs, clients on access ports, a
migration network (a Linux bridge in its own namespace), a shared storage directory, then the
controller and one agent per host. The result is written as an inventory -- the same topology
format with every address filled in -- which is what the controller is given. ``lab down``
removes all of it, also when a previous ``up`` died half way.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vmferry import pki, privileged
from vmferry.agent.app import CONTROLLER_NAME
from vmferry.drivers.hypervisor.qemu import guest_files
from vmferry.drivers.softswitch.base import OWNER_KEY, PortSpec
from vmferry.errors import SetupError, VmferryError, WaitTimeout
from vmferry.http import ClientTls, client_for
from vmferry.lab import libvirt as lab_libvirt
from vmferry.lab.names import MIGRATION_BRIDGE, LabLayout
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.lab.router import build_router, router_plans
from vmferry.lab.site import ManagementNetwork
from vmferry.model.fabric import NO_VLANS
from vmferry.model.network import short_ifname
from vmferry.model.topology import (
    HOST_BRIDGE,
    MIGRATION_IFNAME,
    SWITCH_BRIDGE,
    Topology,
)

CONTROLLER_PORT = 8470
LAB_OWNER = "lab"


@dataclass
class LabStatus:
    lab: str
    up: bool
    controller_url: str | None
    nodes: list[dict[str, Any]]


LAB_DB_ENV = "VMFERRY_LAB_DB"


def vmferry_argv() -> list[str]:
    """How to start vmferry itself in a child process (the same interpreter)."""
    return [sys.executable, "-m", "vmferry"]


class Lab:
    """One lab on this machine, named by its topology's ``name``."""

    def __init__(self, topology: Topology, *, controller_port: int = CONTROLLER_PORT,
                 tls: bool = True, site: bool = False) -> None:
        self.topology = topology
        self.layout = LabLayout(topology.name)
        self.controller_port = controller_port
        # TLS between controller and agents (client certificates) and for QEMU migration.
        self.tls = tls
        # ``site``: daemons reached over TCP on a management network (lab/site.py).
        self.site = ManagementNetwork(self.layout, topology) if site else None

    # ---- up ---------------------------------------------------------------------------------

    def up(self, *, progress: Any = None) -> Topology:
        """Build everything (idempotent); returns the resolved inventory."""
        say = progress or (lambda message: None)
        privileged.require_root()
        # The lab's state, secrets and certificates are root's alone (0600 files, 0700 dirs).
        old_umask = os.umask(0o077)
        try:
            return self._up(say)
        finally:
            os.umask(old_umask)

    def _up(self, say: Any) -> Topology:
        check_host_tools()
        layout = self.layout
        for d in (layout.root, layout.run_dir, layout.log_dir, layout.secrets_dir,
                  layout.shared_storage):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(layout.secrets_dir, 0o700)
        self._write_state({"topology": self.topology.model_dump(mode="json"),
                           "controller_port": self.controller_port, "pids": {}})
        say("switches")
        for switch in self.topology.switches:
            self._node_with_ovs(switch.name, SWITCH_BRIDGE)
        say("hosts")
        for host in self.topology.hosts:
            self._node_with_ovs(host.name, HOST_BRIDGE)
            layout.guest_run_dir(host.name).mkdir(parents=True, exist_ok=True)
        if self.topology.routed_racks():
            say("routers")
            self._routers()
        say("trunks")
        self._trunks()
        say("clients")
        self._clients()
        say("migration network")
        self._migration_network()
        if self.site:
            say("management network")
            self.site.build()
        lab_libvirt.start_daemons(layout, self.topology)
        inventory = self.inventory()
        layout.inventory_file.write_text(yaml.safe_dump(inventory.model_dump(mode="json"),
                                                        sort_keys=False))
        if self.tls:
            say("certificates")
            self._certificates()
        say("controller")
        admin_token = _token_file(layout.admin_token_file)
        self._start_controller()
        say("agents")
        for host in self.topology.hosts:
            _token_file(layout.agent_token_file(host.name))
        with client_for(self.controller_url, token=admin_token) as api:
            response = api.put("/v1/inventory", json=inventory.model_dump(mode="json"))
            if not response.is_success:
                raise SetupError(f"controller refused the lab inventory: {response.text[:500]}")
        for host in self.topology.hosts:
            self._start_agent(host.name)
        self._wait_agents(admin_token)
        with client_for(self.controller_url, token=admin_token) as api:
            api.post("/v1/fabric/reconcile").raise_for_status()
        return inventory

    def inventory(self) -> Topology:
        """The topology with every address filled in for this lab."""
        layout = self.layout
        data = self.topology.model_dump(mode="json")
        data["shared_storage"] = str(layout.shared_storage)
        for switch in data["switches"]:
            ovs = OvsInstance(switch["name"], layout.namespace(switch["name"]),
                              layout.ovs_dir(switch["name"]))
            switch["ovsdb"] = f"unix:{ovs.db_socket}"
            switch["openflow"] = f"unix:{ovs.rundir / (SWITCH_BRIDGE + '.mgmt')}"
            switch["unixctl"] = str(ovs.vswitchd_ctl)
        for host in data["hosts"]:
            host["agent_url"] = f"unix:{layout.agent_socket(host['name'])}"
            host["agent_token_file"] = str(layout.agent_token_file(host["name"]))
        if self.site:
            data = self.site.inventory(data, tls=self.tls)
        return Topology.model_validate(data)

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def _node_with_ovs(self, node: str, bridge: str) -> None:
        namespace = self.layout.namespace(node)
        privileged.create_namespace(namespace)
        ovs = OvsInstance(node, namespace, self.layout.ovs_dir(node))
        ovs.start()
        with ovs.softswitch() as switch:
            switch.ensure_bridge(bridge, datapath_type="netdev")

    def _trunks(self) -> None:
        layout = self.layout
        for trunk in self.topology.trunks():
            ns_a, ns_b = layout.namespace(trunk.a), layout.namespace(trunk.b)
            if not trunk.tunnel:    # a tunnel's ends are VXLAN devices (_routers)
                privileged.create_veth(ns_a, trunk.a_port, ns_b, trunk.b_port)
            for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port)):
                bridge = HOST_BRIDGE if node in {h.name for h in self.topology.hosts} \
                    else SWITCH_BRIDGE
                with self._ovs(node).softswitch() as switch:
                    if port in switch.ports(bridge):
                        continue    # a running lab's trunks keep the VLANs they carry
                    # A new trunk carries no VLAN until the controller extends one onto it.
                    switch.ensure_port(bridge, PortSpec(
                        name=port, vlan_mode="trunk", trunks=NO_VLANS,
                        external_ids={OWNER_KEY: LAB_OWNER, "vmferry-role": "trunk"}))

    def _clients(self) -> None:
        layout = self.layout
        for client in self.topology.clients:
            namespace = layout.namespace(client.name)
            privileged.create_namespace(namespace)
            port = layout_access_port(client.name)
            privileged.create_veth(namespace, "eth0", layout.namespace(client.switch), port)
            privileged.add_address(namespace, "eth0", client.ip)
            _disable_offloads(namespace, "eth0")
            with self._ovs(client.switch).softswitch() as switch:
                switch.ensure_port(SWITCH_BRIDGE, PortSpec(
                    name=port, tag=client.vlan, vlan_mode="access",
                    external_ids={OWNER_KEY: LAB_OWNER, "vmferry-role": "access",
                                  "vmferry-client": client.name}))

    def _routers(self) -> None:
        """Each routed rack's router, its legs on access ports of the two switches, and the
        VXLAN ends of its tunnel (lab/router.py)."""
        for plan in router_plans(self.topology):
            build_router(self.layout, plan)
            rack = plan.rack
            assert rack.uplink is not None and rack.vlan is not None
            for switch, vlan in ((rack.uplink.switch, rack.uplink.vlan), (rack.tor, rack.vlan)):
                with self._ovs(switch).softswitch() as softswitch:
                    softswitch.ensure_port(SWITCH_BRIDGE, PortSpec(
                        name=plan.access_port, tag=vlan, vlan_mode="access",
                        external_ids={OWNER_KEY: LAB_OWNER, "vmferry-role": "access",
                                      "vmferry-client": rack.router}))

    def _migration_network(self) -> None:
        layout = self.layout
        mig_ns = layout.migration_namespace
        privileged.create_namespace(mig_ns)
        privileged.create_linux_bridge(mig_ns, MIGRATION_BRIDGE)
        for host in self.topology.hosts:
            peer = short_ifname("m-", host.name)
            privileged.create_veth(layout.namespace(host.name), MIGRATION_IFNAME, mig_ns, peer)
            privileged.attach_to_bridge(mig_ns, peer, MIGRATION_BRIDGE)
            privileged.add_address(layout.namespace(host.name), MIGRATION_IFNAME,
                                   self.topology.migration_address(host.name))

    def _ovs(self, node: str) -> OvsInstance:
        return OvsInstance(node, self.layout.namespace(node), self.layout.ovs_dir(node))

    @property
    def pki_dir(self) -> Path:
        return self.layout.root / "pki"

    def tls_dir(self, name: str) -> Path:
        """The certificates of ``name`` (a host, or "controller")."""
        return self.pki_dir / "certs" / name

    def client_tls(self) -> ClientTls | None:
        """The controller's identity: what it takes to call an agent of this lab."""
        return ClientTls(self.tls_dir(CONTROLLER_NAME)) if self.tls else None

    def _certificates(self) -> None:
        """A CA and a certificate per host and for the controller (kept across ``up``s)."""
        if not (self.pki_dir / "ca" / "ca-cert.pem").exists():
            pki.init_ca(self.pki_dir, common_name=f"vmferry lab {self.layout.lab} CA")
        names = [CONTROLLER_NAME] + [h.name for h in self.topology.hosts]
        for name in names:
            if not (self.tls_dir(name) / "server-cert.pem").exists():
                ips = [self.topology.migration_address(name).split("/")[0]] \
                    if name != CONTROLLER_NAME else ["127.0.0.1"]
                ips += self.site.certificate_ips(name) if self.site else []
                pki.issue(self.pki_dir, name, ips=ips)

    def _start_controller(self) -> None:
        layout = self.layout
        state = self._read_state()
        pid = state["pids"].get("controller")
        if pid and privileged.pid_alive(pid):
            return
        # The store: SQLite in the lab's directory, unless ``VMFERRY_LAB_DB`` names another
        # (a PostgreSQL URL) at the lab's first ``up``; later ``up``s keep the first choice.
        database = state.get("db") or os.environ.get(LAB_DB_ENV) \
            or f"sqlite:///{layout.database}"
        state["db"] = database
        argv = [*vmferry_argv(), "controller", "serve", "--db", database,
                "--listen", self.site.controller_listen(self.controller_port) if self.site
                else f"unix:{layout.controller_socket}",
                "--bootstrap-token-file", str(layout.admin_token_file),
                "--secrets-dir", str(layout.secrets_dir), "--run-dir", str(layout.run_dir)]
        # Agents reach the controller over TLS on the socket; users (CLI, tests, the
        # dashboard) with a bearer token on plain HTTP on loopback.
        user_listen = f"127.0.0.1:{self.controller_port}"
        argv += ["--tls-dir", str(self.tls_dir(CONTROLLER_NAME)), "--plain-listen",
                 user_listen] if self.tls else ["--listen", user_listen]
        proc = privileged.spawn_in_namespace(None, argv, log_path=layout.log_dir / "controller.log")
        state["pids"]["controller"] = proc.pid
        self._write_state(state)
        _wait_http(self.controller_url + "/v1/health", timeout=30,
                   what="the controller to answer", proc=proc,
                   log=layout.log_dir / "controller.log")

    def _start_agent(self, host: str) -> None:
        layout = self.layout
        state = self._read_state()
        pid = state["pids"].get(f"agent-{host}")
        if pid and privileged.pid_alive(pid):
            return
        ovs = self._ovs(host)
        argv = [*vmferry_argv(), "agent", "serve",
                "--host", host,
                "--listen", self.site.agent_listen(host) if self.site
                else f"unix:{layout.agent_socket(host)}",
                "--controller", self.site.controller_url(self.controller_port, tls=self.tls)
                if self.site else f"unix:{layout.controller_socket}",
                "--token-file", str(layout.agent_token_file(host)),
                "--ovsdb", f"unix:{ovs.db_socket}",
                "--ovs-rundir", str(ovs.rundir),
                "--ovs-ctl", str(ovs.vswitchd_ctl),
                "--run-dir", str(layout.guest_run_dir(host)),
                "--shared-storage", str(layout.shared_storage),
                "--memory-mib", str(self.topology.host(host).memory_mib),
                *lab_libvirt.agent_args(layout, self.topology, host)]
        if self.tls:
            argv += ["--tls-dir", str(self.tls_dir(host)), "--controller-name", CONTROLLER_NAME]
        proc = privileged.spawn_in_namespace(layout.namespace(host), argv,
                                             log_path=layout.log_dir / f"agent-{host}.log")
        state["pids"][f"agent-{host}"] = proc.pid
        self._write_state(state)

    def _wait_agents(self, admin_token: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        waiting: set[str] = {h.name for h in self.topology.hosts}
        with client_for(self.controller_url, token=admin_token) as api:
            while waiting and time.monotonic() < deadline:
                response = api.get("/v1/hosts")
                if response.is_success:
                    waiting -= {h["name"] for h in response.json() if h.get("agent_alive")}
                if waiting:
                    time.sleep(0.3)
        if waiting:
            logs = {h: _tail(self.layout.log_dir / f"agent-{h}.log") for h in sorted(waiting)}
            raise WaitTimeout(f"agents of {sorted(waiting)} to report", timeout, logs=logs)

    # ---- down -------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything of the lab (idempotent); returns what was removed."""
        return teardown(self.layout.lab)

    # ---- state ------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.layout.state_file.read_text())
        except (OSError, ValueError):
            state = {"pids": {}}
        state.setdefault("pids", {})
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        old = self._read_state() if self.layout.state_file.exists() else {"pids": {}}
        merged = {**old, **state, "pids": {**old.get("pids", {}), **state.get("pids", {})}}
        self.layout.state_file.write_text(json.dumps(merged, indent=2))


def layout_access_port(client: str) -> str:
    return short_ifname("a-", client)


def teardown(lab: str) -> list[str]:
    """Stop and remove every process, OVS instance, namespace and file of ``lab``.

    Works from what is on disk and in the kernel, so it also cleans a half-built lab."""
    privileged.require_root()
    layout = LabLayout(lab)
    removed: list[str] = []
    state: dict[str, Any] = {}
    try:
        state = json.loads(layout.state_file.read_text())
    except (OSError, ValueError):
        pass
    # Agents and controller first, so nothing recreates what we remove next.
    for name, pid in sorted(state.get("pids", {}).items()):
        if privileged.pid_alive(int(pid)):
            privileged.stop_pid(int(pid))
            removed.append(f"process {name} ({pid})")
    hosts_dir = layout.root / "hosts"
    if hosts_dir.is_dir():
        for pidfile in sorted(hosts_dir.glob("*/guests/*.pid")):
            pid = privileged.read_pidfile(pidfile)
            if pid and privileged.pid_alive(pid) and privileged.is_qemu(pid):
                privileged.stop_pid(pid)
                removed.append(f"qemu {pidfile.stem} ({pid})")
    if hosts_dir.is_dir():
        for guests in sorted(hosts_dir.glob("*/guests")):
            # QMP sockets of a deep run dir live in a short directory of their own.
            sockets = guest_files(guests, "x")["qmp"].parent
            if sockets != guests and sockets.exists():
                shutil.rmtree(sockets, ignore_errors=True)
                removed.append(f"directory {sockets}")
    if hosts_dir.is_dir():
        removed += lab_libvirt.stop_daemons(sorted(hosts_dir.glob("*/libvirt")))
    ovs_root = layout.root / "ovs"
    if ovs_root.is_dir():
        for node_dir in sorted(p for p in ovs_root.iterdir() if p.is_dir()):
            OvsInstance(node_dir.name, layout.namespace(node_dir.name), node_dir).stop()
            removed.append(f"ovs {node_dir.name}")
    for namespace in privileged.list_namespaces():
        if namespace.startswith(layout.namespace_prefix):
            privileged.delete_namespace(namespace)
            removed.append(f"namespace {namespace}")
    if layout.root.exists():
        shutil.rmtree(layout.root, ignore_errors=True)
        removed.append(f"directory {layout.root}")
    return removed



def status(lab: str) -> LabStatus:
    layout = LabLayout(lab)
    try:
        state = json.loads(layout.state_file.read_text())
    except (OSError, ValueError):
        return LabStatus(lab=lab, up=False, controller_url=None, nodes=[])
    topology = Topology.model_validate(state["topology"])
    namespaces = set(privileged.list_namespaces())
    pids = state.get("pids", {})
    nodes: list[dict[str, Any]] = []
    for switch in topology.switches:
        ovs = OvsInstance(switch.name, layout.namespace(switch.name), layout.ovs_dir(switch.name))
        nodes.append({"node": switch.name, "kind": f"switch/{switch.role}",
                      "namespace": layout.namespace(switch.name),
                      "namespace_up": layout.namespace(switch.name) in namespaces,
                      "ovs_running": ovs.running()})
    for host in topology.hosts:
        ovs = OvsInstance(host.name, layout.namespace(host.name), layout.ovs_dir(host.name))
        pid = pids.get(f"agent-{host.name}")
        nodes.append({"node": host.name, "kind": "host", "rack": host.rack,
                      "namespace": layout.namespace(host.name),
                      "namespace_up": layout.namespace(host.name) in namespaces,
                      "ovs_running": ovs.running(),
                      "agent_running": bool(pid and privileged.pid_alive(int(pid))),
                      "migration_ip": topology.migration_address(host.name)})
    for client in topology.clients:
        nodes.append({"node": client.name, "kind": "client", "vlan": client.vlan,
                      "ip": client.ip, "namespace": layout.namespace(client.name),
                      "namespace_up": layout.namespace(client.name) in namespaces})
    for rack in topology.routed_racks():
        assert rack.uplink is not None
        nodes.append({"node": rack.router, "kind": "router", "rack": rack.name,
                      "ip": f"{rack.uplink.ip} (VLAN {rack.uplink.vlan}), {rack.gateway} "
                            f"(VLAN {rack.vlan})",
                      "namespace": layout.namespace(rack.router),
                      "namespace_up": layout.namespace(rack.router) in namespaces})
    controller_pid = pids.get("controller")
    controller_up = bool(controller_pid and privileged.pid_alive(int(controller_pid)))
    up = controller_up and all(n.get("namespace_up") for n in nodes)
    port = state.get("controller_port", CONTROLLER_PORT)
    return LabStatus(lab=lab, up=up,
                     controller_url=f"http://127.0.0.1:{port}" if controller_up else None,
                     nodes=nodes)


def node_namespace(lab: str, node: str) -> str:
    """The namespace of a lab node; raises InputError for an unknown node."""
    layout = LabLayout(lab)
    try:
        state = json.loads(layout.state_file.read_text())
    except (OSError, ValueError) as exc:
        raise SetupError(f"lab {lab!r} is not up") from exc
    topology = Topology.model_validate(state["topology"])
    known = [s.name for s in topology.switches] + [h.name for h in topology.hosts] + \
        [c.name for c in topology.clients] + [r.router for r in topology.routed_racks()]
    if node not in known:
        from vmferry.errors import InputError
        raise InputError("node", f"unknown node {node!r}; known: {', '.join(known)}")
    return layout.namespace(node)


def check_host_tools() -> None:
    """Refuse clearly when the machine lacks what the lab needs."""
    missing = [tool for tool in ("qemu-system-x86_64", "ovsdb-server", "ovs-vswitchd",
                                 "ovs-ofctl", "ip") if shutil.which(tool) is None]
    if missing:
        raise SetupError(f"missing tools: {', '.join(missing)}; run scripts/install-system-deps.sh")


def _disable_offloads(namespace: str, ifname: str) -> None:
    """The userspace datapath does not complete partial checksums: a veth that leaves TCP
    checksums to the NIC would send bad segments through OVS, so compute them in software."""
    if shutil.which("ethtool"):
        privileged.run_in_namespace(namespace, ["ethtool", "-K", ifname, "tx", "off"],
                                    check=False)


def _token_file(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_http(url: str, *, timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    import httpx
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SetupError(f"{what}: process exited with {proc.returncode}",
                             log=_tail(log) if log else None)
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise WaitTimeout(what, timeout, last_error=last, log=_tail(log) if log else None)


__all__ = ["Lab", "LabStatus", "VmferryError", "node_namespace", "status", "teardown"]
