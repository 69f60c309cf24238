"""The lab the benchmark runs on, and the hands that wire and read it directly: the agents'
HTTP API, the fabric driver (trunks, MAC-move counters), the hosts' OVS databases, the
controller's CPU time, the migration link's rate."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vmferry import paths, privileged
from vmferry.drivers.fabric.ovs_fabric import OvsFabric
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.errors import AgentError, ConflictError, VmferryError
from vmferry.http import ClientTls, client_for, error_payload, raise_for_agent
from vmferry.lab.names import LabLayout
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.addresses import bare
from vmferry.model.boundary import Way, crossing_facts, plan_crossing
from vmferry.model.fabric import Endpoint, client_endpoints, desired_trunk_vlans
from vmferry.model.topology import Topology


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class BenchLab:
    """A lab brought up for the benchmark alone, and the hands that wire it directly: the
    agents' HTTP API, the fabric driver for the switches' trunks, the hosts' OVS databases."""

    def __init__(self, topology: Topology, controller_port: int, *, tls: bool = True) -> None:
        self.topology = topology
        self.tls = tls
        self.client_tls: ClientTls | None = None
        self.layout = LabLayout(topology.name)
        self.controller_port = controller_port
        self.inventory: Topology | None = None
        self.admin_token: str | None = None
        self._fabric: OvsFabric | None = None

    # -- life cycle

    def up(self, say: Callable[[str], None]) -> None:
        from vmferry.image.builder import ensure_image
        from vmferry.lab.builder import Lab
        if self.layout.state_file.exists():
            raise ConflictError("lab-name", f"a lab named {self.topology.name!r} already exists "
                                f"under {paths.state_root()}; bring it down or pick another name")
        say("guest image")
        ensure_image()
        lab = Lab(self.topology, controller_port=self.controller_port, tls=self.tls)
        self.inventory = lab.up(progress=lambda step: say(f"lab: {step}"))
        self.client_tls = lab.client_tls()     # agents answer the controller's certificate
        self.admin_token = self.layout.admin_token_file.read_text().strip()

    def down(self) -> list[str]:
        from vmferry.lab.builder import teardown
        if self._fabric is not None:
            self._fabric.close()
            self._fabric = None
        return teardown(self.topology.name)

    # -- reaching things

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def _inventory(self) -> Topology:
        if self.inventory is None:
            raise ConflictError("lab", "the bench lab is not up")
        return self.inventory

    def agent(self, host: str, method: str, path: str, *, body: Any = None,
              params: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        """One request to a host's agent. Raises ``AgentError``."""
        import httpx
        spec = self._inventory().host(host)
        token = Path(spec.agent_token_file).read_text().strip() if spec.agent_token_file else None
        try:
            with client_for(spec.agent_url or "", token=token, timeout=timeout,
                            tls=self.client_tls, server_name=host) as api:
                response = api.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise AgentError(f"agent on {host} unreachable: {exc}", host=host) from exc
        raise_for_agent(host, response)
        return response.json() if response.content else None

    def controller(self, method: str, path: str, *, body: Any = None,
                   params: dict[str, Any] | None = None, timeout: float = 300) -> Any:
        """One request to the lab's controller with the admin token. Raises ``VmferryError``."""
        import httpx
        try:
            with client_for(self.controller_url, token=self.admin_token,
                            timeout=timeout) as api:
                response = api.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise VmferryError(f"controller unreachable: {exc}") from exc
        if not response.is_success:
            payload = error_payload(response)
            raise VmferryError(f"controller: {payload.get('message', response.reason_phrase)}",
                               status=response.status_code)
        return response.json() if response.content else None

    def fabric(self) -> OvsFabric:
        if self._fabric is None:
            self._fabric = OvsFabric(self._inventory())
        return self._fabric

    def host_softswitch(self, host: str) -> OvsSoftswitch:
        ovs = OvsInstance(host, self.layout.namespace(host), self.layout.ovs_dir(host))
        return OvsSoftswitch(f"unix:{ovs.db_socket}")

    def namespace(self, node: str) -> str:
        return self.layout.namespace(node)

    def rack_hosts(self, boundary: str | None = None, vlan: int = 100) -> tuple[str, str]:
        """A host of the first rack and a host of another rack: the path crosses the spine.
        With ``boundary`` (a way across), the other host is in a routed rack and the move
        there must take that way (``model.boundary``)."""
        topo = self.topology
        first = topo.racks[0].name
        routed = {r.name for r in topo.routed_racks()}
        a = next(h.name for h in topo.hosts if h.rack == first)
        b = next((h.name for h in topo.hosts if h.rack != first
                  and (boundary is None or h.rack in routed)), None)
        if b is None:
            raise ConflictError("topology", "the benchmark needs hosts in two racks" +
                                (", one of them routed" if boundary else ""))
        if boundary is not None:
            facts = crossing_facts(topo, "bench", vlan, a, b)
            # The controller's pool decides at the move; a fresh lab's routed subnet is free.
            facts = dataclasses.replace(
                facts, free_destination_address=bool(facts.destination_subnet),
                guest_hotplug=topo.guest_hotplug and topo.host(b).hypervisor == "qemu")
            plan = plan_crossing(facts, boundary)
            if plan.way is None:
                raise ConflictError("boundary", f"a move {a} -> {b} cannot cross by "
                                    f"{boundary}: {plan.reasons.get(Way(boundary), '?')}")
        return a, b

    def route_to_routed_racks(self, client: str) -> None:
        """Give ``client`` a route to each routed rack's subnet through the rack router's leg
        in the client's VLAN (the lab gives clients no default route): where a guest moved
        into the rack by dual NIC answers. Raises ``PrivilegedError``."""
        node = next(c for c in self.topology.clients if c.name == client)
        for rack in self.topology.routed_racks():
            if rack.uplink is not None and rack.subnet is not None \
                    and rack.uplink.vlan == node.vlan:
                privileged.run_in_namespace(self.namespace(client), [
                    "ip", "route", "replace", str(rack.subnet), "via", bare(str(rack.uplink.ip))])

    # -- wiring by hand

    def wire_vlan(self, vlan: int, hosts: Iterable[str], before: Iterable[str] = ()) -> None:
        """Make every trunk carry ``vlan`` exactly when the lab's clients and ``hosts`` put
        endpoints of it on both sides, as an operator would by hand: only the trunk ends whose
        answer differs from when the endpoints were the clients and ``before`` are touched, and
        only ``vlan`` is added or removed there. Raises ``AgentError`` or ``FabricError``."""
        topo = self._inventory()
        clients = client_endpoints(topo)
        after = desired_trunk_vlans(topo, [*clients, *(Endpoint(node=h, vlan=vlan, owner="bench")
                                                        for h in hosts)])
        was = desired_trunk_vlans(topo, [*clients, *(Endpoint(node=h, vlan=vlan, owner="bench")
                                                      for h in before)])
        host_names = {h.name for h in topo.hosts}
        for trunk in topo.trunks():
            want = vlan in after[trunk.key]
            if want == (vlan in was[trunk.key]):
                continue
            for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port)):
                if node in host_names:
                    current = set(self.agent(node, "GET", "/v1/uplink")["vlans"])
                    if (vlan in current) != want:
                        new = current | {vlan} if want else current - {vlan}
                        self.agent(node, "PUT", "/v1/uplink", body={"vlans": sorted(new)})
                else:
                    carried = self.fabric().trunk_vlans(node, port)
                    if (vlan in carried) != want:
                        new_set = carried | {vlan} if want else carried - {vlan}
                        self.fabric().set_trunk_vlans(node, port, frozenset(new_set))

    # -- reading what users do not see

    def controller_pid(self) -> int | None:
        import json
        try:
            state = json.loads(self.layout.state_file.read_text())
        except (OSError, ValueError):
            return None
        pid = state.get("pids", {}).get("controller")
        return int(pid) if pid else None

    def mac_moves(self, switches: Iterable[str]) -> dict[str, int]:
        """Each switch's moved-MAC counter now. Raises ``FabricError``."""
        return {switch: self.fabric().mac_moves(switch) for switch in switches}

    def mac_trace_start(self, switches: Iterable[str]) -> dict[str, int]:
        """Have each switch log every MAC it learns on a new port (OVS's
        ``ofproto_dpif_xlate`` debug line, which names the thread: an upcall handler for a
        frame just received, a revalidator for a flow's cached learning pushed again); returns
        each log's size now, where ``mac_trace_read`` starts. Best effort: a switch whose log
        cannot be set is left out."""
        offsets: dict[str, int] = {}
        for switch in switches:
            spec = self._inventory().switch(switch)
            log_file = self.layout.ovs_dir(switch) / "ovs-vswitchd.log"
            if not spec.unixctl or not log_file.exists():
                continue
            try:
                done = subprocess.run(["ovs-appctl", "-t", spec.unixctl, "vlog/set",
                                       "ofproto_dpif_xlate:file:dbg"], capture_output=True,
                                      timeout=10, check=False)
            except (OSError, subprocess.SubprocessError):
                continue
            if done.returncode == 0:
                offsets[switch] = log_file.stat().st_size
        return offsets

    def mac_trace_read(self, offsets: dict[str, int]) -> list[dict[str, Any]]:
        """Every "learned that MAC is on port P" line the switches logged since
        ``mac_trace_start``: time (epoch s), switch, mac, port, vlan, thread."""
        found: list[dict[str, Any]] = []
        for switch, offset in offsets.items():
            log_file = self.layout.ovs_dir(switch) / "ovs-vswitchd.log"
            try:
                with log_file.open("rb") as handle:
                    handle.seek(offset)
                    text = handle.read().decode(errors="replace")
            except OSError:         # best effort, like the start: the figures do not need it
                continue
            found.extend({**entry, "switch": switch} for entry in parse_learned(text))
        return sorted(found, key=lambda e: e["time"])

    def link_mbps(self, source: str, destination: str, mib: int = 256) -> float:
        """The migration link's rate between two hosts, measured by one bounded TCP bulk
        transfer over it (what QEMU's stream could get at best). Raises ``VmferryError``."""
        topo = self._inventory()
        address = topo.migration_address(destination).split("/")[0]
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(destination), sys.executable, "-c",
             _SINK, address], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().strip() or 0)
            if not port:
                raise VmferryError("link measurement: the receiver did not start")
            result = subprocess.run(
                ["ip", "netns", "exec", self.namespace(source), sys.executable, "-c", _SOURCE,
                 address, str(port), str(mib)], capture_output=True, text=True, timeout=60,
                check=False)
            if result.returncode != 0:
                raise VmferryError("link measurement failed", cause=result.stderr[-300:])
            return round(float(result.stdout.strip()), 1)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(timeout=5)


_LEARNED = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\|\d+\|ofproto_dpif_xlate"
    r"(?:\((?P<thread>[^)]*)\))?\|DBG\|bridge \S+: learned that (?P<mac>[0-9a-f:]{17}) "
    r"is on port (?P<port>\S+) in VLAN (?P<vlan>\d+)", re.MULTILINE)


def parse_learned(text: str) -> list[dict[str, Any]]:
    """OVS's MAC learning debug lines (``ofproto_dpif_xlate``, log file format) as records."""
    from datetime import UTC, datetime
    return [{"time": datetime.fromisoformat(m["stamp"]).replace(tzinfo=UTC).timestamp(),
             "mac": m["mac"], "port": m["port"], "vlan": int(m["vlan"]),
             "thread": m["thread"] or ""} for m in _LEARNED.finditer(text)]


def mac_changes(trace: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per switch and MAC, how often a learning line names a port other than the one that
    MAC's previous line on that switch named (the first line of each is a first learning or
    a move from before the trace, not counted)."""
    last: dict[tuple[str, str], str] = {}
    changes: dict[str, dict[str, int]] = {}
    for entry in trace:
        key = (entry["switch"], entry["mac"])
        if key in last and last[key] != entry["port"]:
            per_switch = changes.setdefault(entry["switch"], {})
            per_switch[entry["mac"]] = per_switch.get(entry["mac"], 0) + 1
        last[key] = entry["port"]
    return changes


def cpu_ms(pid: int) -> float | None:
    """utime + stime of a process so far, ms (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


# A one-connection sink and a bounded bulk sender (run in the hosts' namespaces).
_SINK = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); s.settimeout(60)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(60)
while c.recv(1 << 20):
    pass
"""
_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
block = b"x" * (1 << 20); n = int(sys.argv[3]); t = time.monotonic()
for _ in range(n):
    c.sendall(block)
c.shutdown(socket.SHUT_WR); c.recv(1); elapsed = time.monotonic() - t
print(n * 8 * 1.048576 / elapsed)
"""

