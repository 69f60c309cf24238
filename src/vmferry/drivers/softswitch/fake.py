"""An in-memory ``Softswitch`` for unit tests: bridges, ports, flows by cookie, meters, an fdb.

It keeps the contract of the real switch where callers can see it:

- ports are diffed: a write happens only when something differs, all ports of one
  ``ensure_ports`` in one counted transaction (``calls["transactions"]``), all or none;
  a new port gets the next OpenFlow number, or none until ``number_port`` when it is listed in
  ``unnumbered`` (``wait_for_port`` then waits on a condition, never sleeps);
- flows are kept per cookie in the driver's normalized text (``flowtext``), so a replace then
  dump round trip compares equal; all cookies of one ``replace_flows_many`` change in one
  counted bundle (``calls["bundles"]``), atomically, and only if the flows changed; a flow
  naming a missing meter is refused, as OpenFlow refuses it; unchanged flows keep counters;
- meters: deleting one deletes the flows using it (OpenFlow);
- ``refuse_cookies``: flows with these cookies are refused (the whole bundle fails), as OVS
  refuses a flow it cannot install.

Reads cost nothing here, but are counted (``calls["flow_dumps"]``, ``calls["meter_dumps"]``,
``calls["port_reads"]``) so a test can check a caller reads as little as the real switch needs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from vmferry.drivers.softswitch.base import (
    ConnEntry,
    FdbEntry,
    Flow,
    FlowStats,
    Meter,
    MeterStats,
    PortSpec,
    PortState,
    Softswitch,
    check_port_spec,
)
from vmferry.drivers.softswitch.ovs.flowtext import (
    MAC_RE,
    MAX_COOKIE,
    flow_key,
    normalize_flow,
    plan_flow_changes,
)
from vmferry.drivers.softswitch.ovs.ofctl import meters_after, plan_meter_changes
from vmferry.errors import ConflictError, InputError, SoftswitchError, WaitTimeout

FAIL_MODES = frozenset({"standalone", "secure"})


@dataclass
class _Bridge:
    datapath_type: str
    fail_mode: str | None
    ports: dict[str, PortState] = field(default_factory=dict)
    specs: dict[str, PortSpec] = field(default_factory=dict)
    # cookie -> flow key -> flow as dumped (normalized) with counters
    flows: dict[int, dict[tuple[int, int, str], FlowStats]] = field(default_factory=dict)
    meters: dict[int, Meter] = field(default_factory=dict)
    fdb: list[FdbEntry] = field(default_factory=list)
    next_ofport: int = 1


class FakeSoftswitch(Softswitch):
    """One switch in memory. Thread-safe (callers read and write from several threads)."""

    def __init__(self, *, unnumbered: Collection[str] = (),
                 refuse_cookies: Collection[int] = ()) -> None:
        self.unnumbered = set(unnumbered)      # ports created without an ofport
        self.refuse_cookies = set(refuse_cookies)
        self.calls: Counter[str] = Counter()
        self.closed = False
        self._bridges: dict[str, _Bridge] = {}
        self._conntrack: list[ConnEntry] = []    # one tracker per switch, as a datapath has
        self._changed = threading.Condition(threading.RLock())

    # ---- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True

    def _bridge(self, bridge: str) -> _Bridge:
        if self.closed:
            raise SoftswitchError("the fake switch is closed")
        found = self._bridges.get(bridge)
        if found is None:
            raise SoftswitchError(f"bridge {bridge} does not exist", cause="no such bridge")
        return found

    # ---- bridges -------------------------------------------------------------------------------

    def bridges(self) -> list[str]:
        with self._changed:
            return sorted(self._bridges)

    def ensure_bridge(self, bridge: str, *, datapath_type: str = "netdev",
                      fail_mode: str | None = None) -> None:
        if fail_mode is not None and fail_mode not in FAIL_MODES:
            raise InputError("bridge.fail_mode", f"{fail_mode!r} is not standalone or secure")
        if not bridge or len(bridge) > 15:
            raise InputError("bridge", f"{bridge!r} is not a valid bridge name")
        with self._changed:
            found = self._bridges.get(bridge)
            if found is None:
                self._bridges[bridge] = _Bridge(datapath_type, fail_mode)
            elif (found.datapath_type, found.fail_mode) != (datapath_type, fail_mode):
                found.datapath_type, found.fail_mode = datapath_type, fail_mode
            else:
                return
            self.calls["transactions"] += 1

    def delete_bridge(self, bridge: str) -> None:
        with self._changed:
            if self._bridges.pop(bridge, None) is not None:
                self.calls["transactions"] += 1

    # ---- ports ---------------------------------------------------------------------------------

    def ensure_port(self, bridge: str, port: PortSpec) -> None:
        self.ensure_ports(bridge, [port])

    def ensure_ports(self, bridge: str, ports: Iterable[PortSpec]) -> None:
        """Write the ports that differ from their spec, all in one transaction (or none)."""
        specs = list(ports)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise InputError("ports", "a port is named twice")
        for spec in specs:
            check_port_spec(spec)
        with self._changed:
            row = self._bridge(bridge)
            for spec in specs:
                owner = self._owner(spec.name)
                if owner not in (None, bridge):
                    raise ConflictError("port", f"{spec.name} is on bridge {owner}, "
                                        f"not {bridge}")
            changed = [spec for spec in specs if row.specs.get(spec.name) != spec]
            if not changed:
                return
            for spec in changed:
                old = row.ports.get(spec.name)
                ofport = old.ofport if old is not None else None
                if old is None and spec.name not in self.unnumbered:
                    ofport, row.next_ofport = row.next_ofport, row.next_ofport + 1
                row.specs[spec.name] = spec
                row.ports[spec.name] = PortState(
                    name=spec.name, tag=spec.tag, trunks=spec.trunks, vlan_mode=spec.vlan_mode,
                    iface_type=spec.iface_type, ofport=ofport, mac_in_use=None,
                    external_ids=dict(spec.external_ids))
            self.calls["transactions"] += 1
            self._changed.notify_all()

    def _owner(self, port: str) -> str | None:
        return next((name for name, row in self._bridges.items() if port in row.ports), None)

    def number_port(self, bridge: str, port: str, ofport: int | None = None) -> int:
        """Give an unnumbered port its OpenFlow number (what ovs-vswitchd does), waking
        ``wait_for_port``; -1 stands for a port the switch failed to open."""
        with self._changed:
            row = self._bridge(bridge)
            if ofport is None:
                ofport, row.next_ofport = row.next_ofport, row.next_ofport + 1
            row.ports[port] = replace(row.ports[port], ofport=ofport)
            self._changed.notify_all()
            return ofport

    def delete_port(self, bridge: str, port: str) -> None:
        with self._changed:
            row = self._bridge(bridge)
            if row.ports.pop(port, None) is not None:
                row.specs.pop(port, None)
                self.calls["transactions"] += 1

    def ports(self, bridge: str, names: Collection[str] | None = None) -> dict[str, PortState]:
        with self._changed:
            self.calls["port_reads"] += 1
            row = self._bridge(bridge)
            return {name: state for name, state in sorted(row.ports.items())
                    if names is None or name in names}

    def wait_for_port(self, bridge: str, port: str, timeout: float = 10) -> int:
        with self._changed:
            def numbered() -> bool:
                state = self._bridge(bridge).ports.get(port)
                return state is None or state.ofport is not None
            if not self._changed.wait_for(numbered, timeout):
                raise WaitTimeout(f"port {port} on {bridge} to get an OpenFlow port number",
                                  timeout)
            state = self._bridge(bridge).ports.get(port)
            if state is None or state.ofport is None:
                raise SoftswitchError(f"port {port} is not on bridge {bridge}",
                                      cause="no such port")
            if state.ofport < 0:
                raise SoftswitchError(f"the switch cannot use port {port} on {bridge}",
                                      cause="ofport -1")
            return state.ofport

    def set_trunks(self, bridge: str, port: str, vlans: frozenset[int]) -> None:
        for vlan in vlans:
            if not 0 <= vlan <= 4095:
                raise InputError("trunks", f"{vlan} is not 0..4095")
        with self._changed:
            row = self._bridge(bridge)
            spec = row.specs.get(port)
            if spec is None:
                raise SoftswitchError(f"port {port} is not on bridge {bridge}",
                                      cause="no such port")
            self.ensure_ports(bridge, [replace(spec, trunks=frozenset(vlans))])

    # ---- flows ---------------------------------------------------------------------------------

    def replace_flows(self, bridge: str, cookie: int, flows: list[Flow]) -> None:
        self.replace_flows_many(bridge, {cookie: flows})

    def replace_flows_many(self, bridge: str, flows: Mapping[int, list[Flow]],
                           actual: Mapping[int, list[Flow]] | None = None) -> None:
        for cookie in flows:
            if not 0 < cookie <= MAX_COOKIE:
                raise InputError("cookie", f"{cookie} is not 1..2^64-2")
        with self._changed:
            row = self._bridge(bridge)
            # plan_flow_changes refuses conflicting flows, as the real driver does.
            lines = [line for cookie in sorted(flows) for line in plan_flow_changes(
                cookie, [s.flow for s in row.flows.get(cookie, {}).values()], flows[cookie])]
            if not lines:
                return
            wanted = {cookie: {flow_key(f): normalize_flow(f) for f in cookie_flows}
                      for cookie, cookie_flows in flows.items()}
            for cookie, by_key in wanted.items():
                if cookie in self.refuse_cookies:
                    raise SoftswitchError(f"the switch refused the flows of cookie {cookie:#x}",
                                          cause="refused by the test")
                for flow in by_key.values():
                    missing = _meters_used(flow) - row.meters.keys()
                    if missing:
                        raise SoftswitchError(f"a flow uses meter {min(missing)}, which does "
                                              f"not exist on {bridge}", cause="unknown meter")
            for cookie, by_key in wanted.items():
                old = row.flows.get(cookie, {})
                kept = {key: (old[key] if key in old and old[key].flow == flow
                              else FlowStats(cookie, flow)) for key, flow in by_key.items()}
                if kept:
                    row.flows[cookie] = kept
                else:
                    row.flows.pop(cookie, None)
            self.calls["bundles"] += 1

    def dump_flows_many(self, bridge: str, cookies: Collection[int]) -> dict[int, list[Flow]]:
        with self._changed:
            self.calls["flow_dumps"] += 1
            row = self._bridge(bridge)
            return {cookie: _sorted([s.flow for s in row.flows.get(cookie, {}).values()])
                    for cookie in cookies}

    def dump_flows(self, bridge: str, cookie: int | None = None) -> list[Flow]:
        return _sorted([stats.flow for stats in self.flow_stats(bridge, cookie)])

    def flow_stats(self, bridge: str, cookie: int | None = None) -> list[FlowStats]:
        with self._changed:
            self.calls["flow_dumps"] += 1
            row = self._bridge(bridge)
            return [stats for found, by_key in sorted(row.flows.items())
                    if cookie in (None, found) for stats in by_key.values()]

    def count(self, bridge: str, cookie: int, flow: Flow, packets: int, size: int = 64) -> None:
        """Count ``packets`` frames of ``size`` bytes on an installed flow (a test's traffic)."""
        with self._changed:
            by_key = self._bridge(bridge).flows.get(cookie, {})
            key = flow_key(flow)
            if key not in by_key:
                raise SoftswitchError(f"no such flow with cookie {cookie:#x}: {flow}")
            old = by_key[key]
            by_key[key] = replace(old, packets=old.packets + packets,
                                  bytes=old.bytes + packets * size)

    # ---- meters --------------------------------------------------------------------------------

    def replace_meters(self, bridge: str, meters: list[Meter], owned: Collection[int],
                       actual: list[Meter] | None = None) -> list[Meter]:
        with self._changed:
            row = self._bridge(bridge)
            before = sorted(row.meters.values(), key=lambda m: m.meter_id)
            changes = plan_meter_changes(before, meters, owned)   # validates
            for command, argument in changes:
                meter_id = int(argument.split(",", 1)[0].split("=", 1)[1])
                if command == "del-meter":
                    del row.meters[meter_id]
                    for by_key in row.flows.values():
                        for key in [k for k, s in by_key.items()
                                    if meter_id in _meters_used(s.flow)]:
                            del by_key[key]
                else:
                    row.meters[meter_id] = next(m for m in meters if m.meter_id == meter_id)
            row.flows = {cookie: by_key for cookie, by_key in row.flows.items() if by_key}
            self.calls["meter_changes"] += len(changes)
            return meters_after(before, meters, owned)

    def dump_meters(self, bridge: str) -> list[Meter]:
        with self._changed:
            self.calls["meter_dumps"] += 1
            return sorted(self._bridge(bridge).meters.values(), key=lambda m: m.meter_id)

    def meter_stats(self, bridge: str) -> dict[int, MeterStats]:
        with self._changed:
            row = self._bridge(bridge)
            uses = Counter(meter_id for by_key in row.flows.values()
                           for stats in by_key.values() for meter_id in _meters_used(stats.flow))
            return {meter_id: MeterStats(meter_id, uses[meter_id], 0, 0, 0, 0)
                    for meter_id in sorted(row.meters)}

    def settle(self) -> None:
        """Nothing is cached in memory: every change acts at once."""

    # ---- connection tracking -------------------------------------------------------------------

    def track(self, entry: ConnEntry) -> None:
        """Record a tracked connection (what a committed packet would leave in the tracker)."""
        with self._changed:
            self._conntrack.append(entry)

    def dump_conntrack(self, zone: int) -> list[ConnEntry]:
        if not 0 <= zone <= 0xFFFF:
            raise InputError("zone", f"{zone} is not 0..65535")
        with self._changed:
            return [e for e in self._conntrack if e.zone == zone]

    # ---- MAC learning --------------------------------------------------------------------------

    def learn(self, bridge: str, port: str, vlan: int, mac: str) -> None:
        """Record a learned MAC (what a frame from ``port`` would teach the switch)."""
        with self._changed:
            row = self._bridge(bridge)
            row.fdb = [e for e in row.fdb if (e.vlan, e.mac) != (vlan, mac.lower())]
            row.fdb.append(FdbEntry(port, vlan, mac.lower()))

    def fdb(self, bridge: str) -> list[FdbEntry]:
        with self._changed:
            return list(self._bridge(bridge).fdb)

    def flush_fdb(self, bridge: str, mac: str | None = None) -> None:
        if mac is not None and not MAC_RE.match(mac):
            raise InputError("mac", f"{mac!r} is not a MAC address")
        with self._changed:
            row = self._bridge(bridge)
            row.fdb = [e for e in row.fdb if mac is not None and e.mac != mac.lower()]


def _meters_used(flow: Flow) -> set[int]:
    return {int(action.split(":", 1)[1]) for action in flow.actions.split(",")
            if action.startswith("meter:")}


def _sorted(flows: list[Flow]) -> list[Flow]:
    return sorted(flows, key=lambda f: (f.table, -f.priority, f.match, f.actions))
