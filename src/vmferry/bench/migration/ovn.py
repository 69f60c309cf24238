"""OVN as a peer in ``vmferry bench migration``: the same hosts, guest, QEMU and migration
network, with the guest's network moved by OVN instead of vmferry's fabric programming.

On the benchmark's lab (whose hosts each run a private Open vSwitch), ``OvnLab`` adds:

    NB and SB ovsdb-servers and ovn-northd       unix sockets under <lab>/ovn (own pids, logs)
    an underlay network                           VLAN 3999 of the lab's own fabric: per chassis
                                                  a veth from br-phy to an access port of the
                                                  host's switch, the VLAN carried on the trunks
                                                  between the chassis (198.51.100.0/24), so
                                                  Geneve crosses the same ToR and spine switches
                                                  as vmferry's VLAN
    per chassis (home, away, and a rack-1 host)   br-phy (netdev) holding the underlay port and
                                                  the tunnel IP (userspace tunnelling), br-int
                                                  (netdev), one ovn-controller (own OVN_RUNDIR,
                                                  OVS_RUNDIR = that host's OVS, own log)
    the client                                    namespace <lab>-ovn-client, plugged into the
                                                  rack-1 chassis' br-int (logical port
                                                  ``ovn-client``): it reaches the guest through
                                                  rack 1's ToR like client-100, over Geneve

The guest is started and migrated through the same agents as the floor variant (same QEMU
command line, same migration URI on the migration network); its tap is moved from the agent's
bridge to br-int with ``iface-id`` set. A migration is done the OpenStack way:
``requested-chassis=SRC,DST`` + ``activation-strategy=rarp`` before, ``requested-chassis=DST``
after (the destination is activated by the RARPs QEMU sends when the guest resumes).

Everything ``OvnLab.up`` starts is stopped by ``OvnLab.down`` (by pid), also after a half
``up``; the lab's own teardown removes the namespaces and files as a second net.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from vmferry import privileged
from vmferry.bench.migration.config import BenchConfig, Timing
from vmferry.bench.migration.lab import BenchLab
from vmferry.bench.migration.variants import _HandDriven, _phase_durations
from vmferry.drivers.softswitch.base import PortSpec
from vmferry.errors import SetupError, VmferryError, WaitTimeout
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.names import tap_name
from vmferry.model.topology import HOST_BRIDGE

log = logging.getLogger(__name__)

NB_SCHEMA = Path("/usr/share/ovn/ovn-nb.ovsschema")
SB_SCHEMA = Path("/usr/share/ovn/ovn-sb.ovsschema")
INTEGRATION_BRIDGE = "br-int"
UNDERLAY_BRIDGE = "br-phy"
UNDERLAY_PORT = "ovn-ul"
UNDERLAY_HOST_PORT = "ovn-ulh"        # its peer, an access port of the host's switch
UNDERLAY_VLAN = 3999
UNDERLAY_NET = "198.51.100"           # /24, the tunnel endpoints
UNDERLAY_MTU = 1600                   # room for the Geneve header
CLIENT_NODE = "ovn-client"
CLIENT_PORT = "ovn-client"            # the client's logical switch port
CLIENT_IP = "192.0.2.250/24"
CLIENT_CHASSIS_IF = "ovncl"
LOGICAL_SWITCH = "ovn-ls"
SYNC_TIMEOUT_S = 30


class OvnLab:
    """OVN on ``chassis`` hosts of a running ``BenchLab``; the client on ``client_chassis``."""

    def __init__(self, lab: BenchLab, chassis: list[str], client_chassis: str) -> None:
        self.lab = lab
        self.layout = lab.layout
        self.chassis = list(dict.fromkeys([*chassis, client_chassis]))
        self.client_chassis = client_chassis
        self.dir = self.layout.root / "ovn"

    # ---- paths

    @property
    def nb(self) -> str:
        return f"unix:{self.dir / 'nb.sock'}"

    @property
    def sb(self) -> str:
        return f"unix:{self.dir / 'sb.sock'}"

    @property
    def client_namespace(self) -> str:
        return self.layout.namespace(CLIENT_NODE)

    def _ovs(self, host: str) -> OvsInstance:
        return OvsInstance(host, self.layout.namespace(host), self.layout.ovs_dir(host))

    def _pidfiles(self) -> list[Path]:
        return [self.dir / f"ovn-controller-{h}.pid" for h in self.chassis] + \
            [self.dir / "ovn-northd.pid", self.dir / "sb.pid", self.dir / "nb.pid"]

    def _alive(self, pidfile: Path) -> bool:
        pid = privileged.read_pidfile(pidfile)
        return bool(pid and privileged.pid_alive(pid) and _names(pid, str(self.dir)))

    def tunnel_ip(self, host: str) -> str:
        return f"{UNDERLAY_NET}.{10 + self.chassis.index(host)}"

    # ---- up / down

    def up(self) -> None:
        """Start the central daemons, wire the underlay, start one ovn-controller per chassis,
        plug the client. Raises ``SetupError`` or ``WaitTimeout``."""
        for tool in ("ovn-northd", "ovn-controller", "ovn-nbctl", "ovsdb-server", "ovs-vsctl"):
            if shutil.which(tool) is None:
                raise SetupError(f"missing {tool}; run scripts/install-system-deps.sh")
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, schema in (("nb", NB_SCHEMA), ("sb", SB_SCHEMA)):
            db = self.dir / f"{name}.db"
            if not db.exists():
                _run(None, ["ovsdb-tool", "create", str(db), str(schema)])
            if self._alive(self.dir / f"{name}.pid"):
                continue
            _run(None, ["ovsdb-server", str(db), f"--remote=punix:{self.dir / (name + '.sock')}",
                        f"--pidfile={self.dir / (name + '.pid')}",
                        f"--log-file={self.dir / (name + '.log')}",
                        f"--unixctl={self.dir / (name + '.ctl')}", "--detach", "-vconsole:off"])
        if not self._alive(self.dir / "ovn-northd.pid"):
            _run(None, ["ovn-northd", f"--ovnnb-db={self.nb}", f"--ovnsb-db={self.sb}",
                        f"--pidfile={self.dir / 'ovn-northd.pid'}",
                        f"--log-file={self.dir / 'ovn-northd.log'}",
                        f"--unixctl={self.dir / 'ovn-northd.ctl'}", "--detach", "-vconsole:off"],
                 env={"OVN_RUNDIR": str(self.dir)})
        self.nbctl("--may-exist", "ls-add", LOGICAL_SWITCH)
        self.wire_underlay()
        for host in self.chassis:
            self._chassis_up(host)
        self._client_up()
        self._wait_chassis()

    def _chassis_up(self, host: str) -> None:
        namespace = self.layout.namespace(host)
        privileged.create_veth(namespace, UNDERLAY_PORT, namespace, UNDERLAY_HOST_PORT,
                               mtu=UNDERLAY_MTU)
        ovs = self._ovs(host)
        with ovs.softswitch() as switch:
            switch.ensure_port(HOST_BRIDGE, PortSpec(name=UNDERLAY_HOST_PORT,
                                                     tag=UNDERLAY_VLAN, vlan_mode="access"))
            switch.ensure_bridge(UNDERLAY_BRIDGE, datapath_type="netdev")
            switch.ensure_bridge(INTEGRATION_BRIDGE, datapath_type="netdev")
            switch.ensure_port(UNDERLAY_BRIDGE, PortSpec(name=UNDERLAY_PORT))
        self.vsctl(host, "set", "Interface", UNDERLAY_BRIDGE, f"mtu_request={UNDERLAY_MTU}")
        self.vsctl(host, "set", "Open_vSwitch", ".",
                   f"external_ids:system-id={host}", f"external_ids:ovn-remote={self.sb}",
                   "external_ids:ovn-encap-type=geneve",
                   f"external_ids:ovn-encap-ip={self.tunnel_ip(host)}",
                   f"external_ids:ovn-bridge={INTEGRATION_BRIDGE}",
                   "external_ids:ovn-bridge-datapath-type=netdev")
        _wait_link(namespace, UNDERLAY_BRIDGE)
        privileged.add_address(namespace, UNDERLAY_BRIDGE, f"{self.tunnel_ip(host)}/24")
        privileged.set_link_up(namespace, UNDERLAY_BRIDGE)
        rundir = self.dir / host
        rundir.mkdir(parents=True, exist_ok=True)
        if self._alive(self.dir / f"ovn-controller-{host}.pid"):
            return
        _run(namespace, ["ovn-controller", f"unix:{ovs.db_socket}",
                         f"--pidfile={self.dir / f'ovn-controller-{host}.pid'}",
                         f"--log-file={self.dir / f'ovn-controller-{host}.log'}",
                         "--detach", "-vconsole:off"],
             env={"OVN_RUNDIR": str(rundir), "OVS_RUNDIR": str(ovs.rundir)})

    def wire_underlay(self) -> None:
        """Carry the underlay VLAN on the trunks between the chassis (again before every
        migration: the controller's reconciliation of the fabric, run by the vmferry variant,
        keeps only the VLANs of its own endpoints). Raises ``AgentError``/``FabricError``."""
        self.lab.wire_vlan(UNDERLAY_VLAN, self.chassis, before=[])

    def _client_up(self) -> None:
        namespace = self.client_namespace
        privileged.create_namespace(namespace)
        privileged.create_veth(namespace, "eth0", self.layout.namespace(self.client_chassis),
                               CLIENT_CHASSIS_IF)
        privileged.add_address(namespace, "eth0", CLIENT_IP)
        privileged.run_in_namespace(namespace, ["ethtool", "-K", "eth0", "tx", "off"],
                                    check=False)
        self.nbctl("--may-exist", "lsp-add", LOGICAL_SWITCH, CLIENT_PORT)
        self.nbctl("lsp-set-addresses", CLIENT_PORT, "unknown")
        self.nbctl("lsp-set-options", CLIENT_PORT, f"requested-chassis={self.client_chassis}")
        self.plug(self.client_chassis, CLIENT_CHASSIS_IF, CLIENT_PORT)

    def _wait_chassis(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = _run(None, ["ovn-sbctl", f"--db={self.sb}", "--bare", "--columns=name",
                              "list", "Chassis"]).stdout
            if set(self.chassis) <= set(out.split()):
                return
            time.sleep(0.2)
        raise WaitTimeout(f"chassis {self.chassis} to register in the OVN southbound DB", timeout)

    def down(self) -> list[str]:
        """Stop every daemon this lab started (by pidfile), remove its bridges, links and
        namespaces, and the hosts' OVN settings. Idempotent; never raises."""
        removed: list[str] = []
        for pidfile in self._pidfiles():
            pid = privileged.read_pidfile(pidfile)
            if pid and self._alive(pidfile):
                privileged.stop_pid(pid)
                removed.append(f"{pidfile.stem} ({pid})")
        for host in self.chassis:
            ovs = self._ovs(host)
            if not ovs.running():
                continue
            try:
                self.vsctl(host, "--if-exists", "del-br", INTEGRATION_BRIDGE, "--",
                           "--if-exists", "del-br", UNDERLAY_BRIDGE, "--",
                           "remove", "Open_vSwitch", ".", "external_ids", "system-id",
                           "ovn-remote", "ovn-encap-type", "ovn-encap-ip", "ovn-bridge",
                           "ovn-bridge-datapath-type")
            except VmferryError as exc:
                log.warning("OVN cleanup on %s: %s", host, exc.message)
            try:
                with ovs.softswitch() as switch:
                    switch.delete_port(HOST_BRIDGE, UNDERLAY_HOST_PORT)
            except VmferryError as exc:
                log.warning("OVN cleanup on %s: %s", host, exc.message)
            for ifname in (UNDERLAY_PORT, CLIENT_CHASSIS_IF):
                try:
                    privileged.delete_link(self.layout.namespace(host), ifname)
                except (OSError, VmferryError) as exc:  # the namespace may be gone already
                    log.debug("OVN cleanup: %s on %s: %s", ifname, host, exc)
        try:
            self.lab.wire_vlan(UNDERLAY_VLAN, [], before=[h.name for h in self.lab.topology.hosts])
        except VmferryError as exc:
            log.warning("OVN cleanup: underlay VLAN: %s", exc.message)
        for namespace in (self.client_namespace,):
            if namespace in privileged.list_namespaces():
                privileged.delete_namespace(namespace)
                removed.append(f"namespace {namespace}")
        shutil.rmtree(self.dir, ignore_errors=True)
        return removed

    # ---- tools

    def nbctl(self, *args: str, wait: bool = False) -> str:
        argv = ["ovn-nbctl", f"--db={self.nb}", f"--timeout={SYNC_TIMEOUT_S}"]
        if wait:
            argv.append("--wait=hv")
        return _run(None, [*argv, *args], timeout=SYNC_TIMEOUT_S + 5).stdout

    def vsctl(self, host: str, *args: str) -> str:
        return _run(None, ["ovs-vsctl", f"--db=unix:{self._ovs(host).db_socket}",
                           "--timeout=10", *args]).stdout

    def plug(self, host: str, ifname: str, logical_port: str) -> None:
        """Move ``ifname`` onto br-int as ``logical_port`` (off the agent's bridge, if there),
        in one transaction."""
        self.vsctl(host, "--if-exists", "del-port", ifname, "--",
                   "--may-exist", "add-port", INTEGRATION_BRIDGE, ifname, "--",
                   "set", "Interface", ifname, f"external_ids:iface-id={logical_port}")

    def unplug(self, host: str, ifname: str) -> None:
        self.vsctl(host, "--if-exists", "del-port", INTEGRATION_BRIDGE, ifname)


class Ovn(_HandDriven):
    """The guest's port moved the way OpenStack moves it with OVN."""

    name = "ovn"
    description = ("OVN 23.03 (NB/SB, northd, one ovn-controller per host, Geneve over the "
                   "lab's ToR/spine switches, client on a rack-1 chassis): "
                   "requested-chassis=SRC,DST + activation-strategy=rarp before, "
                   "requested-chassis=DST after; same agents, guest and QEMU")
    mac = "52:54:00:be:00:04"

    def __init__(self, lab: BenchLab, config: BenchConfig, address: str) -> None:
        super().__init__(lab, config, address)
        self.ovn: OvnLab | None = None

    @property
    def probe_namespace(self) -> str:
        return self.lab.namespace(CLIENT_NODE)

    def _ovn(self) -> OvnLab:
        if self.ovn is None:
            raise SetupError("the OVN lab is not up")
        return self.ovn

    def prepare(self, home: str) -> None:
        away = next(h for h in self.lab.rack_hosts() if h != home)
        rack1 = self.lab.topology.racks[0].name
        third = next(h.name for h in self.lab.topology.hosts
                     if h.name not in (home, away) and h.rack == rack1)
        self.ovn = OvnLab(self.lab, [home, away], client_chassis=third)
        try:
            self.ovn.up()
            ovn = self.ovn
            ovn.nbctl("--may-exist", "lsp-add", LOGICAL_SWITCH, self.vm)
            ovn.nbctl("lsp-set-addresses", self.vm, f"{self.mac} {self.address}")
            ovn.nbctl("lsp-set-options", self.vm, f"requested-chassis={home}")
            self.lab.agent(home, "PUT", f"/v1/guests/{self.vm}",
                           body=self.request(incoming=False))
            ovn.plug(home, tap_name(self.vm), self.vm)
            ovn.nbctl("sync", wait=True)
        except BaseException:
            self.ovn.down()
            self.ovn = None
            raise

    def finish(self, host: str) -> None:
        try:
            for node in {h.name for h in self.lab.topology.hosts}:
                if self.ovn is not None:
                    try:
                        self.ovn.unplug(node, tap_name(self.vm))
                    except VmferryError:
                        pass
                try:
                    self.lab.agent(node, "DELETE", f"/v1/guests/{self.vm}")
                except VmferryError:
                    pass
        finally:
            if self.ovn is not None:
                self.ovn.down()
                self.ovn = None

    def restore(self, where: str) -> None:
        self._ovn().wire_underlay()

    def migrate(self, source: str, destination: str) -> Timing:
        ovn = self._ovn()
        marks: dict[str, float] = {}
        started = time.monotonic()
        ovn.wire_underlay()
        ovn.nbctl("lsp-set-options", self.vm, f"requested-chassis={source},{destination}",
                  "activation-strategy=rarp")
        uri = self.start_destination(source, destination)
        ovn.plug(destination, tap_name(self.vm), self.vm)
        ovn.nbctl("sync", wait=True)
        marks["bind_both"] = time.monotonic()
        qemu = self.run_qemu_migration(source, destination, uri)
        marks["qemu_migration"] = time.monotonic()
        ovn.nbctl("lsp-set-options", self.vm, f"requested-chassis={destination}", wait=True)
        marks["bind_destination"] = time.monotonic()
        ovn.unplug(source, tap_name(self.vm))
        self.lab.agent(source, "DELETE", f"/v1/guests/{self.vm}")
        marks["clean_source"] = time.monotonic()
        return Timing(total_ms=(time.monotonic() - started) * 1000, qemu=qemu,
                      phases=_phase_durations(started, marks), events=self.last_events)


def _run(namespace: str | None, argv: list[str], *, timeout: float = 30,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return privileged.run_in_namespace(namespace, argv, timeout=timeout, env=env)
    except VmferryError as exc:
        raise SetupError(f"OVN lab: {' '.join(argv[:3])} failed",
                         cause=exc.fields.get("cause") or exc.message) from exc


def _wait_link(namespace: str, ifname: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not privileged.link_exists(namespace, ifname):
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{ifname} to appear in {namespace}", timeout)
        time.sleep(0.05)


def _names(pid: int, text: str) -> bool:
    """The process's command line mentions ``text`` (a stale pidfile may name a recycled
    pid: only a process started with our files is ours)."""
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
